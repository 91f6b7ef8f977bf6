"""NF4Tensor.to_state_dict / from_state_dict: the bitsandbytes / transformers key layout of a
4-bit Linear, checked against a numpy decode of the dict and against bitsandbytes itself
(those tests are skipped when torch / bitsandbytes are absent)."""

import copy
import dataclasses
import json

import numpy as np
import pytest

import numlora as nl
from numlora.errors import ConfigError, DTypeError, FormatError, NonFiniteError, NumloraError, ShapeError

from reference import NF4_REF, nf4_dequantize_ref

PREFIX = "model.layers.0.mlp.up_proj"
W = PREFIX + ".weight"
QS = W + ".quant_state.bitsandbytes__nf4"

# (shape, blocksize): odd element counts, partial last blocks, blocks spanning rows,
# more than 256 blocks (two nested groups), odd blocksizes numlora allows
CASES = [
    ((300, 71), 64),
    ((13,), 32),
    ((1,), 64),
    ((2, 3, 5), 4),
    ((4096 * 2 + 91,), 32),
    ((64, 96), 128),
    ((33, 130), 4096),
    ((17, 9), 3),
]


def _bits(a):
    a = np.asarray(a)
    return a.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[a.dtype.itemsize])


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(_bits(a), _bits(b))


def _weight(rng, shape):
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)


def _meta(d, key=QS):
    return json.loads(bytes(d[key]).decode("utf-8"))


def _with_meta(d, key=QS, drop=(), **changes):
    m = _meta(d, key)
    for f in drop:
        del m[f]
    m.update(changes)
    out = dict(d)
    out[key] = np.frombuffer(json.dumps(m).encode("utf-8"), np.uint8).copy()
    return out


