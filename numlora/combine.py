"""Exact adapter arithmetic: ``combine_adapters`` builds one adapter whose delta is the
weighted sum of several adapters' deltas, ``sum_i w_i * s_i * B_i @ A_i`` (``s_i`` each
adapter's own scaling, rsLoRA's ``alpha / sqrt(r)`` included, applied once).

``method="cat"`` is exact (the ranks add up); ``method="svd"`` is the best approximation
of the sum at a given rank (Eckart-Young), computed from QR factors of the stacked
factors and an SVD of a small core, never from the dense ``(out, in)`` delta.
See ``docs/combine.md``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from . import _validate as validate
from .adapter import LoraAdapter
from .config import LoraConfig
from .errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from .layers import LoraLinear, QLoraLinear

#: The layers whose delta is ``scaling * B @ A`` (what can be combined).
_LAYERS = (LoraLinear, QLoraLinear)

__all__ = ["combine_adapters"]

METHODS = ("cat", "svd")


class _Term:
    """One adapter's contribution to one module: A (r, in), B (out, r) as float64, its
    scaling, its LoRA bias (or None) and its fan_in_fan_out (None: no opinion, a tuple)."""

    __slots__ = ("a", "b", "scaling", "lora_bias", "fan_in_fan_out")

    def __init__(self, a, b, scaling, lora_bias, fan_in_fan_out):
        self.a, self.b, self.scaling = a, b, scaling
        self.lora_bias, self.fan_in_fan_out = lora_bias, fan_in_fan_out


def _finite64(what, arr):
    arr = np.asarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        flat = arr.reshape(-1)
        raise validate.first_nonfinite(what, flat, arr.shape)
    return arr


def _term(what, item) -> _Term:
    """A :class:`_Term` from a LoraLinear / QLoraLinear or an ``(lora_a, lora_b, scaling)``
    tuple."""
    if isinstance(item, _LAYERS):
        if getattr(item, "use_dora", False):
            raise ConfigError(f"{what} is a DoRA layer: its delta is not scaling * B @ A (the magnitude rescales "
                              "the merged weight), so it cannot be combined exactly; combine plain LoRA layers")
        a, b, s = item.lora_a, item.lora_b, item.scaling
        lb = getattr(item, "lora_bias", None)
        fifo = getattr(item, "fan_in_fan_out", False)
    elif isinstance(item, tuple):
        if len(item) != 3:
            raise DTypeError(f"{what} must be a LoraLinear or a (lora_a, lora_b, scaling) tuple, "
                             f"got a tuple of {len(item)} items")
        a, b, s = item
        a = validate.float_array(f"{what} lora_a", a, 2)
        b = validate.float_array(f"{what} lora_b", b, 2)
        if isinstance(s, (float, np.floating)) and not math.isfinite(s):
            raise NonFiniteError(f"{what} scaling must be finite, got {float(s)}")
        s = validate.real_scalar(f"{what} scaling", s)
        if b.shape[1] != a.shape[0]:
            raise ShapeError(f"{what}: lora_a has shape {a.shape} (rank {a.shape[0]}), so lora_b must have shape "
                             f"(out_features, {a.shape[0]}); got {b.shape}")
        lb, fifo = None, None
    else:
        raise DTypeError(f"{what} must be a LoraLinear, a QLoraLinear or a (lora_a, lora_b, scaling) tuple, "
                         f"got {type(item).__name__}")
    return _Term(_finite64(f"{what} lora_a", a), _finite64(f"{what} lora_b", b), float(s),
                 None if lb is None else _finite64(f"{what} lora_bias", lb), fifo)


def _check_weights(weights, n):
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (Sequence, np.ndarray)):
        raise DTypeError(f"weights must be a sequence of real numbers, got {type(weights).__name__}")
    if isinstance(weights, np.ndarray) and weights.ndim != 1:
        raise ShapeError(f"weights must be 1-D (one per adapter), got an array of shape {weights.shape}")
    weights = list(weights)
    if len(weights) != n:
        raise ConfigError(f"expected one weight per adapter ({n}), got {len(weights)} weights")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Real):
            raise DTypeError(f"weights[{i}] must be a real number, got {type(w).__name__}")
        if isinstance(w, (float, np.floating)) and not math.isfinite(w):
            raise NonFiniteError(f"weights[{i}] must be finite, got {float(w)}")
        out.append(validate.real_scalar(f"weights[{i}]", w))  # and finite in float32
    return out


def _check_rank_arg(method, rank):
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if rank is None:
        return None
    if method == "cat":
        raise ConfigError("rank applies to method='svd' only; method='cat' is exact and its rank is the sum of "
                          "the adapters' ranks")
    rank = validate.int_scalar("rank", rank)
    if rank <= 0:
        raise ConfigError(f"rank must be a positive integer (or None for the full combined rank), got {rank}")
    return rank


def _combine_terms(module, terms, weights, method, rank):
    """(A float32 (r, in), B float32 (out, r), lora_bias float32 or None, fan_in_fan_out)
    for one module. ``terms`` pairs each present adapter's :class:`_Term` with its index."""
    where = f"module '{module}': " if module is not None else ""
    (i0, t0) = terms[0]
    out_f, in_f = t0.b.shape[0], t0.a.shape[1]
    fifo = None
    for i, t in terms:
        if (t.b.shape[0], t.a.shape[1]) != (out_f, in_f):
            raise ShapeError(f"{where}adapter {i} has shape (out, in) = {(t.b.shape[0], t.a.shape[1])}, but adapter "
                             f"{i0} has {(out_f, in_f)}; adapters combine only over the same module shape")
        if t.fan_in_fan_out is not None:
            if fifo is not None and t.fan_in_fan_out != fifo[1]:
                raise ConfigError(f"{where}adapter {i} has fan_in_fan_out={t.fan_in_fan_out} but adapter {fifo[0]} "
                                  f"has fan_in_fan_out={fifo[1]}; they must agree")
            fifo = fifo or (i, t.fan_in_fan_out)
    # the stacked factors: the combined delta is B_all @ A_all, exactly
    a_all = np.concatenate([t.a for _, t in terms], axis=0)                                 # (R, in)
    b_all = np.concatenate([(weights[i] * t.scaling) * t.b for i, t in terms], axis=1)      # (out, R)
    lora_bias = None
    if any(t.lora_bias is not None for _, t in terms):
        lora_bias = np.zeros(out_f)
        for i, t in terms:
            if t.lora_bias is not None:
                lora_bias += (weights[i] * t.scaling) * t.lora_bias
        with np.errstate(over="ignore"):
            lora_bias = lora_bias.astype(np.float32)
    if method == "svd":
        full = min(a_all.shape[0], out_f, in_f)
        k = full if rank is None else min(rank, full)
        qb, rb = np.linalg.qr(b_all)              # b_all = qb rb, qb (out, k1)
        qa, ra = np.linalg.qr(a_all.T)            # a_all^T = qa ra, qa (in, k2)
        u, sv, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)   # core (k1, k2)
        root = np.sqrt(sv[:k])
        b_all = (qb @ u[:, :k]) * root                               # (out, k)
        a_all = root[:, None] * (vt[:k] @ qa.T)                      # (k, in)
    with np.errstate(over="ignore"):  # checked just below
        a32 = np.ascontiguousarray(a_all, np.float32)
        b32 = np.ascontiguousarray(b_all, np.float32)
    for name, arr in (("A", a32), ("B", b32), ("lora_bias", lora_bias)):
        if arr is not None and not np.isfinite(arr).all():
            raise NonFiniteError(f"{where}the combined {name} overflows float32 (weights[i] * scaling_i * B_i is too "
                                 f"large for the float32 result: weights {[weights[i] for i, _ in terms]}, scalings "
                                 f"{[t.scaling for _, t in terms]}); use smaller weights")
    return a32, b32, lora_bias, False if fifo is None else fifo[1]


