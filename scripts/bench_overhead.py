"""Harness overhead: losscmp's time per case / raw forward+backward time, same inputs.

For each workload, one run of ``audit()`` records the recipes of the cases it drew;
then the same cases are rebuilt and each implementation is called bare (fresh inputs,
forward, backward) on them.  Both are measured in this one process, one after the
other, so the ratio is not skewed by a different machine load or torch version.

    python scripts/bench_overhead.py [--examples 100] [--sinkhorn-examples 30] [--device cpu]

The audit's fixed costs (one probe call, a determinism re-run of the first case) are
included and amortised over the run, as a user pays them.  Harness and raw runs are
interleaved in rounds, so slow drift of a shared machine does not land on one side.
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

# The package re-exports the function audit(), which shadows the submodule's name.
audit_module = importlib.import_module("losscmp.audit")


def measure(name: str, refs: list[str], spec_text: str, examples: int, device: str, rounds: int = 2) -> tuple[str, int, float, float, float]:
    """Interleaved rounds (audit, then the same cases raw) so machine drift cancels out."""
    impls = [load_implementation(r) for r in refs]
    spec = parse_spec(spec_text)
    recipes: list = []
    in_calls = [0.0]
    original_build, original_call = audit_module.build_case, audit_module.call

    def recording_build_case(spec, recipe, **kw):
        recipes.append(recipe)
        return original_build(spec, recipe, **kw)

    def timed_call(fn, spec, case):
        start = time.perf_counter()
        try:
            return original_call(fn, spec, case)
        finally:
            in_calls[0] += time.perf_counter() - start

    audit_module.build_case, audit_module.call = recording_build_case, timed_call
    harness = raw = 0.0
    cases = 0
    try:
        audit(impls, spec, Settings(examples=2, minimize=False, save_dir=None, device=device))  # warm-up (JIT, caches)
        in_calls[0] = 0.0
        for r in range(rounds):
            recipes.clear()
            settings = Settings(examples=max(1, examples // rounds), seed=r, minimize=False, save_dir=None, device=device)
            start = time.perf_counter()
            result = audit(impls, spec, settings)
            harness += time.perf_counter() - start
            cases += result.cases_run
            for recipe in recipes[1:]:  # recipes[0] is the probe: a harness cost, not a case
                case = original_build(spec, recipe, dtype=settings.dtype, device=device)
                for impl in impls:
                    raw += timed_raw(impl.fn, spec, case)
    finally:
        audit_module.build_case, audit_module.call = original_build, original_call
    return name, cases, harness, raw, harness - in_calls[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--sinkhorn-examples", type=int, default=60)
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
    print("the rest of (ratio - 1) is the probe call and the determinism re-run of the first case, amortised over the run")


if __name__ == "__main__":
    main()
