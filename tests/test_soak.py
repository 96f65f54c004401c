"""Soak: an implementation that segfaults on ~5% and hangs on ~2% of inputs, 200 cases.

Every case is accounted for (agree + diverge + crash + timeout + ... = total), the run
ends, and every crash or hang input it kept replays (isolated) without killing anyone.
"""
import json
import textwrap

import pytest

from losscmp.cli import main

FLAKY = textwrap.dedent("""
    import ctypes, hashlib, time
    import torch

    def mse(input, target):
        return ((input - target) ** 2).mean()

    def _fate(input):
        digest = hashlib.sha256(input.detach().contiguous().numpy().tobytes()).digest()
        return int.from_bytes(digest[:4], "little") % 1000

    def flaky(input, target):
        fate = _fate(input)
        if fate < 50:
            ctypes.string_at(0)  # segfault
        if fate < 70:
            time.sleep(3600)  # hang
        return ((input - target) ** 2).mean()
""")


@pytest.mark.slow
def test_soak_every_case_accounted_for_and_every_crash_input_replayable(tmp_path, capsys):
    f = tmp_path / "flaky.py"
    f.write_text(FLAKY)
    saved, report = tmp_path / "saved", tmp_path / "report.json"
    code = main([f"{f}:mse", f"{f}:flaky", "--spec", "regression", "--examples", "200", "--isolate", "--timeout", "1",
                 "--no-minimize", "--no-explain", "--save-dir", str(saved), "--json", str(report), "-q"])
    capsys.readouterr()
    data = json.loads(report.read_text())
    assert code == 1 and data["cases_run"] == 200
    tally = data["tally"]
    assert sum(tally.values()) == 200, tally
    assert tally.get("crash", 0) >= 3 and tally.get("timeout", 0) >= 1 and tally.get("agree", 0) >= 150, tally
    kept = sorted(saved.glob("*--crash--*.json")) + sorted(saved.glob("*--timeout--*.json"))
    # Each crash and hang input was kept as it happened; the run ends with those its report
    # names (worst, mildest, the findings' own repros): the rest said nothing more.
    text = report.read_text()
    assert {"crash", "timeout"} <= {d["kind"] for d in data["divergences"]}
    assert kept and all(p.name in text for p in kept), [p.name for p in kept]
    for path in kept:
        assert main(["replay", str(path)]) == 1  # still a crash or a hang, replayed in a worker: we survive it
        out = capsys.readouterr().out
        assert "still diverges (crash)" in out or "still diverges (timeout)" in out


# ----------------------------------------------------------------------------- faults through the command
# Each run is the real command (supervisor included) in a subprocess with a time limit.
# Every process of a run carries a marker in its environment; a marked process alive
# after the command returned is a process losscmp left behind.
import importlib.util  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

from losscmp import breadcrumbs, supervise  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MIS = "fixtures/misbehaving.py"


