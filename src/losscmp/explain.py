"""Explaining a divergence: which side is wrong, why, and whether it matters for training.

In: the two :class:`~losscmp.load.Implementation`s of a pair (expected, actual), the
spec, one case (the minimised representative), the divergence kind, the tolerance,
and the :class:`Observation`s recorded on every compared case of the pair.
Out: an :class:`Explanation` — one sentence, the evidence lines behind it, its JSON
form and a grouping key (:meth:`Explanation.signature`).

The analyses, each a pure function usable on its own:

* :func:`oracle` — the float64 oracle.  Both sides are re-run in float64 on the same
  inputs.  Still different there (under float64 tolerances) ⇒ ``semantic``; agreeing
  there but not in the working dtype ⇒ ``numerical``, with ``unstable_side`` the side
  whose working-dtype result drifts furthest from its own float64 result.  A case can
  be out of float64's range too (a logit of 3000 saturates a float64 sigmoid as 30
  does a float32 one), so before calling a difference semantic the oracle walks the
  input scale down by halves while the working dtype still diverges: a scale where the
  working dtype diverges as strongly as on the case and float64 agrees makes it
  ``numerical`` after all (a semantic difference that merely fades at small scales,
  leaving float32 noise, does not).
  Only the component the finding is about is judged (:func:`components`); the sides'
  drift is measured against their float64 result *rounded to the working dtype*, so a
  correctly rounded overflow (+inf) is not instability and a NaN is.  :func:`explain`
  decides over the finding's other cases too (numerical if float64 resolves one).  A
  non-finite value float64 keeps at every scale is traced to the op that makes it
  (:func:`nonfinite_origin`: log 0, division by 0, slope of sqrt at 0 ⇒ semantic;
  a shared overflow ⇒ unknown), and :func:`nonfinite_onset` bisects where a side turns
  non-finite (88.72 = ln FLT_MAX).
* :func:`self_consistency` — per side, float64 finite differences of its own value
  against its own autograd gradient, at several steps and two scales, one-sided at
  domain edges; NaN/inf gradients are inconsistent; a kink gives no verdict.
* :func:`observe` / :func:`relation` — over every compared case: values equal (within
  the verdict's tolerance), near, offset by a constant, scaled by a constant, or nothing
  simple; gradients equal, parallel, or pointing elsewhere.
* :func:`impact` — a few steps of gradient descent under each side from the same start.
* :func:`signatures` — numbers that fingerprint a known failure (BCELoss's -100 clamp…).

Every implementation call goes through a ``run(impl, spec, case) -> Outcome``
callable (default: :func:`losscmp.run.call` in process), so an isolating runner can be
plugged in; :func:`explain` counts those calls and the seconds spent.

Limits, said rather than hidden: ``nn.Module`` implementations are moved to float64
as an in-process copy, so a runner that reloads implementations from their reference
(the isolated runner) runs the original float32 module, and the oracle answers
``unknown`` ("returned float32 for float64 inputs") instead of guessing.  The scale
ladder only scales real/logit/positive arguments and only downwards.  Both sides of an
envelope-theorem solver (GeomLoss' Sinkhorn) are honestly "not self-consistent";
the sentence then blames neither side.
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import time
import traceback
from dataclasses import dataclass, field, replace
from functools import partial
from enum import Enum
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .compare import Tolerance, Verdict, compare_outcomes, diff_message, diff_tensors
from .engine import InProcessRunner, Runner
from .findings import Kind, Pair
from .generate import Case, renormalise
from .jsonout import number
from .load import Implementation
from .domains import SCALABLE
from .minimize import input_magnitude, scaled, with_magnitude
from .run import Outcome, call
from .spec import Spec


# The default runner: the implementation called in this process, as the engine does.
call_runner: Runner = InProcessRunner()


class Category(str, Enum):
    """Why a pair diverges.  Failed calls keep their own kind as category."""

    SEMANTIC = "semantic"  # different functions: still different in float64
    NUMERICAL = "numerical"  # same function, different rounding/overflow in the working dtype
    UNKNOWN = "unknown"  # the oracle could not decide (the reason says why)
    CRASH = "crash"
    TIMEOUT = "timeout"
    EXCEPTION = "exception"
    NON_TENSOR = "non_tensor"
    NON_SCALAR = "non_scalar"
    BOTH_FAILED = "both_failed"
    MUTATION = "mutation"
    NONDETERMINISM = "nondeterminism"


# Kinds that are their own explanation: no oracle, no gradient analysis.
OWN_CATEGORY = tuple(k.value for k in Kind if k.failed_call) + ("both_failed", "mutation", "nondeterminism")


# --- float64 ------------------------------------------------------------------------

def float64_case(case: Case) -> Case:
    """The same case with every floating tensor in float64 (same values, same strides)."""
    tensors = {}
    for name, t in case.tensors.items():
        if t.is_floating_point():
            t = torch.empty_strided(t.shape, t.stride(), dtype=torch.float64, device=t.device).copy_(t)
        tensors[name] = t
    return replace(case, tensors=tensors)


def in_float64(impl: Implementation) -> tuple[Implementation, str | None]:
    """``impl`` ready for float64 inputs, and what stands in the way if something does.

    An ``nn.Module`` (or a bound method of one) is deep-copied and moved with
    ``.double()``; a module that still holds a non-float64 floating tensor afterwards (a
    buffer that overrides ``_apply``, a plain tensor attribute ``.double()`` never sees)
    is reported, not guessed around.  A plain function runs as is: if it computes in
    float32 inside, its float64 result comes back in float32, which the oracle checks.
    """
    fn = impl.fn
    owner = getattr(fn, "__self__", None) if not isinstance(fn, torch.nn.Module) else None
    module = fn if isinstance(fn, torch.nn.Module) else owner if isinstance(owner, torch.nn.Module) else None
    if module is None:
        return impl, None
    try:
        doubled = copy.deepcopy(module).double()
    except Exception as e:  # a module that cannot be copied is the user's business; we say so
        return impl, f"{impl.label} is an nn.Module that cannot be deep-copied to float64 ({type(e).__name__}: {e})"
    kept = _non_float64_tensors(doubled)
    if kept:
        return impl, f"{impl.label} keeps non-float64 tensors after .double(): {', '.join(kept[:3])}"
    new_fn = doubled if module is fn else getattr(doubled, fn.__name__)
    return replace(impl, fn=new_fn), None


def _non_float64_tensors(module: torch.nn.Module) -> list[str]:
    found = [f"{n} ({t.dtype})" for n, t in [*module.named_parameters(), *module.named_buffers()]
             if t.is_floating_point() and t.dtype != torch.float64]
    for prefix, m in module.named_modules():
        for name, value in vars(m).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
                found.append(f"{prefix + '.' if prefix else ''}{name} ({value.dtype}, a plain attribute)")
    return found


def _float64_problem(label: str, outcome: Outcome) -> str | None:
    """Why a float64 outcome cannot serve as an oracle, if it cannot."""
    if outcome.failed or outcome.value is None:
        return f"{label} {outcome.error} when run in float64"
    if outcome.value.dtype not in (torch.float64, torch.complex128):
        return f"{label} returned {outcome.value.dtype} for float64 inputs (it computes in lower precision inside)"
    for name, g in outcome.grads.items():
        if g is not None and g.dtype != torch.float64:
            return f"{label}'s gradient w.r.t. {name} is {g.dtype} for float64 inputs"
    return None


def float64_agrees(expected: Implementation, actual: Implementation, spec: Spec, case: Case, *, run: Runner = call_runner) -> bool | None:
    """Do the two sides agree when run in float64 on ``case``?  None: one cannot run there.

    Two calls: the cheap half of the oracle.  The minimiser keeps it fixed, so that a
    numerical divergence is not minimised into a semantic one (or back).
    """
    wide = float64_case(case)
    outs = []
    for impl in (expected, actual):
        impl64, problem = in_float64(impl)
        out = run(impl64, spec, wide)
        if problem or _float64_problem(impl.label, out):
            return None
        outs.append(out)
    return drift(outs[0], outs[1], Tolerance.for_dtype(torch.float64)) <= 1.0


def drift(reference: Outcome, outcome: Outcome, tol: Tolerance) -> float:
    """Divergence score of ``outcome`` from ``reference`` over value and gradients, dtypes ignored."""
    assert outcome.value is not None and reference.value is not None  # callers pass successful calls
    scores = [diff_tensors("value", outcome.value, reference.value, tol).score]
    for name, g_ref in reference.grads.items():
        g = outcome.grads.get(name)
        if (g is None) != (g_ref is None):
            return math.inf
        if g is not None and g_ref is not None:
            scores.append(diff_tensors(name, g, g_ref, tol).score)
    return max(scores)


# --- 1. the float64 oracle ------------------------------------------------------------

@dataclass(frozen=True)
class Oracle:
    category: Category
    reason: str
    unstable_side: str | None = None
    drift: tuple[tuple[str, float], ...] = ()  # per side: score of its working result vs its float64 result rounded to the working dtype
    scale: float = 1.0  # input scale (relative to the case) at which the oracle decided
    evaluations: int = 0
    values: tuple[tuple[str, float], ...] = ()  # each side's working-dtype value on the case itself
    origin: NonFiniteOrigin | None = None  # what makes a non-finite value that float64 keeps
    rounded: tuple[str, ...] = ()  # sides whose non-finite working result is float64's, correctly rounded (an overflow, not a bug)


# How far down the oracle walks the input scale (halving each time) looking for a
# point where the working dtype still diverges but float64 agrees.  Such a point only
# counts while the working-dtype divergence there is at least FADED times as large (in
# score) as on the case itself: the same disagreement, not leftover rounding noise.
LADDER_STEPS = 16
FADED = 0.1


def components(kind: str | None, verdict: Verdict) -> frozenset[str]:
    """The parts of an outcome (``value``, ``gradient w.r.t. x``) a finding of ``kind`` is about.

    The oracle judges only those: a value finding whose value agrees in float64 is
    numerical even when a gradient differs there for a reason of its own (BCELoss's
    backward clamp), which is another finding with its own explanation.
    """
    diffs = verdict.diffs
    if kind == "value":
        names = {d.what for d in diffs if d.what == "value"}
    elif kind == "gradient":
        names = {d.what for d in diffs if d.what != "value" and d.score > 1}
    elif kind == "nonfinite":
        names = {d.what for d in diffs if d.nonfinite_mismatch}
    else:
        names = set()
    return frozenset(names or {d.what for d in diffs})


def focused(verdict: Verdict, parts: frozenset[str], pair: tuple[str, str]) -> Verdict:
    """``verdict`` restricted to ``parts``: its kind, score and detail from those alone."""
    sub = tuple(d for d in verdict.diffs if d.what in parts)
    if not sub or not verdict.compared or len(sub) == len(verdict.diffs):
        return verdict
    worst = max(sub, key=lambda d: d.score)
    kind = verdict.kind if worst.score > 1 else None
    detail = diff_message(worst, pair) if kind is not None else "agree"
    return replace(verdict, kind=kind, score=worst.score, detail=detail, diffs=sub)


def rounded_to(outcome: Outcome, dtype: torch.dtype) -> Outcome:
    """A float64 outcome rounded to the working dtype: what a correctly rounded side returns
    (exp(89) is 4.5e38 in float64 and +inf, correctly, in float32)."""
    if outcome.failed or not dtype.is_floating_point:
        return outcome
    cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dtype)  # noqa: E731
    return replace(outcome, value=cast(outcome.value), grads={n: cast(g) for n, g in outcome.grads.items()})


def oracle(
    expected: Implementation,
    actual: Implementation,
    spec: Spec,
    case: Case,
    tol: Tolerance,
    *,
    run: Runner = call_runner,
    deadline: float | None = None,
    kind: str | None = None,
    trace_nonfinite: bool = True,
    ladder: int = LADDER_STEPS,
) -> Oracle:
    """Decide ``semantic`` vs ``numerical`` with float64 re-runs (see the module docstring).

    Only the parts of the outcome the finding of ``kind`` is about are judged (all parts
    when ``kind`` is None).  Semantic needs float64 to differ (with finite results on the
    case, or at some scale below) wherever the working dtype diverges as strongly as on
    the case; float64 agreeing at one such scale makes it numerical.  A non-finite value
    that float64 keeps at every scale is classified by the operation that makes it
    (:func:`nonfinite_origin`, when ``trace_nonfinite``): log 0, a division by 0, the
    slope of sqrt at 0 happen at any scale and in any precision, so a side that has them
    where the other stays finite computes another function (semantic); an overflow that
    float64 shares leaves it unknown.  Past ``deadline`` (a ``time.perf_counter()``
    value) the ladder stops where it is and says so.
    """
    pair = (expected.label, actual.label)
    floating = [t for t in case.tensors.values() if t.is_floating_point()]
    if floating and all(t.dtype == torch.float64 for t in floating):
        return Oracle(Category.UNKNOWN, "the working dtype is already float64: there is no higher precision to compare against")
    e64, why_e = in_float64(expected)
    a64, why_a = in_float64(actual)
    if why_e or why_a:
        return Oracle(Category.UNKNOWN, why_e or why_a or "")
    working = next((t.dtype for t in floating), torch.float32)
    tol64 = Tolerance.for_dtype(torch.float64)
    calls = 0
    steps = ladder if any(a.domain in SCALABLE for a in spec.args) else 0
    values: tuple[tuple[str, float], ...] = ()
    scale, first_difference, first_score = 1.0, None, math.inf
    parts: frozenset[str] | None = None
    persistent: dict[str, Outcome] = {}  # float64 outcomes on the case itself, when non-finite there
    cut_short = False
    for step in range(steps + 1):
        if step and deadline is not None and time.perf_counter() > deadline:
            cut_short = True
            break
        here = case if step == 0 else scaled(spec, case, scale)
        work = {expected.label: run(expected, spec, here), actual.label: run(actual, spec, here)}
        calls += 2
        if step == 0:
            values = tuple((la, v) for la, v in ((la, real_total(o)) for la, o in work.items()) if v is not None)
        v = compare_outcomes(Pair(*pair), work[expected.label], work[actual.label], tol)
        if any(o.failed for o in work.values()):
            return Oracle(Category.UNKNOWN, f"a side failed in the working dtype at input scale x{scale:g}: {v.detail}", evaluations=calls, values=values)
        if parts is None:
            parts = components(kind, v)
        v = focused(v, parts, pair)
        if not v.diverges:
            if step == 0:
                return Oracle(Category.UNKNOWN, "the divergence did not reproduce on this case (flaky, or nondeterministic)", evaluations=calls, values=values)
            break  # below this scale the sides agree
        here64 = float64_case(here)
        full = {expected.label: run(e64, spec, here64), actual.label: run(a64, spec, here64)}
        calls += 2
        for label, o in full.items():
            problem = _float64_problem(label, o)
            if problem:
                return Oracle(Category.UNKNOWN, problem, evaluations=calls, values=values)
        v64 = focused(compare_outcomes(Pair(*pair), full[expected.label], full[actual.label], tol64), parts, pair)
        if step == 0:
            first_score = v.score
        # Lower down, a semantic difference can fade below float64's tolerance while
        # float32 noise still exceeds float32's: that is not the divergence at hand.
        if not v64.diverges and (step == 0 or v.score >= FADED * first_score):
            drifts, rounded = _drifts(full, work, tol, working, pair)
            unstable = max(drifts, key=lambda d: d[1])[0]
            where = "" if step == 0 else f" (at input scale x{scale:g}: the case itself is beyond float64's range too)"
            reason = f"{pair[0]} and {pair[1]} agree in float64 (score {v64.score:.3g}) but not in {_dtype_name(case)}{where}"
            return Oracle(Category.NUMERICAL, reason, unstable, drifts, scale, calls, values, rounded=rounded)
        gain = _precision_gain(v, v64)
        if v64.diverges and gain >= PRECISION_GAIN and (step == 0 or v.score >= FADED * first_score):
            # float64 is off too, but by orders of magnitude less: precision, not the formula,
            # makes the difference (BCE on sigmoid(26): float32 off by 74, float64 by 1e-5).
            drifts, rounded = _drifts(full, work, tol, working, pair)
            unstable = max(drifts, key=lambda d: d[1])[0]
            reason = (f"in float64 the sides differ {gain:.3g} times less than in {_dtype_name(case)} "
                      f"({v64.detail.split(';')[0]}): the difference comes from precision")
            return Oracle(Category.NUMERICAL, reason, unstable, drifts, scale, calls, values, rounded=rounded)
        overflowed = any(d.nonfinite_mismatch for d in v64.diffs) or any(o.value is not None and not torch.isfinite(o.value).all() for o in full.values())
        if step == 0 and overflowed:
            persistent = {la: o for la, o in full.items() if not _finite_in(o, parts)}
        if not overflowed and first_difference is None:
            first_difference = (scale, v64.detail)
        scale /= 2
    if first_difference is None:
        origin = None
        if trace_nonfinite and persistent and len(persistent) == 1:
            (label, _), = persistent.items()
            origin = nonfinite_origin(e64 if label == pair[0] else a64, spec, float64_case(case))
            calls += 1
        if origin is not None and origin.cause.scale_free:
            other = pair[1] if origin.label == pair[0] else pair[0]
            reason = (f"float64 keeps the non-finite value of {origin.label}: {origin.describe()}; {other} stays finite there "
                      f"(a guard on one side only), and no input scale removes it")
            return Oracle(Category.SEMANTIC, reason, evaluations=calls, values=values, origin=origin)
        if origin is not None and origin.cause is Cause.OVERFLOW:
            reason = f"float64 overflows too wherever the working dtype diverges ({origin.describe()})"
        elif origin is not None:
            reason = f"float64 keeps the NaN/inf too wherever the working dtype diverges ({origin.describe()}: not a known cause)"
        elif len(persistent) == 2:
            reason = "both sides are NaN/inf in float64 too wherever the working dtype diverges (differently): nothing finite to compare"
        elif persistent and not trace_nonfinite:
            reason = ("float64 keeps the NaN/inf too wherever the working dtype diverges; what makes it is not traced "
                      "(the side does not run in this process)")
        elif persistent:
            reason = "float64 keeps the NaN/inf too wherever the working dtype diverges; no single operation was seen making it"
        else:
            reason = "float64 overflows too wherever the working dtype diverges"
        return Oracle(Category.UNKNOWN, reason, evaluations=calls, values=values, origin=origin)
    at, detail = first_difference
    down_to = f"; still different down to input scale x{scale * 2:g}" if steps else ""
    if cut_short:
        down_to += " (the scale ladder was cut short by the time budget)"
    return Oracle(Category.SEMANTIC, f"still different in float64{'' if at == 1 else f' at input scale x{at:g}'}: {detail}{down_to}",
                  scale=at, evaluations=calls, values=values)


def _finite_in(outcome: Outcome, parts: frozenset[str]) -> bool:
    tensors = [("value", outcome.value)] + [(f"gradient w.r.t. {n}", g) for n, g in outcome.grads.items()]
    return all(bool(torch.isfinite(t).all()) for what, t in tensors if t is not None and what in parts and t.is_floating_point())


def _drifts(full: dict[str, Outcome], work: dict[str, Outcome], tol: Tolerance, working: torch.dtype,
            pair: tuple[str, str]) -> tuple[tuple[tuple[str, float], ...], tuple[str, ...]]:
    """Per side, how far its working result is from its own float64 result *rounded to the
    working dtype*; and the sides whose non-finite working result is exactly that rounding
    (an inf that is the correctly rounded overflow is not instability)."""
    drifts = tuple((la, drift(rounded_to(full[la], working), work[la], tol)) for la in pair)
    worst = max(d for _, d in drifts)
    if math.isinf(worst) and all(math.isinf(d) for _, d in drifts):
        # Both off by NaN/inf: an inf of the right sign may be an overflow a step early, but
        # a NaN where float64 is finite is never a rounding of anything (inf - inf, 0 * inf).
        nans = {la: _has_nan(work[la]) and not _has_nan(full[la]) for la in pair}
        if nans[pair[0]] != nans[pair[1]]:
            drifts = tuple((la, d if nans[la] else _finite_drift(full[la], work[la], tol, working)) for la, d in drifts)
    rounded = tuple(la for la in pair if not _finite_in(work[la], frozenset(_parts_of(work[la])))
                    and drift(rounded_to(full[la], working), work[la], tol) <= 1.0)
    return drifts, rounded


def _has_nan(outcome: Outcome) -> bool:
    return any(t is not None and t.is_floating_point() and bool(t.isnan().any()) for t in [outcome.value, *outcome.grads.values()])


def _finite_drift(reference: Outcome, outcome: Outcome, tol: Tolerance, working: torch.dtype) -> float:
    """Drift over the elements where the working result is finite (an early overflow set aside)."""
    def keep(w: torch.Tensor | None, r: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if w is None or r is None or not w.is_floating_point():
            return w, r
        r = r.to(working)
        return torch.where(torch.isfinite(w), w, r.to(w.dtype)), r
    value, ref_value = keep(outcome.value, reference.value)
    grads = {n: keep(g, reference.grads.get(n)) for n, g in outcome.grads.items()}
    return drift(replace(reference, value=ref_value, grads={n: r for n, (_, r) in grads.items()}),
                 replace(outcome, value=value, grads={n: w for n, (w, _) in grads.items()}), tol)


def _parts_of(outcome: Outcome) -> list[str]:
    return ["value"] + [f"gradient w.r.t. {n}" for n in outcome.grads]


# --- persistent non-finite values: what makes them ---------------------------------------

class Cause(str, Enum):
    """What produced a non-finite value from finite inputs."""

    scale_free: bool  # no input scale removes it (set per member below)

    LOG_ZERO = "log 0", True
    DIVISION_BY_ZERO = "division by 0", True
    SQRT_SLOPE_AT_ZERO = "slope of sqrt at 0", True
    OVERFLOW = "overflow", False
    OTHER = "another operation", False

    def __new__(cls, value: str, scale_free: bool) -> Cause:
        member = str.__new__(cls, value)
        member._value_ = value
        member.scale_free = scale_free  # no input scale removes it
        return member


@dataclass(frozen=True)
class NonFiniteOrigin:
    """The first operation that turned finite inputs into NaN/inf, in one side's run."""

    label: str
    cause: Cause
    op: str
    phase: str  # "forward" or "backward"
    file: str | None = None
    line: int | None = None

    def describe(self) -> str:
        where = f" at {_short_path(self.file)}:{self.line}" if self.file else ""
        if self.cause is Cause.SQRT_SLOPE_AT_ZERO:  # the forward op that saw the 0; its backward divides by it
            return f"{self.cause.value} (the backward of {self.op}{where}, which saw an exact 0)"
        return f"{self.cause.value} ({self.op} in the {self.phase} pass{where})"

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "cause": self.cause.value, "op": self.op, "phase": self.phase, "file": self.file, "line": self.line}


