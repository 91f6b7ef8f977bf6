"""NF4 kernels: quantize (NF4 and FP4, one set of loops; see the quantize section), dequantize
and the 8-bit double quantization of absmax.

Bit-identical to bitsandbytes' CPU path (see docs/nf4-format.md):
- blocks run over the flat row-major index; the last block may be partial;
- full blocks multiply by ``float32(1 / max(absmax, 1e-38))``; the partial last block
  divides by ``max(absmax, 1e-38)`` and stores that clamped value as its absmax;
- the code is the number of float32 midpoints strictly below the scaled value (a value
  exactly on a midpoint takes the lower code); clamping to [-1, 1] first would not change
  that count, so it is skipped;
- two codes per byte, the first element in the high nibble, an odd tail padded with 7.

Indexing note: numba cannot prove that an index computed from a ``prange`` variable is
non-negative, so it guards every such access against negative wraparound, which stops
LLVM from vectorising the loop. The kernels therefore slice a view
per block or row and index it with ``range`` variables only.

absmax is found as the integer maximum of ``bits & 0x7fffffff`` (for non-negative floats
the integer order is the float order): the reduction vectorises, and a block holding NaN
or inf gets a non-finite absmax, which the caller turns into an error.
"""

from __future__ import annotations

import types

import numpy as np

from .._scratch import scratch
from .._tables import FP4_MIDPOINTS, NF4_MIDPOINTS
from ._jit import (
    DECODE_SERIAL_BELOW,
    ELEMENTWISE_SERIAL_BELOW,
    PRODUCT_SERIAL_BELOW,
    first_size,
    inline_helper,
    kernel,
    last_size,
    prange,
    product_work,
    serial_twin,
)
from ._simd import CACHEABLE as SIMD_CACHEABLE
from ._simd import GROUP as SIMD_GROUP
from ._simd import LANE8_RANKS as SIMD_LANE8_RANKS
from ._simd import LANES as SIMD_LANES  # noqa: F401  (read as kernels.<family>.SIMD_LANES)
from ._simd import LANES as _LANES
from ._simd import (
    PANEL_KC,
    PANEL_MR,
    PANEL_NR,
    STREAM_ALIGN,
    decode_blocks,
    decode_blocks_stream,
    decode_blocks_stream_aligned,
    encode_block,
    err_acc8,
    expand_x1,
    expand_x2,
    expand_x3,
    expand_x4,
    gemv_t1,
    gemv_t2,
    gemv_t4,
    panel_decode,
    panel_mk,
    panel_mk1,
    panel_mk2,
    panel_mk4,
    row_dot,
    rows_dot,
    store_fence,
    t_words1,
    t_words2,
    transpose8,
    words_one,
    words_x1,
    words_x2,
    words_x3,
    words_x4,
    wrows_dot,
)
from ._simd import T_WORDS_MAX_ROWS as SIMD_T_WORDS_MAX_ROWS  # noqa: F401  (read by the products module)
from ._simd import T_WORDS_NX as SIMD_T_WORDS_NX
from ._simd import WORDS_BUF as SIMD_WORDS_BUF
from ._simd import WORDS_GROUP_NW as SIMD_WORDS_GROUP_NW
from ._simd import WORDS_NX as SIMD_WORDS_NX
from ._simd import WROWS as SIMD_WROWS
from ._simd import lane8_dot1 as _lane8_dot1
from ._simd import lane8_dots as _lane8_dots
from ._simd import words_chunk as _words_chunk
from ._simd import words_ok as simd_words_ok  # noqa: F401  (read by the products module)
from ._team import claim, slot_done, slot_range
from .convert import store_partials

TINY = np.float32(1e-38)
ONE = np.float32(1.0)
_I1 = np.int32(1)
_I0 = np.int32(0)
(_M0, _M1, _M2, _M3, _M4, _M5, _M6, _M7, _M8, _M9, _M10, _M11, _M12, _M13, _M14) = (
    np.float32(m) for m in NF4_MIDPOINTS)
(_F0, _F1, _F2, _F3, _F4, _F5, _F6, _F7, _F8, _F9, _F10, _F11, _F12, _F13, _F14) = (
    np.float32(m) for m in FP4_MIDPOINTS)
_CODES_CHUNK = 64  # blocks per parallel task of the quantizer
_PACK_CHUNK = 8192  # bytes per parallel task in the generic (odd blocksize) path


# --- quantize ------------------------------------------------------------------------------
#
# NF4 and FP4 (bitsandbytes' 1-2-1 float code book, ``numlora._tables.FP4_CODE``) share the
# block rules above and every loop of the quantizer; only the encoder of a scaled value
# differs (:func:`_code`, :func:`_nibble`), and the nibble an odd tail is padded with (the
# code of 0.0: 7 in NF4, 0 in FP4). The loops are written once, as templates that call
# ``_encode`` and pad with ``_PAD`` (and the inline helpers ``_tail`` and ``_block``, built
# from the templates ``_partial_tail`` and ``_encode_block`` the same way);
# :func:`_quantizers` compiles a copy of each template
# per code book with those names bound to its encoder, so the encoder is inlined with its
# midpoints as constants (the loops vectorise as hand-written copies did) and each copy is
# compiled, and cached on disk, under its own name (``nf4_quantize_even``,
# ``fp4_quantize_even``, ...) on first use only.


@inline_helper
def _code(y):
    """Number of NF4 midpoints strictly below y (the midpoints are compile-time constants).
    Written as int32 selects, which LLVM vectorises (a sum of booleans it does not)."""
    return ((_I1 if y > _M0 else _I0) + (_I1 if y > _M1 else _I0) + (_I1 if y > _M2 else _I0)
            + (_I1 if y > _M3 else _I0) + (_I1 if y > _M4 else _I0) + (_I1 if y > _M5 else _I0)
            + (_I1 if y > _M6 else _I0) + (_I1 if y > _M7 else _I0) + (_I1 if y > _M8 else _I0)
            + (_I1 if y > _M9 else _I0) + (_I1 if y > _M10 else _I0) + (_I1 if y > _M11 else _I0)
            + (_I1 if y > _M12 else _I0) + (_I1 if y > _M13 else _I0) + (_I1 if y > _M14 else _I0))


@inline_helper
def _nibble(y):
    """The FP4 nibble of y: ``FP4_ORDER[c]``, c the number of FP4 midpoints strictly below y.

    ``FP4_ORDER[c]`` is computed, not looked up, so the loop vectorises: with ``m = c - 8``
    on the positive side (``c >= 8``) and ``m = 7 - c`` on the other, the magnitude nibble
    is ``m ^ ((m & 2) << 1)`` and the sign bit is set for negative values except the zero
    code, and for the smallest positive bucket (bitsandbytes maps (0, 0.0104] to nibble 8,
    the table's second zero). ``tests/test_fp4.py`` checks the formula against the table."""
    c = ((_I1 if y > _F0 else _I0) + (_I1 if y > _F1 else _I0) + (_I1 if y > _F2 else _I0)
         + (_I1 if y > _F3 else _I0) + (_I1 if y > _F4 else _I0) + (_I1 if y > _F5 else _I0)
         + (_I1 if y > _F6 else _I0) + (_I1 if y > _F7 else _I0) + (_I1 if y > _F8 else _I0)
         + (_I1 if y > _F9 else _I0) + (_I1 if y > _F10 else _I0) + (_I1 if y > _F11 else _I0)
         + (_I1 if y > _F12 else _I0) + (_I1 if y > _F13 else _I0) + (_I1 if y > _F14 else _I0))
    pos = c >= np.int32(8)
    m = c - np.int32(8) if pos else np.int32(7) - c
    zero = m == _I0
    sign = _I1 if pos == zero else _I0
    return (sign << np.int32(3)) | (m ^ ((m & np.int32(2)) << np.int32(1)))


@inline_helper
def _absmax_bits(xib):
    mb = np.int32(0)
    for k in range(xib.size):
        v = xib[k] & np.int32(0x7FFFFFFF)
        if v > mb:
            mb = v
    return mb


@inline_helper
def _widen_bf16(bits, xi):
    """xi[k] = bits[k] << 16 (the float32 bits of a bf16 value); returns the integer max of
    the magnitudes' bits (the absmax's float32 bits, as :func:`_absmax_bits`)."""
    mb = np.int32(0)
    for k in range(bits.size):
        v = np.int32(bits[k]) << np.int32(16)
        xi[k] = v
        a = v & np.int32(0x7FFFFFFF)
        if a > mb:
            mb = a
    return mb


