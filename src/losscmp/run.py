"""Running one implementation on one case: value, gradients, errors, side effects.

Every call gets its own copy of the inputs (same values, same strides, same device),
so one implementation can never see what another did to its inputs; comparing that
copy afterwards with the pristine case catches in-place mutation.

What an implementation prints (Python or C, stdout or stderr) and the warnings it
issues are captured at the file-descriptor level and kept on its :class:`Outcome`:
they never reach losscmp's own output (a ``--json -`` report stays valid JSON), and
a "did not converge" warning stays with the finding it explains.  An implementation
that raises ``KeyboardInterrupt`` or ``SystemExit`` has failed; a Ctrl-C from the user
still stops the run.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import replace
from typing import Any, Callable, Iterator

import torch

from .generate import clone_like
from .model import Case, Outcome, Status  # noqa: F401  Outcome re-exported: moved to model
from .spec import Spec
from .breadcrumbs import Terminated

# What an implementation printed is kept up to this many characters (the end is dropped).
OUTPUT_LIMIT = 4000


def one_line(e: BaseException) -> str:
    try:
        said = str(e)
    except Exception as why:  # an exception whose __str__ raises is still the implementation's failure
        said = f"(its message could not be read: {type(why).__name__})"
    text = said.strip().splitlines()
    return f"raised {type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def make_inputs(spec: Spec, case: Case) -> list[torch.Tensor]:
    inputs = []
    for arg in spec.args:
        t = clone_like(case.tensors[arg.name])
        if arg.grad and t.is_floating_point():
            t.requires_grad_(True)
        inputs.append(t)
    return inputs


def call(fn: Callable[..., Any], spec: Spec, case: Case) -> Outcome:
    """Call ``fn`` on fresh copies of the case's inputs, then differentiate its value."""
    inputs = make_inputs(spec, case)
    device = next(iter(case.tensors.values())).device
    start = time.perf_counter()
    with captured_output() as output, warnings.catch_warnings(record=True) as caught, torch_switches_kept():
        warnings.simplefilter("always")
        outcome = _call(fn, spec, case, inputs, device)
    seconds = time.perf_counter() - start
    # Checked on every path: a mutation can be what made the call fail.
    mutated = tuple(a.name for a, t in zip(spec.args, inputs) if not _same(t.detach(), case.tensors[a.name]))
    said = output.text + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    return replace(outcome, seconds=seconds, mutated=mutated, output=_clip(said))


def _clip(text: str) -> str:
    return text if len(text) <= OUTPUT_LIMIT else text[:OUTPUT_LIMIT] + f"... ({len(text) - OUTPUT_LIMIT} more characters)"


def _type_name(x: Any) -> str:
    """'list', 'NoneType', but 'numpy.float32': a numpy scalar is not Python's float."""
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__.split('.')[0]}.{t.__qualname__}"


