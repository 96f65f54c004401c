"""Files a user names on the command line (``--json``, ``--output``, ``--plot``,
``--save-dir``): checked before the run, so that a report that cannot be written is
refused before the work, and written after it with every failure one line.

What is refused: a folder, a missing or non-folder parent (``--save-dir`` under a
regular file), a name the system cannot take (too long, a symlink loop), a read-only
file (``/proc/version``), and a FIFO no process reads (opening it to write would block
forever).  A FIFO that is read (``--json >(jq .)``, or a named one with a reader, whose
write end is then held open until the report is written) and a character device
(``/dev/stdout``) are fine; a write that fails anyway (``/dev/full``) is one line.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import UsageError, shown


# FIFOs found read at check time -> the write end opened then (see check_writable).
_held_fifos: dict[str, int] = {}


def _why(e: OSError) -> str:
    if e.errno == errno.ENXIO:
        return "a FIFO that no process reads (writing would block)"
    if e.errno == errno.ELOOP:
        return "a symlink loop"
    return e.strerror or type(e).__name__


def check_writable(path: str, option: str) -> None:
    """Fail before the run, not after it: a report that cannot be written is lost work."""
    if path == "-":
        return
    where = f"{option} {shown(path, quote=False)}"
    if "\0" in path:
        raise UsageError(f"{option} {shown(path)}: a file name cannot hold a NUL byte")
    p = Path(path)
    try:
        st = p.stat() if p.exists() else None
        parent_is_dir = p.parent.is_dir()
    except RuntimeError:  # pathlib before 3.13 says a symlink loop this way
        raise UsageError(f"{where}: cannot be used: a symlink loop") from None
    except OSError as e:
        raise UsageError(f"{where}: cannot be used: {_why(e)}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{where}: is a directory; give a file path")
    if not parent_is_dir:
        raise UsageError(f"{where}: folder {shown(str(p.parent), quote=False)} does not exist")
    if st is not None and stat.S_ISFIFO(st.st_mode):
        try:  # succeeds only while some process has it open for reading
            fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            raise UsageError(f"{where}: {_why(e)}") from None
        # Held open until the report is written: closing it now would end the reader's input.
        _held_fifos.setdefault(os.path.abspath(path), fd)
    if st is not None and stat.S_ISREG(st.st_mode) and not st.st_mode & 0o222:
        raise UsageError(f"{where}: is read-only")
    if not os.access(p.parent, os.W_OK) or (st is not None and not os.access(p, os.W_OK)):
        raise UsageError(f"{where}: not writable")


def check_folder(path: str | Path, option: str) -> None:
    """A folder losscmp may create and write into: its nearest existing ancestor is a
    writable folder (never a regular file: ``--save-dir report.txt/sub``)."""
    where = f"{option} {shown(str(path), quote=False)}"
    if "\0" in str(path):
        raise UsageError(f"{option} {shown(str(path))}: a file name cannot hold a NUL byte")
    p = Path(path)
    try:
        while not p.exists() and p != p.parent:
            p = p.parent
        is_dir = p.is_dir()
    except RuntimeError:
        raise UsageError(f"{where}: cannot be used: a symlink loop") from None
    except OSError as e:
        raise UsageError(f"{where}: cannot be used: {_why(e)}") from None
    if not is_dir:
        raise UsageError(f"{where}: {shown(str(p), quote=False)} exists and is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"{where}: {shown(str(p), quote=False)} is not writable")


def write_text(path: str | Path, text: str, option: str) -> None:
    """Write ``text`` to a file the user named; any failure is one UsageError line.
    Opened without blocking, so a FIFO whose reader went away is an error, not a hang."""
    where = f"{option} {shown(str(path), quote=False)}"
    fd = _held_fifos.pop(os.path.abspath(path), None)
    try:
        if fd is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK, 0o666)
    except OSError as e:
        raise UsageError(f"{where}: cannot write: {_why(e)}") from None
    try:
        os.set_blocking(fd, True)  # a reader that is slow must not make a short write
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as e:
        raise UsageError(f"{where}: cannot write: {_why(e)}") from None
