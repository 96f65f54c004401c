"""The worker machinery shared by every runner that calls implementations in another process.

The isolated runner (:mod:`losscmp.isolate`: a worker process per implementation), the
other-interpreter runner (:mod:`losscmp.interpreter`) and the Ray runner
(:mod:`losscmp.cluster`) differ in how they start a worker and what goes down its pipe;
what happens around a call is the same, and lives here:

* :class:`CaseKeeper` — each case written as a repro before it is risked, kept as a
  "crash" or "timeout" repro when the call killed or hung its worker, deleted otherwise.
* :class:`Died`, :func:`exit_reason`, :func:`crash_site` — how a worker ended (signal,
  exit code) and where (the innermost frame of the implementation in its fault log).
* :func:`kept_failure`, :func:`worker_failure` — a death or a silence turned into the
  crash / timeout :class:`~losscmp.model.Outcome`, its input kept.
* :func:`portable_ref` — a reference that a process started elsewhere can load.
* :class:`WorkerRunner` — the base of the process runners: one worker per label, the
  round trip of a call under its deadline, and every worker stopped (with the files
  nobody needs deleted) on close, garbage collection, exit or SIGTERM
  (:func:`register_for_sigterm`).

In: an implementation, its spec, a case and a worker handle (:class:`WorkerHandle`).
Out: the worker's reply, or the crash / timeout outcome.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Protocol

from . import load
from .load import Implementation, LoadError, Ref
from .model import Case, Outcome, RunRecord, Status
from .repro import save_case
from .spec import Spec

__all__ = ["CaseKeeper", "Died", "IsolationError", "Transport", "WorkerHandle", "WorkerRunner", "WorkerState",
           "crash_site", "exit_reason", "in_worker_process", "kept_failure", "portable_ref", "register_for_sigterm",
           "worker_failure"]


class IsolationError(LoadError):
    """An implementation that cannot be run in a worker at all; the message is one line.

    (A subclass of LoadError until the shared LosscmpError base lands: the CLI maps it to
    ``losscmp: error: ...`` and exit 2.)
    """


class Transport(str, Enum):
    """How a call's input tensors reached the implementation (``Outcome.transport``)."""

    IN_PROCESS = "in-process"
    PIPE = "pipe"  # CPU tensors as raw bytes through the worker's pipe
    CUDA_IPC = "cuda-ipc"  # CUDA tensors shared with the worker by CUDA IPC handles
    HOST_COPY = "host-copy"  # CUDA tensors copied to host bytes and rebuilt on the device


# ---------------------------------------------------------------------- cleanup on SIGTERM
_LIVE_STATES: weakref.WeakSet[Any] = weakref.WeakSet()
_SIGTERM_INSTALLED = False


def register_for_sigterm(state: Any) -> None:
    """Have ``state.close(fast=True)`` run when the process gets SIGTERM (default handler only)."""
    global _SIGTERM_INSTALLED
    _LIVE_STATES.add(state)
    if _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # someone else (pytest, the user) handles SIGTERM: theirs stays
    signal.signal(signal.SIGTERM, _on_sigterm)
    _SIGTERM_INSTALLED = True


