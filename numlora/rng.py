"""``XorShift64``: the seed module's deterministic generator, bit for bit."""

from __future__ import annotations

import numpy as np

from . import _validate as v
from .errors import ConfigError

_MASK = (1 << 64) - 1


class XorShift64:
    """xorshift64 with the seed's constants and float mapping.

    ``state = max(seed, 1)``; each step ``s ^= s << 13; s ^= s >> 7; s ^= s << 17`` on 64
    bits gives the value ``float32(float64(s) / float64(2**64 - 1) * 2 - 1)``, in [-1, 1].
    :meth:`uniform` fills arrays in row-major order from the same stream (compiled kernel).
    """

    __slots__ = ("_state",)

    def __init__(self, seed: int):
        seed = v.int_scalar("seed", seed, minimum=0)
        if seed > _MASK:
            raise ConfigError(f"seed must fit in 64 bits (<= {_MASK}), got {seed}")
        self._state = max(seed, 1)

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
        if device:
            from . import cuda

            return cuda.ops.uniform(self, shape)
        shape = v.shape_arg("shape", shape, 4)
        out = np.empty(shape, np.float32)
        if out.size:
            from .kernels import rng as k

            self._state = int(k.xorshift64_fill(np.uint64(self._state), out.reshape(-1)))
        return out

    def __repr__(self) -> str:
        return f"XorShift64(state={self._state})"
