"""Whole-checkpoint jobs: ``numlora merge`` (merge_checkpoint) and ``numlora quantize``
(quantize_checkpoint) of a generated bf16 model folder: 4 Linear weights of
(N/2) x (N/2) plus a norm (N = 4096 unless NUMLORA_ASV_N says otherwise: 32 MiB of
weights), and a rank-16 PEFT adapter on two of them.

The files live in a temporary folder on ``/dev/shm`` where it exists (a RAM file system:
what is timed is numlora's reading, converting and writing, not the disk's mood), else in
the system's temporary folder. Every call replaces the previous output (``overwrite``).
"""

import os
import shutil
import tempfile

import numpy as np

import numlora
from numlora.convert import merge_checkpoint, quantize_checkpoint
from numlora.io.safetensors import save_file

from ._shared import RANK, N, rng

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _folder():
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="numlora-asv-io-", dir=root)


class Checkpoint:
    timeout = 300

    def setup(self):
        n = max(N // 2, 64)
        self.dir = _folder()
        base = os.path.join(self.dir, "base")
        os.makedirs(base)
        g = rng(50)
        tensors = {f"model.layers.0.self_attn.{m}.weight": g.standard_normal((n, n), dtype=np.float32) * 0.02
                   for m in MODULES}
        tensors["model.norm.weight"] = np.ones(n, np.float32)
        save_file(os.path.join(base, "model.safetensors"), tensors, {"format": "pt"},
                  {k: "BF16" for k in tensors})
        with open(os.path.join(base, "config.json"), "w") as f:
            f.write('{"model_type": "toy", "torch_dtype": "bfloat16"}')
        cfg = numlora.LoraConfig(rank=RANK, alpha=2 * RANK, target_modules=("q_proj", "v_proj"))
        ad = numlora.LoraAdapter(cfg)
        for m in ("q_proj", "v_proj"):
            a = g.standard_normal((RANK, n), dtype=np.float32) * np.float32(0.01)
            b = g.standard_normal((n, RANK), dtype=np.float32) * np.float32(0.01)
            ad.add_lora(f"model.layers.0.self_attn.{m}", a, b)
        self.base, self.adapter = base, os.path.join(self.dir, "adapter")
        ad.save_peft(self.adapter)
        self.merged, self.quantized = os.path.join(self.dir, "merged"), os.path.join(self.dir, "nf4")
        self.time_merge_checkpoint()
        self.time_quantize_checkpoint()

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def time_merge_checkpoint(self):
        merge_checkpoint(self.base, self.adapter, self.merged, overwrite=True, progress=False)

    def time_quantize_checkpoint(self):
        quantize_checkpoint(self.base, self.quantized, overwrite=True, progress=False)
