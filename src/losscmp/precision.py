"""Is a float64 run float64 throughout?  The float64 oracle's premise, checked op by op.

In: an implementation (already prepared for float64 inputs), a spec and a float64 case.
Out: the first few :class:`NarrowOp` — aten ops of that run, forward or backward, that read
or make a floating tensor narrower than float64 — each with the innermost line outside
torch and losscmp that issued it (the library line, not the caller's: that is where the
narrow tensor is made).

Why: "still different in float64" means "they compute different functions" only if both
runs really compute in float64.  A side can hand back a float64 result and still round in
float32 inside: geomloss' KeOps backend passes ``torch.Tensor([1 / eps]).type_as(x)``, a
float32 tensor cast up, so its float64 run carries float32 roundings of 1/eps through every
Sinkhorn iteration (its float64 gradient is 3e-5 off the tensorized one; with 1/eps made in
float64 the two agree to 1e-15).  The output dtype cannot show that; the ops can.  Run in
this process only (a dispatch mode cannot reach a worker).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .generate import Case
from .load import Implementation
from .run import call
from .spec import Spec

NARROW = (torch.float32, torch.float16, torch.bfloat16)
SHOWN = 3  # ops named in a reason: the first is where it starts, the rest say whether it recurs

_TORCH_DIR = torch.__file__.rsplit("/", 1)[0] + "/"
_OWN_DIR = __file__.rsplit("/", 1)[0] + "/"


@dataclass(frozen=True)
class NarrowOp:
    """One op of a float64 run that reads or makes a narrower floating tensor."""

    op: str
    dtype: str  # the narrow dtype, e.g. "float32"
    reads: bool  # True: it reads a narrow tensor into a float64 result; False: it rounds float64 down to one
    file: str | None
    line: int | None

    def describe(self) -> str:
        what = f"{self.op} {'reads a ' + self.dtype + ' tensor into float64' if self.reads else 'rounds float64 to ' + self.dtype}"
        return what + (f" at {_short(self.file)}:{self.line}" if self.file else "")


def _short(path: str) -> str:
    """Site-packages paths from the package folder on (geomloss/_legacy/...): the rest is the machine's."""
    marker = "site-packages/"
    return path.split(marker, 1)[1] if marker in path else path


def _site() -> tuple[str | None, int | None]:
    """The innermost frame outside torch and losscmp (the library line that made the op)."""
    frame: Any = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith((_TORCH_DIR, _OWN_DIR, "<frozen")):
            return name, frame.f_lineno
        frame = frame.f_back
    return None, None


SHORT_BITS = 16  # significant bits of a value that was likely written, not rounded (1, 0.5, 400, 1/N for N a power of 2)
SAMPLE = 4096  # elements of a narrow tensor looked at


def _rounded(t: torch.Tensor) -> bool:
    """Does the narrow tensor hold a value that uses more than SHORT_BITS significant bits?

    ``torch.ones(N).type_as(x)`` (geomloss' uniform weights) crosses into float64 as exact
    ones: no precision is lost.  A float32 rounding of an arbitrary real (1/eps for eps =
    exp(-2.3)) fills all 24 bits; its lowest 8 are all zero one time in 256."""
    flat = t.detach().reshape(-1)[:SAMPLE].to(torch.float64)
    flat = flat[torch.isfinite(flat) & (flat != 0)]
    if not flat.numel():
        return False
    mantissa, _ = torch.frexp(flat)
    scaled = mantissa * 2.0**SHORT_BITS
    return bool((scaled != scaled.round()).any())


class _Watch(TorchDispatchMode):
    """Ops where precision crosses: a narrow tensor with rounded values read into a wider
    result, or a wider tensor rounded down into a narrow one."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.found: list[NarrowOp] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if len(self.found) < self.limit:
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            wide_out = any(t.dtype == torch.float64 for t in outs)
            wide_in = any(t.dtype == torch.float64 for t in ins)
            read = next((t for t in ins if t.dtype in NARROW and _rounded(t)), None) if wide_out else None
            made = next((t for t in outs if t.dtype in NARROW and _rounded(t)), None) if wide_in and read is None else None
            narrow = read if read is not None else made
            if narrow is not None:
                file, line = _site()
                name = func.name() if hasattr(func, "name") else str(func)
                self.found.append(NarrowOp(name, str(narrow.dtype).removeprefix("torch."), read is not None, file, line))
        return out


def narrower_ops(impl: Implementation, spec: Spec, case: Case, limit: int = SHOWN) -> tuple[NarrowOp, ...]:
    """The first ``limit`` ops of ``impl``'s run on ``case`` (a float64 case), forward and
    backward, where a narrower float tensor holding rounded values enters a float64 result,
    or a float64 tensor is rounded down to one; () when none does (as far as aten ops show:
    a C++ extension's own kernels are not seen, only the tensors handed to them)."""
    watch = _Watch(limit)
    with watch:
        call(impl.fn, spec, case)
    return tuple(watch.found)


# How large a float64 difference a narrow op may explain.  A float32 rounding is ~6e-8
# relative; an iterative solver amplifies it (KeOps Sinkhorn: to 3e-5), but a difference of
# more than 1e-3 relative is a different function whatever the precision inside.
ROUNDING_REACH = 1e-3


def premise_fails(label: str, ops: tuple[NarrowOp, ...]) -> str:
    """The reason the float64 oracle cannot decide when ``label``'s float64 run is not float64."""
    more = f" (and {len(ops) - 1} more op(s))" if len(ops) > 1 else ""
    return (f"{label} computes in {ops[0].dtype} inside its float64 run ({ops[0].describe()}{more}): "
            f"float64 cannot tell a different function from that side's own rounding")
