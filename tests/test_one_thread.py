"""A call made with one numba thread, or with work below its kernel's threshold, runs the
serial build of each parallel kernel (``numlora.kernels._jit.ParallelKernel``) and gives
the same bits as the parallel build with every thread; another Python thread's setting is
its own. (conftest.py turns the small-work routing off for the rest of the suite.)"""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest

import numlora as nl
from numlora import _config
from numlora.kernels import _jit
from numlora.kernels import nf4 as kn

JIT_DISABLED = numba.config.DISABLE_JIT


def _workload():
    """A tour of the public paths that run parallel kernels: quantize (with double
    quantization), dequantize, the NF4 products at 1, 3 and 32 rows and their input
    gradient, both 16-bit compute dtypes, merge / bit-exact unmerge, LoRA and QLoRA
    training steps, the bank, a convolution. Returns every result, as arrays."""
    g = np.random.default_rng(7)
    w = g.standard_normal((192, 256), dtype=np.float32)
    a = g.standard_normal((8, 256), dtype=np.float32) * np.float32(0.1)
    b = g.standard_normal((192, 8), dtype=np.float32) * np.float32(0.1)
    x = g.standard_normal((32, 256), dtype=np.float32)
    res = []
    t = nl.quantize_nf4(w, double_quant=True)
    res += [t.packed, t.scales, nl.dequantize_nf4(t)]
    for rows in (1, 3, 32):
        res.append(nl.qlora_forward(x[:rows], t, a, b, 2.0))
        res.append(nl.nf4_matmul_t(x[:rows, :192], t))
        for cd in ("bfloat16", "float16"):
            res.append(nl.nf4_matmul(x[:rows], t, compute_dtype=cd))
            res.append(nl.qlora_forward(x[:rows], t, a, b, 2.0, compute_dtype=cd))
    wm = w.copy()
    rec = nl.merge_lora(wm, a, b, 2.0, record=True)
    res.append(wm.copy())
    nl.unmerge_lora(wm, a, b, 2.0, record=rec)
    res.append(wm)
    for layer in (nl.QLoraLinear(t, a, b, 16.0, dropout=0.1), nl.LoraLinear(w, a, b, 16.0, dropout=0.1)):
        layer.train()
        for rows in (3, 32):
            y = layer.forward(x[:rows])
            res += [y, layer.backward(y), layer.grad_a.copy(), layer.grad_b.copy()]
    bank = nl.LoraBank(w)
    bank.add("p", a, b)
    bank.add("q", a[:4], b[:, :4])
    res.append(bank.forward(x, np.arange(32) % 3 - 1))
    img = g.standard_normal((2, 4, 12, 12), dtype=np.float32)
    kw = g.standard_normal((6, 4, 3, 3), dtype=np.float32)
    ca = g.standard_normal((4, 4, 3, 3), dtype=np.float32) * np.float32(0.1)
    cb = g.standard_normal((6, 4, 1, 1), dtype=np.float32) * np.float32(0.1)
    res.append(nl.conv_lora_forward(img, kw, ca, cb, 2.0, padding=1))
    return res


def _one_thread(fn):
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return fn()
    finally:
        numba.set_num_threads(before)


def _same(r1, r2):
    assert len(r1) == len(r2)
    for i, (u, v) in enumerate(zip(r1, r2)):
        u, v = np.asarray(u), np.asarray(v)
        assert u.dtype == v.dtype and u.shape == v.shape, i
        assert np.array_equal(u.view(np.uint8), v.view(np.uint8)), f"result {i} differs"


@pytest.mark.skipif(JIT_DISABLED, reason="thread count is meaningless without the JIT")
def test_one_thread_gives_the_bits_of_all_threads(monkeypatch):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")
    monkeypatch.setattr(_config, "SMALL_SERIAL", False)  # the small inputs on the parallel builds
    _same(_workload(), _one_thread(_workload))


def _forbid(kernel, build, monkeypatch):
    def refuse(*args):
        raise AssertionError(f"the {build} build of {kernel!r} ran")

    monkeypatch.setattr(kernel, "parallel" if build == "parallel" else "_serial", refuse)


