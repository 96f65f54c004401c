import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losscmp.generate import REGIMES, Recipe, build_case, cases, clone_like, recipes
from losscmp.spec import PRESETS, preset

ALL_PRESETS = st.sampled_from(sorted(PRESETS)).map(preset)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_every_generated_case_respects_its_domains(data):
    spec = data.draw(ALL_PRESETS)
    case = data.draw(cases(spec))
    for arg in spec.args:
        t = case.tensors[arg.name]
        assert tuple(t.shape) == spec.shape(arg, case.sizes)
        if arg.domain == "labels":
            assert t.dtype == torch.int64 and (t.numel() == 0 or (0 <= t.min() and t.max() < case.sizes[arg.classes]))
        elif arg.domain == "simplex" and t.numel():
            assert torch.allclose(t.double().sum(-1), torch.ones(()).double(), atol=1e-5)
            assert (t >= 0).all()
        elif arg.domain == "unit":  # the open interval: never exactly 0 or 1
            assert ((0 < t) & (t < 1)).all()
        elif arg.domain == "image":
            assert ((0 <= t) & (t <= 1)).all()
        elif arg.domain == "binary":
            assert ((t == 0) | (t == 1)).all()
        elif arg.domain == "positive":
            assert (t > 0).all()


def test_a_recipe_rebuilds_bit_for_bit():
    spec = preset("points")
    r = Recipe(sizes=(("N", 50), ("D", 3), ("M", 7)), regime="duplicates", layout="strided", seed=1234)
    a, b = build_case(spec, r), build_case(spec, r)
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name])
        assert a.tensors[name].stride() == b.tensors[name].stride()


def test_regimes_do_what_they_say():
    spec = preset("points")
    sizes = (("N", 40), ("D", 3), ("M", 40))
    huge = build_case(spec, Recipe(sizes, "huge", magnitude=1e7, seed=1))
    assert huge.tensors["x"].abs().max() > 1e6
    offset = build_case(spec, Recipe(sizes, "offset", offset=1e5, seed=1))
    assert (offset.tensors["x"] - 1e5).abs().max() < 10
    const = build_case(spec, Recipe(sizes, "constant", seed=1))
    assert const.tensors["x"].unique().numel() == 1 and torch.equal(const.tensors["x"][:1], const.tensors["y"][:1])
    dup = build_case(spec, Recipe(sizes, "duplicates", seed=1))
    assert dup.tensors["x"].unique(dim=0).shape[0] < 40  # repeated rows
    assert (dup.tensors["x"][:1] == dup.tensors["y"][:1]).all()  # shared between x and y
    strided = build_case(spec, Recipe(sizes, layout="strided", seed=1))
    assert not strided.tensors["x"].is_contiguous()
    twin = clone_like(strided.tensors["x"])
    assert twin.stride() == strided.tensors["x"].stride() and torch.equal(twin, strided.tensors["x"])


def test_recipes_cover_every_regime():
    seen = set()

    @settings(max_examples=200, deadline=None, database=None)
    @given(recipes(preset("binary")))
    def collect(r):
        seen.add(r.regime)

    collect()
    assert seen == set(REGIMES)


def test_size_one_dims_are_common():
    ones = []

    @settings(max_examples=100, deadline=None, database=None)
    @given(recipes(preset("points")))
    def collect(r):
        ones.append(dict(r.sizes)["N"] == 1)

    collect()
    assert sum(ones) >= 10


def test_duplicates_share_rows_only_within_a_domain_and_survive_0_dim_args():
    from losscmp.spec import parse_spec

    spec = parse_spec("x: N D real; y: M D sphere; s: real; N=4; M=4; D=3")
    case = build_case(spec, Recipe(sizes=(("N", 4), ("D", 3), ("M", 4)), regime="duplicates", seed=3))
    assert torch.allclose(case.tensors["y"].norm(dim=-1), torch.ones(4))
    assert case.tensors["s"].shape == ()


