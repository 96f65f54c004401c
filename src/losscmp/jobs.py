"""``--jobs N``: the example budget shared among N worker processes, results merged.

Workers are forked from this process, so they inherit the implementations as loaded
(lambdas and closures a test hands in included).  Once CUDA is initialised a fork can
no longer use it: then workers come from a fork server and load the implementations
from their references.  Each runs the ordinary exploration on its share of the budget
with a seed derived from the run's seed and its index, and sends its exploration back;
the parent merges them in worker order and runs the stages itself.  So the same seed and
the same N give the same report.  With ``--devices cuda:0,cuda:1`` there is one worker
per device.  Beyond one machine, spread a suite with the pytest plugin under
pytest-xdist instead.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Callable, Sequence

import torch

from . import breadcrumbs
from .cluster import stop_ray_runners
from .engine import Evaluator
from .errors import LosscmpError, UsageError
from .forking import WHY_NOT_FORKED, check_socket_folder, forget_inherited_fork_server, loads_by_reference, torch_survives_fork
from .load import Implementation, Ref, load_implementation
from .model import RunRecord
from .settings import RunnerKind, Settings
from .spec import Spec
from .workers import portable_ref


class WorkerDied(LosscmpError):
    """A --jobs worker process ended while it ran the implementations (not isolated)."""


def worker_seed(seed: int, worker: int) -> int:
    """A seed per worker, derived from the run's: stable across platforms and runs."""
    digest = hashlib.sha256(f"losscmp-jobs:{seed}:{worker}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def shares(examples: int, jobs: int) -> list[int]:
    return [examples // jobs + (1 if i < examples % jobs else 0) for i in range(jobs)]


def _die_with(parent: int | None) -> None:
    """A worker hung in an implementation must not outlive a killed losscmp.

    ``parent`` None: the worker's parent is a fork server (or, spawned, losscmp itself),
    not this process, and it goes with losscmp; checking for losscmp's pid there would
    end every worker at once.

    A forked worker also stops leaving breadcrumbs and watchdog deadlines: they are the
    supervised run's own, and a worker's last crumb written after the run's "done" would read as the run
    dying mid-call.  A worker's death is reported by the parent instead (``WorkerDied``).

    SIGTERM goes back to plain death: the pool terminates the surviving workers when one
    dies, and the supervised child's handler (raise ``Terminated``) would have them print
    "Exception ignored ..." tracebacks under the one-line error."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    breadcrumbs._crumbs = None
    breadcrumbs._clock = None  # the watchdog's deadline is the supervised process's own: workers sharing it would clear each other's
    breadcrumbs._die_with_parent(os.getppid() if parent is None else parent)
    if parent is not None:  # forked: the parent's fork server is not this process's child
        forget_inherited_fork_server()


_INHERITED: dict[str, Sequence[Implementation]] = {}  # what forked workers find already loaded


def _explore_share(explore: Callable, refs: tuple[Ref, ...] | None, spec: Spec, settings: Settings, threads: int,
                   record: RunRecord | None = None):
    torch.set_num_threads(threads)  # N workers share the cores instead of fighting over them
    impls = _INHERITED["impls"] if refs is None else [load_implementation(r) for r in refs]
    return explore_share_here(explore, impls, spec, settings, record)


def explore_share_here(explore: Callable, impls: Sequence[Implementation], spec: Spec, settings: Settings,
                       record: RunRecord | None = None):
    """One share's exploration in this process, with the runner its settings ask for.
    ``record``: the whole run's (its kept repros are the run's own), else the share's."""
    ev = Evaluator(impls, spec, settings, record=record)
    try:
        exploration = explore(ev)
        exploration.evaluations = ev.evaluations
        exploration.ev = None  # the evaluator holds functions and processes: it stays here
        return exploration
    finally:
        ev.close()


def explore_in_workers(explore: Callable, impls: Sequence[Implementation], spec: Spec, settings: Settings,
                       on_case: Callable[[int, float], None] | None = None, record: RunRecord | None = None):
    """``explore`` (:func:`losscmp.audit.explore`, passed in: the audit stands above this
    module) runs in each worker on its share of the examples; the explorations are merged."""
    ex = settings.execution
    if ex.runner is RunnerKind.RAY:
        return _merged(_explore_on_ray(explore, impls, spec, plan_shares(settings), record), on_case)
    jobs = ex.jobs
    fork = torch_survives_fork() and not ex.devices
    if not fork:
        unimportable = [i.label for i in impls if not i.ref.target or "<" in i.ref.source() or not loads_by_reference(i, portable_ref)]
        if unimportable:
            why = "--devices starts workers that load the implementations" if ex.devices else WHY_NOT_FORKED
            raise UsageError(f"--jobs needs implementations importable by reference here ({why}); "
                             f"{', '.join(unimportable)} cannot be")
    refs = None if fork else tuple(portable_ref(i.ref) for i in impls)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    plans = plan_shares(settings)
    context = multiprocessing.get_context("fork" if fork else "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
    if context.get_start_method() == "forkserver":
        check_socket_folder()
    _INHERITED["impls"] = impls
    try:
        with ProcessPoolExecutor(max_workers=len(plans), mp_context=context, initializer=_die_with, initargs=(os.getpid() if fork else None,)) as pool:
            futures = [pool.submit(_explore_share, explore, refs, spec, plan, threads, record) for plan in plans]
            explorations = [f.result() for f in futures]
    except BrokenProcessPool:
        # Without --isolate an implementation that segfaults, aborts or calls os._exit takes
        # its worker with it; which one, and on what input, died with the worker.
        raise WorkerDied("a --jobs worker process died while running the implementations (a segfault, abort() or "
                         "os._exit in one of them?); run again with --isolate to record such crashes as findings, "
                         "or without --jobs to have the crashing implementation and its input named") from None
    finally:
        _INHERITED.clear()
    return _merged(explorations, on_case)


def plan_shares(settings: Settings) -> list[Settings]:
    """Each worker's settings: its share of the examples, its own seed, its device."""
    ex = settings.execution
    plans = []
    for worker, examples in enumerate(shares(settings.search.examples, ex.jobs)):
        if examples == 0:
            continue
        device = ex.devices[worker] if ex.devices else ex.device
        plans.append(replace(
            settings,
            search=replace(settings.search, examples=examples, seed=worker_seed(settings.search.seed, worker)),
            execution=replace(ex, jobs=1, devices=(), device=device),
        ))
    return plans


def _explore_on_ray(explore: Callable, impls: Sequence[Implementation], spec: Spec, plans: list[Settings],
                    record: RunRecord | None = None) -> list:
    """``--ray`` with ``--jobs N``: the N shares explored side by side in threads of this
    process, each calling the implementations through its own actor (``cluster.RayRunner``).
    The threads mostly wait for their actors; the plans and the merge are ``--jobs``' own, so
    the report is the one ``--jobs N`` gives for the same seed."""
    with ThreadPoolExecutor(max_workers=len(plans), thread_name_prefix="losscmp-ray") as pool:
        futures = [pool.submit(explore_share_here, explore, impls, spec, plan, record) for plan in plans]
        try:
            return [f.result() for f in futures]
        except BaseException:  # Ctrl-C, or one share failed: the others stop at their next call
            for f in futures:
                f.cancel()
            stop_ray_runners()
            raise


def _merged(explorations: list, on_case: Callable[[int, float], None] | None):
    merged = explorations[0]
    for other in explorations[1:]:
        merged.absorb(other)
    if on_case:
        on_case(merged.cases, 0.0)
    return merged
