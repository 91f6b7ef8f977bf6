"""Kernels of the 16-bit compute dtypes of the NF4 / FP4 products (``compute_dtype``).

bitsandbytes' ``Linear4bit(compute_dtype=torch.bfloat16)`` casts the input to the compute
dtype, dequantizes the weight to it (``code * absmax`` rounded once), multiplies with
float32 accumulation and rounds the product to the compute dtype. These kernels give
numpy programs the same numbers: values stay float32 arrays holding exactly
representable bfloat16 / float16 values, every rounding is round-to-nearest-even (as
numpy's float16 cast, ``ml_dtypes.bfloat16`` and torch's casts), computed on the float32
bits (no 16-bit type is needed in numba).

Mode numbers: :data:`BF16` and :data:`F16` (float32 itself runs the ordinary kernels).
"""

from __future__ import annotations

import numpy as np

from .._scratch import scratch
from . import nf4 as _nf4
from ._jit import PRODUCT_SERIAL_BELOW, inline_helper, kernel, num_threads, prange, product_work
from ._simd import (  # noqa: F401  (BF16_DOT: read by the products module)
    BF16_BW,
    BF16_BX,
    BF16_CHUNK,
    BF16_DOT,
    BF16_GROUP_BUF,
    BF16_GROUP_MAX,
    BF16_GROUP_NW,
    STREAM_ALIGN,
    bf16_block,
    bf16_chunk_bits,
    bf16_decode_row,
    bf16_rows_1,
    bf16_rows_w,
    bf16_rows_x2,
    bf16_rows_x3,
    bf16_rows_x4,
    bf16_rows_x5,
    bf16_rows_x6,
    bf16_rows_x7,
    bf16_rows_x8,
    decode_blocks_bf16,
    decode_blocks_bf16_stream,
    decode_blocks_f16,
    decode_blocks_f16_stream,
    dot16,
    rounded_1x1,
    rounded_1x4,
    rounded_2x4,
    rounded_4x1,
    store_fence,
)
from ._simd import CACHEABLE as SIMD_CACHEABLE
from ._team import slot_done, slot_range
from .nf4 import (  # noqa: F401  (b_blocks: read as kernels.compute.b_blocks too)
    SIMD_LANE8_RANKS,
    _block_room,
    _expand_rows_fused,
    _expand_rows_simd,
    _lane_dot,
    _scaled,
    b_blocks,
    b_blocks_of,
    simd_dots,
)

BF16 = 1
F16 = 2

_TWO24 = np.float32(16777216.0)  # 2**24: float16's subnormal quantum is 2**-24
_TWO_M24 = np.float32(2.0 ** -24)
_ACC = 16  # partial sums per dot product (one AVX-512 vector of float32)
ROWS = 8  # weight rows per parallel task of the fused product


@inline_helper
def _round_at(a, u, j, mode):
    """Round a[j] (``u`` is the same memory as uint32) to the compute dtype, in place."""
    b = u[j]
    ab = b & 0x7FFFFFFF
    if ab > 0x7F800000:  # NaN stays NaN (made quiet, as the casts do)
        u[j] = b | 0x00400000 if mode == F16 else (b | 0x00400000) & 0xFFFF0000
    elif mode == BF16:
        u[j] = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    elif ab < 0x38800000:  # below float16's smallest normal (2**-14): multiples of 2**-24
        a[j] = np.rint(a[j] * _TWO24) * _TWO_M24
    elif ab >= 0x477FF000:  # 65520 and up (and inf): past float16's largest value
        u[j] = (b & 0x80000000) | 0x7F800000
    else:  # 10 mantissa bits, half to even
        u[j] = (b + 0xFFF + ((b >> 13) & 1)) & 0xFFFFE000


@inline_helper
def _round_all(a, mode):
    u = a.view(np.uint32)
    for j in range(a.size):
        _round_at(a, u, j, mode)


@kernel()
def round_values(a, mode):
    """Round every element of the float32 1-D C-contiguous array ``a`` in place to the
    compute dtype ``mode`` (:data:`BF16` or :data:`F16`), half to even."""
    _round_all(a, mode)


