"""One JSON convention for everything losscmp writes (the ``--json`` report, repro files,
``losscmp trace --json``).

JSON has no NaN or infinity.  losscmp writes them as the strings ``"nan"``, ``"inf"``
and ``"-inf"`` (what ``float()`` reads back, so a repro's planted values round-trip),
never as ``null`` (which would hide which one it was) nor as the non-standard ``NaN``
/ ``Infinity`` literals that strict parsers reject.  Older repro files with those
literals still load: Python's ``json.loads`` accepts them.

The wire protocol of the other-interpreter worker is not a result and keeps its own
encoding (:mod:`losscmp._standalone_worker`).
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable


def number(x: float) -> float | str:
    """A float as JSON holds it: itself, or "nan" / "inf" / "-inf"."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def plain(obj: Any) -> Any:
    """``obj`` with every non-finite float, at any depth, written by :func:`number`."""
    if isinstance(obj, float):
        return number(obj)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def dumps(obj: Any, *, default: Callable[[Any], Any] | None = None, **kw: Any) -> str:
    """``json.dumps`` under the convention; anything non-finite left over is a bug, not a file."""
    return json.dumps(plain(obj), allow_nan=False, default=default, **kw)
