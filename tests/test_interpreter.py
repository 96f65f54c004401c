"""--python LABEL=PATH: an implementation under another interpreter, through the standalone worker.

Most tests hand the worker to this very interpreter (fast); the slow ones build a second
virtual environment with torch and numpy only (the local CPU wheel when there is one),
prove losscmp is absent there, and run a package that only that environment has.
"""
from __future__ import annotations

import ast
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from losscmp import interpreter
from losscmp.audit import Settings, audit
from losscmp.cli import main
from losscmp.generate import Case, Recipe, build_case
from losscmp.interpreter import WORKER_FILE, InterpreterError, InterpreterRunner, remote_implementation
from losscmp.isolate import RunRecord, Transport
from losscmp.load import load_implementation, parse_ref
from losscmp.repro import load_repro
from losscmp.run import call
from losscmp.spec import parse_spec, preset

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]
MISBEHAVING = "fixtures/misbehaving.py"
REGRESSION = preset("regression")
HERE = sys.executable


@pytest.fixture(autouse=True)
def in_repo_with_private_tmp(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def remote(ref: str):
    """An implementation that only the worker loads (as the CLI builds it for --python)."""
    return remote_implementation(parse_ref(ref))


def regression_case(values: list[float]) -> Case:
    x = torch.tensor(values)
    return Case(tensors={"input": x, "target": torch.zeros_like(x)}, sizes={"B": len(values)})


# ----------------------------------------------------------------------------- the worker file
def test_the_worker_imports_only_the_standard_library_torch_and_numpy():
    tree = ast.parse(WORKER_FILE.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import would need losscmp"
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"torch", "numpy"}


# ----------------------------------------------------------------------------- same results as in process
@pytest.mark.slow
def test_outcomes_match_in_process_bit_for_bit():
    spec = parse_spec("x: N D real grad; y: N D real; N=1..5; D=1..4")
    mse, here_mse = remote(f"{MISBEHAVING}:mse"), load_implementation(f"{MISBEHAVING}:mse")
    with InterpreterRunner({"mse": HERE}, timeout=30) as runner:
        for seed, (layout, dtype) in enumerate(
            [("contiguous", torch.float32), ("transposed", torch.float64), ("strided", torch.float32), ("strided", torch.bfloat16)]
        ):
            case = build_case(spec, Recipe(sizes=(("N", 3), ("D", 4)), layout=layout, seed=seed), dtype=dtype)
            here, there = call(here_mse.fn, spec, case), runner(mse, spec, case)
            assert there.status == "ok", there.error
            assert there.transport == Transport.PIPE
            assert there.value.dtype == here.value.dtype and torch.equal(there.value, here.value)
            assert there.grads.keys() == here.grads.keys() == {"x"}
            assert torch.equal(there.grads["x"], here.grads["x"])
            assert there.grads["x"].stride() == here.grads["x"].stride()


@pytest.mark.slow
def test_failures_come_back_as_in_process(tmp_path):
    module = tmp_path / "odd.py"
    module.write_text(textwrap.dedent("""
        import torch

        def raises(input, target):
            raise ValueError("bad input\\nsecond line")

        def vector(input, target):
            return input * 2

        def params(input, target, pair=(1, 2), limit=1.0, name="a", nested=None):
            # Encodes what arrived: types survive the trip (a tuple stays a tuple, inf stays inf).
            ok = isinstance(pair, tuple) and limit == float("inf") and name == "b" and nested == {"k": [1, (2,)]}
            return (input * 0).sum() + float(ok)
    """))
    case = regression_case([1.0, -2.0, 3.0])
    labels = {"mutates_input": HERE, "returns_list": HERE, "raises": HERE, "vector": HERE, "params": HERE}
    with InterpreterRunner(labels, timeout=30) as runner:
        out = runner(remote(f"{MISBEHAVING}:mutates_input"), REGRESSION, case)
        assert out.status == "ok" and out.mutated == ("input",)
        assert torch.equal(case.tensors["input"], torch.tensor([1.0, -2.0, 3.0]))
        assert runner(remote(f"{MISBEHAVING}:returns_list"), REGRESSION, case).error == "returned list, not a tensor"
        fn = load_implementation(f"{module}:raises").fn
        here, there = call(fn, REGRESSION, case), runner(remote(f"{module}:raises"), REGRESSION, case)
        assert there.status == here.status == "exception" and there.error == here.error == "raised ValueError: bad input"
        out = runner(remote(f"{module}:vector"), REGRESSION, case)
        assert out.status == "non_scalar" and out.error == "returned shape (3,), expected a scalar"
        with_params = Case(case.tensors, case.sizes, params={"pair": (3, 4), "limit": float("inf"), "name": "b", "nested": {"k": [1, (2,)]}})
        out = runner(remote(f"{module}:params"), REGRESSION, with_params)
        assert out.status == "ok" and float(out.value) == 1.0


@pytest.mark.slow
def test_crash_and_hang_are_findings_with_repros_and_the_next_call_gets_a_fresh_worker(tmp_path):
    seg, hangs = remote(f"{MISBEHAVING}:segfaults_on_negative_mean"), remote(f"{MISBEHAVING}:hangs_on_size_one")
    partner = parse_ref(f"{MISBEHAVING}:mse")
    record = RunRecord(refs=(partner, seg.ref, hangs.ref), keep_dir=tmp_path / "kept")
    pythons = {"segfaults_on_negative_mean": HERE, "hangs_on_size_one": HERE}
    with InterpreterRunner(pythons, timeout=2, record=record) as runner:
        out = runner(seg, REGRESSION, regression_case([-1.0, -2.0]))
        assert out.status == "crash" and out.error.startswith("crashed (signal SIGSEGV) in segfaults_on_negative_mean")
        repro = load_repro(out.error.rsplit("input saved to ", 1)[1])
        assert repro.kind == "crash" and repro.pair == ("segfaults_on_negative_mean", "mse")
        assert runner(seg, REGRESSION, regression_case([1.0, 2.0])).status == "ok"
        start = time.monotonic()
        out = runner(hangs, REGRESSION, regression_case([1.0]))
        assert out.status == "timeout" and out.error.startswith("did not return within 2 s")
        assert time.monotonic() - start < 15
        assert load_repro(out.error.rsplit("input saved to ", 1)[1]).kind == "timeout"
        assert float(runner(hangs, REGRESSION, regression_case([1.0, 3.0])).value) == 5.0


@pytest.mark.slow
def test_cli_compares_an_implementation_under_another_interpreter(capsys):
    code = main([f"{MISBEHAVING}:mse", "torch.nn.functional:mse_loss", "--spec", "regression", "--examples", "15",
                 "--no-save", "--python", f"mse_loss={HERE}"])
    assert code == 0, capsys.readouterr()
    code = main([f"{MISBEHAVING}:mse", f"{MISBEHAVING}:mutates_input", "--spec", "regression", "--examples", "5",
                 "--no-save", "--no-minimize", "--python", f"mutates_input={HERE}"])
    assert code == 1 and "mutation" in capsys.readouterr().out


# ----------------------------------------------------------------------------- one-line errors
def _cli_error(capsys, *python: str) -> str:
    argv = [f"{MISBEHAVING}:mse", "torch.nn.functional:mse_loss", "--spec", "regression", "--examples", "2", "--no-save"]
    for p in python:
        argv += ["--python", p]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("losscmp: error: "), err
    return err


def test_bad_interpreter_paths_are_one_line_errors(tmp_path, capsys):
    text = tmp_path / "python"
    text.write_text("not a program")
    assert "no such file" in _cli_error(capsys, f"mse_loss={tmp_path / 'missing'}")
    assert "is a folder" in _cli_error(capsys, f"mse_loss={tmp_path}")
    assert "is not executable" in _cli_error(capsys, f"mse_loss={text}")
    text.chmod(0o755)
    assert "cannot be started (Exec format error)" in _cli_error(capsys, f"mse_loss={text}")
    script = tmp_path / "not-python"
    script.write_text("#!/bin/sh\necho 'this is not python' >&2\nexit 0\n")
    script.chmod(0o755)
    err = _cli_error(capsys, f"mse_loss={script}")
    assert "the worker exited at start (exit code 0): this is not python" in err
    assert "no implementation has that label" in _cli_error(capsys, f"nobody={HERE}")
    assert "expected LABEL=" in _cli_error(capsys, HERE)


def test_an_interpreter_without_torch_is_a_one_line_error(tmp_path, capsys):
    bare = tmp_path / "bare"
    subprocess.run([HERE, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    err = _cli_error(capsys, f"mse_loss={bare / 'bin' / 'python'}")
    assert "needs torch and numpy there" in err and "No module named" in err


def test_a_too_old_interpreter_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(interpreter, "MIN_PYTHON", (99, 0))  # the real version check, made to fail here
    err = _cli_error(capsys, f"mse_loss={HERE}")
    assert f"Python {sys.version_info[0]}.{sys.version_info[1]} is too old" in err and ">= 99.0" in err


def _pyenv_python(prefix: str) -> str | None:
    """An installed interpreter of that version, if this machine has one (pyenv or PATH)."""
    found = sorted(Path.home().glob(f".pyenv/versions/{prefix}*/bin/python"))
    return str(found[0]) if found else shutil.which(f"python{prefix}")


@pytest.mark.skipif(_pyenv_python("2.7") is None, reason="no Python 2.7 on this machine")
def test_a_real_python_2_is_too_old(capsys):
    err = _cli_error(capsys, f"mse_loss={_pyenv_python('2.7')}")
    assert "Python 2.7 is too old; the worker needs Python >= 3.6" in err


@pytest.mark.skipif(_pyenv_python("3.6") is None, reason="no Python 3.6 on this machine")
def test_the_worker_runs_on_python_3_6_up_to_importing_torch(tmp_path, capsys):
    # The oldest Python the worker supports: its own code runs there (the failure is the missing torch/numpy).
    err = _cli_error(capsys, f"mse_loss={_pyenv_python('3.6')}")
    assert "needs torch and numpy there" in err and "No module named" in err


def test_a_protocol_mismatch_is_a_one_line_error(tmp_path):
    stale = tmp_path / "worker.py"
    stale.write_text(WORKER_FILE.read_text().replace("\nPROTOCOL = 1\n", "\nPROTOCOL = 0\n"))
    with InterpreterRunner({"mse": HERE}, worker_file=stale) as runner:
        with pytest.raises(InterpreterError, match="protocol version mismatch: the worker speaks 0, losscmp speaks 1"):
            runner(remote(f"{MISBEHAVING}:mse"), REGRESSION, regression_case([1.0]))


@pytest.mark.slow
def test_a_reference_the_other_interpreter_cannot_load_is_a_one_line_error(capsys):
    argv = [f"{MISBEHAVING}:mse", f"{MISBEHAVING}:no_such_loss", "--spec", "regression", "--no-save",
            "--python", f"no_such_loss={HERE}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be loaded under" in err and "no_such_loss" in err


# ----------------------------------------------------------------------------- a second environment
WHEELS = Path(os.environ.get("LOSSCMP_TORCH_WHEELS", "/opt/wheels"))


def _cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "losscmp-tests"


@pytest.fixture(scope="session")
def other_env(tmp_path_factory) -> Path:
    """A virtual environment with torch and numpy only (cached across runs); its python."""
    wheels = sorted(WHEELS.glob("torch-*.whl")) if WHEELS.is_dir() else []
    # The local CPU wheel when there is one; else the CPU build from PyTorch's index (not a GPU build's gigabytes).
    want = [str(w) for w in wheels] or ["torch", "--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    key = hashlib.sha1(f"{sys.version}|{want}".encode()).hexdigest()[:12]
    root = _cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = tmp_path_factory.mktemp("venvs")
    env = root / f"torch-numpy-{key}"
    python = env / "bin" / "python"
    # One build at a time: under pytest-xdist every worker runs this session fixture, and on a
    # fresh machine each would install torch; the others wait here and find it ready.
    with open(root / f"torch-numpy-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (env / "ready").exists():
            building = Path(tempfile.mkdtemp(prefix="building-", dir=root))
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(building)], check=True, timeout=300)
            proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(building / "bin" / "python"), "install",
                                   "--quiet", "--disable-pip-version-check", *want, "numpy"],
                                  capture_output=True, text=True, timeout=1200)
            if proc.returncode != 0:
                shutil.rmtree(building, ignore_errors=True)
                pytest.skip(f"torch cannot be installed into a fresh virtual environment here: {proc.stderr.strip().splitlines()[-1:]}")
            (building / "ready").touch()
            if env.exists():  # a run without the lock (an older checkout) finished first
                shutil.rmtree(building, ignore_errors=True)
            else:  # the interpreter finds its environment from pyvenv.cfg beside it: a renamed venv still works
                building.rename(env)
    return python


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, env=_clean_env())
    return Path(out.stdout.strip())


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _install_toy(python: Path, name: str, body: str) -> None:
    pkg = _site_packages(python) / name
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(body))


