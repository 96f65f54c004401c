"""Minimisation: the smallest, simplest input that still shows the *same* divergence.

Shaped like Hypothesis' shrinker: small named passes over one representation -- the
concrete :class:`~losscmp.generate.Case` -- run to a fixed point behind one gate.  A
pass proposes candidates; the gate (:class:`Shrinker`) answers from its cache of
tried candidates, refuses a candidate that leaves an argument's domain without
calling anything, and otherwise asks the predicate (same subject, same kind).  So each
pass is obviously correct on its own, and a candidate is never evaluated twice.

* ``shrink_dims``: delta debugging along each symbolic dim, removing the same indices
  from every argument that shares the dim.  The minimum size first (a dim that does not
  matter costs one evaluation), then optimistic halving (group testing: a half that
  fails sends the search into the other half untested, so one culprit among N costs
  about log2(N) + 1 evaluations), then ddmin from the last confirmed set.
* ``simplify_args``: per argument, the domain's simpler forms (zeros, integers, 1-3
  significant digits; uniform rows; class 0), simplest first.
* ``scale_threshold``: bisect the input scale between agreeing and diverging, to 1%.
* ``toward_threshold``: move the input down to the simplest magnitude just past the
  threshold -- the smallest diverging integer (softplus: 89, not 1e30), else the
  fewest significant digits.
* ``simplify_elements``: on small cases, each element on its own: 0, an integer,
  fewer significant digits (the far point: ``x = [[101]]``, ``y = [[0]]``).

What each domain allows (and how it is renormalised) comes from
:data:`losscmp.domains.DOMAINS`; per-pass statistics come back in ``Minimized.passes``.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from .compare import Verdict
from .display import largest_element_of
from .domains import DOMAINS
from .findings import Kind, Pair
from .generate import Case, with_layout
from .model import Step, StepKind
from .spec import Spec

ELEMENT_LIMIT = 16  # simplify element by element only on cases this small
MAX_ROUNDS = 4


@dataclass(frozen=True)
class Threshold:
    """Where along a knob agreement turns into divergence: between two tested points."""

    knob: str
    agree_at: float
    diverge_at: float
    # Where the finding is gone but the sides still differ in another way (a focal loss whose
    # log(softmax) is -inf from a logit gap of 104 differs in value from 87 on): the kind of
    # finding the sides still show at ``agree_at`` ("value"), and the finding's own kind.
    # Empty: they agree there.
    still: str = ""
    finding: str = ""  # the finding, with the component its mechanism is about: "nonfinite (value)"
    still_what: str = ""  # what still differs at ``agree_at``, with its component: "nonfinite (gradient w.r.t. input)"

    @property
    def value(self) -> float:
        return bracket_middle(self.agree_at, self.diverge_at)

    def describe(self) -> str:
        side = "above" if self.diverge_at > self.agree_at else "below"
        lo, hi = sorted((self.agree_at, self.diverge_at))
        where = f"(threshold {self.value:.4g}, in [{lo:.4g}, {hi:.4g}]; diverges {side})"
        if self.still:
            return (f"no {self.finding} finding at {self.knob} = {self.agree_at:.4g} (the sides still differ there: "
                    f"{self.still_what or self.still}), {self.finding} at {self.diverge_at:.4g} {where}")
        return f"agree at {self.knob} = {self.agree_at:.4g}, diverge at {self.diverge_at:.4g} {where}"


@dataclass(frozen=True)
class PassStats:
    """How a pass fared: candidates it evaluated, kept, and got from the cache for free."""

    name: str
    evaluations: int = 0
    kept: int = 0
    cached: int = 0
    refused: int = 0  # candidates outside an argument's domain, never evaluated

    def describe(self) -> str:
        return f"{self.name}: {self.evaluations} evaluations, {self.kept} kept, {self.cached} cached, {self.refused} refused"


@dataclass(frozen=True, eq=False)
class Minimized:
    case: Case
    original_sizes: dict[str, int]
    evaluations: int
    verdict: Verdict | None
    steps: tuple[Step, ...]
    threshold: Threshold | None = None
    passes: tuple[PassStats, ...] = field(default=())

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
        renormalise = DOMAINS[arg.domain].renormalise
        if arg.domain == "labels" and arg.classes == dim:
            # Labels of removed classes move to the nearest remaining class.
            kept = keep_t.to(t.device)
            t = torch.searchsorted(kept, t.contiguous()).clamp_(max=len(keep) - 1)
        elif axes and renormalise is not None and t.ndim and (t.ndim - 1) in axes:
            t = renormalise(t)
        tensors[arg.name] = _relayout(t, case)
    sizes = dict(case.sizes)
    sizes[dim] = len(keep)
    return replace(case, tensors=tensors, sizes=sizes)


def _relayout(t: torch.Tensor, case: Case) -> torch.Tensor:
    return with_layout(t.contiguous(), case.recipe.layout) if case.recipe else t


def map_values(spec: Spec, case: Case, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Case:
    tensors = dict(case.tensors)
    tensors[name] = _relayout(fn(tensors[name]), case)
    return replace(case, tensors=tensors)


def _map_domain(spec: Spec, case: Case, which: Callable, fn: Callable[[torch.Tensor], torch.Tensor]) -> Case:
    tensors = {}
    for a in spec.args:
        t = case.tensors[a.name]
        domain = DOMAINS[a.domain]
        tensors[a.name] = _relayout(domain.legalise(fn(t)), case) if which(domain) else t
    return replace(case, tensors=tensors)


def scaled(spec: Spec, case: Case, factor: float) -> Case:
    """Multiply every argument whose domain scales (real, logits, positive) by ``factor``."""
    return _map_domain(spec, case, lambda d: d.scalable, lambda t: t * factor)


def shifted(spec: Spec, case: Case, offset: float) -> Case:
    """Add ``offset`` to every argument whose domain shifts (real, logits): where cancellation bites."""
    return _map_domain(spec, case, lambda d: d.shiftable, lambda t: t + offset)


def scaled_args(spec: Spec) -> tuple[str, ...]:
    """The arguments a scale threshold scales (their domain scales)."""
    return tuple(a.name for a in spec.args if DOMAINS[a.domain].scalable)


def scale_knob(spec: Spec) -> str:
    """What a scale threshold is a threshold *of*, named by argument: "max |input|" read as
    the argument called ``input`` (a huber example with input = [0], target = [1] printed
    "below max |input| 0.0063"), and says nothing of which arguments were scaled."""
    return largest_element_of(scaled_args(spec))


def input_magnitude(spec: Spec, case: Case) -> float:
    """Largest |element| over the scalable arguments (what 'scale' thresholds refer to)."""
    mags = [float(case.tensors[a.name].abs().max()) for a in spec.args if DOMAINS[a.domain].scalable and case.tensors[a.name].numel()]
    return max(mags, default=0.0)


def with_magnitude(spec: Spec, case: Case, target: float) -> Case:
    """Scale so that the largest |element| is exactly ``target`` (no rounding error on it)."""
    current = input_magnitude(spec, case)
    factor = target / current

    def fn(t: torch.Tensor) -> torch.Tensor:
        out = t * factor
        return torch.where(t.abs() == current, torch.sign(t) * target, out)

    return _map_domain(spec, case, lambda d: d.scalable, fn)


def legal(spec: Spec, case: Case) -> bool:
    """Every argument inside its domain (as the working dtype represents it)."""
    for a in spec.args:
        classes = case.sizes.get(a.classes) if a.classes else None
        if not DOMAINS[a.domain].legal(case.tensors[a.name], classes):
            return False
    return True


# --- the gate -----------------------------------------------------------------------

def case_key(case: Case) -> tuple:
    """Identity of a case's values: the same tensors (bits, shapes, dtypes) give the same key."""
    parts = []
    for name, t in sorted(case.tensors.items()):
        data = t.detach().cpu()
        if data.dtype == torch.bfloat16:  # numpy has no bfloat16; same bits as int16
            data = data.view(torch.int16)
        digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()
        parts.append((name, tuple(t.shape), str(t.dtype), digest))
    return tuple(parts), tuple(sorted((k, repr(v)) for k, v in case.params.items()))


