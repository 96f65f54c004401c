"""The explain stage on real pairs: float64 oracle, self-consistency, relation, impact, signatures."""
import itertools
import json
import math

import pytest
import torch

from losscmp.audit import Settings, audit
from losscmp.compare import Tolerance, compare_outcomes
from losscmp.explain import (
    SIGNATURES,
    IMPACT_STEPS,
    Budget,
    Category,
    KnownValue,
    Observation,
    explain,
    impact,
    in_float64,
    observe,
    oracle,
    relation,
    self_consistency,
    signatures,
)
from losscmp.findings import Pair
from losscmp.generate import REGIMES, Case, Recipe, build_case
from losscmp.load import Implementation, load_implementation, parse_ref
from losscmp.run import call
from losscmp.spec import parse_spec, preset

from .conftest import FIXTURES

F32 = Tolerance.for_dtype(torch.float32)
REGRESSION = preset("regression")


def impl(ref: str) -> Implementation:
    return load_implementation(ref if ref.startswith("torch.") else f"{FIXTURES}/{ref}")


def regime_cases(spec, n=32):
    """Cases across every regime, as the audit's search draws them (deterministic)."""
    magnitudes = {"tiny": 1e-5, "huge": 1e5, "extreme": 100.0}
    for i, regime in zip(range(n), itertools.cycle(REGIMES)):
        recipe = Recipe(
            sizes=tuple((d, 1 + (7 * i) % 16) for d in spec.dims),
            regime=regime,
            magnitude=magnitudes.get(regime, 1.0),
            offset=1e4 if regime == "offset" else 0.0,
            seed=i,
        )
        yield build_case(spec, recipe)


def history(expected, actual, spec, n=32):
    """The observations the audit records for a pair: one per compared case."""
    return [observe(call(expected.fn, spec, c), call(actual.fn, spec, c), c.recipe.regime) for c in regime_cases(spec, n)]


def audited(a, b, spec):
    ea, eb = impl(a), impl(b)
    result = audit([ea, eb], preset(spec), Settings())
    return ea, eb, result


# --- the float64 oracle on the bundled pairs ------------------------------------------------

def test_bce_value_finding_is_numerical_with_the_sigmoid_side_unstable_and_the_clamp_note(bce_audit):
    logits, sigmoid, result = bce_audit
    d = next(d for d in result.divergences if d.kind == "value")
    # The minimised case sits just past the threshold (sigmoid(8) is not yet 1.0 in
    # float32); the finding's worst case shows the clamp's telltale 100.
    ex = explain(logits, sigmoid, result.spec, d.minimized.case, d.kind, result.settings.tolerance,
                 history(logits, sigmoid, result.spec), also=(d.case, d.representative))
    assert ex.category is Category.NUMERICAL, ex.reason
    assert ex.unstable_side == "bce_on_sigmoid"
    assert ex.drift["bce_on_sigmoid"] > 1 > ex.drift["bce_with_logits"]
    assert any(n.startswith("100 = torch's BCELoss clamp") for n in ex.notes), ex.notes
    sentence = ex.sentence()
    assert sentence.startswith("numerical:") and "bce_on_sigmoid drifts" in sentence
    data = json.loads(json.dumps(ex.to_json()))
    assert {"category", "unstable_side", "self_consistency", "relation", "location", "location_note", "impact", "notes"} <= set(data)
    assert data["category"] == "numerical" and data["unstable_side"] == "bce_on_sigmoid"
    assert data["self_consistency"]["bce_with_logits"]["consistent"] is True
    plain = explain(logits, sigmoid, result.spec, d.minimized.case, d.kind, result.settings.tolerance)
    assert plain.evaluations < ex.evaluations  # the extra cases of also= were run too


def test_a_case_beyond_float64_range_still_comes_out_numerical():
    # sigmoid(3000) is 1.0 in float64 too; the oracle walks the scale down until float64 agrees.
    logits, sigmoid = impl("bce.py:bce_with_logits"), impl("bce.py:bce_on_sigmoid")
    case = Case({"input": torch.tensor([3000.0]), "target": torch.tensor([0.0])}, {"B": 1})
    o = oracle(logits, sigmoid, preset("binary"), case, F32)
    assert o.category is Category.NUMERICAL and o.unstable_side == "bce_on_sigmoid"
    assert o.scale < 1 and "beyond float64's range" in o.reason


