"""Numbers and tensors written for people.

Two rules:

* **Enough digits to tell values apart, no more.**  Values shown together are printed
  with the fewest significant digits (at least 6) that keep distinct values distinct --
  2684017 and 2684019 are not both ``2.68402e+06`` -- and never with more digits than
  the shortest text that reads back as the same number in the tensor's dtype (a float32
  0.1 is ``0.1``, not ``0.100000001``).
* **Nothing silently dropped.**  A tensor larger than the display limit is summarised:
  shape, dtype, min and max with their positions, and the elements that matter most
  (where the two sides differ most, when the caller says which those are).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from .model import Kind, Mismatch, Step, StepKind, TensorDiff, Verdict

SHOW_UP_TO = 24  # elements printed in full
BASE_DIGITS = 6
_MAX_DIGITS = {torch.float16: 5, torch.bfloat16: 4, torch.float32: 9, torch.float64: 17}
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _max_digits(dtype: torch.dtype | None) -> int:
    return _MAX_DIGITS.get(dtype, 17) if dtype is not None else 17


def _reads_back(text: str, value: float, dtype: torch.dtype | None) -> bool:
    cast = _NUMPY.get(dtype, np.float64) if dtype is not None else np.float64
    if dtype == torch.bfloat16:
        return torch.tensor(float(text), dtype=torch.bfloat16).item() == torch.tensor(value, dtype=torch.bfloat16).item()
    return cast(float(text)) == cast(value)


def _special(x: float) -> str | None:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "-0" if math.copysign(1.0, x) < 0 else "0"
    return None


def _fmt(x: float, digits: int) -> str:
    text = f"{x:.{digits}g}"
    if "e" in text:  # 1e+30 -> 1e30, 2.5e-07 -> 2.5e-7
        mantissa, exp = text.split("e")
        text = f"{mantissa}e{int(exp)}"
    return text


def shortest_digits(x: float, dtype: torch.dtype | None = None) -> int:
    """Fewest significant digits that read back as ``x`` in ``dtype``."""
    if _special(x) is not None:
        return 1
    for k in range(1, _max_digits(dtype) + 1):
        if _reads_back(f"{x:.{k}g}", x, dtype):
            return k
    return _max_digits(dtype)


def number_text(x: float, dtype: torch.dtype | None = None, digits: int | None = None) -> str:
    """``x`` with ``digits`` significant digits, but never more than it needs to read back."""
    special = _special(float(x))
    if special is not None:
        return special
    need = shortest_digits(float(x), dtype)
    return _fmt(float(x), need if digits is None else min(digits, need))


def numbers_text(values: Iterable[float], dtype: torch.dtype | None = None) -> list[str]:
    """Texts for values shown together: distinct values stay distinct."""
    vals = [float(v) for v in values]
    digits = BASE_DIGITS
    while digits < _max_digits(dtype):
        texts = [number_text(v, dtype, digits) for v in vals]
        seen: dict[str, float] = {}
        if all(seen.setdefault(t, v) == v or (math.isnan(v) and math.isnan(seen[t])) for t, v in zip(texts, vals)):
            return texts
        digits += 1
    return [number_text(v, dtype) for v in vals]


def number_pair(a: float, b: float, dtype: torch.dtype | None = None) -> tuple[str, str]:
    """Two values side by side, with the digits that tell them apart."""
    ta, tb = numbers_text([a, b], dtype)
    return ta, tb


def _nested(values, texts: Iterable[str]) -> str:
    it = iter(texts)

    def walk(x) -> str:
        if isinstance(x, list):
            return "[" + ", ".join(walk(v) for v in x) + "]"
        return next(it)

    return walk(values)


def _flat_values(t: torch.Tensor) -> list[float]:
    return t.detach().to("cpu", torch.float64).reshape(-1).tolist() if t.is_floating_point() else t.detach().cpu().reshape(-1).tolist()


def _index(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return tuple(reversed(out))


def _where(flat: int, shape: Sequence[int]) -> str:
    return str(_index(flat, shape))


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _texts(t: torch.Tensor, values: list[float]) -> list[str]:
    if t.is_floating_point():
        return numbers_text(values, t.dtype)
    return [str(int(v)) if not isinstance(v, bool) else str(v) for v in values]


def tensor_text(t: torch.Tensor, *, highlight: torch.Tensor | None = None, limit: int = SHOW_UP_TO, top: int = 3) -> str:
    """A tensor in full when small; otherwise shape, range and the elements that matter.

    ``highlight``: a tensor of ``t``'s shape scoring how much each element matters (e.g. how
    far apart the two sides' gradients are there); the ``top`` highest are listed.
    """
    shape = tuple(t.shape)
    values = _flat_values(t)
    if t.numel() <= limit:
        texts = _texts(t, values)
        body = _nested(t.detach().cpu().tolist(), texts) if t.ndim else texts[0]
        return f"{body}  ({_dtype_name(t)}, shape {shape})"
    return summary_text(t, highlight=highlight, top=top)


def summary_text(t: torch.Tensor, *, highlight: torch.Tensor | None = None, top: int = 3) -> str:
    shape = tuple(t.shape)
    flat = t.detach().reshape(-1).cpu()
    parts = [f"{t.numel()} elements ({_dtype_name(t)}, shape {shape})"]
    work = flat.double() if t.is_floating_point() else flat
    finite = torch.isfinite(work) if t.is_floating_point() else torch.ones_like(work, dtype=torch.bool)
    if bool(finite.any()):
        masked_lo = torch.where(finite, work, torch.full_like(work, math.inf) if t.is_floating_point() else work)
        masked_hi = torch.where(finite, work, torch.full_like(work, -math.inf) if t.is_floating_point() else work)
        i_lo, i_hi = int(masked_lo.argmin()), int(masked_hi.argmax())
        lo_text, hi_text = _texts(t, [float(work[i_lo]), float(work[i_hi])])
        if bool((work == work[i_lo]).all()):
            parts.append(f"every element {lo_text}")
        else:
            parts.append(f"min {lo_text} at {_where(i_lo, shape)}, max {hi_text} at {_where(i_hi, shape)}")
    if t.is_floating_point():
        bad = int((~torch.isfinite(work)).sum())
        if bad:
            parts.append(f"{bad} NaN/inf")
    if highlight is not None and highlight.numel() == t.numel() and top > 0:
        score = highlight.detach().reshape(-1).cpu().double().nan_to_num(nan=math.inf)
        order = torch.argsort(score, descending=True)[:top].tolist()
        texts = _texts(t, [float(work[i]) for i in order])
        parts.append("where it matters most: " + ", ".join(f"{_where(i, shape)} = {s}" for i, s in zip(order, texts)))
    return "; ".join(parts)


def tensor_pair_text(expected: torch.Tensor, actual: torch.Tensor, *, labels: tuple[str, str] = ("expected", "actual"),
                     limit: int = SHOW_UP_TO, top: int = 3) -> str:
    """Two sides of one quantity, with the digits that tell them apart; large ones summarised
    by the ``top`` elements where they differ most."""
    le, la = labels
    if expected.shape != actual.shape:
        return f"{le} {tensor_text(expected, limit=limit)}; {la} {tensor_text(actual, limit=limit)}"
    ve, va = _flat_values(expected), _flat_values(actual)
    dtype = expected.dtype if expected.is_floating_point() else None
    if expected.numel() <= limit:
        texts = numbers_text(ve + va, dtype) if dtype else [str(v) for v in ve + va]
        n = len(ve)
        if expected.ndim == 0:
            return f"{le} {texts[0]} vs {la} {texts[1]}"
        shape = tuple(expected.shape)
        return f"{le} {_nested(expected.tolist(), texts[:n])} vs {la} {_nested(actual.tolist(), texts[n:])}  (shape {shape})"
    diff = (expected.detach().double() - actual.detach().double()).abs().reshape(-1).cpu()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    order = [i for i in torch.argsort(diff, descending=True)[:top].tolist() if diff[i] > 0 or ve[i] != va[i]]
    shape = tuple(expected.shape)
    shown = []
    for i in order:
        a, b = numbers_text([ve[i], va[i]], dtype) if dtype else (str(ve[i]), str(va[i]))
        shown.append(f"at {_where(i, shape)}: {a} vs {b}")
    return (f"{expected.numel()} elements ({_dtype_name(expected)}, shape {shape}); {le} {summary_text(expected).split('; ', 1)[-1]}; "
            f"{la} {summary_text(actual).split('; ', 1)[-1]}; " + ("differ most " + "; ".join(shown) if shown else "identical"))


def range_text(t: torch.Tensor) -> str:
    """What a tensor's values are, in a few words: 'all 0', 'in [-3, 1e3]', '+ 2 NaN/inf'.

    Said from the values themselves, never from how they were drawn: a minimised or
    replayed case has lost its generator's regime and magnitude."""
    if t.numel() == 0:
        return "empty"
    work = t.detach().reshape(-1).cpu()
    work = work.double() if t.is_floating_point() else work.long()
    finite = torch.isfinite(work) if t.is_floating_point() else torch.ones_like(work, dtype=torch.bool)
    bad = int((~finite).sum())
    if not bool(finite.any()):
        return f"all NaN/inf ({bad})"
    kept = work[finite]
    lo, hi = _texts(t, [float(kept.min()), float(kept.max())])
    text = f"all {lo}" if lo == hi else f"in [{lo}, {hi}]"
    return text + (f" and {bad} NaN/inf" if bad else "")


