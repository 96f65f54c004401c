"""How many statements in losscmp's explanations are untrue, on pairs whose answer is known.

Each row of PAIRS is a pair with its TRUE answer written down by hand (in the pair's
comment: why): for each kind of finding, the category, the unstable side (numerical
findings), the cause of a non-finite value float64 keeps, which sides' gradients are
(in)consistent, and the relation of the values.  The audit runs through the command
line (``losscmp.cli.main``, ``--json``) over several seeds; every field it states is
checked against the truth.  Also checked on every run, with no hand-written answer:
the relation never calls "equal" more cases than the verdict lets agree, and a threshold's
"agree at X" is what the sides do on the saved minimal example scaled to X (run again).  CASES are
hand-made inputs the search may not draw (identical images), explained directly.

    python scripts/bench_truth.py [--seeds 0 1 2] [--examples 100] [--no-keops]

Prints one line per checked statement that is untrue, a table per pair, and the
totals: statements checked, untrue (goal 0), findings missed, false alarms.  A category
"unknown" with its reason claims nothing: it is listed and counted apart, never as untrue
(one without a reason is untrue).  Where the unstable side of a numerical finding depends on
the case (geomloss tensorized vs online), the pair names a ``reference`` whose float64 run is
the exact answer, and the true unstable side is the one whose working-dtype result is
further from it on the finding's saved (minimal) example.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import torch

from losscmp.cli import main
from losscmp.compare import Tolerance, compare_outcomes
from losscmp.explain import float64_case
from losscmp.generate import Case
from losscmp.load import load_implementation
from losscmp.minimize import input_magnitude, scaled
from losscmp.model import Pair
from losscmp.repro import load_repro
from losscmp.run import call
from losscmp.spec import parse_spec

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class Truth:
    """What is true of one kind of finding of a pair (None: not claimed, not checked)."""

    category: frozenset[str]  # the categories that are true (two causes: both)
    unstable: str | None = None  # the side that is off its own float64 result, for numerical ones (NEAREST: by the pair's reference)
    origin: str | None = None  # cause of a non-finite value float64 keeps (semantic, non-finite)
    consistent: dict[str, bool | None] = field(default_factory=dict)  # side -> its gradient is its value's derivative


@dataclass(frozen=True)
class PairTruth:
    name: str
    a: str
    b: str
    spec: str
    kinds: dict[str, Truth | tuple[Truth, ...]]  # kind -> truth (or alternatives, one per category); a kind not listed is a false alarm
    relation: str | None = None  # the relation of the values over the finite cases
    offset: float | None = None
    factor: float | None = None
    seeds: tuple[int, ...] | None = None  # None: all seeds
    may_miss: bool = False  # the search may not draw the input (identical images)
    examples: int | None = None  # None: --examples
    reference: str | None = None  # an implementation whose float64 run is the exact answer (for NEAREST)
    needs: tuple[str, ...] = ()  # third-party modules the pair imports: skipped, with a note, when one is missing


NEAREST = "the side further from the reference's float64 result"
NONFINITE_SIDE = "the side that is NaN/inf in float32 and finite in float64 on the saved example"
AMBIGUOUS = 2.0  # errors within this factor of each other: either side is a true answer


def T(*cats: str, **kw) -> Truth:
    return Truth(frozenset(cats), **kw)


F, X = f"{FIXTURES}/", f"{FIXTURES}/truth.py:"
PAIRS = [
    # BCELoss on sigmoid saturates in float32 (sigmoid(z) -> 1, log clamp -100): numerical on
    # the value.  Its backward clamps p(1-p) at 1e-12 in any dtype: the gradient finding is
    # semantic and bce_on_sigmoid's gradient is not its value's derivative there.
    PairTruth("bce sigmoid vs logits", F + "bce.py:bce_on_sigmoid", F + "bce.py:bce_with_logits", "binary",
              {"value": T("numerical", unstable="bce_on_sigmoid"),
               "gradient": T("semantic", consistent={"bce_with_logits": True, "bce_on_sigmoid": False})},
              relation="equal"),
    # log(softmax) underflows to log 0 for large logits in float32; log_softmax does not.
    PairTruth("log(softmax) vs log_softmax", F + "cross_entropy.py:log_of_softmax", F + "cross_entropy.py:log_softmax_nll",
              "classification", {"nonfinite": T("numerical", unstable="log_of_softmax"),
                                 "value": T("numerical", unstable="log_of_softmax"),
                                 "gradient": T("numerical", unstable="log_of_softmax")}, relation="equal"),
    # HuberLoss(delta=2) = 2 x SmoothL1Loss(beta=2): a factor, gradients parallel.
    PairTruth("huber vs smooth_l1", F + "regression.py:huber", F + "regression.py:smooth_l1", "regression",
              {"value": T("semantic", consistent={"huber": True, "smooth_l1": True}),
               "gradient": T("semantic")}, relation="factor", factor=0.5),
    # Two equivalent pairs: any finding is a false alarm.
    PairTruth("mse_loss vs mean_square", "torch.nn.functional:mse_loss", F + "regression.py:mean_square", "regression", {},
              relation="equal"),
    PairTruth("log_softmax_nll vs cross_entropy", F + "cross_entropy.py:log_softmax_nll", F + "cross_entropy.py:cross_entropy",
              "classification", {}, relation="equal"),
    # HuberLoss(delta=1) and SmoothL1Loss(beta=1) are the same function (torch built-ins).
    PairTruth("F.huber_loss vs F.smooth_l1_loss", "torch.nn.functional:huber_loss", "torch.nn.functional:smooth_l1_loss",
              "regression", {}, relation="equal"),
    # Two causes: cancellation (numerical, the fork unstable) and a cap (semantic).  A
    # non-finite finding is either: x = t = 1e20 makes the fork's x² - 2xt + t² = inf - inf
    # (numerical, the fork unstable), or a huge error overflows mse's (x - t)² while the
    # fork caps it, which float64 keeps different (semantic).
    PairTruth("mse vs mse_fork (two causes)", F + "two_causes.py:mse", F + "two_causes.py:mse_fork", "regression",
              {"value": T("numerical", "semantic", unstable="mse_fork"), "gradient": T("numerical", "semantic", unstable="mse_fork"),
               "nonfinite": T("numerical", "semantic", unstable="mse_fork")}),
    # vector_norm's backward masks 0/0; sqrt(sum x^2) has a NaN gradient at an exact 0 in
    # any dtype (semantic, sqrt's slope at 0) — and at x ~ 1e-23, where x² underflows to 0
    # in float32 only (numerical, norm_sqrt unstable, its float64 gradient is right).
    PairTruth("vector_norm vs sqrt(sum x^2)", X + "norm", X + "norm_sqrt", "x: B real grad; B=1..8",
              {"nonfinite": (T("semantic", origin="slope of sqrt at 0", consistent={"norm_sqrt": False}),
                             T("numerical", unstable="norm_sqrt", consistent={"norm_sqrt": True}))}, relation="equal"),
    # -log(p) vs -log(clamp(p, 1e-7)): log 0 at p = 0 in any dtype; below 1e-7 the clamp
    # changes value and gradient (a denormal p: -1/p overflows in float32, float64 still differs).
    PairTruth("log vs clamped log", X + "nll_clamped", X + "nll", "p: B unit grad; B=1..8",
              {"nonfinite": T("semantic", origin="log 0"), "value": T("semantic"), "gradient": T("semantic")}),
    # GaussianNLLLoss omits 0.5 log 2pi and clamps var at 1e-6 (value flat, gradient not).
    PairTruth("GaussianNLLLoss vs -Normal.log_prob", X + "gaussian_nll", X + "normal_nll",
              "input: B real grad; target: B real; var: B positive grad; B=1..8",
              {"value": T("semantic"), "gradient": T("semantic"), "nonfinite": T("semantic")},
              relation="offset", offset=HALF_LOG_2PI),
    # exp(z) overflows past 88.72 in float32: PoissonNLLLoss' inf is correct, the
    # distribution's inf - inf = NaN is the broken side.
    PairTruth("PoissonNLLLoss vs -Poisson.log_prob", X + "poisson_nll", X + "poisson_log_prob",
              "input: B real grad; target: B binary; B=1..8",
              {"nonfinite": T("numerical", unstable="poisson_log_prob")}, relation="equal"),
    # PoissonNLLLoss(log_input=False, full=True) approximates log(t!) by Stirling where t > 1;
    # -Poisson(rate).log_prob uses lgamma(t + 1): different functions on small counts (t = 3:
    # 1.7641 vs 1.7918, in float64 too), so semantic.  At counts of 1e6 and more Stirling is
    # exact to float64's eyes and only float32 rounding of two formulas remains: numerical, and
    # neither side is much further from float64 than the other (either is true).  A rate near 0
    # (1e-45): PoissonNLLLoss takes log(rate + 1e-8), the distribution log(rate), whose slope
    # t/rate overflows: a guard on one side, in float64 too (semantic).
    PairTruth("PoissonNLLLoss(full) vs -Poisson.log_prob", X + "poisson_nll_full", X + "poisson_rate_log_prob",
              "input: B positive grad; target: B counts; B=1..8",
              {"value": T("semantic", "numerical", unstable=NEAREST), "gradient": T("semantic", "numerical", unstable=NEAREST),
               "nonfinite": T("semantic")},
              reference=X + "poisson_rate_log_prob"),
    # PSNR: identical images give MSE = 0 -> 1/0 on the unguarded side (needs the search to
    # draw them); below MSE = 1e-10 the guard changes the value too (semantic).
    PairTruth("PSNR guarded vs plain", X + "psnr_guarded", X + "psnr", "preds: B image grad; target: B image; B=1..8",
              {"nonfinite": T("semantic", origin="division by 0"), "value": T("semantic"), "gradient": T("semantic")}, may_miss=True),
    # geomloss: a plain-torch Sinkhorn vs the official tensorized one: the same algorithm.
    PairTruth("sinkhorn handwritten vs geomloss", F + "sinkhorn_torch.py:handwritten", F + "sinkhorn_torch.py:official",
              "x: N D real grad; y: M D real grad; N=1..8; M=1..8; D=1..3", {}, relation="equal", seeds=(0,)),
    # geomloss tensorized vs online (KeOps): numerical, but which side is off depends on the case.
    # The tensorized backend expands |x - y|² as |x|² + |y|² - 2<x, y>, which cancels in float32
    # at large offsets (x = [[0], [0]], y = [[-21]]: ∇y -21.0366 vs the exact -21); on small
    # inputs the online backend's float32 KeOps reductions are the ones off (x = [[0, 0]],
    # y = [[0, 0.9], [1, -1]]: ∇x[0, 1] tensorized 0.05000007, online 0.0500145, float64 0.05000001).
    # Online rounds 1/eps to float32 even in float64 (torch.Tensor([1 / eps]).type_as(x),
    # geomloss/_legacy/sinkhorn_samples.py:344): its float64 gradient is 3e-5 off there; with 1/eps
    # made in float64 it agrees with the tensorized one to 1e-15.  So the reference is the
    # tensorized backend in float64, and the true unstable side is the one further from it.
    # Never semantic: the same algorithm, the same iterations (tensorized == handwritten).
    PairTruth("geomloss tensorized vs online (KeOps)", F + "sinkhorn_torch.py:official", F + "sinkhorn_torch.py:official_online",
              "x: N D real grad; y: M D real grad; N=1..8; M=1..8; D=1..3",
              {"value": T("numerical", unstable=NEAREST), "gradient": T("numerical", unstable=NEAREST)},
              seeds=(0, 1, 2), examples=30, reference=F + "sinkhorn_torch.py:official"),
]

# Real third-party code (fixtures/real/pairs.py; the libraries are not in the CI venv, so these
# rows are skipped there with a note; run them with a Python that has them).  Each truth was
# settled by running both sides in float32 and float64 and reading the library's source.
R = f"{FIXTURES}/real/pairs.py:"
CLASSES = "input: B C logits grad; target: B labels(C); B=1..8; C=2..6"
PAIRS += [
    # kornia takes log_softmax; the copy takes log(softmax): p_t underflows to a denormal from a
    # logit gap of ~87 (value off) and to 0 from ~104 (log 0 = -inf), in float32 only (float64:
    # ~745).  Both are smooth functions, their gradients their values' derivatives.
    PairTruth("real: kornia focal_loss vs focal by hand", R + "kornia_focal", R + "focal_by_hand", CLASSES,
              {"nonfinite": T("numerical", unstable="focal_by_hand", consistent={"kornia_focal": True, "focal_by_hand": True}),
               "value": T("numerical", unstable="focal_by_hand"), "gradient": T("numerical", unstable="focal_by_hand")},
              relation="equal", needs=("kornia",)),
    # log(1 - sigmoid(z)): 1 - sigmoid(z) cancels from z ~ 7 and is 0 from z ~ 17 in float32
    # (float64: ~37); sigmoid(-z) is 0 from z = 88.72 (exp overflows).  kornia uses logsigmoid.
    PairTruth("real: kornia binary focal vs by hand", R + "kornia_binary_focal", R + "binary_focal_by_hand", "binary",
              {"nonfinite": T("numerical", unstable="binary_focal_by_hand"), "value": T("numerical", unstable="binary_focal_by_hand"),
               "gradient": T("numerical", unstable="binary_focal_by_hand")}, relation="equal", needs=("kornia",)),
    # MONAI's softmax_focal_loss and kornia's focal_loss (alpha None): the same formula,
    # log_softmax in both, the same 'mean' over B x C.  Any finding is a false alarm.
    PairTruth("real: MONAI FocalLoss vs kornia focal_loss", R + "monai_focal", R + "kornia_focal_no_alpha", CLASSES, {},
              relation="equal", needs=("monai", "kornia")),
    # torchmetrics: 10/ln10 (2 ln 1 - ln(SSE / n)); by hand: 10 log10(1 / MSE).  The same
    # function; on identical images both are +inf (and both gradients NaN): they agree.
    PairTruth("real: torchmetrics PSNR vs by hand", R + "torchmetrics_psnr", R + "psnr_by_hand",
              "preds: B C H W image grad; target: B C H W image; B=1..2; C=1..3; H=1..12; W=1..12", {},
              relation="equal", needs=("torchmetrics",)),
    # torchmetrics clamps |target| at 1.17e-6; by hand divides by |target|: 0/0 at t = 0 in any
    # dtype (a guard on one side), and another value below |t| = 1.17e-6 (float64 too).
    PairTruth("real: torchmetrics MAPE vs by hand", R + "torchmetrics_mape", R + "mape_by_hand", "regression",
              {"nonfinite": T("semantic", origin="division by 0"),
               "value": T("semantic", consistent={"torchmetrics_mape": True, "mape_by_hand": True}), "gradient": T("semantic")},
              relation="equal", needs=("torchmetrics",)),
    # MONAI: (2 I + 1e-5) / (|P| + |T| + 1e-5); by hand: 2 I / (|P| + |T| + 1e-5).  Semantic
    # (float64 too); an empty class scores 1 vs 0.
    PairTruth("real: MONAI DiceLoss(softmax) vs eps below", R + "monai_dice", R + "dice_eps_below",
              "input: B C H W logits grad; target: B C H W binary; B=1..3; C=2..3; H=1..8; W=1..8",
              {"value": T("semantic", consistent={"monai_dice": True, "dice_eps_below": True}), "gradient": T("semantic")},
              needs=("monai",)),
    # pytorch-metric-learning's NTXentLoss (one positive per anchor) is SimCLR's InfoNCE: equal
    # in float64.  On rows of norm ~1e-8, normalize's backward cancels in float32 (z = -7.1e-9,
    # D = 1: the copy's gradient -2, the exact 0; pml's 0): numerical, the side further from float64.
    PairTruth("real: pml NTXentLoss vs InfoNCE by hand", R + "pml_ntxent", R + "infonce_by_hand",
              "z1: B D real grad; z2: B D real grad; B=2..8; D=1..8",
              {"value": T("numerical", unstable=NEAREST), "gradient": T("numerical", unstable=NEAREST)},
              relation="equal", reference=R + "pml_ntxent", needs=("pytorch_metric_learning",)),
    # POT's kernel-domain Sinkhorn with reg = 0.05² (geomloss' eps for blur 0.05) vs geomloss'
    # debiased log-domain divergence with cost |x - y|²/2: different functions (one point pair:
    # |x - y|² vs |x - y|²/2).  POT's K = exp(-C/reg) underflows (value 0, gradient exactly 0,
    # "numerical errors at iteration 0"), and where it does not its backward overflows to NaN in
    # float32 only (x = 0.6, y = 1: NaN, float64 -0.8): that NaN is numerical, POT unstable.
    # geomloss overflows to NaN in float32 at x = 2e18, y = 0 (float64: 2e36, within float32's
    # range): numerical, geomloss unstable.  So the unstable side is the one whose NaN float64
    # removes.  geomloss raises "Maximum allowed size exceeded" on coincident points (a real exception).
    PairTruth("real: POT sinkhorn2 vs geomloss", R + "pot_sinkhorn2", R + "geomloss_sinkhorn",
              "x: N D real grad; y: M D real; N=1..8; M=1..8; D=1..3",
              {"value": T("semantic"), "gradient": T("semantic"), "exception": T("exception"),
               "nonfinite": T("numerical", unstable=NONFINITE_SIDE)},
              relation="other", needs=("ot", "geomloss")),
    # kornia.metrics.ssim (mean of the map) and torchmetrics' SSIM agree in float64 on these
    # sizes; float32 variance E[x²] - E[x]² cancels on near-constant images: numerical, the side
    # further from float64.
    PairTruth("real: kornia SSIM vs torchmetrics SSIM", R + "kornia_ssim", R + "torchmetrics_ssim", "images",
              {"value": T("numerical", unstable=NEAREST), "gradient": T("numerical", unstable=NEAREST)},
              relation="equal", reference=R + "torchmetrics_ssim", needs=("kornia", "torchmetrics")),
]

# Inputs the search may not draw, explained directly: (name, good, bad, spec, tensors, truth)
CASES = [
    ("PSNR on identical images", X + "psnr_guarded", X + "psnr", "preds: B image grad; target: B image; B=1..8",
     lambda: (lambda t: {"preds": t.clone(), "target": t.clone()})(torch.rand(6, generator=torch.Generator().manual_seed(0))),
     T("semantic", origin="division by 0")),
    ("sqrt(sum x^2) at 0", X + "norm", X + "norm_sqrt", "x: B real grad; B=1..8", lambda: {"x": torch.zeros(6)},
     T("semantic", origin="slope of sqrt at 0", consistent={"norm_sqrt": False})),
    ("-log(p) at p = 0", X + "nll_clamped", X + "nll", "p: B unit grad; B=1..8", lambda: {"p": torch.tensor([0.5, 0.0, 0.25])},
     T("semantic", origin="log 0")),
    ("GaussianNLLLoss under its var clamp", X + "normal_nll", X + "gaussian_nll",
     "input: B real grad; target: B real; var: B positive grad; B=1..8",
     lambda: {"input": torch.tensor([0.0]), "target": torch.tensor([1.0]), "var": torch.tensor([1e-30])},
     T("semantic", consistent={"gaussian_nll": False, "normal_nll": True})),
    ("PoissonNLLLoss at z = 89", X + "poisson_nll", X + "poisson_log_prob", "input: B real grad; target: B binary; B=1..8",
     lambda: {"input": torch.tensor([89.0]), "target": torch.tensor([1.0])}, T("numerical", unstable="poisson_log_prob")),
    # PoissonNLLLoss(full)'s minimal non-finite example off denormals: t / rate overflows float32 on
    # the distribution's side only.  Both gradients are their values' derivatives (the NLL's
    # log(rate + 1e-8) curves on a scale of 1e-8, far below a step set by t = 100).
    ("PoissonNLLLoss(full) at rate 2e-38", X + "poisson_rate_log_prob", X + "poisson_nll_full",
     "input: B positive grad; target: B counts; B=1..8", lambda: {"input": torch.tensor([2e-38]), "target": torch.tensor([100.0])},
     T("semantic", consistent={"poisson_nll_full": True, "poisson_rate_log_prob": True})),
]


@dataclass
class Tally:
    checked: int = 0
    untrue: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # "unknown" with a reason: no claim, listed apart

    def check(self, where: str, what: str, claimed, true, ok: bool) -> None:
        self.checked += 1
        if not ok:
            self.untrue.append(f"UNTRUE {where}: {what}: losscmp says {claimed!r}, true is {true!r}")


def check_finding(tally: Tally, where: str, d: dict, truths: Truth | tuple[Truth, ...],
                  nearest: frozenset[str] | None = None) -> str:
    alternatives = truths if isinstance(truths, tuple) else (truths,)
    cat = d.get("category")
    nested = d.get("explanation") if isinstance(d.get("explanation"), dict) else {}
    reason = d.get("reason") or nested.get("reason")
    allowed = sorted(set().union(*(t.category for t in alternatives)))
    if cat == "unknown" and "unknown" not in allowed and reason:
        tally.unknown.append(f"UNKNOWN {where}: {reason[:160]}")
    else:
        tally.check(where, "category", cat, allowed, cat in allowed)
    truth = next((t for t in alternatives if cat in t.category), alternatives[0])
    if cat == "numerical" and truth.unstable:
        true_sides = nearest if truth.unstable in (NEAREST, NONFINITE_SIDE) else frozenset({truth.unstable})
        if true_sides is None:
            tally.untrue.append(f"ERROR {where}: no saved example to find the true unstable side on")
        else:
            said = d.get("unstable_side")
            tally.check(where, "unstable side", said, sorted(true_sides), said in true_sides)
    origin = (d.get("origin") or nested.get("origin") or {}).get("cause")
    if origin is not None:  # a claimed origin must be the true one (a wrong "unknown" is already a wrong category)
        tally.check(where, "non-finite origin", origin, truth.origin, origin == truth.origin)
    for side, consistent in truth.consistent.items():
        said = (d.get("self_consistency") or {}).get(side, {}).get("consistent")
        if said is not None:  # not checked (no verdict) is not a claim
            tally.check(where, f"self-consistency of {side}", said, consistent, said == consistent)
    return f"{cat}" + (f" ({d.get('unstable_side')} unstable)" if cat == "numerical" else "")


def check_relation(tally: Tally, where: str, report: dict, pair: PairTruth) -> str:
    ds = report["divergences"]
    rel = next((d.get("relation") for d in ds if d.get("relation")), None)
    if rel is None:
        return "-"
    value_cases = sum(d.get("cases", 0) for d in ds if d["kind"] == "value")
    if rel["value"] == "equal":  # never more "equal" cases than the verdict lets agree
        ok = rel["value_fits"] <= report["cases_run"] - value_cases
        tally.check(where, "relation equal vs verdict", f"equal on {rel['value_fits']}", f"<= {report['cases_run'] - value_cases}", ok)
    if pair.relation:
        tally.check(where, "relation", rel["value"], pair.relation, rel["value"] == pair.relation)
        if pair.offset is not None and rel["value"] == "offset":
            tally.check(where, "offset", rel["offset"], pair.offset, abs(rel["offset"] - pair.offset) <= 1e-3 * pair.offset)
        if pair.factor is not None and rel["value"] == "factor":
            tally.check(where, "factor", rel["factor"], pair.factor, abs(rel["factor"] - pair.factor) <= 1e-3 * pair.factor)
    return rel["value"] + (f" {rel['offset']:.4g}" if rel.get("offset") is not None else "") + (f" x{rel['factor']:.4g}" if rel.get("factor") is not None else "")


def nearest_sides(pair: PairTruth, labels: list[str], repro: str, kind: str) -> frozenset[str]:
    """The side(s) whose working-dtype result on the saved example is further from the
    reference's float64 result, over the part the finding is about (value or gradients)."""
    assert pair.reference is not None
    saved = load_repro(repro)
    spec, case = saved.spec, saved.case
    exact = call(load_implementation(pair.reference).fn, spec, float64_case(case))

    def error(ref_text: str) -> float:
        o = call(load_implementation(ref_text).fn, spec, case)
        parts = [(o.value, exact.value)] if kind == "value" else [(o.grads[n], exact.grads[n]) for n in exact.grads]
        worst = max(float((a.double() - b).abs().max()) for a, b in parts)
        return math.inf if math.isnan(worst) else worst

    errors = {label: error(ref) for label, ref in zip(labels, (pair.a, pair.b))}
    far = max(errors.values())
    return frozenset(label for label, e in errors.items() if e * AMBIGUOUS >= far)