class Shrinker:
    """The one gate every candidate goes through: cache, domain check, predicate.

    ``stable``, when given, is asked of every candidate that value passes adopt: the
    divergence must survive a tiny perturbation of the inputs (it is not an artefact of
    a kink, a tie or a domain edge).  ``holds_plain`` skips it (dimension shrinking and
    the scale bisection check stability once on their result instead).
    """

    def __init__(self, spec: Spec, case: Case, predicate: Predicate, stable: Callable[[Case, Predicate], bool] | None = None):
        self.spec, self.case, self.predicate, self.stable = spec, case, predicate, stable
        self.cache: dict[tuple, bool] = {case_key(case): True}
        self.stable_cache: dict[tuple, bool] = {}
        self.stats: dict[str, dict[str, int]] = {}
        self.steps: list[Step] = []
        self.current = "?"

    def count(self, what: str, name: str | None = None) -> int:
        return self.stats.setdefault(name or self.current, dict.fromkeys(("evaluations", "kept", "cached", "refused"), 0))[what]

    def bump(self, what: str) -> None:
        self.count(what)
        self.stats[self.current][what] += 1

    def pass_stats(self) -> tuple[PassStats, ...]:
        return tuple(PassStats(name, **counts) for name, counts in self.stats.items())

    def holds_plain(self, candidate: Case) -> bool:
        key = case_key(candidate)
        if key in self.cache:
            self.bump("cached")
            return self.cache[key]
        if not legal(self.spec, candidate) or subnormals(candidate) > subnormals(self.case):
            self.bump("refused")  # outside a domain, or onto denormals: never the example to read
            self.cache[key] = False
            return False
        self.bump("evaluations")
        result = self.cache[key] = bool(self.predicate(candidate))
        return result

    def is_stable(self, candidate: Case) -> bool:
        if self.stable is None:
            return True
        key = case_key(candidate)
        if key not in self.stable_cache:
            self.stable_cache[key] = bool(self.stable(candidate, self.counted))
        return self.stable_cache[key]

    def counted(self, candidate: Case) -> bool:
        """The predicate, uncached, counted as an evaluation (the nudged copies of a candidate)."""
        self.bump("evaluations")
        return bool(self.predicate(candidate))

    def holds(self, candidate: Case) -> bool:
        return self.holds_plain(candidate) and self.is_stable(candidate)

    def consider(self, candidate: Case) -> bool:
        """Adopt ``candidate`` if it still diverges (and, where asked, stably)."""
        if self.holds(candidate):
            if case_key(candidate) != case_key(self.case):
                self.case = candidate
                self.bump("kept")
            return True
        return False

    def run(self, name: str, fn: Callable[[Shrinker], bool]) -> bool:
        self.current = name
        return fn(self)

    def fixate(self, passes: Sequence[tuple[str, Callable[[Shrinker], bool]]]) -> None:
        """Run ``passes`` in order until none changes the case (Hypothesis' fixate_shrink_passes)."""
        for _ in range(MAX_ROUNDS):
            before = case_key(self.case)
            for name, fn in passes:
                self.run(name, fn)
            if case_key(self.case) == before:
                break


