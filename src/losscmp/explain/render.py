"""An :class:`~losscmp.explain.explanation.Explanation` in words and in JSON: its one
sentence, the evidence lines behind it (``-v``) and the ``explanation`` object of the
``--json`` report.  Nothing here decides anything; it reads the record's fields.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .consistency import FD_RTOL
from .oracle import Category
from .words import json_float, num, pct, short_path

if TYPE_CHECKING:  # the record calls these functions; the annotation only names it
    from .explanation import Explanation


def sentence(ex: Explanation) -> str:
    e, a = ex.pair
    c = ex.category
    if c is Category.SEMANTIC and ex.origin is not None:
        other = e if ex.origin.label == a else a
        head = (f"semantic: {ex.origin.label} gives NaN/inf by {ex.origin.describe()} where {other} stays finite "
                f"(a guard on one side only; float64 too, at any input scale)")
    # Symmetric on purpose: "a computes a different function from e" read as blame on a,
    # the GPU demo printed it for BCELoss' clamp on the other side.  Which side departs
    # from its own derivative or from a known clamp is said by the parts that know.
    elif c is Category.SEMANTIC and ex.kind == "gradient":
        head = f"semantic: the gradients of {e} and {a} differ (in float64 too)"
    elif c is Category.SEMANTIC:
        head = f"semantic: {e} and {a} compute different functions (they differ in float64 too)"
    elif c is Category.NUMERICAL and ex.float64_differs:
        # Not "agree in float64": only the NaN/inf is the working dtype's doing.
        drift_u = ex.drift.get(ex.unstable_side or "", math.nan)
        head = (f"numerical: {ex.unstable_side}'s NaN/inf is the working dtype's (finite in float64; drifts from its own float64 "
                f"result, score {num(drift_u)}); the finite float64 results of {e} and {a} still differ, a cause of its own")
    elif c is Category.NUMERICAL:
        drift_u = ex.drift.get(ex.unstable_side or "", math.nan)
        head = f"numerical: {e} and {a} agree in float64; {ex.unstable_side} drifts from its own float64 result (score {num(drift_u)})"
    elif c is Category.UNKNOWN:
        head = f"unknown: {ex.reason}"
    else:
        head = f"{c.value}: {ex.reason}" if ex.reason else c.value
    parts = [head]
    if ex.mixed:
        m = ex.mixed[0]
        parts.append(f"two causes in this finding: {m.category.value} on {len(ex.mixed)} of the {ex.checked} cases checked "
                     f"({m.case}: {m.reason.split(';')[0]}), {c.value} on the case shown")
    parts += [f"{la}'s NaN/inf is its float64 result correctly rounded (an overflow of the working dtype, not an error)" for la in ex.rounded]
    where = _where(ex)
    if where:
        parts.append(f"first differing op at {where}")
    bad = [s for s in ex.self_consistency.values() if s.consistent is False]
    if len(bad) == 1:
        s = bad[0]
        parts.append(f"{s.label}'s gradient is not the derivative of its own value (finite differences off by {pct(s.max_error)})")
    elif bad:
        # Both sides off alike is usually a deliberate approximation (envelope-theorem
        # gradients of an unconverged solver), not a bug on one side: say so, blame neither.
        off = " and ".join(pct(s.max_error) for s in bad)
        parts.append(f"neither side's gradient is the exact derivative of its own value (finite differences off by {off}: an approximate gradient on both sides)")
    at_kink = [s.label for s in ex.self_consistency.values() if s.kink and s.consistent is None]
    if at_kink:
        parts.append(f"{' and '.join(at_kink)} {'is' if len(at_kink) == 1 else 'are'} at a non-differentiable point here "
                     f"(one-sided slopes differ: any value between them is a valid subgradient, so no gradient verdict)")
    r = ex.relation
    if r is not None:
        if r.value == "factor" and r.factor is not None:
            parts.append(f"values a constant factor apart ({a} ≈ {num(r.factor)} × {e})")
        elif r.value == "offset" and r.offset is not None:
            parts.append(f"values a constant offset apart ({num(r.offset)})")
        if r.same_minimisers:
            parts.append("gradients parallel (same minimisers, different step size)")
        elif r.gradient == "parallel" and r.opposite:
            parts.append(f"gradients parallel on {r.gradient_fits} / {r.gradient_cases} cases but opposite on {r.opposite}: different minimisers")
        elif r.gradient == "parallel":
            parts.append(f"gradients parallel on {r.gradient_fits} / {r.gradient_cases} cases (not all: same minimisers not shown)")
        elif r.gradient == "other" and r.cosine_median is not None:
            parts.append(f"gradients point elsewhere (median cosine {r.cosine_median:.2g})")
    if ex.impact is not None:
        parts.append(_impact_words(ex))
    if ex.notes:
        parts.append(ex.notes[0])
    return "; ".join(parts)


def _where(ex: Explanation) -> str | None:
    loc = location_json(ex.location)[0]
    if not isinstance(loc, dict):
        return None
    # The side the trace names (the one under test, or the unstable one) comes first.
    named = getattr(ex.location, "side", None)
    for label in (named, ex.pair[1], ex.pair[0]):
        site = loc.get(label)
        if isinstance(site, dict) and site.get("file"):
            return f"{short_path(site['file'])}:{site.get('line')}"
    return None


def _impact_words(ex: Explanation) -> str:
    e, a = ex.pair
    im = ex.impact
    assert im is not None  # called only when there is one
    by_a = im.cross_improvement.get(a, math.nan)
    if not math.isfinite(by_a):
        why = im.note.split("; ")[0] if im.note else "no progress"
        words = f"training impact not measurable from this case ({why})"
    elif by_a <= 0:
        words = f"descent under {a} does not descend {e}'s loss"
    elif im.apart > 0.1:
        words = f"both losses go down, but they lead to different places (end points {im.apart:.2g}× the distance travelled apart)"
    else:
        words = f"descent under either leads to the same place (end points {im.apart:.2g}× the distance travelled apart)"
    r = im.gradient_ratio
    if r is not None and (r < 1e-3 or r > 1e3):
        words += f", but |∇{a}| is {num(r)}× |∇{e}| at the start: with a fixed learning rate it would {'stall' if r < 1 else 'blow up'}"
    return words


def evidence(ex: Explanation) -> list[str]:
    e, a = ex.pair
    lines = [f"float64 oracle: {ex.category.value} — {ex.reason}" if ex.reason else f"category: {ex.category.value}"]
    lines += [f"on another case of this finding, {m.category.value} — {m.reason} ({m.case})" for m in ex.mixed]
    if ex.origin is not None:
        lines.append(f"non-finite origin in {ex.origin.label}: {ex.origin.describe()}")
    if ex.onset is not None:
        lines.append(f"{ex.unstable_side} turns non-finite once the largest |element| of the scaled arguments reaches {ex.onset:.6g} "
                     f"(bisected on the input scale)")
    if ex.drift:
        lines.append("drift from own float64 result rounded to the working dtype (score, working tolerance): "
                     + ", ".join(f"{la} {num(v)}" for la, v in ex.drift.items()))
    for s in ex.self_consistency.values():
        if s.consistent is None:
            lines.append(f"self-consistency of {s.label}: no verdict ({s.note})")
        else:
            verdict = "consistent" if s.consistent else "INCONSISTENT"
            # The error is how far autograd lies outside the range of the two one-sided
            # difference quotients: 0 is "inside it", not exact agreement.
            where = ("autograd lies within the range of the one-sided difference quotients" if not s.max_error else
                     f"autograd lies outside the range of the one-sided difference quotients by up to {num(s.max_error)} "
                     f"of the derivative's size (up to {FD_RTOL:g} allowed)")
            lines.append(f"self-consistency of {s.label}: {verdict}; finite differences vs autograd, {s.mode}, "
                         f"{s.checks} check(s): {where}" + (f"; {s.note}" if s.note else ""))
    if ex.relation is not None:
        lines.append(f"relation: {ex.relation.describe(ex.pair)}")
    loc, note = location_json(ex.location)
    if loc:
        for label, site in loc.items():
            if isinstance(site, dict):
                # The path as the sentence above writes it (the JSON keeps it absolute).
                lines.append(f"location in {label}: {short_path(str(site.get('file')))}:{site.get('line')}: "
                             f"{site.get('code', '')} ({site.get('op', '')})")
    if note:
        lines.append(f"location: {note}")
    if ex.impact is not None:
        im = ex.impact
        # NaN: the other side's own descent made no progress, so there is no ratio to give.
        cross = ", ".join(f"descending {la} achieves {num(v)} of the other's own improvement" if not math.isnan(v)
                          else f"descending {la}: not measurable (the other's own descent made no progress)"
                          for la, v in im.cross_improvement.items())
        ratio = f"; |∇{a}| / |∇{e}| at the start {num(im.gradient_ratio)}" if im.gradient_ratio is not None else ""
        # One side stuck and the other moving: say so, not "0 steps" and "2x apart"
        # (which reads as opposite directions).
        steps = (", ".join(f"{la} {n}" for la, n in im.taken.items()) if len(set(im.taken.values())) > 1 else str(im.steps))
        moved = [la for la, d in im.travelled.items() if d > 0]
        apart = (f"only {moved[0]} moved (the other took no step), so no distance apart is given"
                 if len(moved) == 1 and len(im.travelled) == 2 else f"end points {num(im.apart)}× the distance travelled apart")
        lines.append(f"training impact: {steps} normalised descent step(s) (backtracking, first step {im.lr:g} of the case's size); "
                     f"{apart}; {cross}{ratio}" + (f"; {im.note}" if im.note else ""))
    lines += [f"note: {n}" for n in ex.notes]
    lines += [f"skipped: {s}" for s in ex.skipped]
    if ex.budget_note:
        lines.append(f"budget: {ex.budget_note}")
    lines.append(f"cost: {ex.evaluations} implementation call(s), {ex.seconds:.2f} s")
    return lines


def to_json(ex: Explanation) -> dict[str, Any]:
    loc, note = location_json(ex.location)
    return {
        "category": ex.category.value,
        "reason": ex.reason,
        "unstable_side": ex.unstable_side,
        "cases_checked": ex.checked,  # the finding's cases the category was decided over
        "mixed": [m.to_json() for m in ex.mixed],  # cases with the other cause: two causes in one finding
        "drift": {k: json_float(v) for k, v in ex.drift.items()},
        "self_consistency": {k: v.to_json() for k, v in ex.self_consistency.items()},
        "relation": ex.relation.to_json() if ex.relation else None,
        "location": loc,
        "location_note": note,
        # How well the data backs the lines, and which side a summary names (trace.Localisation).
        "location_confidence": getattr(getattr(ex.location, "confidence", None), "value", None),
        "location_side": getattr(ex.location, "side", None),
        "impact": ex.impact.to_json() if ex.impact else None,
        "notes": list(ex.notes),
        "skipped": list(ex.skipped),
        "origin": ex.origin.to_json() if ex.origin else None,
        "rounded": list(ex.rounded),
        "float64_differs": ex.float64_differs,
        "nonfinite_onset": json_float(ex.onset),
        "budget": ex.budget_note or None,
        "sentence": sentence(ex),
        "evaluations": ex.evaluations,
        "seconds": ex.seconds,
    }


def location_json(loc: Any) -> tuple[Any, str | None]:
    """(location JSON, note) from a trace.Localisation (duck-typed: .to_json(), .note)."""
    if loc is None:
        return None, None
    data = loc.to_json() if hasattr(loc, "to_json") else loc
    note = getattr(loc, "note", None)
    if isinstance(data, dict) and "location" in data:
        return data["location"], data.get("location_note", note)
    return data, note
