"""Small formatters the parts of an explanation share: numbers and paths as a person
reads them, and floats as the JSON report holds them (:func:`losscmp.jsonout.number`)."""
from __future__ import annotations

import os
from typing import Any

from ..jsonout import number


def json_float(x: float | None) -> float | str | None:
    return None if x is None else number(x)


def short_path(path: str) -> str:
    """A path as the user would type it: relative to the working folder when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if rel.startswith("..") else rel


def num(x: float | None) -> str:
    """Four significant digits, or "n/a"."""
    return "n/a" if x is None else f"{x:.4g}"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.3g}%"


def op_name(func: Any) -> str:
    """An aten overload's op name as a person reads it (``aten.log.default`` -> ``log``)."""
    return str(getattr(func, "__name__", func)).split(".")[0]
