"""Soak: an implementation that segfaults on ~5% and hangs on ~2% of inputs, 200 cases.

Every case is accounted for (agree + diverge + crash + timeout + ... = total), the run
ends, and every crash or hang input it kept replays (isolated) without killing anyone.
"""
import json
import textwrap

import pytest

from losscmp.cli import main

FLAKY = textwrap.dedent("""
    import ctypes, hashlib, time
    import torch

    def mse(input, target):
        return ((input - target) ** 2).mean()

    def _fate(input):
        digest = hashlib.sha256(input.detach().contiguous().numpy().tobytes()).digest()
        return int.from_bytes(digest[:4], "little") % 1000

    def flaky(input, target):
        fate = _fate(input)
        if fate < 50:
            ctypes.string_at(0)  # segfault
        if fate < 70:
            time.sleep(3600)  # hang
        return ((input - target) ** 2).mean()
""")


@pytest.mark.slow
def test_soak_every_case_accounted_for_and_every_crash_input_replayable(tmp_path, capsys):
    f = tmp_path / "flaky.py"
    f.write_text(FLAKY)
    saved, report = tmp_path / "saved", tmp_path / "report.json"
    code = main([f"{f}:mse", f"{f}:flaky", "--spec", "regression", "--examples", "200", "--isolate", "--timeout", "1",
                 "--no-minimize", "--no-explain", "--save-dir", str(saved), "--json", str(report), "-q"])
    capsys.readouterr()
    data = json.loads(report.read_text())
    assert code == 1 and data["cases_run"] == 200
    tally = data["tally"]
    assert sum(tally.values()) == 200, tally
    assert tally.get("crash", 0) >= 3 and tally.get("timeout", 0) >= 1 and tally.get("agree", 0) >= 150, tally
    kept = sorted(saved.glob("*--crash--*.json")) + sorted(saved.glob("*--timeout--*.json"))
    assert len(kept) >= tally["crash"] + tally["timeout"]  # each crash and hang input, plus the findings' own
    for path in kept:
        assert main(["replay", str(path)]) == 1  # still a crash or a hang, replayed in a worker: we survive it
        out = capsys.readouterr().out
        assert "still diverges (crash)" in out or "still diverges (timeout)" in out
