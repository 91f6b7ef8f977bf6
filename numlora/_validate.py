"""Input checks and output allocation shared by the functional layer (the designated
home of the array helpers: every module may import from here): scalars and flags,
arrays, LoRA operands, ``out=`` buffers and memory overlap. Every message says what was
expected and what arrived.
"""

from __future__ import annotations

import numbers
import operator
from typing import NamedTuple

import numpy as np

from .errors import ConfigError, DTypeError, NonFiniteError, NumloraError, ShapeError

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
F32_MAX = float(np.finfo(np.float32).max)
F32, F64 = FLOAT_DTYPES


def float_array(name: str, a, ndims=None, *, allow_empty: bool = False) -> np.ndarray:
    """Return ``a`` as a float32 / float64 ndarray (no copy when it already is one);
    refuse other dtypes, the wrong number of dimensions and (by default) empty arrays."""
    if type(a) is np.ndarray and (a.dtype is F32 or a.dtype is F64) and a.ndim == ndims and a.size:
        return a  # the common case (numpy's own float dtype objects), without the general checks below
    if not isinstance(a, np.ndarray):
        if hasattr(a, "__cuda_array_interface__"):
            raise DTypeError(f"{name} is a GPU array; the CPU functions take numpy arrays")
        try:
            a = np.asarray(a)
        except Exception as exc:  # ragged lists and other junk
            raise DTypeError(f"{name} must be an array of float32 or float64, got {type(a).__name__}") from exc
    if a.dtype not in FLOAT_DTYPES:
        hint = ""
        if a.dtype in (np.dtype(np.float16),) or a.dtype.name in ("bfloat16",):
            hint = " (convert 16-bit floats with .astype(numpy.float32) first)"
        raise DTypeError(f"{name} must have dtype float32 or float64, got {a.dtype}{hint}")
    if ndims is not None:
        allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
        if a.ndim not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ShapeError(f"expected {name} to be {want}, got shape {a.shape}")
    if a.size == 0 and not allow_empty:
        raise ShapeError(f"expected a non-empty {name}, got shape {a.shape}")
    return a


def compute_dtype(*dtypes) -> np.dtype:
    """The compute dtype of float32 / float64 operands (``np.result_type`` of ``dtypes``:
    float64 if any is, else float32), without numpy's call for the all-float32 case."""
    for d in dtypes:
        if d != F32:
            return np.result_type(*dtypes)
    return F32


def arrays_dtype(*arrays) -> np.dtype:
    """``np.result_type`` of the dtypes of ``arrays`` (anything ``np.asarray`` takes; the
    compute dtype of a function's operands), through :func:`compute_dtype`."""
    return compute_dtype(*[a.dtype if type(a) is np.ndarray else np.asarray(a).dtype for a in arrays])


def expect_shape(name: str, a: np.ndarray, shape: tuple) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ShapeError(f"expected {name} of shape {tuple(shape)}, got {tuple(a.shape)}")


def real_scalar(name: str, value, *, positive: bool = False) -> float:
    """``value`` as a Python float. The one rule for every scalar numlora computes with:
    a real number (not a bool) that is finite *in float32*, the compute type, so that a
    finite 1e39 cannot turn into inf inside a kernel."""
    if type(value) is float and -F32_MAX <= value <= F32_MAX and (value > 0 or not positive):
        return value  # the common case, without the slower general checks below
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise DTypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        v = float(value)
    except (OverflowError, ValueError):  # an int too large for a float
        digits = len(str(abs(int(value))))
        raise ConfigError(f"{name} must be finite in float32 (|{name}| <= {F32_MAX:.8g}), got an integer of {digits} "
                          "digits") from None
    if not np.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {v}")
    if abs(v) > F32_MAX:
        raise ConfigError(f"{name} must be finite in float32 (|{name}| <= {F32_MAX:.8g}), got {v:g}")
    if positive and not v > 0:
        raise ConfigError(f"{name} must be > 0, got {v}")
    return v


