"""The explain stage: run the analyses on one divergence, under a budget, into an Explanation.

In: the two :class:`~losscmp.load.Implementation`s of a pair (expected, actual), the
spec, one case (the minimised representative), the divergence kind, the tolerance,
the :class:`~losscmp.explain.relation.Observation`s recorded on every compared case of
the pair, and the finding's other cases.  Out: an
:class:`~losscmp.explain.explanation.Explanation`.

:func:`explain` spends a :class:`Budget` (calls and seconds; the time follows the cost
of a call) in the order a researcher acts on: the oracle on the case (its scale ladder
capped at ORACLE_SHARE of the time), location (``trace.locate``, passed in), training
impact, the oracle on the finding's other cases, self-consistency, known numbers.  What
did not fit is listed as skipped, with why.  Every implementation call goes through a
``run(impl, spec, case) -> Outcome`` callable, counted here.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Sequence

from ..compare import Tolerance
from ..engine import InProcessRunner, Runner
from ..generate import Case
from ..load import Implementation
from ..model import Kind
from ..run import Outcome
from ..spec import Spec
from .consistency import SelfConsistency, self_consistency
from .explanation import Explanation
from .float64 import call_runner
from .impact import IMPACT_STEPS, impact
from .oracle import OWN_CATEGORY, Categorised, Category, nonfinite_onset, oracle, over_cases
from .relation import Observation, relation
from .signatures import notes_that_hold, real_total, signatures


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
    ``locate``: ``trace.locate(expected, actual, spec, case, tol, deadline=...)``, if given
    (``unstable=`` too, for a numerical finding).
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
        category: Categorised = Kind(kind) if kind in OWN_CATEGORY else Category.UNKNOWN
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
    # those two calls are added to the count by hand.  It gets the budget's deadline: a stage
    # is only gated when it starts, and recording a slow side op by op (a Sinkhorn at N = 200)
    # ran an explanation stated at 60 s on past it.
    def traced() -> Any:
        assert locate is not None  # staged only when given
        counted.calls += 2
        if orc is not None and orc.category is Category.NUMERICAL and orc.unstable_side:
            # Located on the unstable side by its own working-dtype vs float64 run.
            return locate(expected, actual, spec, case, tol, unstable=orc.unstable_side, deadline=start + seconds)
        return locate(expected, actual, spec, case, tol, deadline=start + seconds)

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
    # Whatever the case shown says: a numerical example can stand for a finding whose
    # smaller cases differ in float64 too (two causes in one finding).
    if orc is not None and not scale_free and others:
        share = min(start + seconds, time.perf_counter() + ORACLE_SHARE * seconds)
        orc = stage("oracle on the finding's other cases", lambda: over_cases(orc, expected, actual, spec, case, others, tol, counted,
                                                                               kind, in_process, share)) or orc
    category = orc.category if orc else Category.UNKNOWN
    consistency: dict[str, SelfConsistency] = {}
    for impl in (expected, actual):
        sc = stage(f"self-consistency {impl.label}", partial(self_consistency, impl, spec, case, run=counted,
                                                             deadline=start + seconds))
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
        float64_differs=bool(orc and orc.float64_differs),
        self_consistency=consistency,
        relation=rel,
        location=loc,
        impact=imp,
        notes=tuple(notes_that_hold(signatures(notes_from), expected, actual, spec, case, in_process)),
        skipped=tuple(skipped),
        evaluations=counted.calls,
        seconds=time.perf_counter() - start,
        costs=costs,
        origin=orc.origin if orc else None,
        rounded=orc.rounded if orc else (),
        onset=onset,
        budget_note=budget_note,
        checked=orc.checked if orc else 0,
        mixed=orc.mixed if orc else (),
    )

