import pytest

from losscmp.spec import PRESETS, SpecError, parse_spec, preset, resolve_spec


def test_text_form_round_trips():
    spec = parse_spec("x: N D real grad; y: M D real; N=1..100; D=3; blur=0.05")
    assert [a.name for a in spec.args] == ["x", "y"]
    assert spec.arg("x").grad and not spec.arg("y").grad
    assert spec.dims == ("N", "D", "M")
    assert spec.size_range("N") == (1, 100) and spec.size_range("D") == (3, 3)
    assert dict(spec.params) == {"blur": 0.05}
    again = parse_spec(spec.text())
    assert again.args == spec.args and again.params == spec.params
    assert all(again.size_range(d) == spec.size_range(d) for d in spec.dims)


def test_labels_need_their_classes_dim():
    spec = parse_spec("logits: B C logits grad; target: B labels(C)")
    assert spec.arg("target").classes == "C"
    assert spec.size_range("C")[0] >= 2  # one class is no classification
    with pytest.raises(SpecError, match="labels\\(K\\)"):
        parse_spec("logits: B C logits grad; target: B labels(K)")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_parses(name):
    spec = preset(name)
    assert spec.name == name and spec.args


def test_aliases_and_errors():
    assert preset("point_clouds").name == "points"
    with pytest.raises(SpecError, match="unknown preset 'nope'"):
        preset("nope")
    for bad in ["x N D real", "x: N D reel", "x: N D real; N=abc", "x: labels(C) grad; y: C real", "x: N real; blur=foo(1)"]:
        with pytest.raises(SpecError):
            parse_spec(bad)


def test_resolve_spec_from_python_file(tmp_path):
    f = tmp_path / "myspec.py"
    f.write_text("from losscmp.spec import parse_spec\nSPEC = parse_spec('p: K simplex grad; q: K simplex')\nTEXT = 'x: N real'\n")
    assert resolve_spec(f"{f}:SPEC").dims == ("K",)
    assert resolve_spec(f"{f}:TEXT").dims == ("N",)


def test_text_form_keeps_non_scalar_outputs_and_infinite_parameters():
    spec = parse_spec("x: N real grad; y: N real; output=any; k=1e999; w=(1.0, 3.0)")
    assert not spec.scalar
    again = parse_spec(spec.text())
    assert not again.scalar and dict(again.params) == {"k": float("inf"), "w": (1.0, 3.0)}
    with pytest.raises(SpecError, match="output=maybe"):
        parse_spec("x: N real; output=maybe")
