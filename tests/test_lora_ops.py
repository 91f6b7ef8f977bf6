import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numlora as nl

from reference import lora_forward_ref, merge_ref


def _case(rng, n, out_f, in_f, r, dtype=np.float32):
    x = rng.standard_normal((n, in_f)).astype(dtype)
    w = rng.standard_normal((out_f, in_f)).astype(dtype)
    a = rng.standard_normal((r, in_f)).astype(dtype)
    b = rng.standard_normal((out_f, r)).astype(dtype)
    bias = rng.standard_normal(out_f).astype(dtype)
    return x, w, a, b, bias


def _close(got, ref, dtype=np.float32):
    tol = 2e-5 if dtype == np.float32 else 1e-12
    scale = np.abs(ref).max() + 1
    assert np.abs(got - ref).max() <= tol * scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_matches_float64_reference(rng, dtype):
    x, w, a, b, bias = _case(rng, 5, 33, 47, 4, dtype)
    y = nl.lora_forward(x, w, a, b, 0.75, bias)
    assert y.dtype == dtype and y.shape == (5, 33)
    _close(y, lora_forward_ref(x, w, a, b, 0.75, bias), dtype)
    y1 = nl.lora_forward(x[2], w, a, b, 0.75)
    assert y1.shape == (33,)
    _close(y1, lora_forward_ref(x[2], w, a, b, 0.75), dtype)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 256, 257])
def test_base_product_orientations(rng, n):
    """float32 batches of 2-256 rows take the dense base product as (W x^T)^T through a
    scratch buffer and a tiled transposing copy (numpy's OpenBLAS is faster that way
    round); 1 row, more than 256, float64, a non-C-contiguous weight and fan_in_fan_out
    keep x W^T. Each within float32 rounding of the float64 reference, and the float32
    C-contiguous case bit-identical to the product written out in the order it takes."""
    from numlora import _scratch
    from numlora._backward import TRANSPOSED_MAX_ROWS, TRANSPOSED_MIN_ROWS

    x, w, a, b, bias = _case(rng, n, 600, 96, 4)  # 600 outputs: tiles of the copy end short
    ref = lora_forward_ref(x, w, a, b, 0.5, bias)
    transposed = TRANSPOSED_MIN_ROWS <= n <= TRANSPOSED_MAX_ROWS
    _scratch.free("dense.yt")
    y = nl.lora_forward(x, w, a, b, 0.5, bias)
    assert (getattr(_scratch._LOCAL, "dense.yt", None) is not None) == transposed  # the route taken
    _close(y, ref)
    base = np.dot(w, x.T).T if transposed else np.dot(x, w.T)
    assert np.array_equal(nl.lora_forward(x, w, a, b, 0.0).view(np.uint32), base.view(np.uint32))
    out = np.full((n, 600), np.nan, np.float32)
    assert nl.lora_forward(x, w, a, b, 0.5, bias, out=out) is out and np.array_equal(out, y)
    _close(nl.lora_forward(x, np.asfortranarray(w), a, b, 0.5, bias), ref)
    _close(nl.lora_forward(x, np.ascontiguousarray(w.T), a, b, 0.5, bias, fan_in_fan_out=True), ref)
    x64, w64, a64, b64, bias64 = (v.astype(np.float64) for v in (x, w, a, b, bias))
    _close(nl.lora_forward(x64, w64, a64, b64, 0.5, bias64), lora_forward_ref(x64, w64, a64, b64, 0.5, bias64),
           np.float64)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 9), out_f=st.integers(1, 70), in_f=st.integers(1, 70), r=st.integers(1, 8),
       s=st.floats(-4, 4), bias=st.booleans(), fif=st.booleans(), seed=st.integers(0, 2**31))
def test_forward_property(n, out_f, in_f, r, s, bias, fif, seed):
    rng = np.random.default_rng(seed)
    x, w, a, b, bvec = _case(rng, n, out_f, in_f, r)
    if fif:
        w = np.ascontiguousarray(w.T)
    bvec = bvec if bias else None
    y = nl.lora_forward(x, w, a, b, s, bvec, fan_in_fan_out=fif)
    assert y.shape == (n, out_f)
    if n:
        _close(y, lora_forward_ref(x, w, a, b, s, bvec, fan_in_fan_out=fif))


