"""The bank's base product ``y = x W^T`` on the CPU (dense or NF4 ``W``), and
:class:`RowStableProduct`, which runs a product in calibrated batch sizes so that a row's
result does not depend on the rest of its batch.

Why calibration: BLAS picks different kernels for different batch sizes (GEMV for one
row, small-matrix kernels for small products), and those sum in different orders. So a
row-stable bank pads each batch (or chunk of :data:`REF_ROWS` rows) up to a bucket size
of :data:`BUCKETS` that was checked, on first use, to give the same bits as a
``REF_ROWS``-row product, for a probe row at every position of the bucket; a bucket that
fails is never used (the next larger one is). Some BLAS kernels sum a row in another
order depending on its position in the batch (OpenBLAS's Haswell SGEMM, which AMD Zen 3
runs: rows 6-11 of every 12 otherwise than rows 0-5, in either orientation): no bucket
can be row-stable there, so when the ``REF_ROWS``-row product itself gives a probe row
other bits at other positions, the bank runs its fallback instead (dense: numlora's panel
GEMM with panels copied from W, ``_nf4_products.dense_panel_product``, or fixed-order dot
products, ``kernels.multi.dense_rows_dot16``, for shapes the panels do not take; NF4
tiles: the fused kernel in chunks). Where the product is numlora's panel GEMM (an NF4
base on the ``"tiles"`` path, of a shape the panels take) or the dense fallback, each output's
operations do not depend on the batch by construction: the whole batch is multiplied as
it is, with no padding and no calibration (``RowStableProduct.exact``).
"""

from __future__ import annotations

import threading

import numpy as np

from .._backward import base_product as base_product_dense
from .._nf4_products import (
    FUSED_MAX_ROWS,
    blas_product,
    dense_panel_product,
    dense_panels_ok,
    panel_product,
    panels_ok,
    park_rows,
)
from .._nf4_products import forward as nf4_product

__all__ = ["BUCKETS", "REF_ROWS", "RowStableProduct", "base_product"]

