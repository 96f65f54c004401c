#!/usr/bin/env bash
# The GPU checks in one run, for a borrowed GPU machine whose python3 has torch + CUDA but
# neither losscmp nor geomloss/pykeops.  Build the wheels on a machine with network first:
#
#     pip wheel --no-deps -w .whl geomloss pykeops keopscore
#
# then run this script from the repository root there.  Logs and JSON reports go to $OUT
# (default /tmp/losscmp-gpu).  Each step has its own time limit so one hang cannot eat the
# others; the exit status is the number of steps that failed.
set -u -o pipefail
OUT=${OUT:-/tmp/losscmp-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SITE=/tmp/losscmp-site
failed=0

step() {  # step NAME SECONDS OK_CODES COMMAND...: run, log to $OUT/NAME.log, count a failure
    local name=$1 limit=$2 ok=$3; shift 3
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: rc $rc in $((SECONDS - t0)) s"
    case " $ok " in *" $rc "*) ;; *) failed=$((failed + 1)) ;; esac
}

wheels=()
[ -d .whl ] && wheels=(.whl/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --no-build-isolation --target "$SITE" "${wheels[@]}" . || exit 100
export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH

nvidia-smi -L
python3 -c "import torch, losscmp, geomloss, pykeops; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

# 1. The GPU tests (skipped on machines without CUDA).
step gpu_tests 200 0 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
# 2. The bundled demo on the GPU: the BCE divergence found, minimised and explained on cuda
#    (exit 1: a finding, as expected).
step demo_cuda 100 1 losscmp fixtures/bce.py:bce_on_sigmoid fixtures/bce.py:bce_with_logits \
    --device cuda --save-dir "$OUT/saved" --json "$OUT/demo_cuda.json"
# 3. A geomloss pair on the GPU at a realistic size: the plain-torch Sinkhorn against
#    SamplesLoss("sinkhorn", backend="tensorized"), N = M = 1,000 points in 3-D.
step sinkhorn_cuda 100 "0 1" losscmp fixtures/sinkhorn_torch.py:handwritten fixtures/sinkhorn_torch.py:official \
    --device cuda --spec 'x: N D real grad; y: M D real; N=1000; M=1000; D=3' --examples 20 \
    --no-explain --json "$OUT/sinkhorn_cuda.json"
# 4. The harness's overhead per case against raw forward+backward calls, on the GPU.
step overhead_cuda 90 0 python3 scripts/bench_overhead.py --device cuda --examples 50 --sinkhorn-examples 20
# 5. The whole suite with CUDA present (tests written for CPU-only machines must still hold).
step suite 240 0 python3 -m pytest -q -p no:cacheprovider -n 14 --ignore=tests/test_gpu.py tests
exit "$failed"
