"""Running an implementation under another Python interpreter (``--python LABEL=PATH``).

A paper's repository often pins its own environment (an old torch, its own copy of a
package).  :class:`InterpreterRunner` runs the implementations named in ``pythons`` in a
worker started by *that* interpreter, and every other implementation through a fallback
runner (in-process, or the isolated one).  The other environment needs torch and numpy
only, not losscmp: the worker is the self-contained file :mod:`losscmp._standalone_worker`,
handed to the interpreter by path, speaking a versioned, pickle-free protocol (a JSON
header plus raw tensor buffers over pipes; see that file).

The worker loads the reference itself, in its own environment -- so a fork installed
there under an installed package's name is the code that runs -- and computes value and
gradients exactly as :func:`losscmp.run.call` does.  Crashes and hangs are handled as in
the isolated runner: the case is saved as a repro before the call, kept as a "crash" or
"timeout" repro when the worker dies or overruns ``timeout``, and the next call starts a
fresh worker.  CUDA inputs reach the worker by host copy (another interpreter does not
share our CUDA runtime), and each outcome says so (``Outcome.transport``).

One-line errors (exit 2 from the CLI): a path that is not an executable file, an
interpreter too old for the worker (< 3.6), one without torch or numpy, a worker that
speaks another protocol version, a reference that interpreter cannot load.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from . import _standalone_worker as wire
from .errors import UsageError, shown
from .load import Implementation, Ref, load_timeout as load_limit
from .model import Case, Outcome, RunRecord
from .run import call
from .spec import Spec
from .workers import Died, IsolationError, Transport, WorkerRunner, crash_site, exit_reason, portable_ref

__all__ = ["InterpreterError", "InterpreterRunner", "WORKER_FILE", "check_python", "remote_implementation"]

WORKER_FILE = Path(wire.__file__).resolve()
PROTOCOL = wire.PROTOCOL
MIN_PYTHON = (3, 6)

# The first bytes any Python writes back, before its version check and before the worker
# imports torch: a program that is not a Python interpreter (one that hangs, or prints
# garbage) is told apart within BOOT_TIMEOUT instead of after the whole load timeout.
GREETING = b"losscmp-boot\n"
BOOT_TIMEOUT = 60.0

# Runs on any Python, old ones included, so a too-old interpreter is told apart from a broken worker.
_BOOT = (
    "import os, sys\n"
    "os.write(int(sys.argv[3]), %r)\n"
    "if sys.version_info < %r:\n"
    "    sys.stderr.write('losscmp-worker: python %%d.%%d is too old\\n' %% tuple(sys.version_info[:2]))\n"
    "    sys.exit(3)\n"
    "p = sys.argv[1]\n"
    "g = {'__name__': '__losscmp_worker__', '__file__': p}\n"
    "exec(compile(open(p).read(), p, 'exec'), g)\n"
    "g['main'](sys.argv[2:])\n"
)


def boot_code() -> str:
    """The ``-c`` program that checks the interpreter's version, then runs the worker file."""
    return _BOOT % (GREETING, tuple(MIN_PYTHON))

# The main environment's search path must not leak into the other one (losscmp itself could).
_ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "__PYVENV_LAUNCHER__")


class InterpreterError(IsolationError):
    """An interpreter that cannot serve an implementation; the message is one line."""


def check_python(label: str, path: str, option: str = "--python") -> str:
    """The absolute path of an executable interpreter file, or a one-line error."""
    where = f"{option} {label}={shown(path, quote=False)}"
    try:
        p = Path(path).expanduser()
        exists, is_dir = p.exists(), p.is_dir()
    except RuntimeError:  # ~nosuchuser (no such home folder), or a symlink loop before Python 3.13
        raise InterpreterError(f"{where}: {'no such user' if path.startswith('~') else 'a symlink loop'}") from None
    except OSError as e:  # a name too long, ...
        raise InterpreterError(f"{where}: cannot be used: {e.strerror or type(e).__name__}") from None
    if not exists:
        raise InterpreterError(f"{where}: no such file")
    if is_dir:
        raise InterpreterError(f"{where}: is a folder, not a Python interpreter")
    if not os.access(p, os.X_OK):
        raise InterpreterError(f"{where}: is not executable")
    return str(p.absolute())  # not resolved: a venv's python is a symlink that must stay one


