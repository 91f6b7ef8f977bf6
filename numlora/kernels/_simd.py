"""SIMD NF4 decode through numba intrinsics: 16 (AVX-512) or 8 (AVX2) nibbles per
instruction.

The 16 NF4 codes fit in one 512-bit register, so ``vpermps`` with the nibbles as indices
decodes 16 weights at once (AVX-512); on AVX2 two 8-entry ``vpermps`` and a blend on bit 3
do the same for 8. LLVM does not find this on its own (a table lookup becomes a gather or
scalar loads), hence the hand-built IR. ``LANES`` is 16, 8, or 0 where neither instruction
set is available, numba targets another CPU than this one (``NUMBA_CPU_NAME``), or
``NUMLORA_SIMD=0``; callers then use the portable kernels.

Arithmetic of a row's dot product (what every caller computes, in this order): for each
block, the products of consecutive chunks of LANES weights with x are added lane-wise
(chunk 0, then + chunk 1, ...), the block vector is multiplied by the block's absmax and
added lane-wise into the row vector; the row vector is summed by halving (lanes 0..L/2-1
plus L/2..L-1, and so on). No FMA contraction, no reassociation.

The word decode (``dot_words``, used where blocks are whole chunks of 8 * LANES weights or
exactly half of one, e.g. blocksize 64 on AVX-512) loads 4 * LANES bytes as 32-bit words
and decodes each nibble position with a shift and one permute, with x reordered to match;
its order of operations is described there (its products accumulate with fused
multiply-adds where the CPU has them, :data:`FMA`). A given blocksize always takes the
same decode, so results stay independent of the batch size and the thread count.
"""

from __future__ import annotations

import struct

from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core import config as numba_config
from numba.extending import intrinsic

from .. import _config


def _host_has(feature: str) -> bool:
    """Whether the host CPU has ``feature`` (LLVM's name: ``avx2``, ``fma``, ...); False
    where llvmlite cannot tell."""
    try:
        return bool(llvm_binding.get_host_cpu_features().get(feature, False))
    except Exception:  # pragma: no cover - llvmlite without the query
        return False


def _host_lanes(max_lanes: int = 16) -> int:
    if not _config.SIMD or numba_config.DISABLE_JIT or numba_config.CPU_NAME not in (None, "", "host"):
        return 0
    if _host_has("avx512f") and max_lanes >= 16:
        return 16
    if _host_has("avx2"):
        return 8
    return 0


LANES = _host_lanes(_config.SIMD_MAX_LANES)


def _host_fma() -> bool:
    """Whether the SIMD build may use fused multiply-adds (the CPU has FMA3: every AVX-512
    CPU and, in practice, every AVX2 one)."""
    return bool(LANES) and _host_has("fma")


#: True where the word decode's products (``dot_words``) accumulate with fused
#: multiply-adds (one rounding per step instead of two; measured 1.27-1.30x faster).
FMA = _host_fma()

#: numba's cache key knows the CPU but not NUMLORA_SIMD: cache the SIMD kernels only when
#: they use the host's natural width (a capped width compiles in memory).
CACHEABLE = LANES == _host_lanes()

F32 = ir.FloatType()
I8 = ir.IntType(8)
I32 = ir.IntType(32)
I64 = ir.IntType(64)


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(builder, value, n):
    v = builder.insert_element(ir.Constant(_vec(value.type, n), ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(_vec(value.type, n), ir.Undefined), ir.Constant(_vec(I32, n), [0] * n))


def _decode_chunk(builder, bptr, codes, lanes):
    """Decode ``lanes`` consecutive NF4 weights starting at byte pointer ``bptr`` (first
    element in the high nibble) to a <lanes x float> of code values."""
    nb = lanes // 2
    raw = builder.load(builder.bitcast(bptr, _vec(I8, nb).as_pointer()), align=1)
    hi = builder.lshr(raw, ir.Constant(_vec(I8, nb), [4] * nb))
    lo = builder.and_(raw, ir.Constant(_vec(I8, nb), [15] * nb))
    inter = builder.shuffle_vector(hi, lo, ir.Constant(_vec(I32, lanes), [v for p in range(nb) for v in (p, nb + p)]))
    return _permute(builder, codes, builder.zext(inter, _vec(I32, lanes)), lanes)


#: Blocksize whose block body is fully unrolled; other blocksizes run the group loop.
#: Both compute the same operations in the same order.
UNROLLED_BLOCKSIZE = 64


def _permute(builder, table, idx, lanes):
    """table[idx] for a 16-entry float table held in registers (see _load_codes) and
    <lanes x i32> indices in 0..15."""
    if lanes == 16:
        perm = cgutils.get_or_insert_function(builder.module,
                                              ir.FunctionType(_vec(F32, 16), [_vec(F32, 16), _vec(I32, 16)]),
                                              "llvm.x86.avx512.permvar.sf.512")
        return builder.call(perm, [table, idx])
    # AVX2: the table is a pair (low 8, high 8); vpermps uses the low 3 bits of each index
    perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_vec(F32, 8), [_vec(F32, 8), _vec(I32, 8)]),
                                          "llvm.x86.avx2.permps")
    lo_t, hi_t = table
    a = builder.call(perm, [lo_t, idx])
    b = builder.call(perm, [hi_t, idx])
    high = builder.icmp_unsigned(">=", idx, ir.Constant(_vec(I32, 8), [8] * 8))
    return builder.select(high, b, a)


def _load_codes(builder, code_ptr, lanes):
    if lanes == 16:
        return builder.load(builder.bitcast(code_ptr, _vec(F32, 16).as_pointer()), align=4)
    lo = builder.load(builder.bitcast(code_ptr, _vec(F32, 8).as_pointer()), align=4)
    hi = builder.load(builder.bitcast(builder.gep(code_ptr, [ir.Constant(I64, 8)]), _vec(F32, 8).as_pointer()), align=4)
    return (lo, hi)


def _host_planes8() -> bool:
    """Whether the 8-lane word decode looks its nibbles up through byte planes
    (:func:`_words_planes8`) rather than two ``vpermps`` and a blend per vector: on AMD's
    Zen cores, where the lane-crossing permute is the slow shuffle (measured on Zen 3, one
    thread, 4096 x 4096 from cache, in one process: the two-row GEMV loop 2.59 -> 1.59 ms);
    Intel's AVX2 cores issue every shuffle on one port, where the permute's two per vector
    are fewer than the planes' four. ``NUMLORA_WORDS8=planes`` / ``permute`` chooses."""
    if _config.WORDS8:
        return _config.WORDS8 == "planes"
    try:
        return llvm_binding.get_host_cpu_name().startswith("znver")
    except Exception:  # pragma: no cover - llvmlite without the query
        return False


if _config.WORDS8 not in ("", "planes", "permute"):
    from ..errors import ConfigError

    raise ConfigError(f"NUMLORA_WORDS8: expected 'planes' or 'permute', got {_config.WORDS8!r}")
#: The 8-lane word decode through byte planes (see :func:`_host_planes8`).
PLANES8 = LANES == 8 and _host_planes8()


def _load_planes(builder, code_ptr):
    """The 16-entry float table at ``code_ptr`` as four <32 x i8> byte planes: plane k
    holds byte k of every entry's bits (entry n at byte n, both 128-bit lanes alike): the
    tables ``vpshufb`` looks nibbles up in (:func:`_planes_floats`)."""
    raw = builder.load(builder.bitcast(code_ptr, _vec(I8, 64).as_pointer()), align=4)
    und = ir.Constant(_vec(I8, 64), ir.Undefined)
    return [builder.shuffle_vector(raw, und, ir.Constant(_vec(I32, 32), [4 * (n % 16) + k for n in range(32)]))
            for k in range(4)]


