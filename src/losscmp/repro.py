"""Repro files: a diverging case saved without pickle, replayed, or turned into a test.

A repro is two files with one stem: ``STEM.npz`` (tensors, loaded with
``allow_pickle=False``) and ``STEM.json`` (what the tensors mean and how to rerun
them).  Dtypes numpy lacks (bfloat16) are stored as their raw bits with the real dtype
in the metadata.  Both files are written atomically (temporary file + rename).

A repro may come from someone else, so it is data, never code: loading one trusts
nothing in it.  Every field is type-checked; references go through the literal-only
parser; only ``torch.nn.Module`` classes may be called as factories; and before anything
runs, references into the standard library, ``builtins``, and I/O functions of torch and
numpy (save, load, ...) are refused (:func:`refuse_untrusted`).

The same codec holds an *input* alone (:func:`save_input` / :func:`load_input`): the
supervisor and the isolated runner write a case to disk before a risky call with it.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np
import torch

from . import jsonout
from ._version import __version__
from .errors import LosscmpError, shown
from .generate import with_layout
from .load import LoadError, Ref, load_implementation, parse_ref
from .model import Case, Kind, Recipe, subject_from_labels, subject_labels_json
from .project import portable_target, project_root
from .spec import Spec, SpecError, parse_spec

FORMAT = "losscmp-repro/1"
# The "paths" field of a repro: relative file references are resolved from the project
# root found where the repro is replayed.  Older repros instead hold an absolute
# "base_dir", the folder they were saved from, and keep resolving from there.
PATHS_FROM_PROJECT_ROOT = "project root"
INPUT_FORMAT = "losscmp-input/1"
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
# numpy has no bfloat16: keep its raw bits.
BIT_STORAGE = {torch.bfloat16: (torch.int16, np.int16)}


class ReproError(LosscmpError, ValueError):
    """A repro file that is missing, corrupt or unsafe."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    if t.dtype in BIT_STORAGE:
        t = t.view(BIT_STORAGE[t.dtype][0])
    return t.numpy()


def numpy_to_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if a.dtype.kind not in "biuf":
        raise ReproError(f"array of {a.dtype} is not numeric")
    if dtype in BIT_STORAGE:
        bits, np_bits = BIT_STORAGE[dtype]
        if a.dtype != np_bits:
            raise ReproError(f"array stored as {a.dtype}, expected raw {np_bits} bits for {dtype_name(dtype)}")
        return torch.from_numpy(a.copy()).view(dtype)
    t = torch.from_numpy(a.copy())
    if t.dtype != dtype:
        raise ReproError(f"array stored as {a.dtype}, metadata says {dtype_name(dtype)}")
    return t


def _atomic_write(path: Path, write, durable: bool = True) -> None:
    """Temporary file + rename: a reader never sees half a file.  ``durable`` also
    fsyncs, so the file survives a machine crash, not only a process crash."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@functools.cache
def _package_version(pkg: str) -> str | None:
    # Looked up once per process: a metadata scan costs milliseconds, and the isolated
    # runner writes a repro before every case it risks.
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(refs: list[Ref], base_dir: Path | None = None) -> dict[str, Any]:
    """Library versions, and each implementation's file hash or package version; relative
    file references are read under ``base_dir`` (default: the current folder)."""
    found: dict[str, Any] = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "geomloss", "pykeops"):
        found[pkg] = _package_version(pkg)
    # The running torch's own string, build tag included ("2.11.0+cu130" vs "+cpu": the
    # CUDA build changes numerics); an image's metadata may say plain "2.11.0".
    found["torch"] = str(torch.__version__)
    # The running code's own version: an editable install's metadata keeps the version it was installed at.
    found["losscmp"] = __version__
    impls = {}
    for ref in refs:
        if ref.is_path:
            impls[ref.label] = {"file_sha256": file_digest(_under(ref.target, base_dir))}
        else:
            top = ref.target.split(".")[0]
            impls[ref.label] = {"package": top, "version": _package_version(top)}
    found["implementations"] = impls
    return found


def file_digest(path: Path) -> str | None:
    """The first 16 hex digits of a file's SHA-256 (of a package folder: its __init__.py)."""
    if path.is_dir():
        path = path / "__init__.py"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def _under(target: str, base_dir: Path | None) -> Path:
    path = Path(target)
    return path if path.is_absolute() or base_dir is None else base_dir / path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40] or "impl"


