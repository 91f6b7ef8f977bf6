"""LoraBank / multi_lora_forward: many adapters in one batch (numlora.multi)."""

import numpy as np
import pytest

import numlora as nl
from numlora.multi import BUCKETS, REF_ROWS, LoraBank, multi_lora_forward

from reference import multi_lora_ref

OUT, IN = 96, 128


def _adapters(rng, ranks, out_f=OUT, in_f=IN):
    ads = []
    for r in ranks:
        a = rng.standard_normal((r, in_f), dtype=np.float32) * np.float32(0.1)
        b = rng.standard_normal((out_f, r), dtype=np.float32) * np.float32(0.1)
        ads.append((a, b, float(rng.uniform(0.25, 4.0))))
    return ads


def _bank(rng, base, ranks, **kw):
    out_f, in_f = base.shape
    bank = LoraBank(base, **kw)
    ads = _adapters(rng, ranks, out_f, in_f)
    for k, (a, b, s) in enumerate(ads):
        assert bank.add(f"ad{k}", a, b, s) == k
    return bank, ads


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


RANKS = [1, 2, 3, 7, 8, 16, 17, 31, 33, 64, 5, 12]


@pytest.fixture
def dense(rng):
    return rng.standard_normal((OUT, IN), dtype=np.float32) * np.float32(0.2)


def test_dense_matches_reference(rng, dense):
    bank, ads = _bank(rng, dense, RANKS)
    n = 50
    x = rng.standard_normal((n, IN), dtype=np.float32)
    ids = rng.integers(-1, len(ads), n)
    scale = rng.uniform(0.0, 2.0, n).astype(np.float32)
    y = bank.forward(x, ids, scale=scale)
    ref = multi_lora_ref(x, dense, ads, ids, scale)
    assert y.dtype == np.float32 and y.shape == (n, OUT)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    # by name, None for the base alone, and the functional form
    names = [None if k < 0 else f"ad{k}" for k in ids]
    assert np.array_equal(_bits(multi_lora_forward(x, bank, names, scale=scale)), _bits(y))