def subnormals(case: Case) -> int:
    """Denormal elements: a divergence there is about the float format's edge, not the loss."""
    n = 0
    for t in case.tensors.values():
        if t.is_floating_point() and t.numel():
            tiny = torch.finfo(t.dtype).tiny
            n += int(((t != 0) & (t.abs() < tiny)).sum())
    return n


# Where a denormal the case was drawn with goes: the float format's smallest normal (or
# a larger normal magnitude), the whole case scaled up where the lift alone makes it
# agree (1 / var at var = 1e-45 overflows; at 1.2e-38 it takes |x - t| above 3 as well),
# or the other arguments alone (t / rate at rate = 1e-45, t = 1 overflows; at 1.2e-38 it
# takes t >= 5: the counts scale, the rate must not).
LIFTS = (1.0, 1e16)
LIFT_SCALES = (1.0, 1e2, 1e4, 1e8)


def others_scaled(spec: Spec, case: Case, name: str, factor: float) -> Case:
    """Every floating argument but ``name`` multiplied by ``factor``, where its domain still
    holds the result (real, positive, counts; not 0/1 masks or probabilities)."""
    tensors = dict(case.tensors)
    for a in spec.args:
        t = case.tensors[a.name]
        if a.name == name or not t.is_floating_point():
            continue
        moved = t * factor
        classes = case.sizes.get(a.classes) if a.classes else None
        if bool(torch.isfinite(moved).all()) and DOMAINS[a.domain].legal(moved, classes):
            tensors[a.name] = _relayout(moved, case)
    return replace(case, tensors=tensors)


