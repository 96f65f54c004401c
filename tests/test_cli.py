"""The command line as a user meets it: exit codes and one-line errors."""
import json
import re
import shlex
import subprocess
import sys

import pytest
import torch

from losscmp.cli import main
from losscmp.spec import PRESETS

from .conftest import FIXTURES, PLANTED, REPO

BCE_A, BCE_B = f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.py:f", BCE_B], "no such file: missing.py"),
        ([f"{FIXTURES}/bce.py:nope", BCE_B], "has no attribute 'nope'"),
        ([f"{FIXTURES}/bce.py:F", BCE_B], "is a module, which is not callable"),
        ([f"{FIXTURES}/regression.py:DELTA", BCE_B], "is a float, which is not callable"),
        (["torch.nn:HuberLoss(delta=open('x'))", BCE_B], "factory arguments must be literals"),
        ([BCE_A, BCE_B, "--spec", "x: N D reel"], "unknown domain 'reel'"),
        ([BCE_A, BCE_B, "--spec", "x N D"], "cannot parse spec item"),
        ([BCE_A, BCE_B, "--spec", "pointclouds3"], "unknown preset 'pointclouds3'"),
        ([BCE_A], "need at least two implementations"),
        ([], "need at least two implementations"),
        ([f"{PLANTED}:mse", f"{PLANTED}:mse_vector", "--spec", "regression"], "returned shape (4,), expected a scalar"),
        ([f"{PLANTED}:mse", BCE_B, "--spec", "x: N real grad"], "every implementation failed"),
        ([BCE_A, BCE_B, "--reference", "zzz"], "--reference 'zzz' is not one of"),
        ([BCE_A, BCE_B, "--timeout", "3"], "--timeout needs --isolate"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert err.strip().startswith("losscmp: error:") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in out + err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu(capsys):
    code, _, err = run_cli(capsys, BCE_A, BCE_B, "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_non_tensor_returned_on_a_probe_is_a_usage_error(capsys, tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("def as_list(input, target):\n    return [float((input - target).pow(2).mean())]\n")
    code, _, err = run_cli(capsys, f"{PLANTED}:mse", f"{f}:as_list", "--spec", "regression")
    assert code == 2 and "returned list, not a tensor" in err


def test_non_tensor_on_some_inputs_only_is_a_recorded_finding(capsys, tmp_path):
    report = tmp_path / "r.json"
    code, out, _ = run_cli(capsys, f"{PLANTED}:mse", f"{PLANTED}:mse_list_sometimes", "--spec", "regression", "--no-save", "--no-explain", "--json", report)
    assert code == 1
    kinds = {d["kind"] for d in json.loads(report.read_text())["divergences"]}
    assert kinds == {"non_tensor"}
    assert "returned list, not a tensor" in out


def test_help_documents_every_option_with_examples(capsys):
    # In-process: two interpreters importing torch cost seconds; `python -m losscmp` has its own test below.
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for option in ["--spec", "--examples", "--seed", "--device", "--dtype", "--rtol", "--atol", "--json", "--save-dir", "--isolate", "--timeout", "--no-minimize"]:
        assert option in out
    assert "examples" in out and "losscmp replay" in out and "losscmp trace" in out and "exit codes" in out
    assert "130 / 143" in out  # the stopped-run exit codes the README lists
    spec_lines = " ".join(out.split("spec:", 1)[1].split("exit codes:", 1)[0].split())
    for name in PRESETS:  # every preset --spec accepts, the ones added later included
        assert re.search(rf"[(, ]{re.escape(name)}[,)]", spec_lines), name
    code, sweep_help, _ = run_cli(capsys, "sweep", "--help")
    assert code == 0 and "--param" in sweep_help and "blur=1e-3:1:log" in sweep_help


def test_help_examples_can_be_pasted_into_a_shell_and_name_real_fixtures():
    from losscmp.cli import EXAMPLES
    from losscmp.load import load_implementation

    commands = [line.strip().split("  ")[0] for line in EXAMPLES.splitlines() if line.strip().startswith("losscmp ")]
    assert len(commands) >= 5
    for command in commands:
        # An unquoted factory call, say, is a shell syntax error before losscmp ever runs.
        assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, command
        # A placeholder such as <case> parses, as a redirection from a file named "case".
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        assert not {"<", ">", ">>"} & set(lexer), f"a redirection (a <placeholder>?) in: {command}"
        for word in shlex.split(command):
            ref = word.split("=", 1)[1] if "=" in word.split(":", 1)[0] else word
            if ref.startswith("fixtures/") and ".py:" in ref:
                load_implementation(str(REPO / ref))  # raises if the file or attribute is gone


def test_spec_inference_is_printed_with_how_to_pin_it(capsys):
    code, out, _ = run_cli(capsys, f"{FIXTURES}/regression.py:mean_square", "torch.nn.functional:mse_loss", "--examples", "20", "--no-save")
    assert code == 0
    assert "inferred spec regression" in out and "--spec regression" in out


@pytest.mark.slow
def test_python_dash_m_agrees_with_entry_point(tmp_path):
    report = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "losscmp", BCE_A, BCE_B, "--spec", "binary", "--examples", "30", "--no-save", "--no-explain", "--json", str(report)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    data = json.loads(report.read_text())
    assert data["implementations"] == ["bce_on_sigmoid", "bce_with_logits"]
    assert data["cases_run"] == 30
