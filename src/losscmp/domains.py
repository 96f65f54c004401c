"""Domains: one record per kind of tensor value, holding everything domain-specific.

A spec argument names a domain (``real``, ``unit``, ``image``, ...).  Everything that
depends on it lives in that domain's :class:`Domain` record, so generation
(:mod:`losscmp.generate`) and minimisation (:mod:`losscmp.minimize`) cannot disagree
about what a value of the domain may be:

* ``build``: the tensor for a numeric regime (what each regime *means* in this domain
  is written next to it, in ``regimes``);
* ``plant``: where a special value (0, -0, 1e-30, 1e30, 1) lands inside the domain;
* ``scalable`` / ``shiftable``: whether the input-scale and offset knobs apply;
* ``simplify``: simpler whole-tensor candidates for the minimiser, simplest first;
* ``renormalise``: the projection back into the domain after rows lost elements;
* ``legalise`` / ``legal``: the nearest legal tensor in the working dtype, and the check;
* ``step_scale`` / ``contains`` / ``project``: for the explanation's finite differences
  and descent (:mod:`losscmp.explain`): how far each element may be moved, whether a
  moved tensor is still where the loss is defined, and the projection of a descended one.

Regimes are ordered from the mildest to the most extreme (``REGIMES``): the first regime
in which a divergence shows is the one a person should read first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Mapping

import torch


class Regime(str, Enum):
    """Numeric regimes, mildest first.  Each domain says what a regime means for it."""

    STANDARD = "standard"
    DUPLICATES = "duplicates"
    CONSTANT = "constant"
    TINY = "tiny"
    OFFSET = "offset"
    HUGE = "huge"
    EXTREME = "extreme"
    SPECIAL = "special"

    @property
    def description(self) -> str:
        return _REGIME_TEXT[self.value]


_REGIME_TEXT = {
    "standard": "typical values at a moderate magnitude",
    "duplicates": "repeated rows within an argument and shared between arguments",
    "constant": "every element equal (flat images, uniform rows, one class)",
    "tiny": "magnitudes 1e-8..1e-3 (near-flat images, near-uniform rows, probabilities near 0)",
    "offset": "a large common offset with a small spread (cancellation; low-contrast images)",
    "huge": "magnitudes 1e3..1e8 (high-frequency images, near-one-hot rows)",
    "extreme": "saturation (logits 30..1e4, probabilities within 1e-7 of 0 and 1, one-hot rows, saturated images)",
    "special": "a few planted values: 0, -0, 1e-30, 1e30, 1",
}
REGIMES: dict[str, str] = {r.value: r.description for r in Regime}


@dataclass(frozen=True)
class BuildContext:
    """What a domain's builder may draw from: one generator, the recipe's knobs, shared draws.

    ``shared_normal`` and ``shared_uniform`` are drawn from the recipe's seed alone, so every
    argument of a case sees the same ones (two constant point clouds coincide, two flat
    images have the same grey).
    """

    regime: str
    magnitude: float
    offset: float
    gen: torch.Generator
    dtype: torch.dtype  # the working dtype (float32 or float64)
    device: torch.device | str
    shared_normal: float
    shared_uniform: float
    classes: int | None = None  # for labels: how many classes

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=self.dtype)

    def rand(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen, device=self.device, dtype=self.dtype)

    def randint(self, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(0, max(high, 1), shape, generator=self.gen, device=self.device)

    def full(self, shape: tuple[int, ...], value: float) -> torch.Tensor:
        return torch.full(shape, value, device=self.device, dtype=self.dtype)


Simplification = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


def _spread_scale(t: torch.Tensor) -> torch.Tensor:
    """A free element moves relative to max(|x_i|, rms(x)): a step means the same at 1e-8 or 1e8."""
    rms = float(t.pow(2).mean().sqrt()) if t.numel() else 0.0
    return t.abs().clamp_min(rms) if rms > 0 else torch.ones_like(t)


def _edge_distance(t: torch.Tensor) -> torch.Tensor:
    """An element of [0, 1] moves relative to min(x, 1 - x): its distance to the nearer end."""
    return torch.minimum(t, 1 - t).clamp_min(0)


def _in_closed_unit(t: torch.Tensor) -> bool:
    return bool(((t >= 0) & (t <= 1)).all())


def _off_the_ends(t: torch.Tensor) -> torch.Tensor:
    """Clamp into [eps, 1 - eps]: a descent step must not land on 0 or 1 exactly (log 0)."""
    eps = torch.finfo(t.dtype).eps
    return t.clamp(eps, 1 - eps)


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    regimes: Mapping[str, str]  # what each regime means here (every regime has an entry)
    build: Callable[[tuple[int, ...], BuildContext], torch.Tensor]
    plant: Callable[[float, int], float] | None = None  # (special value, classes) -> value in domain
    scalable: bool = False
    shiftable: bool = False
    simplify: tuple[Simplification, ...] = ()
    renormalise: Callable[[torch.Tensor], torch.Tensor] | None = None
    legalise: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    legal: Callable[[torch.Tensor, int | None], bool] = lambda t, classes: True
    is_float: bool = True
    shares_rows: bool = False  # duplicates regime: rows of one argument reappear in the next
    # Finite differences (explain's self-consistency): each element's own step scale, and
    # whether a moved tensor is still where the loss is defined (closed, unlike ``legal``:
    # a one-sided step may reach an end).  Descent (explain's impact): back into the domain.
    step_scale: Callable[[torch.Tensor], torch.Tensor] = _spread_scale
    contains: Callable[[torch.Tensor], bool] = lambda t: True
    project: Callable[[torch.Tensor], torch.Tensor] = lambda t: t

    def __post_init__(self) -> None:
        missing = set(REGIMES) - set(self.regimes)
        if missing:  # a table row that forgets a regime is a bug in this file
            raise AssertionError(f"domain {self.name} does not say what {sorted(missing)} means")


# --- helpers ------------------------------------------------------------------------

def round_significant(t: torch.Tensor, digits: int) -> torch.Tensor:
    """Round every element to ``digits`` significant decimal digits (0 and non-finite kept)."""
    nonzero = (t != 0) & torch.isfinite(t)
    exponent = torch.floor(torch.log10(torch.where(nonzero, t.abs(), torch.ones_like(t))))
    step = torch.pow(torch.tensor(10.0, dtype=t.dtype, device=t.device), exponent - (digits - 1))
    return torch.where(nonzero, torch.round(t / step) * step, t)


def _digits(k: int) -> Simplification:
    return (f"{k} significant digit{'s' if k > 1 else ''}", lambda t: round_significant(t, k))


ROUNDING: tuple[Simplification, ...] = (("integers", torch.round), _digits(1), _digits(2), _digits(3))


def _open_unit(t: torch.Tensor) -> torch.Tensor:
    """Clamp into the open interval (0, 1) as the dtype sees it: 1 - 1e-7 is 1.0 in float16."""
    if not t.is_floating_point():
        return t
    zero, one = torch.zeros((), dtype=t.dtype, device=t.device), torch.ones((), dtype=t.dtype, device=t.device)
    return t.clamp(torch.nextafter(zero, one), torch.nextafter(one, zero))


def _strictly_positive(t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    zero, one = torch.zeros((), dtype=t.dtype, device=t.device), torch.ones((), dtype=t.dtype, device=t.device)
    return torch.where(torch.isnan(t), t, t.clamp_min(torch.nextafter(zero, one)))


def renormalise_simplex(t: torch.Tensor) -> torch.Tensor:
    """Rows back onto the simplex (uniform where a row sums to 0)."""
    if t.ndim == 0:
        return torch.ones_like(t)
    total = t.sum(-1, keepdim=True)
    uniform = torch.full_like(t, 1.0 / max(t.shape[-1], 1))
    return torch.where(total > 0, t / total.clamp_min(torch.finfo(t.dtype).tiny), uniform)


def renormalise_sphere(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 0:
        return torch.ones_like(t)
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _rows_sum_to_one(t: torch.Tensor) -> bool:
    if not t.numel() or t.ndim == 0:
        return True
    tol = 1e-3 if torch.finfo(t.dtype).bits <= 16 else 1e-5
    return bool((t >= 0).all()) and bool(((t.double().sum(-1) - 1).abs() <= tol * t.shape[-1]).all())


def _unit_norm_rows(t: torch.Tensor) -> bool:
    if not t.numel() or t.ndim == 0:
        return True
    tol = 1e-2 if torch.finfo(t.dtype).bits <= 16 else 1e-4
    return bool(((t.double().norm(dim=-1) - 1).abs() <= tol).all())


def _one_hot(shape: tuple[int, ...], c: BuildContext) -> torch.Tensor:
    if not shape or shape[-1] == 0:
        return torch.ones(shape, dtype=c.dtype, device=c.device)
    hot = c.randint(shape[-1], shape[:-1])
    return torch.nn.functional.one_hot(hot, shape[-1]).to(c.dtype)


def _shared_row(shape: tuple[int, ...], c: BuildContext) -> torch.Tensor:
    """One random direction from the recipe's seed (the same for every argument)."""
    g = torch.Generator(device=c.device).manual_seed(int(c.shared_uniform * 2**31))
    return torch.randn(shape[-1:], generator=g, device=c.device, dtype=c.dtype).expand(shape)