def _on_sigterm(signum: int, frame: Any) -> None:
    for state in list(_LIVE_STATES):
        try:
            state.close(fast=True)
        except Exception:
            pass
    # Then end the way SIGTERM ends a process (exit status 143 / killed by SIGTERM).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def in_worker_process() -> None:
    """In a worker (a forked one inherits the parent's bookkeeping): SIGTERM ends it plainly;
    the parent's runners are not its to clean up."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _LIVE_STATES.clear()


# ---------------------------------------------------------------------- saved inputs
class CaseKeeper:
    """Writes each case before it is risked, keeps it as a repro when it crashed or hung.

    Shared by every runner that sends cases to a process that may die (isolated workers,
    other interpreters, Ray actors).  Pending files live in a private temporary folder and
    are deleted when their case is garbage collected or the keeper closes.
    """

    def __init__(self, record: RunRecord, input_dir: str | Path | None = None):
        self.record = record
        self._given_dir = Path(input_dir) if input_dir is not None else None
        self._pending: weakref.WeakKeyDictionary[Case, Path] = weakref.WeakKeyDictionary()
        self._seen: weakref.WeakKeyDictionary[Case, dict[str, Outcome]] = weakref.WeakKeyDictionary()
        self.files: set[Path] = set()  # pending .json paths; their .npz goes with them
        self.dir: Path | None = None

    def directory(self) -> Path:
        if self.dir is None:
            if self._given_dir is not None:
                self._given_dir.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix="losscmp-isolate-", dir=self._given_dir))
        return self.dir

    def before(self, impl: Implementation, spec: Spec, case: Case) -> Path:
        """The case written as a repro (once per case), before anything risky runs on it."""
        path = self._pending.get(case)
        if path is not None:
            return path
        # Written as if this call crashed: if losscmp dies now, the file says what ran.  A
        # dying worker leaves it in the page cache; only a CUDA case can take the machine
        # down with it (a driver fault), so only that one pays for an fsync per case.
        durable = any(t.is_cuda for t in case.tensors.values())
        path = self._save(self.directory(), impl, spec, case, Status.CRASH, "losscmp stopped while it was running", None, durable)
        self._pending[case] = path
        self.files.add(path)
        weakref.finalize(case, _forget, self.files, path, os.getpid())
        return path

    def seen(self, label: str, case: Case, outcome: Outcome) -> None:
        self._seen.setdefault(case, {})[label] = outcome

    def keep(self, impl: Implementation, spec: Spec, case: Case, kind: Status, error: str, timeout: float | None) -> Path:
        """The case as a kept repro of ``kind`` ("crash" or "timeout"); returns its .json path."""
        pending = self._pending.pop(case, None)
        if self.record.replaying is not None:  # a copy in a temporary folder would only be litter
            if pending is not None:
                _forget(self.files, pending)
            return self.record.replaying
        directory = self.record.keep_dir if self.record.keep_dir is not None else self.directory()
        try:
            # A repro already in the save folder under this name (the same case, kept by an
            # earlier run, which names it, and perhaps replayed it first) stays as it is: rewritten,
            # it would carry this run's id, and go at the end of this run if no finding shows it.
            kept = self._save(directory, impl, spec, case, kind, error, timeout, overwrite=self.record.keep_dir is None)
        except (OSError, TypeError, ValueError):  # an unwritable save folder: the pending copy stays
            if pending is None:
                raise
            self.files.discard(pending)
            return pending
        self.files.discard(kept)  # the pending file may have had this very name: it is kept now
        if pending is not None and pending != kept:
            _forget(self.files, pending)
        return kept

    def _save(self, directory: Path, impl: Implementation, spec: Spec, case: Case, kind: Status, error: str, timeout: float | None,
              durable: bool = True, overwrite: bool = True) -> Path:
        label = impl.label
        partner = self.record.partner(label)
        refs = {r.label: r for r in self.record.refs}
        refs[label] = impl.ref
        seen = self._seen.get(case, {})
        outcomes = {label: Outcome(kind, error=error)}
        if partner in seen:  # else save_case records the partner as not run on this case
            outcomes[partner] = seen[partner]
        return save_case(
            directory,
            spec=spec,
            case=case,
            refs=[refs[la] for la in dict.fromkeys((label, partner))],
            pair=(label, partner),
            kind=kind,
            outcomes=outcomes,
            tolerance=self.record.tolerance,
            seed=self.record.seed,
            device=str(next(iter(case.tensors.values())).device),
            extra={"isolate": True, "timeout": timeout, "error": error, **({"run": self.record.run_id} if self.record.run_id else {})},
            durable=durable,
            overwrite=overwrite,
        )

    def close(self) -> None:
        for path in list(self.files):
            _forget(self.files, path)
        if self.dir is not None:
            for fault in list(self.dir.glob("fault-*.txt")) + list(self.dir.glob("worker-*.log")):
                try:
                    fault.unlink()
                except OSError:
                    pass
            try:
                self.dir.rmdir()  # only if empty: kept inputs stay
            except OSError:
                pass


def remove_unnamed_repros(record: RunRecord, named: str) -> int:
    """Delete the crash and timeout repros this run kept in its save folder that nothing of
    its findings names (``named``: all their text); returns how many.

    Each case that kills or hangs a worker is kept the moment it happens (losscmp itself may
    be next), so a search that meets a crashing implementation 20 times kept 20 cases, and
    its minimiser more.  Once the run has finished, the cases its findings show (worst,
    mildest, minimal, each named by path) say everything the others did.  Only files that
    carry this run's id are touched: another run's, or a file a user copied there, stay.
    """
    if record.keep_dir is None or not record.run_id or not record.keep_dir.is_dir():
        return 0
    removed = 0
    for path in record.keep_dir.glob("*.json"):
        if path.name in named or not ("--crash--" in path.name or "--timeout--" in path.name):
            continue
        try:
            if json.loads(path.read_text()).get("run") != record.run_id:
                continue
            path.with_suffix(".npz").unlink(missing_ok=True)
            path.unlink()
            removed += 1
        except (OSError, ValueError, AttributeError):  # unreadable, half-written, not ours: left alone
            continue
    return removed


def _forget(files: set[Path], path: Path, owner: int | None = None) -> None:
    if owner is not None and owner != os.getpid():
        return  # a forked worker's copy of the bookkeeping: the files are the parent's
    if path in files:
        files.discard(path)
        for p in (path, path.with_suffix(".npz")):
            try:
                os.unlink(p)
            except OSError:
                pass


# ---------------------------------------------------------------------- deaths and silences
@dataclass(frozen=True)
class Died:
    """A worker's end: why (signal, exit code) and where (the innermost user frame), if known."""

    why: str
    site: str | None


