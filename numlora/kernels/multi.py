"""Many adapters in one batch: the low-rank part of ``y[i] += s_i (x[i] A_k^T) B_k^T``.

Storage (see :mod:`numlora.multi.pool`): adapters live in 1-D float32 pool blocks.
Adapter ``k`` occupies ``rank * (in + out)`` consecutive floats of block ``ad_block[k]``
from float offset ``ad_off[k]``: first ``A_k^T`` (in, r) row-major, then ``B_k^T``
(r, out) row-major.

Rows arrive grouped (SGMV-style): ``order[seg_start[g]:seg_start[g + 1]]`` are the batch
rows of segment ``g``, all using adapter ``seg_adapter[g]``, so each adapter's A and B
are streamed from memory once per batch whatever the row order.

Arithmetic of one row (fixed, whatever else is in the batch, its position, the grouping
or the thread count):

- ``u[t] = sum_j x[i, j] * A^T[j, t]``, summed over j in order from 0 (one accumulator
  per t; the loop is vectorised across t, which does not change any element's sum);
- ``c[t] = u[t] * s`` with ``s = float32(scaling_k) * float32(scale_i)``;
- ``y[i, o] = (((y[i, o] + c[0] B^T[0, o]) + c[1] B^T[1, o]) + ...)`` in order over t,
  vectorised across o.

No FMA contraction (numlora never enables fastmath), so vector and scalar code give the
same bits. Kernels never validate; the bank (:mod:`numlora.multi`) does.
"""

from __future__ import annotations

import numpy as np

from ._jit import inline_helper, kernel, prange, serial_twin
from ._simd import (
    BANK_LANES,
    BANK_ROWS,
    BANK_WIDE,
    bank_rows_wide,
    bank_rows_x1,
    bank_rows_x1h,
    bank_rows_x4,
    bank_rows_x4h,
    bank_rows_x4w,
    dot16,
    transpose8,
)
from ._simd import CACHEABLE as SIMD_CACHEABLE
from ._simd import LANES as SIMD_LANES  # noqa: F401  (read as kernels.<family>.SIMD_LANES)
from .compute import _dot

#: Rows of a segment shrunk together (each row of A^T is loaded once for all of them).
SHRINK_ROWS = 8
#: Output columns per pass of the expand (a chunk of each B^T row stays in L1 / L2 while
#: the segment's rows use it).
EXPAND_COLS = 1024


@inline_helper
def _segment_plain(x, order, p0, p1, r, at, bt, sk, rowscale, u, y):
    """One segment's rows p0..p1 (positions in ``order``) of :func:`multi_lora_add`, element
    by element: at = A^T (in, r), bt = B^T (r, out), both flat; sk = float32(scaling)."""
    in_f = x.shape[1]
    out_f = y.shape[1]
    # shrink: u[p, :r] = x[order[p]] A^T, groups of SHRINK_ROWS rows share each A^T row
    for g0 in range(p0, p1, SHRINK_ROWS):
        g1 = min(p1, g0 + SHRINK_ROWS)
        for p in range(g0, g1):
            up = u[p]
            for t in range(r):
                up[t] = 0
        for j in range(in_f):
            arow = at[j * r:(j + 1) * r]
            for p in range(g0, g1):
                xv = x[order[p], j]
                up = u[p]
                for t in range(r):
                    up[t] += xv * arow[t]
        for p in range(g0, g1):
            s = sk * rowscale[order[p]]
            up = u[p]
            for t in range(r):
                up[t] = up[t] * s
    # expand: y[order[p]] += u[p, :r] B^T, by column chunks
    for o0 in range(0, out_f, EXPAND_COLS):
        o1 = min(out_f, o0 + EXPAND_COLS)
        w = o1 - o0
        for p in range(p0, p1):
            yrow = y[order[p], o0:o1]
            up = u[p]
            for t in range(r):
                c = up[t]
                brow = bt[t * out_f + o0:t * out_f + o1]
                for o in range(w):
                    yrow[o] += c * brow[o]


