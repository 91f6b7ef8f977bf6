"""Every public object pickles and loads as an equal object with the same behaviour.

Pickle protocol 5 with a ``buffer_callback`` writes numpy arrays out of band: the stream
holds only the object's structure, the arrays travel as buffers (what Dask's workers
exchange). Each test checks the loaded object's arrays bit for bit and its behaviour
(forward, merge / unmerge, optimizer steps, random streams) against the original, that
the loaded arrays use the received buffers in place (no second copy), and that
caches and device state are not pickled. GPU objects refuse with DeviceError; the
`gpu` tests check that on the CUDA simulator (or a real GPU).
"""

from __future__ import annotations

import pickle
from types import MappingProxyType

import numpy as np
import pytest

import numlora as nl
import numlora.errors as errors

from cuda_sim import GPU, SIM, cuda_test, d, run_simulator_pass, tiny_blocks  # noqa: F401


def _bits(a):
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype.kind == "f" else a


def same(a, b):
    """Arrays equal bit for bit (dtype and shape too); None only equals None."""
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(_bits(a), _bits(b))


def round_trip(obj):
    """``obj`` through protocol 5 with out-of-band buffers received as writable
    bytearrays (as a socket delivers them). Returns (loaded, stream bytes, buffer
    bytes, the received buffers)."""
    bufs = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    received = [bytearray(b.raw()) for b in bufs]
    loaded = pickle.loads(data, buffers=received)
    return loaded, len(data), sum(len(r) for r in received), received


def in_place(arr, received) -> bool:
    """The loaded array lies in one of the received buffers (it was not copied); an
    empty array has no memory to share."""
    return arr.size == 0 or any(np.shares_memory(arr, np.frombuffer(r, np.uint8)) for r in received)


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def nf4_arrays(t):
    return [a for a in (t.packed, t.absmax, t.absmax2, t.code8) if a is not None]


def layer_arrays(layer):
    names = ("weight", "lora_a", "lora_b", "bias", "magnitude", "lora_bias", "grad_a", "grad_b")
    out = [getattr(layer, n, None) for n in names]
    if isinstance(layer, nl.QLoraLinear):
        out += nf4_arrays(layer.nf4)
    else:  # a merged layer's bit-exact merge record (and any arrays it saved)
        rec = layer._record
        if rec is not None:
            out += [getattr(rec, f) for f in ("corr", "exc_col", "exc_bits", "exc_count", "saved_rows", "saved")]
        out += [layer._saved_weight, layer._saved_bias]
    unique = {id(a): a for a in out if isinstance(a, np.ndarray)}  # pickle writes a shared array once
    return list(unique.values())


def same_layer(got, want):
    assert type(got) is type(want)
    for name in ("in_features", "out_features", "rank", "alpha", "scaling", "merged", "training", "dropout",
                 "device", "fan_in_fan_out", "use_rslora"):
        if hasattr(want, name):
            assert getattr(got, name) == getattr(want, name), name
    assert len(layer_arrays(got)) == len(layer_arrays(want))
    for u, v in zip(layer_arrays(got), layer_arrays(want)):
        assert same(u, v)


# --- NF4 -------------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_tensor(rng, double_quant):
    t = nl.quantize_nf4(f32(rng, 96, 160), 64, double_quant=double_quant)
    t.dtype = "bfloat16"
    t.dequantize()  # fills the decoded-scales cache under double quantization
    got, stream, oob, received = round_trip(t)
    assert type(got) is nl.NF4Tensor
    assert got.shape == t.shape and got.blocksize == t.blocksize and got.dtype == "bfloat16"
    assert got.double_quant == double_quant and (not double_quant or got.offset == t.offset)
    for u, v in zip(nf4_arrays(got), nf4_arrays(t)):
        assert same(u, v) and in_place(u, received)
    # only the stored arrays travel (the decoded scales are a cache, rebuilt on use)
    assert oob == sum(a.nbytes for a in nf4_arrays(t))
    assert got._scales is None
    assert same(got.dequantize(), t.dequantize())
    x = f32(rng, 5, 160)
    assert same(nl.nf4_matmul(x, got), nl.nf4_matmul(x, t))
    assert same(pickle.loads(pickle.dumps(t)).dequantize(), t.dequantize())  # the default protocol too


