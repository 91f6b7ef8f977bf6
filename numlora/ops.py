"""The functional API for dense LoRA: validate, allocate, call a kernel.

``x W^T`` goes to BLAS through numpy (it is as fast as this machine allows); the LoRA
path folds the scale into the small ``(n, r)`` intermediate and adds ``u B^T`` and the
bias into the output in place, so no ``(n, out)`` temporary and never ``B @ A``.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import _validate as v
from .device import on_device as _on_device
from .errors import ConfigError, DTypeError, MergeStateError, NonFiniteError, NumloraError, ShapeError

__all__ = ["lora_forward", "merge_lora", "unmerge_lora", "MergeRecord", "lora_dropout", "lora_backward",
           "DropoutState"]

#: Exception slots per row kept by a tracked merge (see :class:`MergeRecord`).
EXCEPTION_SLOTS = 16


def _gpu():
    from . import cuda

    return cuda.ops


def _kernels():
    from .kernels import lora

    return lora


def _adapter_arrays(weight, lora_a, lora_b, fan_in_fan_out):
    """Validate weight, A, B; return (weight, A, B, out_features, in_features, rank).
    Shape errors say what is likely wrong (a transposed weight, A and B swapped, an
    adapter for another base) and how to fix it."""
    fan_in_fan_out = v.flag("fan_in_fan_out", fan_in_fan_out)
    weight = _weight_array(weight, fan_in_fan_out)
    if fan_in_fan_out:
        in_f, out_f = weight.shape
    else:
        out_f, in_f = weight.shape
    lora_a, lora_b, rank = _low_rank_arrays(lora_a, lora_b, out_f, in_f,
                                            base=_Base("the weight", weight.shape, fan_in_fan_out))
    return weight, lora_a, lora_b, out_f, in_f, rank


def _weight_array(weight, fan_in_fan_out, name="weight"):
    """A dense base weight: a 2-D float array (a 1-D one gets a hint)."""
    w = v.float_array(name, weight, None)
    if w.ndim != 2:
        layout = "(in_features, out_features) (fan_in_fan_out=True)" if fan_in_fan_out else \
            "(out_features, in_features)"
        hint = (": a 1-D array looks like a bias or a flattened weight; pass the 2-D weight, or "
                "reshape it to its (out_features, in_features)" if w.ndim == 1 else "")
        raise ShapeError(f"expected {name} to be 2-D, got shape {w.shape}: a Linear weight is a {layout} "
                         f"matrix{hint}")
    return w


class _Base(NamedTuple):
    """What the adapter is checked against, for error messages: the base's name ("weight",
    "the NF4 weight", "the bank's base"), its stored shape, and whether it is stored (in,
    out) (None: the layout is fixed, (out, in))."""

    name: str
    shape: tuple
    fan_in_fan_out: bool | None


def _base_desc(base, out_f, in_f):
    if base is None:
        return f"the base has out_features {out_f} and in_features {in_f}"
    layout = "(in, out)" if base.fan_in_fan_out else "(out, in)"
    return (f"{base.name} has out_features {out_f} and in_features {in_f} (shape {tuple(base.shape)}, read as "
            f"{layout})")


def _transpose_fix(base):
    if base is None:
        return "is the base transposed?"
    if base.fan_in_fan_out is None:
        return (f"{base.name} looks transposed: it must be (out, in); if you quantized a weight stored (in, out), "
                "quantize weight.T instead")
    now = bool(base.fan_in_fan_out)
    stored = "(out, in)" if now else "(in, out)"
    return f"if {base.name} is stored transposed, as {stored}, pass fan_in_fan_out={not now}"


def _adapter_hint(a_shape, b_shape, out_f, in_f, base, name):
    """Why A (r, in) / B (out, r) do not fit a base (out_f, in_f): the likely mistake and its
    fix, or a plain statement of the mismatch. ``b_shape`` may be None (B not a 2-D array)."""
    desc = _base_desc(base, out_f, in_f)
    if name == "lora_a":
        cols = a_shape[1]
        if b_shape is not None and a_shape == (out_f, b_shape[0]) and b_shape == (a_shape[1], in_f):
            return (f"lora_a and lora_b look swapped: lora_a has shape {a_shape} and lora_b {b_shape}, the shapes "
                    f"of B (out_features, rank) and A (rank, in_features) for this base ({desc}); pass "
                    f"lora_a=A, lora_b=B")
        if cols == out_f and out_f != in_f:
            return f"lora_a has {cols} columns but {desc}; {_transpose_fix(base)}"
        return (f"lora_a has {cols} columns but {desc}; the adapter does not fit this base (an adapter for another "
                f"model or layer?)")
    rank = a_shape[0]
    rows, cols = b_shape
    if b_shape == (rank, out_f) and rank != out_f:
        return "lora_b looks transposed: B is (out_features, rank); pass lora_b.T"
    if rows == out_f:
        return (f"lora_a has rank {rank} (its first dimension) but lora_b has {cols} columns: A and B must have the "
                f"same rank (are they from different adapters?)")
    if rows == in_f and out_f != in_f:
        return f"lora_b has {rows} rows but {desc}; {_transpose_fix(base)}"
    return (f"lora_b has {rows} rows but {desc}; the adapter does not fit this base (an adapter for another model "
            f"or layer?)")


def _low_rank_arrays(lora_a, lora_b, out_f, in_f, base=None):
    """Validate A (r, in) and B (out, r) against the base's shape; return (A, B, r).
    ``base``: a :class:`_Base` for the messages (what the base is and its stored shape)."""
    lora_a = _factor("lora_a", lora_a, ": A is (rank, in_features); a rank-1 A is lora_a.reshape(1, -1)")
    rank = lora_a.shape[0]
    if lora_a.shape[1] != in_f:
        try:
            b_shape = tuple(_factor("lora_b", lora_b, "").shape)
        except NumloraError:  # B is bad too: the message is about A
            b_shape = None
        hint = _adapter_hint(tuple(lora_a.shape), b_shape, out_f, in_f, base, "lora_a")
        if hint.startswith("lora_a and lora_b look swapped"):
            rank = b_shape[0]
        raise ShapeError(f"expected lora_a of shape {(rank, in_f)}, got {tuple(lora_a.shape)}: {hint}")
    lora_b = _factor("lora_b", lora_b, ": B is (out_features, rank); a rank-1 B is lora_b.reshape(-1, 1)")
    if tuple(lora_b.shape) != (out_f, rank):
        hint = _adapter_hint(tuple(lora_a.shape), tuple(lora_b.shape), out_f, in_f, base, "lora_b")
        raise ShapeError(f"expected lora_b of shape {(out_f, rank)}, got {tuple(lora_b.shape)}: {hint}")
    return lora_a, lora_b, rank


def _factor(name, a, hint):
    a = v.float_array(name, a, None)
    if a.ndim != 2:
        raise ShapeError(f"expected {name} to be 2-D, got shape {a.shape}{hint}")
    if a.size == 0:
        raise ShapeError(f"expected a non-empty {name}, got shape {a.shape}")
    return a


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


def _private_out(out, inputs):
    """``(buffer, dest)``: the caller's ``out`` itself and None, or, when ``out`` shares
    memory with one of ``inputs`` (name -> array), a fresh buffer to compute into and the
    caller's ``out`` to copy it into at the end (so ``out=x`` or ``out=`` a view of the
    weight gives the right numbers; the extra buffer is only made then)."""
    if v.overlapping(out, inputs) is None:
        return out, None
    return np.empty(out.shape, out.dtype), out


def _deliver(out, dest):
    if dest is None:
        return out
    dest[...] = out
    return dest


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
    if x2.shape[0] == 0:
        return
    u = np.dot(x2, lora_a.T)
    u *= u.dtype.type(s)
    _expand_into(u, lora_b, out2)


def lora_forward(x, weight, lora_a, lora_b, scaling, bias=None, out=None, *, fan_in_fan_out=False):
    """``y = x W^T + b + scaling * (x A^T) B^T``.

    Parameters
    ----------
    x : (in,) or (n, in) float array
    weight : (out, in) float array; ``(in, out)`` when ``fan_in_fan_out``
    lora_a : (r, in); lora_b : (out, r); bias : (out,) or None
    scaling : real number (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA)
    out : optional preallocated C-contiguous output of shape (out,) or (n, out) and the
        compute dtype, so repeated calls allocate nothing large. It may overlap the inputs
        (``out=x``, a view of the weight): the result is then computed into a temporary
        and copied into ``out``, so it is the same as without overlap.

    Returns
    -------
    out
        The compute dtype is float64 if any array is float64, else float32 (pass float32
        everywhere for speed: a float64 ``x`` upcasts a float32 weight, with a copy).
    """
    if _on_device(x, weight, lora_a, lora_b, bias, out):
        return _gpu().lora_forward(x, weight, lora_a, lora_b, scaling, bias, out, fan_in_fan_out=fan_in_fan_out)
    weight, lora_a, lora_b, out_f, in_f, _ = _adapter_arrays(weight, lora_a, lora_b, fan_in_fan_out)
    x = _input_rows(x, in_f)
    s = v.real_scalar("scaling", scaling)
    arrays = [x, weight, lora_a, lora_b] + ([bias] if bias is not None else [])
    dtype = np.result_type(*[np.asarray(a).dtype for a in arrays])
    b_arr, use_bias = _bias(bias, out_f, dtype)
    dest = None
    if out is not None:
        out, dest = _private_out(_prepare_out(out, x, out_f, dtype),
                                 {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b, "bias": bias})
    else:
        out = _prepare_out(out, x, out_f, dtype)
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), dtype)
    out2 = out.reshape(-1, out_f)
    _base_product(x2, weight.astype(dtype, copy=False), fan_in_fan_out, out2)
    _add_low_rank(x2, lora_a.astype(dtype, copy=False), lora_b.astype(dtype, copy=False), s, out2)
    if use_bias:
        out2 += b_arr
    return _deliver(out, dest)


def linear_forward(x, weight, bias=None, out=None, *, fan_in_fan_out=False):
    """``y = x W^T + b`` (the base path alone; what a disabled or merged layer runs).
    ``out`` may overlap the inputs (computed into a temporary then, as in
    :func:`lora_forward`)."""
    if _on_device(x, weight, bias, out):
        return _gpu().linear_forward(x, weight, bias, out, fan_in_fan_out=fan_in_fan_out)
    fan_in_fan_out = v.flag("fan_in_fan_out", fan_in_fan_out)
    weight = _weight_array(weight, fan_in_fan_out)
    out_f, in_f = weight.shape[::-1] if fan_in_fan_out else weight.shape
    x = _input_rows(x, in_f)
    arrays = [x, weight] + ([bias] if bias is not None else [])
    dtype = np.result_type(*[np.asarray(a).dtype for a in arrays])
    b_arr, use_bias = _bias(bias, out_f, dtype)
    dest = None
    if out is not None:
        out, dest = _private_out(_prepare_out(out, x, out_f, dtype), {"x": x, "weight": weight, "bias": bias})
    else:
        out = _prepare_out(out, x, out_f, dtype)
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), dtype)
    out2 = out.reshape(-1, out_f)
    _base_product(x2, weight.astype(dtype, copy=False), fan_in_fan_out, out2)
    if use_bias:
        out2 += b_arr
    return _deliver(out, dest)


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

    A record is single-use: :func:`unmerge_lora` marks it :attr:`used` and refuses it
    afterwards (using it twice would subtract the delta twice). It also keeps a CRC of
    ~4096 evenly spaced elements of the merged weight, so that an unmerge given another
    array (or a transposed copy) is refused instead of "restoring" it.
    """

    corr: np.ndarray
    exc_col: np.ndarray
    exc_bits: np.ndarray
    exc_count: np.ndarray
    saved_rows: np.ndarray
    saved: np.ndarray
    fingerprint: tuple = field(repr=False)
    #: CRC of evenly spaced elements of the merged weight (see :func:`_weight_sample`).
    weight_sample: int = field(default=0, repr=False)
    #: Whether an :func:`unmerge_lora` has used the record (it is single-use).
    used: bool = False

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
    v.refuse_overlap("weight", weight, {"lora_a": lora_a, "lora_b": lora_b}, what)
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


