"""The NF4 products over validated 2-D float32 arrays: the fused forward, the panel GEMM of
large batches (the bank's row-stable product runs it too) and their path through BLAS,
the input gradient ``G deq(W)``; the designated home of
the NF4 internals that :mod:`numlora.nf4` and the bank's base product
(:mod:`numlora.multi.product`) share (every module may import from here).

Names for the rest of the package (this module is private): :func:`forward`,
:func:`blas_product`, :func:`panel_product`, :func:`panels_ok`, :func:`row_tiles`, :func:`grad_input`,
:func:`tensor_arrays`,
:func:`simd_ok`, :func:`words_layout`, :data:`FUSED_MAX_ROWS`, :data:`TILE_ELEMS`, and for the
16-bit compute dtypes :func:`compute_mode`, :func:`compute_name` (:func:`forward` and
:func:`grad_input` take the mode). They take an NF4Tensor already checked (2-D) and arrays
already validated; nothing here raises on user input but :func:`compute_mode` (the one
check of a ``compute_dtype`` argument, shared by the functions and the QLoRA layer).
"""

from __future__ import annotations

import numpy as np

from . import _backward as bw
from . import _scratch
from ._lazy import kernels
from .errors import ConfigError

#: The compute dtypes, by name, and their kernel mode numbers (see ``kernels.compute``).
COMPUTE_DTYPES = {"float32": 0, "bfloat16": 1, "float16": 2}


def compute_mode(value) -> int:
    """The kernel mode of a ``compute_dtype`` argument: None or float32 -> 0 (the float32
    kernels), bfloat16 -> 1, float16 -> 2. Takes a name ("bfloat16", also torch's
    "torch.bfloat16"), a numpy dtype or scalar type (``np.float16``,
    ``ml_dtypes.bfloat16``) or a torch dtype; anything else is a ConfigError."""
    if value is None:
        return 0
    name = value if isinstance(value, str) else getattr(value, "name", None)
    if name is None:
        try:
            name = np.dtype(value).name
        except TypeError:
            name = str(value)
    name = name[len("torch."):] if name.startswith("torch.") else name
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"expected compute_dtype one of {sorted(COMPUTE_DTYPES)} (or None for float32), got "
                          f"{value!r:.60}")
    return COMPUTE_DTYPES[name]


def compute_name(mode: int) -> str:
    """The name of a compute mode (the inverse of :func:`compute_mode`)."""
    return next(k for k, v in COMPUTE_DTYPES.items() if v == mode)


def tensor_arrays(t):
    """The arrays of an NF4Tensor a decode reads while it writes, by name, for the overlap
    checks of ``out=``: the codes and the float32 scales (under double quantization the
    scales are decoded from absmax, absmax2 and code8 once, before anything is written)."""
    return {"t.packed": t.packed, "t.scales": t.scales}


def simd_ok(k, blocksize) -> bool:
    """Whether the SIMD decode applies (the CPU has it and blocks hold whole chunks)."""
    return k.SIMD_LANES > 0 and blocksize % k.SIMD_LANES == 0


def words_ok(k, in_f, blocksize) -> bool:
    """Whether the word decode applies (``kernels._simd.words_ok`` on this CPU's SIMD
    width): the float32 forward's kernel and the input gradient's at 1-2 rows."""
    return simd_ok(k, blocksize) and k.simd_words_ok(k.SIMD_LANES, in_f, blocksize)


#: float32 elements per decoded tile on the large-batch path (8 MiB at most, whatever the
#: weight's size: larger tiles keep BLAS efficient).
TILE_ELEMS = 1 << 21

#: Batches up to this many rows run the fused kernels (each byte of W decoded once, in
#: registers, for every row); larger batches run the panel GEMM (:func:`panel_product`),
#: or decode tiles of W and hand them to BLAS where the panels do not take the weight.
FUSED_MAX_ROWS = 16


