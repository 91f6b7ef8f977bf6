"""Small work on numba's threads against the serial builds (``NUMLORA_SMALL_SERIAL``):
what routing small calls to a parallel kernel's serial build gains, and where it stops.

For each case (NF4 products of small layers at batch 1 and 8, the input gradient, the
bf16 / float16 compute dtypes, whole-weight quantize / dequantize, bit-exact merge +
unmerge, a QLoraLinear training step), three competitors in the same process, timed
interleaved through numlora's harness back to back (no pause: as a program calls them):

- ``routed``: the default, small work on the serial build (``_config.SMALL_SERIAL`` on);
- ``parallel``: every call on numba's threads (``NUMLORA_SMALL_SERIAL=0``, the old
  behaviour);
- ``one thread``: ``numba.set_num_threads(1)`` (the serial build for every size).

``out=`` buffers are preallocated where the function takes one. numba's threads are
started by numlora (``numlora.kernels._jit``, OpenMP's passive wait policy) before
anything asks numba for its thread count: started by a numba call first, they keep
OpenMP's default spinning, under which back-to-back parallel calls wake no thread (and
spin against OpenBLAS, see docs/performance.md).

    python benchmarks/bench_small_work.py [--repeat 7] [--calls 40] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import numba
import numpy as np

import numlora as nl
from numlora import _config
from numlora.bench.harness import cpu_name, machine, progress, time_interleaved
from numlora.kernels import _jit  # numba's threads started as numlora starts them (before any numba call)

SHAPES = ((384, 384), (1536, 384), (384, 1536), (1024, 1024), (2048, 2048))


def cases(shape, g):
    out_f, in_f = shape
    w = g.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
    a = g.standard_normal((16, in_f), dtype=np.float32) * np.float32(0.01)
    b = g.standard_normal((out_f, 16), dtype=np.float32) * np.float32(0.01)
    t = nl.quantize_nf4(w)
    x1, x8 = (g.standard_normal((n, in_f), dtype=np.float32) for n in (1, 8))
    g4 = g.standard_normal((4, out_f), dtype=np.float32)
    y1, y8 = np.empty((1, out_f), np.float32), np.empty((8, out_f), np.float32)
    dx = np.empty((4, in_f), np.float32)
    deq = np.empty(shape, np.float32)
    wm = w.copy()
    layer = nl.QLoraLinear(t, a, b, 32.0)
    layer.train()

    def step():
        y = layer.forward(x8)
        layer.backward(y)

    return {
        "qlora_forward b1": lambda: nl.qlora_forward(x1, t, a, b, 2.0, out=y1),
        "qlora_forward b8": lambda: nl.qlora_forward(x8, t, a, b, 2.0, out=y8),
        "nf4_matmul_t b4": lambda: nl.nf4_matmul_t(g4, t, out=dx),
        "nf4_matmul bf16 b1": lambda: nl.nf4_matmul(x1, t, out=y1, compute_dtype="bfloat16"),
        "nf4_matmul fp16 b1": lambda: nl.nf4_matmul(x1, t, out=y1, compute_dtype="float16"),
        "dequantize_nf4": lambda: nl.dequantize_nf4(t, out=deq),
        "quantize_nf4": lambda: nl.quantize_nf4(w),
        "merge + unmerge": lambda: (nl.merge_lora(wm, a, b, 2.0), nl.unmerge_lora(wm, a, b, 2.0)),
        "QLoraLinear train step b8": step,
    }


def _with(small_serial, threads, f):
    def run():
        _config.SMALL_SERIAL = small_serial
        numba.set_num_threads(threads)
        f()

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    progress(f"numba's threads: {_jit.THREADS}")
    threads = numba.get_num_threads()
    g = np.random.default_rng(0)
    rows = []
    for shape in SHAPES:
        for name, f in cases(shape, g).items():
            progress(f"{name} {shape[0]}x{shape[1]}")
            comp = [_with(True, threads, f), _with(False, threads, f), _with(True, 1, f)]
            routed, par, one = time_interleaved(comp, args.repeat, 0.0, calls=args.calls, warm=3)
            rows.append({"case": name, "shape": f"{shape[0]} x {shape[1]}", "routed_us": 1e3 * routed.median_ms,
                         "parallel_us": 1e3 * par.median_ms, "one_thread_us": 1e3 * one.median_ms,
                         "spreads": [routed.spread, par.spread, one.spread]})
    _config.SMALL_SERIAL = True
    numba.set_num_threads(threads)
    print(f"\n{machine()}; medians, back to back\n")
    print("| case | weight | routed (default) us | parallel us | one thread us | routed / parallel |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['shape']} | {r['routed_us']:.1f} | {r['parallel_us']:.1f} | "
              f"{r['one_thread_us']:.1f} | {r['routed_us'] / r['parallel_us']:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "cpu": cpu_name(), "threads": threads, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
