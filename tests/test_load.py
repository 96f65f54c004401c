import sys

import pytest
import torch

from losscmp.load import LoadError, disambiguate, load_implementation, load_object, parse_ref

from .conftest import FIXTURES


def test_parse_reference_forms():
    r = parse_ref('ref=geomloss:SamplesLoss(loss="sinkhorn", blur=0.05)')
    assert (r.label, r.target, r.attrs) == ("ref", "geomloss", ("SamplesLoss",))
    assert r.call == ((), (("loss", "sinkhorn"), ("blur", 0.05)))
    r = parse_ref("torch.nn.functional:mse_loss")
    assert (r.label, r.attrs) == ("mse_loss", ("mse_loss",))
    r = parse_ref("pkg/file.py:Outer.inner")
    assert r.attrs == ("Outer", "inner") and r.is_path


def test_factory_arguments_must_be_literals():
    with pytest.raises(LoadError, match="literals"):
        parse_ref("torch.nn:HuberLoss(delta=__import__('os').getcwd())")
    with pytest.raises(LoadError, match="literals"):
        parse_ref("torch.nn:HuberLoss(delta=x)")


def test_loading_files_modules_and_factories():
    huber = load_implementation("torch.nn:HuberLoss(delta=2.0)")
    assert isinstance(huber.fn, torch.nn.HuberLoss) and huber.fn.delta == 2.0
    bce = load_implementation(f"{FIXTURES}/bce.py:bce_with_logits")
    assert bce.fn(torch.zeros(3), torch.ones(3)).item() == pytest.approx(0.6931, abs=1e-4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("no/such/file.py:f", "no such file"),
        (f"{FIXTURES}/bce.py:nope", "has no attribute 'nope'"),
        ("torch.nn.functional:nope", "has no attribute 'nope'"),
        ("not_a_module_xyz:f", "no module named"),
        (f"{FIXTURES}/bce.py:torch", "not callable"),
        ("torch.nn:HuberLoss(wrong=1)", "calling the factory raised TypeError"),
        ("justtext", "expected 'file.py:attr'"),
    ],
)
def test_bad_references_give_one_line_errors(text, message):
    with pytest.raises(LoadError, match=message) as info:
        load_implementation(text)
    assert "\n" not in str(info.value)


def test_colliding_package_names_load_side_by_side(tmp_path):
    import geomloss

    fork = tmp_path / "paper_code" / "geomloss"
    (fork / "utils").mkdir(parents=True)
    (fork / "__init__.py").write_text("from .samples import SamplesLoss\n")
    (fork / "utils" / "__init__.py").write_text("FACTOR = 2.0\n")
    (fork / "samples.py").write_text(
        "from geomloss.utils import FACTOR\n"  # absolute self-import, as real forks do
        "class SamplesLoss:\n"
        "    def __init__(self, loss='sinkhorn', blur=0.05):\n        self.blur = blur\n"
        "    def __call__(self, x, y):\n        return FACTOR * (x.mean() - y.mean()) ** 2\n"
    )
    forked = load_implementation(f"{fork}:SamplesLoss(blur=0.1)")
    official = load_implementation("geomloss:SamplesLoss(loss='sinkhorn', blur=0.1)")
    assert type(forked.fn).__module__ == "geomloss.samples"
    assert type(official.fn) is geomloss.SamplesLoss  # the installed package is untouched
    assert sys.modules["geomloss"] is geomloss
    x, y = torch.ones(4, 2), torch.zeros(5, 2)
    assert forked.fn(x, y).item() == 2.0


def test_default_labels_are_short_and_disambiguated():
    refs = disambiguate([parse_ref("a/loss.py:fn"), parse_ref("b/other.py:fn"), parse_ref("c.py:g")])
    assert [r.label for r in refs] == ["loss:fn", "other:fn", "g"]


def test_safe_factory_policy_refuses_non_modules():
    with pytest.raises(LoadError, match="only torch.nn.Module"):
        load_object("subprocess:Popen(args='true')", factories="modules")
    assert isinstance(load_object("torch.nn:MSELoss()", factories="modules"), torch.nn.MSELoss)


def test_same_stem_in_two_folders_still_gets_distinct_labels():
    refs = disambiguate([parse_ref("d1/loss.py:a"), parse_ref("d2/loss.py:a")])
    assert len({r.label for r in refs}) == 2
