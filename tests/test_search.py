"""The search side of issue 15: degenerate inputs in every run, and minimal examples
that keep the mechanism (off kinks, ties, denormals and domain edges; same sign, same
component; no softmax over one class; a threshold true of the example shown)."""
import json

import torch

from losscmp.audit import Divergence, Evaluator, Settings, audit
from losscmp.cli import main
from losscmp.generate import Case, Recipe
from losscmp.load import load_implementation
from losscmp.minimize import input_magnitude, minimize, subnormals, with_magnitude
from losscmp.spec import parse_spec, preset

from .conftest import FIXTURES


def run_json(tmp_path, capsys, *argv):
    out = tmp_path / "r.json"
    code = main([*argv, "--no-save", "--json", str(out)])
    capsys.readouterr()
    return code, json.loads(out.read_text())


def test_the_nan_slope_of_a_norm_at_zero_is_found_in_every_run(tmp_path, capsys):
    # Random draws never make x all zeros at B, D >= 2: 100 cases agreed before issue 15.
    code, report = run_json(tmp_path, capsys, f"{FIXTURES}/degenerate.py:norm", f"{FIXTURES}/degenerate.py:norm_by_hand",
                            "--spec", "x: B D real grad; B=2..16; D=2..16", "--examples", "6", "--no-minimize", "--no-explain")
    assert code == 1
    assert any("zeros" in d["regimes"] for d in report["divergences"]), report["divergences"]


def test_an_empty_mask_in_some_samples_is_drawn_in_every_run(tmp_path, capsys):
    code, report = run_json(tmp_path, capsys, f"{FIXTURES}/degenerate.py:recall", f"{FIXTURES}/degenerate.py:recall_eps",
                            "--spec", "segmentation", "--examples", "6", "--no-minimize", "--no-explain")
    assert code == 1
    assert any("empty masks" in d["regimes"] for d in report["divergences"]), report["divergences"]


def test_narrowed_regimes_leave_the_degenerate_inputs_out(tmp_path, capsys):
    code, report = run_json(tmp_path, capsys, f"{FIXTURES}/degenerate.py:norm", f"{FIXTURES}/degenerate.py:norm_by_hand",
                            "--spec", "x: B D real grad; B=2..16; D=2..16", "--examples", "6", "--regimes", "standard", "--no-minimize", "--no-explain")
    assert report["cases_run"] == 6 and code == 0


# --- minimal examples keep the mechanism ---------------------------------------------

def pair(a, b):
    return [load_implementation(a), load_implementation(b)]


def test_a_backward_that_forgets_the_sign_is_shown_off_the_kink():
    # x = 0 is a kink (0 and 1 are both valid slopes of |x|); before issue 15 the example was x = [0].
    impls = pair(f"{FIXTURES}/kinks.py:abs_sum", f"{FIXTURES}/kinks.py:abs_sum_custom")
    for seed in (0, 1):
        result = audit(impls, parse_spec("x: N real grad"), Settings.of(examples=40, seed=seed, save_dir=None, explain=False))
        (d,) = result.divergences
        x = d.minimized.case.tensors["x"]
        assert x.tolist() == [-1.0], x  # the simplest input that shows it: slope -1 vs 1
        assert d.minimized.verdict.kind == "gradient"


def test_a_dice_example_never_rests_on_denormal_probabilities():
    impls = pair(f"{FIXTURES}/dice.py:dice_smooth", f"{FIXTURES}/dice.py:dice_eps_below")
    for seed in (0, 1):
        result = audit(impls, preset("segmentation"), Settings.of(examples=40, seed=seed, save_dir=None, explain=False))
        assert result.divergences
        for d in result.divergences:
            assert subnormals(d.minimized.case) == 0, (d.kind, d.minimized.case.tensors["input"])


def _divergence(ev, case):
    p = ev.pairs[0]
    v = ev.verdict(p, ev.outcomes(case, p.labels))
    assert v.kind
    return Divergence(p, v.kind, v, case, 1)


def test_a_denormal_the_case_was_drawn_with_is_lifted_out_of_the_example():
    # A planted var = 1e-45 (regime special) was kept: the rule refused only candidates with
    # *more* denormals than the case being shrunk.  -Normal.log_prob overflows at the smallest
    # normal var just as well (25 / 2.4e-38 > FLT_MAX): the example must not rest on a denormal.
    spec = parse_spec("input: B D real grad; target: B D real; var: B D positive grad; B=1..4; D=1..4")
    ev = Evaluator(pair(f"{FIXTURES}/truth.py:gaussian_nll", f"{FIXTURES}/truth.py:normal_nll"), spec, Settings.of())
    case = Case({"input": torch.tensor([[5.0]]), "target": torch.tensor([[0.0]]), "var": torch.tensor([[1e-45]])},
                {"B": 1, "D": 1}, recipe=Recipe(sizes=(("B", 1), ("D", 1))))
    assert subnormals(case) == 1
    m = minimize(ev, _divergence(ev, case))
    assert m.verdict.kind == "nonfinite" and subnormals(m.case) == 0, m.case.tensors


def test_an_overflow_at_a_large_negative_logit_keeps_its_sign_and_its_threshold_is_true():
    spec = preset("binary")
    ev = Evaluator(pair(f"{FIXTURES}/inference.py:sigmoid_focal", f"{FIXTURES}/inference.py:sigmoid_focal_by_hand"), spec, Settings.of())
    case = Case({"input": torch.tensor([-16554.0, 0.3]), "target": torch.tensor([1.0, 0.0])}, {"B": 2}, recipe=Recipe(sizes=(("B", 2),)))
    m = minimize(ev, _divergence(ev, case))
    x = m.case.tensors["input"]
    assert (x < 0).all(), x  # log(sigmoid(z)) underflowing at z << 0, not 1 - sigmoid(z) at z >> 0
    assert m.verdict.kind == "nonfinite" and m.threshold is not None
    # "agree at" is true of the example shown, and it diverges where it stands.
    agree = with_magnitude(spec, m.case, m.threshold.agree_at)
    assert ev.judge(ev.pairs[0], agree).kind is None
    assert m.threshold.diverge_at <= input_magnitude(spec, m.case) * (1 + 1e-6)


def test_a_softmax_class_dim_is_never_shrunk_to_one(tmp_path):
    # Softmax over one class is 1 everywhere: a C = 1 example shows another loss (issue 15: C = 3 went to 1).
    f = tmp_path / "dice.py"
    f.write_text(f"import sys; sys.path.insert(0, {str(FIXTURES)!r})\nfrom inference import dice_softmax\n"
                 "def smooth_small(input, target):\n    return dice_softmax(input, target, smooth=1e-5)\n"
                 "def smooth_one(input, target):\n    return dice_softmax(input, target, smooth=1.0)\n")
    spec = parse_spec("input: B C H W logits grad; target: B C H W binary; B=1..3; C=1..3; H=1..8; W=1..8")
    ev = Evaluator(pair(f"{f}:smooth_small", f"{f}:smooth_one"), spec, Settings.of())
    g = torch.Generator().manual_seed(0)
    case = Case({"input": torch.randn(2, 3, 4, 4, generator=g), "target": (torch.rand(2, 3, 4, 4, generator=g) < 0.5).float()},
                {"B": 2, "C": 3, "H": 4, "W": 4}, recipe=Recipe(sizes=(("B", 2), ("C", 3), ("H", 4), ("W", 4))))
    m = minimize(ev, _divergence(ev, case))
    assert m.sizes["C"] == 2 and m.sizes["H"] * m.sizes["W"] < 16, m.sizes
