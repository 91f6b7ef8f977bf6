"""The calls right after a pause: how long the k-th NF4 GEMV takes after the program did
something else for a while, against the same call back to back.

``numlora bench`` times each call after a pause and one untimed call (as a program that
does other work between layers calls them); its batch-1 rows read slower than the
kernels' back-to-back speed. This separates the causes: per round the program waits
``--pause`` ms in one of three ways, then times ``--calls`` calls of
``nf4_matmul(x, t, out=out)`` at batch 1 (``--batch``) back to back (medians over the rounds, per call
index):

- ``sleep``: ``time.sleep`` (the threads idle, the core may be given away);
- ``spin``: the main thread busy in a loop that touches no memory (the core stays busy,
  the caches stay as the GEMV left them, apart from what other programs do meanwhile);
- ``spin + read``: the same loop reading a 32 MiB array (the weight leaves the caches).

If ``spin`` is as slow as ``sleep`` on its first call, the cause is not a thread waking or
a core clocking up but the weight's cache lines gone (on a VM: other tenants of the
host's last-level cache).

    python benchmarks/bench_after_pause.py [--size 4096] [--rounds 30] [--calls 6]
        [--pause 10] [--compute-dtype bfloat16] [--batch 1] [--peer]

``--peer`` prints the same rows for bitsandbytes' ``Linear4bit`` (eval mode) on the same
weight and input. Run it with ``NUMBA_NUM_THREADS=1`` to take numba's worker thread out
of the picture, and
with ``NUMLORA_STEER_WORKERS=0`` to see where the woken worker lands without numlora's
steering (``numlora.kernels._steer``).
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

import numlora as nl
from numlora.bench.harness import machine


def after_pause(call, how, rounds, calls, pause_s):
    """Median seconds of the k-th ``call()`` after each pause, k = 0 .. calls - 1."""
    other = np.ones(8 << 20, np.float32)  # 32 MiB
    rows = []
    for _ in range(rounds):
        if how == "sleep":
            time.sleep(pause_s)
        else:
            end = time.perf_counter() + pause_s
            while time.perf_counter() < end:
                if how == "spin + read":
                    other.sum()
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t0)
        rows.append(ts)
    return np.median(np.array(rows), axis=0)


def _bnb_call(w, x, compute_dtype):
    """bitsandbytes' ``Linear4bit`` (NF4, blocksize 64, eval mode: its packed CPU kernel
    where the CPU has AVX512-BF16) on the same weight and input, or None without it."""
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError:
        return None
    dt = getattr(torch, compute_dtype)
    lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=dt, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.from_numpy(w), requires_grad=False, quant_type="nf4")
    lin = lin.to("cpu").eval()
    xt = torch.from_numpy(x).to(dt)

    def call():
        with torch.no_grad():
            lin(xt)

    return call


def _table(name, call, args):
    for _ in range(50):  # compiled, caches and clocks settled
        call()
    steady = []
    for _ in range(200):
        t0 = time.perf_counter()
        call()
        steady.append(time.perf_counter() - t0)
    print(f"{name}, batch {args.batch}, {args.size} x {args.size}, compute dtype {args.compute_dtype}; pause "
          f"{args.pause:g} ms; medians of {args.rounds} rounds, ms\n")
    print("| before the calls | " + " | ".join(f"call {k + 1}" for k in range(args.calls)) + " |")
    print("|---|" + "---:|" * args.calls)
    print(f"| back to back (200 calls, median) | {np.median(steady) * 1e3:.3f} |" + " |" * (args.calls - 1))
    for how in ("sleep", "spin", "spin + read"):
        med = after_pause(call, how, args.rounds, args.calls, args.pause / 1e3)
        print(f"| {args.pause:g} ms {how} | " + " | ".join(f"{v * 1e3:.3f}" for v in med) + " |")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--pause", type=float, default=10.0, help="ms")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--batch", type=int, default=1, help="input rows (default 1)")
    ap.add_argument("--peer", action="store_true",
                    help="the same rows for bitsandbytes' Linear4bit (torch imported before numlora's first kernel)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((args.size, args.size)) * 0.02).astype(np.float32)
    x = rng.standard_normal((args.batch, args.size)).astype(np.float32)
    peer = _bnb_call(w, x, args.compute_dtype) if args.peer else None
    t = nl.quantize_nf4(w)
    out = np.empty((args.batch, args.size), np.float32)
    print(f"{machine()}; numba threads: {numba.get_num_threads()}\n")
    _table("nf4_matmul", lambda: nl.nf4_matmul(x, t, out=out, compute_dtype=args.compute_dtype), args)
    if args.peer:
        if peer is None:
            print("bitsandbytes / torch not installed: no peer rows")
        else:
            _table("bitsandbytes Linear4bit (eval)", peer, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
