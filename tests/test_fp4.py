"""FP4 (bitsandbytes' 4-bit float code book): tables, quantizer, decode, fused products and
state dicts, against a reference written from the format (sign, 2 exponent bits with bias
2, 1 mantissa bit, normalised by the largest value, 12) and against bitsandbytes itself
when it is installed."""

from __future__ import annotations

import json

import numpy as np
import pytest

import numlora as nl
from numlora._tables import FP4_CODE, FP4_MIDPOINTS, FP4_ORDER


def _fp4_value(nibble: int) -> float:
    """The FP4 format as bitsandbytes lays it out: bit 3 the sign, bits 2-1 an exponent
    code e, bit 0 a mantissa bit m; e = 0 is subnormal (0 or 0.0625), otherwise the value
    is 2**(4 - e) * (1 + m / 2) (bitsandbytes' exponent codes descend: 8, 12, 4, 6, 2, 3),
    normalised by the largest magnitude, 12."""
    sign = -1.0 if nibble & 8 else 1.0
    e, m = (nibble >> 1) & 3, nibble & 1
    mag = 0.0625 * m if e == 0 else 2.0 ** (4 - e) * (1 + m / 2)
    return sign * mag / 12.0


REF_CODE = np.array([_fp4_value(i) for i in range(16)], np.float32)
REF_CODE[8] = 0.0  # bitsandbytes stores +0.0 for the signed zero


