"""The JSON report says what the terminal says, and writes non-finite numbers one way."""
import json
import re

import pytest

from losscmp.cli import main
from losscmp.repro import load_repro

from .conftest import FIXTURES


def _strict(text: str):
    """Parse as a strict JSON reader would: NaN / Infinity literals are not JSON."""
    def refuse(literal):
        raise ValueError(f"non-standard JSON literal {literal}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def bce_demo(tmp_path_factory):
    """The README's demo, once: the terminal text and the JSON report of the same run."""
    out = tmp_path_factory.mktemp("bce") / "report.json"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main([f"{FIXTURES}/bce.py:bce_on_sigmoid", f"{FIXTURES}/bce.py:bce_with_logits", "--no-save", "--json", str(out), "-v"])  # -v: the evidence lines (minimised in, cost) it checks
    return code, buffer.getvalue(), _strict(out.read_text())


def test_the_json_never_contradicts_the_terminal_on_the_bce_demo(bce_demo):
    code, text, report = bce_demo
    flat = " ".join(text.split())
    divergences = report["divergences"]
    assert code == 1 and not report["agree"] and len(divergences) >= 2
    # Tally: "cases: 82 agree, 16 value, 2 gradient".
    tally = dict((what, int(n)) for n, what in re.findall(r"(\d+) ([a-z ]+?)(?:,|$)", re.search(r"^cases: (.*)$", text, re.M).group(1)))
    assert tally == report["tally"] and sum(tally.values()) == report["cases_run"]
    # Verdicts: the table's row for the pair.
    row = re.search(r"bce_on_sigmoid vs bce_with_logits\s*│\s*(\w+)\s*│\s*(\d+) / (\d+)", text)
    assert row.group(1) == "DIVERGE" and int(row.group(3)) == report["cases_run"]
    # Per finding, in order: the minimiser's evaluations, the explanation's calls, its sentence (once).
    minimised = [int(n) for n in re.findall(r"minimised in (\d+) evaluations", text)]
    costs = [int(n) for n in re.findall(r"cost: (\d+) implementation call", text)]
    assert minimised == [d["evaluations"] for d in divergences]
    assert costs == [d["explanation"]["evaluations"] for d in divergences]
    assert minimised != costs  # the two counts differ on this demo: the report must not merge them
    for d in divergences:
        sentence = d["explanation"]["sentence"]
        assert " ".join(sentence.split()) in flat
        assert json.dumps(d).count(json.dumps(sentence)) == 1  # said once, in its own place
        assert d["kind"] in text
        for key in ("category", "unstable_side", "location", "location_note", "self_consistency", "relation", "impact", "notes"):
            assert d[key] == d["explanation"][key], key  # the copies at the top say what the explanation says


def test_non_finite_numbers_are_the_strings_nan_inf_everywhere_json_is_written(tmp_path):
    report_path, saves = tmp_path / "report.json", tmp_path / "saved"
    code = main([f"{FIXTURES}/misbehaving.py:mse", f"{FIXTURES}/misbehaving.py:mutates_input", "--spec", "regression",
                 "--examples", "3", "--no-minimize", "--no-explain", "--save-dir", str(saves), "--json", str(report_path)])
    assert code == 1
    report = _strict(report_path.read_text())
    mutation = next(d for d in report["divergences"] if d["kind"] == "mutation")
    assert mutation["score"] == "inf" and mutation["score_text"] == "inf"
    saved = [p for p in saves.glob("*.json") if "mutation" in p.name]
    assert saved and _strict(saved[0].read_text())["score"] == "inf"
    assert load_repro(saved[0]).kind == "mutation"  # and it loads back


def test_a_repro_written_before_with_nan_literals_still_loads(tmp_path):
    saves = tmp_path / "saved"
    assert main([f"{FIXTURES}/misbehaving.py:mse", f"{FIXTURES}/misbehaving.py:mutates_input", "--spec", "regression",
                 "--examples", "3", "--no-minimize", "--no-explain", "--save-dir", str(saves)]) == 1
    path = next(p for p in saves.glob("*.json") if "mutation" in p.name)
    meta = json.loads(path.read_text())
    meta["score"] = float("inf")  # as the old writer left it: a bare Infinity literal
    path.write_text(json.dumps(meta, allow_nan=True))
    assert "Infinity" in path.read_text()
    assert load_repro(path).kind == "mutation"


def test_the_readme_names_every_field_the_json_report_writes(bce_demo):
    """The README's "JSON report" section is the schema people code against: every key
    the report writes, at the top, per divergence and in its explanation, is named there."""
    readme = (FIXTURES.parent / "README.md").read_text()
    section = readme.split("### JSON report (`--json PATH`)", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(\w+)", section))
    _, _, report = bce_demo
    written = set(report) | {k for d in report["divergences"] for k in d} | {k for d in report["divergences"] for k in d["explanation"]}
    assert written - named == set(), f"--json writes fields the README does not name: {sorted(written - named)}"


def test_the_terminal_names_the_location_as_the_sentence_does_and_the_json_keeps_it_absolute(bce_demo):
    """The value finding is located on bce_on_sigmoid's line 13: the evidence line writes
    the file as the user would type it (as the opening sentence does), not the absolute
    path of wherever the clone sits; the JSON keeps the absolute path for tools."""
    import os

    _, text, report = bce_demo
    flat = " ".join(text.split())
    located = [d for d in report["divergences"] if d["location"]]
    assert located, "the BCE demo's value finding is located"
    for d in located:
        for label, site in d["location"].items():
            if not isinstance(site, dict):
                continue
            assert os.path.isabs(site["file"])
            shown = f"location in {label}: {os.path.relpath(site['file'])}:{site['line']}:"
            assert shown in flat
            assert f"first differing op at {os.path.relpath(site['file'])}:{site['line']}" in flat


NUMBER = r"(-?[\d.]+(?:e[+-]?\d+)?|inf|nan)"


def _close(said: str, field) -> bool:
    """The terminal's 3 significant digits against the JSON's full number."""
    return said == field if isinstance(field, str) else abs(float(said) - field) <= 5e-3 * abs(field) + 1e-300


def test_each_mismatch_record_in_the_json_holds_the_numbers_the_terminal_prints(bce_demo):
    # The terminal's words and the JSON's fields are rendered from one Mismatch record:
    # read the numbers back out of the printed text and find them in the fields.
    code, text, report = bce_demo
    flat = " ".join(text.split())  # rich wraps long lines at spaces
    verdicts = [d for d in report["divergences"]] + [d["minimal"] for d in report["divergences"] if d["minimal"]]
    assert code == 1 and len(verdicts) >= 4
    for v in verdicts:
        m = v["mismatch"]
        assert m is not None and m["component"] in ("value", "gradient w.r.t. input")
        said = " ".join(v["detail"].split())
        assert said in flat  # the JSON's words are the terminal's
        head = re.match(rf"{re.escape(m['component'])}: (?:mismatched elements: (\d+) / (\d+) .*?; |(\S+) {NUMBER} vs (\S+) {NUMBER}; )"
                        rf"greatest absolute difference {NUMBER}(?: at index \(([\d, ]*)\))? \(up to {NUMBER} allowed\); "
                        rf"greatest relative difference {NUMBER}", said)
        assert head, said
        mismatched, total, first, first_value, second, second_value, greatest, index, allowed, relative = head.groups()
        if m["total"] > 1:
            assert (int(mismatched), int(total)) == (m["mismatched"], m["total"])
            assert tuple(int(i) for i in index.split(",") if i.strip()) == tuple(m["index"])
        else:
            assert m["total"] == 1 and [first, second] == m["sides"]
            assert _close(first_value, m["expected"]) and _close(second_value, m["actual"])
        assert _close(greatest, m["greatest_absolute_difference"]) and _close(allowed, m["allowed_absolute_difference"])
        assert _close(relative, m["greatest_relative_difference"])
        assert m["mismatched"] >= 1 and m["greatest_absolute_difference"] > m["allowed_absolute_difference"]  # the shown component is beyond tolerance
        for other in m["others"]:  # "meanwhile gradient w.r.t. input agrees (greatest absolute difference 0)"
            clause = re.search(rf"{re.escape(other['component'])} (agrees|also differs) \(greatest absolute difference {NUMBER}", said)
            assert clause and (clause.group(1) == "agrees") == other["agrees"] and _close(clause.group(2), other["greatest_absolute_difference"])


def test_each_minimiser_step_record_in_the_json_is_a_step_the_terminal_prints(bce_demo):
    code, text, report = bce_demo
    flat = " ".join(text.split())
    steps = [(d, st) for d in report["divergences"] for st in d["minimize_step_records"]]
    assert code == 1 and {st["kind"] for _, st in steps} >= {"shrink", "bisect_scale"}
    words = {  # how -v words each kind of step: written out here, not taken from losscmp
        "shrink": lambda st: f"shrink {st['dim']}: {st['before']} -> {st['after']} ({st['evaluations']} evaluations)",
        "bisect_scale": lambda st: f"bisect input scale: threshold {st['threshold']:.4g} ({st['evaluations']} evaluations)",
        "simplify_values": lambda st: "simplify values: " + ", ".join(f"{a} -> {f}" for a, f in st["forms"].items()) + f" ({st['evaluations']} evaluations)",
        "simplify_elements": lambda st: f"simplify elements of {', '.join(st['args'])} ({st['evaluations']} evaluations)",
        "toward_threshold": lambda st: (f"the largest |element| of {' and '.join(st['args'])} {st['before']:.6g} -> {st['after']:.6g}, "
                                        f"just past the threshold ({st['evaluations']} evaluations)"),
        "remeasure": lambda st: (f"threshold measured again on the final example: {st['threshold']:.4g}" if st["threshold"] is not None
                                 else "the final example diverges at every scale") + f" ({st['evaluations']} evaluations)",
    }
    for d, st in steps:
        said = words[st["kind"]](st)
        assert f"- {said}" in flat, said
        assert said in d["minimize_steps"]  # the JSON's words are the terminal's
    for d in report["divergences"]:
        assert len(d["minimize_steps"]) == len(d["minimize_step_records"])
        assert sum(st["evaluations"] for st in d["minimize_step_records"]) <= d["evaluations"]