def test_bce_gradient_finding_names_bceloss_backward_clamp_by_self_consistency(bce_audit):
    # BCELoss' backward divides by max(p(1-p), 1e-12): for p = sigmoid(-70) its gradient is
    # ~1e-19 while its value still moves with slope ~1 — true in float64 as well.
    logits, sigmoid, result = bce_audit
    d = next(d for d in result.divergences if d.kind == "gradient")
    ex = explain(logits, sigmoid, result.spec, d.minimized.case, d.kind, result.settings.tolerance)
    assert ex.category is Category.SEMANTIC
    assert ex.self_consistency["bce_on_sigmoid"].consistent is False
    assert ex.self_consistency["bce_with_logits"].consistent is True
    assert "bce_on_sigmoid's gradient is not the derivative of its own value" in ex.sentence()
    # The headline blames neither side: the order of the pair is the user's, not a verdict
    # (the CLI's order put "bce_with_logits's gradient differs" first, on the right side).
    assert ex.sentence().startswith("semantic: the gradients of bce_with_logits and bce_on_sigmoid differ")


def test_log_of_softmax_is_numerical():
    nll, naive, result = audited("cross_entropy.py:log_softmax_nll", "cross_entropy.py:log_of_softmax", "classification")
    d = next(d for d in result.divergences if d.kind == "nonfinite")
    ex = explain(nll, naive, result.spec, d.minimized.case, d.kind, result.settings.tolerance)
    assert ex.category is Category.NUMERICAL, ex.reason
    assert ex.unstable_side == "log_of_softmax"


def test_huber_vs_smooth_l1_is_semantic_with_parallel_gradients_and_factor_one_half():
    huber, smooth = impl("regression.py:huber"), impl("regression.py:smooth_l1")
    result = audit([huber, smooth], REGRESSION, Settings.of(minimize=False, examples=20))
    d = next(d for d in result.divergences if d.kind == "value")
    ex = explain(huber, smooth, REGRESSION, d.case, d.kind, F32, history(huber, smooth, REGRESSION))
    assert ex.category is Category.SEMANTIC, ex.reason
    r = ex.relation
    assert (r.value, r.gradient) == ("factor", "parallel")
    # factor = actual / expected: SmoothL1(beta=2) = HuberLoss(delta=2) / 2.
    assert r.factor == pytest.approx(0.5, rel=1e-4)
    assert "smooth_l1 ≈ 0.5 × huber" in ex.sentence() and "gradients parallel" in ex.sentence()
    # Semantic with a gradient: the impact probe runs by default; parallel gradients lead to the same place.
    assert ex.impact is not None and ex.impact.apart < 1e-3
    assert ex.impact.cross_improvement["smooth_l1"] == pytest.approx(1.0, rel=1e-3)
    reverse = relation(history(smooth, huber, REGRESSION))
    assert reverse.factor == pytest.approx(2.0, rel=1e-4)


def test_oracle_says_unknown_instead_of_guessing():
    mse = impl("torch.nn.functional:mse_loss")
    case = build_case(REGRESSION, Recipe(sizes=(("B", 4),)))

    def in_float32(input, target):  # a different loss, and computed in float32 whatever it is given
        return 1.5 * torch.nn.functional.mse_loss(input.float(), target.float())

    lowered = Implementation(parse_ref("lowered=x.py:f"), in_float32)
    o = oracle(mse, lowered, REGRESSION, case, F32)
    assert o.category is Category.UNKNOWN and "float32 for float64 inputs" in o.reason

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.tensor(1.5)  # a plain attribute: .double() never converts it

        def forward(self, input, target):
            return self.scale * torch.nn.functional.mse_loss(input, target)

    module = Implementation(parse_ref("scaled=x.py:Scaled"), Scaled())
    o = oracle(mse, module, REGRESSION, case, F32)
    assert o.category is Category.UNKNOWN and "scale (torch.float32, a plain attribute)" in o.reason
    assert module.fn.scale.dtype == torch.float32  # the user's module is left alone
    in64 = build_case(REGRESSION, Recipe(sizes=(("B", 4),)), dtype=torch.float64)
    assert oracle(mse, module, REGRESSION, in64, F32).category is Category.UNKNOWN


