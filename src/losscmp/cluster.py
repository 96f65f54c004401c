"""``--ray ADDRESS``: implementations called by actors on a Ray cluster.

:class:`RayRunner` is the ``RunnerKind.RAY`` row of ``engine.RUNNERS``:
``runner(impl, spec, case) -> Outcome`` like every runner.  The run's actors (Ray worker
processes somewhere on the cluster) are started once, as the first runner is built, one
per ``--jobs`` share; each loads the run's implementations from their reference text at
once (as an isolated worker does) and then serves calls: the case's tensors go out, the
:class:`~losscmp.run.Outcome` comes back; the actor runs :func:`losscmp.run.call` exactly
as the in-process runner does.  A runner takes an actor from the run's pool at its first
call and gives it back when it closes, so the stages after a ``--jobs`` search reuse an
actor of the search.  With ``--jobs N`` the example budget is shared as ``--jobs`` shares
it (:mod:`losscmp.jobs`): N explorations, each with its own runner and so its own actor;
the same seed and N give the same report as ``--jobs N`` on one machine, and with one job
the same report as one process.

* An actor that dies during a call (Ray restarts it: ``max_restarts``) gets the case once
  more: a worker lost to something else (its node gone, its process killed from outside)
  is not the implementation's doing.  A case that kills the fresh actor too is the
  implementation's ``Outcome("crash")``; its input was saved before the call
  (:class:`workers.CaseKeeper`) and is kept as a crash repro.
* With ``timeout`` set, a call that has not returned in time gets its actor killed (and
  restarted) and gives an ``Outcome("timeout")``.
* ``"local"`` starts a Ray instance in this process, its workers importing torch and
  losscmp before they take an actor (:data:`PRELOAD`); any other address joins a running
  cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``).  The connection is made by the
  first runner that needs it and ended when the last runner closes, so no actor and no
  local instance outlives the run: on Ctrl-C (the runners close as the exception passes)
  and on SIGTERM (``workers.register_for_sigterm``) as at the end.  The environment
  ``ray.init`` changed is given back then.  Only a pytest session holds the connection and
  its actors from one check to the next (:func:`hold_connection`).

Ray is an optional dependency (``pip install "losscmp[ray]"``): it is imported here only,
and only when a run asks for it.  The actor process needs losscmp and the
implementations' files at the same paths (a shared file system, or a Ray runtime
environment that provides them).
"""
from __future__ import annotations

from dataclasses import replace
import importlib
import os
import threading
import time
import weakref
from typing import Any

import torch

from .errors import UsageError
from .generate import Case
from .load import Implementation, LoadError, Ref, load_implementation, load_timeout
from .model import RunRecord, Status
from .run import Outcome, call
from .settings import check_ray_installed
from .spec import Spec
from .workers import CaseKeeper, kept_failure, portable_ref, register_for_sigterm

def _ray() -> Any:
    check_ray_installed()
    import ray  # an optional, heavy dependency: imported only when a run asks for it

    return ray


# ---------------------------------------------------------------------- the connection
# What a local instance's prestarted workers import before they accept work, so that an
# actor placed on one starts in well under a second instead of importing torch (seconds).
# A cluster's own workers do the same when started with RAY_preload_python_modules set to
# this list (the README says how).
PRELOAD = ("torch", "losscmp.cluster")
ACTOR_CPUS = 1  # per actor: one intra-op thread, as each --jobs worker on a machine with one core per job
# How ``--ray local`` starts its instance (scripts/bench_scale.py starts its own the same way).
# address "local": a new instance even where `ray start` left one on this machine (plain
# ray.init() would join that, and a user's "local" run would land on someone's cluster).
LOCAL_INIT: dict[str, Any] = {"address": "local", "include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR",
                              "_system_config": {"preload_python_modules": list(PRELOAD)}}


