"""FP4 quantizer (bitsandbytes' 1-2-1 float code book, ``numlora._tables.FP4_CODE``).

Bit-identical to bitsandbytes' CPU ``quantize_4bit(..., quant_type="fp4")``, with the NF4
block rules (see :mod:`numlora.kernels.nf4`): blocks over the flat row-major index, the
last block may be partial (divided by its clamped absmax, which is stored), full blocks
multiplied by ``float32(1 / max(absmax, 1e-38))``; a value's sorted index ``c`` is the
number of FP4 midpoints strictly below it, and its nibble is ``FP4_ORDER[c]``; two nibbles
per byte, the first element high; an odd tail padded with nibble 0 (the code of 0.0).

``FP4_ORDER[c]`` is computed, not looked up, so the loop vectorises: with ``m = c - 8`` on
the positive side (``c >= 8``) and ``m = 7 - c`` on the other, the magnitude nibble is
``m ^ ((m & 2) << 1)`` and the sign bit is set for negative values except the zero code,
and for the smallest positive bucket (bitsandbytes maps (0, 0.0104] to nibble 8, the
table's second zero). ``tests/test_fp4.py`` checks the formula against the table.

Decoding needs no new kernel: every decode kernel takes the code book as an argument.
"""

from __future__ import annotations

import numpy as np

from .._tables import FP4_MIDPOINTS
from ._jit import inline_helper, kernel, prange
from .nf4 import ONE, TINY, _absmax_bits, _widen_bf16

_I1 = np.int32(1)
_I0 = np.int32(0)
(_M0, _M1, _M2, _M3, _M4, _M5, _M6, _M7, _M8, _M9, _M10, _M11, _M12, _M13, _M14) = (
    np.float32(m) for m in FP4_MIDPOINTS)
PAD = 0  # the nibble an odd tail is padded with (0.0, sorted index 7)

_CODES_CHUNK = 64  # blocks per parallel task
_PACK_CHUNK = 8192  # bytes per parallel task in the generic (odd blocksize) path


@inline_helper
def _nibble(y):
    """FP4_ORDER[number of FP4 midpoints strictly below y], as int32 arithmetic."""
    c = ((_I1 if y > _M0 else _I0) + (_I1 if y > _M1 else _I0) + (_I1 if y > _M2 else _I0)
         + (_I1 if y > _M3 else _I0) + (_I1 if y > _M4 else _I0) + (_I1 if y > _M5 else _I0)
         + (_I1 if y > _M6 else _I0) + (_I1 if y > _M7 else _I0) + (_I1 if y > _M8 else _I0)
         + (_I1 if y > _M9 else _I0) + (_I1 if y > _M10 else _I0) + (_I1 if y > _M11 else _I0)
         + (_I1 if y > _M12 else _I0) + (_I1 if y > _M13 else _I0) + (_I1 if y > _M14 else _I0))
    pos = c >= np.int32(8)
    m = c - np.int32(8) if pos else np.int32(7) - c
    zero = m == _I0
    sign = _I1 if pos == zero else _I0
    return (sign << np.int32(3)) | (m ^ ((m & np.int32(2)) << np.int32(1)))


@inline_helper
def _tail(x, xi, start, packed, absmax, absmax_i, b):
    """The partial last block b = [start, n), start even."""
    n = x.size
    absmax_i[b] = _absmax_bits(xi[start:n])
    am = max(absmax[b], TINY)
    absmax[b] = am
    for k in range(start, n, 2):
        q0 = _nibble(x[k] / am)
        q1 = PAD
        if k + 1 < n:
            q1 = _nibble(x[k + 1] / am)
        packed[k >> 1] = (q0 << 4) | q1


@kernel(parallel=True)
def fp4_quantize_even(x, xi, blocksize, packed, absmax, absmax_i):
    """Quantize the flat float32 ``x`` (``xi`` its int32 view) for an even blocksize."""
    n = x.size
    nfull = n // blocksize
    half = blocksize // 2
    ntasks = (nfull + _CODES_CHUNK - 1) // _CODES_CHUNK
    for task in prange(ntasks):
        codes = np.empty(blocksize, np.int32)
        for b in range(task * _CODES_CHUNK, min(nfull, (task + 1) * _CODES_CHUNK)):
            start = b * blocksize
            xb = x[start:start + blocksize]
            absmax_i[b] = _absmax_bits(xi[start:start + blocksize])
            inv = ONE / max(absmax[b], TINY)
            for k in range(blocksize):
                codes[k] = _nibble(xb[k] * inv)
            pb = packed[b * half:(b + 1) * half]
            for p in range(half):
                pb[p] = (codes[2 * p] << 4) | codes[2 * p + 1]
    if nfull * blocksize < n:
        _tail(x, xi, nfull * blocksize, packed, absmax, absmax_i, nfull)


@kernel(parallel=True)
def fp4_quantize_any(x, xi, blocksize, packed, absmax, absmax_i):
    """Quantize for any blocksize >= 2 (blocks may start mid-byte)."""
    n = x.size
    nblocks = absmax.size
    nfull = n // blocksize
    for b in prange(nblocks):
        start = b * blocksize
        absmax_i[b] = _absmax_bits(xi[start:min(start + blocksize, n)])
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
                q0 = _nibble(x[k] * inv[b])
            else:
                q0 = _nibble(x[k] / absmax[b])
            q1 = PAD
            if k + 1 < n:
                b = (k + 1) // blocksize
                if b < nfull:
                    q1 = _nibble(x[k + 1] * inv[b])
                else:
                    q1 = _nibble(x[k + 1] / absmax[b])
            packed[p] = (q0 << 4) | q1


@kernel(parallel=True)
def fp4_quantize_bf16(bits, nfull, blocksize, packed, absmax, absmax_i):
    """:func:`fp4_quantize_even` over the first ``nfull`` whole blocks of the bf16 bit
    patterns ``bits`` (uint16), widened block by block (see ``nf4_quantize_bf16``)."""
    half = blocksize // 2
    ntasks = (nfull + _CODES_CHUNK - 1) // _CODES_CHUNK
    for task in prange(ntasks):
        xi = np.empty(blocksize, np.int32)
        xb = xi.view(np.float32)
        codes = np.empty(blocksize, np.int32)
        for b in range(task * _CODES_CHUNK, min(nfull, (task + 1) * _CODES_CHUNK)):
            absmax_i[b] = _widen_bf16(bits[b * blocksize:(b + 1) * blocksize], xi)
            inv = ONE / max(absmax[b], TINY)
            for k in range(blocksize):
                codes[k] = _nibble(xb[k] * inv)
            pb = packed[b * half:(b + 1) * half]
            for p in range(half):
                pb[p] = (codes[2 * p] << 4) | codes[2 * p + 1]
