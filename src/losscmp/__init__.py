"""losscmp: differential testing for loss functions.

Do these implementations of "the same" loss really agree, in values and gradients?
If not: where, why, and on how small an input?  See ``losscmp --help``.

The public names below are imported on first use, so that ``import losscmp`` (and the
command line's supervising process) stays light until something is actually needed.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "audit": "audit", "AuditResult": "audit", "Divergence": "audit",
    "Settings": "settings", "Search": "settings", "Execution": "settings", "Tolerances": "settings", "Outputs": "settings",
    "Evaluator": "engine", "Runner": "engine",
    "Kind": "findings", "Status": "findings", "Pair": "findings", "Alone": "findings",
    "LosscmpError": "errors",
    "Case": "generate", "Recipe": "generate", "build_case": "generate", "cases": "generate", "recipes": "generate",
    "Implementation": "load", "load_implementation": "load", "parse_ref": "load",
    "Arg": "spec", "Spec": "spec", "parse_spec": "spec", "preset": "spec", "resolve_spec": "spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'losscmp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
