"""The functional API for dense LoRA: validate, allocate, call a kernel.

``x W^T`` goes to BLAS through numpy (it is as fast as this machine allows); the LoRA
path folds the scale into the small ``(n, r)`` intermediate and adds ``u B^T`` and the
bias into the output in place, so no ``(n, out)`` temporary and never ``B @ A``.

Dropout (:class:`DropoutState`, :func:`lora_dropout`, :func:`dropout_keep_mask`,
:func:`mix_seed`) lives in :mod:`numlora.dropout`; its public names are importable from
here too.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field

import numpy as np

from . import _backward as bw
from . import _validate as validate
from ._dispatch import dispatch
from .dropout import DropoutState, dropout_keep_mask, lora_dropout, mix_seed
from .errors import MergeStateError, NonFiniteError, ShapeError

__all__ = ["DropoutState", "MergeRecord", "dropout_keep_mask", "linear_forward", "lora_backward", "lora_dropout",
           "lora_forward", "merge_lora", "mix_seed", "unmerge_lora"]

#: Exception slots per row kept by a tracked merge (see :class:`MergeRecord`).
EXCEPTION_SLOTS = 16


def _kernels():
    from .kernels import lora

    return lora


def _park(w) -> None:
    """Park OpenBLAS's spinning threads before a merge kernel over w."""
    from .kernels import _jit

    _jit.park_before(w.size)


