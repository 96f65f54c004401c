"""Cases per second of one whole audit: one process, ``--jobs 2``, ``--ray local`` with 2 actors.

    python scripts/bench_scale.py [--heavy-examples 16,64] [--tiny-examples 200] [--rounds 3] [--no-ray]

Two workloads, each an audit with minimisation and explanation off (the search only):

* heavy: the plain-torch Sinkhorn of ``fixtures/sinkhorn_torch.py`` against GeomLoss'
  ``SamplesLoss("sinkhorn")``, every case N = M = 1,000 points in 3-D;
* tiny: ``torch.nn.functional.mse_loss`` against ``fixtures/misbehaving.py:mse``, B <= 64.

Each row: wall seconds and cases per second per mode, the speed-ups over one process,
and the overhead of Ray against ``--jobs`` per case ((wall_ray - wall_jobs) / cases), which
includes what each run pays once (starting the actors, importing the implementations in
them).  With two sizes for a workload (``--heavy-examples 16,64``) a last line gives the
marginal cost of a case, the difference between the two sizes divided by the difference in
cases: Ray against ``--jobs`` there is the per-case overhead without the start-up.  With
``--rounds R`` each size runs R times, the modes interleaved, and the medians are shown.
The local Ray instance is started once before the timings (``ray.init(num_cpus=2)``) and
its start is printed on its own: a run joining a cluster does not pay it.  Each mode's
wall time includes starting its workers (forks for ``--jobs``, actors for Ray), as a user's
run does.  One intra-op thread per worker in every mode (Ray gives an actor with one CPU
one thread), so the ratios compare one core with two.  Bounded by the cores actually free:
on a shared machine, read the ratios, not the absolute numbers.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

from losscmp import audit
from losscmp.load import load_implementation
from losscmp.settings import Settings
from losscmp.spec import parse_spec

REPO = Path(__file__).resolve().parent.parent


def workloads(heavy: tuple[int, ...], tiny: tuple[int, ...]):
    yield ("sinkhorn N = 1,000", heavy,
           [f"{REPO}/fixtures/sinkhorn_torch.py:handwritten", f"{REPO}/fixtures/sinkhorn_torch.py:official"],
           parse_spec("x: N D real grad; y: M D real; N=1000; M=1000; D=3"))
    yield ("mse B <= 64", tiny,
           ["torch.nn.functional:mse_loss", f"{REPO}/fixtures/misbehaving.py:mse"],
           parse_spec("input: B real grad; target: B real; B=1..64"))


def sizes(text: str) -> tuple[int, ...]:
    counts = tuple(int(n) for n in text.split(","))
    if len(counts) > 2 or any(n < 1 for n in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError("one case count, or two different ones: 16,64")
    return counts


def timed(impls, spec, examples: int, **execution) -> tuple[float, dict]:
    settings = Settings.of(examples=examples, minimize=False, explain=False, **execution)
    start = time.perf_counter()
    result = audit(impls, spec, settings)
    wall = time.perf_counter() - start
    assert result.cases_run == examples and sum(result.tally.values()) == examples, result.tally
    return wall, dict(result.tally)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heavy-examples", type=sizes, default=(16,), help="cases, or two sizes for the marginal cost: 16,64")
    p.add_argument("--tiny-examples", type=sizes, default=(200,))
    p.add_argument("--rounds", type=int, default=1, help="run each size this many times, modes interleaved; medians shown")
    p.add_argument("--no-ray", action="store_true", help="only one process and --jobs 2")
    args = p.parse_args()
    use_ray = not args.no_ray and importlib.util.find_spec("ray") is not None
    if use_ray:
        import ray

        start = time.perf_counter()
        from losscmp.cluster import LOCAL_INIT

        ray.init(num_cpus=2, **LOCAL_INIT)
        print(f"local Ray instance started in {time.perf_counter() - start:.1f} s (not counted below)")
    elif not args.no_ray:
        print('Ray is not installed (pip install "losscmp[ray]"): only one process and --jobs 2')
    torch.set_num_threads(1)
    print(f"{os.cpu_count()} cores on this machine, load average {os.getloadavg()[0]:.1f} at start\n")
    header = f"{'workload':<20} {'cases':>5} {'1 process':>16} {'--jobs 2':>16} {'--ray local x2':>16} {'jobs/1':>7} {'ray/1':>7} {'ray-jobs per case':>18}"
    print(header)
    try:
        for name, counts, refs, spec in workloads(args.heavy_examples, args.tiny_examples):
            impls = [load_implementation(r) for r in refs]
            walls = {}
            for examples in counts:
                rounds: dict[str, list[float]] = {}
                for _ in range(args.rounds):  # the modes interleaved, so that a busy minute hits each of them
                    rounds.setdefault("one", []).append(timed(impls, spec, examples)[0])
                    rounds.setdefault("jobs", []).append(timed(impls, spec, examples, jobs=2)[0])
                    if use_ray:
                        rounds.setdefault("ray", []).append(timed(impls, spec, examples, jobs=2, ray="local")[0])
                wall = walls[examples] = {k: statistics.median(v) for k, v in rounds.items()}
                cell = {k: f"{w:6.1f}s {examples / w:6.2f}/s" for k, w in wall.items()}
                ray_cell = cell.get("ray", "-")
                ray_ratio = f"{wall['one'] / wall['ray']:6.2f}x" if "ray" in wall else "-"
                overhead = f"{(wall['ray'] - wall['jobs']) / examples * 1e3:+14.1f} ms" if "ray" in wall else "-"
                print(f"{name:<20} {examples:>5} {cell['one']:>16} {cell['jobs']:>16} {ray_cell:>16} "
                      f"{wall['one'] / wall['jobs']:6.2f}x {ray_ratio:>7} {overhead:>18}", flush=True)
            if len(counts) == 2:
                (a, wa), (b, wb) = walls.items()
                per = {k: (wb[k] - wa[k]) / (b - a) for k in wb}
                line = f"  marginal cost of a case ({a} -> {b} cases): " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in per.items())
                if "ray" in per:
                    line += f"; ray/jobs {per['ray'] / per['jobs']:.3f}"
                print(line, flush=True)
    finally:
        if use_ray:
            ray.shutdown()
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
