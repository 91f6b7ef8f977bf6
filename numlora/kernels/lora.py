"""LoRA kernels: merge / unmerge of the low-rank delta into a weight, in place.

The forward is not here: its products go to BLAS from the functional layer (see
``numlora._backward``). Merging with BLAS would need a full-size
temporary ``B @ A``; these kernels add the delta row by row with no temporary.

Merge delta convention (shared by every merge / unmerge kernel, so that they agree to
the bit): ``d[i, j] = scale * acc[j]`` with ``acc[j] = sum_t p[i, t] * q[t, j]`` summed
in order t = 0, 1, ..., in the weight's dtype. For ``W (out, in)``: ``p = B``, ``q = A``;
for ``fan_in_fan_out`` (``W (in, out)``): ``p = A^T``, ``q = B^T``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import ELEMENTWISE_SERIAL_BELOW, first_size, inline_helper, kernel, prange
from ._simd import CACHEABLE as SIMD_CACHEABLE
from ._simd import DELTA_LANES, DELTA_ROWS, F32, I8, I32, I64, _splat, _vec, merge_rows
from ._simd import LANES as SIMD_LANES  # noqa: F401  (read as kernels.<family>.SIMD_LANES)


@inline_helper
def _delta_row(p, q, i, acc):
    """acc[j] = sum_t p[i, t] * q[t, j], summed in order over t."""
    acc[:] = 0
    for t in range(p.shape[1]):
        c = p[i, t]
        for j in range(q.shape[1]):
            acc[j] += c * q[t, j]


@kernel(parallel=True, work=first_size, serial_below=ELEMENTWISE_SERIAL_BELOW)
def merge_plain(w, p, q, scale):
    """``w[i, j] += scale * acc[j]`` for every row (scale < 0 subtracts exactly the
    delta that ``scale > 0`` adds, since ``(-s) * a == -(s * a)``)."""
    m, k = w.shape
    for i in prange(m):
        acc = np.empty(k, w.dtype)
        _delta_row(p, q, i, acc)
        for j in range(k):
            w[i, j] += scale * acc[j]


@inline_helper
def _key(bits, maxint):
    """Map float bits (as a signed int) to an integer order that is monotonic in the
    float value and a bijection on all bit patterns (-0.0 and +0.0 stay distinct)."""
    if bits >= 0:
        return np.int64(bits)
    return np.int64(-1) - np.int64(bits & maxint)


@inline_helper
def _unkey(key, minint):
    if key >= 0:
        return key
    return (np.int64(-1) - key) + minint


@inline_helper
def _track_row(w, wi, i, acc, back, backi, scale, maxint, corr, exc_col, exc_bits, exc_count):
    """Row i of :func:`merge_tracked`, given acc[j] (the row's delta sums). back / backi:
    a scratch row and its integer view."""
    k = w.shape[1]
    slots = exc_col.shape[1]
    wr = w[i]
    wir = wi[i]
    cr = corr[i]
    for j in range(k):
        d = scale * acc[j]
        merged = wr[j] + d
        back[j] = merged - d
        acc[j] = merged
    cnt = 0
    for j in range(k):
        diff = _key(wir[j], maxint) - _key(backi[j], maxint)
        bad = (diff < -127) | (diff > 127)
        cr[j] = -128 if bad else diff
        cnt += bad
    exc_count[i] = cnt
    if cnt > slots:
        return
    if cnt:
        e = 0
        for j in range(k):
            if cr[j] == -128:
                exc_col[i, e] = j
                exc_bits[i, e] = wir[j]
                e += 1
    for j in range(k):
        wr[j] = acc[j]


@inline_helper
def _untrack_row(w, wi, i, acc, back, backi, scale, maxint, minint, corr, exc_col, exc_bits, exc_count):
    """Row i of :func:`unmerge_tracked`, given acc[j]."""
    k = w.shape[1]
    wr = w[i]
    wir = wi[i]
    cr = corr[i]
    for j in range(k):
        back[j] = wr[j] - scale * acc[j]
    for j in range(k):
        wir[j] = _unkey(_key(backi[j], maxint) + cr[j], minint)
    for e in range(exc_count[i]):
        wir[exc_col[i, e]] = exc_bits[i, e]


@kernel(parallel=True, work=first_size, serial_below=ELEMENTWISE_SERIAL_BELOW)
def merge_tracked(w, wi, p, q, scale, maxint, corr, exc_col, exc_bits, exc_count):
    """Merge ``w += scale * acc`` and record what a bit-exact unmerge needs.

    For each element, ``r = (w + d) - d`` is what a plain unmerge would give back; the
    distance from r to the original w, counted in representable floats, goes to ``corr``
    (int8). Where it does not fit in [-127, 127] (the original was tiny next to d and got
    absorbed), ``corr`` holds -128 and the original bits go to the row's exception slots
    (``exc_col`` / ``exc_bits``). A row with more exceptions than slots is left unmerged
    and flagged by ``exc_count[i] > slots``: the caller keeps a copy of that row and
    merges it plainly.

    wi is w viewed as the signed integer of the same width; maxint its largest value.
    The hot loops are branch-free so that they vectorise."""
    m, k = w.shape
    for i in prange(m):
        acc = np.empty(k, w.dtype)
        _delta_row(p, q, i, acc)
        back = np.empty(k, w.dtype)
        _track_row(w, wi, i, acc, back, back.view(wi.dtype), scale, maxint, corr, exc_col, exc_bits, exc_count)


@kernel(parallel=True, work=first_size, serial_below=ELEMENTWISE_SERIAL_BELOW)
def unmerge_tracked(w, wi, p, q, scale, maxint, minint, corr, exc_col, exc_bits, exc_count):
    """Undo :func:`merge_tracked` bit for bit (rows flagged as overflowed are skipped:
    the caller restores them from its copies)."""
    m, k = w.shape
    slots = exc_bits.shape[1]
    for i in prange(m):
        if exc_count[i] > slots:
            continue
        acc = np.empty(k, w.dtype)
        _delta_row(p, q, i, acc)
        back = np.empty(k, w.dtype)
        _untrack_row(w, wi, i, acc, back, back.view(wi.dtype), scale, maxint, minint, corr, exc_col, exc_bits,
                     exc_count)


# --- SIMD variants (float32 weights; the same sums in the same order, see _simd.delta_rows) ---

@inline_helper
def _tail_delta(p, q, i, acc, j0):
    """acc[j] for the columns j >= j0 only, as _delta_row computes them."""
    k = q.shape[1]
    for j in range(j0, k):
        acc[j] = 0
    for t in range(p.shape[1]):
        c = p[i, t]
        for j in range(j0, k):
            acc[j] += c * q[t, j]


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=first_size, serial_below=ELEMENTWISE_SERIAL_BELOW)
def merge_plain_simd(w, p, q, scale):
    """:func:`merge_plain` for float32 (C-contiguous) with the delta of 4 rows at a time
    kept in vector registers; bit-identical."""
    m, k = w.shape
    ngroups = (m + DELTA_ROWS - 1) // DELTA_ROWS
    k16 = k - k % DELTA_LANES
    for gi in prange(ngroups):
        i0 = gi * DELTA_ROWS
        rows = min(DELTA_ROWS, m - i0)
        acc = np.empty(k, w.dtype)
        if rows == DELTA_ROWS:
            merge_rows(p, q, i0, w, scale)
            if k16 < k:
                for g in range(rows):
                    _tail_delta(p, q, i0 + g, acc, k16)
                    wr = w[i0 + g]
                    for j in range(k16, k):
                        wr[j] += scale * acc[j]
        else:
            for g in range(rows):
                _delta_row(p, q, i0 + g, acc)
                wr = w[i0 + g]
                for j in range(k):
                    wr[j] += scale * acc[j]


# --- fused SIMD tracked merge / unmerge (float32): one pass over W per call ---------------------
#
# Float bits b (int32) map to the order key ``b ^ ((b >> 31) & 0x7fffffff)``: the same value
# as _key for every float32 bit pattern, in 32-bit lanes. The key difference is taken with
# wrap-around and its overflow detected (an overflow means |diff| >= 2**31, an exception).
# The merge writes ``(w + d)`` where the element is not an exception and leaves w where it
# is; the scalar pass of the kernel then records the exceptions' bits and merges them. The
# unmerge writes ``unkey(key(w - d) + corr)`` everywhere; the exceptions' bits are put
# back after it.

def _ir_key32(builder, v, lanes):
    sh = builder.ashr(v, ir.Constant(_vec(I32, lanes), [31] * lanes))
    return builder.xor(v, builder.and_(sh, ir.Constant(_vec(I32, lanes), [0x7FFFFFFF] * lanes)))


def _make_track_rows(rows, undo):
    @intrinsic
    def track_rows(typingctx, p, q, i0, w, scale, corr, cnt):
        """For the ``rows`` rows from i0 and the columns j < k - k % 16: the delta sums as
        :func:`numlora.kernels._simd.delta_rows` forms them, ``d = scale * acc``, then
        (merge) corr[i, j] = the key distance from w to ``(w + d) - d`` (-128 where it does
        not fit [-127, 127]), w[i, j] = w + d except there, and cnt[i] = the number of
        -128; or (``undo``) w[i, j] = unkey(key(w - d) + corr[i, j]). w float32 (m, k),
        corr int8 (m, k), cnt int64 (m,), all C-contiguous."""
        sig = types.void(p, q, i0, w, scale, corr, cnt)

        def codegen(context, builder, sig, args):
            pa = context.make_array(sig.args[0])(context, builder, args[0])
            qa = context.make_array(sig.args[1])(context, builder, args[1])
            first = context.cast(builder, args[2], sig.args[2], types.int64)
            wa = context.make_array(sig.args[3])(context, builder, args[3])
            lanes = DELTA_LANES
            sc = _splat(builder, context.cast(builder, args[4], sig.args[4], types.float32), lanes)
            ca = context.make_array(sig.args[5])(context, builder, args[5])
            na = context.make_array(sig.args[6])(context, builder, args[6])
            r = builder.extract_value(pa.shape, 1)
            k = builder.extract_value(qa.shape, 1)
            vt = _vec(F32, lanes)
            it = _vec(I32, lanes)
            bt = _vec(I8, lanes)
            L = ir.Constant(I64, lanes)
            prow = [builder.gep(pa.data, [builder.mul(builder.add(first, ir.Constant(I64, g)), r)])
                    for g in range(rows)]
            acc_p = [cgutils.alloca_once_value(builder, ir.Constant(vt, None)) for _ in range(rows)]
            cnt_p = [cgutils.alloca_once_value(builder, ir.Constant(it, None)) for _ in range(rows)]
            with cgutils.for_range(builder, builder.udiv(k, L)) as jl:
                j = builder.mul(jl.index, L)
                for g in range(rows):
                    builder.store(ir.Constant(vt, None), acc_p[g])
                with cgutils.for_range(builder, r) as tl:
                    t = tl.index
                    qv = builder.load(builder.bitcast(builder.gep(qa.data, [builder.add(builder.mul(t, k), j)]),
                                                      vt.as_pointer()), align=4)
                    for g in range(rows):
                        c = _splat(builder, builder.load(builder.gep(prow[g], [t])), lanes)
                        builder.store(builder.fadd(builder.load(acc_p[g]), builder.fmul(c, qv)), acc_p[g])
                for g in range(rows):
                    off = builder.add(builder.mul(builder.add(first, ir.Constant(I64, g)), k), j)
                    wp = builder.bitcast(builder.gep(wa.data, [off]), vt.as_pointer())
                    cp = builder.bitcast(builder.gep(ca.data, [off]), bt.as_pointer())
                    d = builder.fmul(sc, builder.load(acc_p[g]))
                    x = builder.load(wp, align=4)
                    if undo:
                        back = builder.fsub(x, d)
                        kb = _ir_key32(builder, builder.bitcast(back, it), lanes)
                        cr = builder.sext(builder.load(cp, align=1), it)
                        orig = _ir_key32(builder, builder.add(kb, cr), lanes)
                        builder.store(builder.bitcast(orig, vt), wp, align=4)
                        continue
                    merged = builder.fadd(x, d)
                    back = builder.fsub(merged, d)
                    kx = _ir_key32(builder, builder.bitcast(x, it), lanes)
                    kb = _ir_key32(builder, builder.bitcast(back, it), lanes)
                    diff = builder.sub(kx, kb)
                    zero = ir.Constant(it, None)
                    ovf = builder.icmp_signed("<", builder.and_(builder.xor(kx, kb), builder.xor(kx, diff)), zero)
                    hi = builder.icmp_signed(">", diff, ir.Constant(it, [127] * lanes))
                    lo = builder.icmp_signed("<", diff, ir.Constant(it, [-127] * lanes))
                    bad = builder.or_(ovf, builder.or_(hi, lo))
                    cv = builder.select(bad, ir.Constant(it, [-128] * lanes), diff)
                    builder.store(builder.trunc(cv, bt), cp, align=1)
                    builder.store(builder.select(bad, x, merged), wp, align=4)
                    builder.store(builder.add(builder.load(cnt_p[g]), builder.zext(bad, it)), cnt_p[g])
            if not undo:
                for g in range(rows):
                    v = builder.load(cnt_p[g])
                    tot = builder.extract_element(v, ir.Constant(I32, 0))
                    for e in range(1, lanes):
                        tot = builder.add(tot, builder.extract_element(v, ir.Constant(I32, e)))
                    dst = builder.gep(na.data, [builder.add(first, ir.Constant(I64, g))])
                    builder.store(builder.sext(tot, I64), dst)
            return context.get_dummy_value()

        return sig, codegen

    return track_rows


#: None where the SIMD kernels are off (the portable tracked kernels run then).
_track_rows = _make_track_rows(DELTA_ROWS, False) if merge_rows is not None else None
_untrack_rows = _make_track_rows(DELTA_ROWS, True) if merge_rows is not None else None


@inline_helper
def _col_delta(p, q, i, j, scale):
    """``scale * acc[j]`` of row i, summed as every merge kernel sums it."""
    a = np.float32(0.0)
    for t in range(p.shape[1]):
        a += p[i, t] * q[t, j]
    return scale * a


@inline_helper
def _key32(b):
    return b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))


@inline_helper
def _finish_track_row(w, wi, p, q, i, j0, scale, corr, exc_col, exc_bits, exc_count, back, backi):
    """After track_rows on row i (columns < j0 done): the columns >= j0 element by element,
    then the exceptions (-128 in corr, whose w still holds the original): their bits go
    to the slots and w gets w + d; a row with more exceptions than slots is put back to
    its original values (the caller keeps it whole). back / backi: a 1-element scratch
    and its integer view."""
    k = w.shape[1]
    slots = exc_col.shape[1]
    wr = w[i]
    wir = wi[i]
    cr = corr[i]
    cnt = exc_count[i]
    for j in range(j0, k):
        d = _col_delta(p, q, i, j, scale)
        x = wr[j]
        merged = x + d
        back[0] = merged - d
        kx = np.int64(_key32(wir[j]))
        kb = np.int64(_key32(backi[0]))
        diff = kx - kb
        if diff < -127 or diff > 127:
            cr[j] = -128
            cnt += 1
        else:
            cr[j] = diff
            wr[j] = merged
    exc_count[i] = cnt
    if cnt == 0:
        return
    if cnt <= slots:
        e = 0
        for j in range(k):
            if cr[j] == -128:
                exc_col[i, e] = j
                exc_bits[i, e] = wir[j]
                wr[j] = wr[j] + _col_delta(p, q, i, j, scale)
                e += 1
        return
    for j in range(k):
        if cr[j] != -128:
            back[0] = wr[j] - _col_delta(p, q, i, j, scale)
            wir[j] = _key32(np.int32(_key32(backi[0]) + np.int32(cr[j])))


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=first_size, serial_below=ELEMENTWISE_SERIAL_BELOW)
def merge_tracked_fused(w, wi, p, q, scale, corr, exc_col, exc_bits, exc_count):
    """:func:`merge_tracked` for float32 with delta, record and update fused in one pass
    over W (see _make_track_rows); bit-identical, with the same record."""
    m, k = w.shape
    k16 = k - k % DELTA_LANES
    ngroups = (m + DELTA_ROWS - 1) // DELTA_ROWS
    for gi in prange(ngroups):
        i0 = gi * DELTA_ROWS
        rows = min(DELTA_ROWS, m - i0)
        back = np.empty(1, w.dtype)
        backi = back.view(wi.dtype)
        if rows == DELTA_ROWS:
            _track_rows(p, q, i0, w, scale, corr, exc_count)
            for g in range(rows):
                _finish_track_row(w, wi, p, q, i0 + g, k16, scale, corr, exc_col, exc_bits, exc_count, back, backi)
        else:
            for g in range(rows):
                exc_count[i0 + g] = 0
                _finish_track_row(w, wi, p, q, i0 + g, 0, scale, corr, exc_col, exc_bits, exc_count, back, backi)


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=first_size, serial_below=ELEMENTWISE_SERIAL_BELOW)
def unmerge_tracked_fused(w, wi, p, q, scale, corr, exc_col, exc_bits, exc_count):
    """:func:`unmerge_tracked` for what :func:`merge_tracked_fused` recorded, in one pass
    over W; rows flagged as overflowed are skipped (the caller restores them)."""
    m, k = w.shape
    slots = exc_bits.shape[1]
    k16 = k - k % DELTA_LANES
    ngroups = (m + DELTA_ROWS - 1) // DELTA_ROWS
    for gi in prange(ngroups):
        i0 = gi * DELTA_ROWS
        rows = min(DELTA_ROWS, m - i0)
        whole = rows == DELTA_ROWS
        for g in range(rows):
            if exc_count[i0 + g] > slots:
                whole = False
        j0 = k16 if whole else 0
        if whole:
            _untrack_rows(p, q, i0, w, scale, corr, exc_count)
        back = np.empty(1, w.dtype)
        backi = back.view(wi.dtype)
        for g in range(rows):
            i = i0 + g
            if exc_count[i] > slots:
                continue
            wr = w[i]
            wir = wi[i]
            cr = corr[i]
            for j in range(j0, k):
                back[0] = wr[j] - _col_delta(p, q, i, j, scale)
                wir[j] = _key32(np.int32(_key32(backi[0]) + np.int32(cr[j])))
            for e in range(exc_count[i]):
                wir[exc_col[i, e]] = exc_bits[i, e]
