"""pytest plugin: differential tests of loss functions inside a research repo's suite.

Registered through the ``pytest11`` entry point, so installing losscmp is enough::

    def test_my_dice_matches_monai(losscmp):
        losscmp.check(my_dice, "monai.losses:DiceLoss(sigmoid=False)", spec="segmentation")

``check`` is :func:`losscmp.testing.assert_losses_agree` with its options taken from the
command line and a folder of saved cases per test: it first replays the cases saved
for this test by earlier runs (a regression suite that grows by itself), then fuzzes.
On divergence it fails the test with the report and a replay command, having saved
each minimised case under ``--losscmp-save-dir/<test>-<hash>/``.  At the end of the
session a ``losscmp`` section sums up every check (aggregated across xdist workers).

How many cases a check draws, first rule that applies: the call's ``examples=``,
``--losscmp-examples``, the ``max_examples`` of the loaded Hypothesis profile
(``--hypothesis-profile ci``; Hypothesis loads its ``ci`` profile by itself on a CI
machine), whose default is 100.
"""
from __future__ import annotations

import hashlib
import re
import shlex
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

from .errors import LosscmpError
from .project import SAVE_DIR

if TYPE_CHECKING:
    from .testing import CheckOptions, CheckResult, Session

# losscmp.testing, settings and interpreter import torch: this module imports them inside
# the hooks that need them, so that a pytest run that runs no check never loads torch.
# Spelled out, not imported: importing losscmp.testing imports torch, and every pytest
# run of a project that merely has losscmp installed loads this module.
DTYPE_NAMES = ["float16", "bfloat16", "float32", "float64"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("losscmp", "losscmp: differential testing of loss functions")
    group.addoption("--losscmp-examples", type=int, default=None, metavar="N",
                    help="cases per losscmp.check when the call gives none (default: the loaded Hypothesis profile's max_examples, 100 unless changed)")
    group.addoption("--losscmp-seed", type=int, default=0, help="seed for losscmp.check (default 0)")
    group.addoption("--losscmp-device", default=None, help="device of generated inputs, cpu or cuda (default cpu)")
    group.addoption("--losscmp-dtype", default=None, choices=DTYPE_NAMES, help="floating dtype of generated inputs (default float32)")
    group.addoption("--losscmp-rtol", type=float, default=None, help="relative tolerance (default: torch.testing's for the dtype)")
    group.addoption("--losscmp-atol", type=float, default=None, help="absolute tolerance (default: torch.testing's for the dtype)")
    group.addoption("--losscmp-isolate", action="store_true", help="run implementations in worker processes: a segfault or hang fails the test, not pytest")
    group.addoption("--losscmp-timeout", type=float, default=None, metavar="SECONDS", help="with --losscmp-isolate or --losscmp-python: a slower call is a 'timeout' divergence")
    group.addoption("--losscmp-python", action="append", default=[], metavar="LABEL=PATH",
                    help="run the implementation labelled LABEL (a reference, e.g. 'official=pkg.losses:dice') under that "
                         "interpreter; its environment needs torch and numpy, not losscmp (repeatable)")
    group.addoption("--losscmp-ray", default=None, metavar="ADDRESS",
                    help="call the implementations on Ray actors: 'local' starts a Ray instance per check, auto / HOST:PORT / "
                         "ray://HOST:PORT joins a cluster (needs losscmp[ray]; saved cases are still replayed here)")
    group.addoption("--losscmp-save-dir", default=SAVE_DIR, help=f"where minimised cases are saved and replayed from, relative to the rootdir (default {SAVE_DIR}, hidden like .hypothesis)")
    group.addoption("--losscmp-no-replay", action="store_true", help="do not replay saved cases before fuzzing")
    group.addoption("--losscmp-replay-only", action="store_true", help="replay saved cases only, no fuzzing (a test with none passes)")


# --- the session's tally, for the terminal summary -----------------------------------

class Tally:
    """What every check of the session did; a plain dict crosses from xdist workers."""

    def __init__(self) -> None:
        self.checks = self.pairs = self.cases = self.replayed = self.replayed_diverging = self.probe_failures = 0
        self.kinds: Counter = Counter()
        self.saved: Counter = Counter()  # folder -> new cases saved there

    def add(self, result: CheckResult, root: Path) -> None:
        self.checks += 1
        self.pairs += len(result.pairs)
        self.cases += result.cases_run
        self.replayed += len(result.replayed)
        self.replayed_diverging += sum(1 for r in result.replayed if r.verdict.kind)
        self.kinds.update(result.divergence_kinds)
        self.probe_failures += result.probe_error is not None
        for path in result.saved:
            self.saved[_relative(path.parent, root)] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"checks": self.checks, "pairs": self.pairs, "cases": self.cases, "replayed": self.replayed,
                "replayed_diverging": self.replayed_diverging, "probe_failures": self.probe_failures, "kinds": dict(self.kinds), "saved": dict(self.saved)}

    def merge(self, data: dict[str, Any]) -> None:
        for name in ("checks", "pairs", "cases", "replayed", "replayed_diverging", "probe_failures"):
            setattr(self, name, getattr(self, name) + int(data.get(name, 0)))
        self.kinds.update(data.get("kinds", {}))
        self.saved.update(data.get("saved", {}))

    def lines(self) -> list[str]:
        replayed = f"{self.replayed} saved case(s) replayed"
        if self.replayed_diverging:
            replayed += f" ({self.replayed_diverging} still diverge)"
        lines = [f"{self.checks} check(s): {self.pairs} pair(s) checked, {self.cases} case(s) run, {replayed}"]
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.kinds.items()))
        lines.append(f"divergences: {kinds or 'none'}")
        if self.probe_failures:
            lines.append(f"probe failures: {self.probe_failures} check(s) whose implementations could not run on their spec")
        if self.saved:
            lines.append("new cases saved in:")
            lines += [f"  {folder}  ({n})" for folder, n in sorted(self.saved.items())]
        return lines


