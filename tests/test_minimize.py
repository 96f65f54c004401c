"""Planted divergences, each reduced to its essence."""
import torch

from losscmp.audit import Divergence, Evaluator, Settings
from losscmp.generate import Case, Recipe
from losscmp.load import load_implementation
from losscmp.minimize import ddmin, minimize, take
from losscmp.spec import parse_spec, preset
from losscmp.sweep import parse_knob, sweep

from .conftest import PLANTED
from .planted import BLUR_THRESHOLD, FAR


def evaluator(a, b, spec, **kw):
    impls = [load_implementation(f"{PLANTED}:{a}"), load_implementation(f"{PLANTED}:{b}")]
    return Evaluator(impls, spec, Settings.of(**kw))


def divergence_of(ev, case):
    pair = ev.pairs[0]
    verdict = ev.verdict(pair, ev.outcomes(case, pair.labels))
    assert verdict.kind, "the planted case must diverge to begin with"
    return Divergence(pair, verdict.kind, verdict, case, 1)


def cloud_case(tensors, layout="contiguous"):
    sizes = {"N": tensors["x"].shape[0], "D": tensors["x"].shape[1], "M": tensors["y"].shape[0]}
    return Case(tensors, sizes, recipe=Recipe(sizes=tuple(sizes.items()), layout=layout))


def test_ddmin_finds_a_single_culprit_in_log_time():
    calls = []

    def has_culprit(keep):
        calls.append(len(keep))
        return 7777 in keep

    assert ddmin(list(range(10_000)), has_culprit, 1) == [7777]
    assert len(calls) <= 2 * 14 + 1


def test_ddmin_keeps_a_pair_that_must_stay_together():
    assert sorted(ddmin(list(range(1000)), lambda keep: 3 in keep and 901 in keep, 1)) == [3, 901]


def test_one_far_point_among_a_thousand():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 3, generator=g), torch.randn(40, 3, generator=g)
    x[613] = torch.tensor([300.0, -250.0, 400.0])
    ev = evaluator("norms", "norms_clamped", preset("points"))
    m = minimize(ev, divergence_of(ev, cloud_case({"x": x, "y": y})))
    assert m.sizes["N"] == 1 and m.sizes["M"] == 1 and m.sizes["D"] == 1
    assert m.case.tensors["x"].abs().max() > FAR  # the far point is the one kept
    assert m.verdict.kind == "value"
    # Threshold on the input scale: agreement ends where the far point passes FAR.
    assert abs(m.threshold.value - FAR) / FAR < 0.01
    assert m.evaluations <= 60


def test_duplicate_points_reduce_to_the_pair():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 2, generator=g), torch.randn(5, 2, generator=g)
    x[150] = x[31]
    ev = evaluator("spread_safe", "spread_naive", preset("points"))
    m = minimize(ev, divergence_of(ev, cloud_case({"x": x, "y": y}, layout="transposed")))
    assert m.sizes["N"] == 2
    assert torch.equal(m.case.tensors["x"][0], m.case.tensors["x"][1])
    assert m.verdict.kind == "nonfinite"


def test_one_class_out_of_many():
    spec = preset("classification")
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 6, generator=g)
    target = torch.randint(0, 6, (64,), generator=g)
    case = Case({"input": logits, "target": target}, {"B": 64, "C": 6}, recipe=Recipe(sizes=(("B", 64), ("C", 6))))
    ev = evaluator("cross_entropy", "cross_entropy_drops_last_class", spec)
    m = minimize(ev, divergence_of(ev, case))
    assert m.sizes["B"] == 1
    assert m.sizes["C"] == 2  # the spec's minimum; labels were remapped, not broken
    t = m.case.tensors["target"]
    assert t.tolist() == [m.sizes["C"] - 1]  # the one sample sits in the last class


def test_simplex_weights_stay_on_the_simplex_when_points_are_removed():
    spec = preset("weighted-points")
    a = torch.softmax(torch.randn(10), 0)
    case = Case({"a": a, "x": torch.randn(10, 2), "b": torch.full((3,), 1 / 3), "y": torch.randn(3, 2)}, {"N": 10, "D": 2, "M": 3})
    smaller = take(spec, case, "N", [1, 4, 7])
    assert torch.allclose(smaller.tensors["a"].sum(), torch.tensor(1.0))
    assert smaller.tensors["x"].shape == (3, 2) and smaller.sizes["N"] == 3


