"""Many adapters in one batch: LoraBank.forward on Punica's workloads, LoraBank.add.

Shapes: an N x N base (float32 or NF4, N = 4096 unless NUMLORA_ASV_N says otherwise),
64 adapters with ranks drawn from {8, 16, 32, 64}. Two workloads bracket the cases
(``zipf``: a few popular adapters; ``distinct``: every row its own adapter) at batch 1,
37 (between the row-stable base's buckets: padded to 64 over BLAS, as it comes over the
NF4 panels) and 64; ``numlora bench --multi`` has the whole grid (four workloads, batch 1 to 256,
8 to 512 adapters) with the numpy and PEFT baselines. Adapters and workloads come from
:mod:`numlora.bench.inputs`, as there. The bank is built once per process and every
setup runs the benchmarked call once, so JIT compilation and the bank's one-time
calibration of the base product are never timed.
"""

import functools

import numpy as np

import numlora

from ._shared import SCALING, N, activations, bank_adapter, nf4_weight, reset_peak_rss, rng, weight, workload

N_ADAPTERS = 64


@functools.lru_cache(maxsize=None)
def bank(kind: str, n: int, n_ad: int = N_ADAPTERS):
    base = weight(n) if kind == "dense" else nf4_weight(n)
    b = numlora.LoraBank(base)
    for k in range(n_ad):
        b.add(f"a{k}", *bank_adapter(k, n), SCALING)
    return b


class MultiForward:
    """``LoraBank.forward(x, adapter_ids, out=out)``."""

    params = [["dense", "nf4"], [1, 37, 64], ["zipf", "distinct"]]
    param_names = ["base", "batch", "workload"]
    timeout = 300

    def setup(self, base, batch, kind):
        self.bank = bank(base, N)
        self.x = activations(batch, N)
        self.ids = workload(kind, batch, N_ADAPTERS)
        self.out = np.empty((batch, N), np.float32)
        self.time_forward(base, batch, kind)

    def time_forward(self, base, batch, kind):
        self.bank.forward(self.x, self.ids, out=self.out)


class MultiForwardMemory:
    """Peak memory added by one forward (batch 256, Zipf): padding buffers and the
    (n, rank) intermediate only; adapter weights are never gathered."""

    def setup(self):
        self.bank = bank("dense", N)
        self.x = activations(256, N)
        self.ids = workload("zipf", 256, N_ADAPTERS)
        self.out = np.empty((256, N), np.float32)
        self.bank.forward(self.x, self.ids, out=self.out)
        reset_peak_rss()

    def peakmem_forward_batch256_zipf(self):
        self.bank.forward(self.x, self.ids, out=self.out)


class BankAdd:
    """``LoraBank.add`` of one adapter into a bank already holding 512 (must not depend on
    the bank's size), then ``remove``, so every call does the same work in a pool with
    free pages."""

    timeout = 300

    def setup(self):
        self.bank = numlora.LoraBank(np.zeros((N, N), np.float32))
        g = rng(300)
        a = g.standard_normal((16, N), dtype=np.float32)  # 512 rank-16 adapters: 256 MiB at N = 4096
        b = g.standard_normal((N, 16), dtype=np.float32)
        self.bank.reserve(512 * 16 + 64)
        for k in range(512):
            self.bank.add(f"a{k}", a, b, SCALING)
        self.a, self.b = bank_adapter(1, N)
        self.time_add_remove()

    def time_add_remove(self):
        self.bank.add("new", self.a, self.b, SCALING)
        self.bank.remove("new")
