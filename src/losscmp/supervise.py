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
outlasts it (``--timeout``, or by default the larger of ``DEFAULT_TIMEOUT_FLOOR`` seconds and
``DEFAULT_TIMEOUT_FACTOR`` times the slowest call that implementation made so far) is a
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
import mmap
import os
import select
import shutil
import signal
import subprocess
import sys
import struct
import tempfile
import time
import traceback
import weakref
from pathlib import Path
from typing import Any, Iterator, Sequence

ENV_DISABLE = "LOSSCMP_UNSUPERVISED"

# Without --timeout an in-process call is a hang once it has run this long, or this many
# times its implementation's slowest call so far, whichever is longer.  A real loss takes
# milliseconds to seconds (the slowest seen here, a forked Sinkhorn, 1.5 s a call): two
# minutes is far beyond any of them on a loaded machine, and a slow side raises its own bar.
DEFAULT_TIMEOUT_FLOOR = 120.0
DEFAULT_TIMEOUT_FACTOR = 20.0
# How long the child may take to write its report after SIGTERM / Ctrl-C before the parent
# kills it and writes the report from the last snapshot (a call hung in C never unwinds).
INTERRUPT_GRACE = 10.0
# How often the parent looks at the watchdog's deadline.
_TICK = 0.1


class Terminated(BaseException):
    """SIGTERM: unwind (close workers, delete temporary files) and stop."""


# --- the child's side: breadcrumbs ------------------------------------------------------

class _Breadcrumbs:
    def __init__(self, directory: Path):
        self.dir = directory
        self.fd = os.open(directory / "call", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.described: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()
        self.rebuildable: weakref.WeakSet[Any] = weakref.WeakSet()
        self.saved = 0
        self.report_fd: int | None = None

    def leave(self, payload: bytes) -> None:
        # Overwrite in place; a newline ends the current crumb (an older, longer one may trail).
        os.pwrite(self.fd, payload + b"\n", 0)

    def snapshot(self, payload: bytes) -> None:
        if self.report_fd is None:
            self.report_fd = os.open(self.dir / "report.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.pwrite(self.report_fd, payload + b"\n", 0)


_crumbs: _Breadcrumbs | None = None


class _Clock:
    """The deadline of the in-process call under way (0: none), in a page the parent shares.

    Two doubles: the deadline on ``time.monotonic()`` (one clock for both processes) and
    the limit it was set from (for the message).  The child only stores; the parent reads
    twice and acts only on two equal reads, so a torn read never kills a healthy call."""

    FORMAT = "dd"

    def __init__(self) -> None:
        self.page = mmap.mmap(-1, struct.calcsize(self.FORMAT))  # anonymous, MAP_SHARED: survives the fork shared

    def arm(self, deadline: float, limit: float) -> None:
        struct.pack_into(self.FORMAT, self.page, 0, deadline, limit)

    def disarm(self) -> None:
        struct.pack_into(self.FORMAT, self.page, 0, 0.0, 0.0)

    def read(self) -> tuple[float, float]:
        return struct.unpack_from(self.FORMAT, self.page, 0)


_clock: _Clock | None = None
_terminated = False  # SIGTERM arrived (the Terminated it raised may have landed where Python drops it)
_timeout: float | None = None  # the user's --timeout for in-process calls; None: the default rule
_slowest: dict[str, float] = {}  # seconds of each implementation's slowest in-process call so far


def supervised() -> bool:
    return _crumbs is not None


def check_terminated() -> None:
    """Raise :class:`Terminated` if SIGTERM arrived, even if its first raise was lost."""
    if _terminated:
        raise Terminated()


def watch_calls(timeout: float | None) -> None:
    """In-process calls that outlast ``timeout`` seconds are hangs (None: the default rule)."""
    global _timeout
    _timeout = timeout


def call_limit(label: str) -> float:
    """Seconds an in-process call of ``label`` may take before it is a hang."""
    if _timeout is not None:
        return _timeout
    return max(DEFAULT_TIMEOUT_FLOOR, DEFAULT_TIMEOUT_FACTOR * _slowest.get(label, 0.0))


@contextlib.contextmanager
def watched(label: str, spec: Any, case: Any) -> Iterator[None]:
    """Around every in-process call: the breadcrumb, then the watchdog's deadline.  Free
    (a no-op) when not supervised."""
    before_call(label, spec, case)
    if _clock is None:
        yield
        return
    limit = call_limit(label)
    start = time.monotonic()
    _clock.arm(start + limit, limit)
    try:
        yield
    finally:
        _clock.disarm()
        took = time.monotonic() - start
        if took > _slowest.get(label, 0.0):
            _slowest[label] = took


def keep_report(data: dict[str, Any], phase: str) -> None:
    """The JSON report so far, for the parent to complete if the child dies or is killed.
    ``phase``: "explore" while the search runs (a call that dies then is one more case),
    "stages" after it.  Overwritten in place like a breadcrumb (a newline ends it; JSON
    text has none): the child only dies mid-call, never mid-write, and a rename per case
    costs milliseconds on some file systems."""
    if _crumbs is None:
        return
    _crumbs.snapshot(json.dumps({**data, "_phase": phase}, allow_nan=False, default=str).encode())


def before_call(label: str, spec: Any, case: Any) -> None:
    """Called by the in-process runner before every call; free when not supervised."""
    if _crumbs is None:
        return
    described = _crumbs.described.get(case)
    if described is None:
        described = _describe(spec, case)
        _crumbs.described[case] = described
    _crumbs.leave(b'{"calling": ' + json.dumps(label).encode() + b", " + described + b"}")


def note(what: str) -> None:
    """A breadcrumb outside implementation calls (e.g. loading a reference)."""
    if _crumbs is not None:
        _crumbs.leave(json.dumps({"doing": what}).encode())


def rebuildable(case: Any) -> None:
    """``case`` was built straight from its recipe: the recipe alone rebuilds it."""
    if _crumbs is not None:
        _crumbs.rebuildable.add(case)


def describe_run(impls: Sequence[Any], save_dir: Path | None, seed: int, tolerance: Any, pairs: Sequence[Any],
                 json_path: str | None = None) -> None:
    """What the parent needs to write a repro and the report if an implementation kills the child."""
    if _crumbs is None:
        return
    context = {
        "json": json_path,
        "implementations": [{"label": i.label, "ref": i.ref.source()} for i in impls],
        "save_dir": str(save_dir) if save_dir is not None else None,
        "seed": seed,
        "tolerance": {"rtol": tolerance.rtol, "atol": tolerance.atol},
        "pairs": [list(p.labels) for p in pairs],
        "cwd": os.getcwd(),
    }
    (_crumbs.dir / "context.json").write_text(json.dumps(context))


def _describe(spec: Any, case: Any) -> bytes:
    first = next(iter(case.tensors.values()))
    where = {"spec": spec.text(), "dtype": str(first.dtype).removeprefix("torch."), "device": str(first.device), "case": case.describe(),
             "sizes": dict(case.sizes)}
    recipe = case.recipe
    if case in _crumbs.rebuildable and recipe is not None:
        where["recipe"] = dict(recipe.__dict__)  # flat fields of numbers, strings and tuples
    else:  # derived by the minimiser or a stage: its tensors go to disk before the call
        from .repro import save_input

        _crumbs.saved += 1
        # No fsync: the supervising parent outlives the child and reads it from the page cache.
        where["saved"] = str(save_input(_crumbs.dir / "inputs", spec, case, stem=f"input-{_crumbs.saved}", durable=False))
    return json.dumps(where)[1:-1].encode()


def _child_setup(directory: Path, parent: int, clock: _Clock) -> None:
    global _crumbs, _clock
    _die_with_parent(parent)
    _crumbs = _Breadcrumbs(directory)
    _clock = clock

    def on_term(signum: int, frame: Any) -> None:
        global _terminated
        _terminated = True
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)


def request_death_signal() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), even mid-hang."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies, even while it hangs."""
    request_death_signal()
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


