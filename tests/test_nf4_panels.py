"""The panel GEMM over an NF4 weight (``_nf4_products.panel_product``,
``kernels.nf4.nf4_matmul_panels``): its documented order of operations, bit for bit,
against a numpy model of it; batch- and thread-independence; the shapes that fall back to
decoded tiles and BLAS; non-finite inputs; which callers run it (the bank's row-stable
NF4 product) and which keep the tiles (``nf4_matmul`` and the layers)."""

import numba
import numpy as np
import pytest

import numlora as nl
from numlora import _nf4_products as products
from numlora.kernels import _simd
from numlora.kernels import nf4 as knf4
from numlora.multi import product as bank_product
from numlora.multi.product import REF_ROWS, base_product

pytestmark = pytest.mark.skipif(not knf4.SIMD_LANES, reason="the panel kernels need the SIMD build")

ROWS = products.FUSED_MAX_ROWS + 1  # the smallest batch of the large-batch paths


def _fma_chain(a, w):
    """The panel micro-kernel's sum for every (i, j): from zero, acc = fma(a[i, t], w[t, j],
    acc) in order of t, each step rounded once to float32 (the product is exact in
    float64 and the sum is rounded in 64 bits of mantissa first: a double rounding that
    differs from one only in cases far rarer than these tests' few million steps). Where
    the build has no fused multiply-add: the product rounded, then the sum."""
    acc = np.zeros((a.shape[0], w.shape[1]), np.float32)
    for t in range(a.shape[1]):
        if _simd.FMA:
            exact = np.multiply.outer(a[:, t].astype(np.longdouble), w[t].astype(np.longdouble))
            acc = (exact + acc.astype(np.longdouble)).astype(np.float32)
        else:
            acc = acc + np.multiply.outer(a[:, t], w[t]).astype(np.float32)
    return acc


def _panel_order(a, w):
    """y = a w as the panel kernel computes it: a chain per column block of PANEL_KC (w's
    rows), the blocks' results added in order to the first one."""
    y = None
    for k0 in range(0, w.shape[0], _simd.PANEL_KC):
        part = _fma_chain(a[:, k0:k0 + _simd.PANEL_KC], w[k0:k0 + _simd.PANEL_KC])
        y = part if y is None else (y + part).astype(np.float32)
    return y


def _weight(rng, shape, bs, dq=False):
    t = nl.quantize_nf4((rng.standard_normal(shape) * 0.05).astype(np.float32), bs, double_quant=dq)
    return t, t.dequantize()


def _panels(x, t):
    y = np.empty((x.shape[0], t.shape[0]), np.float32)
    products.panel_product(np.ascontiguousarray(x), t, t.scales, y)
    return y


@pytest.mark.parametrize("bs,dq", [(64, False), (256, True)])
def test_panels_follow_their_order_bit_for_bit(rng, bs, dq):
    out_f, in_f = 2 * _simd.PANEL_NR, 2 * _simd.PANEL_KC + 2 * bs  # three column blocks, the last short
    t, w = _weight(rng, (out_f, in_f), bs, dq)
    assert products.panels_ok(t)
    x = rng.standard_normal((ROWS + 2, in_f)).astype(np.float32)
    want = _panel_order(x, np.ascontiguousarray(w.T))
    assert np.array_equal(_panels(x, t).view(np.uint32), want.view(np.uint32))


def test_rows_do_not_depend_on_the_batch_or_the_threads(rng):
    t, _ = _weight(rng, (3 * _simd.PANEL_NR, 640), 64)
    x = rng.standard_normal((2 * knf4.PANEL_MC + 7, 640)).astype(np.float32)  # three passes
    full = _panels(x, t)
    for n in (1, 2, 3, 5, ROWS, ROWS + 1, 40, knf4.PANEL_MC + 1):  # last groups of 1, 2, 3 (4), 5 rows
        assert np.array_equal(_panels(x[:n], t).view(np.uint32), full[:n].view(np.uint32)), n
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one = _panels(x, t)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one.view(np.uint32), full.view(np.uint32))


