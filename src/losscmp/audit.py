"""The audit: generate cases, run every implementation, compare, keep the worst.

``audit()`` is the whole pipeline behind ``losscmp A B``; the CLI and the pytest
helper only parse arguments and print.  Per (pair, kind) it keeps the worst case seen
(highest score, then fewest elements), then hands it to the minimiser.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import target

from .compare import KINDS, Tolerance, Verdict, compare_outcomes
from .generate import Case, build_case, probe_recipe, recipes
from .load import Implementation
from .run import Outcome, call, finite
from .spec import Spec


@dataclass(frozen=True)
class Settings:
    examples: int = 100
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    rtol: float | None = None
    atol: float | None = None
    reference: str | None = None
    minimize: bool = True
    save_dir: Path | None = Path("fixtures/losscmp")
    allow_nonfinite: bool = False
    max_size: int | None = None
    isolate: bool = False
    timeout: float | None = None
    pythons: tuple[tuple[str, str], ...] = ()  # (label, interpreter path): run that label under that interpreter

    @property
    def tolerance(self) -> Tolerance:
        return Tolerance.for_dtype(self.dtype, self.rtol, self.atol)


@dataclass(frozen=True, eq=False)
class Divergence:
    """The worst case of one kind of disagreement for one pair (or one implementation)."""

    pair: tuple[str, str]
    kind: str
    verdict: Verdict
    case: Case
    count: int  # cases that showed this (pair, kind)
    minimized: "object | None" = None  # minimize.Minimized
    repro: str | None = None
    repro_error: str | None = None  # why the repro could not be saved

    @property
    def score(self) -> float:
        return self.verdict.score


@dataclass(frozen=True, eq=False)
class AuditResult:
    implementations: tuple[Implementation, ...]
    spec: Spec
    settings: Settings
    cases_run: int
    divergences: tuple[Divergence, ...]
    seconds: float
    pair_cases: dict[tuple[str, str], int] = field(default_factory=dict)  # diverging cases per pair
    pairs: tuple[tuple[str, str], ...] = ()  # the pairs compared, (expected, actual)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(i.label for i in self.implementations)

    @property
    def agree(self) -> bool:
        return not self.divergences


class Evaluator:
    """Runs implementations on cases and compares them; counts every call it makes."""

    def __init__(self, impls: Sequence[Implementation], spec: Spec, settings: Settings):
        self.impls = {i.label: i for i in impls}
        if len(self.impls) != len(impls):
            raise ValueError("implementation labels must be distinct; give them with 'label=ref'")
        self.spec, self.settings, self.tol = spec, settings, settings.tolerance
        self.runner = _make_runner(settings, impls)
        self.evaluations = 0
        labels = list(self.impls)
        if settings.reference:
            if settings.reference not in self.impls:
                raise ValueError(f"--reference {settings.reference!r} is not one of {', '.join(labels)}")
            self.pairs = [(settings.reference, la) for la in labels if la != settings.reference]
        else:
            self.pairs = list(itertools.combinations(labels, 2))

    def outcome(self, label: str, case: Case) -> Outcome:
        return self.runner(self.impls[label], self.spec, case)

    def outcomes(self, case: Case, labels: Sequence[str] | None = None) -> dict[str, Outcome]:
        self.evaluations += 1
        return {la: self.outcome(la, case) for la in (labels or self.impls)}

    def verdict(self, pair: tuple[str, str], outcomes: dict[str, Outcome]) -> Verdict:
        return compare_outcomes(pair, outcomes[pair[0]], outcomes[pair[1]], self.tol)

    def judge(self, pair: tuple[str, str], case: Case) -> Verdict:
        """The verdict for ``pair`` on ``case``; a pair (a, a) asks whether ``a`` misbehaves alone."""
        if pair[0] == pair[1]:
            return self.self_verdict(pair[0], case)
        return self.verdict(pair, self.outcomes(case, pair))

    def still_diverges(self, pair: tuple[str, str], kind: str, case: Case) -> bool:
        """The minimiser's predicate: the same kind of divergence on the same pair."""
        return self.judge(pair, case).kind == kind

    def self_verdict(self, label: str, case: Case) -> Verdict:
        """Does ``label`` misbehave on its own (mutation, nondeterminism)?"""
        first, second = self.outcomes(case, [label])[label], self.outcome(label, case)
        if first.mutated:
            return mutation_verdict(label, first)
        return self.repeat_verdict(label, first, second)

    def repeat_verdict(self, label: str, first: Outcome, second: Outcome) -> Verdict:
        """Two calls of one implementation on one input: agreement, or nondeterminism."""
        v = compare_outcomes((label, label), first, second, self.tol)
        if v.kind:
            return replace(v, kind="nondeterminism", detail=f"two calls on the same input disagree: {v.detail}")
        return v

    def close(self) -> None:
        close = getattr(self.runner, "close", None)
        if close:
            close()


