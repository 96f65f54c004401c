"""Command line: ``losscmp IMPL IMPL [...]``, ``losscmp replay FILE``, ``losscmp sweep A B``, ``losscmp trace A B FILE``.

Exit codes: 0 all agree, 1 some pair diverges, 2 bad usage or bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shlex
import signal
import sys
import textwrap
from pathlib import Path
from typing import IO, Iterator, Sequence

import torch
from rich.console import Console
from rich.markup import escape

from . import breadcrumbs, files, jsonout
from ._version import __version__
from .audit import audit
from .engine import RUNNERS, run_record
from .errors import LosscmpError, UsageError, shown
from .display import case_values_text, verdict_text
from .generate import select_regimes
from .html_report import render_html
from .infer import infer
from .interpreter import check_labels, parse_pythons, remote_implementation
from .load import disambiguate, load_implementation, parse_ref
from .model import RunRecord, Tolerance
from .plot import plot_sweep  # matplotlib itself is imported only when a plot is drawn
from .project import SAVE_DIR, default_save_dir, project_root, shown_path
from .replay import recorded_timeout, replay, replay_saved
from .report import audit_json, print_audit, print_replayed, sweep_json, write_json
from .repro import file_checks, load_repro, load_repro_implementations, version_changes
from .settings import DTYPES, Execution, RunnerKind, Settings, check_timeout, checked_timeout
from .spec import PRESETS, resolve_spec
from .sweep import parse_knob, sweep, sweep_case, switches
from .testgen import generate_pytest
from .explain.oracle import Category, oracle
from .trace import locate

# The replay and trace examples name the file the first example saves (seed 0: the same
# file on every run), so every line runs as printed, in order, from the repository root.
_SAVED = ".losscmp/bce_on_sigmoid--bce_with_logits--value--*.json"
EXAMPLES = f"""\
examples (from a clone of the repository, in this order):
  losscmp fixtures/bce.py:bce_on_sigmoid fixtures/bce.py:bce_with_logits
  losscmp torch.nn.functional:mse_loss fixtures/regression.py:mean_square --spec regression --examples 500
  losscmp 'ref=geomloss:SamplesLoss(loss="sinkhorn", blur=0.05)' fork=fixtures/sinkhorn_torch.py:handwritten --spec points
  losscmp fixtures/regression.py:mean_square torch.nn.functional:mse_loss --spec "input: B real grad; target: B real; B=1..100" --json report.json
  losscmp replay {_SAVED}            re-run a saved case (exit 0/1)
  losscmp replay --pytest {_SAVED}   write a standalone pytest file
  losscmp trace fixtures/bce.py:bce_on_sigmoid fixtures/bce.py:bce_with_logits {_SAVED}
  losscmp sweep fixtures/bce.py:bce_on_sigmoid fixtures/bce.py:bce_with_logits --param scale=1:100:log

references:  [label=]path/to/file.py:attr | [label=]pkg.module:attr.sub | ...:Factory(key=literal, ...)
spec:        a preset ({textwrap.fill(", ".join(PRESETS), 86, subsequent_indent=" " * 13)}),
             a text form "x: N D real grad; y: M D real; N=1..64", or file.py:SPEC
exit codes:  0 all agree, 1 a divergence was found, 2 bad usage or bad input,
             130 / 143 stopped by Ctrl-C / SIGTERM (the report holds what was found so far)
