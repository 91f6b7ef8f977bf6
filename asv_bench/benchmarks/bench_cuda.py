"""The numba.cuda kernels on a real GPU: lora_forward, qlora_forward, quantize_nf4,
lora_backward and LoraBank.forward on device arrays (N x N, N = 4096 unless
NUMLORA_ASV_N says otherwise, rank 16). Without a GPU (or on the CUDA simulator, whose
timings mean nothing) every setup raises NotImplementedError, which asv reports as a
skip. Each call ends with a device synchronisation, so the kernel time is what is timed.
"""


import numlora

from ._shared import SCALING, N, activations, adapter, bank_adapter, require_gpu, weight, workload


def _sync():
    from numba import cuda

    cuda.synchronize()


class CudaForward:
    params = [["lora", "qlora"], [1, 128]]
    param_names = ["kernel", "batch"]

    def setup(self, kernel, batch):
        require_gpu()
        a, b = adapter(N)
        self.a, self.b = numlora.to_device(a), numlora.to_device(b)
        self.x = numlora.to_device(activations(batch, N))
        self.w = numlora.to_device(weight(N) if kernel == "lora" else numlora.quantize_nf4(weight(N)))
        self.fn = numlora.lora_forward if kernel == "lora" else numlora.qlora_forward
        self.time_forward(kernel, batch)

    def time_forward(self, kernel, batch):
        self.fn(self.x, self.w, self.a, self.b, SCALING)
        _sync()


class CudaQuantize:
    def setup(self):
        require_gpu()
        self.w = numlora.to_device(weight(N))
        self.time_quantize_nf4()

    def time_quantize_nf4(self):
        numlora.quantize_nf4(self.w)
        _sync()


class CudaBackward:
    def setup(self):
        require_gpu()
        a, b = adapter(N)
        self.args = [numlora.to_device(v) for v in (activations(128, N), weight(N), a, b)]
        self.g = numlora.to_device(activations(128, N, stream=5))
        self.time_lora_backward()

    def time_lora_backward(self):
        x, w, a, b = self.args
        numlora.lora_backward(x, w, a, b, SCALING, self.g)
        _sync()


class CudaBank:
    params = [1, 64]
    param_names = ["batch"]

    def setup(self, batch):
        require_gpu()
        bank = numlora.LoraBank(weight(N))
        for k in range(64):
            bank.add(f"a{k}", *bank_adapter(k, N), SCALING)
        self.bank = bank.to("cuda")
        self.x = numlora.to_device(activations(batch, N))
        self.ids = workload("zipf", batch, 64)
        self.time_forward(batch)

    def time_forward(self, batch):
        self.bank.forward(self.x, self.ids)
        _sync()
