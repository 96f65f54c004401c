"""The search side of issue 15: degenerate inputs in every run, and minimal examples
that keep the mechanism (off kinks, ties, denormals and domain edges; same sign, same
component; no softmax over one class; a threshold true of the example shown)."""
import json

from losscmp.cli import main

from .conftest import FIXTURES


def run_json(tmp_path, capsys, *argv):
    out = tmp_path / "r.json"
    code = main([*argv, "--no-save", "--json", str(out)])
    capsys.readouterr()
    return code, json.loads(out.read_text())


def test_the_nan_slope_of_a_norm_at_zero_is_found_in_every_run(tmp_path, capsys):
    # Random draws never make x all zeros (100 cases, any regime, before issue 15).
    code, report = run_json(tmp_path, capsys, f"{FIXTURES}/degenerate.py:norm", f"{FIXTURES}/degenerate.py:norm_by_hand",
                            "--spec", "x: N real grad; N=1..16", "--examples", "6", "--no-minimize", "--no-explain")
    assert code == 1
    assert any("zeros" in d["regimes"] for d in report["divergences"]), report["divergences"]


def test_an_empty_mask_in_some_samples_is_drawn_in_every_run(tmp_path, capsys):
    code, report = run_json(tmp_path, capsys, f"{FIXTURES}/degenerate.py:recall", f"{FIXTURES}/degenerate.py:recall_eps",
                            "--spec", "segmentation", "--examples", "6", "--no-minimize", "--no-explain")
    assert code == 1
    assert any("empty masks" in d["regimes"] for d in report["divergences"]), report["divergences"]


def test_narrowed_regimes_leave_the_degenerate_inputs_out(tmp_path, capsys):
    code, report = run_json(tmp_path, capsys, f"{FIXTURES}/degenerate.py:norm", f"{FIXTURES}/degenerate.py:norm_by_hand",
                            "--spec", "x: N real grad; N=1..16", "--examples", "6", "--regimes", "standard", "--no-minimize", "--no-explain")
    assert report["cases_run"] == 6 and code == 0
