"""Regression tests for issue 12 (never lose data, never answer wrong) on the functional
API and the layers: overlapping ``out=`` buffers, NF4 tensors from strided arrays, bad
shapes and sizes, single-use merge records, scalars finite in float32, and errors that
name the argument, what was expected and what arrived (with a hint for the common
mistakes of issue 16). Every numeric check is against float64 numpy."""

from __future__ import annotations

import re

import numpy as np
import pytest

import numlora as nl
from numlora.errors import NumloraError

from reference import lora_forward_ref, merge_ref, nf4_dequantize_ref


def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


# --- NF4Tensor from strided, reversed and list arrays ------------------------------------------


def _strided_copy(a, how):
    """A view holding a's values: reversed (negative stride) or every other element of a
    buffer twice as long."""
    if how == "reversed":
        return np.ascontiguousarray(a[::-1])[::-1]
    buf = np.zeros(2 * a.size, a.dtype)
    buf[::2] = a
    return buf[::2]


@pytest.mark.parametrize("how", ["reversed", "strided"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_tensor_from_strided_arrays(kernel_path, rng, how, double_quant):
    w = rng.standard_normal((24, 128)).astype(np.float32)
    t = nl.quantize_nf4(w, 64, double_quant=double_quant)
    kw = {}
    if double_quant:
        kw = {"absmax2": _strided_copy(t.absmax2, how), "offset": t.offset, "code8": _strided_copy(t.code8, how)}
    s = nl.NF4Tensor(_strided_copy(t.packed, how), _strided_copy(t.absmax, how), t.shape, 64, **kw)
    assert s.packed.flags.c_contiguous and s.absmax.flags.c_contiguous
    ref = nf4_dequantize_ref(t.packed, t.scales, 64, w.size).reshape(w.shape)
    np.testing.assert_array_equal(nl.dequantize_nf4(s), ref)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    np.testing.assert_allclose(nl.nf4_matmul(x, s), x.astype(np.float64) @ ref.T.astype(np.float64),
                               rtol=1e-5, atol=1e-4)


def test_nf4_tensor_list_absmax_is_a_clear_error():
    t = nl.quantize_nf4(np.ones(128, np.float32), 64)
    with pytest.raises(nl.DTypeError, match=r"absmax must be a numpy array of float32, got list"):
        nl.NF4Tensor(t.packed, t.absmax.tolist(), t.shape, 64)
    with pytest.raises(nl.DTypeError, match=r"packed must be a numpy array of uint8, got list"):
        nl.NF4Tensor(t.packed.tolist(), t.absmax, t.shape, 64)
    with pytest.raises(nl.DTypeError, match=r"expected absmax with dtype float32, got float64"):
        nl.NF4Tensor(t.packed, t.absmax.astype(np.float64), t.shape, 64)


@pytest.mark.parametrize("shape", [(-2, -64), (-1, 128), (2**40, 2**40), (2**62, 4), (True, 128), (2.0, 64)])
def test_nf4_tensor_refuses_bad_shapes(shape):
    t = nl.quantize_nf4(np.ones(128, np.float32), 64)
    with pytest.raises(NumloraError, match="shape") as info:
        nl.NF4Tensor(t.packed, t.absmax, shape, 64)
    assert isinstance(info.value, (nl.ShapeError, nl.DTypeError))


def test_nf4_tensor_sizes_must_agree_with_shape_and_blocksize():
    t = nl.quantize_nf4(np.ones((4, 64), np.float32), 64)
    with pytest.raises(nl.ShapeError, match=r"expected packed of shape \(128,\).*got \(64,\)"):
        nl.NF4Tensor(np.zeros(64, np.uint8), t.absmax, (4, 64), 64)
    with pytest.raises(nl.ShapeError, match=r"expected absmax of shape \(8,\).*blocksize 32.*got \(4,\)"):
        nl.NF4Tensor(t.packed, t.absmax, (4, 64), 32)
    with pytest.raises(nl.ConfigError, match="offset"):
        nl.NF4Tensor(t.packed, t.absmax, (4, 64), 64, offset=np.float32(0))


# --- out= overlapping the inputs: the same numbers as without overlap ----------------------------

N, IN, OUT, R = 4, 16, 16, 4  # square, and rank == batch, so that out can alias x, A, B or W


def _dense_case(rng):
    """x (N, IN), W (OUT, IN), A (R, IN), B (OUT, R), bias (OUT,), all views of one buffer."""
    sizes = [N * IN, OUT * IN, R * IN, OUT * R, OUT]
    buf = rng.standard_normal(sum(sizes)).astype(np.float32)
    parts, o = [], 0
    for n in sizes:
        parts.append(buf[o:o + n])
        o += n
    x, w, a, b, bias = parts
    return buf, x.reshape(N, IN), w.reshape(OUT, IN), a.reshape(R, IN), b.reshape(OUT, R), bias


def _aliases(x, w, a, b):
    """out buffers of shape (N, OUT) that share memory with an input."""
    return {"x": x, "weight rows": w[:N], "lora_a": a, "lora_b": b.reshape(N, OUT)}


@pytest.mark.parametrize("target", ["x", "weight rows", "lora_a", "lora_b"])
def test_lora_forward_out_overlapping_an_input(rng, target):
    _, x, w, a, b, bias = _dense_case(rng)
    ref = lora_forward_ref(x, w, a, b, 0.5, bias)
    out = _aliases(x, w, a, b)[target]
    y = nl.lora_forward(x, w, a, b, 0.5, bias, out=out)
    assert y is out
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_lora_forward_out_is_bias_and_shifted_overlap(rng):
    buf, x, w, a, b, bias = _dense_case(rng)
    ref = lora_forward_ref(x[0], w, a, b, 0.5, bias)
    y = nl.lora_forward(x[0], w, a, b, 0.5, bias, out=bias)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # out starting half-way into x: a partial, shifted overlap
    buf, x, w, a, b, _ = _dense_case(rng)
    ref = lora_forward_ref(x, w, a, b, 2.0)
    out = buf[IN // 2: IN // 2 + N * OUT].reshape(N, OUT)
    assert np.shares_memory(out, x)
    np.testing.assert_allclose(nl.lora_forward(x, w, a, b, 2.0, out=out), ref, rtol=1e-5, atol=1e-5)


def test_linear_forward_out_is_x(rng):
    _, x, w, _, _, bias = _dense_case(rng)
    ref = _f64(x)[0] @ _f64(w)[0].T + bias
    np.testing.assert_allclose(nl.linear_forward(x, w, bias, out=x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [4, 40])  # the fused kernels, and the decoded tiles + BLAS above 16 rows
@pytest.mark.parametrize("target", ["x", "lora_a", "lora_b"])
def test_qlora_forward_out_overlapping_an_input(kernel_path, rng, n, target):
    t = nl.quantize_nf4(rng.standard_normal((OUT, IN)).astype(np.float32), 16)
    deq = nl.dequantize_nf4(t)
    x = rng.standard_normal((n, IN)).astype(np.float32)
    a = rng.standard_normal((n, IN)).astype(np.float32)  # rank n, so that out=lora_a fits
    b = rng.standard_normal((OUT * n,)).astype(np.float32)
    ref = lora_forward_ref(x, deq, a, b.reshape(OUT, n), 0.25)
    out = {"x": x, "lora_a": a, "lora_b": b.reshape(n, OUT)}[target]
    y = nl.qlora_forward(x, t, a, b.reshape(OUT, n), 0.25, out=out)
    assert y is out
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [3, 40])
def test_nf4_matmul_and_matmul_t_out_is_the_input(kernel_path, rng, n):
    t = nl.quantize_nf4(rng.standard_normal((OUT, IN)).astype(np.float32), 16)
    deq = _f64(nl.dequantize_nf4(t))[0]
    x = rng.standard_normal((n, IN)).astype(np.float32)
    ref = _f64(x)[0] @ deq.T
    np.testing.assert_allclose(nl.nf4_matmul(x, t, out=x), ref, rtol=1e-4, atol=1e-4)
    g = rng.standard_normal((n, OUT)).astype(np.float32)
    ref = _f64(g)[0] @ deq
    np.testing.assert_allclose(nl.nf4_matmul_t(g, t, out=g), ref, rtol=1e-4, atol=1e-4)


def test_dequantize_into_the_tensors_own_memory(kernel_path, rng):
    w = rng.standard_normal((8, 64)).astype(np.float32)
    t = nl.quantize_nf4(w, 64)
    ref = nl.dequantize_nf4(t)
    buf = np.zeros(w.size, np.float32)
    packed = buf.view(np.uint8)[: t.packed.size]
    packed[...] = t.packed
    s = nl.NF4Tensor(packed, t.absmax, t.shape, 64)
    assert np.shares_memory(s.packed, buf)
    np.testing.assert_array_equal(nl.dequantize_nf4(s, out=buf.reshape(w.shape)), ref)


def test_dora_forward_out_is_x(rng):
    from numlora.dora import dora_forward

    _, x, w, a, b, bias = _dense_case(rng)
    m = np.abs(rng.standard_normal(OUT)).astype(np.float32) + 0.5
    ref = dora_forward(x.copy(), w, a, b, 0.5, m, bias)
    np.testing.assert_allclose(dora_forward(x, w, a, b, 0.5, m, bias, out=x), ref, rtol=1e-6, atol=1e-6)


def test_lora_dropout_in_place_and_shifted(rng):
    x = rng.standard_normal((5, 32)).astype(np.float32)
    ref, _ = nl.lora_dropout(x, 0.3, 7)
    y = x.copy()
    out, _ = nl.lora_dropout(y, 0.3, 7, out=y)  # in place: same layout, element by element
    np.testing.assert_array_equal(out, ref)
    buf = np.zeros(x.size + 3, np.float32)
    buf[:-3] = x.reshape(-1)
    xs = buf[:-3].reshape(x.shape)
    out = buf[3:].reshape(x.shape)  # 3 elements ahead of x: writes land on what is still to be read
    nl.lora_dropout(xs, 0.3, 7, out=out)
    np.testing.assert_array_equal(out, ref)


def _backward_ref(x, w, a, b, s, g):
    x, w, a, b, g = _f64(x, w, a, b, g)
    u, h = x @ a.T, g @ b
    return g @ w + s * (h @ a), s * (h.T @ x), s * (g.T @ u)


@pytest.mark.parametrize("alias", ["grad_a=lora_a", "grad_b=lora_b", "both", "grad_a=x", "grad_b=weight"])
def test_lora_backward_grad_buffers_overlapping_inputs(rng, alias):
    _, x, w, a, b, _ = _dense_case(rng)
    g = rng.standard_normal((N, OUT)).astype(np.float32)
    dx_ref, ga_ref, gb_ref = _backward_ref(x, w, a, b, 0.5, g)
    grad_a = {"grad_a=lora_a": a, "both": a, "grad_a=x": x}.get(alias)  # x is (N, IN) == (R, IN)
    grad_b = {"grad_b=lora_b": b, "both": b, "grad_b=weight": w[:, :R]}.get(alias)
    before_a = 0.0 if grad_a is None else grad_a.astype(np.float64)
    before_b = 0.0 if grad_b is None else grad_b.astype(np.float64)
    dx, ga, gb = nl.lora_backward(x, w, a, b, 0.5, g, grad_a=grad_a, grad_b=grad_b)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ga, ga_ref + before_a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, gb_ref + before_b, rtol=1e-4, atol=1e-4)


def test_backward_grad_a_overlapping_grad_b_is_refused(rng):
    _, x, w, a, b, _ = _dense_case(rng)
    g = rng.standard_normal((N, OUT)).astype(np.float32)
    buf = np.zeros(OUT * R, np.float32)
    with pytest.raises(nl.ShapeError, match="grad_a shares memory with grad_b"):
        nl.lora_backward(x, w, a, b, 0.5, g, grad_a=buf[: R * IN].reshape(R, IN), grad_b=buf.reshape(OUT, R))


@pytest.mark.parametrize("n", [4, 40])
def test_qlora_backward_grad_a_is_lora_a(kernel_path, rng, n):
    t = nl.quantize_nf4(rng.standard_normal((OUT, IN)).astype(np.float32), 16)
    deq = nl.dequantize_nf4(t)
    x = rng.standard_normal((n, IN)).astype(np.float32)
    a = rng.standard_normal((R, IN)).astype(np.float32)
    b = rng.standard_normal((OUT, R)).astype(np.float32)
    g = rng.standard_normal((n, OUT)).astype(np.float32)
    dx_ref, ga_ref, gb_ref = _backward_ref(x, deq, a, b, 0.5, g)
    a0, b0 = _f64(a, b)
    dx, ga, gb = nl.qlora_backward(x, t, a, b, 0.5, g, grad_a=a, grad_b=b)
    assert ga is a and gb is b
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a, a0 + ga_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b, b0 + gb_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["lora_a", "lora_b"])
@pytest.mark.parametrize("fn", ["merge_lora", "unmerge_lora", "merge_dora"])
def test_merge_with_a_view_of_the_weight_is_refused(rng, which, fn):
    w = rng.standard_normal((OUT, IN)).astype(np.float32)
    a = rng.standard_normal((R, IN)).astype(np.float32)
    b = rng.standard_normal((OUT, R)).astype(np.float32)
    if which == "lora_a":
        a = w[:R]
    else:
        b = w[:, :R]
    before = w.copy()
    args = (w, a, b, 0.5) + ((np.ones(OUT, np.float32),) if fn == "merge_dora" else ())
    f = nl.dora.merge_dora if fn == "merge_dora" else getattr(nl, fn)
    with pytest.raises(nl.ShapeError, match=f"weight shares memory with {which}: {fn} writes weight in place"):
        f(*args)
    np.testing.assert_array_equal(w, before)


def test_merge_with_interleaved_columns_is_not_an_overlap(rng):
    # w[:, ::2] and w[:, 1::2] lie within the same bounds but share no element: allowed
    buf = rng.standard_normal((OUT, 2 * IN)).astype(np.float32)
    w, a_src = buf[:, ::2], buf[:, 1::2]
    a = a_src[:R]
    b = rng.standard_normal((OUT, R)).astype(np.float32)
    ref = merge_ref(w, a, b, 0.5)
    nl.merge_lora(w, a, b, 0.5)
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_training_forward_out_is_x_keeps_backward_right(rng, kind):
    w = rng.standard_normal((OUT, IN)).astype(np.float32)
    def make():
        if kind == "dense":
            return nl.LoraLinear.from_weight(w, R, 8.0, init="kaiming", seed=1)
        return nl.QLoraLinear.from_weight(w, R, 8.0, blocksize=16, init="kaiming", seed=1)

    base = w if kind == "dense" else nl.dequantize_nf4(make().nf4)
    ref_layer, layer = make().train(), make().train()
    for lay in (ref_layer, layer):
        lay.lora_b = rng.standard_normal((OUT, R)).astype(np.float32) if lay is ref_layer else ref_layer.lora_b
    x = rng.standard_normal((N, IN)).astype(np.float32)
    g = rng.standard_normal((N, OUT)).astype(np.float32)
    y_ref = ref_layer.forward(x.copy())
    dx_ref = ref_layer.backward(g)
    xx = x.copy()
    y = layer.forward(xx, out=xx)
    assert y is xx
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.backward(g), dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.grad_a, ref_layer.grad_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora_forward_ref(x, base, layer.lora_a, layer.lora_b, layer.scaling), y_ref,
                               rtol=1e-4, atol=1e-4)