def lift_denormals(s: Shrinker) -> bool:
    """Replace each tensor's denormals by normal numbers of the same sign, if it still diverges.

    The no-new-denormals rule of :meth:`Shrinker.holds_plain` only stops candidates from
    gaining them; a case drawn with one (a planted 1e-45 variance) kept it.  Once a lift
    is adopted, that rule keeps the example off denormals from then on, and the later
    passes shrink the scale back toward the threshold."""
    changed = False
    for name, t in s.case.tensors.items():
        used = s.count("evaluations")
        if not (t.is_floating_point() and t.numel()):
            continue
        tiny = torch.finfo(t.dtype).tiny
        low = (t != 0) & (t.abs() < tiny)
        if not bool(low.any()):
            continue
        tries = [(k, f, whole) for k in LIFT_SCALES for f in LIFTS for whole in ((True, False) if k != 1 else (True,))]
        for k, factor, whole in tries:
            lifted = replace(s.case, tensors={**s.case.tensors, name: torch.where(low, torch.sign(t) * tiny * factor, t).to(t.dtype)})
            candidate = lifted if k == 1 else scaled(s.spec, lifted, k) if whole else others_scaled(s.spec, lifted, name, k)
            if (k == 1 or case_key(candidate) != case_key(lifted)) and s.consider(candidate):
                others = () if whole else tuple((n, f"x{k:g}") for n, v in candidate.tensors.items()
                                                if n != name and not torch.equal(v, lifted.tensors[n]))
                s.steps.append(Step(StepKind.LIFT_DENORMALS, s.count("evaluations") - used, after=tiny * factor, args=(name,),
                                    forms=others, scale=k if whole else 1.0))
                changed = True
                break
    return changed


PERTURBATION = 1e-3  # relative size of the nudge that a real divergence must survive


def nudged(spec: Spec, case: Case, direction: float, seed: int = 0) -> Case:
    """Every continuous argument moved by a tiny relative amount (+ or - ``direction``
    times a fixed random sign per element; an element at 0 by the same fraction of its
    argument's scale; each by 0.5..1.5 of that), then put back into its domain.  Binary, labels and counts stay."""
    g = torch.Generator().manual_seed(seed)
    tensors = dict(case.tensors)
    for a in spec.args:
        t = case.tensors[a.name]
        if a.domain in ("binary", "labels", "counts") or not t.is_floating_point() or not t.numel():
            continue
        # Random signs *and* sizes: equal elements (a tie) must not move alike.
        signs = ((torch.randint(0, 2, t.shape, generator=g) * 2 - 1) * (0.5 + torch.rand(t.shape, generator=g))).to(t.dtype).to(t.device) * direction
        finite = torch.isfinite(t)
        if not finite.any():
            continue
        scale = float(t.detach()[finite].abs().max()) or 1.0
        step = torch.where(t != 0, t.abs(), torch.full_like(t, scale)) * PERTURBATION
        moved = torch.where(finite, t.detach() + signs * step, t.detach())  # NaN and inf inputs stay as they are
        domain = DOMAINS[a.domain]
        if a.domain == "image":
            moved = moved.clamp(0, 1)
        elif a.domain == "simplex":
            moved = moved.clamp_min(0)
        if domain.renormalise is not None:
            moved = domain.renormalise(moved)
        tensors[a.name] = _relayout(domain.legalise(moved), case)
    return replace(case, tensors=tensors)


def survives_nudges(spec: Spec, case: Case, holds: Predicate) -> bool:
    """Diverges both ways of a tiny nudge (off kinks, ties and domain edges)."""
    return holds(nudged(spec, case, 1.0)) and holds(nudged(spec, case, -1.0))