@inline_helper
def _decode_rows(packed, scales, blocksize, code, e0, e1, out):
    """out[k - e0] = code[nibble k] * scales[k // blocksize] for k in [e0, e1): the same
    float32 product as every other decode of numlora (any alignment)."""
    bs = np.int64(blocksize)
    for k in range(np.int64(e0), np.int64(e1)):
        byte = np.int64(packed[k >> 1])
        nib = (byte >> 4) if (k & 1) == 0 else (byte & 15)
        out[k - np.int64(e0)] = code[nib] * scales[k // bs]


@inline_helper
def _dot(w, x, acc):
    """sum(w * x) in float32 in the order of ``_simd.dot16`` (16 partial sums, summed by
    halving, then the tail one by one): the portable and SIMD builds give the same bits,
    and every (weight row, input row) the same operations whatever the batch or threads."""
    m = w.size
    for lane in range(_ACC):
        acc[lane] = 0.0
    j = 0
    while j + _ACC <= m:
        for lane in range(_ACC):
            acc[lane] += w[j + lane] * x[j + lane]
        j += _ACC
    width = _ACC // 2
    while width >= 1:
        for lane in range(width):
            acc[lane] = acc[lane] + acc[lane + width]
        width //= 2
    total = acc[0]
    while j < m:
        total += w[j] * x[j]
        j += 1
    return total


@inline_helper
def _rows_times_inputs(buf, in_f, o0, nr, xr, acc, y):
    for oo in range(nr):
        w = buf[oo * in_f:(oo + 1) * in_f]
        for i in range(xr.shape[0]):
            y[i, o0 + oo] = _dot(w, xr[i], acc)


@kernel(parallel=True, work=product_work, serial_below=PRODUCT_SERIAL_BELOW)
def nf4_matmul_rounded(packed, scales, blocksize, code, mode, xr, y):
    """y[i, o] = sum_j rnd(code * scale)[o, j] * xr[i, j], accumulated in float32 (not
    rounded: the caller adds the bias and rounds). xr: (n, in) already rounded; y: (n, out).
    Parallel over tasks of ROWS weight rows, each decoded once into a small buffer,
    rounded, and used for every input row."""
    in_f = xr.shape[1]
    out_f = y.shape[1]
    ntasks = (out_f + ROWS - 1) // ROWS
    for task in prange(ntasks):
        o0 = task * ROWS
        nr = min(out_f, o0 + ROWS) - o0
        buf = np.empty(nr * in_f, np.float32)
        _decode_rows(packed, scales, blocksize, code, o0 * in_f, (o0 + nr) * in_f, buf)
        _round_all(buf, mode)
        _rows_times_inputs(buf, in_f, o0, nr, xr, np.empty(_ACC, np.float32), y)


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=product_work, serial_below=PRODUCT_SERIAL_BELOW)
def nf4_matmul_rounded_simd(packed, scales, blocksize, code, mode, xr, y):
    """:func:`nf4_matmul_rounded` with the SIMD decode (rounding in registers) and the
    SIMD dot products (``in % blocksize == 0`` and ``blocksize`` a multiple of the SIMD
    width): the same values, the same order of operations, the same result bits."""
    n, in_f = xr.shape
    out_f = y.shape[1]
    bpr = in_f // blocksize
    half = blocksize // 2
    ntasks = (out_f + ROWS - 1) // ROWS
    for task in prange(ntasks):
        o0 = task * ROWS
        nr = min(out_f, o0 + ROWS) - o0
        buf = np.empty(nr * in_f, np.float32)
        _decode_rounded(packed, scales, blocksize, code, mode, o0 * bpr, (o0 + nr) * bpr, half, buf)
        for oo in range(nr):
            for i in range(n):
                y[i, o0 + oo] = dot16(buf, oo * in_f, xr[i], 0, in_f)


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=product_work, serial_below=PRODUCT_SERIAL_BELOW)
def nf4_matmul_rounded_fused(packed, scales, blocksize, code, mode, xr, y):
    """:func:`nf4_matmul_rounded` with the decode, rounding and products in registers
    (``_simd.rounded_dot``: a rounded 16-entry table per block, no buffer): the same
    values in the same order, so the same bits. ``blocksize % 16 == 0``, ``in %
    blocksize == 0``. Per task of ROWS weight rows: input rows in groups of 4 against 2
    weight rows at a time, the rest one at a time against 4 weight rows."""
    n = xr.shape[0]
    out_f = y.shape[1]
    ntasks = (out_f + ROWS - 1) // ROWS
    n4 = n - n % 4
    for task in prange(ntasks):
        o0 = task * ROWS
        o1 = min(out_f, o0 + ROWS)
        buf = np.empty(8, np.float32)
        for i in range(0, n4, 4):
            o = o0
            while o + 2 <= o1:
                rounded_2x4(packed, o, xr, i, scales, code, blocksize, buf, mode)
                for a in range(2):
                    for g in range(4):
                        y[i + g, o + a] = buf[a * 4 + g]
                o += 2
            while o < o1:
                rounded_1x4(packed, o, xr, i, scales, code, blocksize, buf, mode)
                for g in range(4):
                    y[i + g, o] = buf[g]
                o += 1
        for i in range(n4, n):
            o = o0
            while o + 4 <= o1:
                rounded_4x1(packed, o, xr, i, scales, code, blocksize, buf, mode)
                for a in range(4):
                    y[i, o + a] = buf[a]
                o += 4
            while o < o1:
                rounded_1x1(packed, o, xr, i, scales, code, blocksize, buf, mode)
                y[i, o] = buf[0]
                o += 1


