"""The plugin and assert_losses_agree, tested the way pytest tests its own plugins: on throwaway projects."""
import shlex
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

from losscmp.errors import UsageError
from losscmp.pytest_plugin import case_folder
from losscmp.testing import assert_losses_agree

from .conftest import FIXTURES, REPO

pytest_plugins = ["pytester"]

NAIVE_BCE = "F.binary_cross_entropy(logits.sigmoid(), target)"  # saturates: diverges for |logits| > ~17
STABLE_BCE = "F.binary_cross_entropy_with_logits(logits, target)"

MODULE_LEVEL = '''
import torch.nn.functional as F

def my_bce(logits, target):
    return {body}

def test_bce(losscmp):
    losscmp.check(my_bce, "{fixtures}/bce.py:bce_with_logits", spec="binary", examples=40)
'''

LAMBDA = '''
import torch.nn.functional as F

def test_bce(losscmp):
    losscmp.check(lambda logits, target: {body}, F.binary_cross_entropy_with_logits, spec="binary", examples=40)
'''

EQUIVALENT = '''
import torch.nn.functional as F

def mean_square(input, target):
    return ((input - target) ** 2).mean()

def test_mse(losscmp):
    result = losscmp.check(F.mse_loss, mean_square, spec="regression", examples=30)
    assert result.cases_run == 30
'''

RUN = ("-p", "no:cacheprovider")


def _saved(pytester):
    return sorted((pytester.path / ".losscmp").rglob("*.json"))


def _replay_command(result) -> str:
    lines = [line for line in result.stdout.lines if "replay: pytest" in line]
    assert lines, result.stdout.str()
    return lines[-1].split("replay: ", 1)[1]


def test_options_are_listed_in_help(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*losscmp: differential testing*", "*--losscmp-examples*", "*--losscmp-seed*", "*--losscmp-device*",
                                 "*--losscmp-dtype*", "*--losscmp-rtol*", "*--losscmp-atol*", "*--losscmp-isolate*",
                                 "*--losscmp-timeout*", "*--losscmp-save-dir*", "*--losscmp-replay-only*"])


@pytest.mark.parametrize("device, said", [("tpu", "'tpu' is not cpu or cuda:N"), ("cuda:7", "cuda:7: *")])
def test_a_bad_device_stops_the_session_in_one_line_and_a_library_call_too(pytester, device, said):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    pytester.makepyfile(test_eq=EQUIVALENT)
    result = pytester.runpytest(*RUN, "--losscmp-device", device)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: --losscmp-device {said}"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    with pytest.raises(UsageError, match="^device"):
        assert_losses_agree(F.mse_loss, F.mse_loss, spec="regression", examples=2, device=device)


def test_agreeing_implementations_pass_and_are_summed_up(pytester):
    pytester.makepyfile(test_eq=EQUIVALENT)
    result = pytester.runpytest(*RUN)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*= losscmp =*", "1 check(s): 1 pair(s) checked, 30 case(s) run, 0 saved case(s) replayed",
                                 "divergences: none"])
    assert not _saved(pytester)


