"""Input checks shared by the functional layer. Every message says what was expected
and what arrived."""

from __future__ import annotations

import numbers
import operator

import numpy as np

from .errors import ConfigError, DTypeError, NonFiniteError, ShapeError

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
F32_MAX = float(np.finfo(np.float32).max)


def float_array(name: str, a, ndims=None, *, allow_empty: bool = False) -> np.ndarray:
    """Return ``a`` as a float32 / float64 ndarray (no copy when it already is one);
    refuse other dtypes, the wrong number of dimensions and (by default) empty arrays."""
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


def expect_shape(name: str, a: np.ndarray, shape: tuple) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ShapeError(f"expected {name} of shape {tuple(shape)}, got {tuple(a.shape)}")


def real_scalar(name: str, value, *, positive: bool = False) -> float:
    """``value`` as a Python float. The one rule for every scalar numlora computes with:
    a real number (not a bool) that is finite *in float32*, the compute type, so that a
    finite 1e39 cannot turn into inf inside a kernel."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise DTypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        v = float(value)
    except (OverflowError, ValueError):  # an int too large for a float
        raise ConfigError(f"{name} must be finite in float32 (|{name}| <= {F32_MAX:.8g}), got an integer of {len(str(abs(int(value))))} digits") from None
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


def shares_memory(a, b) -> bool:
    """Whether numpy arrays ``a`` and ``b`` have an element in common.

    ``np.may_share_memory`` (a comparison of the memory bounds, ~0.2 us) first, so arrays
    that do not overlap cost nothing more; then the exact ``np.shares_memory`` with a
    bounded amount of work (interleaved views of one buffer, such as ``w[:, ::2]`` and
    ``w[:, 1::2]``, do not share). Anything that is not a numpy array (None, a GPU array)
    shares nothing."""
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return False
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=_OVERLAP_WORK))
    except _TooHard:  # undecided within the bound
        return True


def overlapping(out, arrays: dict):
    """The name of the first array of ``arrays`` (name -> array or None) that shares
    memory with ``out``, or None. About 0.2 us per array when nothing overlaps."""
    if not isinstance(out, np.ndarray):
        return None
    may = np.may_share_memory
    ndarray = np.ndarray
    for name, a in arrays.items():
        if isinstance(a, ndarray) and may(out, a) and shares_memory(out, a):
            return name
    return None


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