# --- training: parameters that share memory -----------------------------------------------------


def test_parameter_grad_sharing_its_value_is_refused():
    a = np.ones((4, 4), np.float32)
    with pytest.raises(nl.ShapeError, match="shares memory with its value"):
        nl.Parameter(a, a[::-1], "a")
    layer = nl.LoraLinear.from_weight(np.ones((8, 8), np.float32), 2, 4.0)
    pa = layer.parameters()[0]
    with pytest.raises(nl.ShapeError, match="gradient of lora_a shares memory"):
        pa.grad = layer.lora_a


def test_duplicate_parameters_are_refused():
    layer = nl.LoraLinear.from_weight(np.ones((8, 8), np.float32), 2, 4.0)
    with pytest.raises(nl.ConfigError, match=r"parameters\[[01]\] and parameters\[[23]\] share memory"):
        nl.AdamW(layer.parameters() + layer.parameters())
    buf = np.zeros(16, np.float32)
    p, q = nl.Parameter(buf[:8], np.ones(8, np.float32)), nl.Parameter(buf[8:], np.ones(8, np.float32))
    nl.AdamW([p, q])  # adjacent, not overlapping: fine
    g = np.ones(8, np.float32)
    p.grad, q.grad = g, g[::-1]
    with pytest.raises(nl.ConfigError, match="clipping would change the same elements twice"):
        nl.clip_grad_norm([p, q], 1.0)
    p.grad = g.copy()
    norm = nl.clip_grad_norm([p, q], 1.0)
    assert norm == pytest.approx(4.0)


