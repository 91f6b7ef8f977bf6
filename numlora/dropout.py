"""LoRA dropout: inverted dropout on the LoRA input, with masks that are never stored.

One concept, :class:`DropoutState` ``(p, seed)``: what :func:`lora_dropout` used and
what :func:`numlora.ops.lora_backward` needs to draw the same mask again. Row ``i`` of a
batch draws its keep bits from its own xorshift64 stream, seeded from ``(seed, i)``
(:func:`row_states`), so a mask does not depend on the thread count or on the rows
around it, and the GPU draws the same masks bit for bit. :meth:`DropoutState.mask`
gives the state in the form the kernels take (:class:`DropoutMask`). Beside the public
names (``__all__``), the package uses :class:`DropoutMask`, :func:`check_p`,
:func:`check_seed`, :func:`row_states` and :func:`drop_rows` (the draw of
:func:`lora_dropout` over arrays already checked, which the layers' training forward
shares).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _validate as validate
from ._dispatch import dispatch
from .errors import ConfigError, ShapeError

__all__ = ["DropoutState", "dropout_keep_mask", "lora_dropout", "mix_seed"]

_U64 = (1 << 64) - 1


_TRAIN_KERNELS = []


def _kernels():
    if not _TRAIN_KERNELS:  # imported on first use (numba compiles then), kept for the next calls
        from .kernels import train

        _TRAIN_KERNELS.append(train)
    return _TRAIN_KERNELS[0]


def check_p(p) -> float:
    """Validate a dropout probability: a real number in [0, 1)."""
    return validate.unit_scalar("dropout", p)


def check_seed(seed) -> int:
    """Validate a 64-bit seed: an integer in [0, 2**64)."""
    seed = validate.int_scalar("seed", seed, minimum=0)
    if seed > _U64:
        raise ConfigError(f"seed must fit in 64 bits (<= {_U64}), got {seed}")
    return seed


def mix_seed(seed: int, counter: int) -> int:
    """A 64-bit seed derived from ``(seed, counter)`` (splitmix64 of their combination):
    the seed of the ``counter``-th training forward of a layer seeded ``seed`` (how
    :class:`~numlora.layers.LoraLinear` draws a new mask per training forward)."""
    z = (validate.int_scalar("seed", seed) + (validate.int_scalar("counter", counter) + 1) * 0xD1B54A32D192ED03) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def row_states(seed, n):
    """Start states of the rows' xorshift64 streams: splitmix64(seed + (i + 1) * golden),
    0 replaced by 1 (uint64 array arithmetic wraps modulo 2**64; a few rows in Python
    integers, where numpy's per-call cost dominates)."""
    if n <= 16:
        z, states = int(seed), []
        for _ in range(n):
            z = (z + 0x9E3779B97F4A7C15) & _U64
            y = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
            y = ((y ^ (y >> 27)) * 0x94D049BB133111EB) & _U64
            states.append((y ^ (y >> 31)) or 1)
        return np.array(states, np.uint64)
    z = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    z[z == 0] = 1
    return z


class DropoutMask(NamedTuple):
    """A :class:`DropoutState` as the dropout kernels take it: the keep threshold
    (``ceil(p * 2**53)``: an element is dropped when the top 53 bits of its draw fall
    below it), the seed, the scale ``1 / (1 - p)`` in the compute dtype, and optionally
    the start states of the rows' streams for one batch size (see :meth:`with_rows`)."""

    thresh: np.uint64
    seed: int
    scale: object
    rows: object = None

    def states(self, n):
        """The start states of the first ``n`` rows' streams."""
        rows = self.rows
        if rows is not None and rows.shape[0] == n:
            return rows
        return row_states(self.seed, n)

    def with_rows(self, n) -> "DropoutMask":
        """This mask with the start states of ``n`` rows computed once, for a forward and
        its backward over the same batch."""
        return self._replace(rows=row_states(self.seed, n))

    def apply(self, x2, out2):
        """``out2 = x2 * mask / (1 - p)`` over 2-D C-contiguous arrays (out2 may be x2)."""
        if x2.size:
            _kernels().dropout_fill(x2, self.thresh, self.states(x2.shape[0]), self.scale, out2)

    def mul_add(self, t, dx):
        """``dx += t * mask / (1 - p)`` (the backward's low-rank term through the mask)."""
        _kernels().dropout_mul_add(t, self.thresh, self.states(t.shape[0]), self.scale, dx)


class DropoutState(NamedTuple):
    """What :func:`lora_dropout` used: the probability and the 64-bit seed. Together with
    the row index they define the mask (see :mod:`numlora.kernels.train`), so the mask is
    never stored: :func:`~numlora.ops.lora_backward` regenerates it from this."""

    p: float
    seed: int

    @classmethod
    def checked(cls, p, seed) -> "DropoutState":
        """A state from a caller's ``p`` and ``seed``, both validated."""
        return cls(check_p(p), check_seed(seed))

    @classmethod
    def from_arg(cls, dropout) -> "DropoutState | None":
        """The ``dropout`` argument of a backward, validated: None (no dropout, also for
        p == 0) or the state ``(p, seed)``."""
        if dropout is None:
            return None
        if not isinstance(dropout, tuple) or len(dropout) != 2:
            raise ConfigError(f"dropout must be the (p, seed) lora_dropout returned, got {dropout!r}")
        state = cls.checked(dropout[0], dropout[1])
        return state if state.p > 0 else None

    def mask(self, dtype) -> DropoutMask:
        """This state in the form the kernels take, for arrays of ``dtype``."""
        return DropoutMask(np.uint64(math.ceil(self.p * 2.0 ** 53)), int(self.seed),
                           np.dtype(dtype).type(1.0 / (1.0 - self.p)))


@dispatch
def lora_dropout(x, p, seed, out=None):
    """Inverted dropout on the LoRA input: each element of ``x`` is kept with
    probability ``1 - p`` and scaled by ``1 / (1 - p)``, else set to 0.

    Row ``i`` draws from its own xorshift64 stream, seeded from ``(seed, i)``, so the
    mask does not depend on the thread count, and a row's mask does not depend on the
    rows around it. ``x``: (in,) or (n, in) float; ``seed``: an integer in [0, 2**64);
    ``out``: optional C-contiguous buffer of x's shape and dtype; ``out=x`` drops in
    place, and any other overlap with x is computed through a temporary (the result is
    the same). ``p == 0`` returns x itself (or copies it into ``out``).

    Returns ``(x_drop, DropoutState(p, seed))``: the state is what
    :func:`~numlora.ops.lora_backward` needs to regenerate the mask. On GPU arrays the
    same masks are drawn on the device (bit-identical).
    """
    x = validate.float_array("x", x, (1, 2), allow_empty=True)
    state = DropoutState.checked(p, seed)
    if out is not None:
        validate.out_array("out", out, x.shape, x.dtype)
    if state.p == 0.0:
        if out is None:
            return x, state
        out[...] = x
        return out, state
    if out is None:
        out = np.empty(x.shape, x.dtype)
    width = x.shape[-1]
    x2 = np.ascontiguousarray(x.reshape(-1, width))
    out2 = out.reshape(-1, width)
    if validate.shares_memory(out2, x2) and not validate.same_layout(out2, x2):
        x2 = x2.copy()  # a shifted overlap: the elementwise kernel would read what it wrote
    drop_rows(state, x2, out2)
    return out, state


def drop_rows(state, x2, out2) -> DropoutMask:
    """The draw of :func:`lora_dropout` over arrays already checked: ``out2 = x2 * mask /
    (1 - p)`` for the :class:`DropoutState` ``state`` (p > 0), ``x2`` 2-D C-contiguous,
    ``out2`` of its shape and dtype, ``x2`` itself or sharing no memory with it. Returns
    the :class:`DropoutMask` with the rows' start states (what the backward's
    ``mul_add`` reuses)."""
    mask = state.mask(x2.dtype).with_rows(x2.shape[0])
    mask.apply(x2, out2)
    return mask


def dropout_keep_mask(shape, p, seed) -> np.ndarray:
    """The boolean keep mask :func:`lora_dropout` applies for ``(p, seed)`` to an array
    of ``shape`` ((in,) or (n, in)): True where an element is kept."""
    state = DropoutState.checked(p, seed)
    shape = validate.shape_arg("shape", shape)
    if len(shape) not in (1, 2):
        raise ShapeError(f"expected shape to be (in,) or (n, in), got {shape}")
    n, m = (1, shape[0]) if len(shape) == 1 else shape
    out = np.ones((n, m), np.uint8)
    if state.p > 0 and out.size:
        mask = state.mask(np.float64)
        _kernels().dropout_mask(n, m, mask.thresh, mask.states(n), out)
    return out.reshape(shape).astype(bool)
