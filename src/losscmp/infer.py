"""Spec inference: with no ``--spec``, find one from names, the signature and probing calls.

Candidates, most plausible first:

1. presets hinted by the implementations' names (``bce`` suggests binary classification,
   ``ssim`` images, ``poisson`` counts, ``lovasz`` segmentation);
2. presets whose argument names are the function's own (``input, target``; ``x, y``);
3. one tensor per required positional parameter, all of one shape (``B D``, then ``N``,
   then ``B C H W``);
4. the remaining presets.

Every candidate is read through the parameter names before it is probed: a parameter
named like a target (``target``, ``labels``, ``mask``, ``y``) never gets a gradient; one
named ``logits`` / ``scores`` is given logits, ``var`` / ``sigma`` / ``std`` a positive
value, ``probs`` probabilities, ``counts`` counts.  A preset with the function's own
argument names keeps its gradients as they are.  References that say they squash their
input themselves (``logit``, ``focal``, ``sigmoid``, ``softmax`` in their text: MONAI's
``DiceLoss(sigmoid=True)``) get logits where a preset says probabilities.

Each candidate is probed on several inputs at small sizes first, then larger ones (an
11x11 SSIM window does not fit a 4x4 image); it fits when every implementation returns
a finite tensor on most of them (a side that fails now and then is a finding for the
search, not a reason to refuse the spec).  A probe whose errors say what values an
argument takes (``var has negative entries``, ``GreaterThan(lower_bound=0.0)``: positive;
``should be between 0 and 1``: probabilities) is retried with that argument so.  A fitting spec is
then checked on the data: a loss that does not change when a constant is added along an
argument's class axis applies a softmax there, so that argument is logits and the axis
has at least two classes (softmax over one class is constant); a 1-D spec on which that
happens treats the batch as classes and is passed over.  A loss that returns one value
per element gets ``output=any``.

:func:`infer` returns the spec with the reason it was chosen and why the candidates
before it were passed over; when nothing fits, the error says which implementation
raised what, on which sizes.

Probing goes through ``run(impl, spec, case) -> Outcome`` -- in-process by default, the
isolated runner under ``--isolate`` -- so a probe that crashes cannot take losscmp down.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .domains import DOMAINS
from .engine import InProcessRunner, Runner
from .generate import build_case
from .load import Implementation
from .model import Case, Recipe
from .run import Outcome, watching_interrupts
from .spec import PRESETS, Arg, Spec, SpecError, parse_spec, preset

HINTS = [
    (("bce", "binary", "sigmoid", "logit", "focal"), "binary"),
    (("cross_entropy", "crossentropy", "nll", "softmax", "label_smooth", "multiclass"), "classification"),
    (("sinkhorn", "samplesloss", "wasserstein", "chamfer", "mmd", "energy", "hausdorff", "emd", "_ot"), "points"),
    (("poisson", "count"), "counts"),
    (("mse", "l1", "huber", "smooth", "regress", "mae", "quantile"), "regression"),
    (("dice", "iou", "jaccard", "tversky", "segment", "lovasz"), "segmentation"),
    (("kl", "js", "diverg", "distribution", "hellinger"), "distributions"),
    (("ssim", "psnr", "image", "perceptual"), "images"),
]
DEFAULT_ORDER = [
    "points", "classification", "binary", "regression", "distributions", "segmentation", "segmentation-no-channel", "images",
    "weighted-points", "counts",
]
# Generic shapes for any tensor signature, tried in this order; sizes per dim.
GENERIC_SHAPES = (("B D", "B=1..16; D=1..16"), ("N", "N=1..32"), ("B C H W", "B=1..2; C=1..3; H=1..16; W=1..16"))
PROBE_SIZES = (4, 16, 32)  # a probe that fails at one size is retried at the next
PROBE_SEEDS = (0, 1, 2)  # inputs per size: a side must return a finite value on most of them

# What parameter names say, word by word (``y_true`` is the words y and true).
TARGET_WORDS = {"target", "targets", "label", "labels", "true", "gt", "truth", "mask", "masks", "y", "ground", "reference"}
PREDICTION_WORDS = {"pred", "preds", "prediction", "predictions", "input", "inputs", "output", "outputs", "logits", "logit",
                    "scores", "score", "x", "hat", "yhat", "probs", "prob", "probas", "proba", "estimate", "z"}
DOMAIN_WORDS = (  # first match wins; (words, domain, the domains it replaces)
    ({"logits", "logit", "scores", "score"}, "logits", ("real", "unit", "simplex", "logits")),
    ({"var", "variance", "sigma", "std", "stddev", "scale", "rate", "lambda", "concentration"}, "positive", ("real", "logits", "unit")),
    ({"probs", "prob", "probas", "proba", "probabilities", "probability"}, "unit", ("real", "logits")),
    ({"counts", "count"}, "counts", ("real", "binary", "positive")),
)
NO_GRAD_DOMAINS = ("binary", "labels", "counts")
# Words in a reference that say the loss takes logits and squashes them itself
# (MONAI's DiceLoss(sigmoid=True), FocalLoss, BCEWithLogitsLoss, bce_on_sigmoid).
LOGITS_WORDS = ("logit", "focal", "sigmoid", "softmax")
# Error messages that say which values an argument takes (torch's, torch.distributions'):
# (pattern, domain, whether an argument no message names falls back to the first one).
ERROR_DOMAINS = (
    (re.compile(r"between 0 and 1|in \[0, ?1\]|Interval\(lower_bound=0\.0, upper_bound=1\.0\)|probabilit", re.I), "unit", True),
    (re.compile(r"negative|must be positive|non-?positive|GreaterThan\(lower_bound=0|positive\b|> ?0\b|>= ?0\b", re.I), "positive", False),
)
SHIFT_RTOL = 1e-4  # a value this close after adding a constant along an axis: a softmax over it


class InferenceError(SpecError):
    """No spec fits; the message is one line and says why."""


@dataclass(frozen=True)
class Inference:
    """The spec inference chose, why, and why the candidates before it were passed over."""

    spec: Spec
    reason: str
    passed_over: tuple[str, ...] = ()


@dataclass(frozen=True)
class Candidate:
    spec: Spec
    why: str  # why it is a candidate at all (and at this place in the order)


in_process = InProcessRunner()  # probing calls, unless the caller routes them elsewhere (--isolate)


def _target(fn):
    return fn.forward if isinstance(fn, torch.nn.Module) else fn


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(_target(fn))
    except Exception:  # no signature (a builtin), or user code that raises (a __signature__ property, __getattr__): unknown
        return None


def _positional_range(fn) -> tuple[int, int] | None:
    sig = _signature(fn)
    if sig is None or any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        return None
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in params)
    return required, len(params)


def _tensor_names(fn) -> list[str] | None:
    """Names of the required positional parameters (the tensors a loss takes)."""
    sig = _signature(fn)
    if sig is None or any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        return None
    return [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]


def _required_keywords(fn) -> list[str]:
    sig = _signature(fn)
    return [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY and p.default is p.empty] if sig else []


# --- what a parameter name says -----------------------------------------------------

def _words(name: str) -> set[str]:
    return {w for w in re.split(r"[_\d]+", name.lower()) if w}


def is_target(name: str) -> bool:
    """Named like a target (``target``, ``labels``, ``y_true``) and not like a prediction
    (``y_pred``, ``input``): such an argument never gets a gradient."""
    words = _words(name)
    return bool(words & TARGET_WORDS) and not (words & PREDICTION_WORDS)


def named_domain(name: str, domain: str) -> str:
    """The domain a parameter's name asks for, where it replaces ``domain`` (else ``domain``)."""
    words = _words(name)
    for hint, wanted, replaces in DOMAIN_WORDS:
        if words & hint and domain in replaces:
            return wanted
    return domain