def exit_reason(code: int | None) -> str:
    if code is None:
        return "closed its pipe"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def kept_failure(keeper: CaseKeeper, impl: Implementation, spec: Spec, case: Case, kind: Status, error: str,
                 timeout: float | None, seconds: float, transport: str) -> Outcome:
    """A call that killed or hung its worker: its input kept as a repro, named in the outcome."""
    kept = keeper.keep(impl, spec, case, kind, error, timeout)
    return Outcome(kind, error=f"{error}; input saved to {kept}", seconds=seconds, transport=transport)


def worker_failure(reply: Any, discard: Callable[[bool], None], keeper: CaseKeeper, impl: Implementation, spec: Spec,
                   case: Case, timeout: float | None, seconds: float, transport: str) -> Outcome | None:
    """A worker that died (:class:`Died`) or did not answer in time (None): the crash or
    timeout outcome, with its input kept as a repro and the worker discarded.  Any other
    reply: None."""
    if isinstance(reply, Died):
        discard(False)
        where = f" in {reply.site}" if reply.site else ""
        kind, error = Status.CRASH, f"crashed ({reply.why}){where}"
    elif reply is None:
        discard(True)
        kind, error = Status.TIMEOUT, f"did not return within {timeout:g} s"
    else:
        return None
    return kept_failure(keeper, impl, spec, case, kind, error, timeout, seconds, transport)


_FRAME_RE = re.compile(r'^\s*File "(.*)", line (\d+) in (.+)$')


