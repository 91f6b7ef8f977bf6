"""LoraLinear, QLoraLinear, LoraAdapter and AdamW on the GPU (``layer.to("cuda")``),
against the same objects on the CPU.

Run as tests/test_cuda.py is: on a GPU ``pytest -m gpu tests/test_cuda_layers.py``; without
one, ``test_cuda_layers_on_the_simulator`` re-runs this file in a subprocess with
``NUMBA_ENABLE_CUDASIM=1`` and tiny launch sizes.
"""

from __future__ import annotations

import numpy as np
import pytest

import numlora as nl
from numlora.errors import ConfigError, DeviceError, DTypeError, MergeStateError, ShapeError, TrainStateError
from numlora.ops import mix_seed

from cuda_sim import GPU, SIM, cuda_test, d, f32, h, run_simulator_pass, tiny_blocks  # noqa: F401


@pytest.mark.slow
@pytest.mark.skipif(SIM or GPU, reason="the tests run directly in this process")
def test_cuda_layers_on_the_simulator():
    run_simulator_pass(__file__, 10)


def test_cpu_layer_device_is_cpu_and_to_cpu_is_self():
    layer = nl.LoraLinear.from_weight(np.ones((4, 6), np.float32), 2, 4.0)
    assert layer.device == "cpu" and layer.to("cpu") is layer
    with pytest.raises(ConfigError, match="'cuda' or 'cpu'"):
        layer.to("gpu")
    ad = nl.LoraAdapter(nl.LoraConfig(rank=2, alpha=4.0))
    assert ad.device == "cpu" and ad.to("cpu") is ad


# --- helpers -------------------------------------------------------------------------------------



