"""Where numba's worker wakes: NF4 products with numlora's worker steering off and on
(``NUMLORA_STEER_WORKERS=0`` / ``1``, ``numlora.kernels._steer``), each setting in fresh
processes, alternated over ``--rounds``.

Per process, ``nf4_matmul(x, t, out=out, compute_dtype=...)`` (4096 x 4096 NF4 weight,
``out`` preallocated) at each batch size:

- back to back: median of 200 calls;
- after a sleep: per round a ``--pause`` ms ``time.sleep``, then six calls back to back;
  medians per call index over 20 rounds (a program that waits for requests or I/O);
- beside a busy program: a second process spinning on the CPU for the whole phase, then
  the median of 100 calls back to back (the price of steering: the worker may not move
  onto the caller's core when the other cores are busy).

Prints one table, medians over the rounds of each process's medians, ms.

    python benchmarks/bench_steer.py [--rounds 3] [--batches 1,8] [--compute-dtype bfloat16]
        [--pause 50]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

CHILD = r"""
import json, subprocess, sys, time
import numpy as np
import numlora as nl
from numlora.kernels._jit import STEER
batches, dtype, pause = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
t = nl.quantize_nf4((rng.standard_normal((4096, 4096)) * 0.02).astype(np.float32))
res = {"steer": STEER.state}
for b in batches:
    x = rng.standard_normal((b, 4096)).astype(np.float32)
    out = np.empty((b, 4096), np.float32)

    def call():
        t0 = time.perf_counter()
        nl.nf4_matmul(x, t, out=out, compute_dtype=dtype)
        return time.perf_counter() - t0

    for _ in range(30):
        call()
    r = {"b2b": float(np.median([call() for _ in range(200)]))}
    rows = []
    for _ in range(20):
        time.sleep(pause)
        rows.append([call() for _ in range(6)])
    r["sleep"] = np.median(rows, axis=0).tolist()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        r["busy"] = float(np.median([call() for _ in range(100)]))
    finally:
        busy.kill()
        busy.wait()
    res[str(b)] = r
print(json.dumps(res))
"""


def child(steer: str, batches, dtype, pause):
    env = dict(os.environ, NUMLORA_STEER_WORKERS=steer)
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps([batches, dtype, pause])], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--pause", type=float, default=50.0, help="ms")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    runs = {"0": [], "1": []}
    for k in range(args.rounds):
        for steer in ("0", "1"):
            runs[steer].append(child(steer, batches, args.compute_dtype, args.pause / 1e3))
        print(f"round {k + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    from numlora.bench.harness import machine

    print(f"{machine().split(' (')[0]}; steering on: {runs['1'][0]['steer']}; off: {runs['0'][0]['steer']}")
    print(f"nf4_matmul 4096 x 4096, compute dtype {args.compute_dtype}, out= preallocated; medians over "
          f"{args.rounds} processes per setting, alternated, ms\n")
    print("| batch | calls | steering off | steering on |")
    print("|---|---|---:|---:|")

    def med(steer, b, key, i=None):
        vals = [r[str(b)][key] if i is None else r[str(b)][key][i] for r in runs[steer]]
        return float(np.median(vals)) * 1e3

    for b in batches:
        print(f"| {b} | back to back | {med('0', b, 'b2b'):.3f} | {med('1', b, 'b2b'):.3f} |")
        for i in range(6):
            print(f"| {b} | call {i + 1} after a {args.pause:g} ms sleep | {med('0', b, 'sleep', i):.3f} | "
                  f"{med('1', b, 'sleep', i):.3f} |")
        print(f"| {b} | back to back, a busy process beside | {med('0', b, 'busy'):.3f} | {med('1', b, 'busy'):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
