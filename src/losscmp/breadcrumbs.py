"""The supervised child's side: a breadcrumb and a watchdog deadline before every
in-process call, and a snapshot of the JSON report after every case.

Low in the layers on purpose: the in-process runner (:mod:`losscmp.engine`), the call
(:mod:`losscmp.run`: :class:`Terminated`) and the isolated workers use it, while the
supervising parent (:mod:`losscmp.supervise`, which runs the command line) stands at the
top.  Everything here is free when the process is not supervised (``_crumbs`` is None).
See :mod:`losscmp.supervise` for what the parent does with the breadcrumbs.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import struct
import sys
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from . import jsonout

if TYPE_CHECKING:  # the record is only read here; this module stays free of torch
    from .model import RunRecord


# Without --timeout an in-process call is a hang once it has run this long, or this many
# times its implementation's slowest call so far, whichever is longer.  A real loss takes
# milliseconds to seconds (the slowest seen here, a forked Sinkhorn, 1.5 s a call): two
# minutes is far beyond any of them on a loaded machine, and a slow side raises its own bar.
DEFAULT_TIMEOUT_FLOOR = 120.0
DEFAULT_TIMEOUT_FACTOR = 20.0


class Terminated(BaseException):
    """SIGTERM: unwind (close workers, delete temporary files) and stop."""


class _Breadcrumbs:
    def __init__(self, directory: Path, save_input: Callable[..., Path]):
        self.dir = directory
        self.save_input = save_input  # repro.save_input, handed down by the entry point (repro stands above this module)
        self.fd = os.open(directory / "call", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.described: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()
        self.rebuildable: weakref.WeakSet[Any] = weakref.WeakSet()
        self.saved = 0
        self.report_fd: int | None = None

    def leave(self, payload: bytes) -> None:
        # Overwrite in place; a newline ends the current crumb (an older, longer one may trail).
        os.pwrite(self.fd, payload + b"\n", 0)

    def snapshot(self, payload: bytes) -> None:
        if self.report_fd is None:
            self.report_fd = os.open(self.dir / "report.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.pwrite(self.report_fd, payload + b"\n", 0)


_crumbs: _Breadcrumbs | None = None


class Clock:
    """The deadline of the in-process call under way (0: none), in a page the parent shares.

    Two doubles: the deadline on ``time.monotonic()`` (one clock for both processes) and
    the limit it was set from (for the message).  The child only stores; the parent reads
    twice and acts only on two equal reads, so a torn read never kills a healthy call."""

    FORMAT = "dd"

    def __init__(self) -> None:
        self.page = mmap.mmap(-1, struct.calcsize(self.FORMAT))  # anonymous, MAP_SHARED: survives the fork shared

    def arm(self, deadline: float, limit: float) -> None:
        struct.pack_into(self.FORMAT, self.page, 0, deadline, limit)

    def disarm(self) -> None:
        struct.pack_into(self.FORMAT, self.page, 0, 0.0, 0.0)

    def read(self) -> tuple[float, float]:
        return struct.unpack_from(self.FORMAT, self.page, 0)


_clock: Clock | None = None
_timeout: float | None = None  # the user's --timeout for in-process calls; None: the default rule
_slowest: dict[str, float] = {}  # seconds of each implementation's slowest in-process call so far
_terminated = False  # SIGTERM arrived (the Terminated it raised may have landed where Python drops it)


def supervised() -> bool:
    return _crumbs is not None


def check_terminated() -> None:
    """Raise :class:`Terminated` if SIGTERM arrived, even if its first raise was lost."""
    if _terminated:
        raise Terminated()


def watch_calls(timeout: float | None) -> None:
    """In-process calls that outlast ``timeout`` seconds are hangs (None: the default rule)."""
    global _timeout
    _timeout = timeout


def call_limit(label: str) -> float:
    """Seconds an in-process call of ``label`` may take before it is a hang."""
    if _timeout is not None:
        return _timeout
    return max(DEFAULT_TIMEOUT_FLOOR, DEFAULT_TIMEOUT_FACTOR * _slowest.get(label, 0.0))


@contextlib.contextmanager
def watched(label: str, spec: Any, case: Any) -> Iterator[None]:
    """Around every in-process call: the breadcrumb, then the watchdog's deadline (the
    supervising parent kills the child when it passes).  Free when not supervised."""
    before_call(label, spec, case)
    if _clock is None:
        yield
        return
    limit = call_limit(label)
    start_ = time.monotonic()
    _clock.arm(start_ + limit, limit)
    try:
        yield
    finally:
        _clock.disarm()
        took = time.monotonic() - start_
        if took > _slowest.get(label, 0.0):
            _slowest[label] = took


def keep_report(data: dict[str, Any], phase: str) -> None:
    """The JSON report so far, for the parent to complete if the child dies or is killed.
    ``phase``: "explore" while the search runs (a call that dies then is one more case),
    "stages" after it.  Overwritten in place like a breadcrumb (a newline ends it; JSON
    text has none): the child only dies mid-call, never mid-write, and a rename per case
    costs milliseconds on some file systems."""
    if _crumbs is None:
        return
    _crumbs.snapshot(jsonout.dumps({**data, "_phase": phase}, default=str).encode())


def before_call(label: str, spec: Any, case: Any) -> None:
    """Called by the in-process runner before every call; free when not supervised."""
    if _crumbs is None:
        return
    described = _crumbs.described.get(case)
    if described is None:
        described = _describe(spec, case)
        _crumbs.described[case] = described
    _crumbs.leave(b'{"calling": ' + json.dumps(label).encode() + b", " + described + b"}")


def note(what: str) -> None:
    """A breadcrumb outside implementation calls (e.g. loading a reference)."""
    if _crumbs is not None:
        _crumbs.leave(json.dumps({"doing": what}).encode())


def input_saved_as(path: Path) -> None:
    """The cases of the calls to come are a saved file already (``losscmp trace`` of a
    repro): a call that kills the process names that file rather than "not saved"."""
    if _crumbs is not None:
        (_crumbs.dir / "input.txt").write_text(str(path))


def rebuildable(case: Any) -> None:
    """``case`` was built straight from its recipe: the recipe alone rebuilds it."""
    if _crumbs is not None:
        _crumbs.rebuildable.add(case)


def describe_run(record: RunRecord, json_path: str | None = None) -> None:
    """What the parent needs to write a repro and the report if an implementation kills or
    hangs the child: the same record of the run that the isolated runners keep
    (``engine.run_record``), and where ``--json`` goes."""
    if _crumbs is None:
        return
    context = {
        "json": json_path,
        "implementations": [{"label": r.label, "ref": r.source()} for r in record.refs],
        "save_dir": str(record.keep_dir) if record.keep_dir is not None else None,
        "seed": record.seed,
        "tolerance": {"rtol": record.tolerance[0], "atol": record.tolerance[1]},
        "pairs": [list(p.labels) for p in record.pairs],
        "cwd": os.getcwd(),
    }
    (_crumbs.dir / "context.json").write_text(json.dumps(context))


def _describe(spec: Any, case: Any) -> bytes:
    assert _crumbs is not None  # only before_call calls it, once it has checked
    first = next(iter(case.tensors.values()))
    where = {"spec": spec.text(), "dtype": str(first.dtype).removeprefix("torch."), "device": str(first.device), "case": case.describe(),
             "sizes": dict(case.sizes)}
    recipe = case.recipe
    if case in _crumbs.rebuildable and recipe is not None:
        where["recipe"] = dict(recipe.__dict__)  # flat fields of numbers, strings and tuples
    else:  # derived by the minimiser or a stage: its tensors go to disk before the call
        _crumbs.saved += 1
        # No fsync: the supervising parent outlives the child and reads it from the page cache.
        where["saved"] = str(_crumbs.save_input(_crumbs.dir / "inputs", spec, case, stem=f"input-{_crumbs.saved}", durable=False))
    return json.dumps(where)[1:-1].encode()


def start(directory: Path, parent: int, save_input: Callable[..., Path], clock: Clock) -> None:
    """In the supervised child: leave breadcrumbs in ``directory`` and call deadlines on
    ``clock``, die with ``parent``, unwind on SIGTERM.  ``save_input`` writes a derived
    case's tensors before its call."""
    global _crumbs, _clock
    _die_with_parent(parent)
    _crumbs = _Breadcrumbs(directory, save_input)
    _clock = clock

    def on_term(signum: int, frame: Any) -> None:
        global _terminated
        _terminated = True
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)


def request_death_signal() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), even mid-hang."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies, even while it hangs."""
    request_death_signal()
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