def _wants_grad(name: str, domain: str) -> bool:
    return DOMAINS[domain].is_float and domain not in NO_GRAD_DOMAINS and not is_target(name)


def read_names(spec: Spec, names: Sequence[str] | None) -> Spec:
    """``spec`` as the parameter names read it: domains and gradients from the names.

    Unchanged (name and all) where the names ask for nothing new; otherwise the arguments
    take the parameters' names and the preset name is dropped (it would no longer pin it).
    """
    if not names or len(names) != len(spec.args):
        return spec
    same_names = [a.name for a in spec.args] == list(names)
    args = []
    for arg, name in zip(spec.args, names):
        domain = named_domain(name, arg.domain)
        grad = (arg.grad and not is_target(name) and domain not in NO_GRAD_DOMAINS) if same_names else _wants_grad(name, domain)
        args.append(Arg(name, arg.dims, domain, grad and DOMAINS[domain].is_float, arg.classes))
    if all((a.domain, a.grad) == (b.domain, b.grad) for a, b in zip(args, spec.args)):
        return spec
    return replace(spec, args=tuple(args), name=None)


# --- candidates ---------------------------------------------------------------------

def _hinted(impls: Sequence[Implementation]) -> list[str]:
    text = " ".join(i.ref.text.lower() for i in impls)
    order: list[str] = []
    for words, name in HINTS:
        if any(w in text for w in words) and name not in order:
            order.append(name)
            if name == "segmentation":
                order.append("segmentation-no-channel")
    return order


