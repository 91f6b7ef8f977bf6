"""The functional API of LoRA on embedding layers, as PEFT's ``lora.Embedding`` computes it.

The base is an embedding table ``weight`` (num_embeddings, embedding_dim); the adapter is
``lora_a`` (r, num_embeddings) and ``lora_b`` (embedding_dim, r), PEFT's
``lora_embedding_A`` / ``lora_embedding_B``. For token ids ``ids``::

    y[i] = weight[ids[i]] + scaling * lora_a[:, ids[i]] @ lora_b.T

(PEFT: ``F.embedding(x, A.T) @ B.T * scaling``). There is no dropout: PEFT applies none
to the ids of an embedding. The delta of the table is ``scaling * (B @ A).T``, which is
:func:`numlora.ops.merge_lora` with ``fan_in_fan_out=True`` (the table stored (in, out)):
:func:`merge_embedding` / :func:`unmerge_embedding` are that, with the same bit-exact
:class:`~numlora.ops.MergeRecord`.
"""

from __future__ import annotations

import numpy as np

from . import _backward as bw
from . import _validate as validate
from ._dispatch import dispatch
from .errors import DTypeError, ShapeError
from .ops import merge_lora, unmerge_lora

__all__ = ["embedding_forward", "embedding_lora_backward", "embedding_lora_forward", "merge_embedding",
           "unmerge_embedding"]


def _kernels():
    from .kernels import embed_conv

    return embed_conv


def token_ids(ids, vocab: int, name: str = "ids") -> np.ndarray:
    """``ids`` as an int64 array (any shape), every value in ``0 .. vocab - 1``."""
    if not isinstance(ids, np.ndarray):
        try:
            ids = np.asarray(ids)
        except Exception as exc:
            raise DTypeError(f"{name} must be an array of integer token ids, got {type(ids).__name__}") from exc
    if ids.dtype.kind not in "iu":
        raise DTypeError(f"{name} must be an array of integer token ids, got dtype {ids.dtype}")
    flat = np.ascontiguousarray(ids.reshape(-1), np.int64) if ids.size else np.zeros(0, np.int64)
    if ids.dtype.kind == "u" and ids.size and int(ids.max()) >= vocab:
        bad = int(np.argmax(ids.reshape(-1) >= vocab))
        raise ShapeError(f"{name} must be in 0..{vocab - 1} (num_embeddings = {vocab}), got {ids.reshape(-1)[bad]} "
                         f"at flat index {bad}")
    if flat.size:
        bad = np.flatnonzero((flat < 0) | (flat >= vocab))
        if bad.size:
            k = int(bad[0])
            raise ShapeError(f"{name} must be in 0..{vocab - 1} (num_embeddings = {vocab}), got {flat[k]} at flat "
                             f"index {k}")
    return flat


def _table_arrays(weight, lora_a, lora_b):
    """(weight (V, D), A (r, V), B (D, r), V, D, r), validated."""
    weight, lora_a, lora_b, dim, vocab, rank = validate.adapter_arrays(weight, lora_a, lora_b, True)
    return weight, lora_a, lora_b, vocab, dim, rank


def _out(out, ids, dim, dtype, inputs):
    shape = tuple(np.shape(ids)) + (dim,)
    if out is None:
        return np.empty(shape, dtype), None
    validate.out_array("out", out, shape, dtype)
    return validate.private_out(out, inputs)


@dispatch(cpu_only=True)
def embedding_lora_forward(ids, weight, lora_a, lora_b, scaling, out=None):
    """``y = weight[ids] + scaling * A[:, ids]^T B^T``: PEFT's ``lora.Embedding`` forward.

    Parameters
    ----------
    ids : integer array of any shape, values in ``0 .. num_embeddings - 1``
    weight : (num_embeddings, embedding_dim) float array, the base table
    lora_a : (r, num_embeddings) (PEFT's ``lora_embedding_A``)
    lora_b : (embedding_dim, r) (PEFT's ``lora_embedding_B``)
    scaling : ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)
    out : optional C-contiguous ``ids.shape + (embedding_dim,)`` array of the compute
        dtype (float64 if any array is, else float32); it may overlap the inputs.

    The base rows are gathered into the output and the r terms added to them in place,
    two rows and up to eight terms per SIMD pass, in order t = 0, 1, ... (no ``(n, dim)``
    temporary; ``B^T`` and the ``(n, r)`` coefficients are the only ones).
    """
    weight, lora_a, lora_b, vocab, dim, _ = _table_arrays(weight, lora_a, lora_b)
    s = validate.real_scalar("scaling", scaling)
    flat = token_ids(ids, vocab)
    dtype = np.result_type(weight.dtype, lora_a.dtype, lora_b.dtype)
    out, dest = _out(out, ids, dim, dtype, {"weight": weight, "lora_a": lora_a, "lora_b": lora_b})
    if flat.size:
        _kernels().embedding_lora_forward(flat, np.ascontiguousarray(weight, dtype),
                                          np.ascontiguousarray(lora_a, dtype), np.ascontiguousarray(lora_b, dtype),
                                          dtype.type(s), out.reshape(-1, dim))
    return validate.deliver(out, dest)


