"""numlora._dispatch: public functions routed by where their arrays live, and the
functional API the layers build on (x_lora, nf4_matmul's bias, adamw_update). The GPU
side of the routing runs in tests/test_cuda*.py (real GPU or simulator)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import numlora as nl
from numlora import _dispatch
from numlora.errors import ConfigError, DeviceError

from reference import lora_expand_f32_ref, lora_shrink_f32_ref


class FakeDeviceArray:
    """Looks like a GPU array to the dispatch (it exposes ``__cuda_array_interface__``)."""

    __cuda_array_interface__ = {"shape": (2, 4), "typestr": "<f4", "data": (0, False), "version": 3}
    shape = (2, 4)


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


ROUTED = [nl.lora_forward, nl.linear_forward, nl.merge_lora, nl.unmerge_lora, nl.lora_backward, nl.lora_dropout,
          nl.quantize_nf4, nl.dequantize_nf4, nl.nf4_matmul, nl.nf4_matmul_t, nl.qlora_forward, nl.qlora_backward,
          nl.adamw_update, nl.dora_forward, nl.dora_weight_norm, nl.merge_dora]


@pytest.mark.parametrize("fn", ROUTED, ids=lambda f: f.__name__)
def test_routed_functions_keep_name_signature_and_doc(fn):
    impl = fn.__wrapped__
    assert fn.__name__ == impl.__name__ and fn.__doc__ == impl.__doc__
    assert inspect.signature(fn) == inspect.signature(impl)
    assert _dispatch.backend("cpu").__getattr__(fn.__name__) is impl


def test_the_cuda_twins_have_the_cpu_signatures():
    """Where numba.cuda is importable, each GPU implementation takes the arguments of the
    function it stands in for (the dispatch passes them on as they are)."""
    try:
        cuda = _dispatch.backend("cuda")
    except DeviceError:
        pytest.skip("no GPU and no simulator: the CUDA backend does not load")
    for fn in ROUTED:
        if fn.__name__ not in cuda:
            continue
        want = [p for p in inspect.signature(fn).parameters]
        got = [p for p in inspect.signature(getattr(cuda, fn.__name__)).parameters if not p.startswith("_")]
        assert got == want, fn.__name__


def test_cpu_only_functions_refuse_device_arrays_without_loading_cuda():
    rng = np.random.default_rng(0)
    w, a, b = f32(rng, 4, 4), f32(rng, 2, 4), f32(rng, 4, 2)
    with pytest.raises(DeviceError, match="dora_forward runs on the CPU only"):
        nl.dora_forward(FakeDeviceArray(), w, a, b, 1.0, np.ones(4, np.float32))
    with pytest.raises(DeviceError, match="merge_dora runs on the CPU only"):
        nl.merge_dora(w, a, b, 1.0, magnitude=FakeDeviceArray())


def test_a_device_array_routes_to_the_cuda_backend():
    """Without a GPU the backend refuses to load, with the one clear error; with one, the
    GPU implementation refuses the host arrays mixed in."""
    rng = np.random.default_rng(0)
    w, a, b = f32(rng, 4, 4), f32(rng, 2, 4), f32(rng, 4, 2)
    with pytest.raises(DeviceError):
        nl.lora_forward(FakeDeviceArray(), w, a, b, 1.0)
    with pytest.raises(DeviceError):
        nl.lora_forward(np.ones((2, 4), np.float32), w, a, b, 1.0, out=FakeDeviceArray())  # a keyword too


def test_where_and_check_device():
    assert _dispatch.where(np.zeros(2), None, 1.0, "x") == "cpu"
    assert _dispatch.where(np.zeros(2), FakeDeviceArray()) == "cuda"
    assert _dispatch.check_device("cpu") == "cpu"
    for bad in ("gpu", None, 0, "CUDA"):
        with pytest.raises(ConfigError, match="device must be 'cuda' or 'cpu'"):
            _dispatch.check_device(bad)
    with pytest.raises(ConfigError, match="device must be 'cuda' or 'cpu'"):
        nl.DeviceNF4Tensor(None, None, (64,), 64).to("gpu")
    with pytest.raises(AttributeError, match="no implementation of 'nonsense'"):
        _dispatch.backend("cpu").nonsense  # noqa: B018


def test_nf4_scales_is_a_property_on_both_tensors():
    t = nl.quantize_nf4(np.linspace(-1, 1, 256, dtype=np.float32).reshape(8, 32), 64, double_quant=True)
    assert isinstance(t.scales, np.ndarray) and t.scales.dtype == np.float32 and t.scales.shape == (4,)
    assert isinstance(type(t).__dict__["scales"], property)
    with pytest.raises(TypeError, match="not callable"):
        t.scales()  # an attribute on both tensors, never a method
    assert type(t.scales * 2) is np.ndarray
    assert "scales" in nl.DeviceNF4Tensor.__dataclass_fields__  # a plain attribute there


def test_x_lora_and_u_out_are_the_training_forward_bit_for_bit():
    rng = np.random.default_rng(1)
    x, w, a, b, bias = f32(rng, 5, 12), f32(rng, 7, 12), f32(rng, 3, 12), f32(rng, 7, 3), f32(rng, 7)
    xd, _ = nl.lora_dropout(x, 0.3, 99)
    u = np.full((5, 3), np.nan, np.float32)
    y = nl.lora_forward(x, w, a, b, 0.5, bias, x_lora=xd, u_out=u)
    # up to 16 float32 rows: the base product through BLAS, the LoRA branch in the small-batch
    # kernels' order (tests/reference.py writes it out), then the bias
    ref = lora_expand_f32_ref(lora_shrink_f32_ref(xd, a, np.float32(0.5)), np.ascontiguousarray(b.T), np.dot(x, w.T))
    ref += bias
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(u.view(np.uint32), lora_shrink_f32_ref(xd, a, np.float32(1.0)).view(np.uint32))  # unscaled
    # more rows: the same BLAS products in the same order, written out with numpy (the base
    # as (W x^T)^T for 2-256 rows, _backward.base_product: OpenBLAS's Haswell kernels sum
    # x W^T in another order)
    x20 = f32(rng, 20, 12)
    xd20, _ = nl.lora_dropout(x20, 0.3, 98)
    u20 = np.empty((20, 3), np.float32)
    ref20 = np.ascontiguousarray(np.dot(w, x20.T).T)
    ref20 += np.dot(np.dot(xd20, a.T) * np.float32(0.5), b.T)
    ref20 += bias
    y20 = nl.lora_forward(x20, w, a, b, 0.5, bias, x_lora=xd20, u_out=u20)
    assert np.array_equal(y20.view(np.uint32), ref20.view(np.uint32))
    assert np.array_equal(u20.view(np.uint32), np.dot(xd20, a.T).view(np.uint32))
    assert np.array_equal(nl.lora_forward(x, w, a, b, 0.5, bias, x_lora=xd).view(np.uint32), y.view(np.uint32))
    assert np.array_equal(nl.lora_forward(x, w, a, b, 0.5, bias, x_lora=x), nl.lora_forward(x, w, a, b, 0.5, bias))
    # the backward given the forward's u computes what it computes from x_drop alone, bit for bit
    g = f32(rng, 5, 7)
    state = nl.DropoutState(0.3, 99)
    got = nl.lora_backward(x, w, a, b, 0.5, g, dropout=state, x_drop=xd, u=u)
    want = nl.lora_backward(x, w, a, b, 0.5, g, dropout=state)
    for gv, wv in zip(got, want):
        assert np.array_equal(gv.view(np.uint32), wv.view(np.uint32))
    u1 = np.empty(3, np.float32)  # one row: u_out (r,)
    nl.lora_forward(x[0], w, a, b, 0.5, u_out=u1)
    assert np.array_equal(u1, lora_shrink_f32_ref(x[:1], a, np.float32(1.0))[0])
    with pytest.raises(nl.ShapeError, match=r"expected x_lora of shape \(5, 12\)"):
        nl.lora_forward(x, w, a, b, 0.5, x_lora=x[:4])
    with pytest.raises(nl.ShapeError, match=r"expected u_out of shape \(5, 3\), got \(5, 4\)"):
        nl.lora_forward(x, w, a, b, 0.5, u_out=np.empty((5, 4), np.float32))
    with pytest.raises(nl.DTypeError, match="expected u_out with dtype float32, got float64"):
        nl.lora_forward(x, w, a, b, 0.5, u_out=np.empty((5, 3)))
    big = np.empty(35, np.float32)
    with pytest.raises(nl.ShapeError, match="u_out shares memory with out"):
        nl.lora_forward(x, w, a, b, 0.5, out=big.reshape(5, 7), u_out=big[:15].reshape(5, 3))
    with pytest.raises(nl.ShapeError, match="u_out shares memory with x"):
        nl.lora_forward(x, w, a, b, 0.5, u_out=x.reshape(-1)[:15].reshape(5, 3))


@pytest.mark.parametrize("n", [1, 3, 40])  # fused kernels and the tiled BLAS path
def test_qlora_x_lora_u_out_and_nf4_bias(n):
    rng = np.random.default_rng(2)
    t = nl.quantize_nf4(f32(rng, 24, 64), 64)
    x, a, b, bias = f32(rng, n, 64), f32(rng, 4, 64), f32(rng, 24, 4), f32(rng, 24)
    xd, _ = nl.lora_dropout(x, 0.25, 7)
    u = np.full((n, 4), np.nan, np.float32)
    got = nl.qlora_forward(x, t, a, b, 0.5, bias, x_lora=xd, u_out=u)
    # u_out changes nothing in the result
    assert np.array_equal(got.view(np.uint32), nl.qlora_forward(x, t, a, b, 0.5, bias, x_lora=xd).view(np.uint32))
    w64 = nl.dequantize_nf4(t).astype(np.float64)
    u64 = xd.astype(np.float64) @ a.T
    ref = x.astype(np.float64) @ w64.T + 0.5 * u64 @ b.T + bias
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert np.allclose(u, u64, rtol=1e-5, atol=1e-5 * np.abs(u64).max())
    # the backward given the forward's u: as qlora_backward with that u, scaled as the forward scaled it
    g = f32(rng, n, 24)
    state = nl.DropoutState(0.25, 7)
    got_b = nl.qlora_backward(x, t, a, b, 0.5, g, dropout=state, x_drop=xd, u=u)
    ref_ga = 0.5 * (g.astype(np.float64) @ b).T @ xd
    ref_gb = 0.5 * g.T.astype(np.float64) @ u.astype(np.float64)
    assert np.allclose(got_b[1], ref_ga, rtol=1e-5, atol=1e-5 * np.abs(ref_ga).max())
    assert np.array_equal(got_b[2].view(np.uint32), np.dot(g.T, u * np.float32(0.5)).view(np.uint32))
    assert np.allclose(got_b[2], ref_gb, rtol=1e-5, atol=1e-5 * np.abs(ref_gb).max())
    # the bias of nf4_matmul: added last, as a separate addition would
    plain = nl.nf4_matmul(x, t)
    assert np.array_equal(nl.nf4_matmul(x, t, bias=bias).view(np.uint32), (plain + bias).view(np.uint32))
    assert np.array_equal(nl.nf4_matmul(x, t, bias=None), plain)


def test_adamw_update_is_one_adamw_step():
    rng = np.random.default_rng(3)
    value = f32(rng, 4, 6)
    grad = f32(rng, 4, 6)
    p = nl.Parameter(value.copy(), grad.copy())
    opt = nl.AdamW([p], lr=0.01, weight_decay=0.1)
    v2, m, v = value.copy(), np.zeros_like(value), np.zeros_like(value)
    for step in (1, 2, 3):
        opt.step()
        nl.adamw_update(v2, grad, m, v, lr=0.01, weight_decay=0.1, step=step)
        assert np.array_equal(p.value, v2)
    with pytest.raises(nl.DTypeError, match="expected m with dtype float32"):
        nl.adamw_update(v2, grad, m.astype(np.float64), v, lr=0.01)
    with pytest.raises(nl.ConfigError, match="step must be >= 1"):
        nl.adamw_update(v2, grad, m, v, lr=0.01, step=0)
    with pytest.raises(nl.ShapeError, match="C-contiguous and writable"):
        nl.adamw_update(np.asfortranarray(f32(rng, 4, 6)), grad, m, v, lr=0.01)
