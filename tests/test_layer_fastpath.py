"""The CPU training step of the layers runs the functional API's pipelines on the arrays
the layer owns (numlora.layers._host, LoraLinear._host_forward): the cases that the
public functions handle with their checks (an ``out`` sharing memory with the inputs,
1-D inputs, empty batches, the dropout buffer across batch shapes, mixed dtypes, a
disabled layer) give the public chain's bits."""

from __future__ import annotations

import numpy as np
import pytest

import numlora as nl
from numlora import mix_seed


def _bits(a):
    return None if a is None else (a.dtype, a.shape, np.ascontiguousarray(a).tobytes())


def _dense(rng, n_out=6, n_in=6, dtype=np.float32, p=0.0, bias=True):
    w = rng.standard_normal((n_out, n_in)).astype(dtype)
    b = rng.standard_normal(n_out).astype(dtype) if bias else None
    layer = nl.LoraLinear.from_weight(w, 2, 4.0, init="kaiming", seed=1, bias=b, dropout=p, dropout_seed=7)
    layer.lora_b = rng.standard_normal((n_out, 2)).astype(dtype)
    return layer


def _reference(layer, x, g, k):
    """The public chain for the layer's k-th training forward on x and backward of g."""
    w, a, b, s, bias = layer.weight, layer.lora_a, layer.lora_b, layer.scaling, layer.bias
    dtype = np.result_type(x.dtype, w.dtype, a.dtype)
    x = x.astype(dtype)
    p = layer.dropout
    xd, state = nl.lora_dropout(x, p, mix_seed(7, k)) if p else (x, None)
    y = nl.lora_forward(x, w, a, b, s, bias, x_lora=xd)
    dx, ga, gb = nl.lora_backward(x, w, a, b, s, g, dropout=state)
    return y, dx, ga, gb


@pytest.mark.parametrize("target", ["weight", "lora_a", "x"])
def test_out_sharing_memory_with_the_layer_or_x(rng, target):
    """``out=`` a view of the weight, of A (through the properties) or x itself: the
    result goes through a temporary, the arrays are read as they were, the backward sees
    x as it was before the forward overwrote it."""
    layer = _dense(rng, 6, 6, p=0.25)
    layer.lora_a = rng.standard_normal((2, 6)).astype(np.float32)
    layer.lora_b = rng.standard_normal((6, 2)).astype(np.float32)
    n = {"weight": 6, "lora_a": 2, "x": 3}[target]
    x = rng.standard_normal((n, 6)).astype(np.float32)
    g = rng.standard_normal((n, 6)).astype(np.float32)
    ref = _dense(rng, 6, 6, p=0.25)
    ref.attach(layer.weight.copy(), layer.bias)
    ref.lora_a, ref.lora_b = layer.lora_a, layer.lora_b
    want = _reference(ref, x.copy(), g, 0)
    out = {"weight": layer.weight, "lora_a": layer.lora_a, "x": x}[target]
    before = out.copy()
    layer.train()
    if target in ("weight", "lora_a"):
        out = out.reshape(n, 6)
        y = layer.forward(x, out=out)
        assert y is out and _bits(y) == _bits(want[0])
        # the layer's own array was overwritten by the caller's choice of out: put it back
        if target == "weight":
            layer.weight[...] = before
        else:
            layer.lora_a = before
        dx = layer.backward(g)
    else:
        y = layer.forward(x, out=x)
        assert y is x and _bits(y) == _bits(want[0])
        dx = layer.backward(g)
    assert _bits(dx) == _bits(want[1])
    assert _bits(layer.grad_a) == _bits(want[2]) and _bits(layer.grad_b) == _bits(want[3])


