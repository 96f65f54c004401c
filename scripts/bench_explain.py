"""What explaining a divergence costs, next to what finding and minimising it cost.

For each pair, in one run: the audit's search (losscmp.audit, no minimisation), the
minimisation of each divergence it found, then the explain stage on each minimised
case (float64 oracle, self-consistency of both sides, training impact when it runs
by default, and trace if ``losscmp.trace`` is importable), and for the Sinkhorn pair
also on the unminimised N = 200 case.  Costs are implementation calls (one call of
one implementation on one input, forward + backward) and wall seconds.  Also: the
cost of ``explain.observe`` per compared case, the only thing explain adds to the
search itself.

    python scripts/bench_explain.py [--examples 100] [--sinkhorn-examples 10]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from losscmp import explain as X
from losscmp.audit import audit
from losscmp.engine import Evaluator
from losscmp.settings import Settings
from losscmp.load import Implementation, load_implementation
from losscmp.minimize import minimize
from losscmp.run import call
from losscmp.spec import parse_spec, preset

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

try:  # the op-level trace lands separately
    from losscmp.trace import locate
except ImportError:
    locate = None


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def wrap(self, impl: Implementation) -> Implementation:
        fn = impl.fn

        def counted(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)

        return replace(impl, fn=counted)

    def run(self, impl: Implementation, spec, case):
        self.calls += 1
        return call(impl.fn, spec, case)


def row(name: str, calls: int, seconds: float) -> None:
    print(f"  {name:<64} {calls:>8} {seconds:>10.3f}")


def bench(title: str, expected: Implementation, actual: Implementation, spec, settings: Settings, big_case: bool) -> None:
    print(f"\n== {title}: {expected.label} vs {actual.label}; spec {spec.text()}")
    print(f"  {'stage':<64} {'calls':>8} {'seconds':>10}")
    counter = Counter()
    impls = [counter.wrap(expected), counter.wrap(actual)]
    t0 = time.perf_counter()
    result = audit(impls, spec, replace(settings, outputs=replace(settings.outputs, minimize=False, explain=False)))
    search = (counter.calls, time.perf_counter() - t0)
    row(f"search ({result.cases_run} cases)", *search)
    # The search runs at the spec's sizes; the minimiser may go down to one point.
    ev = Evaluator(impls, spec.with_sizes(**{d: (1, spec.size_range(d)[1]) for d in spec.dims}), settings)
    minimised = []
    find = list(search)
    for d in result.divergences:
        c0, t0 = counter.calls, time.perf_counter()
        m = minimize(ev, d)
        cost = (counter.calls - c0, time.perf_counter() - t0)
        row(f"minimise {d.kind} ({_sizes(d.case.sizes)} -> {_sizes(m.sizes)})", *cost)
        find[0] += cost[0]
        find[1] += cost[1]
        minimised.append((d, m.case))
    row("= find + minimise", *find)
    tol = settings.tolerance
    # observe() on every compared case: what recording the relation's history adds to the search.
    oe, oa = call(expected.fn, spec, result.divergences[0].case), call(actual.fn, spec, result.divergences[0].case)
    t0 = time.perf_counter()
    for _ in range(200):
        X.observe(oe, oa, "standard")
    per_case = (time.perf_counter() - t0) / 200
    row(f"observe() on every case (x{result.cases_run})", 0, per_case * result.cases_run)
    targets = [(f"{d.kind}, minimised {_sizes(case.sizes)}", d.kind, case, (d.case, d.representative)) for d, case in minimised]
    if big_case:
        d = result.divergences[0]
        targets.append((f"{d.kind}, unminimised {_sizes(d.case.sizes)}", d.kind, d.case, ()))
    sentences = []
    for what, kind, case, also in targets:
        counter_x = Counter()
        ex = X.explain(expected, actual, spec, case, kind, tol, run=counter_x.run, locate=locate, also=also)
        for stage, (calls, seconds) in ex.costs.items():
            row(f"explain {what}: {stage}", calls, seconds)
        row(f"= explain {what}", ex.evaluations, ex.seconds)
        print(f"  {'  ratio explain / (find + minimise)':<64} {ex.evaluations / max(find[0], 1):>8.3f} {ex.seconds / max(find[1], 1e-9):>10.3f}")
        sentences.append(f"  [{what}] {ex.sentence()}")
    print("  sentences:")
    print("\n".join(sentences))


def _sizes(sizes: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100, help="search budget for BCE")
    parser.add_argument("--sinkhorn-examples", type=int, default=10, help="search budget for Sinkhorn at N = 200")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"trace: {'losscmp.trace.locate' if locate else 'not importable here: trace costs not included'}")
    if locate:  # its first use sets up the dispatch machinery once per process: paid here, shown apart
        from losscmp.compare import Tolerance
        from losscmp.generate import Recipe, build_case

        warm = load_implementation(f"{FIXTURES}/bce.py:bce_with_logits")
        t0 = time.perf_counter()
        locate(warm, warm, preset("binary"), build_case(preset("binary"), Recipe(sizes=(("B", 2),))), Tolerance.for_dtype(torch.float32))
        print(f"trace warm-up (once per process, not in the rows below): {time.perf_counter() - t0:.3f} s")
    bench(
        "BCE",
        load_implementation(f"{FIXTURES}/bce.py:bce_with_logits"),
        load_implementation(f"{FIXTURES}/bce.py:bce_on_sigmoid"),
        preset("binary"),
        Settings.of(examples=args.examples),
        big_case=False,
    )
    bench(
        "Sinkhorn, N = 200",
        load_implementation(f"handwritten={FIXTURES}/sinkhorn_torch.py:handwritten"),
        # The same algorithm at another blur: a 'fork' that changed one constant.
        load_implementation("blur_0.1=geomloss:SamplesLoss(loss='sinkhorn', p=2, blur=0.1, scaling=0.5, debias=True, backend='tensorized')"),
        parse_spec("x: N D real grad; y: M D real grad; N=200; M=200; D=2"),
        Settings.of(examples=args.sinkhorn_examples),
        big_case=True,
    )


if __name__ == "__main__":
    main()