def class_floor(spec: Spec, dim: str, size: int) -> int:
    """2 for a class axis of logits (dim 1, torch's N C ...) or of simplex rows (the last):
    softmax over one class is a constant, so C = 1 shows another loss altogether."""
    if size < 2:
        return 1
    for a in spec.args:
        if (a.domain == "logits" and len(a.dims) >= 2 and a.dims[1] == dim) or (a.domain == "simplex" and a.dims and a.dims[-1] == dim):
            return 2
    return 1


# --- passes -------------------------------------------------------------------------

def ddmin(items: list[int], test: Callable[[list[int]], bool], min_len: int) -> list[int]:
    """A small subset of ``items`` for which ``test`` holds: group testing, then delta debugging (Zeller)."""
    if len(items) > min_len and test(items[:min_len]):
        return items[:min_len]
    if min_len > 1 and len(items) > min_len and test(items[-min_len:]):
        return items[-min_len:]  # the other end (image rows: the structure is at the far edge)
    items = _halve(items, test, max(min_len, 1))
    # Only complements of at least min_len items can hold: start at chunks no larger than that.
    n = max(2, math.ceil(len(items) / max(len(items) - min_len, 1))) if len(items) > min_len else 2
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


def _halve(items: list[int], test: Callable[[list[int]], bool], min_len: int) -> list[int]:
    """Optimistic binary search for one culprit: a failing first half sends us into the
    second half *without* testing it.  Returns the smallest set confirmed to hold."""
    confirmed, current = items, items
    while len(current) >= 2 * min_len:
        first, second = current[: len(current) // 2], current[len(current) // 2 :]
        if test(first):
            confirmed = current = first
        else:
            current = second
    if current is not confirmed and test(current):
        confirmed = current
    return confirmed


def shrink_dim(spec: Spec, case: Case, dim: str, holds: Predicate) -> Case:
    lo = max(spec.size_range(dim)[0], class_floor(spec, dim, case.sizes[dim]))
    # ddmin works on indices into the case as it came in.
    kept = ddmin(list(range(case.sizes[dim])), lambda keep: holds(take(spec, case, dim, keep)), lo)
    return take(spec, case, dim, kept) if len(kept) != case.sizes[dim] else case


def shrink_dims(s: Shrinker) -> bool:
    """Each dim in turn, largest first.  Removing elements changes no value, so a fragile
    result (one that a nudge makes agree: the kept elements sit on a kink) is rare: the
    dims are shrunk without the nudge check, which is asked once of the result; only if
    it fails are they shrunk again with it."""
    start, steps = s.case, len(s.steps)
    if _shrink_each_dim(s, s.holds_plain) and not s.is_stable(s.case):
        s.case, s.steps[steps:] = start, []
        _shrink_each_dim(s, s.holds)
    return case_key(s.case) != case_key(start)


def _shrink_each_dim(s: Shrinker, holds: Predicate) -> bool:
    changed = False
    for dim in sorted(s.spec.dims, key=lambda d: -s.case.sizes[d]):
        n0, used = s.case.sizes[dim], s.count("evaluations")
        smaller = shrink_dim(s.spec, s.case, dim, holds)
        if smaller.sizes[dim] != n0 and holds(smaller):  # cached: shrink_dim saw it hold
            s.case = smaller
            s.bump("kept")
            s.steps.append(Step(StepKind.SHRINK, s.count("evaluations") - used, dim=dim, before=n0, after=smaller.sizes[dim]))
            changed = True
    return changed


def _candidates(domain_name: str) -> tuple:
    return DOMAINS[domain_name].simplify


def simplify_args(s: Shrinker) -> bool:
    """Per argument, the simplest form its domain offers that still diverges."""
    done, used = [], s.count("evaluations")
    for arg in s.spec.args:
        for name, fn in _candidates(arg.domain):
            candidate = map_values(s.spec, s.case, arg.name, fn)
            if torch.equal(candidate.tensors[arg.name], s.case.tensors[arg.name]):
                break  # already as simple as this (and so as every later, finer) step
            if s.consider(candidate):
                done.append((arg.name, name))
                break
    if done:
        s.steps.append(Step(StepKind.SIMPLIFY_VALUES, s.count("evaluations") - used, forms=tuple(done)))
    return bool(done)


def simplify_values(spec: Spec, case: Case, holds: Predicate) -> tuple[Case, list[str]]:
    """One ``simplify_args`` pass with a bare predicate (kept for direct use)."""
    s = Shrinker(spec, case, holds)
    s.current = "simplify_args"
    simplify_args(s)
    return s.case, [f"{arg} -> {form}" for step in s.steps for arg, form in step.forms]


def simplicity(v: float) -> tuple:
    """Hypothesis' order on numbers: integers first, smaller first; then fewer significant
    digits; positive before negative.  A candidate replaces ``v`` only if it sorts before it."""
    if not math.isfinite(v):
        return (2, math.inf, math.inf, 0)
    if v == int(v) and abs(v) < 2**53:
        return (0, abs(v), 0, v < 0 or math.copysign(1, v) < 0)
    digits = len(f"{abs(v):.17g}".split("e")[0].replace(".", "").strip("0"))
    for k in range(1, 18):  # the shortest decimal that reads back as v
        if float(f"{v:.{k}g}") == v:
            digits = k
            break
    return (1, digits, abs(v), v < 0)


def _element_values(v: float, domain_name: str) -> list[float]:
    """Simpler values for one element, simplest first (Hypothesis: 0, small integers, short decimals)."""
    names = {n for n, _ in DOMAINS[domain_name].simplify}
    out: list[float] = []
    if "zeros" in names:
        out.append(0.0)
    if "integers" in names and math.isfinite(v):
        out += [math.copysign(1.0, v), float(round(v)), math.copysign(math.ceil(abs(v)), v)]
    for k in (1, 2, 3):
        if f"{k} significant digit{'s' if k > 1 else ''}" in names and v != 0 and math.isfinite(v):
            out += [float(f"{v:.{k}g}"), _away(v, k)]
    key = simplicity(v)
    # Never across zero: a logit of -16554 and one of +89 overflow through different ops.
    out = sorted({x for x in out if simplicity(x) < key and (x == 0 or (x < 0) == (v < 0))}, key=simplicity)
    return out


def _away(v: float, k: int) -> float:
    """``v`` rounded to ``k`` significant digits away from zero (just past a threshold)."""
    e = math.floor(math.log10(abs(v))) - (k - 1)
    step = 10.0**e
    return math.copysign(math.ceil(abs(v) / step) * step, v)


def simplify_elements(s: Shrinker) -> bool:
    """Element by element on small cases: each to the simplest value that keeps the divergence."""
    if s.case.numel() > ELEMENT_LIMIT:
        return False
    changed, used = [], s.count("evaluations")
    for arg in s.spec.args:
        domain = DOMAINS[arg.domain]
        if not domain.is_float or domain.renormalise is not None or not domain.simplify:
            continue
        for i in range(s.case.tensors[arg.name].numel()):
            v = float(s.case.tensors[arg.name].reshape(-1)[i])
            for value in _element_values(v, arg.domain):
                def put(t: torch.Tensor, i=i, value=value) -> torch.Tensor:
                    t = t.detach().clone().contiguous()
                    t.view(-1)[i] = value
                    return t

                if s.consider(map_values(s.spec, s.case, arg.name, put)):
                    changed.append(arg.name)
                    break
    if changed:
        s.steps.append(Step(StepKind.SIMPLIFY_ELEMENTS, s.count("evaluations") - used, args=tuple(dict.fromkeys(changed))))
    return bool(changed)


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
    # Never below the scale that makes an element denormal: the gate refuses those cases,
    # and a refusal read as "agree" put a threshold ("agree at 1.17e-38") where the sides
    # still differ (PoissonNLLLoss at rate 2e-38: t / rate overflows at any smaller rate).
    low = max(min(0.5, floor / magnitude), denormal_edge(spec, case))
    if low >= 1.0 or holds(scaled(spec, case, low)):
        return None  # diverges at every scale: not a threshold effect
    agree, diverge = bisect(lambda f: holds(scaled(spec, case, f)), low, 1.0)
    return Threshold(scale_knob(spec), agree * magnitude, diverge * magnitude)


def denormal_edge(spec: Spec, case: Case) -> float:
    """The smallest scale factor that keeps every nonzero element of the scaled arguments a
    normal number (0 when none is nonzero)."""
    edge = 0.0
    for name in scaled_args(spec):
        t = case.tensors[name]
        nonzero = t.detach()[(t != 0) & torch.isfinite(t)].abs() if t.is_floating_point() else t.new_zeros(0)
        if nonzero.numel():
            edge = max(edge, torch.finfo(t.dtype).tiny / float(nonzero.min()))
    return edge


INTEGER_RANGE = 1e4  # below this, the smallest diverging integer reads best (89, 101)


def simplest_above(agree_at: float, diverge_at: float, holds: Callable[[float], bool]) -> float | None:
    """The simplest magnitude in (agree_at, ~diverge_at] that still diverges (``diverge_at`` did).

    Below 1e4 the smallest diverging integer; otherwise (or where no integer fits) the
    smallest diverging number with the fewest significant digits.  Each is a bisection
    over a grid (integers, or multiples of a power of ten) inside the bracket.
    """
    lo, hi = agree_at, diverge_at
    if not (0 < hi and math.isfinite(hi)):
        return None
    if 0.5 <= hi < INTEGER_RANGE:
        found = _smallest_on_grid(lo, hi, 1.0, hi + 1, holds)
        if found is not None:
            return found
    top = math.floor(math.log10(hi))
    for k in (1, 2, 3, 4):
        found = _smallest_on_grid(lo, hi, 10.0 ** (top - (k - 1)), hi * 1.1, holds)
        if found is not None:
            return found
    return None


def _smallest_on_grid(lo: float, hi: float, step: float, limit: float, holds: Callable[[float], bool]) -> float | None:
    """Smallest multiple of ``step`` above ``lo`` that diverges, if the first one at or past
    ``hi`` does (and stays within ``limit``); a bisection over the multiples in between."""
    first, last = math.floor(lo / step) + 1, math.ceil(hi / step)
    clean = lambda i: float(f"{i * step:.12g}")  # noqa: E731 - 3 * 1e-5 is 3.0000000000000004e-05
    if first > last or clean(last) > limit or not holds(clean(last)):
        return None
    while first < last:  # invariant: last diverges; below first nothing was seen to diverge
        mid = (first + last) // 2
        if holds(clean(mid)):
            last = mid
        else:
            first = mid + 1
    return clean(last)


def toward_threshold(s: Shrinker, threshold: Threshold) -> bool:
    """Bring the input down to the simplest magnitude just past the threshold."""
    magnitude = input_magnitude(s.spec, s.case)
    lo, hi = threshold.agree_at, min(threshold.diverge_at, magnitude)
    target = simplest_above(lo, hi, lambda m: s.holds(with_magnitude(s.spec, s.case, m)))
    if target is None or target >= magnitude:
        return False
    if s.consider(with_magnitude(s.spec, s.case, target)):
        s.steps.append(Step(StepKind.TOWARD_THRESHOLD, s.count("evaluations"), before=magnitude, after=target,
                            args=scaled_args(s.spec)))
        return True
    return False


def mechanism(v: Verdict) -> tuple:
    """What a smaller example must keep of a divergence: its kind, the component its
    detail shows (the value, or the gradient w.r.t. one input) and, for a non-finite
    finding, which non-finite number each side has there (inf is not NaN)."""
    if not v.diffs or v.kind not in (Kind.VALUE, Kind.GRADIENT, Kind.NONFINITE):
        return (v.kind,)
    if v.kind is Kind.NONFINITE:
        d = next((d for d in v.diffs if d.nonfinite_mismatch), v.diffs[0])
        return (v.kind, d.what, _finiteness(d.expected), _finiteness(d.actual))
    shown = v.diffs[0] if v.kind is Kind.VALUE else max(v.diffs, key=lambda d: d.score)
    return (v.kind, shown.what)


def _words(mech: tuple) -> str:
    """A mechanism as a threshold line names it: "value", "gradient w.r.t. x", "nonfinite
    (value: finite against nan)".  A non-finite one says which numbers the two sides have
    (expected first): "no nonfinite (value) finding at 1.84e19 (the sides still differ there:
    nonfinite (value))" contradicted itself where NaN below turns -inf."""
    if len(mech) == 1:
        return mech[0].value
    if mech[0] in (Kind.VALUE, Kind.GRADIENT):
        return mech[1]
    numbers = f": {mech[2]} against {mech[3]}" if len(mech) == 4 else ""
    return f"{mech[0].value} ({mech[1]}{numbers})"


def _finiteness(x: float) -> str:
    return "nan" if math.isnan(x) else "+inf" if x == math.inf else "-inf" if x == -math.inf else "finite"


def _keeps(mech: tuple, v: Verdict) -> bool:
    if v.kind != mech[0]:
        return False
    if len(mech) == 1:
        return True
    d = next((d for d in v.diffs if d.what == mech[1]), None)
    if d is None:
        return False
    if mech[0] is Kind.NONFINITE:
        return bool(d.nonfinite_mismatch) and (_finiteness(d.expected), _finiteness(d.actual)) == mech[2:]
    return d.score > 1


def minimize(ev, divergence, keep: Callable[[Case], bool] | None = None) -> Minimized:
    """Run the passes on a divergence found by :func:`losscmp.audit.audit`.

    A candidate counts only if it keeps the divergence's mechanism (:func:`mechanism`:
    same subject, kind, component, non-finite numbers) and, when given,
    ``keep(candidate)`` (the explain stage keeps the float64 verdict, so that one cause
    is not minimised into another).  Where the divergence survives a tiny nudge of its
    inputs, so must every smaller example (it sits off kinks, ties and domain edges), and
    no example gains denormal numbers.  The scale threshold is measured on the final
    example, so "agree at" is true of the example shown."""
    spec = ev.spec
    subject, kind = divergence.subject, divergence.kind
    start = ev.evaluations
    mech = mechanism(divergence.verdict) if divergence.verdict is not None and divergence.verdict.kind == kind else (kind,)

    def holds(case: Case) -> bool:
        return _keeps(mech, ev.judge(subject, case)) and (keep is None or keep(case))

    s = Shrinker(spec, divergence.case, holds)
    s.current = "nudge"
    if isinstance(subject, Pair) and survives_nudges(spec, divergence.case, s.counted):
        s.stable = lambda case, counted: survives_nudges(spec, case, counted)
    s.run("lift_denormals", lift_denormals)
    s.fixate([("shrink_dims", shrink_dims), ("simplify_args", simplify_args)])
    threshold = None
    if isinstance(subject, Pair):
        s.current = "scale_threshold"
        used = ev.evaluations
        threshold = scale_threshold(spec, s.case, s.holds_plain)
        if threshold:
            s.steps.append(Step(StepKind.BISECT_SCALE, ev.evaluations - used, threshold=threshold.value))
            found = threshold  # narrowed: the lambda below sees a Threshold
            s.run("toward_threshold", lambda sh: toward_threshold(sh, found))
    measured_on = case_key(s.case)
    s.fixate([("simplify_args", simplify_args), ("simplify_elements", simplify_elements), ("shrink_dims", shrink_dims)])
    if threshold is not None and case_key(s.case) != measured_on:
        s.current = "scale_threshold"
        used = ev.evaluations
        threshold = scale_threshold(spec, s.case, s.holds_plain)  # the example changed: say where *it* turns
        s.steps.append(Step(StepKind.REMEASURE, ev.evaluations - used, threshold=threshold.value if threshold else None))
    case = s.case
    if threshold is not None:
        # "Agree at" must be true of the example shown: a bracket measured on whether the
        # finding's mechanism holds says nothing of other differences below it.
        s.current = "scale_threshold"
        s.bump("evaluations")
        there = ev.judge(subject, scaled(spec, case, threshold.agree_at / input_magnitude(spec, case)))
        if there.kind is not None:
            threshold = replace(threshold, still=there.kind.value, finding=_words(mech), still_what=_words(mechanism(there)))
    final = ev.judge(subject, case)
    changed = case.sizes != divergence.case.sizes or case_key(case) != case_key(divergence.case)
    case = replace(case, note="minimised" if changed else "")
    return Minimized(case, dict(divergence.case.sizes), ev.evaluations - start, final, tuple(s.steps), threshold, s.pass_stats())
