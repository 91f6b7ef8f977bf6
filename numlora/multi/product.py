"""The bank's base product ``y = x W^T`` on the CPU (dense or NF4 ``W``), and
:class:`RowStableProduct`, which runs a product in calibrated batch sizes so that a row's
result does not depend on the rest of its batch.

Why calibration: BLAS picks different kernels for different batch sizes (GEMV for one
row, small-matrix kernels for small products), and those sum in different orders. So a
row-stable bank pads each batch (or chunk of :data:`REF_ROWS` rows) up to a bucket size
of :data:`BUCKETS` that was checked, on first use, to give the same bits as a
``REF_ROWS``-row product for probe rows at other positions; a bucket that fails is never
used (the next larger one is). Where the product is numlora's panel GEMM (an NF4 base on
the ``"tiles"`` path, of a shape the panels take), each output's operations do not
depend on the batch by construction: the whole batch is multiplied as it is, with no
padding and no calibration (``RowStableProduct.exact``).
"""

from __future__ import annotations

import threading

import numpy as np

from .._backward import base_product as base_product_dense
from .._nf4_products import FUSED_MAX_ROWS, blas_product, panel_product, panels_ok
from .._nf4_products import forward as nf4_product

__all__ = ["BUCKETS", "REF_ROWS", "RowStableProduct", "base_product"]

#: Largest batch chunk of one base product; larger batches run in chunks of this size.
REF_ROWS = 256
#: Batch sizes the base product is called with in row-stable mode (a batch is padded up
#: to the smallest calibrated one that holds it).
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class RowStableProduct:
    """A product ``product(x2, out2)`` (``out2 = x2 W^T``, any number of rows) run in
    calibrated batch sizes: calling it gives each row the bits a ``REF_ROWS``-row product
    gives it, whatever the other rows.

    For each bucket size N the product is used only after a check: two probe rows
    computed at positions (N-1, 0) of an N-row batch (the rest random) must match bit for
    bit the same rows computed at positions (0, REF_ROWS-1) of a REF_ROWS-row batch.
    REF_ROWS itself is the reference. The check runs once per bucket, on first use.
    ``checked`` maps the buckets checked so far to their outcome.
    """

    def __init__(self, product, in_f, out_f, exact: bool = False):
        self._product = product
        self.in_f, self.out_f = in_f, out_f
        #: The product gives each row the same bits at every batch size by construction
        #: (numlora's panel GEMM): called on the whole batch as it is, nothing padded or
        #: calibrated.
        self.exact = exact
        self.checked: dict[int, bool] = {REF_ROWS: True}
        self._ref = None
        self._lock = threading.Lock()
        self._xpad = None
        self._ypad = None

    def _run(self, n, places, seed):
        """The product of an n-row batch of random rows with probe row ``i`` at position
        ``pos`` for each ``(i, pos)`` of ``places``; returns the probe rows' results."""
        g = np.random.default_rng([7, n, seed])
        xb = g.standard_normal((n, self.in_f), dtype=np.float32)
        probe = np.random.default_rng(99).standard_normal((2, self.in_f), dtype=np.float32)
        for i, pos in places:
            xb[pos] = probe[i]
        yb = np.empty((n, self.out_f), np.float32)
        self._product(xb, yb)
        return np.stack([yb[pos] for _, pos in places])

    def _check(self, n):
        if self._ref is None:
            self._ref = self._run(REF_ROWS, [(0, 0), (1, REF_ROWS - 1)], 0)
        if n == 1:
            got = np.concatenate([self._run(1, [(0, 0)], 1), self._run(1, [(1, 0)], 2)])
        else:
            got = self._run(n, [(0, n - 1), (1, 0)], 1)
        return bool(np.array_equal(got.view(np.uint32), self._ref.view(np.uint32)))

    def bucket(self, m):
        """The smallest bucket >= m that passed its check (checking as needed)."""
        for b in BUCKETS:
            if b < m:
                continue
            ok = self.checked.get(b)
            if ok is None:
                ok = self.checked[b] = self._check(b)
            if ok:
                return b
        return REF_ROWS

    def __call__(self, x2, out2):
        n = x2.shape[0]
        if self.exact:
            self._product(x2, out2)
            return
        with self._lock:
            for c0 in range(0, n, REF_ROWS):
                m = min(REF_ROWS, n - c0)
                nb = self.bucket(m)
                if nb == m:
                    self._product(x2[c0:c0 + m], out2[c0:c0 + m])
                    continue
                if self._xpad is None or self._xpad.shape[0] < nb:
                    self._xpad = np.zeros((nb, self.in_f), np.float32)
                    self._ypad = np.empty((nb, self.out_f), np.float32)
                xp = self._xpad[:nb]
                xp[:m] = x2[c0:c0 + m]
                xp[m:] = 0
                yp = self._ypad[:nb]
                self._product(xp, yp)
                out2[c0:c0 + m] = yp[:m]


def base_product(weight, nf4, row_stable: bool, nf4_path: str):
    """``product(x2, out2)``: ``out2 = x2 W^T`` for float32 C-contiguous (n, in) ``x2``
    and (n, out) ``out2``, ``W`` the dense float32 ``weight`` or the NF4Tensor ``nf4``.

    Row-stable: one arithmetic for every batch size (BLAS for dense; over NF4, the
    panel GEMM (``_nf4_products.panel_product``; decoded tiles with BLAS where the panels
    do not apply) for ``nf4_path="tiles"``, the fused kernel in chunks of
    ``FUSED_MAX_ROWS`` rows for ``"fused"``) in a :class:`RowStableProduct`. Otherwise
    the fastest path for each batch size (BLAS; over NF4, the path ``nf4_matmul`` takes)."""
    exact = False
    if nf4 is None:
        product = _dense(weight)
    elif not row_stable:
        product = _nf4_by_size(nf4)
    elif nf4_path == "fused":
        product = _nf4_fused(nf4)
    elif panels_ok(nf4):
        exact = True
        product = _nf4_panels(nf4)
    else:
        product = _nf4_tiles(nf4)
    if not row_stable:
        return product
    out_f, in_f = (weight if nf4 is None else nf4).shape
    return RowStableProduct(product, in_f, out_f, exact=exact)


def _dense(weight):
    """The dense product: :func:`numlora._backward.base_product`, the one the dense LoRA
    forward takes (``W @ x^T`` and a transposing copy for float32 batches of 2-256 rows,
    where numpy's OpenBLAS is faster that way round; per-thread scratch, so concurrent
    forwards in several threads do not share it)."""

    def product(x2, out2):
        base_product_dense(x2, weight, False, out2)

    return product


def _nf4_by_size(t):
    def product(x2, out2):
        nf4_product(x2, t, None, None, 0.0, None, out2)

    return product


def _nf4_fused(t):
    def product(x2, out2):
        n = x2.shape[0]
        for c0 in range(0, n, FUSED_MAX_ROWS):
            c1 = min(n, c0 + FUSED_MAX_ROWS)
            nf4_product(x2[c0:c1], t, None, None, 0.0, None, out2[c0:c1])

    return product


def _nf4_panels(t):
    scales = np.asarray(t.scales)

    def product(x2, out2):
        panel_product(x2, t, scales, out2)

    return product


def _nf4_tiles(t):
    scales = np.asarray(t.scales)

    def product(x2, out2):
        blas_product(x2, t, scales, out2)

    return product