def parse_pythons(texts: Iterable[str], option: str = "--python") -> dict[str, str]:
    """``LABEL=PATH`` options (the CLI's ``--python``, the plugin's ``--losscmp-python``)
    as {label: checked interpreter path}."""
    out: dict[str, str] = {}
    for text in texts:
        label, sep, path = text.partition("=")
        if not sep or not label or not path:
            raise UsageError(f"{option} {text!r}: expected LABEL=/path/to/python")
        if label in out:
            raise UsageError(f"{option} {label}: given twice")
        out[label] = check_python(label, path, option)
    return out


def check_labels(pythons: Mapping[str, str], labels: Sequence[str], option: str = "--python") -> None:
    """Every interpreter serves an implementation: a misspelt label would silently run here."""
    unknown = sorted(set(pythons) - set(labels))
    if unknown:
        raise UsageError(f"{option} {unknown[0]}: no implementation has that label (labels: {', '.join(labels)})")


def _not_here(*args: Any, **kwargs: Any) -> Any:
    raise InterpreterError("this implementation runs under another interpreter (--python); it cannot be called in losscmp's own")


def remote_implementation(ref: Ref) -> Implementation:
    """An implementation that exists only in another interpreter (never loaded here)."""
    return Implementation(ref, _not_here)


def is_remote(impl: Implementation) -> bool:
    return impl.fn is _not_here


class InterpreterRunner(WorkerRunner):
    """``runner(impl, spec, case) -> Outcome``; labels in ``pythons`` run under their interpreter
    (the round trip, case keeping and cleanup: :class:`losscmp.workers.WorkerRunner`)."""

    def __init__(self, pythons: Mapping[str, str], *, timeout: float | None = None,
                 fallback: Callable[[Implementation, Spec, Case], Outcome] | None = None,
                 record: RunRecord = RunRecord(), input_dir: str | Path | None = None,
                 load_timeout: float | None = None, worker_file: str | Path = WORKER_FILE):
        pythons = {label: check_python(label, path) for label, path in pythons.items()}  # before any worker state exists
        super().__init__(timeout, record=record, input_dir=input_dir)
        self.pythons = pythons
        self.load_timeout = load_timeout if load_timeout is not None else load_limit()  # $LOSSCMP_LOAD_TIMEOUT, as for in-process loads
        self.worker_file = str(Path(worker_file).resolve())
        self.fallback = fallback
        self._count = 0

    def __call__(self, impl: Implementation, spec: Spec, case: Case) -> Outcome:
        self.check_open()
        if impl.label not in self.pythons:
            return self.fallback(impl, spec, case) if self.fallback else call(impl.fn, spec, case)
        device = next(iter(case.tensors.values())).device
        header, buffers = _request(impl.label, spec, case)
        worker = self._worker(impl)
        transport = Transport.HOST_COPY if device.type == "cuda" else Transport.PIPE
        failed, reply = self.round_trip(impl, spec, case, worker, lambda: worker.send(header, buffers), transport)
        if failed is not None:
            return failed
        assert isinstance(reply, tuple)  # round_trip took the deaths and silences
        head, bufs = reply
        if head.get("type") != "outcome":
            self.discard(impl.label, kill=True)
            raise InterpreterError(f"{impl.label}: the worker under {self.pythons[impl.label]} broke the protocol: {head.get('detail') or head.get('type')}")
        if head.get("restart"):
            self.discard(impl.label)  # it exited: a fresh context next time
        out = replace(_outcome(head, bufs, device), transport=transport)
        self.keeper.seen(impl.label, case, out)
        return out

    def close(self) -> None:
        """Stop every worker (and the fallback runner); delete unneeded inputs.  Safe twice."""
        super().close()
        close = getattr(self.fallback, "close", None)
        if close:
            close()

    def __enter__(self) -> InterpreterRunner:
        return self

    def _worker(self, impl: Implementation) -> _Process:
        label = impl.label
        w = self.state.workers.get(label)
        assert w is None or isinstance(w, _Process)
        if w is not None and w.popen.poll() is not None:  # died between calls
            self.discard(label)
            w = None
        if w is None:
            self._count += 1
            w = _Process.start(self.pythons[label], label, self.worker_file, self.keeper.directory(), self._count, self.load_timeout)
            self.state.workers[label] = w
            try:
                w.load(portable_ref(impl.ref).source(), self.load_timeout)
            except BaseException:
                self.discard(label, kill=True)
                raise
        return w