def test_float16_inputs_saturate_instead_of_overflowing():
    spec = preset("regression")
    for regime, planted in (("huge", ()), ("special", (("input", 0.0, 1e30),))):
        case = build_case(spec, Recipe(sizes=(("B", 8),), regime=regime, magnitude=1e7, planted=planted, seed=1), dtype=torch.float16)
        assert all(torch.isfinite(t).all() for t in case.tensors.values())


# --- one table per domain: every domain honours every regime ------------------------
import pytest  # noqa: E402

from losscmp.domains import DOMAINS  # noqa: E402
from losscmp.generate import RegimeError, select_regimes  # noqa: E402
from losscmp.spec import parse_spec  # noqa: E402

DOMAIN_SPECS = {
    "labels": "logits: B C logits; t: B N labels(C); B=4; N=6; C=5",
    "image": "t: B C H W image; B=3; C=1; H=12; W=12",
}


def _domain_case(domain, regime, dtype=torch.float32, seed=5):
    spec = parse_spec(DOMAIN_SPECS.get(domain, f"t: B N {domain}; B=4; N=6"))
    sizes = tuple((d, spec.size_range(d)[0]) for d in spec.dims)
    r = Recipe(sizes, regime, magnitude={"tiny": 1e-6, "huge": 1e5, "extreme": 1e3}.get(regime, 1.0),
               offset=1e4 if regime == "offset" else 0.0, seed=seed,
               planted=(("t", 0.0, 1e30), ("t", 0.5, 0.0)) if regime == "special" else ())
    case = build_case(spec, r, dtype=dtype)
    return case.tensors["t"], dict(case.sizes).get("C")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("domain", list(DOMAINS))
def test_every_domain_honours_every_regime_and_stays_legal(domain, regime, dtype):
    t, classes = _domain_case(domain, regime, dtype)
    assert DOMAINS[domain].legal(t, classes), (domain, regime, t)
    assert torch.isfinite(t.double()).all()
    assert regime in DOMAINS[domain].regimes  # the table says what the regime means here
    if regime not in ("standard", "special", "duplicates"):
        standard, _ = _domain_case(domain, "standard", dtype)
        assert not torch.equal(t, standard), f"{domain}/{regime} builds the same tensor as standard"


def test_unit_is_never_exactly_0_or_1_even_when_saturated():
    """Regression: the extreme regime used to give exactly 0.0 and 1.0 for (0, 1) probabilities."""
    spec = preset("segmentation")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for seed in range(20):
            sizes = (("B", 2), ("C", 2), ("H", 8), ("W", 8))
            p = build_case(spec, Recipe(sizes, "extreme", magnitude=1e4, seed=seed), dtype=dtype).tensors["input"]
            assert ((p > 0) & (p < 1)).all(), (dtype, seed)
            near = torch.minimum(p.double(), 1 - p.double())
            if dtype in (torch.float32, torch.float64):
                assert (near <= 2e-7).all()  # within 1e-7 of an end, as the regime says


def test_regimes_mean_what_the_table_says_for_images_simplex_unit_labels():
    flat, _ = _domain_case("image", "constant")
    assert flat.unique().numel() == 1
    near_flat, _ = _domain_case("image", "tiny")
    assert 0 < float(near_flat.max() - near_flat.min()) <= 2.1e-4  # amplitude 0.2 * sqrt(1e-6)
    saturated, _ = _domain_case("image", "extreme")
    assert all(img.unique().numel() == 1 and float(img[0, 0, 0]) in (0.0, 1.0) for img in saturated)
    checker, _ = _domain_case("image", "huge")
    assert set(checker.unique().tolist()) == {0.0, 1.0} and not torch.equal(checker[..., 0, 0], checker[..., 0, 1])
    low_contrast, _ = _domain_case("image", "offset")
    assert float(low_contrast.max() - low_contrast.min()) <= 0.02
    one_hot, _ = _domain_case("simplex", "extreme")
    assert ((one_hot == 1).sum(-1) == 1).all()
    near_one_hot, _ = _domain_case("simplex", "huge")
    assert (near_one_hot.max(-1).values > 0.999).all() and (near_one_hot.max(-1).values < 1).all()
    near_uniform, _ = _domain_case("simplex", "tiny")
    assert torch.allclose(near_uniform, torch.full_like(near_uniform, 1 / 6), atol=1e-5)
    labels, _ = _domain_case("labels", "huge")
    assert labels.flatten().bincount().max() >= 0.75 * labels.numel()


