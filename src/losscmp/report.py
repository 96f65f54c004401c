"""Reports: a terminal summary (rich) and the machine-readable JSON report."""
from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import files, jsonout
from .forking import loads_by_reference
from .display import step_text, tensor_text, verdict_text
from .model import Alone, AuditResult, Divergence, Mismatch, RunPhase, Step, Verdict, subject_labels_json
from .project import shown_path
from .replay import SavedReplay
from .sweep import SweepResult
from .workers import portable_ref

# Explanation fields also found at the top of each divergence in --json.
CONTRACT_FIELDS = ("category", "unstable_side", "location", "location_note", "self_consistency", "relation", "impact", "notes")
SHOW_TENSORS_UP_TO = 24  # elements per tensor printed in full
OUTPUT_LINES = 6  # lines of an implementation's own output shown with a finding


def _score(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def tally_text(result: AuditResult) -> str:
    """Every case accounted for: '100 cases: 49 agree, 49 value, 2 gradient'."""
    parts = sorted(result.tally.items(), key=lambda kv: (kv[0] != "agree", -kv[1]))
    return ", ".join(f"{n} {what}" for what, n in parts)


def print_audit(result: AuditResult, console: Console, details: bool = True, verbose: bool = False,
                evidence_hint: str = "-v, or --json", saved_still_diverging: int = 0) -> None:
    """The verdict table, then (``details``) one screen per finding, with its evidence
    when ``verbose``.  ``saved_still_diverging``: saved cases replayed first that still
    diverge (listed above the table); then the last line never says all agree."""
    s = result.settings
    ex = s.execution
    console.print(
        f"[bold]losscmp[/]: {len(result.implementations)} implementations, {result.cases_run} cases "
        f"(seed {s.search.seed}, {str(ex.dtype).removeprefix('torch.')}, {ex.device}; rtol {s.tolerance.rtol:g}, atol {s.tolerance.atol:g}) "
        f"in {result.seconds:.1f} s"
    )
    table = Table(show_header=True, header_style="bold")
    for col in ("pair", "verdict", "diverging cases", "worst score", "kinds"):
        table.add_column(col)
    for row in pair_rows(result):
        if row["verdict"] == "diverge":
            table.add_row(escape(str(row["subject"])), "[red]DIVERGE[/]", f"{row['diverging_cases']} / {result.cases_run}",
                          _score(row["worst_score"]), ", ".join(row["kinds"]))
        elif row["compared_cases"] < result.cases_run:
            table.add_row(escape(str(row["subject"])), f"[yellow]agree on {row['compared_cases']} compared[/]", "0", "-", "-")
        else:
            table.add_row(escape(str(row["subject"])), "[green]agree[/]", "0", "-", "-")
    console.print(table)
    console.print(f"cases: {tally_text(result)}", markup=False, highlight=False)
    for subject, (n, why) in result.not_compared.items():
        console.print(f"[yellow]not compared[/] on {n} case(s), {escape(str(subject))}: {escape(why)}", highlight=False)
    for d in result.divergences if details else ():
        print_divergence(d, result, console, verbose, evidence_hint)
    if details and result.divergences and not verbose:
        console.print(f"(the evidence behind each finding: {evidence_hint})", markup=False, highlight=False)
    for why in result.stage_errors:
        console.print(f"warning: {why}", markup=False, highlight=False)
    if result.interrupted:
        console.print(f"[yellow]Interrupted[/] ({result.interrupted}) {_unfinished(result.phase)}; the run did not finish.", highlight=False)
    elif result.agree and saved_still_diverging:
        console.print(f"[yellow]No divergence[/] in the {result.cases_run} new cases; {saved_still_diverging} saved case(s) "
                      "still diverge (above).", highlight=False)
    elif result.agree and not result.not_compared:
        console.print(f"[green]All implementations agree[/] on {result.cases_run} cases.")
    elif result.agree:
        compared_cases = result.cases_run - max(n for n, _ in result.not_compared.values())
        console.print(f"[yellow]No divergence[/] on the {compared_cases} cases that could be compared; the others were not compared (above).")


def _unfinished(phase: RunPhase) -> str:
    if phase is RunPhase.EXPLORE:
        return "during the search: the findings above are what its first cases showed, not minimised or explained"
    return "while minimising and explaining: the findings above may lack their minimal example or explanation"


def print_partial(data: dict[str, Any], file: Any) -> None:
    """What a run that ended early had found, from its JSON report (the supervisor writes
    it when an implementation killed or hung the process that would have printed more)."""
    print(f"losscmp: the run ended early ({data.get('interruption')}); found until then:", file=file)
    tally = sorted(data.get("tally", {}).items(), key=lambda kv: (kv[0] != "agree", -kv[1]))
    print(f"cases: {', '.join(f'{n} {what}' for what, n in tally) or 'none finished'}", file=file)
    for p in data.get("not_compared", []):
        print(f"not compared on {p['cases']} case(s), {' vs '.join(p['pair'])}: {p['why']}", file=file)
    for d in data.get("divergences", []):
        line = f"  {' vs '.join(d['pair'])}: {d['kind']} on {d['cases']} case(s), worst score {d['score_text']}: {d['detail']}"
        print(line + (f"; repro: {d['repro']}" if d.get("repro") else ""), file=file)
    print("(the run stopped there: these findings are not all minimised or explained)", file=file, flush=True)


def pair_rows(result: AuditResult) -> list[dict[str, Any]]:
    """The verdict table's rows, one per subject: the terminal table, the JSON ``pairs``
    and the HTML summary are this one list."""
    by_subject: dict[Any, list[Divergence]] = {}
    for d in result.divergences:
        by_subject.setdefault(d.subject, []).append(d)
    compared = list(result.pairs)
    rows = []
    for subject in compared + [p for p in by_subject if p not in compared]:
        ds = by_subject.get(subject, [])
        skipped = result.not_compared.get(subject, (0, ""))[0]
        rows.append({
            "subject": subject,
            "verdict": "diverge" if ds else "agree",
            "diverging_cases": result.subject_cases.get(subject, sum(d.count for d in ds)) if ds else 0,
            "compared_cases": result.cases_run - skipped,
            "worst_score": max(d.score for d in ds) if ds else None,
            "kinds": list(dict.fromkeys(d.kind.value for d in ds)),
        })
    return rows


def replay_command(d: Divergence, result: AuditResult) -> str | None:
    """The command that replays a finding's saved case, as pasted in the current folder."""
    if not d.repro:
        return None
    # A replay loads each side by its reference: a lambda or a test's local function has none
    # that gets it back (a pytest check offers to rerun its test instead).
    # A side that ran under another interpreter replays there too (this one may lack its package).
    pythons = dict(result.settings.execution.pythons)
    impls = {i.label: i for i in result.implementations}
    if not all(loads_by_reference(impls[la], portable_ref) for la in d.subject.labels if la in impls and la not in pythons):
        return None
    there = "".join(f" --python {shlex.quote(f'{la}={pythons[la]}')}" for la in d.subject.labels if la in pythons)
    return f"losscmp replay {shlex.quote(shown_path(d.repro))}{there}"


def print_divergence(d: Divergence, result: AuditResult, console: Console, verbose: bool = False,
                     evidence_hint: str = "-v, or --json") -> None:
    """One screen per finding: its sentence, the worst and the minimal example with both
    sides' values, the threshold, the replay command.  ``verbose`` adds the evidence
    (regimes, minimiser steps, oracle, drift, self-consistency, relation, location,
    impact, notes, cost), which the JSON report always holds."""
    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)

    groups = [g for g in result.divergences if g.subject == d.subject and g.kind == d.kind]
    cause = f" (cause {groups.index(d) + 1} of {len(groups)})" if len(groups) > 1 else ""
    console.print()
    console.rule(f"[bold red]{escape(str(d.subject))}: {d.kind.value}[/]{cause} — {d.kind.description}", align="left")
    if d.explanation is not None:
        say(d.explanation.sentence())
    say(f"worst of {d.count} case(s), {d.case.describe()}, score {_score(d.score)}: {verdict_text(d.verdict)}")
    if verbose and (len(d.regimes) > 1 or d.representative is not None):
        say("diverging cases by regime: " + ", ".join(f"{r} {n}" for r, n in sorted(d.regimes.items(), key=lambda kv: -kv[1])))
    if verbose and d.representative is not None and d.representative_verdict is not None:
        say(f"mildest: {d.representative.describe()}: {verdict_text(d.representative_verdict)}")
    for label, text in d.outputs.items():
        lines = text.strip().splitlines()
        if not verbose:  # its first line may be the clue (a warning); the rest is evidence
            first = lines[0] if len(lines[0]) <= 100 else lines[0][:97] + "..."
            more = f" (+{len(lines) - 1} more line(s): {evidence_hint})" if len(lines) > 1 else ""
            say(f"{label} printed: {first}{more}")
            continue
        shown = lines[:OUTPUT_LINES] + ([f"... ({len(lines) - OUTPUT_LINES} more lines)"] if len(lines) > OUTPUT_LINES else [])
        say(f"{label} printed: " + "\n    ".join(shown))
    m = d.minimized
    if m is not None:
        if verbose:
            sizes = ", ".join(f"{k} {m.original_sizes[k]} -> {v}" for k, v in m.sizes.items())
            say(f"minimised in {m.evaluations} evaluations: {sizes}")
            for step in m.steps:
                say(f"  - {step_text(step)}")
        dims = ", ".join(f"{k}={v}" for k, v in m.sizes.items())
        verdict = f": {verdict_text(m.verdict)}" if m.verdict is not None and m.verdict.kind else ""
        say(f"minimal example ({dims}){verdict}")
        for name, t in m.case.tensors.items():  # large inputs are summarised, never dropped
            say(f"  {name} = {tensor_text(t, limit=SHOW_TENSORS_UP_TO)}")
        if m.threshold:
            relation = getattr(d.explanation, "relation", None)
            if relation is not None and relation.value == "factor" and d.kind in ("value", "gradient"):
                # Not a threshold: a constant factor only hides under atol at small scale.  An
                # offset does not shrink with the scale, and a NaN/inf is not a factor apart:
                # there the measured threshold is the true statement.
                say(f"no threshold: the values are a constant factor apart; below {m.threshold.knob} = {m.threshold.value:.4g} "
                    f"the difference is only smaller than atol")
            else:
                say(f"threshold: {m.threshold.describe()}")
    if d.explanation is not None and verbose:
        for line in d.explanation.evidence():
            say(f"  {line}")
    command = replay_command(d, result)
    if command:
        # Never wrapped: a command split over two lines does not paste.
        console.print(f"replay: {command}", markup=False, highlight=False, soft_wrap=True)
    elif d.repro:
        say(f"saved: {shown_path(d.repro)} (not replayable alone: a side is a lambda or local function, which no reference loads)")
    elif d.repro_error:
        say(f"repro not saved: {d.repro_error}")


