"""Regression tests for bugs found in review (adversarial use of the public interface)."""
import json
import textwrap

from losscmp.cli import main


def _write(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def test_complex_values_that_differ_only_in_imaginary_part_are_a_divergence(tmp_path, capsys):
    # Casting complex to float64 dropped the imaginary parts: the run said "agree".
    _write(tmp_path, "cplx.py", """
        import torch
        def plain(x, y): return torch.complex(x - y, torch.zeros_like(x)).sum()
        def rotated(x, y): return torch.complex(x - y, (x - y) * 1e-2).sum()
    """)
    code = main([f"{tmp_path}/cplx.py:plain", f"{tmp_path}/cplx.py:rotated", "--spec", "x: B real; y: B real; B=1..8",
                 "--examples", "5", "--no-save", "--no-explain", "--json", "-"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1, report
    assert report["divergences"][0]["kind"] == "value"


def test_complex_divergence_is_explained_without_crashing_the_run(tmp_path, capsys):
    # With the explanation on, the trace's complex summaries (real, imaginary pairs) were
    # reshaped to the tensor's shape: a RuntimeError that killed the whole run silently.
    _write(tmp_path, "cplx.py", """
        import torch
        def plain(x, y): return torch.complex(x - y, torch.zeros_like(x)).sum()
        def rotated(x, y): return torch.complex(x - y, (x - y) * 1e-2).sum()
    """)
    code = main([f"{tmp_path}/cplx.py:plain", f"{tmp_path}/cplx.py:rotated", "--spec", "x: B real; y: B real; B=1..8",
                 "--examples", "5", "--no-save", "--json", "-"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    d = report["divergences"][0]
    assert d["kind"] == "value"
    assert d["category"] == "semantic"