def _pshufb(builder, table, idx):
    """``vpshufb``: per 128-bit lane, table's byte idx[j] into byte j (idx 0..15)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_vec(I8, 32), [_vec(I8, 32), _vec(I8, 32)]),
                                        "llvm.x86.avx2.pshuf.b")
    return builder.call(fn, [table, idx])


def _planes_idx(builder, words):
    """The nibbles of <8 x i32> ``words`` (32 bytes) as two <32 x i8> index vectors for
    :func:`_planes_floats`: per 128-bit lane (16 bytes, words 0-3 or 4-7), groups of four
    bytes holding one decoded vector's four lanes. The bytes transposed 4 x 4 (group k:
    byte k of each word), split into high and low nibbles, interleaved by dwords: the
    first vector holds decoded vectors 0-3, the second 4-7 (even: high nibbles)."""
    b32 = _vec(I8, 32)
    raw = builder.bitcast(words, b32)
    q = _pshufb(builder, raw, ir.Constant(b32, [4 * (j % 4) + (j % 16) // 4 + 16 * (j // 16) for j in range(32)]))
    hi = builder.bitcast(builder.lshr(q, ir.Constant(b32, [4] * 32)), _vec(I32, 8))
    lo = builder.bitcast(builder.and_(q, ir.Constant(b32, [15] * 32)), _vec(I32, 8))
    return [builder.bitcast(builder.shuffle_vector(hi, lo, ir.Constant(_vec(I32, 8), m)), b32)
            for m in ([0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15])]


def _planes_floats(builder, idx, planes):
    """The four <8 x float> table values of an index vector of :func:`_planes_idx`: each
    nibble looked up in the four byte planes (``vpshufb``), the planes interleaved back
    into floats (bytes into 16-bit words, words into dwords; in-lane unpacks)."""
    w16 = _vec(ir.IntType(16), 16)
    p = [_pshufb(builder, t, idx) for t in planes]
    by = [[v for o in (h, 16 + h) for j in range(8) for v in (o + j, 32 + o + j)] for h in (0, 8)]
    wd = [[v for o in (h, 8 + h) for j in range(4) for v in (o + j, 16 + o + j)] for h in (0, 4)]
    w01 = [builder.bitcast(builder.shuffle_vector(p[0], p[1], ir.Constant(_vec(I32, 32), m)), w16) for m in by]
    w23 = [builder.bitcast(builder.shuffle_vector(p[2], p[3], ir.Constant(_vec(I32, 32), m)), w16) for m in by]
    return [builder.bitcast(builder.shuffle_vector(w01[h], w23[h], ir.Constant(_vec(I32, 16), m)), _vec(F32, 8))
            for h in range(2) for m in wd]


def _words_planes8(builder, words, planes):
    """The eight vectors of the 8-lane word decode (:func:`_make_dot_words`: vector m,
    lane l is the table value of the nibble of byte 4 l + m // 2, the high one for even m)
    through in-lane byte shuffles: the same float bits in the same lanes as the
    ``vpermps`` decode, so every product keeps its bits."""
    return [v for idx in _planes_idx(builder, words) for v in _planes_floats(builder, idx, planes)]


def _hsum(builder, v, lanes):
    width = lanes
    while width > 1:
        half = width // 2
        und = ir.Constant(_vec(F32, width), ir.Undefined)
        a = builder.shuffle_vector(v, und, ir.Constant(_vec(I32, half), list(range(half))))
        b = builder.shuffle_vector(v, und, ir.Constant(_vec(I32, half), list(range(half, width))))
        v = builder.fadd(a, b)
        width = half
    return builder.extract_element(v, ir.Constant(I32, 0))


def _emit_dot_rows(builder, pk_data, xe_rows, xo_rows, sc_data, nblocks, bs, codes, lanes, wrows=None):
    """The row dot products of one weight row with len(xe_rows) inputs; returns their
    scalar results. x is given split into even elements (xe) and odd elements (xo), so
    the high nibbles (even elements) and low nibbles (odd elements) of each group of
    ``lanes`` bytes decode with one permute each and no interleaving shuffle.

    Order of operations, per input row: for each block, blk = 0; for each group of
    ``lanes`` bytes in order: blk += w_hi * xe_chunk; blk += w_lo * xo_chunk; then
    row += blk * absmax[block]; finally the halving sum of row's lanes.

    wrows: optional list of (packed, scales) pointers, one per entry of xe_rows: then
    accumulator g takes weight row wrows[g] (the rows of several weight rows with one
    input, for a GEMV: independent dependency chains that keep the FP units busy) and
    pk_data / sc_data are unused. Each row's operations are the same either way."""
    vt = _vec(F32, lanes)
    vp = vt.as_pointer()
    zero = ir.Constant(vt, None)
    L = ir.Constant(I64, lanes)
    n = len(xe_rows)
    row_p = [cgutils.alloca_once_value(builder, zero) for _ in range(n)]
    blk_p = [cgutils.alloca_once_value(builder, zero) for _ in range(n)]
    ngroups = builder.udiv(bs, ir.Constant(I64, 2 * lanes))
    unrolled = UNROLLED_BLOCKSIZE // (2 * lanes)
    is_unrolled = builder.icmp_unsigned("==", bs, ir.Constant(I64, UNROLLED_BLOCKSIZE))
    bt = _vec(I8, lanes)
    four = ir.Constant(bt, [4] * lanes)
    fifteen = ir.Constant(bt, [15] * lanes)

    def decode(pk, e):
        raw = builder.load(builder.bitcast(builder.gep(pk, [e]), bt.as_pointer()), align=1)
        if lanes == 16:
            # vpermps reads the low 4 bits of each index: one widening of the bytes
            # serves both nibbles (the low one as is, the high one shifted down)
            wide = builder.zext(raw, _vec(I32, lanes))
            w_hi = _permute(builder, codes, builder.lshr(wide, ir.Constant(_vec(I32, lanes), [4] * lanes)), lanes)
            w_lo = _permute(builder, codes, wide, lanes)
            return w_hi, w_lo
        w_hi = _permute(builder, codes, builder.zext(builder.lshr(raw, four), _vec(I32, lanes)), lanes)
        w_lo = _permute(builder, codes, builder.zext(builder.and_(raw, fifteen), _vec(I32, lanes)), lanes)
        return w_hi, w_lo

    def group(e):  # e: index of the group's first byte = first pair in the row
        if wrows is not None:
            for g in range(n):
                w_hi, w_lo = decode(wrows[g][0], e)
                xe = builder.load(builder.bitcast(builder.gep(xe_rows[g], [e]), vp), align=4)
                xo = builder.load(builder.bitcast(builder.gep(xo_rows[g], [e]), vp), align=4)
                acc = builder.fadd(builder.load(blk_p[g]), builder.fmul(w_hi, xe))
                builder.store(builder.fadd(acc, builder.fmul(w_lo, xo)), blk_p[g])
            return
        w_hi, w_lo = decode(pk_data, e)
        for g in range(n):
            xe = builder.load(builder.bitcast(builder.gep(xe_rows[g], [e]), vp), align=4)
            xo = builder.load(builder.bitcast(builder.gep(xo_rows[g], [e]), vp), align=4)
            acc = builder.fadd(builder.load(blk_p[g]), builder.fmul(w_hi, xe))
            builder.store(builder.fadd(acc, builder.fmul(w_lo, xo)), blk_p[g])

    with cgutils.for_range(builder, nblocks) as bl:
        b = bl.index
        pbase = builder.mul(b, builder.lshr(bs, ir.Constant(I64, 1)))
        for g in range(n):
            builder.store(zero, blk_p[g])
        with builder.if_else(is_unrolled) as (then, otherwise):
            with then:
                for q in range(unrolled):
                    group(builder.add(pbase, ir.Constant(I64, q * lanes)))
            with otherwise:
                with cgutils.for_range(builder, ngroups) as gl:
                    group(builder.add(pbase, builder.mul(gl.index, L)))
        for g in range(n):
            s = _splat(builder, builder.load(builder.gep(sc_data if wrows is None else wrows[g][1], [b])), lanes)
            builder.store(builder.fadd(builder.load(row_p[g]), builder.fmul(builder.load(blk_p[g]), s)), row_p[g])
    return [_hsum(builder, builder.load(row_p[g]), lanes) for g in range(n)]


def _make_row_dot(lanes):
    @intrinsic
    def row_dot(typingctx, packed, xe, xo, scales, code, blocksize):
        """sum_b scales[b] * sum_{j in block b} code[nibble j] * x[j] over one weight row
        (packed: its bytes; xe, xo: the even and odd elements of its input; scales: its
        blocks; blocksize % (2 * lanes) == 0), in the order of _emit_dot_rows."""
        sig = types.float32(packed, xe, xo, scales, code, blocksize)

        def codegen(context, builder, sig, args):
            pk = context.make_array(sig.args[0])(context, builder, args[0])
            xe = context.make_array(sig.args[1])(context, builder, args[1])
            xo = context.make_array(sig.args[2])(context, builder, args[2])
            sc = context.make_array(sig.args[3])(context, builder, args[3])
            cd = context.make_array(sig.args[4])(context, builder, args[4])
            bs = context.cast(builder, args[5], sig.args[5], types.int64)
            codes = _load_codes(builder, cd.data, lanes)
            nblocks = builder.extract_value(sc.shape, 0)
            return _emit_dot_rows(builder, pk.data, [xe.data], [xo.data], sc.data, nblocks, bs, codes, lanes)[0]

        return sig, codegen

    return row_dot


def round_vector(builder, v, lanes, mode):
    """<lanes x float> v rounded to bfloat16 (mode 1) or float16 (mode 2), half to even,
    and widened back: what ``kernels.compute`` computes on scalars (NaN stays NaN, made
    quiet; float16 overflows to inf and underflows through its subnormals)."""
    if mode == 2:
        return builder.fpext(builder.fptrunc(v, _vec(ir.HalfType(), lanes)), _vec(F32, lanes))
    it = _vec(I32, lanes)

    def c(k):
        return ir.Constant(it, [k] * lanes)

    b = builder.bitcast(v, it)
    nan = builder.icmp_unsigned(">", builder.and_(b, c(0x7FFFFFFF)), c(0x7F800000))
    odd = builder.and_(builder.lshr(b, c(16)), c(1))
    near = builder.and_(builder.add(builder.add(b, c(0x7FFF)), odd), c(-65536))
    quiet = builder.and_(builder.or_(b, c(0x400000)), c(-65536))
    return builder.bitcast(builder.select(nan, quiet, near), _vec(F32, lanes))


def _make_decode(lanes, nontemporal, mode=0, aligned=False):
    @intrinsic
    def decode_blocks(typingctx, packed, scales, code, blocksize, out):
        """out[k] = code[nibble k] * scales[k // blocksize] for the blocks of ``scales``
        (packed / out start at the first of those blocks; blocksize % lanes == 0).
        The non-temporal build streams the stores past the caches (for outputs much larger
        than the caches, which are not read back soon). ``aligned`` (non-temporal only):
        ``out`` starts on a vector boundary (lanes * 4 bytes), so each store is one aligned
        streaming vector store (without it LLVM splits them); an unaligned ``out`` would
        fault. ``mode`` 1 / 2: each value then rounded to bfloat16 / float16
        (:func:`round_vector`)."""
        sig = types.void(packed, scales, code, blocksize, out)

        def codegen(context, builder, sig, args):
            pk = context.make_array(sig.args[0])(context, builder, args[0])
            sc = context.make_array(sig.args[1])(context, builder, args[1])
            cd = context.make_array(sig.args[2])(context, builder, args[2])
            bs = context.cast(builder, args[3], sig.args[3], types.int64)
            oa = context.make_array(sig.args[4])(context, builder, args[4])
            nblocks = builder.extract_value(sc.shape, 0)
            codes = _load_codes(builder, cd.data, lanes)
            vt = _vec(F32, lanes)
            nchunks = builder.udiv(bs, ir.Constant(I64, lanes))
            with cgutils.for_range(builder, nblocks) as bl:
                b = bl.index
                base = builder.mul(b, bs)
                s = _splat(builder, builder.load(builder.gep(sc.data, [b])), lanes)
                with cgutils.for_range(builder, nchunks) as cl:
                    k = builder.add(base, builder.mul(cl.index, ir.Constant(I64, lanes)))
                    src = builder.gep(pk.data, [builder.lshr(k, ir.Constant(I64, 1))])
                    w = builder.fmul(_decode_chunk(builder, src, codes, lanes), s)
                    if mode:
                        w = round_vector(builder, w, lanes, mode)
                    st = builder.store(w, builder.bitcast(builder.gep(oa.data, [k]), vt.as_pointer()),
                                       align=4 * lanes if aligned else 4)
                    if nontemporal:
                        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(I32, 1)]))
            return context.get_dummy_value()

        return sig, codegen

    return decode_blocks


@intrinsic
def store_fence(typingctx):
    """``sfence``: the streaming stores before it are visible to every core before any
    store after it (another thread, e.g. a BLAS worker handed the buffer next, reads
    them; streaming stores are not ordered by the usual x86 rules)."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
        builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


#: Batch rows per call of ``rows_dot`` (their accumulators stay in registers).
GROUP = 4


def _make_rows_dot(lanes, group):
    @intrinsic
    def rows_dot(typingctx, packed, xe2, xo2, i0, scales, code, blocksize, out):
        """out[i] = row_dot(packed, xe2[i], xo2[i], scales, code, blocksize) for the
        ``group`` rows i0 .. i0 + group - 1 (xe2, xo2: (n, in / 2), C-contiguous), each
        group of W's bytes decoded once for all of them; bit-identical to row_dot."""
        sig = types.void(packed, xe2, xo2, i0, scales, code, blocksize, out)

        def codegen(context, builder, sig, args):
            pk = context.make_array(sig.args[0])(context, builder, args[0])
            xe = context.make_array(sig.args[1])(context, builder, args[1])
            xo = context.make_array(sig.args[2])(context, builder, args[2])
            first = context.cast(builder, args[3], sig.args[3], types.int64)
            sc = context.make_array(sig.args[4])(context, builder, args[4])
            cd = context.make_array(sig.args[5])(context, builder, args[5])
            bs = context.cast(builder, args[6], sig.args[6], types.int64)
            oa = context.make_array(sig.args[7])(context, builder, args[7])
            half = builder.extract_value(xe.shape, 1)
            rows = [builder.mul(builder.add(first, ir.Constant(I64, g)), half) for g in range(group)]
            codes = _load_codes(builder, cd.data, lanes)
            nblocks = builder.extract_value(sc.shape, 0)
            res = _emit_dot_rows(builder, pk.data, [builder.gep(xe.data, [r]) for r in rows],
                                 [builder.gep(xo.data, [r]) for r in rows], sc.data, nblocks, bs, codes, lanes)
            for g in range(group):
                builder.store(res[g], builder.gep(oa.data, [builder.add(first, ir.Constant(I64, g))]))
            return context.get_dummy_value()

        return sig, codegen

    return rows_dot


#: Weight rows per call of ``wrows_dot`` (one input row against each).
WROWS = 4


def _make_wrows_dot(lanes, nrows):
    @intrinsic
    def wrows_dot(typingctx, packed, o0, xe, xo, scales, code, blocksize, out):
        """out[o] = row_dot(row o of packed, xe, xo, row o of scales, code, blocksize) for
        the ``nrows`` weight rows o = o0 .. o0 + nrows - 1 (packed: (out, in / 2) bytes
        flat, scales: (out * in / blocksize,) flat, xe / xo: one input row's even and odd
        elements); bit-identical to row_dot. The rows' accumulations are independent,
        so they overlap in the FP pipelines where one row alone waits on its adds."""
        sig = types.void(packed, o0, xe, xo, scales, code, blocksize, out)

        def codegen(context, builder, sig, args):
            pk = context.make_array(sig.args[0])(context, builder, args[0])
            first = context.cast(builder, args[1], sig.args[1], types.int64)
            xe = context.make_array(sig.args[2])(context, builder, args[2])
            xo = context.make_array(sig.args[3])(context, builder, args[3])
            sc = context.make_array(sig.args[4])(context, builder, args[4])
            cd = context.make_array(sig.args[5])(context, builder, args[5])
            bs = context.cast(builder, args[6], sig.args[6], types.int64)
            oa = context.make_array(sig.args[7])(context, builder, args[7])
            half = builder.extract_value(xe.shape, 0)
            nblocks = builder.udiv(builder.mul(half, ir.Constant(I64, 2)), bs)
            codes = _load_codes(builder, cd.data, lanes)
            wr = []
            for g in range(nrows):
                o = builder.add(first, ir.Constant(I64, g))
                wr.append((builder.gep(pk.data, [builder.mul(o, half)]),
                           builder.gep(sc.data, [builder.mul(o, nblocks)])))
            res = _emit_dot_rows(builder, None, [xe.data] * nrows, [xo.data] * nrows, None, nblocks, bs, codes, lanes,
                                 wrows=wr)
            for g in range(nrows):
                builder.store(res[g], builder.gep(oa.data, [builder.add(first, ir.Constant(I64, g))]))
            return context.get_dummy_value()

        return sig, codegen

    return wrows_dot


#: Weights per chunk of the word decode (``dot_words``): one load of 4 * LANES bytes.
def words_chunk(lanes):
    return 8 * lanes


def words_ok(lanes, in_f, blocksize) -> bool:
    """Whether :func:`dot_words` applies: whole chunks per row, and blocks of whole chunks
    or of exactly half a chunk."""
    c = 8 * lanes
    return lanes > 0 and in_f % c == 0 and ((blocksize % c == 0 and in_f % blocksize == 0) or 2 * blocksize == c)


def _unpack(context, builder, sig, args, kinds):
    """An intrinsic's arguments by ``kinds`` (one letter each): ``a`` an array as numba's
    array struct, ``i`` an integer as int64."""
    return tuple(context.make_array(sig.args[k])(context, builder, args[k]) if kind == "a"
                 else context.cast(builder, args[k], sig.args[k], types.int64) for k, kind in enumerate(kinds))


def _rows_args(context, builder, sig, args):
    """The arguments of a ``(packed, o, x, i, scales, code, blocksize, out, ...)``
    intrinsic (``dot_words``, ``bf16_rows``, ``rounded_dot``): arrays as numba array structs, o, i and blocksize as
    int64."""
    return _unpack(context, builder, sig, args, "aiaiaaia")


def _row_ptrs(builder, base, first, count, stride):
    """Pointers to rows first .. first + count - 1 of a C-contiguous array's data."""
    return [builder.gep(base, [builder.mul(builder.add(first, ir.Constant(I64, a)), stride)]) for a in range(count)]


