"""All numba machinery in one place: how a numlora kernel is compiled."""

from __future__ import annotations

import warnings

import numba

from .. import _config

prange = numba.prange


def kernel(parallel: bool = False, cache: bool = True):
    """Decorate a kernel: lazy ``njit`` (compiled per signature on first call),
    ``parallel`` when asked and allowed, never fastmath, on-disk cache when possible
    (``cache=False`` for kernels whose code depends on a setting numba's cache key does
    not see)."""

    def wrap(fn):
        return _compile(fn, parallel and _config.PARALLEL, cache=cache)

    return wrap


def serial_twin(dispatcher):
    """The same kernel compiled without ``parallel``: for small work called right after
    a BLAS call, where waking numba's threads while OpenBLAS's threads still spin costs
    more than the work itself.

    Not cached on disk: numba's cache index does not tell a parallel build of a function
    from a serial one, so the twin would share (and clash with) the original's entries."""
    return _compile(getattr(dispatcher, "py_func", dispatcher), False, cache=False)


def _compile(fn, par, cache=True):
    if cache and _config.CACHE:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", numba.NumbaWarning)
                return numba.njit(parallel=par, cache=True, nogil=True)(fn)
        except RuntimeError:
            # numba found no writable cache location (read-only install and no
            # usable NUMBA_CACHE_DIR): compile in memory instead.
            pass
    return numba.njit(parallel=par, cache=False, nogil=True)(fn)


def inline_helper(fn):
    """A small scalar helper called from kernels (inlined by LLVM, not cached alone)."""
    return numba.njit(inline="always", nogil=True)(fn)
