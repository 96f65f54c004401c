"""Is the line a finding's one-line summary names the line that is truly different?

For each pair of fixtures whose differing line is tagged in its source (the Sinkhorn
forks' ``FORK:``, the EMLight-style fork's cost, the hand-written Dice's ``# mine: dice``,
the naive softplus' ``# naive:``), audit it over several seeds and read the
``first differing op at FILE:LINE`` of every explained finding.  The MONAI-style library
is copied into a temporary ``site-packages`` folder first, so that it is an installed
library as MONAI is.  Prints one row per finding (with the location's confidence) and the
count of right lines.

    python scripts/bench_location.py [--seeds 3] [--examples 30]
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from losscmp.audit import Settings, audit
from losscmp.load import load_implementation
from losscmp.spec import parse_spec

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SINKHORN = "x: N D real grad; y: M D real grad; N=2..6; M=2..6; D=2"


def tagged(path: Path, marker: str) -> tuple[Path, int]:
    lines = [n for n, line in enumerate(path.read_text().splitlines(), 1) if marker in line]
    assert len(lines) == 1, f"{marker!r} should tag one line of {path}"
    return path.resolve(), lines[0]


def pairs() -> list[tuple[str, list[str], str, tuple[Path, int]]]:
    forks, emlight = FIXTURES / "forks", FIXTURES / "forks" / "emlight" / "geomloss"
    return [
        ("dice vs MONAI-style", [f"mine={FIXTURES}/dice.py:dice_eps_in_denominator", "library=segloss:DiceLoss(softmax=True)"],
         "input: B C H W real grad; target: B C H W binary; B=1..2; C=2..3; H=1..4; W=1..4",
         tagged(FIXTURES / "dice.py", "# mine: dice")),
        ("softplus vs log(1+exp)", [f"stable={FIXTURES}/softplus.py:softplus", f"naive={FIXTURES}/softplus.py:softplus_naive"],
         "x: N real grad; N=1..4", tagged(FIXTURES / "softplus.py", "# naive:")),
        ("EMLight-style fork", ['official=geomloss:SamplesLoss(loss="sinkhorn", p=2, blur=0.05, scaling=0.5, backend="tensorized")',
                                f'fork={emlight}:SamplesLoss(loss="sinkhorn", p=2, blur=0.05, scaling=0.5, anchors=6)'],
         "x: N D real grad; y: N D real grad; N=6; D=3", tagged(emlight / "utils.py", "FORK:")),
    ] + [(f"fork_{name}", [f"base={forks}/sinkhorn_base.py:sinkhorn_divergence", f"fork={forks}/fork_{name}.py:sinkhorn_divergence"],
          SINKHORN, tagged(forks / f"fork_{name}.py", "FORK:")) for name in ("logsumexp", "no_debias", "schedule", "detach", "sum")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=30)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    site = Path(tempfile.mkdtemp()) / "site-packages"
    shutil.copytree(FIXTURES / "segloss", site / "segloss")
    sys.path.insert(0, str(site))
    right = total = 0
    try:
        for name, refs, spec, truth in pairs():
            impls = [load_implementation(r) for r in refs]
            for seed in range(args.seeds):
                result = audit(impls, parse_spec(spec), Settings.of(examples=args.examples, seed=seed, impact_steps=0))
                for d in result.divergences:
                    if d.explanation is None:
                        continue
                    m = re.search(r"first differing op at ([^;]+):(\d+)", d.explanation.sentence())
                    named = (Path(m.group(1)).resolve(), int(m.group(2))) if m else None
                    confidence = getattr(getattr(d.explanation.location, "confidence", None), "value", "-")
                    total += 1
                    right += named == truth
                    print(f"{name:24s} seed {seed} {d.kind.value:10s} {'right' if named == truth else 'WRONG'} "
                          f"{confidence:6s} {m.group(1) + ':' + m.group(2) if m else 'no location'}")
    finally:
        shutil.rmtree(site.parent, ignore_errors=True)
    print(f"lines right: {right} / {total}")


if __name__ == "__main__":
    main()