def test_blur_threshold_within_one_percent():
    spec = parse_spec("x: N D real grad; y: M D real; N=8; M=8; D=2")
    ev = evaluator("smooth_energy", "smooth_energy_forked", spec)
    result = sweep(list(ev.impls.values()), spec, ev.settings, parse_knob("blur=1e-3:1:log"))
    assert len(result.boundaries) == 1
    b = result.boundaries[0]
    assert b.diverge_at < b.agree_at  # diverges below the threshold
    assert abs(b.value - BLUR_THRESHOLD) / BLUR_THRESHOLD < 0.01
    assert result.evaluations <= 9 + 12


def test_scale_sweep_finds_where_bce_on_sigmoid_breaks():
    from .conftest import FIXTURES

    impls = [load_implementation(f"{FIXTURES}/bce.py:bce_on_sigmoid"), load_implementation(f"{FIXTURES}/bce.py:bce_with_logits")]
    result = sweep(impls, preset("binary"), Settings(), parse_knob("scale=0.1:1000:log"), points=9)
    assert result.boundaries, [p.verdict.kind for p in result.points]
    first = result.boundaries[0]
    assert first.agree_at < first.diverge_at  # agree for small |z|, diverge above
    assert 1 < first.value < 100


def test_sweep_plot_is_written(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    from losscmp.plot import plot_sweep

    spec = parse_spec("x: N D real grad; y: M D real; N=8; M=8; D=2")
    ev = evaluator("smooth_energy", "smooth_energy_forked", spec)
    result = sweep(list(ev.impls.values()), spec, ev.settings, parse_knob("blur=1e-3:1:log"), points=5)
    assert len(result.evaluated) == result.evaluations > len(result.points)
    out = tmp_path / "sweep.png"
    plot_sweep(result, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_offset_sweep_brackets_both_sides_of_agreement():
    from .conftest import FIXTURES

    impls = [load_implementation(f"{FIXTURES}/bce.py:bce_on_sigmoid"), load_implementation(f"{FIXTURES}/bce.py:bce_with_logits")]
    result = sweep(impls, preset("binary"), Settings(), parse_knob("offset=-100:100:lin"), points=5)
    below, above = sorted(result.boundaries, key=lambda b: b.value)
    assert below.diverge_at < below.agree_at and above.agree_at < above.diverge_at  # agreement only near 0
    assert abs(below.agree_at - below.diverge_at) <= 0.01 * abs(below.value)


def test_value_simplification_keeps_unit_inputs_inside_the_open_interval():
    from losscmp.minimize import simplify_values

    spec = parse_spec("p: N unit grad; N=1..4")
    case = Case({"p": torch.tensor([0.97, 0.2])}, {"N": 2})
    simpler, _ = simplify_values(spec, case, lambda c: True)
    assert ((simpler.tensors["p"] > 0) & (simpler.tensors["p"] < 1)).all()


def test_a_swept_keyword_overrides_the_specs_fixed_value(tmp_path):
    f = tmp_path / "kw.py"
    f.write_text("def a(x, y, k=1.0):\n    return ((x - y) ** 2).mean()\n"
                 "def b(x, y, k=1.0):\n    return ((x - y) ** 2).mean() * (2 if k > 3 else 1)\n")
    spec = parse_spec("x: N real grad; y: N real; N=2..8; k=1.0")
    impls = [load_implementation(f"{f}:a"), load_implementation(f"{f}:b")]
    result = sweep(impls, spec, Settings(), parse_knob("k=1:10:lin"), points=5)
    assert len(result.boundaries) == 1 and abs(result.boundaries[0].value - 3) < 0.05


# --- counter-examples a person can read -----------------------------------------------
NUMERIC = PLANTED.parent / "planted_numeric.py"


def test_softplus_overflow_minimises_to_an_integer_just_past_the_threshold():
    from losscmp.audit import audit

    impls = [load_implementation(f"{NUMERIC}:softplus"), load_implementation(f"{NUMERIC}:softplus_naive")]
    result = audit(impls, parse_spec("x: N real grad"), Settings())
    (d,) = result.divergences
    x = d.minimized.case.tensors["x"]
    assert d.kind == "nonfinite" and x.numel() == 1
    assert x.item() == 89.0  # exp(89) overflows float32; exp(88) does not: the simplest diverging input
    assert abs(d.minimized.threshold.value - 88.72) < 1


def test_far_point_minimises_to_two_small_round_numbers():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(500, 3, generator=g) * 7.3, torch.randn(20, 3, generator=g)
    x[77] = torch.tensor([8.59869e07, -1.74954e07, 3.3e5])
    ev = evaluator("norms", "norms_clamped", preset("points"))
    m = minimize(ev, divergence_of(ev, cloud_case({"x": x, "y": y})))
    assert m.case.tensors["x"].tolist() == [[101.0]] and m.case.tensors["y"].tolist() == [[0.0]]
    assert m.verdict.kind == "value"
    names = [p.name for p in m.passes]
    assert {"shrink_dims", "simplify_args", "scale_threshold", "toward_threshold"} <= set(names)
    assert sum(p.evaluations for p in m.passes) + 1 == m.evaluations  # every call accounted for (+ the final judge)


def test_the_gate_never_evaluates_a_candidate_twice_nor_one_outside_its_domain():
    from losscmp.minimize import Shrinker

    spec = parse_spec("p: N unit grad; N=1..4")
    calls = []
    s = Shrinker(spec, Case({"p": torch.tensor([0.5, 0.25])}, {"N": 2}), lambda c: calls.append(c) or True)
    s.current = "test"
    outside = Case({"p": torch.tensor([1.0, 0.25])}, {"N": 2})
    inside = Case({"p": torch.tensor([0.5, 0.5])}, {"N": 2})
    assert not s.holds(outside) and s.holds(inside) and s.holds(inside)
    assert len(calls) == 1 and s.stats["test"] == {"evaluations": 1, "kept": 0, "cached": 1, "refused": 1}


def test_simplest_above_prefers_small_integers_then_few_digits():
    from losscmp.minimize import simplest_above

    assert simplest_above(88.6, 89.5, lambda m: m > 88.72) == 89
    assert simplest_above(99.3, 100.3, lambda m: m > 100) == 101
    assert simplest_above(3.69e-5, 3.73e-5, lambda m: m > 3.7e-5) == 4e-5
    assert simplest_above(1.2e6, 1.21e6, lambda m: m > 1.203e6) == 1.3e6  # 2 digits, within 10% of the bracket
    assert simplest_above(1.2e6, 1.21e6, lambda m: 1.203e6 < m < 1.25e6) == 1.21e6


def test_a_dim_near_its_minimum_shrinks_in_few_evaluations():
    calls = []

    def holds(keep):
        calls.append(len(keep))
        return 13 in keep  # the culprit sits at the far end of an image row

    assert ddmin(list(range(14)), holds, 11) == list(range(3, 14))
    assert len(calls) <= 2


def test_a_threshold_never_says_the_finding_is_gone_where_the_same_words_still_differ(tmp_path):
    # two_causes' mse_fork at x = t = s: s² - 2s² + s² is NaN (inf - inf) past 1.84e19 but
    # -inf from 1.30e19 (only 2s² overflows).  The line read "no nonfinite (value) finding at
    # 1.837e+19 (the sides still differ there: nonfinite (value))": it is NaN that is gone there.
    import json
    import re

    from losscmp.cli import main

    from .conftest import FIXTURES

    out = tmp_path / "report.json"
    fx = FIXTURES / "two_causes.py"
    assert main([f"{fx}:mse", f"{fx}:mse_fork", "--spec", "regression", "--examples", "60", "--no-save", "--json", str(out)]) == 1
    thresholds = [d["threshold"] for d in json.loads(out.read_text())["divergences"] if d.get("threshold")]
    stills = [t for t in thresholds if t.get("still_differ_at_agree")]
    assert stills, thresholds
    for t in stills:
        finding, still = re.match(r"no (.*) finding at .* \(the sides still differ there: (.*)\), ", t["text"]).groups()
        assert finding != still, t["text"]
        if finding.startswith("nonfinite"):
            assert "against" in finding and "against" in still, t["text"]
