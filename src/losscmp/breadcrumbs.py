"""The supervised child's side: a breadcrumb before every in-process call.

Low in the layers on purpose: the in-process runner (:mod:`losscmp.engine`), the call
(:mod:`losscmp.run`: :class:`Terminated`) and the isolated workers use it, while the
supervising parent (:mod:`losscmp.supervise`, which runs the command line) stands at the
top.  Everything here is free when the process is not supervised (``_crumbs`` is None).
See :mod:`losscmp.supervise` for what the parent does with the breadcrumbs.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # the record is only read here; this module stays free of torch
    from .model import RunRecord


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

    def leave(self, payload: bytes) -> None:
        # Overwrite in place; a newline ends the current crumb (an older, longer one may trail).
        os.pwrite(self.fd, payload + b"\n", 0)


_crumbs: _Breadcrumbs | None = None


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


def rebuildable(case: Any) -> None:
    """``case`` was built straight from its recipe: the recipe alone rebuilds it."""
    if _crumbs is not None:
        _crumbs.rebuildable.add(case)


def describe_run(record: RunRecord, pairs: Sequence[Any]) -> None:
    """What the parent needs to write a repro if an implementation kills the child: the
    same record of the run that the isolated runners keep (``engine.run_record``)."""
    if _crumbs is None:
        return
    context = {
        "implementations": [{"label": r.label, "ref": r.source()} for r in record.refs],
        "save_dir": str(record.keep_dir) if record.keep_dir is not None else None,
        "seed": record.seed,
        "tolerance": {"rtol": record.tolerance[0], "atol": record.tolerance[1]},
        "pairs": [list(p.labels) for p in pairs],
        "cwd": os.getcwd(),
    }
    (_crumbs.dir / "context.json").write_text(json.dumps(context))


def _describe(spec: Any, case: Any) -> bytes:
    first = next(iter(case.tensors.values()))
    where = {"spec": spec.text(), "dtype": str(first.dtype).removeprefix("torch."), "device": str(first.device), "case": case.describe()}
    recipe = case.recipe
    if case in _crumbs.rebuildable and recipe is not None:
        where["recipe"] = dict(recipe.__dict__)  # flat fields of numbers, strings and tuples
    else:  # derived by the minimiser or a stage: its tensors go to disk before the call
        _crumbs.saved += 1
        # No fsync: the supervising parent outlives the child and reads it from the page cache.
        where["saved"] = str(_crumbs.save_input(_crumbs.dir / "inputs", spec, case, stem=f"input-{_crumbs.saved}", durable=False))
    return json.dumps(where)[1:-1].encode()


def start(directory: Path, parent: int, save_input: Callable[..., Path]) -> None:
    """In the supervised child: leave breadcrumbs in ``directory``, die with ``parent``,
    unwind on SIGTERM.  ``save_input`` writes a derived case's tensors before its call."""
    global _crumbs
    _die_with_parent(parent)
    _crumbs = _Breadcrumbs(directory, save_input)

    def on_term(signum: int, frame: Any) -> None:
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
