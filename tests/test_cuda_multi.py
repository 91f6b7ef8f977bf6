"""LoraBank on the GPU (``bank.to("cuda")``): the many-adapter forward against the CPU bank
and tests/reference.py, row stability, add / remove into the device pool, moves.

Run as tests/test_cuda.py is: on a GPU ``pytest -m gpu tests/test_cuda_multi.py``; without
one, ``test_cuda_multi_on_the_simulator`` re-runs this file in a subprocess with
``NUMBA_ENABLE_CUDASIM=1`` and tiny launch sizes.
"""

from __future__ import annotations

import numpy as np
import pytest

import numlora as nl
from numlora.errors import DeviceError, LayerNotFoundError, ShapeError
from numlora.multi import LoraBank

from cuda_sim import GPU, SIM, cuda_test, d, f32, h, run_simulator_pass, tiny_blocks  # noqa: F401
from reference import multi_lora_ref

OUT, IN = 9, 12
RANKS = [1, 2, 3, 5, 4]  # crosses the simulator's 2-rank shrink chunks; rank 5 > block_pages


@pytest.mark.slow
@pytest.mark.skipif(SIM or GPU, reason="the tests run directly in this process")
def test_cuda_multi_on_the_simulator():
    run_simulator_pass(__file__, 7)


def test_cpu_bank_device_and_to_cpu_is_self():
    bank = LoraBank(np.ones((OUT, IN), np.float32))
    assert bank.device == "cpu" and bank.to("cpu") is bank


def _adapters(rng, ranks=RANKS):
    return [(f32(rng, r, IN) * np.float32(0.5), f32(rng, OUT, r) * np.float32(0.5), float(rng.uniform(0.5, 2.0)))
            for r in ranks]


def _banks(rng, nf4, row_stable=True):
    """A CPU bank with small pool blocks (4 pages: several blocks and one dedicated to the
    rank-5 adapter) and its GPU copy."""
    w = f32(rng, OUT, IN)
    bias = f32(rng, OUT)
    base = nl.quantize_nf4(w, 4) if nf4 else w
    cpu = LoraBank(base, bias=bias, block_pages=4, row_stable=row_stable)
    ads = _adapters(rng)
    for k, (a, b, s) in enumerate(ads):
        cpu.add(f"ad{k}", a, b, s)
    wd = nl.dequantize_nf4(base) if nf4 else w
    return cpu, cpu.to("cuda"), ads, wd.astype(np.float64), bias


def _bound(x, wd, ads, ids, scale, bias):
    """Sum of |terms| of each output (the scale of float32 rounding)."""
    ab = [(np.abs(a), np.abs(b), abs(s)) for a, b, s in ads]
    return multi_lora_ref(np.abs(x), np.abs(wd), ab, ids, None if scale is None else np.abs(scale), np.abs(bias))


def _close(got, want, bound):
    err = np.abs(np.asarray(got, np.float64) - want)
    assert (err <= 1e-5 * bound + 1e-30).all(), float((err / (bound + 1e-30)).max())


@cuda_test
@pytest.mark.parametrize("nf4,row_stable", [(False, True), (True, True), (True, False)])
def test_forward_matches_the_cpu_bank_and_the_reference(nf4, row_stable):
    rng = np.random.default_rng(3 + nf4 + 2 * row_stable)
    cpu, gpu, ads, wd, bias = _banks(rng, nf4, row_stable)
    assert gpu.device == "cuda" and cpu.device == "cpu" and "device='cuda'" in repr(gpu)
    n = 11
    x = f32(rng, n, IN)
    ids = rng.integers(-1, len(ads), n)
    ids[:3] = [2, -1, 2]  # repeats and the base alone
    scale = rng.uniform(0.0, 2.0, n).astype(np.float32)
    y = gpu.forward(d(x), ids, scale=scale)
    assert nl.is_device_array(y) and tuple(y.shape) == (n, OUT)
    want = multi_lora_ref(x, wd, ads, ids, scale, bias)
    bound = _bound(x, wd, ads, ids, scale, bias)
    _close(h(y), want, bound)
    _close(h(y), cpu.forward(x, ids, scale=scale).astype(np.float64), bound)
    # names, device ids and scale, an out buffer, the functional form
    names = [None if k < 0 else f"ad{k}" for k in ids]
    out = d(np.zeros((n, OUT), np.float32))
    y2 = nl.multi_lora_forward(d(x), gpu, names, scale=d(scale), out=out)
    assert y2 is out
    _close(h(y2), want, bound)
    # one row (1-D), with and without an adapter; an empty batch
    for k in (3, None):
        got = gpu(d(x[0]), k)
        kk = -1 if k is None else k
        _close(h(got), multi_lora_ref(x[:1], wd, ads, [kk], None, bias)[0], _bound(x[:1], wd, ads, [kk], None, bias)[0])
    assert h(gpu(d(np.zeros((0, IN), np.float32)), [])).shape == (0, OUT)


@cuda_test
@pytest.mark.parametrize("nf4", [False, True])
def test_rows_are_bit_stable_on_the_gpu(nf4):
    """A row's output does not depend on the rest of the batch: the base kernel sums each
    output in one fixed order whatever the tile, the shrink / expand per row too (and an
    NF4 base in row-stable mode never takes the batch-1 GEMV)."""
    rng = np.random.default_rng(9)
    _, gpu, ads, _, _ = _banks(rng, nf4)
    probe = f32(rng, IN)
    alone = h(gpu(d(probe), 3))
    for n, pos in ((2, 1), (5, 0), (7, 6), (20, 13)):
        x = f32(rng, n, IN)
        x[pos] = probe
        ids = rng.integers(-1, len(ads), n)
        ids[pos] = 3
        y = h(gpu(d(x), ids))
        assert np.array_equal(y[pos].view(np.uint32), alone.view(np.uint32)), (n, pos)


