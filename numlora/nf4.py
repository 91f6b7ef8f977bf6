"""4-bit weights in the bitsandbytes layout, NF4 ("4-bit NormalFloat") and FP4: quantize,
dequantize, and the matmul of a 4-bit weight (the QLoRA forward).

The format, exactly as bitsandbytes' CPU path writes it, is described in
``docs/nf4-format.md``. The two code books share every kernel but the quantizer's code
search (:func:`numlora.kernels.nf4._nibble`); a tensor records its ``quant_type``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from . import _backward as bw
from . import _nf4_products as products
from . import _validate as validate
from ._dispatch import dispatch
from ._nf4_products import FUSED_MAX_ROWS  # noqa: F401  (a documented limit of nf4_matmul)
from ._tables import CODE8, FP4_CODE, NF4_CODE, NF4_MIDPOINTS
from ._validate import BLOCKSIZE_MAX, BLOCKSIZE_MIN, MAX_NUMEL, check_blocksize
from .errors import ConfigError, DTypeError, ShapeError
from .io.bnb import DQ_GROUP

__all__ = [
    "BLOCKSIZE_MAX",
    "BLOCKSIZE_MIN",
    "CODE8",
    "DQ_GROUP",
    "FP4_CODE",
    "NF4_CODE",
    "NF4_MIDPOINTS",
    "NF4Tensor",
    "QUANT_TYPES",
    "check_blocksize",
    "dequantize_4bit",
    "dequantize_nf4",
    "nf4_matmul",
    "nf4_matmul_t",
    "qlora_backward",
    "qlora_forward",
    "quantize_4bit",
    "quantize_bf16_bits",
    "quantize_nf4",
]


#: The 15 midpoints and a pad entry (never looked up), as the SIMD encoder loads them.
_MIDS16 = np.append(NF4_MIDPOINTS, np.float32(np.inf)).astype(np.float32)

#: The 4-bit code books by ``quant_type``, as bitsandbytes names them.
QUANT_TYPES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def _quant_type(value, name="quant_type") -> str:
    if not isinstance(value, str) or value not in QUANT_TYPES:
        raise ConfigError(f"{name} must be one of {sorted(QUANT_TYPES)}, got {value!r:.60}")
    return value


def _check_shape(name, shape, error=ShapeError) -> tuple:
    """``shape`` as a tuple of Python ints >= 0 whose product fits in int64."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list, np.ndarray)):
        raise DTypeError(f"{name} must be a tuple of non-negative integers, got {type(shape).__name__}")
    dims = []
    for d in (shape.tolist() if isinstance(shape, np.ndarray) else shape):
        if isinstance(d, (bool, np.bool_)):
            raise error(f"expected {name} to hold non-negative integers, got {tuple(shape)!r} (a bool)")
        try:
            d = operator.index(d)
        except TypeError:
            raise error(f"expected {name} to hold non-negative integers, got {tuple(shape)!r}") from None
        if d < 0:
            raise error(f"expected {name} to hold non-negative integers, got {tuple(shape)!r}")
        dims.append(d)
    if math.prod(dims) > MAX_NUMEL or any(d > MAX_NUMEL for d in dims):
        raise error(f"expected {name} with at most 2**63 - 1 elements, got {tuple(dims)} "
                    f"({math.prod(dims)} elements)")
    return tuple(dims)


def _finite_field(name, a):
    if a.size and not np.isfinite(a).all():
        raise validate.first_nonfinite(name, a.reshape(-1), a.shape)