@pytest.mark.parametrize("template", [MODULE_LEVEL, LAMBDA], ids=["module-level function", "lambda"])
def test_a_divergence_is_saved_replayed_first_and_passes_once_fixed(pytester, template):
    pytester.makepyfile(test_div=template.format(body=NAIVE_BCE, fixtures=FIXTURES))
    first = pytester.runpytest(*RUN)
    first.assert_outcomes(failed=1)
    first.stdout.fnmatch_lines(["*DIVERGE*", "*minimal example*", "*replay: pytest test_div.py::test_bce --losscmp-replay-only"])
    saved = _saved(pytester)
    assert saved and all(p.parent.name == case_folder("test_div.py::test_bce") for p in saved)
    first.stdout.fnmatch_lines(["*= losscmp =*", "*1 pair(s) checked, 40 case(s) run, 0 saved case(s) replayed", "divergences: *value*",
                                "new cases saved in:", f"  .losscmp/{saved[0].parent.name}  (*)"])

    # Next run: the saved cases are replayed first and fail the test without fuzzing.
    again = pytester.runpytest(*RUN)
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*losscmp: a saved case still diverges (value)*", "*saved case: .losscmp/*",
                                f"*1 pair(s) checked, 0 case(s) run, {len(saved)} saved case(s) replayed ({len(saved)} still diverge)"])
    assert "corrupt" not in again.stdout.str()

    # Fixed: the saved cases replay as agreeing, then the fuzzing agrees too.
    pytester.makepyfile(test_div=template.format(body=STABLE_BCE, fixtures=FIXTURES))
    fixed = pytester.runpytest(*RUN)
    fixed.assert_outcomes(passed=1)
    fixed.stdout.fnmatch_lines([f"*1 pair(s) checked, 40 case(s) run, {len(saved)} saved case(s) replayed", "divergences: none"])


@pytest.mark.slow
def test_the_printed_replay_command_fails_from_the_project_root_while_it_diverges(pytester):
    pytester.makepyfile(test_div=MODULE_LEVEL.format(body=NAIVE_BCE, fixtures=FIXTURES))
    command = _replay_command(pytester.runpytest(*RUN))
    argv = shlex.split(command)
    assert argv[0] == "pytest"
    replay = pytester.run(sys.executable, "-m", "pytest", *argv[1:], *RUN)  # pytester runs it in the project root
    assert replay.ret == 1
    replay.stdout.fnmatch_lines(["*a saved case still diverges (value)*", "*0 case(s) run, * saved case(s) replayed*"])


def test_replay_only_runs_saved_cases_and_never_fuzzes(pytester):
    pytester.makepyfile(test_div=MODULE_LEVEL.format(body=NAIVE_BCE, fixtures=FIXTURES), test_eq=EQUIVALENT.replace("assert result.cases_run == 30", ""))
    # No saved case yet: nothing to replay, nothing fuzzed, the tests pass.
    empty = pytester.runpytest(*RUN, "--losscmp-replay-only")
    empty.assert_outcomes(passed=2)
    empty.stdout.fnmatch_lines(["2 check(s): 0 pair(s) checked, 0 case(s) run, 0 saved case(s) replayed"])
    assert not _saved(pytester)

    pytester.runpytest(*RUN).assert_outcomes(failed=1, passed=1)  # a fuzzing run saves the divergence
    replayed = pytester.runpytest(*RUN, "--losscmp-replay-only")
    replayed.assert_outcomes(failed=1, passed=1)
    replayed.stdout.fnmatch_lines([f"2 check(s): 1 pair(s) checked, 0 case(s) run, {len(_saved(pytester))} saved case(s) replayed*"])


def test_bad_input_to_a_check_fails_the_test_in_one_line_without_losscmp_frames(pytester):
    pytester.makepyfile(test_bad='''
import sys
import torch.nn.functional as F
from losscmp.testing import assert_losses_agree

def test_unknown_domain(losscmp):
    losscmp.check(F.mse_loss, F.l1_loss, spec="x: N D reel", examples=3)

def test_misspelt_label():
    assert_losses_agree("official=torch.nn.functional:mse_loss", F.l1_loss, spec="regression", examples=3,
                        pythons={"offical": sys.executable})
''')
    result = pytester.runpytest(*RUN)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*def test_unknown_domain(losscmp):*", ">*losscmp.check(*", "E*Error: *unknown domain 'reel'*"])
    result.stdout.fnmatch_lines(["*def test_misspelt_label():*", ">*assert_losses_agree(*",
                                 "E*UsageError: pythons offical: no implementation has that label*"])
    out = result.stdout.str()
    assert "src/losscmp/" not in out and "losscmp/testing.py" not in out  # no frame of losscmp's own


def test_assert_losses_agree_is_a_plain_assertion_with_losscmp_frames_hidden(pytester):
    pytester.makepyfile(test_plain=f'''
import torch.nn.functional as F
import pytest
from hypothesis import settings
from losscmp.testing import assert_losses_agree

def my_bce(logits, target):
    return {NAIVE_BCE}

def test_diverges():
    assert_losses_agree(my_bce, F.binary_cross_entropy_with_logits, spec="binary", examples=30)

def test_agrees():
    result = assert_losses_agree(lambda i, t: F.mse_loss(i, t), lambda i, t: ((i - t) ** 2).mean(), spec="regression", examples=20)
    assert result.agree and result.cases_run == 20 and result.labels == ("lambda", "lambda#2")

def test_raises_assertion_error():
    with pytest.raises(AssertionError, match="my_bce vs binary_cross_entropy_with_logits"):
        assert_losses_agree(my_bce, F.binary_cross_entropy_with_logits, spec="binary", examples=30)
''')
    result = pytester.runpytest(*RUN)
    result.assert_outcomes(failed=1, passed=2)
    result.stdout.fnmatch_lines(["*def test_diverges():*", ">*assert_losses_agree(*", "E*AssertionError: DIVERGE *my_bce vs binary_cross_entropy_with_logits",
                                 "E*losscmp: 2 implementations*",
                                 "E*my_bce vs binary_cross_entropy_with_logits*DIVERGE*", "E*replay: pytest test_plain.py::test_diverges",
                                 "test_plain.py:*: AssertionError"])
    assert "losscmp/testing.py" not in result.stdout.str()  # losscmp's own frames are hidden
    assert not (pytester.path / "fixtures").exists()  # nothing written unless asked
    result.stdout.fnmatch_lines(["3 check(s): 3 pair(s) checked, 80 case(s) run, 0 saved case(s) replayed"])


PROFILE_CHECKS = '''
import torch.nn.functional as F

def test_profile(losscmp):
    losscmp.check(F.mse_loss, lambda i, t: ((i - t) ** 2).mean(), spec="regression")

def test_call(losscmp):
    losscmp.check(F.mse_loss, lambda i, t: ((i - t) ** 2).mean(), spec="regression", examples=5)
'''


@pytest.mark.slow
def test_a_hypothesis_profile_sets_the_budget_unless_the_call_or_the_option_does(pytester):
    # Not "ci": Hypothesis loads its own "ci" profile on CI machines, and this in-process
    # run must not replace the profile the outer session runs under.
    pytester.makeconftest('from hypothesis import settings\nsettings.register_profile("nightly", max_examples=37)\n')
    pytester.makepyfile(test_eq=PROFILE_CHECKS)
    # Loading a profile is global to Hypothesis in this process: put ours back afterwards.
    ours = settings.get_current_profile_name()
    try:
        profile = pytester.runpytest(*RUN, "--hypothesis-profile", "nightly")
        profile.assert_outcomes(passed=2)
        profile.stdout.fnmatch_lines(["*2 pair(s) checked, 42 case(s) run*"])  # 37 + 5
        option = pytester.runpytest(*RUN, "--hypothesis-profile", "nightly", "--losscmp-examples", "7")
        option.stdout.fnmatch_lines(["*2 pair(s) checked, 12 case(s) run*"])  # 7 + 5
    finally:
        settings.load_profile(ours)
    default = pytester.runpytest(*RUN)
    default.stdout.fnmatch_lines(["*2 pair(s) checked, 105 case(s) run*"])  # 100 + 5


@pytest.mark.slow
def test_on_a_ci_machine_the_ci_profile_hypothesis_loads_by_itself_sets_the_budget(pytester, monkeypatch):
    # A subprocess: Hypothesis reads the CI variables when it is imported.
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest('from hypothesis import settings\n'
                          'settings.register_profile("ci", settings.get_profile("ci"), max_examples=37)\n')
    pytester.makepyfile(test_eq=PROFILE_CHECKS)
    result = pytester.runpytest_subprocess(*RUN)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*2 pair(s) checked, 42 case(s) run*"])  # 37 + 5


def test_case_folders_are_unique_per_test_and_readable():
    long = "x" * 120
    a, b = f"tests/test_a.py::test_{long}[1]", f"tests/test_b.py::test_{long}[1]"
    assert a[-100:] == b[-100:]
    assert case_folder(a) != case_folder(b)
    assert case_folder(a).startswith("test_a.py_test_xxx") and case_folder(a) == case_folder(a)


@pytest.mark.slow  # starts worker processes, each importing torch
def test_xdist_workers_save_per_test_and_the_summary_adds_them_up(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(
        test_one=MODULE_LEVEL.format(body=NAIVE_BCE, fixtures=FIXTURES),
        test_two=LAMBDA.format(body=NAIVE_BCE),
        test_three=EQUIVALENT,
    )
    result = pytester.runpytest_subprocess(*RUN, "-n", "2")
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(["*2 workers*", "*= losscmp =*", "3 check(s): 3 pair(s) checked, 110 case(s) run, 0 saved case(s) replayed",
                                 "divergences: *value*", "new cases saved in:"])
    folders = {p.parent.name for p in _saved(pytester)}
    assert folders == {case_folder("test_one.py::test_bce"), case_folder("test_two.py::test_bce")}
    for folder in folders:
        result.stdout.fnmatch_lines([f"  .losscmp/{folder}  (*)"])


CRASHES = '''
import os
import torch.nn.functional as F

def my_mse(input, target):
    {body}
    return F.mse_loss(input, target)

def test_mse(losscmp):
    losscmp.check(my_mse, F.mse_loss, spec="regression", examples=3, isolate=True, minimize=False)
'''


@pytest.mark.slow  # starts worker processes, each importing torch
def test_a_crash_saved_with_isolate_is_replayed_without_killing_pytest(pytester):
    pytester.makepyfile(test_crash=CRASHES.format(body="os._exit(3)"))
    first = pytester.runpytest(*RUN)
    first.assert_outcomes(failed=1)
    first.stdout.fnmatch_lines(["*my_mse vs mse_loss*DIVERGE*crash*"])
    assert _saved(pytester)
    # Replayed in a worker: the test fails, pytest lives on to report it.
    again = pytester.runpytest(*RUN, "--losscmp-replay-only")
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*a saved case still diverges (crash)*", "*= losscmp =*"])
    pytester.makepyfile(test_crash=CRASHES.format(body="pass"))
    pytester.runpytest(*RUN, "--losscmp-replay-only").assert_outcomes(passed=1)


@pytest.mark.slow  # starts worker processes, each importing torch
def test_with_a_gpu_visible_a_test_files_function_runs_isolated_in_a_clean_worker(pytester, monkeypatch):
    # Where torch sees a GPU, no worker is forked (tests/test_forking.py says why): the
    # test file's own function must then load by reference in a clean worker, although
    # loading the file by path gives a second function object from the same `def`.
    from losscmp import forking

    monkeypatch.setattr(forking, "_visible_accelerators", lambda: 1)
    pytester.makepyfile(test_crash=CRASHES.format(body="os._exit(3)"))
    first = pytester.runpytest(*RUN)
    first.assert_outcomes(failed=1)
    first.stdout.fnmatch_lines(["*my_mse vs mse_loss*DIVERGE*crash*"])
    pytester.makepyfile(test_crash=CRASHES.format(body="pass"))
    pytester.runpytest(*RUN, "--losscmp-replay-only").assert_outcomes(passed=1)


@pytest.mark.slow
def test_the_research_repo_example_passes(pytester):
    shutil.copytree(REPO / "examples" / "research_repo", pytester.path, dirs_exist_ok=True)
    # A subprocess: the example's conftest re-registers Hypothesis' "ci" profile, which
    # must not leak into this session; the default profile, whatever machine this is.
    result = pytester.runpytest_subprocess(*RUN, "--hypothesis-profile", "default")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*= losscmp =*", "2 check(s): 2 pair(s) checked, 200 case(s) run*", "divergences: none"])


def test_a_corrupt_saved_case_fails_the_test_in_one_line(pytester):
    pytester.makepyfile(test_eq=EQUIVALENT)
    folder = pytester.path / ".losscmp" / case_folder("test_eq.py::test_mse")
    folder.mkdir(parents=True)
    (folder / "broken.json").write_text("{not json")
    (folder / "broken.npz").write_bytes(b"")
    result = pytester.runpytest(*RUN)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E*AssertionError: losscmp: saved case .losscmp/*/broken.json cannot be replayed: corrupt repro: *"])
    assert "losscmp/testing.py" not in result.stdout.str()