def takes_logits(spec: Spec, names: Sequence[str] | None) -> Spec:
    """Probabilities become logits on the arguments with a gradient whose own names ask
    for no domain (a ``probs`` parameter stays probabilities)."""
    own = list(names) if names and len(names) == len(spec.args) else [a.name for a in spec.args]
    args = tuple(replace(a, domain="logits") if a.domain == "unit" and a.grad and named_domain(n, "unit") == "unit"
                 and named_domain(n, "real") == "real" else a for a, n in zip(spec.args, own))
    return spec if args == spec.args else replace(spec, args=args, name=None)


def candidates(impls: Sequence[Implementation]) -> list[Candidate]:
    """Every candidate spec, most plausible first, each read through the parameter names."""
    out = _candidates(impls)
    text = " ".join(i.ref.text.lower() for i in impls)
    if any(w in text for w in LOGITS_WORDS):
        names = _tensor_names(impls[0].fn)
        out = [Candidate(s, c.why + ("; the references' names say logits" if s is not c.spec else ""))
               for c in out for s in [takes_logits(c.spec, names)]]
    return out


def _candidates(impls: Sequence[Implementation]) -> list[Candidate]:
    names = _tensor_names(impls[0].fn)
    arity = _positional_range(impls[0].fn)
    fits_arity = lambda n: arity is None or arity[0] <= len(preset(n).args) <= arity[1]  # noqa: E731
    hinted = [n for n in _hinted(impls) if fits_arity(n)]
    rest = [n for n in DEFAULT_ORDER if n not in hinted and fits_arity(n)]
    own = [n for n in rest if names and [a.name for a in preset(n).args] == names[: len(preset(n).args)]]
    out: list[Candidate] = []
    for n in hinted:
        out.append(Candidate(read_names(preset(n), names), f"the names suggest the {n} preset"))
    for n in own:
        out.append(Candidate(read_names(preset(n), names), f"the {n} preset takes the same argument names"))
    for spec in generic_specs(impls):
        out.append(Candidate(spec, "one tensor per parameter, read from the parameter names"))
    for n in rest:
        if n not in own:
            out.append(Candidate(read_names(preset(n), names), f"the {n} preset"))
    return out


def generic_specs(impls: Sequence[Implementation]) -> list[Spec]:
    """One tensor per required positional parameter, all of one shape, domains from the names."""
    names = _tensor_names(impls[0].fn)
    if names is None:
        names = ["x", "y"]
    if not names:
        return []
    out = []
    for dims, sizes in GENERIC_SHAPES:
        items = []
        for name in names:
            domain = named_domain(name, "real")
            items.append(f"{name}: {dims} {domain}{' grad' if _wants_grad(name, domain) else ''}")
        out.append(parse_spec("; ".join(items + [sizes])))
    return out


# --- probing ------------------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    """What went wrong when one candidate spec was probed (at the sizes tried)."""

    spec: Spec
    sizes: tuple[str, ...]  # "H=4, W=4" per rung tried
    failures: tuple[tuple[str, str], ...]  # (label, error) on the last rung
    worked: tuple[str, ...] = ()  # labels that returned a finite value there
    note: str = ""  # passed over for another reason than a failure (a softmax over the batch)

    @property
    def who(self) -> str:
        return self.spec.name or f"'{self.spec.text()}'"

    def describe(self) -> str:
        if self.note:
            return f"{self.who}: {self.note}"
        by_error: dict[str, list[str]] = {}
        for label, error in self.failures:
            by_error.setdefault(error, []).append(label)
        errors = "; ".join(f"{' and '.join(labels)} {error}" for error, labels in by_error.items())
        if self.worked:  # one side takes these inputs, the other does not: an argument-format mismatch
            errors = f"{' and '.join(self.worked)} returned a value but {errors}"
        where = self.sizes[0] if len(self.sizes) == 1 else f"{self.sizes[0]} and still on {self.sizes[-1]}"
        return f"{self.who}: {errors} (on {where})"


