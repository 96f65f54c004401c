"""Spec inference: with no ``--spec``, guess a preset from names and a probing call.

Candidates are ordered by hints in the implementations' names and parameter names
(``bce`` suggests binary classification, ``sinkhorn`` point clouds, ...), filtered by
how many positional arguments the first implementation accepts, and the first preset
on which *every* implementation returns a finite scalar tensor wins.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch

from .errors import LosscmpError
from .generate import build_case, probe_recipe
from .load import Implementation
from .run import call
from .spec import PRESETS, Spec, preset

HINTS = [
    (("bce", "binary", "sigmoid", "logit", "focal"), "binary"),
    (("cross_entropy", "crossentropy", "nll", "softmax", "label_smooth", "multiclass"), "classification"),
    (("sinkhorn", "samplesloss", "wasserstein", "chamfer", "mmd", "energy", "hausdorff", "emd", "_ot"), "points"),
    (("mse", "l1", "huber", "smooth", "regress", "mae", "quantile"), "regression"),
    (("dice", "iou", "jaccard", "tversky", "segment"), "segmentation"),
    (("kl", "js", "diverg", "distribution", "hellinger"), "distributions"),
    (("ssim", "psnr", "image", "perceptual"), "images"),
]
DEFAULT_ORDER = ["points", "classification", "binary", "regression", "distributions", "segmentation", "images", "weighted-points"]


class InferenceError(LosscmpError, ValueError):
    """No preset fits."""


def _positional_range(fn) -> tuple[int, int] | None:
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        return None
    required = sum(p.default is p.empty for p in params)
    return required, len(params)


def candidates(impls: Sequence[Implementation]) -> list[str]:
    names = " ".join(i.ref.text.lower() for i in impls)
    first = impls[0].fn
    target = first.forward if isinstance(first, torch.nn.Module) else first
    try:
        names += " " + " ".join(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        pass
    order: list[str] = []
    for words, name in HINTS:
        if any(w in names for w in words) and name not in order:
            order.append(name)
    order += [n for n in DEFAULT_ORDER if n not in order]
    arity = _positional_range(first)
    if arity is not None:
        lo, hi = arity
        order = [n for n in order if lo <= len(preset(n).args) <= hi] or order
    return order


def infer_spec(impls: Sequence[Implementation], *, dtype: torch.dtype = torch.float32, device: str = "cpu", run=None) -> Spec:
    """``run(impl, spec, case) -> Outcome`` makes the probing calls (default: in-process)."""
    run = run or (lambda impl, spec, case: call(impl.fn, spec, case))
    tried = []
    for name in candidates(impls):
        spec = preset(name)
        case = build_case(spec, probe_recipe(spec), dtype=dtype, device=device)
        outcomes = [run(i, spec, case) for i in impls]
        if all(o.status == "ok" and bool(torch.isfinite(o.value).all()) for o in outcomes):
            return spec
        tried.append(name)
    raise InferenceError(f"no preset fits these implementations (tried {', '.join(tried)}); give --spec explicitly (presets: {', '.join(PRESETS)})")