def test_oracle_is_unknown_when_float64_overflows_too():
    # Probabilities are not rescaled, so there is no milder case to fall back on.
    spec = parse_spec("p: B unit grad; B=1..4")
    stable = Implementation(parse_ref("stable=x.py:f"), lambda p: torch.logsumexp(1000 * p, 0))
    naive = Implementation(parse_ref("naive=x.py:g"), lambda p: torch.log(torch.exp(1000 * p).sum()))
    o = oracle(stable, naive, spec, Case({"p": torch.tensor([0.9, 0.8])}, {"B": 2}), F32)
    assert o.category is Category.UNKNOWN and "float64 overflows too" in o.reason
    o = oracle(stable, naive, spec, Case({"p": torch.tensor([0.2, 0.1])}, {"B": 2}), F32)  # exp(200): float32 only
    assert o.category is Category.NUMERICAL and o.unstable_side == "naive"


def test_modules_run_in_float64_as_a_moved_copy():
    weighted = Implementation(parse_ref("weighted=x.py:W"), torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0])))
    doubled, problem = in_float64(weighted)
    assert problem is None and doubled.fn.pos_weight.dtype == torch.float64
    assert weighted.fn.pos_weight.dtype == torch.float32  # the user's module is left alone
    plain = impl("bce.py:bce_with_logits")
    case = Case({"input": torch.tensor([2.0]), "target": torch.tensor([1.0])}, {"B": 1})
    o = oracle(plain, weighted, preset("binary"), case, F32)
    assert o.category is Category.SEMANTIC, o.reason


def test_failed_call_kinds_keep_their_own_category_and_cost_nothing():
    mse, crash = impl("misbehaving.py:mse"), impl("misbehaving.py:segfaults_on_negative_mean")
    case = build_case(REGRESSION, Recipe(sizes=(("B", 3),)))
    for kind in ("crash", "timeout", "exception"):
        ex = explain(mse, crash, REGRESSION, case, kind, F32)
        assert ex.category.value == kind and ex.evaluations == 0
        assert ex.sentence().startswith(f"{kind}:")


# --- self-consistency ---------------------------------------------------------------------

SMALL = Case({"input": torch.tensor([0.3, -1.2, 2.0, 0.7]), "target": torch.tensor([0.1, 0.5, -0.4, 1.1])}, {"B": 4})


@pytest.mark.parametrize("size", [4, 300])
@pytest.mark.parametrize("name, consistent", [
    ("mse", True), ("mse_stray_detach", False), ("mse_wrong_backward", False), ("mse_frozen_gradient", False),
])
def test_self_consistency_names_wrong_gradients(name, consistent, size):
    case = SMALL if size == 4 else build_case(REGRESSION, Recipe(sizes=(("B", size),), seed=3))
    sc = self_consistency(impl(f"wrong_backward.py:{name}"), REGRESSION, case)
    assert sc.mode == ("all elements" if size == 4 else "4 random directions")
    assert sc.consistent is consistent, sc
    assert (sc.max_error > 0.1) is (not consistent)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("batch", [3, 30])
def test_self_consistency_on_non_contiguous_inputs(layout, batch):
    spec = preset("classification")
    case = build_case(spec, Recipe(sizes=(("B", batch), ("C", 4)), layout=layout, seed=2))
    assert not case.tensors["input"].is_contiguous()
    sc = self_consistency(impl("torch.nn.functional:cross_entropy"), spec, case)
    assert sc.consistent is True and sc.checks == (12 if batch == 3 else 4)


@pytest.mark.parametrize("bad", ["mse_stray_detach", "mse_wrong_backward"])
def test_explain_names_the_inconsistent_side(bad):
    good, wrong = impl("wrong_backward.py:mse"), impl(f"wrong_backward.py:{bad}")
    assert compare_outcomes(Pair("a", "b"), call(good.fn, REGRESSION, SMALL), call(wrong.fn, REGRESSION, SMALL), F32).kind == "gradient"
    ex = explain(good, wrong, REGRESSION, SMALL, "gradient", F32, history(good, wrong, REGRESSION, 12))
    assert ex.self_consistency["mse"].consistent is True
    assert ex.self_consistency[bad].consistent is False
    assert f"{bad}'s gradient is not the derivative of its own value" in ex.sentence()
    assert ex.to_json()["self_consistency"][bad]["consistent"] is False


@pytest.mark.parametrize("ref", ["torch.nn.functional:l1_loss", "torch.nn.functional:smooth_l1_loss",
                                 "torch.nn.functional:huber_loss", "objectives.py:l1", "objectives.py:hinge"])