# --- merge records are single-use --------------------------------------------------------------


@pytest.mark.parametrize("fifo", [False, True])
def test_merge_record_is_single_use(rng, fifo):
    w = rng.standard_normal((OUT, IN)).astype(np.float32)
    a = rng.standard_normal((R, IN if not fifo else OUT)).astype(np.float32)
    b = rng.standard_normal((OUT if not fifo else IN, R)).astype(np.float32)
    w0 = w.copy()
    rec = nl.merge_lora(w, a, b, 0.5, fifo, record=True)
    np.testing.assert_allclose(w, merge_ref(w0, a, b, 0.5, fifo), rtol=1e-5, atol=1e-5)
    assert not rec.used
    nl.unmerge_lora(w, a, b, 0.5, fifo, record=rec)
    assert rec.used and np.array_equal(w.view(np.uint32), w0.view(np.uint32))
    with pytest.raises(nl.MergeStateError, match="already used"):
        nl.unmerge_lora(w, a, b, 0.5, fifo, record=rec)  # used to subtract the delta a second time
    assert np.array_equal(w.view(np.uint32), w0.view(np.uint32))
    rec2 = nl.merge_lora(w, a, b, 0.5, fifo, record=True)  # a new merge, a new record
    nl.unmerge_lora(w, a, b, 0.5, fifo, record=rec2)
    assert np.array_equal(w.view(np.uint32), w0.view(np.uint32))