@cuda_test
def test_add_remove_on_the_gpu_and_back():
    rng = np.random.default_rng(12)
    cpu, gpu, ads, wd, bias = _banks(rng, False)
    mem_cpu = cpu.memory()
    assert gpu.memory() == mem_cpu
    # host arrays and device arrays both go into the device pool
    a, b = f32(rng, 2, IN), f32(rng, OUT, 2)
    k_host = gpu.add("new-host", a, b, 1.5)
    k_dev = gpu.add("new-dev", d(a), d(b), 0.5)
    assert "new-host" not in cpu and len(cpu) == len(ads)  # the CPU bank is left as it was
    for name in ("new-host", "new-dev"):
        ga, gb = gpu.lora_arrays(name)
        assert nl.is_device_array(ga)
        assert np.array_equal(h(ga), a) and np.array_equal(h(gb), b)
    gpu.remove("ad1")
    gpu.remove("ad3")  # rank 5: its dedicated block is released
    k_re = gpu.add("again", f32(rng, 2, IN), f32(rng, OUT, 2), 1.0)  # reuses freed pages / ids
    assert k_re in (1, 3)
    all_ads = {k: ad for k, ad in enumerate(ads) if k not in (1, 3)}
    all_ads[k_host] = (a, b, 1.5)
    all_ads[k_dev] = (a, b, 0.5)
    aa, bb = gpu.lora_arrays("again")
    all_ads[k_re] = (h(aa), h(bb), 1.0)
    ids = np.array(sorted(all_ads) + [-1, k_dev, 0])
    x = f32(rng, ids.size, IN)
    table = [all_ads.get(k, (np.zeros((1, IN)), np.zeros((OUT, 1)), 0.0)) for k in range(max(all_ads) + 1)]
    y = h(gpu(d(x), ids))
    _close(y, multi_lora_ref(x, wd, table, ids, None, bias), _bound(x, wd, table, ids, None, bias))
    with pytest.raises(LayerNotFoundError):
        gpu(d(x[:1]), [1 if k_re != 1 else 3])
    # back to the host: the same names, ids, values (bit for bit) and outputs
    back = gpu.to("cpu")
    assert back.device == "cpu" and back.names == gpu.names and back.memory() == gpu.memory()
    for name in back.names:
        for u, w_ in zip(back.lora_arrays(name), gpu.lora_arrays(name)):
            assert np.array_equal(u.view(np.uint32), h(w_).view(np.uint32))
    _close(back(x, ids), multi_lora_ref(x, wd, table, ids, None, bias), _bound(x, wd, table, ids, None, bias))
    gpu.reserve(20)
    assert gpu.memory()["free"] >= 20 * 4 * (IN + OUT)


@cuda_test
def test_errors_say_expected_and_got():
    rng = np.random.default_rng(1)
    cpu, gpu, ads, _, _ = _banks(rng, False)
    with pytest.raises(DeviceError, match="to_device"):
        gpu(f32(rng, 2, IN), [0, 1])  # host x to a GPU bank
    with pytest.raises(DeviceError, match="to_host"):
        cpu.add("x", d(f32(rng, 2, IN)), d(f32(rng, OUT, 2)))
    with pytest.raises(ShapeError):
        gpu(d(f32(rng, 2, IN + 1)), [0, 1])
    with pytest.raises(ShapeError):
        gpu(d(f32(rng, 2, IN)), [0])
    with pytest.raises(ShapeError):
        gpu.add("bad", d(f32(rng, 2, IN)), d(f32(rng, OUT, 3)))
    assert "bad" not in gpu


@cuda_test
def test_row_plans_staged_through_a_reused_ring(monkeypatch):
    """The per-call row plan goes through a ring of pinned staging slots: with 2 slots and
    growing batches, slots are reused and regrown and every forward still reads its own plan."""
    from numlora.cuda import bank as C

    monkeypatch.setattr(C._Staging, "SLOTS", 2)
    monkeypatch.setattr(C, "_STAGING", C._Staging())
    rng = np.random.default_rng(21)
    cpu, gpu, ads, wd, bias = _banks(rng, False)
    outs, wants = [], []
    for n in (1, 3, 2, 300, 5):  # 300 rows > the first capacity (256): the slot grows
        x = f32(rng, n, IN)
        ids = rng.integers(-1, len(ads), n)
        outs.append(gpu(d(x), ids))  # queued; checked after all
        wants.append((multi_lora_ref(x, wd, ads, ids, None, bias), _bound(x, wd, ads, ids, None, bias)))
    for y, (want, bound) in zip(outs, wants):
        _close(h(y), want, bound)


@cuda_test
def test_gpu_add_refuses_non_finite_host_adapters():
    """A GPU bank checks adapters given as host arrays as the CPU bank does."""
    from numlora.errors import NonFiniteError

    rng = np.random.default_rng(21)
    _, gpu, ads, _, _ = _banks(rng, False)
    a, b = f32(rng, 3, IN), f32(rng, OUT, 3)
    a[2, 1] = np.nan
    with pytest.raises(NonFiniteError, match="lora_a"):
        gpu.add("nan", a, b)
    assert "nan" not in gpu and len(gpu) == len(ads)
