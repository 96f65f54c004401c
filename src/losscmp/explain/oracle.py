"""The float64 oracle: is a divergence ``semantic`` (different functions) or ``numerical``?

In: the two implementations of a pair, the spec, one case, the tolerance and the kind
of the finding.  Out: an :class:`Oracle` (category, reason, unstable side, each side's
drift from its own float64 result), and for a NaN/inf that float64 keeps, the
:class:`NonFiniteOrigin` that makes it.

* :func:`oracle` re-runs both sides in float64 on the same inputs.  Still different
  there (under float64 tolerances) ⇒ ``semantic``; agreeing there but not in the
  working dtype ⇒ ``numerical``, with ``unstable_side`` the side whose working-dtype
  result drifts furthest from its own float64 result.  A case can be out of float64's
  range too (a logit of 3000 saturates a float64 sigmoid as 30 does a float32 one), so
  before calling a difference semantic the oracle walks the input scale down by halves
  while the working dtype still diverges: a scale where the working dtype diverges as
  strongly as on the case and float64 agrees makes it ``numerical`` after all (a
  semantic difference that merely fades at small scales, leaving float32 noise, does
  not).  Only the component the finding is about is judged (:func:`components`); the
  sides' drift is measured against their float64 result *rounded to the working
  dtype*, so a correctly rounded overflow (+inf) is not instability and a NaN is.
* :func:`over_cases` decides over the finding's other cases too: numerical where float64
  resolves one (a case shown beyond its reach saturates float64 too), both causes where
  float64 still differs on a case no larger than one it resolves.
* :func:`nonfinite_origin` traces a non-finite value float64 keeps at every scale to
  the op that makes it (log 0, division by 0, slope of sqrt at 0 ⇒ semantic; a shared
  overflow ⇒ unknown); :func:`nonfinite_onset` bisects where a side turns non-finite
  (88.72 = ln FLT_MAX).

Limits, said rather than hidden: ``nn.Module`` implementations are moved to float64 as
an in-process copy, so a runner that reloads implementations from their reference (the
isolated runner) runs the original float32 module, and the oracle answers ``unknown``
("returned float32 for float64 inputs") instead of guessing.  The scale ladder only
scales real/logit/positive arguments and only downwards.
"""
from __future__ import annotations

import math
import os
import time
import traceback
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Sequence, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..compare import Tolerance, Verdict, compare_outcomes, diff_message
from ..domains import SCALABLE
from ..engine import Runner
from ..generate import Case
from ..load import Implementation
from ..minimize import input_magnitude, scale_knob, scaled, with_magnitude
from ..model import Kind, Mismatch, Pair
from ..precision import ROUNDING_REACH, narrower_ops, premise_fails
from ..run import Outcome, call
from ..spec import Spec
from .float64 import call_runner, drift, float64_case, float64_problem, in_float64, rounded_to
from .signatures import real_total
from .words import op_name, short_path


class Category(str, Enum):
    """What the float64 oracle decides about a divergence.

    A finding that is its own explanation (a failed call, both sides failing, input
    mutation, nondeterminism: :attr:`~losscmp.model.Kind.own_category`) needs no oracle
    and is categorised by its :class:`~losscmp.model.Kind` itself, so those names are
    defined once, in the model (see :data:`Categorised`).
    """

    SEMANTIC = "semantic"  # different functions: still different in float64
    NUMERICAL = "numerical"  # same function, different rounding/overflow in the working dtype
    UNKNOWN = "unknown"  # the oracle could not decide (the reason says why)


# An explanation's category: the oracle's answer, or the finding's own kind.  Both are
# ``str`` enums, so ``.value`` is what the JSON holds either way.
Categorised = Union[Category, Kind]

# Kinds that are their own explanation: no oracle, no gradient analysis.
OWN_CATEGORY = tuple(k.value for k in Kind if k.own_category)


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
    checked: int = 1  # the finding's cases the category was decided over (the one shown included)
    mixed: tuple[CaseCategory, ...] = ()  # cases of the finding whose cause is the other one (see over_cases)
    float64_differs: bool = False  # numerical NaN/inf whose finite float64 results still differ (a second cause, another finding)


