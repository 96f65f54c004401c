"""Per-case cost of running an implementation in-process vs isolated vs under another interpreter.

    python scripts/bench_isolate.py [--python /path/to/other/python] [--cases 30]

For each loss it builds the same cases once, warms every runner up (worker start and the
implementation's import are not per-case costs), then times each runner over the cases,
interleaved case by case so machine drift hits all three alike.  It prints one row per
loss: median milliseconds per case (forward + backward, as the audit calls it) and the
ratios to in-process.  Without ``--python`` the "other interpreter" column runs this very
interpreter through the standalone worker (same protocol and transport, same code path).
On a CUDA machine it adds Sinkhorn at N = 2,000 on the GPU (isolated inputs by CUDA IPC,
the other interpreter's by host copy).

Then the wall time of one whole audit (CPU-bound: the plain-torch Sinkhorn of
``fixtures/sinkhorn_torch.py`` against GeomLoss, 200 cases of N = M = 300) with ``--jobs 1``
and ``--jobs 2``, one intra-op thread per process, and the speed-up.  It is bounded by the
cores actually free.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from losscmp.generate import Recipe, build_case
from losscmp.interpreter import InterpreterRunner, remote_implementation
from losscmp.isolate import IsolatedRunner
from losscmp.load import load_implementation, parse_ref
from losscmp.run import call
from losscmp.spec import parse_spec, preset

REPO = Path(__file__).resolve().parent.parent


def workloads(cuda: bool):
    mse = ("mse (B = 64)", "torch.nn.functional:mse_loss", preset("regression"), (("B", 64),), "cpu")
    yield mse
    points = parse_spec("x: N D real grad; y: M D real; N=1..4000; M=1..4000; D=3")
    sinkhorn = 'geomloss:SamplesLoss(loss="sinkhorn", blur=0.05, backend="tensorized")'
    yield ("sinkhorn tensorized (N = 1,000)", sinkhorn, points, (("N", 1000), ("M", 1000), ("D", 3)), "cpu")
    if cuda:
        yield ("sinkhorn tensorized (N = 2,000, cuda)", sinkhorn, points, (("N", 2000), ("M", 2000), ("D", 3)), "cuda")


def bench(name, ref_text, spec, sizes, device, n_cases, python):
    impl = load_implementation(ref_text)
    remote = remote_implementation(parse_ref(ref_text))
    cases = [build_case(spec, Recipe(sizes=sizes, seed=s), device=device) for s in range(n_cases)]
    times = {"in-process": [], "isolated": [], "other interpreter": []}
    transports = {}
    with tempfile.TemporaryDirectory() as tmp, IsolatedRunner(input_dir=tmp) as isolated, \
            InterpreterRunner({impl.label: python}, input_dir=tmp) as other:
        runners = {
            "in-process": lambda case: call(impl.fn, spec, case),
            "isolated": lambda case: isolated(impl, spec, case),
            "other interpreter": lambda case: other(remote, spec, case),
        }
        for label, run in runners.items():  # warm-up: start workers, import, first-call costs
            for case in cases[:2]:
                out = run(case)
                assert out.status == "ok", f"{label}: {out.error}"
                transports[label] = getattr(out.transport, "value", out.transport)
        for case in cases:
            for label, run in runners.items():
                start = time.perf_counter()
                out = run(case)
                times[label].append(time.perf_counter() - start)
                assert out.status == "ok", f"{label}: {out.error}"
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return med, transports


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", help="another environment's interpreter (torch + numpy; default: this one)")
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--jobs-examples", type=int, default=200, help="cases of the --jobs audit (0: skip it)")
    args = p.parse_args()
    python = args.python or sys.executable
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda: {cuda}; other interpreter: {python}")
    print(f"median ms per case over {args.cases} cases (forward + backward); ratio = / in-process")
    header = f"{'loss':<40} {'in-process':>11} {'isolated':>10} {'(ratio)':>8} {'other py':>10} {'(ratio)':>8}  transports"
    print(header)
    print("-" * len(header))
    for name, ref_text, spec, sizes, device in workloads(cuda):
        try:
            med, tr = bench(name, ref_text, spec, sizes, device, args.cases, python)
        except Exception as e:  # e.g. geomloss missing: say so, keep the other rows
            print(f"{name:<40} skipped: {type(e).__name__}: {e}")
            continue
        base = med["in-process"]
        print(f"{name:<40} {base:>11.3f} {med['isolated']:>10.3f} {med['isolated'] / base:>7.2f}x "
              f"{med['other interpreter']:>10.3f} {med['other interpreter'] / base:>7.2f}x  "
              f"{tr['isolated']}, {tr['other interpreter']}")
    if args.jobs_examples:
        bench_jobs(args.jobs_examples)


def bench_jobs(examples: int) -> None:
    from losscmp import audit
    from losscmp.settings import Settings

    impls = [load_implementation(f"{REPO}/fixtures/sinkhorn_torch.py:handwritten"),
             load_implementation(f"{REPO}/fixtures/sinkhorn_torch.py:official")]
    # Every case the same size, so the two runs' different case mixes cost alike; one intra-op
    # thread per process in both runs (a job uses one), so the ratio is one core vs two.
    spec = parse_spec("x: N D real grad; y: M D real; N=300; M=300; D=3")
    settings = {jobs: Settings.of(examples=examples, minimize=False, jobs=jobs) for jobs in (1, 2)}
    wall = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for jobs in (1, 2):
            start = time.perf_counter()
            result = audit(impls, spec, settings[jobs])
            wall[jobs] = time.perf_counter() - start
            assert result.cases_run == examples
    finally:
        torch.set_num_threads(threads)
    print(f"\naudit of handwritten vs official Sinkhorn, {examples} cases (N = M = 300), one thread per process, "
          f"{os.cpu_count()} cores on this machine")
    print(f"{'--jobs 1':>10} {'--jobs 2':>10} {'speed-up':>9}")
    print(f"{wall[1]:>9.1f}s {wall[2]:>9.1f}s {wall[1] / wall[2]:>8.2f}x")


if __name__ == "__main__":
    main()