TALLY = pytest.StashKey[Tally]()
SESSION: pytest.StashKey[Session] = pytest.StashKey()


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def pytest_configure(config: pytest.Config) -> None:
    from .testing import SESSIONS, Session

    tally = config.stash[TALLY] = Tally()
    # Every check of the session, fixture or plain assert_losses_agree, takes the
    # command line's options and is tallied.
    session = config.stash[SESSION] = Session(_command_line_options(config), lambda result: tally.add(result, config.rootpath))
    SESSIONS.append(session)
    if session.defaults.settings.execution.ray is not None:
        from .cluster import hold_connection  # Ray's runner: imported only when the session uses it

        hold_connection()  # one connection, and its actors, for every check of the session
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistController(config), "losscmp-xdist")


def pytest_unconfigure(config: pytest.Config) -> None:
    from .testing import SESSIONS

    session = config.stash.get(SESSION, None)
    if session in SESSIONS:
        SESSIONS.remove(session)
        if session.defaults.settings.execution.ray is not None:
            from .cluster import release_connection

            release_connection()


def _command_line_options(config: pytest.Config) -> CheckOptions:
    from .files import check_folder
    from .interpreter import parse_pythons
    from .settings import PLUGIN_TERMS, Settings
    from .testing import CheckOptions

    opt = config.getoption
    given = {"examples": opt("--losscmp-examples"), "device": opt("--losscmp-device"), "dtype": opt("--losscmp-dtype"),
             "rtol": opt("--losscmp-rtol"), "atol": opt("--losscmp-atol"), "timeout": opt("--losscmp-timeout"),
             "ray": opt("--losscmp-ray")}
    try:  # a bad option stops the session in one line, before any test runs
        pythons = parse_pythons(opt("--losscmp-python"), "--losscmp-python")
        check_folder(opt("--losscmp-save-dir"), "--losscmp-save-dir")  # e.g. under a regular file: refused now, not at the first save
        # Checked by Settings, as every front end's options are, and named as given here.
        settings = Settings.of(terms=PLUGIN_TERMS, seed=opt("--losscmp-seed"), isolate=opt("--losscmp-isolate"),
                               pythons=tuple(pythons.items()), **{k: v for k, v in given.items() if v is not None})
    except LosscmpError as error:
        raise pytest.UsageError(str(error)) from None
    return CheckOptions(
        settings=settings,
        examples_from_profile=opt("--losscmp-examples") is None,
        replay_only=opt("--losscmp-replay-only"),
        verbose=opt("verbose") >= 2,  # pytest -vv: each finding's evidence in the failure
    )