def forward(x2, t, lora_a, lora_b, s, bias, out2, x_lora=None, u_out=None, mode=0):
    """out2 = x2 deq(W)^T (+ s (x_lora A^T) B^T) (+ bias); A, B, bias float32 or None.
    ``mode``: the compute dtype (:func:`compute_mode`; a 16-bit one runs
    :func:`_forward_rounded`).

    x_lora: the LoRA path's input (the dropped x in training; x2 when None). u_out: an
    optional (n, r) float32 buffer that receives ``x_lora A^T`` unscaled (what the backward
    reuses): the shrink then runs with scale 1 and the scale is applied to a copy (the
    same bits as the shrink with the scale)."""
    k = kernels("nf4")
    if mode:
        _forward_rounded(x2, t, mode, lora_a, lora_b, s, bias, out2, x_lora, u_out)
        return
    n = x2.shape[0]
    if n == 0:
        return
    out_f, in_f = t.shape
    scales = t.scales
    use_bias = bias is not None
    b_arr = bias if use_bias else np.zeros(1, np.float32)
    xl = x2 if x_lora is None else x_lora
    if n > FUSED_MAX_ROWS:
        if panels_ok(t) and out2.flags.c_contiguous:
            _park(t, n)
            panel_product(x2, t, scales, out2)
        else:
            blas_product(x2, t, scales, out2)
        if lora_a is not None:
            bw.add_low_rank(xl, lora_a, lora_b, s, out2, u_out)
        if use_bias:
            out2 += b_arr
        return
    if lora_a is None:
        u = np.zeros((n, 0), np.float32)
        lora_b = np.zeros((out_f, 0), np.float32)
    else:
        u = bw.shrink_kernels(xl, lora_a, s, u_out)
    bs = t.blocksize
    _park(t, n)
    if words_ok(k, in_f, bs):
        u, vec = _expand_operands(k, u, lora_b, out2)
        k.nf4_matmul_words(t.packed, scales, bs, t.code, words_layout(x2), u, vec, lora_b, b_arr,
                           use_bias, out2)
    elif in_f % bs == 0 and simd_ok(k, bs) and bs % (2 * k.SIMD_LANES) == 0:
        xe = np.ascontiguousarray(x2[:, 0::2])
        xo = np.ascontiguousarray(x2[:, 1::2])
        u, vec = _expand_operands(k, u, lora_b, out2)
        k.nf4_matmul_simd(t.packed, scales, bs, t.code, xe, xo, u, vec, lora_b, b_arr, use_bias, out2)
    elif in_f % bs == 0 and bs % 2 == 0:
        if n == 1:
            k.nf4_gemv_lut(t.packed, scales, bs, t.code, x2[0], u, lora_b, b_arr, use_bias, out2[0])
        else:
            k.nf4_gemm_pairs(t.packed, scales, bs, t.code, np.ascontiguousarray(x2.T), u, lora_b, b_arr,
                             use_bias, out2)
    else:
        k.nf4_gemm_any(t.packed, scales, bs, t.code, np.ascontiguousarray(x2.T), u, lora_b, b_arr,
                       use_bias, out2)


def _expand_operands(k, u, lora_b, out2):
    """(u, vec) for the SIMD products' epilogue (``kernels.nf4._finish_rows``): u
    C-contiguous; vec: the expand in registers (a LoRA branch, B and the output
    C-contiguous), else the element-by-element epilogue. The same bits either way."""
    u = np.ascontiguousarray(u)
    return u, bool(u.shape[1] and k.expand_ok(lora_b, out2))


def _park(t, n) -> None:
    """Send OpenBLAS's spinning workers to sleep before a parallel NF4 kernel of n input
    rows: from ``_jit.PARK_MIN_ROWS`` rows and ``_jit.PARK_MIN_WORK`` weight-rows."""
    park_rows(t.numel, n)


def park_rows(numel, n, min_rows=None) -> None:
    """:func:`_park` for a weight of ``numel`` elements (dense or NF4) and n input rows
    (from ``min_rows``, default ``_jit.PARK_MIN_ROWS``): before numlora's own product
    kernels wherever they are called from (the bank's row-stable products included)."""
    jit = kernels("_jit")
    if n >= (jit.PARK_MIN_ROWS if min_rows is None else min_rows):
        jit.park_before(n * numel, jit.PARK_MIN_WORK)