def _partial_tail(x, xi, start, packed, absmax, absmax_i, b):
    """The partial last block b = [start, n) (start even): bitsandbytes divides by the
    clamped absmax there and stores the clamped value."""
    n = x.size
    absmax_i[b] = _absmax_bits(xi[start:n])
    am = max(absmax[b], TINY)
    absmax[b] = am
    for k in range(start, n, 2):
        q0 = _encode(x[k] / am)  # noqa: F821  (bound per code book by _quantizers)
        q1 = _PAD  # noqa: F821
        if k + 1 < n:
            q1 = _encode(x[k + 1] / am)  # noqa: F821
        packed[k >> 1] = (q0 << 4) | q1


def _encode_block(xb, inv, codes, pb):
    """One whole block: the codes of ``xb * inv`` into the int32 scratch ``codes``, then
    packed two per byte into ``pb`` (the first element high)."""
    for k in range(xb.size):
        codes[k] = _encode(xb[k] * inv)  # noqa: F821
    for p in range(pb.size):
        pb[p] = (codes[2 * p] << 4) | codes[2 * p + 1]


def _quantize_even(x, xi, blocksize, packed, absmax, absmax_i):
    """Quantize the flat float32 ``x`` (``xi`` its int32 view) for an even blocksize:
    one fused pass per block (absmax, then codes, packed two per byte)."""
    n = x.size
    nfull = n // blocksize
    half = blocksize // 2
    ntasks = (nfull + _CODES_CHUNK - 1) // _CODES_CHUNK
    for task in prange(ntasks):
        codes = np.empty(blocksize, np.int32)
        for b in range(task * _CODES_CHUNK, min(nfull, (task + 1) * _CODES_CHUNK)):
            start = b * blocksize
            absmax_i[b] = _absmax_bits(xi[start:start + blocksize])
            inv = ONE / max(absmax[b], TINY)
            _block(x[start:start + blocksize], inv, codes, packed[b * half:(b + 1) * half])  # noqa: F821
    if nfull * blocksize < n:
        _tail(x, xi, nfull * blocksize, packed, absmax, absmax_i, nfull)  # noqa: F821


def _quantize_any(x, xi, blocksize, packed, absmax, absmax_i):
    """Quantize for any blocksize >= 2 (blocks may start mid-byte): absmax per block
    first, then codes per byte."""
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
                q0 = _encode(x[k] * inv[b])  # noqa: F821
            else:
                q0 = _encode(x[k] / absmax[b])  # noqa: F821
            q1 = _PAD  # noqa: F821
            if k + 1 < n:
                b = (k + 1) // blocksize
                if b < nfull:
                    q1 = _encode(x[k + 1] * inv[b])  # noqa: F821
                else:
                    q1 = _encode(x[k + 1] / absmax[b])  # noqa: F821
            packed[p] = (q0 << 4) | q1


def _quantize_bf16(bits, nfull, blocksize, packed, absmax, absmax_i):
    """The even-blocksize quantizer over the first ``nfull`` whole blocks of the bf16 bit
    patterns ``bits`` (uint16), each block widened into a float32 scratch first (see the
    bf16 section below); the caller quantizes a partial last block as float32."""
    half = blocksize // 2
    ntasks = (nfull + _CODES_CHUNK - 1) // _CODES_CHUNK
    for task in prange(ntasks):
        xi = np.empty(blocksize, np.int32)
        xb = xi.view(np.float32)
        codes = np.empty(blocksize, np.int32)
        for b in range(task * _CODES_CHUNK, min(nfull, (task + 1) * _CODES_CHUNK)):
            absmax_i[b] = _widen_bf16(bits[b * blocksize:(b + 1) * blocksize], xi)
            inv = ONE / max(absmax[b], TINY)
            _block(xb, inv, codes, packed[b * half:(b + 1) * half])  # noqa: F821


def _bind(template, name, names):
    """A copy of the plain function ``template`` named ``name``, whose global names
    ``names`` (a dict) are bound to the given objects. numba resolves a kernel's globals
    when it compiles it, and its on-disk cache files a function under its qualified name,
    so every copy compiles and caches apart."""
    fn = types.FunctionType(template.__code__, dict(template.__globals__, **names), name,
                            template.__defaults__, template.__closure__)
    fn.__qualname__ = name
    fn.__module__ = template.__module__
    fn.__doc__ = template.__doc__
    return fn


def _quantizers(quant_type, encode, pad):
    """``(quantize_even, quantize_any, quantize_bf16, partial_tail)`` for one code book:
    the templates above with ``_encode = encode`` (scaled value -> nibble, an
    :func:`inline_helper`) and ``_PAD = pad``, named ``<quant_type>_quantize_even`` etc.
    Called once per code book at import (creating a dispatcher compiles nothing)."""
    names = {"_encode": encode, "_PAD": pad}
    names["_tail"] = inline_helper(_bind(_partial_tail, f"_{quant_type}_partial_tail", names))
    names["_block"] = inline_helper(_bind(_encode_block, f"_{quant_type}_encode_block", names))
    return tuple(kernel(parallel=True, work=first_size, serial_below=ELEMENTWISE_SERIAL_BELOW)(
        _bind(t, f"{quant_type}_quantize_{suffix}", names))
                 for t, suffix in ((_quantize_even, "even"), (_quantize_any, "any"),
                                   (_quantize_bf16, "bf16"))) + (names["_tail"],)


nf4_quantize_even, nf4_quantize_any, nf4_quantize_bf16, _quantize_partial_tail = _quantizers("nf4", _code, 7)
fp4_quantize_even, fp4_quantize_any, fp4_quantize_bf16, _fp4_partial_tail = _quantizers("fp4", _nibble, 0)

#: The quantize kernels by ``quant_type``: (even blocksize, any blocksize, bf16 bits).
QUANTIZERS = {"nf4": (nf4_quantize_even, nf4_quantize_any, nf4_quantize_bf16),
              "fp4": (fp4_quantize_even, fp4_quantize_any, fp4_quantize_bf16)}


@kernel(parallel=True, work=last_size, serial_below=DECODE_SERIAL_BELOW)
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
        ob = out[lo - start:hi - start]
        if (lo & 1) == 0 and ((hi - lo) & 1) == 0:
            # the common case (a whole block, or any even-aligned piece): pairs only
            pb = packed[lo >> 1:hi >> 1]
            for p in range(pb.size):
                byte = pb[p]
                ob[2 * p] = code[byte >> 4] * s
                ob[2 * p + 1] = code[byte & 15] * s
            continue
        k = 0
        if lo & 1:
            ob[0] = code[packed[lo >> 1] & 15] * s
            k = 1
        npairs = (hi - lo - k) >> 1
        pb = packed[(lo + k) >> 1:((lo + k) >> 1) + npairs]
        for p in range(npairs):
            byte = pb[p]
            ob[k + 2 * p] = code[byte >> 4] * s
            ob[k + 2 * p + 1] = code[byte & 15] * s
        k += 2 * npairs
        if lo + k < hi:
            ob[k] = code[packed[(lo + k) >> 1] >> 4] * s


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


# --- fused matmul ------------------------------------------------------------------------
#
# y[i, o] = sum over the blocks b of row o, in order, of absmax[b] * S(i, b), where S is the
# block's dot product summed in a canonical order: element pairs (j, j+1) (or single
# elements on the generic path) go to lane q % 8 (q = position in the block segment), each
# lane sums in order, and the 8 lanes are added as ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)).
# Every fused kernel below computes exactly this sequence of float32 operations, so a
# row's result does not depend on the batch size, the kernel chosen for it, or the number
# of threads. LoRA and bias are added last: y = (base + sum_t u[i, t] B[o, t]) + bias.

LANES = 8
ROWS_PER_TASK = 16  # output rows per parallel task (small-batch and generic kernels)
LUT_ROWS_PER_TASK = 256  # output rows per task of the batch-1 kernel (reuse of each table tile)


@inline_helper
def _lane_sum(a0, a1, a2, a3, a4, a5, a6, a7):
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@inline_helper
def _lane_dot(x, a, n):
    """sum_j x[j] * a[j] over j < n in the canonical 8-lane order."""
    l0 = l1 = l2 = l3 = l4 = l5 = l6 = l7 = np.float32(0.0)
    j = 0
    while j + 8 <= n:
        l0 += x[j] * a[j]
        l1 += x[j + 1] * a[j + 1]
        l2 += x[j + 2] * a[j + 2]
        l3 += x[j + 3] * a[j + 3]
        l4 += x[j + 4] * a[j + 4]
        l5 += x[j + 5] * a[j + 5]
        l6 += x[j + 6] * a[j + 6]
        l7 += x[j + 7] * a[j + 7]
        j += 8
    rem = n - j
    if rem > 0:
        l0 += x[j] * a[j]
    if rem > 1:
        l1 += x[j + 1] * a[j + 1]
    if rem > 2:
        l2 += x[j + 2] * a[j + 2]
    if rem > 3:
        l3 += x[j + 3] * a[j + 3]
    if rem > 4:
        l4 += x[j + 4] * a[j + 4]
    if rem > 5:
        l5 += x[j + 5] * a[j + 5]
    if rem > 6:
        l6 += x[j + 6] * a[j + 6]
    return _lane_sum(l0, l1, l2, l3, l4, l5, l6, l7)