def at_agree(pair: PairTruth, labels: list[str], repro: str, agree_at: float) -> str:
    """What the sides truly do on the saved example scaled to the threshold's "agree at"
    magnitude: "agree", or the kind of finding they still show there (run again here)."""
    saved = load_repro(repro)
    # Scaled as the minimiser's bisection scales (one factor), not to the exact magnitude: a
    # point 1% from the threshold can flip on the last bit of a different scaling.
    there = scaled(saved.spec, saved.case, agree_at / input_magnitude(saved.spec, saved.case))
    impls = [load_implementation(ref) for ref in (pair.a, pair.b)]
    outcomes = [call(impl.fn, saved.spec, there) for impl in impls]
    v = compare_outcomes(Pair(*labels), *outcomes, Tolerance.for_dtype(torch.float32))
    return v.kind.value if v.kind is not None else "agree"


def _unstable_truth(truths: Truth | tuple[Truth, ...] | None) -> str | None:
    return next((t.unstable for t in (truths if isinstance(truths, tuple) else (truths,)) if t is not None and t.unstable), None)


def nonfinite_sides(pair: PairTruth, labels: list[str], repro: str) -> frozenset[str]:
    """The side(s) whose float32 result on the saved example has a NaN/inf that their own
    float64 result does not (run again here)."""
    saved = load_repro(repro)

    def finite(o) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in [o.value, *o.grads.values()] if t is not None)

    made = set()
    for label, ref in zip(labels, (pair.a, pair.b)):
        fn = load_implementation(ref).fn
        if not finite(call(fn, saved.spec, saved.case)) and finite(call(fn, saved.spec, float64_case(saved.case))):
            made.add(label)
    return frozenset(made)


