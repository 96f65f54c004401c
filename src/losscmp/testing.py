"""Assertions for test suites: ``assert_losses_agree(a, b, spec=...)``.

The way ``torch.testing.assert_close`` checks two tensors, :func:`assert_losses_agree`
checks two (or more) loss implementations: it replays the saved cases it is pointed at,
fuzzes, and raises ``AssertionError`` with the report when they disagree.  It works in
any test, with or without pytest; the ``losscmp`` pytest fixture is this same function
with its options taken from the command line and its cases saved per test.

What flows through: callables or references in, :class:`CheckOptions` (the run's
:class:`~losscmp.settings.Settings`, built and checked by ``Settings`` as every front
end's are, and what a check does besides the run) -> saved-case replay -> audit ->
:class:`CheckResult` out, or ``AssertionError`` whose message is the report, the
explanation when there is one, and a command that replays the case.
"""
from __future__ import annotations

import inspect
import io
import os
import re
import shlex
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .audit import AuditResult, ProbeError, audit
from .compare import Verdict
from .display import case_values_text, tensor_text, verdict_text
from .errors import LosscmpError, UsageError
from .findings import Kind, Subject
from .generate import Case
from .infer import infer_spec
from .interpreter import check_labels, check_python, is_remote, remote_implementation
from .load import Implementation, Ref, load_implementation, parse_ref
from .project import shown_path
from .replay import replay_saved
from .report import pair_rows, print_audit
from .repro import ReproError
from .settings import CALL_TERMS, RunnerKind, Settings, in_terms
from .spec import Spec, resolve_spec

__all__ = ["assert_losses_agree", "CheckOptions", "CheckResult", "ReplayedCase", "Session"]

@dataclass(frozen=True)
class CheckOptions:
    """One check: the run's :class:`Settings` (every knob, checked where every front end's
    are), and what a check does besides the run."""

    settings: Settings = field(default_factory=Settings)
    # No one gave ``examples``: the loaded Hypothesis profile's max_examples (100 unless
    # changed) is the budget, read when the check runs (Hypothesis loads --hypothesis-profile late).
    examples_from_profile: bool = True
    # Labels the call itself gave an interpreter: each must name one of its implementations
    # (a misspelt one would run here).  --losscmp-python's serve whichever checks have them.
    called_pythons: tuple[str, ...] = ()
    replay_dir: Path | None = None  # whose saved cases are replayed first
    replay_only: bool = False  # replay, never fuzz
    replay_command: str | None = None  # printed on failure; pasted at the project root it re-runs the check
    replay_saved_command: str | None = None  # the same, replaying only the saved cases (no fuzzing)
    verbose: bool = False  # the failure report shows each finding's evidence (pytest -vv)


@dataclass(frozen=True)
class ReplayedCase:
    path: Path
    recorded: Kind  # the kind saved
    verdict: Verdict  # today's; ``verdict.kind`` is None when the pair agrees now
    case: Case


@dataclass(frozen=True, eq=False)
class CheckResult:
    implementations: tuple[Implementation, ...]
    replayed: tuple[ReplayedCase, ...]
    audit: AuditResult | None  # None when only saved cases were replayed
    failure: str | None  # the report, when the check fails
    probe_error: str | None = None  # the implementations could not run on the spec at all (the check fails)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(i.label for i in self.implementations)

    @property
    def agree(self) -> bool:
        return self.failure is None

    @property
    def cases_run(self) -> int:
        return self.audit.cases_run if self.audit else 0

    @property
    def pairs(self) -> tuple[Subject, ...]:
        if self.audit:
            return self.audit.pairs
        return tuple(dict.fromkeys(r.verdict.subject for r in self.replayed))

    @property
    def divergence_kinds(self) -> Counter:
        kinds = Counter(str(r.verdict.kind) for r in self.replayed if r.verdict.kind)
        kinds.update(str(d.kind) for d in (self.audit.divergences if self.audit else ()))
        return kinds

    @property
    def saved(self) -> tuple[Path, ...]:
        return tuple(Path(d.repro) for d in (self.audit.divergences if self.audit else ()) if d.repro)