_LOGS = {"log", "log2", "log10", "xlogy", "special_xlog1py"}
_DIVS = {"div", "reciprocal", "true_divide", "floor_divide", "rsqrt"}
_ROOTS = {"sqrt", "linalg_vector_norm", "norm", "pow", "cdist", "_cdist_forward"}
_UNINITIALISED = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "empty_permuted"}
_OWN = (os.sep + "torch" + os.sep, os.sep + "losscmp" + os.sep, "<")


def _user_frame() -> tuple[str | None, int | None]:
    """The innermost frame outside torch and losscmp: the implementation's own line."""
    for frame in reversed(traceback.extract_stack()):
        if frame.name == "watched" and frame.filename == __file__:
            break  # the implementation's call starts here: nothing outside it is its code
        if not any(part in frame.filename for part in _OWN) and "contextlib" not in frame.filename:
            return frame.filename, frame.lineno
    return None, None


def _op_name(func: Any) -> str:
    return str(getattr(func, "__name__", func)).split(".")[0]


def nonfinite_origin(impl: Implementation, spec: Spec, case: Case) -> NonFiniteOrigin | None:
    """Run ``impl`` once in this process under a dispatch mode and name the first op whose
    output is NaN/inf while its inputs are finite: log of 0, a division by 0, the
    backward of a sqrt (or norm, or fractional power) that saw an exact 0, an overflow.
    None when the call raised or no such op was seen."""
    def floats(tree: Any) -> list[torch.Tensor]:
        return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]

    class FirstNonFinite(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.found: tuple[str, str, list[torch.Tensor], tuple] | None = None
            self.root_at_zero: tuple[str, tuple] | None = None  # a forward sqrt-like op that saw an exact 0
            self.backward = False
            self.garbage: set[int] = set()  # data pointers of allocations not yet written

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if self.found is not None:
                return out
            name = _op_name(func)
            if name in _UNINITIALISED:
                # Fresh memory holds whatever was there (a stray inf): neither a result nor,
                # until an op writes it, an input.
                self.garbage.update(t.data_ptr() for t in floats(out))
                return out
            ins = [t for t in floats((args, kwargs)) if t.data_ptr() not in self.garbage]
            self.garbage.difference_update(t.data_ptr() for t in floats(out))  # written now
            where = _user_frame()
            phase = "backward" if self.backward else "forward"
            if phase == "forward" and name in _ROOTS and self.root_at_zero is None and any(bool((t == 0).any()) for t in ins[:1]):
                self.root_at_zero = (name, where)
            outs = floats(out)
            if outs and any(not bool(torch.isfinite(t).all()) for t in outs) and all(bool(torch.isfinite(t).all()) for t in ins):
                self.found = (name, phase, [t.detach().clone() for t in ins], where)
            return out

    impl_fn = impl.fn
    mode = FirstNonFinite()

    def watched(*a: Any, **k: Any) -> Any:
        out = impl_fn(*a, **k)
        mode.backward = True  # what runs after the call returns is the backward pass
        return out

    try:
        with mode:
            outcome = call(watched, spec, case)
    except Exception:  # a side that cannot be watched is left unclassified, not guessed
        return None
    if outcome.failed or mode.found is None:
        return None
    name, phase, ins, (file, line) = mode.found
    if name in _LOGS and ins and bool((ins[0] == 0).any()):
        cause = Cause.LOG_ZERO
    elif phase == "backward" and mode.root_at_zero is not None:
        cause = Cause.SQRT_SLOPE_AT_ZERO
        name, (file, line) = mode.root_at_zero[0], mode.root_at_zero[1]
    elif name in _DIVS and ins and bool((ins[-1] == 0).any()):
        cause = Cause.DIVISION_BY_ZERO
    elif name in {"exp", "pow", "mul", "sum", "add", "expm1", "cosh", "sinh", "mean"}:
        cause = Cause.OVERFLOW
    else:
        cause = Cause.OTHER
    return NonFiniteOrigin(impl.label, cause, f"aten.{name}", phase, file, line)


# float64 shrinking the discrepancy by this factor or more means precision is the cause.
PRECISION_GAIN = 1e3


def _precision_gain(work: Verdict, wide: Verdict) -> float:
    """How many times smaller the greatest absolute differences are in float64 (the
    smallest such factor over value and gradients that differ in the working dtype)."""
    wide_by = {d.what: d for d in wide.diffs}
    gains = []
    for d in work.diffs:
        if d.score <= 1 or d.what not in wide_by or d.nonfinite_mismatch or wide_by[d.what].nonfinite_mismatch:
            continue
        other = wide_by[d.what].max_abs
        gains.append(math.inf if other == 0 else d.max_abs / other)
    return min(gains, default=0.0)


def _dtype_name(case: Case) -> str:
    for t in case.tensors.values():
        if t.is_floating_point():
            return str(t.dtype).removeprefix("torch.")
    return "the working dtype"


# --- 2. gradient self-consistency ------------------------------------------------------

@dataclass(frozen=True)
class SelfConsistency:
    """Does a side's autograd gradient match finite differences of its own value?

    ``consistent`` is None when no check could be made (no gradient inputs, a failed
    call, non-finite values everywhere); ``note`` then says why.  ``max_error`` is the
    largest discrepancy relative to the derivative's magnitude.
    """

    label: str
    consistent: bool | None
    max_error: float | None
    checks: int = 0
    mode: str = ""  # "all elements" or "N random directions"
    note: str = ""
    evaluations: int = 0
    kink: bool = False  # some check sat on a non-differentiable point (its note gives the one-sided slopes)

    def to_json(self) -> dict[str, Any]:
        return {"consistent": self.consistent, "max_error": _json_float(self.max_error), "checks": self.checks, "mode": self.mode,
                "note": self.note, "kink": self.kink}


# Step and tolerance policy.
# * Each element is perturbed relative to its own scale: h·max(|x_i|, rms(x)) for
#   real/logit arguments, h·|x_i| for positive ones, h·min(p, 1-p) for probabilities,
#   never below FD_FLOOR times the RMS
#   of the case's floating inputs, so a step means the same at magnitude 1e-8 or 1e8
#   and an element of 1e-30 (a variance under GaussianNLLLoss' clamp) or 1e-45 (a
#   denormal probability) is still moved by a step the value can feel.
# * Several steps (FD_STEPS, finest first): the first at which finite differences and
#   autograd agree decides "consistent"; none agreeing is "inconsistent".  One step is
#   always wrong somewhere: too fine under rounding, too coarse across curvature.
# * A step that would leave the domain (x - h < 0 for a positive argument, p outside
#   [0, 1]) is taken on the side that stays inside, with the one-sided second-order
#   difference (-3 f(x) + 4 f(x + h) - f(x + 2h)) / 2h.
# * Kinks (abs, clamp, relu, max): autograd may return any one-sided slope at a kink.
#   The forward and backward differences are taken separately and autograd is accepted
#   anywhere in the interval they span, widened by the tolerance.  A doubtful check at
#   the finest step (slopes apart, or no agreement) is refined to steps FD_REFINE times
#   smaller (:func:`_refine`): slopes that settle apart make a non-differentiable point
#   (no verdict there; if every check is like it the answer is None with the slopes
#   said); slopes that join decide the check there; slopes still moving when rounding
#   takes over or FD_FINEST is passed give no verdict, "cannot resolve the slope at
#   this scale" (a row of norm 1e-8 under x / ||x|| is smooth, not a kink).
# * A NaN/inf gradient where the value is finite is inconsistent by definition.
# * A discrepancy counts when it exceeds RTOL of the derivative's magnitude (plus a
#   rounding floor, ATOL·|f| / h-scale).
FD_STEP = 1e-6
FD_STEPS = (1e-6, 1e-4, 1e-2)
FD_REFINE = 0.1  # each refinement of a doubtful check (a kink, or no agreement) shrinks the step by this
FD_FINEST = 1e-13  # relative step below which a check is not refined: float64 has ~16 digits
FD_FLOOR = 1e-3
FD_RTOL = 1e-2
FD_ATOL = 1e-8  # relative to |f|
ALL_ELEMENTS_UP_TO = 32  # grad elements; above this, random directional derivatives
DIRECTIONS = 4


class Resolved(Enum):
    """What refining the step says about a two-sided check (see :func:`_refine`)."""

    SMOOTH = "smooth"  # the slopes converge to one derivative: the error there is the verdict
    KINK = "kink"  # each one-sided slope has converged, and they stay apart
    UNRESOLVED = "unresolved"  # still moving at the finest usable step: no verdict


def _refine(value_at: Callable[[dict[str, torch.Tensor], float], float | None], u: dict[str, torch.Tensor],
            h: float, f0: float, left: float, right: float, auto: float) -> tuple[Resolved, float, tuple[float, float, float]]:
    """Shrink the step by FD_REFINE until the one-sided slopes settle.

    A kink claim must hold where the step is far below the distance to the nearest
    non-smooth feature: x / ||x|| at ||x|| = 1.4e-8 looks kinked at a step of 5e-7
    (one-sided slopes -5.6e6 and 2e5, both still moving as the step shrinks), and is
    smooth at 5e-11.  So: the midpoint steady and the spread shrinking with the step is
    smooth (a smooth minimum of x² has slopes ±h·f''); each slope steady and apart is a
    kink (|x| at 0); anything else goes on to a finer step, until rounding swamps the
    difference or FD_FINEST is passed, and then it is unresolved.  Returns the finding,
    the error at the deciding step, and (left, right, autograd) there."""
    prev_left, prev_right = left, right
    while h * FD_REFINE >= FD_FINEST:
        h *= FD_REFINE
        f_plus, f_minus = value_at(u, h), value_at(u, -h)
        if f_plus is None or f_minus is None or not (math.isfinite(f_plus) and math.isfinite(f_minus)):
            break
        left, right = (f0 - f_minus) / h, (f_plus - f0) / h
        noise = FD_ATOL * max(abs(f0), abs(f_plus), abs(f_minus)) / h
        lo, hi = min(left, right), max(left, right)
        signal = max(abs(left), abs(right), abs(auto))
        if signal < noise / FD_RTOL:
            break  # rounding swamps the slope from here on
        # Settling is judged on the slopes alone: autograd's (possibly wrong) size must not
        # widen what counts as steady.
        slack = FD_RTOL * max(abs(left), abs(right)) + 2 * noise
        spread, prev_spread = hi - lo, abs(prev_right - prev_left)
        mid_steady = abs((left + right) - (prev_left + prev_right)) / 2 <= slack + spread
        if mid_steady and (spread <= slack or spread <= 0.5 * prev_spread):
            return Resolved.SMOOTH, max(0.0, lo - auto, auto - hi) / signal, (left, right, auto)
        if abs(left - prev_left) <= slack and abs(right - prev_right) <= slack:
            return Resolved.KINK, 0.0, (left, right, auto)
        prev_left, prev_right = left, right
    return Resolved.UNRESOLVED, math.inf, (prev_left, prev_right, auto)


def self_consistency(
    impl: Implementation,
    spec: Spec,
    case: Case,
    *,
    run: Runner = call_runner,
    directions: int = DIRECTIONS,
    all_elements_up_to: int = ALL_ELEMENTS_UP_TO,
    seed: int = 0,
) -> SelfConsistency:
    """Float64 finite differences of ``impl``'s value against its own autograd gradient.

    All elements one by one when there are at most ``all_elements_up_to`` of them,
    else ``directions`` random directional derivatives, as
    ``torch.autograd.gradcheck(fast_mode=True)`` does.  gradcheck itself is not used:
    it answers only pass/fail with a fixed absolute step and tolerance, which flags
    relu/abs kinks and scale-dependent steps falsely; see the policy above.
    """
    label = impl.label
    names = [a.name for a in spec.args if a.grad and a.is_float]
    if not names:
        return SelfConsistency(label, None, None, note="no argument requires gradients")
    impl64, problem = in_float64(impl)
    if problem:
        return SelfConsistency(label, None, None, note=problem)
    case64 = float64_case(case)
    base = run(impl64, spec, case64)
    calls = 1
    if base.failed or base.value is None or _float64_problem(label, base):
        return SelfConsistency(label, None, None, note=_float64_problem(label, base) or "", evaluations=calls)
    f0 = float(base.value.sum())
    if not math.isfinite(f0):
        return SelfConsistency(label, None, None, note="its float64 value is not finite here", evaluations=calls)
    grads = {n: (g if (g := base.grads.get(n)) is not None else torch.zeros_like(case64.tensors[n])) for n in names}
    bad = [n for n, g in grads.items() if not bool(torch.isfinite(g).all())]
    if bad:
        return SelfConsistency(label, False, math.inf, 0, "", f"its gradient w.r.t. {', '.join(bad)} has NaN/inf where its value "
                               f"({f0:.6g}) is finite: no derivative is NaN/inf", calls)
    floats = [t for t in case64.tensors.values() if t.is_floating_point() and t.numel()]
    rms_all = math.sqrt(sum(float(t.pow(2).sum()) for t in floats) / max(sum(t.numel() for t in floats), 1)) if floats else 0.0
    floor = FD_FLOOR * (rms_all if math.isfinite(rms_all) and rms_all > 0 else 1.0)
    own = {n: _element_scale(spec.arg(n).domain, case64.tensors[n]) for n in names}
    floored = {n: own[n].clamp_min(floor) for n in names}
    total = sum(case64.tensors[n].numel() for n in names)
    if total <= all_elements_up_to:
        mode = "all elements"
        units = []
        for n in names:
            for i in range(case64.tensors[n].numel()):
                # Contiguous directions: case tensors may be transposed or strided views.
                u = {m: torch.zeros(case64.tensors[m].shape, dtype=torch.float64, device=case64.tensors[m].device) for m in names}
                u[n].view(-1)[i] = 1.0
                units.append(u)
    else:
        mode = f"{directions} random directions"
        gen = torch.Generator().manual_seed(seed)
        units = [{n: torch.randn(case64.tensors[n].shape, generator=gen, dtype=torch.float64).to(case64.tensors[n].device) for n in names}
                 for _ in range(directions)]
    # Each direction at the elements' own scale, then (if different) at the floored scale.
    perturbations = []
    for unit in units:
        variants = [{n: unit[n] * own[n] for n in names}]
        if any(not torch.equal(own[n], floored[n]) for n in names):
            variants.append({n: unit[n] * floored[n] for n in names})
        perturbations.append(variants)

    def value_at(u: dict[str, torch.Tensor], t: float) -> float | None:
        """The value at x + t·u; None when that leaves an argument's domain."""
        nonlocal calls
        moved = dict(case64.tensors)
        for n in names:
            moved[n] = case64.tensors[n] + t * u[n]
            if not _inside(spec.arg(n).domain, moved[n]):
                return None
        o = run(impl64, spec, replace(case64, tensors=moved))
        calls += 1
        return float(o.value.sum()) if not o.failed and o.value is not None else math.nan

    worst, checks, skipped, kinks, unresolved_at = 0.0, 0, 0, [], []
    for variants in perturbations:
        best, first, kink, quiet = math.inf, None, None, False
        unresolved: tuple[float, float, float] | None = None
        for u, h in ((u, h) for u in variants for h in FD_STEPS):
            if all(not bool(t.any()) for t in u.values()):
                continue  # a zero-scale element (a probability of exactly 0 or 1) at its own scale
            auto = sum(float((grads[n] * u[n]).sum()) for n in names)
            f_plus, f_minus = value_at(u, h), value_at(u, -h)
            if f_plus is not None and f_minus is not None:
                if not (math.isfinite(f_plus) and math.isfinite(f_minus)):
                    continue
                right, left = (f_plus - f0) / h, (f0 - f_minus) / h
                noise = FD_ATOL * max(abs(f0), abs(f_plus), abs(f_minus)) / h
                lo, hi = min(left, right), max(left, right)
                signal = max(abs(left), abs(right), abs(auto))
                magnitude = max(signal, noise / FD_RTOL)
                error = max(0.0, lo - auto, auto - hi) / magnitude if magnitude > 0 else 0.0
                wide = (hi - lo) > FD_RTOL * magnitude + 2 * noise
                if h == FD_STEPS[0] and (error > FD_RTOL or wide) and signal >= noise / FD_RTOL:
                    # Doubtful at the finest step (slopes apart, or no agreement): a verdict only
                    # where finer steps show the slopes settled.
                    found, refined, at = _refine(value_at, u, h, f0, left, right, auto)
                    if found is Resolved.UNRESOLVED:
                        unresolved = at
                        break
                    if found is Resolved.KINK:
                        lo, hi = min(at[:2]), max(at[:2])
                        error = max(0.0, lo - at[2], at[2] - hi) / max(abs(lo), abs(hi), abs(auto))
                        if error <= FD_RTOL:
                            kink = at  # slopes settled apart: not differentiable here
                    else:
                        error = refined
            else:
                sign = 1.0 if f_plus is not None else -1.0 if f_minus is not None else 0.0
                far = value_at(u, 2 * sign * h) if sign else None
                near = f_plus if sign > 0 else f_minus
                if near is None or far is None or not (math.isfinite(near) and math.isfinite(far)):
                    continue
                slope = sign * (-3 * f0 + 4 * near - far) / (2 * h)  # one-sided, second order, at a domain edge
                noise = 4 * FD_ATOL * max(abs(f0), abs(near), abs(far)) / h
                signal = max(abs(slope), abs(auto))
                magnitude = max(signal, noise / FD_RTOL)
                error = abs(slope - auto) / magnitude if magnitude > 0 else 0.0
            if signal < noise / FD_RTOL:
                # The step is too small for the value to show any slope above rounding: it
                # cannot tell a right gradient from a wrong one (a 1e-30 element's step).
                quiet = True
                continue
            best = min(best, error)
            first = error if first is None else first
            if best <= FD_RTOL:
                break
        if unresolved is not None:
            unresolved_at.append(unresolved)
            continue
        if not math.isfinite(best):
            if quiet:  # no step showed a slope above rounding, nor did autograd: flat, and agreeing
                checks += 1
                continue
            skipped += 1
            continue
        if kink is not None:
            kinks.append(kink)
            continue
        # Agreeing at some step: its error.  Agreeing at none: the finest usable step's (the
        # most accurate where the value is smooth), not a coarse step's lucky near-miss.
        worst = max(worst, best if best <= FD_RTOL or first is None else first)
        checks += 1
    notes = []
    if skipped:
        notes.append(f"{skipped} check(s) skipped (non-finite nearby, or no room to step inside the domain)")
    if kinks:
        left, right, auto = kinks[0]
        notes.append(f"{len(kinks)} check(s) at a non-differentiable point (one-sided slopes {left:.6g} and {right:.6g}; "
                     f"autograd's {auto:.6g} is one of the valid subgradients), no verdict there")
    if unresolved_at:
        left, right, auto = unresolved_at[0]
        notes.append(f"{len(unresolved_at)} check(s) without a verdict: the steps cannot resolve the slope at this scale "
                     f"(one-sided slopes {left:.6g} and {right:.6g} still moving at a relative step of {FD_FINEST:g} or where "
                     f"rounding takes over; autograd {auto:.6g})")
    note = "; ".join(notes)
    if not checks:
        return SelfConsistency(label, None, None, 0, mode, note or "no check possible", calls, bool(kinks))
    return SelfConsistency(label, worst <= FD_RTOL, worst, checks, mode, note, calls, bool(kinks))


def _inside(domain: str, t: torch.Tensor) -> bool:
    """Is a perturbed argument still inside its domain (where the loss is defined)?"""
    if domain == "positive":
        return bool((t > 0).all())
    if domain in ("unit", "simplex", "image", "binary"):
        return bool(((t >= 0) & (t <= 1)).all())
    return True


def _element_scale(domain: str, t: torch.Tensor) -> torch.Tensor:
    """How far each element may be moved, before the relative step (and the floor)."""
    a = t.abs()
    if domain == "positive":
        return a
    if domain in ("unit", "simplex", "image", "binary"):
        return torch.minimum(t, 1 - t).clamp_min(0)
    rms = float(t.pow(2).mean().sqrt()) if t.numel() else 0.0
    return a.clamp_min(rms) if rms > 0 else torch.ones_like(t)


# --- 3. the relation over every compared case ---------------------------------------------

@dataclass(frozen=True)
class Observation:
    """One compared case of a pair: both values, and how the gradients relate."""

    expected: float
    actual: float
    cosine: float | None = None  # of the flattened gradients; None without gradients
    norm_ratio: float | None = None  # |grad actual| / |grad expected|
    regime: str | None = None


def real_total(outcome: Outcome) -> float | None:
    """The one real number a known-number note reads from a side: its value's sum.  None
    for a failed call or a complex loss (its sum's real part would hide the rest)."""
    if outcome.failed or outcome.value is None or outcome.value.is_complex():
        return None
    return float(outcome.value.double().sum())


def observe(expected: Outcome, actual: Outcome, regime: str | None = None) -> Observation | None:
    """What the relation needs from one compared case; None when a side failed or is not finite.

    Cheap enough for every case of the search: two sums, one dot product, two norms,
    read back from the device in one transfer.  A non-scalar value is summed (the
    quantity the runner differentiates).
    """
    if expected.failed or actual.failed or expected.value is None or actual.value is None:
        return None
    if expected.value.shape != actual.value.shape:
        return None
    if expected.value.is_complex() or actual.value.is_complex():
        return None  # one real number per side cannot stand for a complex loss (its sum's real part would hide the rest)
    values = [expected.value.double().sum(), actual.value.to(expected.value.device).double().sum()]
    ge: list[torch.Tensor] = []
    ga: list[torch.Tensor] = []
    for name in sorted(expected.grads.keys() | actual.grads.keys()):
        e, a = expected.grads.get(name), actual.grads.get(name)
        if e is None and a is None:
            continue
        if e is not None and a is not None and e.shape != a.shape:
            ge, ga = [], []  # gradient shapes differ: nothing to relate
            break
        present = e if e is not None else a
        assert present is not None  # both None was skipped above
        e = torch.zeros_like(present) if e is None else e  # no gradient flows: it is zero
        a = torch.zeros_like(e) if a is None else a
        ge.append(e.detach().reshape(-1).double())
        ga.append(a.detach().reshape(-1).to(e.device).double())
    if ge:
        e, a = torch.cat(ge), torch.cat(ga)
        finite = torch.isfinite(e).all() & torch.isfinite(a).all()
        stats = torch.stack([*values, e @ a, e.norm(), a.norm(), finite.double()]).tolist()
    else:
        stats = torch.stack(values).tolist()
    ve, va = stats[0], stats[1]
    if not (math.isfinite(ve) and math.isfinite(va)):
        return None
    if not ge or not stats[5]:
        return Observation(ve, va, None, None, regime)
    dot, ne, na = stats[2], stats[3], stats[4]
    if ne == 0 and na == 0:
        cosine, ratio = 1.0, 1.0
    elif ne == 0 or na == 0:
        cosine, ratio = 0.0, (math.inf if ne == 0 else 0.0)
    else:
        cosine, ratio = dot / (ne * na), na / ne
    return Observation(ve, va, cosine, ratio, regime)


@dataclass(frozen=True)
class Relation:
    """How the two losses relate over the compared cases of a pair.

    ``factor`` is actual / expected: ``actual ≈ factor × expected`` for values (when
    value is "factor"), else the constant gradient norm ratio |∇actual| / |∇expected|
    (when gradients are parallel with a constant ratio).  "unknown": too few cases.
    A relation holds on a majority of cases; ``value_fits`` / ``gradient_fits`` count
    them, and ``outliers`` says which regimes the cases it does not fit came from.
    """

    value: str  # "equal" | "near" | "offset" | "factor" | "other" | "unknown"
    gradient: str | None  # "equal" | "parallel" | "other" | "unknown"; None: no gradients
    factor: float | None = None
    offset: float | None = None
    cosine_median: float | None = None
    cases: int = 0
    value_fits: int = 0
    gradient_cases: int = 0
    gradient_fits: int = 0
    outliers: tuple[tuple[str, int], ...] = ()  # (regime, cases) the relation does not fit
    equal_within: tuple[float, float] | None = None  # (rtol, atol) of "equal": the verdict's tolerance when given
    skipped_cases: int = 0  # observations dropped: a side failed or was not finite
    # Cases whose gradients point in opposite directions (cosine <= -COSINE_PARALLEL): where
    # one side descends the other ascends, so the minimisers differ, whatever most cases say.
    opposite: int = 0

    @property
    def same_minimisers(self) -> bool:
        # Parallel on most cases is not enough: the cases that are not (label smoothing's
        # C > 2 draws) may be exactly where the minimisers part.
        return self.gradient == "parallel" and not self.opposite and self.gradient_fits == self.gradient_cases

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "gradient": self.gradient, "factor": _json_float(self.factor),
                "offset": _json_float(self.offset), "cosine_median": _json_float(self.cosine_median), "cases": self.cases,
                "value_fits": self.value_fits, "gradient_cases": self.gradient_cases, "gradient_fits": self.gradient_fits,
                "outliers": dict(self.outliers), "equal_within": list(self.equal_within) if self.equal_within else None,
                "skipped_cases": self.skipped_cases, "opposite": self.opposite}

    def describe(self, pair: tuple[str, str]) -> str:
        e, a = pair
        if not self.cases:
            return "no compared cases recorded (a relation is drawn over real, finite values of both sides; complex losses have none)"
        value = {
            "equal": "values equal",
            "near": f"values within {RELATION_RTOL:g} (relative) of each other but not equal within the verdict's tolerance",
            "factor": f"values a constant factor apart ({a} ≈ {_g(self.factor)} × {e})",
            "offset": f"values a constant offset apart ({a} ≈ {e} {'+' if (self.offset or 0) >= 0 else '-'} {_g(abs(self.offset or 0))})",
            "other": "values not related by a constant offset or factor",
            "unknown": "too few cases to relate the values",
        }[self.value]
        if self.value in ("equal", "near", "factor", "offset"):
            value += f" on {self.value_fits} / {self.cases} cases with finite values on both sides"
        if self.value == "equal" and self.equal_within:
            value += f" (equal: within the verdict's tolerance, rtol {self.equal_within[0]:g}, atol {self.equal_within[1]:g})"
        if self.skipped_cases:
            value += f" ({self.skipped_cases} more case(s) left out: a side failed or was not finite)"
        grad = {
            None: "no gradients",
            "equal": "gradients equal",
            "parallel": ("gradients parallel (same minimisers, different step size" if self.same_minimisers
                         else "gradients parallel (different step size")
            + (f": |∇{a}| ≈ {_g(self.factor)} × |∇{e}|)" if self.factor is not None and self.value != "factor" else ")"),
            "other": "gradients point elsewhere",
            "unknown": "too few cases to relate the gradients",
        }[self.gradient]
        if self.gradient in ("equal", "parallel"):
            grad += f" on {self.gradient_fits} / {self.gradient_cases} cases"
        if self.cosine_median is not None and self.gradient not in (None, "unknown"):
            grad += f", median cosine {self.cosine_median:.3g}"
        if self.opposite:
            grad += f"; opposite on {self.opposite} case(s): different minimisers (where one descends, the other ascends)"
        text = f"{value}; {grad}"
        if self.outliers:
            text += "; cases that do not fit, by regime: " + ", ".join(f"{r} {n}" for r, n in self.outliers)
        return text


