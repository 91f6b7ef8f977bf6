"""What the CUDA test files share: whether a GPU or the simulator is here, the `cuda_test`
marker, tiny launch sizes under the simulator (as stumpy patches THREADS_PER_BLOCK), and
the launcher that re-runs a file's `gpu` tests on the simulator from a normal run, and a
fix of a race in the simulator's shared arrays (applied when the simulator is on)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import numlora as nl

from sim_patch import lock_simulator_shared_arrays

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
ROOT = Path(__file__).resolve().parents[1]


def _real_gpu() -> bool:
    if SIM:
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:
        return False


if SIM:
    lock_simulator_shared_arrays()

GPU = _real_gpu()
needs_cuda = pytest.mark.skipif(not (SIM or GPU), reason="no GPU here; the simulator pass runs from the "
                                "test_*_on_the_simulator launcher (or set NUMBA_ENABLE_CUDASIM=1)")


def cuda_test(f):
    return pytest.mark.gpu(needs_cuda(f))


@pytest.fixture(autouse=True)
def tiny_blocks(request, monkeypatch):
    """Under the simulator: tiny launch sizes and a short GIL switch interval (the
    simulator's syncthreads polls between Python threads)."""
    if not SIM or "gpu" not in request.keywords:
        yield
        return
    from numlora.cuda import kernels as K

    monkeypatch.setattr(K, "THREADS", 8)
    monkeypatch.setattr(K, "REDUCE_THREADS", 4)
    monkeypatch.setattr(K, "SHRINK_THREADS", 4)
    monkeypatch.setattr(K, "GEMV_THREADS", 4)
    monkeypatch.setattr(K, "GEMV_ROWS", 2)
    # one tile per size class, so the tests cross the per-shape tile choice (M = 1, 2-3, more)
    monkeypatch.setattr(K, "GEMM_TILES", ((1, (2, 4, 2, 1, 2)), (3, (4, 4, 4, 2, 2))))
    monkeypatch.setattr(K, "GEMM_TILE", (4, 8, 2, 2, 2))
    monkeypatch.setattr(K, "RNG_CHUNK_LOG2", 2)
    monkeypatch.setattr(K, "RNG_STAGE", 2)  # two staging rounds per chunk
    monkeypatch.setattr(K, "MULTI_THREADS", 4)
    monkeypatch.setattr(K, "MULTI_RANKS", 2)  # ranks 1..5 cross rank chunks
    monkeypatch.setattr(K, "DROP_CHUNK_LOG2", 2)  # 4-element dropout chunks: jumps and row ends in tiny rows
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(old)


def run_simulator_pass(test_file, min_passed: int) -> None:
    """Run ``test_file``'s `gpu` tests in a subprocess with the simulator on; at least
    ``min_passed`` must pass and none fail."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env.pop("NUMBA_DISABLE_JIT", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                        str(Path(test_file).resolve())],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, tail
    m = re.search(r"(\d+) passed", r.stdout)
    assert m and int(m.group(1)) >= min_passed and "failed" not in r.stdout, tail


# small helpers of the CUDA tests
def d(a):
    return nl.to_device(np.ascontiguousarray(a))


def h(a):
    return nl.to_host(a)


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)