# --- the parent's side ------------------------------------------------------------------

def entry(argv: Sequence[str] | None = None) -> int:
    """The ``losscmp`` command: supervised where the platform can fork, else plain."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not hasattr(os, "fork") or os.environ.get(ENV_DISABLE):
        from .cli import main

        return main(argv)
    directory = Path(tempfile.mkdtemp(prefix="losscmp-run-"))
    parent = os.getpid()
    clock = _Clock()
    _become_subreaper()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 70  # EX_SOFTWARE, should main itself fail in an unforeseen way
        try:
            _child_setup(directory, parent, clock)
            from .cli import main

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
                if _crumbs is not None:
                    _crumbs.leave(json.dumps({"done": code}).encode())
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


def _supervise(pid: int, directory: Path, clock: _Clock) -> int:
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


def _wait(pid: int, clock: _Clock, signals: list[tuple[int, float]]) -> tuple[int, float | None]:
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
    where = f"its input is saved as {saved} (replay it: losscmp replay {saved})" if saved else "its input could not be saved"
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
    from .report import print_partial, write_json  # only after a death: the parent never needs them otherwise

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
    import math

    from .audit import Divergence
    from .compare import Verdict
    from .findings import Alone, Kind, Pair
    from .generate import Recipe, build_case
    from .load import parse_ref
    from .report import divergence_json
    from .repro import DTYPES, load_input, save_case
    from .run import Outcome
    from .spec import parse_spec

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
    save_dir = Path(context["save_dir"] or ".")
    if not save_dir.is_absolute():
        save_dir = Path(context["cwd"]) / save_dir
    said = _said(kind.value, crumb["how"])
    repro, error = None, None
    try:
        repro = str(save_case(
            save_dir, spec=spec, case=case, refs=refs, pair=tuple(partner), kind=kind, outcomes={label: Outcome(kind.value, error=said)},
            tolerance=(context["tolerance"]["rtol"], context["tolerance"]["atol"]), seed=context["seed"],
            device=crumb["device"], extra={"detail": f"{label} {said}", "base_dir": context["cwd"], "timeout": crumb.get("limit")},
        ))
    except (OSError, TypeError, ValueError) as e:  # an unwritable save folder: the finding stands without its file
        error = f"{type(e).__name__}: {' '.join(str(e).split())}"
    subject = Pair(*partner) if partner[0] != partner[1] else Alone(label)
    regimes = {case.recipe.regime: 1} if case.recipe else {}
    d = Divergence(subject, kind, Verdict(subject, kind, math.inf, f"{label} {said}"), case, 1, regimes, repro=repro, repro_error=error)
    return {"repro": repro, "finding": divergence_json(d)}


if __name__ == "__main__":
    print(json.dumps(materialise(Path(sys.argv[1])), allow_nan=False, default=str))