def _checkerboard(shape: tuple[int, ...], c: BuildContext) -> torch.Tensor:
    """0/1 alternating along the last two dims (the highest spatial frequency), random phase."""
    if not shape:
        return c.full(shape, 1.0)
    idx = torch.zeros(shape, dtype=torch.long, device=c.device)
    for axis in range(max(len(shape) - 2, 0), len(shape)):
        view = [1] * len(shape)
        view[axis] = shape[axis]
        idx = idx + torch.arange(shape[axis], device=c.device).view(view)
    phase = int(c.shared_uniform < 0.5)
    return ((idx + phase) % 2).to(c.dtype)


# --- builders: what each regime means in each domain --------------------------------

def _build_real(shape, c: BuildContext) -> torch.Tensor:
    if c.regime == "constant":
        return c.full(shape, c.shared_normal * c.magnitude)
    return c.randn(shape) * c.magnitude + (c.offset if c.regime == "offset" else 0.0)


def _build_positive(shape, c: BuildContext) -> torch.Tensor:
    if c.regime == "constant":
        return c.full(shape, math.exp(c.shared_normal) * c.magnitude)
    z = c.randn(shape)
    if c.regime == "offset":
        return abs(c.offset) + torch.exp(z) * c.magnitude
    if c.regime == "extreme":  # spread over many orders of magnitude
        return torch.exp(z * math.log(c.magnitude))
    return torch.exp(z) * c.magnitude


