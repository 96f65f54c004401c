"""Running implementations in worker processes (``--isolate``): survive crashes and hangs.

:class:`IsolatedRunner` is a drop-in for the in-process runner of :mod:`losscmp.audit`:
``runner(impl, spec, case) -> Outcome``.  Each implementation label gets one worker
process, started on first use, which loads the implementation itself from its
reference (so a forked package whose name collides with an installed one lives in its
own interpreter) and then serves calls in a loop: one pipe round trip per call, the
worker running :func:`losscmp.run.call` exactly as the in-process runner does.

* A worker that dies (segfault, abort, ``os._exit``) gives an ``Outcome("crash")``
  naming the signal and, when Python's fault handler caught it, the innermost frame of
  the implementation; the next call starts a fresh worker.
* With ``timeout`` set, a call that has not returned in time gets its worker killed and
  gives an ``Outcome("timeout")``.
* An implementation that cannot be loaded in the worker gives an
  ``Outcome("exception")`` on every call (it is not retried).

Before a case is first sent to a worker it is written as an ordinary repro file (the
format of :mod:`losscmp.repro`, ``losscmp replay`` reads it), so an input that kills
the worker -- or the whole machine -- is never lost.  An input that crashed or hung a
worker is kept as a repro of kind "crash" or "timeout" naming the implementation and
its partner (its path is in the message); the others are deleted when their case is
garbage collected or the runner closes.  Kept repros go to ``keep_dir`` when given (the
CLI's save folder), else they stay in the runner's temporary folder.

Workers die with losscmp: each asks the kernel for SIGKILL when its parent dies, and a
forkserver worker closes its copy of the fork server's "parent alive" pipe so the fork
server (its parent) notices losscmp's death, exits, and takes the worker with it.  On
SIGTERM the runners stop their workers and delete their temporary files before the
process ends the way SIGTERM ends it.

An implementation without an importable reference (a lambda, a local function, a
closure handed to the pytest plugin) cannot be re-loaded by a fresh worker; its worker
is started with the ``fork`` start method instead and inherits the callable itself.
(CUDA cannot be used in a forked child once the parent has initialised it: such a case
is refused with a one-line error rather than reported as the implementation's failure.)

Workers come from a fork server that has already imported torch (on platforms that
have one), so a restart after a crash costs a fork and the implementation's own import,
not a fresh interpreter importing torch (seconds).  Like ``spawn``, the fork server never
initialises CUDA, so workers can use CUDA.  CPU tensors travel as raw bytes with their
dtype, shape and strides (the layout the implementation sees is the case's own).  CUDA
inputs are shared with the worker by CUDA IPC (``torch.multiprocessing``'s reductions:
the worker maps the case's own device memory, same bits, no host round trip); a forked
worker cannot, and gets a host copy.  Results come back as bytes and are rebuilt on the
case's device.  ``Outcome.transport`` says which way the inputs went.  A CUDA error that
may poison the worker's context (an illegal access, a device-side assert, an OOM) is the
implementation's finding ("exception"); the worker then exits and the next call gets a
fresh process with a fresh context.  A segfault (a JIT's, say) is a "crash", as on CPU.
"""
from __future__ import annotations

import contextlib
import faulthandler
import itertools
import os
import pickle
import signal
import sys
import time
import types
from dataclasses import replace
from multiprocessing import connection as mpc
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as tmp

from ._standalone_worker import poisons_cuda
from .breadcrumbs import request_death_signal
from .forking import WHY_NOT_FORKED, check_socket_folder, loads_by_reference, torch_survives_fork
from .load import Implementation, LoadError, Ref, load_implementation
from .model import Case, Outcome, RunRecord, Status  # RunRecord re-exported: moved to model
from .run import call, no_user_interrupts
from .spec import Spec
from .workers import Died, IsolationError, Transport, WorkerRunner, crash_site, exit_reason, in_worker_process, portable_ref

__all__ = ["IsolatedRunner", "IsolationError", "RunRecord", "Transport"]  # the last three re-exported: their home is workers / model

# How long a worker may take to start and import its implementation (not a call's timeout).
LOAD_TIMEOUT = 300.0
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_SHUTDOWN = b""


def _context(start_method: str | None):
    if start_method is None:
        start_method = "forkserver" if "forkserver" in tmp.get_all_start_methods() else "spawn"
    ctx = tmp.get_context(start_method)
    if start_method == "forkserver":
        check_socket_folder()
        # Only torch and losscmp: never the implementations (a fork of an installed
        # package must be imported fresh in its own worker) and never CUDA.
        ctx.set_forkserver_preload(["torch", "losscmp.isolate"])
    return ctx