def combine_adapters(adapters, weights, method: str = "cat", rank: int | None = None):
    """One adapter whose delta is ``sum_i weights[i] * s_i * B_i @ A_i``.

    Parameters
    ----------
    adapters : sequence
        Either the layers of one module (:class:`~numlora.layers.LoraLinear`,
        :class:`~numlora.layers.QLoraLinear`, or ``(lora_a, lora_b, scaling)`` tuples with
        ``lora_a`` ``(r, in)``, ``lora_b`` ``(out, r)``), or :class:`~numlora.adapter.LoraAdapter`
        objects, combined module by module (a module some adapters lack gets nothing from
        them). Shapes and ``fan_in_fan_out`` must agree module by module. ``s_i`` is each
        layer's own :attr:`scaling` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA),
        applied exactly once. DoRA layers are refused (their delta is not ``s B A``).
    weights : sequence of float
        One finite real weight per adapter (negative weights subtract).
    method : ``"cat"`` or ``"svd"``
        ``"cat"``: exact; ``A = vstack(A_i)``, ``B = hstack(w_i s_i B_i)``, rank
        ``sum(r_i)``. ``"svd"``: the best rank-``rank`` approximation (Frobenius and
        spectral norm) of the summed delta, from a QR factorisation of the stacked B and
        A^T and an SVD of the ``R x R`` core (``R = sum(r_i)``): ``O((out + in) R^2)``
        work, the dense ``(out, in)`` delta is never formed. The singular values are
        split evenly: ``B = U sqrt(S)``, ``A = sqrt(S) V^T``.
    rank : int or None
        ``"svd"`` only: the rank to keep, at most; a module whose combined rank
        ``min(R, out, in)`` is smaller keeps that (exact; nothing is padded). None: the
        full combined rank (exact up to rounding). Must be None for ``"cat"``.

    Returns
    -------
    LoraLinear or LoraAdapter
        A new detached :class:`~numlora.layers.LoraLinear` (for layers; give it a base with
        ``attach``) or a new :class:`~numlora.adapter.LoraAdapter` of detached layers (for
        adapters). Every result layer has ``alpha = rank`` and ``use_rslora=False``, so
        its scaling is exactly 1 and ``B @ A`` is the combined delta itself; float32
        (computed in float64). A LoRA bias, where inputs have one, is
        ``sum_i w_i s_i bias_i``. The adapter's config: ``rank`` = the largest layer rank
        (``alpha`` likewise), other layers' ranks and alphas go to ``rank_pattern`` /
        ``alpha_pattern`` when saved, ``target_modules`` the union, dropout and metadata
        from the first adapter.
    """
    if isinstance(adapters, (str, bytes, LoraAdapter, *_LAYERS)) or not isinstance(adapters, Sequence):
        raise DTypeError(f"adapters must be a list of LoraLinear layers, (lora_a, lora_b, scaling) tuples or "
                         f"LoraAdapter objects, got {type(adapters).__name__}")
    adapters = list(adapters)
    if not adapters:
        raise ConfigError("adapters is empty: give at least one adapter to combine")
    weights = _check_weights(weights, len(adapters))
    rank = _check_rank_arg(method, rank)
    kinds = {isinstance(x, LoraAdapter) for x in adapters}
    if kinds == {True, False}:
        raise DTypeError("adapters mixes LoraAdapter objects with layers; give either the layers of one module "
                         "or whole adapters")
    if kinds == {False}:
        terms = [(i, _term(f"adapters[{i}]", x)) for i, x in enumerate(adapters)]
        a, b, lb, fifo = _combine_terms(None, terms, weights, method, rank)
        r = a.shape[0]
        return LoraLinear(None, a, b, r, use_rslora=False, fan_in_fan_out=fifo, lora_bias=lb)
    return _combine_lora_adapters(adapters, weights, method, rank)