class _Process:
    """One worker process of another interpreter, and the pipes to it."""

    def __init__(self, python: str, label: str, popen: subprocess.Popen, request_w: int, reply_r: int, lifeline_w: int, log: Path):
        self.python, self.label, self.popen, self.log = python, label, popen, log
        self.request_w, self.reply_r, self.lifeline_w = request_w, reply_r, lifeline_w
        self.hello: dict = {}
        self.asked = self.stopped = False

    @classmethod
    def start(cls, python: str, label: str, worker_file: str, directory: Path, n: int, limit: float) -> _Process:
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        lifeline_r, lifeline_w = os.pipe()  # closes when losscmp dies: the worker's watchdog exits it
        log = directory / f"worker-{n}.log"
        env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
        try:
            with open(log, "wb") as out:
                popen = subprocess.Popen(
                    [python, "-c", boot_code(), worker_file, str(request_r), str(reply_w), str(lifeline_r), str(PROTOCOL)],
                    pass_fds=(request_r, reply_w, lifeline_r), stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                )
        except OSError as e:
            for fd in (request_r, request_w, reply_r, reply_w, lifeline_r, lifeline_w):
                os.close(fd)
            raise InterpreterError(f"--python {label}={python}: cannot be started ({e.strerror or type(e).__name__})") from None
        for fd in (request_r, reply_w, lifeline_r):
            os.close(fd)
        proc = cls(python, label, popen, request_w, reply_r, lifeline_w, log)
        try:
            proc._greet(limit)
        except BaseException:
            proc.stop(kill=True)
            raise
        return proc

    def _greet(self, limit: float) -> None:
        where = f"--python {self.label}={shown(self.python, quote=False)}"
        first = _read_by(self.reply_r, len(GREETING), time.monotonic() + min(BOOT_TIMEOUT, limit))
        if first != GREETING:
            if not first:  # end of file: it is exiting, or has
                try:
                    self.popen.wait(2.0)
                except subprocess.TimeoutExpired:
                    pass
            if not first and self.popen.returncode is not None:
                text = self._log_tail()
                last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
                raise InterpreterError(f"{where}: the worker exited at start ({exit_reason(self.popen.returncode)})"
                                       f"{': ' + shown(last.strip(), quote=False) if last else ''}")
            said = f"it wrote {shown(first.decode(errors='replace'))}" if first else "it wrote nothing"
            raise InterpreterError(f"{where}: did not start losscmp's worker within {min(BOOT_TIMEOUT, limit):g} s ({said}): "
                                   "is it a Python interpreter?")
        reply = self.receive(limit)
        if reply is None:
            raise InterpreterError(f"{where}: the worker did not start within {limit:g} s")
        if isinstance(reply, Died):
            text = self._log_tail()
            if "losscmp-worker: python" in text and "too old" in text:
                version = text.split("losscmp-worker: python", 1)[1].split()[0]
                raise InterpreterError(f"{where}: Python {version} is too old; the worker needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}")
            last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
            raise InterpreterError(f"{where}: the worker exited at start ({reply.why}){': ' + last.strip() if last else ''}")
        head, _ = reply
        if head.get("type") == "fatal" and head.get("reason") == "missing":
            raise InterpreterError(f"{where}: the worker needs torch and numpy there, and importing them failed: {head.get('detail')}")
        if head.get("type") == "fatal" and head.get("reason") == "protocol" or head.get("protocol") != PROTOCOL:
            raise InterpreterError(
                f"{where}: protocol version mismatch: the worker speaks {head.get('protocol')}, losscmp speaks {PROTOCOL}")
        if head.get("type") != "hello":
            raise InterpreterError(f"{where}: unexpected first message from the worker: {head.get('type')!r}")
        self.hello = head

    def load(self, ref: str, limit: float) -> None:
        if not self.send({"type": "load", "ref": ref}, []):
            raise InterpreterError(f"{self.label}: the worker under {self.python} died before loading {ref}")
        reply = self.receive(limit)
        if reply is None:
            raise InterpreterError(f"{self.label}: loading {ref} under {self.python} did not finish within {limit:g} s")
        if isinstance(reply, Died):
            where = f" in {reply.site}" if reply.site else ""
            raise InterpreterError(f"{self.label}: the worker under {self.python} crashed ({reply.why}) while loading {ref}{where}")
        head, _ = reply
        if head.get("type") == "load_error":
            raise InterpreterError(f"{self.label}: {ref} cannot be loaded under {self.python}: {head.get('error')}")

    def send(self, header: dict, buffers: list[bytes]) -> bool:
        try:
            wire.write_message(self.request_w, header, buffers)
        except (BrokenPipeError, OSError):
            return False
        return True

    def receive(self, timeout: float | None) -> Any:
        """(header, buffers), a :class:`~losscmp.workers.Died`, or None after ``timeout`` seconds."""
        ready, _, _ = select.select([self.reply_r], [], [], timeout)
        if not ready:
            return None
        try:
            return wire.read_message(self.reply_r)
        except (EOFError, OSError, ValueError):
            return self.death()

    def death(self) -> Died:
        try:
            self.popen.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        return Died(exit_reason(self.popen.returncode), crash_site(self.log))

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def ask_to_stop(self) -> None:
        if not self.asked:
            self.asked = True
            self.send({"type": "shutdown"}, [])

    def stop(self, kill: bool = False, wait: float = 1.0) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.popen.poll() is None:
            if not kill:
                self.ask_to_stop()
                try:
                    self.popen.wait(wait)
                except subprocess.TimeoutExpired:
                    pass
            if self.popen.poll() is None:
                try:
                    self.popen.send_signal(signal.SIGKILL)
                except OSError:
                    pass
                try:
                    self.popen.wait(5.0)
                except subprocess.TimeoutExpired:
                    pass
        for fd in (self.request_w, self.reply_r, self.lifeline_w):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.log.unlink()
        except OSError:
            pass