@inline_helper
def _add_block(acc, lanes, scale):
    """acc[i] += scale * (canonical sum of the 8 lanes of row i), for every batch row."""
    for i in range(acc.size):
        acc[i] += scale * _lane_sum(lanes[0, i], lanes[1, i], lanes[2, i], lanes[3, i],
                                    lanes[4, i], lanes[5, i], lanes[6, i], lanes[7, i])


@kernel()
def lora_shrink(x2, lora_a, scale, u):
    """u[i, t] = scale * (x2[i] . lora_a[t]) in the canonical lane order. Serial: at most
    16 rows times the rank, too little work to pay for waking numba's threads (and a
    parallel build took twice as long to compile)."""
    n = x2.shape[0]
    r = lora_a.shape[0]
    k = x2.shape[1]
    for it in prange(n * r):
        i = it // r
        t = it % r
        u[i, t] = _scaled(scale, _lane_dot(x2[i], lora_a[t], k))


@inline_helper
def _scaled(scale, v):
    """scale * v, as ``_backward.scale_intermediate`` scales the shrink: with scale 0 the
    adapter adds nothing, also where v overflowed (inf * 0 is NaN: 0 instead)."""
    sv = scale * v
    if scale == 0 and sv != sv:
        sv = np.float32(0.0)
    return sv


@inline_helper
def simd_dots(x2, i, lora_a, v, lanes):
    """v[t] = x2[i] . lora_a[t] for every row t of lora_a, in :func:`_lane_dot`'s canonical
    8-lane order: the whole 8-element chunks in ``<8 x float>`` registers
    (``_simd.lane8_dots``, four rows of lora_a per pass over x2[i]), then the tail and the
    lane sum as :func:`_lane_dot` does them: the same operations in the same order, so the
    same bits. x2, lora_a C-contiguous; v: r floats; lanes: 8 * SIMD_LANE8_RANKS floats.
    SIMD machines only."""
    r = lora_a.shape[0]
    k = x2.shape[1]
    k8 = k - k % 8
    t0 = 0
    while t0 < r:
        nt = min(SIMD_LANE8_RANKS, r - t0)
        if nt == SIMD_LANE8_RANKS:
            _lane8_dots(x2, i * k, lora_a, t0 * k, k, k, lanes)
        else:
            for q in range(nt):
                _lane8_dot1(x2, i * k, lora_a, (t0 + q) * k, k, k, lanes[8 * q:])
        for q in range(nt):
            t = t0 + q
            b = 8 * q
            for j in range(k - k8):  # the tail, into lanes 0.. as _lane_dot adds it
                lanes[b + j] += x2[i, k8 + j] * lora_a[t, k8 + j]
            l0, l1, l2, l3 = lanes[b], lanes[b + 1], lanes[b + 2], lanes[b + 3]
            l4, l5, l6, l7 = lanes[b + 4], lanes[b + 5], lanes[b + 6], lanes[b + 7]
            v[t] = _lane_sum(l0, l1, l2, l3, l4, l5, l6, l7)
        t0 += nt


@kernel(cache=SIMD_CACHEABLE)
def lora_shrink_simd(x2, lora_a, scale, u):
    """:func:`lora_shrink` for C-contiguous x2 and lora_a on a SIMD machine, its dot
    products by :func:`simd_dots` (the same bits; the portable kernel ran one scalar
    multiply and add per element: 0.15 ms for 8 rows x rank 16 x 4096 against 0.024)."""
    r = lora_a.shape[0]
    v = np.empty(r, np.float32)
    lanes = np.empty(8 * SIMD_LANE8_RANKS, np.float32)
    for i in range(x2.shape[0]):
        simd_dots(x2, i, lora_a, v, lanes)
        for t in range(r):
            u[i, t] = _scaled(scale, v[t])


def shrink(x2, lora_a, scale, u):
    """u = scale * x2 lora_a^T in the canonical 8-lane order (:func:`lora_shrink`), with
    the SIMD build where the machine has one and both arrays are C-contiguous."""
    if SIMD_LANES and x2.flags.c_contiguous and lora_a.flags.c_contiguous:
        lora_shrink_simd(x2, lora_a, scale, u)
    else:
        lora_shrink(x2, lora_a, scale, u)


@inline_helper
def _rank_sum(u, i, lora_b, o):
    """sum over t of u[i, t] * lora_b[o, t], the rank terms in order from zero (multiply,
    then add): the LoRA expand of one output, in the order every expand keeps."""
    lo = np.float32(0.0)
    for t in range(u.shape[1]):
        lo += u[i, t] * lora_b[o, t]
    return lo


@inline_helper
def _finish(base, u, i, lora_b, o, bias, use_bias):
    v = base + _rank_sum(u, i, lora_b, o)
    if use_bias:
        v += bias[o]
    return v


@kernel(cache=SIMD_CACHEABLE)
def _b_block(lora_b, q, blk, bq):
    """Block bq of blk = output vector q's block of B^T: blk[(bq r + t) L + l] = lora_b[q L
    + l, t] for t < r, l < L = ``_simd.LANES``. 8 x 8 pieces transposed in registers
    (``_simd.transpose8``), ranks past the last whole 8 element by element. A copy: every
    bit is kept. A function of its own, called (not inlined) by the kernels that use it:
    compiled once instead of into each of them (inlined, it added 0.4-0.6 s to the cold
    compile of each NF4 product)."""
    r = lora_b.shape[1]
    r8 = r - r % 8
    src = lora_b.reshape(-1)
    for h in range(0, _LANES, 8):
        for t0 in range(0, r8, 8):
            transpose8(src, (q * _LANES + h) * r + t0, r, blk, (bq * r + t0) * _LANES + h, _LANES)
    for t in range(r8, r):
        for lane in range(_LANES):
            blk[(bq * r + t) * _LANES + lane] = lora_b[q * _LANES + lane, t]


