"""Kernels of LoRA on embeddings and convolutions.

Embedding: the gather of the base rows fused with the low-rank term, and the
scatter-add of A's gradient. Convolution: ``im2col`` / ``im2col_batch`` (images unfolded
into columns, so that the convolution is a matrix product for BLAS) and the adjoint
``col2im_batch`` (the columns' gradient folded back onto the input). A 1-D convolution is
the 2-D one with a height of 1.

The column layout of one image: row ``(c * kh + i) * kw + j``, column ``oy * ow + ox``
holds ``x[c, oy * sh - ph + i * dh, ox * sw - pw + j * dw]`` (0 outside the input), so
that ``W.reshape(out, -1) @ cols`` is the convolution's output ``(out, oh * ow)``, the
layout of torch's ``(N, C, H, W)``.
"""

from __future__ import annotations

from ._jit import inline_helper, kernel, prange, serial_twin


@kernel()
def embedding_lora_forward(ids, weight, lora_a, bt, scale, out):
    """``out[i, :] = weight[ids[i], :] + sum_t (scale * lora_a[t, ids[i]]) * bt[t, :]``
    with ``bt = B^T`` (r, dim), the terms added in order t = 0, 1, ...

    Serial: a batch of ids moves a few MB, which one core does in about the time numba's
    threads take to wake, and on a busy machine a parallel version waits for them (measured
    in benchmarks/bench_embed_conv.py)."""
    n = ids.shape[0]
    dim = weight.shape[1]
    r = lora_a.shape[0]
    for i in range(n):
        v = ids[i]
        for d in range(dim):
            out[i, d] = weight[v, d]
        for t in range(r):
            c = scale * lora_a[t, v]
            for d in range(dim):
                out[i, d] += c * bt[t, d]


@kernel()
def embedding_gather(ids, weight, out):
    """``out[i, :] = weight[ids[i], :]`` (the base embedding alone; serial, as above)."""
    for i in range(ids.shape[0]):
        v = ids[i]
        for d in range(weight.shape[1]):
            out[i, d] = weight[v, d]


@kernel()
def gather_columns(ids, lora_a, u):
    """``u[i, t] = lora_a[t, ids[i]]``: the rows of ``F.embedding(ids, A^T)``."""
    for i in range(ids.shape[0]):
        v = ids[i]
        for t in range(lora_a.shape[0]):
            u[i, t] = lora_a[t, v]


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


@kernel(parallel=True)
def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, cols):
    """One image ``x`` (C, H, W) unfolded into ``cols`` (C * kh * kw, oh * ow). The valid
    output range of each kernel tap is computed once, so the copy loop has no branch."""
    c_in, h, w = x.shape
    rows = c_in * kh * kw
    for row in prange(rows):
        c = row // (kh * kw)
        i = (row // kw) % kh
        j = row % kw
        x0 = j * dw - pw
        lo, hi = _span(ow, x0, sw, w)
        for oy in range(oh):
            y = oy * sh - ph + i * dh
            base = oy * ow
            if y < 0 or y >= h:
                for ox in range(ow):
                    cols[row, base + ox] = 0
                continue
            for ox in range(lo):
                cols[row, base + ox] = 0
            for ox in range(lo, hi):
                cols[row, base + ox] = x[c, y, x0 + ox * sw]
            for ox in range(hi, ow):
                cols[row, base + ox] = 0


@kernel(parallel=True)
def im2col_batch(x, i0, n, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, cols):
    """Images ``i0 .. i0 + n - 1`` of ``x`` (N, C, H, W) unfolded side by side into
    ``cols`` (C * kh * kw, >= n * oh * ow): image ``b`` in columns ``b * oh * ow ..``, each
    as :func:`im2col` lays it out. Parallel over images and rows: called before one
    BLAS product over all of them, not between products."""
    rows = cols.shape[0]
    w = x.shape[3]
    h = x.shape[2]
    npix = oh * ow
    for job in prange(n * rows):
        b = job // rows
        row = job % rows
        c = row // (kh * kw)
        i = (row // kw) % kh
        j = row % kw
        x0 = j * dw - pw
        lo, hi = _span(ow, x0, sw, w)
        for oy in range(oh):
            y = oy * sh - ph + i * dh
            base = b * npix + oy * ow
            if y < 0 or y >= h:
                for ox in range(ow):
                    cols[row, base + ox] = 0
                continue
            for ox in range(lo):
                cols[row, base + ox] = 0
            for ox in range(lo, hi):
                cols[row, base + ox] = x[i0 + b, c, y, x0 + ox * sw]
            for ox in range(hi, ow):
                cols[row, base + ox] = 0


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
