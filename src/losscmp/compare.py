"""Comparing two outcomes: the tolerance model, the divergence score, and messages.

Tolerance is that of :func:`torch.testing.assert_close`: an element agrees when

    |a - b| <= atol + rtol * |b|

with ``b`` the expected side (the reference, or the first implementation listed) and
dtype-aware defaults.  The *score* of an element is ``|a - b| / (atol + rtol * |b|)``;
the score of a case is the largest over its value and every gradient, so a score
above 1 means "beyond tolerance" and its size says by how much.  Mismatched NaN/inf
positions, exceptions and shape mismatches score ``inf``.
"""
from __future__ import annotations

import math
import re

import torch

from .display import diff_message, mismatch_text  # noqa: F401  diff_message re-exported: its home is display
from .model import DEFAULT_TOLERANCES, Kind, Mismatch, Outcome, Pair, Subject, TensorDiff, Tolerance, Verdict  # noqa: F401  re-exported: moved to model


def diff_tensors(what: str, actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> TensorDiff:
    """How ``actual`` differs from ``expected``.

    As in torch.testing, the greatest differences are taken over the *mismatched*
    elements when there are any (an agreeing element is never pointed at); over all
    elements otherwise.
    """
    if actual.is_complex() or expected.is_complex():
        # As (real, imaginary) pairs: a cast to float64 would drop the imaginary parts unseen.
        actual = torch.view_as_real(actual.detach().to("cpu", torch.complex128).reshape(expected.shape).resolve_conj())
        expected = torch.view_as_real(expected.detach().to("cpu", torch.complex128).resolve_conj())
    a = actual.detach().to("cpu", torch.float64).reshape(expected.shape)
    b = expected.detach().to("cpu", torch.float64)
    total = b.numel()
    if total == 0:
        return TensorDiff(what, 0.0, 0, 0, 0.0, (), 0.0, (), tol.atol, 0.0, 0.0, 0.0, 1.0)
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    # Identical non-finite values (NaN & NaN, +inf & +inf) count as agreeing.
    same_nonfinite = (~fa & ~fb) & ((a.isnan() & b.isnan()) | (a == b))
    bad_nonfinite = ~(fa & fb) & ~same_nonfinite
    both = fa & fb
    abs_diff = torch.where(both, (a - b).abs(), torch.zeros_like(a))
    allowed = tol.atol + tol.rtol * b.abs()
    # 0/0 (equal elements, zero tolerance) is agreement; x/0 with x > 0 is inf.
    score_el = torch.where(both & (abs_diff > 0), abs_diff / allowed, torch.zeros_like(a))
    rel = torch.where(both & (abs_diff > 0), abs_diff / b.abs(), torch.zeros_like(a))
    mismatched_mask = score_el > 1
    n_bad_nf = int(bad_nonfinite.sum())
    mismatched = int(mismatched_mask.sum()) + n_bad_nf
    score = math.inf if n_bad_nf else float(score_el.max())
    # Statistics over the mismatched elements only, when any mismatch.
    focus = mismatched_mask if bool(mismatched_mask.any()) else torch.ones_like(mismatched_mask)
    abs_focus = torch.where(focus, abs_diff, torch.full_like(a, -1.0))
    rel_focus = torch.where(focus, rel, torch.full_like(a, -1.0))
    idx_abs = _unravel(int(abs_focus.flatten().argmax()), b.shape)
    if n_bad_nf:
        idx_abs = _unravel(int(bad_nonfinite.flatten().int().argmax()), b.shape)
    idx_rel = _unravel(int(rel_focus.flatten().argmax()), b.shape)
    fa_, fb_ = a[both], b[both]
    na, nb = float(fa_.norm()), float(fb_.norm())
    rel_l2 = float((fa_ - fb_).norm()) / nb if nb > 0 else (0.0 if na == 0 else math.inf)
    cosine = float((fa_ * fb_).sum()) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    flat_abs = _ravel(idx_abs, b.shape)
    return TensorDiff(
        what=what,
        score=score,
        mismatched=mismatched,
        total=total,
        max_abs=float(abs_diff.flatten()[flat_abs]) if not n_bad_nf else float(abs_focus.max().clamp_min(0)),
        max_abs_index=idx_abs,
        max_rel=float(rel_focus.max().clamp_min(0)),
        max_rel_index=idx_rel,
        allowed_abs=float(allowed.flatten()[flat_abs]),
        actual=float(a.flatten()[flat_abs]),
        expected=float(b.flatten()[flat_abs]),
        rel_l2=rel_l2,
        cosine=cosine,
        nonfinite_mismatch=n_bad_nf,
    )


def _unravel(flat: int, shape: torch.Size) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return tuple(reversed(out))


def _ravel(index: tuple[int, ...], shape: torch.Size) -> int:
    flat = 0
    for i, size in zip(index, shape):
        flat = flat * size + i
    return flat


def _sides(subject: Subject) -> tuple[str, str]:
    """How the two sides are named in messages: two labels, or one label's two calls."""
    if isinstance(subject, Pair):
        return subject.expected, subject.actual
    return f"{subject.label} (first call)", f"{subject.label} (second call)"


# What a failure message says that changes from call to call while the failure stays the
# same: memory amounts (a CUDA out-of-memory error names what is free and reserved at that
# moment, below 1 KiB in plain bytes: "0 bytes", then "2.00 KiB"), addresses and process ids.  Two calls failing alike must not read as
# nondeterminism because the allocator held a few more MiB the second time.
_VOLATILE = re.compile(r"\b\d+(?:\.\d+)? ?(?:[KMGTP]i?B|bytes?)\b|\b0x[0-9a-fA-F]+\b|\b(?:[Pp]rocess|pid) \d+")


def failure_signature(error: str | None) -> str | None:
    """The message with its volatile parts (memory amounts, addresses, pids) blanked."""
    return None if error is None else _VOLATILE.sub("…", error)


def compare_failures(subject: Subject, expected: Outcome, actual: Outcome) -> Verdict:
    """At least one side failed.  Nothing here is ever agreement.

    One side failing is a finding of that side's kind.  Both failing the same way for
    the same reason (same status, same message) is "not compared"; both failing in
    different ways is a finding too: the most severe failure if a side died, else
    ``both_failed``.
    """
    le, la = _sides(subject)
    if not (expected.failed and actual.failed):
        bad, bad_label, good_label = (actual, la, le) if actual.failed else (expected, le, la)
        return Verdict(subject, Kind.of_status(bad.status), math.inf, f"{bad_label} {bad.error}; {good_label} returned normally")
    both = f"{le} {expected.error}; {la} {actual.error}"
    same = expected.status == actual.status and failure_signature(expected.error) == failure_signature(actual.error)
    if same and not expected.status.died:
        return Verdict(subject, None, 0.0, f"not compared: both failed the same way ({expected.error})", compared=False)
    died = [o.status for o in (expected, actual) if o.status.died]
    kind = Kind.of_status(min(died, key=lambda s: Kind.of_status(s).severity)) if died else Kind.BOTH_FAILED
    return Verdict(subject, kind, math.inf, f"both failed: {both}")


def compare_outcomes(subject: Subject, expected: Outcome, actual: Outcome, tol: Tolerance) -> Verdict:
    """Compare two outcomes; ``subject`` names (expected, actual)."""
    le, la = _sides(subject)
    if actual.failed or expected.failed:
        return compare_failures(subject, expected, actual)
    ve, va = expected.value, actual.value
    assert ve is not None and va is not None  # a call that did not fail returned a tensor
    if va.shape != ve.shape:
        return Verdict(subject, Kind.SHAPE, math.inf, f"value shapes differ: {le} {tuple(ve.shape)} vs {la} {tuple(va.shape)}")
    if va.dtype != ve.dtype:
        return Verdict(subject, Kind.DTYPE, math.inf, f"value dtypes differ: {le} {ve.dtype} vs {la} {va.dtype}")
    diffs = [diff_tensors("value", va, ve, tol)]
    for name in expected.grads:
        ge, ga = expected.grads.get(name), actual.grads.get(name)
        what = f"gradient w.r.t. {name}"
        if (ga is None) != (ge is None):
            missing = la if ga is None else le
            detail = f"{what}: no gradient flows in {missing} (detached or unused), the other has one"
            return Verdict(subject, Kind.GRADIENT, math.inf, detail, tuple(diffs))
        if ga is None or ge is None:  # both None here: the check above caught one alone
            continue
        if ga.shape != ge.shape:
            detail = f"{what}: shapes differ: {le} {tuple(ge.shape)} vs {la} {tuple(ga.shape)}"
            return Verdict(subject, Kind.SHAPE, math.inf, detail, tuple(diffs))
        diffs.append(diff_tensors(what, ga, ge, tol))
    worst = max(diffs, key=lambda d: d.score)
    if worst.score <= 1.0:
        return Verdict(subject, None, worst.score, "agree", tuple(diffs))
    if any(d.nonfinite_mismatch for d in diffs):
        kind, shown = Kind.NONFINITE, next(d for d in diffs if d.nonfinite_mismatch)
    elif diffs[0].score > 1.0:
        kind, shown = Kind.VALUE, diffs[0]
    else:
        kind, shown = Kind.GRADIENT, worst
    mismatch = Mismatch((le, la), shown, tuple(d for d in diffs if d is not shown))
    return Verdict(subject, kind, shown.score, mismatch_text(mismatch), tuple(diffs), mismatch=mismatch)
