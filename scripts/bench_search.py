"""Search benchmark: cases until the first divergence, losscmp vs plain Hypothesis.

For a handful of planted bugs, prints side by side from one run the number of cases each
search needed before it first saw the pair diverge (median over seeds; ">B" when the
budget B ran out).  Both sides use the same predicate -- losscmp's own comparison of the
pair on a case, default tolerances -- and differ only in how they draw inputs:

* losscmp: ``losscmp.audit`` itself (recipes with numeric regimes, targeting);
* plain Hypothesis: ``hypothesis.extra.numpy.arrays`` per argument, with the element
  strategy a user would write for the domain (floats, floats in [0, 1], labels, ...).

    python scripts/bench_search.py [--seeds 5] [--budget 300]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from losscmp.audit import Evaluator, Settings, audit
from losscmp.generate import Case
from losscmp.load import load_implementation
from losscmp.spec import Spec, parse_spec, preset

TESTS = Path(__file__).resolve().parent.parent / "tests"
PLANTED, NUMERIC = TESTS / "planted.py", TESTS / "planted_numeric.py"

BUGS = [
    ("far point (clamped norms)", f"{PLANTED}:norms", f"{PLANTED}:norms_clamped", preset("points")),
    ("duplicate points (NaN sqrt grad)", f"{PLANTED}:spread_safe", f"{PLANTED}:spread_naive", preset("points")),
    ("last class weighted 0.5", f"{PLANTED}:cross_entropy", f"{PLANTED}:cross_entropy_drops_last_class", preset("classification")),
    ("SSIM float32 vs float64", f"{NUMERIC}:ssim_float64", f"{NUMERIC}:ssim_float32", preset("images")),
    ("softplus overflow", f"{NUMERIC}:softplus", f"{NUMERIC}:softplus_naive", parse_spec("x: N real grad")),
]


class Found(Exception):
    """Raised at the first diverging case to end a search there."""


def losscmp_cases(impls, spec: Spec, seed: int, budget: int) -> int | None:
    first: list[int] = []

    def on_case(n: int, score: float) -> None:
        if score > 1:
            first.append(n)  # Hypothesis replays a failure: keep the first count, not the last
            raise Found(n)

    try:
        audit(impls, spec, Settings.of(examples=budget, seed=seed, save_dir=None, minimize=False), on_case=on_case)
    except Found:
        pass
    return first[0] if first else None


def _elements(domain: str, classes: int | None):
    """The element strategy a user would write for a domain, without regimes."""
    if domain in ("real", "logits"):
        return st.floats(-1e6, 1e6, width=32)
    if domain == "positive":
        return st.floats(1e-6, 1e6, width=32)
    if domain in ("unit",):
        return st.floats(0, 1, width=32, exclude_min=True, exclude_max=True)
    if domain in ("image", "simplex", "sphere"):
        return st.floats(0, 1, width=32)
    if domain == "binary":
        return st.sampled_from([0.0, 1.0])
    if domain == "labels":
        return st.integers(0, max(classes - 1, 0))
    raise ValueError(domain)


def plain_cases(spec: Spec) -> st.SearchStrategy[Case]:
    @st.composite
    def build(draw) -> Case:
        sizes = {d: draw(st.integers(*spec.size_range(d))) for d in spec.dims}
        tensors = {}
        for arg in spec.args:
            shape = spec.shape(arg, sizes)
            classes = sizes.get(arg.classes) if arg.classes else None
            dtype = np.int64 if arg.domain == "labels" else np.float32
            a = draw(arrays(dtype, shape, elements=_elements(arg.domain, classes)))
            t = torch.from_numpy(a.copy())
            if arg.domain == "simplex":  # normalise rows, as a user would
                t = t + 1e-6
                t = t / t.sum(-1, keepdim=True)
            elif arg.domain == "sphere":
                t = (t - 0.5) / (t - 0.5).norm(dim=-1, keepdim=True).clamp_min(1e-6)
            tensors[arg.name] = t
        return Case(tensors, sizes, dict(spec.params))

    return build()


def hypothesis_cases(impls, spec: Spec, seed: int, budget: int) -> int | None:
    ev = Evaluator(impls, spec, Settings())
    pair = ev.pairs[0]
    calls = 0
    first: list[int] = []

    @settings(max_examples=budget, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(plain_cases(spec))
    def agree(case):
        nonlocal calls
        calls += 1
        if ev.judge(pair, case).kind:
            first.append(calls)
            raise Found(calls)

    try:
        hypothesis_seed(seed)(agree)()
    except Found:
        pass
    finally:
        ev.close()
    return first[0] if first else None


def median_text(found: list[int | None], budget: int) -> str:
    values = [math.inf if f is None else f for f in found]
    m = statistics.median(values)
    misses = sum(f is None for f in found)
    text = f">{budget}" if math.isinf(m) else f"{m:g}"
    return text + (f" ({misses}/{len(found)} missed)" if misses else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds per bug (default 5)")
    p.add_argument("--budget", type=int, default=300, help="cases per search before giving up (default 300)")
    args = p.parse_args()
    rows = []
    for name, a, b, spec in BUGS:
        impls = [load_implementation(a), load_implementation(b)]
        start = time.perf_counter()
        ours = [losscmp_cases(impls, spec, seed, args.budget) for seed in range(args.seeds)]
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        theirs = [hypothesis_cases(impls, spec, seed, args.budget) for seed in range(args.seeds)]
        t_theirs = time.perf_counter() - start
        rows.append((name, ours, t_ours, theirs, t_theirs))
    print(f"cases to the first divergence, median over {args.seeds} seeds (budget {args.budget} cases per search)\n")
    print(f"{'planted bug':<34} | {'losscmp':>18} {'time':>7} | {'plain hypothesis':>18} {'time':>7}")
    for name, ours, t_ours, theirs, t_theirs in rows:
        print(f"{name:<34} | {median_text(ours, args.budget):>18} {t_ours:>6.1f}s | {median_text(theirs, args.budget):>18} {t_theirs:>6.1f}s")
    print("\nper seed (losscmp / hypothesis; - = not found):")
    for name, ours, _, theirs, _ in rows:
        fmt = lambda xs: " ".join("-" if x is None else str(x) for x in xs)  # noqa: E731
        print(f"  {name:<34} {fmt(ours):<24} / {fmt(theirs)}")


if __name__ == "__main__":
    main()