class _Connection:
    """This process's link to Ray and the run's actors, shared by the runners alive.

    The actors form a pool: a runner takes one for its calls and gives it back when it
    closes, so that the stages after a ``--jobs`` search reuse an actor of the search
    instead of starting one.  The last runner to leave kills every actor (and ends a
    local instance)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.ours = False  # made by a runner (not by the user before calling losscmp)
        self.runners: weakref.WeakSet[RayRunner] = weakref.WeakSet()
        self.idle: list[Any] = []  # actors no runner holds, ready for the next one
        self.started: dict[Any, Any] = {}  # every live actor of the run -> its warm-up (an ObjectRef)
        self.actor_class: Any = None
        self.env_set_by_ray: dict[str, tuple[str | None, str]] = {}  # key -> (before ray.init, as ray.init left it)
        self.address: str | None = None  # what the connection made by a runner joined
        self.held = 0  # hold() calls not yet released: the connection and idle actors outlive each run

    def join(self, runner: RayRunner) -> None:
        with self.lock:
            self.users += 1
            self.runners.add(runner)

    def ensure(self, address: str) -> Any:
        ray = _ray()
        with self.lock:
            # A connection held for a pytest session, to another address than this run's.
            stale = self.ours and self.address != address and ray.is_initialized()
            if stale and self.users > 1:
                raise UsageError(f"--ray {address}: this process is connected to the Ray cluster at {self.address} for another run")
        if stale:
            self._end()
        with self.lock:
            if not ray.is_initialized():
                before = dict(os.environ)
                try:
                    if address == "local":
                        ray.init(**LOCAL_INIT)
                    else:
                        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
                except Exception as e:  # no cluster there, a version mismatch, ...
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    what = "could not start a local Ray instance" if address == "local" else f"could not join the Ray cluster at {address}"
                    raise UsageError(f"--ray {address}: {what}: {first}") from None
                finally:
                    self.env_set_by_ray = {k: (before.get(k), v) for k, v in os.environ.items() if before.get(k) != v}
                self.ours, self.address = True, address
        return ray

    def warm(self, ray: Any, actors: int, refs: tuple[Ref, ...]) -> None:
        """Start actors until the run has ``actors`` of them, each loading ``refs`` at once:
        they come up while this process builds its cases instead of at the first call."""
        with self.lock:
            while len(self.started) < actors:
                self.idle.append(self._start(ray, refs))

    def take(self, ray: Any, refs: tuple[Ref, ...]) -> Any:
        with self.lock:
            if not self.idle:
                return self._start(ray, refs)
            actor = self.idle.pop(0)
            if self.held:  # kept from an earlier run, perhaps of other implementations: this run's loaded first
                self.started[actor] = actor.preload.remote(refs)
            return actor

    def give_back(self, ray: Any, actor: Any, giver: RayRunner) -> None:
        """An actor its runner is done with: kept for a live runner that has none yet (the
        run's own, for the stages after a ``--jobs`` search), unless one is kept for it
        already or another actor of the run still waits for a CPU (then this one's goes to
        it).  Otherwise killed: after a search of N shares the stages call one actor, and N - 1
        idle ones held their CPUs on the cluster until the run ended."""
        with self.lock:
            waiting = [w for a, w in self.started.items() if a is not actor]
            needed = sum(1 for r in self.runners if r is not giver and r.actor is None and not r.closed)
            if (self.held or len(self.idle) < needed) and not (waiting and ray.wait(waiting, num_returns=len(waiting), timeout=0)[1]):
                self.idle.append(actor)
                return
            self.started.pop(actor, None)
        _kill(ray, actor)

    def forget(self, actor: Any) -> None:
        """An actor killed by its runner (its state unknown after Ctrl-C)."""
        with self.lock:
            self.started.pop(actor, None)

    def _start(self, ray: Any, refs: tuple[Ref, ...]) -> Any:
        if self.actor_class is None:
            self.actor_class = ray.remote(num_cpus=ACTOR_CPUS, max_restarts=-1, max_task_retries=0)(_Actor)
        actor = self.actor_class.remote()
        self.started[actor] = actor.preload.remote(refs)
        return actor

    def leave(self, runner: RayRunner) -> None:
        with self.lock:
            self.runners.discard(runner)
            self.users -= 1
            if self.users > 0 or self.held:
                return
        self._end()

    def hold(self) -> None:
        with self.lock:
            self.held += 1

    def release(self) -> None:
        with self.lock:
            self.held -= 1
            if self.held or self.users:
                return
        self._end()

    def _end(self) -> None:
        """Every actor of the connection killed; the connection (and a local instance) ended
        if a runner made it."""
        with self.lock:
            actors, self.idle, self.started = list(self.started), [], {}
            ours, self.ours, self.address = self.ours, False, None
        if actors or ours:
            ray = _ray()
            for actor in actors:
                _kill(ray, actor)
            if ours and ray.is_initialized():
                ray.shutdown()
            if ours:
                self._restore_env()

    def _restore_env(self) -> None:
        """Undo what ``ray.init`` did to this process's environment, now that the connection
        is over.  A local instance turns on Ray's token authentication for the *process*
        (``RAY_AUTH_MODE=token``, read into Ray's cached config), and it outlived
        ``ray.shutdown()``: a cluster joined next in the same process, without token auth,
        cancelled every actor before its first call ("all references to the actor were
        removed").  ``PYTHONBREAKPOINT`` pointing at Ray's debugger went on too."""
        changed, self.env_set_by_ray = self.env_set_by_ray, {}
        for key, (before, set_by_ray) in changed.items():
            if os.environ.get(key) != set_by_ray:
                continue  # changed again since (by the user): theirs
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before
        if "RAY_AUTH_MODE" in changed:
            _reload_ray_auth()

    def close(self, fast: bool = False) -> None:
        """SIGTERM: every runner stopped, every actor killed, the connection (and a local
        instance) ended with the last runner."""
        for runner in list(self.runners):
            runner.close(healthy=False)  # mid-call, perhaps: no later runner gets that actor


def _reload_ray_auth() -> None:
    """Have Ray read the authentication mode and token afresh (as ``ray.init`` does when it
    turns token auth on).  Ray before token auth (< 2.5x) has neither cache, nor the setting."""
    try:  # private, with no public way to reload; looked up by name (Ray's stubs do not list them)
        raylet = importlib.import_module("ray._raylet")
    except ImportError:
        return
    config, loader = getattr(raylet, "Config", None), getattr(raylet, "AuthenticationTokenLoader", None)
    if config is None or loader is None:
        return
    config.initialize("")
    loader.instance().reset_cache()


def _kill(ray: Any, actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone with its cluster
        pass


_CONNECTION = _Connection()


def hold_connection() -> None:
    """Keep the Ray connection a run makes, and the actors it gives back, for the runs after
    it in this process, until :func:`release_connection`.  The pytest plugin holds it for a
    session: a check then pays neither a connection nor, above all, a new actor (a new Ray
    worker process importing torch, seconds; the README has the numbers).  An actor kept
    from an earlier check loads this check's implementations before its first call, as a new
    one does; the implementations of earlier checks stay imported in it, as they do in the
    pytest process itself without Ray.  Kept actors hold their CPUs until the release."""
    _CONNECTION.hold()


def release_connection() -> None:
    """The end of :func:`hold_connection`: once no run is under way, every actor is killed
    and the connection (and a local instance) ended."""
    _CONNECTION.release()


def stop_ray_runners() -> None:
    """Ctrl-C or a failed share: kill every live runner's actor; a call made after that
    raises KeyboardInterrupt, so explorations in other threads stop too."""
    _CONNECTION.close()


# ---------------------------------------------------------------------- the actor
class _Actor:
    """Runs on the cluster: loads each implementation once, calls it on the cases sent."""

    def __init__(self, threads: int = ACTOR_CPUS) -> None:
        # Ray sets OMP_NUM_THREADS to the actor's CPUs, but a worker that imported torch
        # before (PRELOAD) has already sized its pool to the whole node: two actors with two
        # threads each on two cores ran Sinkhorn 3x slower than --jobs 2.
        torch.set_num_threads(threads)
        self.impls: dict[str, Implementation | Outcome] = {}

    def preload(self, refs: tuple[Ref, ...]) -> bool:
        for ref in refs:
            self._loaded(ref)
        return True

    def call(self, ref: Ref, spec: Spec, tensors: dict, params: dict) -> Outcome:
        impl = self._loaded(ref)
        if isinstance(impl, Outcome):
            return impl
        return call(impl.fn, spec, Case(tensors=tensors, sizes={}, params=params))

    def _loaded(self, ref: Ref) -> Implementation | Outcome:
        key = ref.source()
        impl = self.impls.get(key)
        if impl is None:
            try:
                impl = load_implementation(ref)
            except Exception as e:  # the answer to every call, as an isolated worker's
                why = str(e) if isinstance(e, LoadError) else f"{type(e).__name__}: {e}"
                impl = Outcome(Status.EXCEPTION, error=f"could not be loaded on the Ray worker: {' '.join(why.split())}")
            self.impls[key] = impl
        return impl

    def ready(self) -> bool:
        return True


# ---------------------------------------------------------------------- the runner
class RayRunner:
    """``runner(impl, spec, case) -> Outcome``, the call made by an actor of the run.

    ``actors``: how many the run will use at once (``--jobs``); that many are started as
    the runner is built, loading the run's implementations (``record.refs``) straight away."""

    def __init__(self, address: str, timeout: float | None = None, record: RunRecord = RunRecord(), actors: int = 1):
        check_ray_installed()
        self.address, self.timeout = address, timeout
        self.keeper = CaseKeeper(record)
        self.refs = tuple(portable_ref(r) for r in record.refs if r.target and "<" not in r.source())
        self.actor: Any = None
        self.closed = False
        _CONNECTION.join(self)
        register_for_sigterm(_CONNECTION)
        # Connect now, from the thread that builds the first runner (the run's own): a local
        # instance's processes die with the *thread* that started them (Linux's parent-death
        # signal), so starting it from an exploration thread would end it with that thread.
        try:
            _CONNECTION.warm(_CONNECTION.ensure(address), actors, self.refs)
        except BaseException:
            self.close()
            raise

    def __call__(self, impl: Implementation, spec: Spec, case: Case) -> Outcome:
        if self.closed:  # stopped by Ctrl-C or SIGTERM in another thread: end this exploration too
            raise KeyboardInterrupt("the Ray run was stopped")
        if not impl.ref.target or "<" in impl.ref.source():
            raise UsageError(f"--ray needs implementations importable by reference; {impl.label} is not")
        ray = _ray()
        self.keeper.before(impl, spec, case)  # an input that kills the actor is never lost
        start = time.perf_counter()
        deaths: list[str] = []
        while True:
            actor = self._actor(ray)
            pending = actor.call.remote(portable_ref(impl.ref), spec, dict(case.tensors), dict(case.params))
            try:
                out = ray.get(pending, timeout=self.timeout)
            except ray.exceptions.GetTimeoutError:
                ray.kill(actor, no_restart=False)  # Ray starts a fresh one for the next call
                self._await_restart(ray)
                kind, error = Status.TIMEOUT, f"did not return within {self.timeout:g} s"
            except (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError) as e:
                # The actor was healthy when the call went out (see _await_restart), yet it may
                # have died of something else (its node lost, killed from outside): the case
                # runs once more on the fresh actor, and only a second death is the implementation's.
                self._await_restart(ray)
                deaths.append(_death(e))
                if len(deaths) < 2:
                    continue
                detail = deaths[-1]
                kind, error = Status.CRASH, f"crashed (it killed its Ray actor's process, and again on a fresh one{': ' + detail if detail else ''})"
            except BaseException:  # Ctrl-C while waiting: the actor's state is unknown
                self.close(healthy=False)
                raise
            else:
                out = replace(out, transport="ray")
                self.keeper.seen(impl.label, case, out)
                return out
            return kept_failure(self.keeper, impl, spec, case, kind, error, self.timeout, time.perf_counter() - start, "ray")

    def _actor(self, ray: Any) -> Any:
        if self.actor is None:
            self.actor = _CONNECTION.take(ray, self.refs)
            # The call's --timeout starts when the actor is up and has loaded the run's
            # implementations: a cold worker (a new process importing torch, seconds on a
            # busy node) is not the implementation hanging.  Bounded like any load.
            warm_up = _CONNECTION.started.get(self.actor)
            if warm_up is not None:
                try:
                    ray.get(warm_up, timeout=load_timeout())
                except ray.exceptions.GetTimeoutError:
                    raise UsageError(f"--ray {self.address}: an actor did not start and load the implementations within "
                                     f"{load_timeout():g} s (LOSSCMP_LOAD_TIMEOUT)") from None
                except ray.exceptions.RayError:
                    pass  # the call itself meets the same failure and reports it as a finding
        return self.actor

    def _await_restart(self, ray: Any, limit: float = 300.0) -> None:
        """Wait until Ray has restarted the actor, so that the next call, which may be another
        implementation's, is not refused by an actor still restarting and blamed for it."""
        deadline = time.monotonic() + limit
        # ActorUnavailableError is newer than the oldest Ray the extra allows (2.9): there,
        # a restarting actor raises RayActorError.
        restarting = getattr(ray.exceptions, "ActorUnavailableError", ray.exceptions.RayActorError)
        while True:
            try:
                ray.get(self.actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except restarting:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self, healthy: bool = True) -> None:
        """Give this runner's actor back to the run (kill it when its state is unknown:
        ``healthy`` False, or stopped by SIGTERM / Ctrl-C); the last runner to close ends
        the connection and every actor of the run."""
        if self.closed:
            return
        self.closed = True
        actor, self.actor = self.actor, None
        if actor is not None:
            if healthy:
                _CONNECTION.give_back(_ray(), actor, self)
            else:
                _CONNECTION.forget(actor)
                _kill(_ray(), actor)
        self.keeper.close()
        _CONNECTION.leave(self)


def _death(e: BaseException) -> str:
    """Ray's multi-line account of an actor's death, cut to the reason ("" when it gives none)."""
    text = " ".join(str(e).split())
    for marker in ("Worker exit detail: ", "The actor is dead because "):
        at = text.find(marker)
        if at >= 0:
            return text[at + len(marker):].split(". ")[0][:160].rstrip(" .")
    return ""


__all__ = ["RayRunner", "hold_connection", "release_connection", "stop_ray_runners"]
