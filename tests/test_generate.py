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
        elif arg.domain in ("unit", "image"):
            assert ((0 <= t) & (t <= 1)).all()
        elif arg.domain == "binary":
            assert ((t == 0) | (t == 1)).all()
        elif arg.domain == "positive":
            assert (t > 0).all() or case.recipe.regime == "special"


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
