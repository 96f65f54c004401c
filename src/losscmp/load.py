"""Loading implementations from references such as ``label=path/file.py:attr``.

Grammar::

    [label=] target : attr[.attr...] [ ( literal args ) ]
    target  = path/to/file.py  |  path/to/package_dir  |  pkg.module

The optional call is parsed with :mod:`ast`; every argument must be a Python literal,
so a reference can never run arbitrary expressions.  A file inside a package (a folder
with ``__init__.py``) is imported as part of that package, under a private copy of
``sys.modules``, so a forked ``geomloss`` checked into a repo and the installed
``geomloss`` can be compared in one run.

Loading runs the user's code (the import, a module ``__getattr__`` or property on the
attribute path, the factory call).  Whatever that code raises -- ``BaseException``
subclasses, ``SystemExit``, ``GeneratorExit`` and a ``KeyboardInterrupt`` it raises
itself included -- is its failure to load: one :class:`LoadError` line, through the one
choke point :func:`_user_code`.  A real Ctrl-C (a SIGINT that arrived) still interrupts.
An import that never returns is stopped after ``LOSSCMP_LOAD_TIMEOUT`` seconds (default
300) by a timer signal, and only a regular file is ever opened as a reference (a FIFO
or a device is refused at once, not after the timer: it is never Python source).
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import signal
import stat
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import LosscmpError, did_you_mean, shown
from .literals import LITERAL_ERRORS, literal
from .breadcrumbs import Terminated


class LoadError(LosscmpError, ValueError):
    """A reference that cannot be loaded."""


@dataclass(frozen=True)
class Ref:
    """A parsed reference.  ``call`` is None for a plain attribute."""

    text: str
    label: str
    target: str
    attrs: tuple[str, ...]
    call: tuple[tuple[Any, ...], tuple[tuple[str, Any], ...]] | None = None

    @property
    def is_path(self) -> bool:
        return self.target.endswith(".py") or os.sep in self.target or "/" in self.target

    def with_kwargs(self, **kwargs: Any) -> Ref:
        """The same reference with factory keyword arguments replaced (used by sweeps)."""
        args, kw = self.call or ((), ())
        merged = dict(kw) | kwargs
        return replace(self, call=(args, tuple(merged.items())))

    def source(self) -> str:
        """Canonical text of this reference (label omitted)."""
        text = f"{self.target}:{'.'.join(self.attrs)}"
        if self.call is not None:
            args, kw = self.call
            parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kw]
            text += f"({', '.join(parts)})"
        return text


@dataclass(frozen=True)
class Implementation:
    ref: Ref
    fn: Callable[..., Any]

    @property
    def label(self) -> str:
        return self.ref.label


_LABEL_RE = re.compile(r"^([A-Za-z_][\w.+-]*)=(?!=)")


def parse_ref(text: str) -> Ref:
    raw = text.strip()
    label = None
    m = _LABEL_RE.match(raw)
    # A '=' before any ':' or '(' is a label prefix; one inside a call is a keyword.
    if m and ":" not in m.group(1) and "(" not in m.group(1):
        label, raw = m.group(1), raw[m.end():]
    target, sep, expr = raw.partition(":")
    if not sep or not target or not expr:
        raise LoadError(f"{shown(text)}: expected 'file.py:attr' or 'package.module:attr'")
    try:
        node = ast.parse(expr, mode="eval").body
    except LITERAL_ERRORS:
        raise LoadError(f"{shown(text)}: cannot parse {shown(expr)} as an attribute or a call with literal arguments{_quote_hint(text)}") from None
    call = None
    if isinstance(node, ast.Call):
        try:
            args = tuple(literal(a) for a in node.args)
            kwargs = tuple((k.arg, literal(k.value)) for k in node.keywords)
        except LITERAL_ERRORS:
            raise LoadError(f"{shown(text)}: factory arguments must be literals (numbers, strings, tuples, ...) of sane size and depth"
                            f"{_quote_hint(text, node)}") from None
        named = tuple((k, v) for k, v in kwargs if k is not None)  # k.arg is None for '**'
        if len(named) != len(kwargs):
            raise LoadError(f"{shown(text)}: '**' is not allowed in a reference")
        call, node = (args, named), node.func
    attrs: list[str] = []
    while isinstance(node, ast.Attribute):
        attrs.insert(0, node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise LoadError(f"{shown(text)}: {shown(expr)} is not a dotted attribute name")
    attrs.insert(0, node.id)
    if label is None:
        label = _default_label(target, attrs)
    return Ref(text=text.strip(), label=label, target=target, attrs=tuple(attrs), call=call)


def _quote_hint(text: str, call: ast.Call | None = None) -> str:
    """A shell eats the quotes and splits at the spaces of an unquoted factory call:
    name the quoted reference that was meant."""
    meant = text.strip()
    if "(" not in meant:
        return ""
    if call is not None:  # SamplesLoss(loss=sinkhorn): a bare name where the shell ate a string's quotes
        names = [(k.arg, k.value.id) for k in call.keywords if k.arg is not None and isinstance(k.value, ast.Name)]
        if not names:
            return ""
        for arg, name in names:
            meant = re.sub(rf"\b{re.escape(arg)}\s*=\s*{re.escape(name)}\b", f'{arg}="{name}"', meant)
    elif not meant.endswith(")"):
        meant = meant.rstrip(", ") + ", ...)"  # split at a space: the rest went into the next argument
    else:
        return ""
    return f"; quote the whole reference for the shell: '{meant}'"


def _default_label(target: str, attrs: list[str]) -> str:
    return attrs[-1]


def disambiguate(refs: list[Ref]) -> list[Ref]:
    """Default labels are the attribute name; where two collide, qualify them."""
    counts: dict[str, int] = {}
    for r in refs:
        counts[r.label] = counts.get(r.label, 0) + 1
    out = []
    for r in refs:
        explicit = _LABEL_RE.match(r.text) is not None
        if counts[r.label] > 1 and not explicit:
            stem = Path(r.target).stem if r.target.endswith(".py") else r.target.rstrip("/").split("/")[-1]
            r = replace(r, label=f"{stem}:{'.'.join(r.attrs)}")
        out.append(r)
    qualified = [r.label for r in out]
    # Same file stem in two folders (d1/loss.py, d2/loss.py): the whole target, then.
    return [replace(r, label=r.source()) if qualified.count(r.label) > 1 and _LABEL_RE.match(r.text) is None else r for r in out]


def load_object(text: str | Ref, *, base_dir: Path | None = None, factories: str = "any") -> Any:
    """Resolve a reference to the object it names (calling the factory, if any).

    ``factories="modules"`` only allows calls of ``torch.nn.Module`` subclasses — the
    safe subset used when a reference comes from a file someone else may have edited.
    """
    ref = text if isinstance(text, Ref) else parse_ref(text)
    module = _import_target(ref.target, base_dir)
    obj: Any = module
    walked = [ref.target]
    for name in ref.attrs:
        walked.append(name)
        # A module __getattr__ or a property is user code too.
        with _user_code(f"{shown(ref.text)}: getting {shown('.'.join(walked[1:]))}"):
            try:
                obj = getattr(obj, name)
            except AttributeError:
                hint = did_you_mean(name, [n for n in dir(obj) if not n.startswith("__")])
                raise LoadError(f"{shown(ref.text)}: {shown('.'.join(walked[:-1]))} has no attribute {name!r}{hint}") from None
    if ref.call is not None:
        args, kwargs = ref.call
        if factories == "modules" and not _is_module_class(obj):
            raise LoadError(f"{shown(ref.text)}: only torch.nn.Module classes may be called from a saved file")
        with _user_code(f"{shown(ref.text)}: calling the factory"):
            obj = obj(*args, **dict(kwargs))
    return obj


def load_implementation(text: str | Ref, *, base_dir: Path | None = None, factories: str = "any") -> Implementation:
    ref = text if isinstance(text, Ref) else parse_ref(text)
    fn = load_object(ref, base_dir=base_dir, factories=factories)
    if not callable(fn):
        raise LoadError(f"{shown(ref.text)} is a {type(fn).__name__}, which is not callable")
    if _is_module_class(fn):  # calling the class would build a module from the inputs, not compute a loss
        raise LoadError(f"{shown(ref.text)} is a class, not a loss: instantiate it, '{ref.text}()' (its options go inside the parentheses)")
    return Implementation(ref, fn)


def _is_module_class(obj: Any) -> bool:
    try:
        import torch

        return isinstance(obj, type) and issubclass(obj, torch.nn.Module)
    except ImportError:  # pragma: no cover
        return False


def _exception_text(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"SystemExit({e.code!r})"
    return f"{type(e).__name__}: {_first_line(e)}".rstrip(": ")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _import_target(target: str, base_dir: Path | None) -> Any:
    is_path = target.endswith(".py") or "/" in target or os.sep in target
    if not is_path:
        with _user_code(f"importing {shown(target)}"):
            try:
                return importlib.import_module(target)
            except ModuleNotFoundError as e:
                if e.name and target.startswith(e.name):
                    raise LoadError(f"no module named {shown(target)} (for a file, give its path ending in .py)") from None
                raise LoadError(f"importing {shown(target)} failed: {_first_line(e)}") from None
    path = _source_file(target, base_dir)
    with _user_code(f"importing {shown(target, quote=False)}"):
        return _import_file(path)


def _source_file(target: str, base_dir: Path | None) -> Path:
    """The regular ``.py`` file a path reference names, or a one-line LoadError: an
    over-long name, a symlink loop, a FIFO or a device are refused before anything opens
    them (opening a FIFO waits for a writer that never comes)."""
    path = Path(target)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    try:
        path = path.resolve()
        if path.is_dir():
            if not (path / "__init__.py").exists():
                raise LoadError(f"{shown(target, quote=False)} is a folder without __init__.py, not a package")
            path = path / "__init__.py"
        elif not path.exists():
            raise LoadError(f"no such file: {shown(target, quote=False)}")
        elif path.suffix != ".py":
            raise LoadError(f"{shown(target, quote=False)} is not a .py file")
        mode = path.stat().st_mode
    except LoadError:
        raise
    except RuntimeError:  # pathlib before 3.13 says a symlink loop this way
        raise LoadError(f"{shown(target, quote=False)} cannot be read: a symlink loop") from None
    except OSError as e:
        raise LoadError(f"{shown(target, quote=False)} cannot be read: {e.strerror or type(e).__name__}") from None
    except ValueError:  # os.stat refuses a NUL byte
        raise LoadError(f"{shown(target)} cannot be a file name: it holds a NUL byte") from None
    if not stat.S_ISREG(mode):
        raise LoadError(f"{shown(str(path), quote=False)} is not a regular file (a FIFO or a device is never imported)")
    return path


# --- the one choke point for the user's code run while loading ----------------------------

LOAD_TIMEOUT_ENV = "LOSSCMP_LOAD_TIMEOUT"
DEFAULT_LOAD_TIMEOUT = 300.0


def load_timeout() -> float:
    """Seconds an import, attribute or factory call may take: ``$LOSSCMP_LOAD_TIMEOUT`` or 300."""
    text = os.environ.get(LOAD_TIMEOUT_ENV)
    if not text:
        return DEFAULT_LOAD_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise LoadError(f"{LOAD_TIMEOUT_ENV}={shown(text)}: expected a positive number of seconds")
    return value


class _TookTooLong(BaseException):
    """Raised by the load timer (a BaseException: ``except Exception`` in user code must not swallow it)."""


@contextlib.contextmanager
def _user_code(what: str) -> Iterator[None]:
    """Run the user's code under ``what``: anything it raises becomes one LoadError line.

    In the main thread a timer (SIGALRM, re-firing every second so that a bare ``except:``
    cannot swallow it for good) bounds the time, and a SIGINT handler tells a Ctrl-C that
    arrived (re-raised: exit 130) from a KeyboardInterrupt the code raised itself (a load
    failure like any other).  Elsewhere (another thread) only the mapping applies.
    """
    limit = load_timeout()
    fired: list[str] = []
    armed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")  # not on Windows
    if armed:
        def on_alarm(signum: int, frame: Any) -> None:
            fired.append("alarm")
            raise _TookTooLong()

        def on_sigint(signum: int, frame: Any) -> None:
            fired.append("sigint")
            raise KeyboardInterrupt

        old_alarm = signal.signal(signal.SIGALRM, on_alarm)
        watch_sigint = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if watch_sigint:
            signal.signal(signal.SIGINT, on_sigint)
        old_timer = signal.setitimer(signal.ITIMER_REAL, limit, 1.0)
    try:
        try:
            yield
        finally:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old_alarm if old_alarm is not None else signal.SIG_DFL)  # None: set from C
                if watch_sigint:
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                if old_timer[0] > 0:  # someone else's timer was running: let it go on
                    signal.setitimer(signal.ITIMER_REAL, *old_timer)
    except LoadError:
        raise
    except Terminated:  # SIGTERM: losscmp unwinds and stops
        raise
    except BaseException as e:
        if "sigint" in fired:
            raise KeyboardInterrupt from None  # a real Ctrl-C
        if "alarm" in fired:
            raise LoadError(f"{what} did not finish within {limit:g} s (an import that never returns?); "
                            f"set {LOAD_TIMEOUT_ENV} to wait longer") from None
        raise LoadError(f"{what} raised {_exception_text(e)}") from None


def _package_root(path: Path) -> Path | None:
    """Topmost folder above ``path`` that is still a package (has ``__init__.py``)."""
    root = None
    folder = path.parent
    while (folder / "__init__.py").exists():
        root = folder
        folder = folder.parent
    return root


def _import_file(path: Path) -> Any:
    root = _package_root(path)
    if root is None:
        # A lone file: a private module name, so two 'loss.py' files never clash.
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        name = f"_losscmp_impl_{path.stem}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None, path  # a .py path always has a loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent))  # its sibling imports
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        finally:
            sys.path.remove(str(path.parent))
        return module
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return _import_shadowed(root.parent, ".".join(parts), top=root.name)


_SHADOW_CACHE: dict[tuple[str, str], Any] = {}


def shadow_modules() -> tuple[Any, ...]:
    """The forks imported beside an installed package of the same name: they are in no
    ``sys.modules``, yet a worker must find their files (``workers.portable_ref``)."""
    return tuple(_SHADOW_CACHE.values())


def _import_shadowed(search_dir: Path, dotted: str, top: str) -> Any:
    """Import ``dotted`` from ``search_dir`` even if a package named ``top`` is already
    loaded from elsewhere: stash the loaded one, import the fork, restore.

    The fork's functions keep their own module globals, so both stay usable side by
    side.  (A fork that imports lazily inside functions would see the original again;
    run such a fork with ``--isolate`` instead.)
    """
    key = (str(search_dir), dotted)
    if key in _SHADOW_CACHE:
        return _SHADOW_CACHE[key]
    stashed = {k: v for k, v in sys.modules.items() if k == top or k.startswith(top + ".")}
    for k in stashed:
        del sys.modules[k]
    sys.path.insert(0, str(search_dir))
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(dotted)
    finally:
        sys.path.remove(str(search_dir))
        # The fork's modules leave sys.modules so a later plain import gets the original.
        for k in [k for k in sys.modules if k == top or k.startswith(top + ".")]:
            del sys.modules[k]
        sys.modules.update(stashed)
    _SHADOW_CACHE[key] = module
    return module