def _call(fn: Callable[..., Any], spec: Spec, case: Case, inputs: list[torch.Tensor], device: torch.device) -> Outcome:
    interrupts = _user_interrupts.count
    pid = os.getpid()
    try:
        try:
            out = fn(*inputs, **case.params)
        finally:
            if os.getpid() != pid:  # a child the implementation forked, returning into losscmp: it must not run a second losscmp
                os._exit(0)
        if _user_interrupts.count != interrupts:  # the user's Ctrl-C, swallowed by the implementation: still stop
            raise KeyboardInterrupt
        if not isinstance(out, torch.Tensor):
            return Outcome(Status.NON_TENSOR, error=f"returned {_type_name(out)}, not a tensor")
        if out.layout != torch.strided or out.device.type == "meta":  # nothing losscmp could read values from
            what = "a meta tensor (it holds no values)" if out.device.type == "meta" else f"a {str(out.layout).removeprefix('torch.')} tensor"
            return Outcome(Status.NON_TENSOR, error=f"returned {what}, not a dense tensor")
        if spec.scalar and out.numel() != 1:
            return Outcome(Status.NON_SCALAR, error=f"returned shape {tuple(out.shape)}, expected a scalar")
        grads: dict[str, torch.Tensor | None] = {}
        wanted = [(a.name, t) for a, t in zip(spec.args, inputs) if t.requires_grad]
        if wanted:
            if out.requires_grad:
                with torch.enable_grad():  # even if the implementation turned grad mode off on its way out
                    seed = out.reshape(()) if spec.scalar else out.sum()
                got = torch.autograd.grad(seed, [t for _, t in wanted], allow_unused=True)
                # A sparse gradient of a dense input (an embedding's, a custom backward's) is compared by value.
                grads = {name: (_plain(g.detach() if g.layout == torch.strided else g.detach().to_dense()) if g is not None else None)
                         for (name, _), g in zip(wanted, got)}
            else:
                grads = {name: None for name, _ in wanted}
        value = _plain(out.detach().reshape(()) if spec.scalar else out.detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except KeyboardInterrupt as e:
        if _user_interrupts.count != interrupts or not _user_interrupts.watching:
            raise  # the user pressed Ctrl-C (or nobody can tell): stop the run
        return Outcome(Status.EXCEPTION, error=one_line(e))
    except BaseException as e:  # the implementation's own failure is a finding, not ours
        if isinstance(e, Terminated):
            raise  # SIGTERM to losscmp: unwind
        return Outcome(Status.EXCEPTION, error=one_line(e))
    return Outcome(Status.OK, value=value, grads=grads)


@contextlib.contextmanager
def torch_switches_kept() -> Iterator[None]:
    """Grad mode on for the call; torch's global switches as they were after it.

    An implementation that calls ``torch.set_grad_enabled(False)``,
    ``torch.set_default_dtype(torch.float64)`` or ``torch.use_deterministic_algorithms``
    must not change how the next call, of any side, runs: with grad mode left off every
    later call returns no gradient and "agrees" without a gradient being compared.  And
    a caller inside ``torch.no_grad()`` still gets its gradients compared.
    """
    grad = torch.is_grad_enabled()
    dtype = torch.get_default_dtype()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    anomaly = torch.is_anomaly_enabled()
    torch.set_grad_enabled(True)
    try:
        yield
    finally:
        torch.set_grad_enabled(grad)
        if torch.get_default_dtype() != dtype:
            torch.set_default_dtype(dtype)
        if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != deterministic:
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        if torch.is_anomaly_enabled() != anomaly:
            torch.set_anomaly_enabled(anomaly)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The same data as a plain tensor.  A subclass's ``__torch_function__`` is the
    implementation's code: it runs here, inside the guarded call, never later in
    losscmp's own comparisons, where what it raises would end the run."""
    return t if type(t) is torch.Tensor else t.as_subclass(torch.Tensor)


# --- Ctrl-C: the user's, or the implementation's? ------------------------------------

class _UserInterrupts:
    """Counts real SIGINTs while :func:`watching_interrupts` is active."""

    count = 0
    watching = False


_user_interrupts = _UserInterrupts()


def _on_sigint(signum: int, frame: Any) -> None:
    _user_interrupts.count += 1
    raise KeyboardInterrupt


def user_interrupts() -> int:
    """How many times the user pressed Ctrl-C while :func:`watching_interrupts` was active.
    A KeyboardInterrupt raised where Python drops it (a garbage-collector callback, a
    ``__del__``) is lost; the count is not, and the run checks it between cases."""
    return _user_interrupts.count


def _quiet_unraisable(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """Python prints "Exception ignored in ..." with a traceback for a KeyboardInterrupt or
    SIGTERM that lands in a callback; the run stops at its next check anyway."""
    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)):
            return
        previous(unraisable)
    return hook


