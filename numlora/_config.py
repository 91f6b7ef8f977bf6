"""Every knob with several fair answers lives here, read once from the environment.

``NUMLORA_CACHE``
    ``1`` (default) compiles kernels with numba's on-disk cache, so a second process
    skips compilation. ``0`` turns the cache off. Where the install is read-only and no
    cache directory can be written, numlora falls back quietly to compiling in memory.
    numba's own ``NUMBA_CACHE_DIR`` chooses where the cache lives. An edit to any file
    of ``numlora/kernels`` makes every cached kernel stale (numba alone would see only
    an edit to the kernel's own file, not to a helper or intrinsic it calls).
``NUMLORA_PARALLEL``
    ``1`` (default) compiles the kernels that have parallel work with
    ``parallel=True``; ``0`` compiles them serial. The number of threads is numba's
    (``NUMBA_NUM_THREADS`` or ``numba.set_num_threads``). Results never depend on it.

``NUMLORA_SMALL_SERIAL``
    ``1`` (default) runs a parallel kernel's serial build when its work is too small to
    pay for waking numba's threads (50-75 us on a 2-core machine: a 384 x 384 NF4 product
    at batch 1 took 103 us on two threads, 28 us on one); the thresholds, per kernel
    family, are measured (``benchmarks/bench_small_work.py``) and set in
    ``numlora.kernels._jit``. ``0`` always runs the parallel
    build (numlora's test suite does, so that the parallel builds stay tested on small
    inputs). Results never depend on it.

``NUMLORA_PARK_BLAS``
    ``1`` (default) lets numlora send OpenBLAS's spinning worker threads to sleep right
    before a large parallel kernel (from any thread; the spin comes back when the kernel
    returns): after a BLAS
    call those threads spin for up to ~0.1 s and hold a core, so the next numlora kernel
    ran at one thread's speed (see docs/performance.md). Their spin timeout is shortened
    until the kernel returns (``numlora.kernels._blas``); the threads stay alive and the
    next BLAS call wakes them. ``0`` never touches them.

``NUMLORA_STEER_WORKERS``
    ``1`` (default) keeps numba's sleeping OpenMP workers off the core of the thread that
    calls numlora's parallel kernels (their affinity set to the caller's other cores,
    again whenever the caller moves): on the 2-vCPU development VM, whose guest scheduler
    packs threads onto fewer vCPUs, a kernel after a pause otherwise woke the worker on the
    caller's vCPU and ran at one thread's speed (``numlora.kernels._steer``,
    docs/performance.md). Only for the threads numlora started, never with OpenMP affinity
    variables set; ``0`` never touches any thread's affinity. Results never depend on it.

``NUMLORA_SIMD``
    ``1`` (default) decodes NF4 with AVX-512 / AVX2 permutes where the CPU has them (see
    ``numlora.kernels._simd``); ``0`` uses the portable kernels everywhere; ``8`` caps the
    vector width at AVX2's 8 lanes (to test that path on an AVX-512 machine).

``NUMLORA_WORDS8``
    How the 8-lane (AVX2) word decode of the NF4 products looks nibbles up: ``planes``
    (in-lane byte shuffles, the default on AMD Zen cores) or ``permute`` (two ``vpermps``
    and a blend per vector, the default elsewhere). The same bits either way.

fastmath is never enabled: it would let the compiler reorder floating-point sums and
break the bit-exact guarantees (NF4 codes, bit-exact unmerge).
"""

from __future__ import annotations

import os


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


CACHE: bool = _flag("NUMLORA_CACHE", True)
PARALLEL: bool = _flag("NUMLORA_PARALLEL", True)
PARK_BLAS: bool = _flag("NUMLORA_PARK_BLAS", True)
SMALL_SERIAL: bool = _flag("NUMLORA_SMALL_SERIAL", True)
STEER_WORKERS: bool = _flag("NUMLORA_STEER_WORKERS", True)
SIMD: bool = _flag("NUMLORA_SIMD", True)
SIMD_MAX_LANES: int = 8 if os.environ.get("NUMLORA_SIMD", "").strip() == "8" else 16
WORDS8: str = os.environ.get("NUMLORA_WORDS8", "").strip().lower()
