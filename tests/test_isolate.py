"""--isolate: implementations run in worker processes that may segfault or hang.

Real processes throughout, no mocking.  The misbehaving implementations are in
``fixtures/misbehaving.py``; references are relative to the repository root.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from losscmp.findings import Pair
from losscmp.audit import Settings, audit
from losscmp.generate import Case, Recipe, build_case
from losscmp.isolate import IsolatedRunner
from losscmp.load import Implementation, load_implementation, parse_ref
from losscmp.run import call
from losscmp.spec import parse_spec, preset

REPO = Path(__file__).resolve().parent.parent
MISBEHAVING = "fixtures/misbehaving.py"
REGRESSION = preset("regression")
PAIR_SEGFAULT = Pair("mse", "segfaults_on_negative_mean")


@pytest.fixture(autouse=True)
def in_repo_with_private_tmp(monkeypatch, tmp_path):
    """Run from the repository root; inputs the runner keeps land in this test's tmp_path."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def misbehaving(name: str) -> Implementation:
    return load_implementation(f"{MISBEHAVING}:{name}")


def regression_case(values: list[float]) -> Case:
    x = torch.tensor(values)
    return Case(tensors={"input": x, "target": torch.zeros_like(x)}, sizes={"B": len(values)})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def worker_pid(runner: IsolatedRunner, impl: Implementation) -> int:
    out = runner(impl, REGRESSION, regression_case([1.0, 2.0]))
    assert out.status == "ok", out.error
    return int(out.value.item())


@pytest.fixture
def dying(tmp_path: Path) -> Path:
    """A module of implementations that die in other ways, or report their process id."""
    path = tmp_path / "dying.py"
    path.write_text(textwrap.dedent("""
        import os
        import torch

        def aborts(input, target):
            os.abort()

        def exits_3(input, target):
            os._exit(3)

        def pid(input, target):
            return torch.tensor(float(os.getpid()), dtype=torch.float64) + 0 * input.sum()
    """))
    return path


# ----------------------------------------------------------------------------- audits
def test_segfault_is_a_crash_finding_and_the_run_completes():
    impls = [misbehaving("mse"), misbehaving("segfaults_on_negative_mean")]
    result = audit(impls, REGRESSION, Settings.of(isolate=True, timeout=5, examples=30, save_dir=None, minimize=False))
    assert result.cases_run == 30
    assert {(d.subject, d.kind) for d in result.divergences} == {(PAIR_SEGFAULT, "crash")}
    d = result.divergences[0]
    detail = d.verdict.detail
    assert "\n" not in detail
    assert "segfaults_on_negative_mean crashed (signal SIGSEGV)" in detail
    assert "misbehaving.py" in detail  # the fault handler's innermost frame in the implementation
    # The input that killed the worker was saved before it was sent, and is that case.
    saved = re.search(r"input saved to (\S+\.npz)", detail).group(1)
    with np.load(saved, allow_pickle=False) as z:
        assert np.array_equal(z["input.input"], d.case.tensors["input"].numpy())
        assert json.loads(str(z["meta"]))["spec"] == REGRESSION.text()
    assert float(d.case.tensors["input"].mean()) < 0


def test_hang_is_a_timeout_finding():
    # A short limit keeps this test short: every hanging case costs the limit twice
    # (the audit calls a suspect again before blaming the pair).
    impls = [misbehaving("mse"), misbehaving("hangs_on_size_one")]
    start = time.monotonic()
    result = audit(impls, REGRESSION, Settings.of(isolate=True, timeout=2, examples=8, save_dir=None, minimize=False))
    assert time.monotonic() - start < 45
    assert result.cases_run == 8
    assert {(d.subject, d.kind) for d in result.divergences} == {(Pair("mse", "hangs_on_size_one"), "timeout")}
    d = result.divergences[0]
    assert d.case.sizes["B"] == 1
    assert d.verdict.detail.startswith("hangs_on_size_one did not return within 2 s")


def test_without_isolate_well_behaved_implementations_still_agree():
    impls = [misbehaving("mse"), load_implementation("torch.nn.functional:mse_loss")]
    result = audit(impls, REGRESSION, Settings.of(examples=30, save_dir=None, minimize=False))
    assert result.agree and result.cases_run == 30


def test_isolated_well_behaved_implementations_agree_too():
    impls = [misbehaving("mse"), load_implementation("torch.nn.functional:mse_loss")]
    result = audit(impls, REGRESSION, Settings.of(isolate=True, timeout=5, examples=15, save_dir=None, minimize=False))
    assert result.agree and result.cases_run == 15


def test_cli_reports_a_segfault_as_a_crash_without_a_traceback(tmp_path):
    cmd = [
        sys.executable, "-m", "losscmp",
        f"{MISBEHAVING}:mse", f"{MISBEHAVING}:segfaults_on_negative_mean",
        "--spec", "regression", "--isolate", "--timeout", "5",
        "--examples", "20", "--no-save", "--no-minimize",
    ]  # fmt: skip
    env = dict(os.environ, TMPDIR=str(tmp_path), COLUMNS="200")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "crash" in proc.stdout
    assert "SIGSEGV" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- the runner