def test_kinks_are_not_false_alarms(ref):
    # Exact ties (|x - t| = 0, on the kink) and the Huber/SmoothL1 switch point |x - t| = 1.
    tied = Case({"input": torch.tensor([0.0, 1.0, 2.0, -3.0, 0.5]), "target": torch.tensor([0.0, 1.0, 1.0, -3.0, -0.5])}, {"B": 5})
    for case in [tied, *regime_cases(REGRESSION, 16)]:
        sc = self_consistency(impl(ref), REGRESSION, case)
        assert sc.consistent is not False, (case.describe(), sc)


# --- the relation ----------------------------------------------------------------------------

def obs(pairs, cos=1.0, ratio=1.0, regime="standard"):
    return [Observation(e, a, cos, ratio, regime) for e, a in pairs]


def test_relation_fits_offset_factor_equal_and_tolerates_outliers():
    es = [0.5, 1.0, 2.0, 3.5, 7.0, 11.0]
    assert relation(obs([(e, e + 0.25) for e in es])).value == "offset"
    assert relation(obs([(e, e + 0.25) for e in es])).offset == pytest.approx(0.25)
    r = relation(obs([(e, 3 * e) for e in es], ratio=3.0))
    assert (r.value, r.gradient, r.factor) == ("factor", "parallel", pytest.approx(3.0))
    unstable = obs([(1.0, 100.0), (2.0, -5.0)], cos=0.2, ratio=7.0, regime="extreme")
    r = relation(obs([(e, e) for e in es]) + unstable)
    assert (r.value, r.gradient) == ("equal", "equal") and r.value_fits == 6 and r.outliers == (("extreme", 2),)
    assert relation(obs([(e, e * e + 1) for e in es], cos=0.1)).value == "other"
    assert relation(obs([(e, e * e + 1) for e in es], cos=0.1)).gradient == "other"
    assert relation(obs([(1.0, 2.0), (2.0, 4.0)])).value == "unknown"  # two cases fix nothing
    assert relation([None, None]).cases == 0


def test_observe_is_none_for_failed_or_nonfinite_calls_and_sees_detached_gradients():
    good, naive = impl("cross_entropy.py:log_softmax_nll"), impl("cross_entropy.py:log_of_softmax")
    spec = preset("classification")
    big = Case({"input": torch.tensor([[0.0, 1e4]]), "target": torch.tensor([0])}, {"B": 1, "C": 2})
    assert observe(call(good.fn, spec, big), call(naive.fn, spec, big)) is None
    mse, frozen = impl("wrong_backward.py:mse"), impl("wrong_backward.py:mse_frozen_gradient")
    o = observe(call(mse.fn, REGRESSION, SMALL), call(frozen.fn, REGRESSION, SMALL), "standard")
    # A gradient that is exactly zero on one side has no direction: seen, and left out of the
    # cosine (it used to count as cosine 0, "pointing elsewhere"; issue 15, POT's Sinkhorn).
    assert o.expected == pytest.approx(o.actual) and o.cosine is None and o.zero_gradient == "actual"


# --- training impact -------------------------------------------------------------------------

def test_impact_shows_a_fork_that_does_not_descend_the_official_loss():
    mse, flipped, l1 = impl("objectives.py:mse"), impl("objectives.py:mse_flipped_target"), impl("objectives.py:l1")
    case = build_case(REGRESSION, Recipe(sizes=(("B", 6),), seed=1))
    im = impact(mse, flipped, REGRESSION, case)
    assert im.steps == IMPACT_STEPS and im.cross_improvement["mse_flipped_target"] < 0 and im.apart > 0.5
    assert json.loads(json.dumps(im.to_json()))["cross_improvement"]["mse"] < 0
    im = impact(mse, l1, REGRESSION, case)
    assert 0 < im.cross_improvement["l1"] and im.apart > 0.05  # same minimiser, another path
    ex = explain(mse, flipped, REGRESSION, case, "value", F32, history(mse, flipped, REGRESSION, 12))
    assert ex.category is Category.SEMANTIC and ex.impact is not None
    assert "descent under mse_flipped_target does not descend mse's loss" in ex.sentence()
    assert "gradients point elsewhere" in ex.sentence()


