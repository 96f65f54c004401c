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

Before a case is first sent to a worker it is written to ``<dir>/input-N.npz`` (plain
arrays, no pickle; ``meta`` holds the spec, sizes, strides and dtypes as JSON), so an
input that kills the worker -- or the whole machine -- is never lost.  Inputs that
crashed or hung a worker are kept (their path is in the crash message); the others are
deleted when their case is garbage collected or the runner closes.

Workers come from a fork server that has already imported torch (on platforms that
have one), so a restart after a crash costs a fork and the implementation's own import,
not a fresh interpreter importing torch (seconds).  Like ``spawn``, the fork server never
initialises CUDA, so workers can use CUDA.  Tensors travel as raw bytes with their
dtype, shape and strides (the layout the implementation sees is the case's own); CUDA
inputs are rebuilt on the same device in the worker and the results come back to it.
"""
from __future__ import annotations

import contextlib
import faulthandler
import itertools
import json
import os
import pickle
import re
import signal
import sys
import sysconfig
import tempfile
import time
import types
import weakref
from dataclasses import replace
from multiprocessing import connection as mpc
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as tmp

from .generate import Case
from .load import Implementation, Ref
from .run import Outcome, call
from .spec import Spec

__all__ = ["IsolatedRunner"]

# How long a worker may take to start and import its implementation (not a call's timeout).
LOAD_TIMEOUT = 300.0
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_SHUTDOWN = b""


def _context(start_method: str | None):
    if start_method is None:
        start_method = "forkserver" if "forkserver" in tmp.get_all_start_methods() else "spawn"
    ctx = tmp.get_context(start_method)
    if start_method == "forkserver":
        # Only torch and losscmp: never the implementations (a fork of an installed
        # package must be imported fresh in its own worker) and never CUDA.
        ctx.set_forkserver_preload(["torch", "losscmp.isolate"])
    return ctx


class IsolatedRunner:
    """``runner(impl, spec, case) -> Outcome``, each implementation in its own process."""

    def __init__(self, timeout: float | None = None, *, start_method: str | None = None,
                 input_dir: str | Path | None = None, load_timeout: float = LOAD_TIMEOUT):
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self.load_timeout = load_timeout
        self._ctx = _context(start_method)
        self._given_dir = Path(input_dir) if input_dir is not None else None
        self._state = _State()
        self._saved: weakref.WeakKeyDictionary[Case, str] = weakref.WeakKeyDictionary()
        self._count = itertools.count()
        self._closed = False
        # Workers and unneeded input files go when the runner is closed, collected, or at exit.
        self._finalizer = weakref.finalize(self, self._state.close)

    # ------------------------------------------------------------------ public API
    def __call__(self, impl: Implementation, spec: Spec, case: Case) -> Outcome:
        if self._closed:
            raise RuntimeError("this IsolatedRunner is closed")
        path = self._save(spec, case)
        worker = self._worker(impl)
        if worker.failure is not None:
            return worker.failure
        device = next(iter(case.tensors.values())).device
        spec_part = None if worker.spec is spec else spec
        request = pickle.dumps(
            (spec_part, {k: _pack(t) for k, t in case.tensors.items()}, dict(case.params), str(device)), _PROTOCOL
        )
        start = time.perf_counter()
        try:
            try:
                worker.conn.send_bytes(request)
            except OSError:  # died before reading it all
                reply: Any = worker.death()
            else:
                worker.spec = spec
                reply = worker.receive(self.timeout)
        except BaseException:  # Ctrl-C while waiting: the worker's state is unknown
            self._discard(impl.label, kill=True)
            raise
        seconds = time.perf_counter() - start
        if isinstance(reply, _Died):
            self._keep(path)
            self._discard(impl.label)
            where = f" in {reply.site}" if reply.site else ""
            return Outcome("crash", error=f"crashed ({reply.why}){where}; input saved to {path}", seconds=seconds)
        if reply is None:
            self._keep(path)
            self._discard(impl.label, kill=True)
            return Outcome("timeout", error=f"did not return within {self.timeout:g} s", seconds=seconds)
        return _unpack_outcome(reply, device)

    def close(self) -> None:
        """Stop every worker; delete the saved inputs nobody needs.  Safe to call twice."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "IsolatedRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def input_dir(self) -> Path | None:
        """Where inputs are saved (created on first use)."""
        return self._state.dir

    # ------------------------------------------------------------------ workers
    def _worker(self, impl: Implementation) -> "_Worker":
        label, source = impl.label, impl.ref.source()
        w = self._state.workers.get(label)
        if w is not None and (w.source != source or (w.ready and not w.proc.is_alive())):
            # Same label, different implementation; or killed between calls (not by a case).
            self._discard(label)
            w = None
        if w is None:
            w = _Worker.start(self._ctx, label, impl.ref, self._dir(), next(self._count))
            self._state.workers[label] = w
        if not w.ready and w.failure is None:
            w.handshake(self.load_timeout)
        return w

    def _discard(self, label: str, kill: bool = False) -> None:
        w = self._state.workers.pop(label, None)
        if w is not None:
            w.stop(kill=kill)

    # ------------------------------------------------------------------ saved inputs
    def _dir(self) -> Path:
        if self._state.dir is None:
            if self._given_dir is not None:
                self._given_dir.mkdir(parents=True, exist_ok=True)
                self._state.dir = Path(tempfile.mkdtemp(prefix="losscmp-isolate-", dir=self._given_dir))
            else:
                self._state.dir = Path(tempfile.mkdtemp(prefix="losscmp-isolate-"))
        return self._state.dir

    def _save(self, spec: Spec, case: Case) -> str:
        path = self._saved.get(case)
        if path is not None:
            return path
        path = str(self._dir() / f"input-{next(self._count)}.npz")
        _save_case(path, spec, case)
        self._saved[case] = path
        self._state.files.add(path)
        weakref.finalize(case, _forget, self._state.files, path)
        return path

    def _keep(self, path: str) -> None:
        self._state.files.discard(path)  # no longer ours to delete


def _forget(files: set[str], path: str) -> None:
    if path in files:
        files.discard(path)
        try:
            os.unlink(path)
        except OSError:
            pass


class _State:
    """Everything the finaliser needs, with no reference back to the runner."""

    def __init__(self) -> None:
        self.workers: dict[str, _Worker] = {}
        self.files: set[str] = set()
        self.dir: Path | None = None

    def close(self) -> None:
        workers = list(self.workers.values())
        self.workers.clear()
        for w in workers:
            w.ask_to_stop()
        deadline = time.monotonic() + 2.0
        for w in workers:
            w.stop(wait=max(0.0, deadline - time.monotonic()))
        for path in list(self.files):
            _forget(self.files, path)
        if self.dir is not None:
            for fault in self.dir.glob("fault-*.txt"):
                try:
                    fault.unlink()
                except OSError:
                    pass
            try:
                self.dir.rmdir()  # only if empty: kept inputs stay
            except OSError:
                pass


class _Died:
    def __init__(self, why: str, site: str | None):
        self.why, self.site = why, site


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, label: str, source: str, proc: Any, conn: Any, fault_path: Path):
        self.label, self.source, self.proc, self.conn, self.fault_path = label, source, proc, conn, fault_path
        self.ready = False
        self.stopped = False
        self.failure: Outcome | None = None  # loading failed: the answer to every call
        self.spec: Spec | None = None  # the spec the worker holds

    @classmethod
    def start(cls, ctx: Any, label: str, ref: Ref, directory: Path, n: int) -> "_Worker":
        fault_path = directory / f"fault-{n}.txt"
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=_worker_main,
            args=(child_conn, _portable_ref(ref), str(fault_path)),
            name=f"losscmp-isolate[{label}]",
            daemon=True,
        )
        with _main_hidden():
            proc.start()
        child_conn.close()
        return cls(label, ref.source(), proc, parent_conn, fault_path)

    def handshake(self, limit: float) -> None:
        start = time.perf_counter()
        reply = self.receive(limit)
        seconds = time.perf_counter() - start
        if isinstance(reply, _Died):
            where = f" in {reply.site}" if reply.site else ""
            self.failure = Outcome("crash", error=f"crashed ({reply.why}) while loading{where}", seconds=seconds)
        elif reply is None:
            self.failure = Outcome("timeout", error=f"loading did not finish within {limit:g} s", seconds=seconds)
        elif reply[0] == "ready":
            self.ready = True
            return
        else:
            self.failure = Outcome("exception", error=f"could not be loaded in its worker: {reply[1]}", seconds=seconds)
        self.stop(kill=True)

    def receive(self, timeout: float | None) -> Any:
        """The worker's next message, a :class:`_Died`, or None after ``timeout`` seconds."""
        ready = mpc.wait([self.conn, self.proc.sentinel], timeout)
        if self.conn in ready:
            try:
                return pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError, pickle.UnpicklingError):
                pass  # died while (or instead of) answering
        elif not ready:
            return None
        return self.death()

    def death(self) -> _Died:
        self.proc.join(5.0)
        code = self.proc.exitcode
        if code is None:
            why = "closed its pipe"
        elif code < 0:
            try:
                why = f"signal {signal.Signals(-code).name}"
            except ValueError:
                why = f"signal {-code}"
        else:
            why = f"exit code {code}"
        return _Died(why, _crash_site(self.fault_path))

    def ask_to_stop(self) -> None:
        if self.stopped:
            return
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
def _worker_main(conn: Any, ref: Ref, fault_path: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    _die_with_parent()
    fault = open(fault_path, "w")
    faulthandler.enable(fault, all_threads=False)
    from .load import LoadError, load_implementation

    try:
        impl = load_implementation(ref)
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
            new_spec, packed, params, device = pickle.loads(msg)
            spec = new_spec if new_spec is not None else spec
            dev = torch.device(device)
            case = Case(tensors={k: _unpack(p, dev) for k, p in packed.items()}, sizes={}, params=params)
        except Exception as e:  # a device this process cannot use, say
            why = f"the worker could not rebuild the inputs: {type(e).__name__}: {_one_line(e)}"
            conn.send_bytes(_pack_outcome(Outcome("exception", error=why)))
            continue
        out = call(impl.fn, spec, case)
        try:
            reply = _pack_outcome(out)
        except Exception as e:  # a value that cannot travel (a sparse tensor, say)
            reply = _pack_outcome(Outcome("exception", error=f"result could not be sent back: {_one_line(e)}", seconds=out.seconds))
        conn.send_bytes(reply)


def _die_with_parent() -> None:
    """On Linux, the worker gets SIGKILL when its parent dies (even mid-hang)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
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


def _pack_outcome(o: Outcome) -> bytes:
    value = None if o.value is None else _pack(o.value)
    grads = {k: (None if g is None else _pack(g)) for k, g in o.grads.items()}
    return pickle.dumps(("outcome", o.status, value, grads, o.error, o.seconds, tuple(o.mutated)), _PROTOCOL)


def _unpack_outcome(reply: tuple, device: torch.device) -> Outcome:
    _, status, value, grads, error, seconds, mutated = reply
    return Outcome(
        status,
        value=None if value is None else _unpack(value, device),
        grads={k: (None if g is None else _unpack(g, device)) for k, g in grads.items()},
        error=error,
        seconds=seconds,
        mutated=mutated,
    )


# ---------------------------------------------------------------------- helpers
def _save_case(path: str, spec: Spec, case: Case) -> None:
    from .repro import _atomic_write, dtype_name, tensor_to_numpy

    arrays = {f"input.{k}": tensor_to_numpy(t) for k, t in case.tensors.items()}
    meta = {
        "format": "losscmp-isolate-input/1",
        "spec": spec.text(),
        "sizes": case.sizes,
        "params": {k: repr(v) for k, v in case.params.items()},
        "tensors": {
            k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "stride": list(t.stride()), "device": str(t.device)}
            for k, t in case.tensors.items()
        },
        "case": case.describe(),
    }
    arrays["meta"] = np.array(json.dumps(meta))
    _atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def _portable_ref(ref: Ref) -> Ref:
    """The reference with a file target made absolute, so the worker finds it from anywhere."""
    if not ref.is_path or Path(ref.target).is_absolute():
        return ref
    if Path(ref.target).exists():
        return replace(ref, target=str(Path(ref.target).resolve()))
    # Loaded relative to some other folder (a repro's base_dir): find the file it came from.
    want = Path(ref.target).parts
    from . import load

    modules = list(sys.modules.values()) + list(getattr(load, "_SHADOW_CACHE", {}).values())
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


_FRAME_RE = re.compile(r'^\s*File "(.*)", line (\d+) in (.+)$')


def _library_dirs() -> tuple[str, ...]:
    dirs = {str(Path(__file__).resolve().parent)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            dirs.add(str(Path(sysconfig.get_paths()[key]).resolve()))
        except (KeyError, OSError):
            pass
    return tuple(d.rstrip(os.sep) + os.sep for d in dirs)


def _crash_site(fault_path: Path) -> str | None:
    """The innermost frame of the implementation in the fault handler's dump, as text."""
    try:
        text = fault_path.read_text(errors="replace")
    except OSError:
        return None
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
