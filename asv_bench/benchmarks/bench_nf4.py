"""NF4 / QLoRA kernels: quantize_nf4, dequantize_nf4, qlora_forward, nf4_matmul (also in
the 16-bit compute dtypes), nf4_matmul_t; the GEMV and nf4_matmul_t through weights read
from main memory.

Shapes: an N x N float32 weight (N = 4096 unless NUMLORA_ASV_N says otherwise),
blocksize 64, a rank-16 adapter. Every setup calls each benchmarked kernel once (with
the same shapes, so the same specialization), so JIT compilation is never timed.
"""

import numpy as np

import numlora

from ._shared import (
    BLOCKSIZE,
    SCALING,
    N,
    activations,
    adapter,
    nf4_weight,
    random_nf4,
    reset_peak_rss,
    weight,
)


class Quantize:
    """float32 weight -> NF4 (codes + block scales; optionally 8-bit scales)."""

    params = [False, True]
    param_names = ["double_quant"]

    def setup(self, double_quant):
        self.weight = weight(N)
        numlora.quantize_nf4(self.weight, blocksize=BLOCKSIZE, double_quant=double_quant)

    def time_quantize_nf4(self, double_quant):
        numlora.quantize_nf4(self.weight, blocksize=BLOCKSIZE, double_quant=double_quant)


class Dequantize:
    """NF4 -> float32 into a preallocated ``out``."""

    def setup(self):
        self.t = nf4_weight(N)
        self.out = np.empty((N, N), np.float32)
        numlora.dequantize_nf4(self.t, out=self.out)

    def time_dequantize_nf4(self):
        numlora.dequantize_nf4(self.t, out=self.out)


class QloraForward:
    """``x deq(W)^T`` (nf4_matmul) and ``+ scaling * (x A^T) B^T`` (qlora_forward) into a
    preallocated ``out``. Batches up to 16 run the fused kernels (batch 1: the lookup-table
    GEMV), larger ones decode tiles of W for BLAS (batch 1024: the prefill size)."""

    params = [1, 8, 128, 1024]
    param_names = ["batch"]

    def setup(self, batch):
        self.t = nf4_weight(N)
        self.lora_a, self.lora_b = adapter(N)
        self.x = activations(batch, N)
        self.out = np.empty((batch, N), np.float32)
        numlora.qlora_forward(self.x, self.t, self.lora_a, self.lora_b, SCALING, out=self.out)
        numlora.nf4_matmul(self.x, self.t, out=self.out)

    def time_qlora_forward(self, batch):
        numlora.qlora_forward(self.x, self.t, self.lora_a, self.lora_b, SCALING, out=self.out)

    def time_nf4_matmul(self, batch):
        numlora.nf4_matmul(self.x, self.t, out=self.out)


class ComputeDtype:
    """``nf4_matmul`` and ``qlora_forward`` in a 16-bit compute dtype (bitsandbytes'
    ``compute_dtype``): on a CPU with AVX512-BF16 the bfloat16 case runs the ``vdpbf16ps``
    kernel, elsewhere (and for float16) the rounded decode in registers; into a
    preallocated ``out``. Batch 4: a group narrower than the 8 rows of the dot-product
    kernel's widest one. ``qlora_forward`` adds the LoRA branch (in float32, after the
    rounding: the shrink, B^T's blocks and the expand in registers up to 16 rows, the
    parallel rows above)."""

    params = [[1, 4, 8, 128], ["bfloat16", "float16"]]
    param_names = ["batch", "compute_dtype"]

    def setup(self, batch, compute_dtype):
        self.t = nf4_weight(N)
        self.lora_a, self.lora_b = adapter(N)
        self.x = activations(batch, N)
        self.out = np.empty((batch, N), np.float32)
        numlora.nf4_matmul(self.x, self.t, out=self.out, compute_dtype=compute_dtype)
        numlora.qlora_forward(self.x, self.t, self.lora_a, self.lora_b, SCALING, out=self.out,
                              compute_dtype=compute_dtype)

    def time_nf4_matmul(self, batch, compute_dtype):
        numlora.nf4_matmul(self.x, self.t, out=self.out, compute_dtype=compute_dtype)

    def time_qlora_forward(self, batch, compute_dtype):
        numlora.qlora_forward(self.x, self.t, self.lora_a, self.lora_b, SCALING, out=self.out,
                              compute_dtype=compute_dtype)


