"""Command line: ``losscmp IMPL IMPL [...]``, ``losscmp replay FILE``, ``losscmp sweep A B``.

Exit codes: 0 all agree, 1 some pair diverges, 2 bad usage or bad input.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

import torch
from rich.console import Console

from . import __version__

EXAMPLES = """\
examples:
  losscmp fixtures/bce.py:bce_on_sigmoid fixtures/bce.py:bce_with_logits
  losscmp torch.nn.functional:mse_loss fixtures/mse.py:mean_square --spec regression --examples 500
  losscmp ref=geomloss:SamplesLoss(loss="sinkhorn",blur=0.05) fork=fixtures/sinkhorn_torch.py:handwritten --spec points
  losscmp a.py:f b.py:f --spec "x: N D real grad; y: M D real; N=1..100; D=3" --json report.json
  losscmp replay fixtures/losscmp/<case>.json            re-run a saved case (exit 0/1)
  losscmp replay --pytest fixtures/losscmp/<case>.json   write a standalone pytest file
  losscmp sweep fixtures/bce.py:bce_on_sigmoid fixtures/bce.py:bce_with_logits --param scale=1:100:log

references:  [label=]path/to/file.py:attr | [label=]pkg.module:attr.sub | ...:Factory(key=literal, ...)
spec:        a preset (points, weighted-points, classification, binary, regression, segmentation,
             images, distributions), a text form "x: N D real grad; y: M D real; N=1..64", or file.py:SPEC
