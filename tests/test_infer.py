"""Spec inference for any tensor signature, with reasons when nothing fits."""
import importlib.util
import inspect
import json

import pytest

from losscmp.audit import Settings, audit
from losscmp.cli import main
from losscmp.infer import InferenceError, in_process, infer, infer_spec
from losscmp.load import load_implementation
from losscmp.spec import SpecError

from .conftest import FIXTURES, PLANTED, REPO

NUMERIC = PLANTED.parent / "planted_numeric.py"


def impls(*refs):
    return [load_implementation(r) for r in refs]


def test_a_one_argument_pair_is_inferred_and_audited():
    pair = impls(f"{NUMERIC}:energy", f"{NUMERIC}:energy_twice_halved")
    spec = infer_spec(pair)
    assert [a.name for a in spec.args] == ["x"] and spec.arg("x").grad
    assert audit(pair, spec, Settings.of(examples=20, save_dir=None, minimize=False)).agree


def test_a_three_argument_pair_with_a_keyword_only_parameter_is_inferred():
    pair = impls(f"{NUMERIC}:triplet", f"{NUMERIC}:triplet_by_hand")
    spec = infer_spec(pair)
    assert [a.name for a in spec.args] == ["anchor", "positive", "negative"]
    assert spec.args[0].dims == spec.args[1].dims == spec.args[2].dims == ("B", "D")
    assert audit(pair, spec, Settings.of(examples=20, save_dir=None, minimize=False)).cases_run == 20


def test_a_probe_that_fails_on_small_inputs_is_retried_larger(tmp_path):
    f = tmp_path / "windowed.py"
    f.write_text(
        "def _check(x):\n"
        "    if min(x.shape[-2:]) < 11:\n"
        "        raise ValueError(\"Kernel size can't be greater than actual input size\")\n"
        "def a(img1, img2):\n    _check(img1)\n    return ((img1 - img2) ** 2).mean()\n"
        "def b(img1, img2):\n    _check(img1)\n    return ((img2 - img1) ** 2).mean()\n"
    )
    spec = infer_spec(impls(f"{f}:a", f"{f}:b"))
    last_two = spec.args[0].dims[-2:]
    assert all(spec.size_range(d)[0] >= 11 for d in last_two), spec.text()
    # Every case the audit draws from it is accepted.
    result = audit(impls(f"{f}:a", f"{f}:b"), spec, Settings.of(examples=15, save_dir=None, minimize=False))
    assert result.agree


def test_when_nothing_fits_the_error_says_who_raised_what_on_which_sizes(tmp_path):
    f = tmp_path / "fussy.py"
    f.write_text("import torch\n"
                 "def good(x, y):\n    return ((x - y) ** 2).mean()\n"
                 "def fussy(x, y):\n    raise TypeError('expected a dict of tensors')\n")
    with pytest.raises(InferenceError) as e:
        infer_spec(impls(f"{f}:good", f"{f}:fussy"))
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, SpecError)
    assert "good returned a value but fussy raised TypeError: expected a dict of tensors" in msg
    assert "and still on" in msg  # retried larger before giving up


def test_a_required_keyword_only_parameter_is_a_one_line_error(tmp_path):
    f = tmp_path / "kw.py"
    f.write_text("def a(x, y, *, margin):\n    return (x - y).abs().mean() * margin\n")
    with pytest.raises(InferenceError, match="margin"):
        infer_spec(impls(f"{f}:a", f"{f}:a"))


def test_probing_goes_through_the_given_runner():
    seen = []

    def run(impl, spec, case):
        seen.append((impl.label, spec.text()))
        return in_process(impl, spec, case)

    spec = infer_spec(impls("torch.nn.functional:mse_loss", "torch.nn.functional:l1_loss"), run=run)
    assert spec.name == "regression" and {label for label, _ in seen} == {"mse_loss", "l1_loss"}


def test_a_loss_returning_one_value_per_element_is_inferred_with_output_any(tmp_path):
    f = tmp_path / "none.py"
    f.write_text("import torch.nn.functional as F\n"
                 "def a(input, target):\n    return F.mse_loss(input, target, reduction='none')\n"
                 "def b(input, target):\n    return (input - target) ** 2\n")
    spec = infer_spec(impls(f"{f}:a", f"{f}:b"))
    assert not spec.scalar and spec.arg("input").dims == spec.arg("target").dims


