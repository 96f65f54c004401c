"""--jobs N: the example budget shared among N forked processes, merged into one report."""
from __future__ import annotations

import json

import pytest

from losscmp.audit import Settings, audit
from losscmp.cli import main
from losscmp.load import Implementation, load_implementation, parse_ref
from losscmp.parallel import audit_jobs, shares
from losscmp.spec import preset

from .conftest import FIXTURES

BCE = [f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits"]


def test_the_budget_is_shared_exactly():
    assert shares(5, 2) == [3, 2]
    assert shares(40, 3) == [14, 13, 13]
    assert shares(1, 3) == [1]


def _report(tmp_path, name: str, jobs: int) -> dict:
    out = tmp_path / f"{name}.json"
    code = main([*BCE, "--spec", "binary", "--examples", "30", "--no-save", "--jobs", str(jobs), "--json", str(out), "-q"])
    assert code == 1  # the BCE pair diverges on saturated logits
    report = json.loads(out.read_text())
    report.pop("seconds")
    return report


def test_same_seed_and_same_jobs_give_the_same_report(tmp_path, capsys):
    first, second = _report(tmp_path, "a", 2), _report(tmp_path, "b", 2)
    assert first == second
    assert first["cases_run"] == 30
    single = _report(tmp_path, "c", 1)
    # Other cases, the same finding, minimised alike.
    assert {(tuple(d["pair"]), d["kind"]) for d in first["divergences"]} == {(tuple(d["pair"]), d["kind"]) for d in single["divergences"]}
    assert all(d["minimized_sizes"] for d in first["divergences"])


def test_jobs_inherit_lambdas_and_agreeing_implementations_agree():
    lam = Implementation(parse_ref("test_parallel:lam"), fn=lambda input, target: ((input - target) ** 2).mean())
    impls = [load_implementation("torch.nn.functional:mse_loss"), lam]
    result = audit_jobs(impls, preset("regression"), Settings(examples=12, save_dir=None, minimize=False), 3)
    assert result.agree and result.cases_run == 12
    assert result.implementations == tuple(impls)


def test_bad_jobs_is_a_one_line_error(capsys):
    assert main([*BCE, "--spec", "binary", "--jobs", "0", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert err == "losscmp: error: --jobs must be at least 1, not 0\n"