def _library_dirs() -> tuple[str, ...]:
    dirs = {str(Path(__file__).resolve().parent)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            dirs.add(str(Path(sysconfig.get_paths()[key]).resolve()))
        except (KeyError, OSError):
            pass
    return tuple(d.rstrip(os.sep) + os.sep for d in dirs)


def crash_site(fault_path: Path) -> str | None:
    """The innermost frame of the implementation in the fault handler's dump, as text."""
    try:
        text = fault_path.read_text(errors="replace")
    except OSError:
        return None
    # The file may also hold what the implementation printed: read from the last dump on.
    marker = text.rfind("Fatal Python error")
    if marker >= 0:
        text = text[marker:]
    frames = []
    for line in text.splitlines():
        m = _FRAME_RE.match(line)
        if m:
            frames.append((m.group(1), m.group(2), m.group(3).strip()))
        elif frames and not line.strip():
            break  # the crashing thread's stack is the first one
    if not frames:
        return None
    libs = _library_dirs()
    chosen = next((f for f in frames if not str(Path(f[0]).resolve()).startswith(libs)), frames[0])
    file, line, func = chosen
    try:
        shown = os.path.relpath(file)
        file = shown if not shown.startswith("..") else file
    except ValueError:
        pass
    return f"{func} ({file}:{line})"


def portable_ref(ref: Ref) -> Ref:
    """The reference with a file target made absolute, so a worker finds it from anywhere."""
    if not ref.is_path or Path(ref.target).is_absolute():
        return ref
    if Path(ref.target).exists():
        return replace(ref, target=str(Path(ref.target).resolve()))
    # Loaded relative to some other folder (a repro's base_dir): find the file it came from.
    want = Path(ref.target).parts
    modules = list(sys.modules.values()) + list(load.shadow_modules())
    for m in modules:
        file = getattr(m, "__file__", None)
        if not file:
            continue
        p = Path(file)
        if p.name == "__init__.py" and p.parent.parts[-len(want):] == want:
            return replace(ref, target=str(p.parent))
        if p.parts[-len(want):] == want:
            return replace(ref, target=str(p))
    return ref


# ---------------------------------------------------------------------- the process runners' base
class WorkerHandle(Protocol):
    """The parent's handle on one worker process, whatever started it."""

    def receive(self, timeout: float | None) -> Any:
        """The worker's next message, a :class:`Died`, or None after ``timeout`` seconds."""

    def death(self) -> Died: ...

    def ask_to_stop(self) -> None: ...

    def stop(self, kill: bool = False, wait: float = 1.0) -> None: ...


class WorkerState:
    """A runner's workers and case keeper: everything its finaliser needs, with no
    reference back to the runner (so the runner can be garbage collected)."""

    def __init__(self, keeper: CaseKeeper) -> None:
        self.workers: dict[str, WorkerHandle] = {}
        self.keeper = keeper

    def close(self, fast: bool = False) -> None:
        workers = list(self.workers.values())
        self.workers.clear()
        if fast:  # SIGTERM: no time for manners
            for w in workers:
                w.stop(kill=True)
        else:  # all asked at once, so that N workers wind down in parallel
            for w in workers:
                w.ask_to_stop()
            deadline = time.monotonic() + 2.0
            for w in workers:
                w.stop(wait=max(0.0, deadline - time.monotonic()))
        self.keeper.close()


class WorkerRunner:
    """``runner(impl, spec, case) -> Outcome`` with each implementation in a worker process.

    Subclasses start their workers (``self.state.workers[label]``) and build each request;
    this base keeps the cases, makes the round trip under ``timeout``, turns a death or a
    silence into a finding, and stops every worker on close, collection, exit or SIGTERM.
    """

    def __init__(self, timeout: float | None = None, *, record: RunRecord = RunRecord(), input_dir: str | Path | None = None):
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self.state = WorkerState(CaseKeeper(record, input_dir))
        self.closed = False
        # Workers and unneeded input files go when the runner is closed, collected, at exit, or on SIGTERM.
        self._finalizer = weakref.finalize(self, self.state.close)
        register_for_sigterm(self.state)

    @property
    def keeper(self) -> CaseKeeper:
        return self.state.keeper

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"this {type(self).__name__} is closed")

    def round_trip(self, impl: Implementation, spec: Spec, case: Case, worker: WorkerHandle, send: Callable[[], bool],
                   transport: str) -> tuple[Outcome | None, Any]:
        """Keep the case, ``send`` the request (False: the worker is gone), wait for the reply.

        Returns ``(outcome, None)`` when the worker died or fell silent (the crash or timeout
        finding, its input kept), else ``(None, reply)``."""
        self.keeper.before(impl, spec, case)
        start = time.perf_counter()
        try:
            reply = worker.receive(self.timeout) if send() else worker.death()
        except BaseException:  # Ctrl-C while waiting: the worker's state is unknown
            self.discard(impl.label, kill=True)
            raise
        seconds = time.perf_counter() - start
        failed = worker_failure(reply, lambda kill: self.discard(impl.label, kill=kill), self.keeper, impl, spec, case,
                                self.timeout, seconds, transport)
        return failed, (None if failed is not None else reply)

    def discard(self, label: str, kill: bool = False) -> None:
        w = self.state.workers.pop(label, None)
        if w is not None:
            w.stop(kill=kill)

    def close(self) -> None:
        """Stop every worker; delete the saved inputs nobody needs.  Safe to call twice."""
        self.closed = True
        self._finalizer()

    def __enter__(self) -> WorkerRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
