"""Numbers and tensors for people: enough digits to tell values apart, nothing dropped."""
import math

import torch
from rich.console import Console

from losscmp.display import number_pair, number_text, numbers_text, tensor_pair_text, tensor_text


def test_close_large_values_print_distinguishably():
    a, b = number_pair(2684017.0, 2684019.0, torch.float32)
    assert (a, b) == ("2684017", "2684019")
    assert tensor_pair_text(torch.tensor(2684017.0), torch.tensor(2684019.0), labels=("ref", "fork")) == "ref 2684017 vs fork 2684019"
    assert "2684017" in tensor_text(torch.tensor([2684017.0, 2684019.0])) and "2684019" in tensor_text(torch.tensor([2684017.0, 2684019.0]))


def test_no_more_digits_than_the_dtype_needs():
    assert number_text(torch.tensor(0.1, dtype=torch.float32).item(), torch.float32) == "0.1"
    assert number_text(0.1) == "0.1"
    assert numbers_text([1.0, 1.0000001], torch.float32) == ["1", "1.0000001"]
    assert numbers_text([3.14159265, 2.0]) == ["3.14159", "2"]  # 6 digits suffice to tell them apart
    assert [number_text(x) for x in (math.inf, -math.inf, math.nan, -0.0, 1e30, 2.5e-7)] == ["inf", "-inf", "nan", "-0", "1e30", "2.5e-7"]


def test_large_tensors_are_summarised_with_where_they_matter():
    t = torch.arange(100.0).reshape(50, 2)
    weight = torch.zeros(50, 2)
    weight[33, 1] = 5.0
    text = tensor_text(t, highlight=weight)
    assert "shape (50, 2)" in text and "min 0 at (0, 0)" in text and "max 99 at (49, 1)" in text
    assert "(33, 1) = 67" in text
    a = torch.zeros(1000)
    b = a.clone()
    b[417] = 2e-3
    pair = tensor_pair_text(a, b, labels=("ref", "fork"))
    assert "at (417,): 0 vs 0.002" in pair


def test_the_report_summarises_a_large_minimised_input_instead_of_dropping_it(tmp_path):
    from losscmp.audit import Settings, audit
    from losscmp.load import load_implementation
    from losscmp.report import print_audit
    from losscmp.spec import parse_spec

    f = tmp_path / "big.py"
    f.write_text("def a(x):\n    return x.sum()\n"
                 "def b(x):\n    return x.sum() + (1.0 if x.numel() >= 30 else 0.0)\n")
    result = audit([load_implementation(f"{f}:a"), load_implementation(f"{f}:b")], parse_spec("x: N real grad; N=30..40"),
                   Settings.of(examples=3, save_dir=None))
    console = Console(record=True, width=200)
    print_audit(result, console)
    text = console.export_text()
    assert "x = 30 elements (float32, shape (30,)); " in text
