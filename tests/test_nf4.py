import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numlora as nl

from reference import (
    MID_REF,
    NF4_REF,
    code8_nearest_ref,
    nf4_dequantize_ref,
    nf4_quantize_ref,
)


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


# --- tables -------------------------------------------------------------------------

def test_codebook_is_the_reference_table_bit_for_bit():
    assert np.array_equal(_bits(nl.NF4_CODE), _bits(NF4_REF))
    # the seed's one-ulp-off value for index 6 is not used
    assert _bits(nl.NF4_CODE)[6] == 0xBDBA7871


def test_midpoints_are_the_documented_float32_values():
    assert np.array_equal(_bits(nl.NF4_MIDPOINTS), _bits(MID_REF))


def test_code8_table():
    c = nl.CODE8
    assert c.shape == (256,) and c.dtype == np.float32
    assert np.all(np.diff(c) > 0)
    assert c[0] == np.float32(-0.99296874) and c[-1] == 1.0 and 0.0 in c
    # create_dynamic_map(signed=True): 2**i midpoints of linspace(0.1, 1, 2**i + 1) times
    # 10**(i - 6), both signs, for i in 0..6, plus 0 and 1. Regenerate in float64: every
    # entry is within a float32 rounding of it.
    vals = [0.0, 1.0]
    for i in range(7):
        b = np.linspace(0.1, 1, 2**i + 1)
        means = (b[:-1] + b[1:]) / 2 * 10.0 ** (i - 6)
        vals += list(means) + list(-means)
    regen = np.sort(np.array(vals))
    assert np.allclose(c, regen, rtol=2e-7, atol=0)


# --- hand-worked vectors -----------------------------------------------------------------

def test_values_exactly_on_midpoints_take_the_lower_code():
    # absmax 1.0 -> inv 1.0 -> y == x exactly
    x = np.concatenate([[1.0], MID_REF, np.zeros(16)]).astype(np.float32)  # 32 values
    t = nl.quantize_nf4(x, blocksize=32)
    codes = np.stack([t.packed >> 4, t.packed & 15], axis=1).reshape(-1)
    assert codes[0] == 15
    assert list(codes[1:16]) == list(range(15))  # midpoint k -> code k (lower)
    assert np.all(codes[16:] == 7)
    # one ulp above each midpoint moves up
    up = np.nextafter(MID_REF, np.float32(2)).astype(np.float32)
    x2 = np.concatenate([[1.0], up, np.zeros(16)]).astype(np.float32)
    codes2 = np.stack([nl.quantize_nf4(x2, 32).packed >> 4, nl.quantize_nf4(x2, 32).packed & 15], axis=1).reshape(-1)
    assert list(codes2[1:16]) == list(range(1, 16))


def test_hand_worked_bytes():
    # block of 4: absmax 2 -> y = [1, -1, 0, 0.5 * 0.5626170039176941 ...]
    x = np.array([2.0, -2.0, 0.0, 1.0], np.float32)  # y = 1, -1, 0, 0.5
    t = nl.quantize_nf4(x, blocksize=4)
    # 0.5 lies between midpoints 0.3893 (k=11) and 0.5017 (k=12): 12 midpoints below -> code 12
    assert t.packed.tolist() == [0xF0, 0x7C]
    assert t.absmax.tolist() == [2.0]


def test_all_zero_block_gives_code_7_and_absmax_0():
    t = nl.quantize_nf4(np.zeros(128, np.float32), blocksize=64)
    assert np.all(t.packed == 0x77)
    assert t.absmax.tolist() == [0.0, 0.0]
    assert np.all(t.dequantize() == 0)


def test_partial_tail_of_zeros_stores_clamped_absmax():
    t = nl.quantize_nf4(np.zeros(70, np.float32), blocksize=64)
    assert _bits(t.absmax).tolist() == [0, _bits(np.float32(1e-38)).item()]
    assert np.all(t.packed == 0x77)


def test_odd_count_pads_low_nibble_with_7():
    x = np.linspace(-1, 1, 91).astype(np.float32)
    t = nl.quantize_nf4(x, blocksize=64)
    assert t.packed.shape == (46,)
    assert t.packed[-1] & 15 == 7
    assert t.packed[-1] >> 4 == 15  # last element is 1.0 = its block's absmax


def _find_mult_vs_div_case():
    """A (value, absmax) pair where x * float32(1/a) and x / a land in different codes."""
    rng = np.random.default_rng(0)
    for _ in range(200000):
        a = np.float32(rng.uniform(0.5, 4))
        k = rng.integers(0, 15)
        x = np.float32(MID_REF[k] * a)
        for cand in (x, np.nextafter(x, np.float32(9)), np.nextafter(x, np.float32(-9))):
            cand = np.float32(cand)
            y_mul = np.float32(cand * np.float32(np.float32(1) / a))
            y_div = np.float32(cand / a)
            if (y_mul > MID_REF[k]) != (y_div > MID_REF[k]) and abs(cand) < a:
                return cand, a
    raise AssertionError("no case found")