# --- scalars: finite in float32, and results that would overflow it -----------------------------


BIG = [1e39, -1e39, 10**400, float("inf"), float("nan")]


@pytest.mark.parametrize("big", BIG)
def test_scalars_must_be_finite_in_float32(rng, big):
    _, x, w, a, b, _ = _dense_case(rng)
    t = nl.quantize_nf4(w, 16)
    g = np.ones((N, OUT), np.float32)
    calls = {
        "scaling": lambda: nl.lora_forward(x, w, a, b, big),
        "scaling ": lambda: nl.qlora_forward(x, t, a, b, big),
        "scaling  ": lambda: nl.lora_backward(x, w, a, b, big, g),
        "scaling   ": lambda: nl.merge_lora(w, a, b, big),
        "dropout": lambda: nl.lora_dropout(x, big, 1),
        "alpha": lambda: nl.LoraLinear.from_weight(w, R, big),
        "alpha ": lambda: nl.LoraConfig(rank=4, alpha=big),
        "weights[0]": lambda: nl.combine_adapters([(a, b, 1.0)], [big]),
        "lr": lambda: nl.AdamW([nl.Parameter(a.copy())], lr=big),
        "betas[0]": lambda: nl.AdamW([nl.Parameter(a.copy())], betas=(big, 0.9)),
        "eps": lambda: nl.AdamW([nl.Parameter(a.copy())], eps=big),
        "weight_decay": lambda: nl.AdamW([nl.Parameter(a.copy())], weight_decay=big),
        "max_norm": lambda: nl.clip_grad_norm([nl.Parameter(a.copy(), np.ones_like(a))], big),
    }
    before = w.copy()
    for name, call in calls.items():
        with pytest.raises(NumloraError, match=re.escape(name.strip())) as info:
            call()
        assert isinstance(info.value, ValueError), (name, info.value)
    np.testing.assert_array_equal(w, before)


