"""The seed module's tests, as behaviour, plus what the seed got wrong."""

import numpy as np
import pytest

import numlora as nl
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
