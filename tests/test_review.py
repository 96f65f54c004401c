"""Regression tests for bugs found in review (adversarial use of the public interface)."""
import json
import textwrap

import pytest

from losscmp.cli import main


def _write(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def test_complex_values_that_differ_only_in_imaginary_part_are_a_divergence(tmp_path, capsys):
    # Casting complex to float64 dropped the imaginary parts: the run said "agree".
    _write(tmp_path, "cplx.py", """
        import torch
        def plain(x, y): return torch.complex(x - y, torch.zeros_like(x)).sum()
        def rotated(x, y): return torch.complex(x - y, (x - y) * 1e-2).sum()
    """)
    code = main([f"{tmp_path}/cplx.py:plain", f"{tmp_path}/cplx.py:rotated", "--spec", "x: B real; y: B real; B=1..8",
                 "--examples", "5", "--no-save", "--no-explain", "--json", "-"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1, report
    assert report["divergences"][0]["kind"] == "value"


def test_complex_divergence_is_explained_without_crashing_the_run(tmp_path, capsys):
    # With the explanation on, the trace's complex summaries (real, imaginary pairs) were
    # reshaped to the tensor's shape: a RuntimeError that killed the whole run silently.
    _write(tmp_path, "cplx.py", """
        import torch
        def plain(x, y): return torch.complex(x - y, torch.zeros_like(x)).sum()
        def rotated(x, y): return torch.complex(x - y, (x - y) * 1e-2).sum()
    """)
    code = main([f"{tmp_path}/cplx.py:plain", f"{tmp_path}/cplx.py:rotated", "--spec", "x: B real; y: B real; B=1..8",
                 "--examples", "5", "--no-save", "--json", "-"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    d = report["divergences"][0]
    assert d["kind"] == "value"
    assert d["category"] == "semantic"


@pytest.mark.slow
def test_explaining_a_complex_loss_leaks_no_casting_warning(tmp_path):
    # The known-number notes summed float(value.double()): torch warned "Casting complex
    # values to real discards the imaginary part" into the report.  A fresh process: the
    # warning is shown once per process.
    import subprocess
    import sys

    _write(tmp_path, "cplx.py", """
        import torch
        def plain(x, y): return torch.complex(x - y, torch.zeros_like(x)).sum()
        def rotated(x, y): return torch.complex(x - y, (x - y) * 1e-2).sum()
    """)
    done = subprocess.run([sys.executable, "-m", "losscmp", f"{tmp_path}/cplx.py:plain", f"{tmp_path}/cplx.py:rotated",
                           "--spec", "x: B real; y: B real; B=1..8", "--examples", "5", "--no-save"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "plain vs rotated: value" in done.stdout and "semantic" in done.stdout
    assert "Casting complex values" not in done.stdout + done.stderr


@pytest.mark.slow
def test_an_internal_error_is_one_line_never_a_silent_exit(tmp_path):
    # An unforeseen exception in the supervised child ended the process with code 70 and
    # no output at all: the os._exit in the child's `finally` ate the traceback.
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import sys
        import losscmp.report
        def broken(*args, **kwargs):
            raise RuntimeError("report exploded")
        losscmp.report.print_audit = broken
        from losscmp.supervise import entry
        sys.exit(entry(sys.argv[1:]))
    """))
    done = subprocess.run([sys.executable, str(script), "torch.nn.functional:mse_loss", "torch.nn.functional:l1_loss",
                           "--spec", "regression", "--examples", "2", "--no-save", "--no-explain", "--no-minimize"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 70
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("losscmp: internal error: RuntimeError: report exploded"), done.stderr
    assert "Traceback" not in done.stderr


def test_a_stage_that_raises_keeps_the_findings(tmp_path):
    # An exception in a stage (a bug in the explanation, a trace the implementation
    # cannot run under) escaped audit() and lost every finding of the search.
    import losscmp
    from losscmp.spec import resolve_spec
    from losscmp.stages import Minimize

    class Broken:
        name = "broken"

        def __call__(self, divergences, ctx):
            raise RuntimeError("stage exploded")

    impls = [losscmp.load_implementation(losscmp.parse_ref(r))
             for r in ("torch.nn.functional:mse_loss", "torch.nn.functional:l1_loss")]
    result = losscmp.audit(impls, resolve_spec("regression"), losscmp.Settings.of(examples=5),
                           stages=(Minimize(), Broken()))
    assert result.divergences, "the search's findings were lost"
    assert result.divergences[0].minimized is not None  # the stages before the broken one still count
    assert result.stage_errors and "broken stage failed (RuntimeError: stage exploded)" in result.stage_errors[0]


def test_rich_markup_in_an_error_message_does_not_kill_the_report(tmp_path, capsys):
    # Both sides raising "closing [/] tag" the same way: the "not compared" line was
    # printed as rich markup, and MarkupError ended the run after the search.
    _write(tmp_path, "markup.py", """
        def a(input, target):
            if input.numel() == 2:
                raise ValueError("closing [/] tag")
            return ((input - target) ** 2).mean()
        def b(input, target):
            if input.numel() == 2:
                raise ValueError("closing [/] tag")
            return ((input - target) ** 2).mean()
    """)
    code = main([f"{tmp_path}/markup.py:a", f"{tmp_path}/markup.py:b", "--spec", "input: B real grad; target: B real; B=1..3",
                 "--examples", "30", "--no-save"])
    out = capsys.readouterr().out
    assert code == 0
    assert "not compared on" in out and "closing [/] tag" in out


def test_replay_prints_a_markup_like_error_message_literally(tmp_path, capsys):
    _write(tmp_path, "markup2.py", """
        def a(input, target):
            if input.numel() == 2:
                raise ValueError("closing [/] tag")
            return ((input - target) ** 2).mean()
        def b(input, target):
            return ((input - target) ** 2).mean()
    """)
    saved = tmp_path / "saved"
    assert main([f"{tmp_path}/markup2.py:a", f"{tmp_path}/markup2.py:b", "--spec", "input: B real grad; target: B real; B=1..3",
                 "--examples", "30", "--no-explain", "--save-dir", str(saved), "-q"]) == 1
    [repro] = saved.glob("*exception*.json")
    capsys.readouterr()
    assert main(["replay", str(repro)]) == 1
    out = capsys.readouterr().out
    assert "still diverges (exception)" in out and "closing [/] tag" in out


def test_trace_json_to_an_unwritable_path_is_a_usage_error(tmp_path, capsys):
    # The path was opened only after the trace: a traceback (exit 70), not one line and exit 2.
    _write(tmp_path, "pair.py", """
        def a(input, target):
            return ((input - target) ** 2).mean()
        def b(input, target):
            return ((input - target) ** 2).mean() * 1.5
    """)
    saved = tmp_path / "saved"
    assert main([f"{tmp_path}/pair.py:a", f"{tmp_path}/pair.py:b", "--spec", "regression", "--examples", "5",
                 "--no-explain", "--no-minimize", "--save-dir", str(saved), "-q"]) == 1
    repro = next(saved.glob("*.json"))
    capsys.readouterr()
    for bad in (str(tmp_path / "missing" / "x.json"), str(tmp_path)):
        assert main(["trace", f"{tmp_path}/pair.py:a", f"{tmp_path}/pair.py:b", str(repro), "--json", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("losscmp: error: --json") and len(err.strip().splitlines()) == 1, err


def test_one_example_and_more_jobs_than_examples_run(tmp_path, capsys):
    # --examples 1 (the probe alone), or a job whose share is one example, built a
    # Hypothesis settings object with max_examples=0: InvalidArgument, exit 70.
    ref = [f"{tmp_path}/pair.py:a", f"{tmp_path}/pair.py:b", "--spec", "regression", "--no-save", "--no-explain", "--json", "-"]
    _write(tmp_path, "pair.py", """
        def a(input, target):
            return ((input - target) ** 2).mean()
        def b(input, target):
            return ((input - target) ** 2).mean() * 1.5
    """)
    assert main([*ref, "--examples", "1"]) == 1
    assert json.loads(capsys.readouterr().out)["cases_run"] == 1
    assert main([*ref, "--examples", "3", "--jobs", "2"]) == 1
    assert json.loads(capsys.readouterr().out)["cases_run"] == 3


def test_workers_from_a_fork_server_survive_their_start(tmp_path, capsys):
    # --devices (and --jobs once CUDA is initialised) start workers from a fork server;
    # each worker checked that its parent was losscmp, found the fork server, and exited:
    # BrokenProcessPool, exit 70, for every such run.  "cpu,cpu" takes the same path without a GPU.
    _write(tmp_path, "pair.py", """
        def a(input, target):
            return ((input - target) ** 2).mean()
        def b(input, target):
            return ((input - target) ** 2).mean() * 1.5
    """)
    code = main([f"{tmp_path}/pair.py:a", f"{tmp_path}/pair.py:b", "--spec", "regression", "--no-save", "--no-explain",
                 "--no-minimize", "--examples", "4", "--devices", "cpu,cpu", "--json", "-"])
    assert code == 1
    assert json.loads(capsys.readouterr().out)["cases_run"] == 4


def test_a_saved_case_that_still_diverges_fails_with_its_report(tmp_path):
    # The replay failure message imported report._tensor_text, which no longer exists:
    # every still-diverging saved case failed the test with an ImportError instead.
    import pytest
    import torch.nn.functional as F

    from losscmp.testing import assert_losses_agree

    def scaled(input, target):
        return F.mse_loss(input, target) * 1.5

    for _ in range(2):  # the first run fuzzes and saves; the second replays the saved case first
        with pytest.raises(AssertionError) as failed:
            assert_losses_agree(F.mse_loss, scaled, spec="regression", examples=5, save_dir=tmp_path)
    message = str(failed.value)
    assert "a saved case still diverges" in message
    assert "input = [" in message


@pytest.mark.slow
def test_an_implementation_killing_a_jobs_worker_is_one_line(tmp_path):
    # Without --isolate, a segfault inside a --jobs worker surfaced as BrokenProcessPool
    # from the pool: exit 70 and (before the supervisor fix) no output at all.
    import subprocess
    import sys

    from .conftest import FIXTURES

    fixture = FIXTURES / "misbehaving.py"
    done = subprocess.run([sys.executable, "-m", "losscmp", f"{fixture}:mse", f"{fixture}:segfaults_on_negative_mean",
                           "--spec", "regression", "--examples", "10", "--no-save", "--jobs", "2", "-q"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("losscmp: error: a --jobs worker process died") and "--isolate" in line


def test_sweep_prints_its_result(tmp_path, capsys):
    # The sweep's pair became a findings.Pair; the CLI still indexed it like a tuple:
    # every `losscmp sweep` ended in a TypeError after the work was done.
    _write(tmp_path, "pair.py", """
        def a(input, target):
            return ((input - target) ** 2).mean()
        def b(input, target):
            return ((input - target) ** 2).mean() * 1.5
    """)
    code = main(["sweep", f"{tmp_path}/pair.py:a", f"{tmp_path}/pair.py:b", "--spec", "regression",
                 "--param", "scale=1:2", "--points", "2"])
    out = capsys.readouterr().out
    assert code == 1
    assert "a vs b" in out and "DIVERGE" in out


@pytest.mark.slow
def test_standalone_test_of_a_hang_fails_in_time_instead_of_hanging_pytest(tmp_path):
    # `replay --pytest` of a timeout repro called the hanging implementation in pytest's
    # own process (and a crash repro segfaulted pytest): now each side runs first in its
    # own interpreter, under the recorded timeout.
    import subprocess
    import sys

    _write(tmp_path, "slow.py", """
        import time
        def hangs(input, target):
            if input.numel() == 1:
                time.sleep(3600)
            return ((input - target) ** 2).mean()
        def fine(input, target):
            return ((input - target) ** 2).mean()
    """)
    saved = tmp_path / "saved"
    assert main([f"{tmp_path}/slow.py:hangs", f"{tmp_path}/slow.py:fine", "--spec", "input: B real grad; target: B real; B=1..2",
                 "--examples", "3", "--isolate", "--timeout", "1", "--no-explain", "--no-minimize",
                 "--save-dir", str(saved), "-q"]) == 1
    repro = next(saved.glob("hangs--fine--timeout--*.json"))
    out = tmp_path / "test_generated.py"
    assert main(["replay", "--pytest", str(repro), "-o", str(out)]) == 0
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:losscmp", str(out)],
                          capture_output=True, text=True, timeout=200, cwd=tmp_path)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "hangs did not return within 1 s" in done.stdout
