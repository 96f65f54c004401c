"""Hostile implementations: what one side does to the process must not make losscmp
claim agreement it did not see."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import losscmp
from losscmp.cli import main
from losscmp.audit import Settings, audit
from losscmp.findings import Alone, Pair
from losscmp.load import load_implementation
from losscmp.spec import parse_spec

SPEC = "input: B real grad; target: B real; B=1..8"


def _impls(tmp_path, source, *names):
    path = tmp_path / "hostile.py"
    path.write_text("import torch\nimport torch.nn.functional as F\n" + source)
    return [load_implementation(f"{path}:{name}") for name in names]


def test_a_side_that_raises_now_and_then_does_not_hide_a_real_pair_divergence(tmp_path):
    impls = _impls(tmp_path, """
calls = [0]
def mse(input, target):
    return F.mse_loss(input, target)
def flaky_double(input, target):  # twice the loss, and a transient failure on every 7th call
    calls[0] += 1
    if calls[0] % 7 == 0:
        raise RuntimeError("transient")
    return 2 * F.mse_loss(input, target)
""", "mse", "flaky_double")
    result = audit(impls, parse_spec(SPEC), Settings.of(examples=30, save_dir=None, minimize=False, explain=False))
    kinds = {(d.subject, d.kind) for d in result.divergences}
    assert (Alone("flaky_double"), "nondeterminism") in kinds
    assert (Pair("mse", "flaky_double"), "value") in kinds
    assert Pair("mse", "flaky_double") in result.subject_cases


def test_global_torch_switches_flipped_by_one_side_do_not_reach_the_next_call(tmp_path):
    impls = _impls(tmp_path, """
def mse(input, target):
    return F.mse_loss(input, target) + torch.tensor(0.0)  # takes the default dtype
def switches_off(input, target):
    value = F.mse_loss(input, target)
    torch.set_grad_enabled(False)
    torch.set_default_dtype(torch.float64)
    return value
def mse_wrong_grad(input, target):
    return F.mse_loss(input, target) + (input - input.detach()).sum()
""", "mse", "switches_off", "mse_wrong_grad")
    try:
        result = audit(impls, parse_spec(SPEC), Settings.of(examples=20, save_dir=None, minimize=False, explain=False))
        assert torch.is_grad_enabled() and torch.get_default_dtype() == torch.float32
    finally:
        torch.set_grad_enabled(True)
        torch.set_default_dtype(torch.float32)
    kinds = {(d.subject, d.kind) for d in result.divergences}
    # Gradients were compared on every case: the wrong one is seen, the right ones agree.
    assert (Pair("mse", "mse_wrong_grad"), "gradient") in kinds
    assert (Pair("switches_off", "mse_wrong_grad"), "gradient") in kinds
    assert not [d for d in result.divergences if "switches_off" in d.subject.labels and d.kind != "gradient"]
    assert result.subject_cases[Pair("switches_off", "mse_wrong_grad")] >= 15


def test_gradients_are_compared_even_when_the_caller_is_in_no_grad(tmp_path):
    impls = _impls(tmp_path, """
def mse(input, target):
    return F.mse_loss(input, target)
def mse_wrong_grad(input, target):
    return F.mse_loss(input, target) + (input - input.detach()).sum()
""", "mse", "mse_wrong_grad")
    with torch.no_grad():
        result = audit(impls, parse_spec(SPEC), Settings.of(examples=10, save_dir=None, minimize=False, explain=False))
    assert {(d.subject, d.kind) for d in result.divergences} == {(Pair("mse", "mse_wrong_grad"), "gradient")}


HOSTILE_RETURNS = """
class Unreadable(Exception):
    def __str__(self):
        raise RuntimeError("no message")
class NotAnException(BaseException):
    pass
class Touchy(torch.Tensor):  # its own code runs on every torch function applied to it
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("to", "isfinite", "__eq__", "eq"):
            raise ValueError("touched")
        return super().__torch_function__(func, types, args, kwargs or {})
class SparseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()
    @staticmethod
    def backward(ctx, g):
        return g.to_sparse()
def mse(input, target):
    return F.mse_loss(input, target)
def unreadable(input, target):
    if input.numel() == 1:
        raise Unreadable()
    return F.mse_loss(input, target)
def base_exception(input, target):
    if input.numel() == 1:
        raise NotAnException("base")
    return F.mse_loss(input, target)
def meta_value(input, target):
    value = F.mse_loss(input, target)
    return value.detach().to("meta") if input.numel() == 1 else value
def touchy(input, target):
    return F.mse_loss(input, target).as_subclass(Touchy)
def sparse_grad(input, target):
    return F.mse_loss(SparseGrad.apply(input), target)
