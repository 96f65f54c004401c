"""Workers are never forked where a forked child cannot run torch.

On a machine where torch sees a GPU, the first backward in a process starts autograd's
device threads and torch then refuses every backward in a child forked from it; the
first GPU run of this suite (H200, torch 2.11+cu130) showed forked ``--jobs`` and
``--isolate`` workers reporting every implementation as raising that error, a false
finding.  Here (no GPU) the condition is simulated by making torch report one visible
accelerator to losscmp's fork check; tests/test_gpu.py and a GPU run cover the real one.
"""
from __future__ import annotations

import json

import pytest
import torch

from losscmp import forking
from losscmp.audit import Settings, audit
from losscmp.cli import main
from losscmp.isolate import IsolatedRunner
from losscmp.load import Implementation, load_implementation, parse_ref
from losscmp.run import call
from losscmp.spec import preset

from .conftest import PLANTED

REGRESSION = preset("regression")


@pytest.fixture
def gpu_visible(monkeypatch):
    monkeypatch.setattr(forking, "_visible_accelerators", lambda: 1)


def test_a_fork_is_refused_where_torch_sees_an_accelerator(gpu_visible):
    assert forking.torch_survives_fork() is False


def test_on_this_machine_a_fork_is_allowed_exactly_when_no_accelerator_is_visible():
    visible = torch.cuda.device_count() > 0
    assert forking.torch_survives_fork() is (not visible and not torch.cuda.is_initialized())


@pytest.mark.slow  # starts worker processes, each importing torch
def test_jobs_start_clean_workers_that_load_by_reference_and_give_the_forked_report(gpu_visible, tmp_path, capsys):
    refs = [f"{PLANTED}:mse", "torch.nn.functional:l1_loss"]

    def report(*extra):
        out = tmp_path / "r.json"
        code = main([*refs, "--spec", "regression", "--examples", "12", "--no-explain", "--no-minimize", "--no-save", "--json", str(out), *extra])
        capsys.readouterr()
        return code, json.loads(out.read_text())

    code, clean = report("--jobs", "2")
    forking_allowed = pytest.MonkeyPatch()
    forking_allowed.setattr(forking, "_visible_accelerators", lambda: 0)
    try:
        code_forked, forked = report("--jobs", "2")
    finally:
        forking_allowed.undo()
    assert code == code_forked == 1
    assert clean["tally"] == forked["tally"] and clean["cases_run"] == forked["cases_run"] == 12


def test_jobs_with_a_lambda_say_why_in_one_line_instead_of_forking(gpu_visible):
    from losscmp.errors import UsageError

    lam = Implementation(parse_ref("test_forking:lam"), fn=lambda input, target: ((input - target) ** 2).mean())
    with pytest.raises(UsageError, match="importable by reference here .*autograd's device threads.*lam cannot be"):
        audit([load_implementation("torch.nn.functional:mse_loss"), lam], REGRESSION, Settings.of(examples=4, minimize=False, jobs=2))


def test_isolating_a_lambda_says_why_in_one_line_instead_of_forking(gpu_visible):
    from losscmp.isolate import IsolationError

    lam = Implementation(parse_ref("test_forking:lam"), fn=lambda input, target: ((input - target) ** 2).mean())
    case = next(iter(_cases()))
    with IsolatedRunner(timeout=60) as runner, pytest.raises(IsolationError, match="lam has no importable reference.*autograd"):
        runner(lam, REGRESSION, case)


@pytest.mark.slow
def test_isolating_a_file_function_after_a_backward_here_still_gets_gradients(gpu_visible):
    impl = load_implementation(f"{PLANTED}:mse")
    case = next(iter(_cases()))
    here = call(impl.fn, REGRESSION, case)  # a backward in this process first, as in any test suite
    with IsolatedRunner(timeout=120) as runner:
        there = runner(impl, REGRESSION, case)
    assert there.status == "ok", there.error
    assert torch.equal(there.value, here.value) and torch.equal(there.grads["input"], here.grads["input"])


def _cases():
    from losscmp.generate import Recipe, build_case

    yield build_case(REGRESSION, Recipe(sizes=(("B", 5),), seed=0))
