"""The engine: run implementations on cases through a :class:`Runner`, and judge them.

One :class:`Evaluator` serves the audit, spec inference, sweeps, replay and every
stage after the search.  How a call is made is the runner's business:

* :class:`InProcessRunner` — a plain call in this process (the default);
* ``isolate.IsolatedRunner`` — a worker process per implementation (``--isolate``; the
  process runners share ``workers.WorkerRunner``):
  a segfault or a hang becomes a finding;
* ``interpreter.InterpreterRunner`` — a side under another interpreter (``--python``);
* ``cluster.RayRunner`` — an actor on a Ray cluster (``--ray``).

Every runner returns the same :class:`~losscmp.run.Outcome`, so nothing downstream
knows or cares which one ran.
"""
from __future__ import annotations

import itertools
import uuid
from pathlib import Path
from dataclasses import replace
from typing import Callable, Protocol, Sequence

from . import breadcrumbs
from .compare import Tolerance, Verdict, compare_outcomes
from .display import TWO_CALLS
from .errors import UsageError, shown
from .findings import Alone, Kind, Pair, Subject
from .generate import Case
from .cluster import RayRunner
from .interpreter import InterpreterRunner
from .isolate import IsolatedRunner
from .load import Implementation
from .model import RunRecord
from .run import Outcome, call
from .settings import Execution, RunnerKind, Settings
from .spec import Spec


class Runner(Protocol):
    """How one implementation is called on one case; every runner returns the same Outcome."""

    def __call__(self, impl: Implementation, spec: Spec, case: Case) -> Outcome: ...

    def close(self) -> None: ...


class InProcessRunner:
    """Calls in this process.  Under the CLI's supervisor, each call leaves a breadcrumb
    first (which implementation, on which input) and a deadline for the supervisor's
    watchdog, so that an implementation that kills the process or hangs is named, with its
    input, instead of ending the run silently or never."""

    def __call__(self, impl: Implementation, spec: Spec, case: Case) -> Outcome:
        with breadcrumbs.watched(impl.label, spec, case):
            return call(impl.fn, spec, case)

    def close(self) -> None:
        pass


def _isolated(execution: Execution, record: RunRecord) -> Runner:
    return IsolatedRunner(timeout=execution.timeout, record=record)


def _other_interpreter(execution: Execution, record: RunRecord) -> Runner:
    # The sides without an interpreter of their own run isolated when asked, else in-process
    # (through InProcessRunner: breadcrumb and watchdog deadline, as every in-process call).
    fallback = _isolated(execution, record) if execution.isolate else InProcessRunner()
    return InterpreterRunner(dict(execution.pythons), timeout=execution.timeout, fallback=fallback, record=record)


# One row per way of calling an implementation; which row, ``RunnerKind.choose`` says.
RUNNERS: dict[RunnerKind, Callable[[Execution, RunRecord], Runner]] = {
    RunnerKind.IN_PROCESS: lambda execution, record: InProcessRunner(),
    RunnerKind.ISOLATED: _isolated,
    RunnerKind.OTHER_INTERPRETER: _other_interpreter,
    RunnerKind.RAY: lambda execution, record: RayRunner(execution.ray or "local", timeout=execution.timeout, record=record,
                                                        actors=execution.jobs),
}


def run_record(settings: Settings, impls: Sequence[Implementation] = (), replaying: Path | None = None) -> RunRecord:
    """What the run is, as its runners, a crash or timeout repro and the supervisor know it:
    its implementations, the pairs compared (the one place they are computed), tolerance and
    seed.  ``replaying``: the repro being replayed, named as the input instead of a new copy."""
    tol = settings.tolerance
    pairs = tuple(pairs_for([i.label for i in impls], settings.reference)) if impls else ()
    return RunRecord(tuple(i.ref for i in impls), settings.reference, (tol.rtol, tol.atol), settings.search.seed,
                     settings.outputs.save_dir, replaying, pairs, uuid.uuid4().hex[:12])


