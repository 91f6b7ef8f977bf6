"""LoRA initialisations, as PEFT's ``init_lora_weights`` offers them, on numpy arrays.

:func:`init_lora` gives the first ``lora_a`` (rank, in), ``lora_b`` (out, rank) and the base
weight the adapter goes with:

- ``"kaiming"`` (PEFT's ``True``, its default): A ~ U(-1/sqrt(in), 1/sqrt(in)), the
  ``kaiming_uniform_(a=sqrt(5))`` of ``nn.Linear``; B = 0; the weight unchanged.
- ``"gaussian"``: A ~ N(0, (1/rank)^2); B = 0; the weight unchanged.
- ``"pissa"``: the top ``rank`` singular triplets of W, split as
  ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T`` (``s`` the LoRA scaling), and the
  residual ``W - s B A`` as the new base weight. ``"pissa_niter_N"``: the same from a
  randomized SVD (Halko et al., ``N`` subspace iterations), as ``torch.svd_lowrank``
  computes it for PEFT: much faster on large weights, close to the full SVD.
- ``"olora"``: W = QR; ``B = Q[:, :rank]``, ``A = R[:rank]``; the residual ``W - s B A``.

:func:`loftq_init` is LoftQ for an NF4 base: it alternates NF4 quantization of
``W - s B A`` and a truncated SVD of ``W - deq(W_q)``, so that ``deq(W_q) + s B A``
approximates W better than ``deq(quantize_nf4(W))`` alone.

The decompositions run in float64; the results come back in the weight's dtype (float32 or
float64). PiSSA, OLoRA and LoftQ change the base weight: the residual (or the NF4 tensor)
replaces the original, and a checkpoint of the fine-tuned model must hold it, not the
original weight (see the docs' initialisation page).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import numpy as np

from . import _validate as validate
from .errors import ConfigError
from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__all__ = ["INIT_METHODS", "LoftQInit", "LoraInit", "as_plain_lora", "init_lora", "loftq_init", "lora_scaling"]

#: The names :func:`init_lora` accepts (plus ``"pissa_niter_N"`` for any N >= 0, and
#: ``True``, PEFT's spelling of ``"kaiming"``).
INIT_METHODS = ("kaiming", "gaussian", "pissa", "olora")
_NITER = re.compile(r"pissa_niter_([0-9]+)")


class LoraInit(NamedTuple):
    """What :func:`init_lora` returns: the adapter and the base weight it goes with (the
    input array itself for ``"kaiming"`` / ``"gaussian"``, a new residual array for
    ``"pissa"`` / ``"olora"``)."""

    lora_a: np.ndarray
    lora_b: np.ndarray
    weight: np.ndarray


class LoftQInit(NamedTuple):
    """What :func:`loftq_init` returns: the NF4 base and the adapter over it."""

    nf4: NF4Tensor
    lora_a: np.ndarray
    lora_b: np.ndarray


def lora_scaling(rank, alpha, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
    rank = validate.int_scalar("rank", rank, minimum=1)
    alpha = validate.real_scalar("alpha", alpha)
    return alpha / math.sqrt(rank) if validate.flag("use_rslora", use_rslora) else alpha / rank


def _method(init) -> tuple[str, int | None]:
    if init is True:
        return "kaiming", None
    if isinstance(init, str):
        if init in INIT_METHODS:
            return init, None
        m = _NITER.fullmatch(init)
        if m:
            return "pissa_niter", int(m.group(1))
        if init == "loftq":
            raise ConfigError("init 'loftq' quantizes the base weight: call numlora.loftq_init(weight, rank, alpha) "
                              "instead of init_lora")
    raise ConfigError(f"init must be one of {INIT_METHODS}, 'pissa_niter_N' (N >= 0) or True, got {init!r:.60}")


def _weight(weight, rank, name="weight"):
    w = validate.float_array(name, weight, 2)
    if not np.isfinite(w).all():
        raise validate.first_nonfinite(name, np.ascontiguousarray(w).reshape(-1), w.shape)
    rank = validate.int_scalar("rank", rank)
    if not 1 <= rank <= min(w.shape):
        raise ConfigError(f"LoRA rank must be in 1..min(out_features, in_features) = 1..{min(w.shape)} for a "
                          f"{name} of shape {w.shape}, got {rank}")
    return w, rank


def _seed(seed):
    if seed is None or isinstance(seed, np.random.Generator):
        return seed
    return validate.int_scalar("seed", seed, minimum=0)


def _svd_top(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``rank`` singular triplets of ``w`` (float64): U (m, r), S (r,), Vh (r, n)."""
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def _svd_lowrank(w: np.ndarray, rank: int, niter: int, rng: np.random.Generator):
    """A randomized rank-``rank`` SVD of ``w``, the algorithm of ``torch.svd_lowrank(w,
    q=rank, niter=niter)`` (Halko, Martinsson and Tropp 2009, algorithms 4.4 and 5.1):
    a Gaussian sketch, ``niter`` subspace iterations re-orthonormalised by QR, then the
    exact SVD of the small projected matrix."""
    m, n = w.shape
    a = w.T if m < n else w  # work on the tall side, as torch does
    q = np.linalg.qr(a @ rng.standard_normal((a.shape[1], rank)))[0]
    for _ in range(niter):
        q = np.linalg.qr(a.T @ q)[0]
        q = np.linalg.qr(a @ q)[0]
    u, s, vh = np.linalg.svd(q.T @ a, full_matrices=False)
    u = q @ u
    if m < n:
        return vh.T, s, u.T
    return u, s, vh


