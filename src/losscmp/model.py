"""The records that flow between the stages of a run, and their closed vocabularies.

Everything else in losscmp stands on this module; it imports nothing from losscmp but
:mod:`losscmp.errors` (the annotations below name higher modules for type checkers only).
Values here are data: frozen dataclasses and enums, no terminal, JSON or HTML rendering.

* :class:`Status` — how one call of one implementation ended; :class:`Kind` — what a
  divergence is, most severe first (when a case shows several, the first is reported);
  each carries its description and whether it is a failed call.
* A finding is about a :class:`Pair` (two implementations disagree; ``expected`` is the
  reference side) or one implementation :class:`Alone` (it mutates its inputs, or
  disagrees with itself).  Both enums subclass ``str`` so their values are what JSON and
  repro files hold.
* :class:`Recipe` -> :class:`Case` (generation), :class:`Outcome` (one call),
  :class:`Tolerance`, :class:`TensorDiff`, :class:`Mismatch` and :class:`Verdict` (comparison),
  :class:`Divergence` (a finding and what the stages added) and :class:`AuditResult`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

if TYPE_CHECKING:  # annotations only: these modules stand above the model
    from .explain.explanation import Explanation
    from .load import Implementation, Ref
    from .minimize import Minimized
    from .settings import Settings
    from .spec import Spec


class Status(str, Enum):
    OK = "ok"
    EXCEPTION = "exception"
    CRASH = "crash"
    TIMEOUT = "timeout"
    NON_TENSOR = "non_tensor"
    NON_SCALAR = "non_scalar"

    def __str__(self) -> str:
        return self.value

    @property
    def failed(self) -> bool:
        return self is not Status.OK

    @property
    def died(self) -> bool:
        """The call never returned: nothing it did can be trusted or re-run cheaply."""
        return self in (Status.CRASH, Status.TIMEOUT)


class Kind(str, Enum):
    """Kinds of finding, most severe first."""

    CRASH = "crash", "the process died (segfault, abort, exit)"
    TIMEOUT = "timeout", "did not return within the time limit"
    EXCEPTION = "exception", "raised where the other returned"
    NON_TENSOR = "non_tensor", "returned something that is not a tensor"
    NON_SCALAR = "non_scalar", "returned a non-scalar where a scalar loss is expected"
    BOTH_FAILED = "both_failed", "both sides failed in different ways: nothing could be compared"
    SHAPE = "shape", "value or gradient shapes differ"
    DTYPE = "dtype", "value dtypes differ"
    NONFINITE = "nonfinite", "NaN/inf the other side does not match"
    VALUE = "value", "loss values differ beyond tolerance"
    GRADIENT = "gradient", "gradients differ beyond tolerance"
    MUTATION = "mutation", "the implementation modified its inputs in place"
    NONDETERMINISM = "nondeterminism", "the same implementation answered differently on the same input"

    description: str  # set per member by __new__; an annotation only, so not a member

    # ``description`` has a default only for the type checker: ``Kind("value")`` is the
    # enum's lookup by value, which never reaches ``__new__`` once the class is built.
    def __new__(cls, value: str, description: str = "") -> Kind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member

    def __str__(self) -> str:
        return self.value

    @property
    def severity(self) -> int:
        """0 is the most severe."""
        return list(Kind).index(self)

    @property
    def failed_call(self) -> bool:
        return self.value in Status._value2member_map_

    @property
    def own_category(self) -> bool:
        """The finding is its own explanation (a failed call, both sides failing, input
        mutation, nondeterminism): no float64 oracle applies, and the kind is its category."""
        return self.failed_call or self in (Kind.BOTH_FAILED, Kind.MUTATION, Kind.NONDETERMINISM)

    @classmethod
    def of_status(cls, status: Status) -> Kind:
        return cls(status.value)


@dataclass(frozen=True)
class Pair:
    """Two implementations compared; ``expected`` is the reference side of the tolerance."""

    expected: str
    actual: str

    @property
    def labels(self) -> tuple[str, ...]:
        return (self.expected, self.actual)

    def __str__(self) -> str:
        return f"{self.expected} vs {self.actual}"


@dataclass(frozen=True)
class Alone:
    """One implementation judged on its own."""

    label: str

    @property
    def labels(self) -> tuple[str, ...]:
        return (self.label,)

    def __str__(self) -> str:
        return self.label


Subject = Union[Pair, Alone]


def subject_from_labels(labels: list[str] | tuple[str, ...]) -> Subject:
    """The subject saved as a two-label list in JSON: the same label twice means alone."""
    a, b = labels
    return Alone(a) if a == b else Pair(a, b)


def subject_labels_json(subject: Subject) -> list[str]:
    """The ``pair`` field of the JSON report and repro files: [expected, actual], or [label, label]."""
    return [subject.label, subject.label] if isinstance(subject, Alone) else list(subject.labels)


# --- generation ----------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """Everything needed to rebuild a case bit for bit."""

    sizes: tuple[tuple[str, int], ...]
    regime: str = "standard"
    magnitude: float = 1.0
    offset: float = 0.0
    layout: str = "contiguous"
    seed: int = 0
    planted: tuple[tuple[str, float, float], ...] = ()  # (arg, position in [0,1), value)
    nonfinite: bool = False

    def describe(self) -> str:
        parts = [f"regime {self.regime}", f"magnitude {self.magnitude:.3g}"]
        if self.offset:
            parts.append(f"offset {self.offset:.3g}")
        if self.layout != "contiguous":
            parts.append(f"{self.layout} layout")
        if self.planted:
            parts.append(f"{len(self.planted)} planted value(s)")
        if self.nonfinite:
            parts.append("NaN/inf planted")
        return ", ".join(parts)


@dataclass(frozen=True, eq=False)
class Case:
    """Concrete inputs: one tensor per spec argument, plus keyword parameters."""

    tensors: dict[str, torch.Tensor]
    sizes: dict[str, int]
    params: dict[str, Any] = field(default_factory=dict)
    recipe: Recipe | None = None
    note: str = ""  # what the minimiser did to it, if anything

    def describe(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        what = self.recipe.describe() if self.recipe else "hand-made"
        return f"{sizes} ({what}{'; ' + self.note if self.note else ''})"

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


# --- one call ------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Outcome:
    """What one call produced."""

    status: Status = Status.OK
    value: torch.Tensor | None = None
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    mutated: tuple[str, ...] = ()
    output: str = ""  # what it printed and warned, captured
    transport: str = "in-process"  # how the inputs reached it: see isolate.Transport

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", Status(self.status))

    @property
    def failed(self) -> bool:
        return self.status.failed


# --- comparison ----------------------------------------------------------------------

# Same defaults as torch.testing.assert_close.
DEFAULT_TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.complex64: (1.3e-6, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}

@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    @classmethod
    def for_dtype(cls, dtype: torch.dtype, rtol: float | None = None, atol: float | None = None) -> Tolerance:
        d_rtol, d_atol = DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))
        return cls(d_rtol if rtol is None else rtol, d_atol if atol is None else atol)


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor (the loss value, or the gradient w.r.t. one input) differs."""

    what: str
    score: float
    mismatched: int
    total: int
    max_abs: float
    max_abs_index: tuple[int, ...]
    max_rel: float
    max_rel_index: tuple[int, ...]
    allowed_abs: float  # atol + rtol*|expected| at the max-abs index
    actual: float  # the two sides at the worst-scoring index
    expected: float
    rel_l2: float
    cosine: float
    nonfinite_mismatch: int = 0