def _at_size(spec: Spec, size: int) -> tuple[Spec, tuple[tuple[str, int], ...]]:
    """The spec with its dims probed at about ``size`` (within range at first, raised later).

    Dims get distinct sizes (``size``, ``size + 1``, ...): with every dim equal, ``x: N D``
    and ``y: M D`` would broadcast by coincidence and a wrong spec would pass its probe.
    """
    sizes, raised = [], {}
    for i, dim in enumerate(spec.dims):
        lo, hi = spec.size_range(dim)
        n = max(lo, min(hi, size + i)) if size == PROBE_SIZES[0] else max(lo, size + i)
        if n > hi:
            raised[dim] = (n, n)
        elif n > lo and size != PROBE_SIZES[0]:
            raised[dim] = (n, hi)  # smaller sizes failed: keep generation at or above this one
        sizes.append((dim, n))
    return (spec.with_sizes(**raised) if raised else spec), tuple(sizes)


def _finite(o: Outcome) -> bool:
    return o.status == "ok" and o.value is not None and bool(torch.isfinite(o.value).all())


def _error(o: Outcome) -> str:
    return (o.error or str(o.status)) if o.status != "ok" else "returned NaN/inf"


def _accepts(outcomes: list[Outcome]) -> bool:
    """Finite on most probe inputs: a side that fails now and then is the search's finding."""
    return 2 * sum(_finite(o) for o in outcomes) > len(outcomes)


def _probe(impls, spec, dtype, device, run: Runner) -> tuple[Spec | None, Attempt, list[Case]]:
    tried: list[str] = []
    failures: tuple[tuple[str, str], ...] = ()
    worked: tuple[str, ...] = ()
    for size in PROBE_SIZES:
        sized, sizes = _at_size(spec, size)
        text = ", ".join(f"{d}={n}" for d, n in sizes)
        if tried and text == tried[-1]:
            continue  # nothing grew: the same probe again would fail the same way
        tried.append(text)
        cases = [build_case(sized, Recipe(sizes=sizes, seed=seed), dtype=dtype, device=device) for seed in PROBE_SEEDS]
        outcomes = {i.label: [run(i, sized, c) for c in cases] for i in impls}
        found = sized if size != PROBE_SIZES[0] else spec
        if all(_accepts(o) for o in outcomes.values()):
            return found, Attempt(spec, tuple(tried), ()), cases
        if spec.scalar and all(o.status in ("ok", "non_scalar") for os in outcomes.values() for o in os):
            loose = replace(sized, scalar=False)  # one loss value per element: compare them all
            if all(_accepts([run(i, loose, c) for c in cases]) for i in impls):
                return replace(found, scalar=False), Attempt(spec, tuple(tried), ()), cases
        failures = tuple((label, _error(next(o for o in os if not _finite(o)))) for label, os in outcomes.items() if not _accepts(os))
        worked = tuple(label for label, os in outcomes.items() if _accepts(os))
    return None, Attempt(spec, tuple(tried), failures, worked), []


def domain_retry(attempt: Attempt) -> tuple[Spec, str] | None:
    """The candidate again with the domain its errors asked for, and what changed; or None.

    "all elements of input should be between 0 and 1" makes ``input`` probabilities; "var
    has negative entries" makes ``var`` positive.  Arguments the messages name change;
    where they name none (the ``scale`` of a distribution built inside), the first real
    argument does for probabilities (the prediction), and every real argument after it
    that is not a target does for positive values."""
    spec = attempt.spec
    real = [a for a in spec.args if a.domain in ("real", "logits")]
    for pattern, domain, first in ERROR_DOMAINS:
        messages = [error for _, error in attempt.failures if pattern.search(error)]
        if not messages or not real:
            continue
        named = [a for a in real if any(re.search(rf"\b{re.escape(a.name)}\b", m) for m in messages)]
        chosen = named or (real[:1] if first else [a for a in real[1:] if not is_target(a.name)] or real)
        args = tuple(replace(a, domain=domain) if a in chosen else a for a in spec.args)
        what = "probabilities" if domain == "unit" else "positive"
        return replace(spec, args=args, name=None), f"{', '.join(a.name for a in chosen)} {what}, as the errors on real values said"
    return None


