"""A fix for a race in numba's CUDA simulator, for everything that runs GPU code on the
simulator: the GPU tests (tests/cuda_sim.py), the docs' GPU blocks (tests/docblocks.py)
and benchmarks/gpu_check.py's simulator mode. Test-only code, so it lives here and not in
the package; it imports nothing but numpy and numba, so scripts can use it without pytest
(put this folder on sys.path)."""

from __future__ import annotations

import sys

import numpy as np


def lock_simulator_shared_arrays():
    """Work around a race in the CUDA simulator: ``cuda.shared.array`` looks up the
    block's array for the calling line and creates it when missing, without a lock, so two
    simulated threads can each create one and then use different "shared" arrays (a rare,
    wrong result, more likely with the short switch interval used here). Same semantics,
    with a lock (and without the slow traceback walk)."""
    import threading

    from numba.cuda.simulator import kernelapi

    cls = kernelapi.FakeCUDAShared
    if getattr(cls, "_numlora_locked", False):
        return
    orig = cls.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0:  # dynamic shared memory: no per-line allocation
            return orig(self, shape, dtype)
        f = sys._getframe(1)
        caller = (f.f_code.co_filename, f.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                from numba.core import types
                from numba.np import numpy_support

                dt = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                res = np.empty(shape, dt)
                self._allocations[caller] = res
        return res

    cls.array = array
    cls._numlora_locked = True
