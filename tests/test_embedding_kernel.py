"""The embedding LoRA forward kernel, bit for bit: its documented order of operations
(the base row, then ``+ (s * A[t, id]) * B[:, t]`` for t = 0, 1, ..., each product and
sum rounded) against numpy doing the same steps, over the shapes that reach every path
of the kernel (pairs of rows and an odd last row, passes of eight, four and one terms)."""

from __future__ import annotations

import numpy as np
import pytest

import numlora as nl


def _in_order(ids, w, a, b, s):
    """numpy, one term at a time: what the kernel must equal bit for bit."""
    dtype = np.result_type(w, a, b)
    flat = np.asarray(ids).reshape(-1)
    out = w[flat].astype(dtype)
    scale = dtype.type(s)
    for t in range(a.shape[0]):
        c = scale * a[t, flat].astype(dtype)
        out += c[:, None] * b[:, t].astype(dtype)[None, :]
    return out.reshape(np.shape(ids) + (w.shape[1],))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 9])
@pytest.mark.parametrize("rank", [1, 3, 4, 5, 8, 12, 16, 19])
def test_forward_bits_follow_the_documented_order(rng, dtype, n, rank):
    vocab, dim = 50, 37
    w = rng.standard_normal((vocab, dim)).astype(dtype)
    a = rng.standard_normal((rank, vocab)).astype(dtype)
    b = rng.standard_normal((dim, rank)).astype(dtype)
    ids = rng.integers(0, vocab, n)
    ids[-1] = ids[0]  # a repeated id
    got = nl.embedding_lora_forward(ids, w, a, b, 0.7)
    want = _in_order(ids, w, a, b, 0.7)
    assert got.dtype == dtype
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    out = np.full_like(got, np.nan)
    nl.embedding_lora_forward(ids, w, a, b, 0.7, out=out)
    assert np.array_equal(out.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("dim", [1, 15, 16, 17, 100])
def test_forward_bits_any_width_and_layout(rng, dim):
    vocab, rank = 30, 16
    w = rng.standard_normal((vocab, dim)).astype(np.float32)
    a = rng.standard_normal((rank, vocab)).astype(np.float32)
    b = np.asfortranarray(rng.standard_normal((dim, rank)).astype(np.float32))  # B^T's rows contiguous
    ids = rng.integers(0, vocab, (3, 5))
    want = _in_order(ids, w, a, b, 2.0)
    np.testing.assert_array_equal(nl.embedding_lora_forward(ids, w, a, b, 2.0), want)
    np.testing.assert_array_equal(nl.embedding_lora_forward(ids, w, a, np.ascontiguousarray(b), 2.0), want)
    # float32 table with a float64 adapter: computed in float64
    want64 = _in_order(ids, w, a.astype(np.float64), b, 2.0)
    np.testing.assert_array_equal(nl.embedding_lora_forward(ids, w, a.astype(np.float64), b, 2.0), want64)


def test_forward_special_values_pass_through(rng):
    """-0.0, inf and nan in the table come out as the in-order sum makes them."""
    vocab, dim, rank = 6, 20, 8
    w = rng.standard_normal((vocab, dim)).astype(np.float32)
    w[1, :4] = [-0.0, np.inf, -np.inf, np.nan]
    a = rng.standard_normal((rank, vocab)).astype(np.float32)
    a[:, 1] = 0.0
    b = rng.standard_normal((dim, rank)).astype(np.float32)
    ids = np.array([1, 2, 1])
    got = nl.embedding_lora_forward(ids, w, a, b, 1.0)
    want = _in_order(ids, w, a, b, 1.0)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
