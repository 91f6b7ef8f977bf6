"""The seed module's tests, as behaviour, plus what the seed got wrong."""

import numpy as np
import pytest

import numlora as nl
from numlora.ops import mix_seed

from conftest import make_weight
from reference import xorshift_stream


def _plain(w, x):
    return np.asarray(x, np.float64) @ w.astype(np.float64).T


def _seed_b(out, r, step):
    i, j = np.meshgrid(np.arange(out), np.arange(r), indexing="ij")
    return ((i + j).astype(np.float32) * np.float32(step)).astype(np.float32)


def test_creation_b_zero_forward_equals_base():
    w = make_weight(64, 32)
    layer = nl.LoraLinear.from_weight(w, 8, 16.0)
    x = np.ones(32, np.float32)
    assert np.abs(layer.forward(x) - _plain(w, x)).max() < 1e-5 * np.abs(_plain(w, x)).max()
    assert layer.rank == 8 and layer.alpha == 16.0 and layer.scaling == 2.0
    assert np.all(layer.lora_b == 0)


def test_seed_init_is_bit_exact():
    for (out, inp, rank, base) in [(64, 32, 8, 42), (16, 8, 4, 42)]:
        layer = nl.LoraLinear.from_weight(make_weight(out, inp), rank, 8.0)
        vals, _ = xorshift_stream(base + inp + out, rank * inp)
        scale = np.sqrt(np.float32(2.0) / np.float32(inp))
        expected = (np.array(vals, np.float32) * scale).astype(np.float32).reshape(rank, inp)
        assert np.array_equal(layer.lora_a.view(np.uint32), expected.view(np.uint32))
    q = nl.QLoraLinear.from_weight(make_weight(32, 16), 4, 8.0, 64)
    vals, _ = xorshift_stream(137 + 16 + 32, 4 * 16)
    expected = (np.array(vals, np.float32) * np.sqrt(np.float32(2.0) / np.float32(16))).reshape(4, 16)
    assert np.array_equal(q.lora_a.view(np.uint32), expected.astype(np.float32).view(np.uint32))


def test_other_inits():
    w = np.zeros((50, 400), np.float32)
    k = nl.LoraLinear.from_weight(w, 16, 16, init="kaiming", seed=0)
    assert np.abs(k.lora_a).max() <= 1 / np.sqrt(400) and np.abs(k.lora_a).max() > 0.9 / np.sqrt(400)
    g = nl.LoraLinear.from_weight(w, 16, 16, init="gaussian", seed=0)
    assert abs(g.lora_a.std() - 1 / 16) < 0.005
    again = nl.LoraLinear.from_weight(w, 16, 16, init="kaiming", seed=0)
    assert np.array_equal(k.lora_a, again.lora_a)
    with pytest.raises(nl.ConfigError, match="init must be one of"):
        nl.LoraLinear.from_weight(w, 4, 4, init="xavier")


def test_nonzero_b_changes_output():
    w = make_weight(16, 8)
    layer = nl.LoraLinear.from_weight(w, 4, 8.0)
    layer.lora_b = _seed_b(16, 4, 0.1)
    x = np.ones(8, np.float32)
    assert np.abs(layer.forward(x) - _plain(w, x)).max() > 1e-3


def test_merge_unmerge():
    w = make_weight(16, 8)
    layer = nl.LoraLinear.from_weight(w, 4, 8.0)
    layer.lora_b = _seed_b(16, 4, 0.01)
    x = np.full(8, 0.5, np.float32)
    before = layer.forward(x)
    layer.merge()
    assert layer.merged
    assert np.abs(layer.forward(x) - before).max() < 1e-4
    layer.unmerge()
    assert not layer.merged
    assert np.array_equal(layer.weight.view(np.uint32), w.view(np.uint32))


@pytest.mark.slow
def test_thousand_merge_unmerge_cycles_are_bit_exact(rng):
    w = (rng.standard_normal((64, 96)) * 0.02).astype(np.float32)
    w[0, :40] = 1e-12  # absorbed by the delta
    layer = nl.LoraLinear.from_weight(w, 8, 16.0)
    layer.lora_b = (rng.standard_normal((64, 8)) * 0.05).astype(np.float32)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    merged_out = None
    for _ in range(1000):
        layer.merge()
        if merged_out is None:
            merged_out = layer.forward(x)
        layer.unmerge()
    assert np.array_equal(layer.weight.view(np.uint32), w.view(np.uint32))
    layer.merge()
    assert np.array_equal(layer.forward(x), merged_out)