def _read_by(fd: int, n: int, deadline: float) -> bytes:
    """Up to ``n`` bytes from ``fd``, fewer at end of file or at ``deadline`` (monotonic
    seconds): a peer that writes part of a message and stops cannot block us."""
    data = b""
    while len(data) < n:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = os.read(fd, n - len(data))
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data


# ---------------------------------------------------------------------- messages
def _request(label: str, spec: Spec, case: Case) -> tuple[dict, list[bytes]]:
    metas, buffers = [], []
    for name, t in case.tensors.items():
        meta, raw = wire.tensor_to_wire(t)
        meta["name"] = name
        metas.append(meta)
        buffers.append(raw)
    try:
        params = {k: wire.encode_value(v) for k, v in case.params.items()}
    except TypeError as e:
        raise InterpreterError(f"{label}: a keyword parameter cannot be sent to another interpreter: {e}") from None
    device = str(next(iter(case.tensors.values())).device)
    header = {
        "type": "call",
        "args": [{"name": a.name, "grad": bool(a.grad)} for a in spec.args],
        "scalar": bool(spec.scalar),
        "params": params,
        "device": device,
        "tensors": metas,
    }
    return header, buffers


def _outcome(head: dict, buffers: list[bytes], device: torch.device) -> Outcome:
    it = iter(buffers)
    value = None
    if head.get("value") is not None:
        value = wire.tensor_from_wire(head["value"], next(it), device)
    grads: dict[str, torch.Tensor | None] = {}
    for name, meta in head.get("grads", {}).items():
        grads[name] = None if meta is None else wire.tensor_from_wire(meta, next(it), device)
    return Outcome(
        head["status"],
        value=value,
        grads=grads,
        error=head.get("error"),
        seconds=float(head.get("seconds", 0.0)),
        mutated=tuple(head.get("mutated", ())),
        output=str(head.get("output", "")),  # an older worker file sends none
    )
