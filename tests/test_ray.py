"""--ray: the same audit on Ray actors, on a real cluster started on loopback by the test.

Skipped where Ray is not installed (the default environment); run them with an
interpreter that has it:  python -m pytest -p no:warnings tests/test_ray.py
(``pip install "losscmp[ray]"``).  The one test that needs Ray *absent* runs there.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from losscmp.cli import main
from losscmp.cluster import PRELOAD

from .conftest import FIXTURES, REPO

BCE = [f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits"]
CRASHY = [f"{FIXTURES}/misbehaving.py:mse", f"{FIXTURES}/misbehaving.py:segfaults_on_negative_mean"]
SLOW = [f"{FIXTURES}/misbehaving.py:mse", f"{FIXTURES}/misbehaving.py:mse_slowly"]
HAS_RAY = importlib.util.find_spec("ray") is not None
# Where the cluster's workers running misbehaving.py:mse_slowly write their process id.
ANNOUNCE = Path(tempfile.gettempdir()) / f"losscmp-ray-announce-{os.getpid()}"

pytestmark = pytest.mark.slow
pytest_plugins = ["pytester"]


@pytest.mark.skipif(HAS_RAY, reason="checks the error where Ray is not installed; Ray is installed here")
def test_without_ray_the_option_is_one_line_naming_the_extra(capsys):
    assert main([*BCE, "--spec", "binary", "--ray", "local", "--no-save"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'losscmp: error: --ray needs Ray, which is not installed here: pip install "losscmp[ray]"'


@pytest.mark.skipif(HAS_RAY, reason="checks the error where Ray is not installed; Ray is installed here")
def test_without_ray_the_plugin_option_stops_the_session_in_one_line(pytester):
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--losscmp-ray", "local")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert [line for line in result.stderr.lines if line] == ['ERROR: --losscmp-ray needs Ray, which is not installed here: pip install "losscmp[ray]"']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpus_free(address: str) -> float:
    """CPUs not held by any actor, seen from a second driver (the run's own has ended)."""
    code = (f"import ray; ray.init(address={address!r}, log_to_driver=False, logging_level='ERROR'); "
            "print(ray.available_resources().get('CPU', 0.0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    return float(out.stdout.strip().splitlines()[-1])


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"  # Ray >= 2.5x turns on token auth for `ray start`; a loopback test needs none
    return env


def _end_instance(proc: subprocess.Popen, temp: str) -> None:
    """The test's Ray processes, by id: its process group, then any process that names its
    own temporary folder (Ray starts some in sessions of their own)."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 20)):  # `ray start --block` took 20 s and more to obey SIGTERM
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp.encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
    shutil.rmtree(temp, ignore_errors=True)  # the instance's logs and sockets: some 1 MB a run


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU Ray head on 127.0.0.1, in its own process group, ended by the fixture (never
    ``ray stop``, which would stop every Ray instance of this user on the machine)."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'losscmp[ray]'")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="lcray-", dir="/tmp")  # Ray's socket paths must stay short
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp}", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # Workers that import torch and losscmp before they take an actor, as the README tells a cluster's admin.
        env={**_env(), "LOSSCMP_TEST_ANNOUNCE": str(ANNOUNCE), "RAY_preload_python_modules": ",".join(PRELOAD)},
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if _cpus_free(address) == 2.0:
                break
        except (ValueError, IndexError, subprocess.TimeoutExpired):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _end_instance(proc, temp)
            pytest.fail(f"the test's Ray head did not come up at {address}")
        time.sleep(2)
    try:
        yield address
    finally:
        _end_instance(proc, temp)
        ANNOUNCE.unlink(missing_ok=True)


def _report(capsys, tmp_path, *extra, impls=("--spec", "binary", *BCE), examples=24) -> tuple[int, dict]:
    out = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
    code = main([*impls, "--examples", str(examples), "--no-save", "--no-explain", "-q", "--json", str(out), *extra])
    capsys.readouterr()
    data = json.loads(out.read_text())
    data.pop("seconds")
    return code, data


def test_a_joined_cluster_gives_the_one_process_report(cluster, capsys, tmp_path):
    """Same seed: --ray ADDRESS is the one-process run (tally, findings, minimal examples);
    afterwards no actor holds a CPU."""
    code, one = _report(capsys, tmp_path)
    ray_code, on_ray = _report(capsys, tmp_path, "--ray", cluster)
    assert code == ray_code == 1 and on_ray == one
    assert sum(one["tally"].values()) == 24 and one["tally"].get("value", 0) > 0
    assert one["divergences"][0]["minimized_sizes"]  # minimised on the cluster, the same example
    assert _eventually_all_cpus_free(cluster)


def test_a_joined_cluster_with_two_jobs_gives_the_jobs_report(cluster, capsys, tmp_path, monkeypatch):
    """--ray ADDRESS --jobs 2 is --jobs 2 for the same seed, also after a user's own ``@given``
    test in this process.  That is what broke it in CI's full suite: such a test leaves the
    main thread's Hypothesis constants cache holding its module's literals; --jobs 2 forks its
    workers from the main thread (and drew from them) while --ray explores its shares in new
    threads (empty caches), so the two drew different cases."""
    import importlib

    from hypothesis import HealthCheck, given, settings

    from losscmp.generate import recipes
    from losscmp.spec import preset

    (tmp_path / "ray_users_constants.py").write_text("LOGITS = [17.5, -23.25, 88.75, 1e-3, 3.0]\nSIZES = [2, 7, 33]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("ray_users_constants")

    @settings(max_examples=200, database=None, suppress_health_check=list(HealthCheck))
    @given(recipes(preset("binary")))
    def users_own_test(recipe):
        pass

    users_own_test()
    _, jobs = _report(capsys, tmp_path, "--jobs", "2")
    _, ray_jobs = _report(capsys, tmp_path, "--jobs", "2", "--ray", cluster)
    assert sum(jobs["tally"].values()) == sum(ray_jobs["tally"].values()) == 24
    assert ray_jobs == jobs
    assert _eventually_all_cpus_free(cluster)


def test_after_a_two_job_search_the_stages_keep_one_actor_and_free_the_other_cpu(cluster):
    """The stages after a --jobs 2 search call one actor (the run's own runner's); the search's
    second one used to stay up, idle, holding its CPU until the run ended."""
    from losscmp.audit import Settings, audit
    from losscmp.load import load_implementation
    from losscmp.spec import preset

    free_during_stages: list[float] = []

    def look(divergences, ctx):
        free_during_stages.append(_cpus_free(cluster))
        return divergences

    result = audit([load_implementation(r) for r in BCE], preset("binary"),
                   Settings.of(examples=24, jobs=2, ray=cluster, save_dir=None, explain=False), stages=[look])
    assert result.cases_run == 24 and result.divergences
    assert free_during_stages == [1.0]
    assert _eventually_all_cpus_free(cluster)


def test_an_implementation_that_kills_its_actor_is_a_crash_finding_and_the_run_completes(cluster, capsys, tmp_path):
    out = tmp_path / "crash.json"
    code = main([*CRASHY, "--spec", "regression", "--examples", "12", "--ray", cluster, "--jobs", "2",
                 "--no-minimize", "--no-explain", "--save-dir", str(tmp_path / "saved"), "-q", "--json", str(out)])
    capsys.readouterr()
    data = json.loads(out.read_text())
    assert code == 1 and data["cases_run"] == 12 and sum(data["tally"].values()) == 12
    assert data["tally"].get("crash", 0) >= 1 and data["tally"].get("agree", 0) >= 1
    (crash,) = [d for d in data["divergences"] if d["kind"] == "crash"]
    assert crash["pair"] == ["mse", "segfaults_on_negative_mean"]  # never the healthy side
    assert "killed its Ray actor" in crash["detail"] and Path(crash["repro"]).exists()
    assert not [d for d in data["divergences"] if d["kind"] != "crash"]  # no collateral findings
    assert _eventually_all_cpus_free(cluster)


def test_a_worker_killed_from_outside_mid_case_is_retried_on_a_fresh_one(cluster, capsys, tmp_path):
    """Not the implementation's doing, so not a finding: the case runs again on the restarted
    actor, and the report is the one-process report for the same seed."""
    slow = ("--spec", "regression", *SLOW)
    _, one = _report(capsys, tmp_path, impls=slow, examples=8)
    ANNOUNCE.unlink(missing_ok=True)
    killed: list[tuple[int, float]] = []
    run_over = threading.Event()

    def kill_the_first_announced_worker() -> None:
        while not run_over.is_set():
            try:
                pid = int(ANNOUNCE.read_text())
            except (OSError, ValueError):  # not yet announced, or half written
                time.sleep(0.01)
                continue
            assert pid != os.getpid()
            os.kill(pid, signal.SIGKILL)  # 0.25 s into a 0.25 s call at most: mid-call
            killed.append((pid, time.monotonic()))
            return

    killer = threading.Thread(target=kill_the_first_announced_worker)
    killer.start()
    try:
        code, on_ray = _report(capsys, tmp_path, "--ray", cluster, impls=slow, examples=8)
        ended = time.monotonic()
    finally:
        run_over.set()
        killer.join()
    assert killed and killed[0][1] < ended  # an actor was killed while the run went on
    assert code == 0 and on_ray == one and one["tally"] == {"agree": 8}
    assert _eventually_all_cpus_free(cluster)


PLUGIN_PROJECT = f'''
import torch.nn.functional as F

def test_on_the_cluster(losscmp):
    result = losscmp.check(F.mse_loss, "{FIXTURES}/misbehaving.py:mse_slowly", spec="regression", examples=6)
    assert result.cases_run == 6

def test_diverges_on_the_cluster(losscmp):
    losscmp.check("{FIXTURES}/misbehaving.py:mse", "{FIXTURES}/misbehaving.py:mutates_input", spec="regression", examples=6)
'''


def test_the_pytest_plugin_hands_its_checks_to_the_cluster(cluster, pytester):
    """--losscmp-ray ADDRESS: the checks' calls are made by the cluster's workers (the one
    that ran mse_slowly announced itself, and it is not this process); a divergence fails
    its test as without Ray; what Ray refuses stops the session in one line."""
    ANNOUNCE.unlink(missing_ok=True)
    pytester.makepyfile(test_project=PLUGIN_PROJECT)
    result = pytester.runpytest("-p", "no:cacheprovider", "--losscmp-ray", cluster)
    result.assert_outcomes(passed=1, failed=1)
    assert int(ANNOUNCE.read_text()) != os.getpid()
    result.stdout.re_match_lines([r"E\s+AssertionError: DIVERGE .*mutation \d/6 mutates_input"])
    assert _eventually_all_cpus_free(cluster)
    refused = pytester.runpytest("-p", "no:cacheprovider", "--losscmp-ray", cluster, "--losscmp-isolate")
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    assert refused.stderr.lines[0].startswith("ERROR: --losscmp-isolate is not supported with --losscmp-ray (")


def test_the_plugin_keeps_one_connection_and_its_actor_for_the_whole_session(cluster, pytester, tmp_path):
    """--losscmp-ray ADDRESS: the session's checks are all served by one actor (each check
    used to join the cluster and start a new actor: a new worker process importing torch,
    seconds a check), each check's implementations loaded in it before its first call; the
    actor goes when the session ends."""
    pids = tmp_path / "pids"
    check = (f'    losscmp.check(F.mse_loss, "{FIXTURES}/misbehaving.py:mse_slowly", spec="regression", examples=3)\n'
             f'    with open({str(pids)!r}, "a") as f:\n        f.write(open({str(ANNOUNCE)!r}).read() + "\\n")\n')
    other = f'    losscmp.check("{FIXTURES}/misbehaving.py:mse", "{FIXTURES}/bce.py:bce_with_logits", spec="binary", examples=3)\n'
    pytester.makepyfile(test_session="import torch.nn.functional as F\n\n"
                        + "".join(f"def test_{i}(losscmp):\n{body}\n" for i, body in enumerate([check, other, check, check])))
    result = pytester.runpytest("-p", "no:cacheprovider", "--losscmp-ray", cluster)
    result.assert_outcomes(passed=3, failed=1)  # mse against BCE diverges: run on the kept actor too
    seen = pids.read_text().split()
    assert len(seen) == 3 and len(set(seen)) == 1 and int(seen[0]) != os.getpid()
    assert _eventually_all_cpus_free(cluster)


def test_a_held_connection_gives_way_to_a_run_that_asks_for_another_address(cluster, capsys, tmp_path):
    """Held for a session (as the plugin holds it), the connection to the cluster is ended
    when a run asks for --ray local, which then runs on an instance of its own (its workers
    do not announce themselves as the cluster's do), and is ended at the release."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'losscmp[ray]'")
    from losscmp.cluster import hold_connection, release_connection

    slow = ("--spec", "regression", *SLOW)
    hold_connection()
    try:
        ANNOUNCE.unlink(missing_ok=True)
        assert _report(capsys, tmp_path, "--ray", cluster, impls=slow, examples=2)[0] == 0
        assert ANNOUNCE.exists() and ray.is_initialized()  # on the cluster, and still connected
        ANNOUNCE.unlink()
        assert _report(capsys, tmp_path, "--ray", "local", impls=slow, examples=2)[0] == 0
        assert not ANNOUNCE.exists()
    finally:
        release_connection()
    assert not ray.is_initialized()
    assert _eventually_all_cpus_free(cluster)


def test_sigterm_mid_run_leaves_no_actor_on_the_cluster(cluster, tmp_path):
    argv = [sys.executable, "-m", "losscmp", *BCE, "--spec", "binary", "--examples", "100000", "--ray", cluster,
            "--jobs", "2", "--no-save", "-q"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while _cpus_free(cluster) > 0.0:  # both actors up: the run is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert _eventually_all_cpus_free(cluster)


def test_a_check_on_the_cluster_keeps_its_timeout(cluster):
    """``assert_losses_agree(..., ray=ADDRESS, timeout=2)``: the check chose its runner without
    ``ray=`` (in-process, which cannot stop a call), so it dropped the timeout and a hang
    on an actor waited for ever.  (Not run where this fix was made: Ray is not installed there.)"""
    from losscmp.testing import assert_losses_agree

    mis = f"{FIXTURES}/misbehaving.py"
    with pytest.raises(AssertionError, match=r"sleeps did not return within 2 s"):
        assert_losses_agree(f"{mis}:mse", f"{mis}:sleeps", spec="regression", examples=10, minimize=False, explain=False,
                            ray=cluster, timeout=2)


def test_a_cluster_joined_after_a_local_run_in_the_same_process_runs_the_check(cluster, tmp_path):
    """A --ray local instance turned on Ray's token authentication for the whole process
    (RAY_AUTH_MODE=token, cached by Ray), and it outlived the instance: the cluster joined
    next (no token auth) cancelled each actor before its first call.  The run now leaves
    the process's environment as it found it."""
    from losscmp.testing import assert_losses_agree

    env = dict(os.environ)
    assert main([*SLOW, "--spec", "regression", "--examples", "2", "--ray", "local", "--no-save", "-q",
                 "--json", str(tmp_path / "local.json")]) == 0
    assert dict(os.environ) == env
    mis = f"{FIXTURES}/misbehaving.py"
    assert assert_losses_agree(f"{mis}:mse", f"{mis}:mse", spec="regression", examples=3, minimize=False, explain=False,
                               ray=cluster, timeout=30).agree


def _catalogue():
    """fixtures/misbehaving.py (loaded by path, as tests/test_soak.py does): MARK and marked()."""
    spec = importlib.util.spec_from_file_location("losscmp_ray_misbehaving", FIXTURES / "misbehaving.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_hang_under_ray_local_is_a_timeout_finding_and_leaves_no_ray_process(tmp_path):
    """``--ray local --timeout 2``: the hung call's actor is killed and restarted, the case is
    a timeout finding, the run completes, and no process of its Ray instance (they all carry
    the command's environment, marked) outlives it."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'losscmp[ray]'")
    catalogue, mark = _catalogue(), uuid.uuid4().hex
    mis, out = FIXTURES / "misbehaving.py", tmp_path / "hang.json"
    proc = subprocess.run([sys.executable, "-m", "losscmp", f"{mis}:mse", f"{mis}:sleeps", "--spec", "regression", "--examples", "12",
                           "--ray", "local", "--timeout", "2", "--no-minimize", "--no-explain", "--no-save", "-q", "--json", str(out)],
                          env={**_env(), catalogue.MARK: mark}, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["cases_run"] == 12 and sum(data["tally"].values()) == 12
    assert data["tally"].get("timeout", 0) >= 1 and data["tally"].get("agree", 0) >= 1
    (hang,) = data["divergences"]
    assert hang["kind"] == "timeout" and hang["pair"] == ["mse", "sleeps"] and "did not return within 2 s" in hang["detail"]
    deadline = time.monotonic() + 30
    while (left := catalogue.marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left


def test_local_starts_and_ends_its_own_instance(cluster, capsys, tmp_path, monkeypatch):
    """Even with RAY_ADDRESS naming a running cluster (the fixture's), which a plain
    ray.init() joins, --ray local runs on an instance of its own: its workers, started
    from this process, do not announce themselves as the fixture's do."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'losscmp[ray]'")
    monkeypatch.setenv("RAY_ADDRESS", cluster)
    ANNOUNCE.unlink(missing_ok=True)
    out = tmp_path / "local.json"
    code = main([*SLOW, "--spec", "regression", "--examples", "4", "--ray", "local", "--no-save", "-q", "--json", str(out)])
    capsys.readouterr()
    data = json.loads(out.read_text())
    assert code == 0 and data["tally"] == {"agree": 4}
    assert not ANNOUNCE.exists()  # not run on the fixture's cluster
    assert not ray.is_initialized()  # the local instance went with the run


def _eventually_all_cpus_free(address: str, wait: float = 60.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if _cpus_free(address) == 2.0:
            return True
        time.sleep(1)
    return False
