"""trace, location by data: the same quantity with the opposite sign is no departure, and a side
whose differing result is a value the other side computes on the way departs nowhere of its own."""
import json

import torch

from losscmp.cli import main
from losscmp.generate import Case
from losscmp.load import parse_ref
from losscmp.repro import save_case
from losscmp.spec import parse_spec

from .conftest import FIXTURES

F32_TOL = (1.3e-6, 1e-5)


def traced(tmp_path, a: str, b: str, spec_text: str, case: Case, pair: tuple[str, str], kind: str) -> dict:
    """``losscmp trace A B REPRO --json``: the location record of one saved case."""
    repro = save_case(tmp_path, spec=parse_spec(spec_text), case=case, refs=[parse_ref(a), parse_ref(b)], pair=pair,
                      kind=kind, outcomes={}, tolerance=F32_TOL, seed=0, device="cpu")
    out = tmp_path / "where.json"
    assert main(["trace", a, b, str(repro), "--json", str(out)]) == 1  # they differ on the case
    return json.loads(out.read_text())


def test_poisson_nll_and_minus_log_prob_are_not_located_at_the_same_quantity_with_opposite_signs(tmp_path, capsys):
    # PoissonNLLLoss(log_input=True, full=True) computes exp(z) - t·z, the distribution
    # t·z - exp(z) (negated at the end, NLL = -log_prob): the same quantity.  The two sides
    # part where log(t!) is taken: Stirling's t log t - t + ½ log(2πt) against lgamma(t + 1).
    # The trace named the two subtractions (aten.sub.Tensor on both sides).
    a, b = f"{FIXTURES}/inference.py:poisson_full", f"{FIXTURES}/truth.py:poisson_log_prob"
    case = Case({"input": torch.tensor([0.5, 2.0, 3.0]), "target": torch.tensor([3.0, 2.0, 5.0])}, {"B": 3})
    where = traced(tmp_path, a, b, "input: B real grad; target: B counts; B=1..8", case, ("poisson_full", "poisson_log_prob"), "value")
    assert where["location"] is not None, where["location_note"]
    note = where["location_note"]
    assert "departs at aten.sub.Tensor" not in note and "at aten.sub.Tensor at" not in note, note
    # The distribution departs where it makes lgamma's argument t + 1 out of the target alone.
    assert "poisson_log_prob at aten.add.Tensor" in note or "poisson_log_prob at aten.lgamma" in note, note
    assert where["location"]["poisson_full"]["op"] not in ("aten.sub.Tensor", "aten.mul.Tensor", "aten.exp.default")


def test_a_fork_that_drops_the_debiasing_term_is_placed_at_its_own_line_for_a_gradient(tmp_path, capsys):
    # The minimised gradient case of bench_location's fork_no_debias (seed 0): the fork's
    # gradient w.r.t. y is, to the bit, the upstream's gradient through g_ab before the
    # upstream adds the debiasing term's.  The walk took the op that returns it (the backward
    # of the cost's unsqueeze, fork_no_debias.py:22) for a departure; no op of the fork makes
    # a new value, so it is placed where the upstream's extra path leaves the shared program.
    forks = FIXTURES / "forks"
    a, b = f"base={forks}/sinkhorn_base.py:sinkhorn_divergence", f"fork={forks}/fork_no_debias.py:sinkhorn_divergence"
    case = Case({"x": torch.zeros(2, 2), "y": torch.tensor([[-3e-5, 0.0], [2e-5, 0.0]])}, {"N": 2, "M": 2, "D": 2})
    where = traced(tmp_path, a, b, "x: N D real grad; y: M D real grad; N=2..6; M=2..6; D=2", case, ("base", "fork"), "gradient")
    assert where["location"] is not None, where["location_note"]
    fork_line = next(n for n, line in enumerate((forks / "fork_no_debias.py").read_text().splitlines(), 1) if "FORK:" in line)
    assert where["location"]["fork"]["line"] == fork_line, where["location_note"]
    assert where["side"] == "fork"
    assert "its result is a value the other side computes on the way" in where["location_note"]



def test_a_forward_value_is_never_matched_to_minus_a_gradient_of_the_other_side(installed_segloss, tmp_path, capsys):
    # bench_location's Dice, seed 1, minimised: zero logits over 2 classes, class 1 empty.  The
    # library's gradient w.r.t. tp is, to the bit, minus the hand-written dice (2 / denominator
    # on both): matching a forward value to a negated backward one moved the researcher's line
    # from the dice (dice.py:32) to the mean after it.
    dice = FIXTURES / "dice.py"
    a, b = f"mine={dice}:dice_eps_in_denominator", "library=segloss:DiceLoss(softmax=True)"
    target = torch.zeros(1, 2, 1, 1)
    target[0, 0] = 1
    case = Case({"input": torch.zeros(1, 2, 1, 1), "target": target}, {"B": 1, "C": 2, "H": 1, "W": 1})
    where = traced(tmp_path, a, b, "input: B C H W real grad; target: B C H W binary; B=1..2; C=2..3; H=1..4; W=1..4",
                   case, ("mine", "library"), "value")
    line = next(n for n, text in enumerate(dice.read_text().splitlines(), 1) if "# mine: dice" in text)
    assert where["location"] is not None and where["location"]["mine"]["line"] == line, where["location_note"]


def test_a_loss_of_one_is_not_taken_for_the_other_sides_gradient_seed(tmp_path):
    # mean(x - t) against mean(t - x) at x = 0, t = -1: the first side's loss is 1, which the
    # other side never computes; its backward starts from autograd's seed ones_like(loss),
    # which the recorder counted as made by the loss's own op (a one-input op passing on its
    # producer).  The first side was said to return 'a value the other side computes on the
    # way' and placed at its mean, through the other side's departure.
    (tmp_path / "flip.py").write_text("def mean_diff(input, target):\n    return (input - target).mean()\n\n\n"
                                      "def mean_diff_flipped(input, target):\n    return (target - input).mean()\n")
    a, b = f"{tmp_path}/flip.py:mean_diff", f"{tmp_path}/flip.py:mean_diff_flipped"
    case = Case({"input": torch.tensor([0.0]), "target": torch.tensor([-1.0])}, {"B": 1})
    where = traced(tmp_path, a, b, "input: B real grad; target: B real; B=1..8", case, ("mean_diff", "mean_diff_flipped"), "value")
    note = where["location_note"] or ""
    assert "a value the other side computes" not in note, note
    if where["location"] is not None:  # or not localised: one number each side
        assert where["location"]["mean_diff"]["op"] == "aten.sub.Tensor", note


def test_two_departing_ops_that_give_the_same_value_are_not_a_location(tmp_path, capsys):
    # The same pair minimised to z = 0, t = 3 (seed 0): t·z = 0 and xlogy(t, exp z) = 0 are
    # zeros, never matched by value alone, so each walk took its own for a departure and the
    # location named mul against xlogy: two ops that, by the data, compute the same thing.
    a, b = f"{FIXTURES}/inference.py:poisson_full", f"{FIXTURES}/truth.py:poisson_log_prob"
    case = Case({"input": torch.tensor([0.0]), "target": torch.tensor([3.0])}, {"B": 1})
    where = traced(tmp_path, a, b, "input: B real grad; target: B counts; B=1..8", case, ("poisson_full", "poisson_log_prob"), "value")
    assert where["location"] is None
    assert "the two departing ops give the same value" in where["location_note"], where["location_note"]
