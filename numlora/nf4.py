"""NF4 ("4-bit NormalFloat") in the bitsandbytes layout: quantize, dequantize, and the
matmul of an NF4 weight (the QLoRA forward).

The format, exactly as bitsandbytes' CPU path writes it, is described in
``docs/nf4-format.md``.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from . import _validate as v
from ._tables import CODE8, NF4_CODE, NF4_MIDPOINTS
from .device import on_device as _on_device
from .errors import ConfigError, DTypeError, FormatError, NonFiniteError, ShapeError

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
    "qlora_backward",
    "BLOCKSIZE_MIN",
    "BLOCKSIZE_MAX",
    "check_blocksize",
]


def _gpu():
    from . import cuda

    return cuda.ops


#: The 15 midpoints and a pad entry (never looked up), as the SIMD encoder loads them.
_MIDS16 = np.append(NF4_MIDPOINTS, np.float32(np.inf)).astype(np.float32)

#: Group size of the double quantization of absmax (bitsandbytes' nested blocksize).
DQ_GROUP = 256

#: The NF4 blocksizes numlora accepts, from a caller or from a file: ``BLOCKSIZE_MIN <=
#: blocksize <= BLOCKSIZE_MAX``. bitsandbytes uses 32 ... 4096; the kernels take any size
#: in this range (the quantizer keeps one block of codes per thread, 4 MiB at the top).
#: Anything larger is refused: its products with block indices overflow 64-bit integers
#: in the kernels (a blocksize of 2**63 gave garbage and a matmul that never returned).
BLOCKSIZE_MIN = 2
BLOCKSIZE_MAX = 1 << 20


def check_blocksize(value, name: str = "blocksize") -> int:
    """``value`` as a Python int if it is an integer blocksize numlora accepts
    (``BLOCKSIZE_MIN <= value <= BLOCKSIZE_MAX``); otherwise raise
    :class:`~numlora.errors.DTypeError` (not an integer; bools are refused) or
    :class:`~numlora.errors.ConfigError` (out of range), naming ``name``. The one check
    for every blocksize read from a user (arguments, the CLI) or a file."""
    bs = v.int_scalar(name, value)
    if not BLOCKSIZE_MIN <= bs <= BLOCKSIZE_MAX:
        raise ConfigError(f"{name} must be >= {BLOCKSIZE_MIN} and <= {BLOCKSIZE_MAX} (2**20; bitsandbytes uses "
                          f"32 ... 4096), got {bs}")
    return bs


#: The largest element count numlora accepts in a shape (int64, the kernels' index type).
MAX_NUMEL = (1 << 63) - 1


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
        raise v.first_nonfinite(name, a.reshape(-1), a.shape)


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
            off = v.real_scalar("offset", self.offset)
            self.offset = np.float32(off)
            _finite_field("absmax2", self.absmax2)
            _finite_field("code8", self.code8)
        else:
            if self.offset is not None or self.code8 is not None:
                raise ConfigError("offset and code8 belong to double quantization: give absmax2 too, or neither")
            self.absmax = _tensor_array("absmax", self.absmax, (np.float32,), (nblocks,), want)
            _finite_field("absmax", self.absmax)  # n / blocksize scales: a small scan

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
        w = _weight_key(prefix)
        meta = {"quant_type": "nf4", "blocksize": int(self.blocksize), "dtype": _bnb_dtype_name(self.dtype),
                "shape": [int(d) for d in self.shape]}
        out = {w: self.packed.reshape(-1, 1), f"{w}.absmax": self.absmax, f"{w}.quant_map": NF4_CODE.copy()}
        if self.double_quant:
            offset = np.float32(self.offset)
            if not np.isfinite(offset):
                raise NonFiniteError(f"offset must be finite, got {offset}")
            meta.update(nested_blocksize=DQ_GROUP, nested_dtype="float32", nested_offset=float(offset))
            out[f"{w}.nested_absmax"] = self.absmax2
            out[f"{w}.nested_quant_map"] = np.array(self.code8, np.float32)
        # json.dumps with its default separators, as bitsandbytes' pack_dict_to_tensor
        out[f"{w}.{_QS_NAME}"] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8).copy()
        return out

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
        return _from_state_dict(cls, tensors, prefix)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return f"NF4Tensor(shape={self.shape}, blocksize={self.blocksize}{dq}, nbytes={self.nbytes})"


def quantize_nf4(w, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize ``w`` to NF4, bit-identical to ``bitsandbytes.functional.quantize_4bit(w,
    blocksize=blocksize, quant_type="nf4")`` on the CPU.

    ``w`` is float32 (float64 is rounded to float32 first), any shape, non-empty, finite:
    a NaN or inf raises :class:`~numlora.errors.NonFiniteError` naming its index. Any
    blocksize in ``[BLOCKSIZE_MIN, BLOCKSIZE_MAX]`` = [2, 2**20] works (bitsandbytes uses
    32 ... 4096; others raise :class:`~numlora.errors.ConfigError`, see
    :func:`check_blocksize`). ``double_quant=True``
    also quantizes the block scales to 8 bits (QLoRA's double quantization).
    """
    if _on_device(w):
        return _gpu().quantize_nf4(w, blocksize, double_quant)
    w = v.float_array("w", w, None)
    bs = check_blocksize(blocksize)
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


