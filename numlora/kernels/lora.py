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

from ._jit import inline_helper, kernel, prange
from ._simd import CACHEABLE as SIMD_CACHEABLE
from ._simd import DELTA_LANES, DELTA_ROWS, delta_rows, merge_rows
from ._simd import LANES as SIMD_LANES  # noqa: F401  (read as kernels.<family>.SIMD_LANES)


@inline_helper
def _delta_row(p, q, i, acc):
    """acc[j] = sum_t p[i, t] * q[t, j], summed in order over t."""
    acc[:] = 0
    for t in range(p.shape[1]):
        c = p[i, t]
        for j in range(q.shape[1]):
            acc[j] += c * q[t, j]


@kernel(parallel=True)
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


@kernel(parallel=True)
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


@kernel(parallel=True)
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


@inline_helper
def _group_delta(p, q, i0, rows, acc):
    """acc[g] = the delta sums of row i0 + g, for g < rows (a whole group through the
    SIMD kernel, a short last group row by row)."""
    k = q.shape[1]
    if rows == DELTA_ROWS:
        delta_rows(p, q, i0, acc, np.float32(0.0))
        k16 = k - k % DELTA_LANES
        if k16 < k:
            for g in range(rows):
                _tail_delta(p, q, i0 + g, acc[g], k16)
    else:
        for g in range(rows):
            _delta_row(p, q, i0 + g, acc[g])


@kernel(parallel=True, cache=SIMD_CACHEABLE)
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


@kernel(parallel=True, cache=SIMD_CACHEABLE)
def merge_tracked_simd(w, wi, p, q, scale, maxint, corr, exc_col, exc_bits, exc_count):
    """:func:`merge_tracked` with the SIMD delta; bit-identical."""
    m, k = w.shape
    ngroups = (m + DELTA_ROWS - 1) // DELTA_ROWS
    for gi in prange(ngroups):
        i0 = gi * DELTA_ROWS
        rows = min(DELTA_ROWS, m - i0)
        acc = np.empty((DELTA_ROWS, k), w.dtype)
        back = np.empty(k, w.dtype)
        backi = back.view(wi.dtype)
        _group_delta(p, q, i0, rows, acc)
        for g in range(rows):
            _track_row(w, wi, i0 + g, acc[g], back, backi, scale, maxint, corr, exc_col, exc_bits, exc_count)


@kernel(parallel=True, cache=SIMD_CACHEABLE)
def unmerge_tracked_simd(w, wi, p, q, scale, maxint, minint, corr, exc_col, exc_bits, exc_count):
    """:func:`unmerge_tracked` with the SIMD delta; bit-identical."""
    m, k = w.shape
    slots = exc_bits.shape[1]
    ngroups = (m + DELTA_ROWS - 1) // DELTA_ROWS
    for gi in prange(ngroups):
        i0 = gi * DELTA_ROWS
        rows = min(DELTA_ROWS, m - i0)
        acc = np.empty((DELTA_ROWS, k), w.dtype)
        back = np.empty(k, w.dtype)
        backi = back.view(wi.dtype)
        _group_delta(p, q, i0, rows, acc)
        for g in range(rows):
            if exc_count[i0 + g] <= slots:
                _untrack_row(w, wi, i0 + g, acc[g], back, backi, scale, maxint, minint, corr, exc_col, exc_bits,
                             exc_count)