RELATION_RTOL = 1e-4  # per case: |a - model(e)| <= atol + rtol·max(|a|, |e|)
RELATION_ATOL = 1e-6
# A model holds when it fits a strict majority of cases: the rest are outliers (cases
# that are numerically unstable, or a second cause) and are reported by regime.
INLIERS = 0.5
MIN_CASES = 3
COSINE_EQUAL = 1 - 1e-6
COSINE_PARALLEL = 1 - 1e-4  # under about 0.8 degrees
RATIO_RTOL = 1e-3


def relation(observations: Iterable[Observation | None], *, rtol: float = RELATION_RTOL, atol: float = RELATION_ATOL,
             tol: Tolerance | None = None) -> Relation:
    """Fit equal / factor / offset to the values and equal / parallel to the gradients, robustly.

    Medians pick each model's constant; a model holds when it fits more than half of the
    cases, so numerically unstable cases do not hide a clean relation.  ``tol``: the
    verdict's tolerance, which then decides "equal" (|a - e| <= atol + rtol·|e|, as the
    verdict judges a scalar loss), so the relation never calls equal what the verdict
    counts as a divergence; offset and factor keep their own looser fit (RELATION_RTOL).
    """
    given = list(observations)
    obs = [o for o in given if o is not None and math.isfinite(o.expected) and math.isfinite(o.actual)]
    value, factor, offset, value_fit = _value_relation(obs, rtol, atol, tol)
    with_grads = [o for o in obs if o.cosine is not None and o.norm_ratio is not None]
    gradient, grad_factor, cos_median, grad_fit = _gradient_relation(with_grads, bool(obs))
    if factor is None and gradient == "parallel":
        factor = grad_factor
    misfits: dict[str, int] = {}
    if value in ("equal", "near", "factor", "offset"):
        for o, ok in zip(obs, value_fit):
            if not ok:
                misfits[o.regime or "unknown"] = misfits.get(o.regime or "unknown", 0) + 1
    if gradient in ("equal", "parallel"):
        value_misfit = {id(o) for o, ok in zip(obs, value_fit) if not ok} if value in ("equal", "near", "factor", "offset") else set()
        for o, ok in zip(with_grads, grad_fit):
            if not ok and id(o) not in value_misfit:
                misfits[o.regime or "unknown"] = misfits.get(o.regime or "unknown", 0) + 1
    opposite = sum(1 for o in with_grads if o.cosine is not None and o.cosine <= -COSINE_PARALLEL)
    return Relation(value, gradient, factor, offset, cos_median, len(obs), sum(value_fit), len(with_grads), sum(grad_fit),
                    tuple(sorted(misfits.items(), key=lambda kv: -kv[1])), (tol.rtol, tol.atol) if tol else None, len(given) - len(obs),
                    opposite)


