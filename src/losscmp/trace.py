"""Where two implementations part ways: the first diverging operation, forward and backward.

In: two implementations, a spec, one (small, usually minimised) case and the tolerance.
Out: a :class:`Localisation` — for each side the user-code line (file, number, text) of
the first operation whose result differs, or ``None`` with the reason.

1. **Record.**  Each side runs under a ``TorchDispatchMode`` exactly as :func:`run.call`
   runs it (forward, then ``autograd.grad`` of the loss).  Every aten op becomes an
   :class:`OpRecord`: op name, input and output shapes and dtypes, a cheap
   :class:`Summary` of each tensor (small tensors whole, large ones as statistics plus a
   fixed sample), which earlier op produced each input, and the issuing line — the
   innermost frame in the implementation's own files (:func:`own_root`: its package, or
   its file's folder), else the innermost outside torch and losscmp.  A backward op has
   no user frame on the stack: it is attributed to the forward op whose autograd node is
   running it (``torch._C._current_autograd_node()``, matched to the node each forward
   op created).
2. **Align** the two op sequences with :class:`difflib.SequenceMatcher`, tolerant of
   inserted and removed ops (forks add and drop some): forward ops on (op, input and
   output shapes without unit dims, float/int class); backward ops on the same plus the
   aligned forward op they belong to.  Coverage = the fraction of all ops that found a
   partner.  This structural alignment only gates (below :data:`MIN_COVERAGE`, too
   little is shared to say anything) and vouches for constant-valued tensors.
3. **Localise by data.**  From the first returned result that differs (the value, then
   each gradient), each side is followed back through values the other side never
   computed (no output of the other side agrees within the tolerance) to the earliest
   op that makes such a value out of values the other side computed too: the op that
   computes a different quantity on agreeing inputs (:class:`_Walk`).  Ops that only sit
   in the same position are never paired.  A value the other side computes negated, in
   the same pass, is the same quantity (an NLL against ``-log_prob``), when it is
   distinctive enough (not constant, well off zero) to say so.  Values that say little (constant fills, all
   within atol of zero) count as the same quantity only through views of the same
   outside tensor or the same op on the same inputs; a gradient only as the gradient of
   the counterpart forward value.  A forward departure comes before a backward one.  If that op's inputs agree only within the
   tolerance, it carries a smaller difference past it; the same walk at a few ulps finds
   where that difference starts, and is trusted where that op's inputs are bit-identical
   to the other side's.  A side whose result is a value the other side computes on the
   way, or whose gradient lacks ops the other runs, is placed where the other side's
   extra path leaves the shared program: the partner of the forward op those ops belong
   to, or the op that cuts the graph there (a ``.detach()``).  A **confidence** says how
   well the data backs the pair of lines, and ``side`` which side a one-line summary
   names (the one under test: not an installed library).

A numerical finding (``unstable=``) is located on the unstable side alone, by the same
walk between its own working-dtype and float64 runs (:func:`locate_unstable`): one
program, so it aligns even where the two sides share nothing.

Too little shared structure (coverage below :data:`MIN_COVERAGE`), nothing that differs,
or an op with no source line: ``location=None`` and a note that says so with the
coverage.  Never a guessed line.

Works on torch >= 2.0 (``_current_autograd_node`` and ``torch.utils.weak`` came with it);
it does not use ``torch.utils._debug_mode`` (2.10+), which compares two runs of one
program, where this aligns two different programs.

Tracing runs both sides in this process (a dispatch mode cannot reach a worker), and
records every op with summaries: it is meant for small cases, never for the search.
``deadline`` (the explanation's budget) stops a recording at its next op and the
location says so: recording is many times slower than the call itself.
"""
from __future__ import annotations

import contextlib
import bisect
import difflib
import inspect
import linecache
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from . import breadcrumbs
from .compare import Tolerance, compare_outcomes, diff_message, diff_tensors
from .explain.float64 import float64_case, in_float64
from .findings import Pair
from .generate import Case
from .load import Implementation
from .model import Status
from .run import Outcome, call
from .spec import Spec

# Below this fraction of ops with a partner, an aligned op is as likely a coincidence as
# a counterpart: say so instead of naming a line.
MIN_COVERAGE = 0.5
FULL_LIMIT = 256  # tensors up to this many elements are kept whole
SAMPLE_SIZE = 64  # fixed positions kept of larger ones

