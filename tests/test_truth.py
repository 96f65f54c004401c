"""Explanations that are true on real code (issue 15): category over a finding's cases,
persistent non-finite values classified by their op, self-consistency at any scale,
a relation that never contradicts the verdict, the unstable side of an overflow, and
an explanation budget that follows the cost of a call."""
import json
import math
from dataclasses import replace

import pytest
import torch

from losscmp.cli import main
from losscmp.compare import Tolerance
from losscmp.explain import Budget, Category, explain, self_consistency
from losscmp.generate import Case
from losscmp.load import Implementation, load_implementation, parse_ref
from losscmp.spec import parse_spec

from .conftest import FIXTURES, slow_pair

F32 = Tolerance.for_dtype(torch.float32)
TRUTH = FIXTURES / "truth.py"


def truth(name: str) -> Implementation:
    return load_implementation(f"{TRUTH}:{name}")


def audit_json(tmp_path, a, b, *extra):
    out = tmp_path / "report.json"
    code = main([a, b, "--no-save", "--json", str(out), *extra])
    return code, json.loads(out.read_text())


def line_of(text: str) -> int:
    return next(i for i, line in enumerate(TRUTH.read_text().splitlines(), 1) if text in line)


# --- category over the finding, not one point -------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bce_value_finding_is_numerical_whatever_the_seed(tmp_path, seed):
    # Seed 1 used to minimise to z = -89 and call it semantic: float64 agrees on the value
    # there; only the gradient differs in float64 (BCELoss' backward clamp, its own finding).
    code, report = audit_json(tmp_path, f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits",
                              "--seed", str(seed))
    values = [d for d in report["divergences"] if d["kind"] == "value"]
    assert code == 1 and values
    for d in values:
        assert d["category"] == "numerical", d["explanation"]
        assert d["unstable_side"] == "bce_on_sigmoid"


def test_category_is_decided_over_the_findings_cases_not_the_one_shown():
    # Probabilities do not rescale, so the oracle cannot walk this case down: at p = 0.9
    # float64's exp(900) overflows too.  Another case of the same finding (p = 0.2:
    # exp(200) overflows float32 only) shows the cause is precision.
    spec = parse_spec("p: B unit grad; B=1..4")
    stable = Implementation(parse_ref("stable=x.py:f"), lambda p: torch.logsumexp(1000 * p, 0))
    naive = Implementation(parse_ref("naive=x.py:g"), lambda p: torch.log(torch.exp(1000 * p).sum()))
    shown, milder = (Case({"p": torch.tensor(v)}, {"B": 2}) for v in ([0.9, 0.8], [0.2, 0.1]))
    alone = explain(stable, naive, spec, shown, "nonfinite", F32, impact_steps=0)
    assert alone.category is Category.UNKNOWN
    ex = explain(stable, naive, spec, shown, "nonfinite", F32, impact_steps=0, also=(milder,))
    assert ex.category is Category.NUMERICAL and ex.unstable_side == "naive", ex.reason
    assert "on another case of this finding" in ex.reason and "float64 saturates there as well" in ex.reason


# --- persistent non-finite values -------------------------------------------------------------

def test_nonfinite_values_float64_keeps_are_classified_by_the_op_that_makes_them():
    t = torch.rand(6, generator=torch.Generator().manual_seed(0))
    cases = [
        ("psnr_guarded", "psnr", "preds: B image grad; target: B image; B=1..8",
         {"preds": t.clone(), "target": t.clone()}, "division by 0", "1.0 / mse"),  # identical images: MSE = 0
        ("norm", "norm_sqrt", "x: B real grad; B=1..8", {"x": torch.zeros(6)}, "slope of sqrt at 0", "sum().sqrt()"),
        ("nll_clamped", "nll", "p: B unit grad; B=1..8", {"p": torch.tensor([0.5, 0.0, 0.25, 1.0, 0.5, 0.5])}, "log 0", "-torch.log(p)"),
    ]
    for good, bad, spec, tensors, cause, code in cases:
        case = Case(tensors, {"B": 6})
        ex = explain(truth(good), truth(bad), parse_spec(spec), case, "nonfinite", F32, impact_steps=0)
        assert ex.category is Category.SEMANTIC, ex.reason
        data = ex.to_json()
        assert data["origin"]["label"] == bad and data["origin"]["cause"] == cause, data["origin"]
        assert data["origin"]["file"].endswith("truth.py") and data["origin"]["line"] == line_of(code)
        assert ex.sentence().startswith(f"semantic: {bad} gives NaN/inf by {cause}") and "a guard on one side only" in ex.sentence()