#: Elements of the merged weight a MergeRecord checksums (evenly spaced; ~20 us).
WEIGHT_SAMPLE = 4096


def _weight_sample(w):
    """A CRC of about WEIGHT_SAMPLE evenly spaced elements of the C-contiguous working
    weight: cheap evidence that an unmerge is given the array (and layout) its merge
    left, not another one of the same shape."""
    flat = w.reshape(-1)
    step = max(1, flat.size // WEIGHT_SAMPLE)
    return zlib.crc32(np.ascontiguousarray(flat[::step]).view(np.uint8))


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
    restore the weight bit for bit (once); otherwise returns None. A and B are cast to the
    weight's dtype. Non-contiguous and Fortran-ordered weights give the same result as
    C-ordered ones.

    A ``lora_a`` or ``lora_b`` that shares memory with ``weight`` (a view of it) is refused
    with :class:`~numlora.errors.ShapeError`: the merge would change the adapter while
    reading it, and no unmerge could undo it. Pass copies.

    A delta that overflows the weight's dtype (``scaling``, A and B finite, but
    ``scaling * B @ A`` beyond float32's range) raises
    :class:`~numlora.errors.NonFiniteError` and leaves the weight unchanged. The check
    costs nothing for ordinary adapters: only when the bound ``|scaling| * r * max|A| *
    max|B|`` reaches half the dtype's range is the merge computed in a copy and checked
    (a weight already within that margin of the largest float is not checked).
    """
    if _on_device(weight, lora_a, lora_b):
        return _gpu().merge_lora(weight, lora_a, lora_b, scaling, fan_in_fan_out, record=record)
    s = v.real_scalar("scaling", scaling)
    record = v.flag("record", record)
    w, p, q, writeback, ab = _merge_operands(weight, lora_a, lora_b, fan_in_fan_out, "merge_lora")
    k = _kernels()
    scale = w.dtype.type(s)
    simd = _use_simd(k, w)
    rec = None
    dst, w = _careful_target(w, p, q, s)
    with _quiet(dst):  # a careful merge may overflow in the copy: checked next, not warned
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
                              _fingerprint(ab, s, w, fan_in_fan_out), _weight_sample(w))
    w = _careful_commit(dst, w, weight, "merge_lora")
    if writeback is not None:
        writeback[...] = w
    return rec


def _careful_target(w, p, q, s):
    """``(dst, target)``: where the merge kernels write. When ``|s| * r * max|p| * max|q|``
    (a bound on every element of the delta, O(r (out + in)) to compute) reaches half the
    dtype's range, the delta may overflow: the kernels then write a copy, which
    :func:`_careful_commit` checks before it replaces the weight. Otherwise (every sane
    adapter) the weight itself, at no cost."""
    if p.size == 0 or q.size == 0:
        return None, w
    with np.errstate(over="ignore", invalid="ignore"):
        bound = abs(s) * p.shape[1] * float(np.max(np.abs(p))) * float(np.max(np.abs(q)))
    if bound < float(np.finfo(w.dtype).max) / 2:
        return None, w
    return w, w.copy()


def _quiet(dst):
    """No floating-point warnings while a careful merge writes its copy (the result is
    checked and the overflow reported as an error); a no-op otherwise."""
    return np.errstate(all="ignore") if dst is not None else contextlib.nullcontext()


def _careful_commit(dst, w, weight, what):
    """After a careful merge into the copy ``w``: refuse (weight untouched) if an element
    that was finite became inf / NaN, else copy the result into ``dst``. Returns the
    array that now holds the result."""
    if dst is None:
        return w
    bad = ~np.isfinite(w) & np.isfinite(dst)
    if bad.any():
        i, j = (int(t) for t in np.unravel_index(int(np.argmax(bad)), bad.shape))
        if isinstance(weight, np.ndarray) and not weight.flags.c_contiguous and weight.flags.f_contiguous:
            i, j = j, i  # the kernels ran on weight.T
        raise NonFiniteError(f"{what}: weight[{i}, {j}] would become {w.reshape(-1)[int(np.argmax(bad))]} "
                             f"(scaling * B @ A overflows {w.dtype}, or A / B hold NaN / inf); the weight is left "
                             "unchanged")
    dst[...] = w
    return dst


def unmerge_lora(weight, lora_a, lora_b, scaling, fan_in_fan_out=False, *, record=None):
    """Subtract ``scaling * B @ A`` from ``weight`` in place.

    Given the :class:`MergeRecord` of the merge, restores the weight bit for bit (and
    raises :class:`~numlora.errors.MergeStateError` if A, B, scaling or the weight's
    shape changed since); without one, subtracts plainly (floating-point rounding may
    leave the last bit of some elements different from before the merge). A record is
    single-use: a second unmerge with it (which would subtract the delta twice) raises
    :class:`~numlora.errors.MergeStateError`. As in :func:`merge_lora`, A or B sharing
    memory with ``weight`` is refused.
    """
    if _on_device(weight, lora_a, lora_b):
        return _gpu().unmerge_lora(weight, lora_a, lora_b, scaling, fan_in_fan_out, record=record)
    s = v.real_scalar("scaling", scaling)
    w, p, q, writeback, ab = _merge_operands(weight, lora_a, lora_b, fan_in_fan_out, "unmerge_lora")
    k = _kernels()
    scale = w.dtype.type(s)
    simd = _use_simd(k, w)
    if record is None:
        dst, w = _careful_target(w, p, q, s)
        with _quiet(dst):
            (k.merge_plain_simd if simd else k.merge_plain)(w, p, q, -scale)
        w = _careful_commit(dst, w, weight, "unmerge_lora")
    else:
        if not isinstance(record, MergeRecord):
            raise MergeStateError(f"record must be the MergeRecord merge_lora returned, got {type(record).__name__}")
        if record.used:
            raise MergeStateError("this MergeRecord was already used by an unmerge_lora: the delta has been "
                                  "subtracted, and a second unmerge would subtract it again; a record restores "
                                  "the weight once (merge again for a new one)")
        if _fingerprint(ab, s, w, fan_in_fan_out) != record.fingerprint:
            raise MergeStateError(
                "lora_a, lora_b, scaling or the weight's shape/dtype changed since the merge: "
                "unmerging now would not restore the base weight"
            )
        if _weight_sample(w) != record.weight_sample:
            raise MergeStateError(
                "the weight is not the one this record's merge left (another array, a transposed copy, or "
                "changed since the merge): unmerging it with this record would not restore the base weight"
            )
        record.used = True
        wi, maxint, minint = _int_view(w)
        (k.unmerge_tracked_simd if simd else k.unmerge_tracked)(
            w, wi, p, q, scale, maxint, minint, record.corr, record.exc_col, record.exc_bits, record.exc_count)
        if record.saved_rows.size:
            w[record.saved_rows] = record.saved
    if writeback is not None:
        writeback[...] = w


# --- training: dropout and backward --------------------------------------------------------

_U64 = (1 << 64) - 1


class DropoutState(NamedTuple):
    """What :func:`lora_dropout` used: the probability and the 64-bit seed. Together with
    the row index they define the mask (see :mod:`numlora.kernels.train`), so the mask is
    never stored: :func:`lora_backward` regenerates it from this."""

    p: float
    seed: int


def mix_seed(seed: int, counter: int) -> int:
    """A 64-bit seed derived from ``(seed, counter)`` (splitmix64 of their combination):
    the seed of the ``counter``-th training forward of a layer seeded ``seed``."""
    z = (v.int_scalar("seed", seed) + (v.int_scalar("counter", counter) + 1) * 0xD1B54A32D192ED03) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def dropout_p(p) -> float:
    """Validate a dropout probability: a real number in [0, 1)."""
    p = v.real_scalar("dropout", p)
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {p}")
    return p


def _seed64(seed) -> int:
    seed = v.int_scalar("seed", seed, minimum=0)
    if seed > _U64:
        raise ConfigError(f"seed must fit in 64 bits (<= {_U64}), got {seed}")
    return seed


def _row_states(seed, n):
    """Start states of the rows' xorshift64 streams: splitmix64(seed + (i + 1) * golden),
    0 replaced by 1 (uint64 array arithmetic wraps modulo 2**64)."""
    z = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    z[z == 0] = 1
    return z


class _Drop(NamedTuple):
    """(thresh, seed, scale) as the dropout kernels take them, the row states per batch."""

    thresh: np.uint64
    seed: int
    scale: object

    def states(self, n):
        return _row_states(self.seed, n)


def _dropout_arg(dropout):
    """The ``dropout`` argument of a backward validated: None, or ``(p, seed)`` with
    p > 0 (p == 0 is no dropout)."""
    if dropout is None:
        return None
    if not isinstance(dropout, tuple) or len(dropout) != 2:
        raise ConfigError(f"dropout must be the (p, seed) lora_dropout returned, got {dropout!r}")
    p, seed = dropout_p(dropout[0]), _seed64(dropout[1])
    return (p, seed) if p > 0 else None


def _drop_args(p, seed, dtype):
    return _Drop(np.uint64(math.ceil(p * 2.0 ** 53)), int(seed), np.dtype(dtype).type(1.0 / (1.0 - p)))


def lora_dropout(x, p, seed, out=None):
    """Inverted dropout on the LoRA input: each element of ``x`` is kept with
    probability ``1 - p`` and scaled by ``1 / (1 - p)``, else set to 0.

    Row ``i`` draws from its own xorshift64 stream, seeded from ``(seed, i)``, so the
    mask does not depend on the thread count, and a row's mask does not depend on the
    rows around it. ``x``: (in,) or (n, in) float; ``seed``: an integer in [0, 2**64);
    ``out``: optional C-contiguous buffer of x's shape and dtype; ``out=x`` drops in
    place, and any other overlap with x is computed through a temporary (the result is
    the same). ``p == 0`` returns x itself (or copies it into ``out``).

    Returns ``(x_drop, DropoutState(p, seed))``: the state is what
    :func:`lora_backward` needs to regenerate the mask. On GPU arrays the same masks are
    drawn on the device (bit-identical).
    """
    if _on_device(x, out):
        return _gpu().lora_dropout(x, p, seed, out)
    x = v.float_array("x", x, (1, 2), allow_empty=True)
    p = dropout_p(p)
    seed = _seed64(seed)
    state = DropoutState(p, seed)
    if out is not None:
        v.out_array("out", out, x.shape, x.dtype)
    if p == 0.0:
        if out is None:
            return x, state
        out[...] = x
        return out, state
    if out is None:
        out = np.empty(x.shape, x.dtype)
    width = x.shape[-1]
    x2 = np.ascontiguousarray(x.reshape(-1, width))
    out2 = out.reshape(-1, width)
    if v.shares_memory(out2, x2) and not v.same_layout(out2, x2):
        x2 = x2.copy()  # a shifted overlap: the elementwise kernel would read what it wrote
    if x2.size:
        from .kernels import train as k

        d = _drop_args(p, seed, x.dtype)
        k.dropout_fill(x2, d.thresh, d.states(x2.shape[0]), d.scale, out2)
    return out, state


def dropout_keep_mask(shape, p, seed) -> np.ndarray:
    """The boolean keep mask :func:`lora_dropout` applies for ``(p, seed)`` to an array
    of ``shape`` ((in,) or (n, in))."""
    p = dropout_p(p)
    seed = _seed64(seed)
    shape = v.shape_arg("shape", shape)
    if len(shape) not in (1, 2):
        raise ShapeError(f"expected shape to be (in,) or (n, in), got {shape}")
    n, m = (1, shape[0]) if len(shape) == 1 else shape
    out = np.ones((n, m), np.uint8)
    if p > 0 and out.size:
        from .kernels import train as k

        d = _drop_args(p, seed, np.float64)
        k.dropout_mask(n, m, d.thresh, d.states(n), out)
    return out.reshape(shape).astype(bool)


def _grad_buffer(name, g, shape, dtype):
    """A caller's accumulation buffer: ndarray of ``shape`` and ``dtype``, writable."""
    if g is None:
        return None
    if not isinstance(g, np.ndarray):
        raise DTypeError(f"{name} must be a numpy array, got {type(g).__name__}")
    if g.dtype != np.dtype(dtype):
        raise DTypeError(f"expected {name} with dtype {np.dtype(dtype)}, got {g.dtype}")
    v.expect_shape(name, g, shape)
    if not g.flags.writeable:
        raise ShapeError(f"{name} is read-only; lora_backward accumulates into it")
    return g


def _unalias_grads(grad_a, grad_b, inputs):
    """The backward's inputs (a tuple of arrays or None) with a private copy of each one
    that shares memory with ``grad_a`` or ``grad_b`` (the gradients are accumulated in
    place while the inputs are still read: ``grad_a=lora_a`` would otherwise change A
    before ``grad_x`` reads it). ``grad_a`` and ``grad_b`` overlapping each other is
    refused: the two sums would land on the same elements."""
    if grad_a is None and grad_b is None:
        return inputs
    if v.shares_memory(grad_a, grad_b):
        raise ShapeError("grad_a shares memory with grad_b: both are accumulated in place, so the two gradients "
                         "would be added into the same elements; pass separate arrays")
    return tuple(a.copy() if a is not None and (v.shares_memory(grad_a, a) or v.shares_memory(grad_b, a)) else a
                 for a in inputs)


def _accumulate(dst, value):
    if dst is None:
        return value
    dst += value
    return dst


def _backward_core(x2, xd2, a, b, s, g2, us, drop, grad_a, grad_b, need_grad_x, base_grad):
    """The LoRA backward over validated 2-D arrays of one dtype.

    x2 (n, in); xd2: the dropped input (x2 itself without dropout); a (r, in); b (out, r);
    g2 (n, out); us: s * xd2 A^T (n, r) or None (computed here); drop: None or the
    (thresh, seed, scale) of the dropout kernels; base_grad(g2, dx) writes G W into dx.
    Returns (dx or None, grad_a, grad_b)."""
    n = x2.shape[0]
    dt = x2.dtype
    if us is None:
        us = np.dot(xd2, a.T)
        us *= dt.type(s)
    hs = np.dot(g2, b)  # (n, r)
    hs *= dt.type(s)
    grad_b = _accumulate(grad_b, np.dot(g2.T, us))  # s G^T U
    grad_a = _accumulate(grad_a, np.dot(hs.T, xd2))  # s H^T x_drop
    if not need_grad_x:
        return None, grad_a, grad_b
    dx = np.empty((n, x2.shape[1]), dt)
    if n == 0:
        return dx, grad_a, grad_b
    base_grad(g2, dx)
    t = np.dot(hs, a)  # s H A
    if drop is None:
        dx += t
    else:
        from .kernels import train as k

        k.dropout_mul_add(t, drop.thresh, drop.states(n), drop.scale, dx)
    return dx, grad_a, grad_b


def _backward_inputs(x, in_f, out_f, grad_out, dtype, dropout, x_drop, u, rank):
    """Validate and convert the batch-shaped inputs of a backward; return
    (x2, xd2, g2, us_or_None, drop, one_d)."""
    x = _input_rows(x, in_f)
    g = _input_rows(grad_out, out_f, "grad_out", "out_features")
    if g.shape[:-1] != x.shape[:-1]:
        want = (out_f,) if x.ndim == 1 else (x.shape[0], out_f)
        raise ShapeError(f"expected grad_out of shape {want} (one row per row of x), got {g.shape}")
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), dtype)
    g2 = np.ascontiguousarray(g.reshape(-1, out_f), dtype)
    drop = None
    xd2 = x2
    ps = _dropout_arg(dropout)
    if ps is not None:
        drop = _drop_args(*ps, dtype)
        if x_drop is None:
            xd2 = np.empty_like(x2)
            if x2.size:
                from .kernels import train as k

                k.dropout_fill(x2, drop.thresh, drop.states(x2.shape[0]), drop.scale, xd2)
    if x_drop is not None:
        xd = _input_rows(x_drop, in_f, "x_drop")
        if xd.shape != x.shape:
            raise ShapeError(f"expected x_drop of shape {x.shape} (the shape of x), got {xd.shape}")
        xd2 = np.ascontiguousarray(xd.reshape(-1, in_f), dtype)
    us = None
    if u is not None:
        uu = v.float_array("u", u, (1, 2), allow_empty=True)
        v.expect_shape("u", uu, (rank,) if x.ndim == 1 else (x2.shape[0], rank))
        us = np.ascontiguousarray(uu.reshape(-1, rank), dtype)
    return x2, xd2, g2, us, drop, x.ndim == 1