def init_lora(weight, rank, alpha, init="kaiming", *, use_rslora: bool = False, fan_in_fan_out: bool = False,
              seed=None) -> LoraInit:
    """The first adapter of rank ``rank`` for ``weight`` (out, in), or (in, out) with
    ``fan_in_fan_out=True``, by PEFT's ``init_lora_weights`` method ``init``: ``"kaiming"``
    (or ``True``), ``"gaussian"``, ``"pissa"``, ``"pissa_niter_N"`` or ``"olora"`` (see the
    module's docstring for the maths). ``alpha`` and ``use_rslora`` give the scaling ``s``
    that PiSSA and OLoRA take out of the weight.

    Returns :class:`LoraInit` ``(lora_a, lora_b, weight)``: A (rank, in) and B (out, rank)
    in the weight's dtype, and the base weight to use with them in the weight's layout:
    ``weight`` itself for ``"kaiming"`` / ``"gaussian"`` (B is zero, the layer computes what
    the base did), the residual ``W - s B A`` for ``"pissa"`` / ``"olora"`` (so that
    ``residual + s B A`` is the original weight, to rounding).

    ``seed``: None, a non-negative integer or a ``numpy.random.Generator`` for the random
    methods (``"kaiming"``, ``"gaussian"``, the sketch of ``"pissa_niter_N"``); with an
    integer, ``"kaiming"`` and ``"gaussian"`` draw the same A as
    ``LoraLinear.from_weight(..., init=..., seed=seed)``.
    """
    method, niter = _method(init)
    fan_in_fan_out = validate.flag("fan_in_fan_out", fan_in_fan_out)
    w, rank = _weight(weight, rank)
    s = lora_scaling(rank, alpha, use_rslora)
    seed = _seed(seed)
    dtype = w.dtype
    wt = w.T if fan_in_fan_out else w  # (out, in)
    out_f, in_f = wt.shape
    if method in ("kaiming", "gaussian"):
        rng = np.random.default_rng(seed)
        if method == "kaiming":
            bound = 1.0 / math.sqrt(in_f)
            a = rng.uniform(-bound, bound, (rank, in_f))
        else:
            a = rng.normal(0.0, 1.0 / rank, (rank, in_f))
        return LoraInit(a.astype(dtype), np.zeros((out_f, rank), dtype), w)
    if method != "olora" and not s > 0.0:
        raise ConfigError(f"init {init!r} splits sqrt(S / s) over A and B (s = alpha / rank, the LoRA scaling): "
                          f"alpha must be > 0, got {alpha}")
    w64 = wt.astype(np.float64)
    if method == "olora":
        q, r = np.linalg.qr(w64)
        b, a = q[:, :rank], r[:rank]
    else:
        if method == "pissa":
            u, sv, vh = _svd_top(w64, rank)
        else:
            u, sv, vh = _svd_lowrank(w64, rank, niter, np.random.default_rng(seed))
        root = np.sqrt(sv / s)
        b, a = u * root, root[:, None] * vh
    a, b = a.astype(dtype), b.astype(dtype)
    residual = (w64 - s * (b.astype(np.float64) @ a.astype(np.float64))).astype(dtype)
    return LoraInit(a, b, residual.T.copy() if fan_in_fan_out else residual)