def words_layout(x2):
    """x2 (n, in) float32 reordered for the word decode (see ``kernels._simd.dot_words``;
    ``kernels.nf4.words_reorder``): each chunk of 8 * lanes elements as 8 vectors, vector
    m holding elements 8 l + m."""
    xp = np.empty(x2.shape, np.float32)
    kernels("nf4").words_reorder(np.ascontiguousarray(x2), xp)
    return xp


def blas_product(x2, t, scales, out2, mode=0):
    """out2 = x2 deq(W)^T for large batches: decode tiles of rows of W (at most
    TILE_ELEMS floats, serially: a parallel decode right after a BLAS call fights
    OpenBLAS's spinning threads; ``mode``: rounded to that compute dtype), multiply each
    by the whole batch with BLAS into y^T, transpose once (by tiles:
    :func:`numlora._backward.transpose_copy`)."""
    yt = _scratch.scratch("nf4.yt", t.shape[0] * x2.shape[0], np.float32).reshape(t.shape[0], x2.shape[0])
    xt = x2.T
    for r0, r1, cur in row_tiles(t, scales, mode):
        np.dot(cur, xt, out=yt[r0:r1])
    bw.transpose_copy(yt, out2)


def panels_ok(t) -> bool:
    """Whether :func:`panel_product` applies: the SIMD build, blocks of whole vectors,
    rows of whole blocks, a whole number of panels."""
    k = kernels("nf4")
    out_f, in_f = t.shape
    return (simd_ok(k, t.blocksize) and in_f % t.blocksize == 0 and out_f % k.PANEL_NR == 0
            and t.packed.flags.c_contiguous)


def panel_product(x2, t, scales, out2):
    """out2 (C-contiguous) = x2 deq(W)^T by ``kernels.nf4.nf4_matmul_panels``: W decoded a panel at a time
    into each worker's L2 and multiplied there by a register-blocked GEMM micro-kernel
    (no BLAS call, no decoded tile in memory), numba's threads taking tasks as they come.
    Each row's result is the same bits whatever the batch size and the thread count.
    Measured against the decoded tiles with OpenBLAS (AMD EPYC, AVX-512, 2 cores, 4096 x
    4096, the cores free; docs/performance.md): 11.5 against 16.7 ms at batch 64, 21.9
    against 28.4 at 128, 170 against 210 at 1024. Right after a numpy product OpenBLAS's
    spinning workers would share a core with it: :func:`forward` sends them to sleep
    first (``_jit.park_blas``; docs/performance.md, "The panels in the public
    products")."""
    xpack, ws = _panel_operands(x2)
    kernels("nf4").nf4_matmul_panels(t.packed, np.ascontiguousarray(scales, np.float32), t.blocksize, t.code, xpack,
                                     np.zeros(1, np.int64), out2, ws)


