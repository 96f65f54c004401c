"""Explaining a divergence: which side is wrong, why, and whether it matters for training.

In: the two :class:`~losscmp.load.Implementation`s of a pair (expected, actual), the
spec, one case (the minimised representative), the divergence kind, the tolerance,
and the :class:`Observation`s recorded on every compared case of the pair.
Out: an :class:`Explanation` — one sentence, the evidence lines behind it, its JSON
form and a grouping key (:meth:`Explanation.signature`).

One module per analysis, each a pure function usable on its own, a record per result:

* :mod:`.oracle` — :func:`oracle`, the float64 oracle (``semantic`` / ``numerical`` /
  ``unknown``, the unstable side), decided over the finding's cases
  (:func:`~.oracle.over_cases`); :func:`nonfinite_origin`, the op that makes a NaN/inf
  float64 keeps; :func:`nonfinite_onset`, where a side turns non-finite.
* :mod:`.consistency` — :func:`self_consistency`, each side's autograd gradient against
  float64 finite differences of its own value.
* :mod:`.relation` — :func:`observe` (per compared case, during the search) and
  :func:`relation` (over all of them): equal / near / offset / factor values, equal /
  parallel gradients.
* :mod:`.impact` — :func:`impact`, a few descent steps under each side from one start.
* :mod:`.signatures` — :func:`signatures`, numbers that fingerprint a known failure.

Around them: :mod:`.float64` (running a side in float64, shared with :mod:`losscmp.trace`),
:mod:`.stage` (:func:`explain`: the analyses in order under a :class:`Budget`),
:mod:`.explanation` (the :class:`Explanation` record), :mod:`.render` (its sentence,
evidence lines and JSON) and :mod:`.words` (shared formatters).  A new analysis is one
module, one field of :class:`Explanation`, one call in :func:`explain` and its lines in
:mod:`.render`.  What depends on a value domain lives in :mod:`losscmp.domains`.
"""
from __future__ import annotations

from .consistency import FD_RTOL, SelfConsistency, self_consistency
from .explanation import Explanation
from .float64 import call_runner, drift, float64_agrees, float64_case, in_float64, rounded_to
from .impact import IMPACT_STEPS, Impact, impact
from .oracle import (
    OWN_CATEGORY,
    Categorised,
    Category,
    Cause,
    NonFiniteOrigin,
    Oracle,
    components,
    focused,
    nonfinite_onset,
    nonfinite_origin,
    oracle,
)
from .relation import Observation, Relation, observe, relation
from .signatures import SIGNATURES, KnownValue, ops_run, real_total, signatures
from .stage import Budget, explain

__all__ = [
    "FD_RTOL", "IMPACT_STEPS", "OWN_CATEGORY", "SIGNATURES",
    "Budget", "Categorised", "Category", "Cause", "Explanation", "Impact", "KnownValue", "NonFiniteOrigin",
    "Observation", "Oracle", "Relation", "SelfConsistency",
    "call_runner", "components", "drift", "explain", "float64_agrees", "float64_case", "focused", "impact",
    "in_float64", "nonfinite_onset", "nonfinite_origin", "observe", "ops_run", "oracle", "real_total",
    "relation", "rounded_to", "self_consistency", "signatures",
]
