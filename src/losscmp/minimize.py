"""Minimisation: the smallest input that still shows the *same* divergence.

Like Hypothesis' shrinker, this is a set of small named passes over one
representation — the concrete :class:`~losscmp.generate.Case` — each obviously
correct on its own, because each only ever replaces the current case by a candidate
that the predicate confirmed still diverges (same pair, same kind):

* ``shrink_dim``: delta debugging along one symbolic dim, removing the same indices
  from every argument that shares the dim.  It first tries the minimum size outright
  (a dim that does not matter costs one evaluation), then keeps halves, then drops
  chunks (ddmin).  A single culprit among N costs about 1.5·log2(N) evaluations.
* ``simplify_values``: per argument, try zeros, integers, then 1-3 significant digits.
* ``scale_threshold``: bisect the input scale between agreeing and diverging, to 1%.

Domains stay valid throughout: simplex weights are renormalised, labels are remapped
into the remaining classes, unit vectors renormalised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from .compare import Verdict
from .findings import Pair
from .generate import Case, _with_layout, renormalise
from .spec import Spec

SCALABLE = ("real", "logits", "positive")


@dataclass(frozen=True)
class Threshold:
    """Where along a knob agreement turns into divergence: between two tested points."""

    knob: str
    agree_at: float
    diverge_at: float

    @property
    def value(self) -> float:
        return bracket_middle(self.agree_at, self.diverge_at)

    def describe(self) -> str:
        side = "above" if self.diverge_at > self.agree_at else "below"
        lo, hi = sorted((self.agree_at, self.diverge_at))
        return f"agree at {self.knob} = {self.agree_at:.4g}, diverge at {self.diverge_at:.4g} (threshold {self.value:.4g}, in [{lo:.4g}, {hi:.4g}]; diverges {side})"


@dataclass(frozen=True, eq=False)
class Minimized:
    case: Case
    original_sizes: dict[str, int]
    evaluations: int
    verdict: Verdict | None
    steps: tuple[str, ...]
    threshold: Threshold | None = None

    @property
    def sizes(self) -> dict[str, int]:
        return self.case.sizes


Predicate = Callable[[Case], bool]


# --- domain-preserving edits --------------------------------------------------------

def take(spec: Spec, case: Case, dim: str, keep: Sequence[int]) -> Case:
    """Keep only indices ``keep`` along ``dim`` in every argument that uses it."""
    keep_t = torch.as_tensor(list(keep), dtype=torch.long)
    tensors = {}
    for arg in spec.args:
        t = case.tensors[arg.name]
        axes = [i for i, d in enumerate(arg.dims) if d == dim]
        for axis in axes:
            t = t.index_select(axis, keep_t.to(t.device))
        if arg.domain == "labels" and arg.classes == dim:
            # Labels of removed classes move to the nearest remaining class.
            kept = keep_t.to(t.device)
            t = torch.searchsorted(kept, t.contiguous()).clamp_(max=len(keep) - 1)
        elif axes and arg.domain in ("simplex", "sphere") and t.ndim and (t.ndim - 1) in axes:
            t = renormalise(t, arg.domain)
        tensors[arg.name] = _relayout(t, case)
    sizes = dict(case.sizes)
    sizes[dim] = len(keep)
    return replace(case, tensors=tensors, sizes=sizes)


def _relayout(t: torch.Tensor, case: Case) -> torch.Tensor:
    return _with_layout(t.contiguous(), case.recipe.layout) if case.recipe else t


def map_values(spec: Spec, case: Case, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Case:
    tensors = dict(case.tensors)
    tensors[name] = _relayout(fn(tensors[name]), case)
    return replace(case, tensors=tensors)


def scaled(spec: Spec, case: Case, factor: float) -> Case:
    """Multiply every real-valued argument by ``factor``."""
    tensors = {
        a.name: (_relayout(case.tensors[a.name] * factor, case) if a.domain in SCALABLE else case.tensors[a.name])
        for a in spec.args
    }
    return replace(case, tensors=tensors)


def shifted(spec: Spec, case: Case, offset: float) -> Case:
    """Add ``offset`` to every real-valued argument (where cancellation bites)."""
    tensors = {
        a.name: (_relayout(case.tensors[a.name] + offset, case) if a.domain in ("real", "logits") else case.tensors[a.name])
        for a in spec.args
    }
    return replace(case, tensors=tensors)


def input_magnitude(spec: Spec, case: Case) -> float:
    """Largest |element| over the scalable arguments (what 'scale' thresholds refer to)."""
    mags = [float(case.tensors[a.name].abs().max()) for a in spec.args if a.domain in SCALABLE and case.tensors[a.name].numel()]
    return max(mags, default=0.0)


def round_significant(t: torch.Tensor, digits: int) -> torch.Tensor:
    nonzero = t != 0
    exponent = torch.floor(torch.log10(torch.where(nonzero, t.abs(), torch.ones_like(t))))
    step = torch.pow(torch.tensor(10.0, dtype=t.dtype, device=t.device), exponent - (digits - 1))
    return torch.where(nonzero & torch.isfinite(t), torch.round(t / step) * step, t)


# --- passes -------------------------------------------------------------------------

def ddmin(items: list[int], test: Callable[[list[int]], bool], min_len: int) -> list[int]:
    """Delta debugging (Zeller): a small subset of ``items`` for which ``test`` holds."""
    if len(items) > min_len and test(items[:min_len]):
        return items[:min_len]
    n = 2
    while len(items) > max(min_len, 1):
        chunk = math.ceil(len(items) / n)
        parts = [items[i : i + chunk] for i in range(0, len(items), chunk)]
        for part in parts:
            if len(part) >= min_len and test(part):
                items, n = part, 2
                break
        else:
            for i in range(len(parts)) if n > 2 else ():
                rest = [x for j, p in enumerate(parts) if j != i for x in p]
                if len(rest) >= min_len and test(rest):
                    items, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(items):
                    break
                n = min(len(items), 2 * n)
    return items


def shrink_dim(spec: Spec, case: Case, dim: str, holds: Predicate) -> Case:
    lo, _ = spec.size_range(dim)
    # ddmin works on indices into the case as it came in.
    kept = ddmin(list(range(case.sizes[dim])), lambda keep: holds(take(spec, case, dim, keep)), lo)
    return take(spec, case, dim, kept) if len(kept) != case.sizes[dim] else case


def simplify_values(spec: Spec, case: Case, holds: Predicate) -> tuple[Case, list[str]]:
    done = []
    for arg in spec.args:
        # Not 'unit': rounding 0.97 to one digit gives 1.0, outside the open interval (0, 1).
        if arg.domain not in ("real", "logits", "positive", "image"):
            continue
        simplifications: list[tuple[str, Callable]] = []
        if arg.domain in ("real", "logits"):
            simplifications += [("zeros", torch.zeros_like), ("integers", torch.round)]
        simplifications += [(f"{k} significant digit{'s' if k > 1 else ''}", lambda t, k=k: round_significant(t, k)) for k in (1, 2, 3)]
        for name, fn in simplifications:
            candidate = map_values(spec, case, arg.name, fn)
            if torch.equal(candidate.tensors[arg.name], case.tensors[arg.name]):
                break  # already as simple as this (and so as every later, finer) step
            if holds(candidate):
                case = candidate
                done.append(f"{arg.name} -> {name}")
                break
    return case, done


def bracket_middle(a: float, b: float) -> float:
    """Where a bracket's threshold is reported: geometric middle of positive bounds, else arithmetic."""
    return math.sqrt(a * b) if a > 0 and b > 0 else (a + b) / 2