@pytest.mark.parametrize("shape,bs", [((2 * 16 + 8, 256), 64),  # out not a whole number of panels
                                      ((64, 200), 8),  # blocks shorter than a vector
                                      ((64, 320), 64 * 3)])  # rows that are not whole blocks
def test_shapes_outside_the_panels_take_the_tiles_and_agree(rng, shape, bs):
    """The row-stable bank's NF4 product over a shape the panels do not take (on the
    16-lane build; blocks of 8 are whole vectors on the 8-lane one): decoded tiles with
    BLAS, in calibrated buckets."""
    t, w = _weight(rng, shape, bs)
    x = rng.standard_normal((ROWS + 3, shape[1])).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    y = np.empty((x.shape[0], shape[0]), np.float32)
    product = base_product(None, t, True, "tiles")
    assert product.exact is products.panels_ok(t)
    assert product.exact is (bs == 8 and _simd.LANES == 8)
    product(x, y)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_dense_panels_are_the_nf4_panels_on_the_decoded_weight(rng):
    """The dense panel GEMM (the row-stable bank's dense base where BLAS's rows depend on
    their position) on deq(W): the NF4 panel GEMM's bits, the same micro-kernels on the
    same panel values, at every batch size (and so row-stable)."""
    out_f, in_f = 2 * _simd.PANEL_NR, 2 * _simd.PANEL_KC + 128  # three column blocks, the last short
    t, w = _weight(rng, (out_f, in_f), 64)
    w = np.ascontiguousarray(w)
    assert products.dense_panels_ok(w.shape) and not products.dense_panels_ok((out_f + 8, in_f))
    x = rng.standard_normal((knf4.PANEL_MC + 7, in_f)).astype(np.float32)  # two passes
    full = _panels(x, t)
    for lo, hi in ((0, 1), (5, 8), (3, 3 + ROWS), (0, x.shape[0])):
        y = np.empty((hi - lo, out_f), np.float32)
        products.dense_panel_product(np.ascontiguousarray(x[lo:hi]), w, y)
        assert np.array_equal(y.view(np.uint32), full[lo:hi].view(np.uint32)), (lo, hi)


@pytest.mark.parametrize("out_f", [8 + 16, knf4.ROWS_TASK + 48 + 8, 2 * knf4.ROWS_TASK + 64])
def test_dense_rows_kernel_is_the_panel_order(rng, out_f):
    """kernels.nf4.dense_matmul_rows (one row of the row-stable bank's dense base, W's
    rows transposed in registers, the groups of 32 / 16 / 8 outputs skewed by columns):
    the panel micro-kernel's operations (the chains of fused multiply-adds modelled in
    float64), and so the dense panel GEMM's bits at every row count."""
    in_f = _simd.PANEL_KC + 136  # a short last block with an odd number of 8-column steps
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    x = rng.standard_normal((3, in_f)).astype(np.float32)
    y = np.empty((3, out_f), np.float32)
    knf4.dense_matmul_rows(w, x, y)
    assert np.array_equal(y.view(np.uint32), _panel_order(x, w.T).view(np.uint32))
    if products.dense_panels_ok(w.shape):  # the panels: the same bits
        xpack, ws = products._panel_operands(x)
        yp = np.empty_like(y)
        knf4.dense_matmul_panels(w, xpack, np.zeros(1, np.int64), yp, ws)
        assert np.array_equal(y.view(np.uint32), yp.view(np.uint32))