def test_merge_state_errors():
    layer = nl.LoraLinear.from_weight(make_weight(16, 8), 4, 8.0)
    with pytest.raises(nl.MergeStateError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(nl.MergeStateError, match="already merged"):
        layer.merge()
    with pytest.raises(nl.MergeStateError, match="unmerge"):
        layer.lora_b = np.zeros((16, 4), np.float32)
    with pytest.raises(nl.MergeStateError):
        layer.disable()
    assert layer.merge_overhead_bytes >= 16 * 8
    layer.unmerge()
    assert layer.merge_overhead_bytes == 0
    layer.disable()
    with pytest.raises(nl.MergeStateError, match="disabled"):
        layer.merge()


def test_weight_copied_unless_asked():
    w = make_weight(16, 8)
    layer = nl.LoraLinear.from_weight(w, 4, 8.0)
    layer.lora_b = _seed_b(16, 4, 0.1)
    layer.merge()
    assert np.array_equal(w, make_weight(16, 8))
    shared = nl.LoraLinear.from_weight(w, 4, 8.0, copy=False)
    shared.lora_b = _seed_b(16, 4, 0.1)
    shared.merge()
    assert not np.array_equal(w, make_weight(16, 8))


def test_param_counts():
    layer = nl.LoraLinear.from_weight(make_weight(64, 32), 8, 16.0)
    assert layer.trainable_params == 768
    assert layer.total_params == 2816
    big = nl.LoraLinear.from_weight(make_weight(256, 128), 8, 16.0)
    assert abs(big.compression_ratio - 3072 / 35840) < 1e-12


def test_disable_enable():
    w = make_weight(16, 8)
    layer = nl.LoraLinear.from_weight(w, 4, 8.0)
    layer.lora_b = _seed_b(16, 4, 0.1)
    x = np.ones(8, np.float32)
    on = layer.forward(x)
    assert np.abs(on - _plain(w, x)).max() > 1e-3
    layer.disable()
    assert not layer.enabled
    assert np.abs(layer.forward(x) - _plain(w, x)).max() < 1e-5 * np.abs(_plain(w, x)).max()
    layer.enable()
    assert np.array_equal(layer.forward(x), on)


def test_batch_forward_matches_single_rows():
    layer = nl.LoraLinear.from_weight(make_weight(16, 8), 4, 8.0)
    layer.lora_b = _seed_b(16, 4, 0.1)
    batch = (np.arange(24, dtype=np.float32) * np.float32(0.1)).reshape(3, 8)
    y = layer.forward(batch)
    assert y.shape == (3, 16)
    for i in range(3):
        assert np.abs(y[i] - layer.forward(batch[i])).max() < 1e-4


def test_rank_and_alpha_validation():
    w = make_weight(16, 8)
    with pytest.raises(nl.ConfigError, match="rank must be > 0"):
        nl.LoraLinear.from_weight(w, 0, 8.0)
    with pytest.raises(nl.ConfigError, match=r"must not exceed min\(out_features, in_features\) = 8"):
        nl.LoraLinear.from_weight(w, 9, 8.0)
    with pytest.raises(nl.ConfigError, match="alpha must be > 0"):
        nl.LoraLinear.from_weight(w, 4, 0.0)
    with pytest.raises(nl.DTypeError):
        nl.LoraLinear.from_weight(w, 4.0, 8.0)
    with pytest.raises(nl.ShapeError, match="non-empty"):
        nl.LoraLinear.from_weight(np.zeros((0, 8), np.float32), 1, 1.0)


def test_setters_validate():
    layer = nl.LoraLinear.from_weight(make_weight(16, 8), 4, 8.0)
    with pytest.raises(nl.ShapeError, match=r"expected lora_a of shape \(4, 8\), got \(8, 4\)"):
        layer.lora_a = np.zeros((8, 4), np.float32)
    with pytest.raises(nl.DTypeError):
        layer.lora_b = np.zeros((16, 4), np.int32)
    src = np.ones((16, 4), np.float64)
    layer.lora_b = src
    assert layer.lora_b.dtype == np.float32
    src[0, 0] = 5  # the layer holds its own copy
    assert layer.lora_b[0, 0] == 1


def test_rslora_and_fan_in_fan_out(rng):
    w = rng.standard_normal((12, 20)).astype(np.float32)  # stored (in=12, out=20)
    layer = nl.LoraLinear.from_weight(w, 4, 8.0, use_rslora=True, fan_in_fan_out=True)
    assert layer.scaling == 4.0 and layer.in_features == 12 and layer.out_features == 20
    layer.lora_b = rng.standard_normal((20, 4)).astype(np.float32)
    x = rng.standard_normal((2, 12)).astype(np.float32)
    before = layer.forward(x)
    ref = x.astype(np.float64) @ w + 4.0 * (x.astype(np.float64) @ layer.lora_a.T) @ layer.lora_b.T
    assert np.abs(before - ref).max() < 1e-4
    layer.merge()
    assert np.abs(layer.forward(x) - before).max() < 1e-4
    layer.unmerge()
    assert np.array_equal(layer.weight, w)


def test_bias_and_float64(rng):
    w = rng.standard_normal((6, 5))
    bias = rng.standard_normal(6)
    layer = nl.LoraLinear.from_weight(w, 2, 4.0, bias=bias)
    assert layer.lora_a.dtype == np.float64
    x = rng.standard_normal(5)
    assert np.allclose(layer.forward(x), w @ x + bias, rtol=1e-12, atol=1e-12)


# --- QLoRA ----------------------------------------------------------------------------

def test_qlora_creation():
    q = nl.QLoraLinear.from_weight(make_weight(32, 16), 4, 8.0, 64)
    assert (q.out_features, q.in_features, q.rank, q.group_size, q.blocksize) == (32, 16, 4, 64, 64)
    assert q.trainable_params == 4 * (16 + 32)


def test_qlora_forward_finite_and_matches_dequantized(rng):
    q = nl.QLoraLinear.from_weight(make_weight(16, 8), 4, 8.0, 32)
    q.lora_b = rng.standard_normal((16, 4)).astype(np.float32)
    x = np.ones(8, np.float32)
    y = q.forward(x)
    assert y.shape == (16,) and np.all(np.isfinite(y))
    ref = q.dequantize_weight().astype(np.float64) @ x + q.scaling * q.lora_b @ (q.lora_a @ x)
    assert np.abs(y - ref).max() < 1e-4
    q.disable()
    assert np.abs(q.forward(x) - q.dequantize_weight().astype(np.float64) @ x).max() < 1e-4
    merged = q.merged_weight()
    q.enable()
    assert np.abs(merged.astype(np.float64) @ x - ref).max() < 1e-4


def test_qlora_memory_savings():
    q = nl.QLoraLinear.from_weight(make_weight(256, 128), 8, 16.0, 64)
    assert q.memory_saved_bytes() == 256 * 128 * 4 - (256 * 128 // 2 + 512 * 4)
    assert q.memory_saved_bytes() > 100_000
    dq = nl.QLoraLinear.from_weight(make_weight(256, 128), 8, 16.0, 64, double_quant=True)
    assert dq.memory_saved_bytes() > q.memory_saved_bytes()


def test_qlora_dequantize_roundtrip():
    i, j = np.meshgrid(np.arange(8), np.arange(4), indexing="ij")
    w = np.clip((i - 4.0) * 0.2 + (j - 2.0) * 0.1, -0.9, 0.9).astype(np.float32)
    q = nl.QLoraLinear.from_weight(w, 2, 4.0, 16)
    d = q.dequantize_weight()
    assert d.shape == (8, 4)
    assert np.abs(d - w).max() < 0.1


def test_qlora_bias_and_validation(rng):
    w = rng.standard_normal((10, 12)).astype(np.float32)
    bias = rng.standard_normal(10).astype(np.float32)
    q = nl.QLoraLinear.from_weight(w, 2, 2.0, 32, bias=bias)
    x = rng.standard_normal(12).astype(np.float32)
    assert np.abs(q.forward(x) - (q.dequantize_weight() @ x + bias)).max() < 1e-4
    with pytest.raises(nl.ConfigError, match="must not exceed"):
        nl.QLoraLinear.from_weight(w, 11, 2.0)
    with pytest.raises(nl.DTypeError, match="NF4Tensor"):
        nl.QLoraLinear(w, np.zeros((2, 12)), np.zeros((10, 2)), 2.0)


# --- detached layers, LoRA bias, DoRA ---------------------------------------------------

def _lora_reference(x, w_oi, a, b, s, bias=None, lora_bias=None):
    """float64: x W^T + bias + s (x A^T B^T + lora_bias), W as (out, in)."""
    x = np.asarray(x, np.float64)
    y = x @ w_oi.astype(np.float64).T + s * (x @ a.astype(np.float64).T) @ b.astype(np.float64).T
    if lora_bias is not None:
        y = y + s * lora_bias.astype(np.float64)
    return y if bias is None else y + bias.astype(np.float64)


def _dora_reference(x, w_oi, a, b, s, m, bias=None):
    """float64: V = W + s B A; y = (m / ||V||_row) * (x V^T) + bias."""
    v = w_oi.astype(np.float64) + s * b.astype(np.float64) @ a.astype(np.float64)
    n = np.sqrt((v * v).sum(axis=1))
    y = (np.asarray(x, np.float64) @ v.T) * (m.astype(np.float64) / n)
    return y if bias is None else y + bias.astype(np.float64)


def _dora_merged_reference(w_oi, a, b, s, m):
    v = w_oi.astype(np.float64) + s * b.astype(np.float64) @ a.astype(np.float64)
    return v * (m.astype(np.float64) / np.sqrt((v * v).sum(axis=1)))[:, None]


def _close(got, ref, rel=1e-5):
    ref = np.asarray(ref, np.float64)
    return np.abs(np.asarray(got, np.float64) - ref).max() <= rel * np.abs(ref).max()


def _f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_detached_layer_needs_a_base_weight(rng):
    a, b = _f32(rng, 4, 8), _f32(rng, 6, 4)
    layer = nl.LoraLinear(None, a, b, 8.0)
    assert (layer.in_features, layer.out_features, layer.rank, layer.scaling) == (8, 6, 4, 2.0)
    assert not layer.attached and layer.weight is None and layer.bias is None
    x = _f32(rng, 3, 8)
    with pytest.raises(nl.DetachedLayerError, match=r"no base weight attached; call attach\(weight\) first"):
        layer.forward(x)
    with pytest.raises(RuntimeError, match="cannot merge"):
        layer.merge()
    with pytest.raises(nl.ShapeError, match=r"expected weight of shape \(out, in\) = \(6, 8\).*transpose"):
        layer.attach(_f32(rng, 8, 6))
    w, bias = _f32(rng, 6, 8), _f32(rng, 6)
    with pytest.raises(nl.ShapeError, match=r"expected bias of shape \(6,\), got \(8,\)"):
        layer.attach(w, _f32(rng, 8))
    w_before = w.copy()
    assert layer.attach(w, bias) is layer and layer.attached
    assert _close(layer.forward(x), _lora_reference(x, w, a, b, 2.0, bias))
    layer.merge()
    assert np.array_equal(w, w_before) and not np.array_equal(layer.weight, w)  # attach copied
    layer.unmerge()
    assert np.array_equal(layer.weight.view(np.uint32), w.view(np.uint32))
    layer.detach()
    with pytest.raises(nl.DetachedLayerError):
        layer.forward(x)
    with pytest.raises(nl.ConfigError, match="attach"):
        nl.LoraLinear(None, a, b, 8.0, bias=bias)
    with pytest.raises(nl.ShapeError, match=r"expected lora_b of shape \(6, 4\), got \(6, 3\)"):
        nl.LoraLinear(None, a, _f32(rng, 6, 3), 8.0)


def test_detached_fan_in_fan_out_and_large_rank(rng):
    # PEFT allows a rank above min(in, out); only from_weight keeps the seed's limit
    a, b = _f32(rng, 10, 4), _f32(rng, 3, 10)
    layer = nl.LoraLinear(None, a, b, 5.0, fan_in_fan_out=True, use_rslora=True)
    assert layer.base_shape == (4, 3)
    with pytest.raises(nl.ShapeError, match=r"\(in, out\) = \(4, 3\).*fan_in_fan_out"):
        layer.attach(_f32(rng, 3, 4))
    w = _f32(rng, 4, 3)  # stored (in, out)
    layer.attach(w)
    x = _f32(rng, 5, 4)
    assert _close(layer.forward(x), _lora_reference(x, w.T, a, b, 5.0 / np.sqrt(10)))
    layer.merge()
    assert _close(layer.weight.T, w.T.astype(np.float64) + 5.0 / np.sqrt(10) * b.astype(np.float64) @ a)
    layer.unmerge()
    assert np.array_equal(layer.weight, w)


@pytest.mark.parametrize("with_base_bias", [True, False])
def test_lora_bias_forward_merge_unmerge(rng, with_base_bias):
    w, a, b = _f32(rng, 6, 8), _f32(rng, 4, 8), _f32(rng, 6, 4)
    bias = _f32(rng, 6) if with_base_bias else None
    lb = _f32(rng, 6)
    layer = nl.LoraLinear(None, a, b, 8.0, lora_bias=lb).attach(w, bias)
    assert layer.trainable_params == 4 * (8 + 6) + 6
    x = _f32(rng, 3, 8)
    ref = _lora_reference(x, w, a, b, 2.0, bias, lb)
    assert _close(layer.forward(x), ref)
    layer.disable()
    assert _close(layer.forward(x), _lora_reference(x, w, a, 0 * b, 0.0, bias))
    layer.enable()
    layer.merge()
    expected_bias = 2.0 * lb.astype(np.float64) + (0 if bias is None else bias)
    assert _close(layer.bias, expected_bias, 1e-6)
    assert _close(layer.forward(x), ref)
    with pytest.raises(nl.MergeStateError, match="unmerge"):
        layer.lora_bias = np.zeros(6, np.float32)
    layer.unmerge()
    assert np.array_equal(layer.weight.view(np.uint32), w.view(np.uint32))
    if bias is None:
        assert layer.bias is None
    else:
        assert np.array_equal(layer.bias.view(np.uint32), bias.view(np.uint32))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_dora_forward_merge_unmerge(rng, fan_in_fan_out):
    w_oi, a, b = _f32(rng, 12, 9), _f32(rng, 3, 9), _f32(rng, 12, 3, scale=0.5)
    m, bias = np.abs(_f32(rng, 12)) + 0.5, _f32(rng, 12)
    w = np.ascontiguousarray(w_oi.T) if fan_in_fan_out else w_oi.copy()
    w_before = w.copy()
    layer = nl.LoraLinear(w, a, b, 6.0, bias=bias, magnitude=m, fan_in_fan_out=fan_in_fan_out)
    assert layer.use_dora and layer.trainable_params == 3 * (9 + 12) + 12
    x = _f32(rng, 4, 9)
    ref = _dora_reference(x, w_oi, a, b, 2.0, m, bias)
    assert _close(layer.forward(x), ref)
    assert _close(layer.forward(x[0]), ref[0])
    layer.merge()
    assert layer.merge_overhead_bytes == w.nbytes
    merged = layer.weight.T if fan_in_fan_out else layer.weight
    assert _close(merged, _dora_merged_reference(w_oi, a, b, 2.0, m), 1e-6)
    assert _close(layer.forward(x), ref)
    assert np.array_equal(layer.bias, bias)  # DoRA does not scale the bias
    layer.unmerge()
    assert layer.merge_overhead_bytes == 0
    assert np.array_equal(layer.weight.view(np.uint32), w_before.view(np.uint32))
    # the cached norm follows A and B set through the setters
    b2 = _f32(rng, 12, 3)
    layer.lora_b = b2
    assert _close(layer.forward(x), _dora_reference(x, w_oi, a, b2, 2.0, m, bias))
    with pytest.raises(nl.ConfigError, match="DoRA"):
        layer.lora_bias = np.zeros(12, np.float32)


def test_merge_dora_function(rng):
    w_oi, a, b = _f32(rng, 7, 5), _f32(rng, 2, 5), _f32(rng, 7, 2)
    m = np.abs(_f32(rng, 7)) + 0.1
    for fan_in_fan_out in (False, True):
        w = np.ascontiguousarray(w_oi.T) if fan_in_fan_out else w_oi.copy()
        nl.merge_dora(w, a, b, 0.75, m, fan_in_fan_out)
        got = w.T if fan_in_fan_out else w
        assert got.dtype == np.float32
        assert _close(got, _dora_merged_reference(w_oi, a, b, 0.75, m), 1e-6)
        v = w_oi.astype(np.float64) + 0.75 * b.astype(np.float64) @ a
        assert _close(nl.dora_weight_norm(np.ascontiguousarray(w_oi.T) if fan_in_fan_out else w_oi, a, b, 0.75,
                                          fan_in_fan_out), np.sqrt((v * v).sum(1)), 1e-12)
    # a row of W + s B A that is all zero: refused, weight untouched
    w = w_oi.copy()
    w[3] = 0
    b0 = b.copy()
    b0[3] = 0
    before = w.copy()
    with pytest.raises(nl.NonFiniteError, match="row 3"):
        nl.merge_dora(w, a, b0, 0.75, m)
    assert np.array_equal(w, before)
    ro = w_oi.copy()
    ro.flags.writeable = False
    with pytest.raises(nl.ShapeError, match="read-only"):
        nl.merge_dora(ro, a, b, 0.75, m)
    with pytest.raises(nl.ShapeError, match=r"expected magnitude of shape \(7,\), got \(5,\)"):
        nl.merge_dora(w_oi.copy(), a, b, 0.75, m[:5])


def test_from_weight_dora_starts_as_the_base_layer(rng):
    w, bias = _f32(rng, 10, 6), _f32(rng, 10)
    layer = nl.LoraLinear.from_weight(w, 2, 4.0, bias=bias, use_dora=True, lora_bias=False)
    assert np.allclose(layer.magnitude, np.sqrt((w.astype(np.float64) ** 2).sum(1)), rtol=1e-6)
    x = _f32(rng, 3, 6)
    assert _close(layer.forward(x), x.astype(np.float64) @ w.T + bias)
    plain = nl.LoraLinear.from_weight(w, 2, 4.0, lora_bias=True)
    assert np.array_equal(plain.lora_bias, np.zeros(10, np.float32)) and plain.magnitude is None


def test_attach_refused_while_merged(rng):
    layer = nl.LoraLinear.from_weight(make_weight(16, 8), 4, 8.0)
    layer.merge()
    with pytest.raises(nl.MergeStateError, match="unmerge"):
        layer.attach(make_weight(16, 8))
    with pytest.raises(nl.MergeStateError, match="unmerge"):
        layer.detach()
    with pytest.raises(nl.MergeStateError, match="unmerge"):
        layer.magnitude = np.ones(16, np.float32)


# --- the layers over the functional API -------------------------------------------------------

def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def test_variant_follows_the_optional_vectors_and_runs_the_functional_api(rng):
    """The magnitude and the LoRA bias choose the layer's variant when they are set; the
    forward, merge and parameter count then run that variant's functional call."""
    from numlora.layers import variants

    w, bias = _f32(rng, 6, 8), _f32(rng, 6)
    layer = nl.LoraLinear.from_weight(w, 2, 4.0, init="kaiming", seed=1, bias=bias)
    layer.lora_b = _f32(rng, 6, 2)
    a, b, s = layer.lora_a, layer.lora_b, layer.scaling
    x = _f32(rng, 3, 8)
    assert layer._variant is variants.LORA and layer.trainable_params == 2 * (8 + 6)
    assert np.array_equal(_bits(layer(x)), _bits(nl.lora_forward(x, w, a, b, s, bias)))
    lb = _f32(rng, 6)
    layer.lora_bias = lb
    assert layer._variant is variants.LORA_BIAS and layer.trainable_params == 2 * (8 + 6) + 6
    path_bias = bias + lb * np.float32(s)
    assert np.array_equal(_bits(layer(x)), _bits(nl.lora_forward(x, w, a, b, s, path_bias)))
    layer.lora_bias = None
    m = np.abs(_f32(rng, 6)) + 1
    layer.magnitude = m
    assert layer._variant is variants.DORA and layer.trainable_params == 2 * (8 + 6) + 6
    assert np.array_equal(_bits(layer(x)), _bits(nl.dora_forward(x, w, a, b, s, m, bias)))
    merged = w.copy()
    nl.merge_dora(merged, a, b, s, m)
    layer.merge()
    assert np.array_equal(_bits(layer.weight), _bits(merged))
    layer.unmerge()
    layer.magnitude = None
    assert layer._variant is variants.LORA and "dora" not in repr(layer)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_training_step_is_the_functional_api_bit_for_bit(rng, fan_in_fan_out, dtype):
    """A training forward and backward of LoraLinear give what lora_dropout, lora_forward
    and lora_backward give, bit for bit: the k-th forward draws its mask with the seed
    mix_seed(dropout_seed, k)."""
    w = rng.standard_normal((9, 7) if fan_in_fan_out else (7, 9)).astype(dtype)
    bias = rng.standard_normal(7).astype(dtype)
    layer = nl.LoraLinear.from_weight(w, 3, 6.0, init="kaiming", seed=2, bias=bias, fan_in_fan_out=fan_in_fan_out,
                                      dropout=0.3, dropout_seed=21).train()
    layer.lora_b = rng.standard_normal((7, 3)).astype(dtype)
    a, b, s = layer.lora_a.copy(), layer.lora_b.copy(), layer.scaling
    ga = gb = None
    for k, n in enumerate((5, 1, 300)):
        x = rng.standard_normal((n, 9)).astype(dtype)
        g = rng.standard_normal((n, 7)).astype(dtype)
        xd, state = nl.lora_dropout(x, 0.3, mix_seed(21, k))
        want = nl.lora_forward(x, w, a, b, s, bias, fan_in_fan_out=fan_in_fan_out, x_lora=xd)
        assert np.array_equal(_bits(layer(x)), _bits(want))
        dx, ga1, gb1 = nl.lora_backward(x, w, a, b, s, g, fan_in_fan_out=fan_in_fan_out, dropout=state)
        ga, gb = (ga1, gb1) if ga is None else (ga + ga1, gb + gb1)
        assert np.array_equal(_bits(layer.backward(g)), _bits(dx))
        assert np.array_equal(_bits(layer.grad_a), _bits(ga.astype(layer.grad_a.dtype)))
        assert np.array_equal(_bits(layer.grad_b), _bits(gb))


@pytest.mark.parametrize("n", [3, 40])
def test_qlora_training_step_is_the_functional_api(rng, n):
    """The QLoRA training forward is qlora_forward on the dropped input, bit for bit; the
    backward is qlora_backward's (bit for bit once the batch takes the BLAS path; a fused
    small batch reuses the forward's s x_drop A^T, which the kernel sums in its own order)."""
    w = _f32(rng, 24, 64)
    layer = nl.QLoraLinear.from_weight(w, 4, 8.0, blocksize=32, bias=_f32(rng, 24), dropout=0.25,
                                       dropout_seed=5).train()
    layer.lora_b = _f32(rng, 24, 4)
    x, g = _f32(rng, n, 64), _f32(rng, n, 24)
    xd, state = nl.lora_dropout(x, 0.25, mix_seed(5, 0))
    args = (layer.nf4, layer.lora_a, layer.lora_b, layer.scaling)
    want = nl.qlora_forward(x, *args, layer.bias, x_lora=xd)
    assert np.array_equal(_bits(layer(x)), _bits(want))
    dx, ga, gb = nl.qlora_backward(x, *args, g, dropout=state)
    got = (layer.backward(g), layer.grad_a, layer.grad_b)
    for mine, theirs in zip(got, (dx, ga, gb)):
        if n > 16:
            assert np.array_equal(_bits(mine), _bits(theirs))
        else:
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


def test_layers_pickle_and_hold_the_one_host_backend(rng):
    import pickle

    from numlora.layers._host import HOST

    layer = nl.LoraLinear.from_weight(_f32(rng, 6, 8), 2, 4.0, bias=_f32(rng, 6))
    layer.lora_b = _f32(rng, 6, 2)
    back = pickle.loads(pickle.dumps(layer))
    assert back._backend is HOST and back.to("cpu") is back and back.device == "cpu"
    x = _f32(rng, 2, 8)
    assert np.array_equal(back(x), layer(x))


def test_a_layer_pickled_before_the_layers_package_loads(rng):
    """Layers pickled by numlora before numlora/layers/ kept a device name and no variant."""
    from numlora.layers import variants

    layer = nl.LoraLinear.from_weight(_f32(rng, 6, 8), 2, 4.0, use_dora=True)
    layer.lora_b = _f32(rng, 6, 2)
    state = {k: val for k, val in layer.__dict__.items() if k not in ("_backend", "_variant")}
    old = nl.LoraLinear.__new__(nl.LoraLinear)
    old.__setstate__({**state, "_device": "cpu"})
    x = _f32(rng, 3, 8)
    assert old._variant is variants.DORA and old.device == "cpu" and "_device" not in old.__dict__
    assert np.array_equal(old(x), layer(x))