def test_device_nf4_tensor_refuses_without_a_gpu(rng):
    """The refusal does not need a GPU: the dataclass is built from host arrays here."""
    t = nl.quantize_nf4(f32(rng, 8, 64), 64)
    dt = nl.DeviceNF4Tensor(packed=t.packed, scales=t.absmax, shape=t.shape, blocksize=64)
    with pytest.raises(nl.DeviceError, match=r"DeviceNF4Tensor cannot be pickled.*to_host"):
        pickle.dumps(dt, protocol=5)


# --- layers ------------------------------------------------------------------------------
def _layers(rng):
    w = f32(rng, 48, 40)
    plain = nl.LoraLinear(w, f32(rng, 4, 40), f32(rng, 48, 4), 8.0, bias=f32(rng, 48))
    dora = nl.LoraLinear.from_weight(w, 4, 8.0, use_dora=True)
    dora.lora_b = f32(rng, 48, 4)
    lbias = nl.LoraLinear.from_weight(w, 4, 8.0, lora_bias=True, fan_in_fan_out=False)
    lbias.lora_b, lbias.lora_bias = f32(rng, 48, 4), f32(rng, 48)
    rs = nl.LoraLinear.from_weight(w.T.copy(), 3, 6.0, fan_in_fan_out=True, use_rslora=True)
    rs.lora_b = f32(rng, 48, 3)
    return {"plain": plain, "dora": dora, "lora_bias": lbias, "fan_in_fan_out_rslora": rs}


@pytest.mark.parametrize("kind", ["plain", "dora", "lora_bias", "fan_in_fan_out_rslora"])
def test_lora_linear(rng, kind):
    layer = _layers(rng)[kind]
    x = f32(rng, 6, 40)
    layer.forward(x)  # fills the DoRA norm cache
    got, _, oob, received = round_trip(layer)
    same_layer(got, layer)
    assert oob == sum(a.nbytes for a in layer_arrays(layer))
    assert all(in_place(a, received) for a in layer_arrays(got))
    assert got._norm_cache is None if hasattr(got, "_norm_cache") else True
    assert same(got.forward(x), layer.forward(x))
    # the loaded layer is independent: training it leaves the original alone
    before = layer.lora_a.copy()
    got.lora_a += np.float32(1.0)
    assert same(layer.lora_a, before)


def test_lora_linear_merged_unmerges_bit_for_bit_after_loading(rng):
    w = f32(rng, 48, 40)
    layer = nl.LoraLinear(w.copy(), f32(rng, 4, 40), f32(rng, 48, 4) * np.float32(100), 8.0)
    x = f32(rng, 3, 40)
    layer.merge()
    got, *_ = round_trip(layer)
    assert got.merged and same(got.weight, layer.weight)
    assert same(got.forward(x), layer.forward(x))
    got.unmerge()
    assert not got.merged and same(got.weight, w)


def test_lora_linear_in_training_keeps_gradients_and_the_dropout_stream(rng):
    layer = nl.LoraLinear(f32(rng, 48, 40), f32(rng, 4, 40), f32(rng, 48, 4), 8.0, dropout=0.25, dropout_seed=7)
    layer.train()
    x, g = f32(rng, 5, 40), f32(rng, 5, 48)
    layer.forward(x)
    layer.backward(g)  # gradients accumulated, one dropout draw used
    layer.forward(x)  # a cache for backward: not pickled
    got, *_ = round_trip(layer)
    same_layer(got, layer)
    assert got.training and got._cache is None and got.saved_bytes == 0
    with pytest.raises(nl.TrainStateError):
        got.backward(g)
    # the next training forward draws the same dropout mask in both
    assert same(got.forward(x), layer.forward(x))
    assert same(got.backward(g), layer.backward(g))
    assert same(got.grad_a, layer.grad_a) and same(got.grad_b, layer.grad_b)


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_linear(rng, double_quant):
    layer = nl.QLoraLinear.from_weight(f32(rng, 64, 128), 4, 8.0, double_quant=double_quant, bias=f32(rng, 64))
    layer.lora_b = f32(rng, 64, 4)
    x = f32(rng, 7, 128)
    want = layer.forward(x)
    got, _, oob, received = round_trip(layer)
    same_layer(got, layer)
    assert oob == sum(a.nbytes for a in layer_arrays(layer))
    assert all(in_place(a, received) for a in layer_arrays(got))
    assert same(got.forward(x), want)


