"""Where a ``--ray`` run's fixed cost goes: an actor's start, its first load, a round trip.

    python scripts/bench_ray_startup.py [--settle 5] [--calls 20]

For a local Ray instance started as ``--ray local`` starts it (``cluster.LOCAL_INIT``) and
for one without the worker preload (``preload_python_modules``), each on its own fresh
instance with 2 CPUs:

* instance: ``ray.init`` (a joined cluster does not pay it);
* 2 actors ready: two of losscmp's actors (``cluster._Actor``, the options ``RayRunner``
  uses) created together until both answer, ``--settle`` seconds after the instance
  started (what a run does in that time: parse, probe, build cases);
* first load: what the first calls of the Sinkhorn pair of ``fixtures/sinkhorn_torch.py``
  (8 points) cost in an actor beyond the same calls again: the file loaded, GeomLoss
  imported there (a ``--jobs`` worker inherits what the parent imported, by fork);
* round trip: median time of a call of ``torch.nn.functional:mse_loss`` on 64 elements,
  less the call's own time in the actor (pickling, Ray's transport, the result back).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import ray
import torch

from losscmp.cluster import ACTOR_CPUS, LOCAL_INIT, _Actor
from losscmp.load import parse_ref
from losscmp.spec import parse_spec
from losscmp.workers import portable_ref

REPO = Path(__file__).resolve().parent.parent


def measure(preload: bool, settle: float, calls: int) -> dict[str, float]:
    options = dict(LOCAL_INIT) if preload else {k: v for k, v in LOCAL_INIT.items() if k != "_system_config"}
    start = time.perf_counter()
    ray.init(num_cpus=2, **options)
    out = {"instance": time.perf_counter() - start}
    try:
        time.sleep(settle)
        remote = ray.remote(num_cpus=ACTOR_CPUS, max_restarts=-1, max_task_retries=0)(_Actor)
        start = time.perf_counter()
        actors = [remote.remote() for _ in range(2)]
        ray.get([a.ready.remote() for a in actors])
        out["2 actors ready"] = time.perf_counter() - start
        # The Sinkhorn pair on 8 points: the first calls load the file and import GeomLoss;
        # the same calls again, subtracted, leave what only the first paid.
        points = parse_spec("x: N D real grad; y: M D real; N=8; M=8; D=3")
        cloud = {"x": torch.randn(8, 3), "y": torch.randn(8, 3)}
        sinkhorn = [portable_ref(parse_ref(f"{REPO}/fixtures/sinkhorn_torch.py:{name}")) for name in ("handwritten", "official")]
        paid = []
        for _ in range(2):
            start = time.perf_counter()
            ray.get([actors[0].call.remote(r, points, cloud, {}) for r in sinkhorn])
            paid.append(time.perf_counter() - start)
        out["first load"] = paid[0] - paid[1]
        spec = parse_spec("input: B real grad; target: B real; B=64")
        ref = parse_ref("torch.nn.functional:mse_loss")
        tensors = {"input": torch.randn(64), "target": torch.randn(64)}
        trips = []
        for _ in range(calls):
            start = time.perf_counter()
            outcome = ray.get(actors[1].call.remote(ref, spec, tensors, {}))
            trips.append(time.perf_counter() - start - outcome.seconds)
        out["round trip"] = statistics.median(trips[1:])  # the first call also imports the reference
    finally:
        ray.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settle", type=float, default=5.0, help="seconds between the instance's start and the actors' creation")
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'workers':<24} {'instance':>9} {'2 actors ready':>15} {'first load':>11} {'round trip':>11}")
    for preload in (False, True):
        m = measure(preload, args.settle, args.calls)
        name = "preload torch, losscmp" if preload else "no preload"
        print(f"{name:<24} {m['instance']:8.1f}s {m['2 actors ready']:14.2f}s {m['first load']:10.2f}s {m['round trip'] * 1e3:8.1f} ms",
              flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