def test_nf4_matches_reference(rng):
    w = rng.standard_normal((OUT, IN), dtype=np.float32)
    t = nl.quantize_nf4(w, blocksize=64)
    bank, ads = _bank(rng, t, RANKS)
    x = rng.standard_normal((40, IN), dtype=np.float32)
    ids = rng.integers(-1, len(ads), 40)
    y = bank.forward(x, ids)
    ref = multi_lora_ref(x, nl.dequantize_nf4(t), ads, ids)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_base_only_rows_equal_plain_product(rng, dense):
    bank, _ = _bank(rng, dense, [4, 8])
    x = rng.standard_normal((9, IN), dtype=np.float32)
    y = bank.forward(x, [-1] * 9)
    np.testing.assert_allclose(y, x.astype(np.float64) @ dense.T.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_bias_and_one_dimensional_input(rng, dense):
    bias = rng.standard_normal(OUT).astype(np.float32)
    bank = LoraBank(dense, bias=bias)
    ads = _adapters(rng, [6])
    bank.add("a", *ads[0])
    x = rng.standard_normal(IN).astype(np.float32)
    y = bank.forward(x, "a", scale=0.5)
    assert y.shape == (OUT,)
    ref = multi_lora_ref(x, dense, ads, [0], [0.5], bias)[0]
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    y2 = bank.forward(x[None], ["a"], scale=[0.5])
    assert np.array_equal(_bits(y2[0]), _bits(y))


def test_float64_inputs_and_out_buffer(rng, dense):
    bank, ads = _bank(rng, dense.astype(np.float64), [3, 9])
    x = rng.standard_normal((5, IN))
    out = np.full((5, OUT), np.nan, np.float32)
    ids = np.array([0, 1, -1, 1, 0])
    got = bank.forward(x, ids, out=out)
    assert got is out
    ref = multi_lora_ref(x.astype(np.float32), dense, ads, ids)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_empty_batch(rng, dense):
    bank, _ = _bank(rng, dense, [2])
    y = bank.forward(np.zeros((0, IN), np.float32), np.zeros(0, np.int64))
    assert y.shape == (0, OUT)


# --- a row's result does not depend on the batch ------------------------------------------

def _stability_check(rng, bank, n_ads, in_f, sizes=(1, 2, 3, 5, 16, 17, 64, 100, 256, 300)):
    n = max(sizes)
    x = rng.standard_normal((n, in_f), dtype=np.float32)
    ids = rng.integers(-1, n_ads, n)
    scale = rng.uniform(0.5, 1.5, n).astype(np.float32)
    full = bank.forward(x, ids, scale=scale)
    for m in sizes:
        rows = rng.choice(n, m, replace=False)
        sub = bank.forward(x[rows], ids[rows], scale=scale[rows])
        assert np.array_equal(_bits(sub), _bits(full[rows])), f"sub-batch of {m} rows differs"
    perm = rng.permutation(n)
    got = bank.forward(x[perm], ids[perm], scale=scale[perm])
    assert np.array_equal(_bits(got), _bits(full[perm]))
    # every row alone
    for i in rng.choice(n, 8, replace=False):
        one = bank.forward(x[i], int(ids[i]), scale=scale[i])
        assert np.array_equal(_bits(one), _bits(full[i]))
    # same rows, different neighbours (other adapters, other inputs)
    x2 = rng.standard_normal((n, in_f), dtype=np.float32)
    keep = rng.choice(n, n // 3, replace=False)
    x2[keep] = x[keep]
    ids2 = rng.integers(-1, n_ads, n)
    ids2[keep] = ids[keep]
    s2 = scale.copy()
    s2[~np.isin(np.arange(n), keep)] = 3.0
    got2 = bank.forward(x2, ids2, scale=s2)
    assert np.array_equal(_bits(got2[keep]), _bits(full[keep]))


def test_rows_bit_identical_whatever_the_batch_dense(rng, dense):
    bank, ads = _bank(rng, dense, RANKS)
    _stability_check(rng, bank, len(ads), IN)


def test_a_product_whose_rows_depend_on_their_position_falls_back(rng):
    """OpenBLAS's Haswell SGEMM (AMD Zen 3) sums rows 6-11 of every 12 in another order:
    a bucket check with probes only at the ends passed it and the bank was not
    row-stable. Here a product that does so on purpose must be replaced by the fallback."""
    from numlora.multi.product import RowStableProduct, _dense_exact

    w = rng.standard_normal((24, IN), dtype=np.float32)

    def by_position(x2, out2):  # rows 6-11 of every 12: float64 sums, the rest float32
        for i in range(x2.shape[0]):
            out2[i] = (x2[i].astype(np.float64) @ w.T.astype(np.float64) if i % 12 >= 6 else x2[i] @ w.T)

    p = RowStableProduct(by_position, IN, 24, fallback=_dense_exact(w), fallback_exact=True)
    x = rng.standard_normal((40, IN), dtype=np.float32)
    y = np.empty((40, 24), np.float32)
    p(x, y)
    assert p.fell_back and p.exact
    assert p.bucket(13) == 13 and p.checked == {REF_ROWS: True}  # nothing padded or calibrated
    for n, off in ((1, 7), (13, 20), (40, 0)):
        part = np.empty((n, 24), np.float32)
        p(x[off:off + n], part)
        assert np.array_equal(part, y[off:off + n])
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


    def row_by_row(x2, out2):  # each row alone: the same bits at every position
        for i in range(x2.shape[0]):
            out2[i] = x2[i] @ w.T

    kept = RowStableProduct(row_by_row, IN, 24, fallback=by_position)
    kept(x[:3], np.empty((3, 24), np.float32))
    assert not kept.fell_back and not kept.exact
    assert kept.bucket(3) == 4 and kept.checked[4]


def test_own_products_put_blas_workers_to_sleep_first(rng, monkeypatch):
    """The bank's own product kernels (the dense fallback, the NF4 panels) ask for
    OpenBLAS's spinning workers to sleep first, as the public NF4 products do, from
    ``multi.product.PARK_MIN_ROWS`` rows: a bank's base product often follows a numpy
    product."""
    from numlora.kernels import _jit
    from numlora.multi.product import PARK_MIN_ROWS, _dense_exact, _nf4_panels

    asked = []
    monkeypatch.setattr(_jit, "park_before", lambda work, minimum=_jit.PARK_MIN_ELEMS: asked.append((work, minimum)))
    w = rng.standard_normal((64, IN), dtype=np.float32)
    t = nl.quantize_nf4(w, blocksize=64)
    for product, weight in ((_dense_exact(w), w), (_nf4_panels(t), nl.dequantize_nf4(t))):
        for n in (PARK_MIN_ROWS - 1, PARK_MIN_ROWS + 3):
            asked.clear()
            x = rng.standard_normal((n, IN), dtype=np.float32)
            y = np.empty((n, 64), np.float32)
            product(x, y)
            assert asked == ([] if n < PARK_MIN_ROWS else [(n * w.size, _jit.PARK_MIN_WORK)])
            ref = x.astype(np.float64) @ weight.T.astype(np.float64)
            np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_dense_fixed_order_product(rng):
    """kernels.multi.dense_rows_dot16 and its portable twin: the same bits, a row's bits
    whatever its position or batch, close to the float64 product."""
    from numlora.kernels import multi as km

    w = rng.standard_normal((37, 100), dtype=np.float32)  # 100 columns: whole chunks of 16 and a tail
    x = rng.standard_normal((21, 100), dtype=np.float32)
    y = np.empty((21, 37), np.float32)
    km.dense_rows_dot(w, x, y)
    if km.SIMD_LANES:
        y16 = np.empty_like(y)
        km.dense_rows_dot16(w, x, y16)
        assert np.array_equal(y16, y)
    f = km.dense_rows_dot16 if km.SIMD_LANES else km.dense_rows_dot
    for sl in (slice(5, 6), slice(3, 17), slice(None, None, -1)):
        part = np.empty((len(range(21)[sl]), 37), np.float32)
        f(w, np.ascontiguousarray(x[sl]), part)
        assert np.array_equal(part, y[sl])
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("path", ["tiles", "fused"])
def test_rows_bit_identical_whatever_the_batch_nf4(rng, path):
    t = nl.quantize_nf4(rng.standard_normal((OUT, IN), dtype=np.float32), blocksize=64)
    bank, ads = _bank(rng, t, RANKS, nf4_path=path)
    _stability_check(rng, bank, len(ads), IN)


def test_nf4_fused_path_matches_reference_and_refuses_unknown(rng):
    w = rng.standard_normal((OUT, IN), dtype=np.float32)
    t = nl.quantize_nf4(w, blocksize=64)
    bank, ads = _bank(rng, t, RANKS, nf4_path="fused")
    n = 40
    x = rng.standard_normal((n, IN), dtype=np.float32)
    ids = rng.integers(-1, len(ads), n)
    got = bank.forward(x, ids)
    want = multi_lora_ref(x, nl.dequantize_nf4(t), ads, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    with pytest.raises(nl.ConfigError, match="nf4_path"):
        LoraBank(t, nf4_path="fast")


@pytest.mark.slow
@pytest.mark.parametrize("kind, path", [("dense", None), ("nf4", "tiles"), ("nf4", "fused")])
def test_rows_bit_identical_large_layer(rng, kind, path):
    """At a serving-sized layer (BLAS takes its GEMV / GEMM / small-matrix paths)."""
    out_f, in_f = 1024, 2048
    w = rng.standard_normal((out_f, in_f), dtype=np.float32) * np.float32(0.02)
    base = w if kind == "dense" else nl.quantize_nf4(w)
    kw = {} if kind == "dense" else {"nf4_path": path}
    bank, ads = _bank(rng, base, [8, 16, 64, 32, 8, 24], **kw)
    _stability_check(rng, bank, len(ads), in_f, sizes=(1, 2, 7, 64, 256, 300))


def test_calibration_records_buckets(rng, dense):
    bank, _ = _bank(rng, dense, [2])
    x = rng.standard_normal((3, IN), dtype=np.float32)
    bank.forward(x, [0, 0, -1])
    base = bank._backend.base
    checked = base.checked
    assert checked[REF_ROWS] is True
    assert set(checked) <= set(BUCKETS)
    b = base.bucket(3)
    if base.exact:  # BLAS's rows depend on their position here: numlora's own product, no buckets
        assert base.fell_back and b == 3 and checked == {REF_ROWS: True}
        return
    # the bucket used for 3 rows is the smallest passing one >= 3
    assert b >= 3 and checked[b] and all(not checked.get(c, False) for c in BUCKETS if 3 <= c < b)


def test_not_row_stable_mode_matches_reference(rng, dense):
    bank, ads = _bank(rng, dense, RANKS, row_stable=False)
    assert not bank.row_stable
    x = rng.standard_normal((20, IN), dtype=np.float32)
    ids = rng.integers(-1, len(ads), 20)
    ref = multi_lora_ref(x, dense, ads, ids)
    np.testing.assert_allclose(bank.forward(x, ids), ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    t = nl.quantize_nf4(dense, blocksize=32)
    bank2 = LoraBank(t, row_stable=False)
    for k, (a, b, s) in enumerate(ads):
        bank2.add(f"ad{k}", a, b, s)
    ref2 = multi_lora_ref(x, nl.dequantize_nf4(t), ads, ids)
    np.testing.assert_allclose(bank2.forward(x, ids), ref2, rtol=0, atol=2e-5 * np.abs(ref2).max())


def test_parallel_kernel_equals_serial(rng, dense):
    from numlora.kernels import multi as km
    from numlora.multi.cpu import kernel_blocks

    bank, ads = _bank(rng, dense, RANKS)
    n = 40
    x = rng.standard_normal((n, IN), dtype=np.float32)
    ids = rng.integers(0, len(ads), n)
    order = np.argsort(ids, kind="stable")
    sid = ids[order]
    seg = np.concatenate([[0], np.flatnonzero(np.diff(sid)) + 1, [n]]).astype(np.int64)
    sa = sid[seg[:-1]].astype(np.int64)
    scale = np.ones(n, np.float32)
    outs = []
    for fn in (km.multi_lora_add, km.multi_lora_add_serial):
        y = np.zeros((n, OUT), np.float32)
        u = np.empty((n, 64), np.float32)
        snap = bank._registry.snap
        fn(x, order, seg, sa, scale, kernel_blocks(snap), snap.ad_block, snap.ad_off, snap.ad_rank,
           snap.ad_scaling, u, y)
        outs.append(y)
    assert np.array_equal(_bits(outs[0]), _bits(outs[1]))


def _bank_rows_model(x, ids, ads, rowscale, y):
    """The bank's documented arithmetic of one row, in numpy float32 (each step one
    rounding, in order): ``u = 0; u = u + x[j] A^T[j]`` for j in order, ``u = u * (s_k
    rowscale)``, then ``y = y + u[t] B^T[t]`` for t in order."""
    y = y.copy()
    for i, k in enumerate(ids):
        if k < 0:
            continue
        a, b, s = ads[k]
        at, bt = a.T.astype(np.float32), b.T.astype(np.float32)
        u = np.zeros(a.shape[0], np.float32)
        for j in range(x.shape[1]):
            u = u + x[i, j] * at[j]
        u = u * (np.float32(s) * rowscale[i])
        for t in range(u.size):
            y[i] = y[i] + u[t] * bt[t]
    return y


@pytest.mark.parametrize("out_f", [96, 70])
def test_simd_kernel_gives_the_documented_bits(rng, out_f):
    """``multi_lora_add_simd`` (sums in vector registers: four rows and 32 / 16 / 8 columns
    per call, single rows 64 / 16 / 8, the rest element by element) and the element-by-
    element kernel both give the bits of the documented order, written out in numpy:
    ranks below, at and between the vector widths, segments of 1-9 rows (groups of four
    and the rows left over), outputs that end short of a whole vector (70)."""
    from numlora.kernels import multi as km
    from numlora.multi.cpu import kernel_blocks, plan_rows

    if not km.SIMD_LANES:
        pytest.skip("this CPU (or NUMLORA_SIMD=0) has no SIMD build")
    ranks = [1, 7, 8, 9, 16, 17, 24, 31, 33, 64, 80]
    base = rng.standard_normal((out_f, IN), dtype=np.float32)
    bank, ads = _bank(rng, base, ranks)
    ids = np.concatenate([np.full(c, k) for k, c in enumerate([1, 2, 3, 4, 5, 9, 8, 1, 6, 7, 2])])
    ids = np.concatenate([ids, [-1, -1]])
    rng.shuffle(ids)
    n = ids.size
    x = rng.standard_normal((n, IN), dtype=np.float32)
    rowscale = rng.uniform(0.5, 2.0, n).astype(np.float32)
    y0 = rng.standard_normal((n, out_f), dtype=np.float32)
    snap = bank._registry.snap
    want = _bank_rows_model(x, ids, ads, rowscale, y0)
    for fn in (km.multi_lora_add_simd_serial, km.multi_lora_add_simd, km.multi_lora_add_serial):
        order, seg, sa, u = plan_rows(snap, ids.astype(np.int64))
        y = y0.copy()
        fn(x, order, seg, sa, rowscale, kernel_blocks(snap), snap.ad_block, snap.ad_off, snap.ad_rank,
           snap.ad_scaling, u, y)
        assert np.array_equal(_bits(y), _bits(want)), fn


# --- add / remove -------------------------------------------------------------------------

def test_add_remove_ids_and_names(rng, dense):
    bank, ads = _bank(rng, dense, [4, 8, 16])
    assert len(bank) == 3 and bank.names == ["ad0", "ad1", "ad2"] and "ad1" in bank
    assert [bank.index(n) for n in bank] == [0, 1, 2]
    assert bank.rank("ad2") == 16 and bank.scaling("ad0") == pytest.approx(ads[0][2])
    x = rng.standard_normal((6, IN), dtype=np.float32)
    ids = np.array([0, 2, 0, -1, 2, 2])
    before = bank.forward(x, ids)
    bank.remove("ad1")
    assert "ad1" not in bank and len(bank) == 2 and bank.index("ad2") == 2
    # other adapters untouched: same storage, same bits
    assert np.array_equal(_bits(bank.forward(x, ids)), _bits(before))
    a2, b2 = bank.lora_arrays("ad2")
    assert np.array_equal(a2, ads[2][0]) and np.array_equal(b2, ads[2][1])
    # the removed id is refused, by id and by name
    with pytest.raises(nl.LayerNotFoundError, match="adapter id 1"):
        bank.forward(x, [1, 0, 0, 0, 0, 0])
    with pytest.raises(KeyError, match="'ad1' is not in the bank"):
        bank.forward(x, ["ad1"] * 6)
    with pytest.raises(nl.LayerNotFoundError):
        bank.remove("ad1")
    # the name can be reused (with another rank); the freed id is given out again
    a, b, s = _adapters(rng, [5])[0]
    k = bank.add("ad1", a, b, s)
    assert k == 1 and bank.rank("ad1") == 5
    y = bank.forward(x, [1, 1, 0, -1, 2, 1])
    ref = multi_lora_ref(x, dense, [ads[0], (a, b, s), ads[2]], [1, 1, 0, -1, 2, 1])
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_churn_keeps_other_adapters_bit_identical(rng, dense):
    bank = LoraBank(dense, block_pages=40)
    live = {}
    for step in range(60):
        if live and rng.random() < 0.4:
            name = rng.choice(sorted(live))
            bank.remove(name)
            del live[name]
        else:
            name = f"n{step}"
            r = int(rng.integers(1, 50))  # some larger than a block: a dedicated block
            a, b, s = _adapters(rng, [r])[0]
            bank.add(name, a, b, s)
            live[name] = (a, b, s)
        for nm, (a, b, _) in live.items():
            ga, gb = bank.lora_arrays(nm)
            assert np.array_equal(ga, a) and np.array_equal(gb, b)
    names = sorted(live)
    ids = bank.ids(names)
    xs = rng.standard_normal((len(names), IN), dtype=np.float32)
    ref = multi_lora_ref(xs, dense, [live[n] for n in names], range(len(names)))
    np.testing.assert_allclose(bank.forward(xs, ids), ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_lora_arrays_are_copies_even_at_rank_one(rng, dense):
    """At rank 1 the stored A^T / B^T transposes are contiguous views of the pool: the
    returned arrays must still be copies (writing to them must not change the bank)."""
    bank, ads = _bank(rng, dense, [1, 3])
    x = rng.standard_normal((2, IN), dtype=np.float32)
    before = bank.forward(x, [0, 1])
    for name in ("ad0", "ad1"):
        a, b = bank.lora_arrays(name)
        assert a.flags.c_contiguous and a.flags.owndata and b.flags.owndata
        a[...] = 9.0
        b[...] = 9.0
    assert np.array_equal(_bits(bank.forward(x, [0, 1])), _bits(before))
    assert np.array_equal(bank.lora_arrays("ad0")[0], ads[0][0])

def test_memory_accounting(rng, dense):
    page = 4 * (IN + OUT)
    bank = LoraBank(dense, block_pages=64)
    assert bank.memory() == {"base": dense.nbytes, "adapters": 0, "pool": 0, "free": 0, "padded": 0, "blocks": 0}
    ranks = [4, 60, 8, 100]  # 100 > 64: a dedicated block
    for k, (a, b, s) in enumerate(_adapters(rng, ranks)):
        bank.add(f"a{k}", a, b, s)
    m = bank.memory()
    assert m["adapters"] == sum(ranks) * page
    assert m["padded"] == len(ranks) * 100 * page
    # 4 + 60 fill block 0, 8 starts block 1, 100 has its own block
    assert m["blocks"] == 3 and m["pool"] == (64 + 64 + 100) * page
    assert m["free"] == m["pool"] - m["adapters"]
    bank.remove("a3")  # the dedicated block is released
    m = bank.memory()
    assert m["blocks"] == 2 and m["pool"] == 128 * page
    bank.remove("a1")
    a, b, s = _adapters(rng, [60])[0]
    bank.add("again", a, b, s)  # reuses the freed pages: no new block
    assert bank.memory()["pool"] == 128 * page
    assert bank.memory()["adapters"] == (4 + 8 + 60) * page


def test_nf4_memory_counts_quantized_base(rng):
    t = nl.quantize_nf4(rng.standard_normal((OUT, IN), dtype=np.float32))
    assert LoraBank(t).memory()["base"] == t.nbytes


# --- errors -------------------------------------------------------------------------------

def test_add_errors(rng, dense):
    bank = LoraBank(dense)
    a, b, s = _adapters(rng, [4])[0]
    bank.add("a", a, b, s)
    with pytest.raises(nl.DuplicateLayerError, match="already in the bank"):
        bank.add("a", a, b, s)
    with pytest.raises(nl.ShapeError, match=r"expected lora_a of shape \(4, 128\), got \(4, 127\)"):
        bank.add("x", a[:, :-1], b, s)
    with pytest.raises(nl.ShapeError, match=r"expected lora_b of shape \(96, 4\), got \(4, 96\)"):
        bank.add("x", a, b.T, s)
    with pytest.raises(nl.ShapeError, match=r"expected lora_b of shape \(96, 4\), got \(96, 3\)"):
        bank.add("x", a, b[:, :3], s)  # ranks of A and B disagree
    with pytest.raises(nl.ShapeError, match="non-empty lora_a"):
        bank.add("x", a[:0], b[:, :0], s)  # rank 0
    with pytest.raises(nl.DTypeError, match="float32 or float64, got int64"):
        bank.add("x", a.astype(np.int64), b, s)
    with pytest.raises(nl.DTypeError, match="float16"):
        bank.add("x", a.astype(np.float16), b, s)
    with pytest.raises(nl.DTypeError, match="scaling must be a real number"):
        bank.add("x", a, b, "2")
    with pytest.raises(nl.ConfigError, match="finite"):
        bank.add("x", a, b, float("inf"))
    with pytest.raises(nl.DTypeError, match="name must be a str"):
        bank.add(3, a, b, s)
    assert len(bank) == 1 and bank.memory()["adapters"] == 4 * 4 * (IN + OUT)


def test_forward_errors(rng, dense):
    bank, _ = _bank(rng, dense, [4, 8])
    x = rng.standard_normal((3, IN), dtype=np.float32)
    with pytest.raises(nl.ShapeError, match=r"expected x of shape \(3, 128\) \(in_features = 128\), got \(3, 5\)"):
        bank.forward(x[:, :5], [0, 0, 0])
    with pytest.raises(nl.ShapeError, match=r"adapters of shape \(3,\), got \(2,\)"):
        bank.forward(x, [0, 1])
    with pytest.raises(nl.LayerNotFoundError, match="adapter id 7"):
        bank.forward(x, [0, 7, 1])
    with pytest.raises(nl.LayerNotFoundError, match="adapter id -2"):
        bank.forward(x, np.array([0, -2, 1]))
    with pytest.raises(nl.LayerNotFoundError, match="'nope' is not in the bank; known adapters: 'ad0', 'ad1'"):
        bank.forward(x, ["ad0", "nope", None])
    with pytest.raises(nl.DTypeError, match="expected adapter names"):
        bank.forward(x, ["ad0", 1.5, None])
    with pytest.raises(nl.ShapeError, match=r"expected scale of shape \(3,\), got \(2,\)"):
        bank.forward(x, [0, 0, 0], scale=np.ones(2))
    with pytest.raises(nl.DTypeError, match="expected out with dtype float32, got float64"):
        bank.forward(x, [0, 0, 0], out=np.empty((3, OUT)))
    with pytest.raises(nl.DTypeError, match="float32 or float64, got int64"):
        bank.forward(x.astype(np.int64), [0, 0, 0])
    with pytest.raises(nl.DTypeError, match="expected a LoraBank"):
        multi_lora_forward(x, object(), [0, 0, 0])


def test_constructor_errors(rng):
    with pytest.raises(nl.ShapeError, match="expected base to be 2-D"):
        LoraBank(np.zeros(5, np.float32))
    with pytest.raises(nl.DTypeError):
        LoraBank(np.zeros((4, 4), np.int32))
    with pytest.raises(nl.ShapeError, match=r"expected bias of shape \(4,\), got \(3,\)"):
        LoraBank(np.zeros((4, 4), np.float32), bias=np.zeros(3, np.float32))
    with pytest.raises(nl.ConfigError, match="block_pages must be >= 1"):
        LoraBank(np.zeros((4, 4), np.float32), block_pages=0)
    with pytest.raises(nl.ConfigError, match="row_stable"):
        LoraBank(np.zeros((4, 4), np.float32), row_stable="yes")


# --- PEFT folders -------------------------------------------------------------------------

def _save(tmp_path, rng, name, rank, modules=("q_proj",)):
    ad = nl.LoraAdapter(nl.LoraConfig(rank, 2.0 * rank + 1, target_modules=modules))
    for m in modules:
        a, b, _ = _adapters(rng, [rank])[0]
        ad.add_lora(m, a, b)
    folder = tmp_path / name
    ad.save_peft(folder)
    return folder, ad


def test_from_peft_folders(rng, dense, tmp_path):
    f1, ad1 = _save(tmp_path, rng, "alice", 4)
    f2, ad2 = _save(tmp_path, rng, "bob", 12)
    bank = LoraBank.from_peft(dense, [f1, f2])
    assert bank.names == ["alice", "bob"]
    l1, l2 = ad1.get_layer("q_proj"), ad2.get_layer("q_proj")
    assert bank.rank("bob") == 12 and bank.scaling("alice") == pytest.approx(l1.scaling)
    x = rng.standard_normal((4, IN), dtype=np.float32)
    ids = ["bob", "alice", None, "bob"]
    ref = multi_lora_ref(x, dense, [(l1.lora_a, l1.lora_b, l1.scaling), (l2.lora_a, l2.lora_b, l2.scaling)],
                         [1, 0, -1, 1])
    np.testing.assert_allclose(bank.forward(x, ids), ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    bank2 = LoraBank.from_peft(dense, {"b": f2}, module="q_proj")
    assert bank2.names == ["b"]
    assert np.array_equal(bank2.lora_arrays("b")[0], bank.lora_arrays("bob")[0])


def test_add_peft_module_choice(rng, dense, tmp_path):
    folder, ad = _save(tmp_path, rng, "two", 3, modules=("q_proj", "v_proj"))
    bank = LoraBank(dense)
    with pytest.raises(nl.ConfigError, match="has 2 layers .*module="):
        bank.add_peft("t", folder)
    bank.add_peft("t", folder, module="v_proj")
    assert np.array_equal(bank.lora_arrays("t")[1], ad.get_layer("v_proj").lora_b)
    with pytest.raises(nl.LayerNotFoundError, match="k_proj"):
        bank.add_peft("u", folder, module="k_proj")
    with pytest.raises(nl.DTypeError, match="one path"):
        LoraBank.from_peft(dense, str(folder))


def test_reserve_preallocates_pages(rng, dense):
    page = 4 * (IN + OUT)
    bank = LoraBank(dense, block_pages=32)
    bank.reserve(70)  # three blocks of 32 pages
    assert bank.memory()["pool"] == 96 * page and bank.memory()["adapters"] == 0
    ads = _adapters(rng, [30, 30, 30])
    for k, (a, b, s) in enumerate(ads):
        bank.add(f"a{k}", a, b, s)
    assert bank.memory()["pool"] == 96 * page  # no new block
    bank.reserve(2)  # 2 x 2 pages are free already
    assert bank.memory()["pool"] == 96 * page
    x = rng.standard_normal((3, IN), dtype=np.float32)
    ref = multi_lora_ref(x, dense, ads, [2, 0, 1])
    np.testing.assert_allclose(bank.forward(x, ["a2", "a0", "a1"]), ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    with pytest.raises(nl.ConfigError, match="pages must be >= 0"):
        bank.reserve(-1)


# --- out= overlapping the inputs, ids out of range, bad arguments (issue 12) --------------

SQ = 64  # a square base, so that out= can be x itself


@pytest.fixture
def square(rng):
    w = rng.standard_normal((SQ, SQ), dtype=np.float32) * np.float32(0.2)
    bank, ads = _bank(rng, w, [3, 8, 5])
    return bank, ads, w


def test_out_overlapping_x_computes_as_with_a_separate_buffer(rng, square):
    bank, ads, w = square
    n = 9
    x = rng.standard_normal((n, SQ), dtype=np.float32)
    ids = np.array([0, 2, -1, 1, 1, 0, 2, -1, 0])
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
    want = bank.forward(x.copy(), ids, scale=scale)
    ref = multi_lora_ref(x, w, ads, ids, scale)
    np.testing.assert_allclose(want, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    # out is x
    xx = x.copy()
    got = bank.forward(xx, ids, scale=scale, out=xx)
    assert got is xx and np.array_equal(_bits(got), _bits(want))
    # out overlaps x shifted by one row (each row written before the next one is read)
    for shift in (1, -1):
        buf = np.empty((n + 1, SQ), np.float32)
        xin, o = (buf[1:], buf[:-1]) if shift == 1 else (buf[:-1], buf[1:])
        xin[...] = x
        got = bank.forward(xin, ids, scale=scale, out=o)
        assert np.array_equal(_bits(got), _bits(want)), shift
    # one row, out is x
    x1 = x[3].copy()
    assert np.array_equal(_bits(bank.forward(x1, 1, scale=scale[3], out=x1)), _bits(want[3]))


def test_out_overlapping_scale_or_adapter_ids(rng, square):
    bank, _, _ = square
    n = 6
    x = rng.standard_normal((n, SQ), dtype=np.float32)
    ids = np.array([1, 0, 2, 2, -1, 0])
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
    want = bank.forward(x, ids, scale=scale)
    out = np.empty((n, SQ), np.float32)
    view = out.reshape(-1)[:n]  # the scale lives in the first row of out
    view[...] = scale
    assert np.array_equal(_bits(bank.forward(x, ids, scale=view, out=out)), _bits(want))
    out = np.zeros((n, SQ), np.float32)
    id_view = out.reshape(-1).view(np.int64)[:n]  # the ids live in out's first row
    id_view[...] = ids
    assert np.array_equal(_bits(bank.forward(x, id_view, scale=scale, out=out)), _bits(want))


def test_out_over_the_base_weight_is_refused(rng, square):
    bank, _, w = square
    before = w.copy()
    x = rng.standard_normal((2, SQ), dtype=np.float32)
    with pytest.raises(nl.ShapeError, match="out shares memory with the bank's base weight"):
        bank.forward(x, [0, 1], out=w[:2])
    with pytest.raises(nl.ShapeError, match="base weight"):
        bank.forward(w[5], 0, out=w[5])
    assert np.array_equal(_bits(w), _bits(before))


@pytest.mark.parametrize("bad", [
    np.array([0, 2**64 - 1], np.uint64),
    np.array([0, 2**63], np.uint64),
    np.array([0, 200], np.uint8),
    [0, 2**64 - 1],
    [0, np.uint64(2**64 - 1)],
    [0, -2**70],
    [0, -2],
])
def test_adapter_ids_out_of_range_never_wrap_to_the_base(rng, dense, bad):
    bank, _ = _bank(rng, dense, [4, 8])
    x = rng.standard_normal((2, IN), dtype=np.float32)
    out = np.full((2, OUT), 7.0, np.float32)
    value = int(bad[1])
    with pytest.raises(nl.LayerNotFoundError, match=rf"adapter id {value} is not in the bank"):
        bank.forward(x, bad, out=out)
    assert (out == 7.0).all()  # nothing written
    with pytest.raises(nl.LayerNotFoundError, match=rf"adapter id {value} "):
        bank.forward(x[0], bad[1])  # one row


def test_small_integer_dtypes_give_the_same_rows(rng, dense):
    bank, ads = _bank(rng, dense, [4, 8, 2])
    x = rng.standard_normal((5, IN), dtype=np.float32)
    ids = [2, -1, 0, 1, 2]
    want = bank.forward(x, np.array(ids, np.int64))
    for dt in (np.int8, np.int32, np.uint8, np.uint64):
        got_ids = np.array(ids, np.int64).astype(dt)  # -1 wraps in the unsigned ones: refused
        if np.dtype(dt).kind == "u":
            with pytest.raises(nl.LayerNotFoundError):
                bank.forward(x, got_ids)
        else:
            assert np.array_equal(_bits(bank.forward(x, got_ids)), _bits(want)), dt
    pos = np.array([2, 0, 1], np.uint16)
    ref = multi_lora_ref(x[:3], dense, ads, pos)
    np.testing.assert_allclose(bank.forward(x[:3], pos), ref, rtol=0, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("adapters, got", [(None, "got None"), (3.5, "got float"), (object(), "got object"),
                                           ("ad0", "got a single str")])
def test_adapters_argument_of_the_wrong_kind(rng, dense, adapters, got):
    bank, _ = _bank(rng, dense, [4])
    x = rng.standard_normal((3, IN), dtype=np.float32)
    with pytest.raises(nl.DTypeError, match=rf"expected adapters with one entry per row of x .*{got}") as e:
        bank.forward(x, adapters)
    assert isinstance(e.value, nl.NumloraError)


def test_scales_must_be_finite_in_float32(rng, dense):
    bank, _ = _bank(rng, dense, [4])
    a, b, _ = _adapters(rng, [4])[0]
    with pytest.raises(nl.ConfigError, match=r"scaling must be finite in float32 .*got 1e\+39"):
        bank.add("big", a, b, 1e39)
    with pytest.raises(nl.ConfigError, match="scaling must be finite"):
        bank.add("nan", a, b, float("nan"))
    assert bank.names == ["ad0"]
    x = rng.standard_normal((3, IN), dtype=np.float32)
    out = np.full((3, OUT), 7.0, np.float32)
    for bad, shown in ((1e39, r"1e\+39"), (float("nan"), "nan"), (-float("inf"), "-inf")):
        s = np.array([1.0, bad, 1.0])
        with pytest.raises(nl.NonFiniteError, match=rf"scale must be finite in float32 .*got {shown} at row 1"):
            bank.forward(x, [0, 0, -1], scale=s, out=out)
    assert (out == 7.0).all()
    with pytest.raises(nl.ConfigError, match=r"scale must be finite in float32 .*got 1e\+39"):
        bank.forward(x[0], 0, scale=1e39)
    with pytest.raises(nl.DTypeError, match="scale must be a real number, got str"):
        bank.forward(x[0], 0, scale="1")
    # the largest float32 is fine (and a plain int scale for one row)
    f32max = float(np.finfo(np.float32).max)
    assert np.isfinite(bank.forward(x[0], -1, scale=f32max)).all()
    assert np.array_equal(_bits(bank.forward(x[0], 0, scale=2)), _bits(bank.forward(x[0], 0, scale=2.0)))


# --- pickling and copies (issue 18) -------------------------------------------------------

def _churned(rng, base, **kw):
    """A bank with history: several blocks, a dedicated block released, free runs, a freed
    id given out again."""
    bank = LoraBank(base, block_pages=16, **kw)
    ads = {}
    for k, r in enumerate([4, 20, 9, 3, 16, 7]):  # 20 > 16: a dedicated block
        a, b, s = _adapters(rng, [r])[0]
        bank.add(f"n{k}", a, b, s)
        ads[f"n{k}"] = (a, b, s)
    for name in ("n1", "n3"):
        bank.remove(name)
        del ads[name]
    a, b, s = _adapters(rng, [2])[0]
    bank.add("late", a, b, s)
    ads["late"] = (a, b, s)
    return bank, ads


def _same_bank(got, want, rng):
    assert got.names == want.names and got.memory() == want.memory()
    for name in want.names:
        assert got.index(name) == want.index(name) and got.rank(name) == want.rank(name)
        assert got.scaling(name) == want.scaling(name)
        for u, w_ in zip(got.lora_arrays(name), want.lora_arrays(name)):
            assert np.array_equal(_bits(u), _bits(w_))
    x = rng.standard_normal((7, want.in_features), dtype=np.float32)
    ids = want.ids([want.names[i % len(want)] if i % 3 else None for i in range(7)])
    assert np.array_equal(_bits(got.forward(x, ids, scale=np.linspace(0.5, 2, 7))),
                          _bits(want.forward(x, ids, scale=np.linspace(0.5, 2, 7))))


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_pickle_round_trip_gives_an_equal_bank(rng, dense, kind):
    import pickle

    base = dense if kind == "dense" else nl.quantize_nf4(dense, blocksize=64)
    bank, ads = _churned(rng, base, bias=rng.standard_normal(OUT).astype(np.float32))
    for proto in (2, pickle.HIGHEST_PROTOCOL):
        back = pickle.loads(pickle.dumps(bank, protocol=proto))
        assert back.device == "cpu" and back.row_stable and repr(back) == repr(bank)
        _same_bank(back, bank, rng)
        # the two banks are independent and evolve alike (same free runs, free ids)
        a, b, s = _adapters(rng, [5])[0]
        assert back.add(f"more{proto}", a, b, s) == bank.add(f"more{proto}", a, b, s)
        back.remove("n0")
        assert "n0" in bank
        bank.remove("n0")
        _same_bank(back, bank, rng)
        bank.add("n0", *ads["n0"])
    x = rng.standard_normal((3, IN), dtype=np.float32)
    want = multi_lora_ref(x, nl.dequantize_nf4(base) if kind == "nf4" else dense, [ads["late"]], [0, 0, -1],
                          None, bank._bias)
    np.testing.assert_allclose(back.forward(x, ["late", "late", None]), want, rtol=0,
                               atol=2e-5 * np.abs(want).max())


def test_pickle_protocol_5_takes_the_pool_out_of_band(rng, dense):
    import pickle

    bank, _ = _churned(rng, dense)
    bufs = []
    data = pickle.dumps(bank, protocol=5, buffer_callback=bufs.append)
    pool = bank.memory()["pool"]
    assert len(data) < pool // 10  # the blocks are not in the pickle stream
    assert sum(memoryview(b).nbytes for b in bufs) >= pool
    # writable buffers (as received into bytearrays) are used where they are, not copied
    received = [bytearray(memoryview(b).cast("B")) for b in bufs]
    back = pickle.loads(data, buffers=received)
    _same_bank(back, bank, rng)
    raw = [np.frombuffer(r, np.uint8) for r in received]
    live = [blk for blk in back._pool.blocks if blk.size]
    assert live and all(any(np.shares_memory(blk, r) for r in raw) for blk in live)
    # read-only buffers (bytes) are copied once, so that later adds can write
    back2 = pickle.loads(data, buffers=[bytes(r) for r in received])
    a, b, s = _adapters(rng, [3])[0]
    back2.add("w", a, b, s)
    assert np.array_equal(back2.lora_arrays("w")[0], a)
    _same_bank(back2.to("cpu"), back2, rng)


def test_pickling_holds_the_pages_it_refers_to(rng, dense):
    """The state of a pickle refers to the pool blocks without a copy: while it lives,
    the pages of an adapter removed meanwhile are not given to another one."""
    import pickle

    bank = LoraBank(dense, block_pages=64)
    a, b, s = _adapters(rng, [8])[0]
    bank.add("a", a, b, s)
    state = bank.__getstate__()
    bank.remove("a")
    a2, b2, s2 = _adapters(rng, [8])[0]
    bank.add("b", a2, b2, s2)  # not into a's pages
    back = LoraBank.__new__(LoraBank)
    back.__setstate__(pickle.loads(pickle.dumps(state)))
    assert back.names == ["a"] and np.array_equal(back.lora_arrays("a")[0], a)
    del state
    bank.remove("b")
    bank.add("c", a2, b2, s2)
    assert bank.memory()["pool"] == 64 * 4 * (IN + OUT)  # once the state is gone, the pages are reused
    # after pickle.dumps nothing stays registered
    pickle.dumps(bank)
    bank.remove("c")
    bank.add("d", a, b, s)
    assert bank.memory()["pool"] == 64 * 4 * (IN + OUT) and bank._registry.snap.readers == 0


def test_copy_gives_a_bank_with_its_own_pool(rng, dense):
    import copy

    bank, ads = _churned(rng, dense)
    for dup in (copy.copy(bank), copy.deepcopy(bank)):
        _same_bank(dup, bank, rng)
        assert not any(np.shares_memory(u, w_) for u in dup._pool.blocks for w_ in bank._pool.blocks
                       if u.size and w_.size)
        a, b, s = _adapters(rng, [6])[0]
        dup.add("only-here", a, b, s)
        assert "only-here" not in bank
        _same_bank(copy.copy(bank), bank, rng)


def test_unpickling_refuses_a_foreign_state():
    with pytest.raises(nl.FormatError, match="expected the state of a pickled LoraBank"):
        LoraBank.__new__(LoraBank).__setstate__({"version": 99})


def test_a_pickle_naming_the_lease_loader_at_its_old_path_loads():
    """Pickles of a bank made while numlora.multi was one module name the loader of the
    reader lease as numlora.multi._no_lease: that name keeps loading (as None)."""
    import pickle

    assert pickle.loads(b"cnumlora.multi\n_no_lease\n)R.") is None


def test_add_refuses_non_finite_adapter_values():
    """A NaN / inf in A or B (or a float64 value beyond float32's range, which the pool
    would store as inf) is refused by add, naming the first bad element; nothing is added."""
    from numlora.errors import NonFiniteError

    bank = LoraBank(np.ones((8, 6), np.float32))
    a, b = np.ones((2, 6), np.float32), np.ones((8, 2), np.float32)
    for bad_a, bad_b, where in ((np.nan, None, "lora_a"), (None, np.inf, "lora_b"), (1e39, None, "lora_a")):
        aa, bb = a.astype(np.float64), b.copy()
        if bad_a is not None:
            aa[1, 3] = bad_a
        if bad_b is not None:
            bb[5, 0] = bad_b
        with pytest.raises(NonFiniteError, match=where):
            bank.add("x", aa, bb)
        assert "x" not in bank and len(bank) == 0
    assert bank.add("x", a, b) == 0


@pytest.mark.parametrize("shape", [(1, 5), (2, 96), (33, 70), (64, 4099), (31, 1), (16, 40), (4104, 24), (8, 8)])
@pytest.mark.parametrize("copy", ["kernel", "SIMD kernel", "numpy tiles"])
def test_transpose_copies_every_element(rng, shape, copy):
    """The tiled transposing copies: the kernels ``LoraBank.add`` packs adapters with, and
    the numpy column tiles the dense base product runs after ``W @ x^T``: every element
    lands at its transposed place, bit for bit, for shapes off the tile sizes."""
    from numlora._backward import transpose_copy
    from numlora.kernels import multi as km

    if copy == "SIMD kernel" and not km.SIMD_LANES:
        pytest.skip("the register transpose needs the SIMD build")
    src = rng.standard_normal(shape, dtype=np.float32)
    src.reshape(-1)[:: 7] = -0.0
    src.reshape(-1)[3:: 11] = np.nan  # any bit pattern: a copy
    dst = np.full(shape[::-1], np.inf, np.float32)
    if copy == "kernel":
        km._transpose_into(src, dst.reshape(-1))
    elif copy == "SIMD kernel":
        km._transpose8_into(src, dst.reshape(-1))
    else:
        transpose_copy(src, dst)
    assert np.array_equal(_bits(dst), _bits(np.ascontiguousarray(src.T)))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64])
def test_dense_base_rows_match_blas_product(rng, dense, n):
    """Base-only rows of a dense bank (the product taken as ``W @ x^T`` at 2-256 rows)
    against float64 ``x W^T``, with and without a given ``out``, and the layers'
    ``linear_forward`` to float32 rounding."""
    bank = LoraBank(dense)
    x = rng.standard_normal((n, IN), dtype=np.float32)
    ref = x.astype(np.float64) @ dense.T.astype(np.float64)
    y = bank.forward(x, -np.ones(n, np.int64))
    out = np.full((n, OUT), np.nan, np.float32)
    assert bank.forward(x, [-1] * n, out=out) is out
    assert np.array_equal(_bits(out), _bits(y))
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    np.testing.assert_allclose(y, nl.linear_forward(x, dense), rtol=0, atol=2e-6 * np.abs(ref).max())
