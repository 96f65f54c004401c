"""Hostile implementations: what one side does to the process must not make losscmp
claim agreement it did not see."""
import torch

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