def run_pair(tally: Tally, pair: PairTruth, seed: int, examples: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        save = ["--save-dir", str(Path(tmp) / "saved")]  # the saved minimal examples: NEAREST and the threshold check
        argv = [pair.a, pair.b, "--spec", pair.spec, "--seed", str(seed), "--examples", str(pair.examples or examples),
                *save, "--json", str(out)]
        with redirect_stdout(StringIO()):
            code = main(argv)
        if code == 2 or not out.exists():
            tally.untrue.append(f"ERROR {pair.name} seed {seed}: exit {code}")
            return [f"exit {code}"]
        report = json.loads(out.read_text())
        nearest = {id(d): nearest_sides(pair, report["implementations"], d["repro"], d["kind"])
                   for d in report["divergences"] if pair.reference and d.get("repro") and d["kind"] in ("value", "gradient")}
        nearest |= {id(d): nonfinite_sides(pair, report["implementations"], d["repro"])
                    for d in report["divergences"] if d["kind"] == "nonfinite" and d.get("repro")
                    and _unstable_truth(pair.kinds.get("nonfinite")) == NONFINITE_SIDE}
        below = {id(d): at_agree(pair, report["implementations"], d["repro"], d["threshold"]["agree_at"])
                 for d in report["divergences"] if d.get("repro") and d.get("threshold")}
    where = f"{pair.name} seed {seed}"
    said = []
    for d in report["divergences"]:
        truth = pair.kinds.get(d["kind"])
        if truth is None:
            tally.check(where, f"{d['kind']} finding", "diverge", "agree", False)
            said.append(f"{d['kind']}: FALSE ALARM")
            continue
        verdict = check_finding(tally, f"{where} {d['kind']}", d, truth, nearest.get(id(d)))
        if id(d) in below:  # "agree at X" must be true of the example shown, scaled to X
            said_below = d["threshold"].get("still_differ_at_agree") or "agree"
            tally.check(f"{where} {d['kind']}", "threshold: what the sides do at 'agree at'", said_below, below[id(d)],
                        said_below == below[id(d)])
        if id(d) in nearest:
            verdict += f" [further from float64: {'/'.join(sorted(nearest[id(d)]))}]"
        said.append(f"{d['kind']}: {verdict}")
    found = {d["kind"] for d in report["divergences"]}
    if pair.kinds and not found:
        (tally.missed if pair.may_miss else tally.untrue).append(f"{'MISSED' if pair.may_miss else 'UNTRUE'} {where}: no finding")
    said.append(f"relation: {check_relation(tally, where, report, pair)}")
    return said


def run_case(tally: Tally, name: str, good: str, bad: str, spec_text: str, make, truth: Truth) -> str:
    from losscmp.explain import explain

    spec = parse_spec(spec_text)
    tensors = make()
    case = Case(tensors, {"B": next(iter(tensors.values())).shape[0]})
    kind = "nonfinite" if truth.origin or truth.unstable else "value"
    ex = explain(load_implementation(good), load_implementation(bad), spec, case, kind, Tolerance.for_dtype(torch.float32), impact_steps=0)
    data = ex.to_json()
    return check_finding(tally, f"case {name}", data, truth) + f" — {ex.sentence()[:110]}"


def main_(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--only", default=None, help="run the pairs whose name contains this")
    args = ap.parse_args(argv)
    tally = Tally()
    t0 = time.perf_counter()
    for pair in PAIRS:
        if args.only and args.only not in pair.name:
            continue
        missing = [m for m in pair.needs if importlib.util.find_spec(m) is None]
        if missing:
            print(f"{pair.name:38s} skipped: {', '.join(missing)} not installed", flush=True)
            continue
        for seed in pair.seeds or args.seeds:
            said = run_pair(tally, pair, seed, args.examples)
            print(f"{pair.name:38s} seed {seed}: " + "; ".join(said), flush=True)
    for name, good, bad, spec, make, truth in CASES:
        if args.only and args.only not in name:
            continue
        try:
            line = run_case(tally, name, good, bad, spec, make, truth)
        except TypeError as e:  # an older losscmp without some field
            tally.untrue.append(f"ERROR case {name}: {e}")
            line = f"error {e}"
        print(f"{'case ' + name:38s}: {line}", flush=True)
    print()
    for line in tally.untrue + tally.missed + tally.unknown:
        print(line)
    print(f"\nstatements checked: {tally.checked}; untrue: {len(tally.untrue)} (goal 0); "
          f"'unknown' with a reason: {len(tally.unknown)}; "
          f"findings the search missed (may_miss): {len(tally.missed)}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
