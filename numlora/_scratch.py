"""Per-thread scratch buffers reused from call to call.

A buffer of a few MiB made fresh in every call is fresh pages every time once the
allocator serves it with ``mmap``: on the small machines numlora targets that costs as
much in page faults as the work done in it (convolution columns), makes every other call
of a function slower than the one before (DoRA's float64 row chunks alternated 36 / 41
ms), or adds ~1 ms to a 1 ms product (the bf16 products' decoded rows; the NF4 products'
decoded tiles too). Each Python thread keeps at most one buffer per name, grown when a
call needs more; contents are not kept between calls, and a buffer is never handed to
two threads.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["free", "scratch"]

_LOCAL = threading.local()


def scratch(name: str, size: int, dtype) -> np.ndarray:
    """A 1-D array of ``size`` elements of ``dtype`` for the calling thread's use during
    one call (its start 64-byte aligned), shared by every call of this thread that asks
    for ``name``."""
    dtype = np.dtype(dtype)
    nbytes = size * dtype.itemsize
    buf = getattr(_LOCAL, name, None)
    if buf is None or buf.nbytes < nbytes + 64:
        buf = np.empty(nbytes + 64, np.uint8)
        setattr(_LOCAL, name, buf)
    off = -buf.ctypes.data % 64
    return buf[off:off + nbytes].view(dtype)


def free(*names: str) -> None:
    """Drop the calling thread's buffers of these names (all of them without names);
    they are made again by the next call that needs them."""
    if not names:
        _LOCAL.__dict__.clear()
        return
    for name in names:
        _LOCAL.__dict__.pop(name, None)
