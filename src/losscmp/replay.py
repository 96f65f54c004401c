"""Replaying a saved case: one path for ``losscmp replay``, the pytest plugin and the
inputs the supervisor or ``--isolate`` kept.

A case that crashed or hung when it was found replays *isolated*, with the timeout it
was found with, so replaying it can never kill or hang the replaying process (nor a
pytest session).  The implementations come from the file (after the trust check of
:func:`losscmp.repro.refuse_untrusted`) or, in the plugin, from the test itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Mapping, Sequence

import torch

from .compare import Verdict
from .engine import Evaluator, make_runner
from .findings import Alone, Kind
from .load import Implementation
from .interpreter import remote_implementation
from .load import load_implementation
from .repro import Repro, ReproError, refuse_untrusted, same_bits
from .settings import Settings

# A saved timeout case without a recorded limit still must not hang the replay.
DEFAULT_REPLAY_TIMEOUT = 60.0


def load_repro_implementations(repro: Repro, remote: Collection[str] = ()):
    """The implementations of a saved case's subject, after the trust check, with the safe factory policy.
    Labels in ``remote`` run under another interpreter: never imported here."""
    base = repro.meta.get("base_dir")
    base_dir = Path(base) if isinstance(base, str) and Path(base).is_dir() else Path.cwd()
    by_label = {r.label: r for r in repro.refs}
    wanted = [by_label[label] for label in dict.fromkeys(repro.pair)]
    for ref in wanted:
        if not ref.target:
            raise ReproError(f"{ref.label} ({ref.text}) lives only inside its test: re-run that test to replay this case")
    refuse_untrusted(wanted)
    return [remote_implementation(ref) if ref.label in remote else load_implementation(ref, base_dir=base_dir, factories="modules")
            for ref in wanted]


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
    ev = Evaluator(impls, repro.spec, settings, make_runner(settings, impls, replaying=repro.path))
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