_EXACT = Tolerance(0.0, 0.0)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class Phase(str, Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


# --- what is recorded -----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Summary:
    """A cheap, comparable picture of one tensor.

    Small tensors are kept whole (``values``, float64 on the CPU); larger ones as their
    finite sum / absolute sum / min / max, their NaN and inf counts, and ``sample``, the
    elements at :data:`SAMPLE_SIZE` fixed, evenly spaced positions.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    values: torch.Tensor | None
    sample: torch.Tensor | None
    total: float
    abs_total: float
    low: float
    high: float
    nans: int
    posinfs: int
    neginfs: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def text(self) -> str:
        if self.values is not None and self.values.numel() <= 6:
            shown = [f"{v:.8g}" for v in self.values.tolist()]
            return shown[0] if not self.shape else f"[{', '.join(shown)}] shape {self.shape}"
        text = f"shape {self.shape}: min {self.low:.6g}, max {self.high:.6g}, sum {self.total:.6g}"
        bad = [f"{n} {w}" for n, w in ((self.nans, "NaN"), (self.posinfs, "+inf"), (self.neginfs, "-inf")) if n]
        return text + (f" (+ {', '.join(bad)})" if bad else "")


def summarise(t: torch.Tensor) -> Summary | None:
    """Summary of a strided tensor; None for layouts without values (sparse, meta)."""
    if t.layout != torch.strided or t.device.type == "meta" or t.is_quantized:
        return None
    flat = t.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    d = flat.to(torch.float64)
    nans = posinfs = neginfs = 0
    total, abs_total, low, high = 0.0, 0.0, math.nan, math.nan
    if d.numel():  # one synchronisation; a finite sum of |d| means every element is finite
        total, abs_total, low, high = torch.stack((d.sum(), d.abs().sum(), d.min(), d.max())).tolist()
    if not math.isfinite(abs_total):
        finite = torch.isfinite(d)
        nans, posinfs, neginfs = int(d.isnan().sum()), int((d == math.inf).sum()), int((d == -math.inf).sum())
        kept = d[finite]
        total, abs_total, low, high = 0.0, 0.0, math.nan, math.nan
        if kept.numel():
            total, abs_total, low, high = torch.stack((kept.sum(), kept.abs().sum(), kept.min(), kept.max())).tolist()
    if d.numel() <= FULL_LIMIT:
        values, sample = d.cpu(), None
    else:
        positions = torch.linspace(0, d.numel() - 1, SAMPLE_SIZE, device=d.device).long()
        values, sample = None, d[positions].cpu()
    return Summary(tuple(t.shape), t.dtype, values, sample, total, abs_total, low, high, nans, posinfs, neginfs)


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    # Unit dims are a convention (a batch of one, keepdim), not a different computation:
    # GeomLoss works on (1, N, M) where a rewrite works on (N, M).
    return tuple(n for n in shape if n != 1)


def _tolerance_for(s: Summary, tol: Tolerance) -> Tolerance:
    return tol if (s.dtype.is_floating_point or s.dtype.is_complex) else Tolerance(0.0, 0.0)


def summary_diff(actual: Summary | None, expected: Summary | None, tol: Tolerance) -> str | None:
    """Why two summaries differ beyond ``tol``, or None when they agree (or cannot tell).

    Whole tensors are compared element by element as :func:`compare.diff_tensors` does.
    For summarised ones every test is a *necessary* condition of elementwise agreement
    (if each |a_i - b_i| <= atol + rtol |b_i|, the sums differ by at most
    n atol + rtol sum |b_i|, the extremes by at most atol + rtol max |b_i|), so a
    difference reported here is a real one.
    """
    if actual is None or expected is None:
        return None
    if _squeezed(actual.shape) != _squeezed(expected.shape):
        return f"shapes differ: {expected.shape} vs {actual.shape}"
    if actual.dtype.is_complex != expected.dtype.is_complex:
        return f"dtypes differ: {expected.dtype} vs {actual.dtype}"
    tol = _tolerance_for(expected, tol)
    if actual.values is not None and expected.values is not None:
        shape = tuple(expected.shape) + ((2,) if expected.dtype.is_complex else ())  # complex: summarised as (real, imaginary) pairs
        d = diff_tensors("output", actual.values.reshape(shape), expected.values.reshape(shape), tol)
        return diff_message(d) if d.score > 1.0 else None
    if (actual.nans, actual.posinfs, actual.neginfs) != (expected.nans, expected.posinfs, expected.neginfs):
        return (f"NaN/+inf/-inf counts differ: expected {expected.nans}/{expected.posinfs}/{expected.neginfs}, "
                f"actual {actual.nans}/{actual.posinfs}/{actual.neginfs}")
    assert actual.sample is not None and expected.sample is not None  # a summary without values has a sample
    d = diff_tensors("output (sampled elements)", actual.sample, expected.sample, tol)
    if d.score > 1.0:
        return diff_message(d)
    n = expected.numel
    big = max(abs(expected.low), abs(expected.high)) if expected.abs_total else 0.0
    checks = (
        ("sum", actual.total, expected.total, n * tol.atol + tol.rtol * expected.abs_total),
        ("min", actual.low, expected.low, tol.atol + tol.rtol * big),
        ("max", actual.high, expected.high, tol.atol + tol.rtol * big),
    )
    for what, a, b, allowed in checks:
        if not (math.isnan(a) and math.isnan(b)) and not abs(a - b) <= allowed:
            return f"output {what}: expected {b:.8g} vs actual {a:.8g}; difference {abs(a - b):.3g} (up to {allowed:.3g} allowed)"
    return None


@dataclass(frozen=True)
class Site:
    """The user-code line that issued an op."""

    file: str
    line: int


@dataclass(frozen=True, eq=False)
class OpRecord:
    index: int
    op: str
    phase: Phase
    inputs: tuple[Summary | None, ...]  # one per tensor input, in argument order
    producers: tuple[int | None, ...]  # the record that produced each tensor input; None: from outside
    scalars: tuple[str, ...]  # the non-tensor arguments, as text
    outputs: tuple[Summary | None, ...]
    site: Site | None
    origin: int | None  # backward: the forward record whose autograd node ran this op
    key: tuple  # what alignment matches on

    def describe(self, records: Sequence[OpRecord]) -> str:
        if self.origin is not None and self.phase is Phase.BACKWARD:
            return f"{self.op} (backward of {records[self.origin].op})"
        return self.op


@dataclass(frozen=True, eq=False)
class Result:
    """One thing the call returned (the loss, or the gradient w.r.t. one input)."""

    what: str
    phase: Phase  # the loss comes out of the forward, gradients out of the backward
    summary: Summary | None
    producer: int | None  # the record that computed it


@dataclass(frozen=True, eq=False)
class Recording:
    label: str
    records: tuple[OpRecord, ...]
    outcome: Outcome
    results: tuple[Result, ...] = ()
    out_of_time: bool = False  # stopped at its deadline: the records are a prefix of the call's


def _sequence_nr(node: Any) -> int | None:
    seq = getattr(node, "_sequence_nr", None)
    return seq() if seq is not None else None


def _node_key(node: Any) -> Any:
    # Sequence numbers identify a node for its whole life; id() is the fallback on a
    # torch without them (the recorder keeps those nodes alive, so ids stay unique).
    seq = _sequence_nr(node)
    return ("seq", seq) if seq is not None else ("id", id(node))


def _current_node() -> Any:
    # In torch since 2.0.  Without it the backward goes unrecorded, and a gradient-only
    # divergence is reported without a location.
    get = getattr(torch._C, "_current_autograd_node", None)
    return get() if get is not None else None


def own_root(impl: Implementation) -> str | None:
    """Where the implementation's own code lives: its top-level package's folder (an
    installed library, or a fork copied into a repository), or for a lone module its
    folder (a researcher's file and its neighbours).  None for torch's own functions."""
    target: Any = impl.fn
    target = getattr(target, "func", target)  # functools.partial
    if isinstance(target, torch.nn.Module):
        target = type(target)
    target = getattr(target, "__func__", target)  # a bound method
    module = inspect.getmodule(target)
    if module is None:
        module = sys.modules.get(getattr(target, "__module__", None) or "")
    file = getattr(module, "__file__", None)
    if not file or module is None:
        return None
    file = os.path.abspath(file)
    top = sys.modules.get(module.__name__.partition(".")[0])
    top_file = getattr(top, "__file__", None)
    if top is not module and top_file and getattr(top, "__path__", None):
        root = os.path.dirname(os.path.abspath(top_file)) + os.sep
    else:
        root = os.path.dirname(file) + os.sep
        if os.path.basename(os.path.dirname(file)) in _LIBRARY_DIRS:
            root = file  # a single-module library: not every neighbour in site-packages
    return None if root.startswith(_TORCH_DIR) or root.startswith(_OWN_DIR) else root


_LIBRARY_DIRS = ("site-packages", "dist-packages")


def installed(path: str) -> bool:
    """A file of an installed library, not of the project under test."""
    return any(p in _LIBRARY_DIRS for p in path.split(os.sep))


def _user_site(frame: Any, phase: Phase, own: str | None = None) -> Site | None:
    """The innermost frame in the implementation's own files (``own``, see
    :func:`own_root`), else the innermost outside torch and losscmp: a researcher's loss
    that calls a helper library is blamed at its own line, not inside the helper.  If
    losscmp is reached first, the op was not issued by the implementation (losscmp's own
    bookkeeping, the autograd engine).  A torch function called directly as the
    implementation has only torch frames: in the forward its outermost one is the best
    line there is."""
    outermost_torch = None
    innermost_other = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_OWN_DIR):
            break
        if name.startswith(_TORCH_DIR):
            outermost_torch = frame
        elif not name.startswith("<frozen"):
            # A virtual environment inside the project folder is not the project's code.
            if own is not None and (name == own or (name.startswith(own) and not installed(name[len(own):]))):
                return Site(name, frame.f_lineno)
            if innermost_other is None:
                innermost_other = frame
        frame = frame.f_back
    if innermost_other is not None:
        return Site(innermost_other.f_code.co_filename, innermost_other.f_lineno)
    if phase is Phase.FORWARD and outermost_torch is not None:
        return Site(outermost_torch.f_code.co_filename, outermost_torch.f_lineno)
    return None


class _Recorder(TorchDispatchMode):
    """Records every aten op of one forward + backward."""

    def __init__(self, own: str | None = None, deadline: float | None = None) -> None:
        super().__init__()
        self.own = own
        self.deadline = deadline  # a time.perf_counter() value: past it, every op raises OutOfTime
        self.out_of_time = False
        self.records: list[OpRecord] = []
        self.phase = Phase.FORWARD
        # tensor -> (version, producing record, summary); weak, so a dead tensor's id is never misread
        self._seen = WeakIdKeyDictionary()
        self._node_origin: dict[Any, int] = {}
        self._nodes: list[Any] = []
        self._pending: tuple[int, list[torch.Tensor]] | None = None
        self._last_forward_node: int | None = None

    def forward_done(self) -> None:
        self._resolve_pending()
        self.phase = Phase.BACKWARD
        numbers = [n for n in map(_sequence_nr, self._nodes) if n is not None]
        self._last_forward_node = max(numbers, default=None)

    def _made_after_forward(self, node: Any) -> bool:
        """A node that losscmp's own code created after the implementation returned
        (run.call reshapes the loss before differentiating it)."""
        seq = _sequence_nr(node)
        return seq is not None and self._last_forward_node is not None and seq > self._last_forward_node

    def _resolve_pending(self) -> None:
        # Autograd gives an op's outputs their grad_fn only after the op returns through
        # this mode, so the previous forward op's node is read here, one op later.
        if self._pending is None:
            return
        index, outputs = self._pending
        self._pending = None
        for t in outputs:
            node = t.grad_fn
            if node is not None and _node_key(node) not in self._node_origin:
                self._node_origin[_node_key(node)] = index
                self._nodes.append(node)

    def producer(self, t: torch.Tensor) -> int | None:
        known = self._seen.get(t)
        return known[1] if known is not None else None

    def _input(self, t: torch.Tensor) -> tuple[Summary | None, int | None]:
        known = self._seen.get(t)
        if known is not None and known[0] == t._version:
            return known[2], known[1]
        summary = summarise(t)
        producer = known[1] if known is not None else None
        self._seen[t] = (t._version, producer, summary)
        return summary, producer

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.deadline is not None and (self.out_of_time or time.perf_counter() > self.deadline):
            # Every op from here on raises, so an implementation that catches the first
            # (a fallback path) cannot run on unrecorded past the budget.
            self.out_of_time = True
            raise OutOfTime("the explanation's time budget ran out while recording")
        if self.phase is Phase.FORWARD:
            self._resolve_pending()
        # Inputs are summarised before the call: an in-place op changes them.
        leaves, _ = tree_flatten((args, kwargs))
        tensors_in = [x for x in leaves if isinstance(x, torch.Tensor)]
        seen_in = [self._input(t) for t in tensors_in]
        out = func(*args, **kwargs)
        node = _current_node() if self.phase is Phase.BACKWARD else None
        site = _user_site(sys._getframe(1), self.phase, self.own)
        if self.phase is Phase.BACKWARD and site is None and (node is None or self._made_after_forward(node)):
            # Not the implementation's op: the loss seed and its reshape, run.call's detach
            # of the results, its mutation checks.  Unrecorded, but a one-input op that only
            # moves or copies values passes on its input's producer, so the detached results
            # still lead back to the ops that made them.  Not the seed: ones_like(loss) is no
            # value the loss's op computed (a loss of 1 read as the other side's seed of 1).
            if len(tensors_in) == 1 and str(func).startswith(_PASS_THROUGH):
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        self._seen[t] = (t._version, seen_in[0][1], summarise(t))
            return out
        origin = self._node_origin.get(_node_key(node)) if node is not None else None
        if site is None and origin is not None:
            site = self.records[origin].site
        out_leaves, _ = tree_flatten(out)
        outputs = [x for x in out_leaves if isinstance(x, torch.Tensor)]
        numbers = [x for x in out_leaves if isinstance(x, (bool, int, float))]  # .item() and friends
        index = len(self.records)
        out_summaries = []
        for t in outputs:
            s = summarise(t)
            self._seen[t] = (t._version, index, s)
            out_summaries.append(s)
        out_summaries += [summarise(torch.tensor(float(v), dtype=torch.float64)) for v in numbers]
        in_key = tuple((_squeezed(t.shape), _dtype_class(t.dtype)) for t in tensors_in)
        out_key = tuple((_squeezed(t.shape), _dtype_class(t.dtype)) for t in outputs) + (("number",) * len(numbers),)
        self.records.append(OpRecord(
            index=index,
            op=str(func),
            phase=self.phase,
            inputs=tuple(s for s, _ in seen_in),
            producers=tuple(p for _, p in seen_in),
            scalars=tuple(_scalar_text(x) for x in leaves if not isinstance(x, torch.Tensor)),
            outputs=tuple(out_summaries),
            site=site,
            origin=origin,
            key=(self.phase.value, str(func), in_key, out_key),
        ))
        if self.phase is Phase.FORWARD and outputs:
            self._pending = (index, outputs)
        return out


def _dtype_class(dtype: torch.dtype) -> str:
    # float32 and float64 runs of one program are the same computation: a numerical
    # finding is located by aligning the unstable side's run with its own float64 run.
    return "complex" if dtype.is_complex else "float" if dtype.is_floating_point else str(dtype)


def _scalar_text(x: Any) -> str:
    return f"{x:.17g}" if isinstance(x, float) else str(x)


class OutOfTime(BaseException):
    """Raised inside a recorded call once its deadline has passed.  A BaseException, so that
    an implementation's own ``except Exception`` does not swallow it (run.call records it as
    the call's failure, and :func:`record` says why)."""


def record(impl: Implementation, spec: Spec, case: Case, deadline: float | None = None) -> Recording:
    """Run ``impl`` on ``case`` as :func:`run.call` does, recording every aten op.

    ``deadline`` (a ``time.perf_counter()`` value): past it the call is stopped at its next
    op, and the recording says so (``out_of_time``)."""
    recorder = _Recorder(own_root(impl), deadline)
    with contextlib.ExitStack() as active:

        def traced(*args: Any, **kwargs: Any) -> Any:
            active.enter_context(recorder)  # stays on through run.call's autograd.grad
            try:
                return impl.fn(*args, **kwargs)
            finally:
                recorder.forward_done()

        with breadcrumbs.watched(impl.label, spec, case):  # a hang or crash here is named like any in-process call
            try:
                outcome = call(traced, spec, case)
            except OutOfTime as e:  # raised again by run.call's own checks after the call, while still recording
                outcome = Outcome(Status.EXCEPTION, error=str(e))
    returned = [("value", Phase.FORWARD, outcome.value)]
    returned += [(f"gradient w.r.t. {k}", Phase.BACKWARD, g) for k, g in outcome.grads.items()]
    results = tuple(Result(what, phase, summarise(t) if t is not None else None, recorder.producer(t) if t is not None else None)
                    for what, phase, t in returned)
    return Recording(impl.label, tuple(recorder.records), outcome, results if not outcome.failed else (), recorder.out_of_time)


# --- alignment and localisation -----------------------------------------------------------


@dataclass(frozen=True)
class Alignment:
    pairs: tuple[tuple[int, int], ...]  # (expected index, actual index), in execution order
    coverage: float  # fraction of all ops of both sides that have a partner

    @property
    def expected_to_actual(self) -> dict[int, int]:
        return dict(self.pairs)

    @property
    def actual_to_expected(self) -> dict[int, int]:
        return {j: i for i, j in self.pairs}


def align(expected: Sequence[OpRecord], actual: Sequence[OpRecord]) -> Alignment:
    """Forward ops on (op, shapes, dtypes); then backward ops on the same *and* on the
    forward ops they belong to: two programs with twin branches (the cross and the
    auto-correlation terms of a Sinkhorn divergence, on equal-sized clouds) run
    backward ops that look alike, and only their forward origin tells which is which."""
    fwd_a = [r for r in expected if r.phase is Phase.FORWARD]
    fwd_b = [r for r in actual if r.phase is Phase.FORWARD]
    forward = _matching(fwd_a, fwd_b, [r.key for r in fwd_a], [r.key for r in fwd_b])
    pair_of_a = {fwd_a[i].index: n for n, (i, _) in enumerate(forward)}
    pair_of_b = {fwd_b[j].index: n for n, (_, j) in enumerate(forward)}

    def origin_token(r: OpRecord, pair_of: dict[int, int], side: str) -> Any:
        if r.origin is None:
            return None  # unknown (older torch): match on the op alone
        # An origin without a partner gets a token no op of the other side can share.
        return pair_of[r.origin] if r.origin in pair_of else (side, r.origin)

    bwd_a = [r for r in expected if r.phase is Phase.BACKWARD]
    bwd_b = [r for r in actual if r.phase is Phase.BACKWARD]
    backward = _matching(bwd_a, bwd_b, [(r.key, origin_token(r, pair_of_a, "a")) for r in bwd_a],
                         [(r.key, origin_token(r, pair_of_b, "b")) for r in bwd_b])
    pairs = tuple((fwd_a[i].index, fwd_b[j].index) for i, j in forward) + tuple(
        (bwd_a[i].index, bwd_b[j].index) for i, j in backward)
    total = len(expected) + len(actual)
    return Alignment(pairs, 2 * len(pairs) / total if total else 1.0)


def _matching(a: Sequence[OpRecord], b: Sequence[OpRecord], keys_a: list, keys_b: list) -> list[tuple[int, int]]:
    # autojunk off: a Sinkhorn loop repeats the same few ops hundreds of times, and the
    # heuristic would throw exactly those away.
    matcher = difflib.SequenceMatcher(None, keys_a, keys_b, autojunk=False)
    return [(m.a + k, m.b + k) for m in matcher.get_matching_blocks() for k in range(m.size)]


@dataclass(frozen=True)
class SourceLine:
    file: str
    line: int
    code: str
    op: str
    phase: str  # "forward" / "backward": where the two sides' values first differ

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "code": self.code, "op": self.op, "phase": self.phase}


