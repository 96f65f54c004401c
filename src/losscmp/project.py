"""The project a run belongs to: its root folder, and paths that survive a second clone.

A repro, a generated test and a saved-case folder outlive the checkout they were made
in: a colleague replays them in their own clone, CI in a fresh one.  So file references
are stored relative to the *project root* -- the nearest folder, from the current one
upwards, holding one of :data:`MARKERS` (as pytest finds its rootdir and Hypothesis
its ``.hypothesis/``) -- and resolved from the project root found at replay.

In: a starting folder (the current one by default).  Out: the root, reference targets
made portable (:func:`portable_target`), and the default folder for saved cases
(:data:`SAVE_DIR` under the root, hidden like ``.hypothesis/``).
"""
from __future__ import annotations

import os
from pathlib import Path

# Files or folders that mark a project's top folder; the nearest one upwards wins.
MARKERS = (".git", ".hg", "pyproject.toml", "setup.cfg", "setup.py", "pytest.ini", "tox.ini")
# Saved cases: a hidden folder at the project root, as Hypothesis keeps .hypothesis/.
SAVE_DIR = ".losscmp"


def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the current one) that holds a
    project marker; ``start`` itself when none does (a loose folder of scripts)."""
    here = Path(start if start is not None else os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / marker).exists() for marker in MARKERS):
            return folder
    return here


def default_save_dir(start: str | Path | None = None) -> Path:
    return project_root(start) / SAVE_DIR


def portable_target(target: str, cwd: str | Path, root: Path) -> str:
    """A file reference's target, given relative to ``cwd``, as stored in a repro: relative
    to ``root`` (POSIX separators) when the file lies inside it, else absolute."""
    path = Path(target)
    if not path.is_absolute():
        path = Path(cwd) / path
    path = Path(os.path.normpath(path))  # not resolve(): a symlinked checkout keeps its own paths
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        try:
            return path.resolve().relative_to(root).as_posix()
        except (ValueError, OSError):
            return str(path)


def shown_path(path: str | Path, start: str | Path | None = None) -> str:
    """``path`` as a person at ``start`` (default: the current folder) would type it:
    relative when inside the same project (``../.losscmp/x.json``), else absolute."""
    here = Path(start if start is not None else os.getcwd()).resolve()
    p = Path(path).resolve()
    try:
        p.relative_to(project_root(here))
    except ValueError:
        return str(p)
    return os.path.relpath(p, here)
