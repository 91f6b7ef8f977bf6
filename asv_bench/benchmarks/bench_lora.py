"""Dense LoRA kernels: lora_forward, merge_lora, unmerge_lora.

Shapes: an N x N float32 base weight (N = 4096 unless NUMLORA_ASV_N says otherwise)
with a rank-16 adapter. Every setup calls each benchmarked kernel once, so JIT
compilation (or loading numba's on-disk cache) is never timed.
"""

import numpy as np

import numlora

from ._shared import N, RANK, SCALING, activations, adapter, median_gbps, weight


class LoraForward:
    """``y = x W^T + scaling * (x A^T) B^T`` into a preallocated ``out``."""

    params = [1, 8, 128, 1024]
    param_names = ["batch"]

    def setup(self, batch):
        self.weight = weight(N)
        self.lora_a, self.lora_b = adapter(N, RANK)
        self.x = activations(batch, N)
        self.out = np.empty((batch, N), np.float32)
        numlora.lora_forward(self.x, self.weight, self.lora_a, self.lora_b, SCALING, out=self.out)

    def time_lora_forward(self, batch):
        numlora.lora_forward(self.x, self.weight, self.lora_a, self.lora_b, SCALING, out=self.out)


class LoraForwardBandwidth:
    """Achieved bandwidth of batch-1 lora_forward (a GEMV: bound by reading W)."""

    unit = "GB/s"

    def setup(self):
        self.weight = weight(N)
        self.lora_a, self.lora_b = adapter(N, RANK)
        self.x = activations(1, N)
        self.out = np.empty((1, N), np.float32)
        numlora.lora_forward(self.x, self.weight, self.lora_a, self.lora_b, SCALING, out=self.out)

    def track_lora_forward_batch1_gbps(self):
        """Weight bytes read (W, A and B) / median time per call."""
        nbytes = self.weight.nbytes + self.lora_a.nbytes + self.lora_b.nbytes

        def call():
            numlora.lora_forward(self.x, self.weight, self.lora_a, self.lora_b, SCALING, out=self.out)

        return median_gbps(call, nbytes)


class Merge:
    """In-place ``W += scaling * B A`` (plain and tracked) and the bit-exact
    merge + unmerge round trip.

    Each setup starts from a fresh copy of the base weight. Successive plain merges
    alternate the sign of ``scaling`` so that, however many calls asv makes per setup,
    the weight stays at W or W + dW instead of drifting (the work per call is the same
    for either sign).
    """

    def setup(self):
        self.base = weight(N)
        self.lora_a, self.lora_b = adapter(N, RANK)
        self.weight = self.base.copy()
        # Compile/load every kernel used below: merge_plain, merge_tracked, unmerge_tracked.
        numlora.merge_lora(self.weight, self.lora_a, self.lora_b, SCALING)
        rec = numlora.merge_lora(self.weight, self.lora_a, self.lora_b, -SCALING, record=True)
        numlora.unmerge_lora(self.weight, self.lora_a, self.lora_b, -SCALING, record=rec)
        np.copyto(self.weight, self.base)
        self.sign = 1.0

    def _scaling(self):
        s = SCALING * self.sign
        self.sign = -self.sign
        return s

    def time_merge_lora(self):
        numlora.merge_lora(self.weight, self.lora_a, self.lora_b, self._scaling())

    def time_merge_lora_record(self):
        """Tracked merge: also fills the MergeRecord (one byte per weight element)."""
        numlora.merge_lora(self.weight, self.lora_a, self.lora_b, self._scaling(), record=True)

    def time_merge_unmerge_cycle(self):
        """Tracked merge then unmerge with its record: the weight comes back bit for bit."""
        rec = numlora.merge_lora(self.weight, self.lora_a, self.lora_b, SCALING, record=True)
        numlora.unmerge_lora(self.weight, self.lora_a, self.lora_b, SCALING, record=rec)
