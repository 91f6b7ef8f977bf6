"""The functional API for dense LoRA: validate, allocate, call a kernel.

``x W^T`` goes to BLAS through numpy (it is as fast as this machine allows); the LoRA
path folds the scale into the small ``(n, r)`` intermediate and adds ``u B^T`` and the
bias into the output in place, so no ``(n, out)`` temporary and never ``B @ A``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from . import _validate as v
from .errors import MergeStateError, ShapeError

__all__ = ["lora_forward", "merge_lora", "unmerge_lora", "MergeRecord"]

#: Exception slots per row kept by a tracked merge (see :class:`MergeRecord`).
EXCEPTION_SLOTS = 16


def _kernels():
    from .kernels import lora

    return lora


def _adapter_arrays(weight, lora_a, lora_b, fan_in_fan_out):
    """Validate weight, A, B; return (weight, A, B, out_features, in_features, rank)."""
    weight = v.float_array("weight", weight, 2)
    if fan_in_fan_out:
        in_f, out_f = weight.shape
    else:
        out_f, in_f = weight.shape
    lora_a, lora_b, rank = _low_rank_arrays(lora_a, lora_b, out_f, in_f)
    return weight, lora_a, lora_b, out_f, in_f, rank


def _low_rank_arrays(lora_a, lora_b, out_f, in_f):
    """Validate A (r, in) and B (out, r) against the base's shape; return (A, B, r)."""
    lora_a = v.float_array("lora_a", lora_a, 2)
    rank = lora_a.shape[0]
    v.expect_shape("lora_a", lora_a, (rank, in_f))
    lora_b = v.float_array("lora_b", lora_b, 2)
    v.expect_shape("lora_b", lora_b, (out_f, rank))
    return lora_a, lora_b, rank


def _input_rows(x, in_f, name="x", what="in_features"):
    """Validate a batch of row vectors: (width,) or (n, width), float, n may be 0."""
    x = v.float_array(name, x, (1, 2), allow_empty=True)
    if x.shape[-1] != in_f:
        want = (in_f,) if x.ndim == 1 else (x.shape[0], in_f)
        raise ShapeError(f"expected {name} of shape {want} ({what} = {in_f}), got {x.shape}")
    return x


def _prepare_out(out, x, out_f, dtype):
    shape = (out_f,) if x.ndim == 1 else (x.shape[0], out_f)
    if out is None:
        return np.empty(shape, dtype)
    return v.out_array("out", out, shape, dtype)


def _bias(bias, out_f, dtype):
    if bias is None:
        return np.zeros(1, dtype), False
    bias = v.float_array("bias", bias, 1)
    v.expect_shape("bias", bias, (out_f,))
    return np.ascontiguousarray(bias, dtype), True


def _base_product(x2, weight, fan_in_fan_out, out2):
    """out2 = x2 W^T (or x2 W under fan_in_fan_out) through BLAS."""
    wt = weight if fan_in_fan_out else weight.T
    if x2.shape[0] == 0:
        return
    np.dot(x2, wt, out=out2)


#: Rows of the batch per chunk when adding ``u B^T`` (bounds the temporary to
#: ``ROW_CHUNK * out_features`` elements).
ROW_CHUNK = 256


def _add_low_rank(x2, lora_a, lora_b, s, out2):
    """out2 += s * (x2 A^T) B^T, the scale folded into the (n, r) intermediate.

    All BLAS: a numba-parallel kernel right after the base GEMM fights OpenBLAS's
    still-spinning threads for the cores and was measured 2-6x slower here."""
    n = x2.shape[0]
    if n == 0:
        return
    u = np.dot(x2, lora_a.T)
    u *= u.dtype.type(s)
    bt = lora_b.T
    tmp = np.empty((min(n, ROW_CHUNK), out2.shape[1]), out2.dtype)
    for r0 in range(0, n, ROW_CHUNK):
        r1 = min(n, r0 + ROW_CHUNK)
        t = tmp[: r1 - r0]
        np.dot(u[r0:r1], bt, out=t)
        out2[r0:r1] += t