def test_select_regimes_keeps_the_mildest_first_order_and_refuses_unknown_names():
    assert list(REGIMES)[0] == "standard" and list(REGIMES)[-1] == "special"
    assert select_regimes("tiny,standard", None) == ("standard", "tiny")
    assert "duplicates" not in select_regimes(None, "duplicates")
    assert select_regimes(None, None) == tuple(REGIMES)
    with pytest.raises(RegimeError, match="unknown regime tinny .*known: standard"):
        select_regimes("standard,tinny", None)
    with pytest.raises(RegimeError, match="--exclude-regimes: unknown regime dupes"):
        select_regimes(None, "dupes")
    with pytest.raises(RegimeError, match="no regime left"):
        select_regimes("tiny", "tiny")
    from losscmp.spec import SpecError

    assert issubclass(RegimeError, SpecError)


def test_recipes_draw_only_the_selected_regimes():
    seen = set()

    @settings(max_examples=60, deadline=None, database=None)
    @given(recipes(preset("images"), regimes=select_regimes("constant,tiny", None)))
    def collect(r):
        seen.add(r.regime)

    collect()
    assert seen == {"constant", "tiny"}


def test_presets_fit_their_libraries():
    images = preset("images")
    assert images.size_range("H")[0] >= 11 and images.size_range("W")[0] >= 11
    seg = preset("segmentation")
    assert [a.dims for a in seg.args] == [("B", "C", "H", "W")] * 2
    assert preset("segmentation-no-channel").arg("input").dims == ("B", "H", "W")
    dist = preset("distributions")
    assert dist.grad_args == ("q",)


# --- the search reaches near-flat images ----------------------------------------------
IMAGE_ONLY_REGIMES = ("constant", "tiny", "offset")  # flat, near-flat, low-contrast


@pytest.mark.slow
def test_ssim_float32_cancellation_is_found_in_the_default_budget_thanks_to_near_flat_images(monkeypatch):
    from pathlib import Path

    from losscmp.audit import Settings, audit
    from losscmp.load import load_implementation

    numeric = Path(__file__).parent / "planted_numeric.py"
    pair = [load_implementation(f"{numeric}:ssim_float64"), load_implementation(f"{numeric}:ssim_float32")]
    result = audit(pair, preset("images"), Settings.of(minimize=False))
    assert result.cases_run == Settings().search.examples
    assert result.divergences and result.divergences[0].case.recipe.regime in IMAGE_ONLY_REGIMES
    # Without flat, near-flat and low-contrast images, more than the budget finds nothing.
    others = tuple(r for r in REGIMES if r not in IMAGE_ONLY_REGIMES)
    assert audit(pair, preset("images"), Settings.of(examples=120, regimes=others, minimize=False)).agree


# --- issue 15: degenerate inputs are drawn in every run -----------------------------

def test_degenerate_cases_are_zeros_identical_inputs_and_empty_masks_per_sample():
    from losscmp.generate import degenerate_cases

    zeros, identical = degenerate_cases(preset("regression"))
    assert zeros.recipe.regime == "zeros" and not zeros.tensors["input"].any() and not zeros.tensors["target"].any()
    assert identical.recipe.regime == "identical" and torch.equal(identical.tensors["input"], identical.tensors["target"])
    by_regime = {c.recipe.regime: c for c in degenerate_cases(preset("segmentation"))}
    masks = by_regime["empty masks"].tensors["target"]
    per_sample = masks.sum((1, 2, 3))
    assert (per_sample[::2] == 0).all() and set(by_regime) == {"zeros", "identical", "empty masks"}
    # identical: the prediction equals its 0/1 target as far as (0, 1) allows
    pred = by_regime["identical"].tensors["input"]
    assert ((pred - by_regime["identical"].tensors["target"]).abs() < 1e-6).all()
