"""All numba machinery in one place: how a numlora kernel is compiled."""

from __future__ import annotations

import warnings

import numba

from .. import _config

prange = numba.prange


def kernel(parallel: bool = False):
    """Decorate a kernel: lazy ``njit`` (compiled per signature on first call),
    ``parallel`` when asked and allowed, never fastmath, on-disk cache when possible."""

    def wrap(fn):
        par = parallel and _config.PARALLEL
        if _config.CACHE:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", numba.NumbaWarning)
                    return numba.njit(parallel=par, cache=True, nogil=True)(fn)
            except RuntimeError:
                # numba found no writable cache location (read-only install and no
                # usable NUMBA_CACHE_DIR): compile in memory instead.
                pass
        return numba.njit(parallel=par, cache=False, nogil=True)(fn)

    return wrap


def inline_helper(fn):
    """A small scalar helper called from kernels (inlined by LLVM, not cached alone)."""
    return numba.njit(inline="always", nogil=True)(fn)