def assert_losses_agree(
    *impls: str | Callable[..., Any],
    spec: Spec | str | None = None,
    examples: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    reference: str | None = None,
    isolate: bool | None = None,
    timeout: float | None = None,
    pythons: Mapping[str, str] | None = None,
    save_dir: str | Path | None = None,
    replay_dir: str | Path | None = None,
    **audit_settings: Any,
) -> CheckResult:
    """Raise ``AssertionError`` with the report unless the implementations agree.

    ``impls`` are callables (functions, lambdas, ``nn.Module`` instances) or references
    (``"pkg.module:attr"``, ``"file.py:attr"``, ``"label=ref"``).  ``pythons`` maps a
    reference's label to another environment's interpreter, where it is imported and run
    (it needs torch and numpy there, not losscmp).  Nothing is written unless ``save_dir``
    is given; cases saved there (or in ``replay_dir``) are replayed before fuzzing.
    An argument left out takes the pytest session's ``--losscmp-*`` option when the
    plugin runs, else the default; ``examples`` then falls back to the loaded Hypothesis
    profile's ``max_examples`` (100 unless changed).
    """
    __tracebackhide__ = True
    base = SESSIONS[-1].defaults if SESSIONS else CheckOptions()
    if base.replay_command is None:
        base = replace(base, replay_command=_current_test_command())
    if replay_dir is not None or save_dir is not None:
        base = replace(base, replay_dir=Path(replay_dir if replay_dir is not None else save_dir))  # type: ignore[arg-type]
    return check_or_raise(impls, spec, base, examples=examples, seed=seed, device=device, dtype=dtype, rtol=rtol, atol=atol,
                          reference=reference, isolate=isolate, timeout=timeout, pythons=pythons, save_dir=save_dir, **audit_settings)


def with_call_arguments(base: CheckOptions, **given: Any) -> CheckOptions:
    """``base`` (defaults, or the session's command line) with the settings a call gave, in
    :meth:`Settings.of`'s keywords; ``None`` is "not given".  Checked again as a whole, by
    ``Settings``, and refused in the call's terms."""
    given = {k: v for k, v in given.items() if v is not None}
    called: tuple[str, ...] = ()
    if "pythons" in given:  # the call's interpreters join the command line's
        labelled = {label: check_python(label, path, "pythons") for label, path in dict(given["pythons"]).items()}
        given["pythons"] = tuple({**dict(base.settings.execution.pythons), **labelled}.items())
        called = tuple(labelled)
    settings = base.settings.updated(terms=CALL_TERMS, **given) if given else base.settings
    return replace(base, settings=settings, called_pythons=called or base.called_pythons,
                   examples_from_profile=base.examples_from_profile and "examples" not in given)


@dataclass(frozen=True)
class Session:
    """A pytest session running the plugin: its command line, and where checks are tallied."""

    defaults: CheckOptions
    record: Callable[[CheckResult], None]


# The pytest plugin pushes its session here (sessions nest under pytester, hence a
# stack): plain assert_losses_agree calls take its options and count in its summary.
SESSIONS: list[Session] = []


def check_or_raise(impls: Sequence[str | Callable[..., Any]], spec: Spec | str | None, options: CheckOptions,
                   **given: Any) -> CheckResult:
    """The one code path of :func:`assert_losses_agree` and the pytest fixture: ``options``
    (the session's, or the defaults) with the settings the call ``given``, then the check."""
    __tracebackhide__ = True
    try:
        result = check(impls, spec, with_call_arguments(options, **given))
    except LosscmpError as error:  # bad input to the call: its one line at the test's own frame, as the report is
        error.args = (in_call_terms(str(error)),)
        raise error.with_traceback(None) from None
    if SESSIONS:
        SESSIONS[-1].record(result)
    if result.failure:
        raise AssertionError(result.failure)
    return result


