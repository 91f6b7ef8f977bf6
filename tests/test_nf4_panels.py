"""The large-batch NF4 forward through panels (``kernels.nf4.nf4_matmul_panels``): its
documented order of operations, bit for bit, against a numpy model of it; batch- and
thread-independence; the 16-bit compute dtypes; the shapes and calls that keep decoded
tiles and BLAS; non-finite inputs."""

import numba
import numpy as np
import pytest

import numlora as nl
from numlora import _nf4_products as products
from numlora.kernels import _jit, _simd
from numlora.kernels import nf4 as knf4

pytestmark = pytest.mark.skipif(not knf4.SIMD_LANES, reason="the panel kernels need the SIMD build")


#: The real check (the fixture below replaces it in this module's other tests).
OTHERS_RUNNING = _jit.others_running


@pytest.fixture(autouse=True)
def cores_free(monkeypatch):
    """The panels run only while no other thread of the process is on a core
    (``_jit.others_running``); OpenBLAS's workers spin for a while after the tests' own
    numpy products, so the tests here say the cores are free (and set it otherwise where
    they test the other case)."""
    monkeypatch.setattr(_jit, "others_running", lambda: False)

ROWS = products.FUSED_MAX_ROWS + 1  # the smallest batch of the large-batch paths


def _fma_chain(a, w):
    """The panel micro-kernel's sum for every (i, j): from zero, acc = fma(a[i, t], w[t, j],
    acc) in order of t, each step rounded once to float32 (the product is exact in
    float64 and the sum is rounded in 64 bits of mantissa first: a double rounding that
    differs from one only in cases far rarer than these tests' few million steps). Where
    the build has no fused multiply-add: the product rounded, then the sum."""
    acc = np.zeros((a.shape[0], w.shape[1]), np.float32)
    fma = _simd.FMA
    for t in range(a.shape[1]):
        if fma:
            exact = np.multiply.outer(a[:, t].astype(np.longdouble), w[t].astype(np.longdouble))
            acc = (exact + acc.astype(np.longdouble)).astype(np.float32)
        else:
            acc = acc + np.multiply.outer(a[:, t], w[t]).astype(np.float32)
    return acc


def _panel_order(a, w):
    """y = a w as the panel kernels compute it: a chain per column block of PANEL_KC (w's
    rows), the blocks' results added in order to the first one."""
    y = None
    for k0 in range(0, w.shape[0], _simd.PANEL_KC):
        part = _fma_chain(a[:, k0:k0 + _simd.PANEL_KC], w[k0:k0 + _simd.PANEL_KC])
        y = part if y is None else (y + part).astype(np.float32)
    return y


def _weight(rng, shape, bs, dq=False):
    t = nl.quantize_nf4((rng.standard_normal(shape) * 0.05).astype(np.float32), bs, double_quant=dq)
    return t, t.dequantize()


@pytest.mark.parametrize("bs,dq", [(64, False), (256, True)])
def test_forward_follows_its_order_bit_for_bit(rng, bs, dq):
    out_f, in_f = 2 * _simd.PANEL_NR, 2 * _simd.PANEL_KC + 2 * bs  # three column blocks, the last short
    t, w = _weight(rng, (out_f, in_f), bs, dq)
    assert products.panels_ok(t)
    x = rng.standard_normal((ROWS + 2, in_f)).astype(np.float32)
    got = nl.nf4_matmul(x, t)
    want = _panel_order(x, np.ascontiguousarray(w.T))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_rows_do_not_depend_on_the_batch_or_the_threads(rng):
    t, _ = _weight(rng, (3 * _simd.PANEL_NR, 640), 64)
    x = rng.standard_normal((2 * knf4.PANEL_MC + 7, 640)).astype(np.float32)  # three passes
    full = nl.nf4_matmul(x, t)
    for n in (ROWS, 40, knf4.PANEL_MC + 1):
        part = nl.nf4_matmul(x[:n], t)
        assert np.array_equal(part.view(np.uint32), full[:n].view(np.uint32)), n
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one_y = nl.nf4_matmul(x, t)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one_y.view(np.uint32), full.view(np.uint32))


@pytest.mark.parametrize("shape,bs", [((2 * 16 + 8, 256), 64),  # out not a whole number of panels
                                      ((64, 200), 8),  # blocks shorter than a vector
                                      ((64, 320), 64 * 3)])  # rows that are not whole blocks
