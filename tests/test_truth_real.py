"""Explanations that are true on real third-party code (issue 15, "truth on real code").

Each mechanism that made losscmp say something untrue on a real library pair (POT,
kornia; ``fixtures/real/pairs.py``) is mirrored in torch alone by
``fixtures/truth_real.py`` so that CI, which has none of those libraries, exercises it;
the tests on the libraries themselves skip when they are absent.
"""
import json
import warnings

import pytest
import torch

from losscmp.cli import main
from losscmp.compare import Tolerance, compare_outcomes
from losscmp.explain import Category, explain
from losscmp.explain.relation import observe, relation
from losscmp.generate import Case
from losscmp.load import load_implementation
from losscmp.minimize import input_magnitude, scaled
from losscmp.model import Pair
from losscmp.repro import load_repro
from losscmp.run import call
from losscmp.spec import parse_spec

from .conftest import FIXTURES

F32 = Tolerance.for_dtype(torch.float32)
MIRROR = FIXTURES / "truth_real.py"
REAL = FIXTURES / "real" / "pairs.py"
POINTS = parse_spec("x: N D real grad; y: M D real; N=1..8; M=1..8; D=1..3")
CLASSES = "input: B C logits grad; target: B labels(C); B=1..8; C=2..6"


def points(x, y) -> Case:
    x, y = torch.tensor(x), torch.tensor(y)
    return Case({"x": x, "y": y}, {"N": x.shape[0], "M": y.shape[0], "D": x.shape[1]})


# --- a gradient that is exactly zero on one side has no direction ------------------------

def test_a_zero_gradient_on_one_side_is_not_counted_as_pointing_elsewhere():
    # POT's kernel K = exp(-C / 0.05²) underflows in float32 for most point clouds: value 0,
    # gradient exactly 0.  Counted as cosine 0, those cases made the relation "gradients point
    # elsewhere (median cosine 0)"; where both sides have a gradient (one point each, close
    # together) the gradients are parallel, POT's twice geomloss' (|x - y|² vs |x - y|² / 2).
    pytest.importorskip("geomloss")
    pot, geo = load_implementation(f"{MIRROR}:sinkhorn_kernel"), load_implementation(f"{MIRROR}:geomloss_sinkhorn")
    far = [points([[0.0]], [[v]]) for v in (1.0, 2.0, -1.5, 3.0)]
    near = [points([[0.0]], [[v]]) for v in (2e-3, -3e-3, 5e-3)]
    obs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in far + near:
            a, b = call(pot.fn, POINTS, case), call(geo.fn, POINTS, case)
            obs.append(observe(a, b, verdict=compare_outcomes(Pair(pot.label, geo.label), a, b, F32)))
    assert all(o.zero_gradient == "expected" and o.cosine is None for o in obs[:4])
    rel = relation(obs, tol=F32)
    assert dict(rel.zero_gradient) == {"expected": 4}
    assert rel.gradient == "parallel" and rel.factor == pytest.approx(0.5, rel=1e-3), rel
    text = rel.describe((pot.label, geo.label))
    assert "point elsewhere" not in text and "exactly zero on 4 case(s)" in text