class Confidence(str, Enum):
    """How much the data backs a location (see :func:`localise`)."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


@dataclass(frozen=True)
class Localisation:
    location: dict[str, SourceLine] | None  # label -> where; None when undecided
    note: str  # one line: what was found, or why nothing was (with the coverage)
    coverage: float
    values: dict[str, str] = field(default_factory=dict)  # label -> the departing op's output
    differs: bool = True  # the two sides' results differ on the case (False: nothing to locate)
    confidence: Confidence | None = None  # None when there is no location
    side: str | None = None  # the side a one-line summary names: the side under test, or the unstable one

    def to_json(self) -> dict[str, Any]:
        location = None if self.location is None else {k: v.to_json() for k, v in self.location.items()}
        return {"location": location, "location_note": self.note, "coverage": self.coverage,
                "confidence": None if self.confidence is None else self.confidence.value, "side": self.side}


def _unaligned_root(records: Sequence[OpRecord], starts: Sequence[int | None], aligned: dict[int, int]) -> int | None:
    """The earliest op of the unaligned ops that feed ``starts`` (through unaligned ops only)."""
    todo = [p for p in starts if p is not None and p not in aligned]
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo += [q for q in records[p].producers if q is not None and q not in aligned]
    return min(seen) if seen else None


def _same_forward_value(other: Sequence[OpRecord], own: Sequence[OpRecord], other_dep: int,
                        other_to_own: dict[int, int], tol: Tolerance) -> bool:
    """Does this side compute, at the counterpart of the forward op whose backward the
    other side runs alone, the same value?  Then this side lacks that gradient path (a
    dropped term, a .detach()); if not, the forward values already differ there and this
    side's own departure stands."""
    origin = other[other_dep].origin
    partner = other_to_own.get(origin) if origin is not None else None
    if partner is None or origin is None or not other[origin].outputs or not own[partner].outputs:
        return False
    return summary_diff(own[partner].outputs[0], other[origin].outputs[0], tol) is None