#: Largest batch chunk of one base product; larger batches run in chunks of this size.
REF_ROWS = 256
#: Rows from which the bank's own product kernels (the dense fallback, the NF4 panels)
#: put OpenBLAS's spinning workers to sleep first (``_nf4_products.park_rows``). Measured
#: in ``numlora bench --pipeline`` on AMD Zen 3 (a row-stable dense bank that falls back,
#: two alternating runs each): at 128 rows the bank's call inside the pass took 8.6 ms
#: parked against 14.4-17.1 not, the forward pass 31.5-32.0 against 43.9-51.0 ms; at 8 rows
#: the bank gained nothing and the pass's next numpy products lost (1.15-1.35x against
#: 0.97-1.06x their time without numlora). Between the two: not measured.
PARK_MIN_ROWS = 64
#: Batch sizes the base product is called with in row-stable mode (a batch is padded up
#: to the smallest calibrated one that holds it).
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class RowStableProduct:
    """A product ``product(x2, out2)`` (``out2 = x2 W^T``, any number of rows) run in
    calibrated batch sizes: calling it gives each row the bits a ``REF_ROWS``-row product
    gives it, whatever the other rows and its position.

    For each bucket size N the product is used only after a check: a probe row computed
    at every position but the last of an N-row batch and a second probe row at the last
    must match bit for bit the same rows of a ``REF_ROWS``-row batch (probe one at every
    position but the last, where all must agree). The check runs once per bucket, on
    first use. ``checked`` maps the buckets checked so far to their outcome. Where the
    ``REF_ROWS``-row product's own rows disagree by position, ``fallback`` (a product,
    with ``fallback_exact``) replaces it (``fell_back``) and the calibration starts over.
    """

    def __init__(self, product, in_f, out_f, exact: bool = False, fallback=None, fallback_exact: bool = False):
        self._product = product
        self.in_f, self.out_f = in_f, out_f
        #: The product gives each row the same bits at every batch size by construction
        #: (numlora's panel GEMM): called on the whole batch as it is, nothing padded or
        #: calibrated.
        self.exact = exact
        self._fallback, self._fallback_exact = fallback, fallback_exact
        #: True once the product's rows were found to depend on their position and the
        #: fallback took over.
        self.fell_back = False
        self.checked: dict[int, bool] = {REF_ROWS: True}
        self._ref = None
        self._lock = threading.Lock()
        self._xpad = None
        self._ypad = None

    def _run(self, n, seed):
        """The product of an n-row batch: probe row 0 at positions 0 .. n - 2, probe row 1
        at n - 1 (n = 1: probe 0 alone, then probe 1 alone); returns the n result rows."""
        probe = np.random.default_rng(99).standard_normal((2, self.in_f), dtype=np.float32)
        if n == 1:
            ys = []
            for i in range(2):
                yb = np.empty((1, self.out_f), np.float32)
                self._product(probe[i:i + 1].copy(), yb)
                ys.append(yb[0])
            return np.stack(ys)
        xb = np.empty((n, self.in_f), np.float32)
        xb[:n - 1] = probe[0]
        xb[n - 1] = probe[1]
        yb = np.empty((n, self.out_f), np.float32)
        self._product(xb, yb)
        return yb

    def _reference(self):
        """The REF_ROWS-row probe results (probe 0, probe 1), switching to the fallback
        where the product's rows depend on their position."""
        while self._ref is None and not self.exact:  # an exact product is never calibrated
            yb = self._run(REF_ROWS, 0).view(np.uint32)
            if (yb[:-1] == yb[0]).all() or self._fallback is None:
                self._ref = np.stack([yb[0], yb[-1]])
                break
            self._product, self.exact, self.fell_back = self._fallback, self._fallback_exact, True
            self._fallback = None
            self.checked = {REF_ROWS: True}
        return self._ref

    def _check(self, n):
        ref = self._reference()
        got = self._run(n, 1).view(np.uint32)
        if n == 1:
            return bool(np.array_equal(got, ref))
        return bool((got[:-1] == ref[0]).all() and np.array_equal(got[-1], ref[1]))

    def bucket(self, m):
        """The smallest bucket >= m that passed its check (checking as needed); ``m``
        itself for an exact product (nothing padded, nothing checked)."""
        self._reference()
        if self.exact:
            return m
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
        if self._ref is None and not self.exact:
            with self._lock:
                self._reference()
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
    fallback, fallback_exact = None, False
    if nf4 is None:
        product = _dense(weight)
        fallback, fallback_exact = _dense_exact(weight), True
    elif not row_stable:
        product = _nf4_by_size(nf4)
    elif nf4_path == "fused":
        product = _nf4_fused(nf4)
    elif panels_ok(nf4):
        exact = True
        product = _nf4_panels(nf4)
    else:
        product = _nf4_tiles(nf4)
        fallback = _nf4_fused(nf4)
    if not row_stable:
        return product
    out_f, in_f = (weight if nf4 is None else nf4).shape
    return RowStableProduct(product, in_f, out_f, exact=exact, fallback=fallback, fallback_exact=fallback_exact)


def _dense(weight):
    """The dense product: :func:`numlora._backward.base_product`, the one the dense LoRA
    forward takes (``W @ x^T`` and a transposing copy for float32 batches of 2-256 rows,
    where numpy's OpenBLAS is faster that way round; per-thread scratch, so concurrent
    forwards in several threads do not share it)."""

    def product(x2, out2):
        base_product_dense(x2, weight, False, out2)

    return product


def _dense_exact(weight):
    """The dense product in numlora's own arithmetic, each output the same operations
    whatever its row's position or batch: the panel GEMM with panels copied from W
    (``_nf4_products.dense_panel_product``) where it takes W's shape, else fixed-order dot
    products (``kernels.multi.dense_rows_dot16``, portable ``dense_rows_dot``)."""
    w = np.ascontiguousarray(weight, np.float32)

    def product(x2, out2):
        x2 = np.ascontiguousarray(x2)
        park_rows(w.size, x2.shape[0], PARK_MIN_ROWS)  # numba's threads, maybe right after a BLAS call
        if dense_panels_ok(w.shape):
            dense_panel_product(x2, w, out2)
            return
        from ..kernels import multi as k  # here, not at import: numba loads with the first bank

        (k.dense_rows_dot16 if k.SIMD_LANES else k.dense_rows_dot)(w, x2, out2)

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
        park_rows(t.numel, x2.shape[0], PARK_MIN_ROWS)
        panel_product(x2, t, scales, out2)

    return product


def _nf4_tiles(t):
    scales = np.asarray(t.scales)

    def product(x2, out2):
        blas_product(x2, t, scales, out2)

    return product
