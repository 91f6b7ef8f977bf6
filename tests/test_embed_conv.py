"""LoRA on embeddings and convolutions: the functional API, the layers, PEFT folders and
checkpoint merges, against the float64 references in tests/reference.py, finite
differences, torch's F.embedding / F.conv1d / F.conv2d and PEFT (when installed)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import numlora as nl
from numlora.errors import ConfigError, DeviceError, DTypeError, MergeStateError, ShapeError

from reference import conv_lora_ref, conv_ref, embedding_lora_ref

F32 = dict(rtol=1e-5, atol=1e-5)


def _f(rng, *shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# --- embedding ------------------------------------------------------------------------------

def _table(rng, vocab=40, dim=12, r=3, dtype=np.float32):
    return _f(rng, vocab, dim, dtype=dtype), _f(rng, r, vocab, dtype=dtype), _f(rng, dim, r, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ids_shape", [(7,), (3, 5), (0,), ()])
def test_embedding_forward_matches_reference(rng, dtype, ids_shape):
    w, a, b = _table(rng, dtype=dtype)
    ids = rng.integers(0, w.shape[0], ids_shape)
    y = nl.embedding_lora_forward(ids, w, a, b, 1.5)
    assert y.shape == ids_shape + (w.shape[1],) and y.dtype == dtype
    tol = F32 if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, embedding_lora_ref(ids, w, a, b, 1.5), **tol)
    out = np.empty_like(y)
    assert nl.embedding_lora_forward(ids, w, a, b, 1.5, out=out) is out
    np.testing.assert_array_equal(out, y)
    np.testing.assert_array_equal(nl.embedding_forward(ids, w), w[ids])


def test_embedding_against_torch(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    w, a, b = _table(rng)
    ids = rng.integers(0, w.shape[0], (4, 6))
    t = torch.from_numpy
    ref = F.embedding(t(ids), t(w)) + F.embedding(t(ids), t(a).T) @ t(b).T * 0.75
    np.testing.assert_allclose(nl.embedding_lora_forward(ids, w, a, b, 0.75), ref.numpy(), **F32)
    # gradients: autograd in float64, with a padding index
    w, a, b = _table(rng, dtype=np.float64)
    g = rng.standard_normal((4, 6, w.shape[1]))
    ta, tb = t(a).requires_grad_(), t(b).requires_grad_()
    pad = int(ids[1, 2])
    (F.embedding(t(ids), ta.T, padding_idx=pad) @ tb.T * 0.75).backward(t(g))
    ga, gb = nl.embedding_lora_backward(ids, a, b, 0.75, g, padding_idx=pad)
    np.testing.assert_allclose(ga, ta.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-12, atol=1e-12)
    assert not ga[:, pad].any()


def test_embedding_backward_finite_differences(rng):
    w, a, b = _table(rng, vocab=9, dim=5, r=2, dtype=np.float64)
    ids = np.array([[1, 4, 4], [0, 8, 1]])
    g = rng.standard_normal((2, 3, 5))
    s = 1.25

    def loss(a_, b_):
        return float(np.sum(embedding_lora_ref(ids, w, a_, b_, s) * g))

    ga, gb = nl.embedding_lora_backward(ids, a, b, s, g)
    eps = 1e-6
    for arr, grad, other in ((a, ga, "a"), (b, gb, "b")):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            p, m = arr.copy(), arr.copy()
            p[idx] += eps
            m[idx] -= eps
            lp = loss(p, b) if other == "a" else loss(a, p)
            lm = loss(m, b) if other == "a" else loss(a, m)
            num[idx] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7)
    # accumulation into buffers
    buf_a, buf_b = ga.copy(), gb.copy()
    nl.embedding_lora_backward(ids, a, b, s, g, grad_a=buf_a, grad_b=buf_b)
    np.testing.assert_allclose(buf_a, 2 * ga, rtol=1e-12)
    np.testing.assert_allclose(buf_b, 2 * gb, rtol=1e-12)


def test_embedding_merge_is_peft_delta_and_unmerge_bit_exact(rng):
    w, a, b = _table(rng)
    before = w.copy()
    rec = nl.merge_embedding(w, a, b, 2.0, record=True)
    np.testing.assert_allclose(w, before + 2.0 * (b.astype(np.float64) @ a).T, **F32)
    nl.unmerge_embedding(w, a, b, 2.0, record=rec)
    assert np.array_equal(w.view(np.uint32), before.view(np.uint32))
    with pytest.raises(MergeStateError, match="already used"):
        nl.unmerge_embedding(w, a, b, 2.0, record=rec)


def test_embedding_refusals(rng):
    w, a, b = _table(rng)
    with pytest.raises(ShapeError, match=r"ids must be in 0..39 \(num_embeddings = 40\), got 40 at flat index 1"):
        nl.embedding_lora_forward(np.array([3, 40]), w, a, b, 1.0)
    with pytest.raises(ShapeError, match="got -1"):
        nl.embedding_lora_forward(np.array([-1]), w, a, b, 1.0)
    with pytest.raises(DTypeError, match="integer token ids, got dtype float64"):
        nl.embedding_lora_forward(np.array([1.0]), w, a, b, 1.0)
    with pytest.raises(ShapeError, match="lora_a"):
        nl.embedding_lora_forward(np.array([1]), w, a.T.copy(), b, 1.0)
    with pytest.raises(DTypeError, match="float16"):
        nl.embedding_lora_forward(np.array([1]), w.astype(np.float16), a, b, 1.0)


# --- convolution ------------------------------------------------------------------------------

CONV_CASES = [
    # (x shape, weight shape, options, ref pads)
    ((2, 3, 13), (4, 3, 3), dict(stride=2, padding=1, dilation=2), ((1, 1),)),
    ((3, 11), (5, 3, 1), dict(), ((0, 0),)),
    ((2, 3, 10), (4, 3, 4), dict(padding="same"), ((1, 2),)),
    ((2, 3, 9, 8), (5, 3, 3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2)), ((1, 1), (2, 2))),
    ((3, 7, 7), (4, 3, 3, 3), dict(padding="valid"), ((0, 0), (0, 0))),
    ((1, 2, 6, 6), (3, 2, 1, 1), dict(stride=2), ((0, 0), (0, 0))),
    ((2, 2, 7, 6), (3, 2, 2, 3), dict(padding="same", dilation=(2, 1)), ((1, 1), (1, 1))),
]


def _conv_adapter(rng, wshape, r=2, dtype=np.float32):
    nd = len(wshape) - 2
    return (_f(rng, *wshape, dtype=dtype), _f(rng, r, *wshape[1:], dtype=dtype),
            _f(rng, wshape[0], r, *(1,) * nd, dtype=dtype), _f(rng, wshape[0], dtype=dtype))


def _ref_opts(opts, pads):
    return dict(stride=opts.get("stride", 1), pads=pads, dilation=opts.get("dilation", 1))


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_forward_matches_reference(rng, case, dtype):
    xs, ws, opts, pads = CONV_CASES[case]
    x = _f(rng, *xs, dtype=dtype)
    w, a, b, bias = _conv_adapter(rng, ws, dtype=dtype)
    batched = len(xs) == len(ws)
    xb = x if batched else x[None]
    want = conv_lora_ref(xb, w, a, b, 0.5, bias, **_ref_opts(opts, pads))
    want = want if batched else want[0]
    y = nl.conv_lora_forward(x, w, a, b, 0.5, bias, **opts)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    assert y.shape == want.shape and y.dtype == dtype
    np.testing.assert_allclose(y, want, **tol)
    # the flat factor shapes give the same result; out= is filled in place
    out = np.empty_like(y)
    nl.conv_lora_forward(x, w, a.reshape(a.shape[0], -1), b.reshape(b.shape[:2]), 0.5, bias, out=out, **opts)
    np.testing.assert_array_equal(out, y)
    base = conv_ref(xb, w, None, **_ref_opts(opts, pads))
    np.testing.assert_allclose(nl.conv_forward(x, w, **opts), base if batched else base[0], **tol)


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_against_torch(rng, case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    xs, ws, opts, _ = CONV_CASES[case]
    x = _f(rng, *xs)
    w, a, b, bias = _conv_adapter(rng, ws)
    conv = F.conv1d if len(ws) == 3 else F.conv2d
    t = torch.from_numpy
    ref = conv(t(x), t(w), t(bias), **opts) + conv(conv(t(x), t(a), **opts), t(b)) * 0.5
    np.testing.assert_allclose(nl.conv_lora_forward(x, w, a, b, 0.5, bias, **opts), ref.numpy(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", [0, 3, 6])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_conv_backward_against_torch_autograd(rng, case, p):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    xs, ws, opts, _ = CONV_CASES[case]
    x = _f(rng, *xs, dtype=np.float64)
    w, a, b, _ = _conv_adapter(rng, ws, dtype=np.float64)
    conv = F.conv1d if len(ws) == 3 else F.conv2d
    n = x.shape[0]
    xd = x if p == 0 else nl.lora_dropout(x.reshape(n, -1), p, 11)[0].reshape(x.shape)
    y = nl.conv_lora_forward(x, w, a, b, 0.7, x_lora=None if p == 0 else xd, **opts)
    g = rng.standard_normal(y.shape)
    t = torch.from_numpy
    tx, ta, tb = t(x.copy()).requires_grad_(), t(a).requires_grad_(), t(b).requires_grad_()
    txd = tx if p == 0 else tx * t((xd != 0) / (1 - p))
    out = conv(tx, t(w), **opts) + conv(conv(txd, ta, **opts), tb) * 0.7
    np.testing.assert_allclose(y, out.detach().numpy(), rtol=1e-11, atol=1e-11)
    out.backward(t(g))
    dx, ga, gb = nl.conv_lora_backward(x, w, a, b, 0.7, g, dropout=None if p == 0 else (p, 11), **opts)
    for got, want in ((dx, tx.grad), (ga, ta.grad), (gb, tb.grad)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-10)


def test_conv_backward_finite_differences(rng):
    xs, ws, opts, pads = CONV_CASES[3]
    x = _f(rng, 1, *xs[1:], dtype=np.float64)
    w, a, b, bias = _conv_adapter(rng, ws, dtype=np.float64)
    ro = _ref_opts(opts, pads)
    g = rng.standard_normal(conv_lora_ref(x, w, a, b, 0.5, bias, **ro).shape)

    def loss(x_, a_, b_):
        return float(np.sum(conv_lora_ref(x_, w, a_, b_, 0.5, bias, **ro) * g))

    dx, ga, gb = nl.conv_lora_backward(x, w, a, b, 0.5, g, **opts)
    eps = 1e-6
    for k, grad in enumerate((dx, ga, gb)):
        arrs = [x, a, b]
        num = np.zeros_like(arrs[k])
        for idx in np.ndindex(arrs[k].shape):
            p, m = [t.copy() for t in arrs], [t.copy() for t in arrs]
            p[k][idx] += eps
            m[k][idx] -= eps
            num[idx] = (loss(*p) - loss(*m)) / (2 * eps)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ws", [(4, 3, 3), (5, 3, 3, 2), (6, 4, 1, 1)])
def test_conv_merge_matches_forward_and_unmerge_is_bit_exact(rng, ws):
    w, a, b, bias = _conv_adapter(rng, ws)
    x = _f(rng, 2, ws[1], *(7,) * (len(ws) - 2))
    y = nl.conv_lora_forward(x, w, a, b, 1.5, bias, padding=1)
    before = w.copy()
    for _ in range(3):
        rec = nl.merge_conv(w, a, b, 1.5, record=True)
        np.testing.assert_allclose(nl.conv_forward(x, w, bias, padding=1), y, rtol=1e-4, atol=1e-4)
        nl.unmerge_conv(w, a, b, 1.5, record=rec)
        assert np.array_equal(w.view(np.uint32), before.view(np.uint32))
    # a Fortran-ordered weight is merged through a copy and written back
    wf = np.asfortranarray(before)
    rec = nl.merge_conv(wf, a, b, 1.5, record=True)
    np.testing.assert_allclose(wf, before + 1.5 * (b.reshape(ws[0], -1) @ a.reshape(a.shape[0], -1)).reshape(ws),
                               **F32)
    nl.unmerge_conv(wf, a, b, 1.5, record=rec)
    assert np.array_equal(wf, before)


def test_conv_refusals(rng):
    w, a, b, _ = _conv_adapter(rng, (4, 3, 3, 3))
    x = _f(rng, 1, 3, 6, 6)
    with pytest.raises(ConfigError, match="only groups=1 is supported"):
        nl.conv_lora_forward(x, w, a, b, 1.0, groups=3)
    with pytest.raises(ConfigError, match="only padding_mode='zeros' is supported, got 'reflect'"):
        nl.conv_lora_forward(x, w, a, b, 1.0, padding_mode="reflect")
    with pytest.raises(ConfigError, match="padding='same' needs stride 1"):
        nl.conv_lora_forward(x, w, a, b, 1.0, padding="same", stride=2)
    with pytest.raises(ShapeError, match=r"expected x of shape \(N, 3, \.\.\., \.\.\.\)"):
        nl.conv_lora_forward(_f(rng, 1, 4, 6, 6), w, a, b, 1.0)
    with pytest.raises(ShapeError, match="smaller than the kernel"):
        nl.conv_lora_forward(_f(rng, 1, 3, 2, 2), w, a, b, 1.0)
    with pytest.raises(ShapeError, match="1x1 convolution"):
        nl.conv_lora_forward(x, w, a, np.ones((4, 2, 3, 3), np.float32), 1.0)
    with pytest.raises(ShapeError, match="lora_a of shape"):
        nl.conv_lora_forward(x, w, np.ones((2, 3, 2, 2), np.float32), b, 1.0)


# --- layers ---------------------------------------------------------------------------------

def test_conv_layer_training_matches_functional(rng):
    w, a, b, bias = _conv_adapter(rng, (4, 3, 3, 3))
    layer = nl.LoraConv(w, a, b, 4.0, bias=bias, padding=1, stride=2, dropout=0.3, dropout_seed=5)
    x = _f(rng, 2, 3, 8, 8)
    assert np.allclose(layer(x), nl.conv_lora_forward(x, w, a, b, 2.0, bias, padding=1, stride=2))
    layer.train()
    y = layer(x)
    g = _f(rng, *y.shape)
    dx = layer.backward(g)
    seed = nl.mix_seed(5, 0)
    xd = nl.lora_dropout(x.reshape(2, -1), 0.3, seed)[0].reshape(x.shape)
    np.testing.assert_array_equal(y, nl.conv_lora_forward(x, w, a, b, 2.0, bias, padding=1, stride=2, x_lora=xd))
    dx2, ga, gb = nl.conv_lora_backward(x, w, a, b, 2.0, g, padding=1, stride=2, dropout=(0.3, seed))
    np.testing.assert_allclose(dx, dx2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.grad_a, ga, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.grad_b, gb, rtol=1e-6, atol=1e-6)
    opt = nl.AdamW(layer.parameters(), lr=0.1)
    opt.step()
    assert not np.array_equal(layer.lora_a, a) and layer.lora_a.shape == a.shape
    with pytest.raises(DeviceError, match="CPU only"):
        layer.to("cuda")


def test_layers_merge_unmerge_and_embedding_training(rng):
    w, a, b, bias = _conv_adapter(rng, (4, 3, 3))
    layer = nl.LoraConv(w, a, b, 2.0, bias=bias, padding=1)
    x = _f(rng, 3, 9)
    y = layer(x)
    layer.merge()
    np.testing.assert_allclose(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert np.array_equal(layer.weight, w)
    tw, ta, tb = _table(rng)
    emb = nl.LoraEmbedding(tw, ta, tb, 6.0, padding_idx=2)
    ids = np.array([[2, 5, 5], [7, 0, 2]])
    y = emb(ids)
    np.testing.assert_allclose(y, embedding_lora_ref(ids, tw, ta, tb, 2.0), **F32)
    emb.merge()
    np.testing.assert_allclose(emb(ids), y, **F32)
    emb.unmerge()
    assert np.array_equal(emb.weight, tw)
    emb.train()
    g = _f(rng, *y.shape)
    assert emb(ids) is not None and emb.backward(g) is None
    ga, gb = nl.embedding_lora_backward(ids, ta, tb, 2.0, g, padding_idx=2)
    np.testing.assert_allclose(emb.grad_a, ga, rtol=1e-6)
    np.testing.assert_allclose(emb.grad_b, gb, rtol=1e-6)
    fresh = nl.LoraEmbedding.from_weight(tw, 4, 8.0, seed=0)
    np.testing.assert_array_equal(fresh(ids), tw[ids])  # A = 0: the base's output


# --- PEFT --------------------------------------------------------------------------------------

def _torch_model(torch, seed=0):
    torch.manual_seed(seed)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30, 8, padding_idx=0)
            self.c1 = torch.nn.Conv1d(8, 6, 3, padding=1)
            self.c2 = torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)

        def forward(self, ids):
            h = self.emb(ids).transpose(1, 2)  # (N, 8, L)
            h = self.c1(h)  # (N, 6, L)
            return self.c2(h[:, :, None, :].expand(-1, -1, 4, -1).contiguous())

    return M()


def _peft_model(torch, peft):
    model = peft.get_peft_model(_torch_model(torch), peft.LoraConfig(r=2, lora_alpha=5,
                                                                     target_modules=["emb", "c1", "c2"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def _numlora_forward(adapter, base, ids):
    """The torch model's forward through numlora's layers."""
    h = adapter["emb"](ids).transpose(0, 2, 1)
    h = adapter["c1"](np.ascontiguousarray(h))
    return adapter["c2"](np.ascontiguousarray(np.broadcast_to(h[:, :, None, :], h.shape[:2] + (4, h.shape[2]))))


def _attach(adapter, base):
    sd = {k: v.detach().numpy() for k, v in base.state_dict().items()}
    adapter["emb"].attach(sd["emb.weight"])
    adapter["c1"].attach(sd["c1.weight"], sd["c1.bias"], padding=1)
    adapter["c2"].attach(sd["c2.weight"], sd["c2.bias"], stride=2, padding=1)


def test_peft_folder_round_trip_both_ways(tmp_path, rng):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = _peft_model(torch, peft)
    ids = rng.integers(0, 30, (2, 7))
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).numpy()
    model.save_pretrained(tmp_path / "theirs")
    ours = nl.load_peft_adapter(tmp_path / "theirs")
    assert isinstance(ours["emb"], nl.LoraEmbedding) and isinstance(ours["c2"], nl.LoraConv)
    _attach(ours, _torch_model(torch))
    np.testing.assert_allclose(_numlora_forward(ours, None, ids), want, rtol=1e-5, atol=1e-5)
    # ours -> PEFT: changed adapters, saved by numlora, loaded by PeftModel.from_pretrained
    for name in ours:
        layer = ours[name]
        layer.lora_a = layer.lora_a + _f(rng, *layer.lora_a.shape, scale=0.1)
    ours.save_peft(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(_torch_model(torch), tmp_path / "ours").eval()
    with torch.no_grad():
        theirs = loaded(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(theirs, _numlora_forward(ours, None, ids), rtol=1e-5, atol=1e-5)


def test_numlora_merge_of_checkpoint_matches_peft_merge(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from numlora.convert import merge_checkpoint
    from numlora.io.safetensors import load_file, save_file

    model = _peft_model(torch, peft)
    model.save_pretrained(tmp_path / "adapter")
    base = _torch_model(torch)
    save_file(str(tmp_path / "base.safetensors"), {k: v.detach().numpy() for k, v in base.state_dict().items()})
    merge_checkpoint(str(tmp_path / "base.safetensors"), str(tmp_path / "adapter"), str(tmp_path / "out.safetensors"))
    merged = load_file(str(tmp_path / "out.safetensors"))
    merged = merged[0] if isinstance(merged, tuple) else merged  # (tensors, metadata) in older versions
    want = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    assert set(merged) == set(want)
    for k in want:
        np.testing.assert_allclose(merged[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_peft_folder_refuses_dora_on_conv(tmp_path, rng):
    ad = nl.LoraAdapter(nl.LoraConfig(rank=2, alpha=4, target_modules=["c"], use_dora=True))
    with pytest.raises(ConfigError, match="use_dora=True, which numlora supports on Linear layers only"):
        ad.add_conv("c", _f(rng, 2, 3, 3, 3), _f(rng, 4, 2, 1, 1))
    ad = nl.LoraAdapter(nl.LoraConfig(rank=2, alpha=4, target_modules=["e"]))
    ad.add_embedding("e", _f(rng, 2, 10), _f(rng, 6, 2))
    ad.save_peft(tmp_path / "a")
    back = nl.load_peft_adapter(tmp_path / "a")
    assert np.array_equal(back["e"].lora_a, ad["e"].lora_a) and np.array_equal(back["e"].lora_b, ad["e"].lora_b)
    assert os.path.exists(tmp_path / "a" / "adapter_config.json")


def test_conv_chunks_of_columns_give_the_same_result(rng, monkeypatch):
    import numlora.conv as conv_module

    w, a, b, bias = _conv_adapter(rng, (4, 3, 3, 3))
    x = _f(rng, 5, 3, 8, 7)
    whole = nl.conv_lora_forward(x, w, a, b, 0.5, bias, padding=1)
    g = _f(rng, *whole.shape)
    grads = nl.conv_lora_backward(x, w, a, b, 0.5, g, padding=1)
    grads_drop = nl.conv_lora_backward(x, w, a, b, 0.5, g, padding=1, dropout=(0.3, 4))
    cols_per_image = 3 * 9 * 8 * 7 * 4
    for images in (1, 2, 3):
        monkeypatch.setattr(conv_module, "COLUMN_BYTES", images * cols_per_image)
        np.testing.assert_array_equal(nl.conv_lora_forward(x, w, a, b, 0.5, bias, padding=1), whole)
        for want, got in ((grads, nl.conv_lora_backward(x, w, a, b, 0.5, g, padding=1)),
                          (grads_drop, nl.conv_lora_backward(x, w, a, b, 0.5, g, padding=1, dropout=(0.3, 4)))):
            for u, v in zip(want, got):
                np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-5)


def test_out_may_overlap_the_inputs(rng):
    w, a, b, bias = _conv_adapter(rng, (3, 3, 1, 1))
    x = _f(rng, 2, 3, 4, 4)
    want = nl.conv_lora_forward(x, w, a, b, 0.5, bias)
    xc = x.copy()
    assert nl.conv_lora_forward(xc, w, a, b, 0.5, bias, out=xc) is xc
    np.testing.assert_array_equal(xc, want)
    table, ea, eb = _table(rng)
    want = nl.embedding_lora_forward([1, 2], table, ea, eb, 1.0)
    tc = table.copy()
    got = nl.embedding_lora_forward([1, 2], tc, ea, eb, 1.0, out=tc[:2])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(tc[:2], want)


def test_detached_conv_layer_from_a_folder_takes_its_options_on_attach(tmp_path, rng):
    w, a, b, bias = _conv_adapter(rng, (4, 3, 3))
    ad = nl.LoraAdapter(nl.LoraConfig(rank=2, alpha=4, target_modules=["c"]))
    ad.add_conv("c", a, b)
    ad.save_peft(tmp_path / "a")
    layer = nl.load_peft_adapter(tmp_path / "a")["c"]
    assert not layer.attached and layer.kernel_size == (3,)
    with pytest.raises(nl.DetachedLayerError, match="attach"):
        layer(_f(rng, 1, 3, 9))
    layer.attach(w, bias, stride=2, padding=1)
    x = _f(rng, 2, 3, 9)
    np.testing.assert_allclose(layer(x), conv_lora_ref(x, w, a, b, 2.0, bias, stride=2, pads=((1, 1),)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ShapeError, match=r"expected weight of shape \(4, 3, 3\)"):
        layer.attach(w[:, :, :2])


def test_conv_column_buffers_are_per_thread_and_reused():
    """The forward / backward reuse their column buffers per thread (numlora._scratch):
    threads running at once get the single-thread results; free_buffers drops them and the
    next call makes them again, with the same results."""
    import threading

    from numlora import conv

    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    a = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal((6, 2, 1, 1)).astype(np.float32)
    xs = [rng.standard_normal((2, 3, 9 + i, 8)).astype(np.float32) for i in range(4)]
    want = [nl.conv_lora_forward(x, w, a, b, 0.5, padding=1) for x in xs]
    g = [rng.standard_normal(y.shape).astype(np.float32) for y in want]
    want_b = [nl.conv_lora_backward(x, w, a, b, 0.5, gg, padding=1) for x, gg in zip(xs, g)]
    got = [None] * len(xs)

    def work(i):
        for _ in range(5):
            got[i] = (nl.conv_lora_forward(xs[i], w, a, b, 0.5, padding=1),
                      nl.conv_lora_backward(xs[i], w, a, b, 0.5, g[i], padding=1))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (y, grads), wy, wb in zip(got, want, want_b):
        assert np.array_equal(y, wy)
        assert all(np.array_equal(p, q) for p, q in zip(grads, wb))
    conv.free_buffers()
    assert np.array_equal(nl.conv_lora_forward(xs[0], w, a, b, 0.5, padding=1), want[0])