def test_an_overflow_float64_shares_stays_unknown_and_names_its_op():
    spec = parse_spec("p: B unit grad; B=1..4")
    stable = Implementation(parse_ref("stable=x.py:f"), lambda p: torch.logsumexp(1000 * p, 0))
    naive = Implementation(parse_ref("naive=x.py:g"), lambda p: torch.log(torch.exp(1000 * p).sum()))
    ex = explain(stable, naive, spec, Case({"p": torch.tensor([0.9, 0.8])}, {"B": 2}), "nonfinite", F32, impact_steps=0)
    assert ex.category is Category.UNKNOWN and "float64 overflows too" in ex.reason
    assert ex.origin is not None and ex.origin.cause.value == "overflow" and ex.origin.op == "aten.exp"


@pytest.mark.parametrize("bad", [lambda p: (p * float("nan")).sum(), lambda p: (p - 2).pow(0.5).sum()],
                         ids=["times a NaN constant", "fractional power of a negative"])
def test_a_nan_made_from_finite_inputs_is_not_called_an_overflow(bad):
    """An overflow turns finite numbers into an infinity; an op whose finite inputs give a NaN
    (fixtures/misbehaving.py's returns_nan, a fractional power of a negative number) did
    not overflow, and saying 'float64 overflows too' sends the reader after a range problem."""
    spec = parse_spec("p: B unit grad; B=1..4")
    good = Implementation(parse_ref("good=x.py:f"), lambda p: (p * p).sum())
    nan = Implementation(parse_ref("nan=x.py:g"), bad)
    ex = explain(good, nan, spec, Case({"p": torch.tensor([0.5, 0.25])}, {"B": 2}), "nonfinite", F32, impact_steps=0)
    assert ex.origin is not None and ex.origin.label == "nan" and ex.origin.cause.value != "overflow", ex.origin
    assert "overflow" not in ex.reason and "overflow" not in ex.sentence(), ex.reason


def test_norm_sqrt_through_the_command_line_is_semantic_with_its_line(tmp_path):
    code, report = audit_json(tmp_path, f"{TRUTH}:norm", f"{TRUTH}:norm_sqrt", "--spec", "x: B real grad; B=1..8")
    (d,) = [d for d in report["divergences"] if d["kind"] == "nonfinite"]
    assert code == 1 and d["category"] == "semantic", d["explanation"]
    origin = d["explanation"]["origin"]
    assert origin["cause"] == "slope of sqrt at 0" and origin["line"] == line_of("sum().sqrt()")
    # A NaN gradient is never "consistent"; at x = 0 the norm itself has a kink: no verdict.
    sc = d["self_consistency"]
    assert sc["norm_sqrt"]["consistent"] is False and "NaN/inf" in sc["norm_sqrt"]["note"]
    assert sc["norm"]["consistent"] is None and "non-differentiable point" in sc["norm"]["note"]


# --- self-consistency at any scale -------------------------------------------------------------

def test_self_consistency_below_a_clamp_and_at_a_denormal():
    spec = parse_spec("input: B real grad; target: B real; var: B positive grad; B=1..8")
    clamped = Case({"input": torch.tensor([0.0]), "target": torch.tensor([1.0]), "var": torch.tensor([1e-30])}, {"B": 1})
    # GaussianNLLLoss clamps var at 1e-6 without the gradient knowing: flat value, gradient -5e11.
    sc = self_consistency(truth("gaussian_nll"), spec, clamped)
    assert sc.consistent is False and sc.max_error > 0.5, sc
    assert self_consistency(truth("normal_nll"), spec, clamped).consistent is True  # no clamp: right at 1e-30 too

    def smooth_dice(pred, target):
        inter = (pred * target).sum()
        return 1 - (2 * inter + 1e-5) / (pred.sum() + target.sum() + 1e-5)

    dice = Implementation(parse_ref("dice=x.py:smooth_dice"), smooth_dice)
    spec = parse_spec("pred: B unit grad; target: B binary; B=1..8")
    denormal = Case({"pred": torch.tensor([1e-45, 0.5, 1.0]), "target": torch.tensor([1.0, 0.0, 1.0])}, {"B": 3})
    assert self_consistency(dice, spec, denormal).consistent is True