def save_case(
    directory: Path,
    *,
    spec: Spec,
    case: Case,
    refs: list[Ref],
    pair: tuple[str, str],
    kind: str,
    outcomes: dict[str, Any],
    tolerance: tuple[float, float],
    seed: int,
    device: str,
    extra: dict[str, Any] | None = None,
    durable: bool = True,
    cwd: str | Path | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``STEM.npz`` + ``STEM.json``; returns the JSON path.  ``durable``: fsync too.
    ``overwrite=False``: a file of that name already there (the same case and outcomes, as the
    name hashes them, saved earlier) is left as it is and its path returned.

    File references (relative to ``cwd``, the folder the run was started in: the current
    one by default) are stored relative to its project root, so a replay in another clone
    of the project runs that clone's files (:func:`repro_base_dir`)."""
    cwd = Path(cwd if cwd is not None else os.getcwd())
    root = project_root(cwd)
    refs = [replace(r, target=portable_target(r.target, cwd, root)) if r.is_path else r for r in refs]
    arrays: dict[str, np.ndarray] = {}
    tensors_meta: dict[str, dict[str, Any]] = {}
    for name, t in case.tensors.items():
        arrays[f"input.{name}"] = tensor_to_numpy(t)
        tensors_meta[name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape)}
    outcome_meta = {}
    for side, label in enumerate(dict.fromkeys(pair)):
        o = outcomes.get(label)
        if o is None:  # not run: the other side died first, say
            outcome_meta[label] = {"status": "not run", "error": None}
            continue
        outcome_meta[label] = {"status": str(o.status), "error": o.error, "output": o.output or None}
        if o.value is not None:
            arrays[f"out.{side}.value"] = tensor_to_numpy(o.value)
            outcome_meta[label]["value_dtype"] = dtype_name(o.value.dtype)
        for g, t in o.grads.items():
            if t is not None:
                arrays[f"out.{side}.grad.{g}"] = tensor_to_numpy(t)
    digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays.values())).hexdigest()[:10]
    stem = f"{_slug(pair[0])}--{_slug(pair[1])}--{kind}--{digest}"
    if not overwrite and (directory / f"{stem}.json").is_file() and (directory / f"{stem}.npz").is_file():
        return directory / f"{stem}.json"
    meta = {
        "format": FORMAT,
        "pair": list(pair),
        "kind": str(kind),
        "implementations": [{"label": r.label, "ref": r.source()} for r in refs],
        "paths": PATHS_FROM_PROJECT_ROOT,
        # Where it was saved: only a last resort for a replay from outside any clone of it.
        "project_root": str(root),
        "spec": spec.text(),
        "params": case.params,
        "sizes": case.sizes,
        "recipe": asdict(case.recipe) if case.recipe else None,
        # The recipe describes the case as drawn; a minimised case is no longer that draw.
        "minimised": case.note == "minimised",
        "tensors": tensors_meta,
        "outcomes": outcome_meta,
        "tolerance": {"rtol": tolerance[0], "atol": tolerance[1]},
        "seed": seed,
        "device": device,
        "dtype": next((m["dtype"] for m in tensors_meta.values() if m["dtype"].startswith(("float", "bfloat"))), None),
        "versions": versions(refs, root),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    return _write(directory, stem, arrays, meta, durable)


def _write(directory: Path, stem: str, arrays: dict[str, np.ndarray], meta: dict[str, Any], durable: bool = True) -> Path:
    """STEM.npz and STEM.json, each written atomically; returns the JSON path."""
    directory.mkdir(parents=True, exist_ok=True)
    npz_path, json_path = directory / f"{stem}.npz", directory / f"{stem}.json"
    text = jsonout.dumps(meta, indent=2, default=_json_default)  # fails before any write
    # numpy's stub types **kwds as if a name could be allow_pickle: ours are "input.x" & co.
    _atomic_write(npz_path, lambda f: np.savez(f, **arrays), durable)  # type: ignore[arg-type]
    _atomic_write(json_path, lambda f: f.write(text.encode()), durable)
    return json_path


def save_input(directory: Path, spec: Spec, case: Case, *, stem: str, durable: bool = True) -> Path:
    """A case's inputs alone, in the repro codec (no pair, no outcomes): written before a risky call."""
    arrays = {f"input.{name}": tensor_to_numpy(t) for name, t in case.tensors.items()}
    meta = {
        "format": INPUT_FORMAT,
        "spec": spec.text(),
        "sizes": case.sizes,
        "recipe": asdict(case.recipe) if case.recipe else None,
        "tensors": {name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for name, t in case.tensors.items()},
        "device": str(next(iter(case.tensors.values())).device),
        "case": case.describe(),
    }
    return _write(directory, stem, arrays, meta, durable)


def load_input(path: str | Path, spec: Spec | None = None) -> Case:
    """The case saved by :func:`save_input` (or the input of a full repro)."""
    meta, arrays, json_path, npz_path = _read_files(path)
    _need(meta.get("format") in (FORMAT, INPUT_FORMAT), f"not a {FORMAT} file")
    if spec is None:
        spec = _spec_of(meta)
    return _case_of(meta, arrays, spec, npz_path)


def _json_default(x: Any) -> Any:
    if isinstance(x, (torch.dtype, Path)):
        return str(x)
    raise TypeError(f"cannot store a {type(x).__name__} in a repro")


def save_divergence(ev, d, directory: Path) -> Path:
    """Save the (minimised, if available) case of an audit divergence."""
    case = d.minimized.case if d.minimized else d.case
    labels = list(d.subject.labels)
    if d.kind.failed_call and d.kind in (Kind.CRASH, Kind.TIMEOUT):
        # Re-running to record the outputs would crash, or hang, again: the verdict's detail says what happened.
        outcomes = {}
    else:
        outcomes = ev.outcomes(case, labels)
    minimal = d.minimized.verdict if d.minimized and d.minimized.verdict is not None and d.minimized.verdict.kind else None
    extra = {
        "score": d.verdict.score,
        # What the saved (minimised) case shows; the worst case found is kept beside it.
        "detail": minimal.detail if minimal else d.verdict.detail,
        "worst_detail": d.verdict.detail,
        "reference": ev.settings.reference,
        "original_sizes": d.minimized.original_sizes if d.minimized else case.sizes,
        "threshold": asdict(d.minimized.threshold) if d.minimized and d.minimized.threshold else None,
        "timeout": ev.settings.execution.timeout,
        "isolate": ev.settings.execution.isolate,
    }
    refs = [ev.impls[la].ref for la in labels]
    labels_json = subject_labels_json(d.subject)
    return save_case(
        directory,
        spec=ev.spec,
        case=case,
        refs=refs,
        pair=(labels_json[0], labels_json[1]),
        kind=d.kind,
        outcomes=outcomes,
        tolerance=(ev.tol.rtol, ev.tol.atol),
        seed=ev.settings.search.seed,
        device=ev.settings.execution.device,
        extra=extra,
    )


# --- loading ------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Repro:
    path: Path
    meta: dict[str, Any]
    spec: Spec
    case: Case
    refs: tuple[Ref, ...]
    recorded: dict[str, np.ndarray]  # out.* arrays of the recorded run

    @property
    def subject(self):
        return subject_from_labels(self.meta["pair"])

    @property
    def pair(self) -> tuple[str, str]:
        return tuple(self.meta["pair"])

    @property
    def kind(self) -> Kind:
        return Kind(self.meta["kind"])

    @property
    def tolerance(self) -> tuple[float, float]:
        return float(self.meta["tolerance"]["rtol"]), float(self.meta["tolerance"]["atol"])

    @property
    def timeout(self) -> float | None:
        t = self.meta.get("timeout")
        return float(t) if isinstance(t, (int, float)) and math.isfinite(t) and t > 0 else None


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ReproError(f"corrupt repro: {what}")


def _read_files(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], Path, Path]:
    p = Path(path)
    json_path, npz_path = p.with_suffix(".json"), p.with_suffix(".npz")
    try:  # is_file(): never a FIFO, which would block the read
        json_ok, npz_ok = json_path.is_file(), npz_path.is_file()
    except OSError as e:  # a name too long; a symlink loop before Python 3.13 (RuntimeError) ends in is_file's False
        raise ReproError(f"repro {shown(str(json_path), quote=False)}: cannot be read: {e.strerror or type(e).__name__}") from None
    if not json_ok:
        raise ReproError(f"no such repro: {shown(str(json_path), quote=False)}")
    if not npz_ok:
        raise ReproError(f"repro {shown(json_path.name, quote=False)} has no tensors file {shown(npz_path.name, quote=False)}")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ReproError(f"corrupt repro: {json_path.name} is not valid JSON ({e.__class__.__name__})") from None
    _need(isinstance(meta, dict), f"{json_path.name} does not hold a JSON object")
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle: refused
        raise ReproError(f"unsafe or corrupt repro: {npz_path.name}: {str(e).splitlines()[0]}") from None
    except Exception as e:
        raise ReproError(f"corrupt repro: {npz_path.name} is not a readable .npz ({e.__class__.__name__})") from None
    return meta, arrays, json_path, npz_path