#: The name of the packed quant state under ``<prefix>.weight.``.
_QS_NAME = "quant_state.bitsandbytes__nf4"

#: bitsandbytes' name (a torch dtype's) of the original weight dtype, by NF4Tensor.dtype.
_BNB_DTYPE = {"float32": "float32", "float64": "float32", "bfloat16": "bfloat16", "float16": "float16"}

#: The dtypes bitsandbytes' dequantize_4bit accepts in the quant state.
_STATE_DTYPES = ("float32", "bfloat16", "float16")

_META_FIELDS = ("quant_type", "blocksize", "dtype", "shape")
_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")


def _weight_key(prefix) -> str:
    """``<prefix>.weight`` (``weight`` for the empty prefix), after checking the prefix."""
    if not isinstance(prefix, str):
        raise DTypeError(f"prefix must be a str (a module path such as 'model.layers.0.mlp.up_proj'), "
                         f"got {type(prefix).__name__}")
    if prefix.startswith(".") or prefix.endswith(".") or ".." in prefix:
        raise ConfigError(f"prefix must be a module path without a leading, trailing or doubled dot "
                          f"(e.g. 'model.layers.0.mlp.up_proj', or '' for a bare module), got {prefix!r}")
    return f"{prefix}.weight" if prefix else "weight"


def _bnb_dtype_name(dtype) -> str:
    name = str(dtype)
    if name not in _BNB_DTYPE:
        raise DTypeError(f"expected the NF4Tensor's dtype to be one of {sorted(_BNB_DTYPE)}, got {name!r}")
    return _BNB_DTYPE[name]


