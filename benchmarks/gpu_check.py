"""Check every numlora.cuda kernel against the CPU kernels on real sizes, and time them.

    python benchmarks/gpu_check.py              # on a machine with an NVIDIA GPU (< 8 min)
    python benchmarks/gpu_check.py --sim-smoke  # tiny sizes on the CUDA simulator (no GPU)

Run from the repository root (numlora is imported from this checkout; no install needed).

Shapes: W (out, in) = 4096 x 4096 and 8192 x 28672, rank 16, batches 1 / 16 / 128.
Correctness first (NF4 codes, scales, dequantized values and the xorshift stream bit for
bit; float results within 1e-5 of the CPU relative to the sum of |terms|), then timings
with CUDA events after warm-up (median of several runs, data already on the device),
against PyTorch ``F.linear`` (cuBLAS float32 and bf16) when torch with CUDA is installed.
Achieved GB/s (bytes the kernel must read and write / time) is printed next to the
device-to-device copy bandwidth measured here (2 x bytes / time of a 1 GiB copy).
At the end: the three figures of issue 7 with PASS / FAIL.
Exit status: 0 all checks passed (figures are reported, not enforced), 1 a check
failed, 2 no GPU (nothing to do).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

# the device machine gets a bare copy of the tree (no editable install): import numlora
# from this checkout, whatever the working directory
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SIM = "--sim-smoke" in sys.argv
if SIM:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba.cuda is imported

import numpy as np  # noqa: E402

import numlora as nl  # noqa: E402

FAILED: list = []
T0 = time.time()


def say(*a):
    print(*a, flush=True)


def check(name, ok, detail=""):
    say(f"  {'ok  ' if ok else 'FAIL'} {name}" + (f"  ({detail})" if detail else ""))
    if not ok:
        FAILED.append(name)


def rel_err(got, want64, bound):
    err = np.abs(np.asarray(got, np.float64) - want64) / (bound + 1e-30)
    return float(err.max()) if err.size else 0.0


def close(name, got, want, bound):
    e = rel_err(got, want, bound)
    check(name, e <= 1e-5, f"max err / sum|terms| = {e:.2e}")


def bits(name, got, want):
    got, want = np.asarray(got), np.asarray(want)
    ok = got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))
    check(name, ok, "bit-identical" if ok else f"{int((got.view(np.uint8) != want.view(np.uint8)).sum())} bytes differ")


class Timing(NamedTuple):
    gpu: float  # seconds of GPU time per call (launch overhead hidden behind a hold kernel)
    wall: float  # seconds of wall time per call, host launch overhead included

    def __str__(self):
        return f"{self.gpu * 1e3:.3f} ms GPU ({self.wall * 1e3:.3f} ms wall/call)"


class GpuTimer:
    """``timer(fn)``: the GPU time of one call of ``fn`` and its wall time.

    GPU time (``gpu_time``): a one-thread *hold* kernel (a loop of ``cuda.nanosleep``,
    ~HOLD_S of GPU time) is launched first, so the host can queue ``inner`` calls while the
    stream is busy; events are recorded around the ``inner`` calls and the elapsed time is
    divided by ``inner``: what the GPU spends, not the Python launch overhead. If queuing
    took longer than the hold (the GPU may have waited for the host), a warning is printed.
    Wall time: ``inner`` calls back to back then a synchronize, divided by ``inner``.
    Everything inside ``cuda.defer_cleanup()`` (no frees, which synchronize, while timing).
    Under the simulator there is no hold (no ``nanosleep``) and the GPU times are meaningless."""

    HOLD_S = 0.02

    def __init__(self, cuda, reps, inner=20, sim=False):
        self.cuda, self.reps, self.inner = cuda, reps, inner
        self.sim = sim
        self.hold = None
        self.warnings = 0
        if not sim:
            self._make_hold()

    def _make_hold(self):
        cuda = self.cuda

        @cuda.jit
        def hold_k(ns, iters):
            for _ in range(iters):
                cuda.nanosleep(ns)

        self.ns = np.uint32(10_000)  # 10 us per sleep (nanosleep takes at most ~1 ms)
        hold_k[1, 1](self.ns, 10)  # compile
        cuda.synchronize()
        per = []
        for _ in range(3):
            a, b = cuda.event(), cuda.event()
            a.record()
            hold_k[1, 1](self.ns, 200)
            b.record()
            b.synchronize()
            per.append(a.elapsed_time(b) / 1e3 / 200)
        per_iter = max(float(np.median(per)), 1e-7)
        self.iters = max(1, int(self.HOLD_S / per_iter))
        self.hold = hold_k
        say(f"hold kernel: {per_iter * 1e6:.1f} us per nanosleep(10 us), {self.iters} iterations ~ "
            f"{self.HOLD_S * 1e3:.0f} ms")

    def gpu_time(self, fn, reps=None, inner=None):
        cuda = self.cuda
        reps = reps or self.reps
        inner = inner or self.inner
        times = []
        queue_s = 0.0
        starved = False
        for _ in range(reps):
            a, b = cuda.event(), cuda.event()
            if self.hold is not None:
                self.hold[1, 1](self.ns, self.iters)
            h0 = time.perf_counter()
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            q = time.perf_counter() - h0
            # the event after the hold already done: the GPU ran dry while the host queued
            done_early = bool(a.query()) if self.hold is not None and hasattr(a, "query") else False
            b.synchronize()
            queue_s = max(queue_s, q)
            starved = starved or done_early or (self.hold is not None and q > self.HOLD_S)
            times.append(a.elapsed_time(b) / 1e3 / inner)
        if starved:
            self.warnings += 1
            say(f"    WARNING: queuing {inner} calls took {queue_s * 1e3:.1f} ms, longer than the "
                f"{self.HOLD_S * 1e3:.0f} ms hold: the GPU may have waited for the host; the GPU time includes gaps")
        return float(np.median(times))

    def wall_time(self, fn, reps=None, inner=None):
        cuda = self.cuda
        inner = inner or self.inner
        reps = reps or min(3, self.reps)
        times = []
        for _ in range(reps):
            cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            cuda.synchronize()
            times.append((time.perf_counter() - t0) / inner)
        return float(np.median(times))

    def __call__(self, fn, warm=2):
        cuda = self.cuda
        if self.sim:
            warm = 0
        with cuda.defer_cleanup():
            for _ in range(warm):
                fn()
            cuda.synchronize()
            g = self.gpu_time(fn)
            w = self.wall_time(fn)
        return Timing(g, w)




_RES_SEEN: set = set()


def kernel_resources(K, extra=()):
    """Registers and local memory (bytes) per thread, and static shared memory per block,
    of every kernel compiled so far (numba-cuda dispatcher API, guarded: printed as n/a
    where it is missing). Local memory > 0 means an array the compiler could not keep in
    registers (or a spill): shown without a profiler."""
    kernels = [(k, v) for k, v in K._cache.items()]
    for name in ("nf4_codes", "merge_plain", "adamw_step"):
        kernels.append(((name,), getattr(K, name)))
    kernels += list(extra)
    for key, d in kernels:
        label = " ".join(str(p) for p in key)
        try:
            regs = d.get_regs_per_thread()
            local = d.get_local_mem_per_thread()
            shared = d.get_shared_mem_per_block()
        except Exception as exc:  # simulator, or an older numba without the API
            if label not in _RES_SEEN:
                _RES_SEEN.add(label)
                say(f"  {label}: resources n/a ({type(exc).__name__})")
            continue
        if not isinstance(regs, dict):
            regs, local, shared = {"": regs}, {"": local}, {"": shared}
        for n, (sig, r) in enumerate(regs.items()):
            tag = f"{label} {sig}"
            if tag in _RES_SEEN:
                continue
            _RES_SEEN.add(tag)
            shown = f"{label} [signature {n}]" if len(regs) > 1 else label
            lm = local.get(sig) if isinstance(local, dict) else local
            sm = shared.get(sig) if isinstance(shared, dict) else shared
            flag = "  <- local memory (spill or local array)" if lm else ""
            say(f"  {shown}: {r} registers/thread, {lm} B local/thread, {sm} B shared/block{flag}")


def torch_cuda():
    try:
        import torch
    except Exception as exc:
        say(f"torch not importable ({exc}): PyTorch comparisons skipped")
        return None
    if SIM or not torch.cuda.is_available():
        say("torch has no CUDA device here: PyTorch comparisons skipped")
        return None
    # cuBLAS float32 in true float32 (no TF32 tensor cores), like numlora's kernels
    torch.backends.cuda.matmul.allow_tf32 = False
    say(f"torch {torch.__version__}: torch.backends.cuda.matmul.allow_tf32 = "
        f"{torch.backends.cuda.matmul.allow_tf32} (float32 F.linear timed as true float32)")
    return torch


def gbs(nbytes, t):
    return nbytes / t / 1e9 if t > 0 else float("nan")


GEMV_SWEEP = ((128, 4), (128, 8), (256, 8), (128, 16))  # (GEMV_THREADS, GEMV_ROWS)
GEMV_SWEEP_SIM = ((4, 2), (4, 4), (8, 2))
#: gemm tiles (BM, BN, BK, TM, TN) tried per batch size by --sweep (dense lora_forward)
GEMM_SWEEP = {16: ((16, 64, 16, 2, 4), (16, 128, 16, 2, 8), (16, 32, 16, 1, 4), (16, 64, 8, 1, 4)),
              128: ((64, 64, 8, 4, 4), (32, 64, 8, 2, 4), (64, 128, 8, 4, 8), (128, 128, 8, 8, 8),
                    (32, 128, 8, 2, 8))}
GEMM_SWEEP_SIM = {3: ((2, 4, 2, 1, 2), (4, 4, 4, 2, 2), (4, 8, 2, 2, 2))}


def gemm_sweep(cuda, K, C, timer, shapes, rng):
    """Dense lora_forward (the tiled kernel, LoRA in its epilogue) for each candidate tile
    of each batch size, checked against the CPU first: pick GEMM_TILES from this."""
    sweep = GEMM_SWEEP_SIM if SIM else GEMM_SWEEP
    default = (K.GEMM_TILES, K.GEMM_TILE)
    say(f"GEMM sweep: lora_forward, tiles (BM, BN, BK, TM, TN) per batch: {sweep}")
    res = []
    try:
        out_f, in_f = shapes[0]
        r = 2 if SIM else 16
        w = (rng.standard_normal((out_f, in_f), dtype=np.float32) * 0.02).astype(np.float32)
        a = (rng.standard_normal((r, in_f), dtype=np.float32) * 0.02).astype(np.float32)
        b = (rng.standard_normal((out_f, r), dtype=np.float32) * 0.02).astype(np.float32)
        dw, da, db = cuda.to_device(w), cuda.to_device(a), cuda.to_device(b)
        for nb, tiles in sweep.items():
            x = rng.standard_normal((nb, in_f), dtype=np.float32)
            dx = cuda.to_device(x)
            want = nl.lora_forward(x, w, a, b, 2.0).astype(np.float64)
            X = np.abs(x.astype(np.float64))
            bound = X @ np.abs(w.T.astype(np.float64)) + 2.0 * (X @ np.abs(a.T)) @ np.abs(b.T)
            y = cuda.device_array((nb, out_f), np.float32)
            for tile in tiles:
                K.GEMM_TILES, K.GEMM_TILE = (), tile
                close(f"lora_forward batch {nb} tile {tile}", C.lora_forward(dx, dw, da, db, 2.0, out=y).copy_to_host(),
                      want, bound)
                t = timer(lambda: C.lora_forward(dx, dw, da, db, 2.0, out=y))
                res.append((nb, tile, t))
                tflops = 2 * nb * out_f * in_f / t.gpu / 1e12 if t.gpu else 0
                say(f"  batch {nb} tile {tile}: {t}, {tflops:.1f} TFLOP/s")
    finally:
        K.GEMM_TILES, K.GEMM_TILE = default
    say(f"| batch | tile (BM, BN, BK, TM, TN) | GPU ms | wall ms | TFLOP/s |  ({shapes[0][0]} x {shapes[0][1]})")
    say("|---|---|---|---|---|")
    for nb, tile, t in res:
        tf = 2 * nb * shapes[0][0] * shapes[0][1] / t.gpu / 1e12 if t.gpu else float("nan")
        say(f"| {nb} | {tile} | {t.gpu * 1e3:.4f} | {t.wall * 1e3:.4f} | {tf:.1f} |")


def gemv_sweep(cuda, K, C, timer, shapes, rng):
    """nf4_matmul batch 1 (the fused GEMV) for each (GEMV_THREADS, GEMV_ROWS) setting."""
    settings = GEMV_SWEEP_SIM if SIM else GEMV_SWEEP
    default = (K.GEMV_THREADS, K.GEMV_ROWS)
    say(f"GEMV sweep: nf4_matmul batch 1, (GEMV_THREADS, GEMV_ROWS) in {settings} (default {default})")
    res = []
    try:
        for out_f, in_f in shapes:
            w = (rng.standard_normal((out_f, in_f), dtype=np.float32) * 0.02).astype(np.float32)
            ht = nl.quantize_nf4(w, 64)
            gt = nl.to_device(ht)
            wdq = nl.dequantize_nf4(ht).astype(np.float64)
            x = rng.standard_normal((1, in_f), dtype=np.float32)
            want, bound = x.astype(np.float64) @ wdq.T, np.abs(x.astype(np.float64)) @ np.abs(wdq.T)
            dx = cuda.to_device(x)
            y = cuda.device_array((1, out_f), np.float32)
            nbytes = gt.packed.size + 4 * gt.scales.size + 4 * (in_f + out_f)
            del w, wdq
            for T, R in settings:
                K.GEMV_THREADS, K.GEMV_ROWS = T, R
                close(f"nf4_matmul {out_f}x{in_f} threads {T} rows {R}", C.nf4_matmul(dx, gt, out=y).copy_to_host(),
                      want, bound)
                t = timer(lambda: C.nf4_matmul(dx, gt, out=y))
                res.append((f"{out_f}x{in_f}", T, R, t))
                say(f"  {out_f}x{in_f} threads {T:4d} rows {R:3d}: {t}, {gbs(nbytes, t.gpu):.0f} GB/s")
    finally:
        K.GEMV_THREADS, K.GEMV_ROWS = default
    say("| shape | GEMV_THREADS | GEMV_ROWS | GPU ms | wall ms | GB/s |")
    say("|---|---|---|---|---|---|")
    for shape, T, R, t in res:
        o, i = (int(v) for v in shape.split("x"))
        nbytes = o * i // 2 + 4 * (o * i // 64) + 4 * (o + i)
        say(f"| {shape} | {T} | {R} | {t.gpu * 1e3:.4f} | {t.wall * 1e3:.4f} | {gbs(nbytes, t.gpu):.0f} |")


def dropout_section(cuda, C, timer, w, a, b, nb, rng):
    """LoRA dropout on the device: the CPU's masks bit for bit, the backward through them."""
    out_f, in_f = w.shape
    p, seed = 0.1, 2024
    x = rng.standard_normal((nb, in_f), dtype=np.float32)
    g = rng.standard_normal((nb, out_f), dtype=np.float32)
    dx_, dg_ = cuda.to_device(x), cuda.to_device(g)
    xd_gpu, st = C.lora_dropout(dx_, p, seed)
    xd_cpu, _ = nl.lora_dropout(x, p, seed)
    bits(f"lora_dropout {nb} x {in_f} (masks)", xd_gpu.copy_to_host(), xd_cpu)
    xo = cuda.device_array(x.shape, np.float32)
    t = timer(lambda: C.lora_dropout(dx_, p, seed, out=xo))
    say(f"  lora_dropout {nb} x {in_f}: {t}, {gbs(2 * x.nbytes, t.gpu):.0f} GB/s")
    dw, da, db = cuda.to_device(w), cuda.to_device(a), cuda.to_device(b)
    gx, ga, gb = (r.copy_to_host() for r in C.lora_backward(dx_, dw, da, db, 2.0, dg_, dropout=st))
    cx, ca, cb = nl.lora_backward(x, w, a, b, 2.0, g, dropout=st)
    X, G = np.abs(xd_cpu.astype(np.float64)), np.abs(g.astype(np.float64))
    A, B, W = (np.abs(v.astype(np.float64)) for v in (a, b, w))
    close("lora_backward with dropout grad_x", gx, cx.astype(np.float64), G @ W + 2.0 / (1 - p) * (G @ B) @ A)
    close("lora_backward with dropout grad_a", ga, ca.astype(np.float64), 2.0 * (G @ B).T @ X)
    close("lora_backward with dropout grad_b", gb, cb.astype(np.float64), 2.0 * G.T @ (X @ A.T))
    tb = timer(lambda: C.lora_backward(dx_, dw, da, db, 2.0, dg_, dropout=st, x_drop=xd_gpu))
    say(f"  lora_backward with dropout batch {nb}: {tb}")