def loftq_init(weight, rank, alpha, *, iters: int = 1, blocksize: int = 64, double_quant: bool = False,
               use_rslora: bool = False, svd_niter: int | None = None, seed=None) -> LoftQInit:
    """LoftQ (Li et al. 2023) for an NF4 base: ``weight`` (out, in) becomes an NF4 tensor and
    an adapter of rank ``rank`` such that ``dequantize_nf4(nf4) + s * lora_b @ lora_a``
    approximates ``weight`` (``s`` = ``alpha / rank``, or ``alpha / sqrt(rank)`` with
    ``use_rslora``).

    PEFT's alternation, ``iters`` times: quantize ``W - s B A`` (W itself the first time),
    then B, A from the top ``rank`` singular triplets of ``W - deq(W_q)``, split as PiSSA
    splits them (``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``). One iteration is
    plain NF4 plus the best rank-``rank`` correction of its error; more iterations let the
    quantizer see what the adapter will carry. ``blocksize`` and ``double_quant`` are
    :func:`~numlora.quantize_nf4`'s.

    ``svd_niter``: None (default) takes the exact SVD, as PEFT does; an integer N takes the
    randomized SVD of ``"pissa_niter_N"`` instead (sketch drawn from ``seed``), far faster on
    large weights, for a slightly larger error.

    Returns :class:`LoftQInit` ``(nf4, lora_a, lora_b)``, A and B float32. PEFT's
    ``loftq_init`` returns the factors of ``W - deq(W_q)`` unscaled, right only for
    ``lora_alpha == r``; here they are divided by ``s``, the same for ``s = 1``.
    """
    w, rank = _weight(weight, rank)
    iters = validate.int_scalar("iters", iters, minimum=1)
    s = lora_scaling(rank, alpha, use_rslora)
    if not s > 0.0:
        raise ConfigError(f"loftq_init splits sqrt(S / s) over A and B (s = alpha / rank, the LoRA scaling): "
                          f"alpha must be > 0, got {alpha}")
    if svd_niter is not None:
        svd_niter = validate.int_scalar("svd_niter", svd_niter, minimum=0)
    rng = np.random.default_rng(_seed(seed))
    w64 = w.astype(np.float64)
    target = w
    for i in range(iters):
        nf4 = quantize_nf4(target, blocksize=blocksize, double_quant=double_quant)
        err = w64 - dequantize_nf4(nf4)
        u, sv, vh = _svd_top(err, rank) if svd_niter is None else _svd_lowrank(err, rank, svd_niter, rng)
        root = np.sqrt(sv / s)
        b, a = (u * root).astype(np.float32), (root[:, None] * vh).astype(np.float32)
        if i + 1 < iters:
            target = w64 - s * (b.astype(np.float64) @ a.astype(np.float64))
    return LoftQInit(nf4, a, b)


def as_plain_lora(lora_a, lora_b, init_a, init_b, alpha, *, use_rslora: bool = False):
    """A PiSSA / OLoRA adapter trained from ``(init_a, init_b)`` (what :func:`init_lora`
    returned) to ``(lora_a, lora_b)``, as a plain LoRA adapter over the *original* weight:
    ``s (B A - B0 A0) = s' [B, -B0] [A; A0]``, of rank ``2 r``. Returns ``(lora_a, lora_b,
    alpha)`` with the alpha that keeps the scaling (``2 alpha``, or ``sqrt(2) alpha`` with
    rsLoRA), as PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``
    converts them, so the adapter applies to the unmodified base model."""
    a = validate.float_array("lora_a", lora_a, 2)
    b = validate.float_array("lora_b", lora_b, 2)
    rank = a.shape[0]
    validate.expect_shape("lora_b", b, (b.shape[0], rank))
    validate.expect_shape("init_a", validate.float_array("init_a", init_a, 2), a.shape)
    validate.expect_shape("init_b", validate.float_array("init_b", init_b, 2), b.shape)
    alpha = validate.real_scalar("alpha", alpha)
    new_alpha = alpha * math.sqrt(2.0) if validate.flag("use_rslora", use_rslora) else 2.0 * alpha
    return (np.concatenate([a, np.asarray(init_a, a.dtype)], axis=0),
            np.concatenate([b, -np.asarray(init_b, b.dtype)], axis=1), new_alpha)
