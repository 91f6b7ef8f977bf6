"""Training: backward (finite differences in float64), dropout, AdamW, clipping, layers."""

import json
import math

import numpy as np
import pytest

import numlora as nl
from numlora import _nf4_products

from conftest import JIT_DISABLED
from test_process import _run

MASK64 = (1 << 64) - 1


# --- independent references ------------------------------------------------------------

def _splitmix(z):
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def keep_mask_ref(n, m, p, seed):
    """The documented mask, in Python integers: row i's state is splitmix64(seed +
    (i + 1) * golden), one xorshift64 step per element, keep iff (s >> 11) >= ceil(p 2^53)."""
    thresh = math.ceil(p * 2.0 ** 53)
    out = np.zeros((n, m), bool)
    for i in range(n):
        s = _splitmix(seed + (i + 1) * 0x9E3779B97F4A7C15) or 1
        for j in range(m):
            s ^= (s << 13) & MASK64
            s ^= s >> 7
            s ^= (s << 17) & MASK64
            out[i, j] = (s >> 11) >= thresh
    return out


def layer_seed_ref(seed, k):
    """Seed of a layer's k-th training forward (numlora.dropout.mix_seed, as documented)."""
    return _splitmix(seed + (k + 1) * 0xD1B54A32D192ED03)


def forward_ref(x, w, a, b, s, mask=None, p=0.0, fan_in_fan_out=False):
    """float64 y = x W^T + s (x_d A^T) B^T, x_d = x * mask / (1 - p)."""
    x, w, a, b = (np.asarray(t, np.float64) for t in (x, w, a, b))
    w = w.T if fan_in_fan_out else w
    xd = x if mask is None else x * mask / (1.0 - p)
    return x @ w.T + s * (xd @ a.T) @ b.T


def fd_grads(f, arrays, h=1e-6):
    """Central finite differences of the scalar f(*arrays) in float64, for every element."""
    arrays = [np.array(t, np.float64) for t in arrays]
    grads = []
    for t in arrays:
        g = np.zeros_like(t)
        for idx in np.ndindex(t.shape):
            old = t[idx]
            t[idx] = old + h
            fp = f(*arrays)
            t[idx] = old - h
            fm = f(*arrays)
            t[idx] = old
            g[idx] = (fp - fm) / (2 * h)
        grads.append(g)
    return grads


def close(got, ref, rel):
    got = np.asarray(got, np.float64)
    return np.abs(got - ref).max() <= rel * max(np.abs(ref).max(), 1e-30)


def _problem(rng, n=4, in_f=6, out_f=5, r=2, dtype=np.float64):
    x = rng.standard_normal((n, in_f)).astype(dtype)
    w = rng.standard_normal((out_f, in_f)).astype(dtype)
    a = rng.standard_normal((r, in_f)).astype(dtype)
    b = rng.standard_normal((out_f, r)).astype(dtype)
    c = rng.standard_normal((n, out_f)).astype(dtype)  # loss = sum(y * c), so dL/dy = c
    return x, w, a, b, c


# --- dropout -------------------------------------------------------------------------------

