"""combine_adapters against the dense float64 sum of deltas ``sum_i w_i s_i B_i A_i``
(computed here with plain numpy from the inputs' own factors) and, for the truncated SVD,
against the singular values of that dense sum from ``np.linalg.svd``.

Tolerances are error bounds, not guesses. With ``u = 2**-24`` (float32 unit roundoff):

- ``cat``: A is the inputs' A unchanged, B is ``fl32(w_i s_i B_i)``, so elementwise
  ``|B_c A_c - D| <= u |B_all| |A_all|`` and ``||B_c A_c - D||_F <= u M`` with
  ``M = || |B_all| |A_all| ||_F``.
- ``svd``: both factors are rounded once from float64 ``U sqrt(S)`` and ``sqrt(S) V^T``, so
  the rounding error is at most ``(2u + u^2) || |B| |A| ||_F <= (2u + u^2) sum(S)``
  (nuclear norm of the kept part); the float64 QR / SVD adds a backward error of order
  ``eps64 M``, allowed for with a 1e3 constant (it is ~1e8 times smaller than the
  float32 term).

PEFT comparisons (torch + peft, skipped without them) run PEFT in float64 so that its own
rounding does not blur what it computes. Where PEFT 0.21.2 differs from the exact sum
(rsLoRA adapters: the combined adapter keeps ``use_rslora`` with ``alpha = r``, so its
scaling is ``sqrt(r)`` instead of 1 and the delta is ``sqrt(r)`` times too large; ``svd``
truncates to the largest input rank by default and weighs with float32-rounded weights)
the discrepancy is asserted, not copied.
"""

import json
import math
import tracemalloc

import numpy as np
import pytest

import numlora as nl
from numlora.io.peft import peft_config_for

U32 = 2.0 ** -24
EPS64 = np.finfo(np.float64).eps


def _f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _layer(rng, out_f, in_f, r, alpha, rslora=False, **kw):
    return nl.LoraLinear(None, _f32(rng, r, in_f), _f32(rng, out_f, r), alpha, use_rslora=rslora, **kw)


def _parts(item):
    """(A, B, s) of a layer or a tuple, A and B in float64."""
    if isinstance(item, tuple):
        a, b, s = item
    else:
        a, b, s = item.lora_a, item.lora_b, item.scaling
    return np.asarray(a, np.float64), np.asarray(b, np.float64), float(s)


def _dense(items, weights):
    """The reference: ``sum_i w_i * s_i * B_i @ A_i`` in float64, and ``M`` =
    ``|| |B_all| |A_all| ||_F`` (the scale of the rounding bounds)."""
    d = 0.0
    m = 0.0
    for it, w in zip(items, weights):
        a, b, s = _parts(it)
        d = d + (w * s) * (b @ a)
        m = m + np.abs(w * s * b) @ np.abs(a)
    return d, float(np.linalg.norm(m))


def _delta(layer):
    return layer.scaling * (layer.lora_b.astype(np.float64) @ layer.lora_a.astype(np.float64))


def _svd_bound(kept_singular_values, m):
    return (2 * U32 + U32 ** 2) * float(np.sum(kept_singular_values)) + 1e3 * EPS64 * m


@pytest.fixture
def layers(rng):
    """Three adapters of one 40 x 24 module: different ranks, alphas, one rsLoRA."""
    return [_layer(rng, 40, 24, 4, 8.0), _layer(rng, 40, 24, 3, 5.0, rslora=True), _layer(rng, 40, 24, 6, 2.0)]


WEIGHTS = [0.5, -1.25, 2.0]


# --- layers of one module ------------------------------------------------------------------------

def test_cat_is_the_exact_sum(layers):
    d, m = _dense(layers, WEIGHTS)
    c = nl.combine_adapters(layers, WEIGHTS, "cat")
    assert isinstance(c, nl.LoraLinear) and not c.attached
    assert c.rank == 4 + 3 + 6 and c.scaling == 1.0 and not c.use_rslora
    assert c.lora_a.dtype == np.float32 and c.lora_b.dtype == np.float32
    assert np.array_equal(c.lora_a, np.vstack([layer.lora_a for layer in layers]))
    err = np.linalg.norm(_delta(c) - d)
    assert err <= U32 * m
    assert np.linalg.norm(d) > 1.0  # not a vacuous comparison


