import numpy as np
import pytest

import numlora as nl

from reference import lora_expand_f32_ref, lora_shrink_f32_ref


def _ref(x, t, a, b, s, bias=None):
    w = t.dequantize().astype(np.float64)
    y = np.asarray(x, np.float64) @ w.T + s * (np.asarray(x, np.float64) @ a.T) @ b.T
    return y if bias is None else y + bias


@pytest.mark.parametrize("shape,bs,dq", [((40, 64), 64, False), ((37, 100), 64, False), ((300, 1100), 64, True),
                                         ((9, 7), 3, False), ((130, 2100), 4096, True), ((10, 60), 30, False),
                                         ((12, 84), 14, False)])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_qlora_forward_matches_dequantize_reference(rng, shape, bs, dq, n):
    w = rng.standard_normal(shape).astype(np.float32)
    t = nl.quantize_nf4(w, bs, double_quant=dq)
    a = rng.standard_normal((2, shape[1])).astype(np.float32)
    b = rng.standard_normal((shape[0], 2)).astype(np.float32)
    bias = rng.standard_normal(shape[0]).astype(np.float32)
    x = rng.standard_normal((n, shape[1])).astype(np.float32)
    y = nl.qlora_forward(x, t, a, b, 0.5, bias)
    ref = _ref(x, t, a, b, 0.5, bias)
    assert np.abs(y - ref).max() <= 1e-5 * (np.abs(ref).max() + 1)
    base = nl.nf4_matmul(x, t)
    assert np.abs(base - _ref(x, t, a, b, 0.0)).max() <= 1e-5 * (np.abs(ref).max() + 1)
    y1 = nl.qlora_forward(x[0], t, a, b, 0.5, bias)
    assert y1.shape == (shape[0],)
    assert np.abs(y1 - ref[0]).max() <= 1e-5 * (np.abs(ref).max() + 1)


def test_nf4_matmul_errors(rng):
    t = nl.quantize_nf4(rng.standard_normal((4, 8)).astype(np.float32), 4)
    with pytest.raises(nl.ShapeError, match=r"in_features = 8"):
        nl.nf4_matmul(np.ones(7, np.float32), t)
    t3 = nl.quantize_nf4(np.ones((2, 2, 2), np.float32), 4)
    with pytest.raises(nl.ShapeError, match="2-D"):
        nl.nf4_matmul(np.ones(2, np.float32), t3)


@pytest.mark.parametrize("shape,bs", [((70, 128), 64), ((33, 96), 32), ((20, 64), 4096), ((25, 39), 7),
                                      ((16, 130), 64)])