@kernel(parallel=True)
def multi_lora_add(x, order, seg_start, seg_adapter, rowscale, blocks, ad_block, ad_off, ad_rank, ad_scaling,
                   u, y):
    """y[i] += s_i * (x[i] A_k^T) B_k^T for every row i of every segment (see the module
    docstring). x: (n, in) float32; y: (n, out) float32, updated in place; u: (n, >= max
    rank) float32 scratch, indexed by the row's position in ``order``; rowscale: (n,)
    float32 per-row multipliers (by batch row); blocks: list of 1-D float32 pool blocks.
    Parallel over segments."""
    in_f = x.shape[1]
    out_f = y.shape[1]
    nseg = seg_adapter.size
    for sg in prange(nseg):
        k = seg_adapter[sg]
        r = ad_rank[k]
        blk = blocks[ad_block[k]]
        base = ad_off[k]
        _segment_plain(x, order, seg_start[sg], seg_start[sg + 1], r, blk[base:base + in_f * r],
                       blk[base + in_f * r:base + r * (in_f + out_f)], ad_scaling[k], rowscale, u, y)


#: Serial build of :func:`multi_lora_add`: what runs right after a BLAS base product
#: (a parallel numba kernel there fights OpenBLAS's still-spinning threads).
multi_lora_add_serial = serial_twin(multi_lora_add)


@kernel(parallel=True, cache=SIMD_CACHEABLE)
def multi_lora_add_simd(x, order, seg_start, seg_adapter, rowscale, blocks, ad_block, ad_off, ad_rank,
                        ad_scaling, u, y):
    """:func:`multi_lora_add` with the sums in vector registers for adapters of rank 8 and
    more (``_simd.bank_rows_*``; lower ranks element by element, :func:`_segment_plain`).
    Shrink: four rows of a segment at a time, 32, 16 or 8 of u's columns per pass over
    x, each vector of A^T loaded once for the four rows; a segment's last 1-3 rows one at
    a time, 64, 16 or 8 columns per pass (:func:`_one_row`). Expand: 32 (then 16) outputs
    at a time for each group of four rows, each output's sum over t kept in a register
    from y's value to the end; the last 1-3 rows 64 then 16 outputs at a time. Columns
    past the last whole 8 of u (r % 8) and the last whole 16 of y (out % 16) element by
    element. The same operations in the same order for every element, so the same bits as
    :func:`multi_lora_add`. x, u and y must be C-contiguous (the bank falls back to
    :func:`multi_lora_add` otherwise). Measured (AMD EPYC, AVX-512, one thread, 4096
    inputs): 128 rows over 4 adapters of rank 16 into 1024 outputs 1.5-1.6 -> 0.29-0.32
    ms; 64 rows of one rank-64 adapter into 4096 outputs 2.75-2.81 -> 1.12-1.15 ms."""
    in_f = x.shape[1]
    out_f = y.shape[1]
    umax = u.shape[1]
    xf = x.reshape(x.size)
    uf = u.reshape(u.size)
    yf = y.reshape(y.size)
    L = BANK_LANES
    H = 8
    ov = out_f - out_f % L
    nseg = seg_adapter.size
    for sg in prange(nseg):
        k = seg_adapter[sg]
        p0 = seg_start[sg]
        p1 = seg_start[sg + 1]
        r = ad_rank[k]
        blk = blocks[ad_block[k]]
        base = ad_off[k]
        bo = base + in_f * r
        at = blk[base:bo]
        bt = blk[bo:base + r * (in_f + out_f)]
        sk = ad_scaling[k]
        if r < H:
            _segment_plain(x, order, p0, p1, r, at, bt, sk, rowscale, u, y)
            continue
        so = np.empty(BANK_ROWS, np.int64)
        do = np.empty(BANK_ROWS, np.int64)
        rv = r - r % H
        pg = p0 + (p1 - p0) // BANK_ROWS * BANK_ROWS  # rows p0..pg in groups of four, pg..p1 one by one
        # shrink: u[p, :r] = x[order[p]] A^T, then scaled
        for g0 in range(p0, pg, BANK_ROWS):
            for g in range(BANK_ROWS):
                so[g] = order[g0 + g] * in_f
            t0 = 0
            while t0 < rv:
                for g in range(BANK_ROWS):
                    do[g] = (g0 + g) * umax + t0
                if t0 + 2 * L <= rv:
                    bank_rows_x4w(xf, so, blk, base + t0, r, in_f, uf, do, 0)
                    t0 += 2 * L
                elif t0 + L <= rv:
                    bank_rows_x4(xf, so, blk, base + t0, r, in_f, uf, do, 0)
                    t0 += L
                else:
                    bank_rows_x4h(xf, so, blk, base + t0, r, in_f, uf, do, 0)
                    t0 += H
        for p in range(pg, p1):
            so[0] = order[p] * in_f
            _one_row(xf, so, blk, base, r, in_f, uf, do, p * umax, rv, 0)
        # the columns past the last whole 8, element by element, in _segment_plain's loop forms
        # (a helper shared with it, taking the first column, made the plain kernel 1.8x
        # slower: LLVM vectorises these loops only in this form)
        if rv < r:
            for p in range(p0, p1):
                up = u[p]
                for t in range(rv, r):
                    up[t] = 0
            for j in range(in_f):
                arow = at[j * r:(j + 1) * r]
                for p in range(p0, p1):
                    xv = x[order[p], j]
                    up = u[p]
                    for t in range(rv, r):
                        up[t] += xv * arow[t]
        for p in range(p0, p1):
            s = sk * rowscale[order[p]]
            up = u[p]
            for t in range(r):
                up[t] = up[t] * s
        # expand: y[order[p]] += u[p, :r] B^T
        o0 = 0
        while o0 < ov:
            step = 2 * L if o0 + 2 * L <= ov else L
            for g0 in range(p0, pg, BANK_ROWS):
                for g in range(BANK_ROWS):
                    so[g] = (g0 + g) * umax
                    do[g] = order[g0 + g] * out_f + o0
                if step == 2 * L:
                    bank_rows_x4w(uf, so, blk, bo + o0, out_f, r, yf, do, 1)
                else:
                    bank_rows_x4(uf, so, blk, bo + o0, out_f, r, yf, do, 1)
            o0 += step
        for p in range(pg, p1):
            so[0] = p * umax
            _one_row(uf, so, blk, bo, out_f, r, yf, do, order[p] * out_f, ov, 1)
        if ov < out_f:  # the outputs past the last whole 16, element by element
            for p in range(p0, p1):
                yrow = y[order[p]]
                up = u[p]
                for t in range(r):
                    c = up[t]
                    brow = bt[t * out_f:(t + 1) * out_f]
                    for o in range(ov, out_f):
                        yrow[o] += c * brow[o]


