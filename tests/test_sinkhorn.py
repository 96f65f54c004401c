"""The geomloss pairs: a plain-torch rewrite that must agree, and two backends that don't."""
import pytest
import torch

pytest.importorskip("geomloss")

from losscmp.audit import Evaluator, Settings, audit  # noqa: E402
from losscmp.load import load_implementation  # noqa: E402
from losscmp.minimize import take  # noqa: E402
from losscmp.spec import preset  # noqa: E402

from .conftest import FIXTURES  # noqa: E402

SINKHORN = FIXTURES / "sinkhorn_torch.py"


def test_handwritten_sinkhorn_agrees_with_geomloss_over_the_default_budget():
    impls = [load_implementation(f"{SINKHORN}:handwritten"), load_implementation(f"{SINKHORN}:official")]
    result = audit(impls, preset("points"), Settings.of(minimize=False))
    assert result.cases_run == Settings().search.examples
    assert result.agree, [(d.kind, d.verdict.detail, d.case.describe()) for d in result.divergences]


@pytest.mark.slow
def test_a_fork_of_the_schedule_is_caught(tmp_path):
    """One changed constant (the eps-scaling ratio) in an otherwise identical copy is found."""
    fork = tmp_path / "fork_sinkhorn.py"
    fork.write_text(SINKHORN.read_text().replace("SCALING = 0.5", "SCALING = 0.7"))
    impls = [load_implementation(f"fork={fork}:handwritten"), load_implementation(f"{SINKHORN}:official")]
    result = audit(impls, preset("points"), Settings.of(examples=60, explain=False))  # the minimised case is under test
    assert not result.agree
    d = max(result.divergences, key=lambda d: d.score)
    m = d.minimized
    assert m.sizes["N"] + m.sizes["M"] <= 6 < d.case.sizes["N"] + d.case.sizes["M"] or d.case.numel() <= 12
    # 1-minimal: dropping any single point loses the divergence.
    ev = Evaluator(impls, preset("points"), Settings())
    for dim in ("N", "M"):
        n = m.sizes[dim]
        for drop in range(n if n > 1 else 0):
            smaller = take(ev.spec, m.case, dim, [i for i in range(n) if i != drop])
            assert not ev.still_diverges(d.subject, d.kind, smaller), (dim, drop)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU visible KeOps runs the online formula there, in this process; "
                    "pykeops' CUDA JIT segfaults on the CUDA 13 image (tests/test_gpu.py runs it isolated)")
def test_tensorized_vs_online_backends_disagree_in_float32_and_are_minimised():
    """A finding, not a test failure: KeOps' online backend computes |x-y|^2 directly and the
    tensorized one expands it; with blur=0.05 the exponents C/eps reach 1e7 and float32
    potentials lose whole digits.  losscmp must find this and shrink it to a few points."""
    pytest.importorskip("pykeops")
    impls = [load_implementation(f"{SINKHORN}:official"), load_implementation(f"{SINKHORN}:official_online")]
    # 100 cases: with 40 the worst finding was a value one in one CI run out of several (KeOps'
    # multithreaded reductions need not sum in the same order each run).
    result = audit(impls, preset("points"), Settings.of(examples=100, explain=False))  # finding and minimising are under test
    assert not result.agree
    worst = max(result.divergences, key=lambda d: d.score)
    assert worst.kind == "gradient"
    assert worst.minimized.sizes["N"] + worst.minimized.sizes["M"] <= 4
    assert worst.minimized.threshold is not None  # agreement returns at smaller input scales
