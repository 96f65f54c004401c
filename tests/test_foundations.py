"""Issue 7's defects, each driven through the public interface: false verdicts, deaths
and hangs of losscmp, tracebacks instead of one line, and the trust of repro files."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from losscmp import audit
from losscmp.cli import main
from losscmp.compare import Tolerance, compare_outcomes
from losscmp.findings import Kind, Pair
from losscmp.load import load_implementation
from losscmp.run import Outcome
from losscmp.settings import Settings
from losscmp.spec import preset

from .conftest import FIXTURES, REPO

MSE = "import torch\n\ndef mse(input, target):\n    return ((input - target) ** 2).mean()\n\n"


def module(tmp_path, body, name="impls"):
    f = tmp_path / f"{name}.py"
    f.write_text(MSE + textwrap.dedent(body))
    return f


def run_losscmp(*argv, cwd=None, timeout=240):
    """The real command (`python -m losscmp`), supervisor included."""
    return subprocess.run([sys.executable, "-m", "losscmp", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


# --- false verdicts -------------------------------------------------------------------

@pytest.mark.slow
def test_a_crash_on_both_sides_is_a_finding_not_agreement(tmp_path, capsys):
    f = module(tmp_path, """
        import ctypes
        def crash_a(input, target):
            ctypes.string_at(0)
        def crash_b(input, target):
            ctypes.string_at(0)
        def raises(input, target):
            raise ValueError("no")
    """)
    code = main([f"{f}:mse", f"{f}:crash_a", f"{f}:crash_b", f"{f}:raises", "--spec", "regression", "--isolate",
                 "--examples", "3", "--no-save", "--no-minimize", "--reference", "crash_a", "-q"])
    out = capsys.readouterr().out
    assert code == 1 and "All implementations agree" not in out
    result_kinds = {line.split("│")[1].strip(): line.split("│")[5].strip() for line in out.splitlines() if line.count("│") == 6}
    assert result_kinds["crash_a vs crash_b"] == "crash"  # both crashed: never agreement
    assert result_kinds["crash_a vs raises"] == "crash"  # a segfault and an exception: a finding
    assert result_kinds["crash_a vs mse"] == "crash"


def test_both_failing_differently_is_a_finding_and_the_same_way_is_reported_not_compared():
    def failed(why):
        return Outcome("exception", error=f"raised ValueError: {why}")

    tol = Tolerance(1e-6, 1e-6)
    different = compare_outcomes(Pair("a", "b"), failed("x"), failed("y"), tol)
    same = compare_outcomes(Pair("a", "b"), failed("x"), failed("x"), tol)
    assert different.kind is Kind.BOTH_FAILED and not different.agrees
    assert same.kind is None and not same.compared and not same.agrees and "not compared" in same.detail


def test_cases_both_sides_refuse_are_counted_and_shown_as_not_compared(tmp_path, capsys):
    f = module(tmp_path, """
        def picky(input, target):
            if input.numel() == 1:
                raise ValueError("need two samples")
            return ((input - target) ** 2).mean()
        def picky_too(input, target):
            if input.numel() == 1:
                raise ValueError("need two samples")
            return ((input - target) ** 2).mean()
    """)
    code = main([f"{f}:picky", f"{f}:picky_too", "--spec", "regression", "--examples", "60", "--no-save"])
    out = capsys.readouterr().out
    assert code == 0
    assert "not compared on" in out and "need two samples" in out and "All implementations agree" not in out
    assert "cases: " in out and "not compared" in out.split("cases: ")[1].splitlines()[0]


@pytest.mark.slow
def test_process_killing_implementation_never_exits_0_and_its_input_replays(tmp_path):
    f = module(tmp_path, """
        import os
        def quits(input, target):
            if input.numel() > 3:
                os._exit(0)
            return ((input - target) ** 2).mean()
    """)
    done = run_losscmp(f"{f}:mse", f"{f}:quits", "--spec", "regression", "--save-dir", tmp_path / "saved")
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "implementation quits ended the losscmp process (exit code 0)" in line and "--isolate" in line
    saved = line.split("its input is saved as ")[1].split(" ")[0]
    assert os.path.exists(saved)
    replayed = run_losscmp("replay", saved)  # isolated: the replaying process survives it
    assert replayed.returncode == 1 and "crash" in replayed.stdout and "exit code 0" in replayed.stdout


def test_an_implementation_raising_keyboard_interrupt_is_a_finding(tmp_path, capsys):
    f = module(tmp_path, """
        def interrupts(input, target):
            if input.numel() > 10:
                raise KeyboardInterrupt
            return ((input - target) ** 2).mean()
    """)
    code = main([f"{f}:mse", f"{f}:interrupts", "--spec", "regression", "--examples", "20", "--no-save", "--no-minimize", "--no-explain"])
    out = capsys.readouterr().out
    assert code == 1 and "raised KeyboardInterrupt" in out


def test_sweep_of_a_knob_no_call_accepts_is_a_usage_error(capsys):
    code = main(["sweep", f"{FIXTURES}/regression.py:huber", f"{FIXTURES}/regression.py:smooth_l1", "--spec", "regression",
                 "--param", "blurr=1:10"])
    err = capsys.readouterr().err
    assert code == 2 and "every call failed" in err and "blurr" in err


def test_mismatch_message_points_at_a_mismatched_element_only():
    tol = Tolerance(1e-3, 1e-5)
    def ok(*v):
        return Outcome("ok", value=torch.tensor(v, dtype=torch.float64))

    v = compare_outcomes(Pair("e", "a"), ok(1000.0, 0.0), ok(1000.5, 0.001), tol)
    assert v.kind is Kind.VALUE
    assert "mismatched elements: 1 / 2" in v.detail
    assert "greatest absolute difference 0.001 at index (1,)" in v.detail  # not the agreeing 0.5 at (0,)


def test_a_value_finding_says_how_the_gradients_compare(capsys):
    code = main([f"{FIXTURES}/regression.py:huber", f"{FIXTURES}/regression.py:smooth_l1", "--spec", "regression",
                 "--examples", "10", "--no-save", "--no-minimize", "--no-explain"])
    out = capsys.readouterr().out
    assert code == 1 and "meanwhile gradient w.r.t. input" in out


# --- losscmp itself never dies, hangs or leaks implementations' output ---------------

@pytest.mark.slow
def test_isolate_without_spec_never_probes_in_process(tmp_path):
    f = module(tmp_path, """
        import ctypes
        def always_crashes(input, target):
            ctypes.string_at(0)
    """)
    done = run_losscmp(f"{f}:mse", f"{f}:always_crashes", "--isolate", "--no-save")
    assert done.returncode == 2 and done.stderr.startswith("losscmp: error:") and "Traceback" not in done.stderr


@pytest.mark.slow
def test_printing_closing_stdout_and_leaving_threads_cannot_break_losscmp(tmp_path):
    f = module(tmp_path, """
        import os, sys, threading, time, warnings
        def noisy(input, target):
            print("hello from noisy")
            os.write(1, b"raw bytes on fd 1\\n")
            warnings.warn("did not converge")
            return ((input - target) ** 2).mean() * (1 + (input.numel() > 5))
        def closes(input, target):
            sys.stdout.close()
            os.close(1)
            return ((input - target) ** 2).mean()
        def lingers(input, target):
            threading.Thread(target=time.sleep, args=(3600,)).start()  # not a daemon
            return ((input - target) ** 2).mean()
    """)
    done = run_losscmp(f"{f}:mse", f"{f}:noisy", f"{f}:closes", f"{f}:lingers", "--spec", "regression", "--examples", "15",
                       "--no-save", "--no-minimize", "--json", "-", timeout=120)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)  # nothing the implementations printed got in
    noisy = next(d for d in report["divergences"] if "noisy" in d["pair"] and "mse" in d["pair"])
    assert "hello from noisy" in noisy["output"]["noisy"] and "did not converge" in noisy["output"]["noisy"]
    assert "raw bytes on fd 1" in noisy["output"]["noisy"]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--isolate", "--timeout", "0"], "timeout must be a positive number"),
    (["--isolate", "--timeout", "-1"], "timeout must be a positive number"),
    (["--isolate", "--timeout", "nan"], "timeout must be a positive number"),
    (["--seed", str(2**200)], "seed must be an integer in [0, 2**63)"),
    (["--max-size", "0"], "--max-size must be at least 1"),  # Settings names the option that was wrong
    (["--examples", "0"], "examples must be at least 1"),
    (["--json", "/"], "is a directory"),
    (["--json", "/no/such/folder/report.json"], "does not exist"),
])
def test_bad_options_are_one_line_before_anything_runs(capsys, argv, message):
    code = main([f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits", "--no-save", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_spec_too_large_for_memory_is_refused_in_one_line_and_max_size_makes_it_run(capsys):
    # Before: the OS killed losscmp (exit 137, no output) while it built a 12 GB tensor.
    huge = "input: B real grad; target: B real; B=1..10000000000000"
    argv = [f"{FIXTURES}/bce.py:bce_with_logits", "torch.nn.functional:mse_loss", "--spec", huge, "--examples", "3", "--no-save"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the largest case (B=10000000000000) needs about" in err and "--max-size" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--max-size", "64", "--no-minimize", "--no-explain"]) in (0, 1)
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["input: 100000000000 real grad; target: 100000000000 real",
                                  "input: B real grad; target: B real; B=100000000000"])
def test_a_too_large_spec_that_no_cap_can_shrink_names_its_shapes_and_does_not_suggest_max_size(capsys, spec):
    argv = [f"{FIXTURES}/bce.py:bce_with_logits", "torch.nn.functional:mse_loss", "--spec", spec, "--no-save", "--max-size", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "--max-size" not in err and len(err.strip().splitlines()) == 1
    assert "(input: 100000000000, target: 100000000000)" in err or "(B=100000000000)" in err


@pytest.mark.parametrize("argv, message", [
    (["--points", "0"], "--points must be at least 2"),
    (["--size", "0"], "--size must be at least 1"),
])
def test_bad_sweep_options_are_one_line(capsys, argv, message):
    code = main(["sweep", f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits", "--param", "scale=1:10", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_file_exiting_at_import_is_a_load_error(tmp_path, capsys):
    f = tmp_path / "exits.py"
    f.write_text("import sys\nsys.exit(4)\n")
    code = main([f"{f}:loss", f"{FIXTURES}/bce.py:bce_with_logits"])
    err = capsys.readouterr().err
    assert code == 2 and "SystemExit(4)" in err


def test_the_library_writes_nothing_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    impls = [load_implementation(f"{FIXTURES}/bce.py:bce_on_sigmoid"), load_implementation(f"{FIXTURES}/bce.py:bce_with_logits")]
    result = audit(impls, preset("binary"), Settings.of(examples=20, minimize=False))
    assert not result.agree and not any(d.repro for d in result.divergences)
    assert list(tmp_path.iterdir()) == []


# --- saved cases: trust, and a replay that survives what it replays -------------------

@pytest.fixture
def saved_bce(bce_repros):
    return sorted(bce_repros)[0]


def tampered(saved, tmp_path, **changes):
    meta = json.loads(saved.read_text())
    for key, value in changes.items():
        if key == "ref":
            meta["implementations"][0]["ref"] = value
        else:
            meta[key] = value
    target = tmp_path / saved.name
    target.write_text(json.dumps(meta))
    target.with_suffix(".npz").write_bytes(saved.with_suffix(".npz").read_bytes())
    return target


@pytest.mark.parametrize("ref, why", [
    ("torch:save", "I/O function of torch"),
    ("numpy:save", "I/O function of numpy"),
    ("os:system", "standard library (os)"),
    ("builtins:open", "standard library (builtins)"),
    ("shutil:rmtree", "standard library (shutil)"),
    ("torch.serialization:load", "I/O function of torch"),
])
def test_replay_refuses_references_a_saved_file_may_not_run(saved_bce, tmp_path, capsys, ref, why):
    code = main(["replay", str(tampered(saved_bce, tmp_path, ref=ref))])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to run" in err and why in err


def test_replay_names_what_will_run_before_running_it(saved_bce, capsys):
    code = main(["replay", str(saved_bce)])
    out = capsys.readouterr().out
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("will run bce_on_sigmoid = ") and lines[1].startswith("will run bce_with_logits = ")


@pytest.mark.parametrize("changes, message", [
    ({"tolerance": {"rtol": float("nan"), "atol": 1e-5}}, "'tolerance' must hold finite"),
    ({"tolerance": {"rtol": -1, "atol": 1e-5}}, "'tolerance' must hold finite"),
    ({"pair": ["bce_on_sigmoid", "nobody"]}, "'pair' names an implementation"),
    ({"pair": ["bce_on_sigmoid"]}, "'pair' must be two labels"),
    ({"seed": 2**200}, "'seed' must be an integer"),
    ({"timeout": -3}, "'timeout' must be a positive number"),
])
def test_a_repro_with_bad_fields_is_one_line(saved_bce, tmp_path, capsys, changes, message):
    code = main(["replay", str(tampered(saved_bce, tmp_path, **changes))])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_replay_pytest_into_a_missing_folder_is_one_line(saved_bce, capsys):
    code = main(["replay", "--pytest", "-o", "/missing/dir/t.py", str(saved_bce)])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err


def test_a_side_that_raises_on_every_input_under_an_explicit_spec_is_a_finding(tmp_path, capsys):
    # Was a usage error (exit 2) until issue 15: with --spec given, a side that raises on
    # every input while the other returns (geomloss' hausdorff, an open upstream bug) is
    # an exception finding with a repro, and the report says what it raised.
    f = module(tmp_path, """
        import torch.nn.functional as F
        def swapped(target, input):  # wants (B, C) logits first; gets float targets
            return F.cross_entropy(input, target.long())
    """)
    out = tmp_path / "r.json"
    code = main([f"{FIXTURES}/cross_entropy.py:log_softmax_nll", f"{f}:swapped", "--spec", "classification",
                 "--examples", "10", "--no-explain", "--save-dir", str(tmp_path / "saved"), "--json", str(out)])
    capsys.readouterr()
    report = json.loads(out.read_text())
    assert code == 1 and [d["kind"] for d in report["divergences"]] == ["exception"]
    assert "swapped raised" in report["divergences"][0]["detail"] and report["divergences"][0]["repro"]


def test_regime_flags_focus_the_search_and_reject_unknown_names(capsys, tmp_path):
    out = tmp_path / "r.json"
    code = main([f"{FIXTURES}/regression.py:huber", f"{FIXTURES}/regression.py:smooth_l1", "--spec", "regression", "--examples", "20",
                 "--no-save", "--no-minimize", "--no-explain", "--regimes", "standard,tiny", "--exclude-regimes", "tiny", "--json", str(out)])
    capsys.readouterr()
    assert code == 1
    assert {r for d in json.loads(out.read_text())["divergences"] for r in d["regimes"]} == {"standard"}
    assert main([f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits", "--regimes", "standrd"]) == 2
    assert "unknown regime standrd" in capsys.readouterr().err


def test_mismatch_messages_print_the_digits_that_tell_the_sides_apart():
    def ok(v):
        return Outcome("ok", value=torch.tensor(v, dtype=torch.float32))

    v = compare_outcomes(Pair("tensorized", "online"), ok(2684017.0), ok(2684019.0), Tolerance(1e-8, 0))
    assert "tensorized 2684017 vs online 2684019" in v.detail
