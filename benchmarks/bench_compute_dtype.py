"""The 16-bit compute dtypes of the QLoRA base product (``compute_dtype``,
docs/dtypes.md): accuracy against float64 and agreement with bitsandbytes, then speed
against the float32 kernels and bitsandbytes' ``Linear4bit(compute_dtype=...)``.

Accuracy (out x in weight, NF4, blocksize 64): the largest error of ``nf4_matmul`` over
the largest output, against the float64 product of the float32 input and the dequantized
weight (what float32 compute approximates), the same for ``bnb.nn.Linear4bit`` itself in
``eval()`` mode (on a CPU with AVX-512 BF16 it runs a packed-weight kernel with its own
rounding), and the share of numlora's outputs bit-equal to bitsandbytes' own maths for
that dtype (``dequantize_4bit(...).to(dtype)`` and torch's 16-bit ``linear``).

Speed: ``nf4_matmul(x, t, out=out, compute_dtype=...)`` (a preallocated ``out``) at
batch 1, 8 and 128, interleaved with ``Linear4bit`` in the same run (numlora's harness):
each turn is a pause (``--pause``), one untimed call and five timed calls back to back,
since torch's OpenMP threads and OpenBLAS's spin after a call and slow down whoever runs
next (measured up to 2x at batch 128 on 2 cores with one timed call per turn), while a
long pause lets the idle machine go cold (4-6 ms at batch 1 after 0.5 s). Then the
steady state (``--no-steady`` skips it): each competitor in a
phase of its own, as a program that calls one library in a loop sees it: a 0.3 s pause,
20 untimed and 50 timed calls back to back, the phases alternating over 6 rounds (no
competitor starts right after another's spinning threads).

    python benchmarks/bench_compute_dtype.py [--size 4096] [--repeat 15] [--batches 1,8,128] [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np

import numlora as nl
from numlora.bench.harness import machine, noise_warning, start_threads, time_interleaved

DTYPES = ("float32", "bfloat16", "float16")


def _peers():
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError:
        return None, None
    return torch, bnb


def _bnb_layer(torch, bnb, w, dtype, quant_type="nf4"):
    lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=getattr(torch, dtype),
                            quant_type=quant_type)
    lin.weight = bnb.nn.Params4bit(torch.from_numpy(w), requires_grad=False, quant_type=quant_type)
    return lin.to("cpu").eval()  # inference: its packed CPU kernel where the CPU has AVX512-BF16


def accuracy(size: int, torch, bnb) -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((size, size)) * 0.02).astype(np.float32)
    x = rng.standard_normal((8, size)).astype(np.float32)
    t = nl.quantize_nf4(w, 64)
    ref = x.astype(np.float64) @ nl.dequantize_nf4(t).astype(np.float64).T
    scale = np.abs(ref).max()
    print(f"\n## Accuracy ({size} x {size} NF4 weight, batch 8)\n")
    print("| compute dtype | numlora: max error / max output vs float64 | bnb.nn.Linear4bit (eval): the same | "
          "numlora outputs bit-equal to bitsandbytes' dequantize + torch linear |")
    print("|---|---|---|---|")
    if torch is not None:
        import bitsandbytes.functional as F

        q, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    for dtype in DTYPES:
        y = nl.nf4_matmul(x, t, compute_dtype=dtype)
        err = np.abs(y - ref).max() / scale
        equal = module = "(no bitsandbytes)"
        if torch is not None:
            tdt = getattr(torch, dtype)
            with torch.no_grad():
                want = torch.nn.functional.linear(torch.from_numpy(x).to(tdt), F.dequantize_4bit(q, state).to(tdt))
                equal = f"{(y == want.float().numpy()).mean():.2%}"
                got = _bnb_layer(torch, bnb, w, dtype)(torch.from_numpy(x)).float().numpy()
            module = f"{np.abs(got - ref).max() / scale:.1e}"
        print(f"| {dtype} | {err:.1e} | {module} | {equal} |")


def _competitors(x, out, t, torch, layers):
    """numlora's nf4_matmul in each compute dtype, then each bnb layer, on x."""
    fns = [lambda d=d: nl.nf4_matmul(x, t, out=out, compute_dtype=d) for d in DTYPES]
    if torch is not None:
        xt = torch.from_numpy(x)

        def run(lin):
            with torch.inference_mode():
                lin(xt)

        fns += [lambda lin=lin: run(lin) for lin in layers]
    return fns


def speed(size: int, repeat: int, pause: float, torch, bnb, steady: int = 6, batches=(1, 8, 128)) -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((size, size)) * 0.02).astype(np.float32)
    t = nl.quantize_nf4(w, 64)
    print(f"\n## Speed ({size} x {size} NF4 weight; median ms, spread; out= preallocated for numlora)\n")
    head = " | ".join(f"numlora {d}" for d in DTYPES)
    peers = " | bnb Linear4bit bfloat16 | bnb Linear4bit float16" if torch is not None else ""
    print(f"| batch | {head}{peers} |")
    print("|---|" + "---|" * (len(DTYPES) + (2 if torch is not None else 0)))
    layers = [_bnb_layer(torch, bnb, w, d) for d in ("bfloat16", "float16")] if torch is not None else []
    spreads, rows = [], []
    for n in batches:
        x = rng.standard_normal((n, size)).astype(np.float32)
        fns = _competitors(x, np.empty((n, size), np.float32), t, torch, layers)
        rows.append((n, fns))
        timings = time_interleaved(fns, repeat, pause, calls=5)
        spreads += [tm.spread for tm in timings]
        print(f"| {n} | " + " | ".join(f"{tm.median_ms:.2f} ±{tm.spread:.0%}" for tm in timings) + " |")
    warn = noise_warning(spreads)
    if warn:
        print("\n" + warn)
    if not steady:
        return
    print(f"\n## Steady state (each competitor's phase: 0.3 s pause, 20 untimed + 50 timed calls; {steady} rounds)\n")
    print(f"| batch | {head}{peers} |")
    print("|---|" + "---|" * (len(DTYPES) + (2 if torch is not None else 0)))
    spreads = []
    for n, fns in rows:
        timings = time_interleaved(fns, steady, 0.3, calls=50, warm=20)
        spreads += [tm.spread for tm in timings]
        print(f"| {n} | " + " | ".join(f"{tm.median_ms:.2f} ±{tm.spread:.0%}" for tm in timings) + " |")
    warn = noise_warning(spreads)
    if warn:
        print("\n" + warn)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--pause", type=float, default=0.05,
                   help="seconds of sleep before each competitor's turn (default 0.05)")
    p.add_argument("--quick", action="store_true", help="512 x 512, 3 rounds (a smoke run)")
    p.add_argument("--no-steady", action="store_true", help="skip the steady-state table")
    p.add_argument("--batches", default="1,8,128", help="comma-separated batch sizes (default 1,8,128)")
    args = p.parse_args()
    start_threads()  # torch first, then numba's threads: each with its own default
    size, repeat = (512, 3) if args.quick else (args.size, args.repeat)
    torch, bnb = _peers()
    print(machine())
    if torch is None:
        print("torch / bitsandbytes not installed: numlora's columns only")
    accuracy(min(size, 2048), torch, bnb)
    speed(size, repeat, 0.0 if args.quick else args.pause, torch, bnb,
          steady=0 if args.no_steady else (2 if args.quick else 6),
          batches=tuple(int(b) for b in args.batches.split(",")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
