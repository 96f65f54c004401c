"""Soak: every fault of the catalogue, in process and isolated, through the real command.

    python scripts/bench_soak.py [--examples 20] [--timeout 2] [--seeds 0,1] [--modes in-process,isolate]
                                 [--faults segfaults,sleeps] [--wall 240] [--minimize]

Each fault of ``fixtures/misbehaving.py`` (``FAULTS``: segfault, abort, ``os._exit``,
sleep, spin, SIGSTOP to itself, a hang deaf to signals, a hang in backward,
KeyboardInterrupt, ``sys.exit``, fork-and-continue, a background process, a non-daemon
thread, garbage and NaN returns, a wrong shape, an exception now and then) is compared
with a correct mean squared error by ``python -m losscmp ... --json``, once in process and
once with ``--isolate``, under ``--timeout``.  Every process of a run carries a marker in
its environment, so what a run leaves running is found in /proc afterwards.

Per run it checks, and in the end it counts:

* cases accounted -- the report's tally adds up to its ``cases_run`` (summed over runs);
* false agrees    -- exit 0 or ``"agree": true`` for a fault that changes what the loss
                     returns (the fork, background-process and thread faults return the
                     right loss: agreement is the right answer for them);
* internal errors -- exit 70, "internal error" or a Python traceback in the output;
* hangs           -- the command still running after ``--wall`` seconds (then killed);
* orphans         -- processes of the run alive 5 s after the command returned;
* missing reports -- a run that was not refused as bad usage (exit 2) without a valid
                     ``--json`` report.

All but the first should be 0.  Runs are sequential (the machine is shared): about
20 faults x 2 modes x ~10 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "fixtures"))
from misbehaving import FAULTS, MARK, marked  # noqa: E402

# The loss they return is right: a side effect is not a difference in the loss.
SIDE_EFFECTS_ONLY = {"forks_and_continues", "leaves_a_process", "leaves_a_thread"}


@dataclass
class Run:
    fault: str
    mode: str
    seed: int
    code: int | None = None
    seconds: float = 0.0
    tally: dict = field(default_factory=dict)
    accounted: int = 0
    problems: list = field(default_factory=list)


# Each run is the real command (supervisor included) in a subprocess with a time limit;
# misbehaving.marked finds the processes it left behind.
def soak(fault: str, mode: str, seed: int, args: argparse.Namespace, scratch: Path) -> Run:
    run = Run(fault, mode, seed)
    report = scratch / f"{fault}-{mode}-{seed}.json"
    mark = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "losscmp", "fixtures/misbehaving.py:mse", f"fixtures/misbehaving.py:{fault}", "--spec", "regression",
           "--examples", str(args.examples), "--seed", str(seed), "--timeout", str(args.timeout), "--no-explain",
           "--save-dir", str(scratch / "saved"), "--json", str(report)]
    cmd += [] if args.minimize else ["--no-minimize"]
    cmd += ["--isolate"] if mode == "isolate" else []
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, MARK: mark}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=args.wall)
    except subprocess.TimeoutExpired:
        run.problems.append("hang")
        proc.kill()
        out, err = proc.communicate()
    run.seconds = time.monotonic() - start
    run.code = proc.returncode
    text = out + err
    if proc.returncode == 70 or "internal error" in text or "Traceback (most recent call last)" in text:
        run.problems.append("internal error")
    deadline = time.monotonic() + 5.0
    while (left := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        run.problems.append(f"orphans {len(left)}")
        for pid in left:  # ours to end: this script started them
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    if proc.returncode == 2:
        run.problems.append("refused") if len(err.strip().splitlines()) == 1 else run.problems.append("internal error")
        return run
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        run.problems.append("missing report")
        return run
    run.tally = data.get("tally", {})
    if sum(run.tally.values()) == data.get("cases_run"):
        run.accounted = data["cases_run"]
    else:
        run.problems.append("unaccounted")
    if fault not in SIDE_EFFECTS_ONLY and (proc.returncode == 0 or data.get("agree")):
        run.problems.append("false agree")
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=20)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--seeds", default="0")
    p.add_argument("--modes", default="in-process,isolate")
    p.add_argument("--faults", default=",".join(FAULTS))
    p.add_argument("--wall", type=float, default=240.0, help="a run still going after this many seconds is a hang")
    p.add_argument("--minimize", action="store_true", help="minimise findings too (each hang candidate costs --timeout)")
    args = p.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        p.error(f"unknown faults: {', '.join(unknown)}")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="losscmp-soak-") as scratch:
        for seed in (int(s) for s in args.seeds.split(",")):
            for mode in args.modes.split(","):
                for fault in faults:
                    run = soak(fault, mode, seed, args, Path(scratch))
                    runs.append(run)
                    tally = ", ".join(f"{n} {k}" for k, n in sorted(run.tally.items(), key=lambda kv: -kv[1])) or "-"
                    print(f"{fault:<28} {mode:<10} seed {seed}  exit {run.code!s:>4}  {run.seconds:6.1f} s  {tally:<32} "
                          f"{' '.join(run.problems) or 'ok'}", flush=True)
    count = lambda what: sum(any(pr.startswith(what) for pr in r.problems) for r in runs)  # noqa: E731
    print()
    print(f"runs              {len(runs)} ({len(faults)} faults x {len(args.modes.split(','))} modes x {len(args.seeds.split(','))} seeds)")
    print(f"cases accounted   {sum(r.accounted for r in runs)} (in {sum(1 for r in runs if r.accounted)} reports; unaccounted reports: {count('unaccounted')})")
    print(f"false agrees      {count('false agree')}")
    print(f"internal errors   {count('internal error')}")
    print(f"hangs             {count('hang')}")
    print(f"orphans           {count('orphans')}")
    print(f"missing reports   {count('missing report')}")
    refused = [f"{r.fault} ({r.mode})" for r in runs if "refused" in r.problems]
    print(f"refused (exit 2, one line, no report: the probe input already fails on one side): {len(refused)} {', '.join(refused)}")
    bad = sum(count(w) for w in ("unaccounted", "false agree", "internal error", "hang", "orphans", "missing report"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