def check(impls: Sequence[str | Callable[..., Any]], spec: Spec | str | None, options: CheckOptions) -> CheckResult:
    """Replay the saved cases, then (unless replay-only, or a saved case still diverges) fuzz."""
    execution = options.settings.execution
    given = dict(execution.pythons)
    named = [implementation(i, given, strict=options.called_pythons) for i in impls]
    loaded = unique_labels(named)
    pythons: dict[str, str] = {}
    if given:
        # Only the references sent elsewhere run elsewhere, each under its label after
        # renaming (mse -> mse#2); a callable that shares a --losscmp-python label stays here.
        pythons = {new.label: given[old.label] for old, new in zip(named, loaded) if is_remote(old)}
        check_labels({la: given[la] for la in options.called_pythons}, [i.label for i in named], "pythons")
    if len(loaded) < 2:
        raise UsageError(f"losscmp needs at least two implementations to compare, got {len(loaded)}")
    here = [i for i in loaded if i.label not in pythons]  # inference probes in this interpreter
    if not spec and not here:
        raise UsageError("give spec= when every implementation runs under another interpreter (inference probes in this one)")
    the_spec = spec if isinstance(spec, Spec) else resolve_spec(spec) if spec else infer_spec(here)
    try:
        replayed = _replay_saved(loaded, the_spec, options, pythons)
    except ReproError as e:  # unreadable saved case: one line, the test fails
        return CheckResult(tuple(loaded), (), None, f"losscmp: {e}")
    still = [r for r in replayed if r.verdict.kind]
    if still:
        return CheckResult(tuple(loaded), replayed, None, _replay_failure(still, options))
    if options.replay_only:
        return CheckResult(tuple(loaded), replayed, None, None)
    # Only this check's sides sent elsewhere run elsewhere; a timeout given for the
    # --losscmp-python sides is dropped by a check that has none (no worker to time).
    timeout = execution.timeout if RunnerKind.choose(execution.isolate, pythons).stops_hung_calls else None
    # Read when the check runs: Hypothesis' own pytest plugin loads --hypothesis-profile late.
    examples = profile_examples() if options.examples_from_profile else options.settings.search.examples
    settings = options.settings.updated(terms=CALL_TERMS, pythons=tuple(pythons.items()), timeout=timeout, examples=examples)
    try:
        result = audit(loaded, the_spec, settings)
    except ProbeError as e:  # the implementations fail on a tame input: a failed check, as any finding is
        why = in_call_terms(str(e))
        return CheckResult(tuple(loaded), replayed, None, f"PROBE FAILED (losscmp): {why}", probe_error=why)
    return CheckResult(tuple(loaded), replayed, result, None if result.agree else _audit_failure(result, options))


def _replay_saved(impls: Sequence[Implementation], spec: Spec, options: CheckOptions,
                  pythons: Mapping[str, str]) -> tuple[ReplayedCase, ...]:
    """Judge every saved case whose pair the test passes again, with the test's own callables.

    A saved case is matched by the labels of its pair and by its spec, never re-imported
    from the references it records: a lambda has none.  It is judged with the tolerance
    it was saved with; a case that crashed or hung is replayed in a worker process.
    """
    saved = replay_saved(options.replay_dir, impls, spec, isolate=options.settings.execution.isolate or None, pythons=pythons, shown=shown_path)
    return tuple(ReplayedCase(s.path, s.recorded, s.result.verdict, s.result.repro.case) for s in saved)


# --- failure messages ----------------------------------------------------------------

def _replay_failure(still: Sequence[ReplayedCase], options: CheckOptions) -> str:
    kinds = ",".join(dict.fromkeys(str(r.verdict.kind) for r in still))
    subjects = ", ".join(dict.fromkeys(str(r.verdict.subject) for r in still))
    lines = [f"DIVERGE {kinds} on {len(still)} saved case(s): {subjects}"]  # the line pytest's short summary shows
    for r in still:
        lines.append(f"losscmp: a saved case still diverges ({r.verdict.kind}): {r.verdict.subject}")
        lines.append(f"  saved case: {shown_path(r.path)} (saved as {r.recorded})")
        lines.append(f"  {verdict_text(r.verdict)}")
        lines.append(f"  input: {case_values_text(r.case.sizes, r.case.tensors)}")
        for name, t in r.case.tensors.items():
            if t.numel() <= 24:
                lines.append(f"  {name} = {_tensor_text(t)}")
    lines += _replay_lines(options)
    return "\n".join(lines)


def _audit_failure(result: AuditResult, options: CheckOptions) -> str:
    from rich.console import Console

    # The first line is what pytest's short summary shows: the verdict, not a preamble.
    diverging = [r for r in pair_rows(result) if r["verdict"] == "diverge"]
    # pytest cuts it at the terminal's width, after "FAILED <test id> - AssertionError: ":
    # the verdict, kinds and counts come first; the next line says it is losscmp's report.
    verdict = "; ".join(f"{','.join(r['kinds'])} {r['diverging_cases']}/{result.cases_run} {r['subject']}" for r in diverging)
    buffer = io.StringIO()
    # Sentences wrap at word boundaries to the terminal (less pytest's "E       " margin, at
    # least 112 columns so the verdict table keeps one row per pair); commands and paths
    # are printed unwrapped by print_audit, so they still paste.
    width = max(120, shutil.get_terminal_size().columns) - 8
    print_audit(result, Console(file=buffer, width=width, color_system=None, highlight=False),
                verbose=options.verbose, evidence_hint="pytest -vv")
    lines = [f"DIVERGE {verdict}"] + buffer.getvalue().rstrip("\n").splitlines()
    lines += _replay_lines(options, saved=all(d.repro for d in result.divergences))
    return "\n".join(lines)


