"""Dense LoRA: lora_forward (every layout and dtype), linear_forward, merge_lora /
unmerge_lora, DoRA, combine_adapters.

Shapes: an N x N base weight (N = 4096 unless NUMLORA_ASV_N says otherwise), a rank-16
adapter. Every setup calls the benchmarked kernel once with the same shapes and dtypes
(the same specialisation), so JIT compilation is never timed; outputs go to
preallocated ``out=`` buffers (a fresh 64 MiB array costs page faults, not kernel time).
"""

import numpy as np

import numlora

from ._shared import RANK, SCALING, N, activations, adapter, fresh, rng, weight


class LoraForward:
    """``y = x W^T + scaling * (x A^T) B^T`` into a preallocated ``out``, float32."""

    params = [1, 8, 128, 1024]
    param_names = ["batch"]

    def setup(self, batch):
        self.w = weight(N)
        self.a, self.b = adapter(N)
        self.x = activations(batch, N)
        self.out = np.empty((batch, N), np.float32)
        self.time_lora_forward(batch)

    def time_lora_forward(self, batch):
        numlora.lora_forward(self.x, self.w, self.a, self.b, SCALING, out=self.out)


class LoraForwardVariants:
    """The other paths of lora_forward at batch 8: a bias, a weight stored (in, out)
    (``fan_in_fan_out``, GPT-2's Conv1D) and float64 throughout."""

    params = ["bias", "fan_in_fan_out", "float64"]
    param_names = ["variant"]

    def setup(self, variant):
        dt = np.float64 if variant == "float64" else np.float32
        self.w = weight(N, dtype=dt)
        if variant == "fan_in_fan_out":
            self.w = np.ascontiguousarray(self.w.T)
        self.a, self.b = adapter(N, dtype=dt)
        self.x = activations(8, N, dtype=dt)
        self.bias = activations(1, N, dtype=dt)[0] if variant == "bias" else None
        self.fifo = variant == "fan_in_fan_out"
        self.out = np.empty((8, N), dt)
        self.time_lora_forward(variant)

    def time_lora_forward(self, variant):
        numlora.lora_forward(self.x, self.w, self.a, self.b, SCALING, self.bias, out=self.out,
                             fan_in_fan_out=self.fifo)


class LinearForward:
    """``y = x W^T + b`` (the base alone) at batch 8."""

    def setup(self):
        self.w = weight(N)
        self.x = activations(8, N)
        self.bias = activations(1, N)[0]
        self.out = np.empty((8, N), np.float32)
        self.time_linear_forward()

    def time_linear_forward(self):
        numlora.linear_forward(self.x, self.w, self.bias, out=self.out)


class Merge:
    """In-place ``W += scaling * B A`` and the bit-exact merge + unmerge round trip.

    Each setup starts from a private copy of the base weight. Successive plain merges
    alternate the sign of ``scaling``, so however many calls asv makes the weight stays at
    W or W + dW (the work per call is the same for either sign).

    ``sample_time``: several calls per sample (asv's default 10 ms gives one), which took
    the plain merge's spread from 21 % to 0.3 % on a quiet 2-core machine."""

    sample_time = 0.05

    def setup(self):
        self.w = fresh(weight(N))
        self.a, self.b = adapter(N)
        self.sign = 1.0
        self.time_merge_lora()
        self.time_merge_lora()
        self.record = numlora.merge_lora(self.w, self.a, self.b, SCALING, record=True)
        numlora.unmerge_lora(self.w, self.a, self.b, SCALING, record=self.record)
        self.time_merge_unmerge_cycle()

    def time_merge_lora(self):
        self.sign = -self.sign
        numlora.merge_lora(self.w, self.a, self.b, SCALING * self.sign)

    def time_merge_unmerge_cycle(self):
        """Tracked merge then unmerge with one record refilled call after call
        (``merge_lora(record=<used record>)``; a fresh 16 MiB record per call timed its
        page faults too: the first round's samples 8 % above the others'; LayerMerge
        times the layer, which makes a new record per merge): the weight comes back bit
        for bit."""
        numlora.merge_lora(self.w, self.a, self.b, SCALING, record=self.record)
        numlora.unmerge_lora(self.w, self.a, self.b, SCALING, record=self.record)


class Dora:
    """DoRA: the column norms of W + s B A, and the forward at batch 8."""

    def setup(self):
        self.w = weight(N)
        self.a, self.b = adapter(N)
        self.m = numlora.dora_weight_norm(self.w, self.a, self.b, SCALING)
        self.x = activations(8, N)
        self.out = np.empty((8, N), np.float32)
        self.time_dora_weight_norm()
        self.time_dora_forward()

    def time_dora_weight_norm(self):
        numlora.dora_weight_norm(self.w, self.a, self.b, SCALING)

    def time_dora_forward(self):
        numlora.dora_forward(self.x, self.w, self.a, self.b, SCALING, self.m, out=self.out)


class Combine:
    """combine_adapters of four rank-16 adapters given as ``(A, B, scaling)``:
    concatenation (``cat``) and the rank-16 re-factorisation (``svd``: QR of the stacked
    factors and an SVD of the small core; the N x N delta is never formed)."""

    params = ["cat", "svd"]
    param_names = ["method"]

    def setup(self, method):
        self.adapters = []
        for k in range(4):
            g = rng(40 + k)
            a = g.standard_normal((RANK, N), dtype=np.float32) * np.float32(0.01)
            b = g.standard_normal((N, RANK), dtype=np.float32) * np.float32(0.01)
            self.adapters.append((a, b, SCALING))
        self.weights = [1.0, 0.5, 0.25, 0.25]
        self.rank = RANK if method == "svd" else None
        self.time_combine_adapters(method)

    def time_combine_adapters(self, method):
        numlora.combine_adapters(self.adapters, self.weights, method=method, rank=self.rank)