def no_user_interrupts() -> None:
    """In a process that ignores SIGINT (an isolated worker), every KeyboardInterrupt is
    the implementation's own: a finding, never the end of the worker."""
    _user_interrupts.watching = True


@contextlib.contextmanager
def watching_interrupts() -> Iterator[None]:
    """While active, a KeyboardInterrupt that no SIGINT caused is the implementation's own.

    Only the main thread can install signal handlers; elsewhere every
    KeyboardInterrupt stops the run, as before.
    """
    if threading.current_thread() is not threading.main_thread() or _user_interrupts.watching:
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield  # someone else handles Ctrl-C (a debugger, an embedding app): leave it alone
        return
    signal.signal(signal.SIGINT, _on_sigint)
    _user_interrupts.watching = True
    unraisable = sys.unraisablehook
    sys.unraisablehook = _quiet_unraisable(unraisable)
    try:
        yield
    finally:
        sys.unraisablehook = unraisable
        _user_interrupts.watching = False
        signal.signal(signal.SIGINT, previous)


# --- what implementations print --------------------------------------------------------

class _Captured:
    text = ""


_libc_fflush: Callable[..., Any] | None
try:
    _libc_fflush = ctypes.CDLL(None).fflush
except (OSError, AttributeError):  # pragma: no cover - no C library to flush
    _libc_fflush = None


_scratch: dict[int, int] = {}  # pid -> fd of this process's scratch file


def _scratch_fd() -> int:
    """One scratch file per process, reused by every call (creating one costs more than
    the call of a tiny loss).  Keyed by pid: a forked worker must not share the parent's
    file offset."""
    pid = os.getpid()
    fd = _scratch.get(pid)
    if fd is None:
        _scratch.clear()
        with tempfile.TemporaryFile() as f:  # already unlinked: the dup keeps it alive, nameless
            fd = _scratch[pid] = os.dup(f.fileno())
    return fd


@contextlib.contextmanager
def captured_output() -> Iterator[_Captured]:
    """Send fds 1 and 2 and ``sys.stdout``/``sys.stderr`` to a scratch file for the block.

    File-descriptor level, like pytest's ``capfd``: C extensions and subprocesses are
    caught too.  The real descriptors are restored afterwards even if the block closed
    them (``os.close(1)``, ``sys.stdout.close()``).
    """
    result = _Captured()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    scratch = _scratch_fd()
    saved = []
    for fd in (1, 2):
        try:
            saved.append((fd, os.dup(fd)))
            os.dup2(scratch, fd)
        except OSError:  # not open in this process: nothing to protect
            continue
    text_sink = io.StringIO()
    old_streams = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = text_sink
    try:
        yield result
    finally:
        if _libc_fflush is not None:
            _libc_fflush(None)
        sys.stdout, sys.stderr = old_streams
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        size = os.lseek(scratch, 0, os.SEEK_CUR)
        raw = os.pread(scratch, min(size, OUTPUT_LIMIT * 4), 0) if size else b""
        if size:
            os.ftruncate(scratch, 0)
            os.lseek(scratch, 0, os.SEEK_SET)
        printed = text_sink.getvalue() if not text_sink.closed else ""
        result.text = printed + raw.decode("utf-8", errors="replace")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return bool(torch.equal(a, b))


def timed_raw(fn: Callable[..., Any], spec: Spec, case: Case) -> float:
    """Seconds for a bare forward + backward on prepared inputs — the benchmark baseline."""
    inputs = make_inputs(spec, case)
    start = time.perf_counter()
    try:
        out = fn(*inputs, **case.params)
        if out.requires_grad:
            out.sum().backward()
        if inputs[0].device.type == "cuda":
            torch.cuda.synchronize()
    except Exception:  # a call that raises costs what it cost until it raised, in the harness too
        pass
    return time.perf_counter() - start


def finite(x: float) -> float:
    """Hypothesis' target() needs a finite float."""
    return 1e30 if math.isinf(x) or math.isnan(x) else x