@pytest.mark.slow
def test_probing_through_the_isolated_runner_survives_a_crash_and_retries_larger(tmp_path):
    from losscmp.isolate import IsolatedRunner

    f = tmp_path / "crashy.py"
    f.write_text("import os\n"
                 "def mse(input, target):\n    return ((input - target) ** 2).mean()\n"
                 "def mse_crashy(input, target):\n"
                 "    if input.numel() < 20:\n        os.abort()  # a native library that dies on small inputs\n"
                 "    return ((input - target) ** 2).mean()\n")
    runner = IsolatedRunner(timeout=30)
    try:
        spec = infer_spec(impls(f"{f}:mse", f"{f}:mse_crashy"), run=runner)
    finally:
        runner.close()
    assert spec.name == "regression" and spec.size_range("B")[0] >= 20


# --- issue 15: inference reads names, checks the data, says why ---------------------

def _inference_fixtures():
    spec = importlib.util.spec_from_file_location("losscmp_inference_fixtures", FIXTURES / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


INFERENCE = _inference_fixtures()


def _absolute(ref):
    return str(REPO / ref) if ref.startswith(("fixtures/", "tests/")) else ref


@pytest.mark.parametrize("first, second, requirements", INFERENCE.PAIRS, ids=lambda v: v.rsplit(":", 1)[-1] if isinstance(v, str) else "")
def test_inference_is_right_on_pairs_it_once_got_wrong(first, second, requirements):
    pair = impls(_absolute(first), _absolute(second))
    found = infer(pair)
    names = list(inspect.signature(pair[0].fn).parameters)
    assert INFERENCE.unmet(found.spec, requirements, names) == [], found.spec.text()
    assert found.reason  # always says why


def test_a_target_named_argument_never_gets_a_gradient_and_logits_are_logits():
    found = infer(impls(f"{FIXTURES}/inference.py:focal_soft", f"{FIXTURES}/inference.py:focal_soft_stable"))
    assert found.spec.text().startswith("logits: B D logits grad; targets: B D simplex;"), found.spec.text()
    # The binary preset (the name 'focal' suggests it) was passed over with the reason.
    assert any("softmax over input's only dim B" in p for p in found.passed_over), found.passed_over


def test_a_softmax_inside_keeps_two_classes_at_least():
    found = infer(impls(f"{FIXTURES}/inference.py:dice_softmax", f"{FIXTURES}/inference.py:dice_softmax_eps_below"))
    assert found.spec.arg("input").domain == "logits" and found.spec.size_range("C")[0] == 2
    assert "as with a softmax over it" in found.reason


def test_a_positive_domain_is_taken_from_the_error_messages(tmp_path):
    f = tmp_path / "scaled.py"
    f.write_text("import torch, torch.nn.functional as F\n"
                 "def a(mu, obs, s):\n    return F.gaussian_nll_loss(mu, obs, s, full=True)\n"
                 "def b(mu, obs, s):\n    return -torch.distributions.Normal(mu, s.sqrt()).log_prob(obs).mean()\n")
    found = infer(impls(f"{f}:a", f"{f}:b"))
    assert found.spec.arg("s").domain == "positive" and found.spec.arg("mu").domain == "real", found.spec.text()
    assert "positive, as the errors on real values said" in found.reason


def test_the_cli_prints_why_it_chose_the_spec(capsys):
    code = main([f"{FIXTURES}/inference.py:gaussian_nll", f"{FIXTURES}/inference.py:normal_log_prob",
                 "--examples", "5", "--no-save", "--no-minimize"])
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert "inferred spec: input: B D real grad; target: B D real; var: B D positive grad" in out
    assert "  why: one tensor per parameter, read from the parameter names" in out


def test_counts_targets_show_the_stirling_difference_binary_targets_hid(tmp_path):
    out = tmp_path / "r.json"
    code = main(["torch.nn:PoissonNLLLoss(full=True)", f"{FIXTURES}/inference.py:poisson_full_by_hand",
                 "--examples", "30", "--no-save", "--no-minimize", "--no-explain", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and any(d["kind"] == "value" for d in report["divergences"])


def test_a_multi_dim_spec_finds_the_view_that_fails_on_non_contiguous_inputs(tmp_path):
    out = tmp_path / "r.json"
    code = main([f"{FIXTURES}/inference.py:lovasz_hinge", f"{FIXTURES}/inference.py:lovasz_hinge_reshape",
                 "--examples", "30", "--no-save", "--no-minimize", "--no-explain", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and any(d["kind"] == "exception" for d in report["divergences"]), report["divergences"]


INTERMITTENT = (
    "import torch\n"
    "def mse(input, target):\n    return ((input - target) ** 2).mean()\n"
    "def mse_flaky(input, target):\n"
    "    # fails on about a quarter of inputs, the first probe input among them (its input[0] is 1.54)\n"
    "    if float(input.reshape(-1)[0]) > 1.2:\n        raise KeyboardInterrupt\n"
    "    return ((input - target) ** 2).mean()\n"
)


def test_a_side_failing_on_some_inputs_the_first_probe_among_them_is_a_finding(tmp_path, capsys):
    f = tmp_path / "flaky.py"
    f.write_text(INTERMITTENT)
    out = tmp_path / "r.json"
    code = main([f"{f}:mse", f"{f}:mse_flaky", "--examples", "30", "--no-save", "--no-minimize", "--no-explain", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "inferred spec regression" in printed
    report = json.loads(out.read_text())
    assert code == 1 and [d["kind"] for d in report["divergences"]] == ["exception"]
    assert 0 < report["divergences"][0]["cases"] < 30  # intermittent: the other cases agree
    # Under an explicit spec too (the audit's own probe uses several inputs).
    code = main([f"{f}:mse", f"{f}:mse_flaky", "--spec", "regression", "--examples", "10", "--no-save", "--no-minimize", "--no-explain"])
    assert code == 1


def test_a_library_that_raises_on_every_input_under_an_explicit_spec_is_an_exception_finding(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(['geomloss:SamplesLoss(loss="hausdorff", backend="tensorized")', 'geomloss:SamplesLoss(loss="energy", backend="tensorized")',
                 "--spec", "points", "--examples", "5", "--no-explain", "--save-dir", str(tmp_path / "saved"), "--json", str(out)])
    capsys.readouterr()
    report = json.loads(out.read_text())
    assert code == 1 and [d["kind"] for d in report["divergences"]] == ["exception"]
    assert "KeyError" in report["divergences"][0]["detail"] and report["divergences"][0]["repro"]


def test_a_side_that_segfaults_on_some_inputs_the_first_probe_among_them_is_a_crash_finding_under_isolate(tmp_path, capsys):
    f = tmp_path / "flaky.py"
    f.write_text(INTERMITTENT.replace("raise KeyboardInterrupt", "import os; os.abort()"))
    out = tmp_path / "r.json"
    code = main([f"{f}:mse", f"{f}:mse_flaky", "--isolate", "--timeout", "60", "--examples", "12", "--no-save", "--no-minimize",
                 "--no-explain", "--json", str(out)])
    capsys.readouterr()
    report = json.loads(out.read_text())
    assert code == 1 and [d["kind"] for d in report["divergences"]] == ["crash"]


def test_a_reference_that_squashes_its_own_input_is_given_logits(tmp_path):
    # MONAI's DiceLoss(sigmoid=True) and FocalLoss() were given probabilities.
    f = tmp_path / "seg.py"
    f.write_text("import torch\n"
                 "class DiceLoss(torch.nn.Module):  # channels first, per image and channel, as MONAI's\n"
                 "    def __init__(self, sigmoid=False, smooth=1e-5):\n"
                 "        super().__init__(); self.sigmoid, self.smooth = sigmoid, smooth\n"
                 "    def forward(self, input, target):\n"
                 "        p = torch.sigmoid(input) if self.sigmoid else input\n"
                 "        inter = (p * target).sum((2, 3))\n"
                 "        return (1 - (2 * inter + self.smooth) / (p.sum((2, 3)) + target.sum((2, 3)) + self.smooth)).mean()\n")
    found = infer(impls(f"{f}:DiceLoss(sigmoid=True)", f"{f}:DiceLoss(sigmoid=True, smooth=1.0)"))
    assert found.spec.arg("input").domain == "logits" and "the references' names say logits" in found.reason
