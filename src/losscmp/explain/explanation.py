"""The record of one explained divergence: what each analysis found, what was skipped, what it cost.

Filled in by :func:`losscmp.explain.stage.explain`; put into words and JSON by
:mod:`losscmp.explain.render`; :meth:`Explanation.signature` is the key that groups
findings into distinct causes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import render
from .consistency import SelfConsistency
from .impact import Impact
from .oracle import CaseCategory, Categorised, NonFiniteOrigin
from .relation import Relation
from .render import location_json


@dataclass(frozen=True, eq=False)
class Explanation:
    """Why one divergence of ``pair`` (expected, actual) of ``kind`` happened: the float64
    oracle's category and reason, each analysis' record (None or empty when it was not
    run; ``skipped`` says why), and the calls and seconds it cost."""

    pair: tuple[str, str]
    kind: str
    category: Categorised  # the oracle's Category, or the finding's own Kind
    reason: str = ""
    unstable_side: str | None = None
    drift: dict[str, float] = field(default_factory=dict)
    self_consistency: dict[str, SelfConsistency] = field(default_factory=dict)
    relation: Relation | None = None
    location: Any = None  # a trace.Localisation, or None when not traced
    impact: Impact | None = None
    notes: tuple[str, ...] = ()  # known signatures
    skipped: tuple[str, ...] = ()  # analyses left out, and why
    evaluations: int = 0  # implementation calls spent explaining
    seconds: float = 0.0
    costs: dict[str, tuple[int, float]] = field(default_factory=dict)  # per analysis: (calls, seconds)
    origin: NonFiniteOrigin | None = None  # what makes a non-finite value float64 keeps
    rounded: tuple[str, ...] = ()  # sides whose non-finite working result is the correctly rounded float64 one
    onset: float | None = None  # largest |element| of the scaled arguments from which the unstable side turns non-finite
    budget_note: str = ""  # the time budget, when the cost of a call raised it
    checked: int = 0  # the finding's cases the category was decided over
    mixed: tuple[CaseCategory, ...] = ()  # cases of the finding with the other cause (two causes in one finding)
    float64_differs: bool = False  # numerical NaN/inf, but the finite float64 results still differ (another finding's cause)

    def sentence(self) -> str:
        """The one sentence a finding opens with."""
        return render.sentence(self)

    def evidence(self) -> list[str]:
        """The lines behind the sentence (``-v``)."""
        return render.evidence(self)

    def to_json(self) -> dict[str, Any]:
        return render.to_json(self)

    def signature(self) -> tuple:
        """Grouping key for distinct causes: kind + category + location + relation."""
        loc = location_json(self.location)[0]
        where = tuple(sorted((la, s.get("file"), s.get("line")) for la, s in loc.items() if isinstance(s, dict))) if isinstance(loc, dict) else None
        r = self.relation
        return (self.kind, self.category.value, where, (r.value, r.gradient) if r else None)
