"""Reports: a terminal summary (rich) and the machine-readable JSON report."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .audit import AuditResult, Divergence
from .compare import KINDS
from .display import tensor_text

SHOW_TENSORS_UP_TO = 24  # elements per tensor printed in full


def _score(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def print_audit(result: AuditResult, console: Console, details: bool = True) -> None:
    s = result.settings
    console.print(
        f"[bold]losscmp[/]: {len(result.implementations)} implementations, {result.cases_run} cases "
        f"(seed {s.seed}, {str(s.dtype).removeprefix('torch.')}, {s.device}; rtol {s.tolerance.rtol:g}, atol {s.tolerance.atol:g}) "
        f"in {result.seconds:.1f} s"
    )
    table = Table(show_header=True, header_style="bold")
    for col in ("pair", "verdict", "diverging cases", "worst score", "kinds"):
        table.add_column(col)
    by_pair: dict[tuple[str, str], list[Divergence]] = {}
    for d in result.divergences:
        by_pair.setdefault(d.pair, []).append(d)
    compared = list(result.pairs)
    for pair in compared + [p for p in by_pair if p not in compared]:
        ds = by_pair.get(pair, [])
        name = pair[0] if pair[0] == pair[1] else f"{pair[0]} vs {pair[1]}"
        if not ds:
            table.add_row(name, "[green]agree[/]", "0", "-", "-")
            continue
        count = result.pair_cases.get(pair, max(d.count for d in ds))
        table.add_row(
            name, "[red]DIVERGE[/]", f"{count} / {result.cases_run}", _score(max(d.score for d in ds)), ", ".join(d.kind for d in ds)
        )
    console.print(table)
    for d in result.divergences if details else ():
        print_divergence(d, result, console)
    if result.agree:
        console.print(f"[green]All implementations agree[/] on {result.cases_run} cases.")


def print_divergence(d: Divergence, result: AuditResult, console: Console) -> None:
    who = d.pair[0] if d.pair[0] == d.pair[1] else f"{d.pair[0]} vs {d.pair[1]}"
    console.print()
    console.rule(f"[bold red]{who}: {d.kind}[/] — {KINDS.get(d.kind, '')}", align="left")
    console.print(f"worst of {d.count} case(s), score {_score(d.score)}: {d.verdict.detail}", markup=False, highlight=False)
    console.print(f"input: {d.case.describe()}", markup=False, highlight=False)
    m = d.minimized
    if m is not None:
        sizes = ", ".join(f"{k} {m.original_sizes[k]} -> {v}" for k, v in m.sizes.items())
        console.print(f"minimised in {m.evaluations} evaluations: {sizes}", markup=False, highlight=False)
        for step in m.steps:
            console.print(f"  - {step}", markup=False, highlight=False)
        if m.verdict is not None and m.verdict.kind:
            console.print(f"on the minimised input: {m.verdict.detail}", markup=False, highlight=False)
        for name, t in m.case.tensors.items():  # large inputs are summarised, never dropped
            console.print(f"  {name} = {tensor_text(t, limit=SHOW_TENSORS_UP_TO)}", markup=False, highlight=False)
        if m.threshold:
            console.print(f"threshold: {m.threshold.describe()}", markup=False, highlight=False)
    if d.repro:
        console.print(f"repro: {d.repro}  (losscmp replay {d.repro})", markup=False, highlight=False)
    elif d.repro_error:
        console.print(f"repro not saved: {d.repro_error}", markup=False, highlight=False)


def audit_json(result: AuditResult) -> dict[str, Any]:
    s = result.settings
    return {
        "implementations": list(result.labels),
        "references": {i.label: i.ref.source() for i in result.implementations},
        "spec": result.spec.text(),
        "cases_run": result.cases_run,
        "seed": s.seed,
        "device": s.device,
        "dtype": str(s.dtype).removeprefix("torch."),
        "tolerance": {"rtol": s.tolerance.rtol, "atol": s.tolerance.atol},
        "agree": result.agree,
        "seconds": round(result.seconds, 3),
        "divergences": [divergence_json(d) for d in result.divergences],
    }


def divergence_json(d: Divergence) -> dict[str, Any]:
    m = d.minimized
    return {
        "pair": list(d.pair),
        "kind": d.kind,
        "score": _num(d.score),
        "score_text": _score(d.score),
        "cases": d.count,
        "detail": d.verdict.detail,
        "regime": d.case.recipe.regime if d.case.recipe else None,
        "input": d.case.describe(),
        "original_sizes": dict(d.case.sizes),
        "minimized_sizes": dict(m.sizes) if m else None,
        "evaluations": m.evaluations if m else None,
        "minimize_steps": list(m.steps) if m else None,
        "threshold": (
            {"knob": m.threshold.knob, "agree_at": m.threshold.agree_at, "diverge_at": m.threshold.diverge_at, "value": m.threshold.value}
            if m and m.threshold
            else None
        ),
        "repro": d.repro,
        "repro_error": d.repro_error,
        "gradient_summaries": [
            {"what": t.what, "max_abs": _num(t.max_abs), "max_rel": _num(t.max_rel), "rel_l2": _num(t.rel_l2), "cosine": _num(t.cosine), "score": _num(t.score)}
            for t in d.verdict.diffs
        ],
        # Filled in by the explain stage once it lands.
        "category": None,
        "unstable_side": None,
        "location": None,
    }


def _num(x: float) -> float | None:
    """JSON has no inf/NaN: those become null (``score_text`` keeps "inf")."""
    return x if math.isfinite(x) else None


def write_json(data: dict[str, Any], path: str | Path) -> None:
    text = json.dumps(data, indent=2, allow_nan=False, default=str)
    if str(path) == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")