def _build_unit(shape, c: BuildContext) -> torch.Tensor:
    r = c.regime
    if r == "constant":
        return c.full(shape, 1 / (1 + math.exp(-c.shared_normal)))
    if r == "tiny":  # probabilities near 0
        return (c.rand(shape) * 0.9 + 0.1) * c.magnitude
    if r == "offset":  # near 1, where 1 - p cancels
        eps = 10.0 ** (-2 - 5 * c.shared_uniform)
        return 1 - (c.rand(shape) * 0.9 + 0.1) * eps
    if r == "huge":
        return torch.sigmoid(c.randn(shape) * 10)
    if r == "extreme":  # within 1e-7 of 0 or 1, never equal (legalise keeps them off the ends)
        near = (c.rand(shape) * 0.9 + 0.1) * 1e-7
        return torch.where(c.randn(shape) > 0, 1 - near, near)
    return torch.sigmoid(c.randn(shape))


def _build_simplex(shape, c: BuildContext) -> torch.Tensor:
    if not shape:
        return torch.ones(shape, dtype=c.dtype, device=c.device)
    r = c.regime
    if r == "constant":
        return c.full(shape, 1.0 / max(shape[-1], 1))
    z = c.randn(shape)
    if r == "tiny":  # near-uniform rows
        return torch.softmax(z * c.magnitude, dim=-1)
    if r == "offset":  # sparse rows: exact zeros beside the largest weight
        p = torch.softmax(z, dim=-1)
        keep = (c.rand(shape) < 0.5) | (z == z.amax(-1, keepdim=True))
        return renormalise_simplex(p * keep)
    if r == "huge":  # near-one-hot: 1 - delta on one entry, delta spread over the others
        delta = 1.0 / c.magnitude
        return renormalise_simplex((1 - delta) * _one_hot(shape, c) + delta * torch.softmax(z, dim=-1))
    if r == "extreme":  # exactly one-hot
        return _one_hot(shape, c)
    return torch.softmax(z, dim=-1)


