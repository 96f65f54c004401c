import math

import pytest
import torch

from losscmp.findings import Pair
from losscmp.compare import DEFAULT_TOLERANCES, Tolerance, compare_outcomes, diff_message, diff_tensors
from losscmp.run import Outcome


def test_default_tolerances_match_torch_testing():
    # assert_close's own defaults, probed at the boundary
    for dtype, (rtol, atol) in DEFAULT_TOLERANCES.items():
        if dtype.is_complex:
            continue
        expected = torch.tensor([1.0], dtype=dtype)
        inside = expected + (atol + rtol) * 0.5
        torch.testing.assert_close(inside, expected)
        assert diff_tensors("v", inside, expected, Tolerance.for_dtype(dtype)).score <= 1


def test_mismatch_message_reads_like_torch_testing():
    expected = torch.zeros(2, 5)
    actual = expected.clone()
    actual[1, 3] = 4.1e-3
    actual[0, 0] = 2e-3
    d = diff_tensors("gradient w.r.t. x", actual, expected, Tolerance(1.3e-6, 1e-5))
    msg = diff_message(d, ("A", "B"))
    assert "mismatched elements: 2 / 10 (20.0%)" in msg
    assert "greatest absolute difference 0.0041 at index (1, 3) (up to 1e-05 allowed)" in msg
    assert d.score == pytest.approx(410, rel=1e-6)


def test_nonfinite_on_one_side_only():
    d = diff_tensors("value", torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]), Tolerance(1e-6, 1e-6))
    assert math.isinf(d.score) and d.nonfinite_mismatch == 1
    same = diff_tensors("value", torch.tensor([float("nan"), float("inf")]), torch.tensor([float("nan"), float("inf")]), Tolerance(0, 0))
    assert same.score == 0


def ok(value, **grads):
    return Outcome("ok", value=torch.tensor(value), grads={k: torch.tensor(v) for k, v in grads.items()})


def test_verdict_kinds():
    tol = Tolerance(1.3e-6, 1e-5)
    assert compare_outcomes(Pair("a", "b"), ok(1.0, x=[1.0]), ok(1.0, x=[1.0]), tol).kind is None
    assert compare_outcomes(Pair("a", "b"), ok(1.0, x=[1.0]), ok(2.0, x=[1.0]), tol).kind == "value"
    assert compare_outcomes(Pair("a", "b"), ok(1.0, x=[1.0]), ok(1.0, x=[1.5]), tol).kind == "gradient"
    assert compare_outcomes(Pair("a", "b"), ok(1.0, x=[1.0]), ok(1.0, x=[float("nan")]), tol).kind == "nonfinite"
    missing = Outcome("ok", value=torch.tensor(1.0), grads={"x": None})
    v = compare_outcomes(Pair("a", "b"), ok(1.0, x=[1.0]), missing, tol)
    assert v.kind == "gradient" and "no gradient flows in b" in v.detail
    boom = Outcome("exception", error="raised ValueError: no")
    v = compare_outcomes(Pair("a", "b"), ok(1.0), boom, tol)
    assert v.kind == "exception" and v.detail.startswith("b raised ValueError")
    assert compare_outcomes(Pair("a", "b"), boom, boom, tol).kind is None  # both refuse the input
    assert compare_outcomes(Pair("a", "b"), ok([1.0, 2.0]), ok(1.0), tol).kind == "shape"


def test_zero_tolerance_is_exact_equality():
    d = diff_tensors("g", torch.tensor([0.0, 1, 2]), torch.tensor([0.0, 5, 9]), Tolerance(0, 0))
    assert math.isinf(d.score) and d.mismatched == 2
    assert diff_tensors("g", torch.tensor([0.0, 1]), torch.tensor([0.0, 1]), Tolerance(0, 0)).score == 0
