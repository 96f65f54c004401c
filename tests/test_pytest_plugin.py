"""The plugin, tested the way pytest tests its own plugins: on a throwaway project."""

from .conftest import FIXTURES

pytest_plugins = ["pytester"]

DIVERGENT = f'''
import torch.nn.functional as F

def bce_on_sigmoid(logits, target):
    return F.binary_cross_entropy(logits.sigmoid(), target)

def test_bce(losscmp):
    losscmp.check(bce_on_sigmoid, "{FIXTURES}/bce.py:bce_with_logits", spec="binary", examples=60)
'''

EQUIVALENT = '''
import torch.nn.functional as F

def mean_square(input, target):
    return ((input - target) ** 2).mean()

def test_mse(losscmp):
    result = losscmp.check(F.mse_loss, mean_square, spec="regression", examples=80)
    assert result.cases_run == 80
'''


def test_options_are_listed_in_help(pytester):
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*losscmp: differential testing*", "*--losscmp-examples*", "*--losscmp-seed*", "*--losscmp-save-dir*"])


def test_agreeing_implementations_pass(pytester):
    pytester.makepyfile(test_eq=EQUIVALENT)
    pytester.runpytest("-q", "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_divergence_fails_with_a_report_and_saves_then_replays_the_case(pytester):
    pytester.makepyfile(test_div=DIVERGENT)
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*bce_on_sigmoid vs bce_with_logits*DIVERGE*", "*minimised in*"])
    saved = sorted((pytester.path / "fixtures" / "losscmp").rglob("*.json"))
    assert saved, "the minimised case is saved under fixtures/"
    # Next run: the saved case is replayed first, and fails the test on its own.
    again = pytester.runpytest("-q", "-p", "no:cacheprovider", "--losscmp-examples", "1")
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*saved case*still diverges*"])


def test_lambdas_and_same_named_callables(pytester):
    pytester.makepyfile(test_lam='''
import torch.nn.functional as F

def test_lambdas(losscmp):
    result = losscmp.check(lambda i, t: F.mse_loss(i, t), lambda i, t: ((i - t) ** 2).mean(), spec="regression", examples=20)
    assert result.labels == ("lambda", "lambda#2")
''')
    pytester.runpytest("-q", "-p", "no:cacheprovider").assert_outcomes(passed=1)