def _combine_lora_adapters(adapters, weights, method, rank):
    cfgs = [ad.config for ad in adapters]
    for i, c in enumerate(cfgs):
        if c.use_dora:
            raise ConfigError(f"adapters[{i}] is a DoRA adapter: its delta is not scaling * B @ A, so it cannot be "
                              "combined exactly; combine plain LoRA adapters")
        if c.fan_in_fan_out != cfgs[0].fan_in_fan_out:
            raise ConfigError(f"adapters[{i}] has fan_in_fan_out={c.fan_in_fan_out} but adapters[0] has "
                              f"fan_in_fan_out={cfgs[0].fan_in_fan_out}; they must agree")
    names: dict[str, None] = {}
    for ad in adapters:
        names.update(dict.fromkeys(ad.layer_names))
    if not names:
        raise ConfigError("the adapters have no layers to combine")
    results = {}
    for name in names:
        terms = [(i, _term(f"adapters[{i}]['{name}']", ad[name])) for i, ad in enumerate(adapters) if name in ad]
        results[name] = _combine_terms(name, terms, weights, method, rank)
    targets: dict[str, None] = {}
    for c in cfgs:
        targets.update(dict.fromkeys(c.target_modules))
    first = cfgs[0]
    same = {k: getattr(first, k) if all(getattr(c, k) == getattr(first, k) for c in cfgs) else None
            for k in ("base_model_name_or_path", "task_type")}
    top = max(a.shape[0] for a, _, _, _ in results.values())
    config = LoraConfig(rank=top, alpha=top, dropout=first.dropout, target_modules=tuple(targets),
                        fan_in_fan_out=first.fan_in_fan_out, use_rslora=False,
                        lora_bias=any(c.lora_bias for c in cfgs), **same)
    out = LoraAdapter(config)
    for name, (a, b, lb, _) in results.items():
        out.add_lora(name, a, b, alpha=a.shape[0], lora_bias=lb)
    return out
