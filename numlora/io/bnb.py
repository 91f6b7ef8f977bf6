"""The bitsandbytes 4-bit state dict: what ``Linear4bit.state_dict()`` (``Params4bit`` data
plus ``QuantState.as_dict(packed=True)``) and transformers write for an NF4 or FP4 weight,
read and written byte for byte. :meth:`NF4Tensor.to_state_dict
<numlora.nf4.NF4Tensor.to_state_dict>` and :meth:`NF4Tensor.from_state_dict
<numlora.nf4.NF4Tensor.from_state_dict>` are the public entry points; they call
:func:`to_state_dict` and :func:`from_state_dict` here.

The layout itself is described in ``docs/nf4-format.md``. Nothing here imports numba.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

from .._tables import FP4_CODE, NF4_CODE
from .._validate import BLOCKSIZE_MAX, BLOCKSIZE_MIN, MAX_NUMEL
from ..errors import ConfigError, DTypeError, FormatError, NonFiniteError, ShapeError

__all__ = ["DQ_GROUP", "from_state_dict", "to_state_dict"]

#: Group size of the double quantization of absmax (bitsandbytes' nested blocksize).
DQ_GROUP = 256

#: The code book of each quant type bitsandbytes writes (its ``quant_map``).
_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def to_state_dict(t, prefix: str = "") -> dict:
    """The tensors of NF4 weight ``t`` under module path ``prefix``; see
    :meth:`NF4Tensor.to_state_dict <numlora.nf4.NF4Tensor.to_state_dict>`."""
    w = _weight_key(prefix)
    meta = {"quant_type": t.quant_type, "blocksize": int(t.blocksize), "dtype": _bnb_dtype_name(t.dtype),
            "shape": [int(d) for d in t.shape]}
    out = {w: t.packed.reshape(-1, 1), f"{w}.absmax": t.absmax, f"{w}.quant_map": _CODES[t.quant_type].copy()}
    if t.double_quant:
        offset = np.float32(t.offset)
        if not np.isfinite(offset):
            raise NonFiniteError(f"offset must be finite, got {offset}")
        meta.update(nested_blocksize=DQ_GROUP, nested_dtype="float32", nested_offset=float(offset))
        out[f"{w}.nested_absmax"] = t.absmax2
        out[f"{w}.nested_quant_map"] = np.array(t.code8, np.float32)
    # json.dumps with its default separators, as bitsandbytes' pack_dict_to_tensor
    out[f"{w}.{_QS_PREFIX}{t.quant_type}"] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8).copy()
    return out


#: The name of the packed quant state under ``<prefix>.weight.``, less its quant type.
_QS_PREFIX = "quant_state.bitsandbytes__"


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
    """The JSON quant state of ``<w>.quant_state.bitsandbytes__<nf4|fp4>``, fields checked;
    returns it, whether it has double quantization fields, and its key."""
    qs_prefix = f"{w}.quant_state."
    found = sorted(k for k in tensors if isinstance(k, str) and k.startswith(qs_prefix))
    names = [f"{w}.{_QS_PREFIX}{q}" for q in _CODES]
    if not found:
        raise FormatError(f"missing key {names[0]!r} (or {names[1]!r} for FP4): the packed bitsandbytes quant state")
    if len(found) != 1 or found[0] not in names:
        raise FormatError(f"expected exactly one quant state, {' or '.join(repr(n) for n in names)}, "
                          f"got {found if found else 'none'}")
    key = found[0]
    key_type = key[len(f"{w}.{_QS_PREFIX}"):]
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
    if meta["quant_type"] != key_type:
        raise FormatError(f"expected quant_type {key_type!r} in {key!r} (the key's), got {meta['quant_type']!r}")
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
    return meta, bool(nested), key


def from_state_dict(cls, tensors, prefix=""):
    """An ``cls`` (:class:`~numlora.nf4.NF4Tensor`) read from the bitsandbytes state dict
    ``tensors`` for module ``prefix``; see :meth:`NF4Tensor.from_state_dict
    <numlora.nf4.NF4Tensor.from_state_dict>`."""
    w = _weight_key(prefix)
    if not isinstance(tensors, Mapping):
        raise DTypeError(f"tensors must be a mapping of key to numpy array, got {type(tensors).__name__}")
    meta, nested, qs_key = _read_quant_state(tensors, w)
    qt = meta["quant_type"]
    code = _CODES[qt]
    shape = tuple(meta["shape"])
    bs = meta["blocksize"]
    n = math.prod(shape)
    nblocks = -(-n // bs)
    packed = _state_array(tensors, w, np.uint8, ((n + 1) // 2, 1), " (packed 4-bit codes)")
    qm = _state_array(tensors, f"{w}.quant_map", np.float32, (16,))
    diff = np.flatnonzero(qm.view(np.uint32) != code.view(np.uint32))
    if diff.size:
        i = int(diff[0])
        raise FormatError(f"expected {w + '.quant_map'!r} to be the {qt.upper()} codebook bit for bit (the quant "
                          f"state says {qt!r}), got {qm[i]!r} at index {i} where {qt.upper()} has {code[i]!r}")
    nested_keys = (f"{w}.nested_absmax", f"{w}.nested_quant_map")
    if nested:
        why = " (the quant state says double quantization)"
        absmax = _state_array(tensors, f"{w}.absmax", np.uint8, (nblocks,), why)
        absmax2 = _state_array(tensors, nested_keys[0], np.float32, (-(-nblocks // DQ_GROUP),), why)
        code8 = _state_array(tensors, nested_keys[1], np.float32, (256,), why)
        _check_finite(nested_keys[0], absmax2)
        _check_finite(nested_keys[1], code8)
        return cls(packed.reshape(-1), absmax, shape, bs, absmax2=absmax2,
                   offset=np.float32(meta["nested_offset"]), code8=code8.copy(), dtype=meta["dtype"],
                   quant_type=qt)
    stray = [k for k in nested_keys if k in tensors]
    if stray:
        raise FormatError(f"unexpected keys {stray}: the quant state {qs_key!r} has no "
                          f"double quantization fields {list(_NESTED_FIELDS)}")
    absmax = _state_array(tensors, f"{w}.absmax", np.float32, (nblocks,), " (no double quantization)")
    _check_finite(f"{w}.absmax", absmax)
    return cls(packed.reshape(-1), absmax, shape, bs, dtype=meta["dtype"], quant_type=qt)