def print_replayed(replayed: Sequence[SavedReplay], console: Console) -> None:
    """The saved cases replayed before the search, one line each."""
    if replayed:
        console.print(f"replayed {len(replayed)} saved case(s) first:", markup=False, highlight=False)
    for s in replayed:
        v = s.result.verdict
        now = (f"[red]still diverges[/] ({v.kind.value}): {escape(verdict_text(v))}" if v.kind
               else f"[yellow]not compared[/]: {escape(verdict_text(v))}" if not v.compared else "[green]agrees now[/]")
        console.print(f"  {escape(shown_path(s.path))} (saved as {s.recorded.value}, {escape(str(v.subject))}): {now}", highlight=False)


def replayed_json(s: SavedReplay) -> dict[str, Any]:
    v = s.result.verdict
    return {"path": str(s.path), "pair": subject_labels_json(v.subject), "recorded": s.recorded.value,
            "kind": v.kind.value if v.kind else None, "compared": v.compared, "score": v.score, "detail": verdict_text(v),
            "mismatch": mismatch_json(v.mismatch)}


def sweep_json(result: SweepResult) -> dict[str, Any]:
    """``losscmp sweep --json``: the knob, each grid point's verdict, each boundary (the
    grid step it was found in), as the terminal prints them."""
    k = result.knob
    return {
        "pair": [result.pair.expected, result.pair.actual],
        "knob": {"name": k.name, "side": k.side, "lo": k.lo, "hi": k.hi, "log": k.log},
        "input": result.case.describe(),
        "points": [{"value": p.value, "kind": p.verdict.kind.value if p.verdict.kind else None, "score": p.verdict.score,
                    "detail": verdict_text(p.verdict), "mismatch": mismatch_json(p.verdict.mismatch)} for p in result.points],
        "boundaries": [{"agree_at": b.agree_at, "diverge_at": b.diverge_at, "value": b.value, "kind": b.kind.value,
                        "between": list(b.step)} for b in result.boundaries],
        "evaluations": result.evaluations,
    }