class Nf4MatmulT:
    """``g deq(W)``: the input gradient through an NF4 weight, into a preallocated
    ``out``. Batch 1: the word decode with the column sums in registers; batch 8: weight
    rows decoded into an L1 buffer."""

    params = [1, 8]
    param_names = ["batch"]

    def setup(self, batch):
        self.t = nf4_weight(N)
        self.g = activations(batch, N)
        self.out = np.empty((batch, N), np.float32)
        numlora.nf4_matmul_t(self.g, self.t, out=self.out)

    def time_nf4_matmul_t(self, batch):
        numlora.nf4_matmul_t(self.g, self.t, out=self.out)


class FromMainMemory:
    """One call per weight through distinct NF4 weights of N x N, together larger than a
    last-level cache (256 MiB, at most 64 weights): each weight comes from main memory,
    as a model's layers do in generation (the GEMV at batch 1, float32 and bf16 compute)
    and in a backward pass (``nf4_matmul_t`` at batch 1). What the kernels' prefetches of
    the next weight rows are for; one weight called back to back (``QloraForward``,
    ``Nf4MatmulT``) sits in cache and does not show them. Time per step (all weights)."""

    def setup(self):
        t = nf4_weight(N)
        per = t.packed.nbytes + t.scales.nbytes
        count = int(min(64, max(2, -(-(256 << 20) // per))))
        self.layers = [numlora.quantize_nf4(weight(N), blocksize=BLOCKSIZE) for _ in range(count)]
        self.x = activations(1, N)
        self.out = np.empty((1, N), np.float32)
        numlora.nf4_matmul(self.x, t, out=self.out)
        numlora.nf4_matmul(self.x, t, out=self.out, compute_dtype="bfloat16")
        numlora.nf4_matmul_t(self.x, t, out=self.out)

    def time_gemv_step(self):
        for t in self.layers:
            numlora.nf4_matmul(self.x, t, out=self.out)

    def time_gemv_step_bf16(self):
        for t in self.layers:
            numlora.nf4_matmul(self.x, t, out=self.out, compute_dtype="bfloat16")

    def time_grad_input_step(self):
        for t in self.layers:
            numlora.nf4_matmul_t(self.x, t, out=self.out)


class QloraForwardPeakMem:
    """Peak RSS of one qlora_forward call. The NF4 weight is built directly from random
    codes (no float32 weight is ever allocated) and the peak is reset after setup, so the
    number is the process's resident baseline (Python, numpy, numba, the 9 MB NF4
    weight at N = 4096) plus what the call allocates. Batch 1 and batch 128 should differ
    by far less than the 64 MB a dequantized weight would take."""

    params = [1, 128]
    param_names = ["batch"]

    def setup(self, batch):
        self.t = random_nf4(N)
        self.lora_a, self.lora_b = adapter(N)
        self.x = activations(batch, N)
        self.out = np.empty((batch, N), np.float32)
        numlora.qlora_forward(self.x, self.t, self.lora_a, self.lora_b, SCALING, out=self.out)
        reset_peak_rss()

    def peakmem_qlora_forward(self, batch):
        numlora.qlora_forward(self.x, self.t, self.lora_a, self.lora_b, SCALING, out=self.out)


class QuantizePeakMem:
    """Peak RSS of one quantize_nf4 call: baseline (incl. the float32 weight) plus the
    codes and scales it returns (~N*N/2 + N*N/16 bytes) and any temporaries."""

    def setup(self):
        self.weight = weight(N)
        numlora.quantize_nf4(self.weight, blocksize=BLOCKSIZE)
        reset_peak_rss()

    def peakmem_quantize_nf4(self):
        numlora.quantize_nf4(self.weight, blocksize=BLOCKSIZE)
