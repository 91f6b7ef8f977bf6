"""The large-batch float32 NF4 products through panels (``kernels.nf4.nf4_matmul_panels``,
``nf4_matmul_t_panels``): their documented order of operations, bit for bit, against a
numpy model of it; batch- and thread-independence; the shapes that fall back to decoded
tiles and BLAS; non-finite inputs."""

import numba
import numpy as np
import pytest

import numlora as nl
from numlora import _nf4_products as products
from numlora.kernels import _simd
from numlora.kernels import nf4 as knf4

pytestmark = pytest.mark.skipif(not knf4.SIMD_LANES, reason="the panel kernels need the SIMD build")

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


@pytest.mark.parametrize("bs", [64, 128])
def test_input_gradient_follows_its_order_bit_for_bit(rng, bs):
    out_f, in_f = _simd.PANEL_KC + 3 * _simd.PANEL_NR, 256  # two row blocks of W, the last short
    t, w = _weight(rng, (out_f, in_f), bs)
    assert products.panels_t_ok(t)
    g = rng.standard_normal((ROWS + 5, out_f)).astype(np.float32)
    got = nl.nf4_matmul_t(g, t)
    want = _panel_order(g, w)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_rows_do_not_depend_on_the_batch_or_the_threads(rng):
    t, _ = _weight(rng, (3 * _simd.PANEL_NR, 640), 64)
    x = rng.standard_normal((2 * knf4.PANEL_MC + 7, 640)).astype(np.float32)  # three passes
    full = nl.nf4_matmul(x, t)
    for n in (ROWS, 40, knf4.PANEL_MC + 1):
        part = nl.nf4_matmul(x[:n], t)
        assert np.array_equal(part.view(np.uint32), full[:n].view(np.uint32)), n
    g = rng.standard_normal((50, 3 * _simd.PANEL_NR)).astype(np.float32)
    dx = nl.nf4_matmul_t(g, t)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one_y, one_dx = nl.nf4_matmul(x, t), nl.nf4_matmul_t(g, t)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one_y.view(np.uint32), full.view(np.uint32))
    assert np.array_equal(one_dx.view(np.uint32), dx.view(np.uint32))
    assert np.array_equal(nl.nf4_matmul_t(g[3:3 + ROWS], t).view(np.uint32), dx[3:3 + ROWS].view(np.uint32))


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
    ``rnd(rnd(x) rnd(deq(W))^T)`` in the panels' order, bit for bit (the forward where it
    does not take the bf16 dot-product kernel; the input gradient always)."""
    from numlora.kernels import compute as kc

    out_f, in_f = 2 * _simd.PANEL_NR, _simd.PANEL_KC + 128
    t, w = _weight(rng, (out_f, in_f), 64)
    wr = _round16(w, dtype)
    x = rng.standard_normal((ROWS + 4, in_f)).astype(np.float32)
    if not (dtype == "bfloat16" and kc.BF16_DOT):
        got = nl.nf4_matmul(x, t, compute_dtype=dtype)
        want = _round16(_panel_order(_round16(x, dtype), np.ascontiguousarray(wr.T)), dtype)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    g = rng.standard_normal((ROWS + 4, out_f)).astype(np.float32)
    got_t = nl.nf4_matmul_t(g, t, compute_dtype=dtype)
    want_t = _round16(_panel_order(_round16(g, dtype), wr), dtype)
    assert np.array_equal(got_t.view(np.uint32), want_t.view(np.uint32))
