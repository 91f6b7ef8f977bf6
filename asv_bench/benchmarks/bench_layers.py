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


class LayerForwardSmall:
    """A small layer at batch 1 without ``out=`` (what a model of MiniLM-sized layers calls
    token by token): mostly the per-call cost, which the layers' eval fast path (straight
    to the products for a plain float32 input) keeps low."""

    params = ["LoraLinear", "QLoraLinear"]
    param_names = ["layer"]

    def setup(self, layer):
        n = 384
        g = np.random.default_rng(7)
        w = (g.standard_normal((n, n)) * 0.02).astype(np.float32)
        cls = numlora.LoraLinear if layer == "LoraLinear" else numlora.QLoraLinear
        self.layer = cls.from_weight(w, 16, 32.0)
        self.layer.lora_b = (g.standard_normal((n, 16)) * 0.02).astype(np.float32)
        self.x = g.standard_normal((1, n)).astype(np.float32)
        self.time_forward(layer)

    def time_forward(self, layer):
        self.layer.forward(self.x)


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
