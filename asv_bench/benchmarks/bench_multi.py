"""Many adapters in one batch: LoraBank.forward on Punica's workloads, LoraBank.add.

Shapes: an N x N base (float32 or NF4, N = 4096 unless NUMLORA_ASV_N says otherwise),
64 adapters with ranks drawn from {8, 16, 32, 64}, batch 1 / 16 / 64 / 256. Workloads:
``identical`` (every row adapter 0), ``distinct`` (row i: adapter i mod 64), ``uniform``,
``zipf`` (popularity (k + 1)^-1.5). The bank is built once per process (cached) and
every setup runs the benchmarked call once, so JIT compilation and the bank's one-time
calibration of the base product are never timed. ``benchmarks/bench_multi.py`` has the
full grid with the PEFT and numpy baselines (``numlora bench --multi``), and draws the
workloads for both.
"""

import functools

import numpy as np

import numlora

from ._shared import N, SCALING, activations, nf4_weight, reset_peak_rss, rng, weight

N_ADAPTERS = 64
RANKS = (8, 16, 32, 64)
WORKLOADS = ["identical", "distinct", "uniform", "zipf"]


def _adapter(k, n):
    g = rng(100 + k)
    r = int(g.choice(RANKS))
    a = g.standard_normal((r, n), dtype=np.float32) * np.float32(0.01)
    b = g.standard_normal((n, r), dtype=np.float32) * np.float32(0.01)
    return a, b


@functools.lru_cache(maxsize=None)
def bank(kind: str, n: int, n_ad: int = N_ADAPTERS):
    base = weight(n) if kind == "dense" else nf4_weight(n)
    b = numlora.LoraBank(base)
    for k in range(n_ad):
        b.add(f"a{k}", *_adapter(k, n), SCALING)
    return b


def workload(kind, batch, n_ad=N_ADAPTERS):
    """The rows' adapter ids, as ``numlora bench --multi`` draws them."""
    from numlora.bench_multi import workload as draw

    return draw(kind, batch, n_ad)


class MultiForward:
    """``LoraBank.forward(x, adapter_ids, out=out)``."""

    params = [["dense", "nf4"], [1, 16, 64, 256], WORKLOADS]
    param_names = ["base", "batch", "workload"]
    timeout = 600

    def setup(self, base, batch, kind):
        self.bank = bank(base, N)
        self.x = activations(batch, N)
        self.ids = workload(kind, batch)
        self.out = np.empty((batch, N), np.float32)
        self.bank.forward(self.x, self.ids, out=self.out)

    def time_forward(self, base, batch, kind):
        self.bank.forward(self.x, self.ids, out=self.out)


class MultiForwardMemory:
    """Peak memory added by one forward (batch 256, Zipf): padding buffers and the
    (n, rank) intermediate only; adapter weights are never gathered."""

    def setup(self):
        self.bank = bank("dense", N)
        self.x = activations(256, N)
        self.ids = workload("zipf", 256)
        self.out = np.empty((256, N), np.float32)
        self.bank.forward(self.x, self.ids, out=self.out)
        reset_peak_rss()

    def peakmem_forward_batch256_zipf(self):
        self.bank.forward(self.x, self.ids, out=self.out)


class BankAdd:
    """``LoraBank.add`` of one adapter into a bank already holding 512 (the issue asks for
    under 1 ms, independent of the bank's size), then ``remove`` (untimed) so every call
    does the same work in a pool with free pages."""

    timeout = 600

    def setup(self):
        self.bank = numlora.LoraBank(np.zeros((N, N), np.float32))
        g = rng(300)
        a = g.standard_normal((16, N), dtype=np.float32)  # 512 rank-16 adapters: 256 MiB at N = 4096
        b = g.standard_normal((N, 16), dtype=np.float32)
        self.bank.reserve(512 * 16 + 64)
        for k in range(512):
            self.bank.add(f"a{k}", a, b, SCALING)
        self.a, self.b = _adapter(1, N)
        self.bank.add("new", self.a, self.b, SCALING)
        self.bank.remove("new")

    def time_add_to_512(self):
        self.bank.add("new", self.a, self.b, SCALING)
        self.bank.remove("new")

    def track_pool_overhead(self):
        """Allocated pool bytes / bytes the live adapters need (1.0 = no waste)."""
        m = self.bank.memory()
        return m["pool"] / max(m["adapters"], 1)

    track_pool_overhead.unit = "ratio"