def mutation_verdict(label: str, outcome: Outcome) -> Verdict:
    return Verdict((label, label), "mutation", float("inf"), f"{label} modified its input(s) {', '.join(outcome.mutated)} in place")


def _make_runner(settings: Settings, impls: Sequence[Implementation] = ()) -> Callable[[Implementation, Spec, Case], Outcome]:
    if not settings.isolate and not settings.pythons:
        return lambda impl, spec, case: call(impl.fn, spec, case)
    from .isolate import IsolatedRunner, RunRecord

    # What a crash or timeout repro records: the run's implementations, tolerance and seed.
    record = RunRecord(tuple(i.ref for i in impls), settings.reference, (settings.tolerance.rtol, settings.tolerance.atol),
                       settings.seed, settings.save_dir)
    runner = IsolatedRunner(timeout=settings.timeout, record=record) if settings.isolate else None
    if settings.pythons:
        from .interpreter import InterpreterRunner

        return InterpreterRunner(dict(settings.pythons), timeout=settings.timeout, fallback=runner, record=record)
    return runner


# How far beyond its own run-to-run noise a nondeterministic implementation must
# disagree with another before the pair is blamed.
NOISE_MARGIN = 10.0


class ProbeError(ValueError):
    """The implementations cannot be run on this spec at all; the message is one line."""


def probe(ev: Evaluator) -> tuple[Case, dict[str, Outcome]]:
    """One tame case first: a non-tensor, a non-scalar, or every side raising is a usage error.

    The probe is an ordinary standard-regime case, so the audit counts it as its first.
    """
    case = build_case(ev.spec, probe_recipe(ev.spec, ev.settings.seed), dtype=ev.settings.dtype, device=ev.settings.device)
    outcomes = ev.outcomes(case)
    for label, o in outcomes.items():
        if o.status in ("non_tensor", "non_scalar"):
            raise ProbeError(f"{label} {o.error} on a probe input ({case.describe()}); is --spec right?")
    if all(o.failed for o in outcomes.values()):
        first = next(iter(outcomes.items()))
        raise ProbeError(f"every implementation failed on a probe input ({case.describe()}), e.g. {first[0]} {first[1].error}; is --spec right?")
    return case, outcomes