def lora_forward(x, weight, lora_a, lora_b, scaling, bias=None, out=None, *, fan_in_fan_out=False):
    """``y = x W^T + b + scaling * (x A^T) B^T``.

    Parameters
    ----------
    x : (in,) or (n, in) float array
    weight : (out, in) float array; ``(in, out)`` when ``fan_in_fan_out``
    lora_a : (r, in); lora_b : (out, r); bias : (out,) or None
    scaling : real number (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA)
    out : optional preallocated C-contiguous output of shape (out,) or (n, out) and the
        compute dtype, so repeated calls allocate nothing large.

    The compute dtype is float64 if any array is float64, else float32 (pass float32
    everywhere for speed: a float64 ``x`` upcasts a float32 weight, with a copy).
    Returns ``out``.
    """
    weight, lora_a, lora_b, out_f, in_f, _ = _adapter_arrays(weight, lora_a, lora_b, fan_in_fan_out)
    x = _input_rows(x, in_f)
    s = v.real_scalar("scaling", scaling)
    arrays = [x, weight, lora_a, lora_b] + ([bias] if bias is not None else [])
    dtype = np.result_type(*[np.asarray(a).dtype for a in arrays])
    b_arr, use_bias = _bias(bias, out_f, dtype)
    out = _prepare_out(out, x, out_f, dtype)
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), dtype)
    out2 = out.reshape(-1, out_f)
    _base_product(x2, weight.astype(dtype, copy=False), fan_in_fan_out, out2)
    _add_low_rank(x2, lora_a.astype(dtype, copy=False), lora_b.astype(dtype, copy=False), s, out2)
    if use_bias:
        out2 += b_arr
    return out


def linear_forward(x, weight, bias=None, out=None, *, fan_in_fan_out=False):
    """``y = x W^T + b`` (the base path alone; what a disabled or merged layer runs)."""
    weight = v.float_array("weight", weight, 2)
    out_f, in_f = weight.shape[::-1] if fan_in_fan_out else weight.shape
    x = _input_rows(x, in_f)
    arrays = [x, weight] + ([bias] if bias is not None else [])
    dtype = np.result_type(*[np.asarray(a).dtype for a in arrays])
    b_arr, use_bias = _bias(bias, out_f, dtype)
    out = _prepare_out(out, x, out_f, dtype)
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), dtype)
    out2 = out.reshape(-1, out_f)
    _base_product(x2, weight.astype(dtype, copy=False), fan_in_fan_out, out2)
    if use_bias:
        out2 += b_arr
    return out


@dataclass(eq=False)
class MergeRecord:
    """What a tracked merge keeps so that :func:`unmerge_lora` restores the weight bit for bit.

    For every element, one signed byte: how many representable floats lie between the
    original value and ``(w + d) - d`` (what a plain subtraction gives back). The few
    elements where that does not fit a byte (an original value absorbed by a much larger
    delta) keep their original bits in up to ``EXCEPTION_SLOTS`` slots per row; a row with
    more than that is kept whole. Memory: one byte per weight element (a quarter of a
    float32 weight, an eighth of a float64 one) plus ``rows * 16 * (4 + itemsize)`` bytes of
    slots plus any whole rows kept.
    """

    corr: np.ndarray
    exc_col: np.ndarray
    exc_bits: np.ndarray
    exc_count: np.ndarray
    saved_rows: np.ndarray
    saved: np.ndarray
    fingerprint: tuple = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.corr, self.exc_col, self.exc_bits, self.exc_count,
                                      self.saved_rows, self.saved))


def _merge_operands(weight, lora_a, lora_b, fan_in_fan_out, what):
    """Return (w, p, q, writeback) with w a C-contiguous 2-D view (or copy) of the
    weight such that the update is ``w[i, j] += s * sum_t p[i, t] q[t, j]``."""
    weight, lora_a, lora_b, _, _, _ = _adapter_arrays(weight, lora_a, lora_b, fan_in_fan_out)
    if not weight.flags.writeable:
        raise ShapeError(f"weight is read-only; {what} updates it in place")
    dt = weight.dtype
    a = np.ascontiguousarray(lora_a, dt)
    b = np.ascontiguousarray(lora_b, dt)
    if fan_in_fan_out:
        p, q = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    else:
        p, q = b, a
    if weight.flags.c_contiguous:
        return weight, p, q, None, (a, b)
    if weight.flags.f_contiguous:
        # W^T is C-contiguous: W^T[j, i] += s * sum_t q^T[j, t] p^T[t, i], same sums in
        # the same order, so the result is identical to the C-ordered case.
        return weight.T, np.ascontiguousarray(q.T), np.ascontiguousarray(p.T), None, (a, b)
    return np.ascontiguousarray(weight), p, q, weight, (a, b)