def test_merge_whose_delta_overflows_float32_is_refused(rng):
    w = rng.standard_normal((OUT, IN)).astype(np.float32)
    a = np.full((R, IN), 10.0, np.float32)
    b = np.full((OUT, R), 10.0, np.float32)
    before = w.copy()
    for record in (False, True):
        with pytest.raises(nl.NonFiniteError, match=r"weight\[0, 0\] would become inf.*left unchanged"):
            nl.merge_lora(w, a, b, 3e38, record=record)
        np.testing.assert_array_equal(w, before)
    with pytest.raises(nl.NonFiniteError, match="would become -inf"):
        nl.unmerge_lora(w, a, b, 3e38)
    np.testing.assert_array_equal(w, before)
    # a large scaling with a delta that fits is merged as always
    small = np.full((OUT, R), 1e-30, np.float32)
    nl.merge_lora(w, a, small, 1e30)
    np.testing.assert_allclose(w, merge_ref(before, a, small, 1e30), rtol=1e-5, atol=1e-5)


def test_combine_result_overflowing_float32_is_refused(rng):
    a = rng.standard_normal((2, 8)).astype(np.float32)
    b = np.full((8, 2), 10.0, np.float32)
    with pytest.raises(nl.NonFiniteError, match="combined B overflows float32"):
        nl.combine_adapters([(a, b, 3e38), (a, b, 1.0)], [10.0, 1.0])
    out = nl.combine_adapters([(a, b, 3e37), (a, b, 1.0)], [1.0, 1.0])  # fits: combined as before
    a64, b64 = _f64(a, b)
    np.testing.assert_allclose(_f64(out.lora_b)[0] @ _f64(out.lora_a)[0], (3e37 + 1.0) * (b64 @ a64), rtol=1e-6)