def test_only_zero_gradients_on_one_side_leave_the_gradient_relation_unknown_not_absent():
    pytest.importorskip("geomloss")
    pot, geo = load_implementation(f"{MIRROR}:sinkhorn_kernel"), load_implementation(f"{MIRROR}:geomloss_sinkhorn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs = [observe(call(pot.fn, POINTS, c), call(geo.fn, POINTS, c)) for c in (points([[0.0]], [[v]]) for v in (1.0, 2.0, 3.0))]
    rel = relation(obs)
    assert rel.gradient == "unknown" and "no gradients" not in rel.describe((pot.label, geo.label))


# --- a NaN that float64 removes is numerical, even where the values still differ ------------

def test_a_nan_only_float32_makes_is_numerical_on_that_side():
    # x = 0.6, y = 1: POT's backward divides by K²-sized numbers: NaN in float32, -0.8 in
    # float64.  geomloss: -0.4 in both.  The finite float64 results still differ (semantic:
    # another finding), but the NaN itself is float32's: it was called "semantic".
    pytest.importorskip("geomloss")
    pot, geo = load_implementation(f"{MIRROR}:sinkhorn_kernel"), load_implementation(f"{MIRROR}:geomloss_sinkhorn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = explain(geo, pot, POINTS, points([[0.6]], [[1.0]]), "nonfinite", F32, impact_steps=0)
    assert ex.category is Category.NUMERICAL, ex.reason
    assert ex.unstable_side == "sinkhorn_kernel"
    assert "float32 only" in ex.reason and "still differ in float64" in ex.reason
    assert ex.to_json()["float64_differs"] is True
    assert "agree in float64" not in ex.sentence() and "sinkhorn_kernel's NaN/inf is the working dtype's" in ex.sentence()


def test_a_correctly_rounded_overflow_stays_semantic():
    # GaussianNLLLoss clamps var at 1e-6; -Normal.log_prob at var = 1e-45 is 5e44 in float64,
    # beyond float32's range: its float32 inf is the right float32 answer, not instability.
    spec = parse_spec("input: B real grad; target: B real; var: B positive grad; B=1..8")
    case = Case({"input": torch.tensor([0.0]), "target": torch.tensor([1.0]), "var": torch.tensor([1e-45])}, {"B": 1})
    ex = explain(load_implementation(f"{FIXTURES}/truth.py:gaussian_nll"), load_implementation(f"{FIXTURES}/truth.py:normal_nll"),
                 spec, case, "nonfinite", F32, impact_steps=0)
    assert ex.category is Category.SEMANTIC, ex.reason


# --- "agree at" is true of the example shown ----------------------------------------------

def test_the_threshold_never_says_agree_where_the_sides_still_differ(tmp_path):
    # log(softmax) is -inf from a logit gap of ~104 in float32 (the NaN/inf finding), but its
    # denormal p_t already makes the value differ from ~96: "agree at 103.1" was untrue.
    out = tmp_path / "r.json"
    code = main([f"{MIRROR}:focal_log_softmax", f"{MIRROR}:focal_log_of_softmax", "--spec", CLASSES, "--seed", "0",
                 "--examples", "60", "--save-dir", str(tmp_path / "saved"), "--json", str(out), "--no-explain"])
    report = json.loads(out.read_text())
    found = [d for d in report["divergences"] if d["kind"] == "nonfinite" and d["threshold"]]
    assert code == 1 and found
    for d in found:
        t, saved = d["threshold"], load_repro(d["repro"])
        a, b = (load_implementation(f"{MIRROR}:{n}") for n in ("focal_log_softmax", "focal_log_of_softmax"))
        there = scaled(saved.spec, saved.case, t["agree_at"] / input_magnitude(saved.spec, saved.case))  # as the bisection scales
        v = compare_outcomes(Pair(a.label, b.label), call(a.fn, saved.spec, there), call(b.fn, saved.spec, there), F32)
        assert (v.kind.value if v.kind else None) == t["still_differ_at_agree"]
        assert v.kind is None or not t["text"].startswith("agree at"), t["text"]


# --- the real libraries, where installed ----------------------------------------------------

def test_kornia_focal_against_a_copy_on_log_softmax_is_bit_for_bit():
    pytest.importorskip("kornia")
    kornia = load_implementation(f"{REAL}:kornia_focal")
    mirror = load_implementation(f"{MIRROR}:focal_log_softmax")
    spec = parse_spec(CLASSES)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, t = torch.randn(4, 3, generator=g) * 50, torch.randint(3, (4,), generator=g)
        case = Case({"input": x, "target": t}, {"B": 4, "C": 3})
        assert compare_outcomes(Pair("k", "m"), call(kornia.fn, spec, case), call(mirror.fn, spec, case), F32).kind is None


def test_pot_sinkhorn2_is_what_the_mirror_computes():
    pytest.importorskip("ot")
    pot, mirror = load_implementation(f"{REAL}:pot_sinkhorn2"), load_implementation(f"{MIRROR}:sinkhorn_kernel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in (points([[0.6]], [[1.0]]), points([[0.0]], [[1.0]]), points([[0.0, 0.1], [0.05, 0.0]], [[0.02, 0.03]])):
            a, b = call(pot.fn, POINTS, case), call(mirror.fn, POINTS, case)
            assert torch.allclose(a.value, b.value, atol=1e-6)
            assert torch.allclose(a.grads["x"], b.grads["x"], atol=1e-6, equal_nan=True)


def test_a_view_is_never_said_to_amplify_a_difference(tmp_path):
    """torchmetrics' SSIM gradient (float32 vs its own float64 run) was located at a backward
    ``aten.view`` that "amplifies the difference past the tolerance": a view changes no value."""
    pytest.importorskip("kornia")
    pytest.importorskip("torchmetrics")
    out = tmp_path / "r.json"
    code = main([f"{REAL}:kornia_ssim", f"{REAL}:torchmetrics_ssim", "--spec", "images", "--seed", "0", "--no-save",
                 "--json", str(out)])
    (grad,) = [d for d in json.loads(out.read_text())["divergences"] if d["kind"] == "gradient"]
    note = grad["location_note"]
    assert code == 1 and grad["category"] == "numerical", grad["explanation"]
    assert grad["location"] is None and "which changes no value" in note and "located on" not in note, note