class _XdistController:
    """On the xdist controller: add up what each worker tallied."""

    def __init__(self, config: pytest.Config):
        self.config = config

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        data = getattr(node, "workeroutput", {}).get("losscmp")
        if data:
            self.config.stash[TALLY].merge(data)


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the tally to the controller
        workeroutput["losscmp"] = session.config.stash[TALLY].as_dict()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    tally = config.stash.get(TALLY, None)
    if tally is None or not tally.checks or hasattr(config, "workeroutput"):
        return
    terminalreporter.ensure_newline()
    terminalreporter.section("losscmp")
    for line in tally.lines():
        terminalreporter.write_line(line)


# --- the fixture ---------------------------------------------------------------------

def case_folder(nodeid: str) -> str:
    """A folder name per test: readable, and unique (a hash of the whole node id)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.split("/")[-1]).strip("_")[:60]
    return f"{slug}-{hashlib.sha1(nodeid.encode()).hexdigest()[:8]}"


class LossChecker:
    """What the ``losscmp`` fixture gives a test."""

    def __init__(self, request: pytest.FixtureRequest):
        config = self.config = request.config
        self.save_dir = Path(config.rootpath) / config.getoption("--losscmp-save-dir") / case_folder(request.node.nodeid)
        no_replay = config.getoption("--losscmp-no-replay") and not config.getoption("--losscmp-replay-only")
        defaults = config.stash[SESSION].defaults
        self.options = replace(
            defaults,
            settings=defaults.settings.updated(save_dir=self.save_dir),
            replay_dir=None if no_replay else self.save_dir,
            replay_command=_command(request.node.nodeid, config, replay_only=False),
            replay_saved_command=_command(request.node.nodeid, config, replay_only=True),
        )

    def check(self, *impls: str | Callable[..., Any], spec: Any = None, examples: int | None = None, **settings: Any) -> CheckResult:
        """Fail the calling test if the implementations disagree; return what was checked.

        ``settings`` override the command line, in ``Settings.of``'s keywords: ``seed``,
        ``device``, ``dtype``, ``rtol``, ``atol``, ``reference``, ``isolate``, ``timeout``,
        ``pythons`` ({label: interpreter}, added to ``--losscmp-python``), ``minimize``,
        ``max_size``, ``allow_nonfinite``, ...
        """
        __tracebackhide__ = True
        from .testing import check_or_raise

        return check_or_raise(impls, spec, self.options, examples=examples, **settings)


def _command(nodeid: str, config: pytest.Config, *, replay_only: bool) -> str:
    """A command that, pasted at the project root, re-runs the test as it ran."""
    parts = ["pytest", shlex.quote(nodeid)]
    opt = config.getoption
    if opt("--losscmp-save-dir") != SAVE_DIR:
        parts += ["--losscmp-save-dir", shlex.quote(opt("--losscmp-save-dir"))]
    if opt("--losscmp-isolate"):
        parts.append("--losscmp-isolate")
    if opt("--losscmp-timeout") is not None:
        parts += ["--losscmp-timeout", str(opt("--losscmp-timeout"))]
    for python in opt("--losscmp-python"):
        parts += ["--losscmp-python", shlex.quote(python)]
    if replay_only:
        return " ".join(parts + ["--losscmp-replay-only"])
    if opt("--losscmp-ray") is not None:
        parts += ["--losscmp-ray", shlex.quote(opt("--losscmp-ray"))]
    for name in ("examples", "seed", "device", "dtype", "rtol", "atol"):
        value = opt(f"--losscmp-{name}")
        if value is not None and not (name == "seed" and value == 0):
            parts += [f"--losscmp-{name}", shlex.quote(str(value))]
    profile = opt("--hypothesis-profile", None)
    if profile:
        parts += ["--hypothesis-profile", shlex.quote(profile)]
    return " ".join(parts)


@pytest.fixture
def losscmp(request: pytest.FixtureRequest) -> LossChecker:
    """Differentially test loss implementations: ``losscmp.check(a, b, spec=...)``."""
    return LossChecker(request)