"""

# A grid finer than this says nothing the bisection to 1% does not; a larger dim is a
# tensor of every argument that no sweep needs (and 10**9 points or elements never end).
MAX_SWEEP_POINTS = 1000
MAX_SWEEP_SIZE = 100_000

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="preset name, text form, or file.py:SPEC (default: inferred and printed)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same cases, same verdicts (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="floating dtype of generated inputs (default float32)")
    p.add_argument("--rtol", type=float, help="relative tolerance (default: torch.testing's for the dtype, 1.3e-6 for float32)")
    p.add_argument("--atol", type=float, help="absolute tolerance (default: torch.testing's for the dtype, 1e-5 for float32)")
    p.add_argument("--json", metavar="PATH", help="write a machine-readable report ('-' for stdout)")


def main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="losscmp",
        description="Differential tester for loss functions: fuzz two or more implementations of the same loss and "
        "report where their values or gradients disagree, minimised to the smallest input that shows it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("impls", nargs="*", metavar="IMPL", help="two or more implementation references, e.g. a.py:loss (see below)")
    p.add_argument("--examples", type=int, default=100, metavar="N", help="cases to generate (default 100)")
    _common(p)
    p.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report (no network, no script), rendered from the --json record")
    p.add_argument("--reference", metavar="LABEL", help="compare every other implementation against this one only")
    p.add_argument("--save-dir", metavar="DIR", help=f"where minimised repros go (default: {SAVE_DIR}/ at the project root, the nearest "
                   f"folder upwards with .git, pyproject.toml, setup.cfg, setup.py, pytest.ini or tox.ini)")
    p.add_argument("--no-save", action="store_true", help="do not write repro files")
    p.add_argument("--no-minimize", action="store_true", help="report divergences as found, without minimising")
    p.add_argument("--no-explain", action="store_true", help="skip the explanation (float64 oracle, self-consistency, relation, trace, impact)")
    p.add_argument("--impact", type=int, metavar="STEPS", help="training-impact probe: descent steps per side (default: a few, for semantic divergences with a gradient; 0: never)")
    p.add_argument("--max-size", type=int, metavar="N", help="cap every symbolic dim at N")
    p.add_argument("--allow-nonfinite", action="store_true", help="also plant NaN in inputs (opt-in)")
    p.add_argument("--regimes", metavar="LIST", help="draw only these numeric regimes, e.g. standard,tiny (default: all)")
    p.add_argument("--exclude-regimes", metavar="LIST", help="never draw these regimes, e.g. duplicates")
    p.add_argument("--isolate", action="store_true", help="run each implementation in a worker process: a segfault or hang becomes a finding")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="a call slower than this is a 'timeout' finding: with --isolate or --python the run goes on; in-process "
                   f"the run stops there and reports (default in-process: {breadcrumbs.DEFAULT_TIMEOUT_FLOOR:g} s, or "
                   f"{breadcrumbs.DEFAULT_TIMEOUT_FACTOR:g} x the implementation's slowest call if longer; isolated: none)")
    p.add_argument("--python", action="append", default=[], metavar="LABEL=PATH",
                   help="run implementation LABEL in a worker started by this interpreter (it needs torch and numpy, not losscmp); repeatable")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="share the example budget among N worker processes (same seed and N: same report)")
    p.add_argument("--devices", metavar="LIST", help="one worker per device, e.g. cuda:0,cuda:1 (implies --jobs)")
    p.add_argument("--ray", metavar="ADDRESS", help="call the implementations on Ray actors: 'local' starts a Ray instance, "
                   "auto / HOST:PORT / ray://HOST:PORT joins a cluster; --jobs N actors share the budget (needs losscmp[ray])")
    p.add_argument("-q", "--quiet", action="store_true", help="print the verdict table without the findings' details")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="with each finding, its evidence: regimes, minimiser steps, float64 oracle, drift, self-consistency, relation, location, impact, cost")
    p.add_argument("--version", action="version", version=f"losscmp {__version__}")
    return p


def replay_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="losscmp replay", description="Re-run a saved case; exit 0 if the pair agrees today, 1 if it still diverges.")
    p.add_argument("file", help="a repro .json (or .npz) written by losscmp")
    p.add_argument("--pytest", action="store_true", help="instead of running, write a standalone pytest file reproducing the case")
    p.add_argument("-o", "--output", metavar="PATH", help="with --pytest: where to write (default: tests/test_losscmp_<stem>.py at the project root if tests/ exists, else in the current folder)")
    p.add_argument("--python", action="append", default=[], metavar="LABEL=PATH",
                   help="run the implementation labelled LABEL under that interpreter, as the run that saved the case did (repeatable)")
    return p


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="losscmp sweep",
        description="Walk one knob across a range and bisect every agree/diverge boundary to 1%.",
        epilog="examples:\n  losscmp sweep A B --param scale=1:100:log\n  losscmp sweep 'geomloss:SamplesLoss(blur=0.05)' fork.py:Loss --param blur=1e-3:1:log",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("impls", nargs=2, metavar="IMPL")
    p.add_argument("--param", required=True, metavar="[LABEL.]NAME=LO:HI[:log|lin]",
                   help="'scale' (largest |input|), 'offset' (added to real inputs), a keyword parameter, or LABEL.NAME: a keyword of that side only")
    p.add_argument("--points", type=int, default=9, help=f"grid points before bisection (default 9, at most {MAX_SWEEP_POINTS})")
    p.add_argument("--size", type=int, default=8, help=f"size of every symbolic dim in the swept case (default 8, at most {MAX_SWEEP_SIZE})")
    p.add_argument("--plot", metavar="PNG", help="save a plot of the divergence score along the knob (needs matplotlib)")
    _common(p)
    return p


def trace_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="losscmp trace",
        description="Record both implementations on a saved case, forward and backward, align their aten ops, and "
        "name the source line of each where their values first differ. Exit codes: 0 the two agree on the case "
        "(nothing to locate), 1 they differ (whether or not a line is named), 2 bad usage or input.",
    )
    p.add_argument("expected", metavar="A", help="the reference implementation, e.g. upstream.py:loss")
    p.add_argument("actual", metavar="B", help="the implementation compared with it, e.g. fork.py:loss")
    p.add_argument("repro", metavar="REPRO.json", help="a repro written by losscmp (its case, spec and tolerance are used)")
    p.add_argument("--json", metavar="PATH", help="also write the location as JSON ('-' for stdout)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Off a terminal rich would wrap at 80 columns; a report piped to a file reads better unwrapped.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True, highlight=False)  # progress only; errors are plain lines
    try:
        if argv and argv[0] == "replay":
            return _replay(replay_parser().parse_args(argv[1:]), console)
        if argv and argv[0] == "sweep":
            return _sweep(sweep_parser().parse_args(argv[1:]), console)
        if argv and argv[0] == "trace":
            return _trace(argv[1:])
        return _audit(main_parser().parse_args(argv), console, err)
    except SystemExit as e:  # argparse's own usage errors exit 2 already
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print("losscmp: interrupted", file=sys.stderr)
        return 130
    except breadcrumbs.Terminated:
        print("losscmp: terminated", file=sys.stderr)
        return 143
    except LosscmpError as e:
        print(f"losscmp: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _settings_kw(args: argparse.Namespace) -> dict:
    """The options every subcommand shares, as settings (checked by :class:`Settings`)."""
    return {"seed": args.seed, "device": args.device, "dtype": args.dtype, "rtol": args.rtol, "atol": args.atol}


def _regimes(args: argparse.Namespace) -> tuple[str, ...] | None:
    if args.regimes is None and args.exclude_regimes is None:
        return None
    return select_regimes(args.regimes, args.exclude_regimes)


def _devices(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    devices = tuple(d.strip() for d in text.split(",") if d.strip())
    if not devices:
        raise UsageError(f"--devices {text!r}: name at least one device, e.g. cuda:0,cuda:1")
    return devices


def _load_all(refs: Sequence[str], pythons: dict[str, str] | None = None):
    if len(refs) < 2:
        raise UsageError(f"need at least two implementations to compare, got {len(refs)} (e.g. losscmp a.py:loss b.py:loss)")
    pythons = pythons or {}
    parsed = disambiguate([parse_ref(r) for r in refs])
    if pythons:
        check_labels(pythons, [r.label for r in parsed])
    # An implementation for another interpreter is loaded there, never here (this one may lack its package).
    impls = []
    for ref in parsed:
        breadcrumbs.note(f"loading {ref.text}")
        impls.append(remote_implementation(ref) if ref.label in pythons else load_implementation(ref))
    labels = [i.label for i in impls]
    if len(set(labels)) != len(labels):
        raise UsageError(f"implementation labels collide ({', '.join(labels)}); name them with label=ref")
    return impls


def _resolve_spec(args, impls, execution: Execution, console: Console):
    if args.spec:
        return resolve_spec(args.spec)
    if execution.isolate:  # probing calls the implementations: where they may crash, only in workers
        runner = RUNNERS[RunnerKind.ISOLATED](execution, RunRecord())  # the probes' own: nothing of the run to record
        try:
            found = infer(impls, dtype=execution.dtype, device=execution.device, run=runner)
        finally:
            runner.close()
    else:
        found = infer(impls, dtype=execution.dtype, device=execution.device)
    spec = found.spec
    if spec.name:
        console.print(f"inferred spec [bold]{spec.name}[/]: {spec.text()}", highlight=False)
        console.print(f"  (pin it with --spec {spec.name} or --spec {_shell_quote(spec.text())})", markup=False, highlight=False, soft_wrap=True)  # a command: never split
    else:
        console.print(f"inferred spec: {spec.text()}", markup=False, highlight=False)
        console.print(f"  (pin it with --spec {_shell_quote(spec.text())})", markup=False, highlight=False, soft_wrap=True)
    console.print(f"  why: {found.reason}", markup=False, highlight=False)
    for passed in found.passed_over:
        console.print(f"  passed over {passed}", markup=False, highlight=False)
    return spec


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _audit(args: argparse.Namespace, console: Console, err: Console) -> int:
    runner = RunnerKind.choose(args.isolate, args.python, args.ray)
    # In-process, the supervisor's watchdog stops a hung call (and the run with it): the
    # settings then hold no timeout, since none of their runners could stop the call, and
    # the watchdog's own conditions are checked here.  Unsupervised, nothing can stop it.
    in_process_timeout = args.timeout is not None and not runner.stops_hung_calls
    if in_process_timeout:
        checked_timeout(args.timeout)
        if not breadcrumbs.supervised():
            check_timeout(args.timeout, runner)
        if args.jobs > 1 or args.devices:
            raise UsageError("--timeout with --jobs needs --isolate or --ray (the watchdog watches this process's calls, not a --jobs worker's)")
    kw = _settings_kw(args)
    pythons = parse_pythons(args.python)
    if args.json:
        files.check_writable(args.json, "--json")
    if args.html:
        if args.html == "-":
            raise UsageError("--html needs a file path ('-' is for --json)")
        files.check_writable(args.html, "--html")
    save_dir = None if args.no_save else Path(args.save_dir) if args.save_dir else default_save_dir()
    if save_dir is not None:
        files.check_folder(save_dir, "--save-dir")
    settings = Settings.of(
        reference=args.reference,
        examples=args.examples,
        minimize=not args.no_minimize,
        explain=not args.no_explain,
        impact_steps=args.impact,
        save_dir=save_dir,
        allow_nonfinite=args.allow_nonfinite,
        max_size=args.max_size,
        regimes=_regimes(args),
        isolate=args.isolate,
        timeout=None if in_process_timeout else args.timeout,  # in-process, the supervisor's watchdog enforces it
        jobs=args.jobs,
        devices=_devices(args.devices),
        pythons=tuple(pythons.items()),
        ray=args.ray,
        **kw,
    )
    breadcrumbs.watch_calls(args.timeout)  # every in-process call, in any mode (inference probes, trace)
    if args.json != "-":
        return _audit_run(args, settings, console, err, sys.stdout)
    # stdout carries the JSON alone; the human report goes to stderr
    console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
    with _stdout_reserved_for_json() as json_out:
        return _audit_run(args, settings, console, err, json_out)


@contextlib.contextmanager
def _stdout_reserved_for_json() -> Iterator[IO[str]]:
    """``--json -``: only the JSON reaches stdout.  What else would reach it during the
    run (a reference printing as it is imported, a thread it leaves printing between
    calls) goes to stderr.  Yields the stream the JSON is written to."""
    real = sys.stdout
    with contextlib.suppress(Exception):
        real.flush()
    try:
        on_fd1 = real.fileno() == 1
    except (AttributeError, OSError, ValueError):  # a stream with no descriptor (pytest's capsys)
        on_fd1 = False
    saved = None
    with contextlib.suppress(OSError):
        saved = os.dup(1)
        os.dup2(2, 1)
    sys.stdout = sys.stderr
    json_out = os.fdopen(os.dup(saved), "w") if on_fd1 and saved is not None else real
    try:
        yield json_out
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        if json_out is not real:
            json_out.close()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        sys.stdout = real


def _audit_run(args: argparse.Namespace, settings: Settings, console: Console, err: Console, json_out: IO[str]) -> int:
    """The run as ``settings`` describe it (``args`` only for what is the command line's own:
    the references, the spec text, the report's destinations)."""
    pythons = dict(settings.execution.pythons)
    impls = _load_all(args.impls, pythons)
    if pythons and not args.spec and len(impls) == len(pythons):
        raise UsageError("give --spec when every implementation runs under --python (inference probes in this interpreter)")
    record = run_record(settings, impls)  # the pairs, computed once: the supervisor's context and the audit's
    breadcrumbs.describe_run(record, args.json)
    spec = _resolve_spec(args, [i for i in impls if i.label not in pythons], settings.execution, console)
    # First the cases saved by earlier runs of these implementations, as the pytest fixture does.
    replayed = replay_saved(settings.outputs.save_dir, impls, spec, isolate=settings.execution.isolate or None,
                            pythons=pythons, same_references=True)
    print_replayed(replayed, console)
    # The report so far, after every case: what the supervisor reports if an implementation kills or hangs this process.
    keep = (lambda partial: breadcrumbs.keep_report(audit_json(partial, replayed), partial.phase.value)) if breadcrumbs.supervised() else None
    result = _with_progress(lambda cb: audit(impls, spec, settings, on_case=cb, on_progress=keep, keep_on_interrupt=True, record=record),
                            settings.search.examples, err)
    if result.interrupted:  # a second Ctrl-C or SIGTERM must not cut the report of the first short
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    print_audit(result, console, details=not args.quiet, verbose=args.verbose,
                saved_still_diverging=sum(1 for r in replayed if r.result.verdict.kind))
    report = audit_json(result, replayed) if args.json or args.html else {}
    if args.json:
        write_json(report, args.json, stdout=json_out)
    if args.html:
        files.write_text(args.html, render_html(report, title=f"losscmp: {' vs '.join(result.labels)}"), "--html")
        console.print(f"HTML report: {shown_path(args.html)}", markup=False, soft_wrap=True)
    if result.interrupted:  # the run did not finish: the signal's exit code, whatever was found (README: Exit codes)
        return 128 + getattr(signal, result.interrupted)
    return 0 if result.agree and not any(r.result.verdict.kind for r in replayed) else 1


def _with_progress(run, total: int, err: Console):
    """A progress bar on stderr once a run has taken two seconds, and only on a terminal."""
    if not err.is_terminal:
        return run(None)
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("fuzzing"), BarColumn(), MofNCompleteColumn(), TextColumn("worst score {task.fields[worst]}"),
                        TimeElapsedColumn(), console=err, transient=True)
    task = progress.add_task("fuzz", total=total, worst="-")
    start, worst, shown = time.monotonic(), [0.0], [False]

    def on_case(n: int, score: float) -> None:
        worst[0] = max(worst[0], score)
        if not shown[0] and time.monotonic() - start > 2.0:
            progress.start()
            shown[0] = True
        progress.update(task, completed=n, worst=f"{worst[0]:.3g}")

    try:
        return run(on_case)
    finally:
        if shown[0]:
            progress.stop()


