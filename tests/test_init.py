"""numlora.init: PEFT's init_lora_weights methods (kaiming, gaussian, pissa, pissa_niter_N,
olora) and LoftQ. PiSSA with the full SVD and OLoRA are deterministic in PEFT: compared with
a PEFT LoraModel over a torch nn.Linear when both are installed. The random methods and
LoftQ are checked by their defining properties (distribution, Eckart-Young optimality of
the truncated SVD, reconstruction of the weight, error against plain NF4)."""

import numpy as np
import pytest

import numlora as nl
from numlora.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from numlora.init import as_plain_lora, init_lora, loftq_init, lora_scaling


def _spectrum_weight(rng, out_f=24, in_f=40, top=8.0, bottom=0.25, dtype=np.float32):
    """A weight with well separated singular values (geometric from ``top`` to ``bottom``),
    so singular vectors are determined to float32 precision and float32 SVDs (PEFT's) and
    float64 ones (ours) agree to rounding."""
    k = min(out_f, in_f)
    u, _ = np.linalg.qr(rng.standard_normal((out_f, k)))
    v, _ = np.linalg.qr(rng.standard_normal((in_f, k)))
    return ((u * np.geomspace(top, bottom, k)) @ v.T).astype(dtype)


def _tail_energy(w, rank):
    """min ||w - M||_F over rank-``rank`` matrices M (Eckart-Young): the norm of the
    singular values past ``rank``."""
    sv = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(sv[rank:] ** 2)))


def _effective(a, b, w, s):
    return np.asarray(w, np.float64) + s * (b.astype(np.float64) @ a.astype(np.float64))


# --- against PEFT ------------------------------------------------------------------------
def _peft_init(w, init, rank, alpha, use_rslora):
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
    peft = pytest.importorskip("peft", reason="needs peft: pip install -e '.[test,peers]'")
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    with torch.no_grad():
        model.lin.weight.copy_(torch.from_numpy(w))
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"], init_lora_weights=init,
                          use_rslora=use_rslora)
    lin = peft.get_peft_model(model, cfg).base_model.model.lin
    return (lin.lora_A["default"].weight.detach().numpy(), lin.lora_B["default"].weight.detach().numpy(),
            lin.base_layer.weight.detach().numpy())


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rank, alpha, use_rslora", [(4, 8, False), (8, 3, True), (1, 16, False), (24, 24, False)])
def test_pissa_and_olora_match_peft(rng, init, rank, alpha, use_rslora):
    w = _spectrum_weight(rng)
    pa, pb, pw = _peft_init(w, init, rank, alpha, use_rslora)
    a, b, res = init_lora(w, rank, alpha, init, use_rslora=use_rslora)
    assert a.dtype == b.dtype == res.dtype == np.float32
    assert a.shape == pa.shape == (rank, 40) and b.shape == pb.shape == (24, rank) and res.shape == pw.shape
    if init == "pissa":
        # a singular pair is defined up to its sign: flip (b[:, k], a[k]) together to PEFT's
        sign = np.sign(np.sum(b * pb, axis=0))
        assert np.all(sign != 0)
        a, b = a * sign[:, None], b * sign
    np.testing.assert_allclose(a, pa, rtol=0, atol=1e-5)
    np.testing.assert_allclose(b, pb, rtol=0, atol=1e-5)
    np.testing.assert_allclose(res, pw, rtol=0, atol=1e-5)


def test_pissa_fan_in_fan_out_matches_peft_on_conv1d(rng):
    """GPT-2's Conv1D stores the weight (in, out): PEFT's PiSSA transposes it
    (fan_in_fan_out=True), and so does init_lora. (PEFT's OLoRA does not: it factors the
    stored (in, out) matrix, giving A and B the shapes of the transposed layer.)"""
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
    peft = pytest.importorskip("peft", reason="needs peft: pip install -e '.[test,peers]'")
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils", reason="needs transformers")
    w = _spectrum_weight(rng)  # (out, in) = (24, 40)
    model = torch.nn.Sequential()
    model.add_module("c", pytorch_utils.Conv1D(24, 40))
    with torch.no_grad():
        model.c.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c"], init_lora_weights="pissa", fan_in_fan_out=True)
    layer = peft.get_peft_model(model, cfg).base_model.model.c
    pa, pb = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
    pw = layer.base_layer.weight.detach().numpy()
    a, b, res = init_lora(np.ascontiguousarray(w.T), 4, 8, "pissa", fan_in_fan_out=True)
    assert res.shape == pw.shape == (40, 24)
    sign = np.sign(np.sum(b * pb, axis=0))
    np.testing.assert_allclose(a * sign[:, None], pa, rtol=0, atol=1e-5)
    np.testing.assert_allclose(b * sign, pb, rtol=0, atol=1e-5)
    np.testing.assert_allclose(res, pw, rtol=0, atol=1e-5)


