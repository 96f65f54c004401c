"""Where two implementations part ways: the first diverging operation, forward and backward.

In: two implementations, a spec, one (small, usually minimised) case and the tolerance.
Out: a :class:`Localisation` — for each side the user-code line (file, number, text) of
the first operation whose result differs, or ``None`` with the reason.

1. **Record.**  Each side runs under a ``TorchDispatchMode`` exactly as :func:`run.call`
   runs it (forward, then ``autograd.grad`` of the loss).  Every aten op becomes an
   :class:`OpRecord`: op name, input and output shapes and dtypes, a cheap
   :class:`Summary` of each tensor (small tensors whole, large ones as statistics plus a
   fixed sample), which earlier op produced each input, and the issuing line — the
   innermost frame outside torch and outside losscmp (site-packages code such as
   geomloss *is* user code).  A backward op has no user frame on the stack: it is
   attributed to the forward op whose autograd node is running it
   (``torch._C._current_autograd_node()``, matched to the node each forward op created).
2. **Align** the two op sequences with :class:`difflib.SequenceMatcher`, tolerant of
   inserted and removed ops (forks add and drop some): forward ops on (op, input and
   output shapes without unit dims, dtypes); backward ops on the same plus the aligned
   forward op they belong to.  Coverage = the fraction of all ops that found a partner.
3. **Localise.**  The first aligned op (execution order) whose output differs beyond the
   tolerance (:class:`compare.Tolerance`) is where the values part.  If its inputs agree,
   the op itself is the cause.  If an input differs at all and was made by ops only one
   side runs, the cause on that side is the earliest of those ops.  When one side's
   gradient runs ops the other lacks, the other side's cause is the forward op those
   belong to, or the op that cuts the graph there (a ``.detach()``).  When no aligned op
   differs yet the results do, the results are followed back the same way.  An op that
   amplifies a sub-tolerance difference is reported as the location (it is the first
   whose output differs while its inputs agree); the note says where that smaller
   difference first appeared.

Too little shared structure (coverage below :data:`MIN_COVERAGE`), nothing that differs,
or an op with no source line: ``location=None`` and a note that says so with the
coverage.  Never a guessed line.

Works on torch >= 2.0 (``_current_autograd_node`` and ``torch.utils.weak`` came with it);
it does not use ``torch.utils._debug_mode`` (2.10+), which compares two runs of one
program, where this aligns two different programs.

Tracing runs both sides in this process (a dispatch mode cannot reach a worker), and
records every op with summaries: it is meant for small cases, never for the search.
"""
from __future__ import annotations

import contextlib
import difflib
import linecache
import math
import os
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from . import breadcrumbs
from .compare import Tolerance, compare_outcomes, diff_message, diff_tensors
from .findings import Pair
from .generate import Case
from .load import Implementation
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

    def describe(self, records: Sequence["OpRecord"]) -> str:
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


def _user_site(frame: Any, phase: Phase) -> Site | None:
    """Innermost frame outside torch and losscmp — unless losscmp is reached first, which
    means the op was not issued by the implementation (losscmp's own bookkeeping, the
    autograd engine).  A torch function called directly as the implementation has only
    torch frames: in the forward its outermost one is the best line there is."""
    outermost_torch = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_OWN_DIR):
            break
        if name.startswith(_TORCH_DIR):
            outermost_torch = frame
        elif not name.startswith("<frozen"):
            return Site(name, frame.f_lineno)
        frame = frame.f_back
    if phase is Phase.FORWARD and outermost_torch is not None:
        return Site(outermost_torch.f_code.co_filename, outermost_torch.f_lineno)
    return None


class _Recorder(TorchDispatchMode):
    """Records every aten op of one forward + backward."""

    def __init__(self) -> None:
        super().__init__()
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
        if self.phase is Phase.FORWARD:
            self._resolve_pending()
        # Inputs are summarised before the call: an in-place op changes them.
        leaves, _ = tree_flatten((args, kwargs))
        tensors_in = [x for x in leaves if isinstance(x, torch.Tensor)]
        seen_in = [self._input(t) for t in tensors_in]
        out = func(*args, **kwargs)
        node = _current_node() if self.phase is Phase.BACKWARD else None
        site = _user_site(sys._getframe(1), self.phase)
        if self.phase is Phase.BACKWARD and site is None and (node is None or self._made_after_forward(node)):
            # Not the implementation's op: the loss seed and its reshape, run.call's detach
            # of the results, its mutation checks.  Unrecorded, but a one-input op passes on its input's
            # producer, so the detached results still lead back to the ops that made them.
            if len(tensors_in) == 1:
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
        in_key = tuple((_squeezed(t.shape), str(t.dtype)) for t in tensors_in)
        out_key = tuple((_squeezed(t.shape), str(t.dtype)) for t in outputs) + (("number",) * len(numbers),)
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


def _scalar_text(x: Any) -> str:
    return f"{x:.17g}" if isinstance(x, float) else str(x)