def _replay(args: argparse.Namespace, console: Console) -> int:
    repro = load_repro(args.file)
    if args.pytest:
        out = Path(args.output) if args.output else _default_test_path(repro.path)
        files.check_writable(str(out), "--output")
        files.write_text(out, generate_pytest(repro, str(repro.path), out), "--output")
        shown = shlex.quote(shown_path(out))
        console.print(f"wrote {shown}", markup=False, soft_wrap=True)
        console.print(f"run: pytest {shown}", markup=False, soft_wrap=True)
        return 0
    pythons = parse_pythons(args.python)
    check_labels(pythons, list(dict.fromkeys(repro.pair)))
    impls = load_repro_implementations(repro, remote=pythons, elsewhere=remote_implementation)  # refuses what a saved file may not run, before anything runs
    checks = {f.label: f for f in file_checks(repro)}
    for impl in impls:
        there = f" (under {pythons[impl.label]})" if impl.label in pythons else ""
        where = f", from {checks[impl.label].path}{_file_state(checks[impl.label])}" if impl.label in checks else ""
        console.print(f"will run {impl.label} = {impl.ref.source()}{there}{where}", markup=False, soft_wrap=True)
    result = replay(repro, impls, pythons=pythons)
    how = f" (isolated{f', timeout {result.repro.timeout:g} s' if result.repro.timeout else ''})" if result.isolated else ""
    console.print(f"replay {repro.path.name}: {repro.subject}, recorded {repro.kind.value}; "
                  f"input {case_values_text(repro.case.sizes, repro.case.tensors)}{how}", markup=False, soft_wrap=True)
    recorded, here = str(repro.meta.get("device", "cpu")), str(next(iter(repro.case.tensors.values())).device)
    elsewhere = torch.device(recorded).type != torch.device(here).type
    if elsewhere:  # the file may say cuda on a machine without it: what ran here is not what was recorded
        console.print(f"recorded on {recorded}, replayed on {here}: this machine has no {recorded}", markup=False)
    if result.same_bits is not None:
        console.print("outputs are bit-for-bit identical to the recorded run" if result.same_bits
                      else f"outputs differ from the recorded run: {_why_outputs_differ(checks.values(), version_changes(repro), recorded if elsewhere else None)}", markup=False)
    verdict = result.verdict
    if verdict.kind:
        console.print(f"[red]still diverges[/] ({verdict.kind.value}): {escape(verdict_text(verdict))}", highlight=False)
        return 1
    if not verdict.compared:
        console.print(f"[yellow]not compared[/]: {escape(verdict_text(verdict))}", highlight=False)
        return 1
    if elsewhere:
        console.print(f"[green]agree now on {here}[/] (score {verdict.score:.3g}); not replayed on {recorded}, where it was recorded")
    else:
        console.print(f"[green]agree now[/] (score {verdict.score:.3g})")
    return 0


