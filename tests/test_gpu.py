"""--device cuda across processes: identical bits, CUDA IPC transport, CUDA failures as findings.

Skipped without CUDA.  On a GPU machine run them with
``pytest -q tests/test_gpu.py`` (about a minute; each worker initialises its own CUDA context).
"""
from __future__ import annotations

import os
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from losscmp.findings import Pair
from losscmp.audit import Settings, audit
from losscmp.generate import Recipe, build_case
from losscmp.interpreter import InterpreterRunner, remote_implementation
from losscmp.isolate import IsolatedRunner, Transport
from losscmp.load import load_implementation, parse_ref
from losscmp.run import call
from losscmp.spec import parse_spec, preset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REPO = Path(__file__).resolve().parent.parent
REGRESSION = preset("regression")
SPEC = parse_spec("x: N D real grad; y: N D real; N=1..64; D=1..4")

GPU_IMPLS = """
import ctypes
import torch

def mse(x, y):
    return ((x - y) ** 2).mean()

def checksum(x, y):
    # Every bit of both inputs, exactly: the int32 words summed with distinct weights in float64.
    total = 0.0
    for t in (x, y):
        words = t.detach().contiguous().view(torch.int32).reshape(-1).to(torch.float64)
        weights = torch.arange(1, words.numel() + 1, dtype=torch.float64, device=words.device)
        total = total + (words * weights).sum()
    return total + 0 * x.sum()

def runs_out_of_memory(x, y):
    if x.shape[0] > 3:
        torch.empty(1 << 48, dtype=torch.uint8, device=x.device)  # 256 TiB
    return mse(x, y)

def segfaults(x, y):
    if x.shape[0] > 3:
        ctypes.string_at(0)
    return mse(x, y)

def device_assert(x, y):
    # An out-of-range index on the GPU: a device-side assert that poisons this CUDA context.
    if x.shape[0] > 3:
        x[torch.tensor([10 ** 9], device=x.device)].sum().item()
    return mse(x, y)
"""


@pytest.fixture
def gpu_impls(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = tmp_path / "gpu_impls.py"
    path.write_text(textwrap.dedent(GPU_IMPLS))
    return path


def cases():
    for seed, layout in enumerate(["contiguous", "transposed", "strided"]):
        yield build_case(SPEC, Recipe(sizes=(("N", 5), ("D", 3)), layout=layout, seed=seed), device="cuda")


def expected_checksum(fn, case) -> float:
    """The checksum of the case's own bits, computed on the host."""
    return float(fn(case.tensors["x"].cpu(), case.tensors["y"].cpu()))


def test_every_runner_sees_identical_bits_and_says_how_they_travelled(gpu_impls):
    impl = load_implementation(f"{gpu_impls}:checksum")
    there = remote_implementation(parse_ref(f"{gpu_impls}:checksum"))
    with IsolatedRunner(timeout=120) as isolated, InterpreterRunner({"checksum": sys.executable}, timeout=120) as other:
        for case in cases():
            want = expected_checksum(impl.fn, case)
            here = call(impl.fn, SPEC, case)
            ipc = isolated(impl, SPEC, case)
            copied = other(there, SPEC, case)
            for out in (here, ipc, copied):
                assert out.status == "ok", out.error
                assert float(out.value) == want
                assert out.value.device.type == "cuda"
            assert here.transport == Transport.IN_PROCESS
            assert ipc.transport == Transport.CUDA_IPC
            assert copied.transport == Transport.HOST_COPY
            assert torch.equal(ipc.grads["x"], here.grads["x"]) and torch.equal(copied.grads["x"], here.grads["x"])


def _audit(gpu_impls: Path, bad: str):
    impls = [load_implementation(f"{gpu_impls}:mse"), load_implementation(f"{gpu_impls}:{bad}")]
    return audit(impls, SPEC, Settings.of(device="cuda", isolate=True, timeout=120, examples=12, minimize=False))


def test_an_out_of_memory_error_is_a_finding_and_the_run_goes_on(gpu_impls):
    result = _audit(gpu_impls, "runs_out_of_memory")
    assert result.cases_run == 12
    kinds = {(d.subject, d.kind) for d in result.divergences}
    assert kinds == {(Pair("mse", "runs_out_of_memory"), "exception")}, [d.verdict.detail for d in result.divergences]
    assert "out of memory" in result.divergences[0].verdict.detail.lower()


def test_a_crashing_implementation_is_a_finding_and_cuda_still_works_after(gpu_impls):
    result = _audit(gpu_impls, "segfaults")
    assert result.cases_run == 12
    assert {(d.subject, d.kind) for d in result.divergences} == {(Pair("mse", "segfaults"), "crash")}


def test_a_poisoned_context_is_a_finding_and_the_worker_restarts_fresh(gpu_impls):
    impl = load_implementation(f"{gpu_impls}:device_assert")
    big, small = next(cases()), build_case(SPEC, Recipe(sizes=(("N", 2), ("D", 3)), seed=1), device="cuda")
    with IsolatedRunner(timeout=120) as runner:
        out = runner(impl, SPEC, big)
        assert out.status in ("exception", "crash"), out
        again = runner(impl, SPEC, small)  # a fresh worker, a fresh context
        assert again.status == "ok", again.error
        assert torch.equal(again.value, call(impl.fn, SPEC, small).value)


@pytest.mark.skipif(os.environ.get("LOSSCMP_SKIP_KEOPS") == "1", reason="KeOps compile disabled")
def test_keops_gpu_jit_under_isolate_never_ends_the_run(tmp_path, monkeypatch):
    pytest.importorskip("pykeops")
    pytest.importorskip("geomloss")
    monkeypatch.chdir(REPO)
    impls = [load_implementation('tensorized=geomloss:SamplesLoss(loss="sinkhorn", blur=0.05, backend="tensorized")'),
             load_implementation('online=geomloss:SamplesLoss(loss="sinkhorn", blur=0.05, backend="online")')]
    result = audit(impls, preset("points"), Settings.of(device="cuda", isolate=True, timeout=300, examples=5, minimize=False))
    assert result.cases_run == 5  # a JIT segfault (pykeops on CUDA 13) is a crash finding, not the end of losscmp
    for d in result.divergences:
        assert d.kind in ("crash", "exception", "value", "gradient", "timeout")
