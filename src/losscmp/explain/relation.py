"""The relation over every compared case of a pair: how the two losses relate.

In: one :class:`Observation` per compared case (recorded during the search by
:func:`observe`: two sums, a dot product, two norms).  Out: a :class:`Relation`: values
equal, near, offset by a constant, scaled by a constant, or nothing simple; gradients
equal, parallel (same minimisers, another step size), or pointing elsewhere, each
holding on a majority of cases, with the rest listed by regime.  "Equal" is the
verdict's own judgement of each case (values and gradients within the run's
tolerance, carried by the observation), so the relation never counts as equal a case
the verdict calls a divergence, nor the other way round.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from ..compare import Tolerance, Verdict
from ..model import Kind
from ..run import Outcome
from .words import json_float, num


@dataclass(frozen=True)
class Observation:
    """One compared case of a pair: both values, how the gradients relate, and what the
    verdict said about each (None: not judged, e.g. an observation made without a verdict)."""

    expected: float
    actual: float
    cosine: float | None = None  # of the flattened gradients; None without gradients
    norm_ratio: float | None = None  # |grad actual| / |grad expected|
    regime: str | None = None
    values_agree: bool | None = None  # the verdict's value comparison, within the run's tolerance
    gradients_agree: bool | None = None  # every gradient within the run's tolerance, as the verdict judged it
    zero_gradient: str | None = None  # "expected" / "actual": that side's gradient is exactly zero, the other's not


def judged(verdict: Verdict) -> tuple[bool | None, bool | None]:
    """(values agree, gradients agree) as ``verdict`` judged them; None where it did not."""
    if not verdict.compared or not verdict.diffs:
        return None, None
    value = next((d.score <= 1.0 for d in verdict.diffs if d.what == "value"), None)
    grads = [d for d in verdict.diffs if d.what != "value"]
    if verdict.kind in (Kind.GRADIENT, Kind.SHAPE) and all(d.score <= 1.0 for d in grads):
        return value, False  # a gradient missing on one side, or of another shape: the verdict stopped before diffing it
    return value, (all(d.score <= 1.0 for d in grads) if grads else None)


def observe(expected: Outcome, actual: Outcome, regime: str | None = None, verdict: Verdict | None = None) -> Observation | None:
    """What the relation needs from one compared case; None when a side failed or is not finite.

    Cheap enough for every case of the search: two sums, one dot product, two norms,
    read back from the device in one transfer.  A non-scalar value is summed (the
    quantity the runner differentiates).  ``verdict``: the search's verdict on the same
    outcomes, whose judgement the observation carries (see :func:`judged`).
    """
    agree = judged(verdict) if verdict is not None else (None, None)
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
        return Observation(ve, va, None, None, regime, *agree)
    dot, ne, na = stats[2], stats[3], stats[4]
    if ne == 0 and na == 0 and agree[1] is False:
        # Both exactly zero, judged different (one side has no gradient at all): no direction
        # on either side.  Counted as cosine 1, ratio 1, such cases alone made a detached
        # side's gradient 'parallel (same minimisers)' to one it never has.
        return Observation(ve, va, None, None, regime, *agree)
    if ne == 0 and na == 0:
        cosine, ratio = 1.0, 1.0
    elif (ne == 0 or na == 0) and agree[1] is not True:
        # A zero gradient has no direction: counting it as orthogonal (cosine 0) made POT's
        # underflowed Sinkhorn (zero gradient on most float32 cases) "point elsewhere".
        return Observation(ve, va, None, None, regime, *agree, zero_gradient="expected" if ne == 0 else "actual")
    elif ne == 0 or na == 0:
        cosine, ratio = 0.0, (math.inf if ne == 0 else 0.0)  # within the verdict's tolerance of zero: equal, as judged
    else:
        cosine, ratio = dot / (ne * na), na / ne
    return Observation(ve, va, cosine, ratio, regime, *agree)


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
    # How "equal" gradients were counted: "verdict" (within the run's tolerance, as the
    # verdict judged each case) or "cosine" (observations without a verdict: COSINE_EQUAL
    # and RATIO_RTOL).  None: no gradients.
    gradient_equal_by: str | None = None
    # Cases where one side's gradient is exactly zero and the other's is not (and the verdict
    # did not call them equal): no direction to compare, so they are left out of the gradient
    # relation and counted here, per side ("expected" / "actual").
    zero_gradient: tuple[tuple[str, int], ...] = ()

    @property
    def same_minimisers(self) -> bool:
        # Parallel on most cases is not enough: the cases that are not (label smoothing's
        # C > 2 draws) may be exactly where the minimisers part.
        return self.gradient == "parallel" and not self.opposite and self.gradient_fits == self.gradient_cases

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "gradient": self.gradient, "factor": json_float(self.factor),
                "offset": json_float(self.offset), "cosine_median": json_float(self.cosine_median), "cases": self.cases,
                "value_fits": self.value_fits, "gradient_cases": self.gradient_cases, "gradient_fits": self.gradient_fits,
                "outliers": dict(self.outliers), "equal_within": list(self.equal_within) if self.equal_within else None,
                "skipped_cases": self.skipped_cases, "opposite": self.opposite, "gradient_equal_by": self.gradient_equal_by,
                "zero_gradient": dict(self.zero_gradient)}

    def describe(self, pair: tuple[str, str]) -> str:
        e, a = pair
        if not self.cases:
            return "no compared cases recorded (a relation is drawn over real, finite values of both sides; complex losses have none)"
        value = {
            "equal": "values equal",
            "near": f"values within {RELATION_RTOL:g} (relative) of each other but not equal within the verdict's tolerance",
            "factor": f"values a constant factor apart ({a} ≈ {num(self.factor)} × {e})",
            "offset": f"values a constant offset apart ({a} ≈ {e} {'+' if (self.offset or 0) >= 0 else '-'} {num(abs(self.offset or 0))})",
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
            + (f": |∇{a}| ≈ {num(self.factor)} × |∇{e}|)" if self.factor is not None and self.value != "factor" else ")"),
            "other": "gradients point elsewhere",
            "unknown": "too few cases to relate the gradients",
        }[self.gradient]
        if self.gradient in ("equal", "parallel"):
            grad += f" on {self.gradient_fits} / {self.gradient_cases} cases"
        if self.gradient == "equal":
            grad += (" (equal: within the verdict's tolerance)" if self.gradient_equal_by == "verdict"
                     else f" (equal: cosine >= 1 - {1 - COSINE_EQUAL:.0e}, norms within {RATIO_RTOL:g} relative)")
        if self.cosine_median is not None and self.gradient not in (None, "unknown"):
            grad += f", median cosine {self.cosine_median:.3g}"
        if self.opposite:
            grad += f"; opposite on {self.opposite} case(s): different minimisers (where one descends, the other ascends)"
        for side, n in self.zero_gradient:
            zero, other = (e, a) if side == "expected" else (a, e)
            grad += f"; the gradient of {zero} is exactly zero on {n} case(s) where {other}'s is not (no direction to compare, left out)"
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
    if gradient is None and any(o.zero_gradient or o.gradients_agree is False for o in obs):
        gradient = "unknown"  # gradients there were, judged different, but none with a direction on both sides
    equal_by = None if not with_grads else "verdict" if any(o.gradients_agree is not None for o in with_grads) else "cosine"
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
    zero = tuple((side, n) for side in ("expected", "actual") if (n := sum(1 for o in obs if o.zero_gradient == side)))
    return Relation(value, gradient, factor, offset, cos_median, len(obs), sum(value_fit), len(with_grads), sum(grad_fit),
                    tuple(sorted(misfits.items(), key=lambda kv: -kv[1])), (tol.rtol, tol.atol) if tol else None, len(given) - len(obs),
                    opposite, equal_by, zero)


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
    verdict_said = any(o.values_agree is not None for o in obs)
    if tol is not None or verdict_said:
        # The verdict's own judgement where the observation carries it; else its tolerance
        # on the summed values (|a - e| <= atol + rtol·|e|, as it judges a scalar loss).
        fit = [o.values_agree if o.values_agree is not None else tol is not None and abs(a - e) <= tol.atol + tol.rtol * abs(e)
               for o, (e, a) in zip(obs, pairs)]
        if sum(fit) > INLIERS * len(pairs):
            return "equal", None, None, fit
    fit = [_close(a, e, rtol, atol) for e, a in pairs]
    if sum(fit) > INLIERS * len(pairs):
        # Within the relation's own fit but not within the verdict's: "near", never
        # "equal", so the two never contradict each other.
        return ("near" if tol is not None or verdict_said else "equal"), None, None, fit
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
    # Equal as the verdict judged the case (within the run's tolerance) when the observation
    # says; only an observation made without a verdict falls back on cosine and norm ratio.
    equal = [o.gradients_agree if o.gradients_agree is not None else c >= COSINE_EQUAL and abs(r - 1) <= RATIO_RTOL
             for o, (c, r) in zip(with_grads, cr)]
    if sum(equal) > need:
        return "equal", None, cos_median, equal
    parallel = [c >= COSINE_PARALLEL and math.isfinite(r) for c, r in cr]
    if sum(parallel) > need:
        k = statistics.median(r for (_, r), ok in zip(cr, parallel) if ok)
        constant = [ok and abs(r - k) <= RATIO_RTOL * abs(k) for (_, r), ok in zip(cr, parallel)]
        return "parallel", (k if sum(constant) > need else None), cos_median, parallel
    return "other", None, cos_median, nothing