def test_isolated_outcomes_match_in_process_bit_for_bit():
    spec = parse_spec("x: N D real grad; y: N D real; N=1..5; D=1..4")
    mse = misbehaving("mse")
    with IsolatedRunner(timeout=5) as runner:
        for seed, (layout, dtype) in enumerate(
            [("contiguous", torch.float32), ("transposed", torch.float64), ("strided", torch.float32), ("strided", torch.bfloat16)]
        ):
            case = build_case(spec, Recipe(sizes=(("N", 3), ("D", 4)), layout=layout, seed=seed), dtype=dtype)
            here, there = call(mse.fn, spec, case), runner(mse, spec, case)
            assert there.status == "ok", there.error
            assert there.value.dtype == here.value.dtype and torch.equal(there.value, here.value)
            assert there.grads.keys() == here.grads.keys() == {"x"}
            assert torch.equal(there.grads["x"], here.grads["x"])
            assert there.grads["x"].stride() == here.grads["x"].stride()


def test_failures_other_than_crashes_come_back_as_in_process():
    case = regression_case([1.0, -2.0, 3.0])
    with IsolatedRunner(timeout=5) as runner:
        out = runner(misbehaving("mutates_input"), REGRESSION, case)
        assert out.status == "ok" and out.mutated == ("input",)
        assert torch.equal(case.tensors["input"], torch.tensor([1.0, -2.0, 3.0]))  # the parent's copy is untouched
        out = runner(misbehaving("returns_list"), REGRESSION, case)
        assert out.status == "non_tensor" and out.error == "returned list, not a tensor"
        # Loaded here, but its worker cannot load it: an exception outcome, on every call.
        broken = Implementation(parse_ref(f"{MISBEHAVING}:no_such_loss"), fn=lambda *a: None)
        for _ in range(2):
            out = runner(broken, REGRESSION, case)
            assert out.status == "exception"
            assert out.error.startswith("could not be loaded in its worker") and "no_such_loss" in out.error
            assert "\n" not in out.error


def test_crash_names_the_signal_and_the_next_call_gets_a_fresh_worker(dying):
    seg = misbehaving("segfaults_on_negative_mean")
    aborts = load_implementation(f"{dying}:aborts")
    exits = load_implementation(f"{dying}:exits_3")
    pid = load_implementation(f"{dying}:pid")
    negative, positive = regression_case([-1.0, -2.0]), regression_case([1.0, 2.0])
    with IsolatedRunner(timeout=5) as runner:
        out = runner(seg, REGRESSION, negative)
        assert out.status == "crash" and out.error.startswith("crashed (signal SIGSEGV)")
        saved = out.error.rsplit("input saved to ", 1)[1]
        assert Path(saved).is_file()
        out = runner(seg, REGRESSION, positive)  # a fresh worker
        assert out.status == "ok" and float(out.value) == 2.5
        assert runner(aborts, REGRESSION, positive).error.startswith("crashed (signal SIGABRT)")
        assert runner(exits, REGRESSION, positive).error.startswith("crashed (exit code 3)")
        first = worker_pid(runner, pid)
        assert first != os.getpid() and worker_pid(runner, pid) == first  # the worker is reused
        os.kill(first, signal.SIGKILL)  # dies between calls, through no fault of a case
        assert gone_within(first, 5)
        second = worker_pid(runner, pid)
        assert second != first
    assert Path(saved).is_file()  # an input that crashed a worker outlives the runner
    assert gone_within(second, 5)


def test_timeout_kills_the_worker_and_the_next_call_works():
    hangs = misbehaving("hangs_on_size_one")
    with IsolatedRunner(timeout=1) as runner:
        start = time.monotonic()
        out = runner(hangs, REGRESSION, regression_case([1.0]))
        assert time.monotonic() - start < 10
        assert out.status == "timeout" and out.error == "did not return within 1 s"
        out = runner(hangs, REGRESSION, regression_case([1.0, 3.0]))
        assert out.status == "ok" and float(out.value) == 5.0


def test_close_stops_the_workers_and_deletes_unneeded_inputs(dying):
    runner = IsolatedRunner()
    pid = worker_pid(runner, load_implementation(f"{dying}:pid"))
    case = regression_case([1.0, 2.0])
    assert runner(misbehaving("mse"), REGRESSION, case).status == "ok"
    folder = runner.input_dir
    assert alive(pid) and len(list(folder.glob("input-*.npz"))) == 1  # the live case's; the other was collected
    runner.close()
    runner.close()  # twice is fine
    assert gone_within(pid, 5)
    assert not folder.exists()  # nothing crashed, so nothing was kept
    with pytest.raises(RuntimeError):
        runner(misbehaving("mse"), REGRESSION, regression_case([1.0]))


def test_workers_are_stopped_at_interpreter_exit(dying, tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from losscmp.generate import Case
        from losscmp.isolate import IsolatedRunner
        from losscmp.load import load_implementation
        from losscmp.spec import preset

        runner = IsolatedRunner()  # never closed, and no __main__ guard
        x = torch.tensor([1.0, 2.0])
        out = runner(load_implementation({str(dying)!r} + ":pid"), preset("regression"), Case({{"input": x, "target": x}}, {{"B": 2}}))
        print(int(out.value.item()), flush=True)
    """)
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert gone_within(int(proc.stdout.strip()), 5)