def test_pickled_size_is_the_arrays_plus_little(rng):
    """At a realistic size the stream (everything but the arrays) adds well under 5 %."""
    w = f32(rng, 1024, 1024)
    objs = {
        "LoraLinear": nl.LoraLinear.from_weight(w, 16, 32.0),
        "QLoraLinear": nl.QLoraLinear.from_weight(w, 16, 32.0),
        "NF4Tensor": nl.quantize_nf4(w, 64, double_quant=True),
    }
    for name, obj in objs.items():
        arrays = nf4_arrays(obj) if isinstance(obj, nl.NF4Tensor) else layer_arrays(obj)
        want = sum(a.nbytes for a in arrays)
        _, stream, oob, _ = round_trip(obj)
        assert oob == want, name
        assert (stream + oob) / want <= 1.05, (name, stream, oob)
        # in band (no buffer_callback: one copy into the stream) it is the same size
        assert len(pickle.dumps(obj, protocol=5)) <= 1.05 * want, name


# --- containers -----------------------------------------------------------------------------
def test_lora_config():
    cfg = nl.LoraConfig(8, 16.0, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True,
                        rank_pattern={r"layers\.0\..*": 4}, alpha_pattern={"v_proj": 3.5}, lora_bias=True,
                        base_model_name_or_path="base", task_type="CAUSAL_LM")
    got = pickle.loads(pickle.dumps(cfg, protocol=5))
    assert got == cfg and hash(got) == hash(cfg)
    assert isinstance(got.rank_pattern, MappingProxyType) and isinstance(got.alpha_pattern, MappingProxyType)
    assert got.rank_for("model.layers.0.q_proj") == 4 and got.alpha_for("model.layers.1.v_proj") == 3.5
    assert got.to_dict() == cfg.to_dict()
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(cfg, protocol=proto)) == cfg


def test_lora_adapter(rng):
    ad = nl.LoraAdapter(nl.LoraConfig(4, 8.0, rank_pattern={"b": 2}))
    ad.add_layer("a", f32(rng, 32, 16))
    ad.add_layer("b", f32(rng, 24, 16), bias=f32(rng, 24))
    ad["a"].lora_b = f32(rng, 32, 4)
    ad["b"].merge()
    got, _, oob, received = round_trip(ad)
    assert got.config == ad.config and got.layer_names == ad.layer_names and got.device == "cpu"
    assert oob == sum(a.nbytes for n in ad for a in layer_arrays(ad[n]))
    x = f32(rng, 3, 16)
    for n in ad:
        same_layer(got[n], ad[n])
        assert all(in_place(a, received) for a in layer_arrays(got[n]))
        assert same(got.forward_layer(n, x), ad.forward_layer(n, x))
    got.unmerge_all()
    ad.unmerge_all()
    assert same(got["b"].weight, ad["b"].weight)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_lora_bank(rng, kind):
    w = f32(rng, 40, 56)
    base = nl.quantize_nf4(w, 64) if kind == "nf4" else w
    bank = nl.LoraBank(base, bias=f32(rng, 40), block_pages=16)
    for k, r in enumerate([3, 8, 1]):
        bank.add(f"ad{k}", f32(rng, r, 56), f32(rng, 40, r), 0.5 + k)
    bank.remove("ad1")
    got, stream, oob, _ = round_trip(bank)
    assert got.names == bank.names and got.memory() == bank.memory()
    for n in bank.names:
        assert got.index(n) == bank.index(n) and got.scaling(n) == bank.scaling(n)
        assert all(same(u, v) for u, v in zip(got.lora_arrays(n), bank.lora_arrays(n)))
    x = f32(rng, 9, 56)
    ids = np.array([0, 2, -1, 2, 0, 0, -1, 2, 0])
    assert same(got.forward(x, ids), bank.forward(x, ids))
    # the stream holds the structure; the base, bias and pool blocks go out of band
    mem = bank.memory()
    assert stream < 4096 and oob >= mem["pool"]
    # a loaded bank takes new adapters (its pool is writable and its own)
    got.add("new", f32(rng, 2, 56), f32(rng, 40, 2), 1.0)
    assert "new" not in bank.names