# ---------------------------------------------------------------------- the runner
class IsolatedRunner(WorkerRunner):
    """``runner(impl, spec, case) -> Outcome``, each implementation in its own process
    (the round trip, case keeping and cleanup: :class:`losscmp.workers.WorkerRunner`)."""

    def __init__(self, timeout: float | None = None, *, start_method: str | None = None,
                 input_dir: str | Path | None = None, load_timeout: float = LOAD_TIMEOUT,
                 record: RunRecord = RunRecord()):
        super().__init__(timeout, record=record, input_dir=input_dir)
        self.load_timeout = load_timeout
        self._start_method = start_method
        self._ctx = _context(start_method)
        self._count = itertools.count()
        self._portable: dict[str, bool] = {}

    # ------------------------------------------------------------------ public API
    def __call__(self, impl: Implementation, spec: Spec, case: Case) -> Outcome:
        self.check_open()
        device = next(iter(case.tensors.values())).device
        worker = self._worker(impl, device)
        if worker.failure is not None:
            return worker.failure
        spec_part = None if worker.spec is spec else spec
        if device.type == "cuda" and worker.ipc:
            # The worker maps the case's own CUDA memory: same bits, no copy through the host.
            transport = Transport.CUDA_IPC
            request = bytes(ForkingPickler.dumps((spec_part, dict(case.tensors), dict(case.params), str(device), True), _PROTOCOL))
        else:
            transport = Transport.HOST_COPY if device.type == "cuda" else Transport.PIPE
            request = pickle.dumps(
                (spec_part, {k: _pack(t) for k, t in case.tensors.items()}, dict(case.params), str(device), False), _PROTOCOL
            )
        failed, reply = self.round_trip(impl, spec, case, worker, lambda: worker.send(request, spec), transport)
        if failed is not None:
            return failed
        out, restart = _unpack_outcome(reply, device)
        if restart:  # a CUDA error that may poison the context: the worker has exited
            self.discard(impl.label)
        out = replace(out, transport=transport)
        self.keeper.seen(impl.label, case, out)
        return out

    def __enter__(self) -> IsolatedRunner:
        return self

    @property
    def input_dir(self) -> Path | None:
        """Where inputs are saved (created on first use)."""
        return self.keeper.dir

    # ------------------------------------------------------------------ workers
    def _worker(self, impl: Implementation, device: torch.device) -> _Worker:
        label, source = impl.label, impl.ref.source()
        w = self.state.workers.get(label)
        assert w is None or isinstance(w, _Worker)
        if w is not None and (w.source != source or (w.ready and not w.proc.is_alive())):
            # Same label, different implementation; or killed between calls (not by a case).
            self.discard(label)
            w = None
        if w is None:
            portable = self._is_portable(impl)
            if not portable and not torch_survives_fork():
                raise IsolationError(
                    f"{label} has no importable reference (a lambda or a local function?), so its worker would have "
                    f"to be forked, and {WHY_NOT_FORKED}: give it as file.py:attr or module:attr"
                )
            if portable:
                w = _Worker.start(self._ctx, label, impl.ref, portable_ref(impl.ref), self.keeper.directory(), next(self._count))
            else:
                w = _Worker.start(tmp.get_context("fork"), label, impl.ref, impl, self.keeper.directory(), next(self._count))
            self.state.workers[label] = w
        if not w.ready and w.failure is None:
            w.handshake(self.load_timeout)
        return w

    def _is_portable(self, impl: Implementation) -> bool:
        """Does a fresh process loading ``impl.ref`` get this very callable (up to a factory call)?

        A factory reference (``SamplesLoss(...)``) is re-called in the worker, as the CLI
        itself did; anything else must resolve here to the object we hold, else (a lambda, a
        local function, a test's closure) the worker is forked and inherits the callable.
        """
        label = impl.label
        if label not in self._portable:
            if self._start_method == "fork":
                self._portable[label] = True  # every worker inherits everything anyway
            else:
                self._portable[label] = loads_by_reference(impl, portable_ref)
        return self._portable[label]


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, label: str, source: str, proc: Any, conn: Any, fault_path: Path, ipc: bool):
        self.label, self.source, self.proc, self.conn, self.fault_path = label, source, proc, conn, fault_path
        self.ipc = ipc  # started by spawn or the fork server: CUDA tensors can be shared with it
        self.ready = False
        self.stopped = self.asked = False
        self.failure: Outcome | None = None  # loading failed: the answer to every call
        self.spec: Spec | None = None  # the spec the worker holds

    @classmethod
    def start(cls, ctx: Any, label: str, ref: Ref, what: Ref | Implementation, directory: Path, n: int) -> _Worker:
        """``what`` is a reference the worker loads, or (fork) the implementation it inherits."""
        fault_path = directory / f"fault-{n}.txt"
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=_worker_main,
            args=(child_conn, what, str(fault_path)),
            name=f"losscmp-isolate[{label}]",
            daemon=True,
        )
        with _main_hidden():
            proc.start()
        child_conn.close()
        return cls(label, ref.source(), proc, parent_conn, fault_path, ipc=ctx.get_start_method() != "fork")

    def handshake(self, limit: float) -> None:
        start = time.perf_counter()
        reply = self.receive(limit)
        seconds = time.perf_counter() - start
        if isinstance(reply, Died):
            where = f" in {reply.site}" if reply.site else ""
            self.failure = Outcome(Status.CRASH, error=f"crashed ({reply.why}) while loading{where}", seconds=seconds)
        elif reply is None:
            self.failure = Outcome(Status.TIMEOUT, error=f"loading did not finish within {limit:g} s", seconds=seconds)
        elif reply[0] == "ready":
            self.ready = True
            return
        else:
            self.failure = Outcome(Status.EXCEPTION, error=f"could not be loaded in its worker: {reply[1]}", seconds=seconds)
        self.stop(kill=True)

    def receive(self, timeout: float | None) -> Any:
        """The worker's next message, a :class:`~losscmp.workers.Died`, or None after ``timeout`` seconds."""
        ready = mpc.wait([self.conn, self.proc.sentinel], timeout)
        if self.conn in ready:
            try:
                return pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError, pickle.UnpicklingError):
                pass  # died while (or instead of) answering
        elif not ready:
            return None
        return self.death()

    def send(self, request: bytes, spec: Spec) -> bool:
        """False when the worker died before reading it all."""
        try:
            self.conn.send_bytes(request)
        except OSError:
            return False
        self.spec = spec
        return True

    def death(self) -> Died:
        self.proc.join(5.0)
        return Died(exit_reason(self.proc.exitcode), crash_site(self.fault_path))

    def ask_to_stop(self) -> None:
        # Once: stop() asks too, and a worker discarded without close() had not been asked
        # (it used to wait out ``wait`` for an exit nobody had requested, then be killed).
        if self.asked:
            return
        self.asked = True
        try:
            self.conn.send_bytes(_SHUTDOWN)
        except (OSError, ValueError):
            pass

    def stop(self, kill: bool = False, wait: float = 1.0) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.proc.exitcode is None:
            if kill:
                self.proc.kill()
            else:
                self.ask_to_stop()
                self.proc.join(wait)
                if self.proc.exitcode is None:
                    self.proc.kill()
            self.proc.join(5.0)
        try:
            self.conn.close()
        except OSError:
            pass
        try:
            self.proc.close()
        except ValueError:
            pass
        try:
            self.fault_path.unlink()
        except OSError:
            pass


