"""--isolate: implementations run in worker processes that may segfault or hang.

Real processes throughout, no mocking.  The misbehaving implementations are in
``fixtures/misbehaving.py``; references are relative to the repository root.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from .conftest import NEEDS_FORK
from losscmp.findings import Pair
from losscmp.audit import Settings, audit
from losscmp.generate import Case, Recipe, build_case
from losscmp.isolate import IsolatedRunner, RunRecord
from losscmp.load import Implementation, load_implementation, parse_ref
from losscmp.repro import load_repro
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
@pytest.mark.slow
def test_segfault_is_a_crash_finding_and_the_run_completes():
    impls = [misbehaving("mse"), misbehaving("segfaults_on_negative_mean")]
    result = audit(impls, REGRESSION, Settings.of(isolate=True, timeout=5, examples=30, minimize=False))
    assert result.cases_run == 30
    assert {(d.subject, d.kind) for d in result.divergences} == {(PAIR_SEGFAULT, "crash")}
    d = result.divergences[0]
    detail = d.verdict.detail
    assert "\n" not in detail
    assert "segfaults_on_negative_mean crashed (signal SIGSEGV)" in detail
    assert "misbehaving.py" in detail  # the fault handler's innermost frame in the implementation
    # The input that killed the worker was saved before it was sent, as an ordinary repro of that case.
    saved = load_repro(re.search(r"input saved to (\S+\.json)", detail).group(1))
    assert saved.kind == "crash" and saved.pair == ("segfaults_on_negative_mean", "mse")
    assert saved.spec.text() == REGRESSION.text()
    assert torch.equal(saved.case.tensors["input"], d.case.tensors["input"])
    assert float(d.case.tensors["input"].mean()) < 0


@pytest.mark.slow
def test_hang_is_a_timeout_finding():
    # A short limit keeps this test short: every hanging case costs the limit twice
    # (the audit calls a suspect again before blaming the pair).
    impls = [misbehaving("mse"), misbehaving("hangs_on_size_one")]
    start = time.monotonic()
    result = audit(impls, REGRESSION, Settings.of(isolate=True, timeout=2, examples=8, minimize=False))
    assert time.monotonic() - start < 45
    assert result.cases_run == 8
    assert {(d.subject, d.kind) for d in result.divergences} == {(Pair("mse", "hangs_on_size_one"), "timeout")}
    d = result.divergences[0]
    assert d.case.sizes["B"] == 1
    assert d.verdict.detail.startswith("hangs_on_size_one did not return within 2 s")


def test_without_isolate_well_behaved_implementations_still_agree():
    impls = [misbehaving("mse"), load_implementation("torch.nn.functional:mse_loss")]
    result = audit(impls, REGRESSION, Settings.of(examples=30, minimize=False))
    assert result.agree and result.cases_run == 30


def test_isolated_well_behaved_implementations_agree_too():
    impls = [misbehaving("mse"), load_implementation("torch.nn.functional:mse_loss")]
    result = audit(impls, REGRESSION, Settings.of(isolate=True, timeout=5, examples=15, minimize=False))
    assert result.agree and result.cases_run == 15


@pytest.mark.slow
def test_cli_reports_a_segfault_as_a_crash_without_a_traceback(short_tmp):
    cmd = [
        sys.executable, "-m", "losscmp",
        f"{MISBEHAVING}:mse", f"{MISBEHAVING}:segfaults_on_negative_mean",
        "--spec", "regression", "--isolate", "--timeout", "5",
        "--examples", "20", "--no-save", "--no-minimize",
    ]  # fmt: skip
    env = dict(os.environ, TMPDIR=str(short_tmp), COLUMNS="200")
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
        # A reference no fresh process could load, but we hold the callable: it runs (forked worker).
        held = Implementation(parse_ref(f"{MISBEHAVING}:no_such_loss"), fn=lambda *a: None)
        out = runner(held, REGRESSION, case)
        assert out.status == "non_tensor" and out.error == "returned NoneType, not a tensor"


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
        assert out.status == "timeout" and out.error.startswith("did not return within 1 s; input saved to ")
        out = runner(hangs, REGRESSION, regression_case([1.0, 3.0]))
        assert out.status == "ok" and float(out.value) == 5.0


def test_close_stops_the_workers_and_deletes_unneeded_inputs(dying):
    runner = IsolatedRunner()
    pid = worker_pid(runner, load_implementation(f"{dying}:pid"))
    case = regression_case([1.0, 2.0])
    assert runner(misbehaving("mse"), REGRESSION, case).status == "ok"
    folder = runner.input_dir
    assert alive(pid) and len(list(folder.glob("*.npz"))) == 1  # the live case's; the other was collected
    runner.close()
    runner.close()  # twice is fine
    assert gone_within(pid, 5)
    assert not folder.exists()  # nothing crashed, so nothing was kept
    with pytest.raises(RuntimeError):
        runner(misbehaving("mse"), REGRESSION, regression_case([1.0]))


@pytest.mark.slow
def test_workers_are_stopped_at_interpreter_exit(dying, short_tmp):
    script = textwrap.dedent(f"""
        import torch
        from losscmp.generate import Case
        from losscmp.isolate import IsolatedRunner, RunRecord
        from losscmp.load import load_implementation
        from losscmp.spec import preset

        runner = IsolatedRunner()  # never closed, and no __main__ guard
        x = torch.tensor([1.0, 2.0])
        out = runner(load_implementation({str(dying)!r} + ":pid"), preset("regression"), Case({{"input": x, "target": x}}, {{"B": 2}}))
        print(int(out.value.item()), flush=True)
    """)
    env = dict(os.environ, TMPDIR=str(short_tmp))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert gone_within(int(proc.stdout.strip()), 5)


# ----------------------------------------------------------------------------- dying with losscmp
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    return kids


def descendants(pid: int) -> set[int]:
    kids, found, todo = _children(), set(), [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


HANGS_AND_SAYS = """
import os, time
import torch

