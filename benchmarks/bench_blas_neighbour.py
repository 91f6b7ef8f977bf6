"""A numlora kernel between two numpy products, in a loop with or without a pause per turn:
the time of the numlora call and of the numpy product right after it.

What it shows: how numlora's handling of OpenBLAS's spinning workers (``NUMLORA_PARK_BLAS``,
``numlora.kernels._blas``) serves a program that alternates numpy and numlora, both in a
tight loop and in a loop that pauses between turns as a server does between requests
(docs/performance.md, "OpenBLAS's workers put to sleep, not stopped").

Each turn: an optional pause, a numpy product (128 x 1024 by 1024 x 1024, which wakes
OpenBLAS's workers), the timed numlora call, the timed numpy product. Medians and 90th
percentiles over the turns; run it with different settings (or commits) in alternating
processes to compare, since this VM drifts between runs::

    python benchmarks/bench_blas_neighbour.py --batches 8,16 --pauses 0,0.15
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def run(batches, pauses, turns, size, kind):
    import numlora as nl

    rng = np.random.default_rng(0)
    w = rng.standard_normal((size, size), dtype=np.float32) * np.float32(0.02)
    t = nl.quantize_nf4(w)
    a = rng.standard_normal((16, size), dtype=np.float32) * np.float32(0.02)
    b = rng.standard_normal((size, 16), dtype=np.float32) * np.float32(0.02)
    wk = rng.standard_normal((1024, 1024), dtype=np.float32)
    hk = rng.standard_normal((128, 1024), dtype=np.float32)
    kb = np.empty((128, 1024), np.float32)
    rows = []
    for n in batches:
        x = rng.standard_normal((n, size), dtype=np.float32)
        out = np.empty((n, size), np.float32)

        def call():
            if kind == "qlora":
                nl.qlora_forward(x, t, a, b, 2.0, out=out)
            else:
                nl.quantize_nf4(w)

        call()
        np.dot(hk, wk.T, kb)
        for pause in pauses:
            fw, dt = [], []
            for _ in range(turns):
                if pause:
                    time.sleep(pause)
                np.dot(hk, wk.T, kb)
                t0 = time.perf_counter()
                call()
                t1 = time.perf_counter()
                np.dot(hk, wk.T, kb)
                t2 = time.perf_counter()
                fw.append(t1 - t0)
                dt.append(t2 - t1)
            fw, dt = np.array(fw) * 1e3, np.array(dt) * 1e3
            rows.append((n, pause, np.median(fw), np.percentile(fw, 90), np.median(dt), np.percentile(dt, 90),
                         np.median(fw + dt)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="8,16", help="comma-separated batch sizes of the QLoRA forward")
    ap.add_argument("--pauses", default="0,0.15", help="comma-separated pauses per turn (s)")
    ap.add_argument("--turns", type=int, default=30)
    ap.add_argument("--size", type=int, default=4096, help="the NF4 weight is SIZE x SIZE")
    ap.add_argument("--kernel", choices=("qlora", "quantize"), default="qlora",
                    help="the numlora call: qlora_forward (default) or quantize_nf4 of the weight")
    args = ap.parse_args(argv)
    from numlora.kernels import _jit

    rows = run([int(v) for v in args.batches.split(",")], [float(v) for v in args.pauses.split(",")],
               args.turns, args.size, args.kernel)
    print(f"numlora {args.kernel} {args.size} x {args.size} between two numpy products; {args.turns} turns; "
          f"NUMLORA_PARK_BLAS {'on' if _jit._config.PARK_BLAS else 'off'}")
    print()
    print("| batch | pause s | numlora call ms (p90) | numpy product after it ms (p90) | both ms |")
    print("|---:|---:|---:|---:|---:|")
    for n, pause, f50, f90, d50, d90, both in rows:
        print(f"| {n if args.kernel == 'qlora' else '-'} | {pause:g} | {f50:.2f} ({f90:.2f}) | {d50:.2f} ({d90:.2f}) "
              f"| {both:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