def test_full_blocks_multiply_by_reciprocal_partial_block_divides():
    x, a = _find_mult_vs_div_case()
    blk = np.zeros(4, np.float32)
    blk[0], blk[1] = a, x
    full = nl.quantize_nf4(np.concatenate([blk, blk]), blocksize=4)  # two full blocks
    part = nl.quantize_nf4(np.concatenate([blk, blk[:2]]), blocksize=4)  # second is partial
    inv = np.float32(np.float32(1) / a)
    code_mul = int(np.sum(np.float32(x * inv) > MID_REF))
    code_div = int(np.sum(np.float32(x / a) > MID_REF))
    assert code_mul != code_div
    assert full.packed[0] & 15 == code_mul and full.packed[2] & 15 == code_mul
    assert part.packed[2] & 15 == code_div


def test_subnormal_block_does_not_overflow():
    x = np.array([1e-40, -1e-40, 5e-41, 0.0] * 8, np.float32)
    t = nl.quantize_nf4(x, blocksize=32)
    pk, am = nf4_quantize_ref(x, 32)
    assert np.array_equal(t.packed, pk) and np.array_equal(_bits(t.absmax), _bits(am))
    assert np.all(np.isfinite(t.dequantize()))


# --- against the element-by-element reference -------------------------------------------

@pytest.mark.parametrize("n,bs", [(64, 64), (1000, 64), (4096 + 37, 128), (91, 32), (333, 3), (50, 2),
                                  (257, 7), (5000, 4096), (100, 4096), (65, 64)])
def test_matches_reference(n, bs, rng):
    w = (rng.standard_normal(n) * rng.uniform(0.001, 10)).astype(np.float32)
    t = nl.quantize_nf4(w, blocksize=bs)
    pk, am = nf4_quantize_ref(w, bs)
    assert np.array_equal(t.packed, pk)
    assert np.array_equal(_bits(t.absmax), _bits(am))
    assert np.array_equal(_bits(t.dequantize().reshape(-1)), _bits(nf4_dequantize_ref(pk, am, bs, n)))


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), bs=st.sampled_from([2, 3, 5, 32, 64, 100, 128, 256]),
       scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]), seed=st.integers(0, 2**32 - 1))
def test_property_matches_reference(rows, cols, bs, scale, seed):
    r = np.random.default_rng(seed)
    w = (r.standard_normal((rows, cols)) * scale).astype(np.float32)
    if seed % 3 == 0:  # adversarial content: zeros, repeats, exact midpoints
        w.reshape(-1)[::5] = 0
        w.reshape(-1)[1::7] = MID_REF[seed % 15] * np.float32(scale)
    t = nl.quantize_nf4(w, blocksize=bs)
    pk, am = nf4_quantize_ref(w, bs)
    assert np.array_equal(t.packed, pk)
    assert np.array_equal(_bits(t.absmax), _bits(am))
    d = t.dequantize()
    assert d.shape == w.shape
    assert np.array_equal(_bits(d.reshape(-1)), _bits(nf4_dequantize_ref(pk, am, bs, w.size)))


def test_reconstruction_error_bounded(rng):
    w = rng.standard_normal((64, 200)).astype(np.float32)
    t = nl.quantize_nf4(w, blocksize=64)
    err = np.abs(t.dequantize() - w).reshape(-1)
    scale = np.repeat(t.absmax, 64)[: w.size]
    max_gap = np.max(np.diff(NF4_REF))
    assert np.all(err <= scale * max_gap / 2 * (1 + 1e-6))


def test_layouts_give_identical_results(rng):
    w = rng.standard_normal((33, 70)).astype(np.float32)
    ref = nl.quantize_nf4(w, 64)
    for variant in (np.asfortranarray(w), w[:, ::1].copy(), np.asfortranarray(w.T).T):
        t = nl.quantize_nf4(variant, 64)
        assert np.array_equal(t.packed, ref.packed) and np.array_equal(t.absmax, ref.absmax)
    strided = np.zeros((33, 140), np.float32)
    strided[:, ::2] = w
    t = nl.quantize_nf4(strided[:, ::2], 64)
    assert np.array_equal(t.packed, ref.packed)


def test_float64_input_is_rounded_to_float32_first(rng):
    w = rng.standard_normal(300)
    a = nl.quantize_nf4(w, 64)
    b = nl.quantize_nf4(w.astype(np.float32), 64)
    assert np.array_equal(a.packed, b.packed) and np.array_equal(a.absmax, b.absmax)


