"""Saved cases: round trip, replay, generated tests, and files that were tampered with."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import losscmp
from losscmp.audit import Settings, audit
from losscmp.cli import main
from losscmp.generate import Case
from losscmp.load import load_implementation
from losscmp.repro import ReproError, load_repro, numpy_to_tensor, save_case, tensor_to_numpy
from losscmp.run import call
from losscmp.spec import preset

from .conftest import FIXTURES, PLANTED


def test_save_then_replay_gives_the_same_verdict_bit_for_bit(bce_repros, capsys):
    for path in bce_repros:
        assert path.exists() and path.with_suffix(".npz").exists()
        code = main(["replay", str(path)])
        out = capsys.readouterr().out
        assert code == 1, out
        assert "bit-for-bit identical" in out and "still diverges" in out
        assert json.loads(path.read_text())["kind"] in out


def test_metadata_records_what_is_needed_to_rerun(bce_repros):
    meta = json.loads(bce_repros[0].read_text())
    for key in ("implementations", "spec", "tolerance", "seed", "device", "dtype", "versions", "sizes", "original_sizes", "kind", "pair"):
        assert key in meta
    assert meta["versions"]["torch"] == torch.__version__.split("+")[0] or meta["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert {"python", "numpy", "geomloss", "implementations"} <= set(meta["versions"])
    # The running code's version, not an editable install's stale metadata.
    assert meta["versions"]["losscmp"] == losscmp.__version__


@pytest.mark.slow
def test_generated_pytest_fails_while_the_divergence_exists(bce_repros, tmp_path, capsys):
    out = tmp_path / "test_repro_bce.py"
    assert main(["replay", "--pytest", str(bce_repros[0]), "-o", str(out)]) == 0
    source = out.read_text()
    assert "losscmp" not in source.split('"""')[2]  # needs only torch and the implementations
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert "1 failed" in proc.stdout


@pytest.mark.slow
def test_generated_pytest_passes_once_implementations_agree(tmp_path, capsys):
    spec = preset("regression")
    case = Case({"input": torch.randn(5), "target": torch.randn(5)}, {"B": 5})
    impls = [load_implementation("torch.nn.functional:mse_loss"), load_implementation(f"{FIXTURES}/regression.py:mean_square")]
    outcomes = {i.label: call(i.fn, spec, case) for i in impls}
    path = save_case(tmp_path, spec=spec, case=case, refs=[i.ref for i in impls], pair=("mse_loss", "mean_square"),
                     kind="value", outcomes=outcomes, tolerance=(1.3e-6, 1e-5), seed=0, device="cpu")
    out = tmp_path / "test_agree.py"
    assert main(["replay", "--pytest", str(path), "-o", str(out)]) == 0
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert main(["replay", str(path)]) == 0  # and replay says they agree now


def test_bfloat16_is_stored_losslessly():
    t = torch.randn(17).to(torch.bfloat16)
    stored = tensor_to_numpy(t)
    assert stored.dtype == np.int16
    assert torch.equal(numpy_to_tensor(stored, torch.bfloat16), t)


def _copy(repro: Path, tmp_path: Path) -> Path:
    dst = tmp_path / repro.name
    dst.write_bytes(repro.read_bytes())
    dst.with_suffix(".npz").write_bytes(repro.with_suffix(".npz").read_bytes())
    return dst