def _cause_via_other_side(own: Sequence[OpRecord], other: Sequence[OpRecord], other_root: int | None,
                          other_to_own: dict[int, int], own_aligned: dict[int, int]) -> int | None:
    """One side's gradient runs ops the other lacks; on the lacking side the cause is the
    partner of the forward op those ops belong to — or, if that op reads something
    only this side computes (a ``.detach()``), that."""
    origin = other[other_root].origin if other_root is not None else None
    if origin is None:
        return None
    partner = other_to_own.get(origin)
    if partner is None:
        return None
    cut = _unaligned_root(own, own[partner].producers, own_aligned)
    return cut if cut is not None else partner


# --- alignment by data ---------------------------------------------------------------------


def _negated(s: Summary) -> Summary:
    """The summary of -t, from the summary of t."""
    return replace(s, values=None if s.values is None else -s.values, sample=None if s.sample is None else -s.sample,
                   total=-s.total, low=-s.high, high=-s.low, posinfs=s.neginfs, neginfs=s.posinfs)


def _distinctive(s: Summary, tol: Tolerance) -> bool:
    """A floating value specific enough that finding it negated on the other side is evidence
    of the same quantity: not constant, and some element :data:`NEAR_ZERO_ATOLS` atol off
    zero (fork_no_debias' gradients of ~1e-5 match their own negation under atol alone)."""
    return (s.dtype.is_floating_point and not _indistinct(s, tol) and s.numel > 1
            and max(abs(s.low), abs(s.high)) > NEAR_ZERO_ATOLS * _tolerance_for(s, tol).atol)


def _indistinct(s: Summary, tol: Tolerance) -> bool:
    """A value that says little about which quantity it is: every element equal (zeros,
    ones, a 1/N fill), or every element within atol of zero (so within the tolerance of
    any other such tensor).  Such values recur by coincidence."""
    if s.nans or s.posinfs or s.neginfs:
        return False
    if s.numel == 0 or s.low == s.high:
        return True
    return s.dtype.is_floating_point and max(abs(s.low), abs(s.high)) <= _tolerance_for(s, tol).atol