def _close(x: float, y: float, rtol: float, atol: float) -> bool:
    return abs(x - y) <= atol + rtol * max(abs(x), abs(y))


def _holds(pairs: Sequence[tuple[float, float]], fit: list[bool]) -> bool:
    inliers = [e for (e, _), ok in zip(pairs, fit) if ok]
    # A constant fitted on cases that all share one expected value pins nothing down.
    return len(inliers) >= MIN_CASES and len(inliers) > INLIERS * len(pairs) and len({round(e, 12) for e in inliers}) >= 2


def _value_relation(obs: Sequence[Observation], rtol: float, atol: float,
                    tol: Tolerance | None = None) -> tuple[str, float | None, float | None, list[bool]]:
    nothing = [False] * len(obs)
    if len(obs) < MIN_CASES:
        return "unknown", None, None, nothing
    pairs = [(o.expected, o.actual) for o in obs]
    if tol is not None:
        fit = [abs(a - e) <= tol.atol + tol.rtol * abs(e) for e, a in pairs]
        if sum(fit) > INLIERS * len(pairs):
            return "equal", None, None, fit
    fit = [_close(a, e, rtol, atol) for e, a in pairs]
    if sum(fit) > INLIERS * len(pairs):
        # Within the relation's own fit but (given the verdict's tolerance) not within the
        # verdict's: "near", never "equal", so the two never contradict each other.
        return ("near" if tol is not None else "equal"), None, None, fit
    ratios = [a / e for e, a in pairs if abs(e) > atol]
    if ratios:
        k = statistics.median(ratios)
        fit = [_close(a, k * e, rtol, atol) for e, a in pairs]
        if k != 0 and _holds(pairs, fit):
            return "factor", k, None, fit
    c = statistics.median(a - e for e, a in pairs)
    fit = [_close(a, e + c, rtol, atol) for e, a in pairs]
    if _holds(pairs, fit):
        return "offset", None, c, fit
    return "other", None, None, nothing


