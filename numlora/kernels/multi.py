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

from ._jit import kernel, prange, serial_twin

#: Rows of a segment shrunk together (each row of A^T is loaded once for all of them).
SHRINK_ROWS = 8
#: Output columns per pass of the expand (a chunk of each B^T row stays in L1 / L2 while
#: the segment's rows use it).
EXPAND_COLS = 1024


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
        p0 = seg_start[sg]
        p1 = seg_start[sg + 1]
        r = ad_rank[k]
        blk = blocks[ad_block[k]]
        base = ad_off[k]
        at = blk[base:base + in_f * r]
        bt = blk[base + in_f * r:base + r * (in_f + out_f)]
        sk = ad_scaling[k]
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


#: Serial build of :func:`multi_lora_add`: what runs right after a BLAS base product
#: (a parallel numba kernel there fights OpenBLAS's still-spinning threads).
multi_lora_add_serial = serial_twin(multi_lora_add)


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
