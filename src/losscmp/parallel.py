"""``--jobs N``: the example budget shared among N worker processes (CPU), results merged.

Job ``j`` of ``N`` runs an ordinary :func:`losscmp.audit.audit` -- exploration only, no
minimising, no saving -- on its share of the budget (``examples // N``, the first
``examples % N`` jobs one more) with its own seed derived from ``(seed, N, j)``.  The
parent merges what the jobs found the way one audit merges its cases (per pair and kind
the worst case: highest score, then fewest elements; counts added up), then minimises
and saves each merged divergence itself.  Same seed and same N give the same jobs, hence
the same report, whatever order the jobs finish in.  (A different N explores different
cases: the report is reproducible per N, not across N.)

Jobs are forked (Linux/macOS): a job inherits the loaded implementations, lambdas and
shadowed forks included, instead of re-loading them.  Across machines, run the pytest
plugin under pytest-xdist instead.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Sequence

import torch

from .audit import AuditResult, Divergence, Evaluator, Settings, _finish, audit
from .compare import KINDS
from .load import Implementation, LoadError
from .spec import Spec

__all__ = ["audit_jobs", "job_seed"]


class JobsError(LoadError):
    """``--jobs`` cannot run as asked; the message is one line (exit 2 from the CLI)."""


def job_seed(seed: int, jobs: int, j: int) -> int:
    """A seed for job ``j`` of ``jobs``, fixed by (seed, jobs, j) and far from its neighbours."""
    digest = hashlib.sha256(f"losscmp-jobs:{seed}:{jobs}:{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def shares(examples: int, jobs: int) -> list[int]:
    base, extra = divmod(examples, jobs)
    return [base + (1 if j < extra else 0) for j in range(jobs) if base + (1 if j < extra else 0) > 0]


# The job's inputs are module globals in the forked child: nothing is pickled on the way in.
_JOB: tuple[Sequence[Implementation], Spec, Settings] | None = None


def _job_started() -> None:
    """A job dies with losscmp, and never touches the parent's isolation workers."""
    from . import isolate

    isolate._LIVE_STATES.clear()  # copies of the parent's runners: not this process's to stop
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            # SIGTERM, not SIGKILL: the job's own runners then stop their workers and delete their files.
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def _run_job(j: int, seed: int, examples: int) -> AuditResult:
    impls, spec, settings = _JOB
    torch.set_num_threads(1)  # N jobs on N cores: one intra-op thread each
    result = audit(impls, spec, replace(settings, seed=seed, examples=examples, minimize=False, save_dir=None))
    return replace(result, implementations=())  # the parent has them (a lambda would not pickle)


def audit_jobs(impls: Sequence[Implementation], spec: Spec, settings: Settings, jobs: int) -> AuditResult:
    """:func:`losscmp.audit.audit` with the example budget spread over ``jobs`` processes."""
    global _JOB
    if jobs < 1:
        raise JobsError(f"--jobs must be at least 1, not {jobs}")
    if jobs == 1:
        return audit(impls, spec, settings)
    if settings.device != "cpu":
        raise JobsError("--jobs spreads CPU work; for GPUs run one losscmp per device")
    if "fork" not in multiprocessing.get_all_start_methods():
        raise JobsError("--jobs needs the fork start method (Linux or macOS)")
    start = time.perf_counter()
    plan = [(j, job_seed(settings.seed, jobs, j), n) for j, n in enumerate(shares(settings.examples, jobs))]
    _JOB = (impls, spec, settings)
    try:
        with ProcessPoolExecutor(max_workers=len(plan), mp_context=multiprocessing.get_context("fork"),
                                 initializer=_job_started) as pool:
            futures = [pool.submit(_run_job, *p) for p in plan]
            results = [f.result() for f in futures]  # in job order, whatever order they finish in
    finally:
        _JOB = None
    merged = merge(results)
    if settings.minimize or settings.save_dir:
        ev = Evaluator(impls, spec, settings)
        try:
            merged = replace(merged, divergences=tuple(_finish(ev, d) for d in merged.divergences))
        finally:
            ev.close()
    return replace(merged, implementations=tuple(impls), settings=settings, seconds=time.perf_counter() - start)


def merge(results: Sequence[AuditResult]) -> AuditResult:
    """One result from the jobs' results: worst case per (pair, kind), counts added up."""
    worst: dict[tuple[tuple[str, str], str], Divergence] = {}
    pair_cases: dict[tuple[str, str], int] = {}
    for r in results:
        for d in r.divergences:
            key = (d.pair, d.kind)
            old = worst.get(key)
            count = d.count + (old.count if old else 0)
            if old is None or (d.score, -d.case.numel()) > (old.score, -old.case.numel()):
                worst[key] = replace(d, count=count)
            else:
                worst[key] = replace(old, count=count)
        for pair, n in r.pair_cases.items():
            pair_cases[pair] = pair_cases.get(pair, 0) + n
    severity = list(KINDS)
    divergences = sorted(worst.values(), key=lambda d: (d.pair[0] == d.pair[1], d.pair, severity.index(d.kind)))
    first = results[0]
    return AuditResult(first.implementations, first.spec, first.settings, sum(r.cases_run for r in results),
                       tuple(divergences), sum(r.seconds for r in results), pair_cases, first.pairs)