def case_values_text(sizes: dict[str, int], tensors: dict[str, torch.Tensor]) -> str:
    """A case by its sizes and values: 'B=1: input all 0, target all 1'."""
    dims = ", ".join(f"{k}={v}" for k, v in sizes.items())
    values = ", ".join(f"{name} {range_text(t)}" for name, t in tensors.items())
    return f"{dims}: {values}" if dims else values


# --- verdicts ------------------------------------------------------------------------

# How a nondeterminism finding opens: the mismatch is between two calls of one side.
TWO_CALLS = "two calls on the same input disagree: "


def diff_message(d: TensorDiff, pair: tuple[str, str] = ("expected", "actual")) -> str:
    """In the manner of torch.testing: what, where, by how much, allowed how much.
    The two sides' numbers get the digits that tell them apart (2684017 vs 2684019)."""
    le, la = pair
    expected, actual = number_pair(d.expected, d.actual)
    if d.nonfinite_mismatch:
        return (
            f"{d.what}: NaN/inf the other side does not match at {d.nonfinite_mismatch} / {d.total} element(s); "
            f"at index {d.max_abs_index}: {le} {expected} vs {la} {actual}"
        )
    where = f" at index {d.max_abs_index}" if d.total > 1 else ""
    head = f"{d.what}: " + (
        f"mismatched elements: {d.mismatched} / {d.total} ({100.0 * d.mismatched / d.total:.1f}%); "
        if d.total > 1
        else f"{le} {expected} vs {la} {actual}; "
    )
    text = (
        f"{head}greatest absolute difference {d.max_abs:.3g}{where} (up to {d.allowed_abs:.3g} allowed); "
        f"greatest relative difference {_g3(d.max_rel)}"
    )
    if d.total > 1:
        text += f"; at that index {le} {expected} vs {la} {actual}; relative L2 error {_g3(d.rel_l2)}, cosine {d.cosine:.6f}"
    return text