@pytest.mark.skipif(JIT_DISABLED or not _config.PARALLEL, reason="no parallel kernels to route")
@pytest.mark.parametrize("threads", [1, 2])
def test_each_call_runs_the_build_of_its_thread_count(threads, monkeypatch):
    if numba.config.NUMBA_NUM_THREADS < threads:
        pytest.skip("numba has one thread here")
    monkeypatch.setattr(_config, "SMALL_SERIAL", False)
    kernels = [kn.nf4_quantize_simd, kn.nf4_matmul_t_simd, kn.nf4_decode_simd] if kn.SIMD_LANES else \
        [kn.nf4_quantize_even, kn.nf4_matmul_t, kn.nf4_dequantize_range]
    assert all(isinstance(k, _jit.ParallelKernel) for k in kernels)
    for k in kernels:
        k.serial  # noqa: B018 - made before it is replaced
        _forbid(k, "parallel" if threads == 1 else "serial", monkeypatch)
    g = np.random.default_rng(3)
    w = g.standard_normal((64, 128), dtype=np.float32)

    def calls():
        t = nl.quantize_nf4(w)
        return nl.dequantize_nf4(t), nl.nf4_matmul_t(g.standard_normal((2, 64), dtype=np.float32), t)

    def run():
        before = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            return calls()
        finally:
            numba.set_num_threads(before)

    run()
    monkeypatch.undo()
    monkeypatch.setattr(_config, "SMALL_SERIAL", False)
    _forbid(kernels[0], "serial" if threads == 1 else "parallel", monkeypatch)
    with pytest.raises(AssertionError, match="build of"):  # the control: its own build refused
        run()


@pytest.mark.skipif(JIT_DISABLED, reason="thread count is meaningless without the JIT")
def test_the_thread_count_is_read_per_python_thread():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")
    seen = {}

    def worker():
        numba.set_num_threads(1)
        seen["worker"] = _jit.num_threads()

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    assert seen["worker"] == 1
    assert _jit.num_threads() == numba.get_num_threads() >= 2


@pytest.mark.skipif(JIT_DISABLED or not _config.PARALLEL, reason="no parallel kernels to route")
def test_small_work_runs_the_serial_build_and_large_work_the_parallel_one(monkeypatch):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")
    monkeypatch.setattr(_config, "SMALL_SERIAL", True)
    fwd = kn.nf4_matmul_words if kn.SIMD_LANES else kn.nf4_gemm_pairs
    assert fwd._below == _jit.PRODUCT_SERIAL_BELOW > 0
    g = np.random.default_rng(5)
    t = nl.quantize_nf4(g.standard_normal((256, 256), dtype=np.float32))  # 64 Ki weights
    x = g.standard_normal((4, 256), dtype=np.float32)
    assert _jit.product_work(t.packed, x[:, :1]) == 4 * 256 * 256 < _jit.PRODUCT_SERIAL_BELOW
    want = nl.nf4_matmul(x, t)
    fwd.serial  # noqa: B018 - made before it is replaced
    _forbid(fwd, "parallel", monkeypatch)
    assert np.array_equal(nl.nf4_matmul(x, t), want)  # small: the serial build
    monkeypatch.setattr(fwd, "_below", 4 * 256 * 256)  # the same call counted as large
    with pytest.raises(AssertionError, match="parallel build"):
        nl.nf4_matmul(x, t)
    monkeypatch.setattr(_config, "SMALL_SERIAL", False)  # the knob off: parallel whatever the size
    monkeypatch.setattr(fwd, "_below", _jit.PRODUCT_SERIAL_BELOW)
    with pytest.raises(AssertionError, match="parallel build"):
        nl.nf4_matmul(x, t)


def test_work_of_the_kernel_families():
    packed = np.zeros(1000, np.uint8)
    assert _jit.product_work(packed, np.zeros((3, 7))) == 2000 * 3
    assert _jit.product_work(packed, np.zeros(7)) == 2000  # a GEMV's output vector
    assert _jit.first_size(np.zeros((4, 5)), packed) == 20
    assert _jit.last_size(packed, np.zeros((4, 5))) == 20
