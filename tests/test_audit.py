"""The example pairs: every divergence found in the default budget, no false alarms."""
import json

import pytest

from losscmp.findings import Alone, Pair
from losscmp.audit import Settings, audit
from losscmp.cli import main
from losscmp.load import load_implementation
from losscmp.spec import preset

from .conftest import FIXTURES, PLANTED

DEFAULT_BUDGET = Settings().search.examples


def impls(*refs):
    return [load_implementation(r) for r in refs]


@pytest.mark.parametrize(
    "a, b, spec, kinds",
    [
        ("bce.py:bce_on_sigmoid", "bce.py:bce_with_logits", "binary", {"value", "gradient"}),
        ("cross_entropy.py:log_of_softmax", "cross_entropy.py:log_softmax_nll", "classification", {"nonfinite"}),
        ("regression.py:huber", "regression.py:smooth_l1", "regression", {"value", "gradient"}),
    ],
)
def test_divergent_pairs_are_found_within_the_default_budget(a, b, spec, kinds):
    result = audit(impls(f"{FIXTURES}/{a}", f"{FIXTURES}/{b}"), preset(spec), Settings.of(minimize=False, explain=False))
    assert result.cases_run == DEFAULT_BUDGET
    found = {d.kind for d in result.divergences}
    assert kinds <= found, found
    assert all(d.score > 1 for d in result.divergences)


@pytest.mark.parametrize(
    "a, b, spec",
    [
        ("torch.nn.functional:cross_entropy", f"{FIXTURES}/cross_entropy.py:log_softmax_nll", "classification"),
        ("torch.nn.functional:mse_loss", f"{FIXTURES}/regression.py:mean_square", "regression"),
    ],
)
@pytest.mark.slow
def test_equivalent_pairs_never_raise_an_alarm(a, b, spec):
    result = audit(impls(a, b), preset(spec), Settings.of(examples=500, save_dir=None, minimize=False))
    assert result.cases_run == 500
    regimes = {d.case.recipe.regime for d in result.divergences}
    assert result.agree, [(d.kind, d.verdict.detail, regimes) for d in result.divergences]


@pytest.mark.slow
def test_same_seed_same_report(tmp_path):
    reports = []
    for run in range(2):
        path = tmp_path / f"r{run}.json"
        code = main([f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits", "--spec", "binary",
                     "--seed", "7", "--examples", "60", "--save-dir", str(tmp_path / "cases"), "--json", str(path)])
        assert code == 1
        data = json.loads(path.read_text())
        data.pop("seconds")
        reports.append(data)
    # The second run first replays what the first saved (as the fixture does); the rest is the same report.
    replayed = [r.pop("replayed") for r in reports]
    assert replayed[0] == [] and sorted(r["path"] for r in replayed[1]) == sorted(d["repro"] for d in reports[0]["divergences"])
    assert reports[0] == reports[1]
    other = tmp_path / "other.json"
    main([f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits", "--spec", "binary",
          "--seed", "8", "--examples", "60", "--no-save", "--json", str(other)])
    assert json.loads(other.read_text())["divergences"] != reports[0]["divergences"]