def test_forward_out_buffer_and_layouts(rng):
    x, w, a, b, bias = _case(rng, 6, 20, 30, 3)
    ref = nl.lora_forward(x, w, a, b, 1.5, bias)
    out = np.empty((6, 20), np.float32)
    assert nl.lora_forward(x, w, a, b, 1.5, bias, out=out) is out
    assert np.array_equal(out, ref)
    for xs, ws, as_, bs_ in [
        (np.asfortranarray(x), np.asfortranarray(w), np.asfortranarray(a), np.asfortranarray(b)),
        (np.repeat(x, 2, axis=1)[:, ::2], np.repeat(w, 2, axis=0)[::2], a[:, :], b[::1]),
    ]:
        assert np.array_equal(nl.lora_forward(xs, ws, as_, bs_, 1.5, bias), ref)


def test_forward_empty_batch(rng):
    _, w, a, b, _ = _case(rng, 1, 8, 6, 2)
    y = nl.lora_forward(np.zeros((0, 6), np.float32), w, a, b, 1.0)
    assert y.shape == (0, 8)


def test_linear_forward(rng):
    x, w, _, _, bias = _case(rng, 4, 9, 11, 2)
    _close(nl.linear_forward(x, w, bias), x.astype(np.float64) @ w.T.astype(np.float64) + bias)