def test_adamw_weight_decay_factor_overflowing_float32_is_refused():
    p = nl.Parameter(np.ones(4, np.float32), np.ones(4, np.float32))
    with pytest.raises(nl.ConfigError, match=r"lr \* weight_decay .* overflows float32"):
        nl.AdamW([p], lr=1e20, weight_decay=1e20)
    opt = nl.AdamW([p], lr=1e-3, weight_decay=1e20)
    with pytest.raises(nl.ConfigError, match="overflows float32"):
        opt.lr = 1e20
    assert opt.lr == 1e-3


def test_lora_bias_times_scaling_overflowing_float32_is_refused():
    layer = nl.LoraLinear.from_weight(np.ones((8, 8), np.float32), 2, 4.0)  # scaling 2
    with pytest.raises(nl.NonFiniteError, match="scaling \\* lora_bias"):
        layer.lora_bias = np.full(8, 3e38, np.float32)
    assert layer.lora_bias is None


# --- errors that name the argument, what was expected and what arrived --------------------------


def test_init_seed_errors_are_numlora_errors():
    w = np.ones((8, 8), np.float32)
    for init in ("seed", "kaiming", "gaussian"):
        with pytest.raises(nl.ConfigError, match="seed must be >= 0, got -1"):
            nl.LoraLinear.from_weight(w, 2, 4.0, init=init, seed=-1)
        with pytest.raises(nl.DTypeError, match="seed must be an integer, got float"):
            nl.QLoraLinear.from_weight(w, 2, 4.0, init=init, seed=1.5)
    with pytest.raises(nl.ConfigError, match="init must be one of"):
        nl.layers.init_lora_a(2, 8, 8, init=None)
    with pytest.raises(nl.ConfigError, match="rank must be >= 1"):
        nl.layers.init_lora_a(0, 8, 8)
    with pytest.raises(nl.ConfigError, match="too large"):
        nl.layers.init_lora_a(2**40, 2**40, 8, init="kaiming")  # was numpy's ValueError


def test_transposed_weight_says_fan_in_fan_out():
    w = np.ones((128, 64), np.float32)  # (out, in)
    a, b = np.ones((8, 128), np.float32), np.ones((64, 8), np.float32)  # an adapter for the (in, out) layout
    x = np.ones((2, 128), np.float32)
    msg = (r"expected lora_a of shape \(8, 64\), got \(8, 128\): lora_a has 128 columns but the weight has "
           r"out_features 128 and in_features 64 \(shape \(128, 64\), read as \(out, in\)\); if the weight is stored "
           r"transposed, as \(in, out\), pass fan_in_fan_out=True")
    with pytest.raises(nl.ShapeError, match=msg):
        nl.lora_forward(x, w, a, b, 1.0)
    with pytest.raises(nl.ShapeError, match=msg):
        nl.LoraLinear(w, a, b, 8.0)
    with pytest.raises(nl.ShapeError, match="pass fan_in_fan_out=False"):
        nl.merge_lora(w, np.ones((8, 64), np.float32), np.ones((128, 8), np.float32), 1.0, True)
    np.testing.assert_allclose(nl.lora_forward(x, w, a, b, 1.0, fan_in_fan_out=True),
                               lora_forward_ref(x, w, a, b, 1.0, fan_in_fan_out=True))
    t = nl.quantize_nf4(w, 64)  # an NF4 weight has no fan_in_fan_out: quantize the transpose
    with pytest.raises(nl.ShapeError, match=r"the NF4 weight looks transposed.*quantize weight.T"):
        nl.qlora_forward(x, t, a, b, 1.0)


