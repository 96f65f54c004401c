"""Gradient self-consistency: is a side's autograd gradient the derivative of its own value?

In: one implementation, the spec, one case.  Out: a :class:`SelfConsistency` (consistent,
inconsistent, or no verdict with the reason), from float64 finite differences of the
side's own value against its own autograd gradient: every element on small cases,
random directional derivatives on large ones, at several steps and two scales,
one-sided at domain edges (each domain's ``step_scale`` and ``contains`` in
:mod:`losscmp.domains`).  NaN/inf gradients are inconsistent; a kink gives no verdict.
Both sides of an envelope-theorem solver (GeomLoss' Sinkhorn) are honestly "not
self-consistent"; the explanation then blames neither side.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Callable

import torch

from ..domains import DOMAINS
from ..engine import Runner
from ..generate import Case
from ..load import Implementation
from ..spec import Spec
from .float64 import call_runner, float64_case, float64_problem, in_float64
from .words import json_float


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
        return {"consistent": self.consistent, "max_error": json_float(self.max_error), "checks": self.checks, "mode": self.mode,
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


def _refine_one_sided(value_at: Callable[[dict[str, torch.Tensor], float], float | None], u: dict[str, torch.Tensor],
                      h: float, sign: float, f0: float, slope: float, auto: float) -> tuple[Resolved, float, tuple[float, float, float]]:
    """At a domain edge: shrink the step by FD_REFINE until the one-sided slope settles (two
    steps in a row agree); then its error is the verdict.  Still moving when rounding takes
    over or FD_FINEST is passed: unresolved.  Returns as :func:`_refine` does, the slope twice."""
    prev = slope
    while h * FD_REFINE >= FD_FINEST:
        h *= FD_REFINE
        near, far = value_at(u, sign * h), value_at(u, 2 * sign * h)
        if near is None or far is None or not (math.isfinite(near) and math.isfinite(far)):
            break
        slope = sign * (-3 * f0 + 4 * near - far) / (2 * h)
        noise = 4 * FD_ATOL * max(abs(f0), abs(near), abs(far)) / h
        if max(abs(slope), abs(prev), abs(auto)) < noise / FD_RTOL:
            break  # rounding swamps the slope from here on (a flat value against a large autograd is a signal)
        if abs(slope - prev) <= FD_RTOL * max(abs(slope), abs(prev)) + 2 * noise:
            signal = max(abs(slope), abs(auto), noise / FD_RTOL)
            return Resolved.SMOOTH, abs(slope - auto) / signal, (slope, slope, auto)
        prev = slope
    return Resolved.UNRESOLVED, math.inf, (prev, prev, auto)


def self_consistency(
    impl: Implementation,
    spec: Spec,
    case: Case,
    *,
    run: Runner = call_runner,
    directions: int = DIRECTIONS,
    all_elements_up_to: int = ALL_ELEMENTS_UP_TO,
    seed: int = 0,
    deadline: float | None = None,
) -> SelfConsistency:
    """Float64 finite differences of ``impl``'s value against its own autograd gradient.

    All elements one by one when there are at most ``all_elements_up_to`` of them,
    else ``directions`` random directional derivatives, as
    ``torch.autograd.gradcheck(fast_mode=True)`` does.  gradcheck itself is not used:
    it answers only pass/fail with a fixed absolute step and tolerance, which flags
    relu/abs kinks and scale-dependent steps falsely; see the policy above.
    Past ``deadline`` (a ``time.perf_counter()`` value) no new check starts; the verdict is
    the checks made, and the note says how many were left.
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
    if base.failed or base.value is None or float64_problem(label, base):
        return SelfConsistency(label, None, None, note=float64_problem(label, base) or "", evaluations=calls)
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
    own = {n: DOMAINS[spec.arg(n).domain].step_scale(case64.tensors[n]) for n in names}
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
            if not DOMAINS[spec.arg(n).domain].contains(moved[n]):
                return None
        o = run(impl64, spec, replace(case64, tensors=moved))
        calls += 1
        return float(o.value.sum()) if not o.failed and o.value is not None else math.nan

    worst, checks, skipped, kinks, unresolved_at = 0.0, 0, 0, [], []
    left_out = 0
    for k, variants in enumerate(perturbations):
        if deadline is not None and time.perf_counter() > deadline:
            left_out = len(perturbations) - k  # a slow side's 600 checks must not outlast the budget
            break
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
                if h == FD_STEPS[0] and error > FD_RTOL and signal >= noise / FD_RTOL:
                    # Doubtful at the finest step: a verdict only where finer steps show the slope
                    # settled (log(rate + 1e-8) at rate = 2e-38 curves on a scale of 1e-8, far
                    # below a floor step of 1e-3 of the case's RMS).
                    found, refined, at = _refine_one_sided(value_at, u, h, sign, f0, slope, auto)
                    if found is Resolved.UNRESOLVED:
                        unresolved = at
                        break
                    error = refined
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
    if left_out:
        notes.append(f"{left_out} of {len(perturbations)} check(s) not made: the explanation's time budget is spent")
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