def _misbehaving():
    """fixtures/misbehaving.py, the fault catalogue: home of MARK and marked(), shared with
    scripts/bench_soak.py (loaded by path: fixtures/ is not put on sys.path for every test)."""
    spec = importlib.util.spec_from_file_location("losscmp_soak_misbehaving", REPO / MIS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_catalogue = _misbehaving()
MARK, marked = _catalogue.MARK, _catalogue.marked


def left_behind(mark: str, patience: float = 5.0) -> list[str]:
    deadline = time.monotonic() + patience
    while (pids := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") for p in pids if Path(f"/proc/{p}").exists()]


def losscmp(*argv, timeout: float = 240, **popen):
    """Run the command; returns (CompletedProcess, what it left running)."""
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "losscmp", *map(str, argv)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)
    return proc, left_behind(mark)


def report_accounts_for_every_case(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert sum(data["tally"].values()) == data["cases_run"], data["tally"]
    return data


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds left-behind processes through /proc")


@pytest.mark.slow  # starts losscmp in a fresh interpreter
@needs_proc
@pytest.mark.parametrize("fault", ["sleeps", "spins", "stops_itself", "hangs_deaf", "hangs_in_backward"])
def test_an_in_process_hang_ends_the_run_with_a_timeout_finding_its_input_and_the_report_so_far(tmp_path, fault):
    report = tmp_path / "report.json"
    proc, left = losscmp(f"{MIS}:mse", f"{MIS}:{fault}", "--spec", "regression", "--timeout", "2", "--examples", "30",
                         "--no-explain", "--save-dir", tmp_path / "saved", "--json", report)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert f"implementation {fault} did not return within 2 s" in last and "--isolate" in last, last
    data = report_accounts_for_every_case(report)
    assert data["interrupted"] and data["tally"]["timeout"] == 1 and not data["agree"]
    hang = data["divergences"][-1]
    assert hang["kind"] == "timeout" and hang["pair"] == ["mse", fault] and Path(hang["repro"]).exists()
    assert f"mse vs {fault}: timeout on 1 case(s)" in proc.stdout and "cases: " in proc.stdout
    assert not left


@pytest.mark.slow  # starts losscmp in a fresh interpreter
@needs_proc
@pytest.mark.parametrize("fault, how", [("segfaults", "signal SIGSEGV"), ("aborts", "signal SIGABRT"), ("exits_0", "exit code 0")])
def test_an_in_process_crash_still_writes_the_json_report_with_the_crash(tmp_path, fault, how):
    report = tmp_path / "report.json"
    proc, left = losscmp(f"{MIS}:mse", f"{MIS}:{fault}", "--spec", "regression", "--examples", "30", "--no-explain",
                         "--save-dir", tmp_path / "saved", "--json", report)
    assert proc.returncode == 1, proc.stderr
    assert f"implementation {fault} ended the losscmp process ({how})" in proc.stderr.strip().splitlines()[-1]
    data = report_accounts_for_every_case(report)
    assert data["interrupted"] and data["tally"]["crash"] == 1 and data["tally"].get("agree", 0) >= 1  # the tame cases before it
    crash = data["divergences"][-1]
    assert crash["kind"] == "crash" and how in crash["detail"] and Path(crash["repro"]).exists()
    assert not left


@pytest.mark.slow  # starts losscmp in a fresh interpreter
def test_a_crash_with_json_on_stdout_keeps_stdout_pure_json(tmp_path):
    proc, _ = losscmp(f"{MIS}:mse", f"{MIS}:segfaults", "--spec", "regression", "--examples", "30", "--no-save", "--json", "-")
    data = json.loads(proc.stdout)  # the human summary went to stderr
    assert proc.returncode == 1 and data["tally"]["crash"] == 1 and "found until then" in proc.stderr
    kept = Path(data["divergences"][-1]["repro"])  # --no-save: kept in a temporary folder, not the working folder
    assert kept.exists() and kept.parent.name.startswith("losscmp-crash-") and not list(REPO.glob("mse--segfaults--*"))


@pytest.mark.slow  # starts losscmp in a fresh interpreter
def test_a_hung_call_replays_isolated_as_a_timeout(tmp_path):
    proc, _ = losscmp(f"{MIS}:mse", f"{MIS}:sleeps", "--spec", "regression", "--timeout", "1", "--examples", "30",
                      "--save-dir", tmp_path / "saved")
    saved = proc.stderr.split("its input is saved as ")[1].split(" ")[0]
    replayed = subprocess.run([sys.executable, "-m", "losscmp", "replay", saved], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert replayed.returncode == 1 and "still diverges (timeout)" in replayed.stdout, replayed.stdout + replayed.stderr


def test_the_default_in_process_limit_is_generous_and_grows_with_a_slow_implementation(monkeypatch):
    monkeypatch.setattr(breadcrumbs, "_timeout", None)
    monkeypatch.setattr(breadcrumbs, "_slowest", {"fast": 0.01, "slow": 30.0})
    assert breadcrumbs.call_limit("fast") == breadcrumbs.DEFAULT_TIMEOUT_FLOOR == 120
    assert breadcrumbs.call_limit("slow") == 30.0 * breadcrumbs.DEFAULT_TIMEOUT_FACTOR  # a slow side is not a hang
    assert breadcrumbs.call_limit("never called") == breadcrumbs.DEFAULT_TIMEOUT_FLOOR
    monkeypatch.setattr(breadcrumbs, "_timeout", 2.0)
    assert breadcrumbs.call_limit("slow") == 2.0  # --timeout is exact


@pytest.mark.slow  # starts losscmp in a fresh interpreter
@needs_proc
@pytest.mark.parametrize("fault, kind", [("keyboard_interrupt_sometimes", "exception"), ("raises_keyboard_interrupt", "exception"),
                                         ("forks_and_continues", None), ("leaves_a_process", None)])
@pytest.mark.parametrize("mode", ["in-process", "isolate"])
def test_interrupting_forking_or_spawning_implementations_give_no_traceback_and_leave_nothing_running(tmp_path, fault, kind, mode):
    report = tmp_path / "report.json"
    extra = ["--isolate", "--timeout", "5"] if mode == "isolate" else []
    proc, left = losscmp(f"{MIS}:mse", f"{MIS}:{fault}", "--spec", "regression", "--examples", "15", "--no-minimize", "--no-explain",
                         "--no-save", "--json", report, *extra)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert not left  # not even the implementation's own background process, nor a forked copy of losscmp
    # A side that raises on every input while mse returns is a finding with a repro (as
    # geomloss' hausdorff is), not bad usage: only nothing to compare at all is exit 2.
    data = report_accounts_for_every_case(report)
    assert proc.stdout.count("losscmp: 2 implementations") == 1  # a forked child did not go on to print a second report
    if kind:
        assert proc.returncode == 1 and data["tally"][kind] >= 1 and "raised KeyboardInterrupt" in proc.stdout
    else:  # the side effect is not a difference in the loss: the values were seen to agree
        assert proc.returncode == 0 and data["tally"] == {"agree": 15}


@pytest.mark.slow  # starts losscmp in a fresh interpreter
@needs_proc
@pytest.mark.parametrize("fault", ["segfaults", "aborts", "exits_0", "stops_itself", "hangs_deaf"])
def test_self_killing_or_hanging_implementations_under_isolate_leave_no_process_behind(tmp_path, fault):
    report = tmp_path / "report.json"
    proc, left = losscmp(f"{MIS}:mse", f"{MIS}:{fault}", "--spec", "regression", "--examples", "8", "--isolate", "--timeout", "1",
                         "--no-minimize", "--no-explain", "--no-save", "--json", report)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    data = report_accounts_for_every_case(report)
    assert not data["interrupted"] and (data["tally"].get("crash", 0) + data["tally"].get("timeout", 0)) >= 1
    assert not left


SLOW = """
import os, time
from pathlib import Path
calls = [0]

def mse(input, target):
    return ((input - target) ** 2).mean()

def slow_double(input, target):  # differs on inputs of more than 3 elements; slow, so a signal lands mid-run
    calls[0] += 1
    if calls[0] == 6:
        Path(os.environ["LOSSCMP_TEST_UNDER_WAY"]).touch()
    time.sleep(0.2)
    return (2 if input.numel() > 3 else 1) * ((input - target) ** 2).mean()
"""


@pytest.mark.slow  # starts losscmp in a fresh interpreter
@needs_proc
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_keeps_the_table_the_findings_and_the_json(tmp_path, how):
    module, under_way, report = tmp_path / "slow.py", tmp_path / "under-way", tmp_path / "report.json"
    module.write_text(SLOW)
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark, "LOSSCMP_TEST_UNDER_WAY": str(under_way)}
    proc = subprocess.Popen([sys.executable, "-m", "losscmp", f"{module}:mse", f"{module}:slow_double", "--spec", "regression",
                             "--no-save", "--json", str(report)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not under_way.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.0)
        if how == "SIGINT":  # Ctrl-C at a terminal: the whole foreground process group gets it
            os.killpg(proc.pid, signal.SIGINT)
        else:  # a CI runner or `timeout`: the command's own process
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + getattr(signal, how), err
    assert "Traceback" not in err
    assert "mse vs slow_double" in out and "DIVERGE" in out and f"Interrupted ({how}) during the search" in out
    data = report_accounts_for_every_case(report)
    assert data["interrupted"] and data["interruption"].startswith(how) and data["divergences"][0]["kind"] == "value"
    assert not left_behind(mark)


def deaf_child(pid: int) -> bool:
    """Whether a child of ``pid`` has blocked SIGTERM (``hangs_deaf`` does so just before it hangs).
    Waiting for that, rather than a fixed time, sends the signal neither too early on a busy
    machine nor seconds later than needed on an idle one."""
    bit = 1 << (signal.SIGTERM - 1)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = dict(line.split(":", 1) for line in Path(f"/proc/{entry}/status").read_text().splitlines() if ":" in line)
            except OSError:
                continue
            if int(fields["PPid"]) == pid and int(fields["SigBlk"], 16) & bit:
                return True
    return False


@pytest.mark.slow  # starts losscmp in a fresh interpreter
@needs_proc
def test_sigterm_while_a_call_hangs_deaf_to_signals_still_writes_the_report(tmp_path):
    report = tmp_path / "report.json"
    mark = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "losscmp", f"{MIS}:mse", f"{MIS}:hangs_deaf", "--spec", "regression",
                             "--examples", "30", "--no-save", "--json", str(report)], cwd=REPO, env={**os.environ, MARK: mark},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not deaf_child(proc.pid):  # past the tame first cases: the call hangs, SIGTERM blocked
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "did not finish its report" in err and "found until then" in out
    data = report_accounts_for_every_case(report)
    assert data["interrupted"] and data["interruption"].startswith("SIGTERM") and data["cases_run"] >= 1
    assert not left_behind(mark)


@pytest.mark.slow  # starts losscmp in a fresh interpreter
def test_an_in_process_timeout_with_jobs_is_refused_in_one_line():
    proc, _ = losscmp(f"{MIS}:mse", f"{MIS}:sleeps", "--spec", "regression", "--timeout", "2", "--jobs", "2", "--no-save")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "losscmp: error: --timeout with --jobs needs --isolate or --ray (the watchdog watches this process's calls, not a --jobs worker's)"]


def stopped_child(pid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] == "T":
                return True
    return False


@pytest.mark.slow  # starts losscmp in a fresh interpreter
@needs_proc
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_signal_while_an_implementation_has_stopped_itself_is_reported_at_once(tmp_path, how):
    report = tmp_path / "report.json"
    mark = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "losscmp", f"{MIS}:mse", f"{MIS}:stops_itself", "--spec", "regression",
                             "--examples", "30", "--no-save", "--json", str(report)], cwd=REPO, env={**os.environ, MARK: mark},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not stopped_child(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        sent = time.monotonic()
        if how == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + getattr(signal, how), err
    assert took < supervise.INTERRUPT_GRACE  # the child was woken to write its own report, not killed after the grace
    assert f"Interrupted ({how})" in out and "Traceback" not in err
    data = report_accounts_for_every_case(report)
    assert data["interrupted"] and data["cases_run"] >= 1
    assert not left_behind(mark)


@pytest.mark.slow  # starts losscmp in fresh interpreters
def test_trace_of_a_saved_crash_names_the_saved_case_as_its_input(tmp_path):
    """trace runs both sides in-process: a segfault there ends it, and the saved case it
    was given is the input (it said "its input could not be saved")."""
    proc, _ = losscmp(f"{MIS}:mse", f"{MIS}:segfaults", "--spec", "regression", "--examples", "30", "--isolate", "--no-explain",
                      "--no-minimize", "--save-dir", tmp_path / "saved")
    assert proc.returncode == 1, proc.stderr
    repro = next((tmp_path / "saved").glob("mse--segfaults--crash--*.json"))
    traced, left = losscmp("trace", f"{MIS}:mse", f"{MIS}:segfaults", repro)
    assert traced.returncode == 1 and not left, traced.stderr
    assert f"its input is the saved case {repro}" in traced.stderr and "could not be saved" not in traced.stderr, traced.stderr