def mismatch_json(m: Mismatch | None) -> dict[str, Any] | None:
    """A tensor finding's record as fields: the numbers the terminal's words are made of."""
    if m is None:
        return None
    d = m.shown
    return {
        "component": d.what,
        "sides": list(m.sides),  # [expected, actual], as the words name them
        "mismatched": d.mismatched,
        "total": d.total,
        "nonfinite_mismatched": d.nonfinite_mismatch,
        "greatest_absolute_difference": jsonout.number(d.max_abs),
        "index": list(d.max_abs_index),
        "allowed_absolute_difference": jsonout.number(d.allowed_abs),  # atol + rtol * |expected| at that index
        "greatest_relative_difference": jsonout.number(d.max_rel),
        "relative_index": list(d.max_rel_index),
        "expected": jsonout.number(d.expected),  # both sides at ``index``
        "actual": jsonout.number(d.actual),
        "relative_l2_error": jsonout.number(d.rel_l2),
        "cosine": jsonout.number(d.cosine),
        "score": jsonout.number(d.score),
        "others": [{"component": o.what, "agrees": o.score <= 1 and not o.nonfinite_mismatch,
                    "nonfinite_mismatched": o.nonfinite_mismatch, "greatest_absolute_difference": jsonout.number(o.max_abs),
                    "cosine": jsonout.number(o.cosine)} for o in m.others],
    }