# --- training ------------------------------------------------------------------------------
def test_parameter(rng):
    p = nl.Parameter(f32(rng, 6, 5), grad=f32(rng, 6, 5), name="w")
    got, _, oob, received = round_trip(p)
    assert got.name == "w" and same(got.value, p.value) and same(got.grad, p.grad)
    assert oob == 2 * p.value.nbytes and in_place(got.value, received)
    p0 = nl.Parameter(np.zeros(3, np.float64))
    back = pickle.loads(pickle.dumps(p0))
    assert back.grad is None and same(back.value, p0.value)


def test_adamw_with_state_steps_as_the_original(rng):
    layer = nl.LoraLinear(f32(rng, 24, 16), f32(rng, 4, 16), f32(rng, 24, 4), 8.0)
    extra = nl.Parameter(f32(rng, 7), name="extra")
    opt = nl.AdamW(layer.parameters() + [extra], lr=1e-2, weight_decay=0.1)
    x, g = f32(rng, 5, 16), f32(rng, 5, 24)
    layer.train()
    for _ in range(2):
        layer.forward(x)
        layer.backward(g)
        opt.step()  # extra has no gradient: no state for it
    got, *_ = round_trip(opt)
    assert (got.lr, got.betas, got.eps, got.weight_decay) == (opt.lr, opt.betas, opt.eps, opt.weight_decay)
    assert len(got.params) == len(opt.params)
    for p, q in zip(got.params, opt.params):
        st, want = got.state(p), opt.state(q)
        assert (st is None) == (want is None)
        if want is not None:
            assert st[0] == want[0] == 2 and same(st[1], want[1]) and same(st[2], want[2])
    # the loaded optimizer's parameters are the loaded layer's: a step moves the same bits
    new_layer = got.params[0]._owner
    assert got.params[1]._owner is new_layer
    for lay, o in ((layer, opt), (new_layer, got)):
        lay.forward(x)
        lay.backward(g)
        o.step()
    assert same(new_layer.lora_a, layer.lora_a) and same(new_layer.lora_b, layer.lora_b)
    assert got.state(got.params[0])[0] == 3


def test_xorshift64():
    r = nl.XorShift64(1234)
    r.next_u64()
    got = pickle.loads(pickle.dumps(r, protocol=5))
    assert got.state == r.state
    assert [got.next_u64() for _ in range(5)] == [r.next_u64() for _ in range(5)]
    assert same(got.uniform((3, 4)), r.uniform((3, 4)))


def test_dropout_state():
    st = nl.lora_dropout(np.ones((4, 8), np.float32), 0.5, 99)[1]
    assert isinstance(st, nl.DropoutState)
    got = pickle.loads(pickle.dumps(st, protocol=5))
    assert got == st and type(got) is nl.DropoutState
    assert same(nl.dropout_keep_mask((4, 8), got.p, got.seed), nl.dropout_keep_mask((4, 8), st.p, st.seed))


