import os

# Small work runs the serial builds of numlora's parallel kernels by default
# (numlora._config.SMALL_SERIAL); the suite's inputs are small, so it turns that off to
# keep testing the parallel builds. tests/test_one_thread.py tests the routing itself.
os.environ["NUMLORA_SMALL_SERIAL"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

JIT_DISABLED = os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if not JIT_DISABLED:
        return
    skip = pytest.mark.skip(reason="too slow as interpreted Python (NUMBA_DISABLE_JIT=1 coverage run)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["simd", "portable"])
def kernel_path(request, monkeypatch):
    """Run a test on the SIMD decode (where this CPU has it) and on the portable kernels."""
    from numlora.kernels import nf4 as k

    if request.param == "portable":
        monkeypatch.setattr(k, "SIMD_LANES", 0)
    elif k.SIMD_LANES == 0:
        pytest.skip("this CPU (or NUMLORA_SIMD=0) has no SIMD NF4 decode")
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def make_weight(out: int, inp: int) -> np.ndarray:
    """The seed tests' helper: w[i, j] = (i * in + j) * 0.01."""
    i, j = np.meshgrid(np.arange(out), np.arange(inp), indexing="ij")
    return ((i * inp + j).astype(np.float32) * np.float32(0.01)).astype(np.float32)


def full_disk(monkeypatch) -> None:
    """Make every temporary file numlora creates write to /dev/full, so the disk is full
    (ENOSPC) at the first flush (for the fault tests of the writers and converters)."""
    from numlora.io import atomic

    real = atomic._open_temp

    def full(path):
        fd = real(path)
        dev = os.open("/dev/full", os.O_WRONLY)
        os.dup2(dev, fd)
        os.close(dev)
        return fd

    monkeypatch.setattr(atomic, "_open_temp", full)