def test_svd_full_rank_is_exact_up_to_rounding(layers):
    d, m = _dense(layers, WEIGHTS)
    sv = np.linalg.svd(d, compute_uv=False)
    c = nl.combine_adapters(layers, WEIGHTS, "svd")
    assert c.rank == 4 + 3 + 6 and c.scaling == 1.0 and c.lora_a.dtype == np.float32
    assert np.linalg.norm(_delta(c) - d) <= _svd_bound(sv[:c.rank], m)


@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_svd_truncated_error_is_the_dropped_singular_values(layers, k):
    d, m = _dense(layers, WEIGHTS)
    sv = np.linalg.svd(d, compute_uv=False)  # independent reference: the dense delta's own SVD
    c = nl.combine_adapters(layers, WEIGHTS, "svd", rank=k)
    assert c.rank == k
    dropped = float(np.linalg.norm(sv[k:]))
    err = float(np.linalg.norm(_delta(c) - d))
    assert dropped > 0.01 * np.linalg.norm(d)  # truncation really drops something
    assert abs(err - dropped) <= _svd_bound(sv[:k], m)
    # the kept part's singular values are the top k of the dense delta (Eckart-Young)
    got_sv = np.linalg.svd(_delta(c), compute_uv=False)[:k]
    assert np.all(np.abs(got_sv - sv[:k]) <= _svd_bound(sv[:k], m))


def test_svd_splits_singular_values_evenly(layers):
    c = nl.combine_adapters(layers, WEIGHTS, "svd", rank=5)
    a, b = c.lora_a.astype(np.float64), c.lora_b.astype(np.float64)
    # B = U sqrt(S), A = sqrt(S) V^T: column norms of B equal row norms of A, and
    # both factors have orthogonal columns / rows
    nb, na = np.linalg.norm(b, axis=0), np.linalg.norm(a, axis=1)
    assert np.allclose(nb, na, rtol=1e-6, atol=0)
    assert np.all(np.diff(nb) <= 0)
    gb = (b.T @ b) / np.outer(nb, nb)
    assert np.abs(gb - np.eye(5)).max() < 1e-6


