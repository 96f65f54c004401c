"""Harness overhead: losscmp's time per case / raw forward+backward time, same inputs.

For each workload, one run of ``audit()`` records the recipes of the cases it drew;
then the same cases are rebuilt and each implementation is called bare (fresh inputs,
forward, backward) on them.  Both are measured in this one process, one after the
other, so the ratio is not skewed by a different machine load or torch version.

    python scripts/bench_overhead.py [--examples 100] [--sinkhorn-examples 30] [--device cpu]

The audit's fixed costs (one probe call, a determinism re-run of the first case) are
included and amortised over the run, as a user pays them.
"""
from __future__ import annotations

import argparse
import importlib
import time

import torch

from losscmp.audit import Settings, audit
from losscmp.generate import build_case
from losscmp.load import load_implementation
from losscmp.run import timed_raw
from losscmp.spec import parse_spec

# The package re-exports the function audit(), which shadows the submodule's name.
audit_module = importlib.import_module("losscmp.audit")


def measure(name: str, refs: list[str], spec_text: str, examples: int, device: str) -> tuple[str, int, float, float]:
    impls = [load_implementation(r) for r in refs]
    spec = parse_spec(spec_text)
    settings = Settings(examples=examples, minimize=False, save_dir=None, device=device)
    recipes = []
    original = audit_module.build_case

    def recording_build_case(spec, recipe, **kw):
        recipes.append(recipe)
        return original(spec, recipe, **kw)

    audit_module.build_case = recording_build_case
    try:
        audit(impls, spec, Settings(examples=2, minimize=False, save_dir=None, device=device))  # warm-up (JIT, caches)
        recipes.clear()
        start = time.perf_counter()
        result = audit(impls, spec, settings)
        harness = time.perf_counter() - start
    finally:
        audit_module.build_case = original
    raw = 0.0
    for recipe in recipes:
        case = build_case(spec, recipe, dtype=settings.dtype, device=device)
        for impl in impls:
            raw += timed_raw(impl.fn, spec, case)
    return name, result.cases_run, harness, raw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--sinkhorn-examples", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    rows = [
        measure("tiny loss (mse, B<=64)", ["torch.nn.functional:mse_loss", "fixtures/regression.py:mean_square"],
                "input: B real grad; target: B real; B=1..64", args.examples, args.device),
        measure("geomloss Sinkhorn N=1,000", ["fixtures/sinkhorn_torch.py:official", "fixtures/sinkhorn_torch.py:handwritten"],
                "x: N D real grad; y: M D real grad; N=1000; M=1000; D=3", args.sinkhorn_examples, args.device),
    ]
    print(f"device {args.device}, torch {torch.__version__}")
    print(f"{'workload':<28} {'cases':>5} {'harness/case':>13} {'raw/case':>10} {'ratio':>7}")
    for name, cases, harness, raw in rows:
        print(f"{name:<28} {cases:>5} {1e3 * harness / cases:>11.2f}ms {1e3 * raw / cases:>8.2f}ms {harness / raw:>7.2f}")
    print("ratio = harness time per case / raw forward+backward time of both implementations on the same cases (target <= 1.10 on GPU-sized work)")


if __name__ == "__main__":
    main()