def test_a_kink_gives_no_verdict_and_says_so():
    spec = parse_spec("input: B real grad; target: B real; B=1..8")
    on_kink = Case({"input": torch.tensor([1.0, 2.0]), "target": torch.tensor([1.0, 2.0])}, {"B": 2})
    sc = self_consistency(load_implementation("torch.nn.functional:l1_loss"), spec, on_kink)
    assert sc.consistent is None and sc.kink and "non-differentiable point" in sc.note and "one-sided slopes" in sc.note

    # A custom |x| whose backward forgets sign(x): at x = 0 its slope 1 is a valid subgradient, and the
    # explanation says so instead of blaming either side.
    class NoSign(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.abs()

        @staticmethod
        def backward(ctx, grad):
            return grad

    spec = parse_spec("x: B real grad; B=1..8")
    mine = Implementation(parse_ref("mine=x.py:f"), lambda x: NoSign.apply(x).sum())
    ref = Implementation(parse_ref("torch_abs=x.py:g"), lambda x: x.abs().sum())
    ex = explain(ref, mine, spec, Case({"x": torch.zeros(1)}, {"B": 1}), "gradient", F32, impact_steps=0)
    assert ex.self_consistency["mine"].consistent is None and ex.self_consistency["mine"].kink
    assert "torch_abs and mine are at a non-differentiable point here" in ex.sentence()
    elsewhere = explain(ref, mine, spec, Case({"x": torch.tensor([-1.0])}, {"B": 1}), "gradient", F32, impact_steps=0)
    assert elsewhere.self_consistency["mine"].consistent is False  # at x = -1 the missing sign is a wrong gradient


def _ntxent(x, y, t=0.1):
    """SimCLR's NT-Xent, written by hand: rows normalised by x / x.norm()."""
    z = torch.cat([x, y])
    z = z / z.norm(dim=1, keepdim=True)
    sim = (z @ z.T / t).masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))
    n = len(x)
    return torch.nn.functional.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]))


def test_a_tiny_row_under_x_over_its_norm_is_no_kink():
    # Rows of norm ~1e-8 are smooth points of x / ||x||, but a step at the tensor's scale
    # (5e-7) jumps across them: this read "at a non-differentiable point (one-sided slopes
    # -5.56619e+06 and 195703)" and "inconsistent" (0.374).  Finer steps settle the slopes.
    spec = parse_spec("x: N D real grad; y: N D real grad; N=2..16; D=2..8")
    nt = Implementation(parse_ref("nt=x.py:f"), _ntxent)
    case = Case({"x": torch.tensor([[1e-8, 1e-8], [0.0, -1.0]]), "y": torch.tensor([[3e-9, 2e-8], [-1.0, 0.0]])}, {"N": 2, "D": 2})
    sc = self_consistency(nt, spec, case)
    assert not sc.kink and "non-differentiable" not in sc.note, sc
    assert sc.consistent is True and sc.checks == 8, sc
    # Rows of norm ~1e-16 are smooth too, but no float64 step is fine enough to show it: no
    # verdict, and the reason, never "non-differentiable".
    finer = Case({"x": torch.tensor([[1e-16, 1e-16], [0.0, -1.0]]), "y": torch.tensor([[3e-17, 2e-16], [-1.0, 0.0]])},
                 {"N": 2, "D": 2})
    sc = self_consistency(nt, spec, finer)
    assert not sc.kink and "non-differentiable" not in sc.note, sc
    assert "the steps cannot resolve the slope at this scale" in sc.note, sc
    assert sc.consistent is not False, sc


# --- the relation agrees with the verdict ------------------------------------------------------

