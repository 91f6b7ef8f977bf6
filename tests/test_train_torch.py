"""numlora's training path against torch.autograd and torch.optim.AdamW (CPU, float32)."""

import numpy as np
import pytest

import numlora as nl

torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")


def _rel(got, ref):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    return np.abs(got - ref).max() / np.abs(ref).max()


def _torch_grads(x, w, a, b, bias, s, c, keep=None, p=0.0, fan_in_fan_out=False):
    """PEFT's LoRA Linear forward in torch, y = x W^T + b + s * (drop(x) A^T) B^T with the
    given keep mask, and the gradients of sum(y * c) by autograd."""
    tx = torch.tensor(x, requires_grad=True)
    ta = torch.tensor(a, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    tw = torch.tensor(w)
    base = tx @ tw if fan_in_fan_out else torch.nn.functional.linear(tx, tw)
    if bias is not None:
        base = base + torch.tensor(bias)
    xd = tx if keep is None else tx * torch.tensor(keep.astype(np.float32)) / (1 - p)
    y = base + s * torch.nn.functional.linear(torch.nn.functional.linear(xd, ta), tb)
    (y * torch.tensor(c)).sum().backward()
    return y.detach().numpy(), tx.grad.numpy(), ta.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_dense_layer_matches_autograd(rng, p, fan_in_fan_out, n):
    out_f, in_f, r = 48, 80, 8
    w = (rng.standard_normal((out_f, in_f)) * 0.1).astype(np.float32)
    if fan_in_fan_out:
        w = np.ascontiguousarray(w.T)
    layer = nl.LoraLinear.from_weight(w, r, 16, init="kaiming", seed=3, fan_in_fan_out=fan_in_fan_out,
                                      bias=rng.standard_normal(out_f).astype(np.float32), dropout=p,
                                      dropout_seed=11, use_rslora=True)
    layer.lora_b = rng.standard_normal((out_f, r)).astype(np.float32)
    x = rng.standard_normal((n, in_f)).astype(np.float32)
    c = rng.standard_normal((n, out_f)).astype(np.float32)
    layer.train()
    y = layer(x)
    keep = None
    if p:
        keep = nl.ops.dropout_keep_mask(x.shape, p, nl.ops.mix_seed(11, 0))
    ty, tdx, tda, tdb = _torch_grads(x, w, layer.lora_a, layer.lora_b, layer.bias, layer.scaling, c, keep, p,
                                     fan_in_fan_out)
    dx = layer.backward(c)
    assert _rel(y, ty) <= 1e-5
    assert _rel(dx, tdx) <= 1e-5
    assert _rel(layer.grad_a, tda) <= 1e-5
    assert _rel(layer.grad_b, tdb) <= 1e-5


@pytest.mark.parametrize("n", [3, 40])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_qlora_layer_matches_autograd_on_the_dequantized_base(rng, n, p):
    out_f, in_f, r = 96, 256, 16
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    layer = nl.QLoraLinear.from_weight(w, r, 32, blocksize=64, double_quant=True, dropout=p, dropout_seed=5)
    layer.lora_b = (rng.standard_normal((out_f, r)) * 0.1).astype(np.float32)
    x = rng.standard_normal((n, in_f)).astype(np.float32)
    c = rng.standard_normal((n, out_f)).astype(np.float32)
    layer.train()
    y = layer(x)
    dx = layer.backward(c)
    keep = nl.ops.dropout_keep_mask(x.shape, p, nl.ops.mix_seed(5, 0)) if p else None
    ty, tdx, tda, tdb = _torch_grads(x, layer.dequantize_weight(), layer.lora_a, layer.lora_b, None,
                                     layer.scaling, c, keep, p)
    assert _rel(y, ty) <= 1e-5
    assert _rel(dx, tdx) <= 1e-5
    assert _rel(layer.grad_a, tda) <= 1e-5
    assert _rel(layer.grad_b, tdb) <= 1e-5


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adamw_matches_torch(rng, wd):
    shapes = [(16, 80), (48, 16)]
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    params = [nl.Parameter(v.copy(), name=f"p{i}") for i, v in enumerate(values)]
    tparams = [torch.nn.Parameter(torch.tensor(v)) for v in values]
    opt = nl.AdamW(params, lr=3e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=wd)
    topt = torch.optim.AdamW(tparams, lr=3e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=wd)
    for step in range(8):
        for p, tp in zip(params, tparams):
            g = (rng.standard_normal(p.value.shape) * 10.0 ** (step % 3 - 1)).astype(np.float32)
            p.grad = g
            tp.grad = torch.tensor(g.copy())
        if step == 4:  # a learning-rate change between steps
            opt.lr = 1e-3
            for group in topt.param_groups:
                group["lr"] = 1e-3
        opt.step()
        topt.step()
    for p, tp, v0 in zip(params, tparams, values):
        ref = tp.detach().numpy()
        assert np.abs(ref - v0).max() > 1e-3  # the steps moved the values well beyond the tolerance
        assert _rel(p.value, ref) <= 1e-5
        step, m, v = opt.state(p)
        tstate = topt.state[tp]
        assert step == int(tstate["step"]) == 8
        assert _rel(m, tstate["exp_avg"].numpy()) <= 1e-5
        assert _rel(v, tstate["exp_avg_sq"].numpy()) <= 1e-5


def test_clip_grad_norm_matches_torch(rng):
    grads = [rng.standard_normal(s).astype(np.float32) for s in ((5, 7), (9,))]
    params = [nl.Parameter(np.zeros_like(g), grad=g.copy()) for g in grads]
    tparams = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for tp, g in zip(tparams, grads):
        tp.grad = torch.tensor(g.copy())
    total = nl.clip_grad_norm(params, 0.7)
    ttotal = torch.nn.utils.clip_grad_norm_(tparams, 0.7)
    assert total == pytest.approx(float(ttotal), rel=1e-6)
    for p, tp in zip(params, tparams):
        assert np.allclose(p.grad, tp.grad.numpy(), rtol=1e-6, atol=1e-7)
