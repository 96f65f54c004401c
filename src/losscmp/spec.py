"""Input specifications: which tensors a loss takes, their symbolic dims and domains.

A spec is the contract between losscmp and the implementations under test.  Each
argument is passed positionally, in spec order; fixed keyword parameters follow.

Compact text form (``--spec``), items separated by ``;``::

    x: N D real grad; y: M D real; N=1..64; D=3; blur=0.05

* ``name: DIM DIM ... DOMAIN [grad]`` — a tensor argument.  A dim is a symbolic name
  (shared by every argument that uses it) or a literal size.  ``labels(C)`` draws
  integer labels in ``[0, C)`` where ``C`` is another dim.
* ``DIM=lo..hi`` or ``DIM=n`` — the range of sizes drawn for a symbolic dim.
* ``output=any`` — the loss may return a non-scalar tensor (its sum is differentiated);
  the default, ``output=scalar``, makes a non-scalar return a finding.
* ``name=literal`` for any other name — a keyword parameter passed on every call.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from .domains import DOMAINS
from .errors import LosscmpError, did_you_mean, shown
from .literals import LITERAL_ERRORS, literal
from .load import load_object

DEFAULT_SIZE_RANGE = (1, 32)
MAX_DIMS = 64  # torch's limit on a tensor's dims


class SpecError(LosscmpError, ValueError):
    """A spec that does not parse or does not make sense."""


@dataclass(frozen=True)
class Arg:
    name: str
    dims: tuple[str, ...]
    domain: str = "real"
    grad: bool = False
    classes: str | None = None  # for ``labels``: the dim whose size bounds the labels

    @property
    def is_float(self) -> bool:
        return DOMAINS[self.domain].is_float

    def text(self) -> str:
        domain = f"labels({self.classes})" if self.domain == "labels" else self.domain
        return " ".join([f"{self.name}:", *self.dims, domain] + (["grad"] if self.grad else []))


@dataclass(frozen=True)
class Spec:
    args: tuple[Arg, ...]
    sizes: tuple[tuple[str, int, int], ...] = ()
    params: tuple[tuple[str, Any], ...] = ()
    scalar: bool = True  # the loss must return a single number
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        names = [a.name for a in self.args]
        if len(set(names)) != len(names):
            raise SpecError(f"duplicate argument names in spec: {names}")
        if not self.args:
            raise SpecError("a spec needs at least one tensor argument")
        for a in self.args:
            if len(a.dims) > MAX_DIMS:
                raise SpecError(f"{a.name}: {len(a.dims)} dims; torch tensors have at most {MAX_DIMS}")
            if a.domain not in DOMAINS:
                raise SpecError(f"unknown domain {a.domain!r} for {a.name} (choose from {', '.join(DOMAINS)})")
            if a.domain == "labels" and (a.classes is None or a.classes not in self.dims):
                raise SpecError(f"{a.name}: labels({a.classes}) needs {a.classes!r} to be a dim of another argument")
        for dim, lo, hi in self.sizes:
            if not 0 < lo <= hi:
                raise SpecError(f"size range {dim}={lo}..{hi} is empty or not positive")

    @property
    def dims(self) -> tuple[str, ...]:
        """Symbolic dims in order of first appearance."""
        seen: list[str] = []
        for a in self.args:
            for d in a.dims:
                if not d.isdigit() and d not in seen:
                    seen.append(d)
        return tuple(seen)

    def size_range(self, dim: str) -> tuple[int, int]:
        for d, lo, hi in self.sizes:
            if d == dim:
                return lo, hi
        lo, hi = DEFAULT_SIZE_RANGE
        # A labels dim needs at least two classes to mean anything.
        if any(a.classes == dim for a in self.args):
            lo = max(lo, 2)
        return lo, hi

    def arg(self, name: str) -> Arg:
        for a in self.args:
            if a.name == name:
                return a
        raise KeyError(name)

    def shape(self, arg: Arg, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(int(d) if d.isdigit() else sizes[d] for d in arg.dims)

    @property
    def grad_args(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args if a.grad and a.is_float)

    def with_sizes(self, **ranges: tuple[int, int]) -> Spec:
        kept = tuple(s for s in self.sizes if s[0] not in ranges)
        return replace(self, sizes=kept + tuple((d, lo, hi) for d, (lo, hi) in ranges.items()))

    def text(self) -> str:
        items = [a.text() for a in self.args]
        for dim in self.dims:
            lo, hi = self.size_range(dim)
            items.append(f"{dim}={lo}" if lo == hi else f"{dim}={lo}..{hi}")
        items += [f"{k}={_literal_text(v)}" for k, v in self.params]
        if not self.scalar:
            items.append("output=any")
        return "; ".join(items)


def _literal_text(value: Any) -> str:
    """repr, except that infinities are written so that ast.literal_eval reads them back."""
    if isinstance(value, float) and math.isinf(value):
        return "1e999" if value > 0 else "-1e999"
    return repr(value)


_ARG_RE = re.compile(r"^\s*([A-Za-z_]\w*)\s*:\s*(.+?)\s*$")
_ASSIGN_RE = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(.+?)\s*$")
_RANGE_RE = re.compile(r"^(\d+)\s*(?:\.\.\s*(\d+))?$")
_LABELS_RE = re.compile(r"^labels\(\s*([A-Za-z_]\w*)\s*\)$")


def parse_spec(text: str) -> Spec:
    """Parse the compact text form (see the module docstring)."""
    args: list[Arg] = []
    assigns: list[tuple[str, str]] = []
    for raw in text.split(";"):
        if not raw.strip():
            continue
        m = _ASSIGN_RE.match(raw)
        if m:
            assigns.append((m.group(1), m.group(2)))
            continue
        m = _ARG_RE.match(raw)
        if not m:
            raise SpecError(f"cannot parse spec item {shown(raw.strip())} (expected 'name: DIMS domain [grad]' or 'NAME=value')")
        args.append(_parse_arg(m.group(1), m.group(2).split()))
    if not args:
        raise SpecError(f"spec {shown(text)} names no tensor argument")
    dims = {d for a in args for d in a.dims if not d.isdigit()}
    sizes, params = [], []
    scalar = True
    for name, value in assigns:
        if name == "output":
            if value not in ("scalar", "any"):
                raise SpecError(f"output={shown(value, quote=False)}: expected 'scalar' (the default) or 'any'")
            scalar = value == "scalar"
        elif name in dims:
            r = _RANGE_RE.match(value)
            if not r or max(len(g or "") for g in r.groups()) > 18:  # 18 digits: far past any tensor, still a machine integer
                raise SpecError(f"size of {name} must be 'n' or 'lo..hi' (whole numbers), got {shown(value)}")
            lo = int(r.group(1))
            sizes.append((name, lo, int(r.group(2) or lo)))
        else:
            try:
                params.append((name, literal(value)))
            except LITERAL_ERRORS:
                raise SpecError(f"parameter {name}={shown(value, quote=False)} is not a Python literal of sane size and depth") from None
    return Spec(tuple(args), tuple(sizes), tuple(params), scalar=scalar)


def _parse_arg(name: str, words: list[str]) -> Arg:
    grad = False
    if words and words[-1] == "grad":
        grad, words = True, words[:-1]
    if not words:
        raise SpecError(f"{name}: missing domain")
    domain_word, dims = words[-1], tuple(words[:-1])
    classes = None
    m = _LABELS_RE.match(domain_word)
    if m:
        domain, classes = "labels", m.group(1)
    elif domain_word in DOMAINS:
        domain = domain_word
    else:
        raise SpecError(f"{name}: unknown domain {shown(domain_word)} (choose from {', '.join(DOMAINS)})")
    for d in dims:
        # ASCII digits only ('²'.isdigit() is true, int('²') fails) and 18 at most (int() of 5,000 digits fails).
        if not (re.fullmatch(r"[0-9]{1,18}", d) or re.fullmatch(r"[A-Za-z_]\w*", d)):
            raise SpecError(f"{name}: bad dim {shown(d)}")
    if domain == "labels" and grad:
        raise SpecError(f"{name}: integer labels cannot require gradients")
    return Arg(name, dims, domain, grad, classes)


PRESETS: dict[str, str] = {
    "points": "x: N D real grad; y: M D real grad; N=1..64; M=1..64; D=1..3",
    "weighted-points": "a: N simplex grad; x: N D real grad; b: M simplex; y: M D real grad; N=1..64; M=1..64; D=1..3",
    "classification": "input: B C logits grad; target: B labels(C); B=1..32; C=2..10",
    "binary": "input: B logits grad; target: B binary; B=1..64",
    "regression": "input: B real grad; target: B real; B=1..64",
    # Poisson NLL and friends: a log-rate (or rate) against event counts 0, 1, 2, ...
    "counts": "input: B real grad; target: B counts; B=1..64",
    # Channels first, as MONAI, segmentation-models-pytorch and torchvision expect.
    "segmentation": "input: B C H W unit grad; target: B C H W binary; B=1..3; C=1..3; H=1..16; W=1..16",
    "segmentation-no-channel": "input: B H W unit grad; target: B H W binary; B=1..3; H=1..16; W=1..16",
    # H, W >= 11: room for the 11x11 window of SSIM-style losses; B and C small to stay cheap.
    "images": "x: B C H W image grad; y: B C H W image; B=1..2; C=1..3; H=11..32; W=11..32",
    # KL(p || q) with q the model's output: the gradient flows into q, not the target p.
    "distributions": "p: B K simplex; q: B K simplex grad; B=1..8; K=2..16",
}
PRESET_ALIASES = {
    "point-clouds": "points",
    "weighted-point-clouds": "weighted-points",
    "multiclass": "classification",
    "binary-classification": "binary",
    "segmentation-masks": "segmentation",
    "image-pairs": "images",
    "probability-distributions": "distributions",
}


def preset(name: str) -> Spec:
    key = name.strip().lower().replace("_", "-")
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        raise SpecError(f"unknown preset {shown(name)}{did_you_mean(key, list(PRESETS) + list(PRESET_ALIASES))} (known: {', '.join(PRESETS)})")
    spec = parse_spec(PRESETS[key])
    return replace(spec, name=key)


def resolve_spec(text: str, files: bool = True) -> Spec:
    """``--spec`` value: a preset name, a compact text form, or ``file.py:SPEC`` (whose
    string, if it is one, is a preset or a text form: never another file, so no loop)."""
    stripped = text.strip()
    if re.match(r"^[\w-]+$", stripped):
        return preset(stripped)
    if files and re.match(r"^[^;\s]+\.py:[A-Za-z_][\w.]*$", stripped):
        obj = load_object(stripped)
        if isinstance(obj, Spec):
            return obj
        if isinstance(obj, str):
            return resolve_spec(obj, files=False)
        raise SpecError(f"{shown(stripped, quote=False)} is a {type(obj).__name__}, not a losscmp Spec or spec string")
    return parse_spec(stripped)