def close(got, want, rtol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def _dense(rng, out_f=7, in_f=10, r=2, fio=False, bias=True):
    w = f32(rng, in_f, out_f) if fio else f32(rng, out_f, in_f)
    layer = nl.LoraLinear.from_weight(w, r, 4.0, bias=f32(rng, out_f) if bias else None, fan_in_fan_out=fio)
    layer.lora_b = f32(rng, out_f, r)
    return layer


def _qlora(rng, out_f=6, in_f=16, r=2, bs=8):
    layer = nl.QLoraLinear.from_weight(f32(rng, out_f, in_f), r, 4.0, blocksize=bs, bias=f32(rng, out_f))
    layer.lora_b = f32(rng, out_f, r)
    return layer


# --- forward, moves ---------------------------------------------------------------------------------

@cuda_test
@pytest.mark.parametrize("fio", [False, True])
def test_lora_linear_forward_and_round_trip(fio):
    rng = np.random.default_rng(1)
    cpu = _dense(rng, fio=fio)
    g = cpu.to("cuda")
    assert g is not cpu and g.device == "cuda" and cpu.device == "cpu"
    assert nl.is_device_array(g.weight) and nl.is_device_array(g.lora_a) and nl.is_device_array(g.bias)
    assert isinstance(cpu.weight, np.ndarray)  # the host layer is untouched
    for x in (f32(rng, 3, 10), f32(rng, 10)):
        close(h(g(d(x))), cpu(x))
    g.disable()
    cpu.disable()
    x = f32(rng, 3, 10)
    close(h(g(d(x))), cpu(x))
    g.enable()
    back = g.to("cpu")
    assert back.device == "cpu"
    for name in ("weight", "lora_a", "lora_b", "bias"):
        np.testing.assert_array_equal(getattr(back, name), getattr(cpu, name))
        assert getattr(back, name).dtype == np.float32


@cuda_test
def test_qlora_forward_and_round_trip_bit_exact():
    rng = np.random.default_rng(2)
    for dq in (False, True):
        cpu = nl.QLoraLinear.from_weight(f32(rng, 6, 16), 2, 4.0, blocksize=8, double_quant=dq, bias=f32(rng, 6))
        cpu.lora_b = f32(rng, 6, 2)
        g = cpu.to("cuda")
        assert g.device == "cuda" and g.blocksize == 8 and g.memory_saved_bytes() > 0
        for x in (f32(rng, 3, 16), f32(rng, 16)):
            close(h(g(d(x))), cpu(x))
        close(h(g.merged_weight()), cpu.merged_weight())
        g.disable()
        cpu.disable()
        x = f32(rng, 2, 16)
        close(h(g(d(x))), cpu(x))
        back = g.to("cpu")
        t0, t1 = cpu.nf4, back.nf4
        np.testing.assert_array_equal(t1.packed, t0.packed)
        np.testing.assert_array_equal(t1.scales, t0.scales)
        assert t1.double_quant == dq
        np.testing.assert_array_equal(back.lora_a, cpu.lora_a)
        np.testing.assert_array_equal(back.bias, cpu.bias)


# --- merge -------------------------------------------------------------------------------------------

@cuda_test
@pytest.mark.parametrize("fio", [False, True])
def test_merge_on_gpu_equals_cpu_merge_and_unmerge_restores_exactly(fio):
    rng = np.random.default_rng(3)
    cpu = _dense(rng, fio=fio)
    g = cpu.to("cuda")
    w0 = h(g.weight).copy()
    g.merge()
    assert g.merged and g.merge_overhead_bytes == w0.nbytes
    cpu.merge()
    close(h(g.weight), cpu.weight)
    x = f32(rng, 3, 10)
    close(h(g(d(x))), cpu(x))
    back = g.to("cpu")  # a merged GPU layer may come back; it unmerges from its saved copy
    g.unmerge()
    np.testing.assert_array_equal(h(g.weight), w0)  # bit-exact: the device copy of the base
    assert g.merge_overhead_bytes == 0
    back.unmerge()
    np.testing.assert_array_equal(back.weight, w0)
    with pytest.raises(MergeStateError, match="merged layer to the GPU"):
        cpu.to("cuda")


# --- training -----------------------------------------------------------------------------------------

@cuda_test
@pytest.mark.parametrize("kind", ["dense", "dense-fio", "qlora"])
def test_training_forward_backward_and_adamw_match_cpu(kind):
    rng = np.random.default_rng(4)
    cpu = _qlora(rng) if kind == "qlora" else _dense(rng, fio=kind == "dense-fio")
    g = cpu.to("cuda")
    in_f, out_f = cpu.in_features, cpu.out_features
    cpu.train()
    g.train()
    opt_c = nl.AdamW(cpu.parameters(), lr=0.01, weight_decay=0.1)
    opt_g = nl.AdamW(g.parameters(), lr=0.01, weight_decay=0.1)
    for step in range(3):
        x, go = f32(rng, 3, in_f), f32(rng, 3, out_f)
        close(h(g(d(x))), cpu(x))
        dxg = g.backward(d(go))
        dxc = cpu.backward(go)
        close(h(dxg), dxc)
        close(h(g.grad_a), cpu.grad_a)
        close(h(g.grad_b), cpu.grad_b)
        opt_c.step()
        opt_g.step()
        np.testing.assert_allclose(h(g.lora_a), cpu.lora_a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(h(g.lora_b), cpu.lora_b, rtol=1e-6, atol=1e-6)
        if step == 0:
            # gradients accumulate across backward calls until zero_grad
            assert nl.is_device_array(opt_g.params[0].grad)
        opt_c.zero_grad()
        opt_g.zero_grad()
        assert not np.any(h(g.grad_a))
    st = opt_g.state(opt_g.params[0])
    assert st[0] == 3 and nl.is_device_array(st[1])
    # 1-D input, need_grad_x=False, a disabled layer gives only dx
    x, go = f32(rng, in_f), f32(rng, out_f)
    g(d(x))
    cpu(x)
    assert g.backward(d(go), need_grad_x=False) is None
    cpu.backward(go, need_grad_x=False)
    close(h(g.grad_b), cpu.grad_b)
    g.disable()
    cpu.disable()
    x, go = f32(rng, 2, in_f), f32(rng, 2, out_f)
    close(h(g(d(x))), cpu(x))
    close(h(g.backward(d(go))), cpu.backward(go))
    assert g.saved_bytes == 0


@cuda_test
@pytest.mark.parametrize("kind", ["dense", "dense-fio", "qlora"])
def test_training_with_dropout_draws_the_cpu_masks(kind):
    """A GPU layer with dropout trains like its CPU twin: the k-th training forward of
    each uses the seed mix_seed(dropout_seed, k), and the device draws the same masks."""
    rng = np.random.default_rng(8)
    cpu = _qlora(rng) if kind == "qlora" else _dense(rng, fio=kind == "dense-fio")
    cpu.dropout = 0.4
    g = cpu.to("cuda")
    assert g.dropout == 0.4 and g.dropout_seed == cpu.dropout_seed
    in_f, out_f = cpu.in_features, cpu.out_features
    cpu.train()
    g.train()
    opt_c = nl.AdamW(cpu.parameters(), lr=0.01)
    opt_g = nl.AdamW(g.parameters(), lr=0.01)
    for rows in (3, 1, 4):
        x, go = f32(rng, rows, in_f), f32(rng, rows, out_f)
        close(h(g(d(x))), cpu(x))
        assert g.saved_bytes == x.nbytes  # the dropped input, kept for backward
        close(h(g.backward(d(go))), cpu.backward(go))
        close(h(g.grad_a), cpu.grad_a)
        close(h(g.grad_b), cpu.grad_b)
        opt_c.step()
        opt_g.step()
        opt_c.zero_grad()
        opt_g.zero_grad()
    # the masks differ from one forward to the next (the per-call seed), and eval has none
    x = f32(rng, 2, in_f)
    g.eval()
    cpu.eval()
    close(h(g(d(x))), cpu(x))
    assert g.saved_bytes == 0


@cuda_test
@pytest.mark.parametrize("kind", ["dense", "qlora"])
def test_training_step_is_the_functional_api_bit_for_bit(kind):
    """A GPU layer's training step is lora_dropout (the seed mix_seed(dropout_seed, k) for
    the k-th forward), the forward on the dropped input and the public backward, on the
    device, bit for bit."""
    rng = np.random.default_rng(9)
    cpu = _qlora(rng) if kind == "qlora" else _dense(rng)
    cpu.dropout = 0.4
    g = cpu.to("cuda").train()
    forward, backward = (nl.qlora_forward, nl.qlora_backward) if kind == "qlora" else (nl.lora_forward,
                                                                                         nl.lora_backward)
    args = (g.nf4 if kind == "qlora" else g.weight, g.lora_a, g.lora_b, g.scaling)
    for k in range(2):
        x, go = d(f32(rng, 3, cpu.in_features)), d(f32(rng, 3, cpu.out_features))
        xd, state = nl.lora_dropout(x, 0.4, mix_seed(cpu.dropout_seed, k))
        np.testing.assert_array_equal(h(g(x)), h(forward(x, *args, g.bias, x_lora=xd)))
        g.zero_grad()
        dx, ga, gb = backward(x, *args, go, dropout=state)
        np.testing.assert_array_equal(h(g.backward(go)), h(dx))
        np.testing.assert_array_equal(h(g.grad_a), h(ga))
        np.testing.assert_array_equal(h(g.grad_b), h(gb))


@cuda_test
def test_clip_grad_norm_on_device_grads():
    rng = np.random.default_rng(5)
    cpu = _dense(rng)
    g = cpu.to("cuda").train()
    cpu.train()
    x, go = f32(rng, 3, 10), f32(rng, 3, 7)
    g(d(x))
    g.backward(d(go))
    cpu(x)
    cpu.backward(go)
    nc = nl.clip_grad_norm(cpu.parameters(), 0.1)
    ng = nl.clip_grad_norm(g.parameters(), 0.1)
    assert abs(nc - ng) <= 1e-5 * nc
    close(h(g.grad_a), cpu.grad_a)


# --- adapter -----------------------------------------------------------------------------------------------

@cuda_test
def test_adapter_to_cuda_and_back():
    rng = np.random.default_rng(6)
    ad = nl.LoraAdapter(nl.LoraConfig(rank=2, alpha=4.0))
    ws = {"q": f32(rng, 6, 8), "v": f32(rng, 5, 8)}
    for n, w in ws.items():
        ad.add_layer(n, w)
        ad[n].lora_b = f32(rng, ad[n].out_features, 2)
    ga = ad.to("cuda")
    assert ga.device == "cuda" and ad.device == "cpu" and ga.layer_names == ["q", "v"]
    assert all(ga[n].device == "cuda" for n in ga)
    x = f32(rng, 3, 8)
    for n in ad:
        close(h(ga.forward_layer(n, d(x))), ad.forward_layer(n, x))
    ga.add_layer("k", f32(rng, 4, 8))  # built on the host, moved
    assert ga["k"].device == "cuda"
    ga.merge_all()
    ga.unmerge_all()
    back = ga.to("cpu")
    for n in ad:
        np.testing.assert_array_equal(back[n].weight, ad[n].weight)
        np.testing.assert_array_equal(back[n].lora_b, ad[n].lora_b)
    # attach device weights to a detached GPU adapter
    det = nl.LoraAdapter(nl.LoraConfig(rank=2, alpha=4.0))
    det.add_lora("q", ad["q"].lora_a, ad["q"].lora_b)
    gd = det.to("cuda")
    with pytest.raises(DeviceError, match="to_device"):
        gd.attach({"q": ws["q"]})
    gd.attach({"q": d(ws["q"])})
    close(h(gd["q"](d(x))), ad["q"](x))


# --- errors ------------------------------------------------------------------------------------------------

@cuda_test
def test_errors():
    rng = np.random.default_rng(7)
    cpu = _dense(rng)
    g = cpu.to("cuda")
    with pytest.raises(DeviceError, match="to_device"):
        g(f32(rng, 2, 10))  # host input to a GPU layer
    with pytest.raises(DeviceError, match="to_device"):
        g.lora_a = f32(rng, 2, 10)
    with pytest.raises(ShapeError):
        g.lora_a = d(f32(rng, 3, 10))
    g.lora_a = d(cpu.lora_a)
    g.train()
    g(d(f32(rng, 2, 10)))
    with pytest.raises(DeviceError, match="to_device"):
        g.backward(f32(rng, 2, 7))
    g.backward(d(f32(rng, 2, 7)))  # a refused backward keeps the forward's cache; this one uses it
    with pytest.raises(TrainStateError):
        g.backward(d(f32(rng, 2, 7)))
    with pytest.raises(DeviceError):
        p = nl.Parameter(d(np.zeros(3, np.float32)))
        p.grad = np.zeros(3, np.float32)
    for host in (cpu, nl.QLoraLinear.from_weight(f32(rng, 7, 16), 2, 4.0, blocksize=8)):  # a device x, host layer
        x = d(f32(rng, 2, host.in_features))
        with pytest.raises(DeviceError, match=r"numlora.to_host\(x\)"):
            host(x)
        host.train()
        with pytest.raises(DeviceError, match="on the host like the layer"):
            host(x)
        host(h(x))
        with pytest.raises(DeviceError, match=r"to_host\(grad_out\)"):
            host.backward(d(f32(rng, 2, host.out_features)))
        host.eval()
    w64 = nl.LoraLinear.from_weight(np.ones((4, 6)), 2, 4.0)
    with pytest.raises(DTypeError, match="float32"):
        w64.to("cuda")
    bf16 = nl.QLoraLinear.from_weight(f32(rng, 4, 16), 2, 4.0, blocksize=8, compute_dtype="bfloat16")
    with pytest.raises(DeviceError, match="compute_dtype='bfloat16'"):
        bf16.to("cuda")
    t = nl.to_device(nl.quantize_nf4(f32(rng, 4, 16), 8))
    with pytest.raises(DeviceError, match="CPU only"):
        nl.nf4_matmul(d(f32(rng, 2, 16)), t, compute_dtype="float16")
    h(nl.nf4_matmul(d(f32(rng, 2, 16)), t, compute_dtype="float32"))
    dora = nl.LoraLinear.from_weight(f32(rng, 4, 6), 2, 4.0, use_dora=True)
    with pytest.raises(ConfigError, match="CPU only"):
        dora.to("cuda")
    ad = nl.LoraAdapter(nl.LoraConfig(rank=2, alpha=4.0, use_dora=True))
    ad.add_layer("q", f32(rng, 4, 6))
    with pytest.raises(ConfigError, match="layer 'q'"):
        ad.to("cuda")