class _Values:
    """Every tensor value one side saw: op outputs, and tensors from outside (the case,
    a module's constants).  Answers "did this side compute that value too?"."""

    def __init__(self, rec: Recording) -> None:
        self.records = rec.records
        self._buckets: dict[tuple, list[tuple[float, Summary, int | None]]] = {}
        for r in rec.records:
            for out in r.outputs:
                self._add(out, r.index)
            for s, p in zip(r.inputs, r.producers):
                if p is None:
                    self._add(s, None)
        for bucket in self._buckets.values():
            bucket.sort(key=lambda e: e[0])
        self._totals = {k: [e[0] for e in b] for k, b in self._buckets.items()}

    @staticmethod
    def _key(s: Summary) -> tuple:
        return (_squeezed(s.shape), _dtype_class(s.dtype))

    def _add(self, s: Summary | None, producer: int | None) -> None:
        if s is not None:
            self._buckets.setdefault(self._key(s), []).append((s.total, s, producer))

    def producers(self, s: Summary, tol: Tolerance) -> set[int | None]:
        """The ops (None: from outside) whose output agrees with ``s`` within ``tol``."""
        key = self._key(s)
        bucket = self._buckets.get(key)
        if not bucket:
            return set()
        t = _tolerance_for(s, tol)
        # A necessary condition on the sums (see summary_diff) narrows the search first.
        slack = s.numel * t.atol + 2 * t.rtol * s.abs_total + 1e-300
        totals = self._totals[key]
        lo, hi = bisect.bisect_left(totals, s.total - slack), bisect.bisect_right(totals, s.total + slack)
        found: set[int | None] = set()
        for _, other, producer in bucket[lo:hi]:
            if producer not in found and summary_diff(s, other, t) is None:
                found.add(producer)
        return found


# Ops that only move, relabel or copy their one input's values: transparent when asking
# which quantity a value is (one side's `y = y.detach()` on an already detached tensor).
_PASS_THROUGH = ("aten.detach.", "aten.alias.", "aten.view.", "aten._unsafe_view.", "aten.clone.", "aten.expand.",
                 "aten.unsqueeze.", "aten.squeeze.", "aten.reshape.", "aten.permute.", "aten.t.", "aten.transpose.",
                 "aten.contiguous.", "aten._to_copy.", "aten.lift_fresh.", "aten.lift_fresh_copy.")


def _root(records: Sequence[OpRecord], index: int | None, summary: Summary | None) -> tuple[int | None, Summary | None]:
    """The op that computed a value, seen through pass-through ops; None with the outside
    tensor's summary when the chain starts outside."""
    for _ in range(len(records)):
        if index is None:
            break
        r = records[index]
        tensors = [k for k, s in enumerate(r.inputs) if s is not None]
        if not r.op.startswith(_PASS_THROUGH) or len(tensors) != 1:
            break
        index, summary = r.producers[tensors[0]], r.inputs[tensors[0]]
    return index, summary


def _carries_gradient(records: Sequence[OpRecord], index: int) -> bool:
    """A backward op fed by another backward op: part of the gradient's flow, not a
    re-read of a saved forward value (those are compared by value like any other)."""
    r = records[index]
    return r.phase is Phase.BACKWARD and r.origin is not None and any(
        q is not None and records[q].phase is Phase.BACKWARD for q in r.producers)


class _Walk:
    """One side's view of the other: which of its values the other side computed too,
    and where, reached from a differing result, its computation departs."""

    def __init__(self, own: Recording, other: _Values, partner: dict[int, int], tol: Tolerance) -> None:
        self.own, self.other, self.partner, self.tol = own, other, partner, tol
        self._cache: dict[tuple[int, int | None], set[int | None]] = {}
        self._depth = 0

    def shared(self, s: Summary | None, producer: int | None) -> bool:
        """Did the other side compute this value?  A distinctive value matched anywhere
        counts; an indistinct one (constant, or all within atol of zero) only where the ops
        that made it are counterparts too (or both came from outside): equal fills, and
        tiny values that are all "equal" under atol, are no evidence."""
        if s is None:
            return True  # no values to compare: never followed
        return bool(self._matches(s, producer))

    def _matches(self, s: Summary, producer: int | None) -> set[int | None]:
        """The other side's ops (None: from outside) that computed this same quantity."""
        key = (id(s), producer)
        if key not in self._cache:
            self._cache[key] = set()  # a cycle through constant values proves nothing
            hits = self.other.producers(s, self.tol)
            if not hits and _distinctive(s, self.tol):
                # The same quantity with the opposite sign: -log_prob against an NLL, carried
                # negated until one side flips it (PoissonNLLLoss' exp(z) - t·z against the
                # distribution's t·z - exp(z)).  Only for values well off zero and not constant:
                # a tiny or uniform tensor is minus many things by coincidence.  And only in the
                # same pass: a library Dice's gradient w.r.t. tp is, to the bit, minus a
                # hand-written Dice's forward dice (2 / denominator both).
                phase = self.own.records[producer].phase if producer is not None else Phase.FORWARD
                hits = {h for h in self.other.producers(_negated(s), self.tol)
                        if (self.other.records[h].phase if h is not None else Phase.FORWARD) is phase}
            if hits and producer is not None and _carries_gradient(self.own.records, producer):
                hits = {h for h in hits if self._same_forward(producer, h)}
            if hits and _indistinct(s, self.tol):
                mine = _root(self.own.records, producer, s)
                hits = {h for h in hits if self._same_root(mine, _root(self.other.records, h, None))}
            self._cache[key] = hits
        return self._cache[key]

    def _same_forward(self, producer: int, other: int | None) -> bool:
        """A gradient is the same quantity only as the gradient of the same forward value:
        counterpart forward ops, or forward ops whose outputs agree.  (In a degenerate case
        the gradients of two different cost matrices can be equal to the digit.)"""
        origin = self.own.records[producer].origin
        theirs = None if other is None else self.other.records[other].origin
        if origin is None or theirs is None:  # as for the other side: no forward value to share
            return False
        mine = self.own.records[origin]
        partner = self.partner.get(mine.index)
        out = mine.outputs[0] if mine.outputs else None
        if partner is not None and out is not None and self.other.records[partner].outputs and \
                summary_diff(out, self.other.records[partner].outputs[0], self.tol) is None:
            # The forward op has a counterpart computing the same value: the gradient must be
            # that counterpart's, not a look-alike branch's (with tiny inputs the softmins of
            # C_xx and C_xy agree in the forward, and so can their gradients).
            return theirs == partner
        return out is not None and theirs in self._matches(out, mine.index)

    def _same_root(self, mine: tuple[int | None, Summary | None], theirs: tuple[int | None, Summary | None]) -> bool:
        """Indistinct values are the same quantity when, seen through views and copies, they
        come from the same outside tensor (to the bit: x = 1e-5 and y = 0 are "equal" under
        atol, not the same input) or from the same op on the same inputs."""
        (a, sa), (b, sb) = mine, theirs
        if a is None or b is None:
            if a is not None or b is not None or sa is None:
                return False
            if sb is None:  # the other side's hit is an outside tensor itself
                return None in self.other.producers(sa, _EXACT)
            return summary_diff(sa, sb, _EXACT) is None
        return self._same_op(a, b)

    def _same_op(self, producer: int | None, other: int | None) -> bool:
        """Counterparts in the op alignment, or the same op with the same other arguments
        on the same quantities as inputs."""
        if producer is None or other is None:
            return False  # outside tensors are matched to the bit in _matches
        if self.partner.get(producer) == other:
            return True
        mine, theirs = self.own.records[producer], self.other.records[other]
        if mine.origin is not None and theirs.origin is not None and self.partner.get(mine.origin) != theirs.origin:
            return False  # look-alike gradients of different forward ops (twin Sinkhorn branches)
        if mine.op != theirs.op or mine.scalars != theirs.scalars or self._depth > MAX_CONSTANT_CHAIN:
            return False
        if len(mine.inputs) != len(theirs.inputs):
            return False
        self._depth += 1  # a loop over all-zero potentials chains constants hundreds deep
        try:
            # Each input the same quantity as *that* op's input, not merely computed somewhere.
            return all(s is None or _root(self.other.records, q_theirs, None)[0] in
                       {_root(self.other.records, h, None)[0] for h in self._matches(s, q)}
                       for s, q, q_theirs in zip(mine.inputs, mine.producers, theirs.producers))
        finally:
            self._depth -= 1

    def departure(self, start: int | None) -> int | None:
        """From the op that made a differing result, back through values the other side
        never computed, to the earliest op that makes such a value out of values the other
        side has too (or reads a tensor from outside that only this side has).  None when
        the result itself is a value the other side computed (this side stops early)."""
        if start is None:
            return None
        records = self.own.records
        made = records[start].outputs[0] if records[start].outputs else None
        if made is not None and self.shared(made, start):
            # The differing result is itself a value the other side computes (and then goes
            # on from): no op of this side computes anything new.  fork_no_debias' gradient
            # w.r.t. y is the upstream's before it adds the debiasing term's.
            return None
        found: list[int] = []
        todo, seen = [start], set()
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            r = records[p]
            novel = [q for s, q in zip(r.inputs, r.producers) if not self.shared(s, q)]
            follow = [q for q in novel if q is not None]
            todo += follow
            if len(follow) < len(novel) or not novel:
                found.append(p)
        # A forward value that differs explains everything after it, gradients included.
        # Otherwise: in the backward, a branch only one side runs also recomputes saved
        # forward values (2 * diff before it meets the gradient), novel only because the
        # branch exists; where the gradient itself first flows differently is the departure.
        forward = [p for p in found if records[p].phase is Phase.FORWARD]
        flow = [p for p in found if _carries_gradient(records, p)]
        return min(forward or flow or found) if found else None