def _edit(path: Path, **changes):
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_tampered_reference_cannot_run_code(bce_repros, tmp_path, capsys):
    victim = tmp_path / "pwned"
    path = _copy(bce_repros[0], tmp_path)
    meta = json.loads(path.read_text())
    meta["implementations"][0]["ref"] = f"subprocess:Popen(args='touch {victim}', shell=True)"
    path.write_text(json.dumps(meta))
    code = main(["replay", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to run bce_on_sigmoid" in err and "standard library" in err
    assert not victim.exists()
    # A non-literal argument does not even parse.
    meta["implementations"][0]["ref"] = "os:system(__import__('os').getcwd())"
    path.write_text(json.dumps(meta))
    assert main(["replay", str(path)]) == 2


def test_pickled_tensors_are_refused(bce_repros, tmp_path, capsys):
    path = _copy(bce_repros[0], tmp_path)
    with np.load(path.with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["input.input"] = np.array([object()], dtype=object)
    np.savez(path.with_suffix(".npz"), **arrays)
    code = main(["replay", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pickle" in err.lower()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_text(p.read_text()[:50]), "not valid JSON"),
        (lambda p: _edit(p, format="other/9"), "not a losscmp-repro/1 file"),
        (lambda p: _edit(p, sizes={"B": 999}), "has shape"),
        (lambda p: _edit(p, kind=["value"]), "'kind' missing"),
        (lambda p: _edit(p, spec="x: N reel"), "spec"),
        (lambda p: p.with_suffix(".npz").write_bytes(b"garbage"), "corrupt repro"),
        (lambda p: p.with_suffix(".npz").write_bytes(b"PK\x03\x04garbage"), "not a readable .npz"),
        (lambda p: _edit(p, kind="rm -rf"), "unknown kind"),
        (lambda p: p.with_suffix(".npz").unlink(), "has no tensors file"),
    ],
)
def test_corrupt_repros_give_one_line_errors(bce_repros, tmp_path, capsys, damage, message):
    path = _copy(bce_repros[0], tmp_path)
    damage(path)
    code = main(["replay", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ReproError):
        load_repro(path)


def test_replay_of_a_self_finding(tmp_path, capsys):
    impls = [load_implementation(f"{PLANTED}:mse"), load_implementation(f"{PLANTED}:mse_inplace")]
    result = audit(impls, preset("regression"), Settings.of(examples=10, save_dir=tmp_path, explain=False))
    mutation = next(d for d in result.divergences if d.kind == "mutation")
    assert main(["replay", mutation.repro]) == 1
    assert "mutation" in capsys.readouterr().out


def _audit_and_save(tmp_path, source, a, b, spec, examples=20, module="impls"):
    f = tmp_path / f"{module}.py"  # a fresh name per source: loaded files stay cached
    f.write_text(source)
    save = tmp_path / "cases"
    result = audit([load_implementation(f"{f}:{a}"), load_implementation(f"{f}:{b}")], spec,
                   Settings.of(examples=examples, save_dir=save, explain=False))  # repros do not hold the explanation
    assert result.divergences
    return [Path(d.repro) for d in result.divergences]


def _pytest_file_fails(repro, tmp_path):
    out = tmp_path / f"test_gen_{abs(hash(str(repro))) % 10**6}.py"
    assert main(["replay", "--pytest", str(repro), "-o", str(out)]) == 0
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(out)], capture_output=True, text=True, cwd=tmp_path)
    return proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout[-1500:]


def test_qualified_labels_replay(tmp_path, capsys):
    for name, factor in (("p1", 1), ("p2", 2)):
        (tmp_path / f"{name}.py").write_text(f"def a(input, target):\n    return ((input - target) ** 2).mean() * {factor}\n")
    code = main([str(tmp_path / "p1.py") + ":a", str(tmp_path / "p2.py") + ":a", "--spec", "regression", "--examples", "5",
                 "--no-minimize", "--no-explain", "--save-dir", str(tmp_path / "o")])
    assert code == 1
    saved = next((tmp_path / "o").glob("*.json"))
    assert main(["replay", str(saved)]) == 1
    assert "p1:a vs p2:a" in capsys.readouterr().out


@pytest.mark.slow
def test_generated_test_keeps_layout_and_tuple_parameters(tmp_path):
    layout_src = ("def a(x, y):\n    return (x - y).pow(2).mean()\n"
                  "def b(x, y):\n    return (x - y).pow(2).mean() * (1 if x.is_contiguous() else 2)\n")
    repros = _audit_and_save(tmp_path, layout_src, "a", "b", preset("points"), examples=40)
    failed, log = _pytest_file_fails(repros[0], tmp_path)
    assert failed, log
    params_src = ("def a(input, target, w):\n    return ((input - target) ** 2).mean() * w[0]\n"
                  "def b(input, target, w):\n    return ((input - target) ** 2).mean() * w[1]\n")
    from losscmp.spec import parse_spec
    repros = _audit_and_save(tmp_path, params_src, "a", "b", parse_spec("input: B real grad; target: B real; w=(1.0, 3.0)"), module="impls_w")
    assert load_repro(repros[0]).case.params == {"w": (1.0, 3.0)}  # a tuple again, not a JSON list
    failed, log = _pytest_file_fails(repros[0], tmp_path)
    assert failed, log


@pytest.mark.slow
def test_generated_test_imports_a_forked_package(tmp_path, monkeypatch):
    pkg = tmp_path / "fork" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .core import loss\n")
    (pkg / "core.py").write_text("def loss(input, target):\n    return ((input - target) ** 2).mean() * 2\n")
    monkeypatch.chdir(tmp_path)
    code = main([f"{pkg}:loss", "torch.nn.functional:mse_loss", "--spec", "regression", "--examples", "5", "--no-explain", "--save-dir", "cases"])
    assert code == 1
    failed, log = _pytest_file_fails(next((tmp_path / "cases").glob("*.json")), tmp_path)
    assert failed, log


@pytest.mark.slow
def test_a_hostile_file_name_cannot_inject_code_into_a_generated_test(bce_repros, tmp_path):
    victim = tmp_path / "PWNED"  # the generated test runs with tmp_path as its working directory
    name = 'x"""+__import__("os").system("touch PWNED")+"""'
    dst = tmp_path / f"{name}.json"
    dst.write_bytes(bce_repros[0].read_bytes())
    dst.with_suffix(".npz").write_bytes(bce_repros[0].with_suffix(".npz").read_bytes())
    out = tmp_path / "test_hostile.py"
    assert main(["replay", "--pytest", str(dst), "-o", str(out)]) == 0
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(out)], capture_output=True, cwd=tmp_path)
    assert not victim.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _edit(p, seed="abc"), "'seed' must be an integer"),
        (lambda p: _strings_for_input(p), "is not numeric"),
        (lambda p: _json_shape_of_first_tensor(p, [1, 1]), "the JSON says shape [1, 1]"),
    ],
)
def test_more_tampering_gives_one_line_errors(bce_repros, tmp_path, capsys, damage, message):
    path = _copy(bce_repros[0], tmp_path)
    damage(path)
    assert main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def _strings_for_input(path):
    with np.load(path.with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    key = next(k for k in arrays if k.startswith("input."))
    arrays[key] = np.array(["a"] * arrays[key].size).reshape(arrays[key].shape)
    np.savez(path.with_suffix(".npz"), **arrays)


def _json_shape_of_first_tensor(path, shape):
    meta = json.loads(path.read_text())
    meta["tensors"][next(iter(meta["tensors"]))]["shape"] = shape
    path.write_text(json.dumps(meta))


def _evil_module(tmp_path: Path) -> Path:
    evil = tmp_path / "evil.py"
    evil.write_text("import os\n\ndef run(cmd):\n    os.system(cmd)\n    return lambda *a, **k: None\n")
    return evil


@pytest.mark.parametrize(
    "tamper, refused",
    [
        # A factory call of a standard-library function: refused by the one trust gate.
        (lambda meta, tmp: meta["implementations"][0].update(ref="os:system('touch MARKER')"), "standard library"),
        (lambda meta, tmp: meta["implementations"][0].update(ref="subprocess:Popen(args='touch MARKER', shell=True)"), "standard library"),
        # A carriage return ends a comment line in Python source: refused when the file is read.
        (lambda meta, tmp: _relabel(meta, 'diff\rimport os; os.system("touch MARKER")'), "control character"),
        (lambda meta, tmp: _relabel(meta, 'diff\nimport os; os.system("touch MARKER")'), "control character"),
        (lambda meta, tmp: _relabel(meta, "diff\u2028x"), "control character"),
        # A relative path is judged where it loads from: an old repro's base_dir pointing into the standard library,
        (lambda meta, tmp: (meta.pop("paths"), meta.update(base_dir=str(Path(json.__file__).parent.parent)),
                            meta["implementations"][0].update(ref="os.py:system")), "standard library"),
        # or a path from the project root that climbs out of it into the standard library.
        (lambda meta, tmp: meta["implementations"][0].update(ref=f"{'../' * 12}{Path(json.__file__).parent.parent}/os.py:system"),
         "standard library"),
    ],
)
def test_a_tampered_repro_never_generates_a_test_that_runs_code(bce_repros, tmp_path, capsys, tamper, refused):
    path = _copy(bce_repros[0], tmp_path)
    meta = json.loads(path.read_text())
    tamper(meta, tmp_path)
    path.write_text(json.dumps(meta))
    out = tmp_path / "test_generated.py"
    code = main(["replay", "--pytest", str(path), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and refused in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    assert main(["replay", str(path)]) == 2  # the same policy for replay
    assert not (tmp_path / "MARKER").exists() and not Path("MARKER").exists()


@pytest.mark.slow
def test_a_generated_test_calls_no_factory_but_a_module_class(bce_repros, tmp_path, capsys):
    """A user file may be imported (it is the implementation the repro names), but a call
    of one of its plain functions is refused by replay and by the generated test alike."""
    path = _copy(bce_repros[0], tmp_path)
    meta = json.loads(path.read_text())
    meta["implementations"][0]["ref"] = f"{_evil_module(tmp_path)}:run('touch MARKER')"
    path.write_text(json.dumps(meta))
    assert main(["replay", str(path)]) == 2
    assert "only torch.nn.Module classes" in capsys.readouterr().err
    out = tmp_path / "test_generated.py"
    assert main(["replay", "--pytest", str(path), "-o", str(out)]) == 0
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "is not a torch.nn.Module class" in proc.stdout, proc.stdout[-2000:]
    assert not (tmp_path / "MARKER").exists()


def _relabel(meta: dict, label: str) -> None:
    old = meta["implementations"][0]["label"]
    meta["implementations"][0]["label"] = label
    meta["pair"] = [label if x == old else x for x in meta["pair"]]


FIRST_BCE = "import torch\n\ndef bce(z, t):\n    return (z.clamp(min=0) - z * t + torch.log1p(torch.exp(-z.abs()))).mean()\n"
FIXED_BCE = "import torch\n\ndef bce(z, t):\n    return (torch.logaddexp(torch.zeros_like(z), z) - z * t).mean()\n"


def test_replay_says_what_changed_when_outputs_are_no_longer_the_recorded_ones(tmp_path, monkeypatch, capsys):
    """The README's plugin story from the command line: a case saved against the first
    BCE, replayed after the fix, agrees now; the outputs differ from the recorded ones
    because the implementation's file changed, and the replay says that.  A version the file recorded differently is named too, and
    a recorded string that is not plain text is quoted, never printed raw."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "losses.py").write_text(FIRST_BCE)
    argv = ["losses.py:bce", "torch.nn.functional:binary_cross_entropy_with_logits", "--spec", "binary",
            "--regimes", "special", "--examples", "20", "--no-explain", "--save-dir", "saved"]
    assert main(argv) == 1
    (path,) = (tmp_path / "saved").glob("*gradient*.json")
    capsys.readouterr()
    (tmp_path / "losses.py").write_text(FIXED_BCE)
    # One process plays both commands here: forget the first version, as a new `losscmp` would.
    for name in [n for n, m in sys.modules.items() if getattr(m, "__file__", None) == str(tmp_path / "losses.py")]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["replay", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "outputs differ from the recorded run: " in out and "losses.py changed" in out and "agree now" in out
    meta = json.loads(path.read_text())
    meta["versions"]["torch"] = "1.0\x1b[2J"
    path.write_text(json.dumps(meta))
    assert main(["replay", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"torch '1.0\\x1b[2J' -> {torch.__version__}" in out
    assert "\x1b" not in out


def test_a_replayed_minimised_case_says_its_recipe_is_the_draw_it_came_from(bce_repros, tmp_path, capsys):
    """The BCE value finding was drawn at magnitude 5e+07 and minimised to [8]: the replay
    must not present "magnitude 5.18e+07" as the saved input's; it says the case was
    minimised from that draw.  The flag is data from a file: anything but a bool is refused."""
    value = next(p for p in bce_repros if json.loads(p.read_text())["kind"] == "value")
    meta = json.loads(value.read_text())
    assert meta["minimised"] is True
    # How the plugin's replay of a saved case describes it (the CLI shows the values themselves).
    described = load_repro(value).case.describe()
    assert "regime huge, magnitude" in described and described.endswith("; minimised from that draw; replayed)")
    assert main(["replay", str(value)]) == 1
    assert "magnitude 5" not in capsys.readouterr().out
    tampered = tmp_path / value.name
    tampered.with_suffix(".npz").write_bytes(value.with_suffix(".npz").read_bytes())
    tampered.write_text(json.dumps({**meta, "minimised": "yes"}))
    assert main(["replay", str(tampered)]) == 2
    err = capsys.readouterr().err
    assert "'minimised' is not true or false" in err and len(err.strip().splitlines()) == 1


def test_a_repro_records_the_verdict_on_the_input_it_saves(bce_repros, tmp_path, capsys):
    """The saved input is the minimised one, so the recorded score and detail are its own
    (the replay's today), not the worst draw's; the generated test's docstring quotes them."""
    value = next(p for p in bce_repros if json.loads(p.read_text())["kind"] == "value")
    meta = json.loads(value.read_text())
    assert main(["replay", str(value)]) == 1
    today = " ".join(capsys.readouterr().out.split()).split("still diverges (value): ", 1)[1]
    assert " ".join(meta["detail"].split()) == today
    out = tmp_path / "test_value.py"
    assert main(["replay", "--pytest", str(value), "-o", str(out)]) == 0
    assert meta["detail"] in " ".join(out.read_text().split('"""')[1].split())
