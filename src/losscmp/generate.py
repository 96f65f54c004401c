"""Test-case generation: Hypothesis draws a *recipe*, torch builds the tensors.

Drawing 30,000 floats one by one through Hypothesis is slow and shrinks badly; drawing
a recipe (sizes, numeric regime, magnitude, layout, a seed, a few planted values) and
expanding it with ``torch.Generator`` costs microseconds at any size, and stays exactly
reproducible from the recipe.  ``recipes(spec)`` and ``cases(spec)`` are public
strategies for use in your own ``@given`` tests::

    @given(losscmp.generate.cases(losscmp.spec.preset("binary")))
    def test_my_bce(case): ...

What a regime means for each argument (near-flat images, near-one-hot rows, labels in
one class) is its domain's business: :data:`losscmp.domains.DOMAINS`.  ``REGIMES`` runs
from the mildest to the most extreme; ``select_regimes`` narrows it for ``--regimes`` /
``--exclude-regimes``.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from hypothesis import strategies as st

from .domains import DOMAINS, PLANTABLE, REGIMES, BuildContext, renormalise_simplex, renormalise_sphere
from .model import Case, Recipe  # noqa: F401  re-exported: moved to model
from .spec import Spec, SpecError

LAYOUTS = ("contiguous", "transposed", "strided")
SPECIAL_VALUES = (0.0, -0.0, 1e-30, 1e30, 1.0)


class RegimeError(SpecError):
    """An unknown or empty selection of regimes; the message is one line."""


def select_regimes(include: str | None = None, exclude: str | None = None) -> tuple[str, ...]:
    """``--regimes standard,tiny`` / ``--exclude-regimes duplicates``: the regimes to draw, mildest first."""

    def names(text: str | None, flag: str) -> set[str]:
        got = {w.strip() for w in (text or "").split(",") if w.strip()}
        unknown = sorted(got - set(REGIMES))
        if unknown:
            raise RegimeError(f"{flag}: unknown regime{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (known: {', '.join(REGIMES)})")
        return got

    wanted = names(include, "--regimes") if include is not None else set(REGIMES)
    if include is not None and not wanted:
        raise RegimeError("--regimes: name at least one regime (known: " + ", ".join(REGIMES) + ")")
    dropped = names(exclude, "--exclude-regimes")
    chosen = tuple(r for r in REGIMES if r in wanted and r not in dropped)
    if not chosen:
        raise RegimeError(f"no regime left to draw from after excluding {', '.join(sorted(dropped))}")
    return chosen


def _hi(spec: Spec, dim: str, max_size: int | None) -> int:
    lo, hi = spec.size_range(dim)
    return hi if max_size is None else max(lo, min(hi, max_size))


def _sizes(spec: Spec, max_size: int | None) -> st.SearchStrategy[tuple[tuple[str, int], ...]]:
    parts = []
    for dim in spec.dims:
        lo, hi = spec.size_range(dim)
        if max_size is not None:
            hi = max(lo, min(hi, max_size))
        # Size-1 (and the minimum) dims are where broadcasting and reductions go wrong.
        parts.append(st.one_of(st.just(lo), st.integers(lo, hi)) if hi > lo else st.just(lo))
    return st.tuples(*parts).map(lambda vals: tuple(zip(spec.dims, vals)))


def _log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: float(10.0**e))


# Inputs, their gradients, each side's intermediates and the float64 oracle's copies:
# a case needs several times its inputs' bytes.
WORKING_SET_FACTOR = 4


def largest_case_sizes(spec: Spec, max_size: int | None = None) -> dict[str, int]:
    return {dim: _hi(spec, dim, max_size) for dim in spec.dims}


def case_bytes(spec: Spec, sizes: dict[str, int], dtype: torch.dtype) -> int:
    """Bytes of a case's input tensors (labels are int64)."""
    return sum(math.prod(spec.shape(a, sizes)) * (torch.empty((), dtype=dtype).element_size() if a.is_float else 8) for a in spec.args)