def _panel_operands(x2):
    """(xpack, ws) of the panel GEMMs: x2's rows interleaved by groups of PANEL_MR
    (``kernels.nf4.pack_panel_rows``) and each worker's panel scratch, both from the
    calling thread's scratch."""
    k = kernels("nf4")
    n, width = x2.shape
    ng = -(-n // k.PANEL_MR)
    xpack = _scratch.scratch("nf4.xpack", ng * width * k.PANEL_MR, np.float32).reshape(ng, width, k.PANEL_MR)
    k.pack_panel_rows(x2, xpack)
    nw = kernels("_jit").num_threads()
    ws = _scratch.scratch("nf4.panels", nw * (k.PANEL_KC * k.PANEL_NR + 16), np.float32).reshape(nw, -1)
    return xpack, ws


def dense_panels_ok(shape) -> bool:
    """Whether :func:`dense_panel_product` takes a dense (out, in) weight on this build."""
    k = kernels("nf4")
    return bool(k.SIMD_LANES) and shape[0] % k.PANEL_NR == 0 and shape[1] % 8 == 0


def dense_panel_product(x2, w, out2):
    """out2 (C-contiguous) = x2 W^T for a dense float32 C-contiguous W by
    ``kernels.nf4.dense_matmul_panels``: :func:`panel_product`'s GEMM with each panel
    copied from W; one row by ``kernels.nf4.dense_matmul_rows`` (the same operations, W's
    rows transposed in registers). Each row's result the same bits whatever the batch, its
    position and the threads (``dense_panels_ok`` shapes)."""
    if x2.shape[0] == 1:  # the same operations without panels (1.3-1.5x faster for one row on AMD Zen 3)
        kernels("nf4").dense_matmul_rows(w, x2, out2)
        return
    xpack, ws = _panel_operands(x2)
    kernels("nf4").dense_matmul_panels(w, xpack, np.zeros(1, np.int64), out2, ws)


def row_tiles(t, scales, mode=0):
    """Yield ``(r0, r1, tile)``: rows r0:r1 of deq(W), decoded (serially) into the calling
    thread's scratch tile of at most TILE_ELEMS floats, for the large-batch paths that
    multiply them with BLAS (the forward's ``x W^T`` and the backward's ``G W``). The tile
    starts 64-byte aligned, so the SIMD decode streams its stores (see
    ``kernels.nf4.nf4_decode_simd_tile``). ``mode`` 1 / 2: each value rounded to bfloat16 /
    float16 (see :func:`compute_mode`)."""
    kc, k = kernels("compute"), kernels("nf4")

    out_f, in_f = t.shape
    rows = max(1, min(out_f, TILE_ELEMS // in_f))
    tile = _scratch.scratch("nf4.tile", rows * in_f, np.float32).reshape(rows, in_f)
    bs = t.blocksize
    simd = in_f % bs == 0 and simd_ok(k, bs)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        cur = tile[: r1 - r0]
        if simd and mode:
            kc.nf4_decode_rounded_tile(t.packed, scales, bs, t.code, mode, r0 * in_f // bs, r1 * in_f // bs,
                                       cur.reshape(-1))
        elif simd:
            k.nf4_decode_simd_tile(t.packed, scales, bs, t.code, r0 * in_f // bs, r1 * in_f // bs, cur.reshape(-1))
        else:
            k.nf4_dequantize_tile(t.packed, scales, bs, t.code, r0 * in_f, r1 * in_f, cur.reshape(-1))
            if mode:
                kc.round_values(cur.reshape(-1), mode)
        yield r0, r1, cur


def grad_input(g2, t, dx, mode=0):
    """dx = g2 deq(W) (overwritten). Up to FUSED_MAX_ROWS rows: the fused kernel (W
    decoded a row segment at a time, with SIMD permutes into an L1 buffer where the CPU
    has them; up to ``SIMD_T_WORDS_MAX_ROWS`` (8) rows with the word decode and the sums in
    registers where it applies, its weight lines prefetched;
    the same result every way). More rows: decode tiles of rows of W
    (TILE_ELEMS floats at most, serially, as the forward's large-batch path does) and
    accumulate ``G[:, rows] @ tile`` with BLAS; never a whole dequantized copy of W."""
    k = kernels("nf4")

    n = g2.shape[0]
    if n == 0:
        return
    scales = t.scales
    if mode:
        _grad_input_rounded(g2, t, mode, dx)
        return
    if n <= FUSED_MAX_ROWS:
        bs = t.blocksize
        _park(t, n)
        if n <= k.SIMD_T_WORDS_MAX_ROWS and words_ok(k, t.shape[1], bs):
            k.nf4_matmul_t_words(t.packed, scales, bs, t.code, np.ascontiguousarray(g2), dx)
        elif t.shape[1] % bs == 0 and simd_ok(k, bs):
            k.nf4_matmul_t_simd(t.packed, scales, bs, t.code, g2, dx)
        else:
            k.nf4_matmul_t(t.packed, scales, bs, t.code, g2, dx)
        return
    _tiles_grad(g2, t, scales, dx)


def _tiles_grad(g2, t, scales, dx, mode=0):
    """dx = g2 deq(W) (``mode``: deq(W) rounded to that compute dtype) by decoded tiles of
    rows of W and BLAS, accumulated; never a whole dequantized copy of W."""
    tmp = None
    for r0, r1, cur in row_tiles(t, scales, mode):
        if r0 == 0:
            np.dot(g2[:, r0:r1], cur, out=dx)
        else:
            if tmp is None:
                tmp = _scratch.scratch("nf4.dx", dx.size, dx.dtype).reshape(dx.shape)
            np.dot(g2[:, r0:r1], cur, out=tmp)
            dx += tmp


def _rounded(a, mode, k):
    """A rounded C-contiguous float32 copy of ``a`` (the input of a 16-bit product)."""
    r = np.array(a, np.float32, order="C", copy=True)
    k.round_values(r.reshape(-1), mode)
    return r




def _forward_rounded(x2, t, mode, lora_a, lora_b, s, bias, out2, x_lora, u_out):
    """:func:`forward` with the base product in a 16-bit compute dtype (``mode`` 1:
    bfloat16, 2: float16), as bitsandbytes' ``Linear4bit(compute_dtype=...)`` computes it:
    ``rnd(rnd(x) rnd(deq(W))^T + rnd(b))`` with float32 accumulation and one rounding of
    each element of ``deq(W)`` (``code * scale`` in float32, then rounded). The LoRA branch
    is then added in float32 on the unrounded input, as PEFT adds a float32 adapter to the
    base layer's output. out2 must be C-contiguous (it is rounded in place)."""
    kc, k = kernels("compute"), kernels("nf4")

    n = x2.shape[0]
    if n == 0:
        return
    out_f, in_f = t.shape
    dot = mode == COMPUTE_DTYPES["bfloat16"] and bf16_dot_ok(kc, in_f, t.blocksize)
    if dot:
        # the CPU's bf16 dot products, for every batch size (faster than float32 BLAS on
        # the rounded tiles even at large batches); x rounded straight into their layout
        xb = kc.bf16_input(n, in_f)
        kc.bf16_bits(np.ascontiguousarray(x2, dtype=np.float32), xb)
        _park(t, n)
        kc.bf16_product(t.packed, t.scales, t.blocksize, t.code, xb, out2)
    else:
        xr = _rounded(x2, mode, kc)
        if n > FUSED_MAX_ROWS:
            blas_product(xr, t, t.scales, out2, mode)
        elif in_f % t.blocksize == 0 and simd_ok(k, t.blocksize):
            # in registers where blocks are whole 16-element chunks, else decoded into a buffer
            product = kc.nf4_matmul_rounded_fused if t.blocksize % 16 == 0 else kc.nf4_matmul_rounded_simd
            product(t.packed, t.scales, t.blocksize, t.code, mode, xr, out2)
        else:
            kc.nf4_matmul_rounded(t.packed, t.scales, t.blocksize, t.code, mode, xr, out2)
    if bias is not None:
        out2 += _rounded(bias, mode, kc)
    kc.round_values(out2.reshape(-1), mode)
    if lora_a is None:
        return
    xl = x2 if x_lora is None else x_lora
    # the LoRA branch in numba kernels, as the float32 fused path, so no BLAS call leaves
    # OpenBLAS's threads spinning into the next kernel
    if n > FUSED_MAX_ROWS and dot:
        u = np.empty((n, lora_a.shape[0]), np.float32) if u_out is None else u_out
        kc.lora_branch(np.ascontiguousarray(xl, dtype=np.float32), lora_a, np.float32(s), u, lora_b, out2)
        return
    # the serial small-batch shrink and expand up to _backward.KERNEL_LORA_MAX_ROWS rows, BLAS above
    bw.add_low_rank(xl, lora_a, lora_b, s, out2, u_out)


def bf16_dot_ok(kc, in_f, blocksize) -> bool:
    """Whether the bf16 dot-product kernel applies: the CPU has the instruction (AVX512-BF16,
    ``kernels.compute.BF16_DOT``), rows of whole 128-weight chunks, blocks of 64 or a
    multiple."""
    return kc.BF16_DOT and in_f % 128 == 0 and blocksize % 64 == 0 and in_f % blocksize == 0


def _grad_input_rounded(g2, t, mode, dx):
    """dx = rnd(rnd(g2) rnd(deq(W))) (overwritten): :func:`grad_input` in a 16-bit compute
    dtype, as bitsandbytes' backward of the base product computes it (float32
    accumulation, one rounding at the end). Decoded, rounded tiles through BLAS for every
    batch size. dx must be C-contiguous."""
    kc = kernels("compute")

    _tiles_grad(_rounded(g2, mode, kc), t, t.scales, dx, mode)
    kc.round_values(dx.reshape(-1), mode)