def record(impl: Implementation, spec: Spec, case: Case) -> Recording:
    """Run ``impl`` on ``case`` as :func:`run.call` does, recording every aten op."""
    recorder = _Recorder()
    with contextlib.ExitStack() as active:

        def traced(*args: Any, **kwargs: Any) -> Any:
            active.enter_context(recorder)  # stays on through run.call's autograd.grad
            try:
                return impl.fn(*args, **kwargs)
            finally:
                recorder.forward_done()

        with breadcrumbs.watched(impl.label, spec, case):  # a hang or crash here is named like any in-process call
            outcome = call(traced, spec, case)
    returned = [("value", Phase.FORWARD, outcome.value)]
    returned += [(f"gradient w.r.t. {k}", Phase.BACKWARD, g) for k, g in outcome.grads.items()]
    results = tuple(Result(what, phase, summarise(t) if t is not None else None, recorder.producer(t) if t is not None else None)
                    for what, phase, t in returned)
    return Recording(impl.label, tuple(recorder.records), outcome, results if not outcome.failed else ())


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


@dataclass(frozen=True)
class Localisation:
    location: dict[str, SourceLine] | None  # label -> where; None when undecided
    note: str  # one line: what was found, or why nothing was (with the coverage)
    coverage: float
    values: dict[str, str] = field(default_factory=dict)  # label -> the diverging op's output

    def to_json(self) -> dict[str, Any]:
        location = None if self.location is None else {k: v.to_json() for k, v in self.location.items()}
        return {"location": location, "location_note": self.note, "coverage": self.coverage}


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


def _first_output_diff(ra: OpRecord, rb: OpRecord, tol: Tolerance) -> tuple[int, str] | None:
    for k, (sa, sb) in enumerate(zip(ra.outputs, rb.outputs)):
        why = summary_diff(sb, sa, tol)
        if why is not None:
            return k, why
    return None


def _cause_via_other_side(own: Sequence[OpRecord], other: Sequence[OpRecord], other_root: int | None,
                          other_to_own: dict[int, int], own_aligned: dict[int, int]) -> int | None:
    """One side's gradient runs ops the other lacks; on the lacking side the cause is the
    partner of the forward op those ops belong to — or, if that op reads something
    only this side computes (a ``.detach()``), that."""
    if other_root is None or other[other_root].origin is None:
        return None
    partner = other_to_own.get(other[other_root].origin)
    if partner is None:
        return None
    cut = _unaligned_root(own, own[partner].producers, own_aligned)
    return cut if cut is not None else partner


def _causes(a: Sequence[OpRecord], b: Sequence[OpRecord], alignment: Alignment,
            inputs: tuple[Sequence[int | None], Sequence[int | None]], own: tuple[int | None, int | None]) -> tuple[tuple, tuple]:
    """Per side, the op to blame for inputs that differ (see the module docstring), and
    the unaligned root it came from, if any."""
    to_b, to_a = alignment.expected_to_actual, alignment.actual_to_expected
    root_a = _unaligned_root(a, inputs[0], to_b)
    root_b = _unaligned_root(b, inputs[1], to_a)
    cause_a = root_a if root_a is not None else _cause_via_other_side(a, b, root_b, to_a, to_b)
    cause_b = root_b if root_b is not None else _cause_via_other_side(b, a, root_a, to_b, to_a)
    return (own[0] if cause_a is None else cause_a, own[1] if cause_b is None else cause_b), (root_a, root_b)


def _first_difference(expected: Recording, actual: Recording, alignment: Alignment, before: int) -> str:
    """Where a difference of any size first appears, for a split whose inputs only agree
    within tolerance: the amplifier is the location, this is where it got its input."""
    a, b = expected.records, actual.records
    for i, j in alignment.pairs:
        if i >= before:
            break
        if _first_output_diff(a[i], b[j], _EXACT) is None:
            continue
        unequal = [n for n, (sa, sb) in enumerate(zip(a[i].inputs, b[j].inputs)) if summary_diff(sb, sa, _EXACT) is not None]
        producers = ([a[i].producers[n] for n in unequal], [b[j].producers[n] for n in unequal])
        (ca, cb), _ = _causes(a, b, alignment, producers, (i, j))
        where = [f"{r.label} {r.records[c].site.file}:{r.records[c].site.line}" for r, c in ((expected, ca), (actual, cb))
                 if r.records[c].site is not None]
        return f"; a difference below tolerance first appears at {a[i].describe(a)} ({', '.join(where) or 'no source line'})"
    return ""


def _source_line(r: OpRecord, records: Sequence[OpRecord], phase: Phase) -> SourceLine | None:
    if r.site is None:
        return None
    code = linecache.getline(r.site.file, r.site.line).strip()
    # A forward op named for a backward split: the op whose gradient path differs (a .detach()).
    op = r.describe(records) + (" (in the forward)" if r.phase is not phase else "")
    return SourceLine(r.site.file, r.site.line, code, op, phase.value)