@inline_helper
def _one_row(s, so, v, vo, vs, nk, d, do, d0, width, from_d):
    """One row of :func:`multi_lora_add_simd` (its s offset in ``so[0]``): the columns c <
    ``width`` (a multiple of 8) of ``d[d0 + c]``, 64 per call of ``_simd.bank_rows_wide``
    while they last, then 16, then 8; v's columns from ``vo``."""
    c = 0
    while c < width:
        do[0] = d0 + c
        if c + BANK_WIDE * BANK_LANES <= width:
            bank_rows_wide(s, so, v, vo + c, vs, nk, d, do, from_d)
            c += BANK_WIDE * BANK_LANES
        elif c + BANK_LANES <= width:
            bank_rows_x1(s, so, v, vo + c, vs, nk, d, do, from_d)
            c += BANK_LANES
        else:
            bank_rows_x1h(s, so, v, vo + c, vs, nk, d, do, from_d)
            c += 8


#: Serial build of :func:`multi_lora_add_simd` (see :data:`multi_lora_add_serial`).
multi_lora_add_simd_serial = serial_twin(multi_lora_add_simd)


_TILE = 32  # side of the square tiles of the transposing copy


@kernel()
def _transpose_into(src, dst):
    """dst (1-D, R * C floats) = src^T row-major, src (R, C) C-contiguous; by square
    tiles so both sides stay in L1."""
    nr, nc = src.shape
    for i0 in range(0, nr, _TILE):
        i1 = min(nr, i0 + _TILE)
        for j0 in range(0, nc, _TILE):
            j1 = min(nc, j0 + _TILE)
            for j in range(j0, j1):
                drow = dst[j * nr + i0:j * nr + i1]
                for i in range(i1 - i0):
                    drow[i] = src[i0 + i, j]