def mse(input, target):
    return ((input - target) ** 2).mean()

def hangs(input, target):
    open(os.environ["LOSSCMP_TEST_HANGING"], "w").close()  # tell the test the call is under way
    time.sleep(3600)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds descendants through /proc")
@pytest.mark.parametrize("how, mode", [("SIGTERM", "isolate"), ("SIGKILL", "isolate"), ("SIGKILL", "python"), ("SIGKILL", "jobs")])
@pytest.mark.slow
def test_killing_losscmp_mid_hang_leaves_no_process_and_no_temp_file(tmp_path, short_tmp, how, mode):
    module = tmp_path / "hanging.py"
    module.write_text(HANGS_AND_SAYS)
    marker, tmpdir = tmp_path / "hanging-now", short_tmp
    env = dict(os.environ, TMPDIR=str(tmpdir), LOSSCMP_TEST_HANGING=str(marker))
    cmd = [sys.executable, "-m", "losscmp", f"{module}:mse", f"{module}:hangs", "--spec", "regression",
           "--timeout", "60", "--no-save", "--examples", "5"]
    cmd += {"isolate": ["--isolate"], "python": ["--python", f"hangs={sys.executable}"], "jobs": ["--isolate", "--jobs", "2"]}[mode]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the implementation never started hanging"
            time.sleep(0.1)
        family = descendants(proc.pid)
        assert len(family) >= (3 if mode == "isolate" else 1)  # the fork server, the resource tracker, workers
        proc.send_signal(getattr(signal, how))
        proc.wait(30)
        survivors = {pid for pid in family if gone_within(pid, 10) is False}
        assert not survivors, [Path(f"/proc/{p}/cmdline").read_bytes() for p in survivors if alive(p)]
        if how == "SIGTERM":
            assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM)  # the supervisor exits 143
            assert not list(tmpdir.glob("losscmp-isolate-*")), list(tmpdir.rglob("*"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- kept inputs
@pytest.mark.slow
def test_a_crash_input_is_a_repro_that_replay_runs_isolated(tmp_path, short_tmp):
    keep = tmp_path / "kept"
    impls = [misbehaving("mse"), misbehaving("segfaults_on_negative_mean")]
    record = RunRecord(refs=tuple(i.ref for i in impls), tolerance=(1e-5, 1e-6), seed=7, keep_dir=keep)
    negative = regression_case([-1.0, -2.0])
    with IsolatedRunner(timeout=5, record=record) as runner:
        assert runner(impls[0], REGRESSION, negative).status == "ok"
        out = runner(impls[1], REGRESSION, negative)
    assert out.status == "crash"
    path = Path(out.error.rsplit("input saved to ", 1)[1])
    assert path.parent == keep and path.suffix == ".json"
    repro = load_repro(path)
    assert repro.kind == "crash" and repro.pair == ("segfaults_on_negative_mean", "mse")
    assert torch.equal(repro.case.tensors["input"], negative.tensors["input"])
    assert repro.meta["seed"] == 7 and repro.meta["timeout"] == 5 and repro.meta["isolate"] is True
    assert repro.meta["outcomes"]["mse"]["status"] == "ok"  # the partner's real outcome on that case
    assert sorted(p.suffix for p in keep.iterdir()) == [".json", ".npz"]  # only the kept case
    proc = subprocess.run([sys.executable, "-m", "losscmp", "replay", str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, TMPDIR=str(short_tmp)))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # still diverges, and losscmp survived the segfault
    assert "still diverges (crash)" in proc.stdout and "SIGSEGV" in proc.stdout
    assert "Traceback" not in proc.stderr
    # The replayed file is the input: it is named, and no copy is left in a temporary folder.
    assert f"input saved to {path}" in " ".join(proc.stdout.split())
    assert not list(short_tmp.glob("losscmp-isolate-*")) and not list(tmp_path.glob("losscmp-isolate-*"))


def test_inputs_that_did_not_crash_leave_no_file(tmp_path):
    with IsolatedRunner(timeout=5, record=RunRecord(keep_dir=tmp_path / "kept")) as runner:
        folder = None
        for values in ([1.0], [1.0, 2.0], [3.0, 4.0, 5.0]):
            assert runner(misbehaving("mse"), REGRESSION, regression_case(values)).status == "ok"
            folder = runner.input_dir
    assert not folder.exists() and not (tmp_path / "kept").exists()


# ----------------------------------------------------------------------------- callables without a reference
@NEEDS_FORK
def test_lambdas_and_closures_run_isolated_in_forked_workers():
    scale = 2.0
    closure = Implementation(parse_ref("test_isolate:closure"), fn=lambda input, target: scale * ((input - target) ** 2).mean())

    def local_mse(input, target):
        return ((input - target) ** 2).mean() * scale

    # What the pytest plugin builds for a local function: module and qualified name, not importable.
    local = Implementation(parse_ref("tests.test_isolate:test_lambdas_and_closures_run_isolated_in_forked_workers.local_mse"), fn=local_mse)
    case = regression_case([1.0, -2.0, 3.0])
    with IsolatedRunner(timeout=5) as runner:
        for impl in (closure, local):
            here, there = call(impl.fn, REGRESSION, case), runner(impl, REGRESSION, case)
            assert there.status == "ok", there.error
            assert torch.equal(there.value, here.value) and torch.equal(there.grads["input"], here.grads["input"])
        dies = Implementation(parse_ref("test_isolate:dies"), fn=lambda input, target: os._exit(5))
        assert runner(dies, REGRESSION, case).error.startswith("crashed (exit code 5)")
        assert runner(closure, REGRESSION, case).status == "ok"


@NEEDS_FORK
def test_an_audit_of_a_lambda_under_isolate_agrees_instead_of_a_false_exception():
    impls = [misbehaving("mse"), Implementation(parse_ref("test_isolate:lam"), fn=lambda input, target: ((input - target) ** 2).mean())]
    result = audit(impls, REGRESSION, Settings.of(isolate=True, timeout=5, examples=10, minimize=False))
    assert result.agree and result.cases_run == 10, [d.verdict.detail for d in result.divergences]


@NEEDS_FORK
def test_what_an_isolated_implementation_prints_is_kept_with_its_finding():
    # The worker captures it as the in-process runner does; it used to be dropped on the way back.
    def noisy(input, target):
        print("did not converge")
        os.write(2, b"raw bytes on fd 2\n")
        return ((input - target) ** 2).mean() * 1.5

    impls = [misbehaving("mse"), Implementation(parse_ref("test_isolate:noisy"), fn=noisy)]
    result = audit(impls, REGRESSION, Settings.of(isolate=True, timeout=5, examples=5, minimize=False, explain=False))
    (finding,) = result.divergences
    assert finding.kind == "value"
    assert "did not converge" in finding.outputs["noisy"] and "raw bytes on fd 2" in finding.outputs["noisy"]
    assert "mse" not in finding.outputs


def test_a_worker_replaced_by_another_implementation_of_its_label_is_asked_to_stop_not_killed(in_repo):
    # The shutdown request was skipped once stop() had begun: such a worker sat out the
    # grace period (1 s) and was then killed (exit -9).  Asked, it ends at once, exit 0.
    spec = preset("regression")
    x = torch.tensor([1.0, -2.0, 3.0])
    case = Case(tensors={"input": x, "target": torch.zeros_like(x)}, sizes={"B": 3})
    first, second = (load_implementation(f"x={ref}") for ref in ("fixtures/regression.py:mean_square", "torch.nn.functional:mse_loss"))
    with IsolatedRunner(timeout=60) as runner:
        assert runner(first, spec, case).status == "ok"
        proc = runner.state.workers["x"].proc
        ended, close = [], proc.close
        proc.close = lambda: (ended.append(proc.exitcode), close())
        assert runner(second, spec, case).status == "ok"  # same label, another implementation: a new worker
        assert ended == [0]


@pytest.mark.slow  # two runs that meet a segfault some 20 times each
@pytest.mark.parametrize("jobs", [1, 2])
def test_a_run_keeps_only_the_crashed_cases_its_report_names(tmp_path, jobs):
    """Each crash is kept as it happens; once the run is done, the ones no finding shows go."""
    import json

    from losscmp.cli import main

    mis = Path(__file__).resolve().parent.parent / "fixtures" / "misbehaving.py"
    save, report = tmp_path / "saved", tmp_path / "report.json"
    argv = [f"{mis}:mse", f"{mis}:segfaults", "--isolate", "--jobs", str(jobs), "--spec", "regression", "--examples", "30",
            "--save-dir", str(save), "--json", str(report), "--no-explain"]
    assert main([*argv, "--seed", "1"]) == 1
    # Another run's crash repro (a copy under a name of its own): replayed, never removed.
    other = next(save.glob("segfaults--mse--crash--*.json"))
    data = json.loads(other.read_text())
    assert data["run"]
    (save / "mse--segfaults--crash--0123456789.json").write_text(json.dumps({**data, "run": "another run"}))
    (save / "mse--segfaults--crash--0123456789.npz").write_bytes(other.with_suffix(".npz").read_bytes())
    for p in save.iterdir():
        if "0123456789" not in p.name:
            p.unlink()
    code = main(argv)
    text = report.read_text()
    (d,) = json.loads(text)["divergences"]
    assert code == 1 and d["kind"] == "crash" and d["cases"] > 3, d
    named = set(re.findall(r"[\w.-]+--crash--[0-9a-f]+\.json", text))  # the other run's too: it was replayed first
    assert {p.name for p in save.glob("*.json")} == named and "mse--segfaults--crash--0123456789.json" in named, named
    assert all((save / n).with_suffix(".npz").exists() for n in named)


@pytest.mark.slow  # two runs that meet a segfault some 20 times each
def test_a_run_never_removes_a_saved_crash_it_met_again(tmp_path):
    """A later run that crashes on a case an earlier run kept (same name: the same case)
    replays it first and may meet it again in its search without showing it: the file is the
    earlier run's, named by its report, and by this run's list of replayed cases."""
    import json

    from losscmp.cli import main

    (tmp_path / "lim.py").write_text(textwrap.dedent("""
        import ctypes
        from pathlib import Path

        import torch


        def mse(input, target):
            return torch.nn.functional.mse_loss(input, target)


        def segfaults_from(input, target):
            if input.numel() >= int(Path(__file__).with_name("limit.txt").read_text()):  # workers may predate an env var
                ctypes.string_at(0)  # SIGSEGV
            return mse(input, target)
    """))
    lim, save = tmp_path / "lim.py", tmp_path / "saved"
    argv = [f"{lim}:mse", f"{lim}:segfaults_from", "--isolate", "--spec", "regression", "--examples", "30", "--seed", "1",
            "--save-dir", str(save), "--no-explain"]
    (tmp_path / "limit.txt").write_text("24")
    assert main([*argv, "--json", str(tmp_path / "first.json")]) == 1
    first = set(re.findall(r"[\w.-]+--crash--[0-9a-f]+\.json", (tmp_path / "first.json").read_text()))
    (tmp_path / "limit.txt").write_text("2")  # more cases crash: smaller ones are shown now
    assert main([*argv, "--json", str(tmp_path / "second.json")]) == 1
    second = (tmp_path / "second.json").read_text()
    assert first and all(n in second for n in first)  # replayed first
    named = first | set(re.findall(r"[\w.-]+--crash--[0-9a-f]+\.json", second))
    missing = [n for n in named if not (save / n).is_file() or not (save / n).with_suffix(".npz").is_file()]
    assert not missing, missing
    assert all(json.loads((save / n).read_text()).get("run") for n in first if "--mse--" in n)  # the kept ones carry a run id
