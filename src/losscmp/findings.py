"""The closed vocabularies of a finding: what kind it is, how a call ended, whom it is about.

* :class:`Status` — how one call of one implementation ended.
* :class:`Kind` — what a divergence is, most severe first (when a case shows several,
  the first is reported); each carries its description and whether it is a failed call.
* A finding is about a :class:`Pair` (two implementations disagree; ``expected`` is the
  reference side) or one implementation :class:`Alone` (it mutates its inputs, or
  disagrees with itself).

Both enums subclass ``str`` so their values are what JSON and repro files hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Union


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

    description: str  # set per member by __new__; an annotation only, so not a member

    CRASH = "crash", "the process died (segfault, abort, exit)"
    TIMEOUT = "timeout", "did not return within the time limit"
    EXCEPTION = "exception", "raised where the other returned"
    NON_TENSOR = "non_tensor", "returned something that is not a tensor"
    NON_SCALAR = "non_scalar", "returned a non-scalar where a scalar loss is expected"
    BOTH_FAILED = "both_failed", "both sides failed in different ways: nothing could be compared"
    SHAPE = "shape", "value or gradient shapes differ"
    DTYPE = "dtype", "value dtypes differ"
    NONFINITE = "nonfinite", "NaN/inf on one side only"
    VALUE = "value", "loss values differ beyond tolerance"
    GRADIENT = "gradient", "gradients differ beyond tolerance"
    MUTATION = "mutation", "the implementation modified its inputs in place"
    NONDETERMINISM = "nondeterminism", "the same implementation answered differently on the same input"

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