@dataclass(frozen=True)
class CaseCategory:
    """The oracle's answer on one more case of a finding: a finding can mix two causes
    (PoissonNLLLoss(full) vs -Poisson.log_prob: Stirling's log t! on small counts, float32
    rounding on counts of millions)."""

    case: str  # the case, described
    magnitude: float  # its largest |element| over the scaled arguments
    category: Category
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"case": self.case, "magnitude": self.magnitude, "category": self.category.value, "reason": self.reason}


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
    return replace(verdict, kind=kind, score=worst.score, detail=detail, diffs=sub, mismatch=Mismatch(pair, worst) if kind is not None else None)


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
    first_rel = math.inf  # float64's greatest relative difference where it first differs
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
            problem = float64_problem(label, o)
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
        if step == 0 and kind == "nonfinite":
            made = _working_nonfinite(full, work, parts, tol, working, pair)
            if made is not None:
                label, drifts, rounded = made
                reason = (f"{label}'s NaN/inf is {_dtype_name(case)} only: its float64 result there is finite, and not "
                          f"beyond {_dtype_name(case)}'s range; the finite results still differ in float64 ({v64.detail}), "
                          f"a difference of its own")
                return Oracle(Category.NUMERICAL, reason, label, drifts, scale, calls, values, rounded=rounded, float64_differs=True)
        # Only the finding's components: a value that is -inf in float64 on both sides says
        # nothing about a gradient finding whose float64 gradients are finite and differ.
        overflowed = any(d.nonfinite_mismatch for d in v64.diffs) or any(not _finite_in(o, parts) for o in full.values())
        if step == 0 and overflowed:
            persistent = {la: o for la, o in full.items() if not _finite_in(o, parts)}
        if not overflowed and first_difference is None:
            first_difference = (scale, v64.detail)
            first_rel = max((d.max_rel if math.isfinite(d.max_rel) else math.inf for d in v64.diffs), default=math.inf)
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
    if trace_nonfinite and first_rel <= ROUNDING_REACH:
        # "Still different in float64" proves another function only if both runs are float64
        # throughout: geomloss' KeOps backend rounds 1/eps to float32 inside its float64 run.
        here64 = float64_case(case if at == 1 else scaled(spec, case, at))
        for label, impl64 in ((pair[0], e64), (pair[1], a64)):
            narrow = narrower_ops(impl64, spec, here64)
            calls += 1
            if narrow:
                return Oracle(Category.UNKNOWN, f"{premise_fails(label, narrow)} (in float64 they differ by {first_rel:.2g} "
                              f"relative: {detail})", scale=at, evaluations=calls, values=values)
    down_to = f"; still different down to input scale x{scale * 2:g}" if steps else ""
    if cut_short:
        down_to += " (the scale ladder was cut short by the time budget)"
    return Oracle(Category.SEMANTIC, f"still different in float64{'' if at == 1 else f' at input scale x{at:g}'}: {detail}{down_to}",
                  scale=at, evaluations=calls, values=values)