def flag(name: str, value) -> bool:
    """A True / False argument: bool, numpy bool, 0 / 1 or None (False). Anything else
    (an array, whose truth value is ambiguous, a string) is refused, naming it."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (numbers.Integral, np.integer)) and int(value) in (0, 1):
        return bool(value)
    raise ConfigError(f"{name} must be True or False, got {type(value).__name__} {value!r:.60}")


def int_scalar(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise DTypeError(f"{name} must be an integer, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise DTypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if minimum is not None and v < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {v}")
    return v


def nonneg_scalar(name: str, value) -> float:
    """A real scalar (see :func:`real_scalar`) that is >= 0."""
    x = real_scalar(name, value)
    if x < 0:
        raise ConfigError(f"{name} must be >= 0, got {x}")
    return x


def unit_scalar(name: str, value) -> float:
    """A real scalar (see :func:`real_scalar`) in [0, 1)."""
    x = real_scalar(name, value)
    if not 0.0 <= x < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {x}")
    return x


#: The NF4 blocksizes numlora accepts, from a caller or from a file: ``BLOCKSIZE_MIN <=
#: blocksize <= BLOCKSIZE_MAX``. bitsandbytes uses 32 ... 4096; the kernels take any size
#: in this range (the quantizer keeps one block of codes per thread, 4 MiB at the top).
#: Anything larger is refused: its products with block indices overflow 64-bit integers
#: in the kernels (a blocksize of 2**63 gave garbage and a matmul that never returned).
BLOCKSIZE_MIN = 2
BLOCKSIZE_MAX = 1 << 20

#: The largest element count numlora accepts in a shape (int64, the kernels' index type).
MAX_NUMEL = (1 << 63) - 1


def check_blocksize(value, name: str = "blocksize") -> int:
    """``value`` as a Python int if it is an integer blocksize numlora accepts
    (``BLOCKSIZE_MIN <= value <= BLOCKSIZE_MAX``); otherwise raise
    :class:`~numlora.errors.DTypeError` (not an integer; bools are refused) or
    :class:`~numlora.errors.ConfigError` (out of range), naming ``name``. The one check
    for every blocksize read from a user (arguments, the CLI) or a file."""
    bs = int_scalar(name, value)
    if not BLOCKSIZE_MIN <= bs <= BLOCKSIZE_MAX:
        raise ConfigError(f"{name} must be >= {BLOCKSIZE_MIN} and <= {BLOCKSIZE_MAX} (2**20; bitsandbytes uses "
                          f"32 ... 4096), got {bs}")
    return bs


def shape_arg(name: str, shape, itemsize: int = 1) -> tuple:
    """A shape argument (an int, or a tuple / list of ints) as a tuple of Python ints >= 0
    whose array of ``itemsize``-byte elements numpy can address; refused with
    DTypeError / ConfigError naming ``name`` otherwise."""
    if isinstance(shape, (numbers.Integral, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    elif isinstance(shape, np.ndarray) and shape.ndim == 1:
        shape = shape.tolist()
    if not isinstance(shape, (tuple, list)):
        raise DTypeError(f"{name} must be an int or a tuple of ints, got {type(shape).__name__}")
    dims = tuple(int_scalar(f"{name}[{i}]", d, minimum=0) for i, d in enumerate(shape))
    limit = np.iinfo(np.intp).max // max(1, itemsize)
    total = 1
    for d in dims:
        total *= d
    if total > limit or any(d > limit for d in dims):
        raise ConfigError(f"{name} {dims} is too large: {total} elements of {itemsize} bytes exceed what numpy "
                          f"can address")
    return dims


def out_array(name: str, out, shape: tuple, dtype) -> np.ndarray:
    """Check a caller's ``out=`` buffer: ndarray, exact shape and dtype, C-contiguous,
    writable."""
    if type(out) is np.ndarray and out.dtype == dtype and out.shape == shape:
        flags = out.flags
        if flags.c_contiguous and flags.writeable:
            return out  # the common case, one look at the flags
    if not isinstance(out, np.ndarray):
        raise DTypeError(f"{name} must be a numpy array, got {type(out).__name__}")
    if out.dtype != np.dtype(dtype):
        raise DTypeError(f"expected {name} with dtype {np.dtype(dtype)}, got {out.dtype}")
    expect_shape(name, out, shape)
    if not out.flags.c_contiguous:
        raise ShapeError(f"expected {name} to be C-contiguous (numpy.empty(..., order='C'))")
    if not out.flags.writeable:
        raise ShapeError(f"{name} is read-only")
    return out


def nbytes(a) -> int:
    """Bytes of a numpy or device array."""
    return int(a.size) * np.dtype(a.dtype).itemsize


def first_nonfinite(name: str, flat: np.ndarray, shape: tuple, start: int = 0) -> NonFiniteError:
    """Build the error naming the first NaN / inf at or after flat index ``start``."""
    bad = np.flatnonzero(~np.isfinite(flat[start:]))
    k = start + int(bad[0])
    index = np.unravel_index(k, shape)
    return NonFiniteError(
        f"{name} must be finite, got {flat[k]} at index {tuple(int(i) for i in index)}"
    )


#: Work bound of the exact overlap test (numpy's max_work): a layout too hard to decide
#: within it counts as overlapping, the safe answer.
_OVERLAP_WORK = 4096
_TooHard = getattr(getattr(np, "exceptions", np), "TooHardError", RuntimeError)
#: ``np.may_share_memory`` without numpy's ``__array_function__`` dispatch (half its cost;
#: called on ndarrays only), where numpy exposes it.
_may_share = getattr(np.may_share_memory, "_implementation", np.may_share_memory)


def shares_memory(a, b) -> bool:
    """Whether numpy arrays ``a`` and ``b`` have an element in common.

    ``np.may_share_memory`` (a comparison of the memory bounds, ~0.2 us) first, so arrays
    that do not overlap cost nothing more; then the exact ``np.shares_memory`` with a
    bounded amount of work (interleaved views of one buffer, such as ``w[:, ::2]`` and
    ``w[:, 1::2]``, do not share). Anything that is not a numpy array (None, a GPU array)
    shares nothing."""
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return False
    if not _may_share(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=_OVERLAP_WORK))
    except _TooHard:  # undecided within the bound
        return True


def overlapping(out, arrays: dict):
    """The name of the first array of ``arrays`` (name -> array or None) that shares
    memory with ``out``, or None. About 0.2 us per array when nothing overlaps."""
    if isinstance(out, np.ndarray):
        for name, a in arrays.items():
            if a is not None and isinstance(a, np.ndarray) and _may_share(out, a) and shares_memory(out, a):
                return name
    return None


def overlaps_any(out: np.ndarray, arrays) -> bool:
    """Whether the ndarray ``out`` shares memory with one of ``arrays`` (ndarrays or None):
    :func:`overlapping` for a caller that needs no name."""
    for a in arrays:
        if a is not None and _may_share(out, a) and shares_memory(out, a):
            return True
    return False


def refuse_overlap(out_name: str, out, arrays: dict, what: str) -> None:
    """Raise ShapeError if ``out`` (written in place by ``what``) shares memory with one of
    ``arrays`` (read while it is written)."""
    name = overlapping(out, arrays)
    if name is not None:
        raise ShapeError(f"{out_name} shares memory with {name}: {what} writes {out_name} in place while reading "
                         f"{name}, so the result would be wrong; pass a copy of {name} (e.g. {name}.copy())")


def same_layout(a, b) -> bool:
    """Whether ``a`` and ``b`` are the same elements in the same order (same start,
    shape and strides): an elementwise kernel may then read and write in place."""
    return (a.shape == b.shape and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def _byte_bounds(a):
    """[lo, hi) addresses of the bytes an array spans (numpy's byte_bounds, which moved in
    numpy 2)."""
    lo = hi = a.__array_interface__["data"][0]
    for n, st in zip(a.shape, a.strides):
        if st < 0:
            lo += st * (n - 1)
        else:
            hi += st * (n - 1)
    return lo, hi + a.itemsize


def overlapping_pair(arrays):
    """The first two of ``arrays`` (``(key, label, array)`` triples; non-arrays and empty
    arrays ignored) that share memory, as ``((key, label), (key, label))`` sorted by key,
    or None. A sweep over the memory bounds: n arrays cost O(n log n) when none overlap."""
    spans = []
    for key, label, a in arrays:
        if isinstance(a, np.ndarray) and a.size:
            lo, hi = _byte_bounds(a)
            spans.append((lo, hi, len(spans), key, label, a))
    spans.sort(key=lambda t: t[:3])
    live = []  # the spans that may still overlap the next one
    for span in spans:
        live = [t for t in live if t[1] > span[0]]
        for other in live:
            if shares_memory(other[5], span[5]):
                return tuple(sorted([(other[3], other[4]), (span[3], span[4])]))
        live.append(span)
    return None


# --- LoRA operands and outputs ----------------------------------------------------------------

class Base(NamedTuple):
    """What the adapter is checked against, for error messages: the base's name ("weight",
    "the NF4 weight", "the bank's base"), its stored shape, and whether it is stored (in,
    out) (None: the layout is fixed, (out, in))."""

    name: str
    shape: tuple
    fan_in_fan_out: bool | None


def _base_desc(base, out_f, in_f):
    if base is None:
        return f"the base has out_features {out_f} and in_features {in_f}"
    layout = "(in, out)" if base.fan_in_fan_out else "(out, in)"
    return (f"{base.name} has out_features {out_f} and in_features {in_f} (shape {tuple(base.shape)}, read as "
            f"{layout})")


def _transpose_fix(base):
    if base is None:
        return "is the base transposed?"
    if base.fan_in_fan_out is None:
        return (f"{base.name} looks transposed: it must be (out, in); if you quantized a weight stored (in, out), "
                "quantize weight.T instead")
    now = bool(base.fan_in_fan_out)
    stored = "(out, in)" if now else "(in, out)"
    return f"if {base.name} is stored transposed, as {stored}, pass fan_in_fan_out={not now}"


def _adapter_hint(a_shape, b_shape, out_f, in_f, base, name):
    """Why A (r, in) / B (out, r) do not fit a base (out_f, in_f): the likely mistake and its
    fix, or a plain statement of the mismatch. ``b_shape`` may be None (B not a 2-D array)."""
    desc = _base_desc(base, out_f, in_f)
    if name == "lora_a":
        cols = a_shape[1]
        if b_shape is not None and a_shape == (out_f, b_shape[0]) and b_shape == (a_shape[1], in_f):
            return (f"lora_a and lora_b look swapped: lora_a has shape {a_shape} and lora_b {b_shape}, the shapes "
                    f"of B (out_features, rank) and A (rank, in_features) for this base ({desc}); pass "
                    f"lora_a=A, lora_b=B")
        if cols == out_f and out_f != in_f:
            return f"lora_a has {cols} columns but {desc}; {_transpose_fix(base)}"
        return (f"lora_a has {cols} columns but {desc}; the adapter does not fit this base (an adapter for another "
                f"model or layer?)")
    rank = a_shape[0]
    rows, cols = b_shape
    if b_shape == (rank, out_f) and rank != out_f:
        return "lora_b looks transposed: B is (out_features, rank); pass lora_b.T"
    if rows == out_f:
        return (f"lora_a has rank {rank} (its first dimension) but lora_b has {cols} columns: A and B must have the "
                f"same rank (are they from different adapters?)")
    if rows == in_f and out_f != in_f:
        return f"lora_b has {rows} rows but {desc}; {_transpose_fix(base)}"
    return (f"lora_b has {rows} rows but {desc}; the adapter does not fit this base (an adapter for another model "
            f"or layer?)")


def _factor(name, a, hint):
    a = float_array(name, a, None)
    if a.ndim != 2:  # (float_array refused an empty one)
        raise ShapeError(f"expected {name} to be 2-D, got shape {a.shape}{hint}")
    return a


def low_rank_arrays(lora_a, lora_b, out_f, in_f, base=None):
    """Validate A (r, in) and B (out, r) against the base's shape; return (A, B, r).
    ``base``: a :class:`Base` for the messages (what the base is and its stored shape)."""
    if (type(lora_a) is np.ndarray and type(lora_b) is np.ndarray and lora_a.ndim == 2 and lora_b.ndim == 2
            and (lora_a.dtype is F32 or lora_a.dtype is F64) and (lora_b.dtype is F32 or lora_b.dtype is F64)):
        rank = lora_a.shape[0]
        if rank and lora_a.shape[1] == in_f and lora_b.shape == (out_f, rank) and in_f and out_f:
            return lora_a, lora_b, rank  # the common case, without the checks and hints below
    lora_a = _factor("lora_a", lora_a, ": A is (rank, in_features); a rank-1 A is lora_a.reshape(1, -1)")
    rank = lora_a.shape[0]
    if lora_a.shape[1] != in_f:
        try:
            b_shape = tuple(_factor("lora_b", lora_b, "").shape)
        except NumloraError:  # B is bad too: the message is about A
            b_shape = None
        hint = _adapter_hint(tuple(lora_a.shape), b_shape, out_f, in_f, base, "lora_a")
        if hint.startswith("lora_a and lora_b look swapped"):
            rank = b_shape[0]
        raise ShapeError(f"expected lora_a of shape {(rank, in_f)}, got {tuple(lora_a.shape)}: {hint}")
    lora_b = _factor("lora_b", lora_b, ": B is (out_features, rank); a rank-1 B is lora_b.reshape(-1, 1)")
    if tuple(lora_b.shape) != (out_f, rank):
        hint = _adapter_hint(tuple(lora_a.shape), tuple(lora_b.shape), out_f, in_f, base, "lora_b")
        raise ShapeError(f"expected lora_b of shape {(out_f, rank)}, got {tuple(lora_b.shape)}: {hint}")
    return lora_a, lora_b, rank


def weight_array(weight, fan_in_fan_out, name="weight"):
    """A dense base weight: a 2-D float array (a 1-D one gets a hint)."""
    w = float_array(name, weight, None)
    if w.ndim != 2:
        layout = "(in_features, out_features) (fan_in_fan_out=True)" if fan_in_fan_out else \
            "(out_features, in_features)"
        hint = (": a 1-D array looks like a bias or a flattened weight; pass the 2-D weight, or "
                "reshape it to its (out_features, in_features)" if w.ndim == 1 else "")
        raise ShapeError(f"expected {name} to be 2-D, got shape {w.shape}: a Linear weight is a {layout} "
                         f"matrix{hint}")
    return w


def adapter_arrays(weight, lora_a, lora_b, fan_in_fan_out):
    """Validate weight, A, B; return (weight, A, B, out_features, in_features, rank).
    Shape errors say what is likely wrong (a transposed weight, A and B swapped, an
    adapter for another base) and how to fix it."""
    fan_in_fan_out = flag("fan_in_fan_out", fan_in_fan_out)
    weight = weight_array(weight, fan_in_fan_out)
    if fan_in_fan_out:
        in_f, out_f = weight.shape
    else:
        out_f, in_f = weight.shape
    lora_a, lora_b, rank = low_rank_arrays(lora_a, lora_b, out_f, in_f,
                                            base=Base("the weight", weight.shape, fan_in_fan_out))
    return weight, lora_a, lora_b, out_f, in_f, rank


def is_16bit(a) -> bool:
    """Whether ``a`` is a numpy array of float16 or bfloat16 (``ml_dtypes.bfloat16``)."""
    return isinstance(a, np.ndarray) and a.dtype.itemsize == 2 and (
        a.dtype == np.float16 or a.dtype.name == "bfloat16")


def input_rows(x, in_f, name="x", what="in_features"):
    """Validate a batch of row vectors: (width,) or (n, width), float, n may be 0. A
    float16 / bfloat16 batch (an input, never written) is widened to float32, exactly."""
    if type(x) is np.ndarray and (x.dtype is F32 or x.dtype is F64) and 0 < x.ndim < 3 and x.shape[-1] == in_f:
        return x  # the common case, without the general checks below
    if is_16bit(x):
        x = x.astype(np.float32)
    x = float_array(name, x, (1, 2), allow_empty=True)
    if x.shape[-1] != in_f:
        want = (in_f,) if x.ndim == 1 else (x.shape[0], in_f)
        raise ShapeError(f"expected {name} of shape {want} ({what} = {in_f}), got {x.shape}")
    return x


def bias_array(bias, out_f, dtype):
    if bias is None:
        return np.zeros(1, dtype), False
    bias = float_array("bias", bias, 1)
    expect_shape("bias", bias, (out_f,))
    return np.ascontiguousarray(bias, dtype), True


def prepare_out(out, x, out_f, dtype):
    shape = (out_f,) if x.ndim == 1 else (x.shape[0], out_f)
    if out is None:
        return np.empty(shape, dtype)
    return out_array("out", out, shape, dtype)


def private_out(out, inputs):
    """``(buffer, dest)``: the caller's ``out`` itself and None, or, when ``out`` shares
    memory with one of ``inputs`` (name -> array), a fresh buffer to compute into and the
    caller's ``out`` to copy it into at the end (so ``out=x`` or ``out=`` a view of the
    weight gives the right numbers; the extra buffer is only made then)."""
    if overlapping(out, inputs) is None:
        return out, None
    return np.empty(out.shape, out.dtype), out


def output(out, x, width, dtype, inputs):
    """``(out, dest)`` for a function writing ``width`` values per row of ``x``: a fresh
    array and None, or the caller's ``out``, checked, with :func:`private_out`'s answer
    when it shares memory with ``inputs`` (name -> array). Return :func:`deliver`
    ``(out, dest)`` at the end."""
    if out is None:
        return prepare_out(None, x, width, dtype), None
    return private_out(prepare_out(out, x, width, dtype), inputs)


def lora_input(x_lora, x, in_f, name="x_lora"):
    """The ``x_lora`` argument of a forward (the LoRA branch's input when it differs from
    x; a backward's ``x_drop``) checked against x; None stays None."""
    if x_lora is None:
        return None
    xl = input_rows(x_lora, in_f, name)
    if xl.shape != x.shape:
        raise ShapeError(f"expected {name} of shape {x.shape} (the shape of x), got {xl.shape}")
    return xl


def deliver(out, dest):
    if dest is None:
        return out
    dest[...] = out
    return dest