def test_dequantize_out_buffer(rng):
    w = rng.standard_normal((10, 30)).astype(np.float32)
    t = nl.quantize_nf4(w, 32)
    out = np.full((10, 30), np.nan, np.float32)
    assert nl.dequantize_nf4(t, out=out) is out
    assert np.array_equal(out, t.dequantize())
    with pytest.raises(nl.ShapeError, match=r"expected out of shape \(10, 30\), got \(30, 10\)"):
        nl.dequantize_nf4(t, out=np.empty((30, 10), np.float32))
    with pytest.raises(nl.DTypeError, match="float32"):
        nl.dequantize_nf4(t, out=np.empty((10, 30), np.float64))


# --- double quantization ------------------------------------------------------------------

def test_double_quant(rng):
    w = (rng.standard_normal((300, 257)) * 0.05).astype(np.float32)
    plain = nl.quantize_nf4(w, 64)
    t = nl.quantize_nf4(w, 64, double_quant=True)
    assert t.double_quant and t.absmax.dtype == np.uint8
    assert np.array_equal(t.packed, plain.packed)  # 4-bit codes do not change
    nb = plain.absmax.size
    assert t.absmax2.shape == (-(-nb // 256),)
    offset = np.float32(np.mean(plain.absmax, dtype=np.float64))
    assert t.offset == offset
    centered = (plain.absmax - offset).astype(np.float32)
    for g in range(t.absmax2.size):
        grp = centered[g * 256:(g + 1) * 256]
        assert t.absmax2[g] == np.max(np.abs(grp))
    # every 8-bit code is the exactly nearest entry (ties low)
    for i in range(0, nb, 7):
        vv = np.float32(centered[i] / t.absmax2[i // 256])
        assert t.absmax[i] == code8_nearest_ref(nl.CODE8, vv)
    dec = nl.CODE8[t.absmax] * np.repeat(t.absmax2, 256)[:nb] + offset
    assert np.array_equal(t.scales, dec.astype(np.float32))
    rel = np.abs(t.scales - plain.absmax) / plain.absmax
    assert rel.max() < 0.02
    assert t.nbytes < plain.nbytes
    d = t.dequantize()
    assert np.abs(d - w).max() <= np.abs(plain.dequantize() - w).max() * 1.1 + 1e-3


def test_double_quant_constant_absmax():
    w = np.tile(np.array([1.0, -0.5, 0.25, 0.0], np.float32), 64)  # every block absmax 1.0
    t = nl.quantize_nf4(w, 4, double_quant=True)
    assert np.all(t.absmax2 == 0)
    assert np.all(t.scales == 1.0)
    assert np.array_equal(t.dequantize(), nl.quantize_nf4(w, 4).dequantize())


def test_memory_accounting():
    t = nl.quantize_nf4(np.ones((4096, 64), np.float32), 64)
    assert t.nbytes == 4096 * 64 // 2 + 4096 * 4  # 4.5 bits / parameter
    t2 = nl.quantize_nf4(np.ones((4096, 64), np.float32), 64, double_quant=True)
    assert t2.nbytes == 4096 * 64 // 2 + 4096 + 16 * 4 + 4


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_names_first_bad_index(bad):
    w = np.ones((6, 50), np.float32)
    w[4, 17] = bad
    w[5, 3] = bad
    with pytest.raises(nl.NonFiniteError, match=r"index \(4, 17\)"):
        nl.quantize_nf4(w, 64)
    with pytest.raises(ValueError):
        nl.quantize_nf4(w, 3)


@pytest.mark.parametrize("bs", [0, 1, -64])
def test_blocksize_too_small(bs):
    with pytest.raises(nl.ConfigError, match="blocksize must be >= 2"):
        nl.quantize_nf4(np.ones(8, np.float32), blocksize=bs)


def test_bad_inputs():
    with pytest.raises(nl.ShapeError, match="non-empty"):
        nl.quantize_nf4(np.zeros((0, 4), np.float32))
    with pytest.raises(nl.DTypeError, match="int64"):
        nl.quantize_nf4(np.ones(8, np.int64))
    with pytest.raises(nl.DTypeError, match="complex64"):
        nl.quantize_nf4(np.ones(8, np.complex64))  # float16 / bfloat16 are accepted: tests/test_16bit.py
    with pytest.raises(nl.DTypeError):
        nl.quantize_nf4(np.ones(8, np.float32), blocksize=64.0)
    with pytest.raises(nl.ConfigError):
        nl.quantize_nf4(np.ones(8, np.float32), double_quant="yes")
    with pytest.raises(nl.DTypeError, match="NF4Tensor"):
        nl.dequantize_nf4(np.ones(8, np.uint8))


def test_tensor_consistency_checks():
    t = nl.quantize_nf4(np.ones(100, np.float32), 64)
    with pytest.raises(nl.ShapeError, match="packed"):
        nl.NF4Tensor(t.packed[:-1], t.absmax, t.shape, 64)
    with pytest.raises(nl.ShapeError, match="absmax"):
        nl.NF4Tensor(t.packed, t.absmax[:1], t.shape, 64)


@pytest.mark.parametrize("bs", [16, 64, 256])
def test_simd_and_portable_quantize_agree(rng, monkeypatch, bs):
    from numlora.kernels import nf4 as k

    w = (rng.standard_normal(bs * 37 + 21) * 0.1).astype(np.float32)
    w[:bs] = 0.0
    w[bs:2 * bs] = np.resize(MID_REF, bs)  # exact midpoints (block absmax 0.86...)
    w[bs] = 1.0  # now scaled values land exactly on midpoints
    fast = nl.quantize_nf4(w, bs)
    monkeypatch.setattr(k, "SIMD_LANES", 0)
    slow = nl.quantize_nf4(w, bs)
    pk, am = nf4_quantize_ref(w, bs)
    assert np.array_equal(fast.packed, pk) and np.array_equal(slow.packed, pk)
    assert np.array_equal(_bits(fast.absmax), _bits(am)) and np.array_equal(_bits(slow.absmax), _bits(am))


@pytest.mark.parametrize("bs", [nl.nf4.BLOCKSIZE_MAX + 1, 2**63 - 1, 2**63, 2**64, np.uint64(2**64 - 1)])
def test_blocksize_too_large(bs):
    # 2**63 and up used to reach the kernels (a numba TypingError, or garbage and a matmul
    # that never returned); every absurd blocksize is a ConfigError naming it
    with pytest.raises(nl.ConfigError, match=f"blocksize must be >= 2 and <= {nl.nf4.BLOCKSIZE_MAX}.*got {int(bs)}"):
        nl.quantize_nf4(np.ones(8, np.float32), blocksize=bs)
    t = nl.quantize_nf4(np.ones(8, np.float32), 8)
    with pytest.raises(nl.ConfigError, match="blocksize"):
        nl.NF4Tensor(t.packed, t.absmax, t.shape, bs)


def test_check_blocksize_helper():
    from numlora.nf4 import BLOCKSIZE_MAX, BLOCKSIZE_MIN, check_blocksize

    assert check_blocksize(64) == 64 and type(check_blocksize(np.int32(64))) is int
    assert check_blocksize(BLOCKSIZE_MIN) == 2 and check_blocksize(BLOCKSIZE_MAX) == 2**20
    with pytest.raises(nl.ConfigError, match="--blocksize must be >= 2"):
        check_blocksize(1, "--blocksize")
    for bad in (64.0, True, "64", None):
        with pytest.raises(nl.DTypeError, match="blocksize must be an integer"):
            check_blocksize(bad)


@pytest.mark.slow  # a million elements: minutes as interpreted Python
def test_blocksize_max_roundtrips():
    # the top of the range still quantizes and decodes like any other blocksize
    w = np.random.default_rng(0).standard_normal(2**20 + 6).astype(np.float32)
    t = nl.quantize_nf4(w, 2**20)
    assert t.absmax.shape == (2,)
    ref = nl.NF4_CODE[np.stack([t.packed >> 4, t.packed & 15], 1).reshape(-1)[: w.size]] \
        * np.repeat(t.absmax, 2**20)[: w.size]
    np.testing.assert_array_equal(nl.dequantize_nf4(t), ref)


@pytest.mark.parametrize("offset", [0, 1, 4])
def test_tile_decode_streams_into_an_aligned_tile_and_writes_the_same_values(rng, offset):
    # the large-batch products decode tiles of W that BLAS reads next: an aligned tile
    # gets streaming stores (then a store fence), any other one ordinary stores
    from numlora import dequantize_nf4
    from numlora.kernels import _simd
    from numlora.kernels import nf4 as k

    if not k.SIMD_LANES:
        pytest.skip("no SIMD decode here (NUMLORA_SIMD=0, the JIT off, or no AVX2)")
    t = nl.quantize_nf4((rng.standard_normal((96, 256)) * 0.1).astype(np.float32), 64)
    ref = dequantize_nf4(t)
    n = 32 * 256  # rows 32:64
    buf = np.full(n + 64, np.nan, np.float32)
    base = (-buf.ctypes.data % _simd.STREAM_ALIGN) // 4  # an aligned start in buf
    out = buf[base + offset:base + offset + n]
    k.nf4_decode_simd_tile(t.packed, t.scales, 64, t.code, 32 * 256 // 64, 64 * 256 // 64, out)
    assert np.array_equal(out.reshape(32, 256), ref[32:64])
    assert np.isnan(buf[:base + offset]).all() and np.isnan(buf[base + offset + n:]).all()