def _weight_rows(builder, pk, sc, first, count, in_f, bs):
    """(packed bytes, scales) pointers of the weight rows first .. first + count - 1 (an
    NF4 weight of rows of in_f elements: in_f / 2 bytes and in_f / bs scales each)."""
    return list(zip(_row_ptrs(builder, pk.data, first, count, builder.lshr(in_f, ir.Constant(I64, 1))),
                    _row_ptrs(builder, sc.data, first, count, builder.udiv(in_f, bs))))


def _halves(builder, s0, s1, lanes):
    """A <lanes x float> of s0 in lanes 0..lanes/2-1 and s1 in the rest (the scales of a
    chunk that holds two blocks)."""
    und = ir.Constant(_vec(F32, 2), ir.Undefined)
    pair = builder.insert_element(und, s0, ir.Constant(I32, 0))
    pair = builder.insert_element(pair, s1, ir.Constant(I32, 1))
    return builder.shuffle_vector(pair, und, ir.Constant(_vec(I32, lanes), [0] * (lanes // 2) + [1] * (lanes // 2)))


def _mul_add(builder, a, b, c, vt):
    """a * b + c: one fused multiply-add where :data:`FMA`, else a product and a sum."""
    if FMA:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]),
                                            f"llvm.fma.v{vt.count}f32")
        return builder.call(fn, [a, b, c])
    return builder.fadd(c, builder.fmul(a, b))


def _word_decoder(builder, words, codes, planes, lanes):
    """``m -> vector m`` of a chunk's word decode (:func:`_make_dot_words`; ``words``: the
    chunk's <lanes x i32> words): through byte planes where ``planes`` is given (all eight
    vectors built here, :func:`_words_planes8`), else one shift and permute per call."""
    if planes is not None:
        return _words_planes8(builder, words, planes).__getitem__
    it = words.type

    def vector(m):
        shift = 8 * (m // 2) + (4 if m % 2 == 0 else 0)
        idx = builder.lshr(words, ir.Constant(it, [shift] * lanes)) if shift else words
        if lanes != 16:
            idx = builder.and_(idx, ir.Constant(it, [15] * lanes))
        return _permute(builder, codes, idx, lanes)

    return vector


def _prefetch(builder, ptr, locality):
    """``llvm.prefetch`` of the cache line at ``ptr`` (an i8*) for reading data, with
    LLVM's locality hint (3: every cache level, 2: L2 and out, ...). Never faults."""
    fn = cgutils.get_or_insert_function(builder.module,
                                        ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), I32, I32, I32]),
                                        "llvm.prefetch.p0")
    builder.call(fn, [ptr, ir.Constant(I32, 0), ir.Constant(I32, locality), ir.Constant(I32, 1)])


def _prefetch_next_rows(builder, rows, off, in_f):
    """A prefetch into L2 of byte ``off`` of the weight rows that follow ``rows``
    (pointers to the packed bytes of len(rows) consecutive weight rows of in_f weights
    each): the place in those rows that the next call, over the next len(rows) rows,
    reads. One per row and 64-byte chunk. The hardware's prefetchers, left alone, kept a
    GEMV streaming an NF4 weight from main memory (as a model's layers are read in
    generation: several rows side by side, 2 KiB apart for 4096 columns) well below the
    machine's read bandwidth. Measured in one process on AMD EPYC, 4096 x 4096, the weight
    in main memory, the four-row GEMV call on two threads: 0.53-0.81 ms without, 0.38-0.64
    with these (two and three calls ahead alike, into L1 0.44-0.56, past the caches
    0.56-0.74); from the last-level cache level. A prefetch never faults: past the
    array's end, or in another thread's rows, it only costs a load slot."""
    ahead = builder.add(off, builder.mul(builder.lshr(in_f, ir.Constant(I64, 1)), ir.Constant(I64, len(rows))))
    for r in rows:
        _prefetch(builder, builder.gep(r, [ahead]), 2)  # prefetcht1: L2 and out


def _make_dot_words(lanes, nw, nx, planes8=None):
    """Build ``dot_words(packed, o0, xp, i0, scales, code, blocksize, out)``: the dot
    products of the ``nw`` weight rows o0 .. o0 + nw - 1 with the ``nx`` input rows
    i0 .. i0 + nx - 1 into out[a * nx + g] (a: weight row, g: input row).

    The word decode: 4 * lanes bytes of a row load as ``lanes`` 32-bit words; word l holds
    the nibbles of weights 8 l .. 8 l + 7 of the chunk, and ``vpermps`` reads only the low
    bits of each index, so ``word >> (4 k)`` permuted through the code table decodes the
    k-th nibble of every word: 8 permutes and shifts per chunk, no widening of bytes.
    xp is x with each chunk of 8 * lanes elements reordered to match:
    ``xp[i, c C + m L + l] = x[i, c C + 8 l + m]`` (C = 8 L, L = lanes), so element
    order m: the high nibble of byte m // 2 for even m, the low one for odd m.

    Arithmetic, per (weight row, input row): blk = 0; blk = fma(V_m, X_m, blk) for m = 0
    .. 7 over the chunks of a block in order (one fused multiply-add where :data:`FMA`,
    else blk + V_m * X_m rounded twice; a block of half a chunk: each chunk's vector then
    holds two blocks, lanes 0..L/2-1 and L/2..L-1); row += blk * scale vector per block
    (per chunk, not fused); finally the halving sum of row's lanes. No reassociation, so
    each result is the same whichever build (nw, nx) computed it.

    ``planes8``: on 8 lanes, decode through byte planes (:func:`_words_planes8`: the same
    vectors); None: :data:`PLANES8`."""
    planes8 = lanes == 8 and (PLANES8 if planes8 is None else planes8)

    @intrinsic
    def dot_words(typingctx, packed, o0, xp, i0, scales, code, blocksize, out):
        sig = types.void(packed, o0, xp, i0, scales, code, blocksize, out)

        def codegen(context, builder, sig, args):
            pk, wfirst, xa, xfirst, sc, cd, bs, oa = _rows_args(context, builder, sig, args)
            L = lanes
            C = 8 * L
            vt = _vec(F32, L)
            it = _vec(I32, L)
            zero = ir.Constant(vt, None)
            in_f = builder.extract_value(xa.shape, 1)
            nchunks = builder.udiv(in_f, ir.Constant(I64, C))
            codes = _load_codes(builder, cd.data, L)
            planes = _load_planes(builder, cd.data) if planes8 else None
            wrow = _weight_rows(builder, pk, sc, wfirst, nw, in_f, bs)
            xrow = _row_ptrs(builder, xa.data, xfirst, nx, in_f)
            row_p = [[cgutils.alloca_once_value(builder, zero) for _ in range(nx)] for _ in range(nw)]
            blk_p = [[cgutils.alloca_once_value(builder, zero) for _ in range(nx)] for _ in range(nw)]

            def chunk(ci):
                # per m: the nw weight vectors decoded, then each input row's vector loaded
                # once and multiplied into the nw rows' sums (loading all 8 * nx input
                # vectors of the chunk first measured slower: see WORDS_GROUP_NW)
                xoff = builder.mul(ci, ir.Constant(I64, C))
                woff = builder.mul(ci, ir.Constant(I64, 4 * L))
                words = [builder.load(builder.bitcast(builder.gep(wrow[a][0], [woff]), it.as_pointer()), align=1)
                         for a in range(nw)]
                _prefetch_next_rows(builder, [wrow[a][0] for a in range(nw)], woff, in_f)
                accs = [[builder.load(blk_p[a][g]) for g in range(nx)] for a in range(nw)]
                decoders = [_word_decoder(builder, words[a], codes, planes, L) for a in range(nw)]
                for m in range(8):
                    ws = [decoders[a](m) for a in range(nw)]
                    for g in range(nx):
                        xptr = builder.gep(xrow[g], [builder.add(xoff, ir.Constant(I64, m * L))])
                        xv = builder.load(builder.bitcast(xptr, vt.as_pointer()), align=4)
                        for a in range(nw):
                            accs[a][g] = _mul_add(builder, ws[a], xv, accs[a][g], vt)
                for a in range(nw):
                    for g in range(nx):
                        builder.store(accs[a][g], blk_p[a][g])

            def scale_rows(svec):
                for a in range(nw):
                    sv = svec(a)
                    for g in range(nx):
                        scaled = builder.fmul(builder.load(blk_p[a][g]), sv)
                        builder.store(builder.fadd(builder.load(row_p[a][g]), scaled), row_p[a][g])
                        builder.store(zero, blk_p[a][g])

            # One loop over the chunks (the chunk's code emitted once: it is most of the
            # kernel's compile time): blocks of half a chunk scaled after every chunk by a
            # vector of two scales, blocks of whole chunks after their last chunk.
            halfblocks = builder.icmp_unsigned("==", builder.mul(bs, ir.Constant(I64, 2)), ir.Constant(I64, C))
            cpb = builder.udiv(bs, ir.Constant(I64, C))  # chunks per block (0 for half-chunk blocks)
            left_p = cgutils.alloca_once_value(builder, cpb)  # chunks left in the block
            blk_i = cgutils.alloca_once_value(builder, ir.Constant(I64, 0))  # the block's index
            with cgutils.for_range(builder, nchunks) as cl:
                chunk(cl.index)
                with builder.if_else(halfblocks) as (then, otherwise):
                    with then:
                        b0 = builder.mul(cl.index, ir.Constant(I64, 2))

                        def svec(a, b0=b0):
                            s0 = builder.load(builder.gep(wrow[a][1], [b0]))
                            s1 = builder.load(builder.gep(wrow[a][1], [builder.add(b0, ir.Constant(I64, 1))]))
                            return _halves(builder, s0, s1, L)

                        scale_rows(svec)
                    with otherwise:
                        left = builder.sub(builder.load(left_p), ir.Constant(I64, 1))
                        builder.store(left, left_p)
                        with builder.if_then(builder.icmp_unsigned("==", left, ir.Constant(I64, 0))):
                            b = builder.load(blk_i)
                            scale_rows(lambda a, b=b: _splat(builder, builder.load(builder.gep(wrow[a][1], [b])), L))
                            builder.store(builder.add(b, ir.Constant(I64, 1)), blk_i)
                            builder.store(cpb, left_p)
            for a in range(nw):
                for g in range(nx):
                    builder.store(_hsum(builder, builder.load(row_p[a][g]), L),
                                  builder.gep(oa.data, [ir.Constant(I64, a * nx + g)]))
            return context.get_dummy_value()

        return sig, codegen

    return dot_words


#: Cache lines of each weight row that ``t_words`` prefetches ahead of the chunk it reads.
T_WORDS_PREFETCH = 3


def _prefetch_row_ahead(builder, src):
    """Prefetches of the T_WORDS_PREFETCH cache lines after ``src`` (an i8* into a weight
    row): the columns of the same row that the next chunks' passes of ``t_words`` read.
    Each pass reads one line of every row (rows 2 KiB apart for 4096 columns), a stride
    the hardware prefetchers left to main memory one line at a time. Measured in one
    process (AMD EPYC, 2 threads, 4096 x 4096, batch 1): 2.20-2.33 ms with the weight in
    main memory (as a model's backward pass finds it) against 0.64-0.83 from the
    last-level cache; with these 0.89-0.99 / 0.57-0.67 (into L2 instead: 2-4 lines
    1.09-1.36, one line 3 ahead 1.29-1.59; 6 lines into L1 slower in separate processes).
    A prefetch never faults."""
    for j in range(1, T_WORDS_PREFETCH + 1):
        _prefetch(builder, builder.gep(src, [ir.Constant(I64, 64 * j)]), 3)  # prefetcht0: L1 and out