def test_command_line_options_reach_plain_assert_losses_agree(pytester):
    pytester.makepyfile(test_plain='''
import torch
import torch.nn.functional as F
from losscmp.testing import assert_losses_agree

def test_options():
    result = assert_losses_agree(F.mse_loss, lambda i, t: ((i - t) ** 2).mean(), spec="regression")
    assert result.cases_run == 9 and result.audit.settings.execution.dtype == torch.float64 and result.audit.settings.tolerances.atol == 0.5

def test_the_call_wins():
    assert assert_losses_agree(F.mse_loss, lambda i, t: ((i - t) ** 2).mean(), spec="regression", examples=3).cases_run == 3
''')
    pytester.runpytest(*RUN, "--losscmp-examples", "9", "--losscmp-dtype", "float64", "--losscmp-atol", "0.5").assert_outcomes(passed=2)
    # Replay-only: a plain call with no saved cases passes without fuzzing.
    pytester.makepyfile(test_plain='''
import torch.nn.functional as F
from losscmp.testing import assert_losses_agree

def test_nothing_fuzzed():
    result = assert_losses_agree(F.mse_loss, lambda i, t: ((i - t) ** 2).mean(), spec="regression")
    assert result.audit is None and result.cases_run == 0 and result.agree
''')
    replay_only = pytester.runpytest(*RUN, "--losscmp-replay-only")
    replay_only.assert_outcomes(passed=1)
    replay_only.stdout.fnmatch_lines(["1 check(s): 0 pair(s) checked, 0 case(s) run, 0 saved case(s) replayed"])