def test_relation_never_counts_as_equal_what_the_verdict_calls_a_value_divergence(tmp_path):
    code, report = audit_json(tmp_path, f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits", "--seed", "1")
    value_cases = sum(d["cases"] for d in report["divergences"] if d["kind"] == "value")
    rel = report["divergences"][0]["relation"]
    assert rel["value"] == "equal" and rel["equal_within"] == [pytest.approx(1.3e-6), pytest.approx(1e-5)]
    assert rel["value_fits"] <= report["cases_run"] - value_cases


DICE = FIXTURES / "dice.py"


def test_relation_counts_gradients_equal_as_the_verdict_judges_them(tmp_path, capsys):
    """Smoothing in numerator and denominator vs eps below only: on an empty mask one side's
    gradient is exactly 0 and the other's about 1e-7, far within the verdict's tolerance but
    at cosine 0.  Judged by cosine, the relation said "gradients equal on 58 / 100" while the
    verdict found 67 cases agreeing in everything, gradients included."""
    code, report = audit_json(tmp_path, f"{DICE}:dice_smooth", f"{DICE}:dice_eps_below", "--spec", "segmentation",
                              "--regimes", "constant,extreme,standard", "--no-minimize", "-v")
    out = capsys.readouterr().out
    rel = report["divergences"][0]["relation"]
    agreeing = report["tally"]["agree"]  # cases where the verdict saw values and gradients within tolerance
    assert code == 1 and agreeing > 0 and rel["gradient"] == "equal", rel
    assert agreeing <= rel["gradient_fits"] <= rel["gradient_cases"], (agreeing, rel)
    assert rel["gradient_equal_by"] == "verdict", rel
    line = f"gradients equal on {rel['gradient_fits']} / {rel['gradient_cases']} cases (equal: within the verdict's tolerance)"
    assert line in " ".join(out.split()), out


def test_an_observation_carries_the_verdicts_judgement_of_the_gradients():
    from losscmp.compare import compare_outcomes
    from losscmp.explain import observe, relation
    from losscmp.explain.relation import COSINE_EQUAL
    from losscmp.model import Pair
    from losscmp.run import call
    from losscmp.spec import preset

    smooth, below = load_implementation(f"{DICE}:dice_smooth"), load_implementation(f"{DICE}:dice_eps_below")
    spec = preset("segmentation")
    gen = torch.Generator().manual_seed(0)
    observations = []
    for _ in range(5):  # empty masks, predictions away from 0: the two agree within float32's tolerance
        case = Case({"input": torch.rand(1, 1, 4, 4, generator=gen) * 0.6 + 0.2, "target": torch.zeros(1, 1, 4, 4)},
                    {"B": 1, "C": 1, "H": 4, "W": 4})
        e, a = call(smooth.fn, spec, case), call(below.fn, spec, case)
        verdict = compare_outcomes(Pair("smooth", "below"), e, a, F32)
        o = observe(e, a, "standard", verdict)
        assert verdict.agrees and o is not None and o.cosine is not None and o.cosine < COSINE_EQUAL, (verdict.detail, o)
        assert o.values_agree is True and o.gradients_agree is True
        observations.append(o)
    rel = relation(observations, tol=F32)
    assert (rel.gradient, rel.gradient_fits, rel.gradient_cases, rel.gradient_equal_by) == ("equal", 5, 5, "verdict"), rel
    # Without the verdict (a caller that has none), the cosine criterion still applies, and says so.
    bare = relation([replace(o, values_agree=None, gradients_agree=None) for o in observations], tol=F32)
    assert bare.gradient != "equal" and bare.gradient_equal_by == "cosine", bare


def test_gaussian_nll_and_normal_log_prob_are_a_constant_offset_apart(tmp_path):
    code, report = audit_json(tmp_path, f"{TRUTH}:gaussian_nll", f"{TRUTH}:normal_nll",
                              "--spec", "input: B real grad; target: B real; var: B positive grad; B=1..8")
    rel = report["divergences"][0]["relation"]
    assert code == 1 and rel["value"] == "offset", rel
    assert rel["offset"] == pytest.approx(0.5 * math.log(2 * math.pi), rel=1e-4)  # the ½·log 2π GaussianNLLLoss omits


# --- the unstable side of an overflow ------------------------------------------------------------

def test_poisson_inf_is_the_correct_overflow_and_the_distributions_nan_the_broken_side(tmp_path):
    code, report = audit_json(tmp_path, f"{TRUTH}:poisson_nll", f"{TRUTH}:poisson_log_prob",
                              "--spec", "input: B real grad; target: B binary; B=1..8")
    (d,) = [d for d in report["divergences"] if d["kind"] == "nonfinite"]
    assert code == 1 and d["category"] == "numerical", d["explanation"]
    assert d["unstable_side"] == "poisson_log_prob"
    # Past z = 88.72 exp overflows (PoissonNLLLoss' inf is then correct); below z = -103.97 it
    # underflows to 0 and the distribution's t·log(0) is -inf.  Either way the onset is exact.
    onset = d["explanation"]["nonfinite_onset"]
    known = {88.7228: "88.72 = ln(FLT_MAX)", 103.972: "103.97 = -ln(2^-150)"}
    threshold = min(known, key=lambda k: abs(k - onset))
    assert onset == pytest.approx(threshold, rel=1e-5)
    assert any(note.startswith(known[threshold]) for note in d["notes"]), d["notes"]
    # On the overflow side of the same pair, explained directly: the 88.72 note and the rounded inf.
    spec = parse_spec("input: B real grad; target: B binary; B=1..8")
    ex = explain(truth("poisson_nll"), truth("poisson_log_prob"), spec,
                 Case({"input": torch.tensor([89.0]), "target": torch.tensor([1.0])}, {"B": 1}), "nonfinite", F32)
    assert ex.unstable_side == "poisson_log_prob" and ex.rounded == ("poisson_nll",)
    assert ex.onset == pytest.approx(88.7228, rel=1e-5) and any(n.startswith("88.72 = ln(FLT_MAX)") for n in ex.notes)


# --- the budget follows the cost of a call ------------------------------------------------------

def test_a_slow_pair_gets_a_larger_stated_budget_and_both_sides_descend():
    official, fork = slow_pair(0.02)
    spec = parse_spec("input: B real grad; target: B real; B=1..8")
    case = Case({"input": torch.tensor([0.5, -1.0, 2.0]), "target": torch.tensor([0.0, 0.5, 1.0])}, {"B": 3})
    ex = explain(official, fork, spec, case, "value", F32, budget=Budget(seconds=0.5))
    assert ex.category is Category.SEMANTIC
    assert "time budget raised from 0.5 s" in ex.budget_note and "a call takes" in ex.budget_note
    assert ex.impact is not None and "stopped after 0 step" not in ex.impact.note, ex.impact.note
    assert ex.impact.steps >= 1
    assert any(line.startswith("budget: time budget raised") for line in ex.evidence())


def test_an_isolated_side_is_not_traced_and_the_reason_says_so(tmp_path):
    # The origin is found by running the side in this process; under --isolate that is not
    # done (the side may crash), and "float64 overflows too" would be untrue: it says why.
    code, report = audit_json(tmp_path, f"{TRUTH}:norm", f"{TRUTH}:norm_sqrt", "--spec", "x: B real grad; B=1..8",
                              "--isolate", "--examples", "20")
    found = [d for d in report["divergences"] if d["kind"] == "nonfinite"]
    assert code == 1 and any(d["category"] == "unknown" for d in found), [d["explanation"]["reason"] for d in found]  # x = 0 is drawn
    for d in found:
        if d["category"] == "unknown":
            reason = d["explanation"]["reason"]
            assert "not traced" in reason and "overflows" not in reason, reason
        else:  # x ~ 1e-23: x² underflows in float32 only, which float64 resolves
            assert d["category"] == "numerical" and d["unstable_side"] == "norm_sqrt"


def test_a_self_consistency_error_of_zero_reads_as_inside_the_range_not_as_exact(capsys):
    """The error is how far autograd lies outside the two one-sided difference quotients:
    "greatest relative error 0" read as exact agreement where it only meant "inside"."""
    bce = FIXTURES / "bce.py"
    assert main([f"{bce}:bce_on_sigmoid", f"{bce}:bce_with_logits", "--no-save", "-v"]) == 1
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.split("self-consistency of ")[1:]]
    assert any(line.startswith("bce_with_logits: consistent;") and "lies within the range of the one-sided difference quotients" in line
               for line in lines), lines
    assert any(line.startswith("bce_on_sigmoid: INCONSISTENT;") and "outside the range of the one-sided difference quotients by up to"
               in line for line in lines), lines
    assert not any("relative error 0" in line for line in lines), lines