def test_rows_do_not_depend_on_batch_size(rng, shape, bs):
    """Up to FUSED_MAX_ROWS rows, a row's result is bit-identical whatever the batch."""
    w = rng.standard_normal(shape).astype(np.float32)
    t = nl.quantize_nf4(w, bs, double_quant=shape[0] == 33)
    a = rng.standard_normal((3, shape[1])).astype(np.float32)
    b = rng.standard_normal((shape[0], 3)).astype(np.float32)
    bias = rng.standard_normal(shape[0]).astype(np.float32)
    x = rng.standard_normal((nl.nf4.FUSED_MAX_ROWS, shape[1])).astype(np.float32)
    full = nl.qlora_forward(x, t, a, b, 0.7, bias)
    for n in (1, 2, 5, nl.nf4.FUSED_MAX_ROWS):
        part = nl.qlora_forward(x[:n], t, a, b, 0.7, bias)
        assert np.array_equal(part, full[:n])
    for i in (0, 3):
        assert np.array_equal(nl.qlora_forward(x[i], t, a, b, 0.7, bias), full[i])
    # above the fused limit (BLAS tiles) rows agree to float32 rounding
    big = np.concatenate([x, x, x[:1]])
    yb = nl.qlora_forward(big, t, a, b, 0.7, bias)
    assert np.allclose(yb[: len(x)], full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("shape,bs", [((48, 64), 64), ((37, 100), 64), ((9, 7), 3)])
@pytest.mark.parametrize("n", [1, 4])
def test_transposed_product(rng, shape, bs, n):
    w = rng.standard_normal(shape).astype(np.float32)
    t = nl.quantize_nf4(w, bs)
    g = rng.standard_normal((n, shape[0])).astype(np.float32)
    ref = g.astype(np.float64) @ t.dequantize().astype(np.float64)
    got = nl.nf4_matmul_t(g, t)
    assert got.shape == (n, shape[1])
    assert np.abs(got - ref).max() <= 1e-5 * (np.abs(ref).max() + 1)
    assert np.array_equal(nl.nf4_matmul_t(g[0], t), got[0])
    out = np.empty((n, shape[1]), np.float32)
    assert nl.nf4_matmul_t(g, t, out=out) is out
    with pytest.raises(nl.ShapeError, match=r"out_features = " + str(shape[0])):
        nl.nf4_matmul_t(np.ones((n, shape[0] + 1), np.float32), t)




@pytest.mark.parametrize("shape,bs", [((70, 128), 64), ((33, 256), 32), ((18, 4096), 4096), ((40, 96), 16)])
def test_both_paths_match_reference_and_are_batch_independent(rng, kernel_path, shape, bs):
    w = rng.standard_normal(shape).astype(np.float32)
    t = nl.quantize_nf4(w, bs, double_quant=shape[0] == 33)
    a = rng.standard_normal((2, shape[1])).astype(np.float32)
    b = rng.standard_normal((shape[0], 2)).astype(np.float32)
    x = rng.standard_normal((nl.nf4.FUSED_MAX_ROWS, shape[1])).astype(np.float32)
    full = nl.qlora_forward(x, t, a, b, 1.5)
    ref = _ref(x, t, a, b, 1.5)
    assert np.abs(full - ref).max() <= 1e-5 * np.abs(ref).max()
    for n in (1, 3, 4, 7):
        assert np.array_equal(nl.qlora_forward(x[:n], t, a, b, 1.5), full[:n])
    big = np.concatenate([x, x])
    yb = nl.qlora_forward(big, t, a, b, 1.5)
    assert np.abs(yb - np.concatenate([ref, ref])).max() <= 1e-5 * np.abs(ref).max()
    assert np.array_equal(nl.dequantize_nf4(t).view(np.uint32),
                          (nl.NF4_CODE[np.stack([t.packed >> 4, t.packed & 15], 1).reshape(-1)[: w.size]]
                           * np.repeat(t.scales, bs)[: w.size]).reshape(shape).view(np.uint32))


@pytest.mark.parametrize("shape,bs", [((70, 512), 64), ((33, 4096), 4096), ((41, 96), 16), ((66, 320), 32),
                                      ((20, 256), 128), ((18, 512), 256)])
@pytest.mark.parametrize("n", [1, 2, 5, 16, "words max", "words max + 1"])
def test_transposed_product_paths_agree_bitwise(rng, kernel_path, shape, bs, n):
    """nf4_matmul_t on the SIMD decode and on the portable kernel: the same operations in
    the same order (bit-identical), and both match the float64 product. Up to
    SIMD_T_WORDS_MAX_ROWS rows take the word decode where it applies (blocks of half a
    chunk, of one and of two chunks here on AVX-512; rows in pairs, an odd one alone),
    more rows the L1-buffer decode: both sides of that limit are run."""
    from numlora.kernels import nf4 as k

    if isinstance(n, str):
        n = k.SIMD_T_WORDS_MAX_ROWS + n.endswith("+ 1")
    w = rng.standard_normal(shape).astype(np.float32)
    t = nl.quantize_nf4(w, bs, double_quant=shape[0] == 33)
    g = rng.standard_normal((n, shape[0])).astype(np.float32)
    got = nl.nf4_matmul_t(g, t)
    ref = g.astype(np.float64) @ t.dequantize().astype(np.float64)
    assert np.abs(got - ref).max() <= 1e-5 * (np.abs(ref).max() + 1)
    portable = np.empty_like(got)
    k.nf4_matmul_t(t.packed, t.scales, bs, t.code, g, portable)
    assert np.array_equal(got, portable)


@pytest.mark.parametrize("shape,bs", [((37, 1024), 64), ((21, 1024), 128), ((19, 512), 256), ((24, 1024), 32),
                                      ((9, 384), 64)])
def test_fused_rows_batch_independent_every_group_split(rng, kernel_path, shape, bs):
    """Every batch size up to FUSED_MAX_ROWS (rows in groups, leftover rows several
    weight rows at a time, odd weight-row counts): each row bit-identical to its batch-1
    result and within float32 rounding of the float64 product."""
    w = rng.standard_normal(shape).astype(np.float32)
    t = nl.quantize_nf4(w, bs)
    a = rng.standard_normal((3, shape[1])).astype(np.float32)
    b = rng.standard_normal((shape[0], 3)).astype(np.float32)
    x = rng.standard_normal((nl.nf4.FUSED_MAX_ROWS, shape[1])).astype(np.float32)
    ref = _ref(x, t, a, b, 0.5)
    singles = np.stack([nl.qlora_forward(x[i], t, a, b, 0.5) for i in range(len(x))])
    assert np.abs(singles - ref).max() <= 1e-5 * np.abs(ref).max()
    for n in range(1, len(x) + 1):
        assert np.array_equal(nl.qlora_forward(x[:n], t, a, b, 0.5), singles[:n])


@pytest.mark.parametrize("n", [1, 3, 17, 20])
@pytest.mark.parametrize("dense", [False, True])
def test_scaling_zero_adds_nothing_even_where_x_a_overflows(n, dense):
    """scaling = 0: the adapter contributes nothing, also where x A^T overflows float32
    (inf * 0 must not turn the output and the gradients into NaN); the fused (<= 16 rows)
    and BLAS paths, dense and NF4 bases, forward (with and without u_out) and backward."""
    rng = np.random.default_rng(n)
    w = rng.standard_normal((24, 64)).astype(np.float32)
    t = nl.quantize_nf4(w, 64)
    base_w = w if dense else nl.dequantize_nf4(t)
    x = rng.standard_normal((n, 64)).astype(np.float32)
    x[0, :] = 1e30  # x A^T = 64e60: inf in float32
    a = np.full((2, 64), 1e30, np.float32)
    b = rng.standard_normal((24, 2)).astype(np.float32)
    g = rng.standard_normal((n, 24)).astype(np.float32)
    ref = x.astype(np.float64) @ base_w.T.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        for u_out in (None, np.empty((n, 2), np.float32)):
            if dense:
                y = nl.lora_forward(x, w, a, b, 0.0, u_out=u_out)
            else:
                y = nl.qlora_forward(x, t, a, b, 0.0, u_out=u_out)
            assert np.isfinite(y).all()
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        if dense:
            dx, ga, gb = nl.lora_backward(x, w, a, b, 0.0, g)
        else:
            dx, ga, gb = nl.qlora_backward(x, t, a, b, 0.0, g)
    assert not ga.any() and not gb.any()
    gref = g.astype(np.float64) @ base_w.astype(np.float64)
    np.testing.assert_allclose(dx, gref, rtol=1e-5, atol=1e-5 * np.abs(gref).max())


@pytest.mark.parametrize("n,r,k", [(1, 1, 1), (2, 3, 7), (3, 4, 8), (5, 5, 9), (8, 16, 100), (16, 17, 64),
                                   (4, 8, 261)])
@pytest.mark.parametrize("scale", [0.5, 0.0])
def test_lora_shrink_simd_and_portable_give_the_canonical_bits(n, r, k, scale, kernel_path):
    """The LoRA shrink of the fused products (``kernels.nf4.shrink``: ``lora_shrink`` or,
    on a SIMD machine, ``lora_shrink_simd``'s <8 x float> chunks) and the large-batch
    ``compute.lora_branch`` (``lora_rows`` / ``lora_rows_simd``): the canonical 8-lane order, bit for bit, also with
    overflow (scale 0 adds nothing where x A^T is inf) and NaN."""
    from numlora.kernels import compute as kc
    from numlora.kernels import nf4 as k_

    rng = np.random.default_rng(n * 100 + r * 10 + k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    a = rng.standard_normal((r, k)).astype(np.float32)
    x[0, 0] = 3e38  # x A^T overflows in row 0
    a[0, k - 1] = np.nan if k > 1 else a[0, 0]
    want = lora_shrink_f32_ref(x, a, np.float32(scale))
    u = np.empty((n, r), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        k_.shrink(x, a, np.float32(scale), u)
    assert np.array_equal(u.view(np.uint32), want.view(np.uint32))
    bt = rng.standard_normal((r, 37)).astype(np.float32)  # whole vectors of outputs and a tail
    y0 = rng.standard_normal((n, 37)).astype(np.float32)
    u2, y = np.empty((n, r), np.float32), y0.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        kc.lora_branch(x, a, np.float32(scale), u2, np.ascontiguousarray(bt.T), y)
    unscaled = lora_shrink_f32_ref(x, a, np.float32(1.0))
    assert np.array_equal(u2.view(np.uint32), unscaled.view(np.uint32))
    assert np.array_equal(y.view(np.uint32), lora_expand_f32_ref(want, bt, y0).view(np.uint32))


@pytest.mark.parametrize("n", [1, 3, 4, 9, 16])
@pytest.mark.parametrize("out_f,r", [(70, 3), (48, 16), (37, 19), (8, 1)])
def test_fused_epilogue_is_base_plus_the_canonical_expand_then_bias(n, out_f, r, kernel_path):
    """The float32 fused products' epilogue (up to FUSED_MAX_ROWS rows: the expand of whole
    vectors of outputs in registers on the SIMD path, element by element elsewhere):
    y = (base + sum over t of c[t] B[o, t], rank terms from zero) + bias, bit for bit,
    with base the same product without a LoRA branch and c the canonical shrink."""
    rng = np.random.default_rng(n * 97 + out_f * 7 + r)
    t = nl.quantize_nf4(rng.standard_normal((out_f, 128)).astype(np.float32), 64)
    x = rng.standard_normal((n, 128)).astype(np.float32)
    a = rng.standard_normal((r, 128)).astype(np.float32)
    b = rng.standard_normal((out_f, r)).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    base = nl.nf4_matmul(x, t)
    c = lora_shrink_f32_ref(x, a, np.float32(0.7))
    with_lora = lora_expand_f32_ref(c, np.ascontiguousarray(b.T), base)
    assert np.array_equal(nl.qlora_forward(x, t, a, b, 0.7).view(np.uint32), with_lora.view(np.uint32))
    got = nl.qlora_forward(x, t, a, b, 0.7, bias)
    assert np.array_equal(got.view(np.uint32), (with_lora + bias).view(np.uint32))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("r,out_f", [(1, 16), (3, 37), (16, 64), (19, 100), (16, 7)])
def test_lora_expand_simd_and_portable_give_the_canonical_bits(n, r, out_f, kernel_path):
    """The small-batch LoRA expand of the 16-bit compute dtypes (``compute.lora_expand_add``:
    the element loop on B^T, or on a SIMD machine the sums of groups of four rows in
    registers on ``b_blocks``):
    rank terms in order from zero, then added, bit for bit, with whole vectors of outputs,
    a tail, groups of 1-4 rows, infinities, NaN and signed zeros."""
    from numlora.kernels import compute as kc

    rng = np.random.default_rng(n * 1000 + r * 10 + out_f)
    c = rng.standard_normal((n, r)).astype(np.float32)
    bt = rng.standard_normal((r, out_f)).astype(np.float32)
    y0 = rng.standard_normal((n, out_f)).astype(np.float32)
    c[0, 0] = 3e38
    bt[0, :2] = [4.0, -0.0]  # 1.2e39 overflows to inf; -0.0 times 3e38
    if r > 1:
        bt[1, -1] = np.nan
    y0[-1, 0] = -0.0
    y = y0.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        kc.lora_expand_add(c, np.ascontiguousarray(bt.T), y)
    assert np.array_equal(y.view(np.uint32), lora_expand_f32_ref(c, bt, y0).view(np.uint32))


@pytest.mark.parametrize("n,chunks", [(1, 1), (3, 2), (16, 5)])
def test_words_reorder_is_numpys_reordering(rng, n, chunks):
    """The word decode's input operand: each chunk of 8 * lanes columns as 8 vectors,
    vector m holding columns 8 l + m (kernels.nf4.words_reorder against numpy's
    reshape-transpose of the same layout)."""
    from numlora import _nf4_products as products
    from numlora.kernels import nf4 as k

    if not k.SIMD_LANES:
        pytest.skip("no SIMD decode here (NUMLORA_SIMD=0, the JIT off, or no AVX2)")
    lanes = k.SIMD_LANES
    x = rng.standard_normal((n, chunks * 8 * lanes)).astype(np.float32)
    ref = x.reshape(n, chunks, lanes, 8).transpose(0, 1, 3, 2).reshape(n, -1)
    got = products.words_layout(x)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, ref)
    assert np.array_equal(products.words_layout(x[:, ::1].T.copy().T), ref)  # a Fortran-ordered input