@dataclass(frozen=True)
class _Split:
    """Where the two sides' values part: the first aligned op (or returned result) that differs."""

    phase: Phase
    what: str  # the op, or "the gradient w.r.t. x"
    where: str  # its position on both sides, for the note
    why: str  # the torch.testing-style message
    values: dict[str, str]
    differing: tuple[int, ...]  # which inputs differ beyond the tolerance
    unequal: tuple[int, ...]  # which inputs differ at all
    inputs: tuple[tuple[int | None, ...], tuple[int | None, ...]]  # producers of the unequal inputs, per side
    own: tuple[int | None, int | None]  # the op itself per side (None for a returned result)
    scalars: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())


def _split(expected: Recording, actual: Recording, alignment: Alignment, tol: Tolerance) -> _Split | None:
    a, b = expected.records, actual.records
    le, la = expected.label, actual.label
    for i, j in alignment.pairs:
        found = _first_output_diff(a[i], b[j], tol)
        if found is None:
            continue
        k, why = found
        ra, rb = a[i], b[j]
        pairs = list(enumerate(zip(ra.inputs, rb.inputs)))
        differing = tuple(n for n, (sa, sb) in pairs if summary_diff(sb, sa, tol) is not None)
        # Inputs within tolerance can still carry a small difference that this op
        # amplifies (scaling an atol-sized error, cancellation).  Made by ops only one
        # side runs, that difference is the better suspect than the amplifier.
        unequal = tuple(n for n, (sa, sb) in pairs if summary_diff(sb, sa, _EXACT) is not None)
        return _Split(
            ra.phase, ra.describe(a), f"op {i + 1} of {len(a)} in {le}, {j + 1} of {len(b)} in {la}", why,
            {le: _text(ra.outputs[k]), la: _text(rb.outputs[k])}, differing, unequal,
            (tuple(ra.producers[n] for n in unequal), tuple(rb.producers[n] for n in unequal)), (i, j),
            (ra.scalars, rb.scalars),
        )
    # Every aligned op agrees, yet the results differ: ops only one side runs made them
    # (a gradient summed from one more path, say).  Follow the results back instead.
    for ra, rb in zip(expected.results, actual.results):
        why = summary_diff(rb.summary, ra.summary, tol)
        if why is not None and ra.what == rb.what:
            return _Split(ra.phase, f"the {ra.what}", "the returned results", why, {le: _text(ra.summary), la: _text(rb.summary)},
                          (0,), (0,), ((ra.producer,), (rb.producer,)), (None, None))
    return None


def localise(expected: Recording, actual: Recording, tol: Tolerance) -> Localisation:
    """The first diverging op of two recordings (see the module docstring)."""
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
        return Localisation(None, f"nothing to localise: {le} and {la} agree on this case; {coverage}", cov)
    if cov < MIN_COVERAGE:
        return Localisation(None, f"not localised: the two executions share too little structure ({coverage}, "
                            f"below {MIN_COVERAGE:.0%})", cov)
    split = _split(expected, actual, alignment, tol)
    if split is None:
        return Localisation(None, f"not localised: the results differ but no aligned op or result shows it; {coverage}", cov)
    (cause_a, cause_b), (root_a, root_b) = _causes(a, b, alignment, split.inputs, split.own)
    only = [f"{label} {recs[root].describe(recs)}" for label, recs, root in ((le, a, root_a), (la, b, root_b)) if root is not None]
    made = f", made by ops only one side runs ({'; '.join(only)})" if only else ""
    if split.own[0] is None:
        how = f"it differs{made}"
    elif split.differing:
        how = f"input {', '.join(map(str, split.differing))} differs{made}"
    elif split.unequal:
        how = f"its inputs agree within tolerance, not exactly{made}"
    else:
        sa, sb = split.scalars
        how = "its inputs agree" + ("" if sa == sb else f" but its other arguments differ ({', '.join(sa)} vs {', '.join(sb)})")
    head = f"{split.phase.value}: values first differ at {split.what} ({split.where}); {how}"
    if split.own[0] is not None and split.unequal and not split.differing and root_a is None and root_b is None:
        head += _first_difference(expected, actual, alignment, split.own[0])
    lines = {le: _source_line(a[cause_a], a, split.phase) if cause_a is not None else None,
             la: _source_line(b[cause_b], b, split.phase) if cause_b is not None else None}
    missing = [label for label, where in lines.items() if where is None]
    if missing:
        return Localisation(None, f"{head}; no source line for {' and '.join(missing)}: the op was not issued from Python "
                            f"code that this torch can attribute; {split.why}; {coverage}", cov, split.values)
    return Localisation(lines, f"{head}; {split.why}; {coverage}", cov, split.values)


def _text(s: Summary | None) -> str:
    return "(no values)" if s is None else s.text()


def locate(expected: Implementation, actual: Implementation, spec: Spec, case: Case, tol: Tolerance) -> Localisation:
    """Record both sides on ``case`` and localise their first divergence."""
    return localise(record(expected, spec, case), record(actual, spec, case), tol)