def _default_test_path(repro_path: Path) -> Path:
    """Where ``replay --pytest`` writes by default: the project's tests/ folder if it has
    one, else the current folder; never beside the repro, where a bare ``pytest`` would
    collect it from the saved-cases folder by surprise."""
    root = project_root()
    folder = root / "tests" if (root / "tests").is_dir() else Path.cwd()
    stem = "".join(c if c.isalnum() else "_" for c in repro_path.stem).strip("_")
    return folder / f"test_losscmp_{stem}.py"


def _file_state(check) -> str:
    if check.today is None:
        return ": no such file here"
    if check.recorded is None:
        return " (the repro holds no hash to compare it with)"
    if check.changed:
        return f": NOT the recorded file (sha256 {check.today}, recorded {check.recorded})"
    return " (the recorded file, sha256 matches)"


def _why_outputs_differ(files, versions: dict, other_device: str | None) -> str:
    """What changed since the recording, from what the repro holds; no guessing."""
    changed = [f"{path} changed" for path in dict.fromkeys(f.path for f in files if f.changed)]
    changed += [f"{_plain(name)} {_plain(was)} -> {_plain(now)}" for name, (was, now) in versions.items()]
    if other_device:
        changed.append(f"recorded on {other_device}")
    if changed:
        return "; ".join(changed)
    return ("the files, library versions and device are the recorded ones: something a repro does not record differs "
            "(the CPU or GPU model, the thread count), or the implementations are not deterministic")