def test_impact_says_why_a_ratio_is_missing_instead_of_printing_nan():
    # The README's first-version BCE: right values, zero gradient at z = 0, so its own
    # descent makes no progress and the other side's cross-improvement has no ratio.
    def first_version(input, target):
        return (input.clamp(min=0) - input * target + torch.log(1 + torch.exp(-input.abs()))).mean()

    mine = Implementation(parse_ref("t:first_version"), fn=first_version)
    torch_bce = impl("torch.nn.functional:binary_cross_entropy_with_logits")
    case = Case({"input": torch.tensor([0.0]), "target": torch.tensor([1.0])}, {"B": 1})
    ex = explain(mine, torch_bce, preset("binary"), case, "gradient", F32)
    assert math.isnan(ex.impact.cross_improvement["binary_cross_entropy_with_logits"])
    (line,) = [text for text in ex.evidence() if text.startswith("training impact")]
    assert "nan" not in line
    assert "descending binary_cross_entropy_with_logits: not measurable (the other's own descent made no progress)" in line


def test_impact_is_off_for_numerical_unless_asked(bce_audit):
    logits, sigmoid, result = bce_audit
    d = next(d for d in result.divergences if d.kind == "value")
    assert explain(logits, sigmoid, result.spec, d.minimized.case, d.kind, F32).impact is None
    assert explain(logits, sigmoid, result.spec, d.minimized.case, d.kind, F32, impact_steps=2).impact.steps <= 2


# --- signatures, grouping, budget, plumbing ------------------------------------------------------

def test_known_signatures():
    notes = signatures([100.0])
    assert len(notes) == 1 and "BCELoss" in notes[0]
    assert signatures([-100.0]) == notes  # a loss and its negative log-likelihood alike
    assert "softmax probability underflowed" in signatures([87.3365])[0]
    assert "sigmoid stuck at 0.5" in signatures([0.693147])[0]
    assert "float32 exp overflows" in signatures([88.7228])[0]
    assert "smooth=1e-5" in signatures([1e5])[0]
    assert signatures([100.5, 0.69, 50.0, math.nan, math.inf]) == []
    assert signatures([100.0, 100.0, 1e5]) == [notes[0], signatures([1e5])[0]]
    mine = (*SIGNATURES, KnownValue(42.0, "42 = my own clamp"))
    assert signatures([42.0], mine) == ["42 = my own clamp"]


def test_signature_separates_distinct_causes_of_one_pair():
    mse, fork = impl("two_causes.py:mse"), impl("two_causes.py:mse_fork")
    spec = REGRESSION
    cancellation = [Case({"input": torch.tensor([1e4 + d]), "target": torch.tensor([1e4 - 0.3])}, {"B": 1}) for d in (0.5, 0.7)]
    capped = [Case({"input": torch.tensor([v]), "target": torch.tensor([1.0])}, {"B": 1}) for v in (5e3, -2e4)]
    sigs = {}
    for name, cases in (("cancellation", cancellation), ("capped", capped)):
        exs = [explain(mse, fork, spec, c, "value", F32, impact_steps=0) for c in cases]
        assert exs[0].signature() == exs[1].signature()
        sigs[name] = exs[0]
    assert sigs["cancellation"].category is Category.NUMERICAL and sigs["cancellation"].unstable_side == "mse_fork"
    assert sigs["capped"].category is Category.SEMANTIC
    assert sigs["cancellation"].signature() != sigs["capped"].signature()
    hash(sigs["capped"].signature())


def test_runner_is_pluggable_and_costs_are_counted_within_budget():
    calls = []

    def counting(impl_, spec, case):
        calls.append(impl_.label)
        return call(impl_.fn, spec, case)

    huber, smooth = impl("regression.py:huber"), impl("regression.py:smooth_l1")
    ex = explain(huber, smooth, REGRESSION, SMALL, "value", F32, run=counting)
    assert ex.evaluations == len(calls) > 0 and set(calls) == {"huber", "smooth_l1"}
    assert sum(n for n, _ in ex.costs.values()) == ex.evaluations and ex.seconds > 0
    tight = explain(huber, smooth, REGRESSION, SMALL, "value", F32, budget=Budget(calls=3))
    assert tight.skipped and all("budget of 3 calls" in s for s in tight.skipped)
    assert tight.impact is None and tight.evaluations < ex.evaluations
    hurried = oracle(huber, smooth, REGRESSION, SMALL, F32, deadline=0.0)  # long past
    assert hurried.category is Category.SEMANTIC and "cut short by the time budget" in hurried.reason
    assert hurried.evaluations == 4  # the case itself, in both dtypes, and no further


