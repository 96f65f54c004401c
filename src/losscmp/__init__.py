"""losscmp: differential testing for loss functions.

Do these implementations of "the same" loss really agree, in values and gradients?
If not: where, why, and on how small an input?  See ``losscmp --help``.

The public names below are imported on first use: ``import losscmp.pytest_plugin``
(which pytest does for every project that merely has losscmp installed) must not
import torch until a check runs.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from ._version import __version__ as __version__  # re-exported

# public name -> the module that defines it
_PUBLIC = {
    "AuditResult": "model", "Divergence": "model", "Case": "model", "Recipe": "model",
    "Alone": "model", "Kind": "model", "Pair": "model", "Status": "model",
    "audit": "audit", "Evaluator": "engine", "Runner": "engine", "LosscmpError": "errors",
    "build_case": "generate", "cases": "generate", "recipes": "generate",
    "Implementation": "load", "load_implementation": "load", "parse_ref": "load",
    "Execution": "settings", "Outputs": "settings", "Search": "settings", "Settings": "settings", "Tolerances": "settings",
    "Arg": "spec", "Spec": "spec", "parse_spec": "spec", "preset": "spec", "resolve_spec": "spec",
}

__all__ = sorted(_PUBLIC, key=lambda n: (n[0].islower(), n))


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule losscmp.audit binds it here; ``losscmp.audit`` stays the
        # function, as it was when this file imported everything eagerly.
        if name == "audit" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
