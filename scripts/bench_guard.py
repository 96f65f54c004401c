"""Per-case cost of the no-silent-exit protection, and of output capture, on a tiny loss.

Under the command line's supervisor every in-process call first leaves a breadcrumb
(``losscmp.breadcrumbs.before_call``: one pwrite; a case the minimiser or the explain
stage derived is also written to disk once, without fsync) and stores its deadline for the
supervisor's watchdog; after every case the JSON report so far is written for the
supervisor (``breadcrumbs.keep_report``).  Every call also captures what the implementation prints at
the file-descriptor level (``losscmp.run.captured_output``).  This benchmark runs the
same audit of a tiny loss (mse, B <= 64) in rounds, interleaved so that machine drift
cancels:

* ``plain``    — no breadcrumbs, no capture (what the search cost before either existed);
* ``capture``  — output capture only (the library default);
* ``guarded``  — capture + breadcrumbs + watchdog deadline + per-case report snapshot
  (the command line's default).

    python scripts/bench_guard.py [--examples 200] [--rounds 5]

It prints milliseconds per case (median over rounds) and the ratios side by side, then
the cost of each mechanism per call, timed on its own over many calls (robust to a
busy machine, unlike whole audits).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from losscmp import audit, breadcrumbs, load_implementation, parse_spec, run
from losscmp.report import audit_json
from losscmp.repro import save_input
from losscmp.settings import Settings

SPEC = "input: B real grad; target: B real; B=1..64"


@contextlib.contextmanager
def no_capture():
    original = run.captured_output

    @contextlib.contextmanager
    def passthrough():
        yield run._Captured()

    run.captured_output = passthrough
    try:
        yield
    finally:
        run.captured_output = original


@contextlib.contextmanager
def leaving_breadcrumbs():
    with tempfile.TemporaryDirectory() as d:
        breadcrumbs._crumbs = breadcrumbs._Breadcrumbs(Path(d), save_input)
        breadcrumbs._clock = breadcrumbs.Clock()
        try:
            yield
        finally:
            breadcrumbs._crumbs = breadcrumbs._clock = None


def per_case_ms(mode: str, impls, spec, examples: int) -> float:
    settings = Settings.of(examples=examples, minimize=False, explain=False)  # the search's per-case cost
    with contextlib.ExitStack() as stack:
        if mode == "plain":
            stack.enter_context(no_capture())
        if mode == "guarded":
            stack.enter_context(leaving_breadcrumbs())
        start = time.perf_counter()
        keep = (lambda partial: breadcrumbs.keep_report(audit_json(partial), partial.phase.value)) if mode == "guarded" else None
        result = audit(impls, spec, settings, on_progress=keep)
        return 1000 * (time.perf_counter() - start) / result.cases_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    impls = [load_implementation("torch.nn.functional:mse_loss"), load_implementation("torch.nn.functional:l1_loss")]
    spec = parse_spec(SPEC)
    modes = ("plain", "capture", "guarded")
    per_case_ms("plain", impls, spec, 5)  # warm-up
    times = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m in modes:
            times[m].append(per_case_ms(m, impls, spec, args.examples))
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"tiny loss (mse vs l1, B <= 64), {args.examples} cases x {args.rounds} rounds, median ms per case:")
    print(f"{'mode':<10}{'ms/case':>10}{'vs plain':>10}")
    for m in modes:
        print(f"{m:<10}{med[m]:>10.3f}{med[m] / med['plain']:>10.3f}")
    print(f"breadcrumbs, deadline and snapshot: {med['guarded'] - med['capture']:+.3f} ms per case; capture alone: {med['capture'] - med['plain']:+.3f} ms per case")
    per_call(spec)


def per_call(spec, calls: int = 5000) -> None:
    """Microseconds per call of each mechanism alone, beside a bare call of a tiny loss."""
    import torch

    from losscmp.generate import build_case, probe_recipe

    case = build_case(spec, probe_recipe(spec))
    x, t = case.tensors["input"], case.tensors["target"]

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return 1e6 * (time.perf_counter() - start) / calls

    bare = timed(lambda: torch.nn.functional.mse_loss(x, t))

    def capture_only():
        with run.captured_output():
            pass

    with leaving_breadcrumbs():
        breadcrumbs.rebuildable(case)
        crumb = timed(lambda: breadcrumbs.before_call("mse", spec, case))

        def watched_only():
            with breadcrumbs.watched("mse", spec, case):
                pass

        watched = timed(watched_only)
    print(f"per call, {calls} calls each: bare mse_loss forward {bare:.1f} us; output capture {timed(capture_only):.1f} us; "
          f"breadcrumb {crumb:.1f} us; breadcrumb + watchdog deadline {watched:.1f} us")


if __name__ == "__main__":
    main()