# --- checks on the data -------------------------------------------------------------

def _values(impls, spec: Spec, case: Case, run: Runner) -> list[torch.Tensor] | None:
    out = []
    for i in impls:
        o = run(i, spec, case)
        if not _finite(o) or o.value is None:
            return None
        out.append(o.value.detach().double())
    return out


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(x.shape == y.shape and bool(((x - y).abs() <= SHIFT_RTOL * (x.abs() + y.abs()) + 1e-12).all()) for x, y in zip(a, b))


def softmax_axes(impls, spec: Spec, case: Case, run: Runner) -> list[tuple[str, int]]:
    """(argument, axis) pairs along which every implementation ignores an added constant
    (a softmax or log-softmax inside) while a generic change of the same size moves it."""
    base = _values(impls, spec, case, run)
    if base is None:
        return []
    found = []
    g = torch.Generator().manual_seed(1234)
    for arg in spec.args:
        t = case.tensors[arg.name]
        if not arg.grad or arg.domain not in ("real", "logits", "unit") or t.ndim == 0:
            continue
        axes = sorted({1 if t.ndim >= 2 else 0, t.ndim - 1})
        for axis in axes:
            if t.shape[axis] < 2:
                continue
            shape = list(t.shape)
            shape[axis] = 1
            bump = torch.randn(shape, generator=g, dtype=torch.float64).to(t.dtype).to(t.device)
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype).to(t.device)
            moved = replace(case, tensors={**case.tensors, arg.name: t + bump})
            shaken = replace(case, tensors={**case.tensors, arg.name: t + noise})
            after, other = _values(impls, spec, moved, run), _values(impls, spec, shaken, run)
            if after is not None and other is not None and _close(base, after) and not _close(base, other):
                found.append((arg.name, axis))
    return found


def _with_softmax(spec: Spec, axes: list[tuple[str, int]]) -> tuple[Spec, list[str]]:
    """Logits where a softmax was seen, its axis at least 2 wide; targets of the same shape
    over the last axis are soft labels (rows on the simplex)."""
    notes, args, lows = [], list(spec.args), {}
    for name, axis in axes:
        arg = spec.arg(name)
        dim = arg.dims[axis]
        if not dim.isdigit():
            lows[dim] = max(2, spec.size_range(dim)[0])
        for k, a in enumerate(args):
            if a.name == name and a.domain != "logits":
                args[k] = replace(a, domain="logits")
            elif (a.name != name and a.dims == arg.dims and is_target(a.name) and a.domain == "real"
                  and axis == len(arg.dims) - 1):
                args[k] = replace(a, domain="simplex")
                notes.append(f"{a.name}: rows on the simplex beside it")
        notes.insert(0, f"the loss does not change when a constant is added to {name} along {dim} (as with a softmax over it): "
                        f"{name} is logits" + (f", {dim} >= 2" if not dim.isdigit() else ""))
    out = replace(spec, args=tuple(args))
    if lows:
        out = out.with_sizes(**{d: (lo, max(lo, spec.size_range(d)[1])) for d, lo in lows.items()})
    if out != spec:
        out = replace(out, name=None)
    return out, notes


def _fit(impls, candidate: Candidate, dtype, device, run: Runner) -> tuple[Spec | None, Attempt, str]:
    """Probe one candidate; then the softmax check.  (spec or None, attempt, notes)."""
    found, attempt, cases = _probe(impls, candidate.spec, dtype, device, run)
    if found is None:
        return None, attempt, ""
    axes = softmax_axes(impls, found, cases[0], run)
    batch = [(n, ax) for n, ax in axes if len(found.arg(n).dims) == 1]
    if batch:
        dim = found.arg(batch[0][0]).dims[0]
        note = f"the loss is a softmax over {batch[0][0]}'s only dim {dim}: this spec treats the batch as classes"
        return None, replace(attempt, note=note), ""
    spec, notes = _with_softmax(found, axes)
    return spec, attempt, "; ".join(notes)