def test_shapes_outside_the_panels_take_the_tiles_and_agree(rng, shape, bs):
    t, w = _weight(rng, shape, bs)
    x = rng.standard_normal((ROWS + 3, shape[1])).astype(np.float32)
    g = rng.standard_normal((ROWS + 3, shape[0])).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    ref_t = g.astype(np.float64) @ w.astype(np.float64)
    assert np.abs(nl.nf4_matmul(x, t) - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.abs(nl.nf4_matmul_t(g, t) - ref_t).max() <= 1e-5 * np.abs(ref_t).max()


def test_panels_against_float64_and_the_tiles(rng):
    t, w = _weight(rng, (256, 1024), 64)
    x = rng.standard_normal((100, 1024)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    got = nl.nf4_matmul(x, t)
    tiles = np.empty_like(got)
    for r0, r1, cur in products.row_tiles(t, t.scales):
        tiles[:, r0:r1] = x @ cur.T
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 2e-6 * scale
    assert np.abs(got - tiles).max() <= 2e-6 * scale


def test_non_finite_inputs_stay_in_their_rows(rng):
    t, _ = _weight(rng, (_simd.PANEL_NR, 512), 64)
    x = rng.standard_normal((ROWS + 4, 512)).astype(np.float32)
    clean = nl.nf4_matmul(x, t)
    x[2, 7] = np.nan
    x[ROWS + 1, 100] = np.inf
    got = nl.nf4_matmul(x, t)
    assert np.isnan(got[2]).all()
    assert not np.isfinite(got[ROWS + 1]).any()
    keep = [i for i in range(x.shape[0]) if i not in (2, ROWS + 1)]
    assert np.array_equal(got[keep].view(np.uint32), clean[keep].view(np.uint32))


def _round16(a, dtype):
    """a rounded to bfloat16 / float16, half to even (ml_dtypes' / numpy's casts)."""
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_compute_dtypes_round_the_panels_operands(rng, dtype):
    """A 16-bit compute dtype's large batches run the panels on rounded operands:
    ``rnd(rnd(x) rnd(deq(W))^T)`` in the panels' order, bit for bit (where the forward
    does not take the bf16 dot-product kernel)."""
    from numlora.kernels import compute as kc

    if dtype == "bfloat16" and kc.BF16_DOT:
        pytest.skip("bfloat16 runs the dot-product kernel on this CPU")
    out_f, in_f = 2 * _simd.PANEL_NR, _simd.PANEL_KC + 128
    t, w = _weight(rng, (out_f, in_f), 64)
    wr = _round16(w, dtype)
    x = rng.standard_normal((ROWS + 4, in_f)).astype(np.float32)
    got = nl.nf4_matmul(x, t, compute_dtype=dtype)
    want = _round16(_panel_order(_round16(x, dtype), np.ascontiguousarray(wr.T)), dtype)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_which_calls_take_the_panels_and_their_lora_branch(rng, monkeypatch):
    """An inference forward above 16 rows runs the panels while the cores are free and
    then its LoRA branch in numba's kernels, no BLAS call (which would leave OpenBLAS's
    threads spinning into the next call); with another thread running (OpenBLAS's after
    a product), a training forward (``u_out`` or ``x_lora``) and the input gradient keep
    the tiles and BLAS. Results agree with float64 either way."""
    from numlora import _backward as bw

    out_f, in_f = 2 * _simd.PANEL_NR, 256
    t, w = _weight(rng, (out_f, in_f), 64)
    a = (rng.standard_normal((4, in_f)) * 0.1).astype(np.float32)
    b = (rng.standard_normal((out_f, 4)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    x = rng.standard_normal((ROWS + 6, in_f)).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 @ w.T.astype(np.float64) + 0.5 * (x64 @ a.T) @ b.T + bias
    ran = []
    panel_product = products.panel_product
    monkeypatch.setattr(products, "panel_product", lambda *args: ran.append("panels") or panel_product(*args))
    add_low_rank = bw.add_low_rank
    monkeypatch.setattr(bw, "add_low_rank", lambda *args: ran.append("blas lora") or add_low_rank(*args))
    tol = 2e-6 * np.abs(ref).max()

    y = nl.qlora_forward(x, t, a, b, 0.5, bias)
    assert ran == ["panels"] and np.abs(y - ref).max() <= tol
    ran.clear()
    u = np.empty((x.shape[0], 4), np.float32)
    y_train = nl.qlora_forward(x, t, a, b, 0.5, bias, u_out=u)
    assert ran == ["blas lora"] and np.abs(y_train - ref).max() <= tol
    assert np.abs(u - x64 @ a.T).max() <= 1e-5 * np.abs(x64 @ a.T).max()
    ran.clear()
    monkeypatch.setattr(_jit, "others_running", lambda: True)  # OpenBLAS's threads still spinning
    y_busy = nl.qlora_forward(x, t, a, b, 0.5, bias)
    assert ran == ["blas lora"] and np.abs(y_busy - ref).max() <= tol
    ran.clear()
    g = rng.standard_normal((ROWS + 6, out_f)).astype(np.float32)
    ref_t = g.astype(np.float64) @ w.astype(np.float64)
    assert np.abs(nl.nf4_matmul_t(g, t) - ref_t).max() <= 2e-6 * np.abs(ref_t).max() and ran == []


def _spin(n):
    acc = 0.0
    for i in range(n):
        acc = acc * 0.5 + i
    return acc


def test_others_running_sees_a_busy_thread():
    """``_jit.others_running`` reads the threads' states: a thread spinning outside the
    GIL (as OpenBLAS's workers do after a product) is seen on a core."""
    import threading
    import time

    spin = numba.njit(nogil=True)(_spin)
    spin(10)
    done = threading.Event()

    def busy():
        while not done.is_set():
            spin(5_000_000)

    th = threading.Thread(target=busy)
    th.start()
    try:
        deadline = time.perf_counter() + 5.0
        seen = False
        while not seen and time.perf_counter() < deadline:
            seen = OTHERS_RUNNING()
    finally:
        done.set()
        th.join()
    assert seen