@dispatch(cpu_only=True)
def embedding_forward(ids, weight, out=None):
    """``weight[ids]``: the base embedding alone (what a disabled or merged layer runs)."""
    weight = validate.weight_array(weight, True)
    vocab, dim = weight.shape
    flat = token_ids(ids, vocab)
    out, dest = _out(out, ids, dim, weight.dtype, {"weight": weight})
    if flat.size:
        _kernels().embedding_gather(flat, np.ascontiguousarray(weight), out.reshape(-1, dim))
    return validate.deliver(out, dest)


@dispatch(cpu_only=True)
def embedding_lora_backward(ids, lora_a, lora_b, scaling, grad_out, *, padding_idx=None, grad_a=None,
                            grad_b=None):
    """Gradients of :func:`embedding_lora_forward` with respect to A and B.

    With ``G = grad_out`` (one row per id), ``U[i] = A[:, ids[i]]`` and ``H = G B``:
    ``grad_b = s G^T U`` and ``grad_a[:, v] = s * sum of H[i] over the i with ids[i] == v``.
    Ids equal to ``padding_idx`` give A no gradient (as ``F.embedding(..., padding_idx)``
    in PEFT's forward). The ids get no gradient (they are integers); the base table is
    frozen.

    ``grad_a`` / ``grad_b``: optional buffers of A's / B's shape in the compute dtype, the
    gradients **added** into them. Returns ``(grad_a, grad_b)``.
    """
    lora_a = validate.float_array("lora_a", lora_a, 2)
    rank, vocab = lora_a.shape
    lora_b = validate.float_array("lora_b", lora_b, 2)
    if lora_b.shape[1] != rank:
        raise ShapeError(f"expected lora_b of shape (embedding_dim, {rank}) (lora_a has rank {rank}), got "
                         f"{lora_b.shape}")
    dim = lora_b.shape[0]
    s = validate.real_scalar("scaling", scaling)
    flat = token_ids(ids, vocab)
    g = validate.float_array("grad_out", grad_out, None, allow_empty=True)
    want = tuple(np.shape(ids)) + (dim,)
    if tuple(g.shape) != want:
        raise ShapeError(f"expected grad_out of shape {want} (ids.shape + (embedding_dim,)), got {g.shape}")
    skip = -1
    if padding_idx is not None:
        skip = validate.int_scalar("padding_idx", padding_idx)
        if skip < 0:
            skip += vocab
        if not 0 <= skip < vocab:
            raise ShapeError(f"padding_idx must be in -{vocab}..{vocab - 1}, got {padding_idx}")
    dtype = np.result_type(lora_a.dtype, lora_b.dtype, g.dtype)
    grad_a = bw.grad_buffer("grad_a", grad_a, lora_a.shape, dtype)
    grad_b = bw.grad_buffer("grad_b", grad_b, lora_b.shape, dtype)
    a = np.ascontiguousarray(lora_a, dtype)
    b = np.ascontiguousarray(lora_b, dtype)
    g2 = np.ascontiguousarray(g.reshape(-1, dim), dtype)
    a, b, g2 = bw.unalias_grads(grad_a, grad_b, (a, b, g2))
    k = _kernels()
    u = np.empty((flat.size, rank), dtype)
    k.embedding_gather(flat, a.T, u)
    u *= dtype.type(s)
    gb = np.dot(g2.T, u)
    h = np.dot(g2, b)
    h *= dtype.type(s)
    if grad_a is None:
        grad_a = np.zeros(lora_a.shape, dtype)
    if grad_a.flags.c_contiguous:
        k.scatter_columns_add(flat, h, skip, grad_a)
    else:
        ga = np.zeros(lora_a.shape, dtype)
        k.scatter_columns_add(flat, h, skip, ga)
        grad_a += ga
    if grad_b is None:
        grad_b = gb
    else:
        grad_b += gb
    return grad_a, grad_b


@dispatch(cpu_only=True)
def merge_embedding(weight, lora_a, lora_b, scaling, *, record=False):
    """``weight += scaling * (B @ A)^T`` in place (PEFT's ``Embedding.get_delta_weight``),
    without forming ``B @ A``. With ``record=True`` returns the
    :class:`~numlora.ops.MergeRecord` that lets :func:`unmerge_embedding` restore the table
    bit for bit (see :func:`numlora.ops.merge_lora`, which this is with
    ``fan_in_fan_out=True``)."""
    _table_arrays(weight, lora_a, lora_b)
    return merge_lora(weight, lora_a, lora_b, scaling, True, record=record)


@dispatch(cpu_only=True)
def unmerge_embedding(weight, lora_a, lora_b, scaling, *, record=None):
    """Subtract ``scaling * (B @ A)^T`` from ``weight`` in place; bit-exact with the
    record of :func:`merge_embedding` (see :func:`numlora.ops.unmerge_lora`)."""
    _table_arrays(weight, lora_a, lora_b)
    unmerge_lora(weight, lora_a, lora_b, scaling, True, record=record)