def test_a_saved_case_is_named_as_typed_from_a_subfolder_of_the_project(tmp_path, monkeypatch):
    # One path convention (project.shown_path) for the report, replay and assertions: from a
    # subfolder, a saved case in the same project is named relative to it, not absolutely.
    (tmp_path / "pyproject.toml").write_text("")
    saved, sub = tmp_path / "saved", tmp_path / "sub"
    sub.mkdir()
    pair = [f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError):
        assert_losses_agree(*pair, spec="binary", examples=30, save_dir=saved, explain=False)
    monkeypatch.chdir(sub)
    with pytest.raises(AssertionError) as failure:
        assert_losses_agree(*pair, spec="binary", examples=30, save_dir=saved, explain=False)
    lines = [line for line in str(failure.value).splitlines() if "saved case: " in line]
    assert lines and all(line.split("saved case: ")[1].startswith("../saved/") for line in lines), lines


KNOBS = {"examples": 5, "seed": 3, "dtype": "float64", "rtol": 1e-3, "atol": 1e-4}
SAME_SETTINGS = '''
import torch.nn.functional as F

def test_settings(losscmp):
    s = losscmp.check(F.mse_loss, "{fixtures}/regression.py:mean_square", spec="regression").audit.settings
    open("settings.txt", "w").write(repr((s.search, s.execution, s.tolerances, s.reference)))
'''


