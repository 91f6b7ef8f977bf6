"""NF4 kernels: quantize, dequantize and the 8-bit double quantization of absmax.

Bit-identical to bitsandbytes' CPU path (see docs/nf4-format.md):
- blocks run over the flat row-major index; the last block may be partial;
- full blocks multiply by ``float32(1 / max(absmax, 1e-38))``; the partial last block
  divides by ``max(absmax, 1e-38)`` and stores that clamped value as its absmax;
- the code is the number of float32 midpoints strictly below the scaled value (a value
  exactly on a midpoint takes the lower code); clamping to [-1, 1] first would not change
  that count, so it is skipped;
- two codes per byte, the first element in the high nibble, an odd tail padded with 7.

absmax is found as the integer maximum of ``bits & 0x7fffffff`` (for non-negative floats
the integer order is the float order): the reduction vectorises, and a block holding NaN
or inf gets a non-finite absmax, which the caller turns into an error.
"""

from __future__ import annotations

import numpy as np

from ._jit import inline_helper, kernel, prange, serial_twin

TINY = np.float32(1e-38)
ONE = np.float32(1.0)
_PACK_CHUNK = 8192  # bytes per parallel task in the generic (odd blocksize) path


@inline_helper
def _code(y, bounds):
    q = 0
    for t in range(15):
        q += y > bounds[t]
    return q


@inline_helper
def _block_absmax_bits(xi, start, stop):
    mb = np.int32(0)
    for k in range(start, stop):
        v = xi[k] & np.int32(0x7FFFFFFF)
        if v > mb:
            mb = v
    return mb


@kernel(parallel=True)
def nf4_quantize_even(x, xi, blocksize, bounds, packed, absmax, absmax_i):
    """Quantize the flat float32 ``x`` (``xi`` its int32 view) for an even blocksize:
    one fused pass per block (absmax, then codes, packed two per byte)."""
    n = x.size
    nfull = n // blocksize
    half = blocksize // 2
    for b in prange(nfull):
        start = b * blocksize
        absmax_i[b] = _block_absmax_bits(xi, start, start + blocksize)
        inv = ONE / max(absmax[b], TINY)
        base = b * half
        for p in range(half):
            q0 = _code(x[start + 2 * p] * inv, bounds)
            q1 = _code(x[start + 2 * p + 1] * inv, bounds)
            packed[base + p] = (q0 << 4) | q1
    if nfull * blocksize < n:
        start = nfull * blocksize
        absmax_i[nfull] = _block_absmax_bits(xi, start, n)
        am = max(absmax[nfull], TINY)
        absmax[nfull] = am
        for k in range(start, n, 2):
            q0 = _code(x[k] / am, bounds)
            q1 = 7
            if k + 1 < n:
                q1 = _code(x[k + 1] / am, bounds)
            packed[k >> 1] = (q0 << 4) | q1


@kernel(parallel=True)
def nf4_quantize_any(x, xi, blocksize, bounds, packed, absmax, absmax_i):
    """Quantize for any blocksize >= 2 (blocks may start mid-byte): absmax per block
    first, then codes per byte."""
    n = x.size
    nblocks = absmax.size
    nfull = n // blocksize
    for b in prange(nblocks):
        start = b * blocksize
        absmax_i[b] = _block_absmax_bits(xi, start, min(start + blocksize, n))
    inv = np.empty(nblocks, np.float32)
    for b in range(nfull):
        inv[b] = ONE / max(absmax[b], TINY)
    if nfull < nblocks:
        absmax[nfull] = max(absmax[nfull], TINY)
    nbytes = packed.size
    nchunks = (nbytes + _PACK_CHUNK - 1) // _PACK_CHUNK
    for c in prange(nchunks):
        for p in range(c * _PACK_CHUNK, min((c + 1) * _PACK_CHUNK, nbytes)):
            k = 2 * p
            b = k // blocksize
            if b < nfull:
                q0 = _code(x[k] * inv[b], bounds)
            else:
                q0 = _code(x[k] / absmax[b], bounds)
            q1 = 7
            if k + 1 < n:
                b = (k + 1) // blocksize
                if b < nfull:
                    q1 = _code(x[k + 1] * inv[b], bounds)
                else:
                    q1 = _code(x[k + 1] / absmax[b], bounds)
            packed[p] = (q0 << 4) | q1


@kernel(parallel=True)
def nf4_dequantize_range(packed, absmax, blocksize, code, start, stop, out):
    """``out[k - start] = code[nibble k] * absmax[k // blocksize]`` for k in [start, stop).

    Works for any start (even mid-block, mid-byte), so callers can decode one tile of
    rows at a time; parallel over the blocks the range touches."""
    if stop <= start:
        return
    b0 = start // blocksize
    b1 = (stop - 1) // blocksize + 1
    for b in prange(b0, b1):
        lo = max(start, b * blocksize)
        hi = min(stop, (b + 1) * blocksize)
        s = absmax[b]
        k = lo
        if k & 1:
            out[k - start] = code[packed[k >> 1] & 15] * s
            k += 1
        npairs = (hi - k) >> 1
        base = k >> 1
        o = k - start
        for p in range(npairs):
            byte = packed[base + p]
            out[o + 2 * p] = code[byte >> 4] * s
            out[o + 2 * p + 1] = code[byte & 15] * s
        k += 2 * npairs
        if k < hi:
            out[k - start] = code[packed[k >> 1] >> 4] * s


#: Serial build of :func:`nf4_dequantize_range` for decoding small tiles between BLAS calls.
nf4_dequantize_tile = serial_twin(nf4_dequantize_range)


@kernel(parallel=True)
def code8_encode(absmax, offset, group, code8, q8, absmax2):
    """Double quantization of the block scales: per group of ``group`` values,
    ``absmax2[g] = max |absmax - offset|`` and ``q8[i]`` = index of the entry of the sorted
    ``code8`` nearest to ``(absmax[i] - offset) / absmax2[g]`` (ties to the lower index)."""
    n = absmax.size
    ngroups = absmax2.size
    for g in prange(ngroups):
        lo = g * group
        hi = min(lo + group, n)
        a2 = np.float32(0.0)
        for i in range(lo, hi):
            c = abs(absmax[i] - offset)
            if c > a2:
                a2 = c
        absmax2[g] = a2
        for i in range(lo, hi):
            v = np.float32(0.0)
            if a2 > 0:
                v = (absmax[i] - offset) / a2
            # binary search: first index with code8[idx] >= v
            left = 0
            right = code8.size
            while left < right:
                mid = (left + right) >> 1
                if code8[mid] < v:
                    left = mid + 1
                else:
                    right = mid
            if left == 0:
                q8[i] = 0
            elif left == code8.size:
                q8[i] = code8.size - 1
            else:
                below = np.float64(v) - np.float64(code8[left - 1])
                above = np.float64(code8[left]) - np.float64(v)
                q8[i] = left - 1 if below <= above else left


@kernel()
def code8_decode(q8, absmax2, offset, group, code8, out):
    """``out[i] = code8[q8[i]] * absmax2[i // group] + offset`` in float32."""
    for i in range(q8.size):
        out[i] = code8[q8[i]] * absmax2[i // group] + offset
