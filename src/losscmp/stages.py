"""What happens to the findings after the search, as an ordered list of stages.

A stage takes the list of divergences and returns it, changed: most map over it
(minimise each, explain each, save each); one merges (groups with the same explanation
become one).  ``default_stages`` is the list; a new stage is one module and one entry.
Each stage honours its own switch in ``Settings.outputs``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, Sequence

from .engine import Evaluator
from .settings import Settings


@dataclass(frozen=True)
class StageContext:
    ev: Evaluator
    settings: Settings


class Stage(Protocol):
    name: str

    def __call__(self, divergences: Sequence, ctx: StageContext) -> list: ...


class Minimize:
    """The smallest, simplest input that still shows the same divergence (:mod:`losscmp.minimize`)."""

    name = "minimize"

    def __call__(self, divergences: Sequence, ctx: StageContext) -> list:
        from .minimize import minimize

        return [replace(d, minimized=minimize(ctx.ev, d)) for d in divergences]


class Save:
    """Each finding's (minimised) case as a repro file (:mod:`losscmp.repro`)."""

    name = "save"

    def __call__(self, divergences: Sequence, ctx: StageContext) -> list:
        from .repro import save_divergence

        directory = ctx.settings.outputs.save_dir
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
    if outputs.save_dir is not None:
        stages.append(Save())
    return tuple(stages)
