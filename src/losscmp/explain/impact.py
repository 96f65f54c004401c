"""Training impact: does descending one side's loss descend the other's?

In: the two implementations of a pair, the spec, one case (its grad inputs are the
start).  Out: an :class:`Impact`: a few normalised, backtracking descent steps under
each side from the same start (kept in each argument's domain by its ``project`` in
:mod:`losscmp.domains`); how far apart the end points are relative to the distance
travelled, and how much each end point improved the *other* side's loss.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from ..domains import DOMAINS
from ..engine import Runner
from ..generate import Case
from ..load import Implementation
from ..spec import Spec
from .float64 import call_runner
from .words import json_float


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
        return {"steps": self.steps, "apart": json_float(self.apart),
                "cross_improvement": {k: json_float(v) for k, v in self.cross_improvement.items()},
                "gradient_ratio": json_float(self.gradient_ratio), "lr": self.lr, "note": self.note, "taken": dict(self.taken)}


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
                cand = {**x, **{n: DOMAINS[spec.arg(n).domain].project(x[n] - (length / gn) * g[n].to(x[n].dtype)) for n in names}}
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
