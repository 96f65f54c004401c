"""Sweeps: walk one knob across a range and locate every agree/diverge boundary.

A knob is ``scale`` (the largest |element| of the real-valued inputs; the case is
normalised so that its value *is* that magnitude), ``offset`` (a constant added to every
real-valued input: cancellation), or any keyword parameter.  A
parameter is set on each implementation where it can take it: as a factory keyword
for references such as ``geomloss:SamplesLoss(blur=0.05)``, else as a call keyword.
Each boundary between grid points is then bisected to 1%.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace
from typing import Sequence

from .compare import Verdict
from .engine import Evaluator
from .errors import LosscmpError, did_you_mean
from .findings import Kind, Pair
from .generate import Case, Recipe, build_case
from .load import Implementation, load_implementation
from .domains import SCALABLE
from .minimize import bisect, bracket_middle, input_magnitude, scaled, shifted
from .settings import Settings
from .spec import Spec


# Knobs that change the inputs rather than a keyword parameter.
INPUT_KNOBS = ("scale", "offset")


class KnobError(LosscmpError, ValueError):
    """A --param that does not parse, or a knob no call accepts."""


@dataclass(frozen=True)
class Knob:
    name: str
    lo: float
    hi: float
    log: bool = True
    side: str | None = None  # a keyword parameter given to this implementation only (``fork.eps``)

    @property
    def shown(self) -> str:
        return f"{self.side}.{self.name}" if self.side else self.name

    def grid(self, points: int) -> list[float]:
        if points < 2:
            return [self.lo]
        if self.log:
            a, b = math.log(self.lo), math.log(self.hi)
            return [math.exp(a + (b - a) * i / (points - 1)) for i in range(points)]
        return [self.lo + (self.hi - self.lo) * i / (points - 1) for i in range(points)]


def parse_knob(text: str) -> Knob:
    """``name=lo:hi[:log|lin]``, e.g. ``blur=1e-3:1:log``; ``label.name=...`` sets a keyword
    parameter on the implementation with that label only (``fork.eps=1e-8:1e-2``)."""
    m = re.fullmatch(r"\s*(?:([A-Za-z_][\w.+-]*)\.)?([A-Za-z_]\w*)\s*=\s*([^:]+):([^:]+)(?::(log|lin))?\s*", text)
    if not m:
        raise KnobError(f"--param {text!r}: expected [LABEL.]NAME=LO:HI[:log|lin], e.g. blur=1e-3:1:log or fork.eps=1e-8:1e-2")
    side, name = m.group(1), m.group(2)
    if side and name in INPUT_KNOBS:
        raise KnobError(f"--param {text!r}: {name} changes the inputs, which both sides share; give it without a label")
    try:
        lo, hi = float(m.group(3)), float(m.group(4))
    except ValueError:
        raise KnobError(f"--param {text!r}: bounds must be numbers") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):  # 1e400 reads as inf: no grid point would be finite
        raise KnobError(f"--param {text!r}: bounds must be finite numbers")
    log = m.group(5) != "lin"
    if not lo < hi or (log and lo <= 0):
        raise KnobError(f"--param {text!r}: need LO < HI{' and LO > 0 on a log scale' if log else ''}")
    return Knob(name, lo, hi, log, side)


@dataclass(frozen=True)
class Point:
    value: float
    verdict: Verdict


@dataclass(frozen=True)
class Boundary:
    """A change between agreement and divergence, bisected inside one grid step.  It is
    a fact about that step only: where agreement is not monotone in the knob, another
    range or grid finds other crossings."""

    agree_at: float
    diverge_at: float
    kind: Kind
    step: tuple[float, float] = (math.nan, math.nan)  # the grid points it was found between

    @property
    def value(self) -> float:
        return bracket_middle(self.agree_at, self.diverge_at)

    def describe(self, knob: str) -> str:
        where = f" (between grid points {self.step[0]:.4g} and {self.step[1]:.4g})" if not math.isnan(self.step[0]) else ""
        if self.diverge_at > self.agree_at:
            return f"agrees at {knob} = {self.agree_at:.4g}, diverges ({self.kind}) at {self.diverge_at:.4g}{where}"
        return f"diverges ({self.kind}) at {knob} = {self.diverge_at:.4g}, agrees at {self.agree_at:.4g}{where}"


@dataclass(frozen=True, eq=False)
class SweepResult:
    pair: Pair
    knob: Knob
    points: tuple[Point, ...]
    boundaries: tuple[Boundary, ...]
    evaluations: int
    case: Case
    evaluated: tuple[Point, ...] = ()  # grid and bisection points, in knob order


def sweep_case(spec: Spec, settings: Settings, size: int = 8) -> Case:
    """The fixed case a sweep walks on: standard regime, dims at ``size`` (within range)."""
    sizes = tuple((d, max(spec.size_range(d)[0], min(spec.size_range(d)[1], size))) for d in spec.dims)
    return build_case(spec, Recipe(sizes=sizes, seed=settings.search.seed), dtype=settings.execution.dtype, device=settings.execution.device)


def sweep(impls: Sequence[Implementation], spec: Spec, settings: Settings, knob: Knob, points: int = 9, case: Case | None = None) -> SweepResult:
    if len(impls) != 2:
        raise KnobError("sweep compares exactly two implementations")
    case = case or sweep_case(spec, settings)
    pair = Pair(impls[0].label, impls[1].label)
    if knob.side is not None and knob.side not in pair.labels:
        raise KnobError(f"--param {knob.shown}: no implementation is labelled {knob.side!r}"
                        f"{did_you_mean(knob.side, pair.labels)} (labels: {', '.join(pair.labels)})")
    if knob.name not in INPUT_KNOBS and knob.name in case.params:  # the swept value, not the spec's fixed one, reaches the call
        fixed = case.params[knob.name]
        case = replace(case, params={k: v for k, v in case.params.items() if k != knob.name})
        if knob.side is not None:  # ... of the swept side; the other keeps the spec's value
            other = next(la for la in pair.labels if la != knob.side)
            impls = with_param(impls, knob.name, fixed, other)
    evaluated: list[Point] = []
    if knob.name in INPUT_KNOBS and not any(a.domain in SCALABLE for a in spec.args):
        raise KnobError(f"--param {knob.name}: the spec has no real-valued input to change")
    if knob.name == "scale":
        base = scaled(spec, case, 1.0 / input_magnitude(spec, case))

    def verdict_at(value: float) -> Verdict:
        if knob.name == "scale":
            ev, c = Evaluator(impls, spec, settings), scaled(spec, base, value)
        elif knob.name == "offset":
            ev, c = Evaluator(impls, spec, settings), shifted(spec, case, value)
        else:
            ev, c = Evaluator(with_param(impls, knob.name, value, knob.side), spec, settings), case
        try:
            verdict = ev.verdict(pair, ev.outcomes(c, pair.labels))
        finally:
            ev.close()
        evaluated.append(Point(value, verdict))
        return verdict

    grid = [Point(v, verdict_at(v)) for v in knob.grid(points)]
    if all(not p.verdict.compared or p.verdict.kind is Kind.BOTH_FAILED for p in grid):
        # Every call failed everywhere (a misspelt keyword, say): nothing was compared.
        raise KnobError(f"--param {knob.name}: every call failed at every point of [{knob.lo:g}, {knob.hi:g}]: {grid[0].verdict.detail}")
    boundaries = []
    for a, b in zip(grid, grid[1:]):
        if bool(a.verdict.kind) == bool(b.verdict.kind):
            continue
        agree, diverge = (a, b) if b.verdict.kind else (b, a)
        lo, hi = bisect(lambda v: bool(verdict_at(v).kind), agree.value, diverge.value, log=knob.log)
        assert diverge.verdict.kind is not None  # the diverging end of the bracket has a kind
        boundaries.append(Boundary(lo, hi, diverge.verdict.kind, (a.value, b.value)))
    ordered = tuple(sorted(evaluated, key=lambda p: p.value))
    return SweepResult(pair, knob, tuple(grid), tuple(boundaries), len(evaluated), case, ordered)


def switches(points: Sequence[Point]) -> int:
    """How often agreement changes along ``points`` (in knob order)."""
    states = [bool(p.verdict.kind) for p in points]
    return sum(a != b for a, b in zip(states, states[1:]))


def with_param(impls: Sequence[Implementation], name: str, value: float, side: str | None = None) -> list[Implementation]:
    """Each implementation (or only the one labelled ``side``) with ``name=value``: a factory
    keyword where the reference is a factory call (``SamplesLoss(blur=...)``), else a
    keyword on every call."""
    out = []
    for impl in impls:
        if side is not None and impl.label != side:
            out.append(impl)
        elif impl.ref.call is not None:
            out.append(load_implementation(impl.ref.with_kwargs(**{name: value})))
        else:
            out.append(Implementation(impl.ref, functools.partial(impl.fn, **{name: value})))
    return out