# --- kaiming / gaussian ------------------------------------------------------------------
@pytest.mark.parametrize("init", ["kaiming", True, "gaussian"])
def test_random_inits_leave_the_weight_and_zero_b(rng, init):
    w = rng.standard_normal((96, 512)).astype(np.float32)
    a, b, res = init_lora(w, 8, 16, init, seed=3)
    assert res is w  # the base weight is unchanged: B = 0 makes the layer compute what the base did
    assert a.shape == (8, 512) and a.dtype == np.float32
    assert b.shape == (96, 8) and b.dtype == np.float32 and not b.any()
    again = init_lora(w, 8, 16, init, seed=3).lora_a
    assert np.array_equal(a, again)  # seeded: reproducible
    assert not np.array_equal(a, init_lora(w, 8, 16, init, seed=4).lora_a)
    assert np.array_equal(a, init_lora(w, 8, 16, init, seed=np.random.default_rng(3)).lora_a)  # a Generator
    # the same A as the layers draw for the same seed
    layer = nl.LoraLinear.from_weight(w, 8, 16, init="kaiming" if init is True else init, seed=3)
    assert np.array_equal(layer.lora_a, a)


def test_kaiming_is_peft_default_distribution(rng):
    """PEFT's True: kaiming_uniform_(a=sqrt(5)) on A (rank, in): U(-b, b) with
    b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5)), i.e. b = 1 / sqrt(in)."""
    in_f = 1024
    a = init_lora(np.ones((64, in_f), np.float32), 64, 64, "kaiming", seed=0).lora_a
    bound = np.sqrt(2.0 / 6.0) * np.sqrt(3.0 / in_f)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.999 * bound
    assert abs(a.var() / (bound ** 2 / 3) - 1) < 0.02  # 65536 draws: the variance within 2 %
    assert abs(a.mean()) < 5 * bound / np.sqrt(3 * a.size)


@pytest.mark.parametrize("rank", [2, 16])
def test_gaussian_std_is_one_over_rank(rng, rank):
    """PEFT's "gaussian": nn.init.normal_(A, std=1 / r)."""
    a = init_lora(np.ones((64, 4096), np.float32), rank, 8, "gaussian", seed=1).lora_a
    n = a.size
    assert abs(a.std() * rank - 1) < 5 / np.sqrt(2 * n)
    assert abs(a.mean() * rank) < 5 / np.sqrt(n)


# --- PiSSA / OLoRA properties --------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_is_the_best_rank_r_part(rng, use_rslora):
    w = rng.standard_normal((48, 80))
    rank, alpha = 6, 12
    s = lora_scaling(rank, alpha, use_rslora)
    a, b, res = init_lora(w, rank, alpha, "pissa", use_rslora=use_rslora)
    assert a.dtype == np.float64  # float64 in, float64 out
    np.testing.assert_allclose(_effective(a, b, res, s), w, rtol=0, atol=1e-12)
    # s B A is the truncated SVD: the residual's norm is the Eckart-Young minimum
    assert np.linalg.norm(res) == pytest.approx(_tail_energy(w, rank), rel=1e-12)
    # PiSSA's split: A A^T = B^T B = diag(S_r) / s (both factors carry sqrt(S_r / s))
    np.testing.assert_allclose(a @ a.T, b.T @ b, rtol=0, atol=1e-10)
    sv = np.linalg.svd(w, compute_uv=False)[:rank]
    np.testing.assert_allclose(np.diag(a @ a.T), sv / s, rtol=1e-12)