def test_swapped_a_and_b_says_swapped():
    w = np.ones((128, 64), np.float32)
    a, b = np.ones((8, 64), np.float32), np.ones((128, 8), np.float32)
    for call in (lambda: nl.lora_forward(np.ones(64, np.float32), w, b, a, 1.0),
                 lambda: nl.merge_lora(w, b, a, 1.0),
                 lambda: nl.LoraLinear(w, b, a, 8.0),
                 lambda: nl.QLoraLinear(nl.quantize_nf4(w, 64), b, a, 8.0)):
        with pytest.raises(nl.ShapeError, match=r"expected lora_a of shape \(8, 64\), got \(128, 8\): lora_a and "
                                                r"lora_b look swapped.*pass lora_a=A, lora_b=B"):
            call()
    with pytest.raises(nl.ShapeError, match="lora_b looks transposed.*pass lora_b.T"):
        nl.lora_forward(np.ones(64, np.float32), w, a, b.T, 1.0)
    with pytest.raises(nl.ShapeError, match=r"lora_a has rank 8 .* lora_b has 4 columns"):
        nl.lora_forward(np.ones(64, np.float32), w, a, b[:, :4], 1.0)


def test_adapter_for_another_base_and_1d_arrays():
    w = np.ones((128, 64), np.float32)
    with pytest.raises(nl.ShapeError, match=r"lora_a has 100 columns .* does not fit this base \(an adapter for "
                                            r"another model or layer\?\)"):
        nl.lora_forward(np.ones(64, np.float32), w, np.ones((8, 100), np.float32), np.ones((128, 8), np.float32), 1.)
    with pytest.raises(nl.ShapeError, match=r"lora_b has 96 rows .* does not fit this base"):
        nl.merge_lora(w, np.ones((8, 64), np.float32), np.ones((96, 8), np.float32), 1.0)
    with pytest.raises(nl.ShapeError, match=r"expected weight to be 2-D, got shape \(64,\): a Linear weight is a "
                                            r"\(out_features, in_features\) matrix: a 1-D array looks like a bias"):
        nl.lora_forward(np.ones(64, np.float32), w[0], np.ones((8, 64), np.float32), np.ones((128, 8), np.float32), 1.)
    with pytest.raises(nl.ShapeError, match="weight to be 2-D"):
        nl.LoraLinear.from_weight(w[0], 2, 4.0)
    with pytest.raises(nl.ShapeError, match=r"expected lora_a to be 2-D, got shape \(64,\): A is \(rank, "
                                            r"in_features\); a rank-1 A is lora_a.reshape\(1, -1\)"):
        nl.lora_forward(np.ones(64, np.float32), w, np.ones(64, np.float32), np.ones((128, 1), np.float32), 1.0)


def test_layer_setters_hint_at_the_other_factor():
    layer = nl.LoraLinear.from_weight(np.ones((16, 8), np.float32), 4, 8.0)
    with pytest.raises(nl.ShapeError, match=r"got \(16, 4\): that is the shape of lora_b"):
        layer.lora_a = np.zeros((16, 4), np.float32)
    with pytest.raises(nl.ShapeError, match=r"got \(4, 16\): that is the transpose; pass lora_b.T"):
        layer.lora_b = np.zeros((4, 16), np.float32)


def test_nf4_tensor_refuses_non_finite_scales():
    t = nl.quantize_nf4(np.ones((4, 64), np.float32), 64, double_quant=True)
    p = nl.quantize_nf4(np.ones((4, 64), np.float32), 64)
    bad = p.absmax.copy()
    bad[2] = np.nan
    with pytest.raises(nl.NonFiniteError, match=r"absmax must be finite, got nan at index \(2,\)"):
        nl.NF4Tensor(p.packed, bad, p.shape, 64)
    bad2 = t.absmax2.copy()
    bad2[0] = np.inf
    with pytest.raises(nl.NonFiniteError, match="absmax2 must be finite"):
        nl.NF4Tensor(t.packed, t.absmax, t.shape, 64, absmax2=bad2, offset=t.offset, code8=t.code8)


