"""Replaying a saved case: one path for ``losscmp replay``, the pytest plugin and the
inputs the supervisor or ``--isolate`` kept.

A case that crashed or hung when it was found replays *isolated*, with the timeout it
was found with, so replaying it can never kill or hang the replaying process (nor a
pytest session).  The implementations come from the file (after the trust check of
:func:`losscmp.repro.refuse_untrusted`) or, in the plugin and the command line's
replay-first phase (:func:`replay_saved`), from the run itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .compare import Verdict
from .engine import Evaluator, run_record
from .findings import Alone, Kind
from .load import Implementation, Ref
from .repro import Repro, ReproError, load_repro, load_repro_implementations, repro_base_dir, same_bits
from .spec import Spec
from .settings import Settings

# A saved timeout case without a recorded limit still must not hang the replay.
DEFAULT_REPLAY_TIMEOUT = 60.0


@dataclass(frozen=True, eq=False)
class ReplayResult:
    repro: Repro
    verdict: Verdict
    isolated: bool
    same_bits: bool | None  # today's outputs equal the recorded ones (None: not comparable)
    implementations: tuple[Implementation, ...]

    @property
    def diverges(self) -> bool:
        """Still a finding: a divergence, or sides that could not be compared."""
        return self.verdict.kind is not None or not self.verdict.compared


def needs_isolation(repro: Repro) -> bool:
    return repro.kind in (Kind.CRASH, Kind.TIMEOUT) or bool(repro.meta.get("isolate"))


def replay(repro: Repro, impls: Sequence[Implementation] | None = None, *, isolate: bool | None = None,
           pythons: Mapping[str, str] | None = None) -> ReplayResult:
    """Run the saved case again with today's code; ``impls`` default to the file's own.
    ``pythons``: {label: interpreter} for implementations that run under another one."""
    impls = tuple(impls) if impls is not None else tuple(load_repro_implementations(repro))
    isolated = needs_isolation(repro) if isolate is None else isolate
    timeout = repro.timeout
    if isolated and timeout is None and repro.kind is Kind.TIMEOUT:
        timeout = DEFAULT_REPLAY_TIMEOUT
    first = next(iter(repro.case.tensors.values()))
    dtype = next((t.dtype for t in repro.case.tensors.values() if t.is_floating_point()), torch.float32)
    rtol, atol = repro.tolerance
    settings = Settings.of(
        examples=1, seed=int(repro.meta.get("seed", 0)), device=str(first.device), dtype=dtype,
        rtol=rtol, atol=atol, isolate=isolated, timeout=timeout if isolated or pythons else None,
        pythons=tuple((pythons or {}).items()),
    )
    ev = Evaluator(impls, repro.spec, settings, record=run_record(settings, impls, replaying=repro.path))
    try:
        subject = repro.subject
        if isinstance(subject, Alone):
            return ReplayResult(repro, ev.judge(subject, repro.case), isolated, None, impls)
        outcomes = ev.outcomes(repro.case, subject.labels)
        verdict = ev.verdict(subject, outcomes)
        bits = same_bits(repro, outcomes) if not any(o.failed for o in outcomes.values()) else None
        return ReplayResult(repro, verdict, isolated, bits, impls)
    finally:
        ev.close()


@dataclass(frozen=True, eq=False)
class SavedReplay:
    """A saved case replayed before a run explores: what it was saved as, and today's verdict."""

    path: Path
    recorded: Kind
    result: ReplayResult


def same_reference(saved: Ref, base: Path, live: Ref) -> bool:
    """Does a saved reference (a file target relative to ``base``, the project root) name
    what the run's reference (a file target relative to the current folder) names?"""
    if saved.is_path != live.is_path:
        return False
    if not saved.is_path:
        return saved.source() == live.source()
    same_file = (base / saved.target).resolve() == Path(live.target).resolve()
    return same_file and (saved.attrs, saved.call) == (live.attrs, live.call)


def replay_saved(directory: Path | None, impls: Sequence[Implementation], spec: Spec, *, isolate: bool | None = None,
                 pythons: Mapping[str, str] | None = None, same_references: bool = False,
                 shown: Callable[[Path], str] = str) -> tuple[SavedReplay, ...]:
    """Replay every case saved in ``directory`` whose pair this run compares again, with the
    run's own implementations: the same spec, both labels present and, with
    ``same_references``, the same references (the command line: a label alone may name
    another loss; the plugin matches callables, which have no reference, by label).
    A corrupt file is an error, never a case skipped in silence."""
    if directory is None or not directory.is_dir():
        return ()
    by_label = {i.label: i for i in impls}
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            repro = load_repro(path)
        except ReproError as e:
            raise ReproError(f"saved case {shown(path)} cannot be replayed: {e}") from None
        if repro.spec.text() != spec.text() or not set(repro.pair) <= set(by_label):
            continue  # saved for another pairing or spec
        if same_references and any(r.label in by_label and not same_reference(r, repro_base_dir(repro), by_label[r.label].ref)
                                   for r in repro.refs):
            continue
        result = replay(repro, [by_label[la] for la in dict.fromkeys(repro.pair)], isolate=isolate, pythons=pythons)
        out.append(SavedReplay(path, repro.kind, result))
    return tuple(out)