@dispatch
def lora_forward(x, weight, lora_a, lora_b, scaling, bias=None, out=None, *, fan_in_fan_out=False, x_lora=None,
                 u_out=None):
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
    x_lora : optional input of the LoRA branch, of x's shape, when it differs from x: the
        training forward ``x W^T + b + scaling * (x_drop A^T) B^T`` with ``x_lora=x_drop``
        from :func:`~numlora.dropout.lora_dropout`.
    u_out : optional preallocated C-contiguous array of shape (r,) or (n, r) and the
        compute dtype that receives ``u = x_lora A^T`` (unscaled), the ``u`` that
        :func:`lora_backward` reuses instead of recomputing it. It may not share memory
        with the inputs or ``out``.

    Returns
    -------
    out
        The compute dtype is float64 if any array is float64, else float32 (pass float32
        everywhere for speed: a float64 ``x`` upcasts a float32 weight, with a copy).
    """
    weight, lora_a, lora_b, out_f, in_f, rank = validate.adapter_arrays(weight, lora_a, lora_b, fan_in_fan_out)
    x = validate.input_rows(x, in_f)
    s = validate.real_scalar("scaling", scaling)
    xl = validate.lora_input(x_lora, x, in_f)
    arrays = [x, weight, lora_a, lora_b] + [a for a in (bias, xl) if a is not None]
    dtype = validate.arrays_dtype(*arrays)
    b_arr, use_bias = validate.bias_array(bias, out_f, dtype)
    inputs = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b, "bias": bias, "x_lora": xl}
    u2 = bw.u_buffer(u_out, x, rank, dtype, {**inputs, "out": out}, "lora_forward")
    out, dest = validate.output(out, x, out_f, dtype, inputs)
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), dtype)
    xl2 = x2 if xl is None else np.ascontiguousarray(xl.reshape(-1, in_f), dtype)
    bw.dense_forward(x2, xl2, weight.astype(dtype, copy=False), lora_a.astype(dtype, copy=False),
                     lora_b.astype(dtype, copy=False), s, b_arr if use_bias else None, fan_in_fan_out,
                     out.reshape(-1, out_f), u2)
    return validate.deliver(out, dest)


@dispatch
def linear_forward(x, weight, bias=None, out=None, *, fan_in_fan_out=False):
    """``y = x W^T + b`` (the base path alone; what a disabled or merged layer runs).
    ``out`` may overlap the inputs (computed into a temporary then, as in
    :func:`lora_forward`)."""
    fan_in_fan_out = validate.flag("fan_in_fan_out", fan_in_fan_out)
    weight = validate.weight_array(weight, fan_in_fan_out)
    out_f, in_f = weight.shape[::-1] if fan_in_fan_out else weight.shape
    x = validate.input_rows(x, in_f)
    arrays = [x, weight] + ([bias] if bias is not None else [])
    dtype = validate.arrays_dtype(*arrays)
    b_arr, use_bias = validate.bias_array(bias, out_f, dtype)
    out, dest = validate.output(out, x, out_f, dtype, {"x": x, "weight": weight, "bias": bias})
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), dtype)
    bw.dense_forward(x2, x2, weight.astype(dtype, copy=False), None, None, 0.0, b_arr if use_bias else None,
                     fan_in_fan_out, out.reshape(-1, out_f))
    return validate.deliver(out, dest)


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
    array (or a transposed copy) is refused instead of "restoring" it. A used record can be
    passed back to :func:`merge_lora` as ``record=`` to be refilled (no new arrays).
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
    weight, lora_a, lora_b, _, _, _ = validate.adapter_arrays(weight, lora_a, lora_b, fan_in_fan_out)
    if not weight.flags.writeable:
        raise ShapeError(f"weight is read-only; {what} updates it in place")
    validate.refuse_overlap("weight", weight, {"lora_a": lora_a, "lora_b": lora_b}, what)
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


@dispatch
def merge_lora(weight, lora_a, lora_b, scaling, fan_in_fan_out=False, *, record=False):
    """Add ``scaling * B @ A`` to ``weight`` in place (``(B @ A)^T`` when
    ``fan_in_fan_out``), without forming ``B @ A``.

    With ``record=True`` returns a :class:`MergeRecord` that lets :func:`unmerge_lora`
    restore the weight bit for bit (once); otherwise returns None. ``record=`` may also be
    a record that an unmerge has used, of a weight of the same shape and dtype: its
    arrays are refilled instead of allocating new ones (one byte per weight element) and
    the same record is returned, ready for one unmerge. A record not yet used is refused
    with :class:`~numlora.errors.MergeStateError` (it still restores a merged weight). A and B are cast to the
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
    s = validate.real_scalar("scaling", scaling)
    reuse = record if isinstance(record, MergeRecord) else None
    record = True if reuse is not None else validate.flag("record", record)
    w, p, q, writeback, ab = _merge_operands(weight, lora_a, lora_b, fan_in_fan_out, "merge_lora")
    k = _kernels()
    scale = w.dtype.type(s)
    simd = _use_simd(k, w)
    rec = None
    if record:
        buffers = _record_buffers(reuse, w)
    dst, w = _careful_target(w, p, q, s)
    _park(w)  # after every check that may raise: the next kernel lets OpenBLAS's workers spin again
    with _quiet(dst):  # a careful merge may overflow in the copy: checked next, not warned
        if not record:
            (k.merge_plain_simd if simd else k.merge_plain)(w, p, q, scale)
        else:
            wi, maxint, _ = _int_view(w)
            corr, exc_col, exc_bits, exc_count = buffers
            if simd:
                k.merge_tracked_fused(w, wi, p, q, scale, corr, exc_col, exc_bits, exc_count)
            else:
                k.merge_tracked(w, wi, p, q, scale, maxint, corr, exc_col, exc_bits, exc_count)
            rows = np.flatnonzero(exc_count > EXCEPTION_SLOTS)
            saved = w[rows].copy()
            if rows.size:
                part = w[rows]
                k.merge_plain(part, np.ascontiguousarray(p[rows]), q, scale)
                w[rows] = part
            rec = _fill_record(reuse, buffers, rows, saved, _fingerprint(ab, s, w, fan_in_fan_out), _weight_sample(w))
    w = _careful_commit(dst, w, weight, "merge_lora")
    if writeback is not None:
        writeback[...] = w
    return rec


