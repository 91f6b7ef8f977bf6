"""The 16-bit compute dtypes of the NF4 / FP4 products (``compute_dtype``): the rounding
against numpy's float16 and ml_dtypes' bfloat16 casts, the products against a float64
reference of the rounded operands and against bitsandbytes' dequantize + torch's 16-bit
linear, the QLoRA layer's option."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import numlora as nl
from numlora.errors import ConfigError
from numlora.layers import QLoraLinear

from conftest import JIT_DISABLED
from reference import bf16_layout

ml_dtypes = pytest.importorskip("ml_dtypes")

CASTS = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
#: Mantissa bits and the smallest gap (the subnormal spacing) of each compute dtype.
MANT = {"bfloat16": (7, 2.0 ** -133), "float16": (10, 2.0 ** -24)}


def ulp(v, dtype):
    """The gap between neighbours of the compute dtype at |v| (float64 array)."""
    bits, tiny = MANT[dtype]
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.abs(v)))
    return np.maximum(np.where(np.isfinite(e), 2.0 ** (e - bits), 0.0), tiny)


def rnd(a, dtype):
    """The independent rounding: numpy's / ml_dtypes' casts (round to nearest even)."""
    with np.errstate(all="ignore"):
        return np.asarray(a, np.float32).astype(CASTS[dtype]).astype(np.float32)


def check_rounded(got, want, dtype, min_equal=0.99):
    """Every element within one unit of the compute dtype of the float64 reference
    (rounded), and nearly all of them bit-equal: they differ only where float32
    accumulation and float64 land on two sides of a rounding boundary."""
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, rnd(got, dtype)), "the result holds values of the compute dtype"
    got64 = got.astype(np.float64)
    gap = ulp(np.maximum(np.abs(got64), np.abs(want)), dtype)
    assert (np.abs(got64 - want) <= gap).all(), (np.abs(got64 - want) / gap).max()
    assert (got == want).mean() >= min_equal, (got == want).mean()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rounding_is_the_casts_round_to_nearest_even(dtype):
    from numlora.kernels import compute as kc

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, 400_000, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0x477FEFFF, 0x477FF000, 0x477FE000,
                      0x38800000, 0x387FFFFF, 0x33000000, 0x33000001, 0x32FFFFFF, 0x7F7FFFFF, 1, 0x007FFFFF,
                      0x3F808000, 0x3F818000, 0x3F800FFF, 0x3F801000, 0x3F803000], np.uint32)
    vals = np.concatenate([bits.view(np.float32), edges.view(np.float32), -edges.view(np.float32),
                           (rng.standard_normal(100_000) * 1e-5).astype(np.float32),
                           (rng.standard_normal(100_000) * 6e4).astype(np.float32)])
    got = vals.copy()
    kc.round_values(got, kc.BF16 if dtype == "bfloat16" else kc.F16)
    want = rnd(vals, dtype)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def _operands(rng, out_f, in_f, n, quant_type="nf4", bs=64):
    w = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    t = nl.quantize_nf4(w, bs, quant_type=quant_type)
    x = rng.standard_normal((n, in_f)).astype(np.float32)
    return t, x, rng.standard_normal(out_f).astype(np.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(70, 256, 64), (33, 100, 64), (20, 96, 32), (9, 50, 7)])
@pytest.mark.parametrize("n", [1, 5, 16, 17, 40])
def test_products_are_the_rounded_operands_product(dtype, quant_type, shape, n):
    out_f, in_f, bs = shape
    rng = np.random.default_rng(out_f + n)
    t, x, b = _operands(rng, out_f, in_f, n, quant_type, bs)
    wr = rnd(nl.dequantize_nf4(t), dtype).astype(np.float64)
    xr = rnd(x, dtype).astype(np.float64)
    y = nl.nf4_matmul(x, t, bias=b, compute_dtype=dtype)
    check_rounded(y, rnd(xr @ wr.T + rnd(b, dtype), dtype), dtype)
    y0 = nl.nf4_matmul(x, t, compute_dtype=dtype)
    check_rounded(y0, rnd(xr @ wr.T, dtype), dtype)
    g = rng.standard_normal((n, out_f)).astype(np.float32)
    dx = nl.nf4_matmul_t(g, t, compute_dtype=dtype)
    check_rounded(dx, rnd(rnd(g, dtype).astype(np.float64) @ wr, dtype), dtype)
    # the adapter is added in float32 to the rounded base product, on the unrounded input
    a = rng.standard_normal((4, in_f)).astype(np.float32)
    lb = rng.standard_normal((out_f, 4)).astype(np.float32)
    yq = nl.qlora_forward(x, t, a, lb, 0.5, b, compute_dtype=dtype)
    lora = 0.5 * (x.astype(np.float64) @ a.T.astype(np.float64)) @ lb.T.astype(np.float64)
    np.testing.assert_allclose(yq, y.astype(np.float64) + lora, rtol=1e-5, atol=1e-5 * np.abs(lora).max())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_small_batches_give_each_row_the_same_bits(dtype):
    rng = np.random.default_rng(5)
    t, x, b = _operands(rng, 77, 192, 16)
    full = nl.nf4_matmul(x, t, bias=b, compute_dtype=dtype)
    for n in (1, 2, 7):
        assert np.array_equal(nl.nf4_matmul(x[:n], t, bias=b, compute_dtype=dtype), full[:n])
    assert np.array_equal(nl.nf4_matmul(x[3], t, bias=b, compute_dtype=dtype), full[3])


@pytest.mark.skipif(JIT_DISABLED, reason="the SIMD decode exists only compiled")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_simd_and_portable_decodes_give_the_same_bits(dtype, monkeypatch):
    from numlora.kernels import nf4 as k

    if not k.SIMD_LANES:
        pytest.skip("this CPU (or NUMLORA_SIMD=0) has no SIMD decode")
    from numlora.kernels import compute as kc

    rng = np.random.default_rng(6)
    t, x, b = _operands(rng, 40, 256, 3)
    monkeypatch.setattr(kc, "BF16_DOT", False)  # the dot-product instruction sums in its own order
    simd = nl.nf4_matmul(x, t, bias=b, compute_dtype=dtype)
    monkeypatch.setattr(k, "SIMD_LANES", 0)
    assert np.array_equal(nl.nf4_matmul(x, t, bias=b, compute_dtype=dtype), simd)


@pytest.mark.skipif(JIT_DISABLED, reason="the SIMD decode exists only compiled")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("offset", [0, 1])
def test_rounded_tile_decode_is_the_cast_aligned_or_not(dtype, offset):
    # the large-batch tiles: streaming stores into an aligned tile, ordinary ones otherwise
    from numlora.kernels import _simd
    from numlora.kernels import compute as kc

    if not _simd.LANES:
        pytest.skip("this CPU (or NUMLORA_SIMD=0) has no SIMD decode")
    rng = np.random.default_rng(11)
    t = nl.quantize_nf4((rng.standard_normal((64, 256)) * 0.1).astype(np.float32), 64)
    ref = nl.dequantize_nf4(t)[16:48].astype(CASTS[dtype]).astype(np.float32)
    n = 32 * 256
    buf = np.full(n + 64, np.nan, np.float32)
    base = (-buf.ctypes.data % _simd.STREAM_ALIGN) // 4 + offset
    mode = 1 if dtype == "bfloat16" else 2
    kc.nf4_decode_rounded_tile(t.packed, t.scales, 64, t.code, mode, 16 * 256 // 64, 48 * 256 // 64,
                               buf[base:base + n])
    assert np.array_equal(buf[base:base + n].reshape(32, 256), ref)
    assert np.isnan(buf[:base]).all() and np.isnan(buf[base + n:]).all()


@pytest.mark.skipif(JIT_DISABLED, reason="the SIMD decode exists only compiled")
@pytest.mark.parametrize("mode", [1, 2])
def test_fused_rounded_product_is_the_decoded_one_bit_for_bit(mode):
    """nf4_matmul_rounded_fused (a rounded table per block, products in registers) against
    decoding, rounding and dot16 (nf4_matmul_rounded_simd) and the portable kernel: every
    weight-row / input-row grouping of the kernel (2 x 4, 1 x 4, 4 x 1, 1 x 1)."""
    from numlora import _nf4_products as products
    from numlora.kernels import compute as kc
    from numlora.kernels import nf4 as k

    if not k.SIMD_LANES:
        pytest.skip("this CPU (or NUMLORA_SIMD=0) has no SIMD decode")
    rng = np.random.default_rng(12 + mode)
    cases = ((13, 256, 64, "nf4"), (23, 384, 128, "fp4"), (9, 96, 16, "nf4"), (17, 96, 32, "nf4"))
    for out_f, in_f, bs, quant in cases:
        t, x, _ = _operands(rng, out_f, in_f, 11, quant, bs)
        for n in (1, 3, 4, 6, 11):
            xr = products._rounded(x[:n], mode, kc)
            got, simd, portable = (np.empty((n, out_f), np.float32) for _ in range(3))
            kc.nf4_matmul_rounded_fused(t.packed, t.scales, bs, t.code, mode, xr, got)
            kc.nf4_matmul_rounded_simd(t.packed, t.scales, bs, t.code, mode, xr, simd)
            kc.nf4_matmul_rounded(t.packed, t.scales, bs, t.code, mode, xr, portable)
            assert np.array_equal(got, simd) and np.array_equal(got, portable), (out_f, in_f, bs, n)


@pytest.mark.skipif(JIT_DISABLED, reason="the bf16 dot-product kernel exists only compiled")
def test_bf16_dot_instruction_path(monkeypatch):
    from numlora.kernels import compute as kc

    if not kc.BF16_DOT:
        pytest.skip("this CPU has no AVX512-BF16 dot-product instruction (or the AVX-512 build is off)")
    rng = np.random.default_rng(11)
    for out_f, in_f, bs in ((70, 256, 64), (37, 384, 128), (20, 512, 256)):
        t, x, b = _operands(rng, out_f, in_f, 21, bs=bs)
        got = nl.nf4_matmul(x, t, bias=b, compute_dtype="bfloat16")
        for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 19):  # every row the same bits whatever the batch
            assert np.array_equal(nl.nf4_matmul(x[:n], t, bias=b, compute_dtype="bfloat16"), got[:n])
        # a batch's last, partial group of BF16_BX rows: through the decoded rows with zero
        # rows of padding (bf16_input), or without them through the fused kernel: same bits
        m = kc.BF16_DECODED_FROM + 2  # decoded, and not a whole number of groups
        assert m % kc.BF16_BX and m <= x.shape[0]
        xq = x[:m]
        want = np.empty((m, out_f), np.float32)
        padded = kc.bf16_input(m, in_f)
        assert padded.shape[0] % kc.BF16_BX == 0 and not padded[m:].any()
        kc.bf16_bits(xq, padded)
        kc.bf16_product(t.packed, t.scales, t.blocksize, t.code, padded, want)
        plain = np.empty((m, in_f), np.uint16)
        kc.bf16_bits(xq, plain)
        other = np.empty_like(want)
        kc.bf16_product(t.packed, t.scales, t.blocksize, t.code, plain, other)
        assert np.array_equal(want, other)
        # from kc.BF16_DECODED_FROM rows each weight row is decoded once into a buffer of
        # kc.BF16_DECODED_BYTES per task: tasks of 6 and 12 rows, some cut short
        for rows in (6, 12):
            monkeypatch.setattr(kc, "BF16_DECODED_BYTES", 2 * in_f * rows)
            assert np.array_equal(nl.nf4_matmul(x, t, bias=b, compute_dtype="bfloat16"), got)
        monkeypatch.undo()
        wr = rnd(nl.dequantize_nf4(t), "bfloat16").astype(np.float64)
        check_rounded(got, rnd(rnd(x, "bfloat16").astype(np.float64) @ wr.T + rnd(b, "bfloat16"), "bfloat16"),
                      "bfloat16")
        monkeypatch.setattr(kc, "BF16_DOT", False)
        check_rounded(got, nl.nf4_matmul(x, t, bias=b, compute_dtype="bfloat16").astype(np.float64), "bfloat16")
        monkeypatch.setattr(kc, "BF16_DOT", True)


def test_float32_and_none_are_the_float32_kernels_and_aliases_name_the_same_dtype():
    rng = np.random.default_rng(7)
    t, x, b = _operands(rng, 30, 128, 3)
    base = nl.nf4_matmul(x, t, bias=b)
    for name in ("float32", np.float32, np.dtype("float32")):
        assert np.array_equal(nl.nf4_matmul(x, t, bias=b, compute_dtype=name), base)
    bf = nl.nf4_matmul(x, t, compute_dtype="bfloat16")
    for alias in (ml_dtypes.bfloat16, np.dtype(ml_dtypes.bfloat16), "torch.bfloat16"):
        assert np.array_equal(nl.nf4_matmul(x, t, compute_dtype=alias), bf)
    assert np.array_equal(nl.nf4_matmul(x, t, compute_dtype=np.float16), nl.nf4_matmul(x, t, compute_dtype="float16"))
    for bad in ("int8", "fp8", np.float64, 3):
        with pytest.raises(ConfigError, match="compute_dtype"):
            nl.nf4_matmul(x, t, compute_dtype=bad)


def test_16bit_inputs_and_overlapping_out():
    rng = np.random.default_rng(8)
    t, x, b = _operands(rng, 64, 64, 4)
    want = nl.nf4_matmul(x, t, bias=b, compute_dtype="bfloat16")
    xb = x.astype(ml_dtypes.bfloat16)  # rounding a bf16 input again changes nothing
    assert np.array_equal(nl.nf4_matmul(xb, t, bias=b, compute_dtype="bfloat16"),
                          nl.nf4_matmul(xb.astype(np.float32), t, bias=b, compute_dtype="bfloat16"))
    buf = x.copy()
    got = nl.nf4_matmul(buf, t, bias=b, out=buf, compute_dtype="bfloat16")
    assert got is buf and np.array_equal(buf, want)


def test_layer_compute_dtype_forward_backward_pickle():
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((48, 128)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(48).astype(np.float32)
    layer = QLoraLinear.from_weight(w, 4, 8.0, compute_dtype="bfloat16", bias=bias)
    layer.lora_b = rng.standard_normal((48, 4)).astype(np.float32)
    assert layer.compute_dtype == "bfloat16" and "compute_dtype='bfloat16'" in repr(layer)
    x = rng.standard_normal((6, 128)).astype(np.float32)
    u = np.empty((6, 4), np.float32)  # the forward's x A^T, which the layer's backward reuses
    want = nl.qlora_forward(x, layer.nf4, layer.lora_a, layer.lora_b, layer.scaling, layer.bias,
                            compute_dtype="bfloat16", u_out=u)
    assert np.array_equal(layer(x), want)
    layer.train()
    y = layer.forward(x)
    assert np.array_equal(y, want)
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(g)
    dx_want, ga, gb = nl.qlora_backward(x, layer.nf4, layer.lora_a, layer.lora_b, layer.scaling, g,
                                        compute_dtype="bfloat16", u=u)
    assert np.array_equal(dx, dx_want)
    assert np.array_equal(layer.grad_a, ga) and np.array_equal(layer.grad_b, gb)
    layer.eval()
    back = pickle.loads(pickle.dumps(layer, protocol=5))
    assert back.compute_dtype == "bfloat16" and np.array_equal(back(x), want)
    plain = QLoraLinear(layer.nf4, layer.lora_a, layer.lora_b, 8.0, bias=layer.bias)
    assert plain.compute_dtype == "float32" and not np.array_equal(plain(x), want)
    with pytest.raises(ConfigError, match="compute_dtype"):
        QLoraLinear.from_weight(w, 4, 8.0, compute_dtype="float64")


def test_against_bitsandbytes_dequantize_and_torch_16bit_linear():
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    rng = np.random.default_rng(10)
    w = (rng.standard_normal((256, 512)) * 0.02).astype(np.float32)
    b = rng.standard_normal(256).astype(np.float32)
    for quant_type in ("nf4", "fp4"):
        q, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type=quant_type)
        t = nl.quantize_nf4(w, 64, quant_type=quant_type)
        for dtype, tdt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            wb = F.dequantize_4bit(q, state).to(tdt)
            for n in (1, 8, 40):
                x = rng.standard_normal((n, 512)).astype(np.float32)
                want = torch.nn.functional.linear(torch.from_numpy(x).to(tdt), wb,
                                                  torch.from_numpy(b).to(tdt)).float().numpy()
                got = nl.nf4_matmul(x, t, bias=b, compute_dtype=tdt)
                check_rounded(got, want.astype(np.float64), dtype, min_equal=0.99)


@pytest.mark.skipif(JIT_DISABLED, reason="the bf16 dot-product kernel exists only compiled")
def test_bf16_gemv_table_keeps_the_bits_of_tiny_scales():
    """The GEMV builds its bf16 table with one conversion instruction that reads float32
    subnormals as zero; a block whose products are subnormal (absmax just below 2^-126:
    code 1.0 rounds up to the smallest normal bf16) must keep the rounding on bits, so
    every batch size gives the bits of the decoded rows of large batches and a nonzero
    output. The fused products test the scales once per call and take a loop without
    that instruction for the call's weight rows (four for groups of 1, 2 and 4 input
    rows: rows 0, 1, 3 share row 2's call, rows 4 and 5 are a task's tail, one at a time;
    two for groups of 8: rows 2 / 3 and 4 / 5), the decoded rows once per row."""
    from numlora.kernels import compute as kc

    if not kc.BF16_DOT:
        pytest.skip("this CPU has no AVX512-BF16 dot-product instruction (or the AVX-512 build is off)")
    rng = np.random.default_rng(12)
    w = rng.standard_normal((6, 256)).astype(np.float32)
    tiny = np.float32(0.999 * 2.0 ** -126)  # a float32 subnormal
    w[2] = 0
    w[2, :64] = np.linspace(0, tiny, 64, dtype=np.float32)  # one block, absmax = tiny
    w[4] = 0
    w[4, 128:192] = tiny
    t = nl.quantize_nf4(w, 64)
    x = rng.standard_normal((kc.BF16_DECODED_FROM, 256)).astype(np.float32)
    x[:, :64] = 1e30
    x[:, 128:192] = 1e30
    full = nl.nf4_matmul(x, t, compute_dtype="bfloat16")  # the decoded rows
    for n in range(1, 9):  # the fused kernel's group of every size, 1-8 input rows
        assert np.array_equal(nl.nf4_matmul(x[:n], t, compute_dtype="bfloat16"), full[:n])
    one = full[:1]
    wr = rnd(nl.dequantize_nf4(t), "bfloat16").astype(np.float64)
    assert wr[4, 128] == 2.0 ** -126  # rounded up to the smallest normal bf16
    # rows 2 and 4 are their tiny blocks alone: 64 * 1e30 * 2^-126 = 7.5e-7 for row 4
    assert one[0, 4] == np.float32(64 * np.float64(rnd(x[:1, 128], "bfloat16")[0]) * 2.0 ** -126)
    assert one[0, 2] > 0  # its largest values round up to 2^-126 too


@pytest.mark.skipif(JIT_DISABLED, reason="the bf16 dot-product kernel exists only compiled")
def test_bf16_table_keeps_nan_scales_beside_tiny_ones():
    """A NaN scale (a corrupt file, say) gives NaN outputs through both ways of building
    the bf16 table: the conversion instruction (rows without tiny scales) and the rounding
    on bits (rows with one), which must make a NaN quiet as the instruction does instead
    of rounding its bits (all-ones payloads carried into the sign or to zero). Rows 0-3
    form one call of the fused products without tiny scales (with groups of 8 input rows:
    rows 0 / 1 and 2 / 3), rows 4-7 one with row 5's tiny block (4 / 5 with groups of 8),
    whose chunk partner block holds a NaN; the decoded rows of large batches decode every
    row on its own."""
    from numlora.kernels import compute as kc

    if not kc.BF16_DOT:
        pytest.skip("this CPU has no AVX512-BF16 dot-product instruction (or the AVX-512 build is off)")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 256)).astype(np.float32)
    w[5] = 0
    w[5, :64] = np.float32(0.999 * 2.0 ** -126)
    t = nl.quantize_nf4(w, 64)
    bits = t.absmax.reshape(8, 4).view(np.uint32)
    for row, block, nan in ((1, 0, 0xFFFFFFFF), (2, 2, 0x7FFFFFFF), (5, 1, 0xFFFFFFFF), (6, 3, 0x7FFFFFFF)):
        bits[row, block] = nan
    x = rng.standard_normal((max(8, kc.BF16_DECODED_FROM), 256)).astype(np.float32)
    full = nl.nf4_matmul(x, t, compute_dtype="bfloat16")  # the decoded rows
    assert np.array_equal(np.isnan(full), np.broadcast_to([False, True, True, False, False, True, True, False],
                                                          full.shape))
    for n in range(1, 9):  # the fused kernel's group of every size
        assert np.array_equal(nl.nf4_matmul(x[:n], t, compute_dtype="bfloat16"), full[:n], equal_nan=True)


@pytest.mark.skipif(JIT_DISABLED, reason="the bf16 dot-product kernel exists only compiled")
def test_bf16_bits_is_the_rounding_in_the_dot_products_layout(kernel_path):
    from numlora.kernels import compute as kc

    rng = np.random.default_rng(13)
    for n in (1, 3, 10):
        x = (rng.standard_normal((n, 384)) * 1e3).astype(np.float32)
        flat = x.reshape(-1)
        flat[:60].view(np.uint32)[:] = rng.integers(0, 2 ** 32, 60, dtype=np.uint64).astype(np.uint32)
        flat[60:65] = [np.nan, -np.nan, np.inf, -np.inf, np.float32(3.3895314e38)]  # the last rounds to inf
        flat[65:67] = [np.float32(2.0 ** -130), np.float32(-(2.0 ** -149))]
        flat[67:70].view(np.uint32)[:] = [0x7F800001, 0xFF812345, 0x7FBFFFFF]  # signalling NaNs: made quiet
        xr = x.copy()
        kc.round_values(xr.reshape(-1), kc.BF16)
        got = np.full((n + 2, 384), 0xABCD, np.uint16)  # two rows past x's: left as they were
        kc.bf16_bits(x, got)
        assert np.array_equal(got[:n], bf16_layout(xr))
        assert (got[n:] == 0xABCD).all()


def _bf16_call(t, x, b, a, lb):
    if a is None:
        return nl.nf4_matmul(x, t, bias=b, compute_dtype="bfloat16")
    return nl.qlora_forward(x, t, a, lb, 0.5, b, compute_dtype="bfloat16")


@pytest.mark.skipif(JIT_DISABLED, reason="the bf16 dot-product kernel exists only compiled")
def test_bf16_products_from_several_threads_at_once():
    """The bf16 paths keep their scratch per calling thread (the input's bits, the decoded
    rows, B^T in blocks for the LoRA expand): threads running them at once (different
    shapes, so different scratch sizes; small batches and large, with and without a LoRA
    branch) each get their own bits."""
    import threading

    rng = np.random.default_rng(14)
    jobs = []
    for out_f, in_f, n, r in ((96, 256, 16, 0), (40, 512, 24, 0), (130, 384, 9, 0), (96, 256, 3, 4),
                              (130, 384, 20, 16), (48, 512, 8, 7)):
        t, x, b = _operands(rng, out_f, in_f, n)
        a = rng.standard_normal((r, in_f)).astype(np.float32) if r else None
        lb = rng.standard_normal((out_f, r)).astype(np.float32) if r else None
        jobs.append((t, x, b, a, lb, _bf16_call(t, x, b, a, lb)))
    errors = []

    def work(t, x, b, a, lb, want):
        for _ in range(30):
            if not np.array_equal(_bf16_call(t, x, b, a, lb), want):
                errors.append(t.shape)
                return

    threads = [threading.Thread(target=work, args=job) for job in jobs for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []


@pytest.mark.skipif(JIT_DISABLED, reason="the SIMD kernels exist only compiled")
@pytest.mark.parametrize("shape", [(4096, 16), (40, 4), (37, 29), (16, 8), (48, 24), (17, 17), (3, 5), (0, 7)])
def test_b_blocks_is_b_transposed_in_blocks_of_a_vector(shape):
    """``compute.b_blocks`` (the bf16 products' B^T for the expand in registers, 8 x 8
    pieces transposed in registers): blk[q, t, l] = B[q L + l, t], every bit, whole pieces
    and the ranks past them; NaN payloads and signed zeros kept; outputs past the last
    whole vector are not its business."""
    from numlora.kernels import _simd
    from numlora.kernels import compute as kc

    if not _simd.LANES:
        pytest.skip("this CPU (or NUMLORA_SIMD=0) has no SIMD build")
    lanes = _simd.LANES
    out_f, r = shape
    rng = np.random.default_rng(out_f * 131 + r)
    bits = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
    bits.reshape(-1)[::7] = 0x7FC01234  # a quiet NaN with a payload
    bits.reshape(-1)[3::11] = 0x80000000  # -0.0
    b = bits.view(np.float32)
    q = out_f // lanes
    blk = np.full(q * r * lanes + 5, np.float32(7.0))
    kc.b_blocks(b, blk)
    want = bits[:q * lanes].reshape(q, lanes, r).transpose(0, 2, 1)
    assert np.array_equal(blk[:q * r * lanes].view(np.uint32).reshape(q, r, lanes), want)
    assert (blk[q * r * lanes:] == 7.0).all()


@pytest.mark.parametrize("n", [6, 20])
def test_bf16_lora_branch_u_out_and_zero_scaling(n):
    """The bf16 products' LoRA branch (numba, serial up to 16 rows, parallel rows above):
    u_out receives x A^T unscaled, the output is the base plus (s u) B^T, and scaling 0
    adds nothing even where x A^T overflows."""
    rng = np.random.default_rng(15 + n)
    t, x, b = _operands(rng, 40, 256, n)
    a = rng.standard_normal((4, 256)).astype(np.float32)
    lb = rng.standard_normal((40, 4)).astype(np.float32)
    base = nl.nf4_matmul(x, t, bias=b, compute_dtype="bfloat16")
    u = np.empty((n, 4), np.float32)
    y = nl.qlora_forward(x, t, a, lb, 0.5, b, compute_dtype="bfloat16", u_out=u)
    u64 = x.astype(np.float64) @ a.T.astype(np.float64)
    np.testing.assert_allclose(u, u64, rtol=1e-5, atol=1e-5 * np.abs(u64).max())
    np.testing.assert_allclose(y, base + 0.5 * u64 @ lb.T.astype(np.float64), rtol=1e-5,
                               atol=1e-5 * np.abs(base).max())
    assert np.array_equal(nl.qlora_forward(x, t, a, lb, 0.5, b, compute_dtype="bfloat16"), y)
    big = x.copy()
    big[:, :] = 3e38
    a_big = np.abs(a)
    with np.errstate(over="ignore"):
        y0 = nl.qlora_forward(big, t, a_big, lb, 0.0, b, compute_dtype="bfloat16")
    assert np.array_equal(y0, nl.nf4_matmul(big, t, bias=b, compute_dtype="bfloat16"), equal_nan=True)


@pytest.mark.parametrize("out_f", [40, 64])
def test_bf16_forward_is_the_product_then_the_documented_lora_steps(out_f):
    """qlora_forward in bf16: the product with its rounded bias, then the float32 LoRA
    branch of ``_backward.add_low_rank`` added to the rounded output, bit for bit, whether
    the branch runs after the whole product or (small batches) in the product's tasks;
    outputs short of a whole vector included (40 = 2 x 16 + 8)."""
    from numlora import _backward as bw

    rng = np.random.default_rng(23)
    t, x, b = _operands(rng, out_f, 256, 12)
    for r in (1, 4, 16, 19):
        a = rng.standard_normal((r, 256)).astype(np.float32)
        lb = rng.standard_normal((out_f, r)).astype(np.float32)
        for bias in (b, None):
            # the product of all 12 rows: through the decoded kernel, then bias and rounding
            # after it (rows are the same bits whatever the batch: tested above)
            base = nl.nf4_matmul(x, t, bias=bias, compute_dtype="bfloat16")
            for n in (1, 2, 3, 5, 8, 9, 12):
                want = base[:n].copy()
                bw.add_low_rank(x[:n], a, lb, 0.75, want)
                u = np.empty((n, r), np.float32)
                got = nl.qlora_forward(x[:n], t, a, lb, 0.75, bias, compute_dtype="bfloat16", u_out=u)
                assert np.array_equal(got, want), (r, n, bias is None)
                want_u = np.empty((n, r), np.float32)
                bw.shrink(x[:n], a, 0.75, want_u)  # u_out: x A^T unscaled
                assert np.array_equal(u, want_u)