@kernel(cache=SIMD_CACHEABLE)
def b_blocks(lora_b, blk):
    """blk[q, t, l] = lora_b[q L + l, t] for the whole vectors of L = ``_simd.LANES``
    outputs (q < out // L): B^T in blocks of L outputs, each block's r vectors contiguous,
    so the expand in registers (``_simd.expand_x4`` ..) reads them one after the other
    (B^T of shape (r, out) put every vector of a block 4 * out bytes apart: with out 4096
    those share one set of the L1 cache and missed it, 26 us at 8 rows against 36 for the
    element loop). Each block by :func:`_b_block`. lora_b: (out, r) float32,
    C-contiguous; blk: flat, at least (out // L) * r * L. For large batches, whose groups
    of rows each walk all of B^T; a few rows transpose each block just before using it
    (:func:`_expand_vectors_fused`)."""
    for q in range(lora_b.shape[0] // _LANES):
        _b_block(lora_b, q, blk, q)


def expand_ok(lora_b, y) -> bool:
    """Whether the expand in registers (:func:`_expand_vectors`) applies: the SIMD build,
    B and the output C-contiguous."""
    return bool(SIMD_LANES) and lora_b.flags.c_contiguous and y.flags.c_contiguous


def b_blocks_of(lora_b, name="nf4.bblk"):
    """:func:`b_blocks` of lora_b into the calling thread's scratch buffer ``name``
    (numlora._scratch: valid until this thread's next use of the name)."""
    out, r = lora_b.shape
    blk = scratch(name, max(1, out // _LANES * r * _LANES), np.float32)
    b_blocks(lora_b, blk)
    return blk


@inline_helper
def _expand_groups(c, c0, m, blk, bq, y, q, y0):
    """y[y0 + g, q L + l] += sum over t of c[c0 + g, t] * B[q L + l, t] for g < m and the
    q-th vector of L = ``_simd.LANES`` outputs, in :func:`_finish`'s order (rank terms from
    zero, multiply then add; the same bits): the sums in registers for groups of up to four
    rows (``_simd.expand_x4`` .. ``expand_x1``), each of B^T's vectors (block bq of blk,
    :func:`b_blocks`' layout) loaded once per group. c, y C-contiguous."""
    g = 0
    while g + 4 <= m:
        expand_x4(c, c0 + g, blk, bq, y, q, y0 + g)
        g += 4
    if m - g == 3:
        expand_x3(c, c0 + g, blk, bq, y, q, y0 + g)
    elif m - g == 2:
        expand_x2(c, c0 + g, blk, bq, y, q, y0 + g)
    elif m - g == 1:
        expand_x1(c, c0 + g, blk, bq, y, q, y0 + g)


@inline_helper
def _expand_vectors(c, c0, m, blk, q0, q1, y, y0):
    """:func:`_expand_groups` for the vectors q0 <= q < q1, blk holding all of B^T's
    blocks (:func:`b_blocks`): for large batches, whose groups of rows each walk all of
    them."""
    for q in range(q0, q1):
        _expand_groups(c, c0, m, blk, q, y, q, y0)


@inline_helper
def _expand_vectors_fused(c, c0, m, lora_b, room, q0, q1, y, y0):
    """:func:`_expand_vectors` for a few rows: each vector's block of B^T transposed into
    ``room`` (:func:`_block_room`, one block: in L1) just before its rows use it
    (:func:`_b_block`): no pass over B before the expand, no (out x r) buffer written and
    read back (for a few rows that pass costs as much as the expand: 1 row of 4096 x 16,
    7 of the 14 us in cache, 28 of 81 after a base product that evicted B; AMD EPYC). A
    helper of its own, not a flag: each kernel compiles only the form it runs."""
    for q in range(q0, q1):
        _b_block(lora_b, q, room, 0)
        _expand_groups(c, c0, m, room, 0, y, q, y0)


@inline_helper
def _expand_rest(c, c0, m, lora_b, y, y0, whole):
    """The outputs from ``whole`` on (past the whole vectors) element by element from B's
    rows, in :func:`_finish`'s order."""
    for g in range(m):
        for o in range(whole, y.shape[1]):
            y[y0 + g, o] += _rank_sum(c, c0 + g, lora_b, o)


@inline_helper
def _expand_rows_simd(c, c0, m, blk, lora_b, y, y0):
    """y[y0 + g] += sum over t of c[c0 + g, t] * lora_b[:, t] for g < m: the whole vectors
    of outputs by :func:`_expand_vectors` on :func:`b_blocks`' blk, the rest by
    :func:`_expand_rest` (the same bits)."""
    whole = y.shape[1] - y.shape[1] % _LANES
    _expand_vectors(c, c0, m, blk, 0, whole // _LANES, y, y0)
    _expand_rest(c, c0, m, lora_b, y, y0, whole)


@inline_helper
def _expand_rows_fused(c, c0, m, room, lora_b, y, y0):
    """:func:`_expand_rows_simd` by :func:`_expand_vectors_fused` (room: one block's)."""
    whole = y.shape[1] - y.shape[1] % _LANES
    _expand_vectors_fused(c, c0, m, lora_b, room, 0, whole // _LANES, y, y0)
    _expand_rest(c, c0, m, lora_b, y, y0, whole)


@inline_helper
def _block_room(u):
    """Room for one vector's block of B^T (:func:`_expand_vectors_fused`); u: (n, r)."""
    return np.empty(max(1, u.shape[1] * _LANES), np.float32)


@inline_helper
def _finish_rows(res, o0, nr, u, blk, vec, lora_b, bias, use_bias, y):
    """y[i, o0 + oo] = :func:`_finish` (res[oo, i], ...) for oo < nr and every row i: with
    ``vec`` (u, y C-contiguous, o0 a multiple of ``_simd.LANES``) and a LoRA branch, the
    expand of the task's whole vectors of outputs in registers (:func:`_expand_vectors_fused`,
    each vector's block of B^T transposed into blk (:func:`_block_room`) just before), then
    the bias: the same operations in the same order, the same bits; the rest element by
    element."""
    n = y.shape[0]
    r = u.shape[1]
    whole = nr - nr % _LANES if vec and r > 0 else 0
    if whole > 0:
        for oo in range(whole):
            for i in range(n):
                y[i, o0 + oo] = res[oo, i]
        _expand_vectors_fused(u, 0, n, lora_b, blk, o0 // _LANES, (o0 + whole) // _LANES, y, 0)
        if use_bias:
            for i in range(n):
                for oo in range(whole):
                    y[i, o0 + oo] += bias[o0 + oo]
    for oo in range(whole, nr):
        for i in range(n):
            y[i, o0 + oo] = _finish(res[oo, i], u, i, lora_b, o0 + oo, bias, use_bias)


@kernel(parallel=True, work=product_work, serial_below=PRODUCT_SERIAL_BELOW)
def nf4_gemv_lut(packed, scales, blocksize, code, x, u, lora_b, bias, use_bias, y):
    """Batch-1 fused NF4 GEMV (+ LoRA expand, + bias) for ``in % blocksize == 0`` and an
    even blocksize. For every input pair (j, j+1) a 256-entry table
    ``T[byte] = code[hi] * x[j] + code[lo] * x[j+1]`` turns each byte of W into one load
    and one add. Each task takes 256 output rows and walks the blocks in order, so one
    block's tables (32 KiB at blocksize 64) stay in L1 while all its rows use them.
    u: (1, r) already scaled LoRA intermediate; y: (out,)."""
    in_f = x.size
    out_f = y.size
    npairs = in_f // 2
    table = np.empty((npairs, 256), np.float32)
    for p in prange(npairs):
        x0 = x[2 * p]
        x1 = x[2 * p + 1]
        tp = table[p]
        for b in range(256):
            tp[b] = code[b >> 4] * x0 + code[b & 15] * x1
    bpr = in_f // blocksize
    ppb = blocksize // 2
    ntasks = (out_f + LUT_ROWS_PER_TASK - 1) // LUT_ROWS_PER_TASK
    for task in prange(ntasks):
        o0 = task * LUT_ROWS_PER_TASK
        o1 = min(out_f, o0 + LUT_ROWS_PER_TASK)
        acc = np.zeros(o1 - o0, np.float32)
        for blk in range(bpr):
            tb = table[blk * ppb:(blk + 1) * ppb]
            for oo in range(o1 - o0):
                o = o0 + oo
                start = o * npairs + blk * ppb
                pk = packed[start:start + ppb]
                l0 = l1 = l2 = l3 = l4 = l5 = l6 = l7 = np.float32(0.0)
                q = 0
                while q + 8 <= ppb:
                    l0 += tb[q, pk[q]]
                    l1 += tb[q + 1, pk[q + 1]]
                    l2 += tb[q + 2, pk[q + 2]]
                    l3 += tb[q + 3, pk[q + 3]]
                    l4 += tb[q + 4, pk[q + 4]]
                    l5 += tb[q + 5, pk[q + 5]]
                    l6 += tb[q + 6, pk[q + 6]]
                    l7 += tb[q + 7, pk[q + 7]]
                    q += 8
                rem = ppb - q
                if rem > 0:
                    l0 += tb[q, pk[q]]
                if rem > 1:
                    l1 += tb[q + 1, pk[q + 1]]
                if rem > 2:
                    l2 += tb[q + 2, pk[q + 2]]
                if rem > 3:
                    l3 += tb[q + 3, pk[q + 3]]
                if rem > 4:
                    l4 += tb[q + 4, pk[q + 4]]
                if rem > 5:
                    l5 += tb[q + 5, pk[q + 5]]
                if rem > 6:
                    l6 += tb[q + 6, pk[q + 6]]
                acc[oo] += scales[o * bpr + blk] * _lane_sum(l0, l1, l2, l3, l4, l5, l6, l7)
        for oo in range(o1 - o0):
            y[o0 + oo] = _finish(acc[oo], u, 0, lora_b, o0 + oo, bias, use_bias)


@kernel(parallel=True, work=product_work, serial_below=PRODUCT_SERIAL_BELOW)
def nf4_gemm_pairs(packed, scales, blocksize, code, xt, u, lora_b, bias, use_bias, y):
    """Fused NF4 matmul for a small batch (same conditions and the same arithmetic as
    :func:`nf4_gemv_lut`): each byte of W is decoded once and used for every row of the
    batch. xt: (in, n) = x^T, C-contiguous (so the inner loop runs over the batch);
    u: (n, r); y: (n, out)."""
    in_f, n = xt.shape
    out_f = y.shape[1]
    npairs = in_f // 2
    bpr = in_f // blocksize
    ppb = blocksize // 2
    ntasks = (out_f + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(ntasks):
        o0 = task * ROWS_PER_TASK
        o1 = min(out_f, o0 + ROWS_PER_TASK)
        lanes = np.empty((LANES, n), np.float32)
        acc = np.empty(n, np.float32)
        for oo in range(o1 - o0):
            o = o0 + oo
            acc[:] = 0
            prow = packed[o * npairs:(o + 1) * npairs]
            for blk in range(bpr):
                lanes[:, :] = 0
                pk = prow[blk * ppb:(blk + 1) * ppb]
                xb = xt[blk * blocksize:(blk + 1) * blocksize]
                for q in range(ppb):
                    byte = pk[q]
                    chi = code[byte >> 4]
                    clo = code[byte & 15]
                    xa = xb[2 * q]
                    xc = xb[2 * q + 1]
                    lane = lanes[q & 7]
                    for i in range(n):
                        lane[i] += chi * xa[i] + clo * xc[i]
                _add_block(acc, lanes, scales[o * bpr + blk])
            for i in range(n):
                y[i, o] = _finish(acc[i], u, i, lora_b, o, bias, use_bias)


@kernel(parallel=True, work=product_work, serial_below=PRODUCT_SERIAL_BELOW)
def nf4_gemm_any(packed, scales, blocksize, code, xt, u, lora_b, bias, use_bias, y):
    """Fused NF4 matmul for any shape and blocksize (blocks may span rows, start mid-byte):
    element by element, each segment (block within a row) summed in the canonical lane
    order. Used for every batch size when the fast pairwise layout does not apply."""
    in_f, n = xt.shape
    out_f = y.shape[1]
    ntasks = (out_f + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(ntasks):
        o0 = task * ROWS_PER_TASK
        o1 = min(out_f, o0 + ROWS_PER_TASK)
        lanes = np.empty((LANES, n), np.float32)
        acc = np.empty(n, np.float32)
        for o in range(o0, o1):
            acc[:] = 0
            start = o * in_f
            end = start + in_f
            k = start
            while k < end:
                blk = k // blocksize
                seg_end = min(end, (blk + 1) * blocksize)
                lanes[:, :] = 0
                for kk in range(k, seg_end):
                    byte = packed[kk >> 1]
                    c = code[byte >> 4] if (kk & 1) == 0 else code[byte & 15]
                    j = kk - start
                    lane = lanes[(kk - k) & 7]
                    for i in range(n):
                        lane[i] += c * xt[j, i]
                _add_block(acc, lanes, scales[blk])
                k = seg_end
            for i in range(n):
                y[i, o] = _finish(acc[i], u, i, lora_b, o, bias, use_bias)


_TCHUNK = 256  # input columns per parallel task of the transposed product


@kernel(parallel=True, work=product_work, serial_below=PRODUCT_SERIAL_BELOW)
def nf4_matmul_t(packed, scales, blocksize, code, g, out):
    """out = g deq(W) (the input gradient of y = x deq(W)^T), fused: W (out_f, in_f) is
    decoded one row segment at a time and never held whole. g: (n, out_f), out: (n, in_f),
    overwritten. Parallel over column chunks; each out[i, j] sums over o in order."""
    n, out_f = g.shape
    in_f = out.shape[1]
    nchunks = (in_f + _TCHUNK - 1) // _TCHUNK
    for c in prange(nchunks):
        j0 = c * _TCHUNK
        j1 = min(in_f, j0 + _TCHUNK)
        wrow = np.empty(j1 - j0, np.float32)
        for i in range(n):
            for j in range(j0, j1):
                out[i, j] = 0
        for o in range(out_f):
            base = o * in_f
            for j in range(j0, j1):
                kk = base + j
                byte = np.int64(packed[kk >> 1])
                nib = (byte >> 4) if (kk & 1) == 0 else (byte & 15)
                wrow[j - j0] = code[nib] * scales[kk // blocksize]
            for i in range(n):
                gv = g[i, o]
                for j in range(j0, j1):
                    out[i, j] += gv * wrow[j - j0]


# --- SIMD paths (AVX-512 / AVX2 permute decode, see _simd.py) --------------------------------
#
# Used when SIMD_LANES > 0, blocksize % SIMD_LANES == 0 and rows hold whole blocks. Every
# batch row of every call goes through the same row_dot (or, where the word decode applies,
# the same dot_words arithmetic), so results are bit-identical whatever the batch size (up
# to the fused limit) and thread count on a given machine. Rows left over after the batch
# groups (all rows of a GEMV) run several weight rows per call: independent accumulations
# keep the vector units busy where one row alone would wait on its own adds.


SIMD_ROWS = 16  # output rows per parallel task of the SIMD matmul
SIMD_WORDS_CHUNK = _words_chunk(SIMD_LANES)  # weights per chunk of the word decode (8 * lanes)


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=product_work, serial_below=PRODUCT_SERIAL_BELOW)
def nf4_matmul_simd(packed, scales, blocksize, code, xe, xo, u, vec, lora_b, bias, use_bias, y):
    """y[i, o] = row o of deq(W) . x[i] (+ LoRA expand of u, + bias), decoding W with
    SIMD permutes. xe, xo: the even and odd columns of x, each (n, in / 2) C-contiguous;
    y: (n, out); vec: :func:`_finish_rows`' (whether to expand in registers)."""
    n, half = xe.shape
    out_f = y.shape[1]
    bpr = 2 * half // blocksize
    ntasks = (out_f + SIMD_ROWS - 1) // SIMD_ROWS
    ngroups = n // SIMD_GROUP
    for task in prange(ntasks):
        o0 = task * SIMD_ROWS
        o1 = min(out_f, o0 + SIMD_ROWS)
        nr = o1 - o0
        ptask = packed[o0 * half:o1 * half]
        stask = scales[o0 * bpr:o1 * bpr]
        res = np.empty((nr, n), np.float32)
        rbuf = np.empty(n, np.float32)
        blk = _block_room(u)
        for oo in range(nr):
            prow = ptask[oo * half:(oo + 1) * half]
            srow = stask[oo * bpr:(oo + 1) * bpr]
            for g in range(ngroups):  # SIMD_GROUP batch rows per decode of the weight row
                rows_dot(prow, xe, xo, g * SIMD_GROUP, srow, code, blocksize, rbuf)
            for i in range(ngroups * SIMD_GROUP):
                res[oo, i] = rbuf[i]
        wbuf = np.empty(nr, np.float32)
        for i in range(ngroups * SIMD_GROUP, n):  # the rest: SIMD_WROWS weight rows at a time
            xei = xe[i]
            xoi = xo[i]
            oo = 0
            while oo + SIMD_WROWS <= nr:
                wrows_dot(ptask, oo, xei, xoi, stask, code, blocksize, wbuf)
                oo += SIMD_WROWS
            while oo < nr:
                wbuf[oo] = row_dot(ptask[oo * half:(oo + 1) * half], xei, xoi, stask[oo * bpr:(oo + 1) * bpr], code,
                                   blocksize)
                oo += 1
            for oo in range(nr):
                res[oo, i] = wbuf[oo]
        _finish_rows(res, o0, nr, u, blk, vec, lora_b, bias, use_bias, y)


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=product_work, serial_below=PRODUCT_SERIAL_BELOW, team=True)
def nf4_matmul_words(packed, scales, blocksize, code, xp, u, vec, lora_b, bias, use_bias, y, flags, nslot):
    """y[i, o] = row o of deq(W) . x[i] (+ LoRA expand of u, + bias) with the word decode
    of ``_simd.dot_words`` (where ``words_ok``): xp is x reordered per chunk as described
    there, (n, in) C-contiguous; y: (n, out); vec: :func:`_finish_rows`'. Batch rows
    in groups of SIMD_WORDS_NX, the rest as one smaller group, SIMD_WORDS_GROUP_NW[group
    size] weight rows per decode (``_simd.words_x4`` .. ``words_x1``): every (o, i) gets
    the same operations, so results do not depend on the batch size or the thread count.
    A team kernel (``kernels._team``): each of numba's threads takes a contiguous share of
    the tasks (``flags``, ``nslot``: appended by the kernel's wrapper)."""
    n = xp.shape[0]
    out_f = y.shape[1]
    ntasks = (out_f + SIMD_ROWS - 1) // SIMD_ROWS
    ngroups = (n + SIMD_WORDS_NX - 1) // SIMD_WORDS_NX
    for slot in prange(nslot):
        res_buf = np.empty((SIMD_ROWS, n), np.float32)
        buf = np.empty(SIMD_WORDS_BUF, np.float32)
        blk = _block_room(u)
        lo, hi = slot_range(slot, nslot, ntasks)
        for task in range(lo, hi):
            o0 = task * SIMD_ROWS
            o1 = min(out_f, o0 + SIMD_ROWS)
            nr = o1 - o0
            res = res_buf[:nr]
            for g in range(ngroups):
                i0 = g * SIMD_WORDS_NX
                nx = min(SIMD_WORDS_NX, n - i0)
                nw = SIMD_WORDS_GROUP_NW[nx]
                oo = 0
                while oo + nw <= nr:
                    if nx == 4:
                        words_x4(packed, o0 + oo, xp, i0, scales, code, blocksize, buf)
                    elif nx == 3:
                        words_x3(packed, o0 + oo, xp, i0, scales, code, blocksize, buf)
                    elif nx == 2:
                        words_x2(packed, o0 + oo, xp, i0, scales, code, blocksize, buf)
                    else:
                        words_x1(packed, o0 + oo, xp, i0, scales, code, blocksize, buf)
                    for a in range(nw):
                        for q in range(nx):
                            res[oo + a, i0 + q] = buf[a * nx + q]
                    oo += nw
                while oo < nr:  # the last task's rows short of nw
                    for q in range(nx):
                        words_one(packed, o0 + oo, xp, i0 + q, scales, code, blocksize, buf)
                        res[oo, i0 + q] = buf[0]
                    oo += 1
            _finish_rows(res, o0, nr, u, blk, vec, lora_b, bias, use_bias, y)
        slot_done(flags, slot, nslot)


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=product_work, serial_below=PRODUCT_SERIAL_BELOW, team=True)
def nf4_matmul_t_words(packed, scales, blocksize, code, g, out, flags, nslot):
    """:func:`nf4_matmul_t` with the word decode (where ``words_ok``): parallel over
    chunks of 8 * SIMD_LANES columns; per chunk, input rows in pairs (an odd last row
    alone, ``_simd.t_words2`` / ``t_words1``), each walking every weight row with the
    column sums in registers. The same float32 operations in the same order as the
    portable kernel: bit-identical to it. A team kernel (``kernels._team``: each of
    numba's threads a contiguous share of the chunks; ``flags``, ``nslot`` appended by
    the wrapper)."""
    n = g.shape[0]
    in_f = out.shape[1]
    width = SIMD_WORDS_CHUNK
    for slot in prange(nslot):
        buf = np.empty(SIMD_T_WORDS_NX * width, np.float32)
        lo, hi = slot_range(slot, nslot, in_f // width)
        for c in range(lo, hi):
            i0 = 0
            while i0 < n:
                nx = min(SIMD_T_WORDS_NX, n - i0)
                if nx == 2:
                    t_words2(packed, c, g, i0, scales, code, blocksize, buf)
                else:
                    t_words1(packed, c, g, i0, scales, code, blocksize, buf)
                for q in range(nx):
                    orow = out[i0 + q]
                    for k in range(8):
                        for lane in range(SIMD_LANES):
                            orow[c * width + 8 * lane + k] = buf[q * width + k * SIMD_LANES + lane]
                i0 += nx
        slot_done(flags, slot, nslot)


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=product_work, serial_below=PRODUCT_SERIAL_BELOW)
def nf4_matmul_t_simd(packed, scales, blocksize, code, g, out):
    """:func:`nf4_matmul_t` for ``in % blocksize == 0`` and ``blocksize % SIMD_LANES == 0``,
    each row segment decoded with SIMD permutes into a small buffer (in L1): the same
    float32 operations in the same order, so bit-identical to it. Parallel over column
    chunks of whole blocks (about _TCHUNK columns); each out[i, j] sums over o in order."""
    n, out_f = g.shape
    in_f = out.shape[1]
    bpr = in_f // blocksize
    bpt = max(1, _TCHUNK // blocksize)
    half = blocksize // 2
    nchunks = (bpr + bpt - 1) // bpt
    for c in prange(nchunks):
        b0 = c * bpt
        b1 = min(bpr, b0 + bpt)
        j0 = b0 * blocksize
        width = (b1 - b0) * blocksize
        acc = np.zeros((n, width), np.float32)
        wbuf = np.empty((4, width), np.float32)
        w0 = wbuf[0]
        w1 = wbuf[1]
        w2 = wbuf[2]
        w3 = wbuf[3]
        o = 0
        while o + 4 <= out_f:  # four rows of W per pass over acc (fewer loads and stores of it)
            for r in range(4):
                ob = (o + r) * bpr
                decode_blocks(packed[(ob + b0) * half:(ob + b1) * half], scales[ob + b0:ob + b1], code, blocksize,
                              wbuf[r])
            for i in range(n):
                g0 = g[i, o]
                g1 = g[i, o + 1]
                g2 = g[i, o + 2]
                g3 = g[i, o + 3]
                arow = acc[i]
                for j in range(width):
                    v = arow[j]
                    v += g0 * w0[j]
                    v += g1 * w1[j]
                    v += g2 * w2[j]
                    v += g3 * w3[j]
                    arow[j] = v
            o += 4
        while o < out_f:
            ob = o * bpr
            decode_blocks(packed[(ob + b0) * half:(ob + b1) * half], scales[ob + b0:ob + b1], code, blocksize, w0)
            for i in range(n):
                g0 = g[i, o]
                arow = acc[i]
                for j in range(width):
                    arow[j] += g0 * w0[j]
            o += 1
        for i in range(n):
            orow = out[i, j0:j0 + width]
            arow = acc[i]
            for j in range(width):
                orow[j] = arow[j]


_DECODE_BLOCKS_PER_TASK = 256


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=last_size, serial_below=DECODE_SERIAL_BELOW)
def nf4_decode_simd(packed, scales, blocksize, code, b0, b1, out):
    """out = deq of blocks [b0, b1) (out starts at block b0): SIMD decode, parallel,
    streaming stores (for a whole dequantized weight, far larger than the caches)."""
    nb = b1 - b0
    ntasks = (nb + _DECODE_BLOCKS_PER_TASK - 1) // _DECODE_BLOCKS_PER_TASK
    half = blocksize // 2
    for task in prange(ntasks):
        lo = task * _DECODE_BLOCKS_PER_TASK
        hi = min(nb, lo + _DECODE_BLOCKS_PER_TASK)
        decode_blocks_stream(packed[(b0 + lo) * half:(b0 + hi) * half], scales[b0 + lo:b0 + hi], code, blocksize,
                             out[lo * blocksize:hi * blocksize])


@kernel(cache=SIMD_CACHEABLE)
def nf4_decode_simd_tile(packed, scales, blocksize, code, b0, b1, out):
    """Serial SIMD decode of blocks [b0, b1) into a tile that BLAS reads next. An aligned
    tile gets streaming stores: BLAS's other threads read the tile of the last call (in
    their caches), and on a CPU whose cores sit on different chiplets every ordinary
    store into those lines first fetched them back (measured on a 2-vCPU AMD EPYC VM:
    the 8 tiles of a 4096 x 4096 weight 14.5 ms after BLAS read them, 2.8 ms streamed;
    1.6 ms where the cores share a cache). Same values either way."""
    half = blocksize // 2
    o = out[:(b1 - b0) * blocksize]
    if o.ctypes.data % STREAM_ALIGN == 0:
        decode_blocks_stream_aligned(packed[b0 * half:b1 * half], scales[b0:b1], code, blocksize, o)
        store_fence()
    else:
        decode_blocks(packed[b0 * half:b1 * half], scales[b0:b1], code, blocksize, o)


#: Input rows per pass over the panels of :func:`nf4_matmul_panels` at most (a batch
#: runs in as few passes as that allows, of equal whole numbers of PANEL_MR rows): a
#: pass's inputs, up to PANEL_MC x PANEL_KC float32, stay in L2 while each panel is
#: decoded once per pass.
PANEL_MC = 192


def _panels_work(packed, scales, blocksize, code, xpack, counter, y, ws) -> int:
    """The work of :func:`nf4_matmul_panels`, as ``_jit.product_work`` counts it."""
    return product_work(packed, y)


@inline_helper
def _worker_panel(raw):
    """A worker's panel buffer: PANEL_KC * PANEL_NR floats of its row of the scratch,
    from a 64-byte boundary (the micro-kernel's aligned loads)."""
    off = ((64 - raw.ctypes.data % 64) % 64) // 4
    return raw[off:off + PANEL_KC * PANEL_NR]


@inline_helper
def _pass_rows(n):
    """Input rows per pass: as few passes of at most PANEL_MC rows as hold n, of equal
    whole numbers of PANEL_MR rows."""
    npass = (n + PANEL_MC - 1) // PANEL_MC
    return ((n + npass - 1) // npass + PANEL_MR - 1) // PANEL_MR * PANEL_MR


@inline_helper
def _panel_groups(xflat, in_f, panel, kn, y, g0, g1, n, p, k0):
    """Groups g0 .. g1 - 1 of PANEL_MR input rows times panel p (columns k0 .. k0 + kn -
    1) into y: stored for the first column block (k0 == 0), added after; the last group's
    micro-kernel sized to its rows (the same chains)."""
    for g in range(g0, g1):
        rows = min(PANEL_MR, n - g * PANEL_MR)
        xo = (g * in_f + k0) * PANEL_MR
        if rows == 1:
            panel_mk1(xflat, xo, panel, kn, y, g * PANEL_MR, p * PANEL_NR, rows, k0)
        elif rows == 2:
            panel_mk2(xflat, xo, panel, kn, y, g * PANEL_MR, p * PANEL_NR, rows, k0)
        elif rows <= 4:
            panel_mk4(xflat, xo, panel, kn, y, g * PANEL_MR, p * PANEL_NR, rows, k0)
        else:
            panel_mk(xflat, xo, panel, kn, y, g * PANEL_MR, p * PANEL_NR, rows, k0)


#: Panels per task of :func:`nf4_matmul_panels`: a task decodes its panels block after
#: block of columns, each block's inputs (in L2) read for all of them.
PANEL_TASK = 8


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=_panels_work, serial_below=PRODUCT_SERIAL_BELOW)
def nf4_matmul_panels(packed, scales, blocksize, code, xpack, counter, y, ws):
    """y = x deq(W)^T for large batches, with W decoded once per pass and never whole:
    for each pass of up to PANEL_MC input rows and each block of PANEL_KC columns, each
    panel of PANEL_NR weight rows is decoded and transposed into the worker's L2-resident
    buffer (``_simd.panel_decode``) and multiplied by the pass's groups of PANEL_MR input
    rows (``_simd.panel_mk``: a register-blocked GEMM micro-kernel, fused multiply-adds in
    order of the column). y[i, o]: the column blocks' chains summed in
    order, the first stored, so the same operations for every (i, o) whatever the batch
    size and the thread count. The threads take tasks (a pass's PANEL_TASK panels, all
    their column blocks) as they come (``_team.claim`` on ``counter``, one int64 zero):
    a thread that shares its core with another program's (OpenBLAS's spinning workers
    after a numpy product) takes fewer. xpack: (groups, in, PANEL_MR), x's rows
    interleaved by :func:`pack_panel_rows`; ws: (workers, >= PANEL_KC * PANEL_NR + 16)
    float32 scratch. out % PANEL_NR == 0, in % blocksize == 0, blocksize % SIMD_LANES ==
    0."""
    n, out_f = y.shape
    ng, in_f = xpack.shape[0], xpack.shape[1]
    xflat = xpack.reshape(-1)
    npanel = out_f // PANEL_NR
    mc = _pass_rows(n)
    per_pass = (npanel + PANEL_TASK - 1) // PANEL_TASK  # tasks run pass after pass
    ntasks = (n + mc - 1) // mc * per_pass
    for w in prange(ws.shape[0]):
        panel = _worker_panel(ws[w])
        c = claim(counter)
        while c < ntasks:
            g0 = c // per_pass * mc // PANEL_MR  # the pass's first group of input rows
            g1 = min(ng, g0 + mc // PANEL_MR)
            p0 = c % per_pass * PANEL_TASK
            for k0 in range(0, in_f, PANEL_KC):
                kn = min(PANEL_KC, in_f - k0)
                for p in range(p0, min(npanel, p0 + PANEL_TASK)):
                    panel_decode(packed, scales, code, blocksize, in_f, p * PANEL_NR, k0, kn, panel)
                    _panel_groups(xflat, in_f, panel, kn, y, g0, g1, n, p, k0)
            c = claim(counter)


def _dense_panels_work(w, xpack, counter, y, ws) -> int:
    """The work of :func:`dense_matmul_panels` (weight elements times output rows)."""
    return w.size * y.shape[0]


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=_dense_panels_work, serial_below=PRODUCT_SERIAL_BELOW)
def dense_matmul_panels(w, xpack, counter, y, ws):
    """y = x W^T for a dense float32 (out, in) ``w``: :func:`nf4_matmul_panels` with each
    panel copied from W (8 x 8 blocks transposed in registers, ``_simd.transpose8``: every
    bit kept) instead of decoded. The same micro-kernels, so the same property: each
    y[i, o] the same operations whatever the batch size, the row's position and the
    thread count (the row-stable bank's dense base where BLAS's rows depend on their
    position). out % PANEL_NR == 0, in % 8 == 0; xpack, counter, ws as there."""
    n, out_f = y.shape
    ng, in_f = xpack.shape[0], xpack.shape[1]
    xflat = xpack.reshape(-1)
    wflat = w.reshape(-1)
    npanel = out_f // PANEL_NR
    mc = _pass_rows(n)
    per_pass = (npanel + PANEL_TASK - 1) // PANEL_TASK
    ntasks = (n + mc - 1) // mc * per_pass
    for wk in prange(ws.shape[0]):
        panel = _worker_panel(ws[wk])
        c = claim(counter)
        while c < ntasks:
            g0 = c // per_pass * mc // PANEL_MR
            g1 = min(ng, g0 + mc // PANEL_MR)
            p0 = c % per_pass * PANEL_TASK
            for k0 in range(0, in_f, PANEL_KC):
                kn = min(PANEL_KC, in_f - k0)
                for p in range(p0, min(npanel, p0 + PANEL_TASK)):
                    for t0 in range(0, kn, 8):  # panel[t * NR + j] = W[p NR + j, k0 + t]
                        for h in range(0, PANEL_NR, 8):
                            transpose8(wflat, (p * PANEL_NR + h) * in_f + k0 + t0, in_f, panel, t0 * PANEL_NR + h,
                                       PANEL_NR)
                    _panel_groups(xflat, in_f, panel, kn, y, g0, g1, n, p, k0)
            c = claim(counter)


#: Outputs per task of :func:`dense_matmul_rows` (four calls of 32).
ROWS_TASK = 128


def _dense_rows_work(w, x, y) -> int:
    """The work of :func:`dense_matmul_rows` (weight elements times output rows)."""
    return w.size * y.shape[0]


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=_dense_rows_work, serial_below=PRODUCT_SERIAL_BELOW)
def dense_matmul_rows(w, x, y):
    """y = x W^T with :func:`dense_matmul_panels`' operations (the same bits, each
    y[i, o] a chain of fused multiply-adds per column block of PANEL_KC, the blocks
    summed in order) for a few rows: W's rows read as they lie and transposed in
    registers (``_simd.gemv_t4``: 32 outputs, four chains), no panel copied and no
    micro-kernel of PANEL_MR rows for one. w: (out, in) float32 C-contiguous, out %
    PANEL_NR == 0, in % 8 == 0; x: (n, in), y: (n, out) C-contiguous."""
    n, out_f = y.shape
    in_f = w.shape[1]
    wflat = w.reshape(-1)
    xflat = x.reshape(-1)
    yflat = y.reshape(-1)
    for task in prange((out_f + ROWS_TASK - 1) // ROWS_TASK):
        o1 = min(out_f, (task + 1) * ROWS_TASK)
        for k0 in range(0, in_f, PANEL_KC):
            kn = min(PANEL_KC, in_f - k0)
            o = task * ROWS_TASK
            while o < o1:
                m = o1 - o
                step = 32 if m >= 32 else (16 if m >= 16 else 8)
                for i in range(n):
                    if step == 32:
                        gemv_t4(wflat, o * in_f + k0, in_f, xflat, i * in_f + k0, kn, yflat, i * out_f + o, k0)
                    elif step == 16:
                        gemv_t2(wflat, o * in_f + k0, in_f, xflat, i * in_f + k0, kn, yflat, i * out_f + o, k0)
                    else:
                        gemv_t1(wflat, o * in_f + k0, in_f, xflat, i * in_f + k0, kn, yflat, i * out_f + o, k0)
                o += step


@kernel(cache=SIMD_CACHEABLE)
def words_reorder(x, xp):
    """xp[i, c C + m L + l] = x[i, c C + 8 l + m] (L = SIMD_LANES, C = 8 L, for every
    chunk c of C columns): the input operand of :func:`nf4_matmul_words`. x: (n, in)
    C-contiguous float32, in % C == 0; xp: the same shape. A plain serial loop: at the
    batch sizes that take the word decode (at most 16 rows) numpy's strided copy of the
    same reordering took 7-20 us of a 0.33 ms GEMV (4096 columns)."""
    n, in_f = x.shape
    width = 8 * SIMD_LANES
    for i in range(n):
        src = x[i]
        dst = xp[i]
        for c0 in range(0, in_f - in_f % width, width):
            for m in range(8):
                for lane in range(SIMD_LANES):
                    dst[c0 + m * SIMD_LANES + lane] = src[c0 + 8 * lane + m]


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=first_size, serial_below=ELEMENTWISE_SERIAL_BELOW)
def pack_panel_rows(x, xpack):
    """xpack[g, k, m] = x[g * PANEL_MR + m, k], zero past x's last row: the input operand
    of :func:`nf4_matmul_panels`."""
    n, in_f = x.shape
    for g in prange(xpack.shape[0]):
        dst = xpack[g]
        for m in range(PANEL_MR):
            i = g * PANEL_MR + m
            if i < n:
                src = x[i]
                for k in range(in_f):
                    dst[k, m] = src[k]
            else:
                for k in range(in_f):
                    dst[k, m] = 0.0


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=first_size, serial_below=ELEMENTWISE_SERIAL_BELOW)
def nf4_quantize_simd(x, xi, blocksize, mids16, packed, absmax, absmax_i):
    """:func:`nf4_quantize_even` with the codes found by the SIMD binary search
    (blocksize % SIMD_LANES == 0); bit-identical output."""
    n = x.size
    nfull = n // blocksize
    half = blocksize // 2
    ntasks = (nfull + _CODES_CHUNK - 1) // _CODES_CHUNK
    for task in prange(ntasks):
        for b in range(task * _CODES_CHUNK, min(nfull, (task + 1) * _CODES_CHUNK)):
            start = b * blocksize
            absmax_i[b] = _absmax_bits(xi[start:start + blocksize])
            inv = ONE / max(absmax[b], TINY)
            encode_block(x[start:start + blocksize], inv, mids16, packed[b * half:(b + 1) * half])
    if nfull * blocksize < n:
        _quantize_partial_tail(x, xi, nfull * blocksize, packed, absmax, absmax_i, nfull)


# --- quantize straight from bfloat16 bits ----------------------------------------------------
# bitsandbytes quantizes a bf16 weight as its exact float32 value, so these (the SIMD kernel
# below and the ``*_quantize_bf16`` kernels built from ``_quantize_bf16``) read the uint16
# bit patterns and widen each block into a float32 scratch (bits << 16) instead of the
# caller converting the whole weight first: no 2x-sized float32 copy, one pass over memory.
# Full blocks only (blocksize even); the caller quantizes a partial last block as float32.


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=first_size, serial_below=ELEMENTWISE_SERIAL_BELOW)
def nf4_quantize_bf16_simd(bits, nfull, blocksize, mids16, packed, absmax, absmax_i):
    """:func:`nf4_quantize_bf16` with the SIMD code search (blocksize % SIMD_LANES == 0)."""
    ntasks = (nfull + _CODES_CHUNK - 1) // _CODES_CHUNK
    for task in prange(ntasks):
        xi = np.empty(blocksize, np.int32)
        for b in range(task * _CODES_CHUNK, min(nfull, (task + 1) * _CODES_CHUNK)):
            _quantize_bf16_block(bits, b, blocksize, mids16, xi, packed, absmax, absmax_i)


@inline_helper
def _quantize_bf16_block(bits, b, blocksize, mids16, xi, packed, absmax, absmax_i):
    """Block b of the bf16 bits widened into ``xi`` (int32, blocksize elements: the
    float32 bits, kept for the caller), its absmax's bits stored, its codes found by the
    SIMD search into ``packed``: the one block step of the SIMD bf16 quantizers."""
    half = blocksize // 2
    absmax_i[b] = _widen_bf16(bits[b * blocksize:(b + 1) * blocksize], xi)
    inv = ONE / max(absmax[b], TINY)
    encode_block(xi.view(np.float32), inv, mids16, packed[b * half:(b + 1) * half])


# --- the reconstruction error of a bf16 weight, without float32 copies ------------------------
#: Elements per step of :func:`bf16_error_stats`: decoded and widened into two L1 buffers.
ERR_STEP = 4096


def error_stats_ok(numel, blocksize, chunk) -> bool:
    """Whether :func:`bf16_error_stats` applies: the SIMD decode (SIMD_LANES, 8 or 16,
    divides the blocksize: whole groups of 8 for the sums too), whole blocks, and blocks
    that divide its steps and the stats' chunks."""
    return (bool(SIMD_LANES) and blocksize % SIMD_LANES == 0 and ERR_STEP % blocksize == 0
            and chunk % blocksize == 0 and numel % blocksize == 0)


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=first_size, serial_below=ELEMENTWISE_SERIAL_BELOW)
def bf16_error_pass(bits, blocksize, code, chunk, quantize, mids16, packed, scales, scales_i, partial_sum,
                    partial_max):
    """``kernels.convert.abs_err_stats(x, deq(W))`` for the float32 values ``x`` of the
    bf16 bit patterns ``bits`` (flat uint16) and their quantized ``W`` (``packed``,
    ``scales``, ``code``), without either float32 array: per chunk of ``chunk`` elements
    the same operations in the same order (``|x - d|``; eight float64 sums by element
    index mod 8, eight float32 maxima; then their sum and maximum), so the same partials,
    bit for bit. Each step of ERR_STEP elements is widened (bits << 16) and decoded
    (``_simd.decode_blocks``: the product every decode computes) into two buffers that
    stay in L1, where the two-array pass read a float32 copy of the weight and a
    dequantized one (and wrote both first).

    ``quantize``: W is made in the same pass, NF4 without double quantization
    (:func:`nf4_quantize_bf16_simd`'s block step, ``_quantize_bf16_block``: each block's
    absmax bits into ``scales_i``, the int32 view of ``scales``, its codes into
    ``packed``), so the bits are read from memory once: the same bytes, scales and
    partials, bit for bit (the blocks are quantized independently). Else ``packed`` /
    ``scales`` are read (``mids16`` and ``scales_i`` unused). Only where
    :func:`error_stats_ok` (and, quantizing, the SIMD quantizer: bits.size % blocksize ==
    0)."""
    n = bits.size
    nchunks = (n + chunk - 1) // chunk
    half = blocksize // 2
    for c in prange(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        acc = np.zeros(8, np.float64)
        mx = np.zeros(8, np.float32)
        dbuf = np.empty(ERR_STEP, np.float32)
        xi = np.empty(ERR_STEP, np.int32)
        xb = xi.view(np.float32)
        for s0 in range(lo, hi, ERR_STEP):
            m = min(hi, s0 + ERR_STEP) - s0
            b0 = s0 // blocksize
            b1 = b0 + m // blocksize
            if quantize:
                for b in range(b0, b1):
                    o = (b - b0) * blocksize
                    _quantize_bf16_block(bits, b, blocksize, mids16, xi[o:o + blocksize], packed, scales, scales_i)
            else:
                src = bits[s0:s0 + m]
                for k in range(m):
                    xi[k] = np.int32(src[k]) << np.int32(16)
            decode_blocks(packed[b0 * half:b1 * half], scales[b0:b1], code, blocksize, dbuf[:m])
            err_acc8(xb, 0, dbuf, 0, m, acc, mx)  # abs_err_stats' element loop, in registers
        store_partials(acc, mx, partial_sum, partial_max, c)  # abs_err_stats' own


_NO_MIDS = np.zeros(16, np.float32)
_NO_SCALES_I = np.zeros(1, np.int32)


def bf16_error_stats(bits, packed, scales, blocksize, code, chunk, partial_sum, partial_max):
    """The reconstruction error's partials of an existing quantized bf16 weight
    (:func:`bf16_error_pass` without quantizing: any code book, double quantization's
    decoded scales)."""
    bf16_error_pass(bits, blocksize, code, chunk, False, _NO_MIDS, packed, scales, _NO_SCALES_I, partial_sum,
                    partial_max)


def nf4_quantize_bf16_err(bits, blocksize, mids16, code, chunk, packed, absmax, absmax_i, partial_sum, partial_max):
    """NF4-quantize the bf16 bits (whole blocks, SIMD) and measure the error in one pass
    (:func:`bf16_error_pass` quantizing)."""
    bf16_error_pass(bits, blocksize, code, chunk, True, mids16, packed, absmax, absmax_i, partial_sum, partial_max)