@contextlib.contextmanager
def _main_hidden():
    """Start a worker without re-running the parent's ``__main__`` in it.

    multiprocessing re-imports the main script in spawned children (for pickled
    references into it).  Workers need nothing from it: skipping it saves the import,
    and a script without an ``if __name__ == "__main__":`` guard still works.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


# ---------------------------------------------------------------------- the worker
def _worker_main(conn: Any, what: Ref | Implementation, fault_path: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    no_user_interrupts()  # so a KeyboardInterrupt here is the implementation's: a finding
    in_worker_process()  # a forked worker must not clean up the parent's runners on SIGTERM
    _die_with_parent()
    fault = open(fault_path, "w")
    faulthandler.enable(fault, all_threads=False)

    if isinstance(what, Implementation):  # forked: the callable came with the process
        impl = what
    else:
        try:
            impl = load_implementation(what)
        except Exception as e:
            why = _one_line(e) if isinstance(e, LoadError) else f"{type(e).__name__}: {_one_line(e)}"
            conn.send_bytes(pickle.dumps(("error", why), _PROTOCOL))
            return
    conn.send_bytes(pickle.dumps(("ready",), _PROTOCOL))
    spec: Spec | None = None
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if msg == _SHUTDOWN:
            return
        try:
            new_spec, packed, params, device, shared = pickle.loads(msg)
            spec = new_spec if new_spec is not None else spec
            if spec is None:  # the first request always carries the spec
                raise ValueError("no spec was sent with the first request")
            dev = torch.device(device)
            tensors = dict(packed) if shared else {k: _unpack(p, dev) for k, p in packed.items()}
            case = Case(tensors=tensors, sizes={}, params=params)
        except Exception as e:  # a device this process cannot use, say
            why = f"the worker could not rebuild the inputs: {type(e).__name__}: {_one_line(e)}"
            conn.send_bytes(_pack_outcome(Outcome(Status.EXCEPTION, error=why)))
            continue
        try:
            out = call(impl.fn, spec, case)
        except BaseException as e:  # the harness's own CUDA work after the call, in a context the call poisoned
            out = Outcome(Status.EXCEPTION, error=f"raised {type(e).__name__}: {_one_line(e)}")
        restart = dev.type == "cuda" and out.status == "exception" and poisons_cuda(out.error)
        try:
            reply = _pack_outcome(out, restart)
        except Exception as e:  # a value that cannot travel (a sparse tensor), or a context too broken to copy it
            restart = dev.type == "cuda"
            failed = Outcome(Status.EXCEPTION, error=f"result could not be sent back: {type(e).__name__}: {_one_line(e)}", seconds=out.seconds)
            reply = _pack_outcome(failed, restart)
        del case, tensors, packed  # let go of shared CUDA memory before answering
        conn.send_bytes(reply)
        if restart:
            return  # a fresh worker gets a fresh CUDA context


def _die_with_parent() -> None:
    """The worker dies with losscmp, even mid-hang.

    The kernel sends SIGKILL when the worker's parent dies (Linux).  A forkserver worker's
    parent is the fork server, which exits when the last holder of its "parent alive" pipe
    closes it -- and every worker inherits a copy of that pipe: close ours, or the fork
    server (and so the worker, and the resource tracker) would outlive losscmp forever.
    """
    request_death_signal()
    try:
        from multiprocessing import forkserver

        server = forkserver._forkserver
        fd = getattr(server, "_forkserver_alive_fd", None)
        if fd is not None:
            server._forkserver_alive_fd = None  # type: ignore[attr-defined]  # private: hence the getattr above
            os.close(fd)
    except (ImportError, AttributeError, OSError):
        pass


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------------- transport
def _pack(t: torch.Tensor) -> tuple:
    """A tensor as (dtype, shape, strides, raw bytes of its values in logical order)."""
    t = t.detach()
    c = t.cpu().contiguous()
    # A contiguous tensor's values are consecutive in memory (a size-1 dim may still
    # carry any stride, so flatten by hand rather than with reshape).
    raw = torch.as_strided(c, (c.numel(),), (1,)).view(torch.uint8).numpy().tobytes() if c.numel() else b""
    return (str(c.dtype).removeprefix("torch."), tuple(t.shape), tuple(t.stride()), raw)


def _unpack(p: tuple, device: torch.device) -> torch.Tensor:
    dtype_name, shape, stride, raw = p
    dtype = getattr(torch, dtype_name)
    if not raw:
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)
    values = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    if device.type == "cpu" and values.stride() == tuple(stride):
        return values
    out = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    try:
        return out.copy_(values)
    except RuntimeError:  # an overlapping layout (an expanded gradient): same values, dense
        return values.to(device)


def _pack_outcome(o: Outcome, restart: bool = False) -> bytes:
    value = None if o.value is None else _pack(o.value)
    grads = {k: (None if g is None else _pack(g)) for k, g in o.grads.items()}
    return pickle.dumps(("outcome", o.status, value, grads, o.error, o.seconds, tuple(o.mutated), o.output, restart), _PROTOCOL)


def _unpack_outcome(reply: tuple, device: torch.device) -> tuple[Outcome, bool]:
    _, status, value, grads, error, seconds, mutated, output, restart = reply
    out = Outcome(
        status,
        value=None if value is None else _unpack(value, device),
        grads={k: (None if g is None else _unpack(g, device)) for k, g in grads.items()},
        error=error,
        seconds=seconds,
        mutated=mutated,
        output=output,
    )
    return out, restart