def in_call_terms(text: str) -> str:
    """Inside a test, options are keyword arguments: a message written for the command
    line is said in the call's terms."""
    return in_terms(text, CALL_TERMS)


def _replay_lines(options: CheckOptions, saved: bool = True) -> list[str]:
    # Once every case is saved, replaying them alone shows the divergence, in seconds.
    command = (saved and options.replay_saved_command) or options.replay_command
    return [f"replay: {command}"] if command else []


def _tensor_text(t: torch.Tensor) -> str:
    return tensor_text(t)


def _current_test_command() -> str | None:
    """``pytest NODEID`` for the running test (pytest sets PYTEST_CURRENT_TEST), else None."""
    current = os.environ.get("PYTEST_CURRENT_TEST")
    if not current:
        return None
    return f"pytest {shlex.quote(current.rsplit(' (', 1)[0])}"


# --- options -------------------------------------------------------------------------

def profile_examples() -> int:
    """``max_examples`` of the loaded Hypothesis settings profile.

    Read from the profile itself, not from ``settings()``: inside a ``@given`` test the
    latter is that test's own settings.  Hypothesis loads its built-in ``ci`` profile on
    its own when it sees a CI environment, so the profile's name says nothing about who
    chose it; its ``max_examples`` (100 unless someone changed it) is the budget.
    """
    from hypothesis import settings

    return settings.get_profile(settings.get_current_profile_name()).max_examples


# --- implementations held by a test --------------------------------------------------

def implementation(impl: str | Callable[..., Any], pythons: Mapping[str, str] | None = None,
                   strict: Sequence[str] = ()) -> Implementation:
    """A reference, loaded; or a callable, wrapped with the reference that names it.

    A reference whose label is in ``pythons`` is never imported here: its environment
    may be the only one with its package.  A callable lives in this process: naming its
    label in ``strict`` (the call's own ``pythons=``) is an error.

    A function defined in a project file (a test file, the project's own ``losses.py``)
    is named by that file's path relative to the working directory (where repro files
    resolve references from), so ``losscmp replay`` and isolated workers can import it;
    one from an installed package by its module.  A lambda or a local function keeps its qualified name, which no one can
    import: its saved cases are replayed by the test that holds it.
    """
    pythons = pythons or {}
    if isinstance(impl, str):
        ref = parse_ref(impl)
        if ref.label in pythons:
            return remote_implementation(ref)
        return load_implementation(ref)
    if not callable(impl):
        raise UsageError(f"{impl!r} is neither a reference nor callable")
    if isinstance(impl, type) and issubclass(impl, torch.nn.Module):
        raise UsageError(f"{impl.__name__} is a class, not a loss: pass an instance, {impl.__name__}() (its options go inside the parentheses)")
    name = getattr(impl, "__qualname__", None) or type(impl).__qualname__
    module = getattr(impl, "__module__", None) or type(impl).__module__
    label = re.sub(r"[^\w.+-]", "", name.split(".")[-1]) or "impl"
    target = str(module)
    source = _project_file(impl)
    if source is not None:
        target = str(source)
    if label in strict:
        raise UsageError(f"pythons {label}: {label} is a callable of this process; only a reference "
                         f"('pkg.module:fn', 'file.py:fn') can run under another interpreter")
    return Implementation(Ref(text=f"{target}:{name}", label=label, target=target, attrs=tuple(name.split("."))), impl)


def _project_file(impl: Callable[..., Any]) -> Path | None:
    """The file defining ``impl``, relative to the working directory, if it is a project file."""
    if not (inspect.isfunction(impl) or inspect.isclass(impl)):
        return None
    try:
        path = inspect.getsourcefile(impl)
        relative = Path(path).resolve().relative_to(Path.cwd().resolve()) if path else None
    except (TypeError, ValueError):
        return None
    # A virtual environment inside the project holds installed packages, named by module.
    if relative is None or "site-packages" in relative.parts or any(part.startswith(".") for part in relative.parts):
        return None
    return relative


def unique_labels(impls: Sequence[Implementation]) -> list[Implementation]:
    """Same-named callables (two lambdas) become ``lambda`` and ``lambda#2``."""
    seen: dict[str, int] = {}
    out = []
    for impl in impls:
        n = seen[impl.label] = seen.get(impl.label, 0) + 1
        out.append(impl if n == 1 else replace(impl, ref=replace(impl.ref, label=f"{impl.label}#{n}")))
    return out
