"""numlora.kernels._team: team kernels, whose calling thread waits for the workers with a
bounded spin instead of sleeping in OpenMP's barrier. The split of the tasks, the spin's
two exits, the arguments the wrapper appends, and the same bits whatever the thread count."""

from __future__ import annotations

import numpy as np
import pytest

import numlora as nl
from numlora import _config
from numlora.kernels import _jit
from numlora.kernels import nf4 as kn

pytestmark = pytest.mark.skipif(not kn.SIMD_LANES, reason="team kernels are SIMD kernels (this CPU or "
                                "NUMLORA_SIMD=0 / NUMBA_DISABLE_JIT has none)")


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def test_slot_ranges_cover_every_task_once_in_order():
    import numba

    from numlora.kernels._team import slot_range

    @numba.njit
    def ranges(nslot, ntasks):
        out = np.empty((nslot, 2), np.int64)
        for s in range(nslot):
            out[s, 0], out[s, 1] = slot_range(s, nslot, ntasks)
        return out

    for nslot in range(1, 6):
        for ntasks in range(0, 40):
            r = ranges(nslot, ntasks)
            tasks = [t for lo, hi in r for t in range(lo, hi)]
            assert tasks == list(range(ntasks))
            sizes = r[:, 1] - r[:, 0]
            assert sizes.max() - sizes.min() <= 1


def test_the_wait_ends_at_the_count_or_after_its_budget():
    import time

    import numba

    from numlora.kernels._team import count_in, wait_for

    @numba.njit
    def wait(flags, want, cycles):
        return wait_for(flags, want, cycles)

    @numba.njit
    def add(flags, k):
        for _ in range(k):
            count_in(flags)

    flags = np.zeros(1, np.int64)
    add(flags, 3)
    assert flags[0] == 3
    assert wait(flags, 3, 1 << 40)  # reached: returns at once whatever the budget
    assert wait(flags, 0, 0)
    t0 = time.perf_counter()
    assert not wait(flags, 4, 1_000_000)  # never reached: gives up after ~1e6 cycles
    assert time.perf_counter() - t0 < 1.0


def test_the_wrapper_appends_a_fresh_counter_and_the_slot_count(monkeypatch):
    """Parallel calls get a zeroed one-element int64 counter and numba's thread count; the
    serial build one slot (never waited on)."""
    fwd = kn.nf4_matmul_words
    assert fwd._team
    seen = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __call__(self, *args):
            seen.append((self.name, args[-2].copy(), args[-2].dtype, args[-1]))

    monkeypatch.setattr(fwd, "parallel", Recorder("parallel"))
    monkeypatch.setattr(fwd, "_serial", Recorder("serial"))
    monkeypatch.setattr(_jit.STEER, "active", False)
    monkeypatch.setattr(_config, "SMALL_SERIAL", False)
    args = (np.zeros(8, np.uint8),) * 10 + (np.zeros((1, 4), np.float32),)
    monkeypatch.setattr(_jit, "num_threads", lambda: 2)
    fwd(*args)
    monkeypatch.setattr(_jit, "num_threads", lambda: 1)
    fwd(*args)
    (n1, f1, d1, s1), (n2, f2, d2, s2) = seen
    assert (n1, list(f1), d1, s1) == ("parallel", [0], np.int64, 2)
    assert (n2, list(f2), s2) == ("serial", [0], 1)


@pytest.mark.parametrize("compute_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_team_products_give_the_same_bits_on_one_thread_and_two(n, compute_dtype):
    """The float32 word-decode product, its input gradient at 1-2 rows and the bf16
    dot-product kernel (team kernels) give the bits of their serial builds: the split of
    the tasks between threads changes nothing."""
    import numba

    from numlora.kernels import compute as kc

    if compute_dtype == "bfloat16" and not kc.BF16_DOT:
        pytest.skip("no AVX512-BF16 on this CPU")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")
    g = np.random.default_rng(n)
    t = nl.quantize_nf4(g.standard_normal((1000, 512), dtype=np.float32))  # tasks end short of a slot
    x = g.standard_normal((n, 512), dtype=np.float32)
    a = g.standard_normal((8, 512), dtype=np.float32)
    b = g.standard_normal((1000, 8), dtype=np.float32)
    prev = _config.SMALL_SERIAL
    _config.SMALL_SERIAL = False
    try:
        gy = g.standard_normal((min(n, 2), 1000), dtype=np.float32)  # the input gradient's word kernel: 1-2 rows

        def both():
            return (nl.qlora_forward(x, t, a, b, 0.5, compute_dtype=compute_dtype),
                    nl.nf4_matmul_t(gy, t, compute_dtype=compute_dtype))

        two = both()
        numba.set_num_threads(1)
        try:
            one = both()
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    finally:
        _config.SMALL_SERIAL = prev
    for p, q in zip(two, one):
        assert np.array_equal(_bits(p), _bits(q))
