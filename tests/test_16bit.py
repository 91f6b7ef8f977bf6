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


# --- 16-bit inputs of the forwards and backwards -------------------------------------------

def _half_types():
    types = [np.float16]
    try:
        import ml_dtypes

        types.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    return types


@pytest.mark.parametrize("dt", _half_types(), ids=lambda t: np.dtype(t).name)
def test_16bit_inputs_compute_as_their_float32_values(rng, dt):
    """A float16 / bfloat16 input batch is widened to float32 (exactly) and the result is
    float32: every function that reads x gives what it gives for x.astype(float32)."""
    out_f, in_f, r = 48, 128, 4
    w = (rng.standard_normal((out_f, in_f)) * 0.1).astype(np.float32)
    a = (rng.standard_normal((r, in_f)) * 0.1).astype(np.float32)
    b = (rng.standard_normal((out_f, r)) * 0.1).astype(np.float32)
    x16 = rng.standard_normal((5, in_f)).astype(dt)
    x32 = x16.astype(np.float32)
    g = rng.standard_normal((5, out_f)).astype(np.float32)
    t = nl.quantize_nf4(w)
    pairs = [
        (lambda x: nl.lora_forward(x, w, a, b, 0.5), "lora_forward"),
        (lambda x: nl.linear_forward(x, w), "linear_forward"),
        (lambda x: nl.qlora_forward(x, t, a, b, 0.5), "qlora_forward"),
        (lambda x: nl.nf4_matmul(x, t), "nf4_matmul"),
        (lambda x: nl.lora_backward(x, w, a, b, 0.5, g), "lora_backward"),
        (lambda x: nl.qlora_backward(x, t, a, b, 0.5, g), "qlora_backward"),
        (lambda x: nl.LoraLinear(w, a, b, alpha=2.0).forward(x), "LoraLinear.forward"),
    ]
    for f, name in pairs:
        got, want = f(x16), f(x32)
        for u, v in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            if v is None:
                assert u is None
                continue
            assert u.dtype == v.dtype == np.float32, name
            assert np.array_equal(u, v), name
    # gradients of a batch that arrived in 16 bits: grad_out may be 16-bit too
    ga, gb = nl.lora_backward(x16, w, a, b, 0.5, g.astype(dt))[:2]
    ga2, gb2 = nl.lora_backward(x32, w, a, b, 0.5, g.astype(dt).astype(np.float32))[:2]
    assert np.array_equal(ga, ga2) and np.array_equal(gb, gb2)


def test_bank_takes_16bit_batches_and_writes_refuse_them(rng):
    w = (rng.standard_normal((32, 64)) * 0.1).astype(np.float32)
    bank = nl.LoraBank(w)
    bank.add("a", (rng.standard_normal((4, 64)) * 0.1).astype(np.float32),
             (rng.standard_normal((32, 4)) * 0.1).astype(np.float32), 2.0)
    x16 = rng.standard_normal((6, 64)).astype(np.float16)
    ids = np.array([0, -1, 0, 0, -1, 0])
    assert np.array_equal(bank.forward(x16, ids), bank.forward(x16.astype(np.float32), ids))
    # an array numlora would write is never widened behind the caller's back
    with pytest.raises(nl.DTypeError, match="float16"):
        nl.merge_lora(w.astype(np.float16), np.zeros((4, 64), np.float32), np.zeros((32, 4), np.float32), 1.0)
    with pytest.raises(nl.DTypeError):
        nl.lora_forward(x16, w, np.zeros((4, 64), np.float32), np.zeros((32, 4), np.float32), 1.0,
                        out=np.empty((6, 32), np.float16))