@inline_helper
def _decode_rounded(packed, scales, blocksize, code, mode, b0, b1, half, out):
    if mode == BF16:
        decode_blocks_bf16(packed[b0 * half:b1 * half], scales[b0:b1], code, blocksize, out)
    else:
        decode_blocks_f16(packed[b0 * half:b1 * half], scales[b0:b1], code, blocksize, out)


@kernel(cache=SIMD_CACHEABLE)
def nf4_decode_rounded_tile(packed, scales, blocksize, code, mode, b0, b1, out):
    """Serial SIMD decode of blocks [b0, b1), each value rounded to the compute dtype,
    into a tile that BLAS reads next (the large-batch path); an aligned tile gets
    streaming stores, as in :func:`~numlora.kernels.nf4.nf4_decode_simd_tile`."""
    half = blocksize // 2
    o = out[:(b1 - b0) * blocksize]
    if o.ctypes.data % STREAM_ALIGN != 0:
        _decode_rounded(packed, scales, blocksize, code, mode, b0, b1, half, o)
    elif mode == BF16:
        decode_blocks_bf16_stream(packed[b0 * half:b1 * half], scales[b0:b1], code, blocksize, o)
        store_fence()
    else:
        decode_blocks_f16_stream(packed[b0 * half:b1 * half], scales[b0:b1], code, blocksize, o)
        store_fence()


BF16_ROWS = 16  # weight rows per parallel task of the bf16 dot-product kernel


#: From this many input rows the bf16 product decodes each weight row once into a
#: per-task buffer (:func:`nf4_matmul_bf16_decoded`) instead of once per group of input
#: rows (``_simd.BF16_GROUP_NW``). Up to 16 rows (two groups of 8) the fused kernel was
#: faster: 4096 x 4096, AMD EPYC (AVX512-BF16), separate processes, batch 9 / 16: 1.26-1.43
#: / 2.0-2.08 ms against 1.65-1.90 / 2.02-2.32 decoded (one thread 2.51 / 3.70 against
#: 2.95 / 3.95); from 20-24 rows the decoded rows were as fast or faster, at 32 3.3-3.7
#: against 3.6-4.6 (docs/performance.md, "bf16: the fused kernel up to 16 rows").
BF16_DECODED_FROM = 17
#: Bytes of decoded rows per task of that kernel (L2-sized, a whole number of BF16_BW rows).
BF16_DECODED_BYTES = 384 * 1024