def step_json(step: Step) -> dict[str, Any]:
    """A minimiser step as fields: its kind and cost, and only the facts that kind has."""
    fields = {"dim": step.dim, "before": step.before, "after": step.after, "args": list(step.args) or None,
              "forms": {arg: form for arg, form in step.forms} or None,
              "scale": step.scale if step.kind.value == "lift_denormals" else None, "threshold": step.threshold}
    measured = step.kind.value in ("bisect_scale", "remeasure")  # a null threshold there: diverges at every scale
    return {"kind": step.kind.value, "evaluations": step.evaluations,
            **{k: jsonout.plain(v) for k, v in fields.items() if v is not None or (k == "threshold" and measured)}}


def _verdict_json(v: Verdict) -> dict[str, Any]:
    return {"detail": verdict_text(v), "mismatch": mismatch_json(v.mismatch)}


def audit_json(result: AuditResult, replayed: Sequence[SavedReplay] = ()) -> dict[str, Any]:
    """The ``--json`` report; ``agree`` is false when a replayed saved case still diverges, as the exit code says."""
    s = result.settings
    return {
        "implementations": list(result.labels),
        "references": {i.label: i.ref.source() for i in result.implementations},
        "spec": result.spec.text(),
        "cases_run": result.cases_run,
        "tally": dict(result.tally),
        "not_compared": [{"pair": subject_labels_json(p), "cases": n, "why": why} for p, (n, why) in result.not_compared.items()],
        "seed": s.search.seed,
        "device": s.execution.device,
        "dtype": str(s.execution.dtype).removeprefix("torch."),
        "tolerance": {"rtol": s.tolerance.rtol, "atol": s.tolerance.atol},
        "agree": result.agree and not any(r.result.verdict.kind for r in replayed),
        "replayed": [replayed_json(r) for r in replayed],
        "seconds": round(result.seconds, 3),
        "evaluations": result.evaluations,
        "pairs": [{**{k: v for k, v in row.items() if k != "subject"}, "pair": subject_labels_json(row["subject"]),
                   "worst_score": row["worst_score"]}
                  for row in pair_rows(result)],
        "divergences": [divergence_json(d, result) for d in result.divergences],
        "stage_errors": list(result.stage_errors),
        "interrupted": result.interrupted is not None,
        "interruption": f"{result.interrupted}: the run was stopped" if result.interrupted else None,
    }


