"""--jobs: the example budget shared among worker processes, merged deterministically."""
import json

import pytest

from losscmp.cli import main

from .conftest import NEEDS_FORK, FIXTURES

BCE = [f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits"]


def report(capsys, tmp_path, *extra):
    out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
    code = main([*BCE, "--spec", "binary", "--examples", "60", "--no-save", "--no-minimize", "--json", str(out), "-q", *extra])
    capsys.readouterr()
    data = json.loads(out.read_text())
    data.pop("seconds")
    return code, data


@pytest.mark.slow
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


def test_the_budget_is_shared_exactly():
    from losscmp.jobs import shares

    assert shares(5, 2) == [3, 2]
    assert shares(40, 3) == [14, 13, 13]
    assert shares(1, 3) == [1, 0, 0]


@NEEDS_FORK
def test_jobs_inherit_lambdas_and_agreeing_implementations_agree():
    from losscmp import audit
    from losscmp.load import Implementation, load_implementation, parse_ref
    from losscmp.settings import Settings
    from losscmp.spec import preset

    lam = Implementation(parse_ref("test_jobs:lam"), fn=lambda input, target: ((input - target) ** 2).mean())
    impls = [load_implementation("torch.nn.functional:mse_loss"), lam]
    result = audit(impls, preset("regression"), Settings.of(examples=12, minimize=False, jobs=3))
    assert result.agree and result.cases_run == 12 and sum(result.tally.values()) == 12


def test_empty_devices_is_one_line(capsys):
    assert main([*BCE, "--devices", ",,", "--no-save"]) == 2
    assert "name at least one device" in capsys.readouterr().err
