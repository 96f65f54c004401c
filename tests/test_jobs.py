"""--jobs: the example budget shared among worker processes, merged deterministically."""
import json

from losscmp.cli import main

from .conftest import FIXTURES

BCE = [f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits"]


def report(capsys, tmp_path, *extra):
    out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
    code = main([*BCE, "--spec", "binary", "--examples", "60", "--no-save", "--no-minimize", "--json", str(out), "-q", *extra])
    capsys.readouterr()
    data = json.loads(out.read_text())
    data.pop("seconds")
    return code, data


def test_two_jobs_share_the_budget_and_the_same_seed_gives_the_same_report(capsys, tmp_path):
    code, first = report(capsys, tmp_path, "--jobs", "2")
    _, again = report(capsys, tmp_path, "--jobs", "2")
    assert code == 1 and first == again
    assert first["cases_run"] == 60 and sum(first["tally"].values()) == 60
    assert {d["kind"] for d in first["divergences"]} >= {"value"}


def test_bad_jobs_and_devices_are_one_line(capsys):
    assert main([*BCE, "--jobs", "0", "--no-save"]) == 2
    assert "jobs must be a whole number >= 1" in capsys.readouterr().err
    assert main([*BCE, "--devices", "tpu:0", "--no-save"]) == 2
    assert "is not cpu or cuda:N" in capsys.readouterr().err
