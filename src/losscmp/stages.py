"""What happens to the findings after the search, as an ordered list of stages.

A stage takes the list of divergences and returns it, changed: most map over it
(minimise each, explain each, save each); one merges (findings whose explanations
match are one cause).  ``default_stages`` is the list; a new stage is one module and
one entry.  Each stage honours its own switch in ``Settings.outputs``.

    minimise -> explain -> group -> save
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol, Sequence

from .engine import Evaluator
from .explain.float64 import float64_agrees
from .explain.stage import explain
from .minimize import minimize
from .model import Kind, Pair
from .repro import save_divergence
from .settings import Settings
from .trace import locate

# The op-level trace runs in this process: only on small cases, never on a side that
# may crash (isolation was asked for), and never during the search.
TRACE_UP_TO = 4096  # input elements
# Kinds whose cause the float64 oracle can tell apart (numerical vs semantic).
ORACLE_KINDS = (Kind.VALUE, Kind.GRADIENT, Kind.NONFINITE)


@dataclass(frozen=True)
class StageContext:
    ev: Evaluator
    settings: Settings
    history: dict = field(default_factory=dict)  # Pair -> [explain.Observation] over every compared case


class Stage(Protocol):
    name: str

    def __call__(self, divergences: Sequence, ctx: StageContext) -> list: ...


class Minimize:
    """The smallest, simplest input that still shows the same divergence (:mod:`losscmp.minimize`).

    With explanation on, a divergence that float64 resolves (the two sides agree there:
    a precision effect) is kept one while it shrinks, so a numerical cause is never
    minimised into a different, semantic one.  The converse is not enforced: a worst case
    beyond float64's own range (softplus at 1e30) must be free to shrink to 89.
    """

    name = "minimize"

    def __call__(self, divergences: Sequence, ctx: StageContext) -> list:
        ev = ctx.ev
        out = []
        for d in divergences:
            keep = None
            if ctx.settings.outputs.explain and isinstance(d.subject, Pair) and d.kind in ORACLE_KINDS:
                e, a = ev.impls[d.subject.expected], ev.impls[d.subject.actual]
                if float64_agrees(e, a, ev.spec, d.case, run=ev.runner):
                    keep = partial(_float64_still_agrees, e, a, ev)
            out.append(replace(d, minimized=minimize(ev, d, keep)))
        return out


def _float64_still_agrees(expected, actual, ev: Evaluator, case) -> bool:
    """The minimiser keeps the numerical verdict only on cases where float64 still agrees."""
    return bool(float64_agrees(expected, actual, ev.spec, case, run=ev.runner))


class Explain:
    """Which side is wrong, why, which line, and whether it matters (:mod:`losscmp.explain`, :mod:`losscmp.trace`)."""

    name = "explain"

    def __call__(self, divergences: Sequence, ctx: StageContext) -> list:
        ev, outputs = ctx.ev, ctx.settings.outputs
        out = []
        for d in divergences:
            if d.kind in (Kind.SHAPE, Kind.DTYPE):  # the detail says what differs; no oracle question to ask
                out.append(d)
                continue
            case = d.minimized.case if d.minimized is not None else d.case
            if isinstance(d.subject, Pair):
                e, a = ev.impls[d.subject.expected], ev.impls[d.subject.actual]
            else:
                e, a = ev.impls[d.subject.label], None
            traceable = (a is not None and d.kind in ORACLE_KINDS and not ctx.settings.execution.isolate
                         and not ctx.settings.execution.pythons and case.numel() <= TRACE_UP_TO)
            explanation = explain(
                e, a, ev.spec, case, d.kind.value, ev.tol, ctx.history.get(d.subject, ()),
                run=ev.runner, impact_steps=outputs.impact_steps, locate=locate if traceable else None,
                also=(d.case, d.representative),
            )
            out.append(replace(d, explanation=explanation))
        return out


class Group:
    """Findings of one subject and kind whose explanations match are one cause: merged,
    counts and regimes added up, the most severe representative kept."""

    name = "group"

    def __call__(self, divergences: Sequence, ctx: StageContext) -> list:
        merged: dict[tuple, Any] = {}  # audit.Divergence
        for d in divergences:
            if d.explanation is None:
                merged[(d.subject, d.kind, id(d))] = d
                continue
            key = (d.subject, d.kind, d.explanation.signature())
            first = merged.get(key)
            if first is None:
                merged[key] = d
                continue
            regimes = dict(first.regimes)
            for r, n in d.regimes.items():
                regimes[r] = regimes.get(r, 0) + n
            merged[key] = replace(first, count=first.count + d.count, regimes=regimes)
        return list(merged.values())


class Save:
    """Each finding's (minimised) case as a repro file (:mod:`losscmp.repro`)."""

    name = "save"

    def __call__(self, divergences: Sequence, ctx: StageContext) -> list:
        directory = ctx.settings.outputs.save_dir
        if directory is None:  # nowhere to save to (default_stages leaves Save out then)
            return list(divergences)
        out = []
        for d in divergences:
            try:
                d = replace(d, repro=str(save_divergence(ctx.ev, d, directory)))
            except (OSError, TypeError, ValueError) as e:  # the finding stands even if its file cannot be written
                d = replace(d, repro_error=f"{type(e).__name__}: {e}")
            out.append(d)
        return out


def default_stages(settings: Settings) -> tuple[Stage, ...]:
    outputs = settings.outputs
    stages: list[Stage] = []
    if outputs.minimize:
        stages.append(Minimize())
    if outputs.explain:
        stages += [Explain(), Group()]
    if outputs.save_dir is not None:
        stages.append(Save())
    return tuple(stages)
