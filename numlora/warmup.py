"""``numlora warmup``: compile numlora's kernels once, after installing it, so that no
later program pays numba's compile time.

numba compiles a kernel the first time it is called with a new kind of argument and keeps
the machine code in its on-disk cache (next to the installed package, or in
``NUMBA_CACHE_DIR``); a later process loads it from there in milliseconds. ``warmup``
runs every public path once on small float32 inputs, in parallel processes (one job per
kernel family), with numba's threads and again with one thread (a call made with one
numba thread, or with small work, runs each kernel's serial build), so the cache holds
what those calls need. Run it again after upgrading numlora or numba, or after changing
``NUMLORA_SIMD`` / ``NUMLORA_PARALLEL``. With ``NUMBA_NUM_THREADS=1`` only the serial
builds are compiled.

What it does not cover: float64 weights for the merge kernels and NF4 layouts that take
the portable kernels (blocksizes not a multiple of 32, or ``NUMLORA_SIMD=0``) compile on
first use as before; so do the CUDA kernels (``numba.cuda`` has its own cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

#: (name, what it compiles), in the order the jobs start (the longest first).
JOBS = (
    ("qlora_forward", "NF4 forward: batch 1, 2-16 rows, tiles (SIMD or portable decode)"),
    ("training", "QLoraLinear and LoraLinear backward, dropout, AdamW"),
    ("merge", "merge_lora / unmerge_lora, plain and bit-exact"),
    ("quantize", "quantize_nf4 (NF4 and FP4, float32 and bfloat16 bits, double quantization), dequantize_nf4"),
    ("bank", "LoraBank: adapter packing, the multi-adapter kernel (parallel and serial)"),
    ("nf4_matmul_t", "nf4_matmul_t (the NF4 input gradient)"),
    ("compute_dtype", "the bfloat16 / float16 compute dtypes of the NF4 products (rounding, fused and tiled, "
                      "the LoRA branch)"),
    ("convert", "bfloat16 <-> float32 conversion, error statistics (numlora merge / quantize)"),
    ("rng", "XorShift64"),
)


def _inputs(n=128, rank=8, batch=32):
    g = np.random.default_rng(0)
    w = g.standard_normal((n, n), dtype=np.float32)
    a = g.standard_normal((rank, n), dtype=np.float32) * np.float32(0.01)
    b = g.standard_normal((n, rank), dtype=np.float32) * np.float32(0.01)
    x = g.standard_normal((batch, n), dtype=np.float32)
    return w, a, b, x


def _nf4(n=128, blocksize=64):
    """An NF4 weight from random codes and scales (no quantize kernel compiled)."""
    import numlora as nl

    g = np.random.default_rng(1)
    packed = g.integers(0, 256, size=n * n // 2, dtype=np.uint8)
    absmax = g.uniform(0.01, 0.1, size=n * n // blocksize).astype(np.float32)
    return nl.NF4Tensor(packed, absmax, (n, n), blocksize)


def _job_qlora_forward():
    import numlora as nl

    w, a, b, x = _inputs()
    bias = np.zeros(w.shape[0], np.float32)
    t = _nf4()
    for rows in (1, 4, x.shape[0]):
        nl.qlora_forward(x[:rows], t, a, b, 2.0)
        nl.qlora_forward(x[:rows], t, a, b, 2.0, bias)
        nl.nf4_matmul(x[:rows], t)
    nl.qlora_forward(x[0], t, a, b, 2.0)


def _job_training():
    import numlora as nl

    w, a, b, x = _inputs()
    for layer in (nl.QLoraLinear(_nf4(), a, b, 16.0, dropout=0.1),
                  nl.LoraLinear(w, a, b, 16.0, dropout=0.1), nl.QLoraLinear(_nf4(), a, b, 16.0),
                  nl.LoraLinear(w, a, b, 16.0)):
        opt = nl.AdamW(layer.parameters(), weight_decay=0.01)
        layer.train()
        for rows in (1, 4, x.shape[0]):
            layer.forward(x[:rows])
            layer.backward(x[:rows])
        opt.step()


def _job_merge():
    import numlora as nl

    w, a, b, _ = _inputs()
    w = w.copy()
    nl.merge_lora(w, a, b, 2.0)
    nl.unmerge_lora(w, a, b, 2.0)
    nl.unmerge_lora(w, a, b, 2.0, record=nl.merge_lora(w, a, b, 2.0, record=True))
    layer = nl.LoraLinear(w, a, b, 16.0)
    layer.merge()
    layer.unmerge()


def _job_quantize():
    import numlora as nl

    from .io.safetensors import f32_to_bf16
    from .kernels import convert as kc
    from .kernels import nf4 as kn
    from .nf4 import quantize_bf16_bits, quantize_bf16_bits_measured, quantize_error_fused_ok

    w, _, _, _ = _inputs()
    for qt in ("nf4", "fp4"):
        for dq in (False, True):
            t = nl.quantize_nf4(w, double_quant=dq, quant_type=qt)
            nl.dequantize_nf4(t)
            t.dequantize()
        bits = f32_to_bf16(w)
        t = quantize_bf16_bits(bits, w.shape, quant_type=qt)
        nchunks = -(-bits.size // kc.CHUNK)
        if kn.error_stats_ok(bits.size, t.blocksize, kc.CHUNK):  # numlora quantize's error pass
            kn.bf16_error_stats(bits.reshape(-1), t.packed.reshape(-1), t.scales, t.blocksize, t.code, kc.CHUNK,
                                np.zeros(nchunks, np.float64), np.zeros(nchunks, np.float32))
        if qt == "nf4" and quantize_error_fused_ok(bits.size, t.blocksize, qt, kc.CHUNK):  # ... and in one pass
            quantize_bf16_bits_measured(bits, w.shape, t.blocksize, kc.CHUNK, np.zeros(nchunks, np.float64),
                                        np.zeros(nchunks, np.float32))


def _job_bank():
    import numlora as nl

    w, a, b, x = _inputs()
    for base in (w, _nf4()):
        bank = nl.LoraBank(base)
        bank.add("p", a, b)
        bank.add("q", a[:4], b[:, :4])
        for rows in (1, 4, x.shape[0]):
            ids = np.arange(rows) % 3 - 1  # base only, p, q
            bank.forward(x[:rows], ids)


def _job_nf4_matmul_t():
    import numlora as nl

    _, _, _, x = _inputs()
    t = _nf4()
    for rows in (1, 4, x.shape[0]):
        nl.nf4_matmul_t(x[:rows], t)


def _job_compute_dtype():
    import numlora as nl

    _, a, b, x = _inputs()
    t = _nf4()
    for cd in ("bfloat16", "float16"):
        for rows in (1, 4, x.shape[0]):
            nl.nf4_matmul(x[:rows], t, compute_dtype=cd)
        for rows in (4, x.shape[0]):  # the LoRA branch: serial up to 16 rows, parallel above
            nl.qlora_forward(x[:rows], t, a, b, 2.0, compute_dtype=cd)
        nl.nf4_matmul_t(x[:4], t, compute_dtype=cd)


def _job_convert():
    from .io.safetensors import bf16_to_f32, f32_to_bf16
    from .kernels import convert as kc

    x = np.linspace(-2, 2, 4096, dtype=np.float32)
    bits = f32_to_bf16(x)
    bf16_to_f32(bits)
    kc.f32_to_bf16(x, np.empty(x.size, np.uint16))
    kc.bf16_to_f32(bits, np.empty(x.size, np.float32))
    nchunks = -(-x.size // kc.CHUNK)
    kc.abs_err_stats(x, x, np.zeros(nchunks, np.float64), np.zeros(nchunks, np.float32))


def _job_rng():
    import numlora as nl

    nl.XorShift64(1).uniform(16)


_RUN = {name: globals()[f"_job_{name}"] for name, _ in JOBS}


def run_job(name: str) -> None:
    """Run one job in this process (what each worker process of :func:`warmup` does):
    with numba's threads (its small inputs counted as large, so that the parallel builds
    compile), then with one thread (the serial builds that calls with one numba thread or
    small work run, see ``numlora.kernels._jit.ParallelKernel``)."""
    import numba

    from . import _config

    small_serial = _config.SMALL_SERIAL
    _config.SMALL_SERIAL = False
    try:
        _RUN[name]()
    finally:
        _config.SMALL_SERIAL = small_serial
    before = numba.get_num_threads()
    if _config.PARALLEL and before > 1:
        numba.set_num_threads(1)
        try:
            _RUN[name]()
        finally:
            numba.set_num_threads(before)


def child_env() -> dict:
    """This environment, with numlora's folder first on ``PYTHONPATH``: a child process
    (warmup's jobs, the demo's :class:`numlora.demo.LaterSteps`) imports this numlora."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def warmup(jobs: int | None = None, progress: bool | None = None, stream=None) -> dict:
    """Compile every kernel family in ``jobs`` parallel processes (default: the CPU
    count), filling numba's on-disk cache. Returns ``{job: seconds}``; raises
    :class:`~numlora.errors.NumloraError` naming the jobs that failed, with their errors.
    ``progress``: draw a progress bar (default: when stderr is a terminal)."""
    from ._config import CACHE
    from ._progress import Progress
    from .errors import NumloraError

    if not CACHE:
        raise NumloraError("warmup fills numba's on-disk cache, but NUMLORA_CACHE=0 turns it off: "
                           "unset NUMLORA_CACHE (or set it to 1) and run warmup again")
    jobs = max(1, int(jobs or os.cpu_count() or 1))
    env = child_env()
    todo = [name for name, _ in JOBS]
    running, seconds, failed = {}, {}, {}
    with Progress(len(todo), desc="numlora warmup", unit="jobs", enabled=progress, stream=stream) as bar:
        while todo or running:
            while todo and len(running) < jobs:
                name = todo.pop(0)
                code = f"from numlora.warmup import run_job; run_job({name!r})"
                err = tempfile.TemporaryFile("w+")  # a pipe could fill up and stall the job
                p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=err)
                running[name] = (p, time.perf_counter(), err)
            for name, (p, t0, errf) in list(running.items()):
                if p.poll() is None:
                    continue
                errf.seek(0)
                err = errf.read()
                errf.close()
                seconds[name] = time.perf_counter() - t0
                if p.returncode:
                    lines = err.strip().splitlines()
                    failed[name] = lines[-1] if lines else f"exit status {p.returncode}"
                del running[name]
                bar.update(1, item=name)
            time.sleep(0.02)
    if failed:
        raise NumloraError("warmup: " + "; ".join(f"job {k} failed: {v}" for k, v in failed.items()))
    return seconds
