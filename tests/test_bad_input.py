"""Bad input, as a hostile or careless user gives it (issue 18): every row is one line on
stderr, the expected exit code (2: bad usage or bad input), in bounded time, no traceback.

Each row builds what it needs in ``tmp_path`` and gives the argv.  Rows that could hang
or that need signals or the supervising process (a FIFO, an import that never returns,
an interpreter that never answers, a real Ctrl-C) run ``python -m losscmp`` in a
subprocess with a deadline; the others run ``losscmp.cli.main(argv)`` in process.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from losscmp.cli import main

from .conftest import FIXTURES, REPO

pytest_plugins = ["pytester"]

OK = f"{FIXTURES}/regression.py:mean_square"
RUN = ["--spec", "regression", "--examples", "3", "--no-save"]
LONG_NAME = "a" * 5000 + ".py"  # one name past NAME_MAX
LONG_PATH = "/".join(["a" * 200] * 30) + ".py"  # short names, past PATH_MAX


def write(t: Path, name: str, text: str) -> str:
    (t / name).write_text(text)
    return str(t / name)


def symlink_loop(t: Path) -> str:
    loop = t / "loop.py"
    loop.symlink_to(loop)
    return str(loop)


def symlink_to(t: Path, name: str, target: str) -> Path:
    (t / name).symlink_to(target)
    return t / name


def fifo(t: Path, name: str) -> str:
    os.mkfifo(t / name)
    return str(t / name)


def base_exception_module(t: Path) -> str:
    return write(t, "base.py", "class Stop(BaseException): pass\nraise Stop('at import')\n")


def getattr_module(t: Path, exc: str) -> str:
    return write(t, f"getattr_{exc}.py", f"def __getattr__(name): raise {exc}('no ' + name)\n")


def factories(t: Path) -> str:
    return write(t, "factories.py", "import torch.nn.functional as F\n"
                                    "class Stop(BaseException): pass\n"
                                    "def stop(**kw): raise Stop('in the factory')\n"
                                    "def make(**kw): return F.mse_loss\n")


def script(t: Path, name: str, text: str) -> str:
    path = write(t, name, text)
    os.chmod(path, 0o755)
    return path


@dataclass(frozen=True)
class Row:
    id: str
    argv: Callable[[Path], list[str]]
    words: tuple[str, ...]
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)


# --- rows run in process: they cannot hang even when the fix is missing ---------------------
IN_PROCESS = [
    Row("long name", lambda t: [LONG_NAME + ":f", OK, *RUN], ("cannot be read", "File name too long", "characters")),
    Row("long path", lambda t: [LONG_PATH + ":f", OK, *RUN], ("cannot be read", "File name too long")),
    Row("symlink loop", lambda t: [symlink_loop(t) + ":f", OK, *RUN], ("loop.py", "symlink loop")),
    # Only in process: execve refuses a NUL in an argument, but main(argv) and a repro's JSON do not.
    Row("NUL byte in a reference", lambda t: ["a\0.py:f", OK, *RUN], ("NUL byte",)),
    Row("NUL byte in --json", lambda t: [OK, "b=" + OK, "--json", "r\0.json", *RUN], ("--json", "NUL byte")),
    Row("NUL byte in --save-dir", lambda t: [OK, "b=" + OK, "--spec", "regression", "--save-dir", "d\0d"], ("--save-dir", "NUL byte")),
    Row("FIFO behind a symlink", lambda t: [str(symlink_to(t, "link.py", fifo(t, "fifo.py"))) + ":f", OK, *RUN], ("is not a regular file",)),
    Row("device as a reference", lambda t: [str(symlink_to(t, "zero.py", "/dev/zero")) + ":f", OK, *RUN], ("zero.py is not a .py file",)),  # judged by what the link names
    Row("BaseException at import", lambda t: [base_exception_module(t) + ":f", OK, *RUN], ("importing", "raised Stop: at import")),
    Row("GeneratorExit at import", lambda t: [write(t, "genexit.py", "raise GeneratorExit('bye')\n") + ":f", OK, *RUN],
        ("raised GeneratorExit: bye",)),
    Row("SystemExit at import", lambda t: [write(t, "sysexit.py", "raise SystemExit(3)\n") + ":f", OK, *RUN], ("raised SystemExit(3)",)),
    Row("module __getattr__ raises", lambda t: [getattr_module(t, "RuntimeError") + ":f", OK, *RUN],
        ("getting 'f'", "raised RuntimeError: no f")),
    # Raised by the module itself, not a Ctrl-C: its failure to load (a real SIGINT exits 130, below).
    Row("module __getattr__ raises KeyboardInterrupt", lambda t: [getattr_module(t, "KeyboardInterrupt") + ":f", OK, *RUN],
        ("getting 'f'", "raised KeyboardInterrupt")),
    Row("property raises", lambda t: [write(t, "prop.py", "class C:\n    @property\n    def p(self): raise ValueError('bad p')\n"
                                                           "obj = C()\n") + ":obj.p", OK, *RUN], ("getting 'obj.p'", "raised ValueError: bad p")),
    # Inference reads the signature: a __signature__ property or a __getattr__ that raises makes it unknown, not an internal error.
    Row("signature that raises", lambda t: [write(t, "sig.py", "class L:\n    @property\n    def __signature__(self): raise RuntimeError('no')\n"
                                                               "    def __call__(self, x): raise TypeError('takes no tensors')\nloss = L()\n") + ":loss",
                                            OK, "--examples", "3", "--no-save"], ("no spec fits", "give --spec")),
    Row("factory raises a BaseException", lambda t: [factories(t) + ":stop()", OK, *RUN], ("calling the factory raised Stop: in the factory",)),
    Row("nested unary minus in a reference", lambda t: [factories(t) + ":make(x=" + "-" * 100_000 + "1)", OK, *RUN],
        ("literal", "characters")),
    Row("nested lists in a reference", lambda t: [factories(t) + ":make(x=" + "[" * 5000 + "]" * 5000 + ")", OK, *RUN],
        ("literal",)),
    Row("long attribute chain", lambda t: [factories(t) + ":" + ".".join(["a"] * 30_000), OK, *RUN], ("cannot parse",)),
    Row("huge integer in a reference", lambda t: [factories(t) + ":make(x=0x" + "f" * 5000 + ")", OK, *RUN],
        ("literal",)),
    Row("unhashable key in a reference", lambda t: [factories(t) + ":make(x={[1]: 2})", OK, *RUN], ("literal",)),
    Row("nested unary minus in a spec", lambda t: [OK, "b=" + OK, "--spec", "input: B real grad; target: B real; p=" + "-" * 100_000 + "1"],
        ("parameter p=", "not a Python literal")),
    Row("huge integer in a spec", lambda t: [OK, "b=" + OK, "--spec", "input: B real grad; target: B real; p=0x" + "f" * 5000],
        ("parameter p=", "not a Python literal")),
    Row("huge size in a spec", lambda t: [OK, "b=" + OK, "--spec", "input: B real grad; target: B real; B=" + "9" * 5000],
        ("size of B",)),
    Row("more dims than torch has", lambda t: [OK, "b=" + OK, "--spec", "input: " + "1 " * 65 + "real grad; target: B real"],
        ("65 dims", "at most 64")),
    Row("unicode digit as a dim", lambda t: [OK, "b=" + OK, "--spec", "input: \u00b2 real grad; target: B real"], ("bad dim",)),
    Row("huge literal dim", lambda t: [OK, "b=" + OK, "--spec", "input: " + "9" * 5000 + " real grad; target: B real"], ("bad dim", "characters")),
    Row("spec file naming itself", lambda t: [OK, "b=" + OK, "--spec", write(t, "spec.py", f"SPEC = {str(t / 'spec.py:SPEC')!r}\n") + ":SPEC"],
        ("cannot parse spec item",)),
    Row("--python ~nosuchuser", lambda t: [OK, "b=" + OK, "--python", "b=~nosuchuser-losscmp/bin/python", *RUN], ("no such user",)),
    Row("--python long path", lambda t: [OK, "b=" + OK, "--python", "b=" + LONG_PATH, *RUN], ("--python b=", "File name too long")),
    Row("--json /dev/full", lambda t: [OK, "b=" + OK, "--json", "/dev/full", *RUN], ("--json /dev/full", "No space left on device")),
    Row("--json /proc/version", lambda t: [OK, "b=" + OK, "--json", "/proc/version", *RUN], ("--json /proc/version", "read-only")),
    Row("--json long name", lambda t: [OK, "b=" + OK, "--json", str(t / LONG_NAME), *RUN], ("--json", "File name too long")),
    Row("--save-dir under a regular file", lambda t: [OK, "b=" + OK, "--spec", "regression", "--save-dir", write(t, "f.txt", "x") + "/sub"],
        ("--save-dir", "f.txt exists and is not a folder")),
    Row("sweep --points 10**9", lambda t: ["sweep", OK, "b=" + OK, "--param", "scale=1:100", "--points", str(10**9)], ("--points must be at least 2 and at most 1000",)),
    Row("sweep --param beyond float", lambda t: ["sweep", OK, "b=" + OK, "--param", "scale=1:1e400", "--spec", "regression"], ("finite",)),
    Row("replay of a long name", lambda t: ["replay", LONG_NAME], ("cannot be read", "File name too long")),
    Row("--reference long", lambda t: [OK, "b=" + OK, *RUN, "--reference", "x" * 5000], ("--reference", "is not one of")),
    Row("sweep --size 10**9", lambda t: ["sweep", OK, "b=" + OK, "--param", "scale=1:100", "--size", str(10**9)], ("--size must be at least 1 and at most",)),
]


@pytest.mark.parametrize("row", IN_PROCESS, ids=lambda r: r.id)
def test_bad_input_in_process_is_one_line_and_exit_2(row, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = row.argv(tmp_path)
    start = time.monotonic()
    code = main(argv)
    err = capsys.readouterr().err
    assert_one_line(err, code, row, time.monotonic() - start)


def assert_one_line(err: str, code: int | str, row: Row, seconds: float, limit: float = 60.0) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-2000:]
    assert code == row.code, f"exit {code}, stderr: {err[-2000:]}"
    assert len(lines) == 1, f"{len(lines)} lines: {err[-2000:]}"
    assert lines[0].startswith("losscmp: "), lines[0]
    assert len(lines[0]) < 1500, lines[0][:300]  # the input is echoed elided, not in full
    for word in row.words:
        assert word in lines[0], lines[0]
    assert seconds < limit


# --- replay and trace get the same inputs through a repro --------------------------------
@pytest.fixture(scope="module")
def repro(tmp_path_factory) -> Path:
    """A real repro: Huber vs SmoothL1 differ by a factor beta."""
    out = tmp_path_factory.mktemp("repro")
    code = main([f"{FIXTURES}/regression.py:huber", f"{FIXTURES}/regression.py:smooth_l1", "--spec", "regression", "--examples", "20",
                 "--no-explain", "--no-minimize", "--save-dir", str(out), "-q"])
    assert code == 1
    return next(out.glob("*.json"))


def tampered(repro: Path, t: Path, ref: str) -> str:
    """A copy of ``repro`` whose second implementation is ``ref`` (a repro arrives in pull requests)."""
    meta = json.loads(repro.read_text())
    meta["implementations"][1]["ref"] = ref
    (t / "bad.json").write_text(json.dumps(meta))
    shutil.copy(repro.with_suffix(".npz"), t / "bad.npz")
    return str(t / "bad.json")


REPLAYS = [
    Row("replay: symlink loop", lambda t, r: ["replay", tampered(r, t, symlink_loop(t) + ":f")], ("symlink loop",)),
    Row("replay: long name", lambda t, r: ["replay", tampered(r, t, LONG_NAME + ":f")], ("File name too long",)),
    Row("replay: BaseException at import", lambda t, r: ["replay", tampered(r, t, base_exception_module(t) + ":f")], ("raised Stop: at import",)),
    Row("replay: module __getattr__ raises KeyboardInterrupt", lambda t, r: ["replay", tampered(r, t, getattr_module(t, "KeyboardInterrupt") + ":f")],
        ("raised KeyboardInterrupt",)),
    Row("replay: nested literal", lambda t, r: ["replay", tampered(r, t, "torch.nn:HuberLoss(delta=" + "-" * 100_000 + "1)")],
        ("corrupt repro", "literal")),
    Row("replay: --python ~nosuchuser", lambda t, r: ["replay", str(r), "--python", "smooth_l1=~nosuchuser-losscmp/python"], ("no such user",)),
    Row("replay --pytest -o /dev/full", lambda t, r: ["replay", "--pytest", str(r), "-o", "/dev/full"], ("--output /dev/full", "No space left on device")),
    Row("replay --pytest -o under a file", lambda t, r: ["replay", "--pytest", str(r), "-o", write(t, "f.txt", "x") + "/t.py"], ("--output", "does not exist")),
    Row("trace: BaseException at import", lambda t, r: ["trace", OK, base_exception_module(t) + ":f", str(r)], ("raised Stop: at import",)),
    Row("trace: symlink loop", lambda t, r: ["trace", OK, symlink_loop(t) + ":f", str(r)], ("symlink loop",)),
    Row("trace: nested literal", lambda t, r: ["trace", OK, factories(t) + ":make(x=" + "[" * 5000 + "]" * 5000 + ")", str(r)],
        ("literal",)),
    Row("trace --json /dev/full", lambda t, r: ["trace", f"{FIXTURES}/regression.py:huber", f"{FIXTURES}/regression.py:smooth_l1", str(r),
                                                "--json", "/dev/full"], ("--json /dev/full", "No space left on device")),
    Row("trace --json /proc/version", lambda t, r: ["trace", OK, "b=" + OK, str(r), "--json", "/proc/version"], ("--json /proc/version", "read-only")),
]


@pytest.mark.parametrize("row", REPLAYS, ids=lambda r: r.id)
def test_bad_input_through_replay_and_trace_is_one_line_and_exit_2(row, repro, tmp_path, capsys):
    argv = row.argv(tmp_path, repro)
    start = time.monotonic()
    code = main(argv)
    assert_one_line(capsys.readouterr().err, code, row, time.monotonic() - start)


# --- rows that would hang without their fix: a subprocess with a deadline ----------------
LOAD_LIMIT = {"LOSSCMP_LOAD_TIMEOUT": "3"}
SUBPROCESS = [
    Row("FIFO as a reference", lambda t: [fifo(t, "fifo.py") + ":f", OK, *RUN], ("fifo.py is not a regular file",)),
    Row("FIFO as --json", lambda t: [OK, "b=" + OK, "--json", fifo(t, "report.json"), *RUN], ("--json", "a FIFO that no process reads")),
    Row("FIFO as a spec file", lambda t: [OK, "b=" + OK, "--spec", fifo(t, "spec.py") + ":SPEC"], ("spec.py is not a regular file",)),
    Row("FIFO as a repro", lambda t: ["replay", fifo(t, "case.json")], ("no such repro",)),
    Row("import that never returns", lambda t: [write(t, "spin.py", "while True:\n    try:\n        pass\n    except BaseException:\n        pass\n") + ":f",
                                                OK, *RUN], ("importing", "did not finish within 3 s", "LOSSCMP_LOAD_TIMEOUT"), env=LOAD_LIMIT),
    Row("import that sleeps", lambda t: [write(t, "sleepy.py", "import time\ntime.sleep(10**6)\n") + ":f", OK, *RUN],
        ("did not finish within 3 s",), env=LOAD_LIMIT),
    Row("factory that never returns", lambda t: [write(t, "slowfac.py", "import time\ndef make():\n    time.sleep(10**6)\n") + ":make()", OK, *RUN],
        ("calling the factory did not finish within 3 s",), env=LOAD_LIMIT),
    Row("BaseException at import, supervised", lambda t: [base_exception_module(t) + ":f", OK, *RUN], ("raised Stop: at import",)),
    Row("--python that never answers", lambda t: [OK, "b=" + OK, "--python", "b=" + script(t, "hang.sh", "#!/bin/sh\nexec sleep 1000\n"), *RUN],
        ("--python b=", "did not start losscmp's worker within 3 s", "it wrote nothing"), env=LOAD_LIMIT),
    # Garbage where the worker's greeting belongs (the reply pipe is its 5th argument), then silence.
    Row("--python that writes garbage", lambda t: [OK, "b=" + OK, "--python", "b=" + script(
        t, "garbage.py", f"#!{sys.executable}\nimport os, sys, time\nos.write(int(sys.argv[5]), b'garbage' * 1000)\ntime.sleep(1000)\n"), *RUN],
        ("--python b=", "did not start losscmp's worker", "it wrote 'garbage"), env=LOAD_LIMIT),
    Row("--python that exits at once", lambda t: [OK, "b=" + OK, "--python", "b=" + script(t, "false.sh", "#!/bin/sh\necho broken >&2\nexit 3\n"), *RUN],
        ("--python b=", "the worker exited at start (exit code 3): broken",)),
]


def run_losscmp(argv: list[str], env: dict[str, str], deadline: float, cwd: Path) -> tuple[int | str, str]:
    done = subprocess.run([sys.executable, "-m", "losscmp", *argv], capture_output=True, text=True, timeout=deadline, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"), **env})
    return done.returncode, done.stderr


@pytest.mark.slow  # starts losscmp in a fresh interpreter
@pytest.mark.parametrize("row", SUBPROCESS, ids=lambda r: r.id)
def test_bad_input_that_could_hang_is_one_line_and_exit_2_in_bounded_time(row, tmp_path):
    argv = row.argv(tmp_path)
    start = time.monotonic()
    code, err = run_losscmp(argv, row.env, 120, tmp_path)
    assert_one_line(err, code, row, time.monotonic() - start, limit=120)


@pytest.mark.slow  # starts losscmp in a fresh interpreter
def test_a_real_ctrl_c_during_an_import_still_interrupts(tmp_path):
    """A KeyboardInterrupt the module raises is its load failure (exit 2, above); a Ctrl-C
    (SIGINT to the process group, as a terminal sends it) while it imports is the user
    stopping losscmp: exit 130."""
    marker = tmp_path / "importing"
    path = write(tmp_path, "slow.py", f"import pathlib, time\npathlib.Path({str(marker)!r}).write_text('x')\ntime.sleep(10**6)\n")
    proc = subprocess.Popen([sys.executable, "-m", "losscmp", path + ":f", OK, *RUN], stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO / "src"), "LOSSCMP_LOAD_TIMEOUT": "100"})
    try:
        deadline = time.monotonic() + 90
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), "the import never started"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert err.strip() == "losscmp: interrupted"


REPLAYS_THAT_COULD_HANG = [
    Row("replay: FIFO as the reference", lambda t, r: ["replay", tampered(r, t, fifo(t, "fifo.py") + ":f")], ("fifo.py is not a regular file",)),
    Row("replay: import that never returns", lambda t, r: ["replay", tampered(r, t, write(t, "sleepy.py", "import time\ntime.sleep(10**6)\n") + ":f")],
        ("did not finish within 3 s",), env=LOAD_LIMIT),
    Row("replay --pytest -o FIFO", lambda t, r: ["replay", "--pytest", str(r), "-o", fifo(t, "test_case.py")], ("--output", "a FIFO that no process reads")),
    Row("trace: import that never returns", lambda t, r: ["trace", OK, write(t, "sleepy.py", "import time\ntime.sleep(10**6)\n") + ":f", str(r)],
        ("did not finish within 3 s",), env=LOAD_LIMIT),
]


@pytest.mark.slow  # starts losscmp in a fresh interpreter
@pytest.mark.parametrize("row", REPLAYS_THAT_COULD_HANG, ids=lambda r: r.id)
def test_bad_input_through_replay_and_trace_that_could_hang_is_one_line_and_exit_2(row, repro, tmp_path):
    argv = row.argv(tmp_path, repro)
    start = time.monotonic()
    code, err = run_losscmp(argv, row.env, 120, tmp_path)
    assert_one_line(err, code, row, time.monotonic() - start, limit=120)


@pytest.mark.slow  # starts losscmp in a fresh interpreter
def test_a_fifo_that_is_read_gets_the_whole_report(tmp_path):
    """The counterpart of 'FIFO as --json': a FIFO some process reads is a fine --json
    target, and the check before the run must not end that reader's input."""
    path = fifo(tmp_path, "report.json")
    reader = subprocess.Popen(["cat", path], stdout=subprocess.PIPE, text=True)
    try:
        code, err = run_losscmp([OK, "b=" + OK, *RUN, "-q", "--json", path], {}, 120, tmp_path)
        out, _ = reader.communicate(timeout=30)
    finally:
        reader.kill()
    assert code == 0, err
    assert json.loads(out)["implementations"] == ["mean_square", "b"]


def test_the_plugin_refuses_a_save_dir_under_a_regular_file_before_any_test_runs(pytester):
    pytester.makefile(".txt", notes="x")
    pytester.makepyfile("def test_never_run():\n    raise AssertionError('ran')\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--losscmp-save-dir", "notes.txt/cases")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --losscmp-save-dir notes.txt/cases: notes.txt exists and is not a folder"])
    assert "ran" not in result.stdout.str()


@pytest.mark.parametrize("mode", [["--isolate"], ["--jobs", "2"]])
def test_a_temporary_folder_too_long_for_worker_sockets_is_one_line(mode, tmp_path, capsys, monkeypatch):
    # Was "internal error: OSError: AF_UNIX path too long ... (a bug in losscmp)": the fork
    # server's socket lives under TMPDIR and must fit in 107 bytes.
    import tempfile

    from losscmp import forking

    long = tmp_path / ("x" * 120)
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    monkeypatch.setattr(forking, "_visible_accelerators", lambda: 1)  # --jobs then needs the fork server too
    assert main([OK, "b=" + OK, *RUN, *mode]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "too long for worker processes" in err and "set TMPDIR to a shorter folder" in err