def test_rank_above_the_combined_rank_keeps_the_combined_rank(rng):
    ls = [_layer(rng, 10, 7, 2, 4.0), _layer(rng, 10, 7, 3, 4.0)]
    d, m = _dense(ls, [1.0, 1.0])
    sv = np.linalg.svd(d, compute_uv=False)
    c = nl.combine_adapters(ls, [1.0, 1.0], "svd", rank=50)
    assert c.rank == 5  # nothing padded
    assert np.linalg.norm(_delta(c) - d) <= _svd_bound(sv[:5], m)
    # and min(out, in) caps it when the ranks add up to more than the module's size
    many = [_layer(rng, 10, 7, 4, 4.0) for _ in range(3)]
    d, m = _dense(many, [1.0, -0.5, 0.25])
    sv = np.linalg.svd(d, compute_uv=False)
    for rank in (None, 12):
        c = nl.combine_adapters(many, [1.0, -0.5, 0.25], "svd", rank=rank)
        assert c.rank == 7
        assert np.linalg.norm(_delta(c) - d) <= _svd_bound(sv[:7], m)


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_rslora_scaling_applied_once(rng, method):
    # r = 16, alpha = 8: rsLoRA scaling 8 / 4 = 2; alpha / r would be 0.5 and the scale
    # applied twice 4: each of those misses the reference by a factor of 4 or 2.
    lay = _layer(rng, 30, 20, 16, 8.0, rslora=True)
    assert lay.scaling == 2.0
    ref = 2.0 * 1.5 * (lay.lora_b.astype(np.float64) @ lay.lora_a.astype(np.float64))
    c = nl.combine_adapters([lay], [1.5], method)
    got = _delta(c)
    _, m = _dense([lay], [1.5])
    tol = U32 * m if method == "cat" else _svd_bound(np.linalg.svd(ref, compute_uv=False), m)
    assert np.linalg.norm(got - ref) <= tol
    assert tol < 0.01 * np.linalg.norm(ref)
    # two rsLoRA adapters of different ranks, plus a plain one
    ls = [lay, _layer(rng, 30, 20, 4, 3.0, rslora=True), _layer(rng, 30, 20, 2, 3.0)]
    w = [1.0, 0.5, -2.0]
    ref = (1.0 * 2.0 * _parts(ls[0])[1] @ _parts(ls[0])[0] + 0.5 * 1.5 * _parts(ls[1])[1] @ _parts(ls[1])[0]
           - 2.0 * 1.5 * _parts(ls[2])[1] @ _parts(ls[2])[0])
    c = nl.combine_adapters(ls, w, method)
    _, m = _dense(ls, w)
    tol = U32 * m if method == "cat" else _svd_bound(np.linalg.svd(ref, compute_uv=False), m)
    assert np.linalg.norm(_delta(c) - ref) <= tol


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_negative_weights(rng, method):
    a = _layer(rng, 16, 12, 3, 6.0)
    b = _layer(rng, 16, 12, 5, 2.0, rslora=True)
    c = nl.combine_adapters([a, b], [-0.75, -3.0], method)
    d, m = _dense([a, b], [-0.75, -3.0])
    tol = U32 * m if method == "cat" else _svd_bound(np.linalg.svd(d, compute_uv=False), m)
    assert np.linalg.norm(_delta(c) - d) <= tol
    # an adapter minus itself is nothing
    c = nl.combine_adapters([a, a], [1.0, -1.0], method)
    _, m = _dense([a, a], [1.0, -1.0])
    assert np.linalg.norm(_delta(c)) <= (U32 if method == "cat" else 1e3 * EPS64) * m


def test_tuples_and_qlora_layers(rng):
    w = rng.standard_normal((24, 32)).astype(np.float32)
    q = nl.QLoraLinear.from_weight(w, 4, 8.0, init="kaiming", seed=3, use_rslora=True)
    q.lora_b = _f32(rng, 24, 4)
    t = (_f32(rng, 2, 32), rng.standard_normal((24, 2)), -0.3)  # float64 B, negative scaling
    items = [q, t]
    d, m = _dense(items, [2.0, 1.0])
    c = nl.combine_adapters(items, [2.0, 1.0])
    assert c.rank == 6
    # B of the tuple is float64: one more rounding, still u per element of the product
    assert np.linalg.norm(_delta(c) - d) <= U32 * m


def test_fan_in_fan_out_carries_to_the_result(rng):
    ls = [_layer(rng, 12, 9, 2, 2.0, fan_in_fan_out=True), _layer(rng, 12, 9, 3, 3.0, fan_in_fan_out=True)]
    c = nl.combine_adapters(ls, [1.0, 0.5], "svd")
    assert c.fan_in_fan_out and c.base_shape == (9, 12)
    base = rng.standard_normal((9, 12)).astype(np.float64)  # stored (in, out)
    c.attach(base)
    c.merge()
    d, m = _dense(ls, [1.0, 0.5])
    assert np.abs(c.weight - (base + d.T)).max() <= 1e-5 * np.abs(d).max()
    # a tuple has no opinion
    assert nl.combine_adapters([ls[0], (ls[1].lora_a, ls[1].lora_b, 1.0)], [1.0, 1.0]).fan_in_fan_out