def _first_differing_result(expected: Recording, actual: Recording, tol: Tolerance) -> tuple[Result, Result, str] | None:
    for ra, rb in zip(expected.results, actual.results):
        if ra.what != rb.what:
            continue
        why = summary_diff(rb.summary, ra.summary, tol)
        if why is not None:
            return ra, rb, why
    return None


MAX_CONSTANT_CHAIN = 64  # how far back a constant-valued tensor's ops are compared before giving up
ULPS = 8  # "exactly": within this many units in the last place (reordered sums round differently)


def _ulp_tolerance(summaries: Sequence[Summary | None]) -> Tolerance:
    dtypes = [s.dtype for s in summaries if s is not None and s.dtype.is_floating_point]
    eps = max((torch.finfo(d).eps for d in dtypes), default=torch.finfo(torch.float32).eps)
    return Tolerance(ULPS * eps, 0.0)


def _amplifies(walk: _Walk, r: OpRecord) -> bool:
    """Do the op's inputs match the other side's values only within the tolerance, not to
    a few ulps?  Then the op carries a smaller difference past the tolerance (a division
    by a small eps, a sum of atol-sized differences) rather than making one."""
    strict = _Walk(walk.own, walk.other, walk.partner, _ulp_tolerance(r.inputs))
    return not all(strict.shared(s, q) for s, q in zip(r.inputs, r.producers))


def _at(rec: Recording, index: int) -> str:
    """An op named by its source line and which of that line's runs it is: a Sinkhorn
    loop runs one line hundreds of times, and "op 345 of 1020" says nothing."""
    records = rec.records
    r = records[index]
    if r.site is None:
        return f"{r.describe(records)} (op {index + 1} of {len(records)}, no source line)"
    same = [q.index for q in records if q.site == r.site and q.op == r.op and q.phase is r.phase]
    where = f"{_short(r.site.file)}:{r.site.line}"
    run = f", run {same.index(index) + 1} of {len(same)} there" if len(same) > 1 else ""
    return f"{r.describe(records)} at {where}{run}"


