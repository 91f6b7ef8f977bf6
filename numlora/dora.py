"""DoRA (weight-decomposed low-rank adaptation) as PEFT computes it, over numpy arrays.

A DoRA layer adds a magnitude vector ``m`` ``(out,)`` to LoRA's A and B. With
``V = W + s B A`` (``s`` the scaling; under ``fan_in_fan_out`` the base is stored
``(in, out)`` and ``V = W^T + s B A``) and ``n = ||V||`` per output row:

- forward: ``y = (m / n) * (x W^T + s (x A^T) B^T) + b`` (``n`` is a constant of the
  forward, as PEFT detaches it);
- merge: ``W <- (m / n) V`` (the base bias is not scaled).

PEFT's ``peft/tuners/lora/dora.py`` (``DoraLinearLayer``) and ``variants.py``
(``DoraLinearVariant``) are the reference. Rows are processed in chunks, in float64, in
one scratch buffer per thread reused from chunk to chunk and call to call, so memory
stays small whatever the weight's size and the merged weight is rounded once.
"""

from __future__ import annotations

import numpy as np

from . import _scratch
from . import _validate as validate
from ._dispatch import dispatch
from .errors import NonFiniteError, ShapeError
from .ops import lora_forward

__all__ = ["dora_forward", "dora_weight_norm", "merge_dora"]

#: Output rows per chunk (bounds the float64 temporary to ``ROW_CHUNK * in_features``).
ROW_CHUNK = 256


def _magnitude(magnitude, out_f):
    m = validate.float_array("magnitude", magnitude, 1)
    validate.expect_shape("magnitude", m, (out_f,))
    return m


def _chunks(weight, a, b, s, fan_in_fan_out):
    """``(r0, r1, rows)`` for each chunk of ``ROW_CHUNK`` output rows, ``rows`` =
    ``W[r0:r1] + s * B[r0:r1] @ A`` in float64 (W as an ``(out, in)`` matrix). ``rows`` is
    a view of the calling thread's scratch buffer (numlora._scratch), overwritten by the
    next chunk.

    Under ``fan_in_fan_out`` the rows are columns of the stored weight and are computed
    in its layout, as ``(in, rows)`` C-contiguous (``A^T @ B^T``, the same dot products
    over the rank), so numpy sums a row in the order of a column of the stored weight."""
    out_f, in_f = b.shape[0], a.shape[1]
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    scratch = _scratch.scratch("dora.rows", min(ROW_CHUNK, out_f) * in_f, np.float64)
    for r0 in range(0, out_f, ROW_CHUNK):
        r1 = min(out_f, r0 + ROW_CHUNK)
        if fan_in_fan_out:
            buf = scratch[:in_f * (r1 - r0)].reshape(in_f, r1 - r0)
            np.matmul(a64.T, b64[r0:r1].T, out=buf)
            base = weight[:, r0:r1]
        else:
            buf = scratch[:(r1 - r0) * in_f].reshape(r1 - r0, in_f)
            np.matmul(b64[r0:r1], a64, out=buf)
            base = weight[r0:r1]
        buf *= s
        buf += base
        yield r0, r1, (buf.T if fan_in_fan_out else buf)


def _norms(weight, a, b, s, fan_in_fan_out):
    """The row norms of ``W + s B A`` (checked arrays), float64 ``(out,)``."""
    norm = np.empty(b.shape[0], np.float64)
    for r0, r1, rows in _chunks(weight, a, b, s, fan_in_fan_out):
        np.einsum("ij,ij->i", rows, rows, out=norm[r0:r1])
    return np.sqrt(norm, out=norm)


def _check_norm(norm):
    zero = np.flatnonzero(~(norm > 0))
    if zero.size:
        i = int(zero[0])
        raise NonFiniteError(f"DoRA: row {i} of W + scaling * B @ A has norm {norm[i]}; magnitude / norm is "
                             "undefined")


@dispatch(cpu_only=True)
def dora_weight_norm(weight, lora_a, lora_b, scaling, fan_in_fan_out=False) -> np.ndarray:
    """``||W + scaling * B @ A||`` per output row, float64 ``(out,)`` (``W`` is the weight as
    a ``(out, in)`` matrix: the transpose of the stored one under ``fan_in_fan_out``)."""
    s = validate.real_scalar("scaling", scaling)
    weight, a, b, _, _, _ = validate.adapter_arrays(weight, lora_a, lora_b, fan_in_fan_out)
    return _norms(weight, a, b, s, fan_in_fan_out)