def bisect(diverges: Callable[[float], bool], agree_at: float, diverge_at: float, rel: float = 0.01, log: bool = True) -> tuple[float, float]:
    """Narrow a bracket [agree_at, diverge_at] (either order) until it is within ``rel``."""
    a, d = agree_at, diverge_at
    for _ in range(200):
        if log and a > 0 and d > 0:
            if max(a, d) / min(a, d) <= 1 + rel:
                break
            mid = math.sqrt(a * d)
        else:
            if abs(d - a) <= rel * max(abs(a), abs(d)):
                break
            mid = (a + d) / 2
        if mid in (a, d):
            break
        if diverges(mid):
            d = mid
        else:
            a = mid
    return a, d


def scale_threshold(spec: Spec, case: Case, holds: Predicate, floor: float = 1e-6) -> Threshold | None:
    """Find the input magnitude below which the implementations agree again.

    One check at a tiny scale (largest |input| = ``floor``), then bisection in log
    space: about log2(ln(range) / 0.01) evaluations, ~14 even from 1e30 down to 1e-6.
    """
    magnitude = input_magnitude(spec, case)
    if not magnitude or not math.isfinite(magnitude):
        return None
    low = min(0.5, floor / magnitude)
    if holds(scaled(spec, case, low)):
        return None  # diverges at every scale: not a threshold effect
    agree, diverge = bisect(lambda f: holds(scaled(spec, case, f)), low, 1.0)
    return Threshold("max |input|", agree * magnitude, diverge * magnitude)


def minimize(ev, divergence) -> Minimized:
    """Run the passes on a divergence found by :func:`losscmp.audit.audit`."""
    spec = ev.spec
    subject, kind = divergence.subject, divergence.kind
    start = ev.evaluations

    def holds(case: Case) -> bool:
        return ev.still_diverges(subject, kind, case)

    case = divergence.case
    steps = []
    for _round in range(3):  # until no dim shrinks any more
        before = dict(case.sizes)
        for dim in sorted(spec.dims, key=lambda d: -case.sizes[d]):
            n0, used = case.sizes[dim], ev.evaluations
            case = shrink_dim(spec, case, dim, holds)
            if case.sizes[dim] != n0:
                steps.append(f"shrink {dim}: {n0} -> {case.sizes[dim]} ({ev.evaluations - used} evaluations)")
        if case.sizes == before:
            break
    used = ev.evaluations
    case, simplified = simplify_values(spec, case, holds)
    if simplified:
        steps.append(f"simplify values: {', '.join(simplified)} ({ev.evaluations - used} evaluations)")
    threshold = None
    if isinstance(subject, Pair):
        used = ev.evaluations
        threshold = scale_threshold(spec, case, holds)
        if threshold:
            steps.append(f"bisect input scale: threshold {threshold.value:.4g} ({ev.evaluations - used} evaluations)")
    final = ev.judge(subject, case)
    note = "minimised" if case.sizes != divergence.case.sizes or simplified else ""
    case = replace(case, note=note)
    return Minimized(case, dict(divergence.case.sizes), ev.evaluations - start, final, tuple(steps), threshold)
