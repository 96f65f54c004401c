"""May a worker be forked from this process and still run torch?

Two things break a forked child, and both are invisible until the child's first call:

* CUDA initialised here: a forked child cannot use it (torch says so at its first CUDA
  call).
* autograd's device threads: on a machine where torch sees a GPU, the first backward in
  a process starts one autograd thread per device, and from then on torch refuses every
  backward in a forked child ("Unable to handle autograd's threading in combination with
  fork-based multiprocessing").  A CPU-only audit is hit too, and so is a test suite in
  which any earlier test ran a backward.  torch offers no way to ask whether those
  threads exist, so a visible GPU is enough to refuse.

Seen on the first GPU run of the suite (an H200, torch 2.11+cu130): forked ``--jobs`` and
``--isolate`` workers reported every implementation as raising that error, a false
finding for a differential tester.  Workers then come from a fork server or ``spawn``
(clean processes that load the implementations by reference).
"""
from __future__ import annotations

import inspect
import multiprocessing
import os
import tempfile

import torch

from .errors import UsageError
from .load import Implementation, load_object

def _visible_accelerators() -> int:
    counter = getattr(getattr(torch, "accelerator", None), "device_count", None)
    if counter is None:  # torch < 2.6
        return torch.cuda.device_count()
    return int(counter())


def torch_survives_fork() -> bool:
    """True when a child forked now can still use CUDA and run a backward."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return False
    return not torch.cuda.is_initialized() and _visible_accelerators() == 0


def loads_by_reference(impl: Implementation, portable_ref=None) -> bool:
    """Does a fresh process loading ``impl.ref`` get this very callable (up to a factory call)?

    A factory reference (``SamplesLoss(...)``) is re-called there, as the CLI itself did;
    anything else must resolve here to the object we hold: a lambda, a local function or
    a test's closure does not, whatever its reference says.
    """
    if impl.ref.call is not None:
        return True
    try:
        there = load_object(portable_ref(impl.ref) if portable_ref else impl.ref)
    except Exception:  # any failure to load means: not by reference
        return False
    return bool(there == impl.fn) or _same_definition(there, impl.fn)


def _same_definition(a: object, b: object) -> bool:
    """Two function objects from one ``def`` in one file: the file loaded twice (a test
    module imported by pytest, then by path), not a closure carrying its own state."""
    if not (inspect.isfunction(a) and inspect.isfunction(b)) or a.__closure__ or b.__closure__:
        return False
    ca, cb = a.__code__, b.__code__
    try:
        same_file = os.path.samefile(ca.co_filename, cb.co_filename)
    except OSError:
        return False
    return (same_file and a.__qualname__ == b.__qualname__ and ca.co_firstlineno == cb.co_firstlineno
            and ca.co_code == cb.co_code and ca.co_consts == cb.co_consts)


# A fork server and its workers talk over a Unix socket made under the temporary folder
# ("pymp-XXXXXXXX/listener-XXXXXXXX"); its path must fit in sun_path (108 bytes with the NUL).
_SOCKET_PATH_MAX = 107
_SOCKET_TAIL = len("/pymp-12345678/listener-12345678")


def check_socket_folder() -> None:
    """One line before any worker starts, rather than an OSError from deep in multiprocessing."""
    folder = tempfile.gettempdir()
    length = len(os.fsencode(folder)) + _SOCKET_TAIL
    if length > _SOCKET_PATH_MAX:
        raise UsageError(f"the temporary folder {folder[:40]}... is too long for worker processes: their socket path would be "
                         f"{length} bytes (at most {_SOCKET_PATH_MAX}); set TMPDIR to a shorter folder, e.g. TMPDIR=/tmp")


WHY_NOT_FORKED = ("a process forked from this one cannot run torch here (CUDA is initialised, or a GPU is visible and "
                  "autograd's device threads forbid a backward in a forked child)")

__all__ = ["check_socket_folder", "loads_by_reference", "torch_survives_fork", "WHY_NOT_FORKED"]