def _build_sphere(shape, c: BuildContext) -> torch.Tensor:
    if not shape:
        return torch.ones(shape, dtype=c.dtype, device=c.device)
    r = c.regime
    z = c.randn(shape)
    if r == "constant":
        return renormalise_sphere(_shared_row(shape, c).clone())
    if r == "tiny":  # nearly parallel rows
        return renormalise_sphere(_shared_row(shape, c) + c.magnitude * z)
    if r == "offset":  # clustered around one direction
        return renormalise_sphere(_shared_row(shape, c) + 0.01 * c.magnitude * z)
    if r == "huge":  # axis-aligned: exact zeros, random signs
        return _one_hot(shape, c) * torch.where(z[..., :1] < 0, -1.0, 1.0).to(c.dtype)
    if r == "extreme":  # antipodal: every row +e or -e
        return renormalise_sphere(_shared_row(shape, c) * torch.where(z[..., :1] < 0, -1.0, 1.0).to(c.dtype))
    return renormalise_sphere(z)


def _build_image(shape, c: BuildContext) -> torch.Tensor:
    r = c.regime
    grey = 0.1 + 0.8 * c.shared_uniform
    if r == "constant":  # flat
        return c.full(shape, grey)
    if r == "tiny":  # near-flat: a grey level plus noise of amplitude 1e-5..3e-3
        # sqrt: below ~1e-6 noise is finer than float32's spacing at 0.5, i.e. a flat image again.
        return (grey + (c.rand(shape) - 0.5) * 0.2 * math.sqrt(c.magnitude)).clamp(0, 1)
    if r == "offset":  # low contrast around a grey level
        return (grey + (c.rand(shape) - 0.5) * 0.02 * c.magnitude).clamp(0, 1)
    if r == "huge":  # high frequency: a 0/1 checkerboard
        return _checkerboard(shape, c)
    if r == "extreme":  # saturated: each image all 0 or all 1
        if not shape:
            return c.full(shape, float(c.shared_uniform < 0.5))
        per_item = (c.rand(shape[:1]) < 0.5).to(c.dtype)
        return per_item.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
    return c.rand(shape)


def _build_binary(shape, c: BuildContext) -> torch.Tensor:
    r = c.regime
    n = math.prod(shape)
    if r == "constant":  # one value for every element, the same in every binary argument
        return c.full(shape, float(c.shared_uniform < 0.5))
    if r in ("tiny", "offset"):  # one positive among negatives, or one negative among positives
        t = torch.zeros(n, dtype=c.dtype, device=c.device)
        if n:
            t[int(c.randint(n, ()))] = 1.0
        t = t.view(shape)
        return t if r == "tiny" else 1 - t
    if r == "extreme":  # empty or full masks (0/0 in Dice; log(0) beside saturated logits)
        return c.full(shape, float(c.shared_uniform >= 0.5))
    p = (0.05 if c.shared_uniform < 0.5 else 0.95) if r == "huge" else 0.5
    return (c.rand(shape) < p).to(c.dtype)


def _build_counts(shape, c: BuildContext) -> torch.Tensor:
    """Event counts 0, 1, 2, ... as floats (Poisson targets): log(k!) and its Stirling
    approximation differ from k = 2 on, which a 0/1 target never shows."""
    r = c.regime
    if r == "constant":
        return c.full(shape, float(round(math.exp(c.shared_normal) * c.magnitude)))
    if r == "tiny":  # rare events: mostly zeros
        rate = torch.full(shape, c.magnitude, dtype=c.dtype, device=c.device)
    elif r == "offset":  # large counts with a small spread
        rate = abs(c.offset) + c.rand(shape) * 10
    elif r == "huge":
        rate = torch.exp(c.randn(shape)) * c.magnitude
    elif r == "extreme":  # zeros beside counts in the thousands
        rate = torch.where(c.rand(shape) < 0.5, torch.zeros(shape, dtype=c.dtype, device=c.device), c.full(shape, c.magnitude * 100))
    else:
        rate = torch.exp(c.randn(shape)) * c.magnitude
    return torch.poisson(rate, generator=c.gen)


