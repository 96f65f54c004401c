"""Running one implementation on one case: value, gradients, errors, side effects.

Every call gets its own copy of the inputs (same values, same strides, same device),
so one implementation can never see what another did to its inputs; comparing that
copy afterwards with the pristine case catches in-place mutation.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from .generate import Case, clone_like
from .spec import Spec


@dataclass(frozen=True, eq=False)
class Outcome:
    """What one call produced.  ``status`` is "ok" or a failed-call kind."""

    status: str = "ok"
    value: torch.Tensor | None = None
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    mutated: tuple[str, ...] = ()
    transport: str = "in-process"  # how the inputs reached it: see isolate.Transport

    @property
    def failed(self) -> bool:
        return self.status != "ok"


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"raised {type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def make_inputs(spec: Spec, case: Case) -> list[torch.Tensor]:
    inputs = []
    for arg in spec.args:
        t = clone_like(case.tensors[arg.name])
        if arg.grad and t.is_floating_point():
            t.requires_grad_(True)
        inputs.append(t)
    return inputs


def call(fn: Callable[..., Any], spec: Spec, case: Case) -> Outcome:
    """Call ``fn`` on fresh copies of the case's inputs, then differentiate its value."""
    inputs = make_inputs(spec, case)
    device = next(iter(case.tensors.values())).device
    start = time.perf_counter()
    # An implementation's own warnings (numpy's log(0), deprecations) are not ours to print.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = _call(fn, spec, case, inputs, device)
    seconds = time.perf_counter() - start
    # Checked on every path: a mutation can be what made the call fail.
    mutated = tuple(a.name for a, t in zip(spec.args, inputs) if not _same(t.detach(), case.tensors[a.name]))
    return replace(outcome, seconds=seconds, mutated=mutated)


def _call(fn: Callable[..., Any], spec: Spec, case: Case, inputs: list[torch.Tensor], device: torch.device) -> Outcome:
    try:
        out = fn(*inputs, **case.params)
        if not isinstance(out, torch.Tensor):
            return Outcome("non_tensor", error=f"returned {type(out).__name__}, not a tensor")
        if spec.scalar and out.numel() != 1:
            return Outcome("non_scalar", error=f"returned shape {tuple(out.shape)}, expected a scalar")
        grads: dict[str, torch.Tensor | None] = {}
        wanted = [(a.name, t) for a, t in zip(spec.args, inputs) if t.requires_grad]
        if wanted:
            if out.requires_grad:
                seed = out.reshape(()) if spec.scalar else out.sum()
                got = torch.autograd.grad(seed, [t for _, t in wanted], allow_unused=True)
                grads = {name: (g.detach() if g is not None else None) for (name, _), g in zip(wanted, got)}
            else:
                grads = {name: None for name, _ in wanted}
        value = out.detach().reshape(()) if spec.scalar else out.detach()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except (Exception, SystemExit) as e:  # the implementation's own failure is a finding, not ours
        return Outcome("exception", error=one_line(e))
    return Outcome("ok", value=value, grads=grads)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return bool(torch.equal(a, b))


def timed_raw(fn: Callable[..., Any], spec: Spec, case: Case) -> float:
    """Seconds for a bare forward + backward on prepared inputs — the benchmark baseline."""
    inputs = make_inputs(spec, case)
    start = time.perf_counter()
    try:
        out = fn(*inputs, **case.params)
        if out.requires_grad:
            out.sum().backward()
        if inputs[0].device.type == "cuda":
            torch.cuda.synchronize()
    except Exception:  # a call that raises costs what it cost until it raised, in the harness too
        pass
    return time.perf_counter() - start


def finite(x: float) -> float:
    """Hypothesis' target() needs a finite float."""
    return 1e30 if math.isinf(x) or math.isnan(x) else x