exit codes:  0 all agree, 1 a divergence was found, 2 bad usage or bad input
"""

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class UsageError(ValueError):
    pass


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
    p.add_argument("--reference", metavar="LABEL", help="compare every other implementation against this one only")
    p.add_argument("--save-dir", default="fixtures/losscmp", metavar="DIR", help="where minimised repros go (default fixtures/losscmp)")
    p.add_argument("--no-save", action="store_true", help="do not write repro files")
    p.add_argument("--no-minimize", action="store_true", help="report divergences as found, without minimising")
    p.add_argument("--max-size", type=int, metavar="N", help="cap every symbolic dim at N")
    p.add_argument("--allow-nonfinite", action="store_true", help="also plant NaN in inputs (opt-in)")
    p.add_argument("--isolate", action="store_true", help="run each implementation in a worker process: a segfault or hang becomes a finding")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="with --isolate or --python: a call slower than this is a 'timeout' finding")
    p.add_argument("--python", action="append", default=[], metavar="LABEL=PATH",
                   help="run implementation LABEL in a worker started by this interpreter (it needs torch and numpy, not losscmp); repeatable")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="share the example budget among N processes (CPU); same seed and N, same report")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the verdict table")
    p.add_argument("--version", action="version", version=f"losscmp {__version__}")
    return p


def replay_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="losscmp replay", description="Re-run a saved case; exit 0 if the pair agrees today, 1 if it still diverges.")
    p.add_argument("file", help="a repro .json (or .npz) written by losscmp")
    p.add_argument("--pytest", action="store_true", help="instead of running, write a standalone pytest file reproducing the case")
    p.add_argument("-o", "--output", metavar="PATH", help="with --pytest: where to write (default: test_<stem>.py beside the repro)")
    return p


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="losscmp sweep",
        description="Walk one knob across a range and bisect every agree/diverge boundary to 1%%.",
        epilog="examples:\n  losscmp sweep A B --param scale=1:100:log\n  losscmp sweep 'geomloss:SamplesLoss(blur=0.05)' fork.py:Loss --param blur=1e-3:1:log",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("impls", nargs=2, metavar="IMPL")
    p.add_argument("--param", required=True, metavar="NAME=LO:HI[:log|lin]", help="'scale' (largest |input|), 'offset' (added to real inputs) or a keyword parameter")
    p.add_argument("--points", type=int, default=9, help="grid points before bisection (default 9)")
    p.add_argument("--size", type=int, default=8, help="size of every symbolic dim in the swept case (default 8)")
    p.add_argument("--plot", metavar="PNG", help="save a plot of the divergence score along the knob (needs matplotlib)")
    _common(p)
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
        return _audit(main_parser().parse_args(argv), console, err)
    except SystemExit as e:  # argparse's own usage errors exit 2 already
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("losscmp: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from .load import LoadError
        from .spec import SpecError

        known = (UsageError, LoadError, SpecError)
        try:
            from .audit import ProbeError
            from .infer import InferenceError
            from .plot import PlotError
            from .repro import ReproError
            from .sweep import KnobError

            known += (ProbeError, InferenceError, PlotError, ReproError, KnobError)
        except ImportError:  # pragma: no cover
            pass
        if isinstance(e, known):
            print(f"losscmp: error: {e}", file=sys.stderr)
            return 2
        raise


def _settings_kw(args: argparse.Namespace) -> dict:
    for name in ("rtol", "atol"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name} must be a finite number >= 0, not {value}")
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device must be cpu or cuda, not {device!r}")
    return {"seed": args.seed, "device": device, "dtype": DTYPES[args.dtype], "rtol": args.rtol, "atol": args.atol}


def _pythons(values: Sequence[str]) -> dict[str, str]:
    """``--python LABEL=PATH`` options as {label: checked interpreter path}."""
    from .interpreter import check_python

    out: dict[str, str] = {}
    for text in values:
        label, sep, path = text.partition("=")
        if not sep or not label or not path:
            raise UsageError(f"--python {text!r}: expected LABEL=/path/to/python")
        if label in out:
            raise UsageError(f"--python {label}: given twice")
        out[label] = check_python(label, path)
    return out


def _load_all(refs: Sequence[str], pythons: dict[str, str] | None = None):
    from .load import disambiguate, load_implementation, parse_ref

    if len(refs) < 2:
        raise UsageError(f"need at least two implementations to compare, got {len(refs)} (e.g. losscmp a.py:loss b.py:loss)")
    pythons = pythons or {}
    parsed = disambiguate([parse_ref(r) for r in refs])
    unknown = set(pythons) - {r.label for r in parsed}
    if unknown:
        raise UsageError(f"--python {sorted(unknown)[0]}: no implementation has that label (labels: {', '.join(r.label for r in parsed)})")
    if pythons:
        from .interpreter import remote_implementation
    # An implementation for another interpreter is loaded there, never here (this one may lack its package).
    impls = [remote_implementation(r) if r.label in pythons else load_implementation(r) for r in parsed]
    labels = [i.label for i in impls]
    if len(set(labels)) != len(labels):
        raise UsageError(f"implementation labels collide ({', '.join(labels)}); name them with label=ref")
    return impls


def _resolve_spec(args, impls, kw, console: Console):
    from .infer import infer_spec
    from .spec import resolve_spec

    if args.spec:
        return resolve_spec(args.spec)
    spec = infer_spec(impls, dtype=kw["dtype"], device=kw["device"])
    console.print(f"inferred spec [bold]{spec.name}[/]: {spec.text()}", highlight=False)
    console.print(f"  (pin it with --spec {spec.name} or --spec {_shell_quote(spec.text())})", markup=False, highlight=False)
    return spec


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _audit(args: argparse.Namespace, console: Console, err: Console) -> int:
    from .audit import Settings, audit
    from .report import audit_json, print_audit, write_json

    if args.examples < 1:
        raise UsageError("--examples must be at least 1")
    if args.timeout is not None and not (args.isolate or args.python):
        raise UsageError("--timeout needs --isolate or --python (a hung call can only be stopped in a worker process)")
    kw = _settings_kw(args)
    if args.json == "-":  # stdout carries the JSON alone; the human report goes to stderr
        console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
    pythons = _pythons(args.python)
    impls = _load_all(args.impls, pythons)
    if pythons and not args.spec and len(impls) == len(pythons):
        raise UsageError("give --spec when every implementation runs under --python (inference probes in this interpreter)")
    spec = _resolve_spec(args, [i for i in impls if i.label not in pythons], kw, console)
    settings = Settings(
        examples=args.examples,
        reference=args.reference,
        minimize=not args.no_minimize,
        save_dir=None if args.no_save else Path(args.save_dir),
        allow_nonfinite=args.allow_nonfinite,
        max_size=args.max_size,
        isolate=args.isolate,
        timeout=args.timeout,
        pythons=tuple(pythons.items()),
        **kw,
    )
    if args.reference and args.reference not in [i.label for i in impls]:
        raise UsageError(f"--reference {args.reference!r} is not one of {', '.join(i.label for i in impls)}")
    if args.jobs != 1:
        from .parallel import audit_jobs

        result = audit_jobs(impls, spec, settings, args.jobs)
    else:
        result = _with_progress(lambda cb: audit(impls, spec, settings, on_case=cb), args.examples, err)
    print_audit(result, console, details=not args.quiet)
    if args.json:
        write_json(audit_json(result), args.json)
    return 0 if result.agree else 1


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
    from .audit import Evaluator, Settings
    from .repro import load_repro, load_repro_implementations, same_bits

    repro = load_repro(args.file)
    if args.pytest:
        from .testgen import generate_pytest

        out = Path(args.output) if args.output else repro.path.with_name(f"test_{repro.path.stem.replace('-', '_')}.py")
        out.write_text(generate_pytest(repro, str(repro.path)))
        console.print(f"wrote {out}  (run: pytest {out})", markup=False)
        return 0
    impls = load_repro_implementations(repro)
    dtype = repro.case.tensors[repro.spec.args[0].name].dtype
    tol = repro.meta["tolerance"]
    # A case that crashed or hung a worker replays in one again, with the limit it was found with.
    risky = repro.kind in ("crash", "timeout")
    limit = repro.meta.get("timeout")
    settings = Settings(examples=1, seed=int(repro.meta.get("seed", 0)), device=str(next(iter(repro.case.tensors.values())).device),
                        dtype=dtype if dtype.is_floating_point else torch.float32, rtol=float(tol["rtol"]), atol=float(tol["atol"]), save_dir=None,
                        isolate=risky, timeout=float(limit) if risky and isinstance(limit, (int, float)) and limit > 0
                        else 60.0 if repro.kind == "timeout" else None)
    ev = Evaluator(impls, repro.spec, settings)
    try:
        pair = repro.pair
        if pair[0] == pair[1]:
            verdict = ev.self_verdict(pair[0], repro.case)
            outcomes = None
        else:
            outcomes = ev.outcomes(repro.case, pair)
            verdict = ev.verdict(pair, outcomes)
    finally:
        ev.close()
    who = pair[0] if pair[0] == pair[1] else f"{pair[0]} vs {pair[1]}"
    console.print(f"replay {repro.path.name}: {who}, recorded {repro.kind}; input {repro.case.describe()}", markup=False)
    if outcomes is not None:
        bits = same_bits(repro, outcomes)
        console.print("outputs are bit-for-bit identical to the recorded run" if bits else "outputs differ from the recorded run (library versions or hardware changed?)", markup=False)
    if verdict.kind:
        console.print(f"[red]still diverges[/] ({verdict.kind}): {verdict.detail}")
        return 1
    console.print(f"[green]agree now[/] (score {verdict.score:.3g})")
    return 0


def _sweep(args: argparse.Namespace, console: Console) -> int:
    from .audit import Settings
    from .sweep import parse_knob, sweep, sweep_case

    knob = parse_knob(args.param)
    kw = _settings_kw(args)
    impls = _load_all(args.impls)
    spec = _resolve_spec(args, impls, kw, console)
    settings = Settings(examples=1, save_dir=None, **kw)
    result = sweep(impls, spec, settings, knob, points=args.points, case=sweep_case(spec, settings, args.size))
    console.print(f"sweep {knob.name} over [{knob.lo:g}, {knob.hi:g}] ({'log' if knob.log else 'linear'}), {result.pair[0]} vs {result.pair[1]}, input {result.case.describe()}", markup=False)
    for p in result.points:
        state = f"DIVERGE ({p.verdict.kind})" if p.verdict.kind else "agree"
        console.print(f"  {knob.name} = {p.value:<12.4g} {state:<22} score {p.verdict.score:.3g}", markup=False)
    if not result.boundaries:
        verdicts = {bool(p.verdict.kind) for p in result.points}
        console.print("no boundary: " + ("diverge everywhere on the range" if verdicts == {True} else "agree everywhere on the range"), markup=False)
    for b in result.boundaries:
        console.print(f"boundary: {b.describe(knob.name)}", markup=False)
    console.print(f"({result.evaluations} evaluations)", markup=False)
    if args.plot:
        from .plot import plot_sweep

        plot_sweep(result, args.plot)
        console.print(f"plot: {args.plot}", markup=False)
    return 1 if any(p.verdict.kind for p in result.points) else 0

