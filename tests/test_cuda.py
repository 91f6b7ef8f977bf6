"""The numba.cuda kernels (numlora.cuda) against the CPU kernels and tests/reference.py.

How these run:
- on a machine with an NVIDIA GPU: ``pytest -m gpu tests/test_cuda.py`` runs every kernel
  test on the GPU, with the real launch sizes;
- without one, in CI: ``test_cuda_kernels_on_the_simulator`` re-runs this file in a
  subprocess with ``NUMBA_ENABLE_CUDASIM=1`` (the simulator must be on before numba.cuda is
  imported), tiny shapes and tiny blocks (one Python thread per CUDA thread).
  ``NUMBA_ENABLE_CUDASIM=1 pytest -m gpu tests/test_cuda.py`` does the same directly.

The simulator checks kernel logic (indexing, tails, synchronisation, bit-exactness of
the arithmetic); it does not prove that a kernel compiles for or runs fast on a GPU:
``benchmarks/gpu_check.py`` does that on real hardware.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import numlora as nl
from numlora.errors import ConfigError, DeviceError, DTypeError, NonFiniteError, ShapeError

import reference as ref
from cuda_sim import GPU, ROOT, SIM, cuda_test, d, f32, h, run_simulator_pass, tiny_blocks  # noqa: F401

# --- the launcher (normal test runs) ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(SIM or GPU, reason="the kernel tests run directly in this process")
def test_cuda_kernels_on_the_simulator():
    run_simulator_pass(__file__, 25)


def test_no_gpu_gives_one_clear_error():
    if SIM or GPU:
        pytest.skip("a GPU (or the simulator) is available")
    with pytest.raises(DeviceError, match="no usable NVIDIA GPU"):
        nl.to_device(np.zeros(3, np.float32))
    assert not nl.is_device_array(np.zeros(3))
    assert nl.to_host(np.zeros(2)).shape == (2,)


# --- helpers ------------------------------------------------------------------------------------



def assert_close(got, want64, bound):
    """|got - want| <= 1e-5 * bound elementwise, bound = the sum of |terms| (so that
    cancellation does not make a relative test meaningless)."""
    got = np.asarray(got, np.float64)
    assert got.shape == want64.shape
    err = np.abs(got - want64)
    assert (err <= 1e-5 * bound + 1e-30).all(), float((err / (bound + 1e-30)).max())


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


# --- xorshift64 -----------------------------------------------------------------------------------

@cuda_test
@pytest.mark.parametrize("seed,n", [(1, 1), (12345, 37), (2**64 - 1, 70)])
def test_xorshift_fill_bit_identical(seed, n):
    from numlora.cuda import ops as C
    from numlora.kernels import rng as k

    out = d(np.zeros(n, np.float32))
    state = C.xorshift64_fill(seed, out)
    cpu = np.empty(n, np.float32)
    cpu_state = int(k.xorshift64_fill(np.uint64(seed), cpu))
    same_bits(h(out), cpu)
    vals, ref_state = ref.xorshift_stream(seed, n)
    same_bits(h(out), np.array(vals, np.float32))
    assert state == cpu_state == ref_state


@cuda_test
def test_uniform_on_device_advances_the_same_stream():
    a, b = nl.XorShift64(99), nl.XorShift64(99)
    got = a.uniform((3, 7), device=True)
    assert nl.is_device_array(got)
    same_bits(h(got), b.uniform((3, 7)))
    assert a.state == b.state
    same_bits(a.uniform(5), b.uniform(5))


# --- NF4 ---------------------------------------------------------------------------------------------

def _nf4_cases():
    rng = np.random.default_rng(7)
    mids = ref.MID_REF.copy()
    on_mid = np.concatenate([mids, [1.0]]).astype(np.float32)  # absmax 1: exactly on midpoints
    sub = np.full(16, 1e-40, np.float32)
    sub[3] = -3e-39
    return [
        ("fused", f32(rng, 3, 40), 16),  # power-of-two blocksize: one-pass kernel
        ("odd count", f32(rng, 91), 8),  # last low nibble padded with 7, partial block
        ("odd blocksize", f32(rng, 5, 14), 7),  # generic path, blocks start mid-byte
        ("big block", f32(rng, 2, 50), 32),  # blocksize / 2 > THREADS under the simulator: generic
        ("zero tail", np.zeros(70, np.float32), 64),  # absmax [0] -> [1e-38] of the partial block
        ("midpoints", np.concatenate([on_mid, -on_mid]), 16),
        ("subnormal", sub, 16),
    ]


@cuda_test
@pytest.mark.parametrize("name,w,bs", _nf4_cases(), ids=[c[0] for c in _nf4_cases()])
def test_quantize_dequantize_bit_identical(name, w, bs):
    cpu = nl.quantize_nf4(w, bs)
    gpu = nl.quantize_nf4(d(w), bs)
    assert isinstance(gpu, nl.DeviceNF4Tensor) and gpu.shape == w.shape
    same_bits(h(gpu.packed), cpu.packed)
    same_bits(h(gpu.scales), cpu.absmax)
    packed, absmax = ref.nf4_quantize_ref(w, bs)
    same_bits(h(gpu.packed), packed)
    same_bits(h(gpu.scales), absmax)
    same_bits(h(nl.dequantize_nf4(gpu)), nl.dequantize_nf4(cpu))
    same_bits(h(nl.dequantize_nf4(gpu)).reshape(-1), ref.nf4_dequantize_ref(packed, absmax, bs, w.size))
    back = nl.to_host(gpu)
    assert isinstance(back, nl.NF4Tensor)
    same_bits(back.packed, cpu.packed)


@cuda_test
def test_quantize_refuses_nan_with_its_index():
    w = np.ones((3, 8), np.float32)
    w[2, 5] = np.nan
    with pytest.raises(NonFiniteError, match=r"index \(2, 5\)"):
        nl.quantize_nf4(d(w), 8)


@cuda_test
def test_double_quant_tensor_moves_and_decodes_like_the_host():
    rng = np.random.default_rng(3)
    w = f32(rng, 4, 64)
    cpu = nl.quantize_nf4(w, 8, double_quant=True)
    dev = nl.to_device(cpu)
    same_bits(h(nl.dequantize_nf4(dev)), nl.dequantize_nf4(cpu))
    back = nl.to_host(dev)
    assert back.double_quant
    same_bits(back.absmax, cpu.absmax)
    g = nl.quantize_nf4(d(w), 8, double_quant=True)
    same_bits(h(nl.dequantize_nf4(g)), nl.dequantize_nf4(cpu))


# --- dense LoRA ------------------------------------------------------------------------------------

def _dense(rng, n, i, o, r):
    return f32(rng, n, i), f32(rng, o, i), f32(rng, r, i), f32(rng, o, r), f32(rng, o)


def _bound_fwd(x, w, a, b, s, bias):
    x, w, a, b = (np.abs(np.asarray(t, np.float64)) for t in (x, w, a, b))
    return x @ w.T + abs(s) * (x @ a.T) @ b.T + (0 if bias is None else np.abs(bias))


@cuda_test
@pytest.mark.parametrize("n,fio,with_bias", [(1, False, True), (3, False, False), (3, True, True)])
def test_lora_forward(n, fio, with_bias):
    rng = np.random.default_rng(n)
    x, w, a, b, bias = _dense(rng, n, 10, 7, 3)
    if n == 1:
        x = x[0]
    bias = bias if with_bias else None
    wl = np.ascontiguousarray(w.T) if fio else w
    got = nl.lora_forward(d(x), d(wl), d(a), d(b), 0.75, None if bias is None else d(bias), fan_in_fan_out=fio)
    assert nl.is_device_array(got)
    want = ref.lora_forward_ref(x, wl, a, b, 0.75, bias, fan_in_fan_out=fio)
    assert_close(h(got), want, _bound_fwd(x, w, a, b, 0.75, bias))
    cpu = nl.lora_forward(x, wl, a, b, 0.75, bias, fan_in_fan_out=fio)
    assert_close(h(got), cpu.astype(np.float64), _bound_fwd(x, w, a, b, 0.75, bias))
    # u_out receives x A^T unscaled and changes nothing in the result
    u = d(np.full(a.shape[:1] if n == 1 else (n, a.shape[0]), np.nan, np.float32))
    got_u = nl.lora_forward(d(x), d(wl), d(a), d(b), 0.75, None if bias is None else d(bias), fan_in_fan_out=fio,
                            u_out=u)
    np.testing.assert_array_equal(h(got_u), h(got))
    x2 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    assert_close(h(u).reshape(-1, a.shape[0]), x2 @ a.T.astype(np.float64), np.abs(x2) @ np.abs(a.T))


@cuda_test
def test_linear_forward_and_out_buffer():
    rng = np.random.default_rng(1)
    x, w, _, _, bias = _dense(rng, 2, 9, 5, 1)
    out = d(np.zeros((2, 5), np.float32))
    got = nl.linear_forward(d(x), d(w), d(bias), out=out)
    assert got is out
    want = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    assert_close(h(out), want, np.abs(x) @ np.abs(w.T).astype(np.float64) + np.abs(bias))


@cuda_test
@pytest.mark.parametrize("fio", [False, True])
def test_merge_and_unmerge(fio):
    rng = np.random.default_rng(5)
    _, w, a, b, _ = _dense(rng, 1, 6, 5, 2)
    wl = np.ascontiguousarray(w.T) if fio else w
    dw = d(wl)
    nl.merge_lora(dw, d(a), d(b), 0.5, fan_in_fan_out=fio)
    bound = np.abs(wl) + 0.5 * (np.abs(b) @ np.abs(a) if not fio else (np.abs(b) @ np.abs(a)).T)
    assert_close(h(dw), ref.merge_ref(wl, a, b, 0.5, fan_in_fan_out=fio), bound)
    nl.unmerge_lora(dw, d(a), d(b), 0.5, fan_in_fan_out=fio)
    assert_close(h(dw), wl.astype(np.float64), bound)
    with pytest.raises(ConfigError, match="CPU only"):
        nl.merge_lora(dw, d(a), d(b), 0.5, fan_in_fan_out=fio, record=True)


def _backward_ref(x, w, a, b, s, g):
    x, w, a, b, g = (np.asarray(t, np.float64) for t in (x, w, a, b, g))
    u = x @ a.T
    hh = g @ b
    return g @ w + s * hh @ a, s * hh.T @ x, s * g.T @ u


@cuda_test
@pytest.mark.parametrize("fio", [False, True])
def test_lora_backward(fio):
    rng = np.random.default_rng(11)
    x, w, a, b, _ = _dense(rng, 3, 10, 7, 2)
    g = f32(rng, 3, 7)
    wl = np.ascontiguousarray(w.T) if fio else w
    dx, ga, gb = nl.lora_backward(d(x), d(wl), d(a), d(b), 0.5, d(g), fan_in_fan_out=fio)
    rx, ra, rb = _backward_ref(x, w, a, b, 0.5, g)
    X, W, A, B, G = (np.abs(np.asarray(t, np.float64)) for t in (x, w, a, b, g))
    assert_close(h(dx), rx, G @ W + 0.5 * (G @ B) @ A)
    assert_close(h(ga), ra, 0.5 * (G @ B).T @ X)
    assert_close(h(gb), rb, 0.5 * G.T @ (X @ A.T))
    # accumulation into given buffers, and need_grad_x=False
    ga0, gb0 = d(np.ones_like(a)), d(np.ones_like(b))
    dx2, ga2, gb2 = nl.lora_backward(d(x), d(wl), d(a), d(b), 0.5, d(g), fan_in_fan_out=fio, grad_a=ga0,
                                     grad_b=gb0, need_grad_x=False)
    assert dx2 is None and ga2 is ga0 and gb2 is gb0
    assert_close(h(ga0), ra + 1, 0.5 * (G @ B).T @ X + 1)
    assert_close(h(gb0), rb + 1, 0.5 * G.T @ (X @ A.T) + 1)
    with pytest.raises(ConfigError, match="dropout must be"):
        nl.lora_backward(d(x), d(wl), d(a), d(b), 0.5, d(g), fan_in_fan_out=fio, dropout=0.1)


# --- dropout ---------------------------------------------------------------------------------------

@cuda_test
@pytest.mark.parametrize("shape,p,seed", [((37,), 0.3, 5), ((3, 10), 0.5, 2**64 - 1), ((5, 8), 0.1, 0),
                                          ((2, 33), 0.9, 123456789)])
def test_lora_dropout_bit_identical(shape, p, seed):
    """The device draws the CPU's masks: one xorshift64 stream per row (rows of several
    chunks exercise the jump-ahead; a partial last chunk the row end)."""
    rng = np.random.default_rng(len(shape) + int(p * 10))
    x = f32(rng, *shape)
    got, st = nl.lora_dropout(d(x), p, seed)
    want, st_cpu = nl.lora_dropout(x, p, seed)
    assert st == st_cpu and nl.is_device_array(got)
    same_bits(h(got), want)
    # the keep mask is the CPU's too (independent check of the kept / zeroed split)
    keep = nl.dropout_keep_mask(shape, p, seed)
    assert np.array_equal(h(got) != 0, keep & (x != 0))
    out = d(np.full(shape, 7.0, np.float32))
    got2, _ = nl.lora_dropout(d(x), p, seed, out=out)
    assert got2 is out
    same_bits(h(out), want)
    same_bits(h(nl.lora_dropout(d(x), 0.0, seed)[0]), x)


@cuda_test
@pytest.mark.parametrize("kind", ["dense", "dense-fio", "nf4"])
def test_backward_with_dropout_matches_the_cpu(kind):
    rng = np.random.default_rng(13)
    n, i, o, r, p, seed = 3, 16, 7, 2, 0.25, 99
    x, a, b, g = f32(rng, n, i), f32(rng, r, i), f32(rng, o, r), f32(rng, n, o)
    if kind == "nf4":
        t = nl.quantize_nf4(f32(rng, o, i), 8)
        args_c, args_g = (x, t, a, b, 0.5, g), (d(x), nl.to_device(t), d(a), d(b), 0.5, d(g))
        fn, kw = nl.qlora_backward, {}
        wd = nl.dequantize_nf4(t).astype(np.float64)
    else:
        w = f32(rng, o, i)
        wl = np.ascontiguousarray(w.T) if kind == "dense-fio" else w
        args_c, args_g = (x, wl, a, b, 0.5, g), (d(x), d(wl), d(a), d(b), 0.5, d(g))
        fn, kw = nl.lora_backward, {"fan_in_fan_out": kind == "dense-fio"}
        wd = w.astype(np.float64)
    xd, st = nl.lora_dropout(x, p, seed)
    want = fn(*args_c, dropout=st, **kw)
    X, A, B, G = (np.abs(np.asarray(v, np.float64)) for v in (xd, a, b, g))
    bounds = (G @ np.abs(wd) + 0.5 * (G @ B) @ A / (1 - p), 0.5 * (G @ B).T @ X, 0.5 * G.T @ (X @ A.T))
    # the mask regenerated on the device from (p, seed), and the forward's x_drop passed in
    for extra in ({}, {"x_drop": nl.lora_dropout(d(x), p, seed)[0]}):
        got = fn(*args_g, dropout=st, **kw, **extra)
        for gv, wv, bound in zip(got, want, bounds):
            assert_close(h(gv), wv.astype(np.float64), bound)
    # an independent reference: the masked input through the float64 formulas
    rx, ra, rb = _backward_ref(xd, wd, a, b, 0.5, g)
    keep = nl.dropout_keep_mask(x.shape, p, seed)
    rx = g.astype(np.float64) @ wd + (rx - g.astype(np.float64) @ wd) * keep / (1 - p)
    got = fn(*args_g, dropout=st, **kw)
    for gv, wv, bound in zip(got, (rx, ra, rb), bounds):
        assert_close(h(gv), wv, bound)


# --- NF4 matmuls --------------------------------------------------------------------------------------

def _nf4_setup(rng, n, i, o, r, bs):
    w = f32(rng, o, i)
    t = nl.quantize_nf4(w, bs)
    return f32(rng, n, i), t, nl.dequantize_nf4(t).astype(np.float64), f32(rng, r, i), f32(rng, o, r), f32(rng, o)


@cuda_test
@pytest.mark.parametrize("n,i,bs", [(1, 16, 8), (1, 40, 8), (1, 48, 24), (3, 16, 8), (2, 10, 5), (5, 40, 8)],
                         ids=["gemv", "gemv-chunks", "gemv-bs24", "tiled", "odd", "tiled-big"])
def test_qlora_forward_and_nf4_matmul(n, i, bs):
    rng = np.random.default_rng(n + i)
    x, t, wd, a, b, bias = _nf4_setup(rng, n, i, 7, 2, bs)
    xx = x[0] if n == 1 else x
    dt = nl.to_device(t)
    got = nl.qlora_forward(d(xx), dt, d(a), d(b), 0.5, d(bias))
    want = ref.lora_forward_ref(xx, wd, a, b, 0.5, bias)
    assert_close(h(got), want, _bound_fwd(xx, wd, a, b, 0.5, bias))
    cpu = nl.qlora_forward(xx, t, a, b, 0.5, bias)
    assert_close(h(got), cpu.astype(np.float64), _bound_fwd(xx, wd, a, b, 0.5, bias))
    u = d(np.full((2,) if n == 1 else (n, 2), np.nan, np.float32))
    np.testing.assert_array_equal(h(nl.qlora_forward(d(xx), dt, d(a), d(b), 0.5, d(bias), u_out=u)), h(got))
    x2 = np.asarray(x, np.float64)
    assert_close(h(u).reshape(n, 2), x2 @ a.T.astype(np.float64), np.abs(x2) @ np.abs(a.T))
    base = nl.nf4_matmul(d(xx), dt)
    assert_close(h(base), np.asarray(xx, np.float64) @ wd.T, np.abs(np.asarray(xx, np.float64)) @ np.abs(wd.T))


@cuda_test
def test_nf4_matmul_t_and_qlora_backward():
    rng = np.random.default_rng(21)
    x, t, wd, a, b, _ = _nf4_setup(rng, 3, 16, 6, 2, 8)
    g = f32(rng, 3, 6)
    dt = nl.to_device(t)
    G = np.abs(g.astype(np.float64))
    assert_close(h(nl.nf4_matmul_t(d(g), dt)), g.astype(np.float64) @ wd, G @ np.abs(wd))
    dx, ga, gb = nl.qlora_backward(d(x), dt, d(a), d(b), 0.5, d(g))
    rx, ra, rb = _backward_ref(x, wd, a, b, 0.5, g)
    X, W, A, B = (np.abs(np.asarray(t_, np.float64)) for t_ in (x, wd, a, b))
    assert_close(h(dx), rx, G @ W + 0.5 * (G @ B) @ A)
    assert_close(h(ga), ra, 0.5 * (G @ B).T @ X)
    assert_close(h(gb), rb, 0.5 * G.T @ (X @ A.T))
    cx, ca, cb = nl.qlora_backward(x, t, a, b, 0.5, g)
    assert_close(h(dx), cx.astype(np.float64), G @ W + 0.5 * (G @ B) @ A)


# --- AdamW ---------------------------------------------------------------------------------------------

@cuda_test
def test_adamw_update_matches_the_cpu_optimizer():
    from numlora.cuda import ops as C

    rng = np.random.default_rng(4)
    value, grad = f32(rng, 3, 5), f32(rng, 3, 5)
    p = nl.Parameter(value.copy(), grad.copy())
    opt = nl.AdamW([p], lr=0.01, weight_decay=0.1)
    dv, dg, dm, dvv = d(value), d(grad), d(np.zeros_like(value)), d(np.zeros_like(value))
    for step in (1, 2):
        opt.step()
        C.adamw_update(dv, dg, dm, dvv, lr=0.01, weight_decay=0.1, step=step)
    _, m, vv = opt.state(p)
    np.testing.assert_allclose(h(dv), p.value, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(h(dm), m, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(h(dvv), vv, rtol=1e-6, atol=1e-9)
    # the public numlora.adamw_update routes device arrays to the same GPU step
    dv2, dm2, dv22 = d(value), d(np.zeros_like(value)), d(np.zeros_like(value))
    for step in (1, 2):
        nl.adamw_update(dv2, dg, dm2, dv22, lr=0.01, weight_decay=0.1, step=step)
    same_bits(h(dv2), h(dv))


@cuda_test
def test_clip_grad_norm_with_host_and_device_gradients():
    """Each gradient is measured and scaled where it lives (mixing them raised before)."""
    rng = np.random.default_rng(5)
    g1, g2 = f32(rng, 3, 4) * 10, f32(rng, 5) * 10
    ref = [nl.Parameter(f32(rng, 3, 4), g1.copy()), nl.Parameter(f32(rng, 5), g2.copy())]
    mixed = [nl.Parameter(d(f32(rng, 3, 4)), d(g1)), nl.Parameter(f32(rng, 5), g2.copy())]
    assert nl.clip_grad_norm(mixed, 1.0) == nl.clip_grad_norm(ref, 1.0)
    same_bits(h(mixed[0].grad), ref[0].grad)
    same_bits(mixed[1].grad, ref[1].grad)


# --- errors and moves ------------------------------------------------------------------------------------

@cuda_test
def test_device_errors_say_expected_and_got():
    rng = np.random.default_rng(0)
    x, w, a, b, _ = _dense(rng, 2, 6, 4, 2)
    with pytest.raises(DeviceError, match="expected weight on the GPU.*numlora.to_device"):
        nl.lora_forward(d(x), w, a, b, 0.5)
    with pytest.raises(DTypeError, match="expected x with dtype float32 on the GPU, got float64"):
        nl.lora_forward(d(x.astype(np.float64)), d(w), d(a), d(b), 0.5)
    with pytest.raises(ShapeError, match=r"expected lora_b of shape \(4, 2\), got \(2, 4\)"):
        nl.lora_forward(d(x), d(w), d(a), d(np.ascontiguousarray(b.T)), 0.5)
    with pytest.raises(DeviceError, match="NF4 weight on the GPU"):
        nl.nf4_matmul(d(x), nl.quantize_nf4(w, 2))


@cuda_test
def test_to_device_to_host_round_trip():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    da = nl.to_device(a)
    assert nl.is_device_array(da) and nl.to_device(da) is da
    same_bits(nl.to_host(da), a)
    t = nl.quantize_nf4(np.linspace(-1, 1, 20, dtype=np.float32), 4)
    dt = nl.to_device(t)
    assert dt.to("cuda") is dt
    same_bits(dt.to("cpu").packed, t.packed)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a real GPU (__cuda_array_interface__ objects)")
def test_cuda_array_interface_inputs_are_used_zero_copy():
    from numba import cuda

    class Foreign:  # what CuPy arrays and torch CUDA tensors expose
        def __init__(self, dev):
            self._dev = dev
            self.__cuda_array_interface__ = dev.__cuda_array_interface__

    rng = np.random.default_rng(2)
    x, w, a, b, _ = _dense(rng, 2, 8, 4, 2)
    out = cuda.device_array((2, 4), np.float32)
    got = nl.lora_forward(Foreign(d(x)), Foreign(d(w)), Foreign(d(a)), Foreign(d(b)), 0.5, out=Foreign(out))
    assert got.__cuda_array_interface__["data"][0] == out.__cuda_array_interface__["data"][0]
    assert_close(out.copy_to_host(), ref.lora_forward_ref(x, w, a, b, 0.5), _bound_fwd(x, w, a, b, 0.5, None))


@pytest.mark.slow
@pytest.mark.skipif(SIM, reason="the smoke run starts its own simulator process")
def test_gpu_check_sim_smoke():
    """benchmarks/gpu_check.py --sim-smoke: every check of the GPU script, tiny sizes, simulator."""
    env = dict(os.environ)
    env.pop("NUMBA_DISABLE_JIT", None)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--sim-smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 check(s) failed" in r.stdout and "bit-identical" in r.stdout


@cuda_test
def test_gemm_source_keeps_accumulators_in_scalars():
    """The tiled kernel is generated per tile and operand layout so that each thread's
    accumulators are scalar variables (a local array indexed in loops the compiler does not
    unroll lands in local memory: benchmarks/ptx_check.py measured a 256-byte stack frame
    for 8 x 8): every tile the launcher may pick, both layouts of each operand."""
    import re

    from numlora.cuda import kernels as K

    shipped = [(16, 64, 16, 2, 4), (64, 64, 8, 4, 4), (128, 128, 8, 8, 8)]  # the defaults (patched small here)
    for tile in [t for _, t in K.GEMM_TILES] + [K.GEMM_TILE] + shipped:
        bm, bn, bk, tm, tn = tile
        for nf4 in (False, True):
            for xk in (True, False):
                for wk in (True, False):
                    src = K._gemm_source(nf4, *tile, xk, wk)
                    compile(src, "<gemm>", "exec")
                    assert "local.array" not in src
                    accs = set(re.findall(r"\bc(\d+)_(\d+) \+= a", src))
                    assert accs == {(str(m), str(q)) for m in range(tm) for q in range(tn)}
                    # the load mapping follows the layout: consecutive threads along k when contiguous
                    assert (f"r = e // {bk}" in src) == (xk or wk)
