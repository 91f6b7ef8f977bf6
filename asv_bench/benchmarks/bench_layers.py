"""The layer classes in inference: LoraLinear / QLoraLinear forward and LoraLinear's
bit-exact merge + unmerge (what serving code calls; the functional kernels under them are
in bench_lora / bench_nf4). N x N base (N = 4096 unless NUMLORA_ASV_N says otherwise),
rank 16, batch 8, preallocated outputs."""

import numpy as np

import numlora

from ._shared import SCALING, N, activations, adapter, fresh, nf4_weight, weight


class LayerForward:
    params = ["LoraLinear", "QLoraLinear"]
    param_names = ["layer"]

    def setup(self, layer):
        a, b = adapter(N)
        base = weight(N) if layer == "LoraLinear" else nf4_weight(N)
        cls = numlora.LoraLinear if layer == "LoraLinear" else numlora.QLoraLinear
        self.layer = cls(base, a, b, alpha=SCALING * a.shape[0])
        self.x = activations(8, N)
        self.y = np.empty((8, N), np.float32)
        self.time_forward(layer)

    def time_forward(self, layer):
        self.layer.forward(self.x, out=self.y)


class LayerMerge:
    """LoraLinear.merge() then unmerge(): the weight comes back bit for bit. Several calls
    per sample (``sample_time``): spread 9.4 % -> 2.4 % on a quiet 2-core machine."""

    sample_time = 0.05

    def setup(self):
        a, b = adapter(N)
        self.layer = numlora.LoraLinear(fresh(weight(N)), a, b, alpha=SCALING * a.shape[0])
        self.time_merge_unmerge()

    def time_merge_unmerge(self):
        self.layer.merge()
        self.layer.unmerge()