def _tensor_array(name, a, dtypes, shape, why):
    """An NF4Tensor field: a numpy array of one of ``dtypes`` and ``shape``, returned
    C-contiguous (copied when it is not)."""
    if not isinstance(a, np.ndarray):
        hint = " (numpy.asarray(..., dtype=...) it first)" if isinstance(a, (list, tuple)) else ""
        raise DTypeError(f"{name} must be a numpy array of {' or '.join(np.dtype(d).name for d in dtypes)}, "
                         f"got {type(a).__name__}{hint}")
    if a.dtype not in tuple(np.dtype(d) for d in dtypes):
        raise DTypeError(f"expected {name} with dtype {' or '.join(np.dtype(d).name for d in dtypes)}, "
                         f"got {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ShapeError(f"expected {name} of shape {tuple(shape)} {why}".rstrip() + f", got {tuple(a.shape)}")
    return np.ascontiguousarray(a)


@dataclass(eq=False)
class NF4Tensor:
    """A weight quantized to 4 bits (NF4, or FP4 with ``quant_type="fp4"``), in
    bitsandbytes' layout.

    Attributes
    ----------
    packed : uint8 (ceil(n / 2),) - element 2i in the high nibble of byte i; an odd
        count pads the last low nibble with the code of 0.0 (7 in NF4, 0 in FP4).
    absmax : float32 (n_blocks,) block scales; with double quantization the uint8 codes
        of the scales instead.
    shape : the original shape.
    blocksize : elements per block (over the flat row-major index).
    absmax2 : float32 (ceil(n_blocks / 256),) second-level scales (double quant only).
    offset : float32 mean subtracted from absmax before its 8-bit quantization (double quant only).
    code8 : float32 (256,) the 8-bit map used for absmax (double quant only).
    dtype : the dtype the weight had, as a name (kept for writing the bitsandbytes metadata).
    quant_type : ``"nf4"`` or ``"fp4"``, the code book (:attr:`code`).
    """

    packed: np.ndarray
    absmax: np.ndarray
    shape: tuple
    blocksize: int
    absmax2: np.ndarray | None = None
    offset: np.float32 | None = None
    code8: np.ndarray | None = None
    dtype: str = "float32"
    quant_type: str = "nf4"
    _scales: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.quant_type = _quant_type(self.quant_type)
        self.shape = _check_shape("shape", self.shape)
        n = math.prod(self.shape)
        bs = check_blocksize(self.blocksize)
        self.blocksize = bs
        # The kernels read every array as C-contiguous: a reversed or strided view is
        # copied here (the SIMD path would otherwise decode garbage).
        self.packed = _tensor_array("packed", self.packed, (np.uint8,), ((n + 1) // 2,),
                                    f"(ceil(numel / 2) for shape {self.shape})")
        nblocks = -(-n // bs)
        want = f"(ceil(numel / blocksize) for shape {self.shape} and blocksize {bs})"
        if self.absmax2 is not None:
            if self.offset is None or self.code8 is None:
                raise ConfigError("a double-quantized NF4Tensor (absmax2 given) needs uint8 absmax codes, absmax2, "
                                  "offset and code8; got " + ", ".join(
                                      f"{k}=None" for k in ("offset", "code8") if getattr(self, k) is None))
            self.absmax = _tensor_array("absmax", self.absmax, (np.uint8,), (nblocks,),
                                        want + "; double quantization stores uint8 codes")
            self.absmax2 = _tensor_array("absmax2", self.absmax2, (np.float32,), (-(-nblocks // DQ_GROUP),),
                                         f"(ceil(n_blocks / {DQ_GROUP}))")
            self.code8 = _tensor_array("code8", self.code8, (np.float32,), (256,), "")
            off = validate.real_scalar("offset", self.offset)
            self.offset = np.float32(off)
            _finite_field("absmax2", self.absmax2)
            _finite_field("code8", self.code8)
        else:
            if self.offset is not None or self.code8 is not None:
                raise ConfigError("offset and code8 belong to double quantization: give absmax2 too, or neither")
            self.absmax = _tensor_array("absmax", self.absmax, (np.float32,), (nblocks,), want)
            _finite_field("absmax", self.absmax)  # n / blocksize scales: a small scan

    @property
    def code(self) -> np.ndarray:
        """The 16 float32 values of the code book, by nibble (``NF4_CODE`` or ``FP4_CODE``)."""
        return QUANT_TYPES[self.quant_type]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

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

    @property
    def scales(self) -> np.ndarray:
        """The float32 block scales ``(n_blocks,)``: :attr:`absmax`, or under double
        quantization its decoded values (decoded once and kept). A property, as
        :attr:`DeviceNF4Tensor.scales <numlora.device.DeviceNF4Tensor.scales>`."""
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

    def to_state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The tensors bitsandbytes (``Linear4bit.state_dict()``, i.e. ``Params4bit`` data
        plus ``QuantState.as_dict(packed=True)``) and transformers write for a 4-bit Linear
        whose module path is ``prefix``, ready for ``safetensors.numpy.save_file``:

        ======================================================  ==============================
        ``<prefix>.weight``                                     uint8 ``((n + 1) // 2, 1)``
        ``<prefix>.weight.absmax``                              float32 ``(n_blocks,)``; uint8
                                                                with double quantization
        ``<prefix>.weight.quant_map``                           float32 ``(16,)`` the codebook
        ``<prefix>.weight.nested_absmax``                       float32 ``(ceil(n_blocks / 256),)``
                                                                (double quantization only)
        ``<prefix>.weight.nested_quant_map``                    float32 ``(256,)`` (idem)
        ``<prefix>.weight.quant_state.bitsandbytes__nf4``       uint8: UTF-8 JSON ``quant_type``,
                                                                ``blocksize``, ``dtype``, ``shape``
                                                                (+ ``nested_blocksize``,
                                                                ``nested_dtype``, ``nested_offset``)
        ======================================================  ==============================

        in that order, byte for byte as bitsandbytes 0.50 writes them (the JSON too). The
        bias is not part of an NF4Tensor; add ``<prefix>.bias`` yourself.

        ``prefix`` is the module path (``"model.layers.0.mlp.up_proj"``). The empty string
        is allowed and gives the keys of a bare module's ``state_dict()`` (``"weight"``,
        ``"weight.absmax"``, ...); a prefix with a leading, trailing or doubled dot is refused.

        ``dtype`` in the JSON is :attr:`dtype`: ``"float32"``, ``"bfloat16"`` or
        ``"float16"``; ``"float64"`` (a float64 array given to :func:`quantize_nf4`, which
        quantizes its float32 rounding) is written as ``"float32"``, since bitsandbytes
        has no float64 4-bit weights. Any other name is refused. bitsandbytes itself only
        dequantizes blocksizes 32, 64, ..., 4096; other blocksizes are written as they
        are (numlora reads them back).

        The packed codes and block scales are views of this tensor's arrays (no copies);
        the code tables are fresh copies.
        """
        from .io import bnb

        return bnb.to_state_dict(self, prefix)

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, np.ndarray], prefix: str = "") -> "NF4Tensor":
        """Read the 4-bit weight of module ``prefix`` from a bitsandbytes / transformers
        state dict (numpy arrays, e.g. from ``safetensors.numpy.load_file``); the keys
        are those of :meth:`to_state_dict` (other keys in ``tensors`` are ignored).

        Everything is checked, and every error names the key with what was expected and
        what arrived: a wrong dtype (:class:`~numlora.errors.DTypeError`; also a ``dtype``
        or ``nested_dtype`` field bitsandbytes does not know) or shape
        (:class:`~numlora.errors.ShapeError`; also a ``shape`` field that does not fit the
        packed codes); NaN or inf in the scales or the offset
        (:class:`~numlora.errors.NonFiniteError`); and as
        :class:`~numlora.errors.FormatError`: a missing key, a quant state that is not
        UTF-8 JSON, lacks a field, has an unknown one or says ``quant_type`` other than
        ``"nf4"`` (an ``fp4`` quant state key too), a ``quant_map`` that is not the NF4
        codebook bit for bit, nested keys that disagree with the quant state, a nested
        blocksize other than 256 (the only one numlora decodes). A bad ``prefix`` is a
        :class:`~numlora.errors.ConfigError` (or DTypeError if not a str).

        The result dequantizes exactly as bitsandbytes' ``dequantize_4bit`` does (in
        float32). Its ``dtype`` is the JSON's. The packed codes and scales are views of
        the given arrays when they are C-contiguous (no copies).
        """
        from .io import bnb

        return bnb.from_state_dict(cls, tensors, prefix)

    def __sizeof__(self) -> int:
        """:attr:`nbytes` on top of the object, for ``sys.getsizeof`` and Dask's ``sizeof``."""
        return object.__sizeof__(self) + self.nbytes

    def __getstate__(self):
        """Pickling: the arrays as they are (protocol 5 sends them out of band), without
        the decoded double-quant scales, a cache rebuilt on first use."""
        state = dict(self.__dict__)
        state["_scales"] = None
        return state

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        qt = ", quant_type='fp4'" if self.quant_type != "nf4" else ""
        return f"NF4Tensor(shape={self.shape}, blocksize={self.blocksize}{dq}{qt}, nbytes={self.nbytes})"


@dispatch
def quantize_nf4(w, blocksize: int = 64, double_quant: bool = False, quant_type: str = "nf4") -> NF4Tensor:
    """Quantize ``w`` to NF4 (or FP4), bit-identical to
    ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)``
    on the CPU. :func:`quantize_4bit` is the same function under bitsandbytes' name.

    ``w`` is float32, float64 (rounded to float32 first), float16 or bfloat16
    (``ml_dtypes.bfloat16``, as JAX and TensorFlow give it; both are quantized as their
    exact float32 values, as bitsandbytes does, bfloat16 straight from its bits without a
    float32 copy; raw bf16 bit patterns in a uint16 array go to :func:`quantize_bf16_bits`),
    any shape, non-empty, finite: a NaN or inf raises
    :class:`~numlora.errors.NonFiniteError` naming its index. Any
    blocksize in ``[BLOCKSIZE_MIN, BLOCKSIZE_MAX]`` = [2, 2**20] works (bitsandbytes uses
    32 ... 4096; others raise :class:`~numlora.errors.ConfigError`, see
    :func:`check_blocksize`). ``double_quant=True``
    also quantizes the block scales to 8 bits (QLoRA's double quantization).
    ``quant_type="fp4"`` uses bitsandbytes' FP4 code book (:data:`FP4_CODE
    <numlora._tables.FP4_CODE>`: 1 sign, 2 exponent and 1 mantissa bit) instead of NF4's;
    everything else (blocks, scales, packing, double quantization, the fused products,
    state dicts) is the same.
    """
    if isinstance(w, np.ndarray) and w.dtype.name == "bfloat16" and w.dtype.itemsize == 2:
        if w.size == 0:
            raise ShapeError(f"expected a non-empty w, got shape {w.shape}")
        return quantize_bf16_bits(np.ascontiguousarray(w).view(np.uint16), w.shape, blocksize, double_quant,
                                  quant_type)
    if validate.is_16bit(w) and w.dtype == np.float16:
        w16, w = w, validate.float_array("w", w.astype(np.float32), None)
        return _quantize(w.reshape(-1), w16.shape, "float16", blocksize, double_quant, quant_type)
    w = validate.float_array("w", w, None)
    return _quantize(np.ascontiguousarray(w, dtype=np.float32).reshape(-1), w.shape, str(w.dtype), blocksize,
                     double_quant, quant_type)


def quantize_bf16_bits(bits, shape, blocksize: int = 64, double_quant: bool = False,
                       quant_type: str = "nf4") -> NF4Tensor:
    """:func:`quantize_nf4` of a bfloat16 weight given as its bit patterns: ``bits`` a uint16
    array (what :func:`numlora.io.safetensors.load_file` returns for a BF16 tensor) holding
    ``prod(shape)`` values in row-major order. Each block is widened to float32 inside the
    kernel (exact), so there is no float32 copy of the weight; the result is bit-identical
    to quantizing ``bf16_to_f32(bits)``, and records ``dtype="bfloat16"``."""
    if not isinstance(bits, np.ndarray) or bits.dtype != np.uint16:
        raise DTypeError(f"bits must be a numpy uint16 array of bfloat16 bit patterns, got "
                         f"{getattr(bits, 'dtype', type(bits).__name__)}")
    shape = _check_shape("shape", shape)
    if bits.size != math.prod(shape) or bits.size == 0:
        raise ShapeError(f"expected {math.prod(shape)} non-zero bit patterns for shape {shape}, got {bits.size}")
    return _quantize(None, shape, "bfloat16", blocksize, double_quant, quant_type,
                     bits=np.ascontiguousarray(bits).reshape(-1))


def quantize_bf16_bits_measured(bits, shape, blocksize: int, chunk: int, partial_sum, partial_max) -> NF4Tensor:
    """:func:`quantize_bf16_bits` (NF4, no double quantization) that also fills
    ``kernels.nf4.bf16_error_stats``' partials of ``|w - deq(q(w))|`` (``partial_sum``
    float64 and ``partial_max`` float32, one per ``chunk`` elements) in the same pass: the
    same tensor and the same partials, bit for bit, reading the bits once. ``numlora
    quantize``'s default path, where :func:`quantize_error_fused_ok`."""
    if not isinstance(bits, np.ndarray) or bits.dtype != np.uint16 or not bits.flags.c_contiguous:
        raise DTypeError(f"bits must be a C-contiguous numpy uint16 array, got {getattr(bits, 'dtype', type(bits))}")
    shape = _check_shape("shape", shape)
    n = bits.size
    if n != math.prod(shape) or n == 0:
        raise ShapeError(f"expected {math.prod(shape)} non-zero bit patterns for shape {shape}, got {n}")
    nch = -(-n // chunk)
    for name, a, dt in (("partial_sum", partial_sum, np.float64), ("partial_max", partial_max, np.float32)):
        if not isinstance(a, np.ndarray) or a.dtype != dt or a.shape != (nch,) or not a.flags.writeable:
            raise ShapeError(f"{name} must be a writable {np.dtype(dt)} array of shape ({nch},), got "
                             f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    return _quantize(None, shape, "bfloat16", blocksize, False, "nf4", bits=bits.reshape(-1),
                     err=(chunk, partial_sum, partial_max))


def _quantize(x, shape, dtype, blocksize, double_quant, quant_type, bits=None, err=None) -> NF4Tensor:
    """Quantize the flat float32 ``x``, or the flat bf16 bit patterns ``bits`` (x None);
    ``err``: ``(chunk, partial_sum, partial_max)`` to fill with the reconstruction error's
    partials in the same pass (``kernels.nf4.nf4_quantize_bf16_err``; only where
    :func:`quantize_error_fused_ok`)."""
    bs = check_blocksize(blocksize)
    if not isinstance(double_quant, (bool, np.bool_)):
        raise ConfigError(f"double_quant must be True or False, got {double_quant!r}")
    quant_type = _quant_type(quant_type)
    from .kernels import _jit
    from .kernels import nf4 as k

    n = x.size if x is not None else bits.size
    nblocks = -(-n // bs)
    _jit.park_before(n)
    packed = np.empty((n + 1) // 2, np.uint8)
    absmax = np.empty(nblocks, np.float32)
    if x is None and bs % 2 == 1:  # blocks start mid-byte: the float32 kernels handle that
        x = _bf16_values(bits)
    even, generic, from_bf16 = k.QUANTIZERS[quant_type]
    simd = quant_type == "nf4" and products.simd_ok(k, bs)
    if err is not None:
        if x is not None or double_quant or not quantize_error_fused_ok(n, bs, quant_type, err[0]):
            raise ConfigError("internal: the fused quantize + error pass does not apply to this weight")
        chunk, psum, pmax = err
        k.nf4_quantize_bf16_err(bits, bs, _MIDS16, QUANT_TYPES[quant_type], chunk, packed, absmax,
                                absmax.view(np.int32), psum, pmax)
    elif x is None:
        nfull = n // bs
        if simd:
            k.nf4_quantize_bf16_simd(bits, nfull, bs, _MIDS16, packed, absmax, absmax.view(np.int32))
        else:
            from_bf16(bits, nfull, bs, packed, absmax, absmax.view(np.int32))
        if nfull < nblocks:  # the partial last block, widened (it starts on a byte: bs even)
            xt = _bf16_values(bits[nfull * bs:])
            even(xt, xt.view(np.int32), bs, packed[nfull * bs // 2:], absmax[nfull:], absmax[nfull:].view(np.int32))
    elif simd:
        k.nf4_quantize_simd(x, x.view(np.int32), bs, _MIDS16, packed, absmax, absmax.view(np.int32))
    else:
        kern = even if bs % 2 == 0 else generic
        kern(x, x.view(np.int32), bs, packed, absmax, absmax.view(np.int32))
    finite = np.isfinite(absmax)
    if not finite.all():
        b = int(np.argmin(finite))
        raise validate.first_nonfinite("w", x if x is not None else _bf16_values(bits), shape, start=b * bs)
    t = NF4Tensor(packed, absmax, shape, bs, dtype=dtype, quant_type=quant_type)
    if double_quant:
        t = _double_quantize(t)
    return t


def quantize_error_fused_ok(numel: int, blocksize: int, quant_type: str, chunk: int) -> bool:
    """Whether ``numlora quantize`` can quantize a bf16 weight and measure its
    reconstruction error in one pass (``kernels.nf4.nf4_quantize_bf16_err``): NF4 with the
    SIMD quantizer, whole blocks that divide the error pass's steps and chunks
    (``kernels.nf4.error_stats_ok``). Double quantization is the caller's to exclude (the
    error needs the final scales)."""
    from .kernels import nf4 as k

    return (quant_type == "nf4" and products.simd_ok(k, blocksize)
            and bool(k.error_stats_ok(numel, blocksize, chunk)))


def _bf16_values(bits):
    """float32 values of bf16 bit patterns (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _double_quantize(t: NF4Tensor) -> NF4Tensor:
    from .kernels import nf4 as k

    absmax = t.absmax
    offset = np.float32(np.mean(absmax, dtype=np.float64))
    q8 = np.empty(absmax.size, np.uint8)
    absmax2 = np.empty(-(-absmax.size // DQ_GROUP), np.float32)
    k.code8_encode(absmax, offset, DQ_GROUP, CODE8, q8, absmax2)
    return NF4Tensor(t.packed, q8, t.shape, t.blocksize, absmax2=absmax2, offset=offset,
                     code8=CODE8, dtype=t.dtype, quant_type=t.quant_type)


def _check_tensor(t):
    if not isinstance(t, NF4Tensor):
        raise DTypeError(f"expected an NF4Tensor, got {type(t).__name__}")
    return t


@dispatch
def dequantize_nf4(t: NF4Tensor, out=None) -> np.ndarray:
    """Decode ``t`` to a float32 array of ``t.shape``: ``code[nibble] * absmax[block]``
    (absmax decoded from its 8-bit codes first under double quantization). ``out``: an
    optional preallocated C-contiguous float32 array of ``t.shape``; if it shares memory
    with the tensor's arrays the result is decoded into a temporary and copied into it."""
    _check_tensor(t)
    from .kernels import _jit
    from .kernels import nf4 as k

    dest = None
    if out is None:
        out = np.empty(t.shape, np.float32)
    else:
        out, dest = validate.private_out(validate.out_array("out", out, t.shape, np.float32), products.tensor_arrays(t))
    n, bs = t.numel, t.blocksize
    scales = t.scales
    _jit.park_before(n)
    if products.simd_ok(k, bs) and n % bs == 0:
        k.nf4_decode_simd(t.packed, scales, bs, t.code, 0, n // bs, out.reshape(-1))
    else:
        k.nf4_dequantize_range(t.packed, scales, bs, t.code, 0, n, out.reshape(-1))
    return validate.deliver(out, dest)


#: bitsandbytes' names: the same functions (``quant_type="nf4"`` or ``"fp4"``).
quantize_4bit = quantize_nf4
dequantize_4bit = dequantize_nf4


def weight_shape(t) -> tuple:
    """``(out, in)``, the shape of the 2-D NF4 weight ``t``: a DTypeError for anything but
    an :class:`NF4Tensor`, a ShapeError for another number of dimensions. What the
    functions and layers that take an NF4 weight check it with."""
    _check_tensor(t)
    if len(t.shape) != 2:
        raise ShapeError(f"expected a 2-D NF4 weight, got shape {t.shape}")
    return t.shape


@dispatch
def nf4_matmul(x, t: NF4Tensor, out=None, *, bias=None, compute_dtype=None) -> np.ndarray:
    """``x deq(W)^T (+ bias)`` for an NF4 weight ``W`` of shape (out, in), without ever
    holding the dequantized weight.

    Batches of up to ``FUSED_MAX_ROWS`` rows run fused kernels that read the packed codes
    and scales directly and decode in registers (AVX-512 / AVX2 permutes where the CPU has
    them, lookup tables otherwise); a row's result is then bit-identical whatever the batch
    size (up to that limit) and the thread count. Larger batches decode tiles of W (8 MiB
    at most) and multiply them with BLAS. Results agree with ``x @ dequantize_nf4(t).T``
    to float32 rounding (see docs/performance.md for measured errors).

    ``bias``: optional (out,), added in the same kernel (what a QLoRA layer without its
    adapter runs). ``out`` may overlap ``x``, the bias or the tensor's arrays: the result
    is then computed into a temporary and copied into ``out``.

    ``compute_dtype``: None / ``"float32"`` (the above), ``"bfloat16"`` or ``"float16"``
    (also ``np.float16``, ``ml_dtypes.bfloat16``, ``"torch.bfloat16"``): the product as
    bitsandbytes computes it in that dtype, ``rnd(rnd(x) rnd(deq(W))^T + rnd(b))`` with
    float32 accumulation, every rounding to nearest even; the result is still a float32
    array (holding 16-bit values). See docs/dtypes.md for its accuracy and speed.
    """
    out_f, in_f = weight_shape(t)
    mode = products.compute_mode(compute_dtype)
    x = validate.input_rows(x, in_f)
    b_arr, use_bias = validate.bias_array(bias, out_f, np.float32)
    out, dest = validate.output(out, x, out_f, np.float32, {"x": x, "bias": bias, **products.tensor_arrays(t)})
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), np.float32)
    products.forward(x2, t, None, None, 0.0, b_arr if use_bias else None, out.reshape(-1, out_f), mode=mode)
    return validate.deliver(out, dest)


@dispatch
def nf4_matmul_t(g, t: NF4Tensor, out=None, *, compute_dtype=None) -> np.ndarray:
    """``g deq(W)`` for an NF4 weight ``W`` (out, in) and ``g`` of shape (out,) or
    (n, out): the input gradient of ``y = x deq(W)^T``, fused the same way (W is decoded a
    row segment at a time, never whole). Returns (in,) or (n, in). ``out`` may overlap
    ``g`` or the tensor's arrays (computed into a temporary then). ``compute_dtype``: as
    in :func:`nf4_matmul`, ``rnd(rnd(g) rnd(deq(W)))`` (bitsandbytes' backward of the
    base product in that dtype)."""
    out_f, in_f = weight_shape(t)
    mode = products.compute_mode(compute_dtype)
    g = validate.input_rows(g, out_f, "g", "out_features")
    out, dest = validate.output(out, g, in_f, np.float32, {"g": g, **products.tensor_arrays(t)})
    g2 = np.ascontiguousarray(g.reshape(-1, out_f), np.float32)
    products.grad_input(g2, t, out.reshape(-1, in_f), mode)
    return validate.deliver(out, dest)


@dispatch
def qlora_backward(x, t: NF4Tensor, lora_a, lora_b, scaling, grad_out, *, dropout=None, x_drop=None, u=None,
                   grad_a=None, grad_b=None, need_grad_x=True, compute_dtype=None):
    """Gradients of ``y = x deq(W)^T + b + scaling * dropout(x) A^T B^T`` for an NF4 base
    weight: as :func:`numlora.ops.lora_backward` (same arguments and results), with the
    ``G deq(W)`` term computed as :func:`nf4_matmul_t` does (fused for small batches,
    decoded tiles and BLAS for large ones; never a whole dequantized copy of W).
    float32 throughout (``compute_dtype``: the ``G deq(W)`` term as :func:`nf4_matmul_t`
    computes it in that dtype; the adapter's gradients stay float32). ``grad_a`` /
    ``grad_b`` may overlap the inputs (those are copied first, as in
    :func:`~numlora.ops.lora_backward`)."""
    out_f, in_f = weight_shape(t)
    mode = products.compute_mode(compute_dtype)
    lora_a, lora_b, rank = validate.low_rank_arrays(lora_a, lora_b, out_f, in_f, base=_nf4_base(t))
    s = validate.real_scalar("scaling", scaling)
    need_grad_x = validate.flag("need_grad_x", need_grad_x)
    bw.check_x_drop_alone(x_drop, dropout, need_grad_x)
    dt = np.dtype(np.float32)

    def refuse(grad_a, grad_b):
        if need_grad_x and (grad_a is not None or grad_b is not None):
            names = [k for k, arr in products.tensor_arrays(t).items()
                     if validate.shares_memory(grad_a, arr) or validate.shares_memory(grad_b, arr)]
            if names:
                raise ShapeError(f"grad_a / grad_b share memory with {names[0]}: they are accumulated in place "
                                 "while the NF4 weight is still read; pass separate arrays")

    return bw.lora_grads(x, np.ascontiguousarray(lora_a, dt), np.ascontiguousarray(lora_b, dt), s, grad_out, dt,
                         dropout, x_drop, u, grad_a, grad_b, need_grad_x, None,
                         lambda _, g, d: products.grad_input(g, t, d, mode), refuse)


@dispatch
def qlora_forward(x, t: NF4Tensor, lora_a, lora_b, scaling, bias=None, out=None, *, x_lora=None,
                  u_out=None, compute_dtype=None) -> np.ndarray:
    """``y = x deq(W)^T + b + scaling * (x A^T) B^T`` for an NF4 base weight, fused as in
    :func:`nf4_matmul` (the LoRA shrink, expand and the bias run inside the same kernel
    for batches up to ``FUSED_MAX_ROWS``). float32 throughout. ``out`` may overlap the
    inputs (``out=x``, ``out=lora_a``...): the result is then computed into a temporary
    and copied into ``out``, the same as without overlap. ``x_lora``: optional input of
    the LoRA branch, of x's shape, when it differs from x (the dropped input of a training
    forward), as in :func:`~numlora.ops.lora_forward`. ``u_out``: optional float32
    (r,) or (n, r) array that receives ``x_lora A^T`` unscaled (the ``u`` of
    :func:`qlora_backward`), as in :func:`~numlora.ops.lora_forward`. ``compute_dtype``: the
    base product (and bias) as :func:`nf4_matmul` computes it in that dtype; the LoRA
    branch is then added in float32, as PEFT adds a float32 adapter to a bitsandbytes
    layer's output."""
    out_f, in_f = weight_shape(t)
    mode = products.compute_mode(compute_dtype)
    lora_a, lora_b, rank = validate.low_rank_arrays(lora_a, lora_b, out_f, in_f, base=_nf4_base(t))
    s = validate.real_scalar("scaling", scaling)
    x = validate.input_rows(x, in_f)
    xl = validate.lora_input(x_lora, x, in_f)
    b_arr, use_bias = validate.bias_array(bias, out_f, np.float32)
    inputs = {"x": x, "lora_a": lora_a, "lora_b": lora_b, "bias": bias, "x_lora": xl, **products.tensor_arrays(t)}
    u2 = bw.u_buffer(u_out, x, rank, np.float32, {**inputs, "out": out}, "qlora_forward")
    out, dest = validate.output(out, x, out_f, np.float32, inputs)
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), np.float32)
    xl2 = None if xl is None else np.ascontiguousarray(xl.reshape(-1, in_f), np.float32)
    a32 = np.ascontiguousarray(lora_a, np.float32)
    b32 = np.ascontiguousarray(lora_b, np.float32)
    products.forward(x2, t, a32, b32, s, b_arr if use_bias else None, out.reshape(-1, out_f), x_lora=xl2, u_out=u2,
                     mode=mode)
    return validate.deliver(out, dest)


def _nf4_base(t):
    return validate.Base("the NF4 weight", t.shape, None)