def available_memory(device: str) -> int | None:
    """Bytes the case's device can still give, or None where asking would cost something:
    a CUDA query before the run would initialise CUDA and stop ``--jobs`` from forking."""
    if device.startswith("cuda"):
        if not torch.cuda.is_initialized():
            return None
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_fits(spec: Spec, *, dtype: torch.dtype, device: str, max_size: int | None) -> None:
    """Refuse, in one line, a spec whose largest case cannot fit: the OS would kill the
    run (losscmp with it) instead of letting it report."""
    sizes = largest_case_sizes(spec, max_size)
    need = WORKING_SET_FACTOR * case_bytes(spec, sizes, dtype)
    free = available_memory(device)
    if free is not None and need > free:
        # Literal dims (x: 100000 100000 real) have no name: the shapes say what is too big.
        at = (", ".join(f"{d}={n}" for d, n in sizes.items()) if sizes
              else ", ".join(f"{a.name}: {'x'.join(map(str, spec.shape(a, sizes)))}" for a in spec.args))
        # A cap never goes below a dim's lower bound, nor touches a literal dim.
        cappable = any(spec.size_range(d)[0] < n for d, n in sizes.items())
        raise SpecError(
            f"the largest case ({at}) needs about {need / 1e9:.1f} GB with gradients and intermediates, "
            f"more than the {free / 1e9:.1f} GB free on {device}; lower the sizes in the spec"
            + (" or cap them (--max-size N, max_size=N)" if cappable else "")
        )


def recipes(
    spec: Spec,
    *,
    regimes: tuple[str, ...] = tuple(REGIMES),
    allow_nonfinite: bool = False,
    max_size: int | None = None,
) -> st.SearchStrategy[Recipe]:
    """Hypothesis strategy of case recipes for ``spec``."""

    unknown = [r for r in regimes if r not in REGIMES]
    if unknown or not regimes:
        raise RegimeError(f"unknown regime(s) {', '.join(map(str, unknown))} (known: {', '.join(REGIMES)})" if unknown else "no regime to draw from")
    regimes = tuple(str(getattr(r, "value", r)) for r in regimes)

    @st.composite
    def build(draw: st.DrawFn) -> Recipe:
        sizes = draw(_sizes(spec, max_size))
        regime = draw(st.sampled_from(regimes))
        if regime == "duplicates":  # repeated rows need two rows: a size-1 dim would make it a no-op
            sizes = tuple((d, max(n, min(2, _hi(spec, d, max_size)))) for d, n in sizes)
        magnitude = {
            "tiny": _log_uniform(1e-8, 1e-3),
            "huge": _log_uniform(1e3, 1e8),
            "extreme": _log_uniform(30.0, 1e4),
        }.get(regime, _log_uniform(0.1, 10.0))
        offset = 0.0
        if regime == "offset":
            offset = draw(st.sampled_from([-1.0, 1.0])) * draw(_log_uniform(1e3, 1e7))
        planted: tuple = ()
        if regime == "special":
            names: list[str | None] = [a.name for a in spec.args if a.domain in PLANTABLE] or [None]
            planted = tuple(
                draw(st.lists(st.tuples(st.sampled_from(names), st.floats(0, 0.999), st.sampled_from(SPECIAL_VALUES)), min_size=1, max_size=3))
            )
        return Recipe(
            sizes=sizes,
            regime=regime,
            magnitude=draw(magnitude),
            offset=offset,
            layout=draw(st.sampled_from(LAYOUTS)),
            seed=draw(st.integers(0, 2**31 - 1)),
            planted=planted,
            nonfinite=allow_nonfinite and draw(st.booleans()),
        )

    return build()


def cases(spec: Spec, *, dtype: torch.dtype = torch.float32, device: str = "cpu", **kw: Any) -> st.SearchStrategy[Case]:
    """Hypothesis strategy of concrete cases (recipes built into tensors)."""
    return recipes(spec, **kw).map(lambda r: build_case(spec, r, dtype=dtype, device=device))


