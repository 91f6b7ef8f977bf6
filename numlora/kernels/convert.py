"""Checkpoint conversion kernels: bfloat16 <-> float32 and the reconstruction-error
statistics of ``numlora quantize``. Flat, C-contiguous arrays; no validation.

bfloat16 is handled as its 16 bits (uint16): to float32 the bits become the top half;
from float32 they round to nearest, ties to even (NaN kept as a quiet NaN with its sign),
the same bits as ``numlora.io.safetensors.f32_to_bf16`` (its numpy reference).

Parallel over fixed chunks: the work is memory-bound passes over tens of MiB, run between
file reads and writes (no BLAS call nearby).
"""

from __future__ import annotations

import numpy as np

from ._jit import inline_helper, kernel, prange
from ._simd import LANES, err_acc8

CHUNK = 1 << 16
#: The element loop of :func:`abs_err_stats` through ``_simd.err_acc8`` (any SIMD build;
#: not with the JIT off).
_VECTOR = LANES > 0


@kernel(parallel=True)
def bf16_to_f32(src, dst):
    """dst[i] = float32 whose bits are src[i] << 16."""
    n = src.size
    out = dst.view(np.uint32)
    nchunks = (n + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        s = src[lo:hi]
        o = out[lo:hi]
        for i in range(hi - lo):
            o[i] = np.uint32(s[i]) << np.uint32(16)


@kernel(parallel=True)
def f32_to_bf16_finite(src, dst, bad):
    """dst[i] = the bfloat16 bits of src[i], round to nearest even (a NaN kept, made
    quiet), and, where ``bad`` has room (length >= number of chunks; length 0: not
    counted), bad[c] = the number of NaN or infinite values in chunk c: the check a merged
    weight must pass before it is written, in the same pass as its conversion."""
    n = src.size
    bits = src.view(np.uint32)
    nchunks = (n + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        u = bits[lo:hi]
        o = dst[lo:hi]
        count = 0
        for i in range(hi - lo):
            x = u[i]
            if (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN
                o[i] = np.uint16((x >> np.uint32(16)) | np.uint32(0x0040))
            else:
                r = x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))
                o[i] = np.uint16(r >> np.uint32(16))
            count += (x & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
        if bad.size:
            bad[c] = count


_NO_COUNT = np.empty(0, np.int64)


def f32_to_bf16(src, dst):
    """dst[i] = the bfloat16 bits of src[i], round to nearest even (:func:`f32_to_bf16_finite`
    without the count)."""
    f32_to_bf16_finite(src, dst, _NO_COUNT)


@inline_helper
def store_partials(acc, mx, partial_sum, partial_max, c):
    """Chunk c's partials of :func:`abs_err_stats` (and of ``kernels.nf4.bf16_error_stats``,
    which must give the same bits): the eight float64 sums added in order (numpy's own sum,
    what ``acc.sum()`` runs with the JIT off, would pair them) and the largest of the eight
    maxima."""
    total = 0.0
    for j in range(8):
        total += acc[j]
    partial_sum[c] = total
    partial_max[c] = mx.max()


@kernel(parallel=True)
def abs_err_stats(a, b, partial_sum, partial_max):
    """Sum (float64) and maximum of |a - b| over flat arrays; per-chunk partials are
    written to ``partial_sum`` / ``partial_max`` (length >= number of chunks) and reduced
    by the caller, so the result does not depend on the thread count. Eight independent
    accumulators per chunk (a fixed order) let the loop use vector registers without
    fastmath."""
    n = a.size
    nchunks = (n + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        x = a[lo:hi]
        y = b[lo:hi]
        acc = np.zeros(8, np.float64)
        mx = np.zeros(8, np.float32)
        m8 = (hi - lo) // 8 * 8
        if _VECTOR:  # the same operations per accumulator, in vector registers (numba left this loop scalar)
            err_acc8(x, 0, y, 0, m8, acc, mx)
        else:
            for i in range(0, m8, 8):
                for j in range(8):
                    d = abs(x[i + j] - y[i + j])
                    acc[j] += np.float64(d)
                    mx[j] = max(mx[j], d)
        for i in range(m8, hi - lo):
            d = abs(x[i] - y[i])
            acc[0] += np.float64(d)
            mx[0] = max(mx[0], d)
        store_partials(acc, mx, partial_sum, partial_max, c)