def _plain(value: object) -> str:
    """A value read from a repro (data, never trusted), safe to print: quoted unless plain text."""
    text = str(value)
    return text if isinstance(value, str) and text.isprintable() and len(text) <= 40 else shown(text, 40)


def _sweep(args: argparse.Namespace, console: Console) -> int:
    knob = parse_knob(args.param)
    # Bounded before any work: each point is a pair of calls, each size a dim of every input.
    if not 2 <= args.points <= MAX_SWEEP_POINTS:
        raise UsageError(f"--points must be at least 2 and at most {MAX_SWEEP_POINTS}, not {args.points}")
    if not 1 <= args.size <= MAX_SWEEP_SIZE:
        raise UsageError(f"--size must be at least 1 and at most {MAX_SWEEP_SIZE}, not {args.size}")
    if args.plot:
        files.check_writable(args.plot, "--plot")
        if importlib.util.find_spec("matplotlib") is None:  # before the sweep, not after it
            raise UsageError("--plot needs matplotlib (pip install matplotlib)")
    if args.json:
        files.check_writable(args.json, "--json")
    json_out = sys.stdout
    if args.json == "-":  # stdout carries the JSON alone; the words go to stderr
        console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
    kw = _settings_kw(args)
    settings = Settings.of(examples=1, **kw)
    impls = _load_all(args.impls)
    spec = _resolve_spec(args, impls, settings.execution, console)
    result = sweep(impls, spec, settings, knob, points=args.points, case=sweep_case(spec, settings, args.size))
    console.print(f"sweep {knob.shown} over [{knob.lo:g}, {knob.hi:g}] ({'log' if knob.log else 'linear'}), {result.pair.expected} vs {result.pair.actual}, input {result.case.describe()}", markup=False)
    for p in result.points:
        state = f"DIVERGE ({p.verdict.kind})" if p.verdict.kind else "agree"
        console.print(f"  {knob.shown} = {p.value:<12.4g} {state:<22} score {p.verdict.score:.3g}", markup=False)
    if not result.boundaries:
        verdicts = {bool(p.verdict.kind) for p in result.points}
        console.print("no boundary: " + ("diverge everywhere on the range" if verdicts == {True} else "agree everywhere on the range"), markup=False)
    for b in result.boundaries:
        console.print(f"boundary: {b.describe(knob.shown)}", markup=False)
    flips = switches(result.evaluated)
    if result.boundaries and flips > len(result.boundaries):
        console.print(f"not monotone: agreement switches {flips} times among the {len(result.evaluated)} evaluated points, so "
                      f"these boundaries hold for this grid; another range or --points can find others", markup=False)
    elif len(result.boundaries) > 1:
        console.print(f"{len(result.boundaries)} boundaries: agreement is not monotone in {knob.shown}; each holds between its grid points",
                      markup=False)
    console.print(f"({result.evaluations} evaluations)", markup=False)
    if args.plot:
        plot_sweep(result, args.plot)
        console.print(f"plot: {args.plot}", markup=False)
    if args.json:
        write_json(sweep_json(result), args.json, stdout=json_out)
    return 1 if any(p.verdict.kind for p in result.points) else 0


