"""The NF4 and 8-bit code tables, bit for bit bitsandbytes' (numpy only: shared by the
functional layer and the kernels)."""

from __future__ import annotations

import numpy as np

from ._code8 import CODE8_HEX


def _from_hex(words) -> np.ndarray:
    a = np.array([int(h, 16) for h in words], dtype=np.uint32).view(np.float32)
    a.setflags(write=False)
    return a


#: The 16 NF4 values (float32), bit for bit bitsandbytes' table.
NF4_CODE = _from_hex([
    "bf800000", "bf3239b1", "bf066b30", "beca32a0", "be91a24d", "be3d353f", "bdba7871", "00000000",
    "3da2faff", "3e24cae3", "3e7c04dd", "3ead033a", "3ee1a4b8", "3f1007ab", "3f3913b3", "3f800000",
])

#: float32 midpoints between consecutive codes, computed as bitsandbytes does
#: (float32 sum, then halved). A value exactly on a midpoint takes the lower code.
NF4_MIDPOINTS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
NF4_MIDPOINTS.setflags(write=False)

#: bitsandbytes' signed dynamic 8-bit map (256 float32, ascending), for double quantization.
CODE8 = _from_hex(CODE8_HEX)

#: The 16 FP4 values (float32) by nibble, bit for bit bitsandbytes' table: 1 sign bit,
#: 2 exponent bits, 1 mantissa bit, normalised by 12 so the largest is 1. Nibbles 0 and 8
#: are both 0.0.
FP4_CODE = _from_hex([
    "00000000", "3baaaaab", "3f2aaaab", "3f800000", "3eaaaaab", "3f000000", "3e2aaaab", "3e800000",
    "00000000", "bbaaaaab", "bf2aaaab", "bf800000", "beaaaaab", "bf000000", "be2aaaab", "be800000",
])

#: FP4's nibbles in ascending order of value (a stable sort: of the two zeros, nibble 0
#: comes first, as in bitsandbytes' quantizer).
FP4_ORDER = np.argsort(FP4_CODE, kind="stable").astype(np.int32)
FP4_ORDER.setflags(write=False)

#: float32 midpoints between consecutive sorted FP4 values (float32 sum, then halved), as
#: bitsandbytes computes them. A value's sorted index is the number of midpoints strictly
#: below it; its nibble is ``FP4_ORDER`` of that index.
FP4_MIDPOINTS = ((FP4_CODE[FP4_ORDER[:-1]] + FP4_CODE[FP4_ORDER[1:]]) / np.float32(2)).astype(np.float32)
FP4_MIDPOINTS.setflags(write=False)