"""


@pytest.mark.parametrize("name, error", [
    ("unreadable", "unreadable raised Unreadable: (its message could not be read: RuntimeError)"),
    ("base_exception", "base_exception raised NotAnException: base"),
    ("meta_value", "meta_value returned a meta tensor (it holds no values), not a dense tensor"),
])
def test_a_strange_failure_on_some_inputs_is_a_finding_not_the_end_of_losscmp(tmp_path, capsys, name, error):
    path = tmp_path / "hostile.py"
    path.write_text("import torch\nimport torch.nn.functional as F\n" + HOSTILE_RETURNS)
    code = main([f"{path}:mse", f"{path}:{name}", "--spec", SPEC, "--examples", "20", "--no-save", "--no-explain", "--json", "-"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [d["kind"] for d in report["divergences"]] in (["exception"], ["non_tensor"])
    assert error in report["divergences"][0]["detail"]


@pytest.mark.parametrize("name", ["touchy", "sparse_grad"])
def test_a_tensor_subclass_value_or_a_sparse_gradient_is_compared_by_its_values(tmp_path, capsys, name):
    path = tmp_path / "hostile.py"
    path.write_text("import torch\nimport torch.nn.functional as F\n" + HOSTILE_RETURNS)
    code = main([f"{path}:mse", f"{path}:{name}", "--spec", SPEC, "--examples", "10", "--no-save", "--json", "-"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["tally"] == {"agree": 10}


@pytest.mark.slow
def test_a_base_exception_escaping_the_supervised_command_is_said_in_one_line(tmp_path):
    script = (
        "import sys, losscmp.cli\n"
        "class Stray(BaseException): pass\n"
        "def main(argv): raise Stray('from nowhere')\n"
        "losscmp.cli.main = main\n"
        "from losscmp.supervise import entry\n"
        "sys.exit(entry([]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(losscmp.__file__).parent.parent)})
    assert done.returncode == 70
    assert "losscmp: internal error: Stray: from nowhere" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_json_on_stdout_stays_pure_when_a_reference_prints_as_it_is_imported(tmp_path):
    path = tmp_path / "chatty.py"
    path.write_text(
        "import os\nimport torch.nn.functional as F\n"
        "print('loading my research code')\n"
        "os.write(1, b'banner from C\\n')\n"
        "def mse(input, target):\n    return F.mse_loss(input, target)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "losscmp", "torch.nn.functional:mse_loss", f"{path}:mse", "--spec", SPEC,
         "--examples", "5", "--no-save", "--json", "-"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(losscmp.__file__).parent.parent)},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tally"] == {"agree": 5}
    assert "loading my research code" in done.stderr and "banner from C" in done.stderr


def test_json_on_stdout_stays_pure_in_process_too(tmp_path, capsys):
    path = tmp_path / "chatty_in_process.py"
    path.write_text("import torch.nn.functional as F\nprint('loading my research code')\n"
                    "def mse(input, target):\n    return F.mse_loss(input, target)\n")
    code = main(["torch.nn.functional:mse_loss", f"{path}:mse", "--spec", SPEC, "--examples", "5", "--no-save", "--json", "-"])
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["tally"] == {"agree": 5}
    assert "loading my research code" in captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case is about a machine without CUDA")
def test_a_cuda_case_replayed_on_a_machine_without_cuda_says_where_it_ran(tmp_path, capsys):
    path = tmp_path / "pair.py"
    path.write_text("import torch.nn.functional as F\n"
                    "def mse(input, target):\n    return F.mse_loss(input, target)\n"
                    "def twice(input, target):\n    return 2 * F.mse_loss(input, target)\n")
    assert main([f"{path}:mse", f"{path}:twice", "--spec", SPEC, "--examples", "5", "--no-explain", "--no-minimize",
                 "--save-dir", str(tmp_path / "saved"), "-q"]) == 1
    saved = sorted((tmp_path / "saved").glob("*value*.json"))[0]
    meta = json.loads(saved.read_text())
    meta["device"] = "cuda"  # as found on a GPU machine
    meta["implementations"][1]["ref"] = f"{path}:mse"  # and fixed since
    saved.write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["replay", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "recorded on cuda, replayed on cpu" in out
    assert "agree now on cpu" in out and "not replayed on cuda" in out


@pytest.mark.slow
def test_the_other_interpreter_worker_treats_strange_returns_and_failures_as_the_in_process_call_does(tmp_path, capsys):
    path = tmp_path / "hostile.py"
    path.write_text("import torch\nimport torch.nn.functional as F\n" + HOSTILE_RETURNS + """
def switches_off(input, target):
    value = F.mse_loss(input, target)
    torch.set_grad_enabled(False)
    return value
""")
    remote = ["unreadable", "meta_value", "switches_off"]  # a worker each: few, to stay fast
    argv = [f"{path}:mse"] + [f"{n}={path}:{n}" for n in remote] + [a for n in remote for a in ("--python", f"{n}={sys.executable}")]
    code = main(argv + ["--reference", "mse", "--spec", SPEC, "--examples", "12", "--no-save", "--no-explain", "--no-minimize",
                        "--json", "-"])
    report = json.loads(capsys.readouterr().out)
    found = {d["pair"][1]: (d["kind"], d["detail"]) for d in report["divergences"]}
    assert code == 1 and set(found) == {"unreadable", "meta_value"}, found  # switches_off agrees: its gradients were compared
    assert found["unreadable"][0] == "exception" and "(its message could not be read: RuntimeError)" in found["unreadable"][1]
    assert found["meta_value"][0] == "non_tensor" and "returned a meta tensor (it holds no values)" in found["meta_value"][1]


def test_pair_differences_within_a_sides_own_noise_are_not_compared_never_agree(tmp_path):
    # A side whose answers wobble by 1e-3 from call to call: the pair's differences are no
    # bigger than that wobble, so they were excused, and the pair row read plain "agree"
    # although 9 of 10 cases differed.  Those cases were not seen to agree.
    impls = _impls(tmp_path, """
def mse(input, target):
    return F.mse_loss(input, target)
def noisy(input, target):
    return F.mse_loss(input, target) + 1e-3 * torch.rand(())
""", "mse", "noisy")
    result = audit(impls, parse_spec(SPEC), Settings.of(examples=20, minimize=False, explain=False))
    pair = Pair("mse", "noisy")
    assert any(d.subject == Alone("noisy") and d.kind.value == "nondeterminism" for d in result.divergences)
    if not any(d.subject == pair for d in result.divergences):  # excused as noise: then reported as not compared
        n, why = result.not_compared[pair]
        assert n >= 1 and "noisy's own run-to-run noise" in why
