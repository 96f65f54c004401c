"""Spec inference: with no ``--spec``, find one from names, the signature and probing calls.

Candidates, in order:

1. the presets, ordered by hints in the implementations' names and parameter names
   (``bce`` suggests binary classification, ``ssim`` images, ...) and kept only if their
   argument count fits the first implementation's required positional parameters;
2. generic specs for any tensor signature: every required positional parameter a real
   tensor of one shared shape (``B D``, then ``N``, then ``B C H W``), named after the
   parameters (``anchor``, ``positive``, ``negative``), with gradients on every argument
   not named like a target.  Keyword-only parameters with defaults are left alone.

Each candidate is probed at small sizes first, then larger ones (an 11x11 SSIM window
does not fit a 4x4 image); the first on which *every* implementation returns a finite
tensor wins.  A loss that returns one value per element gets ``output=any``.  When
nothing fits, the error says why: which implementation raised what, on which sizes.

Probing goes through ``run(impl, spec, case) -> Outcome`` -- in-process by default, the
isolated runner under ``--isolate`` -- so a probe that crashes cannot take losscmp down.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .engine import InProcessRunner, Runner
from .generate import Recipe, build_case
from .load import Implementation
from .run import Outcome
from .spec import PRESETS, Spec, SpecError, parse_spec, preset

HINTS = [
    (("bce", "binary", "sigmoid", "logit", "focal"), "binary"),
    (("cross_entropy", "crossentropy", "nll", "softmax", "label_smooth", "multiclass"), "classification"),
    (("sinkhorn", "samplesloss", "wasserstein", "chamfer", "mmd", "energy", "hausdorff", "emd", "_ot"), "points"),
    (("mse", "l1", "huber", "smooth", "regress", "mae", "quantile"), "regression"),
    (("dice", "iou", "jaccard", "tversky", "segment"), "segmentation"),
    (("kl", "js", "diverg", "distribution", "hellinger"), "distributions"),
    (("ssim", "psnr", "image", "perceptual"), "images"),
]
DEFAULT_ORDER = [
    "points", "classification", "binary", "regression", "distributions", "segmentation", "segmentation-no-channel", "images",
    "weighted-points",
]
# Generic shapes for any tensor signature, tried in this order; sizes per dim.
GENERIC_SHAPES = (("B D", "B=1..16; D=1..16"), ("N", "N=1..32"), ("B C H W", "B=1..2; C=1..3; H=1..16; W=1..16"))
TARGET_WORDS = ("target", "label", "true", "gt", "truth", "y_true", "mask")
PROBE_SIZES = (4, 16, 32)  # a probe that fails at one size is retried at the next


class InferenceError(SpecError):
    """No spec fits; the message is one line and says why."""


in_process = InProcessRunner()  # probing calls, unless the caller routes them elsewhere (--isolate)


def _target(fn):
    return fn.forward if isinstance(fn, torch.nn.Module) else fn


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(_target(fn))
    except (TypeError, ValueError):
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


def candidates(impls: Sequence[Implementation]) -> list[str]:
    """Preset names, most plausible first, that fit the first implementation's arity."""
    names = " ".join(i.ref.text.lower() for i in impls)
    sig = _signature(impls[0].fn)
    if sig is not None:
        names += " " + " ".join(sig.parameters)
    order: list[str] = []
    for words, name in HINTS:
        if any(w in names for w in words) and name not in order:
            order.append(name)
            if name == "segmentation":
                order.append("segmentation-no-channel")
    order += [n for n in DEFAULT_ORDER if n not in order]
    arity = _positional_range(impls[0].fn)
    if arity is not None:
        lo, hi = arity
        order = [n for n in order if lo <= len(preset(n).args) <= hi]
    return order


def generic_specs(impls: Sequence[Implementation]) -> list[Spec]:
    """One real tensor per required positional parameter, all of one shape."""
    names = _tensor_names(impls[0].fn)
    if names is None:
        names = ["x", "y"]
    if not names:
        return []
    out = []
    for dims, sizes in GENERIC_SHAPES:
        items = []
        for name in names:
            grad = "" if any(w in name.lower() for w in TARGET_WORDS) else " grad"
            items.append(f"{name}: {dims} real{grad}")
        out.append(parse_spec("; ".join(items + [sizes])))
    return out