def test_json_report_fields(tmp_path):
    path = tmp_path / "r.json"
    main([f"{FIXTURES}/regression.py:huber", f"{FIXTURES}/regression.py:smooth_l1", "--spec", "regression",
          "--examples", "30", "--save-dir", str(tmp_path / "cases"), "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["implementations"] == ["huber", "smooth_l1"] and data["cases_run"] == 30
    for d in data["divergences"]:
        assert d["pair"] == ["huber", "smooth_l1"] and d["kind"] in ("value", "gradient") and d["score"] > 1
        assert set(d["original_sizes"]) == {"B"} and d["minimized_sizes"]["B"] <= d["original_sizes"]["B"]
        assert d["evaluations"] > 0 and d["repro"].endswith(".json")
        assert {"category", "unstable_side", "location"} <= set(d)


def test_nondeterminism_is_reported_as_such_not_as_a_pair_divergence():
    result = audit(impls(f"{PLANTED}:mse", f"{PLANTED}:noisy_mse"), preset("regression"), Settings.of(examples=30, save_dir=None, minimize=False, explain=False))
    kinds = {(d.subject, d.kind) for d in result.divergences}
    assert (Alone("noisy_mse"), "nondeterminism") in kinds
    assert not any(s == Pair("mse", "noisy_mse") for s, _ in kinds)


def test_a_failure_whose_message_names_changing_memory_amounts_is_not_nondeterminism():
    # Seen on a GPU: CUDA's out-of-memory message says how much is free at that moment.
    result = audit(impls(f"{PLANTED}:mse", f"{PLANTED}:out_of_memory_alike"), preset("regression"),
                   Settings.of(examples=20, save_dir=None, minimize=False, explain=False))
    kinds = {(d.subject, d.kind) for d in result.divergences}
    assert kinds == {(Pair("mse", "out_of_memory_alike"), "exception")}


def test_a_real_divergence_is_still_reported_beside_nondeterminism():
    result = audit(impls("torch.nn.functional:l1_loss", f"{PLANTED}:noisy_mse"), preset("regression"), Settings.of(examples=30, save_dir=None, minimize=False, explain=False))
    kinds = {(d.subject, d.kind) for d in result.divergences}
    assert (Alone("noisy_mse"), "nondeterminism") in kinds
    assert (Pair("l1_loss", "noisy_mse"), "value") in kinds


def test_input_mutation_is_a_finding():
    result = audit(impls(f"{PLANTED}:mse", f"{PLANTED}:mse_inplace"), preset("regression"), Settings.of(examples=20, save_dir=None, minimize=False, explain=False))
    mutation = [d for d in result.divergences if d.kind == "mutation"]
    assert mutation and mutation[0].subject == Alone("mse_inplace")
    assert "target" in mutation[0].verdict.detail
    # Each side got its own copy: the mutation did not leak into the comparison.
    assert not [d for d in result.divergences if d.subject == Pair("mse", "mse_inplace")]


def test_reference_mode_compares_against_the_reference_only():
    result = audit(
        impls(f"{FIXTURES}/regression.py:mean_square", "torch.nn.functional:mse_loss", f"{FIXTURES}/regression.py:huber"),
        preset("regression"),
        Settings.of(examples=20, save_dir=None, minimize=False, explain=False, reference="mse_loss"),
    )
    assert {d.subject for d in result.divergences} == {Pair("mse_loss", "huber")}


RECIPES_SCRIPT = """
import hashlib, importlib, sys
if sys.argv[1] in ("preimport", "hypothesis_first"):
    import losscmp.minimize  # a local module full of float literals
if sys.argv[1] == "hypothesis_first":  # another Hypothesis test ran first, with the literals in its pool
    from hypothesis import given, seed, settings
    from losscmp.generate import recipes
    from losscmp.spec import preset as _preset
    given(recipes(_preset("regression")))(settings(max_examples=300, database=None)(seed(1)(lambda recipe: None)))()
audit_module = importlib.import_module("losscmp.audit")
from losscmp.audit import Settings, audit
from losscmp.load import load_implementation
from losscmp.spec import preset
seen, original = [], audit_module.build_case
audit_module.build_case = lambda spec, r, **kw: (seen.append(r), original(spec, r, **kw))[1]
impls = [load_implementation(sys.argv[2] + ":huber"), load_implementation(sys.argv[2] + ":smooth_l1")]
audit(impls, preset("regression"), Settings.of(minimize=False, explain=False))  # the cases drawn are under test
print(hashlib.sha256(repr(seen).encode()).hexdigest())
"""


@pytest.mark.slow
def test_same_seed_same_cases_whatever_else_the_process_imported():
    """Hypothesis harvests float literals from local modules; our cases must not depend on them,
    nor on a test that drew with them before (Hypothesis caches each pool of constants)."""
    import subprocess
    import sys

    digests = {
        mode: subprocess.run([sys.executable, "-c", RECIPES_SCRIPT, mode, f"{FIXTURES}/regression.py"],
                             capture_output=True, text=True, check=True).stdout.strip()
        for mode in ("plain", "preimport", "hypothesis_first")
    }
    assert digests["plain"] == digests["preimport"] == digests["hypothesis_first"]


def test_local_constants_are_kept_out_of_exploration(tmp_path, monkeypatch):
    import importlib

    from hypothesis.internal.conjecture import providers

    from losscmp.audit import _without_local_constants

    (tmp_path / "constants_for_hypothesis.py").write_text("VALUES = [0.25, 0.5, -3.5, 123.25]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("constants_for_hypothesis")
    assert len(providers._get_local_constants().floats) >= 4
    with _without_local_constants():
        assert not providers._get_local_constants().floats
    assert len(providers._get_local_constants().floats) >= 4


def test_an_implementation_calling_sys_exit_is_a_finding(tmp_path):
    f = tmp_path / "exits.py"
    f.write_text("import sys, torch.nn.functional as F\n"
                 "def mse(input, target):\n    return F.mse_loss(input, target)\n"
                 "def quits(input, target):\n    if input.abs().max() > 3: sys.exit()\n    return F.mse_loss(input, target)\n")
    result = audit(impls(f"{f}:mse", f"{f}:quits"), preset("regression"), Settings.of(examples=50, save_dir=None, minimize=False, explain=False))
    assert {d.kind for d in result.divergences} == {"exception"}


def test_a_repro_that_cannot_be_written_does_not_lose_the_finding(tmp_path, capsys):
    f = tmp_path / "sets.py"
    f.write_text("def a(input, target, alpha):\n    return ((input - target) ** 2).mean()\n"
                 "def b(input, target, alpha):\n    return ((input - target) ** 2).mean() * 2\n")
    code = main([f"{f}:a", f"{f}:b", "--spec", "input: B real grad; target: B real; alpha={1, 2}", "--examples", "5",
                 "--no-explain", "--save-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 1 and "repro not saved: TypeError: cannot store a set" in out
    assert not list((tmp_path / "out").glob("*.npz"))  # no orphan tensors file


def test_json_on_stdout_is_pure_json(capsys):
    code = main([f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits", "--examples", "12", "--no-save", "--no-explain", "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 1 and json.loads(out)["cases_run"] == 12 and "DIVERGE" in err


@pytest.mark.parametrize("flag", [["--rtol", "inf"], ["--atol", "nan"], ["--rtol", "-1"]])
def test_tolerances_must_be_finite(capsys, flag):
    assert main([f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits", "--no-save", *flag]) == 2
    assert "must be a finite number >= 0" in capsys.readouterr().err