@pytest.mark.parametrize("fif", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_matches_reference(rng, fif, dtype):
    _, w, a, b, _ = _case(rng, 1, 40, 25, 5, dtype)
    if fif:
        w = np.ascontiguousarray(w.T)
    ref = merge_ref(w, a, b, 0.3, fan_in_fan_out=fif)
    w2 = w.copy()
    assert nl.merge_lora(w2, a, b, 0.3, fan_in_fan_out=fif) is None
    _close(w2, ref, dtype)
    nl.unmerge_lora(w2, a, b, 0.3, fan_in_fan_out=fif)
    _close(w2, w, dtype)


def test_merge_layouts_identical(rng):
    _, w, a, b, _ = _case(rng, 1, 30, 20, 4)
    c = w.copy()
    nl.merge_lora(c, a, b, 2.0)
    f = np.asfortranarray(w)
    nl.merge_lora(f, a, b, 2.0)
    assert np.array_equal(f, c)
    big = np.zeros((30, 40), np.float32)
    big[:, ::2] = w
    view = big[:, ::2]
    nl.merge_lora(view, a, b, 2.0)
    assert np.array_equal(view, c)
    assert np.all(big[:, 1::2] == 0)


def _assert_bit_exact(a, b):
    assert a.dtype == b.dtype
    it = np.uint32 if a.dtype == np.float32 else np.uint64
    assert np.array_equal(a.view(it), b.view(it))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tracked_unmerge_is_bit_exact_on_adversarial_weights(rng, dtype):
    w = rng.standard_normal((48, 64)).astype(dtype)
    w[0] = 0.0
    w[1] = -0.0
    w[2] = np.finfo(dtype).tiny / 8  # subnormal, absorbed whole: the row is kept
    w[3, ::3] = 1e-30  # absorbed by the delta: exceptions, more than the row's slots
    w[4, :5] = 1e-30  # a few exceptions: slots
    w[5] = np.finfo(dtype).max / 4
    a = rng.standard_normal((3, 64)).astype(dtype)
    b = rng.standard_normal((48, 3)).astype(dtype)
    orig = w.copy()
    rec = nl.merge_lora(w, a, b, 0.7, record=True)
    _close(w, merge_ref(orig, a, b, 0.7), dtype)
    assert rec.saved_rows.tolist() == [2, 3]  # subnormal row and 1e-30 row: absorbed
    assert rec.exc_count[4] >= 5
    plain = w.copy()
    nl.unmerge_lora(plain, a, b, 0.7)
    nl.unmerge_lora(w, a, b, 0.7, record=rec)
    _assert_bit_exact(w, orig)
    assert not np.array_equal(plain, orig)  # plain subtraction would not restore it


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("fif", [False, True])
def test_tracked_unmerge_layouts(rng, layout, fif):
    w0 = (rng.standard_normal((20, 24)) * 0.01).astype(np.float32)
    a = rng.standard_normal((2, 20 if fif else 24)).astype(np.float32)
    b = rng.standard_normal((24 if fif else 20, 2)).astype(np.float32)
    if layout == "F":
        w = np.asfortranarray(w0)
    elif layout == "strided":
        holder = np.zeros((20, 48), np.float32)
        holder[:, ::2] = w0
        w = holder[:, ::2]
    else:
        w = w0.copy()
    rec = nl.merge_lora(w, a, b, 3.0, fan_in_fan_out=fif, record=True)
    _close(w, merge_ref(w0, a, b, 3.0, fan_in_fan_out=fif))
    nl.unmerge_lora(w, a, b, 3.0, fan_in_fan_out=fif, record=rec)
    _assert_bit_exact(np.ascontiguousarray(w), w0)


def test_record_refuses_changed_adapter(rng):
    _, w, a, b, _ = _case(rng, 1, 10, 12, 2)
    rec = nl.merge_lora(w, a, b, 1.0, record=True)
    b2 = b.copy()
    b2[0, 0] += 1
    with pytest.raises(nl.MergeStateError, match="changed since the merge"):
        nl.unmerge_lora(w, a, b2, 1.0, record=rec)
    with pytest.raises(nl.MergeStateError):
        nl.unmerge_lora(w, a, b, 2.0, record=rec)
    with pytest.raises(nl.MergeStateError, match="MergeRecord"):
        nl.unmerge_lora(w, a, b, 1.0, record="nope")
    assert rec.nbytes >= w.size


def test_merge_refuses_readonly_weight(rng):
    _, w, a, b, _ = _case(rng, 1, 10, 12, 2)
    w.setflags(write=False)
    with pytest.raises(nl.ShapeError, match="read-only"):
        nl.merge_lora(w, a, b, 1.0)


# --- bad input -----------------------------------------------------------------------

def test_forward_shape_errors_name_expected_and_actual(rng):
    x, w, a, b, bias = _case(rng, 2, 16, 8, 4)
    with pytest.raises(nl.ShapeError, match=r"expected lora_b of shape \(16, 4\), got \(4, 16\)"):
        nl.lora_forward(x, w, a, b.T, 1.0)
    with pytest.raises(nl.ShapeError, match=r"expected lora_a of shape \(4, 8\), got \(4, 9\)"):
        nl.lora_forward(x, w, np.zeros((4, 9), np.float32), b, 1.0)
    with pytest.raises(nl.ShapeError, match=r"expected x of shape \(2, 8\) \(in_features = 8\), got \(2, 7\)"):
        nl.lora_forward(x[:, :7], w, a, b, 1.0)
    with pytest.raises(nl.ShapeError, match=r"expected bias of shape \(16,\), got \(8,\)"):
        nl.lora_forward(x, w, a, b, 1.0, bias[:8])
    with pytest.raises(nl.ShapeError, match="2-D"):
        nl.lora_forward(x, w[0], a, b, 1.0)
    with pytest.raises(nl.ShapeError, match="1-D or 2-D"):
        nl.lora_forward(x[None], w, a, b, 1.0)
    with pytest.raises(nl.ShapeError, match="non-empty"):
        nl.lora_forward(x, w, np.zeros((0, 8), np.float32), np.zeros((16, 0), np.float32), 1.0)
    with pytest.raises(nl.ShapeError, match=r"expected out of shape \(2, 16\)"):
        nl.lora_forward(x, w, a, b, 1.0, out=np.empty((16, 2), np.float32))
    with pytest.raises(nl.ShapeError, match="C-contiguous"):
        nl.lora_forward(x, w, a, b, 1.0, out=np.empty((16, 2), np.float32).T)


def test_forward_dtype_errors(rng):
    x, w, a, b, _ = _case(rng, 2, 16, 8, 4)
    with pytest.raises(nl.DTypeError, match="x must have dtype float32 or float64, got int32"):
        nl.lora_forward(x.astype(np.int32), w, a, b, 1.0)
    with pytest.raises(TypeError, match="float16"):
        nl.lora_forward(x, w.astype(np.float16), a, b, 1.0)
    with pytest.raises(nl.DTypeError, match="complex128"):
        nl.lora_forward(x, w, a.astype(np.complex128), b, 1.0)
    with pytest.raises(nl.DTypeError, match="scaling must be a real number"):
        nl.lora_forward(x, w, a, b, "2")
    with pytest.raises(nl.ConfigError, match="finite"):
        nl.lora_forward(x, w, a, b, float("nan"))
    with pytest.raises(nl.DTypeError, match="float32"):
        nl.lora_forward(x, w, a, b, 1.0, out=np.empty((2, 16), np.float64))


def test_mixed_precision_promotes(rng):
    x, w, a, b, _ = _case(rng, 2, 16, 8, 4)
    y = nl.lora_forward(x.astype(np.float64), w, a, b, 1.0)
    assert y.dtype == np.float64
    _close(y, lora_forward_ref(x, w, a, b, 1.0), np.float64)


def test_lists_are_accepted(rng):
    y = nl.lora_forward([1.0, 2.0], [[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0]], [[1.0], [0.0]], 0.5)
    assert np.allclose(y, [1 + 1.5, 2.0])


@pytest.mark.parametrize("shape", [(64, 128), (37, 70), (3, 17), (9, 16)])
def test_simd_and_portable_merges_agree_to_the_bit(rng, monkeypatch, shape):
    """The SIMD merge kernels compute the same sums in the same order as the portable
    ones: a record made by one unmerges exactly with the other."""
    from numlora.kernels import lora as k

    if k.SIMD_LANES == 0:
        pytest.skip("no SIMD kernels on this CPU / configuration")
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w[0, : shape[1] // 2] = 1e-30
    a = rng.standard_normal((5, shape[1])).astype(np.float32)
    b = rng.standard_normal((shape[0], 5)).astype(np.float32)
    simd = w.copy()
    nl.merge_lora(simd, a, b, 0.9)
    rec = nl.merge_lora(w2 := w.copy(), a, b, 0.9, record=True)
    monkeypatch.setattr(k, "SIMD_LANES", 0)
    portable = w.copy()
    nl.merge_lora(portable, a, b, 0.9)
    assert np.array_equal(simd.view(np.uint32), portable.view(np.uint32))
    assert np.array_equal(w2.view(np.uint32), portable.view(np.uint32))
    nl.unmerge_lora(w2, a, b, 0.9, record=rec)  # portable unmerge of a SIMD record
    assert np.array_equal(w2.view(np.uint32), w.view(np.uint32))


def _records_equal(r1, r2):
    assert np.array_equal(r1.corr, r2.corr)
    assert np.array_equal(r1.exc_count, r2.exc_count)
    assert np.array_equal(r1.saved_rows, r2.saved_rows)
    assert np.array_equal(r1.saved.view(np.uint32), r2.saved.view(np.uint32))
    for i, c in enumerate(r1.exc_count.tolist()):
        if c <= r1.exc_col.shape[1]:  # slots past the count (or of a row kept whole) are unused
            assert np.array_equal(r1.exc_col[i, :c], r2.exc_col[i, :c])
            assert np.array_equal(r1.exc_bits[i, :c], r2.exc_bits[i, :c])


@pytest.mark.parametrize("shape", [(64, 128), (37, 70), (3, 17), (9, 16), (12, 4099)])
@pytest.mark.parametrize("scale", [0.9, -2.5])
def test_fused_tracked_merge_records_what_the_portable_kernels_record(rng, monkeypatch, shape, scale):
    """The float32 SIMD tracked merge (delta, record and update in one pass) leaves the
    same weight and the same record as the portable kernels, on weights with signed
    zeros, subnormals, infinities, values near the largest float and elements absorbed
    by the delta (a few per row: exception slots; most of a row: the row kept whole);
    each kernel's unmerge restores the other's merge bit for bit."""
    from numlora.kernels import lora as k

    if k.SIMD_LANES == 0:
        pytest.skip("no SIMD kernels on this CPU / configuration")
    m, n = shape
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w[0, : n // 2] = 1e-30  # more exceptions than slots where n // 2 > 16
    w[1 % m, :5] = 1e-30  # a few exceptions
    w[2 % m, ::2] = -0.0
    w[2 % m, 1::4] = np.finfo(np.float32).smallest_subnormal
    w[m - 1, n - 1] = np.inf
    w[m - 1, 0] = -np.finfo(np.float32).max / 4
    a = rng.standard_normal((5, n)).astype(np.float32)
    b = rng.standard_normal((m, 5)).astype(np.float32)
    simd = w.copy()
    rec_simd = nl.merge_lora(simd, a, b, scale, record=True)
    with monkeypatch.context() as mp:
        mp.setattr(k, "SIMD_LANES", 0)
        portable = w.copy()
        rec_portable = nl.merge_lora(portable, a, b, scale, record=True)
    assert np.array_equal(simd.view(np.uint32), portable.view(np.uint32))
    _records_equal(rec_simd, rec_portable)
    assert rec_simd.exc_count.max() > 0
    assert (0 in rec_simd.saved_rows.tolist()) == (n // 2 > 16)
    nl.unmerge_lora(simd, a, b, scale, record=rec_portable)  # SIMD unmerge, portable record
    with monkeypatch.context() as mp:
        mp.setattr(k, "SIMD_LANES", 0)
        nl.unmerge_lora(portable, a, b, scale, record=rec_simd)  # and the other way round
    assert np.array_equal(simd.view(np.uint32), w.view(np.uint32))
    assert np.array_equal(portable.view(np.uint32), w.view(np.uint32))


@pytest.mark.parametrize("fif", [False, True])
def test_record_refilled_after_its_unmerge_restores_bit_for_bit(rng, fif):
    """merge_lora(record=<used record>) refills the record's arrays in place (no new
    record) and the refilled record restores the weight bit for bit, again and again,
    with exceptions and rows kept whole, for another adapter too."""
    w = (rng.standard_normal((40, 70)) * 0.02).astype(np.float32)
    if fif:
        w = np.ascontiguousarray(w.T)
    w[3, :30] = 1e-30  # absorbed: the row the kernels see (a row of W, or of W^T stored) is kept whole
    w[5, :4] = 1e-30  # a few exceptions
    orig = w.copy()
    rec = None
    for _ in range(3):
        a = rng.standard_normal((4, 70)).astype(np.float32)
        b = rng.standard_normal((40, 4)).astype(np.float32)
        fresh = orig.copy()
        want = nl.merge_lora(fresh, a, b, 1.5, fif, record=True)
        if rec is None:
            rec = nl.merge_lora(w, a, b, 1.5, fif, record=True)
            arrays = (rec.corr, rec.exc_col, rec.exc_bits, rec.exc_count)
        else:
            assert nl.merge_lora(w, a, b, 1.5, fif, record=rec) is rec
            assert all(x is y for x, y in zip((rec.corr, rec.exc_col, rec.exc_bits, rec.exc_count), arrays))
        assert not rec.used
        _assert_bit_exact(w, fresh)
        assert rec.saved_rows.tolist() == want.saved_rows.tolist() and 3 in want.saved_rows.tolist()
        assert want.exc_count[5] >= 4
        assert np.array_equal(rec.corr, want.corr)
        nl.unmerge_lora(w, a, b, 1.5, fif, record=rec)
        _assert_bit_exact(w, orig)
        assert rec.used


def test_record_refill_refuses_misuse(rng):
    from numlora.errors import MergeStateError

    w = (rng.standard_normal((16, 24)) * 0.02).astype(np.float32)
    a = rng.standard_normal((2, 24)).astype(np.float32)
    b = rng.standard_normal((16, 2)).astype(np.float32)
    orig = w.copy()
    rec = nl.merge_lora(w, a, b, 1.0, record=True)
    merged = w.copy()
    with pytest.raises(MergeStateError, match="not been used yet"):
        nl.merge_lora(w, a, b, 1.0, record=rec)  # it still restores the merged weight
    _assert_bit_exact(w, merged)
    nl.unmerge_lora(w, a, b, 1.0, record=rec)
    for other in (np.zeros((24, 16), np.float32), np.zeros((16, 25), np.float32), np.zeros((16, 24))):
        with pytest.raises(MergeStateError, match="expected a writeable C-contiguous"):
            nl.merge_lora(other, a[:, : other.shape[1]] if other.shape[1] <= 24 else np.zeros((2, 25)),
                          np.zeros((other.shape[0], 2)), 1.0, record=rec)
        assert not other.any()  # refused before anything was written
    rec.corr = rec.corr[:, ::2]
    with pytest.raises(MergeStateError, match="corr"):
        nl.merge_lora(w, a, b, 1.0, record=rec)
    _assert_bit_exact(w, orig)
