"""The closed vocabularies of a finding: what kind it is, how a call ended, whom it is about.

* :class:`Status` — how one call of one implementation ended.
* :class:`Kind` — what a divergence is, most severe first (when a case shows several,
  the first is reported); each carries its description and whether it is a failed call.
* A finding is about a :class:`Pair` (two implementations disagree; ``expected`` is the
  reference side) or one implementation :class:`Alone` (it mutates its inputs, or
  disagrees with itself).

Both enums subclass ``str`` so their values are what JSON and repro files hold.
"""
# The vocabularies now live in :mod:`losscmp.model` with the other records; this module
# keeps the old import path working.
from .model import Alone, Kind, Pair, Status, Subject, subject_from_labels, subject_labels_json  # noqa: F401  re-exported: moved to model

__all__ = ["Alone", "Kind", "Pair", "Status", "Subject", "subject_from_labels", "subject_labels_json"]