def bf16_bits(x, xb):
    """xb = the bf16 bits of x rounded half to even (NaN made quiet, as
    :func:`round_values`), in the order the bf16 kernels read: each chunk of
    ``BF16_CHUNK`` elements reordered so that position ``32 k + q`` holds element
    ``4 q + (1, 0, 3, 2)[k]`` (the order in which the nibble positions of the chunk's
    16-bit words decode). x: float32 (n, in), ``in % BF16_CHUNK == 0``; xb: uint16, at
    least n rows of in (its first n rows written). (tests/reference.py writes the same in
    numpy.) Through :func:`bf16_bits_simd` on the SIMD build with both C-contiguous (a
    chunk per call of ``_simd.bf16_chunk_bits``: 3.7 against 37 us at 8 rows of 4096, 58
    against 606 us at 128, AMD EPYC), else :func:`bf16_bits_portable`; the same bits."""
    if _nf4.SIMD_LANES and x.flags.c_contiguous and xb.flags.c_contiguous:
        bf16_bits_simd(x.reshape(-1).view(np.uint32), xb.reshape(-1), x.shape[0], x.shape[1])
    else:
        bf16_bits_portable(x, xb)


@kernel(cache=SIMD_CACHEABLE)
def bf16_bits_simd(xu, xb, n, in_f):
    """:func:`bf16_bits` on the flat uint32 bits of x and the flat xb, a chunk at a time."""
    for e in range(0, n * in_f, BF16_CHUNK):
        bf16_chunk_bits(xu, e, xb, e)


@kernel()
def bf16_bits_portable(x, xb):
    """:func:`bf16_bits` element by element."""
    n, in_f = x.shape
    u = x.view(np.uint32)
    for i in range(n):
        for c in range(0, in_f, BF16_CHUNK):
            for q in range(32):
                for m in range(4):  # element 4 q + m goes to position 32 k + q, k = m ^ 1
                    b = np.int64(u[i, c + 4 * q + m])
                    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
                    if (b & 0x7FFFFFFF) > 0x7F800000:
                        r = (b | 0x00400000) >> 16
                    xb[i, c + 32 * (m ^ 1) + q] = np.uint16(r & 0xFFFF)


def lora_expand_add(u, lora_b, y):
    """y[i] += sum over t of u[i, t] * lora_b[:, t] (lora_b = B, (out, r), float32): the
    LoRA expand of a small batch, added to the rounded base product without a BLAS call
    (whose spinning threads would slow the next parallel kernel). Each output sums its
    rank terms in order from zero, then adds the sum, as the fused float32 kernels'
    epilogue does. Serial: at most a few rows times out x r. Through
    :func:`lora_expand_add_simd` on the SIMD build (B and y C-contiguous), else
    :func:`lora_expand_add_portable` on B^T; the same bits."""
    u = np.ascontiguousarray(u, dtype=np.float32)
    if _nf4.expand_ok(lora_b, y):
        lora_expand_add_simd(u, lora_b, y)
    else:
        lora_expand_add_portable(u, np.ascontiguousarray(lora_b.T), y)


@kernel(cache=SIMD_CACHEABLE)
def lora_expand_add_simd(u, lora_b, y):
    """:func:`lora_expand_add` with the sums in vector registers (:func:`_expand_rows_fused`:
    each block of B^T transposed just before its rows use it, for a few rows)."""
    _expand_rows_fused(u, 0, u.shape[0], _block_room(u), lora_b, y, 0)


@kernel()
def lora_expand_add_portable(u, lora_bt, y):
    """:func:`lora_expand_add` element by element (:func:`_expand_row`)."""
    lo = np.empty(y.shape[1], np.float32)
    for i in range(u.shape[0]):
        _expand_row(u[i], lora_bt, y, i, lo)


@inline_helper
def _expand_row(c, lora_bt, y, i, lo):
    """y[i] += sum over t of c[t] * lora_bt[t], the rank terms summed in order from zero
    into ``lo`` (scratch of y's width) and then added."""
    lo[:] = 0.0
    for t in range(c.shape[0]):
        ct = c[t]
        for o in range(lo.shape[0]):
            lo[o] += ct * lora_bt[t, o]
    for o in range(lo.shape[0]):
        y[i, o] += lo[o]