def _trace(argv: list[str]) -> int:
    """``losscmp trace A B REPRO.json``: 0 the sides agree on the case (nothing to locate),
    1 they differ (located or not: a difference is never an exit 0), 2 bad usage or input."""
    try:
        args = trace_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed its usage line
        return int(e.code or 0)
    # Bad input raises a LosscmpError: the command line prints it as one line, exit 2.
    if args.json:
        files.check_writable(args.json, "--json")  # before the trace runs, not after it
    repro = load_repro(args.repro)
    breadcrumbs.input_saved_as(repro.path)
    # Both sides run in-process here: a case saved as a hang is stopped by the supervisor's
    # watchdog at the limit it was found with (as replay uses it), not the in-process default.
    breadcrumbs.watch_calls(recorded_timeout(repro))
    refs = disambiguate([parse_ref(args.expected), parse_ref(args.actual)])
    if refs[0].label == refs[1].label:
        raise UsageError(f"both implementations are labelled {refs[0].label!r}; name them with label=ref")
    impls = [load_implementation(r) for r in refs]
    tol = Tolerance(*repro.tolerance)
    # The float64 oracle decides whether this is a numerical finding, and on which side:
    # such a finding is located on that side by its own float32 vs float64 run.
    verdict = oracle(impls[0], impls[1], repro.spec, repro.case, tol)
    unstable = verdict.unstable_side if verdict.category is Category.NUMERICAL else None
    result = locate(impls[0], impls[1], repro.spec, repro.case, tol, unstable=unstable)
    human = sys.stderr if args.json == "-" else sys.stdout  # stdout carries the JSON alone
    print(f"trace {impls[0].label} vs {impls[1].label} on {repro.path.name}: input {repro.case.describe()}", file=human)
    print(f"float64 oracle: {verdict.category.value}" + (f" ({unstable} is the unstable side)" if unstable else ""), file=human)
    print(result.note, file=human)
    if result.side is not None and result.confidence is not None:
        role = "the unstable side" if unstable else "the side under test"
        print(f"named first: {result.side} ({role}); confidence {result.confidence.value}", file=human)
    for label, where in (result.location or {}).items():
        print(f"  {label}: {where.file}:{where.line}  [{where.op}]", file=human)
        print(f"      {where.code}", file=human)
        print(f"      value: {result.values.get(label, '?')}", file=human)
        if f"{label} (float64)" in result.values:
            print(f"      in float64: {result.values[f'{label} (float64)']}", file=human)
    if args.json:
        text = jsonout.dumps(result.to_json(), indent=2)
        if args.json == "-":
            print(text)
        else:
            files.write_text(args.json, text + "\n", "--json")
    return 1 if result.differs else 0