@pytest.mark.parametrize("p,seed", [(0.3, 0), (0.5, 12345), (0.9, 2 ** 64 - 1), (1e-3, 7)])
def test_dropout_matches_reference_bit_for_bit(rng, p, seed):
    x = rng.standard_normal((5, 37)).astype(np.float32)
    xd, state = nl.lora_dropout(x, p, seed)
    assert state == (p, seed) and isinstance(state, nl.DropoutState)
    mask = keep_mask_ref(5, 37, p, seed)
    want = np.where(mask, x * np.float32(1.0 / (1.0 - p)), np.float32(0))
    assert xd.dtype == np.float32 and np.array_equal(xd.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(nl.dropout_keep_mask(x.shape, p, seed), mask)
    # 1-D input is row 0; a row's mask does not depend on the rows around it
    assert np.array_equal(nl.lora_dropout(x[0], p, seed)[0], xd[0])
    assert np.array_equal(nl.lora_dropout(x[:2], p, seed)[0], xd[:2])
    out = np.empty_like(x)
    assert nl.lora_dropout(x, p, seed, out=out)[0] is out and np.array_equal(out, xd)


def test_dropout_zero_is_identity_and_empty_batches(rng):
    x = rng.standard_normal((3, 8))
    assert nl.lora_dropout(x, 0.0, 1)[0] is x
    assert nl.lora_dropout(np.empty((0, 8)), 0.5, 1)[0].shape == (0, 8)


def test_dropout_statistics(rng):
    p = 0.3
    x = rng.standard_normal((400, 1000)).astype(np.float32) + 2.0
    xd, _ = nl.lora_dropout(x, p, 99)
    kept = xd != 0
    rate = kept.mean()
    sigma = math.sqrt(p * (1 - p) / x.size)
    assert abs(rate - (1 - p)) < 5 * sigma
    assert np.allclose(xd[kept], x[kept] / (1 - p), rtol=1e-6)
    # inverted dropout keeps the expectation
    assert abs(xd.mean() - x.mean()) < 5 * x.std() / math.sqrt(x.size) / math.sqrt(1 - p) + 1e-3
    # rows use different streams and another seed gives another mask: masks agree on
    # about p^2 + (1 - p)^2 of the elements, as independent ones would
    other = nl.lora_dropout(x, p, 100)[0] != 0
    agree = p * p + (1 - p) ** 2
    assert abs((other == kept).mean() - agree) < 0.01
    assert abs((kept[:-1] == kept[1:]).mean() - agree) < 0.01


def test_dropout_errors():
    x = np.ones((2, 3), np.float32)
    for p in (1.0, -0.1, float("nan")):
        with pytest.raises(nl.ConfigError, match="dropout"):
            nl.lora_dropout(x, p, 0)
    with pytest.raises(nl.ConfigError, match="64 bits"):
        nl.lora_dropout(x, 0.5, 2 ** 64)
    with pytest.raises(nl.ConfigError):
        nl.lora_dropout(x, 0.5, -1)
    with pytest.raises(nl.DTypeError):
        nl.lora_dropout(x, 0.5, 1.5)
    with pytest.raises(nl.DTypeError, match="dtype float32"):
        nl.lora_dropout(x, 0.5, 0, out=np.empty((2, 3)))


# --- functional backward, finite differences ------------------------------------------------

@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("scaling", [2.0, 8.0 / math.sqrt(2)])  # alpha / r, rsLoRA alpha / sqrt(r)
def test_lora_backward_finite_differences(rng, fan_in_fan_out, p, scaling):
    x, w, a, b, c = _problem(rng)
    if fan_in_fan_out:
        w = np.ascontiguousarray(w.T)
    seed = 31
    mask = keep_mask_ref(*x.shape, p, seed) if p else None
    if p:
        assert 0 < mask.sum() < mask.size

    def loss(x_, a_, b_):
        return float(np.sum(forward_ref(x_, w, a_, b_, scaling, mask, p, fan_in_fan_out) * c))

    fx, fa, fb = fd_grads(loss, [x, a, b])
    dropout = nl.lora_dropout(x, p, seed)[1] if p else None
    dx, da, db = nl.lora_backward(x, w, a, b, scaling, c, fan_in_fan_out=fan_in_fan_out, dropout=dropout)
    assert dx.dtype == np.float64 and dx.shape == x.shape and da.shape == a.shape and db.shape == b.shape
    for got, ref in ((dx, fx), (da, fa), (db, fb)):
        assert close(got, ref, 1e-7)
    # the forward on the dropped input is the reference the differences were taken on
    xd = nl.lora_dropout(x, p, seed)[0]
    y = nl.lora_forward(x, w, a, b, 0.0, fan_in_fan_out=fan_in_fan_out)
    y += scaling * (xd @ a.T) @ b.T
    assert close(y, forward_ref(x, w, a, b, scaling, mask, p, fan_in_fan_out), 1e-12)


def test_lora_backward_options(rng):
    x, w, a, b, c = _problem(rng)
    dx, da, db = nl.lora_backward(x, w, a, b, 1.5, c)
    # given x_drop / u: same results; accumulation adds; need_grad_x=False
    xd, st = nl.lora_dropout(x, 0.25, 4)
    ref = nl.lora_backward(x, w, a, b, 1.5, c, dropout=st)
    u = xd @ a.T
    got = nl.lora_backward(x, w, a, b, 1.5, c, dropout=st, x_drop=xd, u=u)
    for g1, g2 in zip(ref, got):
        assert np.allclose(g1, g2, rtol=1e-12, atol=1e-12)
    ga, gb = np.ones_like(a), np.ones_like(b)
    none, ga2, gb2 = nl.lora_backward(x, w, a, b, 1.5, c, grad_a=ga, grad_b=gb, need_grad_x=False)
    assert none is None and ga2 is ga and gb2 is gb
    assert np.allclose(ga, da + 1) and np.allclose(gb, db + 1)
    # one row as a vector
    v = nl.lora_backward(x[1], w, a, b, 1.5, c[1])
    one = nl.lora_backward(x[1:2], w, a, b, 1.5, c[1:2])
    assert v[0].shape == (x.shape[1],) and np.allclose(v[0], one[0][0]) and np.allclose(v[1], one[1])
    # float32 in, float32 out, agrees with float64
    g32 = nl.lora_backward(*(t.astype(np.float32) for t in (x, w, a, b)), 1.5, c.astype(np.float32))
    for g, ref64 in zip(g32, (dx, da, db)):
        assert g.dtype == np.float32 and close(g, ref64, 1e-5)
    # an empty batch: zero gradients
    e = nl.lora_backward(np.empty((0, 6)), w, a, b, 1.5, np.empty((0, 5)))
    assert e[0].shape == (0, 6) and not e[1].any() and not e[2].any()


def test_lora_backward_errors(rng):
    x, w, a, b, c = _problem(rng)
    with pytest.raises(nl.ShapeError, match=r"grad_out of shape \(4, 5\)"):
        nl.lora_backward(x, w, a, b, 1.0, c[:3])
    with pytest.raises(nl.ShapeError, match="out_features = 5"):
        nl.lora_backward(x, w, a, b, 1.0, c[:, :4])
    with pytest.raises(nl.ShapeError, match="lora_b"):
        nl.lora_backward(x, w, a, b.T, 1.0, c)
    with pytest.raises(nl.ShapeError, match="grad_a"):
        nl.lora_backward(x, w, a, b, 1.0, c, grad_a=np.zeros((3, 6)))
    with pytest.raises(nl.DTypeError, match="grad_b"):
        nl.lora_backward(x, w, a, b, 1.0, c, grad_b=np.zeros((5, 2), np.float32))
    with pytest.raises(nl.ConfigError, match="x_drop given without dropout"):
        nl.lora_backward(x, w, a, b, 1.0, c, x_drop=x)
    with pytest.raises(nl.ConfigError, match="dropout must be"):
        nl.lora_backward(x, w, a, b, 1.0, c, dropout=0.5)
    with pytest.raises(nl.ShapeError, match="u of shape"):
        nl.lora_backward(x, w, a, b, 1.0, c, u=np.zeros((4, 3)))
    with pytest.raises(nl.DTypeError):
        nl.lora_backward(x.astype(np.int32), w, a, b, 1.0, c)


# --- NF4 base ----------------------------------------------------------------------------



@pytest.mark.parametrize("n", [3, 40])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("tile_rows", [None, 7])
def test_qlora_backward_finite_differences(rng, kernel_path, monkeypatch, n, p, tile_rows):
    """Small batches run the fused transposed kernel, large ones decoded tiles + BLAS
    (several tiles when tile_rows is set); both against float64 differences of the
    dequantized model."""
    out_f, in_f, r = 24, 64, 3
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    t = nl.quantize_nf4(w, 32, double_quant=True)
    if tile_rows:
        monkeypatch.setattr(_nf4_products, "TILE_ELEMS", tile_rows * in_f)
    wd = t.dequantize().astype(np.float64)
    x = rng.standard_normal((n, in_f)).astype(np.float32)
    a = rng.standard_normal((r, in_f)).astype(np.float32)
    b = rng.standard_normal((out_f, r)).astype(np.float32)
    c = rng.standard_normal((n, out_f)).astype(np.float32)
    s = 16 / math.sqrt(r)
    mask = keep_mask_ref(n, in_f, p, 5) if p else None

    # the loss is linear in each argument: differences are exact up to rounding, so a
    # large step keeps them cheap (one column of x at a time would also do)
    def loss(x_, a_, b_):
        return float(np.sum(forward_ref(x_, wd, a_, b_, s, mask, p) * c))

    fx, fa, fb = fd_grads(loss, [x, a, b], h=1e-3) if n == 3 else (None, None, None)
    if n != 3:  # analytic float64 reference (checked against differences above at n = 3)
        xd = x.astype(np.float64) * (mask / (1 - p) if p else 1)
        h = c.astype(np.float64) @ b
        fb = s * c.T.astype(np.float64) @ (xd @ a.T.astype(np.float64))
        fa = s * h.T @ xd
        fx = c @ wd + s * (h @ a) * (mask / (1 - p) if p else 1)
    dropout = nl.DropoutState(p, 5) if p else None
    dx, da, db = nl.qlora_backward(x, t, a, b, s, c, dropout=dropout)
    assert dx.dtype == da.dtype == db.dtype == np.float32
    for got, ref in ((dx, fx), (da, fa), (db, fb)):
        assert close(got, ref, 2e-5)
    # nf4_matmul_t shares the G deq(W) path
    assert close(nl.nf4_matmul_t(c, t), c.astype(np.float64) @ wd, 2e-5)


def test_qlora_backward_errors(rng):
    t = nl.quantize_nf4(rng.standard_normal((8, 16)).astype(np.float32), 16)
    a, b = np.ones((2, 16), np.float32), np.ones((8, 2), np.float32)
    with pytest.raises(nl.ShapeError, match="grad_out"):
        nl.qlora_backward(np.ones((3, 16), np.float32), t, a, b, 1.0, np.ones((2, 8), np.float32))
    with pytest.raises(nl.ShapeError, match="lora_a"):
        nl.qlora_backward(np.ones((3, 16), np.float32), t, a[:, :8], b, 1.0, np.ones((3, 8), np.float32))
    with pytest.raises(nl.DTypeError, match="NF4Tensor"):
        nl.qlora_backward(np.ones((3, 16), np.float32), np.ones((8, 16)), a, b, 1.0, np.ones((3, 8), np.float32))


# --- layers --------------------------------------------------------------------------------

def _dense_layer(rng, dtype=np.float64, fan_in_fan_out=False, **kw):
    w = rng.standard_normal((6, 5) if fan_in_fan_out else (5, 6)).astype(dtype)
    layer = nl.LoraLinear.from_weight(w, 2, 4.0, init="kaiming", seed=1, fan_in_fan_out=fan_in_fan_out,
                                      bias=rng.standard_normal(5).astype(dtype), **kw)
    layer.lora_b = rng.standard_normal((5, 2))
    return layer


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("p,rslora", [(0.0, False), (0.5, True)])
def test_layer_backward_finite_differences(rng, fan_in_fan_out, p, rslora):
    layer = _dense_layer(rng, fan_in_fan_out=fan_in_fan_out, dropout=p, dropout_seed=77, use_rslora=rslora)
    assert not layer.training
    x = rng.standard_normal((4, 6))
    c = rng.standard_normal((4, 5))
    w, a, b, s = layer.weight, layer.lora_a.copy(), layer.lora_b.copy(), layer.scaling
    assert s == (4.0 / math.sqrt(2) if rslora else 2.0)
    layer.train()
    y = layer(x)
    mask = keep_mask_ref(4, 6, p, layer_seed_ref(77, 0)) if p else None
    ref_y = forward_ref(x, w, a, b, s, mask, p, fan_in_fan_out) + layer.bias
    assert close(y, ref_y, 1e-12)

    def loss(x_, a_, b_):
        return float(np.sum(forward_ref(x_, w, a_, b_, s, mask, p, fan_in_fan_out) * c))

    fx, fa, fb = fd_grads(loss, [x, a, b])
    assert layer.grad_a is None and layer.grad_b is None
    dx = layer.backward(c)
    for got, ref in ((dx, fx), (layer.grad_a, fa), (layer.grad_b, fb)):
        assert close(got, ref, 1e-7)
    # a second training forward draws the next mask; gradients accumulate
    ga = layer.grad_a.copy()
    layer(x)
    mask2 = keep_mask_ref(4, 6, p, layer_seed_ref(77, 1)) if p else None
    layer.backward(c, need_grad_x=False)
    xd2 = x * (mask2 / (1 - p) if p else 1)
    assert close(layer.grad_a - ga, s * (c @ b).T @ xd2, 1e-10)


def test_layer_eval_mode_and_states(rng):
    layer = _dense_layer(rng, dropout=0.5)
    x = rng.standard_normal((3, 6))
    ref = forward_ref(x, layer.weight, layer.lora_a, layer.lora_b, layer.scaling) + layer.bias
    assert close(layer(x), ref, 1e-12)  # eval mode: no dropout
    with pytest.raises(nl.TrainStateError, match="training mode first"):
        layer.backward(np.ones((3, 5)))
    assert layer.train() is layer and layer.training
    y = layer(x)
    assert not close(y, ref, 1e-3)  # dropout applied
    assert layer.saved_bytes == 3 * 2 * 8 + 3 * 6 * 8
    with pytest.raises(nl.ShapeError, match=r"grad_out of shape \(3, 5\)"):
        layer.backward(np.ones((2, 5)))
    layer.backward(np.ones((3, 5)))
    with pytest.raises(nl.TrainStateError):  # once per forward
        layer.backward(np.ones((3, 5)))
    layer(x)
    layer.eval()
    with pytest.raises(nl.TrainStateError):  # eval() drops what the forward kept
        layer.backward(np.ones((3, 5)))
    layer.train()
    layer(x)
    layer.train(False)
    layer(x)
    assert not layer.training
    with pytest.raises(nl.ConfigError):
        layer.train("yes")
    with pytest.raises(nl.ConfigError, match="dropout"):
        nl.LoraLinear.from_weight(np.ones((4, 4)), 2, 2, dropout=1.0)
    # a merged layer does not train
    layer.train()
    layer.merge()
    with pytest.raises(nl.TrainStateError, match="merged"):
        layer(x)
    layer.unmerge()
    # a 1-D input gives a 1-D gradient
    layer.dropout = 0.0
    layer(x[0])
    g = layer.backward(np.ones(5))
    assert g.shape == (6,)


def test_layer_disabled_trains_nothing(rng):
    layer = _dense_layer(rng).train()
    layer.disable()
    x, c = rng.standard_normal((3, 6)), rng.standard_normal((3, 5))
    y = layer(x)
    assert close(y, x @ layer.weight.T + layer.bias, 1e-12)
    dx = layer.backward(c)
    assert close(dx, c @ layer.weight, 1e-12) and layer.grad_a is None


def test_parameters_share_arrays_and_zero_grad(rng):
    layer = _dense_layer(rng).train()
    pa, pb = layer.parameters()
    assert pa.name == "lora_a" and pa.value is layer.lora_a and pb.value is layer.lora_b
    assert pa.grad is None
    layer(rng.standard_normal((3, 6)))
    layer.backward(rng.standard_normal((3, 5)))
    assert pa.grad is layer.grad_a and pb.grad is layer.grad_b and pa.grad.any()
    layer.zero_grad()
    assert not layer.grad_a.any() and not layer.grad_b.any()
    opt = nl.AdamW(layer.parameters(), lr=0.1)
    layer(rng.standard_normal((3, 6)))
    layer.backward(rng.standard_normal((3, 5)))
    before = layer.lora_a.copy()
    opt.step()
    assert not np.array_equal(before, layer.lora_a)
    opt.zero_grad()
    assert not layer.grad_a.any()
    # a new A assigned to the layer is what the parameter (and the optimizer) sees
    layer.lora_a = np.zeros((2, 6))
    assert pa.value is layer.lora_a


def test_training_loop_learns_a_low_rank_task(rng):
    """A frozen random base, a target that differs from it by a rank-2 map: LoRA training
    with AdamW drives the loss down by orders of magnitude (dense and NF4 base)."""
    in_f, out_f = 32, 24
    w = rng.standard_normal((out_f, in_f)).astype(np.float32) / np.sqrt(in_f)
    delta = (rng.standard_normal((out_f, 2)) @ rng.standard_normal((2, in_f)) / in_f).astype(np.float32)
    for layer, base in ((nl.LoraLinear.from_weight(w, 4, 4, init="kaiming", seed=0), w),
                        (nl.QLoraLinear.from_weight(w, 4, 4, blocksize=32, init="kaiming", seed=0), None)):
        base = layer.dequantize_weight() if base is None else base
        target = base + delta
        layer.train()
        opt = nl.AdamW(layer.parameters(), lr=0.02)
        losses = []
        for _ in range(300):
            x = rng.standard_normal((32, in_f)).astype(np.float32)
            y = layer(x)
            err = y - x @ target.T
            losses.append(float(np.mean(err ** 2)))
            layer.backward(2 * err / err.size, need_grad_x=False)
            nl.clip_grad_norm(layer.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        assert losses[-1] < 1e-3 * losses[0], (type(layer).__name__, losses[0], losses[-1])


@pytest.mark.parametrize("n", [2, 30])
def test_qlora_layer_backward_matches_functional(rng, n):
    w = rng.standard_normal((16, 64)).astype(np.float32)
    layer = nl.QLoraLinear.from_weight(w, 4, 8, blocksize=64, dropout=0.2, dropout_seed=9,
                                       bias=rng.standard_normal(16).astype(np.float32))
    layer.lora_b = rng.standard_normal((16, 4)).astype(np.float32)
    layer.train()
    x = rng.standard_normal((n, 64)).astype(np.float32)
    c = rng.standard_normal((n, 16)).astype(np.float32)
    y = layer(x)
    seed = layer_seed_ref(9, 0)
    xd, st = nl.lora_dropout(x, 0.2, seed)
    mask = keep_mask_ref(n, 64, 0.2, seed)
    ref = forward_ref(x, layer.dequantize_weight(), layer.lora_a, layer.lora_b, layer.scaling, mask, 0.2) + layer.bias
    assert close(y, ref, 1e-5)
    dx = layer.backward(c)
    fdx, fda, fdb = nl.qlora_backward(x, layer.nf4, layer.lora_a, layer.lora_b, layer.scaling, c, dropout=st)
    assert np.allclose(dx, fdx, rtol=1e-6, atol=1e-6 * np.abs(fdx).max())
    assert np.allclose(layer.grad_a, fda, rtol=1e-6, atol=1e-6 * np.abs(fda).max())
    assert np.allclose(layer.grad_b, fdb, rtol=1e-6, atol=1e-6 * np.abs(fdb).max())
    assert layer(x[:1]).shape == (1, 16) and layer.backward(c[:1], need_grad_x=False) is None


def _bits(a):
    return None if a is None else (a.dtype, a.shape, a.tobytes())


@pytest.mark.parametrize("kind,n,p,xdt", [("dense", 3, 0.3, np.float32), ("dense", 40, 0.0, np.float32),
                                          ("dense", 5, 0.2, np.float64), ("dense-fio", 1, 0.5, np.float32),
                                          ("nf4", 3, 0.25, np.float32), ("nf4", 40, 0.25, np.float32),
                                          ("nf4", 1, 0.0, np.float32)])
def test_layer_training_step_is_the_public_functional_api_bit_for_bit(rng, kind, n, p, xdt):
    """A layer's training forward and backward are lora_dropout, lora_forward (x_lora,
    u_out) and lora_backward (u) (qlora_* over NF4), with the seed mix_seed(dropout_seed, k)
    for the k-th forward: the same bits, gradients accumulated over two steps."""
    w = rng.standard_normal((24, 64)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    fio = kind == "dense-fio"
    if kind == "nf4":
        layer = nl.QLoraLinear.from_weight(w, 4, 8.0, bias=bias, dropout=p, dropout_seed=5)
        base = layer.nf4
        forward, backward, kw = nl.qlora_forward, nl.qlora_backward, {}
    else:
        wl = np.ascontiguousarray(w.T) if fio else w
        layer = nl.LoraLinear.from_weight(wl, 4, 8.0, bias=bias, fan_in_fan_out=fio, dropout=p, dropout_seed=5)
        base = layer.weight
        forward, backward, kw = nl.lora_forward, nl.lora_backward, {"fan_in_fan_out": fio}
    layer.lora_b = rng.standard_normal(layer.lora_b.shape).astype(np.float32)
    a, b, s = layer.lora_a.copy(), layer.lora_b.copy(), layer.scaling
    layer.train()
    dtype = np.result_type(xdt, np.float32)
    ga, gb = np.zeros(a.shape, np.float32), np.zeros(b.shape, np.float32)  # the layer's gradients
    into = dtype == np.float32  # else each step's float64 gradients are added into them
    for k in range(2):
        x = rng.standard_normal((n, 64)).astype(xdt)
        g = rng.standard_normal((n, 24)).astype(xdt)
        y, dx = layer(x), layer.backward(g)
        xd, st = nl.lora_dropout(x.astype(dtype), p, nl.mix_seed(5, k))
        u = np.empty((n, 4), dtype)
        y_ref = forward(x, base, a, b, s, bias, x_lora=xd, u_out=u, **kw)
        dx_ref, ga_k, gb_k = backward(x, base, a, b, s, g, dropout=st if p else None, x_drop=xd if p else None,
                                      u=u, grad_a=ga if into else None, grad_b=gb if into else None, **kw)
        if not into:
            ga += ga_k
            gb += gb_k
        assert _bits(y) == _bits(y_ref) and _bits(dx) == _bits(dx_ref)
    assert _bits(layer.grad_a) == _bits(ga) and _bits(layer.grad_b) == _bits(gb)


# --- AdamW and clipping ----------------------------------------------------------------------

def adamw_ref(p, grads, lr, b1, b2, eps, wd):
    """torch.optim.AdamW's documented algorithm, in float64."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        g = g.astype(np.float64)
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1 ** t)
        vhat = v / (1 - b2 ** t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_reference(rng, dtype, wd):
    p0 = rng.standard_normal((7, 5)).astype(dtype)
    grads = [rng.standard_normal((7, 5)).astype(dtype) * 10 ** rng.uniform(-3, 1) for _ in range(6)]
    param = nl.Parameter(p0.copy(), name="w")
    opt = nl.AdamW([param], lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd)
    for g in grads:
        param.grad = g.copy()
        opt.step()
    ref = adamw_ref(p0, grads, 0.05, 0.8, 0.99, 1e-6, wd)
    assert close(param.value, ref, 1e-6 if dtype == np.float32 else 1e-12)
    step, m, v = opt.state(param)
    assert step == 6 and m.dtype == dtype


def test_adamw_skips_missing_grads_and_validates(rng):
    a = nl.Parameter(np.ones(3, np.float32), name="a")
    b = nl.Parameter(np.ones(3, np.float32), name="b")
    opt = nl.AdamW([a, b], lr=0.1)
    a.grad = np.ones(3, np.float32)
    opt.step()
    assert np.array_equal(b.value, np.ones(3)) and opt.state(b) is None and opt.state(a)[0] == 1
    assert np.allclose(a.value, 1 - 0.1)  # the first step moves by lr * sign(g)
    with pytest.raises(nl.ConfigError, match="empty"):
        nl.AdamW([])
    with pytest.raises(nl.DTypeError, match="Parameter"):
        nl.AdamW([np.ones(3)])
    with pytest.raises(nl.ConfigError, match="betas"):
        nl.AdamW([a], betas=(0.9, 1.0))
    with pytest.raises(nl.ConfigError, match="lr"):
        nl.AdamW([a], lr=-1)
    with pytest.raises(nl.DTypeError, match="float32"):
        a.grad = np.ones(3)
    with pytest.raises(nl.ShapeError):
        a.grad = np.ones(4, np.float32)
    with pytest.raises(nl.ShapeError, match="C-contiguous"):
        nl.Parameter(np.ones((3, 4), np.float32).T)
    with pytest.raises(nl.DTypeError):
        nl.Parameter([1.0, 2.0])


def test_clip_grad_norm(rng):
    ps = [nl.Parameter(np.zeros(s, np.float32)) for s in ((3, 4), (5,), (2,))]
    grads = [rng.standard_normal(p.value.shape).astype(np.float32) for p in ps[:2]]
    for p, g in zip(ps, grads):
        p.grad = g.copy()
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    assert nl.clip_grad_norm(ps, 1e9) == pytest.approx(total, rel=1e-12)
    assert all(np.array_equal(p.grad, g) for p, g in zip(ps, grads))
    got = nl.clip_grad_norm(ps, 0.5)
    assert got == pytest.approx(total, rel=1e-12)
    for p, g in zip(ps, grads):
        assert np.allclose(p.grad, g * (0.5 / (total + 1e-6)), rtol=1e-6)
    assert nl.clip_grad_norm(ps, 1.0) == pytest.approx(0.5, rel=1e-5)
    ps[0].grad[0, 0] = np.nan
    with pytest.raises(nl.NonFiniteError):
        nl.clip_grad_norm(ps, 1.0)


# --- thread-count independence -----------------------------------------------------------------

CHECKSUMS = """
    import hashlib, json, numpy as np, numlora as nl, numba
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 300)).astype(np.float32)
    w = rng.standard_normal((40, 300)).astype(np.float32)
    h = {'threads': numba.get_num_threads()}
    xd, st = nl.lora_dropout(x, 0.37, 2024)
    h['drop'] = hashlib.sha256(xd.tobytes()).hexdigest()
    layer = nl.QLoraLinear.from_weight(w, 8, 16, blocksize=64, dropout=0.1, dropout_seed=3)
    layer.lora_b = rng.standard_normal((40, 8)).astype(np.float32)
    layer.train()
    for n in (4, 64):
        y = layer(x[:n])
        dx = layer.backward(y)
        h[f'q{n}'] = hashlib.sha256(y.tobytes() + dx.tobytes() + layer.grad_a.tobytes()).hexdigest()
    opt = nl.AdamW(layer.parameters(), lr=0.01, weight_decay=0.1)
    opt.step()
    h['adamw'] = hashlib.sha256(layer.lora_a.tobytes() + layer.lora_b.tobytes()).hexdigest()
    print(json.dumps(h))
"""


@pytest.mark.slow
@pytest.mark.skipif(JIT_DISABLED, reason="thread count is meaningless without the JIT")
def test_training_does_not_depend_on_thread_count():
    one = json.loads(_run(CHECKSUMS, NUMBA_NUM_THREADS="1"))
    two = json.loads(_run(CHECKSUMS, NUMBA_NUM_THREADS="2"))
    assert (one.pop("threads"), two.pop("threads")) == (1, 2)
    assert one == two