def _expected_layout(n, bs, dq):
    nb = -(-n // bs)
    lay = {W: (np.uint8, ((n + 1) // 2, 1)), W + ".absmax": (np.uint8 if dq else np.float32, (nb,)),
           W + ".quant_map": (np.float32, (16,))}
    if dq:
        lay[W + ".nested_absmax"] = (np.float32, (-(-nb // 256),))
        lay[W + ".nested_quant_map"] = (np.float32, (256,))
    lay[QS] = (np.uint8, None)
    return lay


def _numpy_decode(d, prefix=PREFIX):
    """Decode a state dict with plain numpy and the reference loop, independently of
    NF4Tensor: nibbles high first, quant_map[nibble] * absmax[block]; under double
    quantization absmax = nested_quant_map[q] * nested_absmax[i // 256] + offset."""
    w = f"{prefix}.weight" if prefix else "weight"
    m = json.loads(bytes(d[f"{w}.quant_state.bitsandbytes__nf4"]).decode("utf-8"))
    n = int(np.prod(m["shape"]))
    absmax = d[f"{w}.absmax"]
    if "nested_offset" in m:
        code8, a2 = d[f"{w}.nested_quant_map"], d[f"{w}.nested_absmax"]
        idx = np.arange(absmax.size) // m["nested_blocksize"]
        absmax = (code8[absmax] * a2[idx]).astype(np.float32) + np.float32(m["nested_offset"])
    assert np.array_equal(_bits(d[f"{w}.quant_map"]), _bits(NF4_REF))
    return nf4_dequantize_ref(d[w].reshape(-1), absmax, m["blocksize"], n).reshape(m["shape"])


# --- layout and round trip -------------------------------------------------------------

@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape,bs", CASES)
def test_layout_and_bit_exact_round_trip(rng, shape, bs, dq):
    w = _weight(rng, shape)
    t = nl.quantize_nf4(w, bs, double_quant=dq)
    d = t.to_state_dict(PREFIX)
    n = w.size
    lay = _expected_layout(n, bs, dq)
    assert list(d) == list(lay)  # bitsandbytes' order: weight, then QuantState.as_dict
    for k, (dt, shp) in lay.items():
        assert isinstance(d[k], np.ndarray) and d[k].dtype == dt, k
        if shp is not None:
            assert d[k].shape == shp, k
    assert d[QS].ndim == 1
    meta = _meta(d)
    expect = {"quant_type": "nf4", "blocksize": bs, "dtype": "float32", "shape": list(shape)}
    if dq:
        expect.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(t.offset))
    assert meta == expect and list(meta) == list(expect)
    assert np.array_equal(_bits(d[W + ".quant_map"]), _bits(NF4_REF))
    if dq:
        assert np.float32(meta["nested_offset"]) == t.offset
        assert _same(d[W + ".nested_quant_map"], nl.CODE8)

    t2 = nl.NF4Tensor.from_state_dict(d, PREFIX)
    assert t2.shape == tuple(shape) and t2.blocksize == bs and t2.dtype == "float32"
    assert t2.double_quant == dq
    assert _same(t2.packed, t.packed) and _same(t2.absmax, t.absmax)
    if dq:
        assert _same(t2.absmax2, t.absmax2) and _same(t2.code8, t.code8)
        assert np.float32(t2.offset).view(np.uint32) == np.float32(t.offset).view(np.uint32)
    deq = t.dequantize()
    assert _same(t2.dequantize(), deq)
    # an independent decode of the dict's bytes gives the same values
    assert _same(_numpy_decode(d), deq)


@pytest.mark.parametrize("dq", [False, True])
def test_round_trip_through_a_safetensors_file(rng, tmp_path, dq):
    st = pytest.importorskip("safetensors.numpy", reason="needs safetensors: pip install -e '.[test,peers]'")
    t = nl.quantize_nf4(_weight(rng, (96, 130)), 64, double_quant=dq)
    d = t.to_state_dict(PREFIX)
    d[PREFIX + ".bias"] = rng.standard_normal(96).astype(np.float32)
    path = tmp_path / "model.safetensors"
    st.save_file(d, str(path))
    back = st.load_file(str(path))
    t2 = nl.NF4Tensor.from_state_dict(back, PREFIX)
    assert _same(t2.dequantize(), t.dequantize())


def test_empty_prefix_gives_the_keys_of_a_bare_module(rng):
    t = nl.quantize_nf4(_weight(rng, (8, 24)), 32, double_quant=True)
    d = t.to_state_dict("")
    assert list(d) == ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]
    assert _same(nl.NF4Tensor.from_state_dict(d, "").dequantize(), t.dequantize())
    assert list(t.to_state_dict()) == list(d)  # "" is the default


def test_other_keys_are_ignored_and_prefixes_kept_apart(rng):
    a = nl.quantize_nf4(_weight(rng, (16, 32)), 64)
    b = nl.quantize_nf4(_weight(rng, (8, 64)), 32, double_quant=True)
    d = {**a.to_state_dict("model.q_proj"), **b.to_state_dict("model.k_proj"),
         "model.q_proj.bias": np.zeros(16, np.float32), "lm_head.weight": np.zeros((3, 4), np.float32)}
    assert _same(nl.NF4Tensor.from_state_dict(d, "model.q_proj").dequantize(), a.dequantize())
    assert _same(nl.NF4Tensor.from_state_dict(d, "model.k_proj").dequantize(), b.dequantize())


@pytest.mark.parametrize("name,written", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                          ("float16", "float16"), ("float64", "float32")])
def test_dtype_field(rng, name, written):
    t = dataclasses.replace(nl.quantize_nf4(_weight(rng, (4, 64)), 64), dtype=name)
    d = t.to_state_dict(PREFIX)
    assert _meta(d)["dtype"] == written
    t2 = nl.NF4Tensor.from_state_dict(d, PREFIX)
    assert t2.dtype == written and _same(t2.dequantize(), t.dequantize())


def test_float64_input_is_recorded_as_float32(rng):
    w = rng.standard_normal((4, 64))
    t = nl.quantize_nf4(w, 64)
    assert t.dtype == "float64"
    assert _meta(t.to_state_dict(PREFIX))["dtype"] == "float32"


def test_unknown_dtype_is_refused(rng):
    t = dataclasses.replace(nl.quantize_nf4(_weight(rng, (4, 64)), 64), dtype="int8")
    with pytest.raises(DTypeError, match="int8"):
        t.to_state_dict(PREFIX)


def test_returned_code_tables_are_copies(rng):
    t = nl.quantize_nf4(_weight(rng, (4, 64)), 64, double_quant=True)
    d = t.to_state_dict(PREFIX)
    d[W + ".quant_map"][:] = 0
    d[W + ".nested_quant_map"][:] = 0
    assert np.array_equal(_bits(nl.NF4_CODE), _bits(NF4_REF))
    assert nl.CODE8[-1] == 1.0 and t.code8[-1] == 1.0


# --- bad input --------------------------------------------------------------------------

@pytest.fixture(params=[False, True], ids=["plain", "dq"])
def good(request):
    rng = np.random.default_rng(7)
    t = nl.quantize_nf4(_weight(rng, (40, 70)), 64, double_quant=request.param)
    return t.to_state_dict(PREFIX)


def _raises(exc, d, *fragments, prefix=PREFIX):
    with pytest.raises(exc) as info:
        nl.NF4Tensor.from_state_dict(d, prefix)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, (f, msg)
    assert isinstance(info.value, NumloraError)
    return msg


@pytest.mark.parametrize("suffix", ["", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                                    ".quant_state.bitsandbytes__nf4"])
def test_missing_key(good, suffix):
    key = W + suffix
    if key not in good:
        pytest.skip("key only written with double quantization")
    d = dict(good)
    del d[key]
    _raises(FormatError, d, "missing key", repr(key))


def test_wrong_prefix_is_a_missing_key(good):
    _raises(FormatError, good, "missing key", repr("model.layers.1.mlp.up_proj.weight.quant_state"
                                                   ".bitsandbytes__nf4"), prefix="model.layers.1.mlp.up_proj")


def test_packed_dtype_and_shape(good):
    d = dict(good)
    m = good[W].shape[0]
    d[W] = good[W].view(np.int8)
    _raises(DTypeError, d, repr(W), "uint8", "int8")
    d[W] = good[W].reshape(-1)
    _raises(ShapeError, d, repr(W), f"({m}, 1)", f"({m},)")
    d[W] = good[W].reshape(1, -1)  # the old transposed layout
    _raises(ShapeError, d, f"({m}, 1)", f"(1, {m})")
    d[W] = good[W][:-1]
    _raises(ShapeError, d, f"({m}, 1)", f"({m - 1}, 1)")


def test_absmax_dtype_and_shape(good):
    key = W + ".absmax"
    dq = W + ".nested_absmax" in good
    d = dict(good)
    d[key] = good[key].astype(np.float64)
    _raises(DTypeError, d, repr(key), "uint8" if dq else "float32", "float64")
    d[key] = good[key][:-1]
    _raises(ShapeError, d, repr(key), f"({good[key].size},)", f"({good[key].size - 1},)")


def test_absmax_codes_without_double_quant_say_so(good):
    if W + ".nested_absmax" in good:
        pytest.skip("plain dicts only")
    d = dict(good)
    d[W + ".absmax"] = np.zeros_like(good[W + ".absmax"], np.uint8)
    _raises(DTypeError, d, repr(W + ".absmax"), "float32", "no double quantization", "uint8")


def test_nested_dtype_and_shape(good):
    if W + ".nested_absmax" not in good:
        pytest.skip("double-quantized dicts only")
    for suffix, size in [(".nested_absmax", 1), (".nested_quant_map", 256)]:
        key = W + suffix
        d = dict(good)
        d[key] = good[key].astype(np.float16)
        _raises(DTypeError, d, repr(key), "float32", "float16")
        d[key] = np.zeros(size + 1, np.float32)
        _raises(ShapeError, d, repr(key), f"({size},)", f"({size + 1},)")


def test_quant_map_must_be_the_nf4_codebook(good):
    d = dict(good)
    qm = good[W + ".quant_map"].copy()
    qm[6] = np.float32(-0.09105004)  # the seed's one-ulp-off value
    d[W + ".quant_map"] = qm
    _raises(FormatError, d, repr(W + ".quant_map"), "NF4 codebook", "index 6")
    d[W + ".quant_map"] = good[W + ".quant_map"].astype(np.float64)
    _raises(DTypeError, d, "float32", "float64")
    d[W + ".quant_map"] = np.linspace(-1, 1, 16, dtype=np.float32)  # not NF4 (FP4-like map)
    _raises(FormatError, d, "NF4 codebook")


def test_quant_type_must_match_its_key(good):
    """FP4 state dicts are read (tests/test_fp4.py); a JSON quant_type that disagrees with
    the key's suffix is refused either way round."""
    _raises(FormatError, _with_meta(good, quant_type="fp4"), "quant_type 'nf4'", "'fp4'")
    d = dict(good)
    d[W + ".quant_state.bitsandbytes__fp4"] = d.pop(QS)
    _raises(FormatError, d, "bitsandbytes__fp4", "nf4")


def test_two_quant_states_are_refused(good):
    d = dict(good)
    d[W + ".quant_state.bitsandbytes__fp4"] = good[QS]
    _raises(FormatError, d, "exactly one quant state")


def test_quant_state_bytes(good):
    d = dict(good)
    d[QS] = np.frombuffer(b"\xff\xfe{", np.uint8).copy()
    _raises(FormatError, d, repr(QS), "UTF-8 JSON")
    d[QS] = np.frombuffer(b"{not json", np.uint8).copy()
    _raises(FormatError, d, repr(QS), "UTF-8 JSON")
    d[QS] = np.frombuffer(b"[1, 2]", np.uint8).copy()
    _raises(FormatError, d, "JSON object", "list")
    d[QS] = good[QS].astype(np.int32)
    _raises(DTypeError, d, repr(QS), "uint8", "int32")
    d[QS] = good[QS].reshape(1, -1)
    _raises(ShapeError, d, repr(QS), "1-D")


@pytest.mark.parametrize("field", ["quant_type", "blocksize", "dtype", "shape"])
def test_quant_state_missing_field(good, field):
    _raises(FormatError, _with_meta(good, drop=[field]), repr(QS), "missing", repr(field))


def test_quant_state_unknown_field(good):
    _raises(FormatError, _with_meta(good, packing_format_for_cpu=True), "unknown fields",
            "packing_format_for_cpu")


@pytest.mark.parametrize("bad", [0, 1, 64.0, True, "64", None, 2**20 + 1, 2**63, 2**64])
def test_quant_state_bad_blocksize(good, bad):
    _raises(FormatError, _with_meta(good, blocksize=bad), "blocksize", ">= 2", repr(bad))


def test_quant_state_blocksize_must_fit_absmax(good):
    nb = good[W + ".absmax"].size
    _raises(ShapeError, _with_meta(good, blocksize=128), repr(W + ".absmax"), f"({-(-2800 // 128)},)", f"({nb},)")


@pytest.mark.parametrize("bad", ["float64", "int8", "torch.float32", None])
def test_quant_state_bad_dtype(good, bad):
    _raises(DTypeError, _with_meta(good, dtype=bad), "'float32', 'bfloat16', 'float16'", repr(bad))


@pytest.mark.parametrize("bad", [None, [40, -70], [40.0, 70], "40x70", [40, True]])
def test_quant_state_bad_shape(good, bad):
    _raises(ShapeError, _with_meta(good, shape=bad), "shape", repr(bad))


@pytest.mark.parametrize("bad", [[2**40, 2**40], [2**64], [2**100, 0, 3], [3, 2**62]])
def test_quant_state_shape_overflowing_int64(good, bad):
    # the element count used to wrap around in int64 (2**80 -> 0: an empty packed tensor
    # matched) or to raise OverflowError; refused, naming the shape
    _raises(ShapeError, _with_meta(good, shape=bad), "shape", "2**63 - 1", repr(bad))


def test_quant_state_shape_must_fit_packed(good):
    m = good[W].shape[0]
    _raises(ShapeError, _with_meta(good, shape=[41, 70]), repr(W), f"({41 * 35}, 1)", f"({m}, 1)")


def test_nested_fields_partial_or_inconsistent(good):
    dq = W + ".nested_absmax" in good
    if dq:
        _raises(FormatError, _with_meta(good, drop=["nested_offset"]), "nested_offset", "got only")
        _raises(FormatError, _with_meta(good, nested_blocksize=128), "nested_blocksize 256", "128")
        _raises(FormatError, _with_meta(good, nested_blocksize=256.0), "nested_blocksize 256", "256.0")
        _raises(DTypeError, _with_meta(good, nested_dtype="float16"), "nested_dtype 'float32'", "'float16'")
        _raises(FormatError, _with_meta(good, nested_offset="0.1"), "nested_offset", "'0.1'")
        _raises(NonFiniteError, _with_meta(good, nested_offset=float("nan")), "nested_offset", "nan")
        _raises(NonFiniteError, _with_meta(good, nested_offset=1e300), "nested_offset")
        # the quant state says nested but the tensors are not
        d = _with_meta(good)
        d[W + ".absmax"] = np.zeros(d[W + ".absmax"].size, np.float32)
        _raises(DTypeError, d, "uint8", "double quantization", "float32")
    else:
        d = dict(good)
        d[W + ".nested_absmax"] = np.ones(1, np.float32)
        _raises(FormatError, d, "unexpected keys", repr(W + ".nested_absmax"))
        d = _with_meta(good, nested_blocksize=256, nested_dtype="float32", nested_offset=0.5)
        _raises(DTypeError, d, repr(W + ".absmax"), "uint8", "double quantization", "float32")
        d[W + ".absmax"] = np.zeros(d[W + ".absmax"].size, np.uint8)
        _raises(FormatError, d, "missing key", repr(W + ".nested_absmax"))


def test_non_finite_scales(good):
    key = W + (".nested_absmax" if W + ".nested_absmax" in good else ".absmax")
    d = dict(good)
    a = good[key].copy()
    a[-1] = np.inf
    d[key] = a
    _raises(NonFiniteError, d, repr(key), "inf", f"index {a.size - 1}")


def test_non_numpy_values_and_containers(good):
    d = dict(good)
    d[W + ".absmax"] = good[W + ".absmax"].tolist()
    _raises(DTypeError, d, repr(W + ".absmax"), "numpy array", "list")
    with pytest.raises(DTypeError, match="mapping"):
        nl.NF4Tensor.from_state_dict(list(good.items()), PREFIX)


@pytest.mark.parametrize("bad", [".model.x", "model.x.", "model..x", "."])
def test_bad_prefix(good, bad):
    with pytest.raises(ConfigError, match="prefix"):
        nl.NF4Tensor.from_state_dict(good, bad)
    with pytest.raises(ConfigError, match="prefix"):
        nl.quantize_nf4(np.ones(64, np.float32)).to_state_dict(bad)


def test_prefix_must_be_a_string(good):
    with pytest.raises(DTypeError, match="prefix must be a str"):
        nl.NF4Tensor.from_state_dict(good, 0)
    with pytest.raises(DTypeError, match="prefix must be a str"):
        nl.quantize_nf4(np.ones(64, np.float32)).to_state_dict(None)


def test_errors_are_builtin_exceptions_too(good):
    d = dict(good)
    del d[QS]
    with pytest.raises(ValueError):
        nl.NF4Tensor.from_state_dict(d, PREFIX)
    d = dict(good)
    d[W] = good[W].view(np.int8)
    with pytest.raises(TypeError):
        nl.NF4Tensor.from_state_dict(d, PREFIX)


# --- against bitsandbytes -----------------------------------------------------------------

BNB_CASES = [((300, 71), 64), ((4096 * 2 + 91,), 32), ((64, 96), 128), ((33, 130), 4096), ((512, 256), 64),
             ((40, 192), 64)]


def _rows_are_whole_blocks(shape, bs):
    return len(shape) == 1 or shape[-1] % bs == 0


def _bnb():
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="needs bitsandbytes: pip install -e '.[test,peers]'")
    return torch, bnbf


def _bnb_state_dict(torch, bnbf, w, bs, dq, prefix=PREFIX):
    """What bitsandbytes writes: the packed weight plus QuantState.as_dict(packed=True)."""
    q, st = bnbf.quantize_4bit(torch.from_numpy(np.ascontiguousarray(w)) if isinstance(w, np.ndarray) else w,
                               blocksize=bs, quant_type="nf4", compress_statistics=dq)
    d = {f"{prefix}.weight": q.numpy()}
    d.update({f"{prefix}.weight.{k}": v.numpy() for k, v in st.as_dict(packed=True).items()})
    return d, q, st


def _bnb_load(torch, bnbf, d, prefix=PREFIX):
    """Load a state dict the way bitsandbytes does: QuantState.from_dict over the quant
    keys, then dequantize_4bit."""
    w = f"{prefix}.weight"
    qs = {k[len(w) + 1:]: torch.from_numpy(v) for k, v in d.items() if k.startswith(w + ".")}
    st = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
    return bnbf.dequantize_4bit(torch.from_numpy(d[w]), st), st


def _bnb_flat_decode(torch, bnbf, q, st):
    """bitsandbytes' dequantize_4bit over the flat index (the quant state's shape
    flattened), reshaped back.

    bitsandbytes 0.50.2's native CPU kernel (AVX-512 machines, blocksize < 2048, even
    in_features) decodes a 2-D weight row by row and, when ``in_features % blocksize !=
    0``, picks the wrong block scale for some elements (for (64, 96) at blocksize 128 it
    used ``row * (in // blocksize) + col // blocksize``, as if every row started a block),
    while its own quantize_4bit, its portable CPU code and its CUDA kernel run blocks over
    the flat index. There its 2-D CPU decode disagrees with its own quantizer (and with
    numlora). Decoding the flat shape takes the kernel's 1-D path, which is right; where
    rows are whole blocks both agree and the 2-D decode is compared too."""
    shape = tuple(st.shape)
    flat = copy.copy(st)
    flat.shape = torch.Size([int(np.prod(shape))])
    return bnbf.dequantize_4bit(q, flat).reshape(shape)


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape,bs", BNB_CASES)
def test_same_layout_as_bitsandbytes(rng, shape, bs, dq):
    torch, bnbf = _bnb()
    w = _weight(rng, shape)
    ours = nl.quantize_nf4(w, bs, double_quant=dq).to_state_dict(PREFIX)
    theirs, _, _ = _bnb_state_dict(torch, bnbf, w, bs, dq)
    assert list(ours) == list(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
    if not dq:
        for k in ours:  # every byte, the JSON included
            assert _same(ours[k], theirs[k]), k
        return
    # double quantization: the 4-bit codes and the tables are identical; the 8-bit absmax
    # codes may differ by one step and the offset (a float32 mean) in its last bits, as
    # docs/nf4-format.md describes
    for k in (W, W + ".quant_map", W + ".nested_quant_map"):
        assert _same(ours[k], theirs[k]), k
    mo, mt = _meta(ours), _meta(theirs)
    assert list(mo) == list(mt)
    assert {k: v for k, v in mo.items() if k != "nested_offset"} == {k: v for k, v in mt.items()
                                                                      if k != "nested_offset"}
    true_absmax = nl.quantize_nf4(w, bs).absmax
    assert np.float32(mo["nested_offset"]) == np.float32(np.mean(true_absmax, dtype=np.float64))
    assert abs(mt["nested_offset"] - mo["nested_offset"]) <= 1e-6 * abs(mo["nested_offset"])
    # the JSON is formatted the same way: ours with their offset is their bytes
    assert bytes(_with_meta(ours, nested_offset=mt["nested_offset"])[QS]) == bytes(theirs[QS])


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape,bs", BNB_CASES)
def test_ours_loads_in_bitsandbytes(rng, shape, bs, dq):
    torch, bnbf = _bnb()
    t = nl.quantize_nf4(_weight(rng, shape), bs, double_quant=dq)
    d = t.to_state_dict(PREFIX)
    out, st = _bnb_load(torch, bnbf, d)
    assert st.quant_type == "nf4" and st.blocksize == bs and tuple(st.shape) == shape and st.nested == dq
    assert st.dtype == torch.float32
    assert _same(_bnb_flat_decode(torch, bnbf, torch.from_numpy(d[W]), st).numpy(), t.dequantize())
    if _rows_are_whole_blocks(shape, bs):
        assert _same(out.numpy(), t.dequantize())


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_ours_dtype_field_is_honoured_by_bitsandbytes(rng, name):
    torch, bnbf = _bnb()
    t = dataclasses.replace(nl.quantize_nf4(_weight(rng, (64, 128)), 64, double_quant=True), dtype=name)
    out, st = _bnb_load(torch, bnbf, t.to_state_dict(PREFIX))
    assert st.dtype == getattr(torch, name) and out.dtype == getattr(torch, name)
    # bitsandbytes decodes in float32 and rounds to the recorded dtype
    assert torch.equal(out, torch.from_numpy(t.dequantize()).to(getattr(torch, name)))


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape,bs", BNB_CASES)
def test_theirs_loads_in_numlora(rng, shape, bs, dq):
    torch, bnbf = _bnb()
    w = _weight(rng, shape)
    theirs, q, st = _bnb_state_dict(torch, bnbf, w, bs, dq)
    t = nl.NF4Tensor.from_state_dict(theirs, PREFIX)
    assert t.shape == shape and t.blocksize == bs and t.double_quant == dq and t.dtype == "float32"
    ref = _bnb_flat_decode(torch, bnbf, q, st).numpy()
    assert _same(t.dequantize(), ref)
    assert _same(_numpy_decode(theirs), ref)
    if _rows_are_whole_blocks(shape, bs):
        assert _same(t.dequantize(), bnbf.dequantize_4bit(q, st).numpy())
    if not dq:
        assert _same(t.dequantize(), nl.quantize_nf4(w, bs).dequantize())


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
@pytest.mark.parametrize("dq", [False, True])
def test_theirs_from_16_bit_weights(rng, name, dq):
    torch, bnbf = _bnb()
    w16 = torch.from_numpy(_weight(rng, (48, 128))).to(getattr(torch, name))
    theirs, q, st = _bnb_state_dict(torch, bnbf, w16, 64, dq)
    t = nl.NF4Tensor.from_state_dict(theirs, PREFIX)
    assert t.dtype == name
    ref = bnbf.dequantize_4bit(q, st)
    assert ref.dtype == getattr(torch, name)
    assert torch.equal(torch.from_numpy(t.dequantize()).to(ref.dtype), ref)
    # and it writes back the same quant state (dtype included)
    back = t.to_state_dict(PREFIX)
    assert list(back) == list(theirs)
    for k in back:
        assert _same(back[k], theirs[k]), k


def _linear4bit_model(torch, w, bias, bs, dq):
    bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes: pip install -e '.[test,peers]'")
    lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=True, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=dq)
    lin.weight = bnb.nn.Params4bit(torch.from_numpy(w.copy()), requires_grad=False, blocksize=bs,
                                   compress_statistics=dq, quant_type="nf4")
    lin.bias = torch.nn.Parameter(torch.from_numpy(bias.copy()), requires_grad=False)
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    root.model.layers[0].mlp = torch.nn.Module()
    root.model.layers[0].mlp.up_proj = lin
    root.to("cpu")  # quantizes the Params4bit
    assert lin.weight.bnb_quantized
    return root, lin


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape", [(96, 192), (96, 160)])
def test_linear4bit_state_dict_loads_in_numlora(rng, shape, dq):
    torch, bnbf = _bnb()
    w, bias = _weight(rng, shape), _weight(rng, shape[:1])
    root, lin = _linear4bit_model(torch, w, bias, 64, dq)
    sd = {k: v.detach().numpy() for k, v in root.state_dict().items()}
    t = nl.NF4Tensor.from_state_dict(sd, PREFIX)
    assert _same(sd[PREFIX + ".bias"], bias)
    q, st = lin.weight.data, lin.weight.quant_state
    assert _same(t.dequantize(), _bnb_flat_decode(torch, bnbf, q, st).numpy())
    if _rows_are_whole_blocks(shape, 64):
        assert _same(t.dequantize(), bnbf.dequantize_4bit(q, st).numpy())
    if not dq:
        assert _same(t.dequantize(), nl.quantize_nf4(w, 64).dequantize())
    ours = nl.quantize_nf4(w, 64, double_quant=dq).to_state_dict(PREFIX)
    assert list(ours) == [k for k in sd if k != PREFIX + ".bias"]
    for k in ours:
        assert ours[k].dtype == sd[k].dtype and ours[k].shape == sd[k].shape, k


@pytest.mark.parametrize("dq", [False, True])
def test_params4bit_from_prequantized_accepts_ours(rng, tmp_path, dq):  # (80, 192): rows are whole blocks
    torch, bnbf = _bnb()
    bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes: pip install -e '.[test,peers]'")
    stt = pytest.importorskip("safetensors.torch", reason="needs safetensors: pip install -e '.[test,peers]'")
    stn = pytest.importorskip("safetensors.numpy", reason="needs safetensors: pip install -e '.[test,peers]'")
    t = nl.quantize_nf4(_weight(rng, (80, 192)), 64, double_quant=dq)
    path = tmp_path / "model.safetensors"
    stn.save_file(t.to_state_dict(PREFIX), str(path))
    loaded = stt.load_file(str(path))
    # as transformers' Bnb4bitDeserialize does: the weight, and the rest keyed "weight.*"
    stats = {k[len(PREFIX) + 1:]: v for k, v in loaded.items() if k.startswith(W + ".")}
    lin = bnb.nn.Linear4bit(192, 80, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    p = bnb.nn.Params4bit.from_prequantized(data=loaded[W], quantized_stats=stats, requires_grad=False,
                                            device="cpu", module=lin)
    assert p.quant_type == "nf4" and p.blocksize == 64 and p.compress_statistics == dq and p.bnb_quantized
    assert lin.quant_state is p.quant_state
    out = bnbf.dequantize_4bit(p.data, p.quant_state).numpy()
    assert _same(out, t.dequantize())