@dataclass(frozen=True)
class Attempt:
    """What went wrong when one candidate spec was probed (at the sizes tried)."""

    spec: Spec
    sizes: tuple[str, ...]  # "H=4, W=4" per rung tried
    failures: tuple[tuple[str, str], ...]  # (label, error) on the last rung
    worked: tuple[str, ...] = ()  # labels that returned a finite value there

    def describe(self) -> str:
        who = self.spec.name or f"'{self.spec.text()}'"
        by_error: dict[str, list[str]] = {}
        for label, error in self.failures:
            by_error.setdefault(error, []).append(label)
        errors = "; ".join(f"{' and '.join(labels)} {error}" for error, labels in by_error.items())
        if self.worked:  # one side takes these inputs, the other does not: an argument-format mismatch
            errors = f"{' and '.join(self.worked)} returned a value but {errors}"
        where = self.sizes[0] if len(self.sizes) == 1 else f"{self.sizes[0]} and still on {self.sizes[-1]}"
        return f"{who}: {errors} (on {where})"


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


def _fits(outcomes: dict[str, Outcome]) -> bool:
    return all(o.status == "ok" and o.value is not None and bool(torch.isfinite(o.value).all()) for o in outcomes.values())


def _probe(impls, spec, dtype, device, run: Runner) -> tuple[Spec | None, Attempt]:
    tried: list[str] = []
    failures: tuple[tuple[str, str], ...] = ()
    worked: tuple[str, ...] = ()
    for size in PROBE_SIZES:
        sized, sizes = _at_size(spec, size)
        text = ", ".join(f"{d}={n}" for d, n in sizes)
        if tried and text == tried[-1]:
            continue  # nothing grew: the same probe again would fail the same way
        tried.append(text)
        case = build_case(sized, Recipe(sizes=sizes, seed=0), dtype=dtype, device=device)
        outcomes = {i.label: run(i, sized, case) for i in impls}
        if _fits(outcomes):
            return (sized if size != PROBE_SIZES[0] else spec), Attempt(spec, tuple(tried), ())
        if all(o.status in ("ok", "non_scalar") for o in outcomes.values()) and spec.scalar:
            loose = replace(sized, scalar=False)  # one loss value per element: compare them all
            if _fits({i.label: run(i, loose, case) for i in impls}):
                return (replace(spec, scalar=False) if size == PROBE_SIZES[0] else loose), Attempt(spec, tuple(tried), ())
        failures = tuple((label, o.error or o.status if o.status != "ok" else "returned NaN/inf") for label, o in outcomes.items() if not _fits({label: o}))
        worked = tuple(label for label, o in outcomes.items() if _fits({label: o}))
    return None, Attempt(spec, tuple(tried), failures, worked)


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
        takes = ", ".join(p for p in _signature(next(i.fn for i in impls if i.label == la)).parameters)
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
    """The first candidate spec on which every implementation returns a finite tensor."""
    run = run or in_process
    required = {kw for i in impls for kw in _required_keywords(i.fn)}
    if required:
        names = ", ".join(sorted(required))
        first = sorted(required)[0]
        impl = next(i for i in impls if _required_keywords(i.fn))
        sig = _signature(impl.fn)
        wanted = [p.name for p in sig.parameters.values() if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        call = ", ".join(f"{n}={n}" if n in required else n for n in wanted)
        # A keyword-only parameter may be a tensor (logits=...), which losscmp passes by
        # position, or an option, which a spec sets: name both mends, guess neither.
        raise InferenceError(f"keyword-only parameter(s) {names} of {impl.label} have no default. A tensor: losscmp passes "
                             f"tensors by position, so wrap it, def wrapped({', '.join(wanted)}): return {impl.ref.attrs[-1]}({call}). "
                             f"A number or an option: give it in --spec ('...; {first}=VALUE')")
    _same_arguments(impls)
    attempts: list[Attempt] = []
    for spec in [preset(n) for n in candidates(impls)] + generic_specs(impls):
        found, attempt = _probe(impls, spec, dtype, device, run)
        if found is not None:
            return found
        attempts.append(attempt)
    if not attempts:
        raise InferenceError("these implementations take no tensor argument that losscmp can see; give --spec explicitly")
    # Where one side worked, the inputs were right and the other side's format differs: say that first.
    attempts.sort(key=lambda a: not a.worked)
    shown = "; ".join(a.describe() for a in attempts[:2])
    rest = [a.spec.name or "generic " + " ".join(a.spec.args[0].dims) for a in attempts[2:]]
    also = f"; also tried {', '.join(rest)}" if rest else ""
    raise InferenceError(f"no spec fits these implementations: {shown}{also}; give --spec explicitly (presets: {', '.join(PRESETS)})")