def _spec_of(meta: dict[str, Any]) -> Spec:
    try:
        text = meta.get("spec")
        return parse_spec(text if isinstance(text, str) else "")
    except SpecError as e:
        raise ReproError(f"corrupt repro: spec: {e}") from None


def _recipe_of(meta: dict[str, Any]) -> Recipe | None:
    if not isinstance(meta.get("recipe"), dict):
        return None
    try:
        r = meta["recipe"]
        return Recipe(
            sizes=tuple((str(k), int(v)) for k, v in r["sizes"]),
            regime=str(r["regime"]), magnitude=float(r["magnitude"]), offset=float(r["offset"]),
            layout=str(r["layout"]), seed=int(r["seed"]),
            planted=tuple((str(a), float(b), float(c)) for a, b, c in r["planted"]),
            nonfinite=bool(r["nonfinite"]),
        )
    except (KeyError, TypeError, ValueError):
        raise ReproError("corrupt repro: 'recipe' malformed") from None


def _case_of(meta: dict[str, Any], arrays: dict[str, np.ndarray], spec: Spec, npz_path: Path) -> Case:
    sizes: Any = meta.get("sizes")  # untrusted JSON, checked by _need
    _need(isinstance(sizes, dict) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes.values())
          and set(sizes) == set(spec.dims), "'sizes' do not match the spec's dims")
    tmeta: Any = meta.get("tensors")
    _need(isinstance(tmeta, dict) and set(tmeta) == {a.name for a in spec.args}, "'tensors' do not match the spec's arguments")
    recipe = _recipe_of(meta)
    tensors = {}
    for arg in spec.args:
        m = tmeta[arg.name]
        _need(isinstance(m, dict) and isinstance(m.get("dtype"), str) and m["dtype"] in DTYPES, f"dtype of {arg.name} missing or unknown")
        key = f"input.{arg.name}"
        _need(key in arrays, f"tensor {arg.name} missing from {npz_path.name}")
        t = numpy_to_tensor(arrays[key], DTYPES[m["dtype"]])
        # The JSON's shape is what a reader of the repro sees: it must be the array's.
        _need("shape" not in m or m["shape"] == list(t.shape),
              f"{arg.name}: the JSON says shape {m.get('shape')}, {npz_path.name} holds {list(t.shape)}")
        expected_shape = spec.shape(arg, sizes)
        _need(tuple(t.shape) == expected_shape, f"{arg.name} has shape {tuple(t.shape)}, spec and sizes say {expected_shape}")
        tensors[arg.name] = with_layout(t, recipe.layout) if recipe else t
    device = meta.get("device", "cpu")
    _need(isinstance(device, str) and (device in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", device) is not None), "'device' malformed")
    if device != "cpu" and not torch.cuda.is_available():
        device = "cpu"
    tensors = {k: v.to(device) for k, v in tensors.items()}
    # Keyword parameters come from the spec text: literal types survive (JSON has no tuples).
    minimised = meta.get("minimised", False)  # absent from files written before it was recorded
    _need(isinstance(minimised, bool), "'minimised' is not true or false")
    # Said next to the recipe: "magnitude 5e+07" is the draw it came from, not the saved input.
    note = "minimised from that draw; replayed" if minimised and recipe else "replayed"
    return Case(tensors=tensors, sizes=dict(sizes), params=dict(spec.params), recipe=recipe, note=note)


def load_repro(path: str | Path) -> Repro:
    meta, arrays, json_path, npz_path = _read_files(path)
    _need(meta.get("format") == FORMAT, f"not a {FORMAT} file")
    pair: Any = meta.get("pair")  # untrusted JSON, checked by _need
    _need(isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair), "'pair' must be two labels")
    _need(isinstance(meta.get("kind"), str), "'kind' missing")
    _need(meta["kind"] in Kind._value2member_map_, f"unknown kind {meta['kind']!r}")
    seed = meta.get("seed", 0)
    _need(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63, "'seed' must be an integer in [0, 2**63)")
    impls: Any = meta.get("implementations")
    _need(isinstance(impls, list) and all(isinstance(i, dict) and isinstance(i.get("label"), str) and isinstance(i.get("ref"), str) for i in impls), "'implementations' malformed")
    _need(all(i["label"].strip() for i in impls), "empty implementation label")
    # A label is printed, and written into generated tests: a control character (a carriage
    # return starts a new source line even inside a comment) has no business in one.
    bad = next((x for x in [i["label"] for i in impls] + [i["ref"] for i in impls] + pair if not x.isprintable()), "")
    _need(not bad, f"label or reference {bad[:80]!r} holds a control character")
    try:
        # The label is data, not part of the reference grammar ("p1:a" is a fine label).
        refs = tuple(_saved_ref(i["ref"], i["label"]) for i in impls)
    except LoadError as e:
        raise ReproError(f"corrupt repro: {e}") from None
    _need(set(pair) <= {r.label for r in refs}, "'pair' names an implementation that is not listed")
    tol = meta.get("tolerance")
    _need(isinstance(tol, dict) and all(isinstance(tol.get(k), (int, float)) and not isinstance(tol.get(k), bool)
                                        and math.isfinite(tol[k]) and tol[k] >= 0 for k in ("rtol", "atol")),
          "'tolerance' must hold finite rtol and atol >= 0")
    timeout = meta.get("timeout")
    _need(timeout is None or (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and math.isfinite(timeout) and timeout > 0),
          "'timeout' must be a positive number of seconds")
    spec = _spec_of(meta)
    case = _case_of(meta, arrays, spec, npz_path)
    recorded = {k: v for k, v in arrays.items() if k.startswith("out.")}
    return Repro(json_path, meta, spec, case, refs, recorded)


# A lambda or a local function passed by a test has no reference anyone can import
# ("test_x.py:test_f.<locals>.<lambda>"): the case is data all the same, replayed by the
# test that holds the callable (the pytest plugin matches it by label).
HELD_BY_TEST = ("<locals>", "<lambda>")


def _saved_ref(text: str, label: str) -> Ref:
    if any(marker in text for marker in HELD_BY_TEST):
        return Ref(text=text, label=label, target="", attrs=())
    return replace(parse_ref(text), label=label)


# --- trust: a repro is data ---------------------------------------------------------------

# Never run from a saved file: the standard library and builtins, and I/O under torch and numpy.
_IO_NAMES = re.compile(r"(^|_)(save|load|open|read|write|from_?file|to_?file|memmap|hub|remove|unlink|system|exec|eval|spawn|popen)", re.I)
_IO_PACKAGES = ("torch", "numpy")


def untrusted_reason(ref: Ref, base_dir: Path | None = None) -> str | None:
    """Why ``ref`` may not run from a saved file, or None if it may.  A relative path is
    judged where it will be loaded from: under ``base_dir``."""
    names = ref.target.split(".") + list(ref.attrs) if not ref.is_path else list(ref.attrs)
    if ref.is_path:
        path = Path(ref.target)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop before Python 3.13; loading refuses it in one line
            resolved = path
        if any(_inside(resolved, d) for d in _stdlib_dirs()):
            return "it names a file of the Python standard library"
        top = next((pkg for pkg in _IO_PACKAGES if _inside(resolved, _package_dir(pkg))), None)
    else:
        top = ref.target.split(".")[0]
        if top == "builtins" or top in _stdlib_names():
            return f"it names the standard library ({top})"
    if top in _IO_PACKAGES and any(_IO_NAMES.search(n) for n in names):
        return f"it names an I/O function of {top}"
    return None


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _stdlib_names() -> frozenset[str]:
    return frozenset(getattr(sys, "stdlib_module_names", ())) | {"os", "sys", "subprocess", "shutil", "pathlib", "io", "builtins", "importlib", "pickle"}


def _stdlib_dirs() -> list[Path]:
    out = []
    for key in ("stdlib", "platstdlib"):
        try:
            out.append(Path(sysconfig.get_paths()[key]).resolve())
        except (KeyError, OSError):
            pass
    return out


def _package_dir(name: str) -> Path | None:
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    return Path(file).resolve().parent if file else None


def refuse_untrusted(refs: Sequence[Ref], base_dir: Path | None = None) -> None:
    """Raise :class:`ReproError` naming the first reference a saved file may not run."""
    for ref in refs:
        why = untrusted_reason(ref, base_dir)
        if why:
            raise ReproError(f"refusing to run {ref.label} = {ref.source()} from a saved file: {why}")


def trusted_refs(repro: Repro) -> list[Ref]:
    """The references of the repro's subject that may run from a saved file, in pair order.

    The one trust gate for everything that runs a repro's implementations: ``replay``,
    ``replay --pytest`` (the generated test then calls only ``torch.nn.Module`` classes, as
    :func:`load_implementation` does with ``factories="modules"``) and the plugin, which
    runs its test's own callables and never the file's references."""
    by_label = {r.label: r for r in repro.refs}
    wanted = [by_label[label] for label in dict.fromkeys(repro.pair)]
    for ref in wanted:
        if not ref.target:
            raise ReproError(f"{ref.label} ({ref.text}) lives only inside its test: re-run that test to replay this case")
    refuse_untrusted(wanted, repro_base_dir(repro))
    return wanted


def repro_base_dir(repro: Repro) -> Path:
    """Where relative file references of the repro are loaded from: the project root found
    from the current folder (this checkout's files, not the saving clone's); for a repro
    from before that rule, the absolute folder it was saved from, while it exists."""
    base = repro.meta.get("base_dir")
    try:
        usable = isinstance(base, str) and Path(base).is_dir()
    except OSError:  # a name too long: as unusable as a folder that is gone
        usable = False
    if repro.meta.get("paths") != PATHS_FROM_PROJECT_ROOT and usable and isinstance(base, str):
        return Path(base)
    # The project of the current folder first (this checkout's files); where its files are
    # not there (a replay from outside the project), the project holding the repro, then
    # the one it was saved in.
    here = project_root()
    relative = [r.target for r in repro.refs if r.label in repro.pair and r.is_path and r.target and not Path(r.target).is_absolute()]
    saved_in = repro.meta.get("project_root")
    for root in (here, project_root(repro.path.parent), Path(saved_in) if isinstance(saved_in, str) else None):
        try:
            if root is not None and all((root / t).exists() for t in relative):
                return root
        except OSError:  # a name too long to look up: not this root
            continue
    return here


@dataclass(frozen=True)
class FileCheck:
    """A file an implementation of the repro is loaded from: where, and whether it is the
    file the case was recorded with (by the SHA-256 prefix the repro holds)."""

    label: str
    path: Path
    recorded: str | None  # None: the repro holds no hash for it
    today: str | None  # None: no such file here

    @property
    def changed(self) -> bool:
        return self.recorded is not None and self.today != self.recorded


def file_checks(repro: Repro) -> list[FileCheck]:
    """The files the subject's file references load here, each against its recorded hash."""
    base = repro_base_dir(repro)
    saved = repro.meta.get("versions", {})
    saved = saved.get("implementations", {}) if isinstance(saved, dict) else {}
    out = []
    for ref in repro.refs:
        if ref.label not in repro.pair or not ref.is_path or not ref.target:
            continue
        path = _under(ref.target, base)
        recorded = saved.get(ref.label, {}).get("file_sha256") if isinstance(saved.get(ref.label), dict) else None
        out.append(FileCheck(ref.label, path, recorded if isinstance(recorded, str) else None, file_digest(path)))
    return out


def version_changes(repro: Repro) -> dict[str, tuple[Any, Any]]:
    """{library: (recorded version, today's)} for the libraries whose version changed since
    the case was recorded, the implementations' own packages included."""
    saved = repro.meta.get("versions")
    if not isinstance(saved, dict):
        return {}
    today = versions([r for r in repro.refs if not r.is_path and r.target and r.label in repro.pair])
    changes: dict[str, tuple[Any, Any]] = {}
    for name, now in today.items():
        if name != "implementations" and name in saved and saved[name] != now:
            changes[name] = (saved[name], now)
    recorded_impls = saved.get("implementations", {}) if isinstance(saved.get("implementations"), dict) else {}
    for label, now in today["implementations"].items():
        was = recorded_impls.get(label)
        if isinstance(was, dict) and was.get("version") != now.get("version"):
            changes[now["package"]] = (was.get("version"), now.get("version"))
    return changes


def load_repro_implementations(repro: Repro, remote: Collection[str] = (), *,
                               elsewhere: Callable[[Ref], Any] | None = None) -> list[Any]:
    """The subject's implementations, after the trust check, with the safe factory policy.
    Labels in ``remote`` run under another interpreter and are never imported here:
    ``elsewhere`` (``interpreter.remote_implementation``, handed in because that module
    stands above this one) makes each of them."""
    if remote and elsewhere is None:
        raise TypeError("remote labels need elsewhere=interpreter.remote_implementation")
    base_dir = repro_base_dir(repro)
    # The other interpreter's worker has its own current folder: give it the file itself.
    return [elsewhere(replace(ref, target=str(_under(ref.target, base_dir))) if ref.is_path else ref)
            if ref.label in remote and elsewhere is not None else load_implementation(ref, base_dir=base_dir, factories="modules")
            for ref in trusted_refs(repro)]


def same_bits(repro: Repro, outcomes: dict[str, Any]) -> bool:
    """Do today's outputs equal the recorded ones bit for bit?"""
    for side, label in enumerate(dict.fromkeys(repro.pair)):
        o = outcomes[label]
        produced = {}
        if o.value is not None:
            produced[f"out.{side}.value"] = tensor_to_numpy(o.value)
        for g, t in o.grads.items():
            if t is not None:
                produced[f"out.{side}.grad.{g}"] = tensor_to_numpy(t)
        recorded = {k: v for k, v in repro.recorded.items() if k.startswith(f"out.{side}.")}
        if produced.keys() != recorded.keys():
            return False
        if not all(np.array_equal(produced[k], recorded[k], equal_nan=True) for k in produced):
            return False
    return True