def _fingerprint(ab, scale, w, fan_in_fan_out):
    a, b = ab
    crc = zlib.crc32(memoryview(a).cast("B"))
    crc = zlib.crc32(memoryview(b).cast("B"), crc)
    return (crc, a.shape, b.shape, float(scale), w.shape, w.dtype.str, bool(fan_in_fan_out))


def _use_simd(k, w) -> bool:
    """The SIMD delta kernels apply to float32 weights where the CPU has vector units
    numlora uses (see numlora.kernels._simd); they give bit-identical results."""
    return k.SIMD_LANES > 0 and w.dtype == np.float32


def _int_view(w):
    it = np.int32 if w.dtype == np.float32 else np.int64
    info = np.iinfo(it)
    return w.view(it), info.max, info.min


def merge_lora(weight, lora_a, lora_b, scaling, fan_in_fan_out=False, *, record=False):
    """Add ``scaling * B @ A`` to ``weight`` in place (``(B @ A)^T`` when
    ``fan_in_fan_out``), without forming ``B @ A``.

    With ``record=True`` returns a :class:`MergeRecord` that lets :func:`unmerge_lora`
    restore the weight bit for bit; otherwise returns None. A and B are cast to the
    weight's dtype. Non-contiguous and Fortran-ordered weights give the same result as
    C-ordered ones.
    """
    s = v.real_scalar("scaling", scaling)
    w, p, q, writeback, ab = _merge_operands(weight, lora_a, lora_b, fan_in_fan_out, "merge_lora")
    k = _kernels()
    scale = w.dtype.type(s)
    simd = _use_simd(k, w)
    rec = None
    if not record:
        (k.merge_plain_simd if simd else k.merge_plain)(w, p, q, scale)
    else:
        m, n = w.shape
        wi, maxint, _ = _int_view(w)
        corr = np.empty((m, n), np.int8)
        exc_col = np.empty((m, EXCEPTION_SLOTS), np.int32)
        exc_bits = np.empty((m, EXCEPTION_SLOTS), wi.dtype)
        exc_count = np.empty(m, np.int64)
        (k.merge_tracked_simd if simd else k.merge_tracked)(w, wi, p, q, scale, maxint, corr, exc_col, exc_bits,
                                                            exc_count)
        rows = np.flatnonzero(exc_count > EXCEPTION_SLOTS)
        saved = w[rows].copy()
        if rows.size:
            part = w[rows]
            k.merge_plain(part, np.ascontiguousarray(p[rows]), q, scale)
            w[rows] = part
        rec = MergeRecord(corr, exc_col, exc_bits, exc_count, rows, saved,
                          _fingerprint(ab, s, w, fan_in_fan_out))
    if writeback is not None:
        writeback[...] = w
    return rec


def unmerge_lora(weight, lora_a, lora_b, scaling, fan_in_fan_out=False, *, record=None):
    """Subtract ``scaling * B @ A`` from ``weight`` in place.

    Given the :class:`MergeRecord` of the merge, restores the weight bit for bit (and
    raises :class:`~numlora.errors.MergeStateError` if A, B, scaling or the weight's
    shape changed since); without one, subtracts plainly (floating-point rounding may
    leave the last bit of some elements different from before the merge).
    """
    s = v.real_scalar("scaling", scaling)
    w, p, q, writeback, ab = _merge_operands(weight, lora_a, lora_b, fan_in_fan_out, "unmerge_lora")
    k = _kernels()
    scale = w.dtype.type(s)
    simd = _use_simd(k, w)
    if record is None:
        (k.merge_plain_simd if simd else k.merge_plain)(w, p, q, -scale)
    else:
        if not isinstance(record, MergeRecord):
            raise MergeStateError(f"record must be the MergeRecord merge_lora returned, got {type(record).__name__}")
        if _fingerprint(ab, s, w, fan_in_fan_out) != record.fingerprint:
            raise MergeStateError(
                "lora_a, lora_b, scaling or the weight's shape/dtype changed since the merge: "
                "unmerging now would not restore the base weight"
            )
        wi, maxint, minint = _int_view(w)
        (k.unmerge_tracked_simd if simd else k.unmerge_tracked)(
            w, wi, p, q, scale, maxint, minint, record.corr, record.exc_col, record.exc_bits, record.exc_count)
        if record.saved_rows.size:
            w[record.saved_rows] = record.saved
    if writeback is not None:
        writeback[...] = w