def _gradient_relation(with_grads: Sequence[Observation], any_cases: bool) -> tuple[str | None, float | None, float | None, list[bool]]:
    nothing = [False] * len(with_grads)
    if not with_grads:
        return (None if any_cases else "unknown"), None, None, nothing
    # relation() passes only observations with both numbers: (cosine, |grad ratio|) each.
    cr = [(o.cosine, o.norm_ratio) for o in with_grads if o.cosine is not None and o.norm_ratio is not None]
    cos_median = statistics.median(c for c, _ in cr)
    if len(with_grads) < MIN_CASES:
        return "unknown", None, cos_median, nothing
    need = INLIERS * len(with_grads)
    equal = [c >= COSINE_EQUAL and abs(r - 1) <= RATIO_RTOL for c, r in cr]
    if sum(equal) > need:
        return "equal", None, cos_median, equal
    parallel = [c >= COSINE_PARALLEL and math.isfinite(r) for c, r in cr]
    if sum(parallel) > need:
        k = statistics.median(r for (_, r), ok in zip(cr, parallel) if ok)
        constant = [ok and abs(r - k) <= RATIO_RTOL * abs(k) for (_, r), ok in zip(cr, parallel)]
        return "parallel", (k if sum(constant) > need else None), cos_median, parallel
    return "other", None, cos_median, nothing


