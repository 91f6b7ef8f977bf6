"""Training kernels: inverted dropout with one xorshift64 stream per row, and the AdamW
step. No validation here (the functional layer in ``numlora.ops`` / ``numlora.train``
checks everything).

Dropout stream of row ``i`` for a call seeded ``seed`` (all arithmetic modulo 2**64):
``state = splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15)`` (0 replaced by 1; computed
by the caller, vectorised, and passed in as ``states``), then one
xorshift64 step (``s ^= s << 13; s ^= s >> 7; s ^= s << 17``) per element in column
order; element ``j`` is kept iff ``(s >> 11) >= thresh`` with ``thresh = ceil(p * 2**53)``,
so the keep probability is ``1 - thresh / 2**53`` (``1 - p`` up to 2**-53). A row's mask
depends only on (seed, row index, p): never on the thread count or the batch split.

The kernels are serial on purpose: they run right after BLAS calls, where a parallel
numba kernel fights OpenBLAS's still-spinning threads (docs/performance.md); their work
(one pass over an (n, in) array, or over the adapter's parameters) is small next to the
GEMMs around them.
"""

from __future__ import annotations

import numpy as np

from ._jit import inline_helper, kernel


@inline_helper
def _step(s):
    s ^= s << np.uint64(13)
    s ^= s >> np.uint64(7)
    s ^= s << np.uint64(17)
    return s


@kernel()
def dropout_fill(x, thresh, states, scale, out):
    """out[i, j] = x[i, j] * scale where row i's stream keeps element j, else 0.
    x, out: (n, m) of one float dtype; scale of that dtype; thresh uint64; states (n,)
    uint64, the rows' start states."""
    n, m = x.shape
    zero = out.dtype.type(0)
    for i in range(n):
        s = states[i]
        xr = x[i]
        orow = out[i]
        for j in range(m):
            s = _step(s)
            orow[j] = xr[j] * scale if (s >> np.uint64(11)) >= thresh else zero


@kernel()
def dropout_mul_add(src, thresh, states, scale, dst):
    """dst[i, j] += src[i, j] * scale where the same mask as :func:`dropout_fill` keeps
    element j of row i (the input gradient through the dropout)."""
    n, m = src.shape
    for i in range(n):
        s = states[i]
        sr = src[i]
        dr = dst[i]
        for j in range(m):
            s = _step(s)
            if (s >> np.uint64(11)) >= thresh:
                dr[j] += sr[j] * scale


@kernel()
def dropout_mask(n, m, thresh, states, out):
    """out[i, j] = 1 where the stream keeps element j of row i, else 0 (uint8 (n, m))."""
    for i in range(n):
        s = states[i]
        for j in range(m):
            s = _step(s)
            out[i, j] = 1 if (s >> np.uint64(11)) >= thresh else 0


@kernel()
def adamw_step(value, grad, m, v, lr, beta1, beta2, eps, decay, bc1, bc2_sqrt):
    """One AdamW step over flat arrays, in place, with torch.optim.AdamW's formulas:
    ``p *= decay`` (``1 - lr * weight_decay``), ``m += (1 - beta1)(g - m)``,
    ``v = beta2 v + (1 - beta2) g^2``, ``p -= (lr / bc1) m / (sqrt(v) / bc2_sqrt + eps)``.
    Each element is computed in float64 and stored in the arrays' dtype."""
    step_size = lr / bc1
    w1 = 1.0 - beta1
    w2 = 1.0 - beta2
    for k in range(value.size):
        g = np.float64(grad[k])
        mk = np.float64(m[k])
        mk = mk + w1 * (g - mk)
        vk = beta2 * np.float64(v[k]) + w2 * g * g
        m[k] = mk
        v[k] = vk
        p = np.float64(value[k]) * decay
        value[k] = p - step_size * np.float64(m[k]) / (np.sqrt(np.float64(v[k])) / bc2_sqrt + eps)