def test_one_d_input_empty_batch_and_buffer_across_shapes(rng):
    """1-D inputs, empty batches and batch sizes that change from one step to the next
    (the dropout buffer is remade) give the public chain's bits, step after step."""
    layer = _dense(rng, 5, 7, p=0.3).train()
    ref = _dense(rng, 5, 7, p=0.3)
    ref.attach(layer.weight, layer.bias)
    ref.lora_a, ref.lora_b = layer.lora_a, layer.lora_b
    ga = gb = 0
    for k, shape in enumerate([(7,), (3, 7), (0, 7), (3, 7), (1, 7), (7,), (20, 7)]):
        x = rng.standard_normal(shape).astype(np.float32)
        g = rng.standard_normal(shape[:-1] + (5,)).astype(np.float32)
        y = layer(x)
        dx = layer.backward(g)
        want = _reference(ref, x, g, k)
        assert _bits(y) == _bits(want[0]) and _bits(dx) == _bits(want[1])
        ga, gb = ga + want[2], gb + want[3]
        np.testing.assert_array_equal(layer.grad_a, ga)
        np.testing.assert_array_equal(layer.grad_b, gb)


def test_float64_weight_under_a_float32_adapter_and_float64_input(rng):
    """Compute dtype float64 (a float64 weight attached, or float64 x): the gradients are
    computed in float64 and added into the layer's float32 ones, as before."""
    layer = _dense(rng, 4, 6, p=0.2).train()
    layer.attach(rng.standard_normal((4, 6)), rng.standard_normal(4))
    x = rng.standard_normal((3, 6)).astype(np.float32)
    g = rng.standard_normal((3, 4))
    y, dx = layer(x), layer.backward(g)
    want = _reference(layer, x, g, 0)
    assert y.dtype == np.float64 and _bits(y) == _bits(want[0]) and _bits(dx) == _bits(want[1])
    assert layer.grad_a.dtype == np.float32
    za, zb = np.zeros((2, 6), np.float32), np.zeros((4, 2), np.float32)
    za += want[2]
    zb += want[3]
    assert _bits(layer.grad_a) == _bits(za) and _bits(layer.grad_b) == _bits(zb)


def test_disabled_layer_and_no_bias(rng):
    """A disabled layer's training step is the base product and ``G W``; a layer without
    bias runs no bias add."""
    layer = _dense(rng, 4, 6, bias=False).train()
    x = rng.standard_normal((3, 6)).astype(np.float32)
    g = rng.standard_normal((3, 4)).astype(np.float32)
    want = _reference(layer, x, g, 0)
    assert _bits(layer(x)) == _bits(want[0]) and _bits(layer.backward(g)) == _bits(want[1])
    layer.disable()
    y = layer(x)
    assert _bits(y) == _bits(nl.linear_forward(x, layer.weight))
    assert _bits(layer.backward(g)) == _bits(g @ layer.weight)
    assert _bits(layer.grad_a) == _bits(want[2])  # unchanged by the disabled step


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_qlora_step_uses_the_public_base_gradient(rng, p):
    """QLoraLinear's backward runs the shared backward core with G deq(W) from its
    nf4_matmul_t: the same bits as qlora_backward once the batch takes the BLAS path."""
    w = rng.standard_normal((24, 64)).astype(np.float32)
    layer = nl.QLoraLinear.from_weight(w, 4, 8.0, blocksize=32, dropout=p, dropout_seed=7).train()
    layer.lora_b = rng.standard_normal((24, 4)).astype(np.float32)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    g = rng.standard_normal((40, 24)).astype(np.float32)
    xd, state = nl.lora_dropout(x, p, mix_seed(7, 0)) if p else (x, None)
    args = (layer.nf4, layer.lora_a, layer.lora_b, layer.scaling)
    y_ref = nl.qlora_forward(x, *args, x_lora=xd)
    dx, ga, gb = nl.qlora_backward(x, *args, g, dropout=state)
    assert _bits(layer(x)) == _bits(y_ref)
    assert _bits(layer.backward(g)) == _bits(dx)
    assert _bits(layer.grad_a) == _bits(ga) and _bits(layer.grad_b) == _bits(gb)