def test_lora_bias_is_combined_like_the_delta(rng):
    a = _layer(rng, 8, 6, 2, 4.0, lora_bias=_f32(rng, 8))
    b = _layer(rng, 8, 6, 3, 3.0)  # no LoRA bias: contributes none
    w = [0.5, -2.0]
    base, bias = _f32(rng, 8, 6), _f32(rng, 8)
    x = _f32(rng, 5, 6)
    for method in ("cat", "svd"):
        c = nl.combine_adapters([a, b], w, method)
        ref_b = w[0] * a.scaling * a.lora_bias.astype(np.float64)
        assert np.abs(c.lora_bias - ref_b).max() <= U32 * np.abs(ref_b).max()
        # forward: the combined layer's LoRA part is the weighted sum of the inputs' LoRA parts
        outs = []
        for lay in (a, b, c):
            lay.attach(base, bias)
            outs.append(lay.forward(x).astype(np.float64) - nl.linear_forward(x, base, bias).astype(np.float64))
            lay.detach()
        ref = w[0] * outs[0] + w[1] * outs[1]
        assert np.abs(outs[2] - ref).max() <= 1e-4 * np.abs(ref).max()


def test_svd_never_forms_the_dense_delta(rng):
    out_f, in_f, r = 3000, 2500, 8
    ls = [nl.LoraLinear(None, _f32(rng, r, in_f), _f32(rng, out_f, r), 16.0) for _ in range(3)]
    dense_bytes = out_f * in_f * 8
    tracemalloc.start()
    try:
        c = nl.combine_adapters(ls, [1.0, 0.5, -0.25], "svd", rank=10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert c.rank == 10
    assert peak < dense_bytes / 10, peak
    # still the optimum: check on a sample of rows against the dense computation
    d, m = _dense(ls, [1.0, 0.5, -0.25])
    sv = np.linalg.svd(d, compute_uv=False)
    err = float(np.linalg.norm(_delta(c) - d))
    assert abs(err - np.linalg.norm(sv[10:])) <= _svd_bound(sv[:10], m)


# --- LoraAdapter objects ---------------------------------------------------------------------------

SHAPES = {"layers.0.q": (12, 16), "layers.0.v": (12, 16), "layers.1.q": (12, 16), "layers.1.fc1": (10, 12)}


def _adapter(rng, names, rank, alpha, rslora=False, rank_of=None, targets=("q", "v", "fc1")):
    ad = nl.LoraAdapter(nl.LoraConfig(rank, alpha, target_modules=targets, use_rslora=rslora))
    for n in names:
        out_f, in_f = SHAPES[n]
        r = (rank_of or {}).get(n, rank)
        ad.add_lora(n, _f32(rng, r, in_f), _f32(rng, out_f, r, scale=0.5))
    return ad


@pytest.fixture
def two_adapters(rng):
    a = _adapter(rng, ["layers.0.q", "layers.0.v", "layers.1.fc1"], 4, 8.0, rank_of={"layers.1.fc1": 2})
    b = _adapter(rng, ["layers.0.q", "layers.1.q"], 3, 6.0, rslora=True)
    return a, b


@pytest.mark.parametrize("method,rank", [("cat", None), ("svd", None), ("svd", 3)])
def test_adapters_combine_module_by_module(two_adapters, method, rank):
    a, b = two_adapters
    w = [0.8, -1.5]
    c = nl.combine_adapters([a, b], w, method, rank=rank)
    assert isinstance(c, nl.LoraAdapter)
    assert c.layer_names == ["layers.0.q", "layers.0.v", "layers.1.fc1", "layers.1.q"]
    assert not c.config.use_rslora and not c.attached
    for name, layer in c.items():
        present = [(ad[name], wi) for ad, wi in zip((a, b), w) if name in ad]
        d, m = _dense([p for p, _ in present], [wi for _, wi in present])
        full = min(sum(p.rank for p, _ in present), *SHAPES[name])
        want_rank = full if rank is None else min(rank, full)
        assert layer.rank == want_rank and layer.alpha == want_rank and layer.scaling == 1.0
        sv = np.linalg.svd(d, compute_uv=False)
        err = float(np.linalg.norm(_delta(layer) - d))
        if method == "cat":
            assert err <= U32 * m, name
        else:
            assert abs(err - np.linalg.norm(sv[want_rank:])) <= _svd_bound(sv[:want_rank], m), name
    assert c.config.rank == max(layer.rank for _, layer in c.items())
    assert c.config.alpha == c.config.rank


def test_adapter_with_missing_module_contributes_zero(rng):
    a = _adapter(rng, ["layers.0.q"], 4, 8.0)
    b = _adapter(rng, ["layers.0.q", "layers.1.fc1"], 2, 2.0)
    c = nl.combine_adapters([a, b], [2.0, -0.5], "cat")
    # layers.1.fc1 is only in b: the combined module is -0.5 * b's delta, rank 2
    only = c["layers.1.fc1"]
    assert only.rank == 2
    d, m = _dense([b["layers.1.fc1"]], [-0.5])
    assert np.linalg.norm(_delta(only) - d) <= U32 * m


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_combined_adapter_saves_and_loads(tmp_path, two_adapters, method):
    a, b = two_adapters
    c = nl.combine_adapters([a, b], [1.0, 0.5], method, rank=None if method == "cat" else 3)
    c.save_peft(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False
    # PEFT's own reading of the patterns gives every layer its rank and alpha = rank
    pc = nl.LoraConfig.from_peft(cfg)
    for name, layer in c.items():
        assert pc.rank_for(name) == layer.rank and pc.alpha_for(name) == layer.rank
        assert pc.scaling_for(name) == 1.0 and pc.targets(name)
    back = nl.load_peft_adapter(tmp_path)
    assert back.layer_names == c.layer_names
    for name, layer in c.items():
        assert np.array_equal(back[name].lora_a, layer.lora_a) and np.array_equal(back[name].lora_b, layer.lora_b)
        assert back[name].scaling == 1.0
    assert peft_config_for(back)["rank_pattern"] == cfg["rank_pattern"]


# --- errors ---------------------------------------------------------------------------------------

def test_errors(rng, layers):
    with pytest.raises(nl.ConfigError, match="adapters is empty"):
        nl.combine_adapters([], [])
    with pytest.raises(nl.ConfigError, match=r"one weight per adapter \(3\), got 2"):
        nl.combine_adapters(layers, [1.0, 2.0])
    for bad in (float("nan"), float("inf"), -np.inf):
        with pytest.raises(nl.NonFiniteError, match=r"weights\[1\] must be finite"):
            nl.combine_adapters(layers, [1.0, bad, 1.0])
    with pytest.raises(nl.DTypeError, match=r"weights\[0\] must be a real number, got str"):
        nl.combine_adapters(layers, ["1", 1.0, 1.0])
    with pytest.raises(nl.DTypeError, match=r"weights\[2\] must be a real number, got bool"):
        nl.combine_adapters(layers, [1.0, 1.0, True])
    with pytest.raises(nl.DTypeError, match="weights must be a sequence"):
        nl.combine_adapters(layers, 1.0)
    with pytest.raises(nl.ShapeError, match=r"weights must be 1-D \(one per adapter\), got an array of shape "
                                            r"\(3, 1\)"):
        nl.combine_adapters(layers, np.ones((3, 1)))
    c = nl.combine_adapters(layers, np.array(WEIGHTS))  # a 1-D array is fine
    assert np.linalg.norm(_delta(c) - _dense(layers, WEIGHTS)[0]) <= U32 * _dense(layers, WEIGHTS)[1]
    with pytest.raises(nl.ConfigError, match=r"method must be one of \('cat', 'svd'\), got 'linear'"):
        nl.combine_adapters(layers, WEIGHTS, "linear")
    for bad in (0, -2):
        with pytest.raises(nl.ConfigError, match="rank must be a positive integer"):
            nl.combine_adapters(layers, WEIGHTS, "svd", rank=bad)
    for bad in (2.5, True, "4"):
        with pytest.raises(nl.DTypeError, match="rank must be an integer"):
            nl.combine_adapters(layers, WEIGHTS, "svd", rank=bad)
    with pytest.raises(nl.ConfigError, match="rank applies to method='svd' only"):
        nl.combine_adapters(layers, WEIGHTS, "cat", rank=4)
    other = _layer(rng, 40, 20, 2, 2.0)
    with pytest.raises(nl.ShapeError, match=r"adapter 1 has shape \(out, in\) = \(40, 20\), but adapter 0 has "
                                            r"\(40, 24\)"):
        nl.combine_adapters([layers[0], other], [1.0, 1.0])
    with pytest.raises(nl.ShapeError, match="lora_b must have shape"):
        nl.combine_adapters([(_f32(rng, 2, 5), _f32(rng, 4, 3), 1.0)], [1.0])
    with pytest.raises(nl.DTypeError, match=r"adapters\[0\] must be a LoraLinear"):
        nl.combine_adapters([np.zeros((3, 3))], [1.0])
    with pytest.raises(nl.DTypeError, match="adapters must be a list"):
        nl.combine_adapters(layers[0], [1.0])
    bad_a = _f32(rng, 2, 24)
    bad_a[1, 3] = np.nan
    with pytest.raises(nl.NonFiniteError, match=r"adapters\[1\] lora_a must be finite, got nan at index \(1, 3\)"):
        nl.combine_adapters([layers[0], (bad_a, _f32(rng, 40, 2), 1.0)], [1.0, 1.0])
    with pytest.raises(nl.NonFiniteError, match=r"adapters\[0\] scaling must be finite"):
        nl.combine_adapters([(bad_a, _f32(rng, 40, 2), float("inf"))], [1.0])
    fifo = _layer(rng, 40, 24, 2, 2.0, fan_in_fan_out=True)
    with pytest.raises(nl.ConfigError,
                       match="adapter 1 has fan_in_fan_out=True but adapter 0 has fan_in_fan_out=False"):
        nl.combine_adapters([layers[0], fifo], [1.0, 1.0])
    dora = nl.LoraLinear.from_weight(_f32(rng, 40, 24), 2, 2.0, use_dora=True)
    with pytest.raises(nl.ConfigError, match="DoRA"):
        nl.combine_adapters([layers[0], dora], [1.0, 1.0])


def test_adapter_errors(rng):
    a = _adapter(rng, ["layers.0.q"], 4, 8.0)
    with pytest.raises(nl.DTypeError, match="mixes LoraAdapter objects with layers"):
        nl.combine_adapters([a, a["layers.0.q"]], [1.0, 1.0])
    fifo = nl.LoraAdapter(nl.LoraConfig(4, 8.0, fan_in_fan_out=True))
    fifo.add_lora("layers.0.q", _f32(rng, 4, 16), _f32(rng, 12, 4))
    with pytest.raises(nl.ConfigError, match=r"adapters\[1\] has fan_in_fan_out=True"):
        nl.combine_adapters([a, fifo], [1.0, 1.0])
    wrong = nl.LoraAdapter(nl.LoraConfig(4, 8.0))
    wrong.add_lora("layers.0.q", _f32(rng, 4, 10), _f32(rng, 12, 4))
    with pytest.raises(nl.ShapeError, match=r"module 'layers.0.q': adapter 1 has shape"):
        nl.combine_adapters([a, wrong], [1.0, 1.0])
    with pytest.raises(nl.ConfigError, match="no layers"):
        nl.combine_adapters([nl.LoraAdapter(nl.LoraConfig(4, 8.0))], [1.0])


# --- against PEFT's add_weighted_adapter ---------------------------------------------------------

def _peft_pair(torch, peft, rng, rslora):
    """A float64 torch net with two PEFT adapters ``a`` (r 4, alpha 8) and ``b`` (r 2, alpha 3)
    on q and v, random A and B, and the same adapters as numlora LoraAdapters."""
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(16, 12)
            self.v = nn.Linear(16, 12)

    torch.manual_seed(0)
    pm = peft.get_peft_model(Net().double(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                             use_rslora=rslora), adapter_name="one")
    pm.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q", "v"], use_rslora=rslora))
    mods = {"q": pm.base_model.model.q, "v": pm.base_model.model.v}
    ours = {}
    for adapter, (r, alpha) in (("one", (4, 8)), ("two", (2, 3))):
        ad = nl.LoraAdapter(nl.LoraConfig(r, alpha, target_modules=("q", "v"), use_rslora=rslora))
        for name, m in mods.items():
            a, b = _f32(rng, r, 16), _f32(rng, 12, r)
            with torch.no_grad():
                m.lora_A[adapter].weight.copy_(torch.from_numpy(a.astype(np.float64)))
                m.lora_B[adapter].weight.copy_(torch.from_numpy(b.astype(np.float64)))
            assert m.scaling[adapter] == (alpha / math.sqrt(r) if rslora else alpha / r)
            ad.add_lora(name, a, b)
        ours[adapter] = ad
    return pm, mods, ours


def _peft_delta(m, adapter):
    return m.get_delta_weight(adapter).detach().numpy()


def _assert_peft_uses_float32_weights(peft_d, d, items, w, mm):
    w32 = [float(np.float32(x)) for x in w]
    assert w32 != w
    d32, _ = _dense(items, w32)
    assert np.linalg.norm(peft_d - d32) <= 1e3 * EPS64 * mm
    gap = np.linalg.norm(peft_d - d)
    assert 1e3 * EPS64 * mm < gap <= U32 * mm


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["cat", "svd"])
def test_matches_peft_on_plain_adapters(rng, method):
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
    peft = pytest.importorskip("peft", reason="needs peft: pip install -e '.[test,peers]'")
    pm, mods, ours = _peft_pair(torch, peft, rng, rslora=False)
    w = [0.7, -1.3]
    # full rank for PEFT's svd (its default would be the largest input rank, 4)
    pm.add_weighted_adapter(["one", "two"], w, "mix", combination_type=method,
                            svd_rank=6 if method == "svd" else None)
    c = nl.combine_adapters([ours["one"], ours["two"]], w, method)
    for name, m in mods.items():
        d, mm = _dense([ours["one"][name], ours["two"][name]], w)
        peft_d = _peft_delta(m, "mix")
        assert m.r["mix"] == 6 and m.scaling["mix"] == 1.0
        if method == "cat":
            # PEFT (float64) computes the exact sum here
            assert np.linalg.norm(peft_d - d) <= 1e3 * EPS64 * mm
        else:
            # PEFT's svd path makes torch.tensor(weights): float32, so 0.7 and -1.3 are
            # rounded to float32 before they weigh the float64 deltas. Its result is the
            # exact sum for the rounded weights, and off the true one by ~u relative.
            _assert_peft_uses_float32_weights(peft_d, d, [ours["one"][name], ours["two"][name]], w, mm)
        tol = U32 * mm if method == "cat" else _svd_bound(np.linalg.svd(d, compute_uv=False), mm)
        assert np.linalg.norm(_delta(c[name]) - peft_d) <= tol + 1e3 * EPS64 * mm


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["cat", "svd"])
def test_peft_overscales_rslora_adapters_numlora_does_not(rng, method):
    """PEFT 0.21.2 builds the combined adapter's config from the first adapter's with
    ``r = lora_alpha = new_rank`` and keeps ``use_rslora=True``: the combined scaling is
    ``new_rank / sqrt(new_rank) = sqrt(new_rank)`` where the factors already carry each
    ``s_i``, so its delta is ``sqrt(new_rank)`` times the exact sum (fixed upstream by
    huggingface/peft#3449, not in 0.21.2). numlora's is the exact sum (its result has
    scaling exactly 1)."""
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
    peft = pytest.importorskip("peft", reason="needs peft: pip install -e '.[test,peers]'")
    pm, mods, ours = _peft_pair(torch, peft, rng, rslora=True)
    w = [0.7, -1.3]
    pm.add_weighted_adapter(["one", "two"], w, "mix", combination_type=method,
                            svd_rank=6 if method == "svd" else None)
    c = nl.combine_adapters([ours["one"], ours["two"]], w, method)
    for name, m in mods.items():
        d, mm = _dense([ours["one"][name], ours["two"][name]], w)
        tol = U32 * mm if method == "cat" else _svd_bound(np.linalg.svd(d, compute_uv=False), mm)
        assert np.linalg.norm(_delta(c[name]) - d) <= tol
        peft_d = _peft_delta(m, "mix")
        # PEFT with the fix of huggingface/peft#3449 (combined config use_rslora=False)
        # gives the exact sum; the releases without it are off by sqrt(6) = 2.449...
        factor = 1.0 if not pm.peft_config["mix"].use_rslora else math.sqrt(6)
        assert m.scaling["mix"] == pytest.approx(factor, rel=1e-15)
        if factor != 1.0:
            assert np.linalg.norm(peft_d - d) > 0.5 * np.linalg.norm(d)
        if method == "cat":
            assert np.linalg.norm(peft_d - factor * d) <= 1e3 * EPS64 * factor * mm
        else:
            _assert_peft_uses_float32_weights(peft_d / factor, d, [ours["one"][name], ours["two"][name]], w, mm)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_svd_default_rank_truncates(rng):
    """PEFT's ``svd`` keeps ``max(r_i)`` by default (here 4 of a combined rank 6), so it is
    not the exact sum; numlora's ``rank=None`` keeps the full combined rank. At the same
    rank both are the Eckart-Young optimum."""
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
    peft = pytest.importorskip("peft", reason="needs peft: pip install -e '.[test,peers]'")
    pm, mods, ours = _peft_pair(torch, peft, rng, rslora=False)
    w = [1.0, 1.0]
    pm.add_weighted_adapter(["one", "two"], w, "mix", combination_type="svd")
    full = nl.combine_adapters([ours["one"], ours["two"]], w, "svd")
    at4 = nl.combine_adapters([ours["one"], ours["two"]], w, "svd", rank=4)
    for name, m in mods.items():
        d, mm = _dense([ours["one"][name], ours["two"][name]], w)
        sv = np.linalg.svd(d, compute_uv=False)
        peft_d = _peft_delta(m, "mix")
        assert m.r["mix"] == 4
        assert np.linalg.norm(peft_d - d) == pytest.approx(np.linalg.norm(sv[4:]), rel=1e-9)
        assert np.linalg.norm(sv[4:]) > 0.01 * np.linalg.norm(d)
        assert np.linalg.norm(_delta(full[name]) - d) <= _svd_bound(sv, mm)
        assert abs(np.linalg.norm(_delta(at4[name]) - d) - np.linalg.norm(sv[4:])) <= _svd_bound(sv[:4], mm)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_loads_the_combined_adapter(tmp_path, rng):
    """PEFT's loader reads the saved combination (mixed ranks through rank_pattern /
    alpha_pattern) and computes the same delta."""
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
    peft = pytest.importorskip("peft", reason="needs peft: pip install -e '.[test,peers]'")
    nn = torch.nn
    a = _adapter(rng, ["layers.0.q", "layers.0.v", "layers.1.fc1"], 4, 8.0, rank_of={"layers.1.fc1": 2})
    b = _adapter(rng, ["layers.0.q", "layers.1.q"], 3, 6.0, rslora=True)
    c = nl.combine_adapters([a, b], [0.5, 2.0], "svd", rank=5)
    c.save_peft(tmp_path)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(16, 12)
            self.v = nn.Linear(16, 12)
            self.fc1 = nn.Linear(12, 10)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    pm = peft.PeftModel.from_pretrained(Net(), str(tmp_path))
    mods = dict(pm.base_model.model.named_modules())
    for name, layer in c.items():
        m = mods[name]
        assert m.r["default"] == layer.rank and m.scaling["default"] == 1.0
        got = _peft_delta(m, "default").astype(np.float64)
        ref = _delta(layer)
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), name
