"""``--ray ADDRESS``: implementations called by actors on a Ray cluster.

:class:`RayRunner` is the ``RunnerKind.RAY`` row of ``engine.RUNNERS``:
``runner(impl, spec, case) -> Outcome`` like every runner.  Each runner owns one actor
(a Ray worker process somewhere on the cluster) that loads each implementation once,
from its reference text (as an isolated worker does), and then serves calls: the case's
tensors go out, the :class:`~losscmp.run.Outcome` comes back; the actor runs
:func:`losscmp.run.call` exactly as the in-process runner does.  With ``--jobs N`` the
example budget is shared as ``--jobs`` shares it (:mod:`losscmp.jobs`): N explorations,
each with its own runner and so its own actor; the same seed and N give the same report
as ``--jobs N`` on one machine, and with one job the same report as one process.

* An implementation that kills its actor (segfault, ``os._exit``, OOM) gives an
  ``Outcome("crash")``; its input was saved before the call (:class:`workers.CaseKeeper`)
  and is kept as a crash repro.  Ray restarts the actor (``max_restarts``) and the next
  call goes to the fresh one.
* With ``timeout`` set, a call that has not returned in time gets its actor killed (and
  restarted) and gives an ``Outcome("timeout")``.
* ``"local"`` starts a Ray instance in this process; any other address joins a running
  cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``).  The connection is made by the
  first runner that needs it and ended when the last runner closes, so no actor and no
  local instance outlives the run: on Ctrl-C (the runners close as the exception passes)
  and on SIGTERM (``workers.register_for_sigterm``) as at the end.

Ray is an optional dependency (``pip install "losscmp[ray]"``): it is imported here only,
and only when a run asks for it.  The actor process needs losscmp and the
implementations' files at the same paths (a shared file system, or a Ray runtime
environment that provides them).
"""
from __future__ import annotations

from dataclasses import replace
import threading
import time
import weakref
from typing import Any

from .errors import UsageError
from .generate import Case
from .load import Implementation, LoadError, Ref, load_implementation
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
class _Connection:
    """This process's link to Ray, shared by the runners alive, ended with the last one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.ours = False  # made by a runner (not by the user before calling losscmp)
        self.runners: weakref.WeakSet[RayRunner] = weakref.WeakSet()

    def join(self, runner: RayRunner) -> None:
        with self.lock:
            self.users += 1
            self.runners.add(runner)

    def ensure(self, address: str) -> Any:
        ray = _ray()
        with self.lock:
            if not ray.is_initialized():
                try:
                    if address == "local":
                        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
                    else:
                        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
                except Exception as e:  # no cluster there, a version mismatch, ...
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    what = "could not start a local Ray instance" if address == "local" else f"could not join the Ray cluster at {address}"
                    raise UsageError(f"--ray {address}: {what}: {first}") from None
                self.ours = True
        return ray

    def leave(self, runner: RayRunner) -> None:
        with self.lock:
            self.runners.discard(runner)
            self.users -= 1
            if self.users > 0 or not self.ours:
                return
            self.ours = False
        ray = _ray()
        if ray.is_initialized():
            ray.shutdown()

    def close(self, fast: bool = False) -> None:
        """SIGTERM: every actor killed, the connection (and a local instance) ended."""
        for runner in list(self.runners):
            runner.close()


_CONNECTION = _Connection()


def stop_ray_runners() -> None:
    """Ctrl-C or a failed share: kill every live runner's actor; a call made after that
    raises KeyboardInterrupt, so explorations in other threads stop too."""
    _CONNECTION.close()


# ---------------------------------------------------------------------- the actor
class _Actor:
    """Runs on the cluster: loads each implementation once, calls it on the cases sent."""

    def __init__(self) -> None:
        self.impls: dict[str, Implementation | Outcome] = {}

    def call(self, ref: Ref, spec: Spec, tensors: dict, params: dict) -> Outcome:
        key = ref.source()
        impl = self.impls.get(key)
        if impl is None:
            try:
                impl = load_implementation(ref)
            except Exception as e:  # the answer to every call, as an isolated worker's
                why = str(e) if isinstance(e, LoadError) else f"{type(e).__name__}: {e}"
                impl = Outcome(Status.EXCEPTION, error=f"could not be loaded on the Ray worker: {' '.join(why.split())}")
            self.impls[key] = impl
        if isinstance(impl, Outcome):
            return impl
        return call(impl.fn, spec, Case(tensors=tensors, sizes={}, params=params))

    def ready(self) -> bool:
        return True


# ---------------------------------------------------------------------- the runner
class RayRunner:
    """``runner(impl, spec, case) -> Outcome``, the call made by this runner's actor."""

    def __init__(self, address: str, timeout: float | None = None, record: RunRecord = RunRecord()):
        check_ray_installed()
        self.address, self.timeout = address, timeout
        self.keeper = CaseKeeper(record)
        self.actor: Any = None
        self.closed = False
        _CONNECTION.join(self)
        register_for_sigterm(_CONNECTION)
        # Connect now, from the thread that builds the first runner (the run's own): a local
        # instance's processes die with the *thread* that started them (Linux's parent-death
        # signal), so starting it from an exploration thread would end it with that thread.
        try:
            _CONNECTION.ensure(address)
        except BaseException:
            self.close()
            raise

    def __call__(self, impl: Implementation, spec: Spec, case: Case) -> Outcome:
        if self.closed:  # stopped by Ctrl-C or SIGTERM in another thread: end this exploration too
            raise KeyboardInterrupt("the Ray run was stopped")
        if not impl.ref.target or "<" in impl.ref.source():
            raise UsageError(f"--ray needs implementations importable by reference; {impl.label} is not")
        ray = _ray()
        actor = self._actor(ray)
        self.keeper.before(impl, spec, case)  # an input that kills the actor is never lost
        start = time.perf_counter()
        pending = actor.call.remote(portable_ref(impl.ref), spec, dict(case.tensors), dict(case.params))
        try:
            out = ray.get(pending, timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor, no_restart=False)  # Ray starts a fresh one for the next call
            self._await_restart(ray)
            kind, error = Status.TIMEOUT, f"did not return within {self.timeout:g} s"
        except ray.exceptions.RayActorError as e:
            # The actor was healthy when the call went out (see _await_restart): this call killed it.
            self._await_restart(ray)
            detail = _death(e)
            kind, error = Status.CRASH, f"crashed (it killed its Ray actor's process{': ' + detail if detail else ''})"
        except BaseException:  # Ctrl-C while waiting: the actor's state is unknown
            self.close()
            raise
        else:
            out = replace(out, transport="ray")
            self.keeper.seen(impl.label, case, out)
            return out
        return kept_failure(self.keeper, impl, spec, case, kind, error, self.timeout, time.perf_counter() - start, "ray")

    def _actor(self, ray: Any) -> Any:
        if self.actor is None:
            remote = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=0)(_Actor)
            self.actor = remote.remote()
        return self.actor

    def _await_restart(self, ray: Any, limit: float = 300.0) -> None:
        """Wait until Ray has restarted the actor, so that the next call, which may be another
        implementation's, is not refused by an actor still restarting and blamed for it."""
        deadline = time.monotonic() + limit
        while True:
            try:
                ray.get(self.actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        """Kill this runner's actor; the last runner to close ends the connection."""
        if self.closed:
            return
        self.closed = True
        actor, self.actor = self.actor, None
        if actor is not None:
            try:
                _ray().kill(actor, no_restart=True)
            except Exception:  # already gone with its cluster
                pass
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


__all__ = ["RayRunner", "stop_ray_runners"]