def test_olora_is_the_qr_part(rng):
    w = rng.standard_normal((40, 24)).astype(np.float32)
    rank, alpha = 5, 10
    a, b, res = init_lora(w, rank, alpha, "olora")
    np.testing.assert_allclose(b.T @ b, np.eye(rank), atol=1e-6)  # orthonormal columns of Q
    assert np.array_equal(np.tril(a[:, :rank], -1), np.zeros((rank, rank), np.float32))  # rows of R
    np.testing.assert_allclose(_effective(a, b, res, alpha / rank), w, rtol=0, atol=1e-5)
    # B spans the first `rank` columns of W
    proj = b.astype(np.float64) @ (b.T.astype(np.float64) @ w[:, :rank])
    np.testing.assert_allclose(proj, w[:, :rank], atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_3"])
def test_fan_in_fan_out_is_the_transposed_layout(rng, init):
    w = _spectrum_weight(rng, dtype=np.float64)
    a, b, res = init_lora(w, 4, 8, init, seed=7)
    at, bt, rest = init_lora(np.ascontiguousarray(w.T), 4, 8, init, fan_in_fan_out=True, seed=7)
    assert at.shape == a.shape and bt.shape == b.shape and rest.shape == (40, 24)
    np.testing.assert_allclose(at, a, atol=1e-12)
    np.testing.assert_allclose(bt, b, atol=1e-12)
    np.testing.assert_allclose(rest, res.T, atol=1e-12)


def test_pissa_niter_is_close_to_the_full_svd(rng):
    """Low rank plus noise: the randomized SVD finds the same top-r subspace; more subspace
    iterations get closer to the optimum."""
    m, n, rank = 200, 120, 8
    low = rng.standard_normal((m, rank)) @ (rng.standard_normal((rank, n)) * np.linspace(3, 1, rank)[:, None])
    w = (low + 0.05 * rng.standard_normal((m, n))).astype(np.float32)
    s = 16 / rank
    a, b, res = init_lora(w, rank, 16, "pissa")
    best = np.linalg.norm(res.astype(np.float64))
    errs = {}
    for niter in (0, 4):
        an, bn, resn = init_lora(w, rank, 16, f"pissa_niter_{niter}", seed=0)
        np.testing.assert_allclose(_effective(an, bn, resn, s), w, rtol=0, atol=1e-4)
        errs[niter] = np.linalg.norm(resn.astype(np.float64))
        delta = s * (bn.astype(np.float64) @ an.astype(np.float64) - b.astype(np.float64) @ a.astype(np.float64))
        if niter == 4:
            assert np.linalg.norm(delta) < 1e-3 * np.linalg.norm(w)
    assert best <= errs[4] * (1 + 1e-6) and errs[4] <= errs[0]
    assert errs[4] < best * (1 + 1e-4)
    # seeded sketch: reproducible
    assert np.array_equal(init_lora(w, rank, 16, "pissa_niter_2", seed=5).lora_a,
                          init_lora(w, rank, 16, "pissa_niter_2", seed=5).lora_a)


def test_layers_take_the_residual_and_adapter(rng):
    """A LoraLinear built from PiSSA's (A, B, residual) computes the original layer."""
    w = rng.standard_normal((32, 48)).astype(np.float32)
    x = rng.standard_normal((5, 48)).astype(np.float32)
    a, b, res = init_lora(w, 4, 8, "pissa")
    layer = nl.LoraLinear(res, a, b, 8)
    np.testing.assert_allclose(layer.forward(x), x @ w.T, rtol=0, atol=1e-4)


# --- LoftQ -----------------------------------------------------------------------------
def _rel_err(w, approx):
    w = np.asarray(w, np.float64)
    return np.linalg.norm(w - approx) / np.linalg.norm(w)


def test_loftq_one_iteration_is_nf4_plus_the_best_correction(rng):
    w = rng.standard_normal((64, 256)).astype(np.float32) * 0.05
    rank, alpha = 8, 16
    nf4, a, b = loftq_init(w, rank, alpha)
    plain = nl.quantize_nf4(w)
    assert np.array_equal(nf4.packed, plain.packed) and np.array_equal(nf4.absmax, plain.absmax)
    deq = nl.dequantize_nf4(nf4).astype(np.float64)
    s = alpha / rank
    err = np.linalg.norm(w - _effective(a, b, deq, s))
    # the best rank-r correction of the quantization error (float32 factors: to 1e-5)
    assert err == pytest.approx(_tail_energy(w - deq, rank), rel=1e-5)
    assert _rel_err(w, _effective(a, b, deq, s)) < _rel_err(w, deq)


@pytest.mark.parametrize("use_rslora, alpha", [(False, 16), (False, 8), (True, 4)])
def test_loftq_error_below_nf4_and_falls_with_iterations(rng, use_rslora, alpha):
    w = rng.standard_normal((96, 192)).astype(np.float32) * 0.02
    rank = 8
    s = lora_scaling(rank, alpha, use_rslora)
    plain = _rel_err(w, nl.dequantize_nf4(nl.quantize_nf4(w)))
    errs = []
    for iters in (1, 5):
        nf4, a, b = loftq_init(w, rank, alpha, iters=iters, use_rslora=use_rslora)
        assert a.shape == (rank, 192) and b.shape == (96, rank) and a.dtype == b.dtype == np.float32
        assert nf4.shape == w.shape and nf4.blocksize == 64
        errs.append(_rel_err(w, _effective(a, b, nl.dequantize_nf4(nf4), s)))
    assert errs[0] < plain
    assert errs[1] < errs[0]


def test_loftq_randomized_svd_is_close_to_the_exact_one(rng):
    w = (0.02 * rng.standard_normal((128, 256))).astype(np.float32)
    plain = _rel_err(w, nl.dequantize_nf4(nl.quantize_nf4(w)))
    res = {}
    for iters in (1, 3):
        for niter in (None, 4):
            nf4, a, b = loftq_init(w, 8, 8, iters=iters, svd_niter=niter, seed=0)
            res[iters, niter] = _rel_err(w, _effective(a, b, nl.dequantize_nf4(nf4), 1.0))
    # one iteration: the exact SVD gives the optimal correction, the randomized one is close
    assert res[1, None] <= res[1, 4] < res[1, None] * 1.01
    # more alternations need not favour the exact SVD (the alternation is not a descent
    # of the final error), but the two stay within 1 % and below plain NF4
    assert abs(res[3, 4] - res[3, None]) < 0.01 * res[3, None] and max(res.values()) < plain
    again = loftq_init(w, 8, 8, iters=3, svd_niter=4, seed=0)
    assert np.array_equal(again.lora_a, loftq_init(w, 8, 8, iters=3, svd_niter=4, seed=0).lora_a)
    with pytest.raises(ConfigError, match="svd_niter must be >= 0, got -1"):
        loftq_init(w, 8, 8, svd_niter=-1)


def test_loftq_options_reach_the_quantizer(rng):
    w = rng.standard_normal((16, 128)).astype(np.float32)
    nf4, a, b = loftq_init(w, 4, 4, iters=2, blocksize=128, double_quant=True)
    assert nf4.blocksize == 128 and nf4.double_quant
    assert _rel_err(w, _effective(a, b, nl.dequantize_nf4(nf4), 1.0)) < \
        _rel_err(w, nl.dequantize_nf4(nl.quantize_nf4(w, 128, True)))


def test_loftq_in_a_qlora_layer(rng):
    w = rng.standard_normal((32, 64)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    nf4, a, b = loftq_init(w, 4, 8, iters=3)
    layer = nl.QLoraLinear(nf4, a, b, 8)
    plain = nl.QLoraLinear.from_weight(w, 4, 8)  # B = 0: plain NF4
    exact = x @ w.T
    assert np.linalg.norm(layer.forward(x) - exact) < np.linalg.norm(plain.forward(x) - exact)


def test_loftq_against_peft_on_a_gpu(rng):
    """PEFT's loftq_init runs on CUDA (or XPU) only: it moves the weight to "cuda" before
    quantizing with bitsandbytes. With one iteration and alpha == r (PEFT's factors are
    unscaled) both compute NF4 of W plus the truncated SVD of its error."""
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes: pip install -e '.[test,peers]'")
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils", reason="needs peft: pip install -e '.[test,peers]'")
    if not torch.cuda.is_available():
        pytest.skip("PEFT's loftq_init needs a CUDA device (it moves the weight to 'cuda')")
    w = _spectrum_weight(rng, 64, 128, top=0.5, bottom=0.01)
    deq, la, lb = loftq_utils.loftq_init(torch.from_numpy(w).cuda(), num_bits=4, reduced_rank=8, num_iter=1)
    nf4, a, b = loftq_init(w, 8, 8)
    np.testing.assert_allclose(nl.dequantize_nf4(nf4), deq.cpu().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(b @ a, (lb @ la).cpu().numpy(), rtol=0, atol=1e-5)


# --- arguments ----------------------------------------------------------------------------
def test_bad_arguments_are_refused(rng):
    w = rng.standard_normal((8, 12)).astype(np.float32)
    with pytest.raises(ConfigError, match=r"init must be one of .*'pissa_niter_N'.*got 'svd'"):
        init_lora(w, 2, 4, "svd")
    with pytest.raises(ConfigError, match="got 'pissa_niter_x'"):
        init_lora(w, 2, 4, "pissa_niter_x")
    with pytest.raises(ConfigError, match="got False"):
        init_lora(w, 2, 4, False)
    with pytest.raises(ConfigError, match="loftq_init"):
        init_lora(w, 2, 4, "loftq")
    with pytest.raises(ConfigError, match=r"1\.\.8 for a weight of shape \(8, 12\), got 9"):
        init_lora(w, 9, 4)
    with pytest.raises(ConfigError, match="got 0"):
        loftq_init(w, 0, 4)
    for call in (lambda: init_lora(w, 2, 0, "pissa"), lambda: init_lora(w, 2, -4, "pissa_niter_1"),
                 lambda: loftq_init(w, 2, -1)):
        with pytest.raises(ConfigError, match="alpha must be > 0, got -?[014]"):
            call()
    # OLoRA does not divide by the scaling: any alpha, the residual is W - s B A
    a, b, res = init_lora(w, 2, -4, "olora")
    np.testing.assert_allclose(_effective(a, b, res, -2.0), w, atol=1e-5)
    with pytest.raises(DTypeError, match="float16"):
        init_lora(w.astype(np.float16), 2, 4)
    with pytest.raises(ConfigError, match="iters must be >= 1, got 0"):
        loftq_init(w, 2, 4, iters=0)
    with pytest.raises(DTypeError, match="seed must be an integer"):
        init_lora(w, 2, 4, seed=1.5)
    bad = w.copy()
    bad[3, 5] = np.nan
    for call in (lambda: init_lora(bad, 2, 4, "pissa"), lambda: loftq_init(bad, 2, 4)):
        with pytest.raises(NonFiniteError, match=r"\(3, 5\)"):
            call()


@pytest.mark.parametrize("init, use_rslora", [("pissa", False), ("olora", True)])
def test_as_plain_lora_applies_to_the_original_weight(rng, init, use_rslora):
    """After training, the (A, B) of a PiSSA / OLoRA adapter over the residual equal a rank
    2r plain adapter over the original weight (PEFT's weight conversion)."""
    w = rng.standard_normal((20, 30))
    x = rng.standard_normal((4, 30))
    a0, b0, res = init_lora(w, 3, 6, init, use_rslora=use_rslora)
    a, b = a0 + 0.1 * rng.standard_normal(a0.shape), b0 + 0.1 * rng.standard_normal(b0.shape)  # "trained"
    a2, b2, alpha2 = as_plain_lora(a, b, a0, b0, 6, use_rslora=use_rslora)
    assert a2.shape == (6, 30) and b2.shape == (20, 6)
    assert lora_scaling(6, alpha2, use_rslora) == pytest.approx(lora_scaling(3, 6, use_rslora), rel=1e-15)
    trained = nl.LoraLinear(res, a, b, 6, use_rslora=use_rslora).forward(x)
    converted = nl.LoraLinear(w, a2, b2, alpha2, use_rslora=use_rslora).forward(x)
    np.testing.assert_allclose(converted, trained, rtol=0, atol=1e-10)
    with pytest.raises(ShapeError, match=r"init_a of shape \(3, 30\), got \(2, 30\)"):
        as_plain_lora(a, b, a0[:2], b0, 6)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_lora_linear_from_weight_takes_peft_inits(rng, init):
    w = _spectrum_weight(rng)
    layer = nl.LoraLinear.from_weight(w, 4, 8, init=init, seed=3)
    a, b, res = init_lora(w, 4, 8, init, seed=3)
    assert np.array_equal(layer.lora_a, a) and np.array_equal(layer.lora_b, b)
    assert np.array_equal(layer.weight, res)
    x = rng.standard_normal((3, w.shape[1])).astype(np.float32)
    # the layer starts at the original weight: residual + s B A
    np.testing.assert_allclose(layer.forward(x), x @ w.T, rtol=1e-4, atol=1e-4)


def test_qlora_linear_from_weight_loftq(rng):
    w = _spectrum_weight(rng)
    layer = nl.QLoraLinear.from_weight(w, 4, 8, init="loftq", loftq_iters=2)
    t, a, b = loftq_init(w, 4, 8, iters=2)
    assert np.array_equal(layer.nf4.packed, t.packed)
    assert np.array_equal(layer.lora_a, a) and np.array_equal(layer.lora_b, b)
    plain = nl.dequantize_nf4(nl.quantize_nf4(w))
    start = layer.merged_weight()
    assert np.linalg.norm(start - w) < np.linalg.norm(plain - w)
    with pytest.raises(nl.ConfigError, match="nf4"):
        nl.QLoraLinear.from_weight(w, 4, 8, init="loftq", quant_type="fp4")
