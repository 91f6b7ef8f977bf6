"""numba.cuda twins of the CPU kernels in :mod:`numlora.kernels`.

Same names (a factory adds ``make_``) and meaning; the GPU kernels take float32 and write into ``out`` device
arrays. Launch geometry is not fixed at import: every kernel that needs a compile-time
size (shared-memory tiles, threads per block) is built by a factory named ``make_*``,
cached per size, which reads the module-level settings below at launch time
(``make_gemm(...)[grid, block](...)``); a kernel without ``make_`` is a plain
``@cuda.jit`` kernel, launched directly (``merge_plain[grid, block](...)``). Tests under
the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, one Python thread per CUDA thread) shrink
the settings (``kernels.THREADS = 8`` etc.) as stumpy patches its ``THREADS_PER_BLOCK``.

Bit-exactness: the NF4 quantizer and dequantizer and the xorshift64 fill perform the
same float32 / float64 operations as the CPU kernels (no additions that the compiler
could contract into FMAs), so their outputs are identical bit for bit. The matmul,
merge and AdamW kernels sum in a different order than the CPU and may use FMAs: they
agree with the CPU to float32 rounding, not to the bit.

Where one CPU kernel became two launches or two CPU kernels one (the names otherwise
match :mod:`numlora.kernels`):

- ``kernels.train.dropout_fill`` / ``dropout_mul_add`` -> :func:`make_dropout_apply` (``add``
  False / True; it derives the row states itself, from the seed, instead of taking them);
- ``kernels.multi.multi_lora_add`` -> :func:`make_multi_lora_shrink` then
  :func:`make_multi_lora_expand` (``numlora.cuda.bank.multi_lora_add`` launches both);
- ``kernels.lora`` / ``kernels.nf4`` forward and backward products -> :func:`make_gemm` (one
  tiled kernel, dense or NF4 weight, LoRA expand and bias in its epilogue),
  :func:`make_lora_shrink` and, for one NF4 row, :func:`make_nf4_gemv`;
- ``kernels.lora`` merge -> :func:`merge_plain`; ``kernels.train.adamw_step`` ->
  :func:`adamw_step`.

Nothing here compiles at import: ``@cuda.jit`` compiles on first launch.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .._tables import NF4_MIDPOINTS

# numba's CUDA simulator runs each GPU thread as a Python thread, and every call of a
# device function iterates this module's globals (``swapped_cuda_module``). The first
# warning raised from this module's code (numpy's uint64 overflow warnings in the
# simulated xorshift / splitmix arithmetic) adds ``__warningregistry__`` to them: from one
# simulated thread while another iterated, "dictionary changed size during iteration"
# (tests/test_cuda.py's simulator smoke run failed once so). Created here, it is only
# ever cleared or filled, never added.
__warningregistry__: dict = {}

# --- launch settings (read at launch time; tests patch them to tiny values) ------------

#: threads per block of the 1-D kernels (elementwise, NF4 quantize / dequantize, RNG).
#: A power of two.
THREADS = 256
#: threads per block of the generic NF4 absmax reduction. Power of two.
REDUCE_THREADS = 128
#: threads per block of the LoRA shrink (one block per output element, a long reduction
#: into a small (n, r) output: wide blocks keep enough loads in flight). Power of two.
SHRINK_THREADS = 1024
#: fused NF4 GEMV (batch 1): threads per block (power of two) and output rows per block.
GEMV_THREADS = 128
GEMV_ROWS = 4
#: tiled matmul: (BM, BN, BK, TM, TN): a block computes a BM x BN tile of the output,
#: stepping BK along the reduction; each thread owns TM x TN outputs, so a block has
#: (BM / TM) * (BN / TN) threads. The tile is chosen from the number of output rows M
#: (:func:`gemm_tile`): the first ``(max_m, tile)`` of GEMM_TILES with M <= max_m, else
#: GEMM_TILE, so that small batches still launch enough blocks to fill the SMs.
GEMM_TILES = ((16, (16, 64, 16, 2, 4)), (128, (64, 64, 8, 4, 4)))
GEMM_TILE = (128, 128, 8, 8, 8)
#: shared-memory row padding of the gemm tiles (floats), against bank conflicts.
GEMM_PAD = 4
#: log2 of the number of consecutive RNG values one thread generates (16 M values: 65536
#: threads; a thread first jumps ahead, popcount(thread) GF(2) matrix products).
RNG_CHUNK_LOG2 = 8
#: values a thread generates between two coalesced block-wide writes (shared staging).
RNG_STAGE = 32
#: many-adapter forward (LoraBank on the GPU): threads per block of the per-row shrink
#: and expand kernels (power of two), and the ranks one shrink block accumulates
#: (registers per thread).
MULTI_THREADS = 256
MULTI_RANKS = 8
#: log2 of the elements of a row one dropout thread draws the keep bits of (at most 5:
#: one uint32 word of bits per thread).
DROP_CHUNK_LOG2 = 5

F32 = np.float32
TINY = np.float32(1e-38)
ONE = np.float32(1.0)
INF = np.float32(np.inf)
_U64_MAX_F64 = 18446744073709551615.0
(_M0, _M1, _M2, _M3, _M4, _M5, _M6, _M7, _M8, _M9, _M10, _M11, _M12, _M13, _M14) = (
    np.float32(m) for m in NF4_MIDPOINTS)

_cache: dict = {}


def _cached(key, build):
    k = _cache.get(key)
    if k is None:
        k = build()
        _cache[key] = k
    return k


# --- xorshift64 ----------------------------------------------------------------------------

@cuda.jit(device=True)
def _xs_step(s):
    s ^= s << np.uint64(13)
    s ^= s >> np.uint64(7)
    s ^= s << np.uint64(17)
    return s


@cuda.jit(device=True)
def _gf2_apply(jumps, row, s):
    """The 64x64 GF(2) matrix ``jumps[row]`` (its 64 columns as uint64) applied to s."""
    r = np.uint64(0)
    for i in range(64):
        if (s >> np.uint64(i)) & np.uint64(1):
            r ^= jumps[row, i]
    return r


@cuda.jit(device=True)
def _jump(jumps, s, k):
    """The state ``k`` chunks after ``s``: ``jumps[l]`` is the step matrix to the power
    (chunk length) * 2**l, applied for each set bit l of k."""
    lvl = 0
    while k > 0:
        if k & 1:
            s = _gf2_apply(jumps, lvl, s)
        k >>= 1
        lvl += 1
    return s


@cuda.jit(device=True)
def _block_sum_rows(sm, rows, tid, threads):
    """``sm[q, 0] = sum of sm[q, :threads]`` for q < rows: a shared-memory tree (pairs at
    distance threads/2, threads/4, ...; threads a power of two), one fixed order. Every
    thread of the block must call it (it synchronises), after the writes of sm are
    synchronised."""
    h = threads // 2
    while h > 0:
        if tid < h:
            for q in range(rows):
                sm[q, tid] += sm[q, tid + h]
        cuda.syncthreads()
        h //= 2


def make_xorshift64_fill():
    """The xorshift64 stream started at ``state`` into ``out``: thread t owns
    ``out[t * CH : (t + 1) * CH]`` (CH = 2**RNG_CHUNK_LOG2): it jumps ahead t * CH steps
    (``jumps[l]`` = the step matrix to the power ``CH * 2**l``), then steps serially,
    S = min(RNG_STAGE, CH) values at a time into a padded shared-memory buffer, which the
    block then writes out with consecutive threads on consecutive addresses (runs of S
    floats: coalesced, where writing each thread's own chunk directly would stride by CH).
    Bit-identical to the CPU kernel."""
    T = THREADS
    CH = 1 << RNG_CHUNK_LOG2
    S = min(RNG_STAGE, CH)
    SP = S + 1  # odd row length: the per-thread stores st[tid, q] hit distinct banks

    def build():
        @cuda.jit
        def xorshift64_fill_k(state, jumps, out):
            st = cuda.shared.array((T, SP), np.float32)
            tid = cuda.threadIdx.x
            t = cuda.blockIdx.x * T + tid
            n = out.size
            start = t * CH
            s = np.uint64(state)
            if start < n:
                s = _jump(jumps, s, t)
            base = cuda.blockIdx.x * T * CH
            for r0 in range(0, CH, S):
                if start + r0 < n:
                    for q in range(S):
                        s = _xs_step(s)
                        st[tid, q] = np.float32(np.float64(s) / _U64_MAX_F64 * 2.0 - 1.0)
                cuda.syncthreads()
                for e in range(tid, T * S, T):
                    seg = e // S
                    q = e % S
                    i = base + seg * CH + r0 + q
                    if i < n:
                        out[i] = st[seg, q]
                cuda.syncthreads()

        return xorshift64_fill_k

    return _cached(("rng", T, CH, S), build)


# --- LoRA dropout ---------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@cuda.jit(device=True)
def _row_state(seed, i):
    """The start state of row i's dropout stream: splitmix64(seed + (i + 1) * golden),
    0 replaced by 1 (as ``numlora.dropout.row_states``)."""
    z = seed + np.uint64(i + 1) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    if z == np.uint64(0):
        z = np.uint64(1)
    return z


def make_dropout_apply():
    """Inverted dropout with the CPU kernels' streams (:mod:`numlora.kernels.train`):
    row i of the (n, m) flat arrays draws from its own xorshift64 stream, element j kept
    iff ``(s >> 11) >= thresh`` after j + 1 steps. Thread g owns chunk c = g % cpr of row
    i = g // cpr (CH = 2**DROP_CHUNK_LOG2 <= 32 elements, cpr = ceil(m / CH) chunks per
    row): it derives the row's start state (splitmix64 of (seed, i)), jumps c * CH steps
    ahead (``jumps[l]`` = the step matrix to the power ``CH * 2**l``) and draws its CH
    keep bits into one uint32 word in shared memory; then the block applies the words
    with consecutive threads on consecutive elements (coalesced).

    ``add`` False: ``dst = src * scale`` where kept, else 0 (:func:`dropout_fill`,
    bit-identical to the CPU for non-NaN inputs: one float32 product; a GPU returns the
    canonical NaN where x86 keeps a NaN's payload); True: ``dst += src * scale`` where
    kept (:func:`dropout_mul_add`, the input gradient through the dropout; the compiler
    may fuse it into one FMA, so it agrees with the CPU to float32 rounding)."""
    T = THREADS
    CH = 1 << DROP_CHUNK_LOG2

    def build():
        @cuda.jit
        def dropout_apply_k(src, n, m, seed, thresh, scale, jumps, dst, add):
            words = cuda.shared.array(T, np.uint32)
            tid = cuda.threadIdx.x
            cpr = (m + CH - 1) // CH
            total = n * cpr
            g0 = cuda.blockIdx.x * T
            g = g0 + tid
            w = np.uint32(0)
            if g < total:
                i = g // cpr
                c = g - i * cpr
                s = _jump(jumps, _row_state(seed, i), c)
                cnt = min(CH, m - c * CH)
                for q in range(cnt):
                    s = _xs_step(s)
                    if (s >> np.uint64(11)) >= thresh:
                        w |= np.uint32(1) << np.uint32(q)
            words[tid] = w
            cuda.syncthreads()
            i = g0 // cpr  # row and chunk of the block's first chunk
            c = g0 - i * cpr
            for e in range(tid, T * CH, T):
                seg = e // CH
                q = e - seg * CH
                gg = g0 + seg
                if gg >= total:
                    break
                cc = np.uint32(c + seg)  # < cpr + T: a 32-bit division
                ii = i + np.int64(cc // np.uint32(cpr))
                j = np.int64(cc % np.uint32(cpr)) * CH + q
                if j < m:
                    if (words[seg] >> np.uint32(q)) & np.uint32(1):
                        idx = ii * m + j
                        if add:
                            dst[idx] += src[idx] * scale
                        else:
                            dst[idx] = src[idx] * scale
                    elif not add:
                        dst[ii * m + j] = np.float32(0.0)

        return dropout_apply_k

    return _cached(("dropout", T, CH), build)


# --- NF4 ------------------------------------------------------------------------------------

@cuda.jit(device=True)
def _code(y):
    """Number of NF4 midpoints strictly below y."""
    q = 0
    if y > _M0:
        q += 1
    if y > _M1:
        q += 1
    if y > _M2:
        q += 1
    if y > _M3:
        q += 1
    if y > _M4:
        q += 1
    if y > _M5:
        q += 1
    if y > _M6:
        q += 1
    if y > _M7:
        q += 1
    if y > _M8:
        q += 1
    if y > _M9:
        q += 1
    if y > _M10:
        q += 1
    if y > _M11:
        q += 1
    if y > _M12:
        q += 1
    if y > _M13:
        q += 1
    if y > _M14:
        q += 1
    return q


@cuda.jit(device=True)
def _nanmax(m, a):
    """max that keeps a NaN once seen (a NaN input must reach absmax, as on the CPU)."""
    if a > m or a != a:
        return a
    return m


@cuda.jit(device=True)
def _segment_nanmax(sm, tid, lane, width):
    """``sm[segment start] = _nanmax over its width entries`` for the segments of ``width``
    (a power of two) consecutive threads; ``lane`` = the thread's index in its segment
    (``tid`` itself for one segment spanning the block). A shared-memory tree; every
    thread of the block must call it, after the writes of sm are synchronised."""
    s = width // 2
    while s > 0:
        if lane < s:
            sm[tid] = _nanmax(sm[tid], sm[tid + s])
        cuda.syncthreads()
        s //= 2


def make_nf4_quantize_fused():
    """Quantize kernel for a power-of-two blocksize with blocksize / 2 <= THREADS: one
    thread per output byte (two elements, coalesced 8-byte loads), the block's absmax by a
    shared-memory tree over the blocksize / 2 threads of each NF4 block, then the codes.
    One pass over x."""
    T = THREADS

    def build():
        @cuda.jit
        def nf4_quantize_fused_k(x, blocksize, bshift, nfull, packed, absmax, bad):
            sm = cuda.shared.array(T, np.float32)
            tid = cuda.threadIdx.x
            p = cuda.blockIdx.x * T + tid
            n = x.size
            e0 = 2 * p
            half = blocksize // 2
            m = np.float32(0.0)
            if e0 < n:
                m = abs(x[e0])
                if e0 + 1 < n:
                    m = _nanmax(m, abs(x[e0 + 1]))
            sm[tid] = m
            cuda.syncthreads()
            lane = tid & (half - 1)
            _segment_nanmax(sm, tid, lane, half)
            if e0 < n:
                am = sm[tid - lane]
                b = e0 >> bshift  # blocksize = 2**bshift on this path
                if b < nfull:
                    if lane == 0:
                        absmax[b] = am
                    inv = ONE / max(am, TINY)
                    q0 = _code(x[e0] * inv)
                    q1 = _code(x[e0 + 1] * inv)
                else:
                    am = max(am, TINY)
                    if lane == 0:
                        absmax[b] = am
                    q0 = _code(x[e0] / am)
                    q1 = 7
                    if e0 + 1 < n:
                        q1 = _code(x[e0 + 1] / am)
                packed[p] = (q0 << 4) | q1
                if lane == 0 and not (am < INF):
                    bad[0] = 1

        return nf4_quantize_fused_k

    return _cached(("qfused", T), build)


def make_nf4_absmax():
    """Generic absmax pass (any blocksize): one block of REDUCE_THREADS per NF4 block,
    strided coalesced loads, shared-memory tree; the partial last block stores its
    clamped absmax (as bitsandbytes' CPU path)."""
    T = REDUCE_THREADS

    def build():
        @cuda.jit
        def nf4_absmax_k(x, blocksize, nfull, absmax, bad):
            sm = cuda.shared.array(T, np.float32)
            tid = cuda.threadIdx.x
            b = cuda.blockIdx.x
            n = x.size
            start = b * blocksize
            stop = min(n, start + blocksize)
            m = np.float32(0.0)
            for k in range(start + tid, stop, T):
                m = _nanmax(m, abs(x[k]))
            sm[tid] = m
            cuda.syncthreads()
            _segment_nanmax(sm, tid, tid, T)
            if tid == 0:
                am = sm[0]
                if b >= nfull:
                    am = max(am, TINY)
                absmax[b] = am
                if not (am < INF):
                    bad[0] = 1

        return nf4_absmax_k

    return _cached(("absmax", T), build)


@cuda.jit(device=True)
def _nibble(packed, k):
    """NF4 code k of a packed array (high nibble first). Both branches int64: a uint8
    shifted (uint64) unified with a uint8 masked (int64) would type as float64, which
    the simulator accepts and the CUDA compiler refuses as an index."""
    b = np.int64(packed[k >> 1])
    if (k & 1) == 0:
        return b >> 4
    return b & 15


@cuda.jit(device=True)
def _block_of(k, blocksize, bshift):
    """k // blocksize for k >= 0: a shift when ``bshift`` >= 0 (blocksize = 2**bshift), a
    32-bit division when ``bshift`` == -1 (indices < 2**32), else a 64-bit one."""
    if bshift >= 0:
        return k >> bshift
    if bshift == -1:
        return np.int64(np.uint32(k) // np.uint32(blocksize))
    return k // blocksize


@cuda.jit(device=True)
def _code_at(x, k, blocksize, bshift, nfull, absmax):
    b = _block_of(k, blocksize, bshift)
    if b < nfull:
        return _code(x[k] * (ONE / max(absmax[b], TINY)))
    return _code(x[k] / absmax[b])


@cuda.jit
def nf4_codes(x, blocksize, bshift, nfull, absmax, packed):
    """Generic code pass (after :func:`make_nf4_absmax`): one thread per output byte."""
    p = cuda.grid(1)
    n = x.size
    if p >= packed.size:
        return
    k = 2 * p
    q0 = _code_at(x, k, blocksize, bshift, nfull, absmax)
    q1 = 7
    if k + 1 < n:
        q1 = _code_at(x, k + 1, blocksize, bshift, nfull, absmax)
    packed[p] = (q0 << 4) | q1


def make_nf4_dequantize_range():
    """``out[k - start] = code[nibble k] * absmax[k // blocksize]`` for k in [start, stop):
    one thread per element, the 16-entry table in shared memory."""
    T = THREADS

    def build():
        @cuda.jit
        def nf4_dequantize_range_k(packed, absmax, blocksize, bshift, code, start, stop, out):
            cs = cuda.shared.array(16, np.float32)
            tid = cuda.threadIdx.x
            for c in range(tid, 16, T):
                cs[c] = code[c]
            cuda.syncthreads()
            k = start + cuda.blockIdx.x * T + tid
            if k < stop:
                out[k - start] = cs[_nibble(packed, k)] * absmax[_block_of(k, blocksize, bshift)]

        return nf4_dequantize_range_k

    return _cached(("deq", T), build)


def make_nf4_gemv():
    """Fused NF4 GEMV (batch 1) + LoRA expand + bias, for in % 8 == 0 and
    in % blocksize == 0, blocksize % 8 == 0. The packed codes are read as uint32 words
    (8 codes): a block's threads stride over the words of GEMV_ROWS rows together (each
    load coalesced, each x value loaded once for all the rows), decode through the
    16-entry table in shared memory, apply the block scale per word, and reduce in
    shared memory. x is staged in shared memory one chunk of GEMV_THREADS words
    (8 * GEMV_THREADS floats) at a time: a coalesced global read, stored transposed as
    ``xs[c, w] = x[8 w + c]`` with rows padded by 4 floats, so that both the staging
    stores and the per-lane reads ``xs[c, tid]`` are free of bank conflicts.
    ``bshift``: log2(blocksize) or -1 / -2 (see :func:`_block_of`). u: (1, r) already
    scaled; y: (out,)."""
    T, R = GEMV_THREADS, GEMV_ROWS
    TP = T + 4  # padded row of the staged x (a closure constant: shared shapes must be)

    def build():
        @cuda.jit
        def nf4_gemv_k(words, scales, blocksize, bshift, code, x, u, lora_b, bias, use_bias, y):
            cs = cuda.shared.array(16, np.float32)
            xs = cuda.shared.array((8, TP), np.float32)
            part = cuda.shared.array((R, T), np.float32)
            tid = cuda.threadIdx.x
            for c in range(tid, 16, T):
                cs[c] = code[c]
            in_f = x.size
            out_f = y.size
            wpr = in_f // 8
            bpr = in_f // blocksize
            o0 = cuda.blockIdx.x * R
            acc = cuda.local.array(R, np.float32)
            for r in range(R):
                acc[r] = 0
            for w0 in range(0, wpr, T):
                # stage x[8 w0 : 8 (w0 + T)]: consecutive threads read consecutive floats
                j0 = w0 * 8
                for s_ in range(8):
                    e = s_ * T + tid
                    v = np.float32(0.0)
                    if j0 + e < in_f:
                        v = x[j0 + e]
                    xs[e & 7, e >> 3] = v
                cuda.syncthreads()
                w = w0 + tid
                if w < wpr:
                    x0 = xs[0, tid]
                    x1 = xs[1, tid]
                    x2 = xs[2, tid]
                    x3 = xs[3, tid]
                    x4 = xs[4, tid]
                    x5 = xs[5, tid]
                    x6 = xs[6, tid]
                    x7 = xs[7, tid]
                    jb = _block_of(w * 8, blocksize, bshift)
                    for r in range(R):
                        o = o0 + r
                        if o < out_f:
                            wd = words[o * wpr + w]
                            d = (cs[(wd >> 4) & 15] * x0 + cs[wd & 15] * x1
                                 + cs[(wd >> 12) & 15] * x2 + cs[(wd >> 8) & 15] * x3
                                 + cs[(wd >> 20) & 15] * x4 + cs[(wd >> 16) & 15] * x5
                                 + cs[(wd >> 28) & 15] * x6 + cs[(wd >> 24) & 15] * x7)
                            acc[r] += scales[o * bpr + jb] * d
                cuda.syncthreads()
            for r in range(R):
                part[r, tid] = acc[r]
            cuda.syncthreads()
            _block_sum_rows(part, R, tid, T)
            if tid < R:
                o = o0 + tid
                if o < out_f:
                    v = part[tid, 0]
                    lo = np.float32(0.0)
                    for t in range(u.shape[1]):
                        lo += u[0, t] * lora_b[o, t]
                    v += lo
                    if use_bias:
                        v += bias[o]
                    y[o] = v

        return nf4_gemv_k

    return _cached(("gemv", T, R), build)


# --- tiled matmul (dense or NF4 weight, LoRA expand and bias fused in the epilogue) ---------

def _gemm_source(nf4, BM, BN, BK, TM, TN, x_k1=True, w_k1=True):
    """The source of the tiled matmul kernel for one tile shape. Generated so that each
    thread's TM x TN accumulators and its TM + TN operands are scalar variables: a
    ``cuda.local.array`` indexed in loops the compiler does not fully unroll lives in
    local memory (ptxas showed a 256-byte stack frame for 8 x 8), while scalars stay in
    registers. The reduction over k is one ``acc += a * b`` per step, in k order, for every
    tile shape (so a row's result does not depend on the tile chosen for the batch).
    ``x_k1`` / ``w_k1``: whether X / W is contiguous along k (element stride 1), which
    decides how the threads map to a tile's elements in the loads (consecutive threads on
    the contiguous dimension). Specialised at build time: a run-time branch on the
    strides made the compiler keep both mappings' addresses live (166 registers for a
    2 x 4 tile against 126 with one)."""
    NT = (BM // TM) * (BN // TN)
    NX, NY = BN // TN, BM // TM
    XW, WW = BM + GEMM_PAD, BN + GEMM_PAD
    ms, qs = range(TM), range(TN)
    L = ["def gemm_k(X, sxi, sxk, W, swo, swk, packed, scales, blocksize, bshift, code, M, N, K, alpha,",
         "           U, sui, sut, Bm, sbo, sbt, R, bias, use_bias, C, ldc, accumulate):",
         f"    Xs = cuda.shared.array(({BK}, {XW}), np.float32)",
         f"    Ws = cuda.shared.array(({BK}, {WW}), np.float32)",
         "    tid = cuda.threadIdx.x",
         f"    ty = tid // {NX}",
         f"    tx = tid % {NX}",
         f"    i0 = cuda.blockIdx.y * {BM}",
         f"    o0 = cuda.blockIdx.x * {BN}"]
    if nf4:
        L += ["    cs = cuda.shared.array(16, np.float32)",
              f"    for c in range(tid, 16, {NT}):",
              "        cs[c] = code[c]",
              "    cuda.syncthreads()"]
    L += [f"    c{m}_{q} = np.float32(0.0)" for m in ms for q in qs]
    def tile_load(dst, rows, k1, row0, limit, value):
        """Source lines loading the rows x BK tile ``dst`` of one operand: element e of the
        tile; consecutive threads on the operand's contiguous dimension (k when k1)."""
        return [f"        for e in range(tid, {rows * BK}, {NT}):",
                f"            r = e // {BK}" if k1 else f"            kk = e // {rows}",
                f"            kk = e % {BK}" if k1 else f"            r = e % {rows}",
                f"            g = {row0} + r",
                "            k = k0 + kk",
                "            v = np.float32(0.0)",
                f"            if g < {limit} and k < K:",
                *value,
                f"            {dst}[kk, r] = v"]

    w_value = (["                idx = g * swo + k * swk",
                "                v = cs[_nibble(packed, idx)] * scales[_block_of(idx, blocksize, bshift)]"] if nf4
               else ["                v = W[g * swo + k * swk]"])
    L += [f"    for k0 in range(0, K, {BK}):",
          *tile_load("Xs", BM, x_k1, "i0", "M", ["                v = X[g * sxi + k * sxk]"]),
          *tile_load("Ws", BN, w_k1, "o0", "N", w_value),
          "        cuda.syncthreads()",
          f"        for kk in range({BK}):"]
    L += [f"            a{m} = Xs[kk, ty + {m * NY}]" for m in ms]
    L += [f"            b{q} = Ws[kk, tx + {q * NX}]" for q in qs]
    L += [f"            c{m}_{q} += a{m} * b{q}" for m in ms for q in qs]
    L += ["        cuda.syncthreads()"]
    for m in ms:
        L += [f"    i = i0 + ty + {m * NY}",
              "    if i < M:"]
        for q in qs:
            L += [f"        o = o0 + tx + {q * NX}",
                  "        if o < N:",
                  f"            v = alpha * c{m}_{q}",
                  "            lo = np.float32(0.0)",
                  "            for t in range(R):",
                  "                lo += U[i * sui + t * sut] * Bm[o * sbo + t * sbt]",
                  "            v += lo",
                  "            if use_bias:",
                  "                v += bias[o]",
                  "            if accumulate:",
                  "                v += C[i * ldc + o]",
                  "            C[i * ldc + o] = v"]
    return "\n".join(L) + "\n"


def _register_cap(threads):
    """``cuda.jit`` options capping registers so that two blocks of ``threads`` fit on an
    SM (65536 registers): for the 256-thread 128 x 128 tile ptxas then uses 125 registers
    without spilling instead of 145 (one block per SM). Nothing under the simulator."""
    from numba import config

    cap = min(255, 65536 // (2 * threads)) // 8 * 8
    if config.ENABLE_CUDASIM or cap >= 255 - 7:
        return {}
    return {"max_registers": cap}


def gemm_tile(M):
    """The GEMM tile for M output rows (GEMM_TILES, else GEMM_TILE)."""
    for max_m, tile in GEMM_TILES:
        if M <= max_m:
            return tuple(tile)
    return tuple(GEMM_TILE)


def make_gemm(nf4: bool, tile=None, x_k1=True, w_k1=True):
    """``C[i, o] = alpha * sum_k X(i, k) W(o, k) + sum_t U(i, t) Bm(o, t) + bias[o]
    (+ C[i, o] when accumulate)`` for i < M, o < N, with every operand a flat array and
    element strides, so one kernel serves the forward (x W^T + s (x A^T) B^T + b), the
    fan_in_fan_out layout, and every product of the backward. With ``nf4`` the weight
    element (o, k) is flat index ``o * swo + k * swk`` of an NF4 tensor, decoded while
    its tile is loaded into shared memory (never materialised); ``bshift`` >= 0 is
    log2(blocksize) (a shift instead of a division), -1 a 32-bit division, -2 a 64-bit one.

    ``tile`` (default GEMM_TILE; :func:`gemm_tile` picks one from M) is compiled once per
    value, and per layout: ``x_k1`` / ``w_k1`` say whether ``sxk`` / ``swk`` is 1 (the
    launch must agree). Loads map consecutive threads to the operand's contiguous dimension; the
    shared tiles are padded by GEMM_PAD floats per row, and thread (ty, tx) owns rows
    ``ty + m * NY`` and columns ``tx + q * NX`` (strided by the thread grid), so the reads
    of a warp from shared memory hit distinct banks (or broadcast) and its stores of C
    are coalesced."""
    BM, BN, BK, TM, TN = tile if tile is not None else GEMM_TILE
    NT = (BM // TM) * (BN // TN)
    XW = BM + GEMM_PAD  # the padded row lengths are part of the compiled kernel's key
    WW = BN + GEMM_PAD
    NF4 = bool(nf4)
    XK1, WK1 = bool(x_k1), bool(w_k1)

    def build():
        src = _gemm_source(NF4, BM, BN, BK, TM, TN, XK1, WK1)
        ns = {"__name__": __name__, "cuda": cuda, "np": np, "_nibble": _nibble, "_block_of": _block_of}
        exec(compile(src, f"<numlora.cuda.kernels.gemm nf4={NF4} tile={(BM, BN, BK, TM, TN)} x_k1={XK1} w_k1={WK1}>",
                     "exec"), ns)
        # the cap only where ptxas fits it without spilling (benchmarks/ptx_check.py: the
        # 128 x 128 tile with one operand transposed spills 12-44 bytes under it)
        return cuda.jit(**(_register_cap(NT) if XK1 == WK1 else {}))(ns["gemm_k"])

    return _cached(("gemm", NF4, BM, BN, BK, TM, TN, XW, WW, XK1, WK1), build)


def make_lora_shrink():
    """``u[i, t] = scale * sum_j X(i, j) Y(t, j)`` (flat operands with element strides):
    one block per (i, t), coalesced strided loads, shared-memory tree. The LoRA shrink
    ``s x A^T`` and the backward's ``s G B``: long reductions into a small output, which
    a tiled matmul would spread over too few blocks. SHRINK_THREADS per block."""
    T = SHRINK_THREADS

    def build():
        @cuda.jit
        def lora_shrink_k(X, sxi, sxj, K, Y, syt, syj, scale, u):
            sm = cuda.shared.array((1, T), np.float32)
            tid = cuda.threadIdx.x
            r = u.shape[1]
            i = cuda.blockIdx.x // r
            t = cuda.blockIdx.x % r
            acc = np.float32(0.0)
            for j in range(tid, K, T):
                acc += X[i * sxi + j * sxj] * Y[t * syt + j * syj]
            sm[0, tid] = acc
            cuda.syncthreads()
            _block_sum_rows(sm, 1, tid, T)
            if tid == 0:
                u[i, t] = scale * sm[0, 0]

        return lora_shrink_k

    return _cached(("shrink", T), build)


# --- many adapters in one batch (LoraBank on the GPU) --------------------------------------

def make_multi_lora_shrink():
    """``u[p, t] = rs[p] * sum_j x[src_p, j] A_k^T[j, t]`` for the grouped row p of one
    pool block (the first half of the CPU's :func:`multi_lora_add`). ``rows`` (3, N) int64
    per grouped row: the batch row ``src_p``, the float offset of its adapter in ``pool``
    (A^T (in, r) row-major, then B^T (r, out)) and the rank r; ``rs`` (N,) float32 the
    row's ``scaling_k * scale_p``. Block (blockIdx.x = p - p0, blockIdx.y = rank chunk):
    MULTI_THREADS threads stride over j, each keeping MULTI_RANKS accumulators; a
    shared-memory tree per rank. Each row's sums run in one fixed order whatever else is
    in the batch (row-stable)."""
    T = MULTI_THREADS
    RT = MULTI_RANKS

    def build():
        @cuda.jit
        def multi_lora_shrink_k(x, in_f, rows, rs, pool, p0, u):
            sm = cuda.shared.array((RT, T), np.float32)
            tid = cuda.threadIdx.x
            p = p0 + cuda.blockIdx.x
            t0 = cuda.blockIdx.y * RT
            src = rows[0, p]
            off = rows[1, p]
            r = rows[2, p]
            nt = min(RT, r - t0)
            acc = cuda.local.array(RT, np.float32)
            for q in range(RT):
                acc[q] = 0
            if nt > 0:
                xrow = src * in_f
                for j in range(tid, in_f, T):
                    xv = x[xrow + j]
                    base = off + j * r + t0
                    for q in range(RT):
                        if q < nt:
                            acc[q] += xv * pool[base + q]
            for q in range(RT):
                sm[q, tid] = acc[q]
            cuda.syncthreads()
            _block_sum_rows(sm, RT, tid, T)
            if tid < nt:
                u[p, t0 + tid] = rs[p] * sm[tid, 0]

        return multi_lora_shrink_k

    return _cached(("multi_shrink", T, RT), build)


def make_multi_lora_expand():
    """``y[src_p, o] += sum_t u[p, t] B_k^T[t, o]`` (summed in order over t, as the CPU
    kernel) for the grouped row p of one pool block: block (blockIdx.x = p - p0,
    blockIdx.y = column chunk), consecutive threads on consecutive columns (coalesced
    reads of B^T and of y)."""
    T = MULTI_THREADS

    def build():
        @cuda.jit
        def multi_lora_expand_k(u, rows, pool, in_f, out_f, p0, y):
            p = p0 + cuda.blockIdx.x
            o = cuda.blockIdx.y * T + cuda.threadIdx.x
            if o >= out_f:
                return
            src = rows[0, p]
            r = rows[2, p]
            bt = rows[1, p] + in_f * r
            idx = src * out_f + o
            v = y[idx]
            for t in range(r):
                v += u[p, t] * pool[bt + t * out_f + o]
            y[idx] = v

        return multi_lora_expand_k

    return _cached(("multi_expand", T), build)


@cuda.jit
def pack_adapter(lora_a, lora_b, dst):
    """dst[: in * r] = A^T (in, r) row-major, dst[in * r:] = B^T (r, out) row-major, from
    device lora_a (r, in) and lora_b (out, r): the bank's layout (the CPU
    :func:`pack_adapter`), one thread per element."""
    idx = cuda.grid(1)
    r, in_f = lora_a.shape
    out_f = lora_b.shape[0]
    na = in_f * r
    if idx < na:
        j = idx // r
        dst[idx] = lora_a[idx - j * r, j]
    elif idx < na + out_f * r:
        e = idx - na
        t = e // out_f
        dst[idx] = lora_b[e - t * out_f, t]


# --- merge and AdamW -------------------------------------------------------------------------

@cuda.jit
def merge_plain(w, p, q, scale):
    """``w[i, j] += scale * sum_t p[i, t] q[t, j]`` (summed in order over t), one thread
    per element; ``scale < 0`` unmerges. w, p, q: 2-D float32."""
    idx = cuda.grid(1)
    m, k = w.shape
    if idx >= m * k:
        return
    if m * k <= 4294967295:  # 32-bit division when the indices fit
        i = np.int64(np.uint32(idx) // np.uint32(k))
    else:
        i = np.int64(idx // k)
    j = idx - i * k
    acc = np.float32(0.0)
    for t in range(p.shape[1]):
        acc += p[i, t] * q[t, j]
    w[i, j] += scale * acc


@cuda.jit
def adamw_step(value, grad, m, v, lr, beta1, beta2, eps, decay, bc1, bc2_sqrt):
    """One AdamW step over flat arrays, one thread per element, each element in float64
    and stored in the arrays' dtype (torch.optim.AdamW's formulas, as the CPU kernel)."""
    k = cuda.grid(1)
    if k >= value.size:
        return
    step_size = lr / bc1
    w1 = 1.0 - beta1
    w2 = 1.0 - beta2
    g = np.float64(grad[k])
    mk = np.float64(m[k])
    mk = mk + w1 * (g - mk)
    vk = beta2 * np.float64(v[k]) + w2 * g * g
    m[k] = mk
    v[k] = vk
    p = np.float64(value[k]) * decay
    value[k] = p - step_size * np.float64(m[k]) / (math.sqrt(np.float64(v[k])) / bc2_sqrt + eps)
