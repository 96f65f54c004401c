"""Runners: one table, chosen in one place; and the other interpreter's worker calls an
implementation exactly as ``losscmp.run.call`` does (the worker is a self-contained copy
of that logic, so this test is what keeps the two from drifting apart)."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from losscmp.engine import RUNNERS, InProcessRunner, make_runner
from losscmp.errors import UsageError
from losscmp.interpreter import InterpreterRunner, remote_implementation
from losscmp.isolate import IsolatedRunner
from losscmp.load import load_implementation, parse_ref
from losscmp.model import Case
from losscmp.run import call
from losscmp.settings import CALL_TERMS, RunnerKind, Settings
from losscmp.spec import preset

TRICKY = textwrap.dedent('''
    import warnings
    import torch

    def warns(input, target):
        warnings.warn("did not converge", RuntimeWarning)
        return ((input - target) ** 2).mean()

    def prints(input, target):
        print("hello from the loss")
        return ((input - target) ** 2).mean()

    def switches_off(input, target):
        # Every global switch a loss might flip on its way through.
        torch.set_grad_enabled(False)
        torch.set_default_dtype(torch.float64)
        torch.use_deterministic_algorithms(True)
        torch.set_anomaly_enabled(True)
        return ((input - target) ** 2).mean()

    def reports_switches(input, target):
        state = [torch.is_grad_enabled(), torch.get_default_dtype() == torch.float64,
                 torch.are_deterministic_algorithms_enabled(), torch.is_anomaly_enabled()]
        return (input * 0).sum() + sum(float(v) * 10 ** i for i, v in enumerate(state))

    def mutates(input, target):
        target.add_(1)
        return ((input - target) ** 2).mean()

    def detached(input, target):
        return ((input.detach() - target) ** 2).mean()

    def raises(input, target):
        raise ValueError("bad input\\nsecond line")

    def returns_list(input, target):
        return [1.0]

    def vector(input, target):
        return input * 2
''')
ORDER = ["warns", "prints", "switches_off", "reports_switches", "mutates", "detached", "raises", "returns_list", "vector"]


def test_the_runner_is_chosen_in_one_place_from_one_table():
    assert set(RUNNERS) == set(RunnerKind)
    assert Settings.of().execution.runner is RunnerKind.IN_PROCESS
    assert Settings.of(isolate=True).execution.runner is RunnerKind.ISOLATED
    assert Settings.of(isolate=True, pythons=(("a", sys.executable),)).execution.runner is RunnerKind.OTHER_INTERPRETER
    assert isinstance(make_runner(Settings.of()), InProcessRunner)
    runner = make_runner(Settings.of(isolate=True, timeout=5))
    try:
        assert isinstance(runner, IsolatedRunner)
    finally:
        runner.close()


def test_a_timeout_without_a_runner_that_can_stop_a_hung_call_is_refused_in_every_front_end():
    # One rule, in Settings; each front end names the knobs its own way (keywords here).
    with pytest.raises(UsageError, match=r"^--timeout needs --isolate, --python or --ray"):
        Settings.of(timeout=3)
    with pytest.raises(UsageError, match=r"^timeout= needs isolate=True, pythons= or ray="):
        Settings.of(timeout=3, terms=CALL_TERMS)
    assert Settings.of(timeout=3, isolate=True).execution.timeout == 3


@pytest.mark.slow
def test_the_other_interpreter_calls_an_implementation_as_the_in_process_call_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = tmp_path / "tricky.py"
    module.write_text(TRICKY)
    spec = preset("regression")
    x = torch.tensor([1.0, -2.0, 3.0])
    case = Case(tensors={"input": x, "target": torch.zeros_like(x)}, sizes={"B": 3})
    here = {name: call(load_implementation(f"{module}:{name}").fn, spec, case) for name in ORDER}
    with InterpreterRunner({name: sys.executable for name in ORDER}, timeout=60) as runner:
        there = {name: runner(remote_implementation(parse_ref(f"{module}:{name}")), spec, case) for name in ORDER}
    assert torch.equal(case.tensors["input"], x)  # neither path touched the case itself
    for name in ORDER:
        a, b = here[name], there[name]
        assert (b.status, b.error, b.mutated) == (a.status, a.error, a.mutated), (name, a.error, b.error)
        assert (a.value is None) == (b.value is None) and (a.value is None or torch.equal(a.value, b.value)), name
        assert a.grads.keys() == b.grads.keys(), name
        for g in a.grads:
            assert (a.grads[g] is None) == (b.grads[g] is None) and (a.grads[g] is None or torch.equal(a.grads[g], b.grads[g])), (name, g)
    # What it warned and printed stays with its outcome on both paths.
    assert "RuntimeWarning: did not converge" in here["warns"].output and "RuntimeWarning: did not converge" in there["warns"].output
    assert "hello from the loss" in here["prints"].output and "hello from the loss" in there["prints"].output
    # After a call that flipped every switch, the next call sees them as they were: grad on, the rest off.
    assert float(here["reports_switches"].value) == float(there["reports_switches"].value) == 1.0
    assert here["mutates"].mutated == ("target",) and here["raises"].status == "exception"
