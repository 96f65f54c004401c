"""Spec inference right / total on fixtures/inference.py's pairs (issue 15).

    python scripts/bench_infer.py

Prints, per pair, the inferred spec (or the error) and what a right spec would have
said that this one does not; then ``inference right: R / T``.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _fixtures():
    spec = importlib.util.spec_from_file_location("losscmp_inference_fixtures", ROOT / "fixtures" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    from losscmp.errors import LosscmpError
    from losscmp.infer import infer
    from losscmp.load import load_implementation

    fx = _fixtures()
    right = 0
    for a, b, requirements in fx.PAIRS:
        impls = [load_implementation(str(ROOT / r) if r.startswith("fixtures/") or r.startswith("tests/") else r) for r in (a, b)]
        names = list(inspect.signature(impls[0].fn).parameters)
        label = f"{impls[0].label} vs {impls[1].label}"
        try:
            found = infer(impls)
        except LosscmpError as e:
            print(f"WRONG {label}: {e}")
            continue
        missed = fx.unmet(found.spec, requirements, names)
        right += not missed
        print(f"{'right' if not missed else 'WRONG'} {label}: {found.spec.text()}" + (f"  [{'; '.join(missed)}]" if missed else ""))
        print(f"      why: {found.reason}")
    print(f"inference right: {right} / {len(fx.PAIRS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
