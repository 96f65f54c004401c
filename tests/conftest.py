from __future__ import annotations  # "str | None" below must not be evaluated on Python 3.9

import atexit
import multiprocessing.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from losscmp.forking import torch_survives_fork

# pytester's inline runs drop from sys.modules what was first imported inside them; the
# first torch.use_deterministic_algorithms() call (losscmp makes one per call, restoring the
# switches) imports torch._inductor modules that register C++ operator namespaces, and a
# second import then fails ("Only a single TORCH_LIBRARY can be used to register the
# namespace _inductor_test"), so a test after a pytester test saw a false exception.
# Imported here once, before any inline run, so no snapshot ever drops them.
torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled())

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
PLANTED = Path(__file__).resolve().parent / "planted.py"
# The suite's temporary files (isolated workers' pending cases, repros kept under --no-save,
# subprocesses' litter) go to one short folder of its own, removed when the session ends:
# a run of the suite used to leave some 350 losscmp-isolate-* folders in /tmp.  Short, because
# multiprocessing's fork server puts a Unix socket (at most 107 bytes of path) in there.
# Made once, by the first process to import this file: pytester's inline runs import it
# again, and xdist's workers inherit the variable, and neither may remove a folder that
# multiprocessing has cached as its own temporary folder.
OWNS_SUITE_TMP = "LOSSCMP_SUITE_TMP" not in os.environ
if OWNS_SUITE_TMP:
    # pytest's own tmp_path folders stay where they were: their paths are long already.
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    # And so does this process's multiprocessing folder (the fork server's socket): it is
    # removed at exit by multiprocessing itself, after the handler below has run.
    multiprocessing.util.get_temp_dir()
    os.environ["LOSSCMP_SUITE_TMP"] = tempfile.mkdtemp(prefix="losscmp-tests-")
    atexit.register(shutil.rmtree, os.environ["LOSSCMP_SUITE_TMP"], ignore_errors=True)
SYSTEM_TMP = os.environ["TMPDIR"] = tempfile.tempdir = os.environ["LOSSCMP_SUITE_TMP"]

# A test whose implementation is a lambda or local function reaches an isolated or --jobs
# worker only through fork, which losscmp refuses where a GPU is visible
# (tests/test_forking.py checks the refusal and its message).
NEEDS_FORK = pytest.mark.skipif(not torch_survives_fork(), reason="a lambda reaches its worker only by fork, refused where torch sees a GPU")


@pytest.fixture(scope="session", autouse=True)
def _suite_tmp_removed():
    yield
    if OWNS_SUITE_TMP:
        shutil.rmtree(SYSTEM_TMP, ignore_errors=True)


@pytest.fixture
def in_repo(monkeypatch):
    """Run with the repository root as working directory (references are relative)."""
    monkeypatch.chdir(REPO)
    return REPO


@pytest.fixture(scope="session")
def bce_audit(tmp_path_factory):
    """The bundled BCE pair (on sigmoid vs with logits) audited once per session, its
    findings minimised and saved as repros.  Shared by the tests that explain, replay or
    tamper with those findings (each used to run this same audit in its own module).
    The explanation stage is off: those tests call ``explain`` themselves, or read the
    saved files, which do not hold it.  Tests copy a repro before changing it."""
    from losscmp.audit import audit
    from losscmp.load import load_implementation
    from losscmp.settings import Settings
    from losscmp.spec import preset

    sigmoid, logits = (load_implementation(f"{FIXTURES}/bce.py:{name}") for name in ("bce_on_sigmoid", "bce_with_logits"))
    save_dir = tmp_path_factory.mktemp("bce-repros")
    result = audit([sigmoid, logits], preset("binary"), Settings.of(save_dir=save_dir, explain=False))
    assert {d.kind for d in result.divergences} >= {"value", "gradient"} and all(d.repro for d in result.divergences)
    return logits, sigmoid, result


@pytest.fixture
def bce_repros(bce_audit):
    """The shared BCE audit's repro files (JSON paths), one per finding."""
    return [Path(d.repro) for d in bce_audit[2].divergences]


@pytest.fixture
def short_tmp():
    """An empty folder with a short path, for a losscmp subprocess's TMPDIR.  multiprocessing's
    fork server listens on a Unix socket in TMPDIR, whose path must fit in 107 bytes; a test's
    tmp_path under pytest-xdist (.../pytest-N/popen-gw1/test_name0/) leaves too little room,
    and the fork server then fails with "AF_UNIX path too long"."""
    path = Path(tempfile.mkdtemp(prefix="lc-", dir=SYSTEM_TMP))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ref(path: Path, attr: str, label: str | None = None) -> str:
    text = f"{path}:{attr}"
    return f"{label}={text}" if label else text


# Keep pykeops' compile cache inside the user's cache dir, not the repo.
os.environ.setdefault("PYTHONHASHSEED", "0")

# The tests' tensors are tiny: intra-op threads only spin-wait, and on a busy 2-core
# machine they made a Sinkhorn audit 12x slower (25 cases: 121 s with 2 threads, 10 s
# with 1).  One thread here and in every subprocess (workers, other interpreters, CLI
# runs), unless the caller chose otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def installed_segloss(tmp_path, monkeypatch):
    """fixtures/segloss as an installed library (in a site-packages folder), as MONAI is."""
    site = tmp_path / "site-packages"
    shutil.copytree(FIXTURES / "segloss", site / "segloss")
    monkeypatch.syspath_prepend(str(site))
    yield site / "segloss"
    for name in [n for n in sys.modules if n == "segloss" or n.startswith("segloss.")]:
        del sys.modules[name]


def slow_pair(seconds: float):
    """Two squared-error losses 1.5x apart whose every call takes ``seconds``: a pair whose
    explanation is costly, for the tests of its time budget."""
    from losscmp.load import Implementation, parse_ref

    def slow(scale):
        def loss(input, target):
            time.sleep(seconds)
            return scale * ((input - target) ** 2).mean()
        return loss

    return Implementation(parse_ref("official=x.py:f"), slow(1.0)), Implementation(parse_ref("fork=x.py:g"), slow(1.5))
