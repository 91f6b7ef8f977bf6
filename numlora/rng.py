"""``XorShift64``: the seed module's deterministic generator, bit for bit."""

from __future__ import annotations

import numpy as np

from . import _dispatch
from . import _validate as validate
from .dropout import check_seed

__all__ = ["XorShift64"]

_MASK = (1 << 64) - 1


class XorShift64:
    """xorshift64 with the seed's constants and float mapping.

    ``state = max(seed, 1)``; each step ``s ^= s << 13; s ^= s >> 7; s ^= s << 17`` on 64
    bits gives the value ``float32(float64(s) / float64(2**64 - 1) * 2 - 1)``, in [-1, 1].
    :meth:`uniform` fills arrays in row-major order from the same stream (compiled kernel).
    """

    __slots__ = ("_state",)

    def __init__(self, seed: int):
        self._state = max(check_seed(seed), 1)

    @property
    def state(self) -> int:
        return self._state

    def next_u64(self) -> int:
        s = self._state
        s ^= (s << 13) & _MASK
        s ^= s >> 7
        s ^= (s << 17) & _MASK
        self._state = s
        return s

    def next_f32(self) -> np.float32:
        return np.float32(float(self.next_u64()) / float(_MASK) * 2.0 - 1.0)

    def uniform(self, shape, *, device: bool = False) -> np.ndarray:
        """A float32 array of ``shape`` filled with the next values of the stream
        (``device=True``: a GPU device array, filled on the GPU, same values)."""
        where = "cuda" if validate.flag("device", device) else "cpu"
        return _dispatch.backend(where).uniform(self, shape)

    def __repr__(self) -> str:
        return f"XorShift64(state={self._state})"


@_dispatch.register("cpu", "uniform")
def _uniform_host(rng: XorShift64, shape) -> np.ndarray:
    """:meth:`XorShift64.uniform` into a new float32 numpy array."""
    shape = validate.shape_arg("shape", shape, 4)
    out = np.empty(shape, np.float32)
    if out.size:
        from .kernels import rng as k

        rng._state = int(k.xorshift64_fill(np.uint64(rng._state), out.reshape(-1)))
    return out
