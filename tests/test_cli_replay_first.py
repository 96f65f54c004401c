"""The command line replays the cases saved by earlier runs first, as the pytest fixture
does, and lists them in the JSON report under ``replayed``."""
import json
import subprocess
import sys
import textwrap

import pytest

from losscmp.cli import main

DIVERGING = textwrap.dedent('''
    def mse(input, target):
        return ((input - target) ** 2).mean()

    def fork(input, target):
        return ((input - target) ** 2).mean() * 1.5
''')
FIXED = DIVERGING.replace(" * 1.5", "")


def _run(tmp_path, capsys, name, *refs):
    report = tmp_path / f"{name}.json"
    code = main([*refs, "--spec", "regression", "--examples", "20", "--no-explain",
                 "--save-dir", str(tmp_path / "saved"), "--json", str(report)])
    return code, json.loads(report.read_text()), capsys.readouterr().out


@pytest.mark.slow
def test_saved_cases_are_replayed_first_and_listed_in_the_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "losses.py").write_text(DIVERGING)
    refs = ("losses.py:mse", "losses.py:fork")
    code, first, _ = _run(tmp_path, capsys, "first", *refs)
    assert code == 1 and first["replayed"] == [] and first["divergences"]
    saved = sorted(p.name for p in (tmp_path / "saved").glob("*.json"))
    assert saved

    code, again, text = _run(tmp_path, capsys, "again", *refs)
    assert code == 1 and not again["agree"]
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in again["replayed"]) == saved
    assert all(r["kind"] == r["recorded"] and r["kind"] in ("value", "gradient") and r["pair"] == ["mse", "fork"] for r in again["replayed"])
    assert f"replayed {len(saved)} saved case(s) first" in text and "still diverges (value)" in " ".join(text.split())

    # Fixed in place: the saved cases agree now, and so does the run (a fresh process, as a
    # user's next run is: this one has the old module loaded).
    (tmp_path / "losses.py").write_text(FIXED)
    done = subprocess.run([sys.executable, "-m", "losscmp", *refs, "--spec", "regression", "--examples", "20", "--no-explain",
                           "--save-dir", "saved", "--json", "fixed.json"], capture_output=True, text=True, timeout=300)
    fixed = json.loads((tmp_path / "fixed.json").read_text())
    assert [r["kind"] for r in fixed["replayed"]] == [None] * len(saved) and all(r["compared"] for r in fixed["replayed"])
    assert done.returncode == 0 and fixed["agree"] and "agrees now" in done.stdout


def test_a_saved_case_of_another_loss_with_the_same_labels_is_not_replayed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "losses.py").write_text(DIVERGING)
    (tmp_path / "other.py").write_text(FIXED)
    assert _run(tmp_path, capsys, "first", "losses.py:mse", "losses.py:fork")[0] == 1
    code, report, _ = _run(tmp_path, capsys, "other", "mse=other.py:mse", "fork=other.py:fork")
    assert code == 0 and report["replayed"] == []


def test_a_search_that_finds_nothing_does_not_say_all_agree_while_a_saved_case_still_diverges(tmp_path, capsys, monkeypatch):
    """The last line of the report must not contradict the exit code and the JSON's ``agree``:
    the fork differs only past 40 elements, the second run draws at most 8, and its saved
    case (B > 40) still diverges (was 'All implementations agree on 5 cases.', exit 1)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "losses.py").write_text(DIVERGING.replace(" * 1.5", " * (1.5 if input.numel() > 40 else 1.0)"))
    refs = ["losses.py:mse", "losses.py:fork"]
    assert main([*refs, "--spec", "regression", "--examples", "30", "--no-explain", "--save-dir", "saved", "-q"]) == 1
    capsys.readouterr()
    code = main([*refs, "--spec", "regression", "--examples", "5", "--max-size", "8", "--no-explain", "--save-dir", "saved",
                 "--json", "again.json", "--html", "again.html"])
    text = " ".join(capsys.readouterr().out.split())
    report = json.loads((tmp_path / "again.json").read_text())
    assert code == 1 and not report["agree"] and report["tally"] == {"agree": 5} and not report["divergences"]
    assert "All implementations agree" not in text, text
    assert "No divergence in the 5 new cases; 1 saved case(s) still diverge (above)." in text, text
    page = (tmp_path / "again.html").read_text()  # the page attached to CI says it too, as the JSON does
    assert "Saved cases replayed first (1)" in page and "still diverges (value)" in page, page[:3000]
