"""Helpers shared by the benchmark modules (no benchmarks here).

Identity of a result
--------------------
A timing means something only with its shape and its thread counts, so both are part
of every result's identity: ``asv.conf.json`` sets ``NUMLORA_ASV_N`` (the weight's side,
4096) and the thread counts (``NUMBA_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``: 1) in its ``env_nobuild`` matrix, and asv names
each environment (and files its results) by those values. A run at another N or thread
count is a different environment and is never compared with these. ``-E existing`` runs
take the variables from the shell: ``asv_bench/regress.sh`` and the README's commands set
them.

Inputs
------
Every array comes from :mod:`numlora.bench.inputs`, the one input builder that
``numlora bench`` uses too (fixed seeds; large arrays cached per process). asv re-runs
``setup`` before every sample, so setups only hand out cached inputs; benchmarks must treat
them as read-only and copy what they modify.
"""

from __future__ import annotations

import os

import numpy as np

from numlora.bench.inputs import (  # noqa: F401  (re-exported to the benchmark modules)
    BLOCKSIZE,
    RANK,
    SCALING,
    activations,
    adapter,
    bank_adapter,
    nf4_weight,
    random_nf4,
    rng,
    weight,
    workload,
)

#: Side of the square base weight (part of the result's identity through asv.conf.json).
N = int(os.environ.get("NUMLORA_ASV_N", "4096"))


def reset_peak_rss() -> None:
    """Reset this process's peak-RSS high-water mark to its current RSS (Linux,
    ``/proc/self/clear_refs``), so that a ``peakmem_`` benchmark, which asv measures as
    the whole process's ``ru_maxrss``, reports the resident baseline plus what the
    benchmarked call allocates, not the setup's transient peaks. Elsewhere it does
    nothing and the number also holds the setup's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def require_gpu() -> None:
    """Skip the calling benchmark (asv: ``NotImplementedError`` in ``setup``) unless
    numba.cuda sees a real GPU (the simulator does not count: its timings mean nothing)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        raise NotImplementedError("CUDA simulator: GPU timings need a real GPU")
    try:
        from numba import cuda

        ok = cuda.is_available()
    except Exception:  # numba-cuda missing or no driver
        ok = False
    if not ok:
        raise NotImplementedError("no CUDA GPU")


def fresh(a: np.ndarray) -> np.ndarray:
    """A private copy of a cached input, for benchmarks that modify it."""
    return np.array(a, copy=True)
