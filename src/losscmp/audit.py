"""The audit: explore (generate cases, run, compare), then run the stages on each finding.

``audit()`` is the whole pipeline behind ``losscmp A B``; the CLI and the pytest
helpers only parse arguments and print.

Exploration keeps, per subject (a pair, or one implementation alone) and kind, a few
*groups* of diverging cases that look like different causes (which components differ,
in which direction): each group keeps its worst case, its mildest-regime case (the
*representative*: a divergence on ordinary inputs is a different story from one that
needs 1e30), a count per regime, and what the implementations printed.  Every case is
accounted for in ``AuditResult.tally`` (agree, not compared, or its most severe kind).

The search also records, per pair and for every compared case, a cheap observation of
how the two losses relate (:func:`losscmp.explain.observe`).  The stages
(:mod:`losscmp.stages`: minimise, explain, group, save) then run in order on the list
of findings; a new stage is one module and one list entry.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given
from hypothesis import seed as hypothesis_seed
from hypothesis import settings as hypothesis_settings
from hypothesis import target

from . import breadcrumbs
from .engine import Evaluator, mutation_verdict
from .explain.relation import observe
from .errors import LosscmpError
from .generate import DEGENERATE, REGIMES, build_case, check_fits, degenerate_cases, probe_recipe, recipes
from .jobs import explore_in_workers
from .load import Implementation
from .model import Alone, AuditResult, Case, Divergence, Kind, Outcome, Pair, RunPhase, RunRecord, Status, Subject, Verdict  # AuditResult, Divergence re-exported: moved to model
from .run import finite, user_interrupts, watching_interrupts
from .settings import Settings
from .spec import Spec
from .stages import StageContext, default_stages
from .workers import remove_unnamed_repros

# How far beyond its own run-to-run noise a nondeterministic implementation must
# disagree with another before the pair is blamed.
NOISE_MARGIN = 10.0
# Distinct-looking groups kept per (subject, kind) during the search.
GROUPS_PER_KIND = 4


class ProbeError(LosscmpError):
    """The implementations cannot be run on this spec at all."""


def _return_hint(o: Outcome) -> str:
    """The mend for a return that is not a scalar tensor."""
    if o.status is Status.NON_SCALAR:
        return "reduce it to one number (e.g. .mean()), or add 'output=any' to --spec to compare the per-element losses"
    if o.error and o.error.startswith("returned numpy."):
        return "compute the loss with torch (a numpy value carries no gradient)"
    return "is --spec right?"


# Inputs tried before the search (one bad draw must not decide anything): tame, then
# every dim at its smallest (size-1 dims break reductions), then tame again.
PROBE_SIZES = (4, 1, 4)
PROBE_INPUTS = len(PROBE_SIZES)


def probe(ev: Evaluator, inputs: int = PROBE_INPUTS) -> list[tuple[Case, dict[str, Outcome]]]:
    """A few inputs first (standard regime, consecutive seeds, :data:`PROBE_SIZES`), each
    an ordinary case that the audit counts.

    Only what leaves nothing to compare is a usage error: a side that returns a
    non-tensor or a non-scalar on every tame probe input (the spec is wrong), or every side
    failing on every probe input.  A side that fails on some inputs, or raises on all of
    them while another side returns (a library bug: geomloss' ``hausdorff``), is a
    finding with a repro like any other -- an implementation that crashes on 20% of its
    inputs must not be refused because the first input happened to be one of them.
    """
    s = ev.settings
    probed: list[tuple[Case, dict[str, Outcome]]] = []
    for k in range(max(1, inputs)):
        recipe = probe_recipe(ev.spec, (s.search.seed + k) % 2**63, PROBE_SIZES[k % PROBE_INPUTS])
        case = build_case(ev.spec, recipe, dtype=s.execution.dtype, device=s.execution.device)
        breadcrumbs.rebuildable(case)
        probed.append((case, ev.outcomes(case)))
    first = probed[0][0]
    # The smallest input says nothing about a loss that returns one value per element (one
    # element is a scalar): only the tame inputs decide that the spec is wrong.
    tame = [o for k, (_, o) in enumerate(probed) if PROBE_SIZES[k % PROBE_INPUTS] > 1]
    for label in ev.impls:
        statuses = {o[label].status for o in tame}
        if len(statuses) == 1 and statuses <= {Status.NON_TENSOR, Status.NON_SCALAR}:
            raise ProbeError(f"{label} {probed[0][1][label].error} on every probe input ({first.describe()}); {_return_hint(probed[0][1][label])}")
    if all(o.failed for _, outcomes in probed for o in outcomes.values()):
        label, o = next(iter(probed[0][1].items()))
        raise ProbeError(f"every implementation failed on every probe input ({first.describe()}), e.g. {label} {o.error}; is --spec right?")
    return probed


@dataclass
class _Group:
    """A group of diverging cases during the search (mutable; becomes a Divergence)."""

    subject: Subject
    kind: Kind
    key: tuple
    verdict: Verdict
    case: Case
    outputs: dict[str, str]
    count: int = 0
    regimes: Counter = field(default_factory=Counter)
    mildest: tuple[int, Case, Verdict] | None = None

    def add(self, v: Verdict, case: Case, outputs: dict[str, str]) -> None:
        self.count += 1
        regime = case.recipe.regime if case.recipe else "hand-made"
        self.regimes[regime] += 1
        if (v.score, -case.numel()) > (self.verdict.score, -self.case.numel()):
            self.verdict, self.case, self.outputs = v, case, outputs
        rank = _regime_rank(regime)
        if self.mildest is None or (rank, case.numel()) < (self.mildest[0], self.mildest[1].numel()):
            self.mildest = (rank, case, v)

    def absorb(self, other: _Group) -> None:
        """Another worker's cases of the same group (``--jobs``)."""
        self.count += other.count
        self.regimes.update(other.regimes)
        if (other.verdict.score, -other.case.numel()) > (self.verdict.score, -self.case.numel()):
            self.verdict, self.case, self.outputs = other.verdict, other.case, other.outputs
        if other.mildest and (self.mildest is None or (other.mildest[0], other.mildest[1].numel()) < (self.mildest[0], self.mildest[1].numel())):
            self.mildest = other.mildest

    def divergence(self) -> Divergence:
        rep = self.mildest if self.mildest and self.mildest[1] is not self.case else None
        return Divergence(
            self.subject, self.kind, self.verdict, self.case, self.count, dict(self.regimes),
            rep[1] if rep else None, rep[2] if rep else None, self.outputs, group_key=self.key,
        )


def _regime_rank(regime: str) -> int:
    order = list(REGIMES) + list(DEGENERATE)  # mildest first
    return order.index(regime) if regime in order else len(order)


def cheap_signature(v: Verdict) -> tuple:
    """What a diverging case looks like without explaining it: which components are off.
    Different signatures are kept apart during the search, so that one worst case cannot
    hide a second, different cause; the explain stage merges those that turn out alike."""
    if v.kind not in (Kind.VALUE, Kind.GRADIENT, Kind.NONFINITE):
        return ()
    return tuple(d.what for d in v.diffs if d.score > 1 or d.nonfinite_mismatch)


class _Exploration:
    """The search's bookkeeping: findings by group, and a tally of every case."""

    def __init__(self, ev: Evaluator):
        self.ev: Evaluator | None = ev  # None once shipped back from a --jobs worker
        self.groups: dict[tuple, _Group] = {}
        self.subject_cases: Counter = Counter()
        self.tally: Counter = Counter()
        self.not_compared: dict[Subject, tuple[int, str]] = {}
        self.checked_self: set[str] = set()
        self.noise: dict[str, float] = {}  # worst self-disagreement score seen per implementation
        self.cases = 0
        self.evaluations = 0  # of workers (--jobs); this process's own are on the Evaluator
        self.history: dict[Pair, list] = {}  # explain.Observation of every compared case, per pair
        self.interrupts = user_interrupts()  # Ctrl-Cs before this search are not its business

    def record(self, v: Verdict, case: Case, outcomes: dict[str, Outcome]) -> None:
        base = (v.subject, v.kind)
        signature = cheap_signature(v)
        key = base + (signature,)
        outputs = {la: outcomes[la].output for la in v.subject.labels if la in outcomes and outcomes[la].output}
        group = self.groups.get(key)
        if group is None:
            siblings = [g for k, g in self.groups.items() if k[:2] == base]
            if len(siblings) >= GROUPS_PER_KIND:  # budget spent: join the group most like it
                group = siblings[0]
            else:
                assert v.kind is not None  # only findings are recorded
                group = self.groups[key] = _Group(v.subject, v.kind, key, v, case, outputs)
        group.add(v, case, outputs)

    def examine(self, case: Case, outcomes: dict[str, Outcome] | None = None) -> float:
        """Run and judge one case; returns the score the search climbs."""
        stop_if_asked(self.interrupts)
        ev = self.ev
        assert ev is not None, "a shipped exploration cannot examine more cases"
        outcomes = outcomes or ev.outcomes(case)
        self.cases += 1
        found: list[Verdict] = []
        suspects: set[str] = set()
        for label, o in outcomes.items():
            if o.mutated:
                found.append(mutation_verdict(label, o))
            if label not in self.checked_self:  # determinism check on the first case
                suspects.add(label)
                self.checked_self.add(label)
        verdicts = [ev.verdict(p, outcomes) for p in ev.pairs]
        regime = case.recipe.regime if case.recipe else None
        for p, verdict in zip(ev.pairs, verdicts):  # for the relation between the two losses, over every case
            observation = observe(outcomes[p.expected], outcomes[p.actual], regime, verdict)
            if observation is not None:
                self.history.setdefault(p, []).append(observation)
        for v in verdicts:
            if v.kind:
                suspects.update(v.subject.labels)
            elif not v.compared:
                count, why = self.not_compared.get(v.subject, (0, v.detail))
                self.not_compared[v.subject] = (count + 1, why)
        # Before blaming a pair, make sure each side agrees with itself.
        # A crash or a hang is not re-run: it would cost the timeout again, or crash again.
        for label in sorted(la for la in suspects if not outcomes[la].status.died):
            v = ev.repeat_verdict(label, outcomes[label], ev.outcome(label, case))
            if v.kind:
                self.noise[label] = max(self.noise.get(label, 0.0), v.score)
                found.append(v)
        found += [v for v in verdicts if v.kind]
        for v in found:
            self.record(v, case, outcomes)
            self.subject_cases[v.subject] += 1
        if found:
            self.tally[min((v.kind for v in found if v.kind), key=lambda k: k.severity).value] += 1
        elif any(not v.compared for v in verdicts):
            self.tally["not compared"] += 1
        else:
            self.tally["agree"] += 1
        return max((v.max_score for v in verdicts if v.kind), default=max((v.max_score for v in verdicts), default=0.0))

    def absorb(self, other: _Exploration) -> None:
        """Merge another worker's exploration (``--jobs``); merging in worker order keeps
        the report the same for the same seed and the same number of jobs."""
        for key, group in other.groups.items():
            mine = self.groups.get(key)
            if mine is not None:
                mine.absorb(group)
                continue
            siblings = [g for k, g in self.groups.items() if k[:2] == key[:2]]
            if len(siblings) >= GROUPS_PER_KIND:
                siblings[0].absorb(group)
            else:
                self.groups[key] = group
        self.subject_cases.update(other.subject_cases)
        self.tally.update(other.tally)
        for subject, (n, why) in other.not_compared.items():
            count, first_why = self.not_compared.get(subject, (0, why))
            self.not_compared[subject] = (count + n, first_why)
        for label, score in other.noise.items():
            self.noise[label] = max(self.noise.get(label, 0.0), score)
        self.cases += other.cases
        self.evaluations += other.evaluations
        for pair, observations in other.history.items():
            self.history.setdefault(pair, []).extend(observations)

    def divergences(self) -> list[Divergence]:
        """The findings, settled (see :meth:`settled`); the counts of excused pairs move to
        "not compared"."""
        kept, self.subject_cases, self.not_compared = self.settled()
        return kept

    def settled(self) -> tuple[list[Divergence], Counter, dict[Subject, tuple[int, str]]]:
        """The findings with the noise rule applied, and the per-subject counts that go with
        them; ``self`` is left as it was (a snapshot mid-search must not change the search)."""
        # A side that disagrees with itself is blamed for a pair divergence only when the
        # pair disagrees far beyond the worst run-to-run noise that side showed all run.
        # Noise with no size (a side that raised on one call of two, or changed dtype) is
        # no yardstick: it would excuse every pair finding, and the pair would read "agree".
        # The excused cases were not seen to agree either: they are "not compared", with why.
        subject_cases, not_compared = Counter(self.subject_cases), dict(self.not_compared)
        kept, excused = [], {}
        for g in self.groups.values():
            noise = max(self.noise.get(la, 0.0) for la in g.subject.labels)
            if isinstance(g.subject, Pair) and math.isfinite(noise) and g.verdict.score <= NOISE_MARGIN * noise:
                noisy = max(g.subject.labels, key=lambda la: self.noise.get(la, 0.0))
                excused[g.subject] = noisy
                continue
            kept.append(g.divergence())
        for subject in set(excused) - {d.subject for d in kept}:
            n = subject_cases.pop(subject, 0)
            count, why = not_compared.get(subject, (0, ""))
            within = (f"the two differ by no more than {NOISE_MARGIN:g}x {excused[subject]}'s own run-to-run noise: "
                      f"these cases cannot tell the two apart")
            not_compared[subject] = (count + n, "; ".join(w for w in (why, within) if w))
        return sorted(kept, key=_finding_order), subject_cases, not_compared


def stop_if_asked(interrupts_before: int) -> None:
    """Between cases and stages: stop for a SIGTERM or Ctrl-C whose exception was lost (it
    landed in a garbage-collector callback, or an implementation swallowed it)."""
    breadcrumbs.check_terminated()
    if user_interrupts() != interrupts_before:
        raise KeyboardInterrupt


def _finding_order(d: Divergence) -> tuple:
    return (isinstance(d.subject, Alone), d.subject.labels, d.kind.severity, -d.count)


def audit(
    impls: Sequence[Implementation],
    spec: Spec,
    settings: Settings = Settings(),
    *,
    on_case: Callable[[int, float], None] | None = None,
    stages: Sequence[Any] | None = None,
    on_progress: Callable[[AuditResult], None] | None = None,
    keep_on_interrupt: bool = False,
    record: RunRecord | None = None,
) -> AuditResult:
    """Fuzz ``impls`` against each other on ``settings.search.examples`` cases drawn from
    ``spec``, then run the stages (default: minimise, explain, group, save) on the findings.

    ``on_progress`` gets the result so far after every search case and after every stage
    (the CLI keeps it for its supervisor, which reports it if an implementation kills the
    process).  With ``keep_on_interrupt``, SIGTERM or the user's Ctrl-C ends the run with
    what was found so far (``AuditResult.interrupted`` says which); otherwise they propagate
    (a test session must stop, not pass on half a run).  ``record``: the run as the caller
    already described it (``engine.run_record``: the pairs, computed once)."""
    start = time.perf_counter()
    execution = settings.execution
    for device in execution.devices or (execution.device,):
        check_fits(spec, dtype=execution.dtype, device=device, max_size=settings.search.max_size)
    ev = Evaluator(impls, spec, settings, record=record)
    exploration = _Exploration(ev)
    interrupts = user_interrupts()
    divergences: list[Divergence] | None = None  # settled once the search is over
    stage_errors: list[str] = []

    def result(phase: RunPhase, interrupted: str | None = None) -> AuditResult:
        if divergences is None:
            found, subject_cases, not_compared = exploration.settled()
        else:
            found, subject_cases, not_compared = divergences, exploration.subject_cases, exploration.not_compared
        return AuditResult(
            tuple(impls), spec, settings, exploration.cases, tuple(found), time.perf_counter() - start,
            tuple(ev.pairs), dict(subject_cases), dict(exploration.tally), dict(not_compared),
            ev.evaluations + exploration.evaluations, tuple(stage_errors), interrupted, phase,
        )

    def progress(n: int, score: float) -> None:
        if on_case:
            on_case(n, score)
        if on_progress:
            on_progress(result(RunPhase.EXPLORE))

    try:
        with watching_interrupts():
            if on_progress:
                on_progress(result(RunPhase.EXPLORE))
            if settings.execution.jobs > 1:
                exploration = explore_in_workers(explore, impls, spec, settings, on_case, ev.record)
            else:
                explore(ev, progress if on_case or on_progress else None, exploration)
            divergences = exploration.divergences()
            ctx = StageContext(ev=ev, settings=settings, history=exploration.history)
            for stage in default_stages(settings) if stages is None else stages:
                stop_if_asked(interrupts)
                if on_progress:
                    on_progress(result(RunPhase.STAGES))
                try:
                    divergences = stage(divergences, ctx)
                except Exception as e:  # the findings stand without what this stage would have added
                    name = getattr(stage, "name", type(stage).__name__)
                    stage_errors.append(f"{name} stage failed ({type(e).__name__}: {' '.join(str(e).split())}); findings reported without it")
        done = result(RunPhase.DONE)
        if ev.record.keep_dir is not None:  # else nothing was kept where a run tidies up
            try:
                remove_unnamed_repros(ev.record, _all_text(done))
            except OSError:  # a tidy-up: never worth the result
                pass
        return done
    except (KeyboardInterrupt, breadcrumbs.Terminated) as e:
        # Only the user's Ctrl-C gets here: an implementation's own KeyboardInterrupt is its finding (run.call).
        if not keep_on_interrupt:
            raise
        return result(RunPhase.EXPLORE if divergences is None else RunPhase.STAGES, "SIGTERM" if isinstance(e, breadcrumbs.Terminated) else "SIGINT")
    finally:
        ev.close()


def explore(ev: Evaluator, on_case: Callable[[int, float], None] | None = None, exploration: _Exploration | None = None) -> _Exploration:
    """The search: the probe case, then Hypothesis-drawn cases, climbing the score.
    ``exploration``: where to record (the caller keeps what was found if the search is stopped)."""
    s = ev.settings
    search, execution = s.search, s.execution
    exploration = _Exploration(ev) if exploration is None else exploration
    for probe_case, probe_outcomes in probe(ev, min(PROBE_INPUTS, search.examples)):
        score = exploration.examine(probe_case, probe_outcomes)
        if on_case:
            on_case(exploration.cases, score)
    if not search.regimes:  # the degenerate inputs, unless the regimes were narrowed
        for case in degenerate_cases(ev.spec, search.seed, dtype=execution.dtype, device=execution.device):
            if exploration.cases >= search.examples:
                break
            score = exploration.examine(case)  # not rebuildable from a recipe: saved before a risky call
            if on_case:
                on_case(exploration.cases, score)

    regimes = tuple(search.regimes) if search.regimes else tuple(REGIMES)

    @hypothesis_seed(search.seed)
    @hypothesis_settings(
        max_examples=max(1, search.examples - exploration.cases),  # the probes were the first cases
        database=None,
        deadline=None,
        # Our own minimiser works on the concrete tensors; Hypothesis explores and targets.
        phases=(Phase.generate, Phase.target),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        print_blob=False,
    )
    @given(recipes(ev.spec, regimes=regimes, allow_nonfinite=search.allow_nonfinite, max_size=search.max_size))
    def search_cases(recipe):
        case = build_case(ev.spec, recipe, dtype=execution.dtype, device=execution.device)
        breadcrumbs.rebuildable(case)
        score = exploration.examine(case)
        target(finite(score), label="divergence score")
        if on_case:
            on_case(exploration.cases, score)

    if search.examples > exploration.cases:
        with _without_local_constants():
            search_cases()
    return exploration


def _all_text(result: AuditResult) -> str:
    """Every string the result holds (verdicts, outcomes, minimiser steps, explanations,
    reasons for not comparing), joined: a file it names is one the run's report shows."""
    texts: list[str] = []
    seen: set[int] = set()
    stack: list[Any] = [result]
    while stack:
        o = stack.pop()
        if isinstance(o, (str, Path)):
            texts.append(str(o))
        elif isinstance(o, (torch.Tensor, int, float, type(None))) or id(o) in seen:
            continue
        elif dataclasses.is_dataclass(o):
            seen.add(id(o))
            stack.extend(getattr(o, f.name) for f in dataclasses.fields(o))
        elif isinstance(o, dict):
            seen.add(id(o))
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            seen.add(id(o))
            stack.extend(o)
    return "\n".join(texts)


_LOCAL_CONSTANTS_LOCK = threading.Lock()
_local_constants_users = 0
_local_constants_original: Any = None


@contextlib.contextmanager
def _without_local_constants() -> Iterator[None]:
    """Keep "same seed, same cases" true whatever the process has imported.

    Hypothesis (>= 6.131) mixes literals harvested from every *local* module already
    in ``sys.modules`` into its draws, so a seed's cases would change with what else
    got imported (losscmp's own minimiser, the user's other test modules).  losscmp's
    exploration opts out by giving that (private) hook an empty pool; with a Hypothesis
    that has no such hook there is nothing to do.  Counted, because explorations may run
    side by side in threads (``--ray`` with ``--jobs``): the first in patches the hook and
    the last out restores it, so no exploration runs with the pool restored under it.
    """
    global _local_constants_users, _local_constants_original
    try:
        from hypothesis.internal.conjecture import providers
        from hypothesis.internal.constants_ast import Constants

        providers._get_local_constants  # noqa: B018  (the check: the hook exists in this Hypothesis)
    except (ImportError, AttributeError):  # pragma: no cover - older/newer Hypothesis
        yield
        return
    with _LOCAL_CONSTANTS_LOCK:
        if _local_constants_users == 0:
            _local_constants_original = providers._get_local_constants, providers.CONSTANTS_CACHE
            empty = Constants()
            providers._get_local_constants = lambda: empty
            # Each pool of constants is cached per kind of draw, process-wide: a Hypothesis
            # test that ran earlier (the user's own, in a pytest session) would otherwise
            # have left its local literals in the very pool our draws take from.
            providers.CONSTANTS_CACHE = type(providers.CONSTANTS_CACHE)(1024)
        _local_constants_users += 1
    try:
        yield
    finally:
        with _LOCAL_CONSTANTS_LOCK:
            _local_constants_users -= 1
            if _local_constants_users == 0:
                providers._get_local_constants, providers.CONSTANTS_CACHE = _local_constants_original


__all__ = ["AuditResult", "Divergence", "Evaluator", "ProbeError", "RunPhase", "audit", "explore", "probe"]