def divergence_json(d: Divergence, result: AuditResult | None = None) -> dict[str, Any]:
    m = d.minimized
    explained = d.explanation.to_json() if d.explanation is not None else None
    if explained is not None:
        explained.pop("seconds", None)  # wall time: the one thing the same seed cannot repeat (the run's total is at the top)
    return {
        "pair": subject_labels_json(d.subject),
        "alone": isinstance(d.subject, Alone),
        "kind": d.kind.value,
        "score": d.score,
        "score_text": _score(d.score),
        "cases": d.count,
        "regimes": dict(d.regimes),
        **_verdict_json(d.verdict),
        "regime": d.case.recipe.regime if d.case.recipe else None,
        "input": d.case.describe(),
        "representative": {"input": d.representative.describe(), **_verdict_json(d.representative_verdict)}
        if d.representative is not None and d.representative_verdict is not None else None,
        "output": dict(d.outputs),
        "original_sizes": dict(d.case.sizes),
        "minimized_sizes": dict(m.sizes) if m else None,
        "evaluations": m.evaluations if m else None,
        "minimize_steps": [step_text(st) for st in m.steps] if m else None,
        "minimize_step_records": [step_json(st) for st in m.steps] if m else None,
        # The minimal example as a person reads it: the verdict on it and each input, in full when small.
        "minimal": {**(_verdict_json(m.verdict) if m.verdict is not None and m.verdict.kind else {"detail": None, "mismatch": None}),
                    "inputs": {name: tensor_text(t, limit=SHOW_TENSORS_UP_TO) for name, t in m.case.tensors.items()}} if m else None,
        "threshold": (
            {"knob": m.threshold.knob, "agree_at": m.threshold.agree_at, "diverge_at": m.threshold.diverge_at, "value": m.threshold.value,
             "still_differ_at_agree": m.threshold.still or None, "text": m.threshold.describe()}
            if m and m.threshold
            else None
        ),
        "repro": d.repro,
        "replay_command": replay_command(d, result) if result is not None else None,
        "repro_error": d.repro_error,
        "gradient_summaries": [
            {"what": t.what, "max_abs": t.max_abs, "max_rel": t.max_rel, "rel_l2": t.rel_l2, "cosine": t.cosine, "score": t.score}
            for t in d.verdict.diffs
        ],
        # The whole explanation, with its own call count ("evaluations") and its sentence,
        # nests under its own key, so it can never overwrite a field of the finding (the
        # minimiser's "evaluations").  The fields the report has always carried at the top
        # (DESIGN's "JSON per divergence") are copied there by name: null without one.
        **{key: explained[key] if explained else None for key in CONTRACT_FIELDS},
        "explanation": explained,
    }


def write_json(data: dict[str, Any], path: str | Path, stdout: Any = None, option: str = "--json") -> None:
    text = jsonout.dumps(data, indent=2, default=str)
    if str(path) == "-":
        print(text, file=stdout or sys.stdout, flush=True)
    else:
        files.write_text(path, text + "\n", option)