def test_location_from_a_trace_is_carried_into_sentence_json_and_signature():
    class Localisation:  # the shape trace.locate returns
        note = None
        location = {"smooth_l1": {"file": "fork/utils.py", "line": 94, "code": "loss = 0.5 * e * e / beta", "op": "aten::div"}}

        def to_json(self):
            return {"location": self.location, "location_note": self.note}

    huber, smooth = impl("regression.py:huber"), impl("regression.py:smooth_l1")
    ex = explain(huber, smooth, REGRESSION, SMALL, "value", F32, impact_steps=0, locate=lambda *a, **k: Localisation())
    assert "first differing op at fork/utils.py:94" in ex.sentence()
    assert ex.to_json()["location"]["smooth_l1"]["line"] == 94
    assert ("smooth_l1", "fork/utils.py", 94) in ex.signature()[2]


def test_explain_with_the_real_trace_names_the_changed_line_of_a_fork():
    from losscmp.trace import locate

    forks = FIXTURES / "forks"
    base = load_implementation(f"base={forks}/sinkhorn_base.py:sinkhorn_divergence")
    fork = load_implementation(f"fork={forks}/fork_sum.py:sinkhorn_divergence")
    changed = next(i for i, text in enumerate((forks / "fork_sum.py").read_text().splitlines(), 1) if "FORK:" in text)
    spec = parse_spec("x: N D real grad; y: M D real grad; N=2..6; M=2..6; D=2")
    case = build_case(spec, Recipe(sizes=(("N", 3), ("D", 2), ("M", 4)), seed=5))
    ex = explain(base, fork, spec, case, "value", F32, impact_steps=0, locate=locate)
    assert ex.category is Category.SEMANTIC, ex.reason
    site = ex.to_json()["location"]["fork"]
    assert site["file"].endswith("fork_sum.py") and site["line"] == changed
    assert f"fork_sum.py:{changed}" in ex.sentence()
    assert ("fork", site["file"], changed) in ex.signature()[2]
    assert "trace" in ex.costs


def test_a_known_number_both_sides_share_is_no_note():
    # Seen on torch's label smoothing vs a hand-written one: a gradient finding at equal
    # logits, both values ln 2 (the uniform two-class softmax, correct on both sides), was
    # headed "0.6931 = ln 2: a sigmoid stuck at 0.5".  Only values that differ are read.
    ours, theirs = impl("label_smoothing.py:torch_smoothing"), impl("label_smoothing.py:smoothing_over_other_classes")
    spec = preset("classification")
    tie = Case({"input": torch.tensor([[0.0, 0.0]]), "target": torch.tensor([0])}, {"B": 1, "C": 2})
    ex = explain(ours, theirs, spec, tie, "gradient", F32)
    assert ex.category is Category.SEMANTIC
    assert not any("ln 2" in n for n in ex.notes), ex.notes
    # A value that differs still fingerprints: BCELoss's clamp at 100 on one side only.
    logits, sigmoid = impl("bce.py:bce_with_logits"), impl("bce.py:bce_on_sigmoid")
    clamp = Case({"input": torch.tensor([200.0]), "target": torch.tensor([0.0])}, {"B": 1})
    assert any(n.startswith("100 = ") for n in explain(logits, sigmoid, preset("binary"), clamp, "value", F32).notes)


def test_an_uninitialised_allocation_is_not_where_a_nonfinite_value_comes_from():
    # torchmetrics' PSNR on identical (transposed) images was classified "unknown: another
    # operation (aten.empty_strided)": fresh memory that happened to hold an inf.  With
    # torch's deterministic mode every such allocation is NaN-filled, so this is exact.
    from losscmp.explain import Cause, nonfinite_origin

    spec = parse_spec("x: B real grad; B=1..8")
    scratch, guarded = impl("scratch.py:log_into_scratch"), impl("scratch.py:log_guarded")
    case = Case({"x": torch.tensor([0.0, 2.0])}, {"B": 2})
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        origin = nonfinite_origin(scratch, spec, case)
        o = oracle(guarded, scratch, spec, case, F32)
    finally:
        torch.use_deterministic_algorithms(before)
    assert origin is not None and origin.cause is Cause.LOG_ZERO, origin
    assert origin.file.endswith("scratch.py") and origin.line == 14
    assert o.category is Category.SEMANTIC, o.reason