def make_runner(settings: Settings, impls: Sequence[Implementation] = (), replaying: Path | None = None) -> Runner:
    """The runner ``settings.execution`` asks for, from the :data:`RUNNERS` table."""
    return RUNNERS[settings.execution.runner](settings.execution, run_record(settings, impls, replaying))


def pairs_for(labels: Sequence[str], reference: str | None) -> list[Pair]:
    """Every pair, or each implementation against the reference."""
    if reference is not None:
        if reference not in labels:
            raise UsageError(f"--reference {shown(reference)} is not one of {', '.join(labels)}")
        return [Pair(reference, la) for la in labels if la != reference]
    return [Pair(a, b) for a, b in itertools.combinations(labels, 2)]


class Evaluator:
    """Runs implementations on cases and compares them; counts every evaluation."""

    def __init__(self, impls: Sequence[Implementation], spec: Spec, settings: Settings, runner: Runner | None = None,
                 record: RunRecord | None = None):
        """``record``: the run's, when the caller already described it (``run_record``);
        ``runner``: one made already (default: the ``RUNNERS`` row for ``settings``)."""
        self.impls = {i.label: i for i in impls}
        if len(self.impls) != len(impls):
            raise UsageError("implementation labels must be distinct; give them with 'label=ref'")
        self.spec, self.settings, self.tol = spec, settings, settings.tolerance
        self.record = record if record is not None else run_record(settings, impls)
        self.pairs = list(self.record.pairs)
        self.runner = runner if runner is not None else RUNNERS[settings.execution.runner](settings.execution, self.record)
        self.evaluations = 0

    def outcome(self, label: str, case: Case) -> Outcome:
        return self.runner(self.impls[label], self.spec, case)

    def outcomes(self, case: Case, labels: Sequence[str] | None = None) -> dict[str, Outcome]:
        """One evaluation: each implementation (or each of ``labels``) called once."""
        self.evaluations += 1
        return {la: self.outcome(la, case) for la in (labels or self.impls)}

    def verdict(self, pair: Pair, outcomes: dict[str, Outcome]) -> Verdict:
        return compare_outcomes(pair, outcomes[pair.expected], outcomes[pair.actual], self.tol)

    def judge(self, subject: Subject, case: Case) -> Verdict:
        """The verdict on ``case``: a pair compared, or one implementation on its own."""
        if isinstance(subject, Alone):
            first = self.outcomes(case, [subject.label])[subject.label]
            if first.mutated:
                return mutation_verdict(subject.label, first)
            if first.status.died:  # re-running a crash or a hang costs it again
                return Verdict(subject, None, 0.0, "not re-run: the first call died", compared=False)
            return self.repeat_verdict(subject.label, first, self.outcome(subject.label, case))
        return self.verdict(subject, self.outcomes(case, subject.labels))

    def still_diverges(self, subject: Subject, kind: Kind, case: Case) -> bool:
        """The minimiser's predicate: the same kind of divergence for the same subject."""
        return self.judge(subject, case).kind == kind

    def repeat_verdict(self, label: str, first: Outcome, second: Outcome) -> Verdict:
        """Two calls of one implementation on one input: agreement, or nondeterminism."""
        v = compare_outcomes(Alone(label), first, second, self.tol)
        if v.kind:
            return replace(v, kind=Kind.NONDETERMINISM, detail=TWO_CALLS + v.detail)
        return v

    def close(self) -> None:
        self.runner.close()


def mutation_verdict(label: str, outcome: Outcome) -> Verdict:
    return Verdict(Alone(label), Kind.MUTATION, float("inf"), f"{label} modified its input(s) {', '.join(outcome.mutated)} in place")


__all__ = ["Evaluator", "InProcessRunner", "RUNNERS", "Runner", "make_runner", "run_record", "mutation_verdict", "pairs_for", "Tolerance"]