OFFICIAL = """
import torch

def mse(input, target):
    return ((input - target) ** 2).mean()
"""
FORKED = """
import torch

def mse(input, target):
    return ((input - target) ** 2).sum()  # the fork sums where the official package averages
"""


@pytest.mark.slow
def test_a_package_only_the_other_environment_has(other_env, capsys):
    _install_toy(other_env, "toyloss_only_there", OFFICIAL)
    probe = "import torch, numpy, toyloss_only_there\ntry:\n    import losscmp\nexcept ImportError:\n    print('no losscmp')\n"
    out = subprocess.run([str(other_env), "-c", probe], capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert out.stdout.strip() == "no losscmp", out.stderr  # losscmp is absent there; the toy package is present
    with pytest.raises(ImportError):
        __import__("toyloss_only_there")  # and absent here
    argv = ["official=toyloss_only_there:mse", "torch.nn.functional:mse_loss", "--spec", "regression", "--examples", "15",
            "--no-save", "--python", f"official={other_env}"]
    assert main(argv) == 0, capsys.readouterr()
    assert "All implementations agree on 15 cases" in capsys.readouterr().out


@pytest.mark.slow
def test_two_same_named_packages_in_two_environments_each_run_their_own_code(other_env, tmp_path, capsys):
    _install_toy(other_env, "toyloss_twin", OFFICIAL)  # the "official" one, installed in the other environment
    fork = tmp_path / "fork" / "toyloss_twin"  # the fork, same name, in a folder of this environment
    fork.mkdir(parents=True)
    (fork / "__init__.py").write_text(textwrap.dedent(FORKED))
    argv = ["official=toyloss_twin:mse", f"fork={fork}:mse", "--spec", "regression", "--examples", "10", "--no-save",
            "--no-minimize", "--python", f"official={other_env}"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "official vs fork" in out and "value" in out
    # Fork served by the other environment too: it still runs the fork's code, not the installed twin.
    argv[-1] = f"official={other_env}"
    argv += ["--python", f"fork={other_env}"]
    assert main(argv) == 1
    assert "official vs fork" in capsys.readouterr().out
    # And the official package against itself across the two environments: agreement.
    _install_toy(other_env, "toyloss_twin", OFFICIAL)
    argv = ["official=toyloss_twin:mse", f"here={REPO / 'fixtures' / 'misbehaving.py'}:mse", "--spec", "regression",
            "--examples", "10", "--no-save", "--python", f"official={other_env}"]
    assert main(argv) == 0, capsys.readouterr()


@pytest.mark.slow
def test_audit_library_call_with_the_other_environment(other_env):
    _install_toy(other_env, "toyloss_lib", OFFICIAL)
    impls = [load_implementation(f"{MISBEHAVING}:mse"), remote("there=toyloss_lib:mse")]
    result = audit(impls, REGRESSION, Settings.of(examples=10, minimize=False, pythons=(("there", str(other_env)),)))
    assert result.agree and result.cases_run == 10


PLUGIN_CHECKS = '''
import torch.nn.functional as F

def test_official(losscmp):
    losscmp.check("official=toyloss_for_plugin:mse", F.mse_loss, spec="regression", examples=8)

def test_fork(losscmp):
    losscmp.check("fork=toyloss_fork_for_plugin:mse", F.mse_loss, spec="regression", examples=8, pythons={{"fork": {python!r}}})
'''


@pytest.mark.slow
def test_the_plugin_runs_a_reference_under_another_interpreter(other_env, pytester):
    _install_toy(other_env, "toyloss_for_plugin", OFFICIAL)
    _install_toy(other_env, "toyloss_fork_for_plugin", FORKED)
    pytester.makepyfile(test_other=PLUGIN_CHECKS.format(python=str(other_env)))
    option = ("-p", "no:cacheprovider", "--losscmp-python", f"official={other_env}")
    # Without the option, the official package is looked for here, where it is absent.
    alone = pytester.runpytest("-p", "no:cacheprovider", "-k", "official")
    alone.assert_outcomes(failed=1)
    alone.stdout.fnmatch_lines(["*toyloss_for_plugin*"])
    # The command line's interpreter serves the check labelled "official"; the call's own serves "fork".
    result = pytester.runpytest(*option)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*fork vs mse_loss*value*", "*replay: pytest test_other.py::test_fork --losscmp-python official=*"])
    # The saved case replays under the other interpreter too.
    again = pytester.runpytest(*option, "--losscmp-replay-only")
    again.assert_outcomes(passed=1, failed=1)
    again.stdout.fnmatch_lines(["*a saved case still diverges (value): fork vs mse_loss*"])


def test_a_misspelt_interpreter_label_in_a_check_fails_it_in_one_line(pytester):
    pytester.makepyfile(test_label=f'''
import torch.nn.functional as F

def test_label(losscmp):
    losscmp.check(F.mse_loss, "torch.nn.functional:l1_loss", spec="regression", examples=3, pythons={{"l1": {HERE!r}}})

def test_callable(losscmp):
    losscmp.check(F.mse_loss, F.l1_loss, spec="regression", examples=3, pythons={{"l1_loss": {HERE!r}}})
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*UsageError: pythons l1: no implementation has that label (labels: mse_loss, l1_loss)",
                                 "*UsageError: pythons l1_loss: l1_loss is a callable of this process; only a reference*"])
    bad = pytester.runpytest("-p", "no:cacheprovider", "--losscmp-python", "x=/no/such/python")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: --losscmp-python x=/no/such/python: no such file"])


ONLY_IN_A_WORKER = """
import sys

def mse(input, target):
    assert "losscmp" not in sys.modules, "called in losscmp's own interpreter"
    return ((input - target) ** 2).{reduce}()
"""


@pytest.mark.slow
def test_same_named_references_renamed_apart_both_run_under_their_interpreter(tmp_path):
    from losscmp.testing import assert_losses_agree

    for folder, reduce in (("a", "mean"), ("b", "mean"), ("c", "sum")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "losses.py").write_text(ONLY_IN_A_WORKER.format(reduce=reduce))
    # Both are labelled mse; the second becomes mse#2 and must still run under the interpreter for mse.
    a, b, c = (f"{tmp_path / f / 'losses.py'}:mse" for f in "abc")
    assert assert_losses_agree(a, b, spec="regression", examples=5, pythons={"mse": HERE}).audit.cases_run == 5
    with pytest.raises(AssertionError, match=r"mse vs mse#2.*value"):
        assert_losses_agree(a, c, spec="regression", examples=5, minimize=False, pythons={"mse": HERE})


@pytest.mark.slow
def test_the_printed_replay_command_replays_under_the_same_interpreter(tmp_path, capsys):
    import shlex

    (tmp_path / "there.py").write_text(ONLY_IN_A_WORKER.format(reduce="sum"))
    argv = [f"official={tmp_path / 'there.py'}:mse", "torch.nn.functional:mse_loss", "--spec", "regression", "--examples", "5",
            "--no-minimize", "--no-explain", "--save-dir", str(tmp_path / "saved"), "--python", f"official={HERE}"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    command = out.split("replay: losscmp replay ", 1)[1].split("\n", 1)[0]  # one unwrapped line
    assert "--python" in command  # without it the official side would be imported and run here
    assert main(["replay", *shlex.split(command)]) == 1
    out = capsys.readouterr().out
    assert "(under " in out and "bit-for-bit identical" in out and "still diverges (value)" in out
    saved = shlex.split(command)[0]
    assert main(["replay", saved, "--python", f"offical={HERE}"]) == 2
    assert "--python offical: no implementation has that label (labels: official, mse_loss)" in capsys.readouterr().err


def test_session_interpreters_leave_checks_without_their_labels_alone(pytester):
    # --losscmp-python serves the checks that have a reference with that label; a callable
    # sharing the label runs here, and the session's timeout does not fail a check with no worker.
    pytester.makepyfile(test_here='''
import torch.nn.functional as F

def other(input, target):
    return ((input - target) ** 2).mean()

def test_callable_named_like_a_session_label(losscmp):
    losscmp.check(other, F.mse_loss, spec="regression", examples=3)
''')
    result = pytester.runpytest("-p", "no:cacheprovider", "--losscmp-python", f"other={HERE}", "--losscmp-timeout", "30")
    result.assert_outcomes(passed=1)
    bad = pytester.runpytest("-p", "no:cacheprovider", "--losscmp-timeout", "30")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: --losscmp-timeout needs --losscmp-isolate, --losscmp-python or --losscmp-ray*"])
