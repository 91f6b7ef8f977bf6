"""Kernels of LoRA on embeddings and convolutions.

Embedding: the gather of the base rows (and of A's columns), the low-rank term added to
them in place, and the scatter-add of A's gradient. Convolution: ``im2col`` / ``im2col_batch`` (images unfolded
into columns, so that the convolution is a matrix product for BLAS) and the adjoint
``col2im_batch`` (the columns' gradient folded back onto the input). A 1-D convolution is
the 2-D one with a height of 1.

The column layout of one image: row ``(c * kh + i) * kw + j``, column ``oy * ow + ox``
holds ``x[c, oy * sh - ph + i * dh, ox * sw - pw + j * dw]`` (0 outside the input), so
that ``W.reshape(out, -1) @ cols`` is the convolution's output ``(out, oh * ow)``, the
layout of torch's ``(N, C, H, W)``.
"""

from __future__ import annotations

import numpy as np

from ._jit import inline_helper, kernel, prange, serial_twin


@kernel()
def embedding_gather(ids, weight, out):
    """``out[i, :] = weight[ids[i], :]``: the base embedding alone, and (with ``weight =
    A^T``) the rows of ``F.embedding(ids, A^T)``. Serial, as everything here on embeddings:
    a batch of ids moves a few MB, which one core does in about the time numba's threads
    take to wake, and on a busy machine a parallel version waits for them (measured in
    benchmarks/bench_embed_conv.py)."""
    for i in range(ids.shape[0]):
        v = ids[i]
        for d in range(weight.shape[1]):
            out[i, d] = weight[v, d]


@kernel()
def embedding_lora_forward(ids, weight, lora_a, lora_b, scale, out):
    """``out[i, :] = weight[ids[i], :] + sum_t (scale * lora_a[t, ids[i]]) * lora_b[:, t]``,
    the terms added in order t = 0, 1, ... (a product, then a sum, each rounded: no FMA).

    The base rows are gathered into ``out``, then the terms are added two output rows and
    eight (or four, then one) terms per pass: each pass's inner loop over the columns is
    one contiguous SIMD loop, it reads eight rows of ``B^T`` once for two tokens, and each
    output element is loaded and stored once per eight terms. ``B^T`` (r, dim) and the
    scaled coefficients (n, r) are the only temporaries."""
    n = ids.shape[0]
    r = lora_a.shape[0]
    dim = weight.shape[1]
    embedding_gather(ids, weight, out)
    bt = np.empty((r, dim), out.dtype)
    _transpose(lora_b, bt)
    # one spare row of coefficients (zero) and of output for the partner of an odd last id
    c = np.zeros((n + 1, r), out.dtype)
    embedding_gather(ids, lora_a.T, c)
    for i in range(n):
        for t in range(r):
            c[i, t] = scale * c[i, t]
    spare = np.zeros(dim, out.dtype)
    for i in range(0, n, 2):
        o0 = out[i]
        o1 = out[i + 1] if i + 1 < n else spare
        c0 = c[i]
        c1 = c[i + 1]
        t = 0
        while t + 8 <= r:
            _add8(o0, o1, c0, c1, bt, t)
            t += 8
        if t + 4 <= r:
            _add4(o0, o1, c0, c1, bt, t)
            t += 4
        while t < r:
            _axpy(o0, c0[t], bt[t])
            _axpy(o1, c1[t], bt[t])
            t += 1


@inline_helper
def _transpose(b, bt):
    """``bt[t, d] = b[d, t]``, in blocks of 16 rows of ``b`` (faster than numpy's
    transposing copy of a (4096, 16) float32 array, which gathers a column at a time)."""
    for d0 in range(0, b.shape[0], 16):
        blk = b[d0:d0 + 16]
        for t in range(b.shape[1]):
            row = bt[t, d0:d0 + 16]
            for j in range(blk.shape[0]):
                row[j] = blk[j, t]


@inline_helper
def _axpy(o, k, b):
    """``o += k * b``."""
    for d in range(o.shape[0]):
        o[d] = o[d] + k * b[d]


@inline_helper
def _add8(o0, o1, c0, c1, bt, t):
    """``o0 += c0[t] * bt[t] + ... + c0[t + 7] * bt[t + 7]``, added left to right (as
    eight :func:`_axpy` calls would), and ``o1`` likewise with ``c1``. The rows of ``bt``
    are separate arguments of one loop (not a loop over them) so that LLVM vectorizes it."""
    b0, b1, b2, b3, b4, b5, b6, b7 = bt[t], bt[t + 1], bt[t + 2], bt[t + 3], bt[t + 4], bt[t + 5], bt[t + 6], bt[t + 7]
    p0, p1, p2, p3, p4, p5, p6, p7 = c0[t], c0[t + 1], c0[t + 2], c0[t + 3], c0[t + 4], c0[t + 5], c0[t + 6], c0[t + 7]
    q0, q1, q2, q3, q4, q5, q6, q7 = c1[t], c1[t + 1], c1[t + 2], c1[t + 3], c1[t + 4], c1[t + 5], c1[t + 6], c1[t + 7]
    for d in range(o0.shape[0]):
        x0, x1, x2, x3, x4, x5, x6, x7 = b0[d], b1[d], b2[d], b3[d], b4[d], b5[d], b6[d], b7[d]
        o0[d] = o0[d] + p0 * x0 + p1 * x1 + p2 * x2 + p3 * x3 + p4 * x4 + p5 * x5 + p6 * x6 + p7 * x7
        o1[d] = o1[d] + q0 * x0 + q1 * x1 + q2 * x2 + q3 * x3 + q4 * x4 + q5 * x5 + q6 * x6 + q7 * x7


