"""No implementation can end a losscmp run silently.

An implementation called in-process can end the process itself (``os._exit(0)``, a
segfault, ``abort()``); without care that is a silent exit 0 in CI.  So the command
line runs under a supervisor: ``entry()`` forks before anything heavy is imported; the
child does the work, the parent only waits.  Before each in-process call the child
leaves a *breadcrumb* (one ``pwrite`` of a few hundred bytes): which implementation,
and how to rebuild its input — the case's recipe (the common case: the search's cases
are rebuilt bit for bit from it) or, for a case the minimiser or a stage derived, a
repro file written before the call.  If the child dies without saying it finished, the
parent names the implementation, turns the breadcrumb into an ordinary repro file
(``losscmp replay`` replays it isolated) and exits 1 with one line that suggests
``--isolate``.  It never exits 0 for a run that did not finish.

The child also exits with ``os._exit`` once its report is written, so a non-daemon
thread left behind by an implementation cannot keep losscmp alive; SIGTERM to the
parent is passed on and unwinds the child (workers stopped, temporary files removed);
the child dies with the parent (``PR_SET_PDEATHSIG``) on SIGKILL.

The parent is also the child's *watchdog*.  Before an in-process call the child writes the
call's deadline into a page shared with the parent (a store, no system call); a call that
outlasts it (``--timeout``, or by default the larger of ``breadcrumbs.DEFAULT_TIMEOUT_FLOOR`` seconds and
``breadcrumbs.DEFAULT_TIMEOUT_FACTOR`` times the slowest call that implementation made so far) is a
hang: the parent kills the child (a hung call cannot be unwound safely: it may hold a lock,
spin in C, or have stopped itself) and reports a ``timeout`` finding the way it reports a
crash.  After every case the child also leaves a *snapshot* of its JSON report so far; when
the child dies or is killed, the parent completes that snapshot with the crash or timeout
finding, prints what was found and writes the ``--json`` report, marked ``interrupted``.

The parent is a child subreaper (Linux): whatever the run leaves behind (a worker's forked
child, a fork server, an implementation's background process) is re-parented to it rather
than to init, and killed when the run ends, so no process of the run outlives losscmp.

The parent forks after the package (and torch) are imported: the child shares those pages,
so supervision costs a fork and a wait, not a second interpreter.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from . import breadcrumbs, jsonout
from .breadcrumbs import (  # noqa: F401  re-exported: the child's side moved to breadcrumbs
    Terminated, before_call, describe_run, note, rebuildable, request_death_signal,
)
from .cli import main
from .generate import build_case
from .load import parse_ref
from .model import Alone, Divergence, Kind, Outcome, Pair, Recipe, Verdict
from .report import divergence_json, print_partial, write_json
from .repro import DTYPES, load_input, save_case, save_input
from .spec import parse_spec

ENV_DISABLE = "LOSSCMP_UNSUPERVISED"
# How long the child may take to write its report after SIGTERM / Ctrl-C before the parent
# kills it and writes the report from the last snapshot (a call hung in C never unwinds).
INTERRUPT_GRACE = 10.0
# How often the parent looks at the watchdog's deadline.
_TICK = 0.1

# The child's side (breadcrumbs and deadlines before each call, report snapshots,
# Terminated) is :mod:`losscmp.breadcrumbs`.


# --- the parent's side ------------------------------------------------------------------

def entry(argv: Sequence[str] | None = None) -> int:
    """The ``losscmp`` command: supervised where the platform can fork, else plain."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not hasattr(os, "fork") or os.environ.get(ENV_DISABLE):
        return main(argv)
    directory = Path(tempfile.mkdtemp(prefix="losscmp-run-"))
    parent = os.getpid()
    clock = breadcrumbs.Clock()
    _become_subreaper()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 70  # EX_SOFTWARE, should main itself fail in an unforeseen way
        try:
            breadcrumbs.start(directory, parent, save_input, clock)
            code = main(argv)
        except Terminated:
            code = 143
        except BaseException as e:  # a bug in losscmp itself: say so in one line, never end in silence
            where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
            at = f" at {Path(where[0].filename).name}:{where[0].lineno} in {where[0].name}" if where else ""
            message = " ".join(str(e).split())
            print(f"losscmp: internal error: {type(e).__name__}{': ' + message if message else ''}{at} (a bug in losscmp; please report it)",
                  file=sys.stderr)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            try:
                if breadcrumbs._crumbs is not None:
                    breadcrumbs._crumbs.leave(json.dumps({"done": code}).encode())
                atexit._run_exitfuncs()
            finally:
                # Not sys.exit: a non-daemon thread an implementation left running must not keep us alive.
                os._exit(code)
    return _supervise(pid, directory, clock)