def audit(
    impls: Sequence[Implementation],
    spec: Spec,
    settings: Settings = Settings(),
    *,
    on_case: Callable[[int, float], None] | None = None,
) -> AuditResult:
    """Fuzz ``impls`` against each other on ``settings.examples`` cases drawn from ``spec``."""
    start = time.perf_counter()
    ev = Evaluator(impls, spec, settings)
    try:
        probe_case, probe_outcomes = probe(ev)
        worst: dict[tuple[tuple[str, str], str], Divergence] = {}
        pair_cases: dict[tuple[str, str], int] = {}
        checked_self: set[str] = set()
        noise: dict[str, float] = {}  # worst self-disagreement score seen per implementation
        n_cases = 0

        def record(v: Verdict, case: Case) -> None:
            key = (v.pair, v.kind)
            old = worst.get(key)
            count = old.count + 1 if old else 1
            if old is None or (v.score, -case.numel()) > (old.score, -old.case.numel()):
                worst[key] = Divergence(v.pair, v.kind, v, case, count)
            else:
                worst[key] = replace(old, count=count)

        def examine(case: Case, outcomes: dict[str, Outcome] | None = None) -> float:
            outcomes = outcomes or ev.outcomes(case)
            score = 0.0
            suspects: set[str] = set()
            for label, o in outcomes.items():
                if o.mutated:
                    record(mutation_verdict(label, o), case)
                if label not in checked_self:  # determinism check on the first case
                    suspects.add(label)
                    checked_self.add(label)
            verdicts = [ev.verdict(p, outcomes) for p in ev.pairs]
            for v in verdicts:
                if v.kind:
                    suspects.update(v.pair)
            # Before blaming a pair, make sure each side agrees with itself.
            # A crash or a hang is not re-run: it would cost the timeout again, or crash again.
            for label in sorted(la for la in suspects if outcomes[la].status not in ("crash", "timeout")):
                v = ev.repeat_verdict(label, outcomes[label], ev.outcome(label, case))
                if v.kind:
                    noise[label] = max(noise.get(label, 0.0), v.score)
                    record(v, case)
            for v in verdicts:
                if v.kind:
                    record(v, case)
                    pair_cases[v.pair] = pair_cases.get(v.pair, 0) + 1
                    score = max(score, v.score)
            return score

        @hypothesis_seed(settings.seed)
        @settings_for(settings)
        @given(recipes(spec, allow_nonfinite=settings.allow_nonfinite, max_size=settings.max_size))
        def explore(recipe):
            nonlocal n_cases
            case = build_case(spec, recipe, dtype=settings.dtype, device=settings.device)
            score = examine(case)
            n_cases += 1
            target(finite(score), label="divergence score")
            if on_case:
                on_case(n_cases, score)

        score = examine(probe_case, probe_outcomes)
        n_cases = 1
        if on_case:
            on_case(n_cases, score)
        if settings.examples > 1:
            with _without_local_constants():
                explore()
        # A side that disagrees with itself is blamed for a pair divergence only when the
        # pair disagrees far beyond the worst run-to-run noise that side showed all run.
        for key, d in list(worst.items()):
            if d.pair[0] != d.pair[1] and d.score <= NOISE_MARGIN * max(noise.get(la, 0.0) for la in d.pair):
                del worst[key]
        for pair in [p for p in pair_cases if not any(d.pair == p for d in worst.values())]:
            del pair_cases[pair]
        severity = list(KINDS)
        divergences = sorted(worst.values(), key=lambda d: (d.pair[0] == d.pair[1], d.pair, severity.index(d.kind)))
        if settings.minimize or settings.save_dir:
            divergences = [_finish(ev, d) for d in divergences]
        return AuditResult(tuple(impls), spec, settings, n_cases, tuple(divergences), time.perf_counter() - start, pair_cases, tuple(ev.pairs))
    finally:
        ev.close()


@contextlib.contextmanager
def _without_local_constants() -> Iterator[None]:
    """Keep "same seed, same cases" true whatever the process has imported.

    Hypothesis (>= 6.131) mixes literals harvested from every *local* module already
    in ``sys.modules`` into its draws, so a seed's cases would change with what else
    got imported (losscmp's own minimiser, the user's other test modules).  losscmp's
    exploration opts out by giving that (private) hook an empty pool; with a Hypothesis
    that has no such hook there is nothing to do.
    """
    try:
        from hypothesis.internal.conjecture import providers
        from hypothesis.internal.constants_ast import Constants

        original = providers._get_local_constants
    except (ImportError, AttributeError):  # pragma: no cover - older/newer Hypothesis
        yield
        return
    empty = Constants()
    providers._get_local_constants = lambda: empty
    try:
        yield
    finally:
        providers._get_local_constants = original


def settings_for(s: Settings) -> Callable:
    return settings(
        max_examples=s.examples - 1,  # the probe was the first case
        database=None,
        deadline=None,
        # Our own minimiser works on the concrete tensors; Hypothesis explores and targets.
        phases=(Phase.generate, Phase.target),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        print_blob=False,
    )


def _finish(ev: Evaluator, d: Divergence) -> Divergence:
    """Minimise a divergence (unless turned off) and save its repro."""
    from .minimize import minimize
    from .repro import save_divergence

    if ev.settings.minimize:
        d = replace(d, minimized=minimize(ev, d))
    if ev.settings.save_dir is not None:
        try:
            d = replace(d, repro=str(save_divergence(ev, d, ev.settings.save_dir)))
        except (OSError, TypeError, ValueError) as e:  # the finding stands even if its file cannot be written
            d = replace(d, repro_error=f"{type(e).__name__}: {e}")
    return d
