"""FP4 quantize / dequantize against bitsandbytes' CPU quantize_4bit(quant_type="fp4"), with
NF4 timed in the same run for comparison; bytes checked equal first.

    python benchmarks/bench_fp4.py [--n 4096] [--repeat 15]

One N x N float32 weight (numlora.bench.inputs.weight), blocksize 64, no double
quantization. Competitors are timed interleaved by numlora's harness (a pause and an
untimed call before each turn), medians and spreads reported; numlora's dequantize writes
into a preallocated ``out=`` buffer (a fresh 64 MiB array would be timed as page faults).
"""

from __future__ import annotations

import argparse

import numpy as np

import numlora as nl
from numlora.bench.harness import machine, noise_warning, progress, start_threads, time_interleaved
from numlora.bench.inputs import weight


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args(argv)
    start_threads()  # torch first, then numba's threads: each with its own default
    try:
        import bitsandbytes.functional as bnbf
        import torch
    except ImportError:
        print("bitsandbytes / torch not installed: nothing to compare against (pip install -e '.[peers]')")
        return 0
    w = weight(args.n)
    wt = torch.from_numpy(w)
    progress("checking bytes against bitsandbytes ...")
    for qt in ("fp4", "nf4"):
        t = nl.quantize_4bit(w, 64, quant_type=qt)
        q, st = bnbf.quantize_4bit(wt, blocksize=64, quant_type=qt)
        assert np.array_equal(t.packed, q.numpy().reshape(-1)), qt
        assert np.array_equal(t.absmax.view(np.uint32), st.absmax.numpy().view(np.uint32)), qt
    out = np.empty_like(w)
    rows = []
    for qt in ("fp4", "nf4"):
        t = nl.quantize_4bit(w, 64, quant_type=qt)
        q, st = bnbf.quantize_4bit(wt, blocksize=64, quant_type=qt)
        progress(f"timing {qt} ...")
        tq = time_interleaved([lambda qt=qt: nl.quantize_4bit(w, 64, quant_type=qt),
                               lambda qt=qt: bnbf.quantize_4bit(wt, blocksize=64, quant_type=qt),
                               lambda t=t: nl.dequantize_4bit(t, out=out),
                               lambda q=q, st=st: bnbf.dequantize_4bit(q, st)], args.repeat, pause=0.05)
        rows.append((qt, tq))
    print(f"machine: {machine()}")
    print(f"weight {args.n} x {args.n} float32, blocksize 64; medians of {args.repeat} interleaved rounds\n")
    print("| type | numlora quantize | bitsandbytes quantize | speed-up | numlora dequantize (out=) "
          "| bitsandbytes dequantize | speed-up |")
    print("|---|---|---|---|---|---|---|")
    spreads = []
    for qt, (a, b, c, d) in rows:
        spreads += [a.spread, b.spread, c.spread, d.spread]
        print(f"| {qt} | {a.median_ms:.1f} ms ±{a.spread:.0%} | {b.median_ms:.1f} ms ±{b.spread:.0%} "
              f"| {b.median_ms / a.median_ms:.1f}x | {c.median_ms:.1f} ms ±{c.spread:.0%} "
              f"| {d.median_ms:.1f} ms ±{d.spread:.0%} | {d.median_ms / c.median_ms:.1f}x |")
    warn = noise_warning(spreads)
    if warn:
        print("\n" + warn)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