def _make_t_words(lanes, nx, planes8=None):
    """Build ``t_words(packed, c, g, i0, scales, code, blocksize, buf)``: chunk ``c`` (the
    8 * lanes columns c C .. c C + C - 1) of ``g[i0 .. i0 + nx - 1] @ deq(W)``, the input
    gradient of the NF4 product, summed over every weight row o in order with the sums in
    registers. packed: W's bytes flat, (out * in / 2,); g: (n, out) C-contiguous; the
    output row length ``in`` is 2 * packed's size / out. Word decode as
    :func:`_make_dot_words` (``words_ok``): the k-th decoded vector holds columns
    c C + 8 l + k in lane l; buf[q * C + k * lanes + l] receives out[i0 + q, c C + 8 l + k].

    Arithmetic, per (input row, column), as the portable ``nf4_matmul_t``: w = code value
    times the block's scale (float32), then acc = acc + g[i, o] * w for o = 0, 1, ...
    from acc = 0. No FMA, so bit-identical to it. ``planes8`` as in :func:`_make_dot_words`."""
    planes8 = lanes == 8 and (PLANES8 if planes8 is None else planes8)

    @intrinsic
    def t_words(typingctx, packed, c, g, i0, scales, code, blocksize, buf):
        sig = types.void(packed, c, g, i0, scales, code, blocksize, buf)

        def codegen(context, builder, sig, args):
            pk, chunk, ga, gfirst, sc, cd, bs, ba = _rows_args(context, builder, sig, args)
            L = lanes
            C = 8 * L
            vt = _vec(F32, L)
            it = _vec(I32, L)
            zero = ir.Constant(vt, None)
            out_f = builder.extract_value(ga.shape, 1)
            half_row = builder.udiv(builder.extract_value(pk.shape, 0), out_f)  # in / 2 bytes per row
            in_f = builder.mul(half_row, ir.Constant(I64, 2))
            bpr = builder.udiv(in_f, bs)
            codes = _load_codes(builder, cd.data, L)
            planes = _load_planes(builder, cd.data) if planes8 else None
            grow = _row_ptrs(builder, ga.data, gfirst, nx, out_f)
            halfblocks = builder.icmp_unsigned("==", builder.mul(bs, ir.Constant(I64, 2)), ir.Constant(I64, C))
            # the chunk's two scale indices within a row: blocks 2c and 2c + 1 (half-chunk
            # blocks, lanes 0..L/2-1 and L/2..L-1), else block c C / bs for every lane
            whole = builder.udiv(builder.mul(chunk, ir.Constant(I64, C)), bs)
            s_lo = builder.select(halfblocks, builder.mul(chunk, ir.Constant(I64, 2)), whole)
            s_hi = builder.select(halfblocks, builder.add(builder.mul(chunk, ir.Constant(I64, 2)), ir.Constant(I64, 1)),
                                  whole)
            acc_p = [[cgutils.alloca_once_value(builder, zero) for _ in range(8)] for _ in range(nx)]
            wbyte0 = builder.mul(chunk, ir.Constant(I64, 4 * L))
            with cgutils.for_range(builder, out_f) as ol:
                o = ol.index
                src = builder.gep(pk.data, [builder.add(builder.mul(o, half_row), wbyte0)])
                words = builder.load(builder.bitcast(src, it.as_pointer()), align=1)
                _prefetch_row_ahead(builder, src)
                srow = builder.mul(o, bpr)
                s0 = builder.load(builder.gep(sc.data, [builder.add(srow, s_lo)]))
                s1 = builder.load(builder.gep(sc.data, [builder.add(srow, s_hi)]))
                svec = _halves(builder, s0, s1, L)
                gv = [_splat(builder, builder.load(builder.gep(grow[q], [o])), L) for q in range(nx)]
                decoder = _word_decoder(builder, words, codes, planes, L)
                for m in range(8):
                    w = builder.fmul(decoder(m), svec)
                    for q in range(nx):
                        builder.store(builder.fadd(builder.load(acc_p[q][m]), builder.fmul(gv[q], w)), acc_p[q][m])
            for q in range(nx):
                for m in range(8):
                    dst = builder.gep(ba.data, [ir.Constant(I64, q * C + m * L)])
                    builder.store(builder.load(acc_p[q][m]), builder.bitcast(dst, vt.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return t_words


def _make_encode(lanes):
    @intrinsic
    def encode_block(typingctx, xb, inv, mids, packed):
        """NF4 codes of ``xb * inv`` (the number of midpoints strictly below each value,
        found by a 4-step binary search whose midpoint lookups are register permutes),
        packed two per byte, first element in the high nibble. xb.size % lanes == 0;
        mids: float32 (16,), the 15 midpoints and one unused pad entry."""
        sig = types.void(xb, inv, mids, packed)

        def codegen(context, builder, sig, args):
            xa = context.make_array(sig.args[0])(context, builder, args[0])
            inv_v = _splat(builder, args[1], lanes)
            md = context.make_array(sig.args[2])(context, builder, args[2])
            pk = context.make_array(sig.args[3])(context, builder, args[3])
            n = builder.extract_value(xa.shape, 0)
            table = _load_codes(builder, md.data, lanes)
            vt = _vec(F32, lanes)
            it = _vec(I32, lanes)
            half = lanes // 2
            even = ir.Constant(_vec(I32, half), list(range(0, lanes, 2)))
            odd = ir.Constant(_vec(I32, half), list(range(1, lanes, 2)))
            with cgutils.for_range(builder, builder.udiv(n, ir.Constant(I64, lanes))) as cl:
                k = builder.mul(cl.index, ir.Constant(I64, lanes))
                xk = builder.load(builder.bitcast(builder.gep(xa.data, [k]), vt.as_pointer()), align=4)
                y = builder.fmul(xk, inv_v)
                q = ir.Constant(it, None)
                for step in (8, 4, 2, 1):
                    m = _permute(builder, table, builder.add(q, ir.Constant(it, [step - 1] * lanes)), lanes)
                    gt = builder.fcmp_ordered(">", y, m)
                    q = builder.add(q, builder.select(gt, ir.Constant(it, [step] * lanes), ir.Constant(it, None)))
                und = ir.Constant(it, ir.Undefined)
                hi = builder.trunc(builder.shuffle_vector(q, und, even), _vec(I8, half))
                lo = builder.trunc(builder.shuffle_vector(q, und, odd), _vec(I8, half))
                byte = builder.or_(builder.shl(hi, ir.Constant(_vec(I8, half), [4] * half)), lo)
                dst = builder.gep(pk.data, [builder.lshr(k, ir.Constant(I64, 1))])
                builder.store(byte, builder.bitcast(dst, _vec(I8, half).as_pointer()), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return encode_block


#: Rows of W per call of ``delta_rows`` (their accumulators stay in registers).
DELTA_ROWS = 4
DELTA_LANES = 16  # plain vector arithmetic: LLVM splits it for AVX2 or narrower


def _make_delta_rows(rows, apply):
    @intrinsic
    def delta_rows(typingctx, p, q, i0, acc, scale):
        """acc[g, j] = sum_t p[i0 + g, t] * q[t, j] (in order over t, no FMA) for
        g < ``rows`` and the columns j < k - k % 16 (the caller does the rest with the same
        operations). p (m, r), q (r, k): float32, C-contiguous. Keeping the accumulators of
        ``rows`` rows in registers reads each vector of q once per group instead of once per
        row, and never writes a partial sum back to memory.

        The ``apply`` build adds the delta into the weight instead: acc is then W itself
        (m, k) and W[i0 + g, j] += scale * acc_value (what merge_plain does per element);
        otherwise acc is a (rows, k) buffer and scale is unused."""
        sig = types.void(p, q, i0, acc, scale)

        def codegen(context, builder, sig, args):
            pa = context.make_array(sig.args[0])(context, builder, args[0])
            qa = context.make_array(sig.args[1])(context, builder, args[1])
            first = context.cast(builder, args[2], sig.args[2], types.int64)
            aa = context.make_array(sig.args[3])(context, builder, args[3])
            sc = _splat(builder, context.cast(builder, args[4], sig.args[4], types.float32), DELTA_LANES)
            r = builder.extract_value(pa.shape, 1)
            k = builder.extract_value(qa.shape, 1)
            lanes = DELTA_LANES
            vt = _vec(F32, lanes)
            vp = vt.as_pointer()
            L = ir.Constant(I64, lanes)
            prow = _row_ptrs(builder, pa.data, first, rows, r)
            acc_p = [cgutils.alloca_once_value(builder, ir.Constant(vt, None)) for _ in range(rows)]
            with cgutils.for_range(builder, builder.udiv(k, L)) as jl:
                j = builder.mul(jl.index, L)
                for g in range(rows):
                    builder.store(ir.Constant(vt, None), acc_p[g])
                with cgutils.for_range(builder, r) as tl:
                    t = tl.index
                    qv = builder.load(builder.bitcast(builder.gep(qa.data, [builder.add(builder.mul(t, k), j)]), vp),
                                      align=4)
                    for g in range(rows):
                        c = _splat(builder, builder.load(builder.gep(prow[g], [t])), lanes)
                        builder.store(builder.fadd(builder.load(acc_p[g]), builder.fmul(c, qv)), acc_p[g])
                for g in range(rows):
                    if apply:
                        row = builder.add(first, ir.Constant(I64, g))
                        dst = builder.bitcast(builder.gep(aa.data, [builder.add(builder.mul(row, k), j)]), vp)
                        new = builder.fadd(builder.load(dst, align=4), builder.fmul(sc, builder.load(acc_p[g])))
                        builder.store(new, dst, align=4)
                    else:
                        dst = builder.gep(aa.data, [builder.add(builder.mul(ir.Constant(I64, g), k), j)])
                        builder.store(builder.load(acc_p[g]), builder.bitcast(dst, vp), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return delta_rows


#: Floats per vector of the bank's row kernels (:func:`_make_bank_rows`): plain vector
#: arithmetic, split by LLVM into two on AVX2.
BANK_LANES = 16


def _make_bank_rows(rows, nv, lanes=None):
    lanes = lanes or BANK_LANES

    @intrinsic
    def bank_rows(typingctx, s, so, v, vo, vs, nk, d, do, from_d):
        """For g < ``rows`` and l < ``nv`` * ``lanes`` (BANK_LANES or 8): ``acc = d[do[g] + l]``
        (``from_d`` non-zero) or 0, then ``acc = acc + s[so[g] + k] * v[vo + k vs + l]`` for
        k = 0, 1, .. nk - 1 in order (multiply, then add: no FMA contraction), stored back
        into ``d[do[g] + l]``. Each vector of v is loaded once for the ``rows`` rows and the
        sums stay in registers. s, v, d: 1-D float32, C-contiguous; so, do: int64 arrays of
        at least ``rows`` offsets. The LoRA bank's shrink (s = x's rows, v = A^T) and expand
        (s = u's rows, v = B^T, d = y) as ``kernels.multi`` writes them element by element,
        so the same bits."""
        sig = types.void(s, so, v, vo, vs, nk, d, do, from_d)

        def codegen(context, builder, sig, args):
            sa, soa, va, vo_, vs_, nk_, da, doa, flag = _unpack(context, builder, sig, args, "aaaiiiaai")
            init = builder.icmp_signed("!=", flag, ir.Constant(I64, 0))
            vt = _vec(F32, lanes)
            vp = vt.as_pointer()
            srow = [builder.gep(sa.data, [builder.load(builder.gep(soa.data, [ir.Constant(I64, g)]))])
                    for g in range(rows)]
            dptr = [[builder.bitcast(builder.gep(da.data, [builder.add(builder.load(builder.gep(doa.data, [
                ir.Constant(I64, g)])), ir.Constant(I64, lanes * q))]), vp) for q in range(nv)] for g in range(rows)]
            zero = ir.Constant(vt, None)
            acc = [[cgutils.alloca_once_value(builder, builder.select(init, builder.load(dptr[g][q], align=4), zero))
                    for q in range(nv)] for g in range(rows)]
            with cgutils.for_range(builder, nk_) as kl:
                k = kl.index
                vrow = builder.gep(va.data, [builder.add(vo_, builder.mul(k, vs_))])
                vv = [builder.load(builder.bitcast(builder.gep(vrow, [ir.Constant(I64, lanes * q)]), vp), align=4)
                      for q in range(nv)]
                for g in range(rows):
                    c = _splat(builder, builder.load(builder.gep(srow[g], [k])), lanes)
                    for q in range(nv):
                        builder.store(builder.fadd(builder.load(acc[g][q]), builder.fmul(c, vv[q])), acc[g][q])
            for g in range(rows):
                for q in range(nv):
                    builder.store(builder.load(acc[g][q]), dptr[g][q], align=4)
            return context.get_dummy_value()

        return sig, codegen

    return bank_rows


#: Rows per call of the bank's row kernels (``bank_rows_x4``; a segment's last 1-3 rows
#: one at a time, ``bank_rows_x1``).
BANK_ROWS = 4


#: Partial sums of :func:`dot16` (and of its portable twin in ``kernels.compute``).
DOT_LANES = 16


def _make_dot16(lanes):
    @intrinsic
    def dot16(typingctx, w, w0, x, x0, n):
        """sum(w[w0:w0+n] * x[x0:x0+n]) in float32, in this order whatever the SIMD width:
        16 partial sums (element j into sum j % 16) over the whole chunks of 16, summed by
        halving (sums 0..7 plus 8..15, then 0..3 plus 4..7, ...), then the remaining
        elements added one by one. No FMA contraction, no reassociation."""
        sig = types.float32(w, w0, x, x0, n)

        def codegen(context, builder, sig, args):
            wa = context.make_array(sig.args[0])(context, builder, args[0])
            xa = context.make_array(sig.args[2])(context, builder, args[2])
            wp = builder.gep(wa.data, [context.cast(builder, args[1], sig.args[1], types.int64)])
            xp = builder.gep(xa.data, [context.cast(builder, args[3], sig.args[3], types.int64)])
            m = context.cast(builder, args[4], sig.args[4], types.int64)
            vt = _vec(F32, lanes)
            parts = DOT_LANES // lanes
            acc_p = [cgutils.alloca_once_value(builder, ir.Constant(vt, None)) for _ in range(parts)]
            nchunks = builder.udiv(m, ir.Constant(I64, DOT_LANES))
            with cgutils.for_range(builder, nchunks) as cl:
                base = builder.mul(cl.index, ir.Constant(I64, DOT_LANES))
                for q in range(parts):
                    off = builder.add(base, ir.Constant(I64, q * lanes))
                    wv = builder.load(builder.bitcast(builder.gep(wp, [off]), vt.as_pointer()), align=4)
                    xv = builder.load(builder.bitcast(builder.gep(xp, [off]), vt.as_pointer()), align=4)
                    builder.store(builder.fadd(builder.load(acc_p[q]), builder.fmul(wv, xv)), acc_p[q])
            v = builder.load(acc_p[0])
            if parts == 2:  # the first halving step: sums 0..7 plus 8..15
                v = builder.fadd(v, builder.load(acc_p[1]))
            total_p = cgutils.alloca_once_value(builder, _hsum(builder, v, lanes))
            start = builder.mul(nchunks, ir.Constant(I64, DOT_LANES))
            with cgutils.for_range(builder, builder.sub(m, start)) as tl:
                j = builder.add(start, tl.index)
                prod = builder.fmul(builder.load(builder.gep(wp, [j])), builder.load(builder.gep(xp, [j])))
                builder.store(builder.fadd(builder.load(total_p), prod), total_p)
            return builder.load(total_p)

        return sig, codegen

    return dot16


#: Ranks per call of :data:`lane8_dots` (four sums of 8 lanes in registers at once).
LANE8_RANKS = 4


def _make_expand_rows(nx, lanes):
    @intrinsic
    def expand_rows(typingctx, u, i0, blk, bq, y, q, j0):
        """y[j0 + g, q lanes + l] += s(g, l) for g < ``nx``, l < ``lanes``, where s(g, l) is
        the sum over t of u[i0 + g, t] * blk[(bq r + t) lanes + l] in order from zero (t =
        0, 1, ...; multiply, then add: no FMA contraction): the LoRA expand of ``nx`` rows
        and the q-th vector of outputs with the sums in registers, each of B^T's vectors
        loaded once for the ``nx`` rows. blk: B^T in blocks of ``lanes`` outputs
        (``kernels.nf4.b_blocks``), flat; block bq holds output vector q's (bq = q for all of
        B^T's blocks, 0 for one block transposed just before). The order of
        ``kernels.nf4._finish`` and ``kernels.compute._expand_row``, so the same bits.
        u: (n, r), y: (n, out), float32, C-contiguous."""
        sig = types.void(u, i0, blk, bq, y, q, j0)

        def codegen(context, builder, sig, args):
            ua, first, ba, bblock, ya, block, y_first = _unpack(context, builder, sig, args, "aiaiaii")
            r = builder.extract_value(ua.shape, 1)
            out = builder.extract_value(ya.shape, 1)
            vt = _vec(F32, lanes)
            width = ir.Constant(I64, lanes)
            urows = _row_ptrs(builder, ua.data, first, nx, r)
            yrows = [builder.gep(p, [builder.mul(block, width)]) for p in _row_ptrs(builder, ya.data, y_first, nx, out)]
            bvecs = builder.bitcast(builder.gep(ba.data, [builder.mul(builder.mul(bblock, r), width)]), vt.as_pointer())
            acc = [cgutils.alloca_once_value(builder, ir.Constant(vt, None)) for _ in range(nx)]
            with cgutils.for_range(builder, r) as tl:
                bv = builder.load(builder.gep(bvecs, [tl.index]), align=4)
                for g in range(nx):
                    c = _splat(builder, builder.load(builder.gep(urows[g], [tl.index])), lanes)
                    builder.store(builder.fadd(builder.load(acc[g]), builder.fmul(c, bv)), acc[g])
            for g in range(nx):
                yp = builder.bitcast(yrows[g], vt.as_pointer())
                builder.store(builder.fadd(builder.load(yp, align=4), builder.load(acc[g])), yp, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return expand_rows


def _make_lane8_dots(nt):
    @intrinsic
    def lane8_dots(typingctx, x, xo, a, ao, astride, n, out):
        """out[8 q + l] = sum over the chunks c < n // 8 of x[xo + 8 c + l] * a[ao + q astride
        + 8 c + l], for q < ``nt`` (rows of ``a`` ``astride`` elements apart) and each lane
        l < 8, in chunk order: the eight lanes of the canonical 8-lane dot product
        (``kernels.nf4._lane_dot``) over the whole chunks, one ``<8 x float>`` multiply and
        add per chunk and row (no FMA contraction). The caller adds the tail and sums the
        lanes. 8 lanes on AVX2 and AVX-512 alike (the order is the product's, not the
        machine's)."""
        sig = types.void(x, xo, a, ao, astride, n, out)

        def codegen(context, builder, sig, args):
            xa = context.make_array(sig.args[0])(context, builder, args[0])
            aa = context.make_array(sig.args[2])(context, builder, args[2])
            oa = context.make_array(sig.args[6])(context, builder, args[6])
            xp = builder.gep(xa.data, [context.cast(builder, args[1], sig.args[1], types.int64)])
            ap = builder.gep(aa.data, [context.cast(builder, args[3], sig.args[3], types.int64)])
            stride = context.cast(builder, args[4], sig.args[4], types.int64)
            m = context.cast(builder, args[5], sig.args[5], types.int64)
            vt = _vec(F32, 8)
            rows = [builder.gep(ap, [builder.mul(stride, ir.Constant(I64, q))]) for q in range(nt)]
            acc_p = [cgutils.alloca_once_value(builder, ir.Constant(vt, None)) for _ in range(nt)]
            with cgutils.for_range(builder, builder.udiv(m, ir.Constant(I64, 8))) as cl:
                off = builder.mul(cl.index, ir.Constant(I64, 8))
                xv = builder.load(builder.bitcast(builder.gep(xp, [off]), vt.as_pointer()), align=4)
                for q in range(nt):
                    av = builder.load(builder.bitcast(builder.gep(rows[q], [off]), vt.as_pointer()), align=4)
                    builder.store(builder.fadd(builder.load(acc_p[q]), builder.fmul(xv, av)), acc_p[q])
            for q in range(nt):
                dst = builder.gep(oa.data, [ir.Constant(I64, 8 * q)])
                builder.store(builder.load(acc_p[q]), builder.bitcast(dst, vt.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return lane8_dots


@intrinsic
def transpose8(typingctx, src, so, sstride, dst, do, dstride):
    """dst[do + j * dstride + k] = src[so + k * sstride + j] for j, k < 8: one 8 x 8 block of
    float32 transposed in registers (eight unaligned ``<8 x float>`` loads, three stages of
    eight shuffles: pairs of elements, pairs of pairs, halves, as in the classic AVX
    transpose; eight stores). src, dst: float32 arrays, offsets and strides in elements of
    their flat data. A copy: every bit is kept. 8 lanes on AVX2 and AVX-512 alike."""
    sig = types.void(src, so, sstride, dst, do, dstride)

    def codegen(context, builder, sig, args):
        sa = context.make_array(sig.args[0])(context, builder, args[0])
        da = context.make_array(sig.args[3])(context, builder, args[3])

        def i64(k):
            return context.cast(builder, args[k], sig.args[k], types.int64)

        sp = builder.gep(sa.data, [i64(1)])
        dp = builder.gep(da.data, [i64(4)])
        vt = _vec(F32, 8)

        def at(base, stride, k):
            return builder.bitcast(builder.gep(base, [builder.mul(stride, ir.Constant(I64, k))]), vt.as_pointer())

        cols = _transpose8_regs(builder, [builder.load(at(sp, i64(2), k), align=4) for k in range(8)])
        for j in range(8):
            builder.store(cols[j], at(dp, i64(5), j), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _transpose8_regs(builder, r):
    """cols[j][k] = r[k][j]: eight <8 x float> transposed by three stages of eight
    shuffles (pairs of elements, pairs of pairs, halves; the classic AVX transpose)."""

    def shuf(a, b, mask):
        return builder.shuffle_vector(a, b, ir.Constant(_vec(I32, 8), mask))

    lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    t = [shuf(r[k & ~1], r[k | 1], hi if k & 1 else lo) for k in range(8)]
    pl, ph = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    q = []
    for g in (0, 4):  # rows 0-3, then 4-7
        q += [shuf(t[g], t[g + 2], pl), shuf(t[g], t[g + 2], ph),
              shuf(t[g + 1], t[g + 3], pl), shuf(t[g + 1], t[g + 3], ph)]
    first, second = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    return [shuf(q[j], q[j + 4], first) for j in range(4)] + [shuf(q[j], q[j + 4], second) for j in range(4)]


def _make_gemv_t(groups):
    """Build ``gemv_t(w, wo, in_f, x, xo, kn, y, yo, add)``: for j < 8 * groups,
    ``y[yo + j] (+)= sum over k < kn of w[wo + j * in_f + k] * x[xo + k]``, the sum a
    chain of fused multiply-adds (:func:`_mul_add`) from zero in order of k, then stored
    (``add`` 0) or added to y: the operations :func:`_make_panel_mk`'s micro-kernel gives
    the same output over a column block, without a panel. Weight rows are read as they
    lie (eight rows x eight columns loaded and transposed in registers,
    :func:`_transpose8_regs`), the eight outputs of a group in the lanes of one
    accumulator; ``groups`` independent chains, group g two 8-column steps per g behind
    group 0 (rows 4 KiB apart share L1 sets: eight rows' lines at one column fill a set).
    kn % 8 == 0. The one-row dense product of the row-stable bank
    (``kernels.nf4.dense_matmul_rows``): 1.3-1.5x faster than the panels for one row on
    AMD Zen 3 (docs/performance.md); without the skew, or with the groups' multiply-adds
    interleaved, slower."""

    @intrinsic
    def gemv_t(typingctx, w, wo, in_f, x, xo, kn, y, yo, add):
        sig = types.void(w, wo, in_f, x, xo, kn, y, yo, add)

        def codegen(context, builder, sig, args):
            wa, woff, width, xa, xoff, count, ya, yoff, acc_flag = _unpack(context, builder, sig, args, "aiiaiiaii")
            vt = _vec(F32, 8)
            wp = builder.gep(wa.data, [woff])
            rows = [builder.gep(wp, [builder.mul(width, ir.Constant(I64, j))]) for j in range(8 * groups)]
            xp = builder.gep(xa.data, [xoff])
            acc_p = [cgutils.alloca_once_value(builder, ir.Constant(vt, None)) for _ in range(groups)]
            steps = builder.lshr(count, ir.Constant(I64, 3))
            lag = 2  # group g runs 2 g steps (16 g columns) behind group 0: its rows' lines in other L1 sets
            with cgutils.for_range(builder, builder.add(steps, ir.Constant(I64, lag * (groups - 1)))) as sl:
                for g in range(groups):
                    sg = builder.sub(sl.index, ir.Constant(I64, lag * g))
                    live = builder.and_(builder.icmp_signed(">=", sg, ir.Constant(I64, 0)),
                                        builder.icmp_signed("<", sg, steps))
                    with builder.if_then(live):  # a block per group: its loads stay beside its shuffles
                        k0 = builder.shl(sg, ir.Constant(I64, 3))
                        r = [builder.load(builder.bitcast(builder.gep(rows[8 * g + j], [k0]), vt.as_pointer()),
                                          align=4) for j in range(8)]
                        cols = _transpose8_regs(builder, r)
                        a = builder.load(acc_p[g])
                        for t in range(8):
                            xt = builder.load(builder.gep(xp, [builder.add(k0, ir.Constant(I64, t))]))
                            a = _mul_add(builder, cols[t], _splat(builder, xt, 8), a, vt)
                        builder.store(a, acc_p[g])
            adding = builder.icmp_signed("!=", acc_flag, ir.Constant(I64, 0))
            yp = builder.gep(ya.data, [yoff])
            for g in range(groups):
                ptr = builder.bitcast(builder.gep(yp, [ir.Constant(I64, 8 * g)]), vt.as_pointer())
                v = builder.load(acc_p[g])
                old = builder.load(ptr, align=4)
                builder.store(builder.select(adding, builder.fadd(old, v), v), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return gemv_t


def _rounded_table(builder, codes, s, is_bf16, lanes):
    """The 16 code values times the block's scale ``s`` (a splat), each rounded to
    bfloat16 where ``is_bf16`` else float16 (:func:`round_vector`): the rounded weights
    of the block, looked up by nibble. In the layout of :func:`_load_codes`."""

    def one(c):
        v = builder.fmul(c, s)
        return builder.select(is_bf16, round_vector(builder, v, lanes, 1), round_vector(builder, v, lanes, 2))

    return one(codes) if lanes == 16 else (one(codes[0]), one(codes[1]))


def _make_rounded_dot(lanes, nw, nx):
    @intrinsic
    def rounded_dot(typingctx, packed, o0, xr, i0, scales, code, blocksize, out, mode):
        """out[a * nx + g] = sum over j of rnd(code[nibble of W[o0 + a, j]] * scale) *
        xr[i0 + g, j], for ``nw`` weight rows and ``nx`` input rows, in :func:`dot16`'s
        order (so bit-identical to decoding, rounding and calling dot16): each row's 16
        partial sums over the chunks of 16 elements, then the halving sum. The rounded
        weights come from a 16-entry table per block (the code values times the block's
        scale, rounded: mode 1 bfloat16, 2 float16), looked up in registers; nothing is
        stored. packed: W's bytes flat, (out * in / 2,); scales: (out * in / blocksize,);
        xr: (n, in) C-contiguous, rounded; blocksize % 16 == 0, in % blocksize == 0."""
        sig = types.void(packed, o0, xr, i0, scales, code, blocksize, out, mode)

        def codegen(context, builder, sig, args):
            pk, first_o, xa, first_i, sc, cd, bs, oa = _rows_args(context, builder, sig, args)
            md = context.cast(builder, args[8], sig.args[8], types.int64)
            in_f = builder.extract_value(xa.shape, 1)
            nblocks = builder.udiv(in_f, bs)
            is_bf16 = builder.icmp_signed("==", md, ir.Constant(I64, 1))
            codes = _load_codes(builder, cd.data, lanes)
            vt = _vec(F32, lanes)
            parts = DOT_LANES // lanes
            wrow = _weight_rows(builder, pk, sc, first_o, nw, in_f, bs)
            xrow = _row_ptrs(builder, xa.data, first_i, nx, in_f)
            acc = [[[cgutils.alloca_once_value(builder, ir.Constant(vt, None)) for _ in range(parts)]
                    for _ in range(nx)] for _ in range(nw)]
            nchunks = builder.udiv(bs, ir.Constant(I64, DOT_LANES))
            with cgutils.for_range(builder, nblocks) as bl:
                b = bl.index
                tables = [_rounded_table(builder, codes, _splat(builder, builder.load(builder.gep(wrow[a][1], [b])),
                                                               lanes), is_bf16, lanes) for a in range(nw)]
                start = builder.mul(b, bs)
                _prefetch_next_rows(builder, [wrow[a][0] for a in range(nw)], builder.lshr(start, ir.Constant(I64, 1)),
                                    in_f)
                with cgutils.for_range(builder, nchunks) as cl:
                    e0 = builder.add(start, builder.mul(cl.index, ir.Constant(I64, DOT_LANES)))
                    for q in range(parts):
                        e = builder.add(e0, ir.Constant(I64, q * lanes))
                        byte = builder.lshr(e, ir.Constant(I64, 1))
                        ws = [_decode_chunk(builder, builder.gep(wrow[a][0], [byte]), tables[a], lanes)
                              for a in range(nw)]
                        for g in range(nx):
                            xv = builder.load(builder.bitcast(builder.gep(xrow[g], [e]), vt.as_pointer()), align=4)
                            for a in range(nw):
                                p_ = acc[a][g][q]
                                builder.store(builder.fadd(builder.load(p_), builder.fmul(ws[a], xv)), p_)
            for a in range(nw):
                for g in range(nx):
                    v = builder.load(acc[a][g][0])
                    if parts == 2:  # dot16's first halving step: sums 0..7 plus 8..15
                        v = builder.fadd(v, builder.load(acc[a][g][1]))
                    builder.store(_hsum(builder, v, lanes), builder.gep(oa.data, [ir.Constant(I64, a * nx + g)]))
            return context.get_dummy_value()

        return sig, codegen

    return rounded_dot


def _host_bf16_dot() -> bool:
    """Whether the bfloat16 dot product instruction (AVX512-BF16 ``vdpbf16ps``) is used:
    the AVX-512 build on a CPU that has it."""
    return LANES == 16 and _host_has("avx512bf16")


@intrinsic
def err_acc8(typingctx, a, ao, b, bo, n, acc, mx):
    """For the elements i < n (a multiple of 8) of a[ao:] and b[bo:], with j = i % 8:
    ``acc[j] += float64(|a[i] - b[i]|)`` and ``mx[j] = max(mx[j], |a[i] - b[i]|)``, in
    order of i: eight float64 sums and eight float32 maxima in vector registers (one
    <8 x double>, one <8 x float>), loaded from and stored back to acc / mx. The same
    operations per lane as the element loop of ``kernels.convert.abs_err_stats`` (whose
    max keeps the old value on ties, as the compare here does), so the same bits for
    finite values. a, b: float32 arrays; acc: float64 (8,), mx: float32 (8,)."""
    sig = types.void(a, ao, b, bo, n, acc, mx)

    def codegen(context, builder, sig, args):
        aa, a0, ba, b0, m, cc, ma = _unpack(context, builder, sig, args, "aiaiiaa")
        f64 = ir.DoubleType()
        vt, dt = _vec(F32, 8), _vec(f64, 8)
        ap = builder.gep(aa.data, [a0])
        bp = builder.gep(ba.data, [b0])
        acc_p = builder.bitcast(cc.data, dt.as_pointer())
        mx_p = builder.bitcast(ma.data, vt.as_pointer())
        s_p = cgutils.alloca_once_value(builder, builder.load(acc_p, align=8))
        x_p = cgutils.alloca_once_value(builder, builder.load(mx_p, align=4))
        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt]), "llvm.fabs.v8f32")
        with cgutils.for_range(builder, builder.udiv(m, ir.Constant(I64, 8))) as gl:
            off = builder.mul(gl.index, ir.Constant(I64, 8))
            va = builder.load(builder.bitcast(builder.gep(ap, [off]), vt.as_pointer()), align=4)
            vb = builder.load(builder.bitcast(builder.gep(bp, [off]), vt.as_pointer()), align=4)
            v = builder.call(fabs, [builder.fsub(va, vb)])
            builder.store(builder.fadd(builder.load(s_p), builder.fpext(v, dt)), s_p)
            old = builder.load(x_p)
            builder.store(builder.select(builder.fcmp_ordered(">", v, old), v, old), x_p)
        builder.store(builder.load(s_p), acc_p, align=8)
        builder.store(builder.load(x_p), mx_p, align=4)
        return context.get_dummy_value()

    return sig, codegen


def _transpose_square(builder, rows, lanes):
    """The columns of a lanes x lanes block given as its ``lanes`` row vectors: log2(lanes)
    stages of two-source shuffles, each exchanging the off-diagonal blocks of every
    d x d block pair (d = lanes / 2, lanes / 4, ..., 1). A copy: every bit is kept."""
    r = list(rows)
    d = lanes // 2
    mask = _vec(I32, lanes)
    while d:
        lo = ir.Constant(mask, [c if not c & d else lanes + c - d for c in range(lanes)])
        hi = ir.Constant(mask, [c + d if not c & d else lanes + c for c in range(lanes)])
        for i in range(lanes):
            if not i & d:
                r[i], r[i + d] = builder.shuffle_vector(r[i], r[i + d], lo), builder.shuffle_vector(r[i], r[i + d], hi)
        d //= 2
    return r


def _make_panel_decode(lanes):
    """Build ``panel_decode(packed, scales, code, blocksize, in_f, o0, k0, kn, panel)``:
    ``panel[t * NR + j] = deq(W)[o0 + j, k0 + t]`` for t < kn, j < NR = 2 * lanes: NR
    weight rows, columns k0 .. k0 + kn - 1, decoded (``code[nibble] * absmax``, the
    values of :func:`_make_decode`) and transposed, so that each of the panel's rows holds
    NR weight rows' values at one column: the operand :func:`_make_panel_mk` multiplies
    by broadcast inputs. Per group of ``lanes`` columns (within one block: k0 and kn are
    multiples of lanes, and so is the blocksize): each row's group decoded to a vector,
    each lanes x lanes block transposed in registers (:func:`_transpose_square`), stored
    aligned (the panel starts on a vector boundary)."""

    @intrinsic
    def panel_decode(typingctx, packed, scales, code, blocksize, in_f, o0, k0, kn, panel):
        sig = types.void(packed, scales, code, blocksize, in_f, o0, k0, kn, panel)

        def codegen(context, builder, sig, args):
            pk, sc, cd, bs, width, first, kfirst, count, pa = _unpack(context, builder, sig, args, "aaaiiiiia")
            nr = 2 * lanes
            vt = _vec(F32, lanes)
            codes = _load_codes(builder, cd.data, lanes)
            wrows = _weight_rows(builder, pk, sc, first, nr, width, bs)
            with cgutils.for_range(builder, builder.udiv(count, ir.Constant(I64, lanes))) as gl:
                t = builder.mul(gl.index, ir.Constant(I64, lanes))
                k = builder.add(kfirst, t)
                b = builder.udiv(k, bs)
                byte = builder.lshr(k, ir.Constant(I64, 1))
                for h in range(2):
                    vals = []
                    for prow, srow in wrows[h * lanes:(h + 1) * lanes]:
                        v = _decode_chunk(builder, builder.gep(prow, [byte]), codes, lanes)
                        vals.append(builder.fmul(v, _splat(builder, builder.load(builder.gep(srow, [b])), lanes)))
                    for c, col in enumerate(_transpose_square(builder, vals, lanes)):
                        at = builder.add(builder.mul(builder.add(t, ir.Constant(I64, c)), ir.Constant(I64, nr)),
                                         ir.Constant(I64, h * lanes))
                        builder.store(col, builder.bitcast(builder.gep(pa.data, [at]), vt.as_pointer()),
                                      align=4 * lanes)
            return context.get_dummy_value()

        return sig, codegen

    return panel_decode


def _make_panel_mk(lanes, mr, xstride=None):
    """Build ``panel_mk(xpack, xo, panel, kn, y, i0, o0, nrows, add)``: for g < nrows, j <
    NR = 2 * lanes: ``y[i0 + g, o0 + j] (+)= sum over t < kn of xpack[xo + t * mr + g] *
    panel[t * NR + j]``, the sum a chain of fused multiply-adds (:func:`_mul_add`) from
    zero in order of t, then stored (``add`` 0) or added to y (one rounding more). The
    micro-kernel of the panel GEMM over an NF4 weight: mr x 2 vector accumulators in
    registers; per column t two aligned panel loads and mr broadcast inputs (xpack: mr
    input rows interleaved, ``kernels.nf4.pack_panel_rows``). Each output element gets
    the same operations whichever call and thread computes it. ``xstride`` (default mr):
    the interleaving of xpack's rows, when a kernel of fewer rows (``mr`` < PANEL_MR: the
    last group of a batch) reads the groups of PANEL_MR: the same operations for the rows
    it has, without the accumulators and multiply-adds of rows the batch does not have."""
    xs = mr if xstride is None else xstride

    @intrinsic
    def panel_mk(typingctx, xpack, xo, panel, kn, y, i0, o0, nrows, add):
        sig = types.void(xpack, xo, panel, kn, y, i0, o0, nrows, add)

        def codegen(context, builder, sig, args):
            xa, xoff, pa, count, ya, first, col, nr, acc_flag = _unpack(context, builder, sig, args, "aiaiaiiii")
            vt = _vec(F32, lanes)
            nrw = 2 * lanes
            xp = builder.gep(xa.data, [xoff])
            acc_p = [[cgutils.alloca_once_value(builder, ir.Constant(vt, None)) for _ in range(2)] for _ in range(mr)]
            with cgutils.for_range(builder, count) as cl:
                wp = builder.gep(pa.data, [builder.mul(cl.index, ir.Constant(I64, nrw))])
                w = [builder.load(builder.bitcast(builder.gep(wp, [ir.Constant(I64, h * lanes)]), vt.as_pointer()),
                                  align=4 * lanes) for h in range(2)]
                xk = builder.gep(xp, [builder.mul(cl.index, ir.Constant(I64, xs))])
                for g in range(mr):
                    xb = _splat(builder, builder.load(builder.gep(xk, [ir.Constant(I64, g)])), lanes)
                    for h in range(2):
                        builder.store(_mul_add(builder, w[h], xb, builder.load(acc_p[g][h]), vt), acc_p[g][h])
            ncol = builder.extract_value(ya.shape, 1)
            adding = builder.icmp_signed("!=", acc_flag, ir.Constant(I64, 0))
            for g in range(mr):
                with builder.if_then(builder.icmp_signed("<", ir.Constant(I64, g), nr)):
                    row = builder.gep(ya.data, [builder.add(builder.mul(builder.add(first, ir.Constant(I64, g)), ncol),
                                                            col)])
                    for h in range(2):
                        ptr = builder.bitcast(builder.gep(row, [ir.Constant(I64, h * lanes)]), vt.as_pointer())
                        v = builder.load(acc_p[g][h])
                        old = builder.load(ptr, align=4)
                        builder.store(builder.select(adding, builder.fadd(old, v), v), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return panel_mk


#: True where :func:`bf16_rows` runs (``vdpbf16ps``); the 16-bit products then take it.
BF16_DOT = _host_bf16_dot()
if BF16_DOT:  # the instruction is emitted as inline assembly (llvmlite's IR has no bfloat type)
    llvm_binding.initialize_native_asmparser()
#: Weights per chunk of :func:`bf16_rows`: 64 bytes, one <32 x i16> load.
BF16_CHUNK = 128
I16 = ir.IntType(16)


@intrinsic
def bf16_chunk_bits(typingctx, x, xo, xb, bo):
    """xb[bo + 32 k + q] = the bf16 bits of x[xo + 4 q + (k ^ 1)] rounded half to even, for
    q < 32, k < 4: one chunk of BF16_CHUNK float32 values (x: their uint32 bits) rounded
    and reordered as :func:`bf16_rows` reads them, in vector registers (the rounding of
    :func:`round_vector`, a NaN made quiet, as ``kernels.compute.round_values``; the top
    halves; one shuffle of the 128 halves). x: uint32, xb: uint16, flat; offsets in
    elements."""
    sig = types.void(x, xo, xb, bo)

    def codegen(context, builder, sig, args):
        xa = context.make_array(sig.args[0])(context, builder, args[0])
        ba = context.make_array(sig.args[2])(context, builder, args[2])
        xp = builder.gep(xa.data, [context.cast(builder, args[1], sig.args[1], types.int64)])
        bp = builder.gep(ba.data, [context.cast(builder, args[3], sig.args[3], types.int64)])
        it, ht = _vec(I32, BF16_CHUNK), _vec(I16, BF16_CHUNK)
        v = builder.load(builder.bitcast(xp, _vec(F32, BF16_CHUNK).as_pointer()), align=4)
        rounded = builder.bitcast(round_vector(builder, v, BF16_CHUNK, 1), it)
        r = builder.lshr(rounded, ir.Constant(it, [16] * BF16_CHUNK))
        order = [4 * (p % 32) + ((p // 32) ^ 1) for p in range(BF16_CHUNK)]
        h = builder.shuffle_vector(builder.trunc(r, ht), ir.Constant(ht, ir.Undefined),
                                   ir.Constant(_vec(I32, BF16_CHUNK), order))
        builder.store(h, builder.bitcast(bp, ht.as_pointer()), align=2)
        return context.get_dummy_value()

    return sig, codegen


def _bf16_half_table(builder, codes, scale):
    """<16 x i16>: the bf16 bits of rnd(codes * scale), half to even (:func:`round_vector`:
    a NaN product made quiet as ``vcvtne2ps2bf16`` converts it, so that both ways of
    building the table give the same bits for every scale whose products are not
    subnormal)."""
    it = _vec(I32, 16)
    rounded = builder.bitcast(round_vector(builder, builder.fmul(codes, _splat(builder, scale, 16)), 16, 1), it)
    return builder.trunc(builder.lshr(rounded, ir.Constant(it, [16] * 16)), _vec(I16, 16))


#: Below this absmax some ``code * absmax`` may be subnormal in float32, where
#: ``vcvtne2ps2bf16`` reads zero and the rounding on bits does not (2^-118: the smallest
#: nonzero |code| of NF4 and FP4 is above 2^-8).
_BF16_TINY_SCALE = 2.0 ** -118


def _bf16_rows_tiny(builder, srows, nblocks):
    """i1: whether a scale of the given rows (srows: pointers to their nblocks float32
    scales each) is below :data:`_BF16_TINY_SCALE`, where some ``code * absmax`` may be
    subnormal in float32 and ``vcvtne2ps2bf16`` reads zero. On the scales' bits: a signed
    compare below the threshold's bits is the float compare, except that a NaN with its
    sign bit set counts too (the rounding on bits then taken converts a NaN as the
    instruction does)."""
    limit = ir.Constant(I32, struct.unpack("<i", struct.pack("<f", _BF16_TINY_SCALE))[0])
    i8 = ir.IntType(8)
    found = cgutils.alloca_once_value(builder, ir.Constant(i8, 0))
    for srow in srows:
        bits = builder.bitcast(srow, I32.as_pointer())
        with cgutils.for_range(builder, nblocks) as bl:
            below = builder.icmp_signed("<", builder.load(builder.gep(bits, [bl.index]), align=4), limit)
            builder.store(builder.or_(builder.load(found), builder.zext(below, i8)), found)
    return builder.icmp_unsigned("!=", builder.load(found), ir.Constant(i8, 0))


def _bf16_unswitched(builder, tiny, body):
    """body(cvt) emitted twice, under ``if tiny`` with cvt False and else with cvt True: the
    chunk loops of :func:`_bf16_chunk` tables, one whose tables take one instruction each and
    have no branch (a test of the scales per chunk measured 1.2x slower: one-thread GEMV
    4096 x 4096, AMD EPYC), one for weights with tiny scales."""
    with builder.if_else(tiny, likely=False) as (small, normal):
        with small:
            body(False)
        with normal:
            body(True)


def _bf16_table(builder, codes, sa, sb):
    """<32 x i16>: the bf16 bits of rnd(codes * sa) then rnd(codes * sb), half to even, by
    one ``vcvtne2ps2bf16``: for scales whose products are normal or zero (none below
    :data:`_BF16_TINY_SCALE`; NaN and infinity included: the instruction rounds those as
    the rounding on bits does)."""
    wt = _vec(I16, 32)
    ft = _vec(F32, 16)
    lo = builder.fmul(codes, _splat(builder, sa, 16))
    hi = builder.fmul(codes, _splat(builder, sb, 16))
    return builder.asm(ir.FunctionType(wt, [ft, ft]), "vcvtne2ps2bf16 $2, $1, $0", "=v,v,v", [hi, lo], False,
                       "cvtne2")


def _bf16_chunk(builder, prow, srow, e, bs, codes, cvt):
    """The 32 16-bit words (4 nibbles each) and the 32-entry bf16 table of the 128-weight
    chunk at element e of a weight row (prow: its packed bytes, srow: its scales); the table
    by :func:`_bf16_table` (``cvt``: the row has no tiny scale) or by the rounding on bits
    of each half (same bits where both apply)."""
    wt = _vec(I16, 32)
    words = builder.load(builder.bitcast(builder.gep(prow, [builder.lshr(e, ir.Constant(I64, 1))]), wt.as_pointer()),
                         align=1)
    sa = builder.load(builder.gep(srow, [builder.udiv(e, bs)]))
    sb = builder.load(builder.gep(srow, [builder.udiv(builder.add(e, ir.Constant(I64, 64)), bs)]))
    if cvt:
        return words, _bf16_table(builder, codes, sa, sb)
    return words, builder.shuffle_vector(_bf16_half_table(builder, codes, sa), _bf16_half_table(builder, codes, sb),
                                         ir.Constant(_vec(I32, 32), list(range(32))))


def _bf16_nibbles(builder, words, table, k):
    """Nibble position k of every word looked up in the table (``vpermw``): bits 4k .. 4k + 3,
    plus 16 in the second half of the chunk (the second block's half of the table)."""
    wt = _vec(I16, 32)
    perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(wt, [wt, wt]),
                                          "llvm.x86.avx512.permvar.hi.512")
    half = ir.Constant(wt, [0] * 16 + [16] * 16)
    if k == 3:  # the top nibble: nothing above it to mask; shift the half's bit in with it
        # (a funnel shift: one vpshldw / vpshrdw where the CPU has AVX512-VBMI2)
        fshr = cgutils.get_or_insert_function(builder.module, ir.FunctionType(wt, [wt, wt, wt]), "llvm.fshr.v32i16")
        return builder.call(perm, [table, builder.call(fshr, [ir.Constant(wt, [0] * 16 + [1] * 16), words,
                                                              ir.Constant(wt, [12] * 32)])])
    idx = builder.lshr(words, ir.Constant(wt, [4 * k] * 32)) if k else words
    return builder.call(perm, [table, builder.or_(builder.and_(idx, ir.Constant(wt, [15] * 32)), half)])


def _bf16_dot(builder, acc, w, x):
    """acc + the products of the bf16 lane pairs of w and x (``vdpbf16ps``)."""
    ft, wt = _vec(F32, 16), _vec(I16, 32)
    return builder.asm(ir.FunctionType(ft, [ft, wt, wt]), "vdpbf16ps $3, $2, $0", "=v,0,v,v", [acc, w, x], False,
                       "dpbf16")


def _bf16_accumulators(builder, nw, nx):
    """nw x nx float32 <16 x float> accumulators, zero."""
    ft = _vec(F32, 16)
    return [[cgutils.alloca_once_value(builder, ir.Constant(ft, None)) for _ in range(nx)] for _ in range(nw)]


def _bf16_store_sums(builder, acc_p, out):
    """out[a * nx + g] = the halving sum of accumulator (a, g)."""
    nx = len(acc_p[0])
    for a, row in enumerate(acc_p):
        for g, p in enumerate(row):
            builder.store(_hsum(builder, builder.load(p), 16), builder.gep(out, [ir.Constant(I64, a * nx + g)]))


def _make_bf16_rows(nw, nx):
    """Build ``bf16_rows(packed, o, xb, i, scales, code, blocksize, out)``: out[a * nx + g]
    = rnd(deq(W))[o + a] . xb[i + g] for a < nw, g < nx, accumulated in float32 by
    ``vdpbf16ps``.

    xb: bf16 bits (n, in) in ``kernels.compute.bf16_bits``' order; ``in % 128 == 0`` and
    ``blocksize % 64 == 0``. Per chunk of 128 weights of a row: the 64 bytes load as 32
    16-bit words; the 16-entry table of each half chunk (64 weights, within one block) is
    ``rnd(code * absmax)`` in bf16, the two side by side in one 32-entry table (built by
    one ``vcvtne2ps2bf16``, :func:`_bf16_table`, where none of the rows' scales is tiny,
    else by the rounding on bits, same bits; tested once per call); nibble
    position k of every word is ``(word >> 4k) & 15`` (+16 in the second half), looked up
    with one ``vpermw``, and ``vdpbf16ps`` adds the products of its lane pairs with x into
    the pair's accumulator (k = 0, 1, 2, 3 in order; the instruction flushes subnormals).
    Finally the accumulator's halving sum. Each (o, i) gets these operations whatever
    ``nw`` and ``nx``: several weight rows (a GEMV) or several input rows per call only
    give the CPU independent chains to overlap."""

    @intrinsic
    def bf16_rows(typingctx, packed, o, xb, i0, scales, code, blocksize, out):
        sig = types.void(packed, o, xb, i0, scales, code, blocksize, out)

        def codegen(context, builder, sig, args):
            pk, row, xa, first, sc, cd, bs, oa = _rows_args(context, builder, sig, args)
            wt = _vec(I16, 32)
            in_f = builder.extract_value(xa.shape, 1)
            nchunks = builder.udiv(in_f, ir.Constant(I64, BF16_CHUNK))
            wrows = _weight_rows(builder, pk, sc, row, nw, in_f, bs)
            xrows = _row_ptrs(builder, xa.data, first, nx, in_f)
            codes = _load_codes(builder, cd.data, 16)
            acc_p = _bf16_accumulators(builder, nw, nx)

            def chunks(cvt):
                with cgutils.for_range(builder, nchunks) as cl:
                    e = builder.mul(cl.index, ir.Constant(I64, BF16_CHUNK))

                    def xv(g, k, e=e):
                        ptr = builder.gep(xrows[g], [builder.add(e, ir.Constant(I64, 32 * k))])
                        return builder.load(builder.bitcast(ptr, wt.as_pointer()), align=2)
                    _prefetch_next_rows(builder, [wrows[a][0] for a in range(nw)], builder.lshr(e, ir.Constant(I64, 1)),
                                        in_f)
                    for a in range(nw):
                        words, table = _bf16_chunk(builder, *wrows[a], e, bs, codes, cvt)
                        accs = [builder.load(acc_p[a][g]) for g in range(nx)]
                        for k in range(4):
                            w = _bf16_nibbles(builder, words, table, k)
                            accs = [_bf16_dot(builder, accs[g], w, xv(g, k)) for g in range(nx)]
                        for g in range(nx):
                            builder.store(accs[g], acc_p[a][g])

            # the table is a large part of the work at these batch sizes: one instruction where it can
            _bf16_unswitched(builder, _bf16_rows_tiny(builder, [sr for _, sr in wrows], builder.udiv(in_f, bs)), chunks)
            _bf16_store_sums(builder, acc_p, oa.data)
            return context.get_dummy_value()

        return sig, codegen

    return bf16_rows


def _make_bf16_decode_row():
    """Build ``bf16_decode_row(packed, o, scales, code, blocksize, wbuf, r)``: weight row
    o decoded into ``wbuf[r]`` (uint16, bf16 bits) in the order :func:`_make_bf16_rows`
    feeds ``vdpbf16ps``: chunk c, nibble position k at ``wbuf[r, 128 c + 32 k:][:32]``. The
    same table (:func:`_bf16_table`, same bits) and lookups as the fused rows; for large
    batches, where each row is then read by every input row without decoding again."""

    @intrinsic
    def bf16_decode_row(typingctx, packed, o, scales, code, blocksize, wbuf, r):
        sig = types.void(packed, o, scales, code, blocksize, wbuf, r)

        def codegen(context, builder, sig, args):
            pk = context.make_array(sig.args[0])(context, builder, args[0])
            row = context.cast(builder, args[1], sig.args[1], types.int64)
            sc = context.make_array(sig.args[2])(context, builder, args[2])
            cd = context.make_array(sig.args[3])(context, builder, args[3])
            bs = context.cast(builder, args[4], sig.args[4], types.int64)
            wb = context.make_array(sig.args[5])(context, builder, args[5])
            r = context.cast(builder, args[6], sig.args[6], types.int64)
            wt = _vec(I16, 32)
            in_f = builder.extract_value(wb.shape, 1)
            nchunks = builder.udiv(in_f, ir.Constant(I64, BF16_CHUNK))
            [(prow, srow)] = _weight_rows(builder, pk, sc, row, 1, in_f, bs)
            [wrow] = _row_ptrs(builder, wb.data, r, 1, in_f)
            codes = _load_codes(builder, cd.data, 16)

            def chunks(cvt):
                with cgutils.for_range(builder, nchunks) as cl:
                    e = builder.mul(cl.index, ir.Constant(I64, BF16_CHUNK))
                    words, table = _bf16_chunk(builder, prow, srow, e, bs, codes, cvt)
                    for k in range(4):
                        ptr = builder.gep(wrow, [builder.add(e, ir.Constant(I64, 32 * k))])
                        builder.store(_bf16_nibbles(builder, words, table, k), builder.bitcast(ptr, wt.as_pointer()),
                                      align=2)

            _bf16_unswitched(builder, _bf16_rows_tiny(builder, [srow], builder.udiv(in_f, bs)), chunks)
            return context.get_dummy_value()

        return sig, codegen

    return bf16_decode_row


def _make_bf16_block(nw, nx):
    """Build ``bf16_block(wbuf, r, xb, i, out)``: out[a * nx + g] = wbuf[r + a] . xb[i + g]
    for a < nw, g < nx, both in :func:`_make_bf16_rows`' order: per chunk the four
    ``vdpbf16ps`` into one accumulator per pair, k = 0 .. 3, then the halving sum: the
    operations of the fused rows, on a row decoded beforehand, so the same bits."""

    @intrinsic
    def bf16_block(typingctx, wbuf, r, xb, i0, out):
        sig = types.void(wbuf, r, xb, i0, out)

        def codegen(context, builder, sig, args):
            wb = context.make_array(sig.args[0])(context, builder, args[0])
            r = context.cast(builder, args[1], sig.args[1], types.int64)
            xa = context.make_array(sig.args[2])(context, builder, args[2])
            first = context.cast(builder, args[3], sig.args[3], types.int64)
            oa = context.make_array(sig.args[4])(context, builder, args[4])
            wt = _vec(I16, 32)
            in_f = builder.extract_value(xa.shape, 1)
            nchunks = builder.udiv(in_f, ir.Constant(I64, BF16_CHUNK))
            wrows = _row_ptrs(builder, wb.data, r, nw, in_f)
            xrows = _row_ptrs(builder, xa.data, first, nx, in_f)
            acc_p = _bf16_accumulators(builder, nw, nx)
            with cgutils.for_range(builder, nchunks) as cl:
                e = builder.mul(cl.index, ir.Constant(I64, BF16_CHUNK))
                accs = [[builder.load(acc_p[a][g]) for g in range(nx)] for a in range(nw)]
                for k in range(4):
                    off = builder.add(e, ir.Constant(I64, 32 * k))
                    ws = [builder.load(builder.bitcast(builder.gep(wrows[a], [off]), wt.as_pointer()), align=2)
                          for a in range(nw)]
                    for g in range(nx):
                        xv = builder.load(builder.bitcast(builder.gep(xrows[g], [off]), wt.as_pointer()), align=2)
                        for a in range(nw):
                            accs[a][g] = _bf16_dot(builder, accs[a][g], ws[a], xv)
                for a in range(nw):
                    for g in range(nx):
                        builder.store(accs[a][g], acc_p[a][g])
            _bf16_store_sums(builder, acc_p, oa.data)
            return context.get_dummy_value()

        return sig, codegen

    return bf16_block


#: Weight rows and input rows per call of :data:`bf16_block` (24 accumulators; 6 x 4
#: measured fastest with 4 x 6 of 2 x 8, 3 x 8, 4 x 4, 4 x 6, 6 x 4 and 2 x 12 on AMD EPYC,
#: batch 128: 1.45x the fused rows).
BF16_BW = 6
BF16_BX = 4
#: The fused bf16 product's groups of input rows: weight rows per call of the group of nx
#: input rows, indexed by nx (1-8; the kernel, ``kernels.compute.nf4_matmul_bf16dot``,
#: reads it too). A batch runs groups of 8 input rows, then one group of the rest (batch
#: 13: 8 + 5), each weight chunk decoded once per group; 4 weight rows per call for groups
#: of up to 4 input rows, 2 for wider ones (at most 16 accumulators: they stay in
#: registers). Measured on AMD EPYC (AVX512-BF16), 4096 x 4096, ``nf4_matmul`` on one
#: thread (medians of two runs each, alternating): batch 2 / 3 / 4 / 5 / 6 / 7 in 0.63 /
#: 0.77 / 0.95 / 1.14 / 1.33 / 1.58 ms this way, against 0.97 / 1.43 / 1.88 / 2.38 / 2.77 /
#: 3.21 ms with input rows short of 8 one at a time (the 4-row GEMV calls) and the table
#: rounded on bits; 2 x 8 was the fastest shape of 1-4 x 4-8 at batch 8.
BF16_GROUP_NW = (0, 4, 4, 4, 4, 2, 2, 2, 2)
#: The widest group's input rows, and the most products one call of a group returns.
BF16_GROUP_MAX = len(BF16_GROUP_NW) - 1
BF16_GROUP_BUF = max(nx * nw for nx, nw in enumerate(BF16_GROUP_NW))
(bf16_rows_x8, bf16_rows_x7, bf16_rows_x6, bf16_rows_x5, bf16_rows_x4, bf16_rows_x3, bf16_rows_x2,
 bf16_rows_w) = ([_make_bf16_rows(BF16_GROUP_NW[nx], nx) for nx in range(BF16_GROUP_MAX, 0, -1)] if BF16_DOT
                 else [None] * BF16_GROUP_MAX)
bf16_rows_1 = _make_bf16_rows(1, 1) if BF16_DOT else None
bf16_decode_row = _make_bf16_decode_row() if BF16_DOT else None
bf16_block = _make_bf16_block(BF16_BW, BF16_BX) if BF16_DOT else None


row_dot = _make_row_dot(LANES) if LANES else None
dot16 = _make_dot16(LANES) if LANES else None
#: Rows per call of the LoRA expand in registers (``expand_x4``; a batch's last 1-3 rows
#: ``expand_x3`` .. ``expand_x1``).
EXPAND_NX = 4
expand_x4, expand_x3, expand_x2, expand_x1 = (
    [_make_expand_rows(nx, LANES) for nx in range(EXPAND_NX, 0, -1)] if LANES else [None] * EXPAND_NX)
#: Vectors per row of ``bank_rows_wide`` (one row, 4 x 16 columns per call).
BANK_WIDE = 4
#: The bank's row kernels: four rows and 32 / 16 / 8 columns, one row and 64 / 16 / 8.
bank_rows_x4w, bank_rows_x4, bank_rows_x4h, bank_rows_wide, bank_rows_x1, bank_rows_x1h = (
    (_make_bank_rows(BANK_ROWS, 2), _make_bank_rows(BANK_ROWS, 1), _make_bank_rows(BANK_ROWS, 1, 8),
     _make_bank_rows(1, BANK_WIDE), _make_bank_rows(1, 1), _make_bank_rows(1, 1, 8)) if LANES else (None,) * 6)
lane8_dots, lane8_dot1 = (_make_lane8_dots(LANE8_RANKS), _make_lane8_dots(1)) if LANES else (None, None)
#: (weight rows, input rows) per call of the fused rounded products.
ROUNDED_SHAPES = ((2, 4), (1, 4), (4, 1), (1, 1))
rounded_2x4, rounded_1x4, rounded_4x1, rounded_1x1 = (
    [_make_rounded_dot(LANES, w, x) for w, x in ROUNDED_SHAPES] if LANES else [None] * 4)
decode_blocks_bf16 = _make_decode(LANES, False, 1) if LANES else None
decode_blocks_f16 = _make_decode(LANES, False, 2) if LANES else None
decode_blocks_bf16_stream = _make_decode(LANES, True, 1, aligned=True) if LANES else None
decode_blocks_f16_stream = _make_decode(LANES, True, 2, aligned=True) if LANES else None
delta_rows = _make_delta_rows(DELTA_ROWS, False) if LANES else None
merge_rows = _make_delta_rows(DELTA_ROWS, True) if LANES else None
encode_block = _make_encode(LANES) if LANES else None
rows_dot = _make_rows_dot(LANES, GROUP) if LANES else None
wrows_dot = _make_wrows_dot(LANES, WROWS) if LANES else None
#: The word decode's group kernels: batch rows in groups of WORDS_NX (``words_x4``), the
#: rest as one group of 1-3 (``words_x3`` .. ``words_x1``); WORDS_GROUP_NW[k]: the weight
#: rows per call for a group of k input rows (each chunk of them decoded once per group).
#: Measured on AMD EPYC (AVX-512), the call alone in a serial loop over 4096 x 4096 on
#: one thread (2026-12-05, docs/performance.md): of the shapes tried (1-8 weight rows x
#: 1-16 input rows), 2 or 4 weight rows x 4 input rows the fastest at 4 and more rows
#: (2 x 8 3 % faster at batch 8, level at 16), 4 weight rows at 1 and 2 input rows (8 x 1
#: 4 % faster at batch 1 in that loop, 1 % in the kernel), 2 and 4 alike at 3; on 8
#: lanes 2 x 4 and 4 x 4 alike. A real AVX2 machine has 16 vector registers, not 32:
#: measured there (AMD Zen 3, the same loop, one process, 2026-12-06, ms for 1 / 2 / 4
#: input rows), the byte-plane decode with 1 or 2 weight rows 1.58 / 1.98 / 2.98 (2 rows:
#: 1.59 / 2.24 / 3.32, 4 rows: 1.75 / 3.62 / -), the permute decode 2.63 / 3.04 / 3.92
#: with one weight row, 2.59 / 3.01 / 4.48 with two, 2.70 / 3.55 / - with four.
WORDS_NX = 4
if LANES != 8 or _host_has("avx512f"):
    WORDS_GROUP_NW = (0, 4, 4, 2, 2)
else:
    WORDS_GROUP_NW = (0, 2, 1, 1, 1) if PLANES8 else (0, 2, 2, 1, 1)
WORDS_BUF = max(k * WORDS_GROUP_NW[k] for k in range(1, WORDS_NX + 1))
words_x4 = _make_dot_words(LANES, WORDS_GROUP_NW[4], 4) if LANES else None
words_x3 = _make_dot_words(LANES, WORDS_GROUP_NW[3], 3) if LANES else None
words_x2 = _make_dot_words(LANES, WORDS_GROUP_NW[2], 2) if LANES else None
words_x1 = _make_dot_words(LANES, WORDS_GROUP_NW[1], 1) if LANES else None
words_one = _make_dot_words(LANES, 1, 1) if LANES else None
#: Input rows per call of the word-decode input gradient (``t_words2``; an odd last row
#: ``t_words1``): 8 column vectors of sums per input row stay in registers. Used up to
#: T_WORDS_MAX_ROWS input rows, more rows through ``nf4_matmul_t_simd`` (four weight rows
#: decoded into an L1 buffer per pass over the sums). On one thread with the weight in
#: cache the buffer decode was level at 3 rows and faster from 4 (2026-12-05); with the
#: prefetches of :func:`_prefetch_row_ahead`, two threads, 4096 x 4096 (AMD EPYC, three
#: rounds alternating, 2026-12-06) the word decode took batch 3 / 4 / 8 in 1.39-1.42 /
#: 1.52-1.74 / 2.92-3.13 ms with the weight in main memory (a model's backward pass)
#: against 3.04-3.31 / 3.29-3.40 / 4.28-4.78, and 1.24 / 1.36-1.46 / 2.73-2.86 against
#: 1.54-1.63 / 1.78-2.01 / 2.84-3.43 from the last-level cache; at 12 and 16 rows the
#: buffer decode stayed ahead from cache (3.7-4.1 against 4.2-4.3 ms at 12).
T_WORDS_NX = 2
T_WORDS_MAX_ROWS = 8
t_words2 = _make_t_words(LANES, 2) if LANES else None
t_words1 = _make_t_words(LANES, 1) if LANES else None
decode_blocks = _make_decode(LANES, False) if LANES else None
decode_blocks_stream = _make_decode(LANES, True) if LANES else None
#: Streaming stores into an output aligned to the vector (the large-batch tiles).
decode_blocks_stream_aligned = _make_decode(LANES, True, aligned=True) if LANES else None
#: Alignment (bytes) that :data:`decode_blocks_stream_aligned` needs of its output (the
#: widest vector).
STREAM_ALIGN = 64
#: The panel GEMM over an NF4 weight (``kernels.nf4.nf4_matmul_panels``): input rows per
#: micro-kernel call (PANEL_MR x 2 vector accumulators), weight rows per panel (two
#: vectors), columns per panel (PANEL_KC: a panel of 512 x 32 float32 is 64 KiB, in L2).
PANEL_MR = 8 if LANES == 16 else 6  # AVX2: 12 accumulators of its 16 registers
PANEL_NR = 2 * LANES
PANEL_KC = 512
panel_decode = _make_panel_decode(LANES) if LANES else None
panel_mk = _make_panel_mk(LANES, PANEL_MR) if LANES else None
#: The micro-kernel for a batch's last group of 1, 2 or 4 rows (fewer than PANEL_MR): the
#: same chain per output, a quarter to half of the work at batch sizes 1-4, 17-20, ...
panel_mk1 = _make_panel_mk(LANES, 1, PANEL_MR) if LANES else None
panel_mk2 = _make_panel_mk(LANES, 2, PANEL_MR) if LANES else None
panel_mk4 = _make_panel_mk(LANES, 4, PANEL_MR) if LANES else None
#: The panel micro-kernel's operations for one input row, straight from a dense weight's
#: rows (no panel): 32 / 16 / 8 outputs per call.
gemv_t4 = _make_gemv_t(4) if LANES else None
gemv_t2 = _make_gemv_t(2) if LANES else None
gemv_t1 = _make_gemv_t(1) if LANES else None