@kernel()
def pack_adapter(lora_a, lora_b, dst):
    """dst[: in * r] = A^T (in, r) row-major, dst[in * r:] = B^T (r, out) row-major
    (lora_a (r, in), lora_b (out, r) float32 C-contiguous; the transposing copy the
    bank does on ``add``)."""
    r, in_f = lora_a.shape
    _transpose_into(lora_a, dst[:in_f * r])
    _transpose_into(lora_b, dst[in_f * r:])


@kernel(cache=SIMD_CACHEABLE)
def _transpose8_into(src, dst):
    """:func:`_transpose_into` with src's whole 8 x 8 blocks transposed in registers
    (``_simd.transpose8``: a copy, every bit kept), 16 columns at a time so each source
    cache line is read whole; the edges past the last whole block element by element."""
    nr, nc = src.shape
    sflat = src.reshape(-1)
    r8 = nr - nr % 8
    c8 = nc - nc % 8
    c16 = nc - nc % 16
    for j0 in range(0, c16, 16):
        for i0 in range(0, r8, 8):
            transpose8(sflat, i0 * nc + j0, nc, dst, j0 * nr + i0, nr)
            transpose8(sflat, i0 * nc + j0 + 8, nc, dst, (j0 + 8) * nr + i0, nr)
    if c8 > c16:
        for i0 in range(0, r8, 8):
            transpose8(sflat, i0 * nc + c16, nc, dst, c16 * nr + i0, nr)
    for i in range(r8, nr):
        for j in range(nc):
            dst[j * nr + i] = src[i, j]
    for i in range(r8):
        for j in range(c8, nc):
            dst[j * nr + i] = src[i, j]


@kernel(cache=SIMD_CACHEABLE)
def pack_adapter_simd(lora_a, lora_b, dst):
    """:func:`pack_adapter` by :func:`_transpose8_into`: the same floats. On AMD Zen 3
    (rank 64, 4096 x 4096, into mapped memory) 0.85 ms by the scalar tiles, the most of
    a ``LoraBank.add``."""
    r, in_f = lora_a.shape
    _transpose8_into(lora_a, dst[:in_f * r])
    _transpose8_into(lora_b, dst[in_f * r:])


#: The adapter copy ``LoraBank.add`` runs (CPU pool, or the GPU bank's host staging):
#: the register transpose where the build has SIMD, else the scalar tiles.
pack_adapter_best = pack_adapter_simd if SIMD_LANES else pack_adapter


#: Weight rows per parallel task of the dense row-stable product.
DENSE_ROWS = 8


@kernel(parallel=True)
def dense_rows_dot(w, x, y):
    """y[i, o] = W[o] . x[i] for (out, in) ``w`` and (n, in) ``x`` (float32,
    C-contiguous), each in ``_simd.dot16``'s order (16 partial sums over the chunks of 16,
    summed by halving, then the tail one by one): an output's operations depend on
    neither its row's position nor the rest of the batch nor the threads. The row-stable
    bank's dense base where BLAS's are not (:class:`numlora.multi.product.RowStableProduct`)."""
    n = x.shape[0]
    out_f = w.shape[0]
    for task in prange((out_f + DENSE_ROWS - 1) // DENSE_ROWS):
        acc = np.empty(16, np.float32)
        for o in range(task * DENSE_ROWS, min(out_f, (task + 1) * DENSE_ROWS)):
            for i in range(n):
                y[i, o] = _dot(w[o], x[i], acc)


@kernel(parallel=True, cache=SIMD_CACHEABLE)
def dense_rows_dot16(w, x, y):
    """:func:`dense_rows_dot` with ``_simd.dot16``: the same operations, the same bits."""
    n, in_f = x.shape
    out_f = w.shape[0]
    wf = w.reshape(-1)
    for task in prange((out_f + DENSE_ROWS - 1) // DENSE_ROWS):
        for o in range(task * DENSE_ROWS, min(out_f, (task + 1) * DENSE_ROWS)):
            for i in range(n):
                y[i, o] = dot16(wf, o * in_f, x[i], 0, in_f)