def _finish_backward(dx, grad_a, grad_b, one_d, in_f):
    if dx is not None and one_d:
        dx = dx.reshape(in_f)
    return dx, grad_a, grad_b


def _check_x_drop_alone(x_drop, dropout, need_grad_x):
    if x_drop is not None and dropout is None and need_grad_x:
        raise ConfigError("x_drop given without dropout=(p, seed): grad_x needs the dropout mask; pass the "
                          "DropoutState lora_dropout returned (or need_grad_x=False)")


def lora_backward(x, weight, lora_a, lora_b, scaling, grad_out, *, fan_in_fan_out=False, dropout=None,
                  x_drop=None, u=None, grad_a=None, grad_b=None, need_grad_x=True):
    """Gradients of ``y = x W^T + b + scaling * dropout(x) A^T B^T`` given ``grad_out = dL/dy``.

    With ``G = grad_out``, ``x_d = dropout(x)``, ``U = x_d A^T`` and ``H = G B``:
    ``grad_b = s G^T U``, ``grad_a = s H^T x_d`` and
    ``grad_x = G W + s (H A) * mask / (1 - p)`` (``G W^T`` under ``fan_in_fan_out``, where
    the weight is stored (in, out)). All products go to BLAS.

    Parameters
    ----------
    x : (in,) or (n, in) the layer's input (before dropout)
    weight, lora_a, lora_b, scaling, fan_in_fan_out : as in :func:`lora_forward`
    grad_out : (out,) or (n, out), one row per row of x
    dropout : None (no dropout) or the :class:`DropoutState` ``(p, seed)`` that
        :func:`lora_dropout` returned in the forward; the mask is regenerated from it
    x_drop : optional, the dropped input from the forward (recomputed from x and
        ``dropout`` when not given)
    u : optional ``x_drop A^T`` (n, r) from the forward (recomputed when not given)
    grad_a, grad_b : optional arrays shaped like lora_a / lora_b in the compute dtype:
        the gradients are **added** into them (gradient accumulation); fresh arrays are
        returned when None. They may share memory with the inputs (``grad_a=lora_a``
        adds the gradient into A): the inputs they overlap are copied first, so every
        gradient is computed from the inputs as they were. ``grad_a`` overlapping
        ``grad_b`` is refused (:class:`~numlora.errors.ShapeError`).
    need_grad_x : False skips ``grad_x`` (returned as None): the ``G W`` product is most
        of the cost, and the first layer of a model does not need it

    Returns
    -------
    (grad_x, grad_a, grad_b)
        In the compute dtype: float64 if any input is float64, else float32.
    """
    if _on_device(x, weight, lora_a, lora_b, grad_out):
        return _gpu().lora_backward(x, weight, lora_a, lora_b, scaling, grad_out, fan_in_fan_out=fan_in_fan_out, dropout=dropout, x_drop=x_drop, u=u, grad_a=grad_a, grad_b=grad_b, need_grad_x=need_grad_x)
    weight, lora_a, lora_b, out_f, in_f, rank = _adapter_arrays(weight, lora_a, lora_b, fan_in_fan_out)
    s = v.real_scalar("scaling", scaling)
    need_grad_x = v.flag("need_grad_x", need_grad_x)
    _check_x_drop_alone(x_drop, dropout, need_grad_x)
    arrays = [x, weight, lora_a, lora_b, grad_out]
    dtype = np.result_type(*[np.asarray(a).dtype for a in arrays])
    x2, xd2, g2, us, drop, one_d = _backward_inputs(x, in_f, out_f, grad_out, dtype, dropout, x_drop, u, rank)
    if us is not None:
        us = us * dtype.type(s)
    grad_a = _grad_buffer("grad_a", grad_a, lora_a.shape, dtype)
    grad_b = _grad_buffer("grad_b", grad_b, lora_b.shape, dtype)
    w = weight.astype(dtype, copy=False)
    a, b = lora_a.astype(dtype, copy=False), lora_b.astype(dtype, copy=False)
    x2, xd2, g2, us, a, b, w = _unalias_grads(grad_a, grad_b, (x2, xd2, g2, us, a, b,
                                                                w if need_grad_x else None))
    w_oi = None if w is None else (w.T if fan_in_fan_out else w)

    def base_grad(g, dx):
        np.dot(g, w_oi, out=dx)

    dx, grad_a, grad_b = _backward_core(x2, xd2, a, b, s, g2, us, drop, grad_a, grad_b, bool(need_grad_x),
                                        base_grad)
    return _finish_backward(dx, grad_a, grad_b, one_d, in_f)


def _expand_into(us, lora_b, out2):
    """out2 += us B^T (us already scaled), in row chunks (bounded temporary)."""
    n = us.shape[0]
    if n == 0:
        return
    bt = lora_b.T
    tmp = np.empty((min(n, ROW_CHUNK), out2.shape[1]), out2.dtype)
    for r0 in range(0, n, ROW_CHUNK):
        r1 = min(n, r0 + ROW_CHUNK)
        t = tmp[: r1 - r0]
        np.dot(us[r0:r1], bt, out=t)
        out2[r0:r1] += t


def train_forward_dense(x2, xd2, weight, lora_a, lora_b, s, bias, out2, fan_in_fan_out):
    """The training forward over validated 2-D arrays of one dtype: out2 = x2 W^T + b +
    (s xd2 A^T) B^T. Returns ``us = s xd2 A^T`` (n, r), what the backward reuses."""
    us = np.dot(xd2, lora_a.T)
    us *= us.dtype.type(s)
    _base_product(x2, weight, fan_in_fan_out, out2)
    _expand_into(us, lora_b, out2)
    if bias is not None:
        out2 += bias
    return us
