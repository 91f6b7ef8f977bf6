"""NF4 ("4-bit NormalFloat") in the bitsandbytes layout: quantize, dequantize, and the
matmul of an NF4 weight (the QLoRA forward).

The format, exactly as bitsandbytes' CPU path writes it, is described in
``docs/nf4-format.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _validate as v
from ._tables import CODE8, NF4_CODE, NF4_MIDPOINTS
from .errors import ConfigError, DTypeError, ShapeError

__all__ = [
    "NF4_CODE",
    "NF4_MIDPOINTS",
    "CODE8",
    "NF4Tensor",
    "quantize_nf4",
    "dequantize_nf4",
    "nf4_matmul",
    "nf4_matmul_t",
    "qlora_forward",
]


#: The 15 midpoints and a pad entry (never looked up), as the SIMD encoder loads them.
_MIDS16 = np.append(NF4_MIDPOINTS, np.float32(np.inf)).astype(np.float32)

#: Group size of the double quantization of absmax (bitsandbytes' nested blocksize).
DQ_GROUP = 256


@dataclass(eq=False)
class NF4Tensor:
    """A weight quantized to NF4, in bitsandbytes' layout.

    Attributes
    ----------
    packed : uint8 (ceil(n / 2),) - element 2i in the high nibble of byte i; an odd
        count pads the last low nibble with code 7.
    absmax : float32 (n_blocks,) block scales; with double quantization the uint8 codes
        of the scales instead.
    shape : the original shape.
    blocksize : elements per block (over the flat row-major index).
    absmax2 : float32 (ceil(n_blocks / 256),) second-level scales (double quant only).
    offset : float32 mean subtracted from absmax before its 8-bit quantization (double quant only).
    code8 : float32 (256,) the 8-bit map used for absmax (double quant only).
    dtype : the dtype the weight had, as a name (kept for writing the bitsandbytes metadata).
    """

    packed: np.ndarray
    absmax: np.ndarray
    shape: tuple
    blocksize: int
    absmax2: np.ndarray | None = None
    offset: np.float32 | None = None
    code8: np.ndarray | None = None
    dtype: str = "float32"
    _scales: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)
        n = self.numel
        bs = v.int_scalar("blocksize", self.blocksize, minimum=2)
        self.blocksize = bs
        if not isinstance(self.packed, np.ndarray) or self.packed.dtype != np.uint8:
            raise ShapeError("packed must be a uint8 numpy array")
        v.expect_shape("packed", self.packed, ((n + 1) // 2,))
        nblocks = -(-n // bs)
        v.expect_shape("absmax", self.absmax, (nblocks,))
        if self.double_quant:
            if self.absmax.dtype != np.uint8 or self.offset is None or self.code8 is None:
                raise ShapeError("a double-quantized NF4Tensor needs uint8 absmax codes, absmax2, offset and code8")
            v.expect_shape("absmax2", self.absmax2, (-(-nblocks // DQ_GROUP),))
            v.expect_shape("code8", self.code8, (256,))
        elif self.absmax.dtype != np.float32:
            raise ShapeError(f"expected absmax with dtype float32, got {self.absmax.dtype}")

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def nbytes(self) -> int:
        """Bytes of quantized storage: codes, block scales and, with double quantization,
        the second-level scales and offset (the shared code tables are not counted)."""
        n = self.packed.nbytes + self.absmax.nbytes
        if self.double_quant:
            n += self.absmax2.nbytes + 4
        return n

    def scales(self) -> np.ndarray:
        """The float32 block scales (decoded once and kept, when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        if self._scales is None:
            from .kernels import nf4 as k

            out = np.empty(self.absmax.size, np.float32)
            k.code8_decode(self.absmax, self.absmax2, np.float32(self.offset), DQ_GROUP, self.code8, out)
            self._scales = out
        return self._scales

    def dequantize(self, out=None) -> np.ndarray:
        """The float32 weight ``code[nibble] * absmax[block]``; see :func:`dequantize_nf4`."""
        return dequantize_nf4(self, out=out)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return f"NF4Tensor(shape={self.shape}, blocksize={self.blocksize}{dq}, nbytes={self.nbytes})"


def quantize_nf4(w, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize ``w`` to NF4, bit-identical to ``bitsandbytes.functional.quantize_4bit(w,
    blocksize=blocksize, quant_type="nf4")`` on the CPU.

    ``w`` is float32 (float64 is rounded to float32 first), any shape, non-empty, finite:
    a NaN or inf raises :class:`~numlora.errors.NonFiniteError` naming its index. Any
    ``blocksize >= 2`` works (bitsandbytes uses 32 ... 4096). ``double_quant=True``
    also quantizes the block scales to 8 bits (QLoRA's double quantization).
    """
    w = v.float_array("w", w, None)
    bs = v.int_scalar("blocksize", blocksize, minimum=2)
    if not isinstance(double_quant, (bool, np.bool_)):
        raise ConfigError(f"double_quant must be True or False, got {double_quant!r}")
    from .kernels import nf4 as k

    shape = w.shape
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    n = x.size
    nblocks = -(-n // bs)
    packed = np.empty((n + 1) // 2, np.uint8)
    absmax = np.empty(nblocks, np.float32)
    if _simd_ok(k, bs):
        k.nf4_quantize_simd(x, x.view(np.int32), bs, _MIDS16, packed, absmax, absmax.view(np.int32))
    else:
        kern = k.nf4_quantize_even if bs % 2 == 0 else k.nf4_quantize_any
        kern(x, x.view(np.int32), bs, packed, absmax, absmax.view(np.int32))
    finite = np.isfinite(absmax)
    if not finite.all():
        b = int(np.argmin(finite))
        raise v.first_nonfinite("w", x, shape, start=b * bs)
    t = NF4Tensor(packed, absmax, shape, bs, dtype=str(w.dtype))
    if double_quant:
        t = _double_quantize(t)
    return t


def _double_quantize(t: NF4Tensor) -> NF4Tensor:
    from .kernels import nf4 as k

    absmax = t.absmax
    offset = np.float32(np.mean(absmax, dtype=np.float64))
    q8 = np.empty(absmax.size, np.uint8)
    absmax2 = np.empty(-(-absmax.size // DQ_GROUP), np.float32)
    k.code8_encode(absmax, offset, DQ_GROUP, CODE8, q8, absmax2)
    return NF4Tensor(t.packed, q8, t.shape, t.blocksize, absmax2=absmax2, offset=offset,
                     code8=CODE8, dtype=t.dtype)


def _check_tensor(t):
    if not isinstance(t, NF4Tensor):
        raise DTypeError(f"expected an NF4Tensor, got {type(t).__name__}")
    return t


def dequantize_nf4(t: NF4Tensor, out=None) -> np.ndarray:
    """Decode ``t`` to a float32 array of ``t.shape``: ``code[nibble] * absmax[block]``
    (absmax decoded from its 8-bit codes first under double quantization). ``out``: an
    optional preallocated C-contiguous float32 array of ``t.shape``."""
    _check_tensor(t)
    from .kernels import nf4 as k

    if out is None:
        out = np.empty(t.shape, np.float32)
    else:
        v.out_array("out", out, t.shape, np.float32)
    n, bs = t.numel, t.blocksize
    if _simd_ok(k, bs) and n % bs == 0:
        k.nf4_decode_simd(t.packed, t.scales(), bs, NF4_CODE, 0, n // bs, out.reshape(-1))
    else:
        k.nf4_dequantize_range(t.packed, t.scales(), bs, NF4_CODE, 0, n, out.reshape(-1))
    return out


def _simd_ok(k, blocksize) -> bool:
    """Whether the SIMD decode applies (the CPU has it and blocks hold whole chunks)."""
    return k.SIMD_LANES > 0 and blocksize % k.SIMD_LANES == 0


#: float32 elements per decoded tile on the large-batch path (8 MiB at most, whatever the
#: weight's size: larger tiles keep BLAS efficient; measured 1.5x faster than 1 MiB at batch 128).
TILE_ELEMS = 1 << 21

#: Batches up to this many rows run the fused kernels (each byte of W decoded once, in
#: registers, for every row); larger batches decode tiles of W and hand them to BLAS,
#: whose GEMM is faster than anything that decodes as it multiplies once the decode cost
#: is spread over this many rows.
FUSED_MAX_ROWS = 16


def _weight_2d(t):
    _check_tensor(t)
    if len(t.shape) != 2:
        raise ShapeError(f"expected a 2-D NF4 weight, got shape {t.shape}")
    return t.shape


def nf4_matmul(x, t: NF4Tensor, out=None) -> np.ndarray:
    """``x deq(W)^T`` for an NF4 weight ``W`` of shape (out, in), without ever holding the
    dequantized weight.

    Batches of up to ``FUSED_MAX_ROWS`` rows run fused kernels that read the packed codes
    and scales directly and decode in registers (AVX-512 / AVX2 permutes where the CPU has
    them, lookup tables otherwise); a row's result is then bit-identical whatever the batch
    size (up to that limit) and the thread count. Larger batches decode tiles of W (8 MiB
    at most) and multiply them with BLAS. Results agree with ``x @ dequantize_nf4(t).T``
    in float64 to ~1e-6 relative (see docs/performance.md for measured errors).
    """
    out_f, in_f = _weight_2d(t)
    from .ops import _input_rows, _prepare_out

    x = _input_rows(x, in_f)
    out = _prepare_out(out, x, out_f, np.float32)
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), np.float32)
    _nf4_forward(x2, t, None, None, 0.0, None, out.reshape(-1, out_f))
    return out


def _nf4_forward(x2, t, lora_a, lora_b, s, bias, out2):
    """out2 = x2 deq(W)^T (+ s (x2 A^T) B^T) (+ bias); A, B, bias float32 or None."""
    from .kernels import nf4 as k

    n = x2.shape[0]
    if n == 0:
        return
    out_f, in_f = t.shape
    scales = t.scales()
    use_bias = bias is not None
    b_arr = bias if use_bias else np.zeros(1, np.float32)
    if n > FUSED_MAX_ROWS:
        _nf4_blas(x2, t, scales, out2)
        if lora_a is not None:
            from .ops import _add_low_rank

            _add_low_rank(x2, lora_a, lora_b, s, out2)
        if use_bias:
            out2 += b_arr
        return
    if lora_a is None:
        u = np.zeros((n, 0), np.float32)
        lora_b = np.zeros((out_f, 0), np.float32)
    else:
        u = np.empty((n, lora_a.shape[0]), np.float32)
        k.lora_shrink(x2, lora_a, np.float32(s), u)
    bs = t.blocksize
    if in_f % bs == 0 and _simd_ok(k, bs) and bs % (2 * k.SIMD_LANES) == 0:
        xe = np.ascontiguousarray(x2[:, 0::2])
        xo = np.ascontiguousarray(x2[:, 1::2])
        k.nf4_matmul_simd(t.packed, scales, bs, NF4_CODE, xe, xo, u, lora_b, b_arr, use_bias, out2)
    elif in_f % bs == 0 and bs % 2 == 0:
        if n == 1:
            k.nf4_gemv_lut(t.packed, scales, bs, NF4_CODE, x2[0], u, lora_b, b_arr, use_bias, out2[0])
        else:
            k.nf4_gemm_pairs(t.packed, scales, bs, NF4_CODE, np.ascontiguousarray(x2.T), u, lora_b, b_arr,
                             use_bias, out2)
    else:
        k.nf4_gemm_any(t.packed, scales, bs, NF4_CODE, np.ascontiguousarray(x2.T), u, lora_b, b_arr,
                       use_bias, out2)


def _nf4_blas(x2, t, scales, out2):
    """out2 = x2 deq(W)^T for large batches: decode tiles of rows of W (at most
    TILE_ELEMS floats, serially: a parallel decode right after a BLAS call fights
    OpenBLAS's spinning threads), multiply each by the whole batch with BLAS into y^T,
    transpose once."""
    from .kernels import nf4 as k

    out_f, in_f = t.shape
    rows = max(1, min(out_f, TILE_ELEMS // in_f))
    tile = np.empty((rows, in_f), np.float32)
    yt = np.empty((out_f, x2.shape[0]), np.float32)
    xt = x2.T
    bs = t.blocksize
    simd = in_f % bs == 0 and _simd_ok(k, bs)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        cur = tile[: r1 - r0]
        if simd:
            k.nf4_decode_simd_tile(t.packed, scales, bs, NF4_CODE, r0 * in_f // bs, r1 * in_f // bs, cur.reshape(-1))
        else:
            k.nf4_dequantize_tile(t.packed, scales, bs, NF4_CODE, r0 * in_f, r1 * in_f, cur.reshape(-1))
        np.dot(cur, xt, out=yt[r0:r1])
    out2[...] = yt.T


def nf4_matmul_t(g, t: NF4Tensor, out=None) -> np.ndarray:
    """``g deq(W)`` for an NF4 weight ``W`` (out, in) and ``g`` of shape (out,) or
    (n, out): the input gradient of ``y = x deq(W)^T``, fused the same way (W is decoded a
    row segment at a time, never whole). Returns (in,) or (n, in)."""
    out_f, in_f = _weight_2d(t)
    from .kernels import nf4 as k
    from .ops import _input_rows, _prepare_out

    g = _input_rows(g, out_f, "g", "out_features")
    out = _prepare_out(out, g, in_f, np.float32)
    g2 = np.ascontiguousarray(g.reshape(-1, out_f), np.float32)
    if g2.shape[0]:
        k.nf4_matmul_t(t.packed, t.scales(), t.blocksize, NF4_CODE, g2, out.reshape(-1, in_f))
    return out


def qlora_forward(x, t: NF4Tensor, lora_a, lora_b, scaling, bias=None, out=None) -> np.ndarray:
    """``y = x deq(W)^T + b + scaling * (x A^T) B^T`` for an NF4 base weight, fused as in
    :func:`nf4_matmul` (the LoRA shrink, expand and the bias run inside the same kernel
    for batches up to ``FUSED_MAX_ROWS``). float32 throughout."""
    out_f, in_f = _weight_2d(t)
    from .ops import _bias, _input_rows, _low_rank_arrays, _prepare_out

    lora_a, lora_b, _ = _low_rank_arrays(lora_a, lora_b, out_f, in_f)
    s = v.real_scalar("scaling", scaling)
    x = _input_rows(x, in_f)
    b_arr, use_bias = _bias(bias, out_f, np.float32)
    out = _prepare_out(out, x, out_f, np.float32)
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), np.float32)
    _nf4_forward(x2, t, np.ascontiguousarray(lora_a, np.float32), np.ascontiguousarray(lora_b, np.float32), s,
                 b_arr if use_bias else None, out.reshape(-1, out_f))
    return out
