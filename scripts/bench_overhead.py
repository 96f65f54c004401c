"""Harness overhead: losscmp's time per case / raw forward+backward time, same inputs.

For each workload one ``audit()`` runs; beside every call it makes, the same
implementation is also called bare on the same case (fresh inputs, forward, backward).

    python scripts/bench_overhead.py [--examples 100] [--sinkhorn-examples 30] [--device cpu]

The audit's fixed cost (a determinism re-run of the first case) is included and
amortised over the run, as a user pays it.  Each harness call is paired with a raw call
on the same case, timed right after it, so drift of a shared machine cancels out.
"""
from __future__ import annotations

import argparse
import importlib
import time

import torch

from losscmp.audit import Settings, audit
from losscmp.load import load_implementation
from losscmp.run import timed_raw
from losscmp.spec import parse_spec

# Every in-process call goes through the engine's runner, which calls run.call.
engine_module = importlib.import_module("losscmp.engine")


def measure(name: str, refs: list[str], spec_text: str, examples: int, device: str) -> tuple[str, int, float, float, float]:
    """Harness time per case against a raw call timed right beside each harness call.

    Every call the audit makes is followed, outside the harness clock, by a bare
    forward+backward of the same implementation on the same case, so slow drift of a
    shared machine hits both sides alike.  The raw time of a *case* is the raw time of
    one call of each implementation; the harness pays, in addition, one determinism
    re-run per implementation and whatever it does between calls.
    """
    impls = [load_implementation(r) for r in refs]
    spec = parse_spec(spec_text)
    stats = {"in_calls": 0.0, "raw": 0.0, "raw_wall": 0.0, "calls": 0}
    original_call = engine_module.call

    def paired_call(fn, spec, case):
        start = time.perf_counter()
        outcome = original_call(fn, spec, case)
        stats["in_calls"] += time.perf_counter() - start
        start = time.perf_counter()
        stats["raw"] += timed_raw(fn, spec, case)
        stats["raw_wall"] += time.perf_counter() - start
        stats["calls"] += 1
        return outcome

    audit(impls, spec, Settings.of(examples=2, minimize=False, save_dir=None, device=device))  # warm-up (JIT, caches)
    engine_module.call = paired_call
    try:
        start = time.perf_counter()
        result = audit(impls, spec, Settings.of(examples=examples, minimize=False, save_dir=None, device=device))
        harness = time.perf_counter() - start - stats["raw_wall"]
    finally:
        engine_module.call = original_call
    raw_per_call = stats["raw"] / stats["calls"]
    raw = raw_per_call * len(impls) * result.cases_run
    return name, result.cases_run, harness, raw, harness - stats["in_calls"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--sinkhorn-examples", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    rows = [
        measure("tiny loss (mse, B<=64)", ["torch.nn.functional:mse_loss", "fixtures/regression.py:mean_square"],
                "input: B real grad; target: B real; B=1..64", args.examples, args.device),
        measure("geomloss Sinkhorn N=1,000", ["fixtures/sinkhorn_torch.py:official", "fixtures/sinkhorn_torch.py:handwritten"],
                "x: N D real grad; y: M D real grad; N=1000; M=1000; D=3", args.sinkhorn_examples, args.device),
    ]
    print(f"device {args.device}, torch {torch.__version__}")
    print(f"{'workload':<28} {'cases':>5} {'harness/case':>13} {'raw/case':>10} {'ratio':>7} {'outside calls':>14}")
    for name, cases, harness, raw, outside in rows:
        print(f"{name:<28} {cases:>5} {1e3 * harness / cases:>11.2f}ms {1e3 * raw / cases:>8.2f}ms {harness / raw:>7.2f} {100 * outside / raw:>13.1f}%")
    print("ratio = harness time per case / raw forward+backward time of both implementations on the same cases (target <= 1.10 on GPU-sized work)")
    print("outside calls = time the harness spends outside implementation calls (generation, cloning checks, comparison), as a share of raw;")
    print("the rest of (ratio - 1) is per-call work (input copies, mutation check) and the first case's determinism re-run")


if __name__ == "__main__":
    main()