def build_case(spec: Spec, recipe: Recipe, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Case:
    """Expand a recipe into tensors, deterministically, directly on ``device``.

    What the recipe's regime means for each argument is its domain's business
    (:data:`losscmp.domains.DOMAINS`); this function only wires the pieces together.
    """
    sizes = dict(recipe.sizes)
    gen = torch.Generator(device=device).manual_seed(recipe.seed)
    # Draws shared by every argument (the grey of two flat images, the value of two constant clouds).
    shared = torch.Generator().manual_seed(recipe.seed)
    shared_normal = float(torch.randn((), generator=shared, dtype=torch.float64))
    shared_uniform = float(torch.rand((), generator=shared, dtype=torch.float64))
    # Generate in at least float32: randn has no half kernels on every device.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    tensors: dict[str, torch.Tensor] = {}
    for arg in spec.args:
        domain = DOMAINS[arg.domain]
        classes = sizes[arg.classes] if arg.classes else None
        ctx = BuildContext(recipe.regime, recipe.magnitude, recipe.offset, gen, work, device, shared_normal, shared_uniform, classes)
        t = domain.build(spec.shape(arg, sizes), ctx)
        if recipe.regime == "duplicates":
            t = _duplicate_rows(t, gen)
            if domain.renormalise:  # repeated weights, but still a distribution
                t = domain.renormalise(t)
        for name, pos, value in recipe.planted:
            if name == arg.name and t.numel() and domain.plant is not None:
                t = t.clone()
                t.view(-1)[int(pos * t.numel())] = domain.plant(value, classes or 0)
                if domain.renormalise:  # a zero weight, say, then back onto the simplex
                    t = domain.renormalise(t)
        if recipe.nonfinite and t.numel() and arg.domain in ("real", "logits"):
            t.view(-1)[int(torch.randint(0, t.numel(), (), generator=gen, device=device))] = float("nan")
        tensors[arg.name] = t
    if recipe.regime == "duplicates":
        _share_rows(spec, tensors, gen)
    tensors = {
        a.name: with_layout(DOMAINS[a.domain].legalise(_cast(tensors[a.name], dtype, recipe.nonfinite)), recipe.layout) for a in spec.args
    }
    return Case(tensors=tensors, sizes=sizes, params=dict(spec.params), recipe=recipe)


def _cast(t: torch.Tensor, dtype: torch.dtype, nonfinite: bool) -> torch.Tensor:
    """Cast to the test dtype; values past its range saturate rather than become inf
    (float16 tops out at 65504), unless NaN/inf were asked for."""
    if not t.is_floating_point():
        return t
    if not nonfinite and dtype.is_floating_point:
        big = torch.finfo(dtype).max
        t = t.clamp(-big, big)
    return t.to(dtype)


def renormalise(t: torch.Tensor, domain: str) -> torch.Tensor:
    """Project back onto the simplex or the unit sphere (kept for callers of the old name)."""
    return renormalise_simplex(t) if domain == "simplex" else renormalise_sphere(t)


def _duplicate_rows(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Copy some rows (along dim 0) onto others: coincident points inside one argument."""
    if t.ndim == 0 or t.shape[0] < 2:
        return t
    n = t.shape[0]
    k = int(torch.randint(1, n, (), generator=gen, device=t.device))
    src = torch.randint(0, n, (k,), generator=gen, device=t.device)
    # Never onto itself: with two rows, a copy of row 0 onto row 0 would repeat nothing.
    dst = (src + torch.randint(1, n, (k,), generator=gen, device=t.device)) % n
    t = t.clone()
    t[dst] = t[src]
    return t


def _share_rows(spec: Spec, tensors: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """Make rows of one argument reappear in another of the same kind (x and y clouds)."""
    floats = [a for a in spec.args if DOMAINS[a.domain].shares_rows]
    for a, b in zip(floats, floats[1:]):
        ta, tb = tensors[a.name], tensors[b.name]
        # Same domain only: a real row copied into a sphere argument would leave the sphere.
        if a.domain != b.domain or ta.ndim == 0 or tb.ndim == 0:
            continue
        if ta.shape[1:] == tb.shape[1:] and ta.shape[0] and tb.shape[0]:
            k = min(ta.shape[0], tb.shape[0])
            k = int(torch.randint(1, k + 1, (), generator=gen, device=ta.device))
            tb[:k] = ta[:k]


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values, different memory layout (non-contiguous inputs catch view bugs)."""
    if layout == "transposed" and t.ndim >= 2:
        return t.mT.contiguous().mT
    if layout == "strided" and t.ndim >= 1 and t.shape[-1] > 0:
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        buf[..., ::2] = t
        return buf[..., ::2]
    return t


def clone_like(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same values *and* the same strides as ``t``."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


# Inputs drawn in every run (unless --regimes narrows the search), because a random draw
# almost never lands on them: all zeros (the slope of a norm or sqrt at 0), prediction
# equal to target (a zero residual, coincident clouds), and masks empty in some samples
# (Dice's 0/0).  Each is a tame probe-sized case with one thing made degenerate.
DEGENERATE = ("zeros", "identical", "empty masks")
ZERO_DOMAINS = ("real", "logits", "image", "binary", "counts")


def degenerate_cases(spec: Spec, seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> list[Case]:
    """The :data:`DEGENERATE` cases for ``spec`` (those that change anything), in that order."""
    base_recipe = probe_recipe(spec, seed)
    base = build_case(spec, base_recipe, dtype=dtype, device=device)
    out = []
    for name in DEGENERATE:
        tensors = _degenerate(spec, base, name)
        if any(not torch.equal(tensors[k], base.tensors[k]) for k in tensors):
            tensors = {a.name: with_layout(tensors[a.name].contiguous(), base_recipe.layout) for a in spec.args}
            out.append(Case(tensors=tensors, sizes=dict(base.sizes), params=dict(spec.params), recipe=replace(base_recipe, regime=name)))
    return out


def _degenerate(spec: Spec, base: Case, name: str) -> dict[str, torch.Tensor]:
    tensors = dict(base.tensors)
    if name == "zeros":
        for a in spec.args:
            if a.domain in ZERO_DOMAINS:
                tensors[a.name] = torch.zeros_like(tensors[a.name])
    elif name == "identical":  # prediction == target: of two same-shaped arguments, one takes the other's values
        done: set[str] = set()
        for i, a in enumerate(spec.args):
            for b in spec.args[i + 1:]:
                if not (a.is_float and b.is_float and a.dims == b.dims) or {a.name, b.name} & done:
                    continue
                src, dst = (a, b) if a.domain == b.domain or _holds(b.domain, a.domain) else (b, a)
                if src.domain == dst.domain or _holds(dst.domain, src.domain):
                    values = tensors[src.name].clone()
                    if dst.domain == "unit":  # 0/1 targets: the nearest probabilities a float tells apart, not denormals
                        eps = torch.finfo(values.dtype).eps
                        values = values.clamp(eps, 1 - eps)
                    tensors[dst.name] = DOMAINS[dst.domain].legalise(values)
                    done |= {a.name, b.name}
    elif name == "empty masks":  # every other sample's mask empty (samples along the first dim)
        for a in spec.args:
            t = tensors[a.name]
            if a.domain == "binary" and t.ndim >= 2:
                t = t.clone()
                t[::2] = 0
                tensors[a.name] = t
    return tensors


def _holds(domain: str, source: str) -> bool:
    """Values of ``source`` are (after legalising) values of ``domain``: a prediction in
    [0, 1] can equal a 0/1 target."""
    return (domain, source) in {("unit", "binary"), ("image", "binary"), ("real", "binary"), ("logits", "real"),
                                ("real", "logits"), ("real", "unit"), ("real", "image")}


def probe_recipe(spec: Spec, seed: int = 0, size: int = 4) -> Recipe:
    """A tame case, every dim about ``size`` (within its range): used to check that
    implementations accept the spec."""
    sizes = []
    for dim in spec.dims:
        lo, hi = spec.size_range(dim)
        sizes.append((dim, max(lo, min(hi, size))))
    return Recipe(sizes=tuple(sizes), seed=seed)