@dataclass(frozen=True)
class Mismatch:
    """A tensor finding as data, in the manner of torch.testing's ``ErrorMeta``: the
    component shown (``shown.what``: the value, or the gradient w.r.t. one input), how
    many of its elements mismatch, the greatest absolute and relative differences over
    those and where, what was allowed there, and both sides' numbers at that index.
    ``sides`` names (expected, actual) as the words do; ``others`` are the remaining
    components, said in one clause each.  Terminal, JSON and any later format render this
    record (``display.verdict_text``, ``report.mismatch_json``), never re-parse words."""

    sides: tuple[str, str]
    shown: TensorDiff
    others: tuple[TensorDiff, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """The comparison of two outcomes (or two calls of one implementation) on one case.

    ``score`` belongs to the quantity the detail shows (the value for a value finding);
    ``max_score`` is the worst over every component, which is what the search climbs.
    ``compared`` is False when both sides failed the same way: nothing was compared,
    which is reported, and never counted as agreement.

    ``mismatch`` is the record of a value, gradient or NaN/inf finding; ``detail`` the
    words of a verdict that has no structure of its own (a side's error message, the two
    shapes).  For a mismatch, ``detail`` holds the words rendered from it (for the readers
    that quote a verdict inside their own sentences); the report renders the record.
    """

    subject: Subject
    kind: Kind | None  # None: they agree (or, with compared=False, nothing was compared)
    score: float
    detail: str
    diffs: tuple[TensorDiff, ...] = ()
    compared: bool = True
    mismatch: Mismatch | None = None

    @property
    def diverges(self) -> bool:
        return self.kind is not None

    @property
    def agrees(self) -> bool:
        return self.kind is None and self.compared

    @property
    def max_score(self) -> float:
        return max([self.score] + [d.score for d in self.diffs])


# --- minimisation -------------------------------------------------------------------

class StepKind(str, Enum):
    """What one step of the minimiser did to the example."""

    LIFT_DENORMALS = "lift_denormals"  # denormal values of ``args[0]`` lifted to ``after``; inputs scaled by ``scale``, or ``forms`` (the others alone)
    SHRINK = "shrink"  # ``dim`` from ``before`` to ``after`` elements
    SIMPLIFY_VALUES = "simplify_values"  # each argument of ``forms`` replaced by that simpler form
    SIMPLIFY_ELEMENTS = "simplify_elements"  # elements of ``args`` made simpler numbers, one at a time
    BISECT_SCALE = "bisect_scale"  # the input scale where agreement turns: ``threshold``
    TOWARD_THRESHOLD = "toward_threshold"  # the largest |element| of ``args`` from ``before`` to ``after``, just past the threshold
    REMEASURE = "remeasure"  # the threshold again on the final example (None: it diverges at every scale)


@dataclass(frozen=True)
class Step:
    """One step of the minimiser, as data; ``display.step_text`` words it."""

    kind: StepKind
    evaluations: int  # what the step cost, in evaluations (implementation calls per side)
    dim: str | None = None
    before: float | None = None
    after: float | None = None
    args: tuple[str, ...] = ()
    forms: tuple[tuple[str, str], ...] = ()  # (argument, simpler form)
    scale: float = 1.0
    threshold: float | None = None


# --- the run, as a crash repro records it ----------------------------------------------

@dataclass(frozen=True)
class RunRecord:
    """What a kept crash or timeout repro records besides the case itself: the run the
    isolated runners, and the supervisor (:func:`losscmp.breadcrumbs.describe_run`), know."""

    refs: tuple[Ref, ...] = ()  # every implementation of the run: the partner is named from these
    reference: str | None = None
    tolerance: tuple[float, float] = (1.3e-6, 1e-5)
    seed: int = 0
    keep_dir: Path | None = None  # where kept repros go; None: the runner's temporary folder
    replaying: Path | None = None  # a replay's own repro: it already is the input, nothing to keep
    pairs: tuple[Pair, ...] = ()  # the pairs the run compares (engine.run_record computes them, once)
    run_id: str = ""  # this run's, written into each kept repro: the run removes those no finding names

    def partner(self, label: str) -> str:
        """Who ``label`` is compared with: the reference, else the first other implementation."""
        if self.reference and self.reference != label and any(r.label == self.reference for r in self.refs):
            return self.reference
        return next((r.label for r in self.refs if r.label != label), label)


# --- findings and the audit's result -------------------------------------------------

@dataclass(frozen=True, eq=False)
class Divergence:
    """One kind of disagreement for one subject, and one of its causes (a group)."""

    subject: Subject
    kind: Kind
    verdict: Verdict  # on the worst case
    case: Case  # the worst case: highest score, then fewest elements
    count: int  # diverging cases in this group
    regimes: dict[str, int] = field(default_factory=dict)  # diverging cases per regime
    representative: Case | None = None  # the mildest-regime case
    representative_verdict: Verdict | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # what each side printed or warned on the worst case
    minimized: Minimized | None = None
    explanation: Explanation | None = None
    repro: str | None = None
    repro_error: str | None = None  # why the repro could not be saved
    group_key: tuple = ()

    @property
    def score(self) -> float:
        return self.verdict.score


class RunPhase(str, Enum):
    """How far a run got when its result was taken (the supervisor counts a call that died
    during the search as one more case, one that died later as not)."""

    EXPLORE = "explore"
    STAGES = "stages"
    DONE = "done"


@dataclass(frozen=True, eq=False)
class AuditResult:
    implementations: tuple[Implementation, ...]
    spec: Spec
    settings: Settings
    cases_run: int
    divergences: tuple[Divergence, ...]
    seconds: float  # everything the caller waited for: search, minimisation, explanation, saving
    pairs: tuple[Pair, ...] = ()  # the pairs compared
    subject_cases: dict[Subject, int] = field(default_factory=dict)  # diverging cases per subject
    tally: dict[str, int] = field(default_factory=dict)  # every case: "agree", "not compared", or its most severe kind
    not_compared: dict[Subject, tuple[int, str]] = field(default_factory=dict)  # both sides failed the same way: count, why
    evaluations: int = 0
    stage_errors: tuple[str, ...] = ()  # a stage that raised: its findings are kept as they were before it
    interrupted: str | None = None  # "SIGTERM" / "SIGINT": the run was stopped; what it found until then
    phase: RunPhase = RunPhase.DONE  # how far the run got (a snapshot, an interrupted run)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(i.label for i in self.implementations)

    @property
    def agree(self) -> bool:
        return not self.divergences