def _ref_quantize(w, blocksize):
    """bitsandbytes' quantize_4bit element by element: scale by block, then the nibble of
    the nearest code (ties and the two zeros as bitsandbytes' bucketize over the stable
    ascending order of the code book)."""
    order = np.argsort(REF_CODE, kind="stable")
    srt = REF_CODE[order]
    mids = ((srt[:-1] + srt[1:]) / np.float32(2)).astype(np.float32)
    x = np.asarray(w, np.float32).reshape(-1)
    n = x.size
    nfull = n // blocksize
    absmax = np.zeros(-(-n // blocksize), np.float32)
    codes = np.zeros(n + n % 2, np.int64)
    codes[n:] = order[7]
    for b in range(absmax.size):
        blk = x[b * blocksize:(b + 1) * blocksize]
        am = np.float32(np.max(np.abs(blk)))
        if b < nfull:
            absmax[b] = am
            ys = blk * np.float32(np.float32(1) / max(am, np.float32(1e-38)))
        else:
            am = max(am, np.float32(1e-38))
            absmax[b] = am
            ys = blk / am
        for k, y in enumerate(ys.astype(np.float32)):
            codes[b * blocksize + k] = order[int(np.sum(mids < y))]
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8), absmax


def test_tables_are_the_format():
    assert np.array_equal(FP4_CODE.view(np.uint32), REF_CODE.view(np.uint32))
    assert list(FP4_ORDER) == list(np.argsort(REF_CODE, kind="stable"))
    assert np.all(np.diff(FP4_MIDPOINTS) > 0) and FP4_MIDPOINTS.size == 15


def test_kernel_nibble_formula_covers_every_bucket():
    """Each sorted bucket (between two midpoints, and exactly on a midpoint) gets the
    table's nibble: the kernel computes the order instead of looking it up."""
    probes = np.concatenate([FP4_MIDPOINTS, np.nextafter(FP4_MIDPOINTS, np.float32(2)),
                             np.nextafter(FP4_MIDPOINTS, np.float32(-2)), [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30]])
    w = np.concatenate([probes, [1.0]]).astype(np.float32)  # absmax 1: values scale by exactly 1
    t = nl.quantize_nf4(w, blocksize=w.size + (w.size % 2), quant_type="fp4")
    ref, _ = _ref_quantize(w, w.size + (w.size % 2))
    assert np.array_equal(t.packed, ref)


def test_fp4_and_nf4_quantizers_are_separate_kernels():
    """One template per loop, compiled per code book: each copy has its own name, which is
    what numba's on-disk cache files it under (a shared name would make the two code books
    evict each other's cached machine code)."""
    from numlora.kernels import nf4 as k

    def py(kern):  # a numba dispatcher's Python function (the function itself with the JIT off)
        return getattr(kern, "py_func", kern)

    names = [py(kern).__qualname__ for kerns in k.QUANTIZERS.values() for kern in kerns]
    assert sorted(names) == sorted(f"{q}_quantize_{s}" for q in ("nf4", "fp4") for s in ("even", "any", "bf16"))
    assert py(k.QUANTIZERS["fp4"][0]).__globals__["_encode"] is k._nibble
    assert py(k.QUANTIZERS["nf4"][0]).__globals__["_encode"] is k._code


@pytest.mark.parametrize("bs", [2, 32, 64, 128, 4096, 33, 7])
@pytest.mark.parametrize("n", [1, 5, 64, 1001, 4096 + 91])
def test_quantize_matches_reference(rng, bs, n):
    w = rng.standard_normal(n).astype(np.float32)
    w[::7] *= np.float32(1e-3)
    w[::11] = 0.0
    t = nl.quantize_nf4(w, bs, quant_type="fp4")
    packed, absmax = _ref_quantize(w, bs)
    assert t.quant_type == "fp4"
    assert np.array_equal(t.packed, packed)
    assert np.array_equal(t.absmax.view(np.uint32), absmax.view(np.uint32))
    nib = np.empty(2 * packed.size, np.int64)
    nib[0::2], nib[1::2] = packed >> 4, packed & 15
    deq = REF_CODE[nib[:n]] * absmax[np.arange(n) // bs]
    assert np.array_equal(nl.dequantize_nf4(t).view(np.uint32), deq.view(np.uint32))


def test_aliases_and_bad_quant_type(rng):
    w = rng.standard_normal((8, 64)).astype(np.float32)
    a = nl.quantize_4bit(w, 64, quant_type="fp4")
    b = nl.quantize_nf4(w, 64, quant_type="fp4")
    assert np.array_equal(a.packed, b.packed)
    assert np.array_equal(nl.dequantize_4bit(a), nl.dequantize_nf4(b))
    assert nl.quantize_4bit(w).quant_type == "nf4"
    for bad in ("int4", "FP4 ", None, 4):
        with pytest.raises(nl.ConfigError, match="quant_type"):
            nl.quantize_nf4(w, quant_type=bad)
    with pytest.raises(nl.ConfigError, match="quant_type"):
        nl.NF4Tensor(b.packed, b.absmax, b.shape, b.blocksize, quant_type="af4")


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("batch", [1, 3, 8, 130])
def test_fused_products_use_the_fp4_code_book(rng, batch, dq):
    out_f, in_f, r = 96, 256, 4
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    t = nl.quantize_nf4(w, 64, double_quant=dq, quant_type="fp4")
    wd = nl.dequantize_nf4(t).astype(np.float64)
    x = rng.standard_normal((batch, in_f)).astype(np.float32)
    a = (rng.standard_normal((r, in_f)) * 0.1).astype(np.float32)
    bm = (rng.standard_normal((out_f, r)) * 0.1).astype(np.float32)
    ref = x.astype(np.float64) @ wd.T + 0.5 * (x.astype(np.float64) @ a.T.astype(np.float64)) @ bm.T
    got = nl.qlora_forward(x, t, a, bm, 0.5)
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert np.allclose(nl.nf4_matmul(x, t), x.astype(np.float64) @ wd.T, rtol=1e-4, atol=1e-4)
    g = rng.standard_normal((batch, out_f)).astype(np.float32)
    assert np.allclose(nl.nf4_matmul_t(g, t), g.astype(np.float64) @ wd, rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip_and_keys(rng):
    w = rng.standard_normal((64, 128)).astype(np.float32)
    t = nl.quantize_nf4(w, 64, quant_type="fp4")
    d = t.to_state_dict("m")
    assert "m.weight.quant_state.bitsandbytes__fp4" in d and not any(k.endswith("__nf4") for k in d)
    assert json.loads(bytes(d["m.weight.quant_state.bitsandbytes__fp4"]))["quant_type"] == "fp4"
    assert np.array_equal(d["m.weight.quant_map"].view(np.uint32), REF_CODE.view(np.uint32))
    back = nl.NF4Tensor.from_state_dict(d, "m")
    assert back.quant_type == "fp4"
    assert np.array_equal(back.dequantize(), t.dequantize())
    # an fp4 quant state with the NF4 map (or the other way round) is refused
    bad = dict(d)
    bad["m.weight.quant_map"] = nl.NF4_CODE.copy()
    with pytest.raises(nl.FormatError, match="FP4"):
        nl.NF4Tensor.from_state_dict(bad, "m")
    both = {**d, **nl.quantize_nf4(w, 64).to_state_dict("m")}
    with pytest.raises(nl.FormatError, match="exactly one quant state"):
        nl.NF4Tensor.from_state_dict(both, "m")


def test_qlora_layer_over_fp4_trains_like_the_functions(rng):
    w = rng.standard_normal((48, 128)).astype(np.float32)
    layer = nl.QLoraLinear.from_weight(w, rank=4, alpha=8, quant_type="fp4")
    assert layer.nf4.quant_type == "fp4"
    layer.lora_b[...] = (rng.standard_normal(layer.lora_b.shape) * 0.1).astype(np.float32)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    t = nl.quantize_nf4(w, quant_type="fp4")
    assert np.array_equal(layer.forward(x), nl.qlora_forward(x, t, layer.lora_a, layer.lora_b, 2.0))


def test_gpu_refuses_fp4_clearly(rng):
    t = nl.quantize_nf4(rng.standard_normal((8, 64)).astype(np.float32), quant_type="fp4")
    with pytest.raises(nl.DeviceError, match="NF4 only.*'fp4'"):
        nl.to_device(t)


def test_pickles_with_its_quant_type(rng):
    import pickle

    t = nl.quantize_nf4(rng.standard_normal((8, 64)).astype(np.float32), quant_type="fp4", double_quant=True)
    back = pickle.loads(pickle.dumps(t, protocol=5))
    assert back.quant_type == "fp4" and np.array_equal(back.dequantize(), t.dequantize())
    assert "fp4" in repr(back)


# --- bitsandbytes itself -----------------------------------------------------------------

def _bnb():
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="needs bitsandbytes: pip install -e '.[test,peers]'")
    return torch, bnbf


def test_code_book_equals_bitsandbytes():
    torch, bnbf = _bnb()
    code = bnbf.get_4bit_type("fp4", device="cpu").numpy().astype(np.float32)
    assert np.array_equal(code.view(np.uint32), FP4_CODE.view(np.uint32))


@pytest.mark.parametrize("bs", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("n", [4096 * 3, 4096 + 91])
def test_bytes_equal_bitsandbytes(rng, bs, n):
    torch, bnbf = _bnb()
    w = (rng.standard_normal(n) * 0.05).astype(np.float32)
    w[: n // 8] = 0.0
    w[n // 4: n // 4 + 64] = 1e-40
    w[n // 2: n // 2 + 15] = FP4_MIDPOINTS * np.float32(0.7)
    w[n // 2 + 15] = 0.7
    w[-3:] = [1e30, -1e30, 3.0]
    t = nl.quantize_nf4(w, bs, quant_type="fp4")
    q, st = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=bs, quant_type="fp4")
    assert np.array_equal(t.packed, q.numpy().reshape(-1))
    assert np.array_equal(t.absmax.view(np.uint32), st.absmax.numpy().view(np.uint32))
    theirs = bnbf.dequantize_4bit(q, st).numpy().reshape(-1)
    ours = nl.dequantize_nf4(t)
    # Nibble 8 (sign bit, zero magnitude): the code book (bitsandbytes' and ours) holds
    # +0.0 there and bitsandbytes' AVX-512 CPU kernel returns it, its other CPU kernel
    # (and its CUDA one) computes sign * 0 = -0.0. Every other element bit for bit.
    nib = np.stack([t.packed >> 4, t.packed & 15], axis=1).reshape(-1)[:n]
    zero8 = nib == 8
    assert np.array_equal(ours[~zero8].view(np.uint32), theirs[~zero8].view(np.uint32))
    assert not ours[zero8].view(np.uint32).any()  # +0.0: code[8] * absmax
    assert not theirs[zero8].any()  # a zero of either sign


@pytest.mark.parametrize("dq", [False, True])
def test_state_dict_loads_both_ways_with_bitsandbytes(rng, dq):
    torch, bnbf = _bnb()
    w = rng.standard_normal((64, 256)).astype(np.float32)
    q, st = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="fp4", compress_statistics=dq)
    theirs = {"m.weight": q.numpy()}
    theirs.update({f"m.weight.{k}": v.numpy() for k, v in st.as_dict(packed=True).items()})
    ours = nl.quantize_nf4(w, 64, double_quant=dq, quant_type="fp4").to_state_dict("m")
    assert list(ours) == list(theirs)
    if not dq:
        for k in ours:
            assert ours[k].dtype == theirs[k].dtype and bytes(ours[k]) == bytes(theirs[k]), k
    t = nl.NF4Tensor.from_state_dict(theirs, "m")
    assert t.quant_type == "fp4" and t.double_quant == dq
    assert np.array_equal(t.dequantize(), bnbf.dequantize_4bit(q, st).numpy())
    qs = {k[len("m.weight."):]: torch.from_numpy(v) for k, v in ours.items() if k.startswith("m.weight.")}
    st2 = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
    assert st2.quant_type == "fp4"
    mine = nl.NF4Tensor.from_state_dict(ours, "m").dequantize()
    assert np.array_equal(bnbf.dequantize_4bit(torch.from_numpy(ours["m.weight"]), st2).numpy(), mine)