# --- 4. training impact ----------------------------------------------------------------

@dataclass(frozen=True)
class Impact:
    """K steps of descent under each side from the same start.

    ``apart``: distance between the two end points / mean distance travelled (0: same
    place; about 1.4 for orthogonal paths of equal length; 2: opposite directions).
    ``cross_improvement[label]``: how much descending ``label``'s loss improved the
    *other* side's loss, relative to what descending the other's own loss achieved
    (1: just as well; 0: not at all; negative: it made the other's loss worse; NaN: the
    other side's own descent made no progress).  ``gradient_ratio``: |∇actual| / |∇expected|
    at the start — normalised steps hide it, a fixed learning rate would not.
    """

    steps: int
    apart: float
    cross_improvement: dict[str, float]
    travelled: dict[str, float] = field(default_factory=dict)
    gradient_ratio: float | None = None
    lr: float = 0.0
    note: str = ""
    evaluations: int = 0
    taken: dict[str, int] = field(default_factory=dict)  # steps per side (``steps`` is the fewest)

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "apart": _json_float(self.apart),
                "cross_improvement": {k: _json_float(v) for k, v in self.cross_improvement.items()},
                "gradient_ratio": _json_float(self.gradient_ratio), "lr": self.lr, "note": self.note, "taken": dict(self.taken)}


# Step policy: normalised gradient descent with backtracking.  The first trial step has
# length LR · R, where R is the typical size of the case (RMS over all its floating
# inputs, times sqrt(number of grad elements)), so a step means the same at magnitude
# 1e-3 or 1e6 and a factor-of-2 loss is not sent twice as far as its twin.  A step is
# kept only if it lowers the side's own loss, otherwise halved (at most HALVINGS times),
# so each side really descends its own loss and never oscillates around a minimum;
# after an accepted step the next trial doubles again, up to LR · R.
IMPACT_STEPS = 5
IMPACT_LR = 0.05
HALVINGS = 8


def impact(
    expected: Implementation,
    actual: Implementation,
    spec: Spec,
    case: Case,
    steps: int = IMPACT_STEPS,
    lr: float = IMPACT_LR,
    *,
    run: Runner = call_runner,
    max_calls: int | None = None,
    deadline: float | None = None,
) -> Impact | None:
    """Descend each side's loss from ``case`` on the grad inputs; compare where they lead.

    ``max_calls`` caps the implementation calls; each side then gets half of what the
    final comparison leaves, and stops early (with a note) when its share is spent;
    likewise once its half of the time to ``deadline`` (``time.perf_counter()``) is spent,
    but never before its first step: "stopped after 0 steps" would say nothing.
    """
    names = [a.name for a in spec.args if a.grad and a.is_float]
    if not names or steps <= 0:
        return None
    calls = 0

    def loss_and_grad(impl: Implementation, tensors: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor] | None]:
        nonlocal calls
        calls += 1
        o = run(impl, spec, replace(case, tensors=tensors))
        if o.failed or o.value is None:
            return math.nan, None
        value = float(o.value.double().sum())
        return value, {n: (g if (g := o.grads.get(n)) is not None else torch.zeros_like(tensors[n])) for n in names}

    start = dict(case.tensors)
    floats = [t.double() for t in start.values() if t.is_floating_point() and t.numel()]
    rms = math.sqrt(sum(float(t.pow(2).sum()) for t in floats) / max(sum(t.numel() for t in floats), 1)) if floats else 0.0
    n_el = sum(start[n].numel() for n in names)
    radius = (rms if math.isfinite(rms) and rms > 0 else 1.0) * math.sqrt(max(n_el, 1))
    longest = lr * radius
    ends, first, last, taken, grad_norm, notes = {}, {}, {}, {}, {}, []
    share = None if max_calls is None else max((max_calls - 2) // 2, 2)
    for i, impl in enumerate((expected, actual)):
        la = impl.label
        budget_end = None if share is None else calls + share
        # Each side gets half of the time left (the first side may not starve the second);
        # the final cross-evaluation takes two calls more.
        side_deadline = None if deadline is None else (
            time.perf_counter() + (deadline - time.perf_counter()) / (2 - i) if deadline > time.perf_counter() else deadline)
        x = dict(start)
        f, g = loss_and_grad(impl, x)
        first[la] = f
        grad_norm[la] = _norm([g[n] for n in names]) if g is not None else math.nan
        length, k = longest, 0
        while k < steps:
            if g is None or not math.isfinite(f):
                notes.append(f"{la} stopped after {k} step(s): its loss is not finite or the call failed")
                break
            gn = _norm([g[n] for n in names])
            if not math.isfinite(gn) or gn == 0:
                notes.append(f"{la} stopped after {k} step(s): {'zero' if gn == 0 else 'non-finite'} gradient")
                break
            if budget_end is not None and calls >= budget_end:
                notes.append(f"{la} stopped after {k} step(s): the call budget is spent")
                break
            if k and side_deadline is not None and time.perf_counter() > side_deadline:  # one step is always tried
                notes.append(f"{la} stopped after {k} step(s): its half of the time budget is spent")
                break
            for _ in range(HALVINGS + 1):
                cand = {**x, **{n: _project(spec.arg(n).domain, x[n] - (length / gn) * g[n].to(x[n].dtype)) for n in names}}
                fc, gc = loss_and_grad(impl, cand)
                if math.isfinite(fc) and fc < f:
                    x, f, g = cand, fc, gc
                    length = min(2 * length, longest)
                    k += 1
                    break
                length /= 2
            else:
                notes.append(f"{la} stopped after {k} step(s): no step down its own loss (at a minimum, or flat at this precision)")
                break
        ends[la], last[la], taken[la] = x, f, k
    e, a = expected.label, actual.label
    travelled = {la: _norm([ends[la][n] - start[n] for n in names]) for la in (e, a)}
    gap = _norm([ends[e][n] - ends[a][n] for n in names])
    mean_travel = (travelled[e] + travelled[a]) / 2
    apart = gap / mean_travel if mean_travel > 0 else (0.0 if gap == 0 else math.inf)
    cross = {}
    for mover, judge in ((e, actual), (a, expected)):
        other = judge.label
        theirs, _ = loss_and_grad(judge, ends[mover])
        achieved = first[other] - last[other]
        cross[mover] = (first[other] - theirs) / achieved if achieved > 0 and math.isfinite(theirs) else math.nan
    ratio = grad_norm[a] / grad_norm[e] if grad_norm[e] and math.isfinite(grad_norm[e]) else None
    return Impact(min(taken.values()), apart, cross, travelled, ratio, lr, "; ".join(notes), calls, dict(taken))


def _norm(ts: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))


def _project(domain: str, t: torch.Tensor) -> torch.Tensor:
    """Keep a descended input in its domain."""
    if domain == "positive":
        return t.clamp_min(torch.finfo(t.dtype).tiny)
    if domain in ("unit", "image"):
        eps = torch.finfo(t.dtype).eps
        return t.clamp(eps, 1 - eps)
    if domain in ("simplex", "sphere"):
        return renormalise(t.clamp_min(0) if domain == "simplex" else t, domain)
    return t


# --- 5. known signatures -----------------------------------------------------------------

@dataclass(frozen=True)
class KnownValue:
    """A number that fingerprints a specific failure."""

    value: float
    note: str
    op: str | None = None  # an aten op a side must run for the note to hold (None: any code)


SIGNATURES: tuple[KnownValue, ...] = (
    KnownValue(100.0, "100 = torch's BCELoss clamp of log(p) at -100: a probability reached 0 or 1", op="binary_cross_entropy"),
    KnownValue(-math.log(torch.finfo(torch.float32).tiny), "87.34 = -ln(FLT_MIN): a softmax probability underflowed and was clamped to FLT_MIN"),
    KnownValue(math.log(2.0), "0.6931 = ln 2: a sigmoid stuck at 0.5 (all-zero logits)"),
    KnownValue(math.log(torch.finfo(torch.float32).max), "88.72 = ln(FLT_MAX): where float32 exp overflows"),
    # exp(x) rounds to 0 below ln(2^-150), half the smallest float32 denormal: log of it is -inf.
    KnownValue(150 * math.log(2.0), "103.97 = -ln(2^-150): where float32 exp underflows to 0 (a log of it is -inf)"),
    *(KnownValue(10.0**k, f"1e{k} = 1/smooth for a smoothing constant smooth=1e-{k} (a 0/0 guarded by smooth)") for k in (4, 5, 6, 7, 8)),
)
SIGNATURE_RTOL = 1e-4


def signatures(values: Iterable[float], table: Sequence[KnownValue] = SIGNATURES, rtol: float = SIGNATURE_RTOL) -> list[str]:
    """Plain-words notes for the values that match a known signature (sign ignored), each once."""
    notes: list[str] = []
    for v in values:
        if v is None or not math.isfinite(v):
            continue
        for known in table:
            if abs(abs(v) - known.value) <= rtol * known.value and known.note not in notes:
                notes.append(known.note)
    return notes


def ops_run(impl: Implementation, spec: Spec, case: Case) -> set[str] | None:
    """The aten op names one in-process call of ``impl`` runs (None when it raised)."""
    seen: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(_op_name(func))
            return func(*args, **(kwargs or {}))

    try:
        with Record():
            call(impl.fn, spec, case)
    except Exception:
        return None
    return seen


def _notes_that_hold(notes: list[str], expected: Implementation, actual: Implementation | None, spec: Spec,
                     case: Case, in_process: bool) -> list[str]:
    """Drop a note tied to an op no side runs: 100 dB from a PSNR's 1e-10 guard is not
    BCELoss' clamp.  A side that cannot be watched in-process keeps the note (unknown)."""
    needs = {k.note: k.op for k in SIGNATURES if k.op}
    if not any(n in needs for n in notes):
        return notes
    ops: set[str] = set()
    for impl in (expected, actual):
        seen = ops_run(impl, spec, case) if impl is not None and in_process else None
        if seen is None:
            return notes
        ops |= seen
    return [n for n in notes if n not in needs or needs[n] in ops]


