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

The parent forks after the package (and torch) are imported: the child shares those pages,
so supervision costs a fork and a wait, not a second interpreter.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Sequence

from . import breadcrumbs
from .breadcrumbs import (  # noqa: F401  re-exported: the child's side moved to breadcrumbs
    Terminated, before_call, describe_run, note, rebuildable, request_death_signal,
)
from .cli import main
from .generate import build_case
from .load import parse_ref
from .model import Kind, Outcome, Recipe
from .repro import DTYPES, load_input, save_case, save_input
from .spec import parse_spec

ENV_DISABLE = "LOSSCMP_UNSUPERVISED"

# The child's side (breadcrumbs before each call, Terminated) is :mod:`losscmp.breadcrumbs`.


# --- the parent's side ------------------------------------------------------------------

def entry(argv: Sequence[str] | None = None) -> int:
    """The ``losscmp`` command: supervised where the platform can fork, else plain."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not hasattr(os, "fork") or os.environ.get(ENV_DISABLE):
        return main(argv)
    directory = Path(tempfile.mkdtemp(prefix="losscmp-run-"))
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 70  # EX_SOFTWARE, should main itself fail in an unforeseen way
        try:
            breadcrumbs.start(directory, parent, save_input)
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
    return _supervise(pid, directory)


def _supervise(pid: int, directory: Path) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child too; it reports and exits
    terminated = []

    def forward(signum: int, frame: Any) -> None:
        terminated.append(signum)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGHUP, forward)
    try:
        _, status = os.waitpid(pid, 0)
        crumb = _last_crumb(directory)
        if "done" in crumb and os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if terminated:
            return 128 + terminated[0]
        return _report_death(status, crumb, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _last_crumb(directory: Path) -> dict[str, Any]:
    try:
        text = (directory / "call").read_bytes().split(b"\n", 1)[0]
        crumb = json.loads(text)
        return crumb if isinstance(crumb, dict) else {}
    except (OSError, ValueError):
        return {}


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"signal {signal.Signals(sig).name}"
        except ValueError:
            return f"signal {sig}"
    return f"exit code {os.WEXITSTATUS(status)}"


def _report_death(status: int, crumb: dict[str, Any], directory: Path) -> int:
    how = _how(status)
    label = crumb.get("calling")
    if label is None:
        doing = crumb.get("doing", "starting")
        print(f"losscmp: error: the losscmp process ended unexpectedly ({how}) while {doing}", file=sys.stderr)
        return 2 if "loading" in doing else 1
    saved = _materialise(crumb, directory, how)
    where = f"its input is saved as {saved} (replay it: losscmp replay {saved})" if saved else "its input could not be saved"
    print(
        f"losscmp: error: implementation {label} ended the losscmp process ({how}) while it was being called on "
        f"input {crumb.get('case', '?')}; {where}; run again with --isolate to record this as a crash finding and go on",
        file=sys.stderr,
    )
    return 1


def _materialise(crumb: dict[str, Any], directory: Path, how: str) -> str | None:
    """Turn the breadcrumb into an ordinary repro file, in a fresh interpreter (torch is
    needed to rebuild the input, and the supervisor never imports it)."""
    (directory / "crumb.json").write_text(json.dumps({**crumb, "how": how}))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "losscmp.supervise", str(directory)],
            capture_output=True, text=True, timeout=300, env={**os.environ, ENV_DISABLE: "1"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines else None


def materialise(directory: Path) -> Path:
    """In a fresh interpreter: write the crash repro described by the breadcrumb."""
    crumb = json.loads((directory / "crumb.json").read_text())
    context = json.loads((directory / "context.json").read_text())
    label = crumb["calling"]
    spec = parse_spec(crumb["spec"])
    if "recipe" in crumb:
        r = crumb["recipe"]
        recipe = Recipe(**{**r, "sizes": tuple(tuple(s) for s in r["sizes"]), "planted": tuple(tuple(p) for p in r["planted"])})
        case = build_case(spec, recipe, dtype=DTYPES[crumb["dtype"]], device=crumb["device"])
    else:
        case = load_input(crumb["saved"], spec)
    partner = next((p for p in context["pairs"] if label in p), [label, label])
    refs = [parse_ref(f"{i['label']}={i['ref']}") for i in context["implementations"] if i["label"] in partner]
    save_dir = Path(context["save_dir"] or ".")
    if not save_dir.is_absolute():
        save_dir = Path(context["cwd"]) / save_dir
    outcomes = {label: Outcome("crash", error=f"ended the losscmp process ({crumb['how']})")}
    return save_case(
        save_dir, spec=spec, case=case, refs=refs, pair=tuple(partner), kind=Kind.CRASH, outcomes=outcomes,
        tolerance=(context["tolerance"]["rtol"], context["tolerance"]["atol"]), seed=context["seed"],
        device=crumb["device"], extra={"detail": f"{label} ended the losscmp process ({crumb['how']})"}, cwd=context["cwd"],
    )


if __name__ == "__main__":
    print(materialise(Path(sys.argv[1])))