def test_every_front_end_builds_the_same_settings_and_refuses_a_bad_knob_in_its_own_terms(pytester, monkeypatch, capsys):
    import losscmp.cli as cli

    pair = ["torch.nn.functional:mse_loss", f"{FIXTURES}/regression.py:mean_square"]
    # The command line: what main() built, as audit() received it.
    built = []
    real_audit = cli.audit
    monkeypatch.setattr(cli, "audit", lambda impls, spec, settings, **kw: built.append(settings) or real_audit(impls, spec, settings, **kw))
    argv = [*pair, "--spec", "regression", "--no-save", "--no-explain", *(f"--{k}={v}" for k, v in KNOBS.items())]
    assert cli.main(argv) == 0
    (from_cli,) = built
    # A plain call.
    from_call = assert_losses_agree(*pair, spec="regression", **KNOBS).audit.settings
    # The plugin's options, read by a test of a throwaway project.
    pytester.makepyfile(test_same=SAME_SETTINGS.format(fixtures=FIXTURES))
    pytester.runpytest(*RUN, *(f"--losscmp-{k}={v}" for k, v in KNOBS.items())).assert_outcomes(passed=1)
    from_plugin = (pytester.path / "settings.txt").read_text()
    for s in (from_cli, from_call):
        assert repr((s.search, s.execution, s.tolerances, s.reference)) == from_plugin
    assert (from_cli.search.examples, from_cli.search.seed, from_cli.tolerances.rtol) == (5, 3, 1e-3)
    # A bad knob: refused once, by Settings, and named as each front end names it.
    capsys.readouterr()
    assert cli.main([*pair, "--spec", "regression", "--no-save", "--rtol=-1"]) == 2
    assert capsys.readouterr().err.strip() == "losscmp: error: --rtol must be a finite number >= 0, not -1.0"
    with pytest.raises(UsageError, match=r"^rtol= must be a finite number >= 0, not -1$"):
        assert_losses_agree(*pair, spec="regression", rtol=-1)
    with pytest.raises(UsageError, match=r"^timeout= needs isolate=True, pythons= or ray="):
        assert_losses_agree(*pair, spec="regression", timeout=3)
    bad = pytester.runpytest(*RUN, "--losscmp-rtol=-1")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: --losscmp-rtol must be a finite number >= 0, not -1.0"])
