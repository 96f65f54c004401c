"""Output a researcher acts on: replays that run this checkout's code, portable generated
tests, saved cases in the project's hidden folder, one screen per finding, the HTML report."""
import json
import shutil
import subprocess
import sys
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
    assert str(tmp_path) not in saved.read_text()  # nothing absolute: the file travels with the project
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
