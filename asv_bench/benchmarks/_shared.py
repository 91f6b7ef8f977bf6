"""Helpers shared by the benchmark modules (no benchmarks here).

Sizes
-----
``N`` is the weight's side (``N x N`` float32, the issue's 4096 x 4096) and ``RANK``
the LoRA rank (16). ``NUMLORA_ASV_N`` lowers ``N`` for smoke runs, e.g.
``NUMLORA_ASV_N=256 asv run -E existing --quick``. asv does not record ``N`` in a
benchmark's identity, so results taken with a lowered ``N`` must never be saved next to
full ones: ``-E existing`` runs are not saved (unless ``--set-commit-hash``) and
``asv run --dry-run`` saves nothing, but ``--quick`` alone *is* saved by asv 0.6.

Inputs
------
Every array comes from ``numpy.random.default_rng`` with a fixed seed, so each process
benchmarks the same data. asv re-runs ``setup`` before every timed sample (asv_runner
0.3.2 even before every timed call), so the large inputs are built once per process
(``functools.lru_cache``) and only handed out by ``setup``; benchmarks must treat them
as read-only and copy what they modify (see ``bench_lora.Merge``).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time

import numpy as np

#: Side of the square base weight. Lower it with NUMLORA_ASV_N for quick runs.
N = int(os.environ.get("NUMLORA_ASV_N", "4096"))
#: LoRA rank.
RANK = 16
#: LoRA scaling (alpha / r); its value does not change the work done.
SCALING = 2.0
#: NF4 block size (bitsandbytes' default).
BLOCKSIZE = 64
#: Seed of every numpy Generator used for inputs.
SEED = 20240601


def rng(stream: int = 0) -> np.random.Generator:
    """A Generator with the fixed seed; ``stream`` picks an independent sequence."""
    return np.random.default_rng([SEED, stream])


@functools.lru_cache(maxsize=None)
def weight(n: int) -> np.ndarray:
    """(n, n) float32 base weight, ~N(0, 0.02^2) like an initialized linear layer."""
    w = rng(1).standard_normal((n, n), dtype=np.float32)
    w *= np.float32(0.02)
    return w


@functools.lru_cache(maxsize=None)
def adapter(n: int, rank: int = RANK) -> tuple[np.ndarray, np.ndarray]:
    """(lora_a (rank, n), lora_b (n, rank)) float32, both nonzero (a trained adapter;
    PEFT's zero-initialized B would make the tracked merge trivially exact)."""
    g = rng(2)
    a = g.standard_normal((rank, n), dtype=np.float32) * np.float32(0.01)
    b = g.standard_normal((n, rank), dtype=np.float32) * np.float32(0.01)
    return a, b


@functools.lru_cache(maxsize=None)
def activations(batch: int, n: int) -> np.ndarray:
    """(batch, n) float32 input rows."""
    return rng(3).standard_normal((batch, n), dtype=np.float32)


@functools.lru_cache(maxsize=None)
def nf4_weight(n: int, double_quant: bool = False):
    """``weight(n)`` quantized to NF4 (compiles quantize_nf4 on first use)."""
    import numlora

    return numlora.quantize_nf4(weight(n), blocksize=BLOCKSIZE, double_quant=double_quant)


def random_nf4(n: int):
    """An (n, n) NF4Tensor built straight from random codes and scales: no float32
    weight is ever allocated (for peak-memory benchmarks). Not cached."""
    import numlora

    g = rng(4)
    packed = g.integers(0, 256, size=(n * n + 1) // 2, dtype=np.uint8)
    absmax = g.uniform(0.01, 0.1, size=-(-(n * n) // BLOCKSIZE)).astype(np.float32)
    return numlora.NF4Tensor(packed, absmax, (n, n), BLOCKSIZE)


def median_gbps(fn, nbytes: int, repeats: int = 7, min_sample_s: float = 0.02) -> float:
    """Achieved GB/s (1e9 bytes/s) of ``fn``: ``nbytes / median seconds per call``.

    ``fn`` is called once untimed, then ``repeats`` samples are timed with
    ``time.perf_counter``; each sample calls ``fn`` enough times to last about
    ``min_sample_s`` (so small N still gives readable numbers) and is divided by that
    count.
    """
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    number = max(1, math.ceil(min_sample_s / max(once, 1e-9)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number)
    return nbytes / statistics.median(samples) / 1e9


def reset_peak_rss() -> None:
    """Reset this process's peak-RSS high-water mark to its current RSS (Linux >= 4.0,
    ``/proc/self/clear_refs``), so that a ``peakmem_`` benchmark, which asv measures as
    the whole process's ``ru_maxrss``, reports the resident baseline plus what the
    benchmarked call allocates, not the setup's transient peaks (input generation, JIT
    compilation). Where that is unavailable it does nothing and the number also holds
    the setup's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