def _lora_rows_work(x2, lora_a, scale, u, lora_bt, y) -> int:
    """Multiply-adds of :func:`lora_rows`: rows x rank x (in + out)."""
    return x2.shape[0] * lora_a.shape[0] * (x2.shape[1] + y.shape[1])


@kernel(parallel=True, work=_lora_rows_work, serial_below=PRODUCT_SERIAL_BELOW)
def lora_rows(x2, lora_a, scale, u, lora_bt, y):
    """The LoRA branch of a large batch in numba, row by row in parallel: u[i] = x2[i] A^T
    unscaled (``nf4.lora_shrink``'s canonical lane order) and y[i] += (scale u[i]) B^T
    (:func:`lora_expand_add`'s order; ``scale u`` as ``_backward.scale_intermediate``
    computes it: scale 0 adds nothing, also where u overflowed), instead of two BLAS calls
    whose spinning workers would slow the next numlora kernel. u: (n, r) float32, filled."""
    r = lora_a.shape[0]
    k = x2.shape[1]
    for i in prange(x2.shape[0]):
        c = np.empty(r, np.float32)
        for t in range(r):
            v = _lane_dot(x2[i], lora_a[t], k)
            u[i, t] = v
            c[t] = _scaled(scale, v)
        _expand_row(c, lora_bt, y, i, np.empty(y.shape[1], np.float32))


