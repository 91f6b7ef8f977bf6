"""LoRA kernels: merge / unmerge of the low-rank delta into a weight, in place.

The forward is not here: its products go to BLAS from the functional layer (measured
fastest on this machine, see ``numlora.ops``). Merging with BLAS would need a full-size
temporary ``B @ A``; these kernels add the delta row by row with no temporary.

Merge delta convention (shared by every merge / unmerge kernel, so that they agree to
the bit): ``d[i, j] = scale * acc[j]`` with ``acc[j] = sum_t p[i, t] * q[t, j]`` summed
in order t = 0, 1, ..., in the weight's dtype. For ``W (out, in)``: ``p = B``, ``q = A``;
for ``fan_in_fan_out`` (``W (in, out)``): ``p = A^T``, ``q = B^T``.
"""

from __future__ import annotations

import numpy as np

from ._jit import inline_helper, kernel, prange

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
    slots = exc_col.shape[1]
    for i in prange(m):
        acc = np.empty(k, w.dtype)
        _delta_row(p, q, i, acc)
        back = np.empty(k, w.dtype)
        backi = back.view(wi.dtype)
        for j in range(k):
            d = scale * acc[j]
            merged = w[i, j] + d
            back[j] = merged - d
            acc[j] = merged
        cnt = 0
        for j in range(k):
            diff = _key(wi[i, j], maxint) - _key(backi[j], maxint)
            bad = (diff < -127) | (diff > 127)
            corr[i, j] = -128 if bad else diff
            cnt += bad
        exc_count[i] = cnt
        if cnt > slots:
            continue
        if cnt:
            e = 0
            for j in range(k):
                if corr[i, j] == -128:
                    exc_col[i, e] = j
                    exc_bits[i, e] = wi[i, j]
                    e += 1
        for j in range(k):
            w[i, j] = acc[j]


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
        backi = back.view(wi.dtype)
        for j in range(k):
            back[j] = w[i, j] - scale * acc[j]
        for j in range(k):
            wi[i, j] = _unkey(_key(backi[j], maxint) + corr[i, j], minint)
        for e in range(exc_count[i]):
            wi[i, exc_col[i, e]] = exc_bits[i, e]