# --- 6. the explanation ------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Explanation:
    pair: tuple[str, str]
    kind: str
    category: Category
    reason: str = ""
    unstable_side: str | None = None
    drift: dict[str, float] = field(default_factory=dict)
    self_consistency: dict[str, SelfConsistency] = field(default_factory=dict)
    relation: Relation | None = None
    location: Any = None  # a trace.Localisation, or None when not traced
    impact: Impact | None = None
    notes: tuple[str, ...] = ()  # known signatures
    skipped: tuple[str, ...] = ()  # analyses left out, and why
    evaluations: int = 0  # implementation calls spent explaining
    seconds: float = 0.0
    costs: dict[str, tuple[int, float]] = field(default_factory=dict)  # per analysis: (calls, seconds)
    origin: NonFiniteOrigin | None = None  # what makes a non-finite value float64 keeps
    rounded: tuple[str, ...] = ()  # sides whose non-finite working result is the correctly rounded float64 one
    onset: float | None = None  # max |input| from which the unstable side turns non-finite
    budget_note: str = ""  # the time budget, when the cost of a call raised it

    # -- the one sentence
    def sentence(self) -> str:
        e, a = self.pair
        c = self.category
        if c is Category.SEMANTIC and self.origin is not None:
            other = e if self.origin.label == a else a
            head = (f"semantic: {self.origin.label} gives NaN/inf by {self.origin.describe()} where {other} stays finite "
                    f"(a guard on one side only; float64 too, at any input scale)")
        elif c is Category.SEMANTIC and self.kind == "gradient":
            head = f"semantic: {a}'s gradient differs from {e}'s (still different in float64)"
        elif c is Category.SEMANTIC:
            head = f"semantic: {a} computes a different function from {e} (still different in float64)"
        elif c is Category.NUMERICAL:
            drift_u = self.drift.get(self.unstable_side or "", math.nan)
            head = f"numerical: {e} and {a} agree in float64; {self.unstable_side} drifts from its own float64 result (score {_g(drift_u)})"
        elif c is Category.UNKNOWN:
            head = f"unknown: {self.reason}"
        else:
            head = f"{c.value}: {self.reason}" if self.reason else c.value
        parts = [head]
        parts += [f"{la}'s NaN/inf is its float64 result correctly rounded (an overflow of the working dtype, not an error)" for la in self.rounded]
        where = self._where()
        if where:
            parts.append(f"first differing op at {where}")
        bad = [s for s in self.self_consistency.values() if s.consistent is False]
        if len(bad) == 1:
            s = bad[0]
            parts.append(f"{s.label}'s gradient is not the derivative of its own value (finite differences off by {_pct(s.max_error)})")
        elif bad:
            # Both sides off alike is usually a deliberate approximation (envelope-theorem
            # gradients of an unconverged solver), not a bug on one side: say so, blame neither.
            off = " and ".join(_pct(s.max_error) for s in bad)
            parts.append(f"neither side's gradient is the exact derivative of its own value (finite differences off by {off}: an approximate gradient on both sides)")
        at_kink = [s.label for s in self.self_consistency.values() if s.kink and s.consistent is None]
        if at_kink:
            parts.append(f"{' and '.join(at_kink)} {'is' if len(at_kink) == 1 else 'are'} at a non-differentiable point here "
                         f"(one-sided slopes differ: any value between them is a valid subgradient, so no gradient verdict)")
        r = self.relation
        if r is not None:
            if r.value == "factor" and r.factor is not None:
                parts.append(f"values a constant factor apart ({a} ≈ {_g(r.factor)} × {e})")
            elif r.value == "offset" and r.offset is not None:
                parts.append(f"values a constant offset apart ({_g(r.offset)})")
            if r.same_minimisers:
                parts.append("gradients parallel (same minimisers, different step size)")
            elif r.gradient == "parallel" and r.opposite:
                parts.append(f"gradients parallel on {r.gradient_fits} / {r.gradient_cases} cases but opposite on {r.opposite}: different minimisers")
            elif r.gradient == "parallel":
                parts.append(f"gradients parallel on {r.gradient_fits} / {r.gradient_cases} cases (not all: same minimisers not shown)")
            elif r.gradient == "other" and r.cosine_median is not None:
                parts.append(f"gradients point elsewhere (median cosine {r.cosine_median:.2g})")
        if self.impact is not None:
            parts.append(self._impact_words())
        if self.notes:
            parts.append(self.notes[0])
        return "; ".join(parts)

    def _where(self) -> str | None:
        loc = _location_json(self.location)[0]
        if not isinstance(loc, dict):
            return None
        # The side the trace names (the one under test, or the unstable one) comes first.
        named = getattr(self.location, "side", None)
        for label in (named, self.pair[1], self.pair[0]):
            site = loc.get(label)
            if isinstance(site, dict) and site.get("file"):
                return f"{_short_path(site['file'])}:{site.get('line')}"
        return None

    def _impact_words(self) -> str:
        e, a = self.pair
        im = self.impact
        assert im is not None  # called only when there is one
        by_a = im.cross_improvement.get(a, math.nan)
        if not math.isfinite(by_a):
            why = im.note.split("; ")[0] if im.note else "no progress"
            words = f"training impact not measurable from this case ({why})"
        elif by_a <= 0:
            words = f"descent under {a} does not descend {e}'s loss"
        elif im.apart > 0.1:
            words = f"both losses go down, but they lead to different places (end points {im.apart:.2g}× the distance travelled apart)"
        else:
            words = f"descent under either leads to the same place (end points {im.apart:.2g}× the distance travelled apart)"
        r = im.gradient_ratio
        if r is not None and (r < 1e-3 or r > 1e3):
            words += f", but |∇{a}| is {_g(r)}× |∇{e}| at the start: with a fixed learning rate it would {'stall' if r < 1 else 'blow up'}"
        return words

    # -- the evidence behind it
    def evidence(self) -> list[str]:
        e, a = self.pair
        lines = [f"float64 oracle: {self.category.value} — {self.reason}" if self.reason else f"category: {self.category.value}"]
        if self.origin is not None:
            lines.append(f"non-finite origin in {self.origin.label}: {self.origin.describe()}")
        if self.onset is not None:
            lines.append(f"{self.unstable_side} turns non-finite from max |input| = {self.onset:.6g} (bisected on the input scale)")
        if self.drift:
            lines.append("drift from own float64 result rounded to the working dtype (score, working tolerance): "
                         + ", ".join(f"{la} {_g(v)}" for la, v in self.drift.items()))
        for s in self.self_consistency.values():
            if s.consistent is None:
                lines.append(f"self-consistency of {s.label}: no verdict ({s.note})")
            else:
                verdict = "consistent" if s.consistent else "INCONSISTENT"
                lines.append(f"self-consistency of {s.label}: {verdict}; finite differences vs autograd, {s.mode}, "
                             f"{s.checks} check(s): greatest relative error {_g(s.max_error)} (up to {FD_RTOL:g} allowed)"
                             + (f"; {s.note}" if s.note else ""))
        if self.relation is not None:
            lines.append(f"relation: {self.relation.describe(self.pair)}")
        loc, note = _location_json(self.location)
        if loc:
            for label, site in loc.items():
                if isinstance(site, dict):
                    # The path as the sentence above writes it (the JSON keeps it absolute).
                    lines.append(f"location in {label}: {_short_path(str(site.get('file')))}:{site.get('line')}: "
                                 f"{site.get('code', '')} ({site.get('op', '')})")
        if note:
            lines.append(f"location: {note}")
        if self.impact is not None:
            im = self.impact
            # NaN: the other side's own descent made no progress, so there is no ratio to give.
            cross = ", ".join(f"descending {la} achieves {_g(v)} of the other's own improvement" if not math.isnan(v)
                              else f"descending {la}: not measurable (the other's own descent made no progress)"
                              for la, v in im.cross_improvement.items())
            ratio = f"; |∇{a}| / |∇{e}| at the start {_g(im.gradient_ratio)}" if im.gradient_ratio is not None else ""
            # One side stuck and the other moving: say so, not "0 steps" and "2x apart"
            # (which reads as opposite directions).
            steps = (", ".join(f"{la} {n}" for la, n in im.taken.items()) if len(set(im.taken.values())) > 1 else str(im.steps))
            moved = [la for la, d in im.travelled.items() if d > 0]
            apart = (f"only {moved[0]} moved (the other took no step), so no distance apart is given"
                     if len(moved) == 1 and len(im.travelled) == 2 else f"end points {_g(im.apart)}× the distance travelled apart")
            lines.append(f"training impact: {steps} normalised descent step(s) (backtracking, first step {im.lr:g} of the case's size); "
                         f"{apart}; {cross}{ratio}" + (f"; {im.note}" if im.note else ""))
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"skipped: {s}" for s in self.skipped]
        if self.budget_note:
            lines.append(f"budget: {self.budget_note}")
        lines.append(f"cost: {self.evaluations} implementation call(s), {self.seconds:.2f} s")
        return lines

    def to_json(self) -> dict[str, Any]:
        loc, note = _location_json(self.location)
        return {
            "category": self.category.value,
            "reason": self.reason,
            "unstable_side": self.unstable_side,
            "drift": {k: _json_float(v) for k, v in self.drift.items()},
            "self_consistency": {k: v.to_json() for k, v in self.self_consistency.items()},
            "relation": self.relation.to_json() if self.relation else None,
            "location": loc,
            "location_note": note,
            # How well the data backs the lines, and which side a summary names (trace.Localisation).
            "location_confidence": getattr(getattr(self.location, "confidence", None), "value", None),
            "location_side": getattr(self.location, "side", None),
            "impact": self.impact.to_json() if self.impact else None,
            "notes": list(self.notes),
            "skipped": list(self.skipped),
            "origin": self.origin.to_json() if self.origin else None,
            "rounded": list(self.rounded),
            "nonfinite_onset": _json_float(self.onset),
            "budget": self.budget_note or None,
            "sentence": self.sentence(),
            "evaluations": self.evaluations,
            "seconds": self.seconds,
        }

    def signature(self) -> tuple:
        """Grouping key for distinct causes: kind + category + location + relation."""
        loc = _location_json(self.location)[0]
        where = tuple(sorted((la, s.get("file"), s.get("line")) for la, s in loc.items() if isinstance(s, dict))) if isinstance(loc, dict) else None
        r = self.relation
        return (self.kind, self.category.value, where, (r.value, r.gradient) if r else None)


def _location_json(loc: Any) -> tuple[Any, str | None]:
    """(location JSON, note) from a trace.Localisation (duck-typed: .to_json(), .note)."""
    if loc is None:
        return None, None
    data = loc.to_json() if hasattr(loc, "to_json") else loc
    note = getattr(loc, "note", None)
    if isinstance(data, dict) and "location" in data:
        return data["location"], data.get("location_note", note)
    return data, note


