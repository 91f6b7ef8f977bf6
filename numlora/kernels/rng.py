"""xorshift64, bit-identical to the seed module's ``SeededRng``.

state: unsigned 64-bit, never 0. One step: ``s ^= s << 13; s ^= s >> 7; s ^= s << 17``.
Value of a step: ``float32(float64(s) / float64(2**64 - 1) * 2 - 1)`` (``2**64 - 1`` rounds
to ``2**64`` in float64, as in the seed's ``u64::MAX as f64``).
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel

_U64_MAX_F64 = 18446744073709551615.0  # == 2.0**64 once rounded to float64


@kernel()
def xorshift64_fill(state, out):
    """Fill the 1-D float32 array ``out`` with the stream in order; return the new state.

    Inherently sequential (each value depends on the previous state)."""
    s = np.uint64(state)
    for k in range(out.size):
        s ^= s << np.uint64(13)
        s ^= s >> np.uint64(7)
        s ^= s << np.uint64(17)
        out[k] = np.float32(np.float64(s) / _U64_MAX_F64 * 2.0 - 1.0)
    return s