def _record_buffers(reuse, w):
    """``(corr, exc_col, exc_bits, exc_count)`` for a tracked merge of the working weight
    ``w``: new arrays, or those of ``reuse`` (a record an unmerge has used, of a weight of
    the same shape and dtype), checked before anything is written."""
    m, n = w.shape
    it = _int_view(w)[0].dtype
    if reuse is None:
        return (np.empty((m, n), np.int8), np.empty((m, EXCEPTION_SLOTS), np.int32),
                np.empty((m, EXCEPTION_SLOTS), it), np.empty(m, np.int64))
    if not reuse.used:
        raise MergeStateError("merge_lora(record=<MergeRecord>) refills a record after its unmerge_lora, but this "
                              "one has not been used yet: it still holds what restores a merged weight bit for bit; "
                              "unmerge with it first, or pass record=True for a new record")
    want = {"corr": ((m, n), np.int8), "exc_col": ((m, EXCEPTION_SLOTS), np.int32),
            "exc_bits": ((m, EXCEPTION_SLOTS), it), "exc_count": ((m,), np.int64)}
    got = []
    for name, (shape, dt) in want.items():
        a = getattr(reuse, name)
        if not (isinstance(a, np.ndarray) and a.shape == shape and a.dtype == dt and a.flags.c_contiguous
                and a.flags.writeable):
            what = f"{a.shape} {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
            raise MergeStateError(f"merge_lora(record=<MergeRecord>): the record's {name} is {what}, expected a "
                                  f"writeable C-contiguous {shape} {np.dtype(dt)} (a record of a weight of this "
                                  f"shape and dtype; pass record=True for a new one)")
        got.append(a)
    return tuple(got)


def _fill_record(reuse, buffers, rows, saved, fingerprint, sample):
    """The MergeRecord of a tracked merge: ``reuse`` refilled (and ready for one unmerge
    again), or a new one."""
    if reuse is None:
        return MergeRecord(*buffers, rows, saved, fingerprint, sample)
    reuse.saved_rows, reuse.saved = rows, saved
    reuse.fingerprint, reuse.weight_sample = fingerprint, sample
    reuse.used = False
    return reuse


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


@dispatch
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
    s = validate.real_scalar("scaling", scaling)
    w, p, q, writeback, ab = _merge_operands(weight, lora_a, lora_b, fan_in_fan_out, "unmerge_lora")
    k = _kernels()
    scale = w.dtype.type(s)
    simd = _use_simd(k, w)
    if record is None:
        dst, w = _careful_target(w, p, q, s)
        _park(w)
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
        _park(w)
        if simd:
            k.unmerge_tracked_fused(w, wi, p, q, scale, record.corr, record.exc_col, record.exc_bits, record.exc_count)
        else:
            k.unmerge_tracked(w, wi, p, q, scale, maxint, minint, record.corr, record.exc_col, record.exc_bits,
                              record.exc_count)
        if record.saved_rows.size:
            w[record.saved_rows] = record.saved
    if writeback is not None:
        writeback[...] = w


# --- training: backward -------------------------------------------------------------------

@dispatch
def lora_backward(x, weight, lora_a, lora_b, scaling, grad_out, *, fan_in_fan_out=False, dropout=None,
                  x_drop=None, u=None, grad_a=None, grad_b=None, need_grad_x=True):
    """Gradients of ``y = x W^T + b + scaling * dropout(x) A^T B^T`` given ``grad_out = dL/dy``.

    With ``G = grad_out``, ``x_d = dropout(x)``, ``U = x_d A^T`` and ``H = G B``:
    ``grad_b = s G^T U``, ``grad_a = s H^T x_d`` and
    ``grad_x = G W + s (H A) * mask / (1 - p)`` (``G W^T`` under ``fan_in_fan_out``, where
    the weight is stored (in, out)). All products go to BLAS, except ``U`` of a float32
    batch of up to 16 rows when it is recomputed (``u`` not given): the small-batch kernel
    :func:`lora_forward` computes it with, so the gradients are the same given ``u`` or not.

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
    weight, lora_a, lora_b, _, _, _ = validate.adapter_arrays(weight, lora_a, lora_b, fan_in_fan_out)
    s = validate.real_scalar("scaling", scaling)
    need_grad_x = validate.flag("need_grad_x", need_grad_x)
    bw.check_x_drop_alone(x_drop, dropout, need_grad_x)
    dtype = validate.arrays_dtype(x, weight, lora_a, lora_b, grad_out)

    def base_grad(w, g, dx):  # G W (G W^T under fan_in_fan_out: W stored (in, out))
        np.dot(g, w.T if fan_in_fan_out else w, out=dx)

    return bw.lora_grads(x, lora_a.astype(dtype, copy=False), lora_b.astype(dtype, copy=False), s, grad_out, dtype,
                         dropout, x_drop, u, grad_a, grad_b, need_grad_x, weight.astype(dtype, copy=False), base_grad)
