"""Known signatures: numbers that fingerprint a failure (BCELoss's clamp at 100, ln 2, 88.72...).

In: the values the two sides returned (and the ops a side runs, for a note tied to one).
Out: plain-words notes (:func:`signatures`), only those that hold for the code at hand
(:func:`notes_that_hold`: 100 dB from a PSNR's guard is not BCELoss's clamp).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..generate import Case
from ..load import Implementation
from ..run import Outcome, call
from ..spec import Spec
from .words import op_name


@dataclass(frozen=True)
class KnownValue:
    """A number that fingerprints a specific failure."""

    value: float
    note: str
    op: str | None = None  # an aten op a side must run for the note to hold (None: any code)


SIGNATURES: tuple[KnownValue, ...] = (
    KnownValue(100.0, "100 = torch's BCELoss clamp of log(p) at -100: a probability reached 0 or 1", op="binary_cross_entropy"),
    KnownValue(-math.log(torch.finfo(torch.float32).tiny), "87.34 = -ln(FLT_MIN): a softmax probability underflowed and was clamped to FLT_MIN"),
    KnownValue(math.log(2.0), "0.6931 = ln 2: a sigmoid stuck at 0.5 (all-zero logits)"),
    KnownValue(math.log(torch.finfo(torch.float32).max), "88.72 = ln(FLT_MAX): where float32 exp overflows"),
    # exp(x) rounds to 0 below ln(2^-150), half the smallest float32 denormal: log of it is -inf.
    KnownValue(150 * math.log(2.0), "103.97 = -ln(2^-150): where float32 exp underflows to 0 (a log of it is -inf)"),
    *(KnownValue(10.0**k, f"1e{k} = 1/smooth for a smoothing constant smooth=1e-{k} (a 0/0 guarded by smooth)") for k in (4, 5, 6, 7, 8)),
)
SIGNATURE_RTOL = 1e-4


def signatures(values: Iterable[float], table: Sequence[KnownValue] = SIGNATURES, rtol: float = SIGNATURE_RTOL) -> list[str]:
    """Plain-words notes for the values that match a known signature (sign ignored), each once."""
    notes: list[str] = []
    for v in values:
        if v is None or not math.isfinite(v):
            continue
        for known in table:
            if abs(abs(v) - known.value) <= rtol * known.value and known.note not in notes:
                notes.append(known.note)
    return notes


def ops_run(impl: Implementation, spec: Spec, case: Case) -> set[str] | None:
    """The aten op names one in-process call of ``impl`` runs (None when it raised)."""
    seen: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(op_name(func))
            return func(*args, **(kwargs or {}))

    try:
        with Record():
            call(impl.fn, spec, case)
    except Exception:
        return None
    return seen


def notes_that_hold(notes: list[str], expected: Implementation, actual: Implementation | None, spec: Spec,
                     case: Case, in_process: bool) -> list[str]:
    """Drop a note tied to an op no side runs: 100 dB from a PSNR's 1e-10 guard is not
    BCELoss' clamp.  A side that cannot be watched in-process keeps the note (unknown)."""
    needs = {k.note: k.op for k in SIGNATURES if k.op}
    if not any(n in needs for n in notes):
        return notes
    ops: set[str] = set()
    for impl in (expected, actual):
        seen = ops_run(impl, spec, case) if impl is not None and in_process else None
        if seen is None:
            return notes
        ops |= seen
    return [n for n in notes if n not in needs or needs[n] in ops]


def real_total(outcome: Outcome) -> float | None:
    """The one real number a known-number note reads from a side: its value's sum.  None
    for a failed call or a complex loss (its sum's real part would hide the rest)."""
    if outcome.failed or outcome.value is None or outcome.value.is_complex():
        return None
    return float(outcome.value.double().sum())