def test_panels_against_float64_and_the_tiles(rng):
    t, w = _weight(rng, (256, 1024), 64)
    x = rng.standard_normal((100, 1024)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    got = _panels(x, t)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 2e-6 * scale
    assert np.abs(got - nl.nf4_matmul(x, t)).max() <= 2e-6 * scale  # the tiles


def test_non_finite_inputs_stay_in_their_rows(rng):
    t, _ = _weight(rng, (_simd.PANEL_NR, 512), 64)
    x = rng.standard_normal((ROWS + 4, 512)).astype(np.float32)
    clean = _panels(x, t)
    x[2, 7] = np.nan
    x[ROWS + 1, 100] = np.inf
    got = _panels(x, t)
    assert np.isnan(got[2]).all()
    assert not np.isfinite(got[ROWS + 1]).any()
    keep = [i for i in range(x.shape[0]) if i not in (2, ROWS + 1)]
    assert np.array_equal(got[keep].view(np.uint32), clean[keep].view(np.uint32))


def test_the_bank_and_the_products_above_16_rows_run_the_panels(rng, monkeypatch):
    """The row-stable bank over an NF4 base runs the panels at every batch size (one
    arithmetic: a row's bits whatever else is in the batch); ``nf4_matmul``,
    ``qlora_forward`` and the layers run them above 16 rows (OpenBLAS's spinning workers
    sent to sleep for them, docs/performance.md), and decoded tiles with BLAS for a
    weight the panels do not take."""
    out_f, in_f = 2 * _simd.PANEL_NR, 256
    t, w = _weight(rng, (out_f, in_f), 64)
    ran = []
    panel_product = products.panel_product

    def counted(*args):
        ran.append(args[0].shape[0])
        return panel_product(*args)

    monkeypatch.setattr(products, "panel_product", counted)
    monkeypatch.setattr(bank_product, "panel_product", counted)
    bank = nl.LoraBank(t)
    a = (rng.standard_normal((4, in_f)) * 0.1).astype(np.float32)
    b = (rng.standard_normal((out_f, 4)) * 0.1).astype(np.float32)
    bank.add("p", a, b, 0.5)
    x = rng.standard_normal((ROWS + 6, in_f)).astype(np.float32)
    ids = np.arange(x.shape[0]) % 2 - 1  # base only, p
    y = bank.forward(x, ids)
    base = bank._backend.base
    assert ran == [x.shape[0]]  # the batch as it is: not padded to a calibrated size
    assert base.exact and base.checked == {REF_ROWS: True}  # nor calibrated
    x64 = x.astype(np.float64)
    ref = x64 @ w.T.astype(np.float64) + (ids[:, None] == 0) * 0.5 * ((x64 @ a.T) @ b.T)
    assert np.abs(y - ref).max() <= 2e-6 * np.abs(ref).max()
    one = bank.forward(x[3:4], ids[3:4])  # batch 1 against its row of the batch
    assert np.array_equal(one[0].view(np.uint32), y[3].view(np.uint32))
    ran.clear()
    got = nl.nf4_matmul(x, t)
    nl.qlora_forward(x, t, a, b, 0.5)
    layer = nl.QLoraLinear(t, a, b, 2.0)
    layer.eval()
    layer.forward(x)
    assert ran == [x.shape[0]] * 3
    assert np.abs(got - x64 @ w.T.astype(np.float64)).max() <= 2e-6 * np.abs(ref).max()
    part = nl.nf4_matmul(x[:ROWS], t)  # a row's bits whatever the batch above 16 rows
    assert np.array_equal(part.view(np.uint32), got[:ROWS].view(np.uint32))
    t2, w2 = _weight(rng, (out_f + 8, in_f), 64)  # not a whole number of panels: the tiles
    ran.clear()
    y2 = nl.nf4_matmul(x, t2)
    assert ran == []
    ref2 = x64 @ w2.T.astype(np.float64)
    assert np.abs(y2 - ref2).max() <= 2e-6 * np.abs(ref2).max()


def test_an_nf4_bank_the_panels_do_not_take_calibrates(rng):
    """Over an NF4 base of a shape outside the panels (out not a whole number of panels)
    the row-stable bank's tiles + BLAS run in calibrated, padded batch sizes, and a row's
    bits still do not depend on its batch."""
    out_f, in_f = 2 * _simd.PANEL_NR + 8, 256
    t, _ = _weight(rng, (out_f, in_f), 64)
    bank = nl.LoraBank(t)
    x = rng.standard_normal((ROWS + 6, in_f)).astype(np.float32)
    y = bank.forward(x, np.full(x.shape[0], -1))
    base = bank._backend.base
    assert not base.exact and len(base.checked) > 1
    one = bank.forward(x[5:6], [-1])
    assert np.array_equal(one[0].view(np.uint32), y[5].view(np.uint32))