@dispatch(cpu_only=True)
def dora_forward(x, weight, lora_a, lora_b, scaling, magnitude, bias=None, out=None, *,
                 fan_in_fan_out=False, weight_norm=None) -> np.ndarray:
    """``y = (m / n) * (x W^T + scaling * (x A^T) B^T) + b`` with ``n`` the row norms of
    ``W + scaling * B @ A`` (PEFT's DoRA forward in inference).

    ``weight_norm`` : ``n`` when the caller has it already (:func:`dora_weight_norm`;
    :class:`~numlora.layers.LoraLinear` caches it), else it is computed. Other arguments
    as :func:`numlora.ops.lora_forward`; ``out`` may overlap any input (the result is then
    computed into a temporary and copied into it). Returns ``out``."""
    weight, lora_a, lora_b, out_f, _, _ = validate.adapter_arrays(weight, lora_a, lora_b, fan_in_fan_out)
    m = _magnitude(magnitude, out_f)
    s = validate.real_scalar("scaling", scaling)
    if out is not None and validate.overlapping(out, {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b,
                                               "magnitude": m, "bias": bias, "weight_norm": weight_norm}):
        res = dora_forward(x, weight, lora_a, lora_b, s, m, bias, fan_in_fan_out=fan_in_fan_out,
                           weight_norm=weight_norm)
        validate.out_array("out", out, res.shape, res.dtype)
        out[...] = res
        return out
    if weight_norm is None:
        weight_norm = dora_weight_norm(weight, lora_a, lora_b, s, fan_in_fan_out)
    else:
        weight_norm = validate.float_array("weight_norm", weight_norm, 1)
        validate.expect_shape("weight_norm", weight_norm, (out_f,))
    _check_norm(weight_norm)
    out = lora_forward(x, weight, lora_a, lora_b, s, None, out=out, fan_in_fan_out=fan_in_fan_out)
    out *= (m.astype(np.float64) / weight_norm).astype(out.dtype)
    if bias is not None:
        bias = validate.float_array("bias", bias, 1)
        validate.expect_shape("bias", bias, (out_f,))
        out += bias.astype(out.dtype, copy=False)
    return out


@dispatch(cpu_only=True)
def merge_dora(weight, lora_a, lora_b, scaling, magnitude, fan_in_fan_out=False) -> None:
    """Merge a DoRA adapter into ``weight`` in place: ``W <- (m / n) (W + scaling * B @ A)``,
    ``n`` the row norms of ``W + scaling * B @ A`` (rows of ``W^T`` and columns of the
    stored weight under ``fan_in_fan_out``), as PEFT's ``merge_and_unload`` does.

    ``weight`` : float32 (or float64) ``(out, in)`` (``(in, out)`` with ``fan_in_fan_out``),
    writable. ``magnitude`` : ``(out,)``. Each chunk of rows is computed in float64 and
    rounded to the weight's dtype once. The base bias is unchanged by a DoRA merge.
    There is no exact inverse: to unmerge, keep a copy of the weight
    (:meth:`LoraLinear.merge <numlora.layers.LoraLinear.merge>` does). ``lora_a``,
    ``lora_b`` or ``magnitude`` sharing memory with ``weight`` is refused
    (:class:`~numlora.errors.ShapeError`), as in :func:`numlora.ops.merge_lora`.
    """
    s = validate.real_scalar("scaling", scaling)
    weight, a, b, out_f, _, _ = validate.adapter_arrays(weight, lora_a, lora_b, fan_in_fan_out)
    if not weight.flags.writeable:
        raise ShapeError("weight is read-only; merge_dora updates it in place")
    m = _magnitude(magnitude, out_f)
    validate.refuse_overlap("weight", weight, {"lora_a": a, "lora_b": b, "magnitude": m}, "merge_dora")
    m = m.astype(np.float64)
    # All norms first, so that a bad row leaves the weight untouched.
    norm = _norms(weight, a, b, s, fan_in_fan_out)
    _check_norm(norm)
    factor = m / norm
    for r0, r1, rows in _chunks(weight, a, b, s, fan_in_fan_out):
        rows *= factor[r0:r1, None]
        if fan_in_fan_out:
            weight[:, r0:r1] = rows.T
        else:
            weight[r0:r1] = rows