def test_gradients_opposite_on_some_cases_are_never_called_same_minimisers():
    # torch's label smoothing (q = 0.95 / 0.05 at C = 2) vs eps over the other classes only
    # (0.9 / 0.1): with two classes every gradient lies on one line, so most cases read
    # "parallel", but between p = 0.9 and 0.95 they point opposite ways.  "Same minimisers"
    # was printed in the headline; the minimisers are p* = 0.95 and 0.9.
    ours, theirs = impl("label_smoothing.py:torch_smoothing"), impl("label_smoothing.py:smoothing_over_other_classes")
    spec = parse_spec("input: B C logits grad; target: B labels(C); B=1..1; C=2..2")
    cases = [Case({"input": torch.tensor([[z, 0.0]]), "target": torch.tensor([0])}, {"B": 1, "C": 2})
             for z in (-3.0, -1.0, 0.5, 1.0, 2.0, -2.0, 0.0, 1.5, 2.5, 2.7)]  # sigmoid(2.5), sigmoid(2.7) in (0.9, 0.95)
    rel = relation(observe(call(ours.fn, spec, c), call(theirs.fn, spec, c)) for c in cases)
    assert rel.gradient == "parallel" and rel.opposite >= 1, rel
    assert not rel.same_minimisers and "same minimisers" not in rel.describe(("ours", "theirs"))
    ex = explain(ours, theirs, spec, cases[3], "value", F32, [observe(call(ours.fn, spec, c), call(theirs.fn, spec, c)) for c in cases])
    assert "same minimisers" not in ex.sentence() and "different minimisers" in ex.sentence()
    # Huber vs SmoothL1 (a factor beta): parallel everywhere, same minimisers.
    huber, smooth = impl("regression.py:huber"), impl("regression.py:smooth_l1")
    rel = relation(history(huber, smooth, REGRESSION))
    assert rel.same_minimisers and rel.opposite == 0


def test_a_smooth_minimum_is_not_a_non_differentiable_point():
    # gaussian_nll_loss at input = target (a smooth minimum of (x - t)²): the one-sided
    # slopes ±h·f'' at the finest step were read as a kink ("one-sided slopes -5e-07 and
    # 5e-07 ... no verdict"); at half the step they halve, as a smooth function's do.
    gnll = impl("torch.nn.functional:gaussian_nll_loss")
    spec = parse_spec("input: B D real grad; target: B D real; var: B D positive grad; B=1..4; D=1..4")
    case = Case({"input": torch.tensor([[0.0]]), "target": torch.tensor([[0.0]]), "var": torch.tensor([[1.0]])}, {"B": 1, "D": 1})
    sc = self_consistency(gnll, spec, case)
    assert sc.consistent is True and not sc.kink, sc
    # |x| at 0 still is one: the slopes stay -1 and 1 however fine the step.
    absolute = Implementation(parse_ref("abs=x.py:f"), lambda x: x.abs().sum())
    kink = self_consistency(absolute, parse_spec("x: B real grad; B=1..4"), Case({"x": torch.tensor([0.0])}, {"B": 1}))
    assert kink.kink and kink.consistent is None


def test_a_100_from_code_that_never_runs_bceloss_is_not_its_clamp():
    # torchmetrics PSNR vs one guarded by mse + 1e-10, on identical images: inf vs 100 dB.
    # The finding was headed "100 = torch's BCELoss clamp of log(p) at -100".
    lib, guarded = impl("psnr.py:psnr_like_torchmetrics"), impl("psnr.py:psnr_guarded")
    x = torch.rand(1, 1, 11, 11, generator=torch.Generator().manual_seed(0))
    same = Case({"x": x, "y": x.clone()}, {"B": 1, "C": 1, "H": 11, "W": 11})
    ex = explain(lib, guarded, preset("images"), same, "nonfinite", F32)
    assert ex.category is Category.SEMANTIC, ex.reason
    assert not any("BCELoss" in n for n in ex.notes), ex.notes


