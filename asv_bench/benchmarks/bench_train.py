"""Training: lora_backward, qlora_backward, lora_dropout, AdamW, and a whole training step
of the layer classes (forward in training mode + backward + AdamW).

Shapes: an N x N base (float32 or NF4, N = 4096 unless NUMLORA_ASV_N says otherwise), a
rank-16 adapter, batches 8 and 128. The gradients of A and B are accumulated into
preallocated buffers that the setup allocated (``grad_a=`` / ``grad_b=``), so the timings
hold no allocation of them; every setup runs the benchmarked call once.
"""

import numpy as np

import numlora

from ._shared import SCALING, N, activations, adapter, fresh, nf4_weight, weight


class Backward:
    """Gradients of x, A and B through a dense (lora_backward) or NF4 (qlora_backward) base."""

    params = [["dense", "nf4"], [8, 128]]
    param_names = ["base", "batch"]

    def setup(self, base, batch):
        self.w = weight(N) if base == "dense" else nf4_weight(N)
        self.fn = numlora.lora_backward if base == "dense" else numlora.qlora_backward
        self.a, self.b = adapter(N)
        self.x = activations(batch, N)
        self.g = activations(batch, N, stream=5)
        self.ga, self.gb = np.zeros_like(self.a), np.zeros_like(self.b)
        self.time_backward(base, batch)

    def time_backward(self, base, batch):
        self.fn(self.x, self.w, self.a, self.b, SCALING, self.g, grad_a=self.ga, grad_b=self.gb)


class Dropout:
    """lora_dropout(p=0.1) of a (128, N) activation into a preallocated ``out``: the
    seeded per-row xorshift64 masks."""

    def setup(self):
        self.x = activations(128, N)
        self.out = np.empty_like(self.x)
        self.time_lora_dropout()

    def time_lora_dropout(self):
        numlora.lora_dropout(self.x, 0.1, 1234, out=self.out)


class AdamWStep:
    """One AdamW step over a rank-16 adapter's A and B (2 * 16 * N values)."""

    def setup(self):
        a, b = adapter(N)
        self.params = [numlora.Parameter(fresh(a), grad=fresh(a) * np.float32(0.1), name="lora_a"),
                       numlora.Parameter(fresh(b), grad=fresh(b) * np.float32(0.1), name="lora_b")]
        self.opt = numlora.AdamW(self.params, lr=1e-4, weight_decay=0.01)
        self.time_adamw_step()

    def time_adamw_step(self):
        self.opt.step()


class LayerTrainStep:
    """One training step of a layer: forward in training mode, backward (gradients of x, A
    and B) and an AdamW step, as a training loop calls them. The step changes A and B a
    little each time (the work does not depend on their values)."""

    params = [["LoraLinear", "QLoraLinear"], [8, 128]]
    param_names = ["layer", "batch"]

    def setup(self, layer, batch):
        a, b = adapter(N)
        if layer == "LoraLinear":
            self.layer = numlora.LoraLinear(weight(N), fresh(a), fresh(b), alpha=SCALING * a.shape[0])
        else:
            self.layer = numlora.QLoraLinear(nf4_weight(N), fresh(a), fresh(b), alpha=SCALING * a.shape[0])
        self.layer.train()
        self.opt = numlora.AdamW(self.layer.parameters(), lr=1e-5)
        self.x = activations(batch, N)
        self.g = activations(batch, N, stream=5)
        self.y = np.empty((batch, N), np.float32)
        self.time_train_step(layer, batch)

    def time_train_step(self, layer, batch):
        self.opt.zero_grad()
        self.layer.forward(self.x, out=self.y)
        self.layer.backward(self.g)
        self.opt.step()