def infer(
    impls: Sequence[Implementation],
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    run: Runner | None = None,
) -> Inference:
    """The most plausible candidate on which every implementation returns finite values,
    with the reason it was chosen (see the module docstring for the order and the checks)."""
    with watching_interrupts():  # a KeyboardInterrupt that no Ctrl-C caused is a probe's failure
        return _infer(impls, dtype, device, run or in_process)


def _infer(impls: Sequence[Implementation], dtype: torch.dtype, device: str, run: Runner) -> Inference:
    required = {kw for i in impls for kw in _required_keywords(i.fn)}
    if required:
        names = ", ".join(sorted(required))
        first = sorted(required)[0]
        impl = next(i for i in impls if _required_keywords(i.fn))
        sig = _signature(impl.fn)
        wanted = [p.name for p in (sig.parameters.values() if sig else ()) if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        call = ", ".join(f"{n}={n}" if n in required else n for n in wanted)
        # A keyword-only parameter may be a tensor (logits=...), which losscmp passes by
        # position, or an option, which a spec sets: name both mends, guess neither.
        raise InferenceError(f"keyword-only parameter(s) {names} of {impl.label} have no default. A tensor: losscmp passes "
                             f"tensors by position, so wrap it, def wrapped({', '.join(wanted)}): return {impl.ref.attrs[-1]}({call}). "
                             f"A number or an option: give it in --spec ('...; {first}=VALUE')")
    _same_arguments(impls)
    attempts: list[Attempt] = []
    queue = candidates(impls)
    seen: set[str] = set()
    while queue:
        candidate = queue.pop(0)
        if candidate.spec.text() in seen:
            continue
        seen.add(candidate.spec.text())
        spec, attempt, notes = _fit(impls, candidate, dtype, device, run)
        if spec is not None:
            probes = f"every implementation returned a finite value on most of {len(PROBE_SEEDS)} probe inputs ({attempt.sizes[-1]})"
            reason = "; ".join(w for w in (candidate.why, probes, notes) if w)
            return Inference(spec, reason, tuple(a.describe() for a in attempts))
        attempts.append(attempt)
        retry = domain_retry(attempt) if not attempt.note else None
        if retry is not None and retry[0].text() not in seen:
            queue.insert(0, Candidate(retry[0], f"{candidate.why}; {retry[1]}"))
    if not attempts:
        raise InferenceError("these implementations take no tensor argument that losscmp can see; give --spec explicitly")
    # Where one side worked, the inputs were right and the other side's format differs: say that first.
    failed = sorted(attempts, key=lambda a: not a.worked)
    shown = "; ".join(a.describe() for a in failed[:2])
    rest = [a.spec.name or "generic " + " ".join(a.spec.args[0].dims) for a in failed[2:]]
    also = f"; also tried {', '.join(dict.fromkeys(rest))}" if rest else ""
    raise InferenceError(f"no spec fits these implementations: {shown}{also}; give --spec explicitly (presets: {', '.join(PRESETS)})")


def _same_arguments(impls: Sequence[Implementation]) -> None:
    """Every implementation is called with the same tensors: one that cannot take as many
    (a loss taking a dict, a batch object) fails every probe; say so in a line, not with
    every probe's failure."""
    ranges = {i.label: _positional_range(i.fn) for i in impls}
    known = {la: r for la, r in ranges.items() if r is not None}
    if len(known) < 2:
        return
    need = max(lo for lo, _ in known.values())
    short = [la for la, (_, hi) in known.items() if hi < need]
    if short:
        la = short[0]
        sig = _signature(next(i.fn for i in impls if i.label == la))
        takes = ", ".join(sig.parameters) if sig else "?"
        other = next(o for o, (lo, _) in known.items() if lo == need)
        raise InferenceError(f"{la} takes {known[la][1]} tensor argument(s) ({takes}) where {other} needs {need}: losscmp calls "
                             f"every implementation with the same tensors, in order; wrap {la} so that it takes them as "
                             f"{other} does (e.g. build its dict inside the wrapper)")


def infer_spec(
    impls: Sequence[Implementation],
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    run: Runner | None = None,
) -> Spec:
    """:func:`infer`'s spec alone."""
    return infer(impls, dtype=dtype, device=device, run=run).spec