def _become_subreaper() -> None:
    """Orphans of the run (a worker's forked child, a fork server whose parent died) come
    to this process instead of init, so that :func:`_reap_leftovers` can end them (Linux)."""
    global _subreaper
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            _subreaper = ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
        except Exception:
            _subreaper = False


_subreaper = False


def _supervise(pid: int, directory: Path, clock: breadcrumbs.Clock) -> int:
    signals: list[tuple[int, float]] = []  # (signal, when) received by this process

    def forward(signum: int, frame: Any) -> None:
        signals.append((signum, time.monotonic()))
        try:
            # Ctrl-C at a terminal reaches the child too: a second copy would cut its report short.
            if signum != signal.SIGINT:
                os.kill(pid, signum)
            os.kill(pid, signal.SIGCONT)  # a child that stopped itself (SIGSTOP) must run to unwind
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        status, hung = _wait(pid, clock, signals)
        crumb = _last_crumb(directory)
        if hung is None and "done" in crumb and os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        return _report_end(status, crumb, directory, hung, signals[0][0] if signals else None)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the report is written; nothing may cut the clean-up short
        _reap_leftovers()
        shutil.rmtree(directory, ignore_errors=True)


def _wait(pid: int, clock: breadcrumbs.Clock, signals: list[tuple[int, float]]) -> tuple[int, float | None]:
    """Wait for the child; kill it when an in-process call outlasts its deadline, or when it
    has not finished ``INTERRUPT_GRACE`` seconds after a signal.  Returns its wait status and,
    for a hung call, the limit it outlasted."""
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        seen: tuple[float, float] | None = None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, None
            now = time.monotonic()
            deadline, limit = clock.read()
            if deadline and now > deadline:
                if seen == (deadline, limit):  # read twice the same: not a torn store
                    _kill(pid)
                    return os.waitpid(pid, 0)[1], limit
                seen = (deadline, limit)
                continue
            seen = None
            if signals and now - signals[0][1] > INTERRUPT_GRACE:  # its report never came: a call hung in C?
                _kill(pid)
                return os.waitpid(pid, 0)[1], None
            if pidfd is not None:
                select.select([pidfd], [], [], _TICK)
            else:
                time.sleep(_TICK / 4)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap_leftovers(patience: float = 1.0) -> None:
    """End every process the run left behind.  The fork server and the resource tracker
    leave by themselves once the run's pipes close: they get ``patience`` seconds; then
    whatever remains (a worker's forked child, an implementation's background process, and
    in turn their children, re-parented here as their parents die) is killed."""
    if not _subreaper:
        return
    me = os.getpid()
    start = time.monotonic()
    while time.monotonic() - start < patience + 5.0:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        left = _children(me)
        if not left:
            return
        if time.monotonic() - start > patience:
            for child in left:
                _kill(child)
        time.sleep(0.02)