@inline_helper
def _add4(o0, o1, c0, c1, bt, t):
    """:func:`_add8` with four terms."""
    b0, b1, b2, b3 = bt[t], bt[t + 1], bt[t + 2], bt[t + 3]
    p0, p1, p2, p3 = c0[t], c0[t + 1], c0[t + 2], c0[t + 3]
    q0, q1, q2, q3 = c1[t], c1[t + 1], c1[t + 2], c1[t + 3]
    for d in range(o0.shape[0]):
        x0, x1, x2, x3 = b0[d], b1[d], b2[d], b3[d]
        o0[d] = o0[d] + p0 * x0 + p1 * x1 + p2 * x2 + p3 * x3
        o1[d] = o1[d] + q0 * x0 + q1 * x1 + q2 * x2 + q3 * x3


@kernel()
def scatter_columns_add(ids, h, skip, grad_a):
    """``grad_a[t, ids[i]] += h[i, t]`` for every i with ``ids[i] != skip`` (the
    padding index; -1 skips nothing). Serial: two tokens may share an id."""
    for i in range(ids.shape[0]):
        v = ids[i]
        if v == skip:
            continue
        for t in range(h.shape[1]):
            grad_a[t, v] += h[i, t]


@inline_helper
def _span(n_out, start, step, size):
    """``(lo, hi)``: the outputs ``o`` in ``lo .. hi - 1`` whose input ``start + o * step``
    lies in ``0 .. size - 1``."""
    lo = 0
    if start < 0:
        lo = (-start + step - 1) // step
    hi = n_out
    if n_out > 0 and start + (n_out - 1) * step >= size:
        hi = (size - 1 - start) // step + 1 if size - 1 - start >= 0 else 0
    if hi < lo:
        hi = lo
    return lo, hi


@inline_helper
def _unfold_row(img, row, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, cols, col0):
    """Row ``row`` of one image's columns: ``img`` (C, H, W) into ``cols[row, col0 ..
    col0 + oh * ow - 1]``. The valid output range of the row's kernel tap is computed
    once, so the copy loop has no branch."""
    h, w = img.shape[1], img.shape[2]
    c = row // (kh * kw)
    i = (row // kw) % kh
    j = row % kw
    x0 = j * dw - pw
    lo, hi = _span(ow, x0, sw, w)
    dst_row = cols[row]
    for oy in range(oh):
        y = oy * sh - ph + i * dh
        # views, indexed from 0 by range variables: the copies vectorise (an index built
        # from the prange variable would be guarded against negative values, which stops
        # LLVM from vectorising the loop)
        dst = dst_row[col0 + oy * ow:col0 + (oy + 1) * ow]
        if y < 0 or y >= h:
            dst[:] = 0
            continue
        dst[:lo] = 0
        if sw == 1:
            dst[lo:hi] = img[c, y, x0 + lo:x0 + hi]
        else:
            src = img[c, y]
            for ox in range(lo, hi):
                dst[ox] = src[x0 + ox * sw]
        dst[hi:] = 0


@kernel(parallel=True)
def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, cols):
    """One image ``x`` (C, H, W) unfolded into ``cols`` (C * kh * kw, oh * ow)."""
    for row in prange(x.shape[0] * kh * kw):
        _unfold_row(x, row, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, cols, 0)


@kernel(parallel=True)
def im2col_batch(x, i0, n, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, cols):
    """Images ``i0 .. i0 + n - 1`` of ``x`` (N, C, H, W) unfolded side by side into
    ``cols`` (C * kh * kw, >= n * oh * ow): image ``b`` in columns ``b * oh * ow ..``, each
    as :func:`im2col` lays it out. Parallel over images and rows: called before one
    BLAS product over all of them, not between products."""
    rows = cols.shape[0]
    for job in prange(n * rows):
        b = job // rows
        _unfold_row(x[i0 + b], job % rows, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, cols, b * oh * ow)


#: A serial build of :func:`im2col`, for calls between BLAS products (numba's threads
#: waking while OpenBLAS's still spin cost more than the copy).
im2col_serial = serial_twin(im2col)


@kernel(parallel=True)
def col2im_batch(cols, i0, n, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, dx):
    """The adjoint of :func:`im2col_batch`: images ``i0 .. i0 + n - 1`` of ``dx``
    (N, C, H, W) receive ``+=`` the column entries read from them. Parallel over
    (image, channel) pairs (no two write one element)."""
    c_in, h, w = dx.shape[1], dx.shape[2], dx.shape[3]
    npix = oh * ow
    for job in prange(n * c_in):
        b = job // c_in
        c = job % c_in
        for i in range(kh):
            for j in range(kw):
                row = (c * kh + i) * kw + j
                x0 = j * dw - pw
                lo, hi = _span(ow, x0, sw, w)
                for oy in range(oh):
                    y = oy * sh - ph + i * dh
                    if y < 0 or y >= h:
                        continue
                    base = b * npix + oy * ow
                    for ox in range(lo, hi):
                        dx[i0 + b, c, y, x0 + ox * sw] += cols[row, base + ox]