@pytest.mark.parametrize("compute_dtype", [None, "bfloat16", "float16"])
@pytest.mark.parametrize("n", [3, 20])
@pytest.mark.parametrize("target", [None, "x", "lora_a"])
def test_qlora_training_forward_is_the_public_chain(rng, compute_dtype, n, target):
    """QLoraLinear's training forward runs qlora_forward's products on the layer's arrays
    (QLoraLinear._host_forward): the public chain's bits (the backward given the forward's
    ``u``) for the fused (3 rows) and the BLAS (20 rows) paths, every compute dtype, out= x
    or a view of A (through a temporary), and the backward after it."""
    out_f = 24 if target is None else 128
    n = 4 if target == "lora_a" else n  # out = A itself, (4, 128)
    w = rng.standard_normal((out_f, 128)).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    layer = nl.QLoraLinear.from_weight(w, 4, 8.0, dropout=0.3, dropout_seed=7, bias=bias,
                                       compute_dtype=compute_dtype).train()
    layer.lora_b = rng.standard_normal((out_f, 4)).astype(np.float32)
    x = rng.standard_normal((n, 128)).astype(np.float32)
    g = rng.standard_normal((n, out_f)).astype(np.float32)
    xd, state = nl.lora_dropout(x, 0.3, mix_seed(7, 0))
    args = (layer.nf4, layer.lora_a.copy(), layer.lora_b, layer.scaling)
    u = np.empty((n, 4), np.float32)
    y_ref = nl.qlora_forward(x, *args, bias, x_lora=xd, u_out=u, compute_dtype=compute_dtype)
    dx, ga, gb = nl.qlora_backward(x, *args, g, dropout=state, u=u, compute_dtype=compute_dtype)
    if target == "x":
        y = layer.forward(x, out=x)
        assert y is x
    elif target == "lora_a":  # out is the layer's own A (the property gives the array)
        a_before = layer.lora_a.copy()
        y = layer.forward(x, out=layer.lora_a)
        assert y is layer.lora_a
        assert _bits(y) == _bits(y_ref)
        layer.lora_a = a_before  # the caller's choice of out overwrote A: put it back
    else:
        y = layer.forward(x)
    assert _bits(y) == _bits(y_ref)
    assert _bits(layer.backward(g)) == _bits(dx)
    assert _bits(layer.grad_a) == _bits(ga) and _bits(layer.grad_b) == _bits(gb)


def test_dropout_mask_rows_are_reused_only_for_their_batch(rng):
    """A DropoutMask with the rows' states of one batch size draws the same masks as
    one without them, and falls back to computing them for another size."""
    from numlora.dropout import DropoutState, drop_rows

    x = rng.standard_normal((5, 9)).astype(np.float32)
    state = DropoutState(0.4, 123)
    out = np.empty_like(x)
    mask = drop_rows(state, x, out)
    assert mask.rows is not None and mask.rows.shape == (5,)
    assert _bits(out) == _bits(nl.lora_dropout(x, 0.4, 123)[0])
    t = rng.standard_normal((3, 9)).astype(np.float32)
    d1, d2 = np.zeros_like(t), np.zeros_like(t)
    mask.mul_add(t, d1)
    state.mask(np.float32).mul_add(t, d2)
    assert _bits(d1) == _bits(d2)


def _no_public_api(layer, monkeypatch):
    """Make the layer's functional API calls fail: what runs then is the eval fast path."""

    class Refuse:
        def __getattr__(self, name):
            raise AssertionError(f"the eval forward called the functional API's {name}")

    monkeypatch.setattr(type(layer._backend), "fn", Refuse())