@pytest.mark.parametrize("shape", [None, -1, (3, -2), (3, True), (2**62, 2**62), "4"])
def test_shape_arguments_are_checked(shape):
    with pytest.raises(NumloraError, match="shape"):
        nl.XorShift64(1).uniform(shape)
    with pytest.raises(NumloraError, match="shape"):
        nl.dropout_keep_mask(shape, 0.5, 1)
    with pytest.raises(nl.ShapeError, match=r"\(in,\) or \(n, in\)"):
        nl.dropout_keep_mask((2, 3, 4), 0.5, 1)
    np.testing.assert_array_equal(nl.XorShift64(1).uniform(np.array([2, 3])), nl.XorShift64(1).uniform((2, 3)))


def test_flags_and_names_are_checked(rng):
    _, x, w, a, b, _ = _dense_case(rng)
    g = np.ones((N, OUT), np.float32)
    junk = np.ones(3)
    for call in (lambda: nl.lora_forward(x, w, a, b, 1.0, fan_in_fan_out=junk),
                 lambda: nl.linear_forward(x, w, fan_in_fan_out="yes"),
                 lambda: nl.merge_lora(w, a, b, 1.0, record=junk),
                 lambda: nl.lora_backward(x, w, a, b, 1.0, g, need_grad_x=junk),
                 lambda: nl.LoraLinear.from_weight(w, 2, 4.0, copy=junk),
                 lambda: nl.LoraLinear(w, a, b, 4.0, use_rslora="no")):
        with pytest.raises(nl.ConfigError, match="must be True or False"):
            call()
    with pytest.raises(nl.DTypeError, match="seed must be an integer, got str"):
        nl.mix_seed("1", 0)
    with pytest.raises(nl.ConfigError, match="method must be one of"):
        nl.combine_adapters([(a, b, 1.0)], [1.0], method=junk)
    adapter = nl.LoraAdapter(nl.LoraConfig(2, 4.0))
    adapter.add_layer("q", w)
    assert {"q": 1} not in adapter and "q" in adapter
    with pytest.raises(nl.DTypeError, match="layer name must be a str, got dict"):
        adapter.get_layer({"q": 1})
    with pytest.raises(nl.DTypeError, match="module path must be a str"):
        adapter.config.targets(None)


def test_merge_all_refuses_layers_sharing_one_weight(rng):
    w = rng.standard_normal((OUT, IN)).astype(np.float32)
    before = w.copy()
    adapter = nl.LoraAdapter(nl.LoraConfig(R, 8.0))
    for name in ("a", "b"):
        adapter.add_lora(name, rng.standard_normal((R, IN)).astype(np.float32),
                         rng.standard_normal((OUT, R)).astype(np.float32))
    adapter.attach({"a": w, "b": w[:, :]}, copy=False)
    with pytest.raises(nl.MergeStateError, match="layers 'a' and 'b' share their base weight"):
        adapter.merge_all()  # the deltas used to stack in w, and unmerge_all did not restore it
    np.testing.assert_array_equal(w, before)
    assert not adapter["a"].merged and not adapter["b"].merged
    adapter.attach({"a": w, "b": w.copy()}, copy=False)
    adapter.merge_all()
    np.testing.assert_allclose(w, merge_ref(before, adapter["a"].lora_a, adapter["a"].lora_b, adapter["a"].scaling),
                               rtol=1e-5, atol=1e-5)
    adapter.unmerge_all()
    assert np.array_equal(w.view(np.uint32), before.view(np.uint32))


def test_merge_record_refuses_another_weight(rng):
    w = rng.standard_normal((OUT, OUT)).astype(np.float32)  # square: the shape cannot tell a transpose
    a = rng.standard_normal((R, OUT)).astype(np.float32)
    b = rng.standard_normal((OUT, R)).astype(np.float32)
    w0 = w.copy()
    rec = nl.merge_lora(w, a, b, 0.5, record=True)
    other = rng.standard_normal((OUT, OUT)).astype(np.float32)
    for wrong in (other, np.ascontiguousarray(w.T)):
        before = wrong.copy()
        with pytest.raises(nl.MergeStateError, match="not the one this record's merge left"):
            nl.unmerge_lora(wrong, a, b, 0.5, record=rec)
        np.testing.assert_array_equal(wrong, before)
    assert not rec.used
    nl.unmerge_lora(w, a, b, 0.5, record=rec)  # the record still works on its own weight
    assert np.array_equal(w.view(np.uint32), w0.view(np.uint32))