def _state_array(tensors, key, dtype, shape, what=""):
    """``tensors[key]``, checked to be a numpy array of ``dtype`` and ``shape``."""
    if key not in tensors:
        raise FormatError(f"missing key {key!r}{what}")
    a = tensors[key]
    if not isinstance(a, np.ndarray):
        raise DTypeError(f"expected {key!r} to be a numpy array, got {type(a).__name__}"
                         + (" (convert torch tensors with .numpy())" if hasattr(a, "numpy") else ""))
    if a.dtype != np.dtype(dtype):
        raise DTypeError(f"expected {key!r} with dtype {np.dtype(dtype)}{what}, got {a.dtype}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ShapeError(f"expected {key!r} of shape {tuple(shape)}{what}, got {tuple(a.shape)}")
    return np.ascontiguousarray(a)


def _check_finite(key, a):
    finite = np.isfinite(a)
    if not finite.all():
        i = int(np.argmin(finite.reshape(-1)))
        raise NonFiniteError(f"expected finite values in {key!r}, got {a.reshape(-1)[i]} at index {i}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_quant_state(tensors, w):
    """The JSON quant state of ``<w>.quant_state.bitsandbytes__nf4``, fields checked."""
    key = f"{w}.{_QS_NAME}"
    qs_prefix = f"{w}.quant_state."
    others = sorted(k for k in tensors if isinstance(k, str) and k.startswith(qs_prefix) and k != key)
    if others:
        raise FormatError(f"expected exactly one quant state, {key!r} (numlora reads quant_type 'nf4' only), "
                          f"got {others + ([key] if key in tensors else [])}")
    raw = _state_array(tensors, key, np.uint8, None, " (the packed bitsandbytes quant state)")
    if raw.ndim != 1:
        raise ShapeError(f"expected {key!r} to be 1-D (UTF-8 JSON bytes), got shape {raw.shape}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"expected {key!r} to hold UTF-8 JSON, got bytes that do not parse ({exc})") from None
    if not isinstance(meta, dict):
        raise FormatError(f"expected {key!r} to hold a JSON object, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(_META_FIELDS) - set(_NESTED_FIELDS))
    if unknown:
        raise FormatError(f"expected only the fields {list(_META_FIELDS + _NESTED_FIELDS)} in {key!r}, "
                          f"got unknown fields {unknown}")
    missing = [f for f in _META_FIELDS if f not in meta]
    if missing:
        raise FormatError(f"expected the fields {list(_META_FIELDS)} in {key!r}, missing {missing}")
    if meta["quant_type"] != "nf4":
        raise FormatError(f"expected quant_type 'nf4' in {key!r}, got {meta['quant_type']!r}")
    bs = meta["blocksize"]
    if not _is_int(bs) or not BLOCKSIZE_MIN <= bs <= BLOCKSIZE_MAX:
        raise FormatError(f"expected blocksize in {key!r} to be an integer >= {BLOCKSIZE_MIN} and <= "
                          f"{BLOCKSIZE_MAX} (2**20), got {bs!r}")
    if meta["dtype"] not in _STATE_DTYPES:
        raise DTypeError(f"expected dtype in {key!r} to be one of {list(_STATE_DTYPES)}, got {meta['dtype']!r}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ShapeError(f"expected shape in {key!r} to be a list of non-negative integers, got {shape!r}")
    if math.prod(shape) > MAX_NUMEL or any(d > MAX_NUMEL for d in shape):
        raise ShapeError(f"expected shape in {key!r} with at most 2**63 - 1 elements, got {shape!r} "
                         f"({math.prod(shape)} elements)")
    nested = [f for f in _NESTED_FIELDS if f in meta]
    if nested and len(nested) != len(_NESTED_FIELDS):
        raise FormatError(f"expected all of {list(_NESTED_FIELDS)} in {key!r} (double quantization) or none, "
                          f"got only {nested}")
    if nested:
        if meta["nested_blocksize"] != DQ_GROUP or not _is_int(meta["nested_blocksize"]):
            raise FormatError(f"expected nested_blocksize {DQ_GROUP} in {key!r} (the only one numlora decodes), "
                              f"got {meta['nested_blocksize']!r}")
        if meta["nested_dtype"] != "float32":
            raise DTypeError(f"expected nested_dtype 'float32' in {key!r}, got {meta['nested_dtype']!r}")
        off = meta["nested_offset"]
        if isinstance(off, bool) or not isinstance(off, (int, float)):
            raise FormatError(f"expected nested_offset in {key!r} to be a number, got {off!r}")
        try:
            with np.errstate(over="ignore"):
                off32 = np.float32(float(off))
        except OverflowError:  # a JSON integer beyond float64
            off32 = np.float32(np.inf)
        if not np.isfinite(off32):
            raise NonFiniteError(f"expected a finite nested_offset in {key!r}, got {off!r}")
    return meta, bool(nested)


def _from_state_dict(cls, tensors, prefix):
    w = _weight_key(prefix)
    if not isinstance(tensors, Mapping):
        raise DTypeError(f"tensors must be a mapping of key to numpy array, got {type(tensors).__name__}")
    meta, nested = _read_quant_state(tensors, w)
    shape = tuple(meta["shape"])
    bs = meta["blocksize"]
    n = math.prod(shape)
    nblocks = -(-n // bs)
    packed = _state_array(tensors, w, np.uint8, ((n + 1) // 2, 1), " (packed 4-bit codes)")
    qm = _state_array(tensors, f"{w}.quant_map", np.float32, (16,))
    diff = np.flatnonzero(qm.view(np.uint32) != NF4_CODE.view(np.uint32))
    if diff.size:
        i = int(diff[0])
        raise FormatError(f"expected {w + '.quant_map'!r} to be the NF4 codebook bit for bit, got {qm[i]!r} "
                          f"at index {i} where NF4 has {NF4_CODE[i]!r}")
    nested_keys = (f"{w}.nested_absmax", f"{w}.nested_quant_map")
    if nested:
        why = " (the quant state says double quantization)"
        absmax = _state_array(tensors, f"{w}.absmax", np.uint8, (nblocks,), why)
        absmax2 = _state_array(tensors, nested_keys[0], np.float32, (-(-nblocks // DQ_GROUP),), why)
        code8 = _state_array(tensors, nested_keys[1], np.float32, (256,), why)
        _check_finite(nested_keys[0], absmax2)
        _check_finite(nested_keys[1], code8)
        return cls(packed.reshape(-1), absmax, shape, bs, absmax2=absmax2,
                   offset=np.float32(meta["nested_offset"]), code8=code8.copy(), dtype=meta["dtype"])
    stray = [k for k in nested_keys if k in tensors]
    if stray:
        raise FormatError(f"unexpected keys {stray}: the quant state {w + '.' + _QS_NAME!r} has no "
                          f"double quantization fields {list(_NESTED_FIELDS)}")
    absmax = _state_array(tensors, f"{w}.absmax", np.float32, (nblocks,), " (no double quantization)")
    _check_finite(f"{w}.absmax", absmax)
    return cls(packed.reshape(-1), absmax, shape, bs, dtype=meta["dtype"])


def _check_tensor(t):
    if not isinstance(t, NF4Tensor):
        raise DTypeError(f"expected an NF4Tensor, got {type(t).__name__}")
    return t


def dequantize_nf4(t: NF4Tensor, out=None) -> np.ndarray:
    """Decode ``t`` to a float32 array of ``t.shape``: ``code[nibble] * absmax[block]``
    (absmax decoded from its 8-bit codes first under double quantization). ``out``: an
    optional preallocated C-contiguous float32 array of ``t.shape``; if it shares memory
    with the tensor's arrays the result is decoded into a temporary and copied into it."""
    if _on_device(t, out):
        return _gpu().dequantize_nf4(t, out)
    _check_tensor(t)
    from .kernels import nf4 as k

    dest = None
    if out is None:
        out = np.empty(t.shape, np.float32)
    else:
        out, dest = _private_out(v.out_array("out", out, t.shape, np.float32), _tensor_arrays(t))
    n, bs = t.numel, t.blocksize
    if _simd_ok(k, bs) and n % bs == 0:
        k.nf4_decode_simd(t.packed, t.scales(), bs, NF4_CODE, 0, n // bs, out.reshape(-1))
    else:
        k.nf4_dequantize_range(t.packed, t.scales(), bs, NF4_CODE, 0, n, out.reshape(-1))
    return _deliver(out, dest)


def _tensor_arrays(t):
    """The arrays of an NF4Tensor a decode reads while it writes, by name, for the overlap
    checks of ``out=``: the codes and the float32 scales (under double quantization the
    scales are decoded from absmax, absmax2 and code8 once, before anything is written)."""
    return {"t.packed": t.packed, "t.scales()": t.scales()}


def _private_out(out, inputs):
    from .ops import _private_out as po

    return po(out, inputs)


def _deliver(out, dest):
    if dest is None:
        return out
    dest[...] = out
    return dest


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

    ``out`` may overlap ``x`` or the tensor's arrays: the result is then computed into a
    temporary and copied into ``out``.
    """
    if _on_device(x, t, out):
        return _gpu().nf4_matmul(x, t, out)
    out_f, in_f = _weight_2d(t)
    from .ops import _input_rows, _prepare_out

    x = _input_rows(x, in_f)
    dest = None
    out_given = out is not None
    out = _prepare_out(out, x, out_f, np.float32)
    if out_given:
        out, dest = _private_out(out, {"x": x, **_tensor_arrays(t)})
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), np.float32)
    _nf4_forward(x2, t, None, None, 0.0, None, out.reshape(-1, out_f))
    return _deliver(out, dest)


def _nf4_forward(x2, t, lora_a, lora_b, s, bias, out2, x_lora=None, u_out=None):
    """out2 = x2 deq(W)^T (+ s (x_lora A^T) B^T) (+ bias); A, B, bias float32 or None.

    x_lora: the LoRA path's input (the dropped x in training; x2 when None). u_out: an
    optional (n, r) float32 buffer that receives ``s x_lora A^T`` (what the backward
    reuses)."""
    from .kernels import nf4 as k

    n = x2.shape[0]
    if n == 0:
        return
    out_f, in_f = t.shape
    scales = t.scales()
    use_bias = bias is not None
    b_arr = bias if use_bias else np.zeros(1, np.float32)
    xl = x2 if x_lora is None else x_lora
    if n > FUSED_MAX_ROWS:
        _nf4_blas(x2, t, scales, out2)
        if lora_a is not None:
            if x_lora is None and u_out is None:
                from .ops import _add_low_rank

                _add_low_rank(x2, lora_a, lora_b, s, out2)
            else:
                from .ops import _expand_into

                u = np.dot(xl, lora_a.T, out=u_out)
                u *= np.float32(s)
                _expand_into(u, lora_b, out2)
        if use_bias:
            out2 += b_arr
        return
    if lora_a is None:
        u = np.zeros((n, 0), np.float32)
        lora_b = np.zeros((out_f, 0), np.float32)
    else:
        u = np.empty((n, lora_a.shape[0]), np.float32) if u_out is None else u_out
        k.lora_shrink(xl, lora_a, np.float32(s), u)
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
    yt = np.empty((t.shape[0], x2.shape[0]), np.float32)
    xt = x2.T
    for r0, r1, cur in _row_tiles(t, scales):
        np.dot(cur, xt, out=yt[r0:r1])
    out2[...] = yt.T


def _row_tiles(t, scales):
    """Yield ``(r0, r1, tile)``: rows r0:r1 of deq(W), decoded (serially) into one reused
    buffer of at most TILE_ELEMS floats, for the large-batch paths that multiply them with
    BLAS (the forward's ``x W^T`` and the backward's ``G W``)."""
    from .kernels import nf4 as k

    out_f, in_f = t.shape
    rows = max(1, min(out_f, TILE_ELEMS // in_f))
    tile = np.empty((rows, in_f), np.float32)
    bs = t.blocksize
    simd = in_f % bs == 0 and _simd_ok(k, bs)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        cur = tile[: r1 - r0]
        if simd:
            k.nf4_decode_simd_tile(t.packed, scales, bs, NF4_CODE, r0 * in_f // bs, r1 * in_f // bs, cur.reshape(-1))
        else:
            k.nf4_dequantize_tile(t.packed, scales, bs, NF4_CODE, r0 * in_f, r1 * in_f, cur.reshape(-1))
        yield r0, r1, cur


def nf4_matmul_t(g, t: NF4Tensor, out=None) -> np.ndarray:
    """``g deq(W)`` for an NF4 weight ``W`` (out, in) and ``g`` of shape (out,) or
    (n, out): the input gradient of ``y = x deq(W)^T``, fused the same way (W is decoded a
    row segment at a time, never whole). Returns (in,) or (n, in). ``out`` may overlap
    ``g`` or the tensor's arrays (computed into a temporary then)."""
    if _on_device(g, t, out):
        return _gpu().nf4_matmul_t(g, t, out)
    out_f, in_f = _weight_2d(t)
    from .ops import _input_rows, _prepare_out

    g = _input_rows(g, out_f, "g", "out_features")
    dest = None
    out_given = out is not None
    out = _prepare_out(out, g, in_f, np.float32)
    if out_given:
        out, dest = _private_out(out, {"g": g, **_tensor_arrays(t)})
    g2 = np.ascontiguousarray(g.reshape(-1, out_f), np.float32)
    _nf4_grad_input(g2, t, out.reshape(-1, in_f))
    return _deliver(out, dest)


def _nf4_grad_input(g2, t, dx):
    """dx = g2 deq(W) (overwritten). Up to FUSED_MAX_ROWS rows: the fused kernel (W
    decoded a row segment at a time, in registers). More rows: decode tiles of rows of W
    (TILE_ELEMS floats at most, serially, as the forward's large-batch path does) and
    accumulate ``G[:, rows] @ tile`` with BLAS; never a whole dequantized copy of W."""
    from .kernels import nf4 as k

    n = g2.shape[0]
    if n == 0:
        return
    scales = t.scales()
    if n <= FUSED_MAX_ROWS:
        k.nf4_matmul_t(t.packed, scales, t.blocksize, NF4_CODE, g2, dx)
        return
    tmp = None
    for r0, r1, cur in _row_tiles(t, scales):
        if r0 == 0:
            np.dot(g2[:, r0:r1], cur, out=dx)
        else:
            if tmp is None:
                tmp = np.empty_like(dx)
            np.dot(g2[:, r0:r1], cur, out=tmp)
            dx += tmp


def qlora_backward(x, t: NF4Tensor, lora_a, lora_b, scaling, grad_out, *, dropout=None, x_drop=None, u=None,
                   grad_a=None, grad_b=None, need_grad_x=True):
    """Gradients of ``y = x deq(W)^T + b + scaling * dropout(x) A^T B^T`` for an NF4 base
    weight: as :func:`numlora.ops.lora_backward` (same arguments and results), with the
    ``G deq(W)`` term computed as :func:`nf4_matmul_t` does (fused for small batches,
    decoded tiles and BLAS for large ones; never a whole dequantized copy of W).
    float32 throughout. ``grad_a`` / ``grad_b`` may overlap the inputs (those are copied
    first, as in :func:`~numlora.ops.lora_backward`)."""
    if _on_device(x, t, lora_a, lora_b, grad_out):
        return _gpu().qlora_backward(x, t, lora_a, lora_b, scaling, grad_out, dropout=dropout, x_drop=x_drop, u=u, grad_a=grad_a, grad_b=grad_b, need_grad_x=need_grad_x)
    out_f, in_f = _weight_2d(t)
    from .ops import _backward_core, _backward_inputs, _check_x_drop_alone, _finish_backward, _grad_buffer
    from .ops import _low_rank_arrays, _unalias_grads

    lora_a, lora_b, rank = _low_rank_arrays(lora_a, lora_b, out_f, in_f, base=_nf4_base(t))
    s = v.real_scalar("scaling", scaling)
    need_grad_x = v.flag("need_grad_x", need_grad_x)
    _check_x_drop_alone(x_drop, dropout, need_grad_x)
    dt = np.dtype(np.float32)
    x2, xd2, g2, us, drop, one_d = _backward_inputs(x, in_f, out_f, grad_out, dt, dropout, x_drop, u, rank)
    if us is not None:
        us = us * np.float32(s)
    grad_a = _grad_buffer("grad_a", grad_a, lora_a.shape, dt)
    grad_b = _grad_buffer("grad_b", grad_b, lora_b.shape, dt)
    a, b = np.ascontiguousarray(lora_a, dt), np.ascontiguousarray(lora_b, dt)
    x2, xd2, g2, us, a, b = _unalias_grads(grad_a, grad_b, (x2, xd2, g2, us, a, b))
    if need_grad_x and (grad_a is not None or grad_b is not None):
        names = [k for k, arr in _tensor_arrays(t).items()
                 if v.shares_memory(grad_a, arr) or v.shares_memory(grad_b, arr)]
        if names:
            raise ShapeError(f"grad_a / grad_b share memory with {names[0]}: they are accumulated in place while "
                             "the NF4 weight is still read; pass separate arrays")
    dx, grad_a, grad_b = _backward_core(x2, xd2, a, b, s, g2, us, drop, grad_a, grad_b, bool(need_grad_x),
                                        lambda g, d: _nf4_grad_input(g, t, d))
    return _finish_backward(dx, grad_a, grad_b, one_d, in_f)


def qlora_forward(x, t: NF4Tensor, lora_a, lora_b, scaling, bias=None, out=None) -> np.ndarray:
    """``y = x deq(W)^T + b + scaling * (x A^T) B^T`` for an NF4 base weight, fused as in
    :func:`nf4_matmul` (the LoRA shrink, expand and the bias run inside the same kernel
    for batches up to ``FUSED_MAX_ROWS``). float32 throughout. ``out`` may overlap the
    inputs (``out=x``, ``out=lora_a``...): the result is then computed into a temporary
    and copied into ``out``, the same as without overlap."""
    if _on_device(x, t, lora_a, lora_b, bias, out):
        return _gpu().qlora_forward(x, t, lora_a, lora_b, scaling, bias, out)
    out_f, in_f = _weight_2d(t)
    from .ops import _bias, _input_rows, _low_rank_arrays, _prepare_out

    lora_a, lora_b, _ = _low_rank_arrays(lora_a, lora_b, out_f, in_f, base=_nf4_base(t))
    s = v.real_scalar("scaling", scaling)
    x = _input_rows(x, in_f)
    b_arr, use_bias = _bias(bias, out_f, np.float32)
    dest = None
    out_given = out is not None
    out = _prepare_out(out, x, out_f, np.float32)
    if out_given:
        out, dest = _private_out(out, {"x": x, "lora_a": lora_a, "lora_b": lora_b, "bias": bias,
                                       **_tensor_arrays(t)})
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), np.float32)
    _nf4_forward(x2, t, np.ascontiguousarray(lora_a, np.float32), np.ascontiguousarray(lora_b, np.float32), s,
                 b_arr if use_bias else None, out.reshape(-1, out_f))
    return _deliver(out, dest)


def _nf4_base(t):
    from .ops import _Base

    return _Base("the NF4 weight", t.shape, None)