# --- 7. orchestration --------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """Explanation stops starting new analyses once either limit is spent.

    The time limit follows the cost of a call: once the oracle has measured it, a side
    that takes 1.5 s a call gets ``calls_wanted`` calls' worth of time (at most
    ``stretch`` times ``seconds``), and the explanation says so.
    """

    calls: int = 2000
    seconds: float = 60.0
    calls_wanted: int = 120  # what oracle + trace + impact + self-consistency take on a small case
    stretch: float = 5.0

    def for_call_cost(self, per_call: float) -> float:
        return max(self.seconds, min(self.calls_wanted * per_call, self.stretch * self.seconds))


# The oracle's scale ladder may use this share of the time budget, so that location and
# impact, which a researcher acts on first, are never starved by it.
ORACLE_SHARE = 0.3


class _Counted:
    """A runner that counts the implementation calls made through it, and their time."""

    def __init__(self, run: Runner):
        self.run, self.calls, self.seconds = run, 0, 0.0

    def __call__(self, impl: Implementation, spec: Spec, case: Case) -> Outcome:
        self.calls += 1
        t0 = time.perf_counter()
        try:
            return self.run(impl, spec, case)
        finally:
            self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        pass  # the wrapped runner is its owner's to close


def explain(
    expected: Implementation,
    actual: Implementation | None,
    spec: Spec,
    case: Case,
    kind: str,
    tol: Tolerance,
    observations: Iterable[Observation | None] = (),
    *,
    run: Runner = call_runner,
    impact_steps: int | None = None,
    locate: Callable[..., Any] | None = None,
    budget: Budget = Budget(),
    also: Sequence[Case | None] = (),
) -> Explanation:
    """Explain one divergence of (expected, actual) of ``kind`` on ``case``.

    ``impact_steps``: None runs the training-impact probe for semantic divergences
    with a gradient (IMPACT_STEPS steps), 0 never, n > 0 always with n steps.
    ``locate``: ``trace.locate(expected, actual, spec, case, tol)``, if given.
    A finding about one implementation alone (mutation, nondeterminism) passes
    ``actual=None`` (or the same implementation twice).
    ``also``: other cases of the same finding (its worst case, its representative).
    The category is decided over all of them: when the explained case is beyond
    float64's reach too but float64 resolves another case of the finding, the cause is
    numerical.  Their values are checked for known signatures too (two calls each),
    since a minimised case is often just past the threshold, short of the telltale number.

    Order of spending: the oracle on the case (its ladder capped at ORACLE_SHARE of the
    time), then location, impact (by the case's own category), the finding's other cases
    (at most ORACLE_SHARE of the time), self-consistency, signatures.
    """
    start = time.perf_counter()
    actual = expected if actual is None else actual
    kind = str(getattr(kind, "value", kind))  # a findings.Kind, or its string
    in_process = isinstance(run, InProcessRunner) or run is call_runner
    counted = _Counted(run)
    pair = (expected.label, actual.label)
    costs: dict[str, tuple[int, float]] = {}
    skipped: list[str] = []
    rel = relation(observations, tol=tol)
    seconds = budget.seconds
    budget_note = ""

    def spent() -> str | None:
        if counted.calls >= budget.calls:
            return f"the budget of {budget.calls} calls is spent"
        if time.perf_counter() - start >= seconds:
            return f"the budget of {seconds:g} s is spent"
        return None

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        why = spent()
        if why:
            skipped.append(f"{name}: {why}")
            return None
        calls0, t0 = counted.calls, time.perf_counter()
        out = fn()
        costs[name] = (counted.calls - calls0, time.perf_counter() - t0)
        return out

    if kind in OWN_CATEGORY or pair[0] == pair[1]:
        category = Category(kind) if kind in {c.value for c in Category} else Category.UNKNOWN
        reason = {"crash": "a side's process died", "timeout": "a side did not return in time",
                  "exception": "a side raised where the other returned", "non_tensor": "a side returned something that is not a tensor",
                  "non_scalar": "a side returned a non-scalar", "both_failed": "both sides failed on this input",
                  "mutation": "a side modified its inputs in place", "nondeterminism": "a side answers differently on the same input"}.get(kind, kind)
        return Explanation(pair, kind, category, reason + "; the float64 oracle does not apply", relation=rel,
                           evaluations=0, seconds=time.perf_counter() - start)
    orc = stage("oracle", lambda: oracle(expected, actual, spec, case, tol, run=counted, kind=kind, trace_nonfinite=in_process,
                                         deadline=start + ORACLE_SHARE * budget.seconds))
    if counted.calls:
        per_call = counted.seconds / counted.calls
        raised = budget.for_call_cost(per_call)
        if raised > seconds:
            budget_note = (f"time budget raised from {budget.seconds:g} s to {raised:.0f} s: a call takes {per_call:.2g} s "
                           f"and an explanation needs about {budget.calls_wanted} calls")
            seconds = raised
    # The trace records each side once under its own dispatch mode, not through ``run``:
    # those two calls are added to the count by hand.
    def traced() -> Any:
        assert locate is not None  # staged only when given
        counted.calls += 2
        if orc is not None and orc.category is Category.NUMERICAL and orc.unstable_side:
            # Located on the unstable side by its own working-dtype vs float64 run.
            return locate(expected, actual, spec, case, tol, unstable=orc.unstable_side)
        return locate(expected, actual, spec, case, tol)

    loc = stage("trace", traced) if locate is not None else None
    others = [c for c in also if c is not None and c is not case]
    has_grad = bool(spec.grad_args)
    first_category = orc.category if orc else Category.UNKNOWN
    steps = impact_steps if impact_steps is not None else (IMPACT_STEPS if first_category is Category.SEMANTIC and has_grad else 0)
    imp = None
    if steps > 0 and has_grad:
        imp = stage("impact", lambda: impact(expected, actual, spec, case, steps, run=counted,
                                             max_calls=budget.calls - counted.calls, deadline=start + seconds))
    # The finding's other cases can be large (the worst case of a search): they get a
    # share of what is left, after location and impact, never all of it.
    scale_free = orc is not None and orc.origin is not None and orc.origin.cause.scale_free  # log 0, 1/0: no case resolves those
    if orc is not None and orc.category in (Category.SEMANTIC, Category.UNKNOWN) and not scale_free and others:
        share = min(start + seconds, time.perf_counter() + ORACLE_SHARE * seconds)
        orc = stage("oracle on the finding's other cases", lambda: _over_cases(orc, expected, actual, spec, others, tol, counted, kind,
                                                                               in_process, share)) or orc
    category = orc.category if orc else Category.UNKNOWN
    consistency: dict[str, SelfConsistency] = {}
    for impl in (expected, actual):
        sc = stage(f"self-consistency {impl.label}", partial(self_consistency, impl, spec, case, run=counted))
        if sc is not None:
            consistency[impl.label] = sc
    # Known numbers: each side's value on the explained case (from the oracle's own
    # working-dtype run when it made one), and their difference.
    # A number both sides share (ln 2 from a two-class softmax at equal logits, on a
    # gradient finding whose values agree) fingerprints no failure: only values that
    # differ beyond the tolerance are read.
    def differing(found: list[float]) -> list[float]:
        if len(found) != 2:
            return found
        e, a = found
        if math.isfinite(e) and math.isfinite(a) and abs(a - e) <= tol.atol + tol.rtol * abs(e):
            return []
        return [e, a, e - a]

    def values_on(c: Case) -> list[float]:
        return differing([v for v in (real_total(counted(impl, spec, c)) for impl in (expected, actual)) if v is not None])

    notes_from: list[float] = []
    if orc is not None and orc.values:
        notes_from = differing([v for _, v in orc.values])
    else:
        notes_from = stage("values", lambda: values_on(case)) or []
    if others:
        notes_from += stage("signature cases", lambda: [v for c in others for v in values_on(c)]) or []
    onset = None
    if kind == "nonfinite" and orc is not None and orc.category is Category.NUMERICAL and orc.unstable_side:
        side = expected if orc.unstable_side == pair[0] else actual
        onset = stage("non-finite onset", lambda: nonfinite_onset(side, spec, case, run=counted))
        if onset is not None:
            notes_from.append(onset)
    return Explanation(
        pair=pair,
        kind=kind,
        category=category,
        reason=orc.reason if orc else "; ".join(skipped),
        unstable_side=orc.unstable_side if orc else None,
        drift=dict(orc.drift) if orc else {},
        self_consistency=consistency,
        relation=rel,
        location=loc,
        impact=imp,
        notes=tuple(_notes_that_hold(signatures(notes_from), expected, actual, spec, case, in_process)),
        skipped=tuple(skipped),
        evaluations=counted.calls,
        seconds=time.perf_counter() - start,
        costs=costs,
        origin=orc.origin if orc else None,
        rounded=orc.rounded if orc else (),
        onset=onset,
        budget_note=budget_note,
    )


def _over_cases(first: Oracle, expected: Implementation, actual: Implementation, spec: Spec, others: Sequence[Case],
                tol: Tolerance, run: Runner, kind: str, in_process: bool, deadline: float) -> Oracle:
    """The category over the finding's cases: numerical as soon as float64 resolves one of
    them, saying that on the explained case float64 differs (or overflows) too."""
    for other in sorted(others, key=lambda c: c.numel()):  # the cheapest first
        if time.perf_counter() > deadline:
            break
        # The case as it is, no scale ladder (the explained case had one): four calls, since
        # the worst case of a search can be large and slow.
        o = oracle(expected, actual, spec, other, tol, run=run, kind=kind, trace_nonfinite=in_process, deadline=deadline, ladder=0)
        if o.category is Category.NUMERICAL:
            mag = input_magnitude(spec, other)
            reason = (f"{o.reason} on another case of this finding (max |input| {mag:.4g}); on the case shown float64 "
                      f"cannot resolve it ({first.reason.split(':')[0]}): float64 saturates there as well")
            return replace(o, reason=reason, values=first.values, evaluations=first.evaluations + o.evaluations)
    return first


# Bisection steps for the magnitude at which a side's value turns non-finite.
ONSET_STEPS = 30


def nonfinite_onset(impl: Implementation, spec: Spec, case: Case, *, run: Runner = call_runner, steps: int = ONSET_STEPS) -> float | None:
    """The largest |input| (over the scalable arguments) from which ``impl`` returns NaN/inf
    on ``case`` scaled, bisected; None when no milder scale is finite.  Compared with the
    known signatures: 88.72 is where float32 exp overflows."""
    def nonfinite(mag: float) -> bool | None:
        o = run(impl, spec, with_magnitude(spec, case, mag))
        if o.failed or o.value is None:
            return None
        return not bool(torch.isfinite(o.value).all())

    hi = input_magnitude(spec, case)
    if not (hi > 0 and math.isfinite(hi)) or nonfinite(hi) is not True:
        return None
    lo = hi
    for _ in range(40):
        lo /= 2
        answer = nonfinite(lo)
        if answer is None:
            return None
        if not answer:
            break
    else:
        return None
    for _ in range(steps):
        mid = (lo + hi) / 2
        answer = nonfinite(mid)
        if answer is None:
            return None
        lo, hi = (lo, mid) if answer else (mid, hi)
    return hi


# --- small helpers ---------------------------------------------------------------------

def _json_float(x: float | None) -> float | str | None:
    return None if x is None else number(x)


def _short_path(path: str) -> str:
    """A path as the user would type it: relative to the working folder when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if rel.startswith("..") else rel


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.3g}%"