def _children(pid: int) -> list[int]:
    """Live (not zombie) children of ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def _last_crumb(directory: Path) -> dict[str, Any]:
    try:
        text = (directory / "call").read_bytes().split(b"\n", 1)[0]
        crumb = json.loads(text)
        return crumb if isinstance(crumb, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_json(path: Path, first_line: bool = False) -> dict[str, Any]:
    try:
        text = path.read_bytes()
        data = json.loads(text.split(b"\n", 1)[0] if first_line else text)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"signal {signal.Signals(sig).name}"
        except ValueError:
            return f"signal {sig}"
    return f"exit code {os.WEXITSTATUS(status)}"


def _report_end(status: int, crumb: dict[str, Any], directory: Path, hung: float | None, signum: int | None) -> int:
    """The child ended without finishing: say how, keep its input, and write the report so far."""
    context = _read_json(directory / "context.json")
    label = crumb.get("calling")
    if signum is not None and hung is None:  # it was told to stop and did not finish its report in time
        name = signal.Signals(signum).name
        _write_partial(directory, context, None, f"{name}: the run was stopped")
        print(f"losscmp: {'interrupted' if signum == signal.SIGINT else 'terminated'} ({name}); "
              f"the child did not finish its report within {INTERRUPT_GRACE:g} s and was killed", file=sys.stderr)
        return 128 + signum
    how = f"did not return within {hung:g} s" if hung is not None else _how(status)
    kind = "timeout" if hung is not None else "crash"
    if label is None:
        doing = crumb.get("doing", "starting")
        what = "was stopped: it hung" if hung is not None else "ended unexpectedly"
        _write_partial(directory, context, None, f"the losscmp process {what} ({how}) while {doing}")
        print(f"losscmp: error: the losscmp process {what} ({how}) while {doing}", file=sys.stderr)
        return 2 if "loading" in doing else 1
    made = _materialise({**crumb, "limit": hung}, directory, how, kind)
    saved = made.get("repro") if made else None
    given = _read_text(directory / "input.txt")  # the run's input is a saved case (trace)
    where = (f"its input is saved as {saved} (replay it: losscmp replay {saved})" if saved else
             f"its input is the saved case {given}" if given else "its input could not be saved")
    audit = bool(context)  # replay, sweep and trace have no --isolate to suggest
    if hung is not None:
        headline = (f"implementation {label} did not return within {hung:g} s while it was being called in-process on input "
                    f"{crumb.get('case', '?')}; {where}; the run stopped there (a hung call cannot be abandoned safely in-process)"
                    + ("; run again with --isolate (and --timeout) to record hangs as findings and go on" if audit else ""))
    else:
        headline = (f"implementation {label} ended the losscmp process ({how}) while it was being called on "
                    f"input {crumb.get('case', '?')}; {where}"
                    + ("; run again with --isolate to record this as a crash finding and go on" if audit else ""))
    finding = made["finding"] if made else _bare_finding(crumb, context, kind, how)
    _write_partial(directory, context, finding, f"{kind}: {label} {how}")
    print(f"losscmp: error: {headline}", file=sys.stderr)
    return 1


def _bare_finding(crumb: dict[str, Any], context: dict[str, Any], kind: str, how: str) -> dict[str, Any]:
    """The crash or timeout when the fresh interpreter that writes its full record (and its
    repro) failed: the fields a reader of the report needs, from the breadcrumb alone."""
    label = crumb["calling"]
    pair = _partner(label, context)
    return {"pair": pair if pair[0] != pair[1] else [label], "alone": pair[0] == pair[1], "kind": kind, "score": None, "score_text": "inf",
            "cases": 1, "detail": f"{label} {_said(kind, how)}", "input": crumb.get("case"), "original_sizes": crumb.get("sizes", {}),
            "repro": None, "repro_error": "its input could not be rebuilt"}


def _said(kind: str, how: str) -> str:
    return f"ended the losscmp process ({how})" if kind == "crash" else f"{how} (in-process)"


def _partner(label: str, context: dict[str, Any]) -> list[str]:
    return next((list(p) for p in context.get("pairs", []) if label in p), [label, label])


def _write_partial(directory: Path, context: dict[str, Any], finding: dict[str, Any] | None, interruption: str) -> None:
    """Complete the child's last snapshot with ``finding`` and write it where ``--json`` said;
    print what was found so far."""
    target = context.get("json")
    snapshot = _read_json(directory / "report.json", first_line=True)
    phase = snapshot.pop("_phase", None)
    if not snapshot and target is None:
        return  # not an audit, or it ended before there was anything to report
    data = snapshot or {
        "implementations": [i["label"] for i in context.get("implementations", [])],
        "references": {i["label"]: i["ref"] for i in context.get("implementations", [])},
        "cases_run": 0, "tally": {}, "not_compared": [], "seed": context.get("seed"),
        "tolerance": context.get("tolerance"), "agree": False, "divergences": [], "stage_errors": [],
    }
    if finding is not None:
        if phase != "stages":  # a search case that never finished: count it
            data["cases_run"] = data.get("cases_run", 0) + 1
            data.setdefault("tally", {})[finding["kind"]] = data.get("tally", {}).get(finding["kind"], 0) + 1
        data.setdefault("divergences", []).append(finding)
        data["agree"] = False
    data["interrupted"] = True
    data["interruption"] = interruption
    human = sys.stderr if target == "-" else sys.stdout
    if snapshot or finding is not None:
        print_partial(data, human)
    if target is not None:
        try:
            write_json(data, target, stdout=sys.stdout)
        except OSError as e:
            print(f"losscmp: error: --json {target}: could not be written ({e.strerror or e})", file=sys.stderr)


def _materialise(crumb: dict[str, Any], directory: Path, how: str, kind: str = "crash") -> dict[str, Any] | None:
    """Turn the breadcrumb into an ordinary repro file and the finding's JSON record, in a
    fresh interpreter (the case is rebuilt with torch there; the supervisor never uses it).
    Returns ``{"repro": path or None, "finding": {...}}``, or None if that failed."""
    (directory / "crumb.json").write_text(json.dumps({**crumb, "how": how, "kind": kind}))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "losscmp.supervise", str(directory)],
            capture_output=True, text=True, timeout=300, env={**os.environ, ENV_DISABLE: "1"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    try:
        made = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    except ValueError:
        return None
    return made if isinstance(made, dict) and isinstance(made.get("finding"), dict) else None


def materialise(directory: Path) -> dict[str, Any]:
    """In a fresh interpreter: the crash or timeout described by the breadcrumb, as a repro
    file and as the divergence record of the JSON report (the report's own renderer)."""
    crumb = json.loads((directory / "crumb.json").read_text())
    context = json.loads((directory / "context.json").read_text())
    label = crumb["calling"]
    kind = Kind(crumb.get("kind", "crash"))
    spec = parse_spec(crumb["spec"])
    if "recipe" in crumb:
        r = crumb["recipe"]
        recipe = Recipe(**{**r, "sizes": tuple(tuple(s) for s in r["sizes"]), "planted": tuple(tuple(p) for p in r["planted"])})
        case = build_case(spec, recipe, dtype=DTYPES[crumb["dtype"]], device=crumb["device"])
    else:
        case = load_input(crumb["saved"], spec)
    partner = _partner(label, context)
    refs = [parse_ref(f"{i['label']}={i['ref']}") for i in context["implementations"] if i["label"] in partner]
    if context["save_dir"] is None:  # --no-save: the input that killed the run is still the one record of it, kept
        save_dir = Path(tempfile.mkdtemp(prefix="losscmp-crash-"))  # out of the way, not in the working folder
    else:
        save_dir = Path(context["save_dir"])
        if not save_dir.is_absolute():
            save_dir = Path(context["cwd"]) / save_dir
    said = _said(kind.value, crumb["how"])
    repro, error = None, None
    try:
        repro = str(save_case(
            save_dir, spec=spec, case=case, refs=refs, pair=(partner[0], partner[1]), kind=kind, outcomes={label: Outcome(kind.value, error=said)},
            tolerance=(context["tolerance"]["rtol"], context["tolerance"]["atol"]), seed=context["seed"],
            device=crumb["device"], extra={"detail": f"{label} {said}", "timeout": crumb.get("limit")}, cwd=context["cwd"],
        ))
    except (OSError, TypeError, ValueError) as e:  # an unwritable save folder: the finding stands without its file
        error = f"{type(e).__name__}: {' '.join(str(e).split())}"
    subject = Pair(*partner) if partner[0] != partner[1] else Alone(label)
    regimes = {case.recipe.regime: 1} if case.recipe else {}
    d = Divergence(subject, kind, Verdict(subject, kind, math.inf, f"{label} {said}"), case, 1, regimes, repro=repro, repro_error=error)
    return {"repro": repro, "finding": divergence_json(d)}


if __name__ == "__main__":
    print(jsonout.dumps(materialise(Path(sys.argv[1])), default=str))