def _short(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _side_under_test(lines: dict[str, SourceLine], expected: str, actual: str) -> str:
    """The side a one-line summary names: an installed library is the reference a
    researcher compares against, so the side whose line is in their own files is named;
    otherwise the implementation being compared (the second)."""
    mine = [label for label in (actual, expected) if not installed(lines[label].file)]
    return mine[0] if mine else actual


def localise(expected: Recording, actual: Recording, tol: Tolerance, *, working: str | None = None,
             deadline: float | None = None) -> Localisation:
    """Where two recordings part ways, by data.

    ``working``: set when the two recordings are one program run at two precisions (the
    label of the working-dtype run); a difference carried within the tolerance is then
    that run's rounding, whichever walk noticed it, and the note says so.

    The ops are aligned by structure (:func:`align`) only to measure how much the two
    programs share (below :data:`MIN_COVERAGE`: not localised) and to vouch for
    constant-valued tensors.  The location itself is found by values: from the first
    result that differs, each side is followed back through values the other side never
    computed, to the earliest op that makes such a value out of values both sides
    computed (within the tolerance).  That op computes a different quantity on agreeing
    inputs; ops that merely line up by position (a ``sum(p) + sum(t)`` against a
    ``sum(p) - tp``) are never blamed.  A side whose result is a value the other side
    computes along the way (a dropped term, a ``.detach()``) is placed through the
    other side's departure (:func:`_cause_via_other_side`).
    """
    le, la = expected.label, actual.label
    a, b = expected.records, actual.records
    alignment = align(a, b)
    cov = alignment.coverage
    coverage = f"alignment coverage {cov:.0%} of {len(a)} + {len(b)} ops"
    if expected.outcome.failed or actual.outcome.failed:
        failed = [f"{r.label} {r.outcome.error}" for r in (expected, actual) if r.outcome.failed]
        return Localisation(None, f"not localised: {'; '.join(failed)} (trace follows values, not failures); {coverage}",
                            cov)
    if not compare_outcomes(Pair(le, la), expected.outcome, actual.outcome, tol).diverges:
        return Localisation(None, f"nothing to localise: {le} and {la} agree on this case; {coverage}", cov, differs=False)
    if cov < MIN_COVERAGE:
        return Localisation(None, f"not localised: the two executions share too little structure ({coverage}, "
                            f"below {MIN_COVERAGE:.0%})", cov)
    first = _first_differing_result(expected, actual, tol)
    if first is None:
        return Localisation(None, f"not localised: the results differ but no returned tensor shows it; {coverage}", cov)
    res_a, res_b, why = first
    if deadline is not None and time.perf_counter() > deadline:
        return Localisation(None, f"not localised: the explanation's time budget ran out after recording and aligning both "
                            f"sides, before following the values; {coverage}", cov)
    to_b, to_a = alignment.expected_to_actual, alignment.actual_to_expected
    walk_a = _Walk(expected, _Values(actual), to_b, tol)
    walk_b = _Walk(actual, _Values(expected), to_a, tol)
    dep_a, dep_b = walk_a.departure(res_a.producer), walk_b.departure(res_b.producer)
    # A departure whose inputs agree only within tolerance carries a smaller difference
    # past it; where that difference starts (the same walk at a few ulps) is the cause.
    # Cases minimised to just past the threshold sit there: every intermediate is within
    # atol, and only the final sum is not.
    carried: dict[str, str] = {}
    refined = []
    for walk, res, dep in ((walk_a, res_a, dep_a), (walk_b, res_b, dep_b)):
        if dep is not None and _amplifies(walk, walk.own.records[dep]):
            ulps = _Walk(walk.own, walk.other, walk.partner, _ulp_tolerance((res_a.summary, res_b.summary)))
            start = ulps.departure(res.producer)
            # Trusted only where it is clean: the same inputs to the bit, another output.  A
            # walk at a few ulps can stop at a cancellation (a + b with a and b each a few
            # ulps off) deep inside a loop, far from where the difference began.
            exact = _Walk(walk.own, walk.other, walk.partner, _EXACT)
            clean = start is not None and all(exact.shared(s, q) for s, q in
                                              zip(walk.own.records[start].inputs, walk.own.records[start].producers))
            if clean and start is not None and start != dep and walk.own.records[start].site is not None:
                carried[walk.own.label] = (f"{walk.own.label}'s {_at(walk.own, dep)} only carries past the tolerance a smaller "
                                           f"difference that starts at the line named")
                dep = start
            else:
                carried[walk.own.label] = AMPLIFIES
        refined.append(dep)
    for walk, dep in zip((walk_a, walk_b), refined):
        if dep is not None and carried.get(walk.own.label) == AMPLIFIES and _changes_no_value(walk.own.records[dep].op):
            # A view or a copy cannot amplify anything: the values reaching it were matched
            # to the other run's only within the tolerance, and the difference grew below it
            # over earlier ops (torchmetrics' SSIM gradient stopped at a backward view).
            return Localisation(None, f"not localised: the {res_a.what} differs, but the walk on {walk.own.label} stops at "
                                f"{_at(walk.own, dep)}, which changes no value: the values reaching it match the other "
                                f"run's only within the tolerance, so the difference built up below the tolerance over "
                                f"earlier ops and no single op makes it; {why}; {coverage}", cov)
    if working is not None and AMPLIFIES in carried.values():
        parts_carried = [f"at that op {working}'s inputs differ from the other run's within the tolerance, and the op amplifies "
                         f"the difference past it"]
        carried = {working: AMPLIFIES}
    elif len(carried) == 2 and set(carried.values()) == {AMPLIFIES}:
        # Both walks stop at the same aligned op: one fact, said once (a possessive on a
        # run's label read "bce_on_sigmoid in float64's op").
        parts_carried = [f"on both sides the op {AMPLIFIES}"]
    else:
        parts_carried = [text if text != AMPLIFIES else f"on {label}, the op {AMPLIFIES}" for label, text in carried.items()]
    dep_a, dep_b = refined
    how: dict[str, str] = {}
    causes = {}
    for label, own, other, dep, other_dep, own_to_other, other_to_own, start in (
            (le, a, b, dep_a, dep_b, to_b, to_a, res_a.producer), (la, b, a, dep_b, dep_a, to_a, to_b, res_b.producer)):
        cause = dep
        lacking = (other_dep is not None and other[other_dep].phase is Phase.BACKWARD and other_dep not in other_to_own
                   and _same_forward_value(other, own, other_dep, other_to_own, tol))
        if dep is None or lacking:
            # This side's result is a value the other computes on the way, or its gradient
            # lacks ops the other runs: the cause is where the other side's extra path
            # leaves the shared program (a dropped term, a .detach()).
            via = _cause_via_other_side(own, other, other_dep, other_to_own, own_to_other)
            if via is not None:
                cause = via
                how[label] = ("its result is a value the other side computes on the way" if dep is None
                              else "its gradient lacks ops the other side runs") + ", placed where the other side's extra path leaves the shared program"
            elif dep is None and start is not None:
                # No backward path to follow over: named at the op that returns the result.
                cause = start
                how[label] = "its result is a value the other side computes on the way, named at the op that returns it"
        causes[label] = cause
    cause_a, cause_b = causes[le], causes[la]
    if cause_a is None or cause_b is None:
        stuck = [label for label, c in ((le, cause_a), (la, cause_b)) if c is None]
        return Localisation(None, f"not localised: the {res_a.what} differs, but no op of {' and '.join(stuck)} makes a value "
                            f"the other side lacks from values both compute; {why}; {coverage}", cov)
    lookalike = [text for walk, cause in ((walk_a, cause_a), (walk_b, cause_b))
                 if (text := _same_number_elsewhere(walk, cause)) is not None]
    if not lookalike and not how and not carried:
        same = _departures_equal(a[cause_a], b[cause_b])
        lookalike = [same] if same else []
    if lookalike:
        return Localisation(None, f"not localised: the {res_a.what} differs, but {'; '.join(lookalike)}: one number cannot "
                            f"tell the same quantity from a coincidence, so no pair of ops is shown by data to compute "
                            f"a different quantity; {why}; {coverage}", cov)
    phase = res_a.phase
    lines = {le: _source_line(a[cause_a], a, phase), la: _source_line(b[cause_b], b, phase)}
    values = {le: _text(a[cause_a].outputs[0] if a[cause_a].outputs else None),
              la: _text(b[cause_b].outputs[0] if b[cause_b].outputs else None)}
    missing = [label for label, where in lines.items() if where is None]
    parts = [f"{phase.value}: the {res_a.what} differs; {le} departs at {_at(expected, cause_a)}, {la} at {_at(actual, cause_b)}"]
    parts += parts_carried
    parts += [f"{label}: {text}" for label, text in how.items()]
    if missing:
        parts.append(f"no source line for {' and '.join(missing)}: the op was not issued from Python code that this torch can attribute")
        return Localisation(None, "; ".join(parts + [why, coverage]), cov, values)
    confidence, reason = _confidence(cov, how, list(carried), (walk_a, a[cause_a], dep_a), (walk_b, b[cause_b], dep_b),
                                     near_zero=_near_zero(res_a.summary, res_b.summary, tol))
    parts.append(f"confidence {confidence.value} ({reason})")
    found = {label: where for label, where in lines.items() if where is not None}  # all of them: none is missing
    return Localisation(found, "; ".join(parts + [why, coverage]), cov, values, confidence=confidence,
                        side=_side_under_test(found, le, la))


AMPLIFIES = "amplifies a difference its inputs carry within the tolerance"

# Ops that move, alias or copy values without computing any new one.
VALUE_PRESERVING = frozenset({
    "view", "_unsafe_view", "view_as", "reshape", "_reshape_alias", "flatten", "unflatten", "permute", "transpose", "t",
    "movedim", "expand", "expand_as", "squeeze", "unsqueeze", "select", "slice", "narrow", "unbind", "split",
    "split_with_sizes", "chunk", "as_strided", "alias", "detach", "clone", "contiguous", "lift_fresh", "repeat",
})


def _changes_no_value(op: str) -> bool:
    """``aten.view.default`` and the like: the op's outputs are some of its inputs' values."""
    parts = op.split(".")
    name = parts[1] if len(parts) > 1 and parts[0] == "aten" else parts[0]
    return name.rstrip("_") in VALUE_PRESERVING


def _same_number_elsewhere(walk: _Walk, index: int) -> str | None:
    """A departure whose output is one number (10 atol off zero, not a whole number) that the other
    side computes too, within the tolerance: it was taken as new only because a lone number
    says little about which quantity it is.  PoissonNLLLoss(full=True)'s t·z = 1.5 against
    the distribution's xlogy(t, exp z) = 1.4999999 is the same quantity, and naming that
    pair hid the true difference (Stirling's log t! against lgamma(t + 1)).  Returns what to
    say, or None when the departure's value is not found on the other side."""
    r = walk.own.records[index]
    s = r.outputs[0] if r.outputs else None
    if s is None or s.numel != 1 or s.values is None or not s.dtype.is_floating_point:
        return None
    v = float(s.values.reshape(-1)[0])
    if not math.isfinite(v) or abs(v) <= NEAR_ZERO_ATOLS * _tolerance_for(s, walk.tol).atol or v == round(v):
        return None  # 0, 1, 2: whole numbers recur by coincidence, and stay departures
    hits = sorted(h for h in walk.other.producers(s, walk.tol) if h is not None)
    if not hits:
        return None
    other = walk.other.records[hits[0]]
    return (f"{walk.own.label}'s {r.op} = {v:.8g} equals a value the other side computes ({other.op} = "
            f"{_text(other.outputs[0] if other.outputs else None)})")


def _departures_equal(ra: OpRecord, rb: OpRecord) -> str | None:
    """The two departing ops' own outputs are equal, to the bit: each was taken as new only
    because its value is constant or zero (t·z = 0 at z = 0 against xlogy(t, exp z) = 0), and
    nothing shows that they compute different quantities.  What to say, or None."""
    sa, sb = (r.outputs[0] if r.outputs else None for r in (ra, rb))
    if sa is None or sb is None or ra.phase is not rb.phase or summary_diff(sb, sa, _EXACT) is not None:
        return None
    return f"the two departing ops give the same value ({ra.op} = {_text(sa)} against {rb.op} = {_text(sb)})"


def _near_zero(sa: Summary | None, sb: Summary | None, tol: Tolerance) -> bool:
    """Results within a few atol of zero: the minimiser's favourite place (just past the
    threshold), where most intermediates agree with each other under atol."""
    sizes = [max(abs(s.low), abs(s.high)) for s in (sa, sb) if s is not None and s.dtype.is_floating_point
             and not (s.nans or s.posinfs or s.neginfs) and s.numel]
    return bool(sizes) and max(sizes) <= NEAR_ZERO_ATOLS * tol.atol


NEAR_ZERO_ATOLS = 10


def _confidence(cov: float, how: dict[str, str], amplified: list[str], *sides: tuple,
                near_zero: bool = False) -> tuple[Confidence, str]:
    """High: both departures found by data, on inputs that match distinctive values of the
    other side, in programs that share most of their structure.  Each doubt lowers it."""
    doubts = []
    if near_zero:
        doubts.append(f"the results are within {NEAR_ZERO_ATOLS}× atol of zero, where small intermediates all agree under atol")
    if how:
        doubts.append(f"{' and '.join(how)} placed through the other side's departure")
    if amplified:
        doubts.append(f"a difference below the tolerance carried past it on {' and '.join(amplified)}")
    for walk, r, dep in sides:
        # Constant-valued inputs matched by value alone (not from outside on both sides, not
        # made by counterpart ops) may be a coincidence: zeros and fills recur.
        loose = [s is None or (_indistinct(s, walk.tol) and q is not None and q not in walk.partner)
                 for s, q in zip(r.inputs, r.producers)]
        if dep is not None and loose and all(loose):
            doubts.append(f"{walk.own.label}'s op reads only constant or below-atol tensors matched by value alone")
    if cov < 0.8:
        doubts.append(f"only {cov:.0%} of ops aligned")
    if not doubts:
        return Confidence.HIGH, "each departure reads only values the other side computes too, and the programs align"
    return (Confidence.MEDIUM if len(doubts) == 1 else Confidence.LOW), "; ".join(doubts)


def _source_line(r: OpRecord, records: Sequence[OpRecord], phase: Phase) -> SourceLine | None:
    if r.site is None:
        return None
    code = linecache.getline(r.site.file, r.site.line).strip()
    # A forward op named for a backward split: the op whose gradient path differs (a .detach()).
    op = r.describe(records) + (" (in the forward)" if r.phase is not phase else "")
    return SourceLine(r.site.file, r.site.line, code, op, phase.value)


def _text(s: Summary | None) -> str:
    return "(no values)" if s is None else s.text()


def locate(expected: Implementation, actual: Implementation, spec: Spec, case: Case, tol: Tolerance,
           *, unstable: str | None = None, deadline: float | None = None) -> Localisation:
    """Record both sides on ``case`` and localise their first divergence.

    ``unstable``: the label of the side a numerical finding blames (the float64 oracle's
    ``unstable_side``).  Two programs that compute one function in different ways share
    little structure (``softplus`` against ``log(1 + exp(x))``), but the unstable side's
    float32 and float64 runs are one program: it is located there (:func:`locate_unstable`).
    """
    if unstable is not None:
        if unstable not in (expected.label, actual.label):
            raise ValueError(f"unstable side {unstable!r} is neither {expected.label!r} nor {actual.label!r}")
        return locate_unstable(expected if unstable == expected.label else actual, spec, case, tol, deadline=deadline)
    start = time.perf_counter()
    recordings = []
    for impl in (expected, actual):
        rec = record(impl, spec, case, deadline)
        if rec.out_of_time:
            return _out_of_time(rec.label, start, deadline)
        recordings.append(rec)
    return localise(recordings[0], recordings[1], tol, deadline=deadline)


def _out_of_time(label: str, start: float, deadline: float | None) -> Localisation:
    spent = time.perf_counter() - start
    return Localisation(None, f"not localised: the explanation's time budget ran out while recording {label} (the trace had "
                        f"{(deadline or start) - start:.3g} s of it, stopped after {spent:.3g} s)", 0.0)


def locate_unstable(impl: Implementation, spec: Spec, case: Case, tol: Tolerance, *, deadline: float | None = None) -> Localisation:
    """The first op of ``impl`` whose output in the working dtype departs from its own
    float64 output while its inputs agree: where the precision is lost."""
    label = impl.label
    impl64, problem = in_float64(impl)
    if problem:
        return Localisation(None, f"not localised: {problem}", 0.0)
    # The two recordings are runs of one program: named as runs, so the note reads "the
    # float32 run departs at ..." rather than "bce_on_sigmoid in float32's op".
    wide_label, work_label = "the float64 run", f"the {_dtype_word(case)} run"
    start = time.perf_counter()
    wide = replace(record(impl64, spec, float64_case(case), deadline), label=wide_label)
    if wide.out_of_time:
        return _out_of_time(f"{label}'s float64 run", start, deadline)
    work = replace(record(impl, spec, case, deadline), label=work_label)
    if work.out_of_time:
        return _out_of_time(f"{label}'s {_dtype_word(case)} run", start, deadline)
    found = localise(wide, work, tol, working=work_label, deadline=deadline)
    head = f"numerical: located on {label}, the unstable side, by its own {_dtype_word(case)} vs float64 run"
    sought = f"numerical: sought on {label}, the unstable side, by its own {_dtype_word(case)} vs float64 run"
    if not found.differs:
        return Localisation(None, f"{sought}: not localised, {label} agrees with its own float64 run on this case; {found.note}",
                            found.coverage, differs=True)
    if found.location is None:
        return Localisation(None, f"{sought}: {found.note}", found.coverage)
    where = found.location[work_label]
    return Localisation({label: where}, f"{head}: {found.note}", found.coverage,
                        {label: found.values.get(work_label, "?"), f"{label} (float64)": found.values.get(wide_label, "?")},
                        confidence=found.confidence, side=label)


def _dtype_word(case: Case) -> str:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in case.tensors.values() if t.is_floating_point()})
    return "/".join(dtypes) or "its working dtype"