def diff_brief(d: TensorDiff) -> str:
    """One clause for a component that is not the one shown: how it compares."""
    if d.nonfinite_mismatch:
        return f"{d.what} NaN/inf the other side does not match at {d.nonfinite_mismatch} element(s)"
    verdict = "agrees" if d.score <= 1 else "also differs"
    text = f"{d.what} {verdict} (greatest absolute difference {d.max_abs:.3g}"
    if d.total > 1:
        text += f", cosine {d.cosine:.6f}"
    return text + ")"


def _g3(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def mismatch_text(m: Mismatch) -> str:
    """A tensor finding in words: the component shown, then how the others compare."""
    text = diff_message(m.shown, m.sides)
    if m.others:
        text += "; meanwhile " + "; ".join(diff_brief(d) for d in m.others)
    return text


def verdict_text(v: Verdict) -> str:
    """A verdict in words: a mismatch rendered from its record; anything else (a side's
    error message, two shapes) as the comparison said it."""
    if v.mismatch is None:
        return v.detail
    text = mismatch_text(v.mismatch)
    return TWO_CALLS + text if v.kind is Kind.NONDETERMINISM else text


# --- minimiser steps -----------------------------------------------------------------

def largest_element_of(names: Sequence[str]) -> str:
    """What a scale threshold measures, by argument name: "max |input|" read as the argument
    called ``input`` (huber vs smooth_l1: "below max |input| 0.0063" with input = [0])."""
    if not names:
        return "the largest |element| of the inputs"
    return "the largest |element| of " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])


def step_text(step: Step) -> str:
    """One step of the minimiser in words (``-v``), e.g. "shrink N: 510 -> 2 (14 evaluations)"."""
    cost = f" ({step.evaluations} evaluations)"
    if step.kind is StepKind.LIFT_DENORMALS:
        scaled = f", inputs scaled x{step.scale:g}" if step.scale != 1 else ""
        scaled += "".join(f", {arg} scaled {form}" for arg, form in step.forms)  # the other arguments alone
        return f"lift denormals of {', '.join(step.args)} to {step.after:.3g}{scaled}{cost}"
    if step.kind is StepKind.SHRINK:
        return f"shrink {step.dim}: {step.before:g} -> {step.after:g}{cost}"
    if step.kind is StepKind.SIMPLIFY_VALUES:
        return f"simplify values: {', '.join(f'{arg} -> {form}' for arg, form in step.forms)}{cost}"
    if step.kind is StepKind.SIMPLIFY_ELEMENTS:
        return f"simplify elements of {', '.join(step.args)}{cost}"
    if step.kind is StepKind.TOWARD_THRESHOLD:
        return f"{largest_element_of(step.args)} {step.before:.6g} -> {step.after:.6g}, just past the threshold{cost}"
    if step.kind is StepKind.BISECT_SCALE:
        return f"bisect input scale: threshold {step.threshold:.4g}{cost}"
    if step.threshold is None:
        return f"the final example diverges at every scale{cost}"
    return f"threshold measured again on the final example: {step.threshold:.4g}{cost}"