def bank_section(cuda, timer, w, n_adapters, ranks, batch, rng):
    """LoraBank on the GPU (dense and NF4 base): checked against the CPU bank; timed for a
    Zipf mix of adapters, every row its own adapter, and every row the same one."""
    from numlora.multi import LoraBank

    out_f, in_f = w.shape
    res = []
    for kind in ("dense", "nf4"):
        base = w if kind == "dense" else nl.quantize_nf4(w, 64)
        cpu = LoraBank(base)
        for k in range(n_adapters):
            r = int(ranks[k % len(ranks)])
            cpu.add(f"a{k}", (rng.standard_normal((r, in_f), dtype=np.float32) * 0.02).astype(np.float32),
                    (rng.standard_normal((out_f, r), dtype=np.float32) * 0.02).astype(np.float32), 2.0)
        gpu = cpu.to("cuda")
        x = rng.standard_normal((batch, in_f), dtype=np.float32)
        dx = cuda.to_device(x)
        zipf = np.minimum(rng.zipf(1.3, batch) - 1, n_adapters - 1)
        mixes = {"zipf": zipf, "distinct": np.arange(batch) % n_adapters, "same": np.zeros(batch, np.int64)}
        wd = np.abs(w.astype(np.float64) if kind == "dense" else nl.dequantize_nf4(base).astype(np.float64))
        X = np.abs(x.astype(np.float64))
        y = cuda.device_array((batch, out_f), np.float32)
        times = {}
        for mix, ids in mixes.items():
            got = gpu.forward(dx, ids, out=y).copy_to_host()
            want = cpu.forward(x, ids).astype(np.float64)
            bound = X @ wd.T
            for i, k in enumerate(ids):
                a_, b_ = cpu.lora_arrays(f"a{k}")
                bound[i] += 2.0 * np.abs(b_.astype(np.float64)) @ (np.abs(a_.astype(np.float64)) @ X[i])
            close(f"LoraBank {kind} batch {batch}, {n_adapters} adapters, {mix} rows", got, want, bound)
            times[mix] = timer(lambda: gpu.forward(dx, ids, out=y))
            say(f"  LoraBank {kind} {mix}: {times[mix]}")
        res.append({"kind": kind, **{m: t.gpu * 1e3 for m, t in times.items()},
                    **{f"{m}_wall": t.wall * 1e3 for m, t in times.items()}})
        gpu = cpu = None  # free the banks (not del: the timed closures above read these names)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim-smoke", action="store_true", help="tiny sizes on the CUDA simulator")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sweep", action="store_true",
                    help="only re-time nf4_matmul batch 1 for (GEMV_THREADS, GEMV_ROWS) in " + str(GEMV_SWEEP)
                    + " and the dense lora_forward at batch 16 / 128 for the gemm tiles in GEMM_SWEEP (each "
                    "checked against the CPU first), then exit")
    args = ap.parse_args()
    if not nl.device.cuda_available():
        say("no NVIDIA GPU found by numba.cuda: nothing to check. Run this on a machine with a GPU and "
            "`pip install numlora[cuda]`, or try `--sim-smoke` (CUDA simulator, tiny sizes).")
        return 2
    # "grid size < 2 x SMs" and the like: the launch sizes are chosen on purpose here.
    # numba-cuda has its own NumbaPerformanceWarning class (not numba's): filter both.
    import importlib
    import warnings

    from numba import cuda

    for mod in ("numba.core.errors", "numba.cuda.core.errors"):
        try:
            warnings.filterwarnings("ignore", category=importlib.import_module(mod).NumbaPerformanceWarning)
        except (ImportError, AttributeError):
            pass
    if SIM:
        warnings.filterwarnings("ignore", message="Simulator timings are bogus")
    from numlora.cuda import kernels as K
    from numlora.cuda import ops as C

    if SIM:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from sim_patch import lock_simulator_shared_arrays

        lock_simulator_shared_arrays()
        K.THREADS, K.REDUCE_THREADS, K.SHRINK_THREADS, K.GEMV_THREADS, K.GEMV_ROWS = 8, 4, 4, 4, 2
        K.GEMM_TILES, K.GEMM_TILE = ((1, (2, 4, 2, 1, 2)), (3, (4, 4, 4, 2, 2))), (4, 8, 2, 2, 2)
        K.RNG_CHUNK_LOG2, K.RNG_STAGE = 2, 2
        K.MULTI_THREADS, K.MULTI_RANKS, K.DROP_CHUNK_LOG2 = 4, 2, 2
        sys.setswitchinterval(5e-5)
        shapes, batches, rank, reps = [(8, 16), (6, 24)], (1, 3), 2, 1
    else:
        shapes, batches, rank, reps = [(4096, 4096), (8192, 28672)], (1, 16, 128), 16, args.reps
        name = cuda.get_current_device().name
        say(f"device: {name.decode() if hasattr(name, 'decode') else name}")
    timer = GpuTimer(cuda, reps, inner=1 if SIM else 20, sim=SIM)
    torch = torch_cuda()
    rng = np.random.default_rng(0)

    if args.sweep:
        gemv_sweep(cuda, K, C, timer, shapes, rng)
        gemm_sweep(cuda, K, C, timer, shapes, rng)
        say(f"\n{len(FAILED)} check(s) failed{': ' + ', '.join(FAILED) if FAILED else ''}; {time.time() - T0:.0f} s")
        return 1 if FAILED else 0

    # copy bandwidth (device to device)
    nbytes = (1 << 30) if not SIM else 1 << 12
    src = cuda.device_array(nbytes // 4, np.float32)
    dst = cuda.device_array(nbytes // 4, np.float32)
    t_copy = timer(lambda: dst.copy_to_device(src))
    copy_bw = gbs(2 * nbytes, t_copy.gpu)
    say(f"device-to-device copy: {copy_bw:.0f} GB/s (2 x {nbytes >> 20} MiB / {t_copy})")
    src = dst = None  # free the buffers (not del: the timed closure above reads these names)

    # xorshift
    say("xorshift64 fill")
    n = 1 << 24 if not SIM else 50
    out = cuda.device_array(n, np.float32)
    state = C.xorshift64_fill(12345, out)
    from numlora.kernels import rng as hr

    host = np.empty(n, np.float32)
    hstate = int(hr.xorshift64_fill(np.uint64(12345), host))
    bits("stream", out.copy_to_host(), host)
    check("final state", state == hstate)
    t = timer(lambda: C.xorshift64_fill(12345, out))
    say(f"  {n} values: {t}, {gbs(4 * n, t.gpu):.0f} GB/s written")

    figures = {}
    bank_rows = []
    rows = []
    for out_f, in_f in shapes:
        say(f"W = {out_f} x {in_f}, rank {rank}")
        w = (rng.standard_normal((out_f, in_f), dtype=np.float32) * 0.02).astype(np.float32)
        a = (rng.standard_normal((rank, in_f), dtype=np.float32) * 0.02).astype(np.float32)
        b = (rng.standard_normal((out_f, rank), dtype=np.float32) * 0.02).astype(np.float32)
        dw, da, db = cuda.to_device(w), cuda.to_device(a), cuda.to_device(b)
        # NF4 quantize / dequantize
        ht = nl.quantize_nf4(w, 64)
        gt = C.quantize_nf4(dw, 64)
        bits("quantize codes", gt.packed.copy_to_host(), ht.packed)
        bits("quantize absmax", gt.scales.copy_to_host(), ht.absmax)
        bits("dequantize", C.dequantize_nf4(gt).copy_to_host(), nl.dequantize_nf4(ht))
        if (out_f, in_f) == shapes[0]:
            # the generic quantize path (absmax pass + code pass): a blocksize too big for the
            # one-pass kernel, and one that is not a power of two (partial last block)
            for bs in ((32, 12) if SIM else (4096, 96)):
                hb, gb = nl.quantize_nf4(w, bs), C.quantize_nf4(dw, bs)
                bits(f"quantize blocksize {bs} (generic path) codes", gb.packed.copy_to_host(), hb.packed)
                bits(f"quantize blocksize {bs} (generic path) absmax", gb.scales.copy_to_host(), hb.absmax)
                bits(f"dequantize blocksize {bs}", C.dequantize_nf4(gb).copy_to_host(), nl.dequantize_nf4(hb))
                del hb, gb
        packed = cuda.device_array(gt.packed.size, np.uint8)
        absmax = cuda.device_array(gt.scales.size, np.float32)
        bad = cuda.to_device(np.zeros(1, np.int32))
        xf = dw.reshape(dw.size)
        tq = timer(lambda: C.quantize_raw(xf, 64, packed, absmax, bad))
        q_gbs = gbs(w.nbytes, tq.gpu)
        say(f"  quantize: {tq}, {q_gbs:.0f} GB/s of input")
        dq_out = cuda.device_array(w.shape, np.float32)
        td = timer(lambda: C.dequantize_nf4(gt, dq_out))
        say(f"  dequantize: {td}, {gbs(w.nbytes + gt.packed.size + 4 * gt.scales.size, td.gpu):.0f} GB/s")
        if (out_f, in_f) == shapes[-1]:
            figures["quantize"] = q_gbs
        wdq = nl.dequantize_nf4(ht).astype(np.float64)
        nf4_bytes = gt.packed.size + 4 * gt.scales.size
        for nb in batches:
            x = rng.standard_normal((nb, in_f), dtype=np.float32)
            dx = cuda.to_device(x)
            X = np.abs(x.astype(np.float64))
            # dense LoRA forward
            y = C.lora_forward(dx, dw, da, db, 2.0)
            cpu = nl.lora_forward(x, w, a, b, 2.0)
            bound = X @ np.abs(w.T.astype(np.float64)) + 2.0 * (X @ np.abs(a.T)) @ np.abs(b.T)
            close(f"lora_forward batch {nb}", y.copy_to_host(), cpu.astype(np.float64), bound)
            yo = cuda.device_array((nb, out_f), np.float32)
            t_lf = timer(lambda: C.lora_forward(dx, dw, da, db, 2.0, out=yo))
            # NF4 forward
            yq = C.qlora_forward(dx, gt, da, db, 2.0)
            cpuq = nl.qlora_forward(x, ht, a, b, 2.0)
            boundq = X @ np.abs(wdq.T) + 2.0 * (X @ np.abs(a.T)) @ np.abs(b.T)
            close(f"qlora_forward batch {nb}", yq.copy_to_host(), cpuq.astype(np.float64), boundq)
            t_qf = timer(lambda: C.qlora_forward(dx, gt, da, db, 2.0, out=yo))
            # NF4 matmul alone (no LoRA): like for like with F.linear
            yn = C.nf4_matmul(dx, gt)
            close(f"nf4_matmul batch {nb}", yn.copy_to_host(), (x.astype(np.float64) @ wdq.T), X @ np.abs(wdq.T))
            t_nf = timer(lambda: C.nf4_matmul(dx, gt, out=yo))
            io_bytes = nf4_bytes + 4 * nb * (in_f + out_f)
            row = {"shape": f"{out_f}x{in_f}", "batch": nb, "lora_ms": t_lf.gpu * 1e3, "lora_wall_ms": t_lf.wall * 1e3,
                   "nf4_ms": t_nf.gpu * 1e3, "nf4_wall_ms": t_nf.wall * 1e3, "nf4_gbs": gbs(io_bytes, t_nf.gpu),
                   "qlora_ms": t_qf.gpu * 1e3, "qlora_wall_ms": t_qf.wall * 1e3,
                   "qlora_gbs": gbs(io_bytes, t_qf.gpu)}
            if torch is not None:
                import torch.nn.functional as F

                tw = torch.as_tensor(dw, device="cuda")
                ta, tb = torch.as_tensor(da, device="cuda"), torch.as_tensor(db, device="cuda")
                tx = torch.as_tensor(dx, device="cuda")
                row["torch_fp32_ms"] = timer(lambda: F.linear(tx, tw)).gpu * 1e3
                row["torch_lora_fp32_ms"] = timer(lambda: F.linear(tx, tw).add_(F.linear(F.linear(tx, ta), tb),
                                                                                alpha=2.0)).gpu * 1e3
                tw16, tx16 = tw.to(torch.bfloat16), tx.to(torch.bfloat16)
                row["torch_bf16_ms"] = timer(lambda: F.linear(tx16, tw16)).gpu * 1e3
            rows.append(row)
            say("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            if nb == 1 and (out_f, in_f) == shapes[-1]:
                figures["gemv"] = row
            if nb == batches[-1]:
                figures.setdefault("lora", []).append(row)
        # backward (one batch), merge, on the first shape only (the CPU side is slow on the big one)
        if (out_f, in_f) == shapes[0]:
            nb = batches[1] if len(batches) > 1 else 1
            x = rng.standard_normal((nb, in_f), dtype=np.float32)
            g = rng.standard_normal((nb, out_f), dtype=np.float32)
            X, G = np.abs(x.astype(np.float64)), np.abs(g.astype(np.float64))
            A, B, W = np.abs(a.astype(np.float64)), np.abs(b.astype(np.float64)), np.abs(w.astype(np.float64))
            for name, fn_gpu, fn_cpu, Wb in (
                ("lora_backward", lambda: C.lora_backward(cuda.to_device(x), dw, da, db, 2.0, cuda.to_device(g)),
                 lambda: nl.lora_backward(x, w, a, b, 2.0, g), W),
                ("qlora_backward", lambda: C.qlora_backward(cuda.to_device(x), gt, da, db, 2.0, cuda.to_device(g)),
                 lambda: nl.qlora_backward(x, ht, a, b, 2.0, g), np.abs(wdq))):
                gx, ga, gb = (r.copy_to_host() for r in fn_gpu())
                cx, ca, cb = fn_cpu()
                close(f"{name} grad_x", gx, cx.astype(np.float64), G @ Wb + 2.0 * (G @ B) @ A)
                close(f"{name} grad_a", ga, ca.astype(np.float64), 2.0 * (G @ B).T @ X)
                close(f"{name} grad_b", gb, cb.astype(np.float64), 2.0 * G.T @ (X @ A.T))
            # fan_in_fan_out (weight stored (in, out)) and the NF4 transposed product g deq(W)
            wt = np.ascontiguousarray(w.T)
            yf = C.lora_forward(cuda.to_device(x), cuda.to_device(wt), da, db, 2.0, fan_in_fan_out=True)
            cf = nl.lora_forward(x, wt, a, b, 2.0, fan_in_fan_out=True)
            close(f"lora_forward fan_in_fan_out batch {nb}", yf.copy_to_host(), cf.astype(np.float64),
                  X @ W.T + 2.0 * (X @ A.T) @ B.T)
            del wt, yf
            gtd = C.nf4_matmul_t(cuda.to_device(g), gt)
            close(f"nf4_matmul_t batch {nb}", gtd.copy_to_host(), nl.nf4_matmul_t(g, ht).astype(np.float64),
                  G @ np.abs(wdq))
            dx_, dg_ = cuda.to_device(x), cuda.to_device(g)
            tb_ = timer(lambda: C.lora_backward(dx_, dw, da, db, 2.0, dg_))
            say(f"  lora_backward batch {nb}: {tb_}")
            wm = cuda.to_device(w)
            C.merge_lora(wm, da, db, 2.0)
            hm = w.copy()
            nl.merge_lora(hm, a, b, 2.0)
            close("merge_lora", wm.copy_to_host(), hm.astype(np.float64), W + 2.0 * B @ A)
            C.unmerge_lora(wm, da, db, 2.0)
            close("unmerge_lora", wm.copy_to_host(), w.astype(np.float64), W + 2.0 * B @ A)
            tm = timer(lambda: C.merge_lora(wm, da, db, 0.0))
            say(f"  merge: {tm}, {gbs(2 * w.nbytes, tm.gpu):.0f} GB/s")
            # AdamW on the adapter's parameters
            p = nl.Parameter(a.copy(), (a * 0.1).astype(np.float32))
            opt = nl.AdamW([p], lr=1e-3, weight_decay=0.01)
            opt.step()
            dv, dgr = cuda.to_device(a), cuda.to_device((a * 0.1).astype(np.float32))
            dm, dvv = cuda.to_device(np.zeros_like(a)), cuda.to_device(np.zeros_like(a))
            C.adamw_update(dv, dgr, dm, dvv, lr=1e-3, weight_decay=0.01, step=1)
            e = float(np.max(np.abs(dv.copy_to_host() - p.value) / (np.abs(p.value) + 1e-6)))
            check("adamw step", e <= 1e-5, f"max rel err {e:.1e}")
            dropout_section(cuda, C, timer, w, a, b, nb, rng)
            bank_rows = bank_section(cuda, timer, w, 5 if SIM else 64, (2, 3) if SIM else (8, 16, 32, 64),
                                     3 if SIM else 64, rng)
        dw = gt = None  # free the device copies (not del: the timed closures above read these names)
        say("kernel resources after first launch (registers / local memory per thread):")
        kernel_resources(K, [(("hold",), timer.hold)] if timer.hold is not None else [])

    say("")
    say("GPU ms per call (launch overhead hidden; wall ms per call in the *wall* columns)")
    say("| shape | batch | numlora LoRA fp32 | wall | nf4_matmul | wall | NF4 GB/s | qlora_forward | wall "
        "| torch fp32 | torch fp32+LoRA | torch bf16 |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in rows:
        say(f"| {r['shape']} | {r['batch']} | {r['lora_ms']:.3f} | {r['lora_wall_ms']:.3f} | {r['nf4_ms']:.3f} | "
            f"{r['nf4_wall_ms']:.3f} | {r['nf4_gbs']:.0f} | {r['qlora_ms']:.3f} | {r['qlora_wall_ms']:.3f} | "
            f"{r.get('torch_fp32_ms', nan):.3f} | {r.get('torch_lora_fp32_ms', nan):.3f} | "
            f"{r.get('torch_bf16_ms', nan):.3f} |")
    say("")
    say(f"LoraBank forward on the GPU, W = {shapes[0][0]} x {shapes[0][1]}, GPU ms per call (wall ms)")
    say("| base | Zipf mix | every row its own adapter | every row the same | own / same |")
    say("|---|---|---|---|---|")
    for r in bank_rows:
        ratio = r['distinct'] / r['same'] if r['same'] else float('nan')
        say(f"| {r['kind']} | {r['zipf']:.3f} ({r['zipf_wall']:.3f}) | "
            f"{r['distinct']:.3f} ({r['distinct_wall']:.3f}) | {r['same']:.3f} ({r['same_wall']:.3f}) | {ratio:.2f}x |")
    say("")
    say(f"figures (copy bandwidth {copy_bw:.0f} GB/s):")
    if SIM:
        say("  (simulator: no timings, so no figures; the checks above are what --sim-smoke tests)")
        figures = {}
    gv = figures.get("gemv")
    if gv:
        frac = gv["nf4_gbs"] / copy_bw if copy_bw == copy_bw and copy_bw > 0 else float("nan")
        say(f"  fused NF4 GEMV batch 1 {gv['shape']} (nf4_matmul, no LoRA): {gv['nf4_ms']:.3f} ms GPU, "
            f"{gv['nf4_gbs']:.0f} GB/s = {frac:.0%} of copy [{'PASS' if frac >= 0.6 else 'FAIL'} >= 60%]")
        if "torch_bf16_ms" in gv:
            sp = gv["torch_bf16_ms"] / gv["nf4_ms"]
            say(f"    vs torch bf16 F.linear (no LoRA either): {sp:.2f}x faster "
                f"[{'PASS' if sp >= 2.5 else 'FAIL'} >= 2.5x]")
        say(f"  qlora_forward batch 1 {gv['shape']} (LoRA shrink + GEMV with the expand fused): "
            f"{gv['qlora_ms']:.3f} ms GPU, {gv['qlora_ms'] / gv['nf4_ms']:.2f}x nf4_matmul (reported, no target)")
    for r in figures.get("lora", []):
        if "torch_lora_fp32_ms" in r:
            ratio = r["lora_ms"] / r["torch_lora_fp32_ms"]
            say(f"  dense LoRA forward batch {r['batch']} {r['shape']}: {ratio:.2f}x torch fp32 F.linear + LoRA "
                f"[{'PASS' if ratio <= 1.2 else 'FAIL'} <= 1.2x]")
    if "quantize" in figures:
        q = figures["quantize"]
        say(f"  NF4 quantize {shapes[-1][0]}x{shapes[-1][1]} float32: {q:.0f} GB/s of input "
            f"[{'PASS' if q >= 100 else 'FAIL'} >= 100 GB/s]")
    if timer.warnings:
        say(f"  {timer.warnings} timing(s) warned that the host could not keep the GPU busy (see above)")
    say(f"\n{len(FAILED)} check(s) failed{': ' + ', '.join(FAILED) if FAILED else ''}; {time.time() - T0:.0f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
