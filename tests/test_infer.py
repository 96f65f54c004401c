"""Spec inference for any tensor signature, with reasons when nothing fits."""
import pytest

from losscmp.audit import Settings, audit
from losscmp.infer import InferenceError, in_process, infer_spec
from losscmp.load import load_implementation
from losscmp.spec import SpecError

from .conftest import PLANTED

NUMERIC = PLANTED.parent / "planted_numeric.py"


def impls(*refs):
    return [load_implementation(r) for r in refs]


def test_a_one_argument_pair_is_inferred_and_audited():
    pair = impls(f"{NUMERIC}:energy", f"{NUMERIC}:energy_twice_halved")
    spec = infer_spec(pair)
    assert [a.name for a in spec.args] == ["x"] and spec.arg("x").grad
    assert audit(pair, spec, Settings.of(examples=20, save_dir=None, minimize=False)).agree


def test_a_three_argument_pair_with_a_keyword_only_parameter_is_inferred():
    pair = impls(f"{NUMERIC}:triplet", f"{NUMERIC}:triplet_by_hand")
    spec = infer_spec(pair)
    assert [a.name for a in spec.args] == ["anchor", "positive", "negative"]
    assert spec.args[0].dims == spec.args[1].dims == spec.args[2].dims == ("B", "D")
    assert audit(pair, spec, Settings.of(examples=20, save_dir=None, minimize=False)).cases_run == 20


def test_a_probe_that_fails_on_small_inputs_is_retried_larger(tmp_path):
    f = tmp_path / "windowed.py"
    f.write_text(
        "def _check(x):\n"
        "    if min(x.shape[-2:]) < 11:\n"
        "        raise ValueError(\"Kernel size can't be greater than actual input size\")\n"
        "def a(img1, img2):\n    _check(img1)\n    return ((img1 - img2) ** 2).mean()\n"
        "def b(img1, img2):\n    _check(img1)\n    return ((img2 - img1) ** 2).mean()\n"
    )
    spec = infer_spec(impls(f"{f}:a", f"{f}:b"))
    last_two = spec.args[0].dims[-2:]
    assert all(spec.size_range(d)[0] >= 11 for d in last_two), spec.text()
    # Every case the audit draws from it is accepted.
    result = audit(impls(f"{f}:a", f"{f}:b"), spec, Settings.of(examples=15, save_dir=None, minimize=False))
    assert result.agree


def test_when_nothing_fits_the_error_says_who_raised_what_on_which_sizes(tmp_path):
    f = tmp_path / "fussy.py"
    f.write_text("import torch\n"
                 "def good(x, y):\n    return ((x - y) ** 2).mean()\n"
                 "def fussy(x, y):\n    raise TypeError('expected a dict of tensors')\n")
    with pytest.raises(InferenceError) as e:
        infer_spec(impls(f"{f}:good", f"{f}:fussy"))
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, SpecError)
    assert "good returned a value but fussy raised TypeError: expected a dict of tensors" in msg
    assert "and still on" in msg  # retried larger before giving up


def test_a_required_keyword_only_parameter_is_a_one_line_error(tmp_path):
    f = tmp_path / "kw.py"
    f.write_text("def a(x, y, *, margin):\n    return (x - y).abs().mean() * margin\n")
    with pytest.raises(InferenceError, match="margin"):
        infer_spec(impls(f"{f}:a", f"{f}:a"))


def test_probing_goes_through_the_given_runner():
    seen = []

    def run(impl, spec, case):
        seen.append((impl.label, spec.text()))
        return in_process(impl, spec, case)

    spec = infer_spec(impls("torch.nn.functional:mse_loss", "torch.nn.functional:l1_loss"), run=run)
    assert spec.name == "regression" and {label for label, _ in seen} == {"mse_loss", "l1_loss"}


def test_a_loss_returning_one_value_per_element_is_inferred_with_output_any(tmp_path):
    f = tmp_path / "none.py"
    f.write_text("import torch.nn.functional as F\n"
                 "def a(input, target):\n    return F.mse_loss(input, target, reduction='none')\n"
                 "def b(input, target):\n    return (input - target) ** 2\n")
    spec = infer_spec(impls(f"{f}:a", f"{f}:b"))
    assert not spec.scalar and spec.arg("input").dims == spec.arg("target").dims


@pytest.mark.slow
def test_probing_through_the_isolated_runner_survives_a_crash_and_retries_larger(tmp_path):
    from losscmp.isolate import IsolatedRunner

    f = tmp_path / "crashy.py"
    f.write_text("import os\n"
                 "def mse(input, target):\n    return ((input - target) ** 2).mean()\n"
                 "def mse_crashy(input, target):\n"
                 "    if input.numel() < 20:\n        os.abort()  # a native library that dies on small inputs\n"
                 "    return ((input - target) ** 2).mean()\n")
    runner = IsolatedRunner(timeout=30)
    try:
        spec = infer_spec(impls(f"{f}:mse", f"{f}:mse_crashy"), run=runner)
    finally:
        runner.close()
    assert spec.name == "regression" and spec.size_range("B")[0] >= 20
