"""The one input builder of every numlora benchmark: ``numlora bench`` (dense, NF4,
``--train``, ``--multi``), ``benchmarks/`` and the asv suite (``asv_bench/``) draw their
weights, adapters, activations and LoraBank workloads here, so the same name means the
same bytes everywhere.

Every array comes from ``numpy.random.default_rng([SEED, stream])``: fixed data, one
independent stream per kind of input. Builders of large arrays are cached per process
(``functools.lru_cache``); callers must treat cached arrays as read-only and copy what
they modify.
"""

from __future__ import annotations

import functools

import numpy as np

#: Seed of every Generator used for benchmark inputs.
SEED = 20240601
#: LoRA rank of the single-adapter benchmarks.
RANK = 16
#: LoRA scaling (alpha / r) of every benchmark; its value does not change the work done.
SCALING = 2.0
#: NF4 block size (bitsandbytes' default).
BLOCKSIZE = 64
#: Ranks the adapters of a LoraBank benchmark are drawn from (Punica's mix).
BANK_RANKS = (8, 16, 32, 64)
#: LoraBank workloads (Punica): which adapter each row of a batch uses.
WORKLOADS = ("identical", "distinct", "uniform", "zipf")


def rng(stream: int = 0) -> np.random.Generator:
    """A Generator with the fixed seed; ``stream`` picks an independent sequence."""
    return np.random.default_rng([SEED, stream])


@functools.lru_cache(maxsize=None)
def weight(out_f: int, in_f: int | None = None, dtype=np.float32) -> np.ndarray:
    """(out_f, in_f) base weight ~ N(0, 0.02^2), like an initialised linear layer."""
    in_f = out_f if in_f is None else in_f
    w = rng(1).standard_normal((out_f, in_f), dtype=np.float32)
    w *= np.float32(0.02)
    return w.astype(dtype, copy=False)


@functools.lru_cache(maxsize=None)
def adapter(out_f: int, in_f: int | None = None, rank: int = RANK, dtype=np.float32):
    """(lora_a (rank, in_f), lora_b (out_f, rank)) ~ N(0, 0.01^2), both nonzero (a trained
    adapter: PEFT's zero B would make merges trivially exact)."""
    in_f = out_f if in_f is None else in_f
    g = rng(2)
    a = g.standard_normal((rank, in_f), dtype=np.float32) * np.float32(0.01)
    b = g.standard_normal((out_f, rank), dtype=np.float32) * np.float32(0.01)
    return a.astype(dtype, copy=False), b.astype(dtype, copy=False)


@functools.lru_cache(maxsize=None)
def activations(batch: int, n: int, dtype=np.float32, stream: int = 3) -> np.ndarray:
    """(batch, n) input rows ~ N(0, 1)."""
    return rng(stream).standard_normal((batch, n), dtype=np.float32).astype(dtype, copy=False)


@functools.lru_cache(maxsize=None)
def nf4_weight(out_f: int, in_f: int | None = None, double_quant: bool = False, blocksize: int = BLOCKSIZE):
    """``weight(out_f, in_f)`` quantized to NF4 (compiles quantize_nf4 on first use)."""
    import numlora

    return numlora.quantize_nf4(weight(out_f, in_f), blocksize=blocksize, double_quant=double_quant)


def random_nf4(n: int, blocksize: int = BLOCKSIZE):
    """An (n, n) NF4Tensor built straight from random codes and scales: no float32 weight
    is ever allocated (for peak-memory benchmarks). Not cached."""
    import numlora

    g = rng(4)
    packed = g.integers(0, 256, size=(n * n + 1) // 2, dtype=np.uint8)
    absmax = g.uniform(0.01, 0.1, size=-(-(n * n) // blocksize)).astype(np.float32)
    return numlora.NF4Tensor(packed, absmax, (n, n), blocksize)


def bank_adapter(k: int, side: int):
    """The k-th adapter of a LoraBank benchmark: rank drawn from ``BANK_RANKS``, A and B
    ~ N(0, 0.01^2), for a ``side x side`` base."""
    g = np.random.default_rng([6, k])
    r = int(g.choice(BANK_RANKS))
    a = g.standard_normal((r, side), dtype=np.float32) * np.float32(0.01)
    b = g.standard_normal((side, r), dtype=np.float32) * np.float32(0.01)
    return a, b


def workload(kind: str, batch: int, n_ad: int) -> np.ndarray:
    """The rows' adapter ids (int64) of a Punica workload: ``identical`` (all adapter 0),
    ``distinct`` (row i: adapter i mod n_ad), ``uniform``, ``zipf`` (popularity
    (k + 1)^-1.5), or ``base`` (all -1: the base product alone)."""
    g = np.random.default_rng([61, batch, n_ad, WORKLOADS.index(kind) if kind in WORKLOADS else 9])
    if kind == "base":
        return -np.ones(batch, np.int64)
    if kind == "identical":
        return np.zeros(batch, np.int64)
    if kind == "distinct":
        return np.arange(batch, dtype=np.int64) % n_ad
    if kind == "uniform":
        return g.integers(0, n_ad, batch).astype(np.int64)
    p = (np.arange(n_ad) + 1.0) ** -1.5
    return g.choice(n_ad, batch, p=p / p.sum()).astype(np.int64)
