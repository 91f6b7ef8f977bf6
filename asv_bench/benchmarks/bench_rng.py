"""XorShift64.uniform: the deterministic generator's compiled fill kernel."""

import numlora

from ._shared import RANK, N


class Uniform:
    """Fill a new float32 array from the xorshift64 stream: an adapter-sized one
    (RANK x N, like lora_a's init) and a weight-sized one (N x N). The stream is
    sequential (one state), so this is one core's throughput plus the allocation."""

    params = [[(RANK, N), (N, N)]]
    param_names = ["shape"]

    def setup(self, shape):
        self.rng = numlora.XorShift64(12345)
        self.rng.uniform(shape)

    def time_uniform(self, shape):
        self.rng.uniform(shape)