def _lora_rows_simd_work(x2, lora_a, scale, u, blk, lora_b, y) -> int:
    """Multiply-adds of :func:`lora_rows_simd`: :func:`_lora_rows_work`'s."""
    return _lora_rows_work(x2, lora_a, scale, u, lora_b, y)


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=_lora_rows_simd_work, serial_below=PRODUCT_SERIAL_BELOW)
def lora_rows_simd(x2, lora_a, scale, u, blk, lora_b, y):
    """:func:`lora_rows` with the dot products of the shrink in SIMD registers
    (``nf4.simd_dots``) and the expand of each group of four rows in them
    (:func:`_expand_rows_simd` on :func:`b_blocks`' blk), the same bits, for C-contiguous
    x2, lora_a, lora_b and y on a SIMD machine."""
    r = lora_a.shape[0]
    n = x2.shape[0]
    for q in prange((n + 3) // 4):  # groups of four rows: one pass over B^T per group
        i0 = 4 * q
        m = min(4, n - i0)
        v = np.empty(r, np.float32)
        c = np.empty((4, r), np.float32)
        lanes = np.empty(8 * SIMD_LANE8_RANKS, np.float32)
        for g in range(m):
            simd_dots(x2, i0 + g, lora_a, v, lanes)
            for t in range(r):
                u[i0 + g, t] = v[t]
                c[g, t] = _scaled(scale, v[t])
        _expand_rows_simd(c, 0, m, blk, lora_b, y, i0)


def lora_branch(x2, lora_a, scale, u, lora_b, y):
    """:func:`lora_rows` (x2 C-contiguous float32; lora_b = B, (out, r) float32), through
    :func:`lora_rows_simd` where the machine has the SIMD build and lora_a, B and y are
    C-contiguous (the same bits): the choice ``nf4.shrink`` makes for the small batches."""
    if lora_a.flags.c_contiguous and _nf4.expand_ok(lora_b, y):
        lora_rows_simd(x2, lora_a, scale, u, b_blocks_of(lora_b), lora_b, y)
    else:
        lora_rows(x2, lora_a, scale, u, np.ascontiguousarray(lora_b.T), y)


def bf16_input(n, in_f):
    """A uint16 array for :func:`bf16_bits` of n rows and in_f columns: the calling
    thread's scratch (numlora._scratch, reused until its next bf16 product), its data
    64-byte aligned (the bf16 kernels load x 64 bytes at a time, and a row start off a
    cache line splits every load in two: measured 1.7-2x slower at batch 128), with rows
    up to a whole number of BF16_BX groups: the rows past n are zero, so that
    :func:`bf16_product` runs a batch's last, partial group through the decoded rows
    instead of a second pass over the weight. The first n rows are uninitialised."""
    n_pad = n if n < BF16_DECODED_FROM else (n + BF16_BX - 1) // BF16_BX * BF16_BX
    xb = scratch("bf16.x", n_pad * in_f, np.uint16).reshape(n_pad, in_f)
    xb[n:] = 0
    return xb


def bf16_product(packed, scales, blocksize, code, xb, y):
    """y = rnd(deq(W)) . xb with the bf16 dot-product instruction: small batches through
    :func:`nf4_matmul_bf16dot` (decode fused into the products), large ones through
    :func:`nf4_matmul_bf16_decoded`. xb: the rows of y, or (from :func:`bf16_input`) those
    rows and zero rows up to a whole number of groups of BF16_BX, all of which the decoded
    kernel then takes (only y's rows are stored); without them, the rows past the last
    whole group go through the fused kernel. Both give every (o, i) the same operations,
    so the same bits whatever the batch."""
    n = y.shape[0]
    in_f = xb.shape[1]
    if n < BF16_DECODED_FROM:
        nf4_matmul_bf16dot(packed, scales, blocksize, code, xb[:n], y)
        return
    rows = max(BF16_BW, BF16_DECODED_BYTES // (2 * in_f) // BF16_BW * BF16_BW)
    nw = max(1, min(num_threads(), -(-y.shape[1] // rows)))
    ws = _workspace(nw, rows * in_f + 32)
    n_pad = (n + BF16_BX - 1) // BF16_BX * BF16_BX
    if xb.shape[0] >= n_pad:
        nf4_matmul_bf16_decoded(packed, scales, blocksize, code, xb[:n_pad], y, rows, ws)
        return
    n4 = n - n % BF16_BX
    nf4_matmul_bf16_decoded(packed, scales, blocksize, code, xb[:n4], y[:n4], rows, ws)
    if n4 < n:
        nf4_matmul_bf16dot(packed, scales, blocksize, code, xb[n4:n], y[n4:])


def _workspace(nw, size):
    """(nw, size) uint16 scratch of the calling thread's bf16 products, reused from call
    to call (see numlora._scratch)."""
    return scratch("bf16.rows", nw * size, np.uint16).reshape(nw, size)


def _decoded_work(packed, scales, blocksize, code, xb, y, rows, ws) -> int:
    """The work of :func:`nf4_matmul_bf16_decoded`, as ``_jit.product_work`` counts it."""
    return product_work(packed, y)


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=_decoded_work, serial_below=PRODUCT_SERIAL_BELOW)
def nf4_matmul_bf16_decoded(packed, scales, blocksize, code, xb, y, rows, ws):
    """:func:`nf4_matmul_bf16dot` for xb's rows, a whole number of groups of BF16_BX
    (y's rows, then any zero rows of padding, whose products are not stored): each task
    decodes ``rows`` weight rows once (``_simd.bf16_decode_row``, into a 64-byte aligned
    part of its worker's row of the scratch ``ws``: the 64-byte loads must not straddle
    cache lines) and every group of input rows reads them, BF16_BW x BF16_BX products per
    call. ws: (workers, >= rows * in + 32) uint16; worker w takes tasks w,
    w + workers, ..."""
    n, in_f = xb.shape
    out_f = y.shape[1]
    ntasks = (out_f + rows - 1) // rows
    nw = ws.shape[0]
    for w in prange(nw):
        raw = ws[w]
        off = ((64 - raw.ctypes.data % 64) % 64) // 2
        wbuf = raw[off:off + rows * in_f].reshape((rows, in_f))
        buf = np.empty(BF16_BW * BF16_BX, np.float32)
        for task in range(w, ntasks, nw):
            _decoded_task(packed, scales, blocksize, code, xb, y, rows, task, wbuf, buf)


@inline_helper
def _decoded_task(packed, scales, blocksize, code, xb, y, rows, task, wbuf, buf):
    """One task of :func:`nf4_matmul_bf16_decoded`: weight rows task * rows onwards."""
    n = xb.shape[0]
    ny, out_f = y.shape
    o0 = task * rows
    o1 = min(out_f, o0 + rows)
    for o in range(o0, o1):
        bf16_decode_row(packed, o, scales, code, blocksize, wbuf, o - o0)
    for i in range(0, n, BF16_BX):
        gn = min(BF16_BX, ny - i)  # the rows of this group that y has
        o = o0
        while o + BF16_BW <= o1:
            bf16_block(wbuf, o - o0, xb, i, buf)
            for a in range(BF16_BW):
                for g in range(gn):
                    y[i + g, o + a] = buf[a * BF16_BX + g]
            o += BF16_BW
        while o < o1:  # the last task's rows short of BF16_BW
            for g in range(gn):
                bf16_rows_1(packed, o, xb, i + g, scales, code, blocksize, buf)
                y[i + g, o] = buf[0]
            o += 1


@kernel(parallel=True, cache=SIMD_CACHEABLE, work=product_work, serial_below=PRODUCT_SERIAL_BELOW, team=True)
def nf4_matmul_bf16dot(packed, scales, blocksize, code, xb, y, flags, nslot):
    """y[i, o] = rnd(deq(W))[o] . rnd(x)[i] with the CPU's bf16 dot-product instruction
    (``_simd.bf16_rows``): xb holds the bf16 bits of x in :func:`bf16_bits`' order.
    Input rows in the groups of ``_simd.BF16_GROUP_NW`` (8 at a time, then one group of
    the rest), each weight chunk decoded once per group; a task's last weight rows short
    of a call's count one (weight row, input row) pair at a time. Every (o, i) gets the
    same operations, so results do not depend on the batch size or the thread count.
    A team kernel (``kernels._team``): each of numba's threads takes a contiguous share of
    the tasks (``flags``, ``nslot``: appended by the kernel's wrapper)."""
    n = xb.shape[0]
    out_f = y.shape[1]
    ntasks = (out_f + BF16_ROWS - 1) // BF16_ROWS
    for slot in prange(nslot):
        buf = np.empty(BF16_GROUP_BUF, np.float32)
        lo, hi = slot_range(slot, nslot, ntasks)
        for task in range(lo, hi):
            o0 = task * BF16_ROWS
            o1 = min(out_f, o0 + BF16_ROWS)
            i = 0
            while i < n:
                nx = min(BF16_GROUP_MAX, n - i)
                nw = BF16_GROUP_NW[nx]
                o = o0
                while o + nw <= o1:
                    _bf16_group(nx, packed, o, xb, i, scales, code, blocksize, buf)
                    for a in range(nw):
                        for g in range(nx):
                            y[i + g, o + a] = buf[a * nx + g]
                    o += nw
                while o < o1:
                    for g in range(nx):
                        bf16_rows_1(packed, o, xb, i + g, scales, code, blocksize, buf)
                        y[i + g, o] = buf[0]
                    o += 1
                i += nx
        slot_done(flags, slot, nslot)


@inline_helper
def _bf16_group(nx, packed, o, xb, i, scales, code, blocksize, buf):
    """The products of weight rows o.. with the nx input rows i.. (``_simd.BF16_GROUP_NW``:
    one intrinsic per group size, 1 to BF16_GROUP_MAX)."""
    if nx == 8:
        bf16_rows_x8(packed, o, xb, i, scales, code, blocksize, buf)
    elif nx == 7:
        bf16_rows_x7(packed, o, xb, i, scales, code, blocksize, buf)
    elif nx == 6:
        bf16_rows_x6(packed, o, xb, i, scales, code, blocksize, buf)
    elif nx == 5:
        bf16_rows_x5(packed, o, xb, i, scales, code, blocksize, buf)
    elif nx == 4:
        bf16_rows_x4(packed, o, xb, i, scales, code, blocksize, buf)
    elif nx == 3:
        bf16_rows_x3(packed, o, xb, i, scales, code, blocksize, buf)
    elif nx == 2:
        bf16_rows_x2(packed, o, xb, i, scales, code, blocksize, buf)
    else:
        bf16_rows_w(packed, o, xb, i, scales, code, blocksize, buf)