def test_merge_record(rng):
    w = f32(rng, 40, 24)
    w[0, :4] = 1e-30  # absorbed by the delta: exception slots
    a, b = f32(rng, 4, 24), f32(rng, 40, 4) * np.float32(1e3)
    merged = w.copy()
    rec = nl.merge_lora(merged, a, b, 2.0, record=True)
    got, _, oob, received = round_trip(rec)
    assert type(got) is nl.MergeRecord and got.used is False
    assert got.fingerprint == rec.fingerprint and got.weight_sample == rec.weight_sample
    for f in ("corr", "exc_col", "exc_bits", "exc_count", "saved_rows", "saved"):
        assert same(getattr(got, f), getattr(rec, f)), f
    assert oob == rec.nbytes
    assert in_place(got.corr, received)
    nl.unmerge_lora(merged, a, b, 2.0, record=got)
    assert same(merged, w) and got.used


# --- exceptions ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", errors.__all__)
def test_exceptions(name):
    cls = getattr(errors, name)
    for args in (("expected x, got y",), (), ("two", 2)):
        e = cls(*args)
        got = pickle.loads(pickle.dumps(e, protocol=5))
        assert type(got) is cls and got.args == e.args and str(got) == str(e)
    # raised and caught after a trip (what a Dask worker sends back): same class family
    try:
        raise cls("boom") from ValueError("cause")
    except cls as caught:
        got = pickle.loads(pickle.dumps(caught))
    assert isinstance(got, errors.NumloraError) and isinstance(got, cls.__mro__[1]) and str(got) == "boom"


def test_layer_not_found_keeps_its_unquoted_message():
    got = pickle.loads(pickle.dumps(nl.LayerNotFoundError("'x' not found")))
    assert str(got) == "'x' not found" and isinstance(got, KeyError)


# --- GPU objects refuse (CUDA simulator or a real GPU) -------------------------------------------
@cuda_test
def test_gpu_objects_refuse_and_their_host_copies_pickle(rng):
    w = f32(rng, 16, 64)
    t = nl.quantize_nf4(w, 64)
    dt = nl.to_device(t)
    with pytest.raises(nl.DeviceError, match="to_host"):
        pickle.dumps(dt, protocol=5)
    assert same(pickle.loads(pickle.dumps(nl.to_host(dt))).packed, t.packed)
    layer = nl.LoraLinear(w, f32(rng, 2, 64), f32(rng, 16, 2), 4.0)
    for lay in (layer, nl.QLoraLinear(t, layer.lora_a, layer.lora_b, 4.0)):
        g = lay.to("cuda")
        with pytest.raises(nl.DeviceError, match=r"on the GPU cannot be pickled.*to\('cpu'\)"):
            pickle.dumps(g, protocol=5)
        same_layer(round_trip(g.to("cpu"))[0], lay)
    bank = nl.LoraBank(w)
    bank.add("a", f32(rng, 2, 64), f32(rng, 16, 2), 1.0)
    with pytest.raises(nl.DeviceError, match="to\\('cpu'\\)"):
        pickle.dumps(bank.to("cuda"), protocol=5)


def test_gpu_pickling_on_the_simulator():
    if SIM or GPU:
        pytest.skip("the gpu tests run directly in this session")
    run_simulator_pass(__file__, min_passed=1)


def test_sizeof_counts_the_arrays(rng):
    """sys.getsizeof (and so Dask's sizeof, which places tasks by data size) sees the
    arrays an object holds, not only the Python object."""
    import sys

    w = rng.standard_normal((128, 96)).astype(np.float32)
    dense = nl.LoraLinear.from_weight(w, 8, 16)
    q = nl.QLoraLinear.from_weight(w, 8, 16)
    bank = nl.LoraBank(w)
    bank.add("a", rng.standard_normal((4, 96)).astype(np.float32), rng.standard_normal((128, 4)).astype(np.float32))
    assert sys.getsizeof(dense) >= w.nbytes + dense.lora_a.nbytes + dense.lora_b.nbytes
    assert sys.getsizeof(q) >= q.nf4.nbytes + q.lora_a.nbytes + q.lora_b.nbytes
    assert sys.getsizeof(q.nf4) >= q.nf4.nbytes
    assert sys.getsizeof(bank) >= w.nbytes + bank.memory()["pool"] > w.nbytes