def test_impact_with_one_side_stuck_says_so_instead_of_0_steps_and_2x_apart():
    # MONAI's Dice vs one with eps only in the denominator on an empty mask: the latter's
    # gradient is exactly 0, so it takes no step while MONAI's descends.  Printed was
    # "0 normalised descent step(s) ... end points 2x the distance travelled apart".
    spec = parse_spec("x: B real grad; B=1..4")
    moving = Implementation(parse_ref("moving=x.py:f"), lambda x: (x * x).sum())
    stuck = Implementation(parse_ref("stuck=x.py:g"), lambda x: (x * 0).sum() + 1)
    ex = explain(moving, stuck, spec, Case({"x": torch.tensor([1.0, -2.0])}, {"B": 2}), "value", F32, impact_steps=3)
    line = next(x for x in ex.evidence() if x.startswith("training impact"))
    assert line.startswith("training impact: moving 3, stuck 0 normalised descent step(s)"), line
    assert "only moving moved" in line and "2× the distance" not in line
    assert ex.impact.to_json()["taken"] == {"moving": 3, "stuck": 0}


def test_gradients_parallel_on_most_cases_only_never_claim_same_minimisers():
    # torch's label smoothing vs eps over the other classes, over every regime and C = 2..10:
    # parallel on most draws, not on the rest (C > 2), and the minimisers differ.
    ours, theirs = impl("label_smoothing.py:torch_smoothing"), impl("label_smoothing.py:smoothing_over_other_classes")
    rel = relation(history(ours, theirs, preset("classification"), n=40))
    assert rel.gradient_fits < rel.gradient_cases and not rel.same_minimisers, rel
    assert "same minimisers," not in rel.describe(("ours", "theirs"))


def test_a_side_with_no_gradient_is_never_called_parallel_to_the_others(tmp_path):
    # mse against the same loss on input.detach(): no gradient flows in the second.  Where
    # input == target the first one's gradient is exactly zero too; those cases (the verdict
    # still calls them different: no gradient against one) were counted as cosine 1, ratio 1,
    # and were the only ones left once one-sided zero gradients were left out: "gradients
    # parallel (same minimisers, different step size ≈ 1×)" for a side that has none.
    from losscmp.cli import main

    f = tmp_path / "detached.py"
    f.write_text("def mse(input, target):\n    return ((input - target) ** 2).mean()\n\n\n"
                 "def mse_detached(input, target):\n    return ((input.detach() - target) ** 2).mean()\n")
    out = tmp_path / "report.json"
    assert main([f"{f}:mse", f"{f}:mse_detached", "--spec", "regression", "--examples", "20", "--no-save", "--json", str(out)]) == 1
    (d,) = json.loads(out.read_text())["divergences"]
    rel = d["relation"]
    assert d["kind"] == "gradient" and rel["zero_gradient"].get("actual", 0) > 0, rel
    assert rel["gradient"] == "unknown" and rel["gradient_cases"] == 0, rel
    assert "parallel" not in d["explanation"]["sentence"] and "same minimisers" not in d["explanation"]["sentence"]


def test_a_value_both_sides_overflow_in_float64_does_not_decide_a_gradient_finding(tmp_path):
    # target / input against the same with denormal inputs flushed to 0, at input = 1e-45,
    # target = -1: the flushed side's value is -inf in float64 too (-1 / 0), but the finding
    # is the gradient, finite in float64 on both sides and still different (5.1e89 against 0).  The oracle looked at the values too and said "unknown:
    # float64 overflows too wherever the working dtype diverges".
    f = tmp_path / "flush.py"
    f.write_text("import torch\n\n\ndef ratio(input, target):\n    return (target / input).mean()\n\n\n"
                 "def ratio_flushed(input, target):\n"
                 "    return (target / torch.where(input.abs() < 1.1754944e-38, torch.zeros_like(input), input)).mean()\n")
    case = Case({"input": torch.tensor([1e-45]), "target": torch.tensor([-1.0])}, {"B": 1})
    spec = parse_spec("input: B positive grad; target: B real; B=1..4")
    e, a = load_implementation(f"{f}:ratio"), load_implementation(f"{f}:ratio_flushed")
    v = compare_outcomes(Pair("ratio", "ratio_flushed"), call(e.fn, spec, case), call(a.fn, spec, case), Tolerance(1.3e-6, 1e-5))
    assert v.kind == "nonfinite" and "gradient" in v.detail.split(":")[0], v.detail
    ex = explain(e, a, spec, case, v.kind, Tolerance(1.3e-6, 1e-5), impact_steps=0)
    assert ex.category == "semantic", ex.sentence()
    assert "overflows too" not in ex.sentence()
