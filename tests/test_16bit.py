"""16-bit weights: quantize_nf4 of float16 / bfloat16 arrays and of raw bf16 bit patterns is
the quantization of their exact float32 values (as bitsandbytes quantizes a 16-bit tensor),
for both code books, every blocksize kind and partial last blocks."""

from __future__ import annotations

import numpy as np
import pytest

import numlora as nl
from numlora.nf4 import quantize_bf16_bits


def _bf16_bits(x):
    """Round-toward-zero bf16 bit patterns of float32 x (any bf16 values will do here)."""
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _widen(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _same(a, b):
    return (np.array_equal(a.packed, b.packed) and np.array_equal(a.absmax.view(np.uint32), b.absmax.view(np.uint32))
            and a.shape == b.shape and a.quant_type == b.quant_type)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("bs", [2, 7, 32, 64, 4096])
@pytest.mark.parametrize("n", [1, 5, 64, 1001, 4096 * 3 + 91])
def test_bf16_bits_quantize_as_their_float32_values(rng, qt, bs, n):
    x = rng.standard_normal(n).astype(np.float32)
    x[::9] = 0.0
    x[::13] *= np.float32(1e-30)
    bits = _bf16_bits(x)
    got = quantize_bf16_bits(bits, (n,), bs, quant_type=qt)
    want = nl.quantize_nf4(_widen(bits), bs, quant_type=qt)
    assert _same(got, want) and got.dtype == "bfloat16"


@pytest.mark.parametrize("dq", [False, True])
def test_bf16_bits_with_shape_and_double_quant(rng, dq):
    bits = _bf16_bits(rng.standard_normal((96, 200)))
    got = quantize_bf16_bits(bits, (96, 200), 64, dq)
    want = nl.quantize_nf4(_widen(bits).reshape(96, 200), 64, dq)
    assert _same(got, want) and got.double_quant == dq
    assert np.array_equal(got.dequantize(), want.dequantize())


def test_bf16_bits_refusals(rng):
    bits = _bf16_bits(rng.standard_normal(128))
    with pytest.raises(nl.DTypeError, match="uint16"):
        quantize_bf16_bits(bits.astype(np.int16), (128,))
    with pytest.raises(nl.ShapeError, match="128"):
        quantize_bf16_bits(bits, (64, 3))
    bad = bits.copy()
    bad[70] = 0x7FC0  # NaN
    with pytest.raises(nl.NonFiniteError, match=r"index \(70,\)"):
        quantize_bf16_bits(bad, (128,))
    bad[70] = 0x7F80  # inf, in the partial last block this time
    with pytest.raises(nl.NonFiniteError, match=r"index \(1, 6\)"):
        quantize_bf16_bits(bad, (2, 64), blocksize=96)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_float16_array(rng, qt):
    w = rng.standard_normal((64, 130)).astype(np.float16)
    got = nl.quantize_nf4(w, 64, quant_type=qt)
    want = nl.quantize_nf4(w.astype(np.float32), 64, quant_type=qt)
    assert _same(got, want) and got.dtype == "float16"


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_ml_dtypes_bfloat16_array(rng, qt):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="needs ml_dtypes (the bfloat16 numpy dtype)")
    w = rng.standard_normal((64, 130)).astype(ml_dtypes.bfloat16)
    got = nl.quantize_nf4(w, 64, quant_type=qt)
    want = nl.quantize_nf4(w.astype(np.float32), 64, quant_type=qt)
    assert _same(got, want) and got.dtype == "bfloat16"
    # a strided view is quantized as its values
    assert _same(nl.quantize_nf4(w[:, ::2], 64, quant_type=qt), nl.quantize_nf4(w[:, ::2].astype(np.float32), 64,
                                                                                 quant_type=qt))


def test_bf16_equals_bitsandbytes_on_a_bf16_tensor(rng):
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="needs bitsandbytes")
    w = torch.from_numpy(rng.standard_normal((128, 256)).astype(np.float32)).to(torch.bfloat16)
    bits = w.view(torch.int16).numpy().view(np.uint16)
    for qt in ("nf4", "fp4"):
        q, st = bnbf.quantize_4bit(w, blocksize=64, quant_type=qt)
        t = quantize_bf16_bits(bits, (128, 256), 64, quant_type=qt)
        assert np.array_equal(t.packed, q.numpy().reshape(-1))
        assert np.array_equal(t.absmax, st.absmax.numpy())
