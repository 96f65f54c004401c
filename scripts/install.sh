#!/usr/bin/env bash
# Install losscmp (editable) into the current Python environment.
#   scripts/install.sh          core: the CLI and the pytest helpers
#   scripts/install.sh test     + geomloss, pykeops, pytest and Ray (pinned: tests/test_ray.py runs
#                               on a loopback cluster), for the test suite
# torch is installed first, and only if missing: from $TORCH_WHEEL or a local CPU wheel
# in /opt/wheels when there is one (seconds), else plain `pip install torch`.  losscmp
# itself accepts any torch >= 2.0, so an existing torch (CUDA or not) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
extras=${1:-}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    wheel=${TORCH_WHEEL:-$(ls /opt/wheels/torch-*+cpu-*.whl 2>/dev/null | head -n 1 || true)}
    "$PY" -m pip install --quiet --disable-pip-version-check "${wheel:-torch}"
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
