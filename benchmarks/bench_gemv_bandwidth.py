"""The NF4 GEMV (batch 1) against this machine's read bandwidth, measured in the same run
(issue 17's figure: the GEMV should read its weight at >= 75 % of what the machine can).

Read bandwidth: a parallel numba sum over a uint8 buffer as large as the NF4 weight
(codes + scales: the same bytes, so the same cache level: on a machine whose last-level
cache holds the weight, both read from it), and over a 512 MiB buffer (main memory). The
GEMV: ``nf4_matmul(x, t, out=out)`` at batch 1, float32 and bfloat16 compute, weight
N x N (default 4096), bytes read = codes + float32 scales. Interleaved rounds through
numlora's harness; medians.

    python benchmarks/bench_gemv_bandwidth.py [--size 4096] [--repeat 30] [--warm 1] [--calls 1]

``--warm W --calls C``: per turn of each competitor, W untimed calls then C timed ones back
to back (a steady state, as in a decode loop that runs one GEMV after another; the default
1 / 1 times the second call after a 10 ms pause).

``--layers L`` (default 32, 0: off): also a decode step through L distinct weights of the
same size, one GEMV each in turn, as a model's layers are read in generation (and the input
gradient ``nf4_matmul_t`` through them, as a backward pass reads them): together
they are larger than the last-level cache, so each weight comes from main memory, and the
step's bytes per second are set against the 512 MiB read (time per GEMV = the step's
time / L).
"""

from __future__ import annotations

import argparse

import numba
import numpy as np

import numlora as nl
from numlora.bench.harness import machine, noise_warning, time_interleaved


@numba.njit(parallel=True, cache=True)
def _read(buf):
    """Sum of every 64-bit word of buf (the reads are what is measured)."""
    words = buf.view(np.uint64)
    chunk = 1 << 16
    n = (words.size + chunk - 1) // chunk
    acc = np.zeros(n, np.uint64)
    for c in numba.prange(n):
        seg = words[c * chunk:min(words.size, (c + 1) * chunk)]  # a view: the loop index stays >= 0
        s = np.uint64(0)
        for j in range(seg.size):
            s += seg[j]
        acc[c] = s
    return acc.sum()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--warm", type=int, default=1, help="untimed calls per turn")
    p.add_argument("--calls", type=int, default=1, help="timed calls per turn, back to back")
    p.add_argument("--layers", type=int, default=32, help="distinct weights of the decode step (0: none)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((args.size, args.size)) * 0.02).astype(np.float32)
    t = nl.quantize_nf4(w, 64)
    nbytes = t.packed.nbytes + t.scales.nbytes
    same = rng.integers(0, 255, nbytes - nbytes % 8, dtype=np.uint8)
    big = np.ones(512 << 20, np.uint8)
    x = rng.standard_normal((1, args.size)).astype(np.float32)
    out = np.empty((1, args.size), np.float32)
    # the layers: the weight quantized again, each copy in its own memory
    layers = [nl.quantize_nf4(w, 64) for _ in range(args.layers)]

    def step(dtype):
        def f():
            for lt in layers:
                nl.nf4_matmul(x, lt, out=out, compute_dtype=dtype)
        return f

    fns = [lambda: _read(same), lambda: _read(big), lambda: nl.nf4_matmul(x, t, out=out),
           lambda: nl.nf4_matmul(x, t, out=out, compute_dtype="bfloat16")]
    g = rng.standard_normal((1, args.size)).astype(np.float32)
    dx = np.empty((1, args.size), np.float32)

    def step_t():  # the backward's input gradient through the same layers
        for lt in layers:
            nl.nf4_matmul_t(g, lt, out=dx)

    if layers:
        fns += [step("float32"), step("bfloat16"), step_t, lambda: nl.nf4_matmul_t(g, t, out=dx)]
    for f in fns:
        f()
    ts = time_interleaved(fns, args.repeat, 0.01, calls=args.calls, warm=args.warm)
    bw_same = same.nbytes / ts[0].median_ms / 1e6
    bw_big = big.nbytes / ts[1].median_ms / 1e6
    print(machine())
    print(f"\nNF4 weight {args.size} x {args.size}: {nbytes / 1e6:.1f} MB read per GEMV; per turn {args.warm} "
          f"untimed and {args.calls} timed calls of each, {args.repeat} turns\n")
    print("| what | median ms | spread | GB/s | of the read bandwidth at the weight's size |")
    print("|---|---|---|---|---|")
    print(f"| read {same.nbytes / 1e6:.1f} MB (numba parallel sum) | {ts[0].median_ms:.3f} | ±{ts[0].spread:.0%} | "
          f"{bw_same:.1f} | 100 % |")
    print(f"| read 512 MiB (main memory) | {ts[1].median_ms:.3f} | ±{ts[1].spread:.0%} | {bw_big:.1f} | - |")
    for name, tm in (("nf4_matmul batch 1, float32", ts[2]), ("nf4_matmul batch 1, bf16 compute", ts[3])):
        gbs = nbytes / tm.median_ms / 1e6
        print(f"| {name} | {tm.median_ms:.3f} | ±{tm.spread:.0%} | {gbs:.1f} | {gbs / bw_same:.0%} |")
    if layers:
        print(f"\nDecode step through {len(layers)} distinct weights ({len(layers) * nbytes / 1e6:.0f} MB, from main "
              "memory), one GEMV each:\n")
        print("| what | ms per GEMV | spread | GB/s | of the main-memory read |")
        print("|---|---|---|---|---|")
        for name, tm in (("nf4_matmul batch 1, float32", ts[4]), ("nf4_matmul batch 1, bf16 compute", ts[5]),
                         ("nf4_matmul_t batch 1 (input gradient)", ts[6])):
            per = tm.median_ms / len(layers)
            gbs = nbytes / per / 1e6
            print(f"| {name} | {per:.3f} | ±{tm.spread:.0%} | {gbs:.1f} | {gbs / bw_big:.0%} |")
        print(f"\n(nf4_matmul_t batch 1 on the one weight, from cache: {ts[7].median_ms:.3f} ms)")
    warn = noise_warning([tm.spread for tm in ts])
    if warn:
        print("\n" + warn)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
