"""numlora._scratch: per-thread buffers reused from call to call (no fresh pages per call),
never shared between threads, and the functions using them give the same results with
several threads at once as alone."""

from __future__ import annotations

import threading

import numpy as np

import numlora as nl
from numlora import _scratch


def _in_thread(fn):
    box = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join()
    return box[0]


def _at_once(fn, cases, calls=10):
    """fn(*case) for every case, each case in its own thread and all threads at once,
    ``calls`` times each; the last result of each case."""
    got = [None] * len(cases)

    def work(i):
        for _ in range(calls):
            got[i] = fn(*cases[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_a_buffer_is_reused_aligned_grown_and_per_thread():
    _scratch.free()
    a = _scratch.scratch("t.a", 1000, np.float64)
    assert a.shape == (1000,) and a.dtype == np.float64 and a.ctypes.data % 64 == 0
    b = _scratch.scratch("t.a", 10, np.float32)  # smaller: the same memory
    assert np.shares_memory(a, b) and b.ctypes.data % 64 == 0
    c = _scratch.scratch("t.a", 5000, np.float64)  # larger: grown
    assert c.shape == (5000,) and c.ctypes.data % 64 == 0
    assert np.shares_memory(c, _scratch.scratch("t.a", 5000, np.float64))
    assert not np.shares_memory(c, _scratch.scratch("t.b", 5000, np.float64))
    other = _in_thread(lambda: _scratch.scratch("t.a", 5000, np.float64))
    assert not np.shares_memory(c, other)
    _scratch.free("t.a")
    assert not np.shares_memory(c, _scratch.scratch("t.a", 5000, np.float64))
    assert "t.b" in _scratch._LOCAL.__dict__
    _scratch.free()
    assert _scratch._LOCAL.__dict__ == {}


def test_dora_rows_reuse_the_threads_buffer():
    """DoRA's float64 row chunks come from the thread's scratch: two calls use the same
    memory (a fresh 8 MiB chunk per call was fresh pages every other call)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 64)).astype(np.float32)
    a = rng.standard_normal((4, 64)).astype(np.float32)
    b = rng.standard_normal((300, 4)).astype(np.float32)
    _scratch.free()
    n1 = nl.dora_weight_norm(w, a, b, 0.5)
    buf = _scratch._LOCAL.__dict__["dora.rows"]
    n2 = nl.dora_weight_norm(w, a, b, 0.5)
    assert _scratch._LOCAL.__dict__["dora.rows"] is buf
    want = np.linalg.norm(w.astype(np.float64) + 0.5 * b.astype(np.float64) @ a.astype(np.float64), axis=1)
    np.testing.assert_allclose(n1, want, rtol=1e-12)
    assert np.array_equal(n1, n2)


def test_dora_from_several_threads_at_once_matches_one_thread():
    rng = np.random.default_rng(1)
    cases = []
    for k in range(4):
        out_f = 200 + 150 * k  # chunk counts differ between threads
        w = rng.standard_normal((out_f, 96)).astype(np.float32)
        a = rng.standard_normal((8, 96)).astype(np.float32)
        b = rng.standard_normal((out_f, 8)).astype(np.float32)
        m = rng.uniform(0.5, 2, out_f).astype(np.float32)
        x = rng.standard_normal((5, 96)).astype(np.float32)
        cases.append((x, w, a, b, m))
    def both(x, w, a, b, m):
        return nl.dora_weight_norm(w, a, b, 0.7), nl.dora_forward(x, w, a, b, 0.7, m)

    want = [both(*c) for c in cases]
    got = _at_once(both, cases)
    for (n, y), (wn, wy) in zip(got, want):
        assert np.array_equal(n, wn) and np.array_equal(y, wy)


def test_lora_expand_and_backward_term_reuse_the_threads_buffers():
    """The dense LoRA branch's ``u B^T`` (in row chunks past ``ROW_CHUNK`` rows) and the
    backward's ``s H A`` term come from the thread's scratch: a second call uses the same
    memory (a fresh 512 KiB temporary per call cost 4x the product in page faults), and the
    results stay those of the float64 reference, with chunks that end short."""
    from numlora._backward import ROW_CHUNK

    from reference import lora_forward_ref

    rng = np.random.default_rng(2)
    n, out_f, in_f, r = ROW_CHUNK + 44, 130, 72, 6
    x = rng.standard_normal((n, in_f)).astype(np.float32)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    a = rng.standard_normal((r, in_f)).astype(np.float32)
    b = rng.standard_normal((out_f, r)).astype(np.float32)
    g = rng.standard_normal((n, out_f)).astype(np.float32)
    _scratch.free()
    y1 = nl.lora_forward(x, w, a, b, 0.5)
    gx1, _, _ = nl.lora_backward(x, w, a, b, 0.5, g)
    bufs = {k: _scratch._LOCAL.__dict__[k] for k in ("lora.expand", "lora.hA")}
    y2 = nl.lora_forward(x, w, a, b, 0.5)
    gx2, _, _ = nl.lora_backward(x, w, a, b, 0.5, g)
    assert all(_scratch._LOCAL.__dict__[k] is v for k, v in bufs.items())
    assert np.array_equal(y1, y2) and np.array_equal(gx1, gx2)
    np.testing.assert_allclose(y1, lora_forward_ref(x, w, a, b, 0.5), rtol=2e-5, atol=2e-4)
    x64, w64, a64, b64, g64 = (v.astype(np.float64) for v in (x, w, a, b, g))
    want_gx = g64 @ w64 + 0.5 * (g64 @ b64) @ a64
    np.testing.assert_allclose(gx1, want_gx, rtol=2e-5, atol=2e-4)


def test_lora_forward_and_backward_from_several_threads_at_once_match_one_thread():
    rng = np.random.default_rng(3)
    cases = []
    for k in range(4):
        n, out_f = 40 + 120 * k, 100 + 37 * k  # chunk counts and buffer sizes differ between threads
        x = rng.standard_normal((n, 64)).astype(np.float32)
        w = rng.standard_normal((out_f, 64)).astype(np.float32)
        a = rng.standard_normal((5, 64)).astype(np.float32)
        b = rng.standard_normal((out_f, 5)).astype(np.float32)
        g = rng.standard_normal((n, out_f)).astype(np.float32)
        cases.append((x, w, a, b, g))

    def both(x, w, a, b, g):
        return nl.lora_forward(x, w, a, b, 0.7), nl.lora_backward(x, w, a, b, 0.7, g)[0]

    want = [both(*c) for c in cases]
    got = _at_once(both, cases)
    for (y, gx), (wy, wgx) in zip(got, want):
        assert np.array_equal(y, wy) and np.array_equal(gx, wgx)
