"""Output a researcher acts on: replays that run this checkout's code, portable generated
tests, saved cases in the project's hidden folder, one screen per finding, the HTML report."""
import html
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from losscmp.cli import main

SPEC = "input: B real grad; target: B real; B=1..6"
LOSSES = ("import torch.nn.functional as F\n"
          "def mse(input, target):\n    return F.mse_loss(input, target)\n"
          "def twice(input, target):\n    return {factor} * F.mse_loss(input, target)\n")


def _project(folder: Path, factor: int = 2) -> Path:
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    (folder / "losses.py").write_text(LOSSES.format(factor=factor))
    return folder


def _saved_value_case(project: Path, monkeypatch, capsys, *extra: str) -> Path:
    monkeypatch.chdir(project)
    code = main(["losses.py:mse", "losses.py:twice", "--spec", SPEC, "--examples", "5", "--no-explain", "--no-minimize",
                 "-q", "--save-dir", "cases", *extra])
    assert code == 1, capsys.readouterr()
    capsys.readouterr()
    return sorted((project / "cases").glob("*value*.json"))[0]


def test_replay_in_a_second_clone_runs_that_clones_file_and_says_it_differs(tmp_path, monkeypatch, capsys):
    first = _project(tmp_path / "first")
    saved = _saved_value_case(first, monkeypatch, capsys)
    meta = json.loads(saved.read_text())
    # References are relative to the project root: the file travels with the project (the saving
    # project's root is kept only as the last resort of a replay from outside any clone).
    assert str(tmp_path) not in json.dumps(meta["implementations"]) and meta["project_root"] == str(first)
    assert {i["ref"] for i in meta["implementations"]} == {"losses.py:mse", "losses.py:twice"}

    # A second clone in which the bug is fixed: its replay runs its own losses.py.
    second = tmp_path / "second"
    shutil.copytree(first, second)
    (second / "losses.py").write_text(LOSSES.format(factor=1))
    (second / "sub").mkdir()
    monkeypatch.chdir(second / "sub")  # the project root is found upwards
    code = main(["replay", str(second / "cases" / saved.name)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"from {second / 'losses.py'}: NOT the recorded file" in out
    assert str(first) not in out
    assert f"outputs differ from the recorded run: {second / 'losses.py'} changed\n" in out
    assert "library versions or hardware" not in out

    # An unchanged clone replays bit for bit, and says the file is the recorded one.
    third = tmp_path / "third"
    shutil.copytree(first, third)
    monkeypatch.chdir(third)
    code = main(["replay", str(third / "cases" / saved.name)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"from {third / 'losses.py'} (the recorded file, sha256 matches)" in out
    assert "bit-for-bit identical" in out


def test_an_old_repro_with_an_absolute_base_dir_still_loads_from_there(tmp_path, monkeypatch, capsys):
    project = _project(tmp_path / "old")
    saved = _saved_value_case(project, monkeypatch, capsys)
    meta = json.loads(saved.read_text())
    del meta["paths"]  # as written before paths were relative to the project root
    meta["base_dir"] = str(project)
    saved.write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    code = main(["replay", str(saved)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"from {project / 'losses.py'}" in out and "bit-for-bit identical" in out


def _pytest(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow  # runs the written test under a fresh pytest interpreter (4.4 s of CPU: the fast lane's costliest test)
def test_replay_pytest_writes_a_portable_test_outside_the_saved_cases(tmp_path, monkeypatch, capsys):
    project = _project(tmp_path / "proj")
    (project / "tests").mkdir()
    monkeypatch.chdir(project)
    # The project's own loss against torch's: torch is the reference (expected) in the test.
    assert main(["losses.py:twice", "torch.nn.functional:mse_loss", "--spec", SPEC, "--examples", "10", "--no-explain",
                 "-q", "--save-dir", "cases"]) == 1
    saved = sorted((project / "cases").glob("*value*.json"))[0]
    capsys.readouterr()
    assert main(["replay", "--pytest", str(saved)]) == 0
    out = capsys.readouterr().out
    written = sorted((project / "tests").glob("test_losscmp_*.py"))
    assert len(written) == 1 and not list((project / "cases").glob("*.py"))
    assert f"wrote tests/{written[0].name}" in out and f"run: pytest tests/{written[0].name}" in out
    source = written[0].read_text()
    assert str(tmp_path) not in source  # no absolute path
    meta = json.loads(saved.read_text())
    docstring = source.split('"""')[1]
    assert "Minimised case: B=1: input " in docstring and meta["detail"] in docstring
    assert "expected mse_loss, actual twice" in source

    # The test travels with the project: a moved copy still loads its losses.py and fails, briefly.
    moved = tmp_path / "elsewhere" / "proj"
    shutil.copytree(project, moved)
    shutil.rmtree(project)
    proc = _pytest(moved / "tests" / written[0].name, moved)
    assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout
    assert "expected mse_loss, actual twice: loss value: Scalars are not close!" in proc.stdout
    assert "tensor(" not in proc.stdout and "_inputs()" not in proc.stdout  # no tensor-sized arguments or locals
    assert len(proc.stdout.splitlines()) < 30, proc.stdout


def test_replay_pytest_without_a_tests_folder_writes_to_the_current_one(tmp_path, monkeypatch, capsys):
    project = _project(tmp_path / "flat")
    saved = _saved_value_case(project, monkeypatch, capsys)
    assert main(["replay", "--pytest", str(saved)]) == 0
    assert len(list(project.glob("test_losscmp_*.py"))) == 1
    assert "wrote test_losscmp_" in capsys.readouterr().out


def test_replay_describes_a_minimised_input_by_its_values_not_its_recipe(tmp_path, capsys):
    import torch

    from losscmp.generate import Case, Recipe
    from losscmp.load import load_implementation
    from losscmp.repro import save_case
    from losscmp.run import call
    from losscmp.spec import parse_spec

    project = _project(tmp_path / "zeros")
    spec = parse_spec(SPEC)
    case = Case({"input": torch.zeros(1), "target": torch.zeros(1)}, {"B": 1},
                recipe=Recipe(sizes=(("B", 1),), regime="huge", magnitude=1e3))
    impls = [load_implementation(f"{project}/losses.py:mse"), load_implementation(f"{project}/losses.py:twice")]
    outcomes = {i.label: call(i.fn, spec, case) for i in impls}
    path = save_case(tmp_path, spec=spec, case=case, refs=[i.ref for i in impls], pair=("mse", "twice"), kind="value",
                     outcomes=outcomes, tolerance=(1.3e-6, 1e-5), seed=0, device="cpu")
    assert main(["replay", str(path)]) == 0
    out = capsys.readouterr().out
    assert "input B=1: input all 0, target all 0" in out
    assert "regime huge" not in out and "magnitude" not in out


def test_a_cli_audit_saves_cases_in_the_hidden_folder_of_the_project_root(tmp_path, monkeypatch, capsys):
    project = _project(tmp_path / "hidden")
    (project / "scripts").mkdir()
    monkeypatch.chdir(project / "scripts")
    assert main(["../losses.py:mse", "../losses.py:twice", "--spec", SPEC, "--examples", "5", "--no-explain",
                 "--no-minimize"]) == 1
    out = capsys.readouterr().out
    saved = sorted((project / ".losscmp").glob("*.json"))
    assert saved and not (project / "scripts" / "fixtures").exists() and not (project / "fixtures").exists()
    assert f"losscmp replay ../.losscmp/{saved[0].name}" in out or f"losscmp replay {saved[0]}" in out
    # Stored from the project root, the reference replays from any folder of the project.
    assert {i["ref"] for i in json.loads(saved[0].read_text())["implementations"]} == {"losses.py:mse", "losses.py:twice"}
    monkeypatch.chdir(project)
    assert main(["replay", str(saved[0])]) == 1
    assert main(["../losses.py:mse", "../losses.py:twice", "--spec", SPEC, "--examples", "5", "--no-save"]) == 2  # wrong folder now
    before = sorted((project / ".losscmp").glob("*.json"))
    monkeypatch.chdir(project / "scripts")
    assert main(["../losses.py:mse", "../losses.py:twice", "--spec", SPEC, "--examples", "5", "--no-explain",
                 "--no-minimize", "--no-save"]) == 1
    assert sorted((project / ".losscmp").glob("*.json")) == before  # --no-save writes nothing


def test_a_finding_reads_in_one_screen_and_the_evidence_waits_for_verbose(tmp_path, monkeypatch, capsys):
    from .conftest import FIXTURES

    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / ("that-a-terminal-would-wrap-" * 4)  # > 160 columns
    argv = [f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits", "--spec", "binary", "--examples", "40",
            "--save-dir", str(deep)]
    assert main(argv) == 1
    short = capsys.readouterr().out
    assert main(argv + ["-v"]) == 1
    verbose = capsys.readouterr().out
    findings = short.split("\n\n")[1:]
    assert findings and all(len(f.splitlines()) <= 24 for f in findings), short
    for evidence in ("float64 oracle:", "self-consistency of", "relation:", "location:", "cost:", "minimised in"):
        assert evidence not in short and evidence in verbose
    for shown in ("worst of", "minimal example (B=1)", "threshold:", "input = ["):
        assert shown in short
    # The replay command pastes: one line, whatever the width.
    saved = sorted(deep.glob("*.json"))
    for path in saved:
        assert f"replay: losscmp replay {path}\n" in short
    assert len(short.splitlines()) < len(verbose.splitlines())


class _Report(HTMLParser):
    """What a reader of the HTML sees of the run: findings, verdict rows, the tally, and
    anything that would reach out to the network."""

    def __init__(self):
        super().__init__()
        self.findings, self.rows, self.tally, self.external, self.commands = [], [], {}, [], []
        self._row = None
        self._cell = None
        self._command = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "link", "img", "iframe", "object") or any(k in ("src", "href") for k in a):
            self.external.append((tag, attrs))
        if tag == "section" and a.get("class") == "finding":
            self.findings.append((json.loads(a["data-pair"]), a["data-kind"], int(a["data-cases"])))
        if tag == "tr" and a.get("class") == "pair":
            self._row = []
        if tag == "td" and self._row is not None:
            self._cell = ""
        if tag == "li" and "data-what" in a:
            self.tally[a["data-what"]] = int(a["data-count"])
        if tag == "code" and a.get("class") == "command":
            self._command = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._command is not None:
            self._command += data

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        if tag == "code" and self._command is not None:
            self.commands.append(self._command)
            self._command = None


def test_the_html_report_shows_the_findings_and_tally_of_the_json_of_the_same_run(tmp_path, monkeypatch, capsys):
    from .conftest import FIXTURES

    monkeypatch.chdir(tmp_path)
    code = main([f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits",
                 "torch.nn.functional:binary_cross_entropy_with_logits", "--reference", "bce_with_logits", "--spec", "binary",
                 "--examples", "60", "--json", "r.json", "--html", "r.html", "--save-dir", "cases"])
    assert code == 1
    assert "HTML report: r.html" in capsys.readouterr().out
    data = json.loads((tmp_path / "r.json").read_text())
    page = _Report()
    page.feed((tmp_path / "r.html").read_text())
    assert page.external == []  # self-contained: nothing fetched
    assert (tmp_path / "r.html").read_bytes().isascii()  # the same page whatever encoding wrote it
    assert page.findings == [(d["pair"], d["kind"], d["cases"]) for d in data["divergences"]]
    assert page.tally == data["tally"] and sum(page.tally.values()) == data["cases_run"]
    assert [r[0] for r in page.rows] == [" vs ".join(p["pair"]) for p in data["pairs"]]
    assert [r[1] for r in page.rows] == ["DIVERGE" if p["verdict"] == "diverge" else "agree" for p in data["pairs"]]
    assert page.commands == [d["replay_command"] for d in data["divergences"]]
    for command in page.commands:  # each replays from where the run was started
        assert main(command.split()[1:]) == 1
    html_text = (tmp_path / "r.html").read_text()
    for d in data["divergences"]:
        sentence = d["explanation"] if isinstance(d["explanation"], str) else d["explanation"]["sentence"]
        assert sentence in html.unescape(html_text) and "Evidence" in html_text


def test_an_html_report_that_cannot_be_written_fails_before_the_run(tmp_path, capsys):
    from .conftest import FIXTURES

    code = main([f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits", "--html", str(tmp_path / "no" / "r.html")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("losscmp: error: --html") and len(err.strip().splitlines()) == 1


# --- the pytest plugin ------------------------------------------------------------------

pytest_plugins = ["pytester"]

NAIVE = '''
import torch.nn.functional as F

def my_bce(logits, target):
    return F.binary_cross_entropy(logits.sigmoid(), target)

def test_bce(losscmp):
    losscmp.check(my_bce, F.binary_cross_entropy_with_logits, spec="binary", examples=40)
'''


def test_the_short_summary_names_the_verdict_and_the_failure_fits_a_screen(pytester):
    pytester.makepyfile(test_div=NAIVE)
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["FAILED test_div.py::test_bce - AssertionError: DIVERGE value */40 *"])
    result.stdout.fnmatch_lines(["E*AssertionError: DIVERGE value */40 my_bce vs binary_cross_entropy_with_logits"])
    failure = result.stdout.str().split("_ test_bce _")[1].split("= losscmp =")[0]
    assert len(failure.splitlines()) <= 60, failure
    assert "minimised in" not in failure and "(the evidence behind each finding: pytest -vv)" in failure
    assert "replay: pytest test_div.py::test_bce --losscmp-replay-only" in failure
    verbose = pytester.runpytest("-p", "no:cacheprovider", "-vv", "--losscmp-no-replay")
    assert "minimised in" in verbose.stdout.str()  # the evidence, on -vv


def test_a_probe_failure_is_an_ordinary_failure_in_the_calls_terms_and_in_the_summary(pytester):
    pytester.makepyfile(test_probe='''
import torch.nn.functional as F

def as_list(input, target):
    return [F.mse_loss(input, target)]

def test_probe(losscmp):
    losscmp.check(as_list, F.mse_loss, spec="regression", examples=5)
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["FAILED test_probe.py::test_probe - AssertionError: PROBE FAILED (losscmp): *"])
    result.stdout.fnmatch_lines(["E*AssertionError: PROBE FAILED (losscmp): as_list returned list, not a tensor on every probe input*"])
    out = result.stdout.str()
    assert "ProbeError" not in out and "--spec" not in out and "is spec= right?" in out
    result.stdout.fnmatch_lines(["*= losscmp =*", "probe failures: 1 check(s) whose implementations could not run on their spec"])


def _readme_block(language: str, after: str) -> str:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    return text.split(after, 1)[1].split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_readme_pytest_example_runs_as_shown_in_a_fresh_repo(pytester):
    example = Path(__file__).resolve().parent.parent / "examples" / "research_repo"
    pytester.makefile(".ini", pytest=_readme_block("ini", "### Inside a test suite"))
    (pytester.path / "losses.py").write_text((example / "losses.py").read_text())
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "test_losses.py").write_text(_readme_block("python", "### Inside a test suite"))
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*2 passed*"])


# --- hints that name the fix ------------------------------------------------------------

HINTED = '''
import numpy as np
import torch

def kwonly(*, logits, target):
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)

def as_numpy(input, target):
    return np.float32(((input - target) ** 2).mean().item())

def per_sample(input, target):
    return (input - target) ** 2

def takes_a_dict(batch):
    return ((batch["pred"] - batch["target"]) ** 2).mean()
'''


@pytest.mark.parametrize("argv, hint", [
    (["torch.nn:MSELoss", "torch.nn.functional:mse_loss", "--spec", "regression"],
     "'torch.nn:MSELoss' is a class, not a loss: instantiate it, 'torch.nn:MSELoss()'"),
    (["{f}:kwonly", "torch.nn.functional:binary_cross_entropy_with_logits"],
     "wrap it, def wrapped(logits, target): return kwonly(logits=logits, target=target)"),
    (["{f}:as_numpy", "torch.nn.functional:mse_loss", "--spec", "regression"],
     "as_numpy returned numpy.float32, not a tensor on every probe input (B=4 (regime standard, magnitude 1)); compute the loss with torch"),
    (["{f}:per_sample", "torch.nn.functional:mse_loss", "--spec", "regression"],
     "reduce it to one number (e.g. .mean()), or add 'output=any' to --spec"),
    (["{f}:takes_a_dict", "torch.nn.functional:mse_loss"],
     "takes_a_dict takes 1 tensor argument(s) (batch) where mse_loss needs 2"),
    (["geomloss:SamplesLoss(loss=sinkhorn)", "torch.nn.functional:mse_loss"],
     """quote the whole reference for the shell: 'geomloss:SamplesLoss(loss="sinkhorn")'"""),
    (["geomloss:SamplesLoss(loss=sinkhorn,", "blur=0.05)", "torch.nn.functional:mse_loss"],
     "quote the whole reference for the shell: 'geomloss:SamplesLoss(loss=sinkhorn, ...)'"),
    (["{f}:per_sampel", "torch.nn.functional:mse_loss"], "has no attribute 'per_sampel' (did you mean 'per_sample'?)"),
    (["{f}:per_sample", "torch.nn.functional:mse_loss", "--spec", "regresion"], "unknown preset 'regresion' (did you mean 'regression'?)"),
])
def test_each_mistake_gets_one_line_that_names_the_fix(tmp_path, capsys, argv, hint):
    f = tmp_path / "hinted.py"
    f.write_text(HINTED)
    code = main([a.format(f=f) for a in argv] + ["--examples", "3", "--no-save"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert hint in err, err
    assert len(err) < 400, err
    assert "is --spec right?" not in err


def test_a_module_class_given_to_a_check_is_told_to_pass_an_instance():
    import torch
    import torch.nn.functional as F

    from losscmp.testing import assert_losses_agree

    with pytest.raises(Exception, match=r"MSELoss is a class, not a loss: pass an instance, MSELoss\(\)"):
        assert_losses_agree(torch.nn.MSELoss, F.mse_loss, spec="regression", examples=2)


def test_sweep_plot_without_matplotlib_fails_before_the_sweep(tmp_path, monkeypatch, capsys):
    calls = tmp_path / "calls"
    f = tmp_path / "counted.py"
    f.write_text(f"import torch.nn.functional as F\ndef mse(input, target):\n    open({str(calls)!r}, 'a').write('x')\n"
                 "    return F.mse_loss(input, target)\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a machine without it
    code = main(["sweep", f"{f}:mse", "torch.nn.functional:mse_loss", "--param", "scale=1:100:log", "--spec", "regression",
                 "--plot", str(tmp_path / "p.png")])
    assert code == 2 and "--plot needs matplotlib" in capsys.readouterr().err
    assert not calls.exists()  # nothing ran


def test_sweep_states_each_boundary_as_a_fact_about_its_grid_step_not_a_global_threshold(capsys):
    from .conftest import FIXTURES

    pair = [f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits", "--spec", "binary"]
    found = []
    for grid in (["--param", "scale=1:100:log"], ["--param", "scale=1:1000:log", "--points", "5"]):
        assert main(["sweep", *pair, *grid]) == 1
        out = capsys.readouterr().out
        assert "agree for scale <" not in out and "diverge above" not in out  # no claim beyond what was evaluated
        (line,) = [x for x in out.splitlines() if x.startswith("boundary: ")]
        assert line.startswith("boundary: agrees at scale = ") and "(between grid points " in line
        found.append(line)
    assert found[0] != found[1]  # the two grids bracket different crossings: each is said as its own fact


def test_sweep_sets_a_keyword_on_one_side_only(tmp_path, capsys):
    f = tmp_path / "eps.py"
    f.write_text("def dice(input, target, eps=1e-6):\n    p = input.sigmoid()\n"
                 "    return 1 - (2 * (p * target).sum() + eps) / (p.sum() + target.sum() + eps)\n")
    pair = [f"ref={f}:dice", f"fork={f}:dice", "--spec", "input: B logits grad; target: B binary; B=1..8; eps=1e-6"]
    assert main(["sweep", *pair, "--param", "eps=1e-8:1"]) == 0  # both sides get it: the same function agrees everywhere
    assert "agree everywhere on the range" in capsys.readouterr().out
    assert main(["sweep", *pair, "--param", "fork.eps=1e-8:1"]) == 1  # only the fork's eps moves; ref keeps the spec's 1e-6
    out = capsys.readouterr().out
    assert "fork.eps = 1e-08" in out and "boundary: agrees at fork.eps = " in out
    assert main(["sweep", *pair, "--param", "frok.eps=1e-8:1"]) == 2
    assert "no implementation is labelled 'frok' (did you mean 'fork'?)" in capsys.readouterr().err


def test_the_html_report_puts_both_source_lines_of_the_first_differing_operation_side_by_side(tmp_path, monkeypatch, capsys):
    from .conftest import FIXTURES

    monkeypatch.chdir(tmp_path)
    forks = FIXTURES / "forks"
    assert main([f"base={forks}/sinkhorn_base.py:sinkhorn_divergence", f"fork={forks}/fork_sum.py:sinkhorn_divergence",
                 "--spec", "points", "--examples", "5", "--no-minimize", "--no-save", "--json", "r.json", "--html", "r.html"]) == 1
    finding = json.loads((tmp_path / "r.json").read_text())["divergences"][0]
    location = finding.get("location") or finding["explanation"]["location"]
    page = (tmp_path / "r.html").read_text()
    section = page.split("First differing operation", 1)[1].split("</table>", 1)[0]
    for label in ("base", "fork"):
        assert location[label]["code"] in html.unescape(section) and f"{location[label]['line']}" in section
    assert "FORK: sum instead of mean" in section


def test_replay_with_nothing_recorded_changed_does_not_guess_why_outputs_differ(tmp_path, monkeypatch, capsys):
    import numpy as np

    project = _project(tmp_path / "same")
    saved = _saved_value_case(project, monkeypatch, capsys)
    npz = saved.with_suffix(".npz")
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["out.0.value"] = arrays["out.0.value"] + np.float32(1)  # as if recorded on another machine
    np.savez(npz, **arrays)
    assert main(["replay", str(saved)]) == 1
    out = capsys.readouterr().out
    assert "outputs differ from the recorded run: the files, library versions and device are the recorded ones" in out
    assert "?" not in out.split("outputs differ", 1)[1].splitlines()[0]


def test_what_an_implementation_printed_shows_its_first_line_and_the_rest_on_verbose(tmp_path, capsys):
    f = tmp_path / "chatty.py"
    f.write_text("import torch.nn.functional as F\n"
                 "def chatty(input, target):\n    print('clamping logits to [-88, 88]')\n    print('second line')\n"
                 "    print('third line')\n    return 2 * F.mse_loss(input, target)\n")
    argv = [f"{f}:chatty", "torch.nn.functional:mse_loss", "--spec", SPEC, "--examples", "5", "--no-save", "--no-explain"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "chatty printed: clamping logits to [-88, 88] (+2 more line(s): -v, or --json)" in out and "third line" not in out
    assert main(argv + ["-v"]) == 1
    assert "third line" in capsys.readouterr().out


def test_a_failure_inside_pytest_wraps_sentences_but_never_a_command(pytester):
    pytester.makepyfile(test_div=NAIVE)
    result = pytester.runpytest("-p", "no:cacheprovider")
    failure = result.stdout.str().split("_ test_bce _")[1].split("= losscmp =")[0]
    commands = [line for line in failure.splitlines() if "replay: " in line]
    assert any("losscmp replay .losscmp/" in c and c.rstrip().endswith(".json") for c in commands), failure
    long_lines = [line for line in failure.splitlines() if len(line) > 120 and line not in commands]
    assert not long_lines, long_lines


def test_a_second_cli_run_from_another_folder_of_the_project_replays_the_saved_cases(tmp_path, monkeypatch, capsys):
    project = _project(tmp_path / "again")
    (project / "scripts").mkdir()
    argv = ["--spec", SPEC, "--examples", "5", "--no-explain", "--no-minimize"]
    monkeypatch.chdir(project)
    assert main(["losses.py:mse", "losses.py:twice", *argv]) == 1
    saved = sorted((project / ".losscmp").glob("*.json"))
    capsys.readouterr()
    monkeypatch.chdir(project / "scripts")  # the same files, named from another folder
    assert main(["../losses.py:mse", "../losses.py:twice", *argv]) == 1
    out = capsys.readouterr().out
    assert f"replayed {len(saved)} saved case(s) first:" in out and "still diverges" in out


def test_sweep_json_holds_what_the_terminal_prints(tmp_path, capsys):
    """``sweep --json PATH`` was accepted and never written.  The record: every grid point's
    verdict and every boundary, the same numbers the terminal prints."""
    pair = ["huber=torch.nn:HuberLoss(delta=1.0)", "sl1=torch.nn:SmoothL1Loss(beta=1.0)", "--spec", "regression"]
    out = tmp_path / "sweep.json"
    assert main(["sweep", *pair, "--param", "huber.delta=0.5:2", "--points", "5", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["pair"] == ["huber", "sl1"] and data["knob"]["name"] == "delta" and data["knob"]["side"] == "huber"
    assert [p["kind"] for p in data["points"]] == ["value", "value", None, "value", "value"]
    assert [f"{p['value']:.4g}" for p in data["points"]] == [line.split("=")[1].split()[0] for line in text.splitlines()
                                                                 if line.startswith("  huber.delta = ")]
    assert len(data["boundaries"]) == 2 == text.count("boundary: ")
    for b in data["boundaries"]:
        assert b["kind"] == "value" and f"{b['agree_at']:.4g}" in text and f"{b['diverge_at']:.4g}" in text
    assert data["evaluations"] > 5 and f"({data['evaluations']} evaluations)" in text
    # '-' is stdout, holding the JSON alone (the words go to stderr), as for the audit.
    assert main(["sweep", *pair, "--param", "huber.delta=0.5:2", "--points", "3", "--json", "-"]) == 1
    assert json.loads(capsys.readouterr().out)["pair"] == ["huber", "sl1"]


LAMBDA_CHECK = """
import torch
import torch.nn.functional as F

def test_bce(losscmp):
    losscmp.check(lambda input, target: F.binary_cross_entropy(torch.sigmoid(input), target),
                  lambda input, target: F.binary_cross_entropy_with_logits(input, target), spec="binary", examples=40)
"""


def test_a_failure_on_lambdas_offers_the_test_to_rerun_not_a_replay_that_cannot_load_them(pytester):
    """``losscmp replay`` loads each side by its reference; a lambda has none that loads it."""
    pytester.makepyfile(test_lam=LAMBDA_CHECK)
    result = pytester.runpytest("-p", "no:cacheprovider")
    failure = result.stdout.str().split("_ test_bce _")[1].split("= losscmp =")[0]
    commands = [line.strip() for line in failure.splitlines() if "replay: " in line]
    assert result.ret == 1 and commands, failure
    assert not any("losscmp replay" in c for c in commands), commands
    assert any("pytest " in c and "test_bce" in c for c in commands), commands
    unwrapped = " ".join(line.removeprefix("E").strip() for line in failure.splitlines())
    assert "not replayable alone: a side is a lambda or local function" in unwrapped


def test_inf_against_minus_inf_is_never_said_to_be_nonfinite_on_one_side_only(tmp_path, capsys):
    # Both sides are non-finite there: "NaN/inf on one side only" was untrue.
    f = tmp_path / "signs.py"
    f.write_text("def up(input, target):\n    return (input - target).mean() * 0 + float('inf')\n\n\n"
                 "def down(input, target):\n    return (input - target).mean() * 0 - float('inf')\n")
    assert main([f"{f}:up", f"{f}:down", "--spec", "regression", "--examples", "5", "--no-save", "--no-explain"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "nonfinite" in out and "up inf vs down -inf" in out, out
    assert "one side only" not in out and "NaN/inf the other side does not match at 1 / 1 element(s)" in out, out
