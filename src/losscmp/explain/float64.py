"""Running a side in float64: the oracle's instrument, shared by the analyses and the trace.

In: an :class:`~losscmp.load.Implementation`, a :class:`~losscmp.model.Case`, outcomes.
Out: the float64 copies of both (:func:`float64_case`, :func:`in_float64`), whether a
float64 outcome can serve as an oracle (:func:`float64_problem`), the cheap two-call
check the minimiser keeps fixed (:func:`float64_agrees`), and how far one outcome is
from another (:func:`drift`, :func:`rounded_to`).

Every implementation call of the analyses goes through a ``run(impl, spec, case) ->
Outcome`` callable (default :data:`call_runner`: in process, as the engine does), so an
isolating runner can be plugged in.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch

from ..compare import Tolerance, diff_tensors
from ..engine import InProcessRunner, Runner
from ..generate import Case
from ..load import Implementation
from ..run import Outcome
from ..spec import Spec

# The default runner: the implementation called in this process, as the engine does.
call_runner: Runner = InProcessRunner()


def float64_case(case: Case) -> Case:
    """The same case with every floating tensor in float64 (same values, same strides)."""
    tensors = {}
    for name, t in case.tensors.items():
        if t.is_floating_point():
            t = torch.empty_strided(t.shape, t.stride(), dtype=torch.float64, device=t.device).copy_(t)
        tensors[name] = t
    return replace(case, tensors=tensors)


def in_float64(impl: Implementation) -> tuple[Implementation, str | None]:
    """``impl`` ready for float64 inputs, and what stands in the way if something does.

    An ``nn.Module`` (or a bound method of one) is deep-copied and moved with
    ``.double()``; a module that still holds a non-float64 floating tensor afterwards (a
    buffer that overrides ``_apply``, a plain tensor attribute ``.double()`` never sees)
    is reported, not guessed around.  A plain function runs as is: if it computes in
    float32 inside, its float64 result comes back in float32, which the oracle checks.
    """
    fn = impl.fn
    owner = getattr(fn, "__self__", None) if not isinstance(fn, torch.nn.Module) else None
    module = fn if isinstance(fn, torch.nn.Module) else owner if isinstance(owner, torch.nn.Module) else None
    if module is None:
        return impl, None
    try:
        doubled = copy.deepcopy(module).double()
    except Exception as e:  # a module that cannot be copied is the user's business; we say so
        return impl, f"{impl.label} is an nn.Module that cannot be deep-copied to float64 ({type(e).__name__}: {e})"
    kept = _non_float64_tensors(doubled)
    if kept:
        return impl, f"{impl.label} keeps non-float64 tensors after .double(): {', '.join(kept[:3])}"
    new_fn = doubled if module is fn else getattr(doubled, fn.__name__)
    return replace(impl, fn=new_fn), None


def _non_float64_tensors(module: torch.nn.Module) -> list[str]:
    found = [f"{n} ({t.dtype})" for n, t in [*module.named_parameters(), *module.named_buffers()]
             if t.is_floating_point() and t.dtype != torch.float64]
    for prefix, m in module.named_modules():
        for name, value in vars(m).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
                found.append(f"{prefix + '.' if prefix else ''}{name} ({value.dtype}, a plain attribute)")
    return found


def float64_problem(label: str, outcome: Outcome) -> str | None:
    """Why a float64 outcome cannot serve as an oracle, if it cannot."""
    if outcome.failed or outcome.value is None:
        return f"{label} {outcome.error} when run in float64"
    if outcome.value.dtype not in (torch.float64, torch.complex128):
        return f"{label} returned {outcome.value.dtype} for float64 inputs (it computes in lower precision inside)"
    for name, g in outcome.grads.items():
        if g is not None and g.dtype != torch.float64:
            return f"{label}'s gradient w.r.t. {name} is {g.dtype} for float64 inputs"
    return None


def float64_agrees(expected: Implementation, actual: Implementation, spec: Spec, case: Case, *, run: Runner = call_runner) -> bool | None:
    """Do the two sides agree when run in float64 on ``case``?  None: one cannot run there.

    Two calls: the cheap half of the oracle.  The minimiser keeps it fixed, so that a
    numerical divergence is not minimised into a semantic one (or back).
    """
    wide = float64_case(case)
    outs = []
    for impl in (expected, actual):
        impl64, problem = in_float64(impl)
        out = run(impl64, spec, wide)
        if problem or float64_problem(impl.label, out):
            return None
        outs.append(out)
    return drift(outs[0], outs[1], Tolerance.for_dtype(torch.float64)) <= 1.0


def drift(reference: Outcome, outcome: Outcome, tol: Tolerance) -> float:
    """Divergence score of ``outcome`` from ``reference`` over value and gradients, dtypes ignored."""
    assert outcome.value is not None and reference.value is not None  # callers pass successful calls
    scores = [diff_tensors("value", outcome.value, reference.value, tol).score]
    for name, g_ref in reference.grads.items():
        g = outcome.grads.get(name)
        if (g is None) != (g_ref is None):
            return math.inf
        if g is not None and g_ref is not None:
            scores.append(diff_tensors(name, g, g_ref, tol).score)
    return max(scores)


def rounded_to(outcome: Outcome, dtype: torch.dtype) -> Outcome:
    """A float64 outcome rounded to the working dtype: what a correctly rounded side returns
    (exp(89) is 4.5e38 in float64 and +inf, correctly, in float32)."""
    if outcome.failed or not dtype.is_floating_point:
        return outcome
    cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dtype)  # noqa: E731
    return replace(outcome, value=cast(outcome.value), grads={n: cast(g) for n, g in outcome.grads.items()})