def _build_labels(shape, c: BuildContext) -> torch.Tensor:
    k = max(c.classes or 1, 1)
    r = c.regime
    t = c.randint(k, shape)
    if r == "constant":
        return torch.full_like(t, min(int(c.shared_uniform * k), k - 1))
    if r == "tiny":
        return torch.zeros_like(t)
    if r == "offset":
        return torch.full_like(t, k - 1)
    if r == "huge":  # concentrated: ~90% in one class
        major = min(int(c.shared_uniform * k), k - 1)
        return torch.where(c.rand(shape) < 0.9, torch.full_like(t, major), t)
    if r == "extreme":  # only the first and the last class; the others are empty
        return torch.where(c.rand(shape) < 0.5, torch.zeros_like(t), torch.full_like(t, k - 1))
    return t


# --- the table ----------------------------------------------------------------------

def _same_as(**overrides: str) -> dict[str, str]:
    base = {
        "standard": "as drawn",
        "duplicates": "repeated rows",
        "constant": "every element equal",
        "tiny": "magnitude 1e-8..1e-3",
        "offset": "a large common offset plus a small spread",
        "huge": "magnitude 1e3..1e8",
        "extreme": "magnitude 30..1e4",
        "special": "planted special values",
    }
    base.update(overrides)
    return base


_REAL_TEXT = _same_as(standard="N(0, 1) times a magnitude 0.1..10", constant="one value for every element (and argument)")

DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain(
            "real", "any real number", _REAL_TEXT, _build_real,
            plant=lambda v, k: v, scalable=True, shiftable=True,
            simplify=(("zeros", torch.zeros_like), *ROUNDING), shares_rows=True,
        ),
        Domain(
            "logits", "unnormalised log-probabilities", _same_as(**{**_REAL_TEXT, "extreme": "saturating logits, magnitude 30..1e4"}), _build_real,
            plant=lambda v, k: v, scalable=True, shiftable=True,
            simplify=(("zeros", torch.zeros_like), *ROUNDING), shares_rows=True,
        ),
        Domain(
            "positive", "strictly positive reals",
            _same_as(standard="exp(N(0, 1)) times a magnitude", offset="a large positive offset plus a small spread",
                     extreme="spread over many orders of magnitude", special="planted values, made positive"),
            _build_positive, plant=lambda v, k: abs(v), scalable=True, simplify=ROUNDING,
            legalise=_strictly_positive, legal=lambda t, k: bool((t > 0).all()),
            step_scale=torch.abs, contains=lambda t: bool((t > 0).all()), project=lambda t: t.clamp_min(torch.finfo(t.dtype).tiny),
        ),
        Domain(
            "unit", "probabilities in (0, 1)",
            _same_as(standard="sigmoid(N(0, 1))", constant="one probability everywhere", tiny="probabilities near 0 (1e-9..1e-3)",
                     offset="probabilities near 1 (1 - 1e-7..1 - 1e-2)", huge="sigmoid of large logits: many near 0 or 1",
                     extreme="within 1e-7 of 0 or 1, never equal", special="planted values, kept inside (0, 1)"),
            _build_unit, plant=lambda v, k: min(abs(v), 1.0), simplify=ROUNDING,
            legalise=_open_unit, legal=lambda t, k: bool(((t > 0) & (t < 1)).all()),
            step_scale=_edge_distance, contains=_in_closed_unit, project=_off_the_ends,
        ),
        Domain(
            "simplex", "non-negative, sums to 1 along the last dim",
            _same_as(standard="softmax(N(0, 1))", constant="uniform rows", tiny="near-uniform rows",
                     offset="sparse rows: exact zeros", huge="near-one-hot rows", extreme="one-hot rows",
                     special="planted values, renormalised"),
            _build_simplex, plant=lambda v, k: min(abs(v), 1.0),
            simplify=(("uniform rows", lambda t: renormalise_simplex(torch.ones_like(t))),),
            renormalise=renormalise_simplex, legal=lambda t, k: _rows_sum_to_one(t),
            step_scale=_edge_distance, contains=_in_closed_unit, project=lambda t: renormalise_simplex(t.clamp_min(0)),
        ),
        Domain(
            "sphere", "unit vectors along the last dim",
            _same_as(standard="normalised N(0, 1)", constant="one direction for every row", tiny="nearly parallel rows",
                     offset="rows clustered around one direction", huge="axis-aligned rows", extreme="antipodal rows (+e, -e)",
                     special="as standard"),
            _build_sphere, renormalise=renormalise_sphere, legal=lambda t, k: _unit_norm_rows(t), shares_rows=True,
            project=renormalise_sphere,
        ),
        Domain(
            "image", "pixel intensities in [0, 1]",
            _same_as(standard="uniform in [0, 1]", duplicates="repeated images, some shared between arguments",
                     constant="flat: one grey level", tiny="near-flat: a grey level plus noise of 1e-5..3e-3",
                     offset="low contrast: a grey level plus noise of 1e-3..1e-1", huge="high frequency: a 0/1 checkerboard",
                     extreme="saturated: each image all 0 or all 1", special="planted 0 and 1 pixels"),
            _build_image, plant=lambda v, k: min(abs(v), 1.0), simplify=ROUNDING,
            legal=lambda t, k: bool(((t >= 0) & (t <= 1)).all()), shares_rows=True,
            step_scale=_edge_distance, contains=_in_closed_unit, project=_off_the_ends,
        ),
        Domain(
            "binary", "exactly 0.0 or 1.0",
            _same_as(standard="Bernoulli(0.5)", constant="all 0 or all 1", tiny="a single 1 among 0s", offset="a single 0 among 1s",
                     huge="imbalanced: 5% or 95% ones", extreme="all 0 or all 1 (empty or full masks)", special="planted 0, -0 and 1"),
            _build_binary, plant=lambda v, k: 1.0 if abs(v) >= 0.5 else math.copysign(0.0, v),
            legal=lambda t, k: bool(((t == 0) | (t == 1)).all()),
            step_scale=_edge_distance, contains=_in_closed_unit,
        ),
        Domain(
            "counts", "non-negative integer counts, as floats",
            _same_as(standard="Poisson(exp(N(0, 1)) times a magnitude 0.1..10)", constant="one count everywhere",
                     tiny="rare events: Poisson of a rate 1e-8..1e-3, mostly 0", offset="large counts (1e3..1e7) with a small spread",
                     huge="Poisson of rates 1e3..1e8", extreme="zeros beside counts in the thousands", special="planted 0, 1 and huge counts"),
            _build_counts, plant=lambda v, k: float(round(abs(v))),
            simplify=(("zeros", torch.zeros_like), ("integers", torch.round), ("1 significant digit", lambda t: round_significant(t, 1))),
            legal=lambda t, k: bool(((t >= 0) & (t == torch.round(t))).all()),
        ),
        Domain(
            "labels", "integer class labels in [0, C)",
            _same_as(standard="uniform over the classes", constant="every sample in one class", tiny="every sample in class 0",
                     offset="every sample in the last class", huge="~90% of samples in one class",
                     extreme="only the first and the last class", special="planted first and last classes"),
            _build_labels, plant=lambda v, k: float(k - 1 if abs(v) >= 0.5 else 0),
            simplify=(("class 0", torch.zeros_like),),
            legal=lambda t, k: k is None or not t.numel() or bool(((t >= 0) & (t < k)).all()),
            is_float=False,
        ),
    )
}
SCALABLE = tuple(n for n, d in DOMAINS.items() if d.scalable)
PLANTABLE = tuple(n for n, d in DOMAINS.items() if d.plant is not None)