def _eval_layers(rng, compute_dtype):
    w = rng.standard_normal((40, 128)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    dense = nl.LoraLinear.from_weight(w, 4, 8.0, init="kaiming", seed=1, bias=bias)
    dense.lora_b = rng.standard_normal((40, 4)).astype(np.float32)
    q = nl.QLoraLinear.from_weight(w, 4, 8.0, bias=bias, compute_dtype=compute_dtype)
    q.lora_b = dense.lora_b
    return dense, q


def _public(layer, x, lora):
    """The layer's eval forward through the functional API (its checks, then its products)."""
    if isinstance(layer, nl.QLoraLinear):
        kw = {"compute_dtype": layer.compute_dtype}
        if lora:
            return nl.qlora_forward(x, layer.nf4, layer.lora_a, layer.lora_b, layer.scaling, layer.bias, **kw)
        return nl.nf4_matmul(x, layer.nf4, bias=layer.bias, **kw)
    if lora:
        return nl.lora_forward(x, layer.weight, layer.lora_a, layer.lora_b, layer.scaling, layer.bias)
    return nl.linear_forward(x, layer.weight, layer.bias)


@pytest.mark.parametrize("compute_dtype", [None, "bfloat16"])
def test_eval_forward_of_plain_float32_inputs_skips_the_checks_with_the_same_bits(rng, compute_dtype, monkeypatch):
    """An eval forward of a C-contiguous float32 (in,) or (n, in) input runs the layer's
    products straight (``_host_forward``, the functional API's checks already passed by
    the layer's arrays): the functional API's bits, shapes and dtype; 1-D, empty, 1-20
    rows; enabled, disabled and merged."""
    for layer in _eval_layers(rng, compute_dtype):
        if compute_dtype and isinstance(layer, nl.LoraLinear):
            continue
        cases = [rng.standard_normal(128).astype(np.float32), np.zeros((0, 128), np.float32)]
        cases += [rng.standard_normal((n, 128)).astype(np.float32) for n in (1, 3, 8, 20)]
        for state in ("enabled", "disabled", "merged"):
            if state == "disabled":
                layer.disable()
            if state == "merged" and isinstance(layer, nl.LoraLinear):
                layer.enable()
                layer.merge()
            elif state == "merged":
                continue
            wants = [_public(layer, x, state == "enabled") for x in cases]
            with monkeypatch.context() as m:
                _no_public_api(layer, m)
                for x, want in zip(cases, wants):
                    assert _bits(layer(x)) == _bits(want), (type(layer).__name__, state, x.shape)
        layer.enable()


def test_eval_forward_of_other_inputs_and_variants_keeps_the_checks(rng, monkeypatch):
    """Inputs the fast path does not take (float64, not C-contiguous, a list, a wrong
    width, out=) and layers whose LoRA path is not plain (DoRA) go through the functional
    API: its conversions and its errors."""
    dense, q = _eval_layers(rng, None)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    for layer in (dense, q):
        for arg in (x[:, ::2], x[:, :128].astype(np.float64), x[:, :128].tolist()):
            want = _public(layer, np.asarray(arg), True)
            got = layer(arg)
            assert np.array_equal(got, want) and got.dtype == want.dtype
        with pytest.raises(nl.errors.ShapeError):
            layer(x)  # 256 features for a 128-feature layer: the public check's error
        out = np.empty((3, 40), np.float32)
        assert layer(np.ascontiguousarray(x[:, :128]), out=out) is out
        with monkeypatch.context() as m:
            _no_public_api(layer, m)
            with pytest.raises(AssertionError, match="functional API"):
                layer(x[:, ::2])
    dora = nl.LoraLinear.from_weight(rng.standard_normal((40, 128)).astype(np.float32), 4, 8.0, use_dora=True)
    dora.lora_b = rng.standard_normal((40, 4)).astype(np.float32)
    xc = np.ascontiguousarray(x[:, :128])
    want = dora(xc)
    with monkeypatch.context() as m:
        _no_public_api(dora, m)
        with pytest.raises(AssertionError, match="functional API"):
            dora(xc)
    assert _bits(dora(xc)) == _bits(want)