def _working_nonfinite(full: dict[str, Outcome], work: dict[str, Outcome], parts: frozenset[str], tol: Tolerance,
                       working: torch.dtype, pair: tuple[str, str]) -> tuple[str, tuple[tuple[str, float], ...], tuple[str, ...]] | None:
    """A side whose NaN/inf (in the parts a non-finite finding is about) only the working dtype
    makes: finite in float64, and not float64's result rounded (an overflow past the working
    dtype's range is that function's true value there, a guard's absence, not instability).
    POT's Sinkhorn at x = 0.6, y = 1: a NaN gradient in float32, -0.8 in float64.  That the
    finite results still differ in float64 (-0.8 vs geomloss' -0.4) is a second cause with a
    finding of its own (gradient); the NaN itself is numerical.  None when there is no such side."""
    made = [la for la in pair if not _finite_in(work[la], parts) and _finite_in(full[la], parts)]
    if not made:
        return None
    drifts, rounded = _drifts(full, work, tol, working, pair)
    broken = [la for la in made if la not in rounded and dict(drifts)[la] > 1.0]
    return (broken[0], drifts, rounded) if broken else None


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
        where = f" at {short_path(self.file)}:{self.line}" if self.file else ""
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
            self.found: tuple[str, str, list[torch.Tensor], tuple, bool] | None = None  # ..., a NaN among the outputs
            self.root_at_zero: tuple[str, tuple] | None = None  # a forward sqrt-like op that saw an exact 0
            self.backward = False
            self.garbage: set[int] = set()  # data pointers of allocations not yet written

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if self.found is not None:
                return out
            name = op_name(func)
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
                nan = any(bool(torch.isnan(t).any()) for t in outs)
                self.found = (name, phase, [t.detach().clone() for t in ins], where, nan)
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
    name, phase, ins, (file, line), made_nan = mode.found
    if name in _LOGS and ins and bool((ins[0] == 0).any()):
        cause = Cause.LOG_ZERO
    elif phase == "backward" and mode.root_at_zero is not None:
        cause = Cause.SQRT_SLOPE_AT_ZERO
        name, (file, line) = mode.root_at_zero[0], mode.root_at_zero[1]
    elif name in _DIVS and ins and bool((ins[-1] == 0).any()):
        cause = Cause.DIVISION_BY_ZERO
    elif name in {"exp", "pow", "mul", "sum", "add", "expm1", "cosh", "sinh", "mean"} and not made_nan:
        # An overflow rounds finite numbers to an infinity; a NaN from finite tensors is
        # something else (a NaN constant, a fractional power of a negative number).
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


def over_cases(first: Oracle, expected: Implementation, actual: Implementation, spec: Spec, shown: Case, others: Sequence[Case],
               tol: Tolerance, run: Runner, kind: str, in_process: bool, deadline: float) -> Oracle:
    """The category over the finding's cases: ``shown`` (judged as ``first``) and ``others``,
    each of those judged as it is (no scale ladder: the worst case of a search can be large
    and slow; four calls each).

    float64 agreeing on a case makes it numerical there; float64 still differing makes it
    semantic there, unless the case is larger than every case float64 resolves: then float64
    may saturate too (sigmoid(89) is 1.0 in float64 as well), and the finding is numerical,
    saying so.  A semantic case no larger than one that float64 resolves is no saturation:
    the finding mixes two causes (PoissonNLLLoss(full): Stirling's log t! at t = 2, float32
    rounding at t = 8e6).  Then the category stays the one shown and ``mixed`` lists the cases
    of the other cause, which the sentence says."""
    judged: list[tuple[Case, Oracle]] = [(shown, first)]
    for other in sorted(others, key=lambda c: c.numel()):  # the cheapest first
        if time.perf_counter() > deadline:
            break
        judged.append((other, oracle(expected, actual, spec, other, tol, run=run, kind=kind, trace_nonfinite=in_process,
                                     deadline=deadline, ladder=0)))
    calls = first.evaluations + sum(o.evaluations for _, o in judged[1:])
    numerical = [(c, o) for c, o in judged if o.category is Category.NUMERICAL]
    if not numerical:
        return replace(first, evaluations=calls, checked=len(judged))
    reach = max(input_magnitude(spec, c) for c, _ in numerical)
    genuine = [(c, o) for c, o in judged if o.category is Category.SEMANTIC and input_magnitude(spec, c) <= reach]
    if any(c is shown for c, _ in genuine):  # the case shown differs in float64 below a scale float64 resolves
        return replace(first, evaluations=calls, checked=len(judged), mixed=_described(spec, numerical))
    base = first
    if first.category is not Category.NUMERICAL:
        other, o = numerical[0]
        reason = (f"{o.reason} on another case of this finding ({scale_knob(spec)} {input_magnitude(spec, other):.4g}); on the case "
                  f"shown float64 cannot resolve it ({first.reason.split(':')[0]}): float64 saturates there as well")
        base = replace(o, reason=reason, values=first.values)
    return replace(base, evaluations=calls, checked=len(judged), mixed=_described(spec, genuine))


def _described(spec: Spec, judged: Sequence[tuple[Case, Oracle]]) -> tuple[CaseCategory, ...]:
    return tuple(CaseCategory(c.describe(), input_magnitude(spec, c), o.category, o.reason) for c, o in judged)


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
