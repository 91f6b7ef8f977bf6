"""numlora's kernels and numpy's BLAS next to each other with OpenBLAS's workers spinning
2^18 cycles (~0.1 ms) after each call (``OPENBLAS_THREAD_TIMEOUT=18``) against OpenBLAS's
own 2^28 (~0.1 s), in the same run: what a user who sets the variable gains and pays
(docs/performance.md, "OpenBLAS's spin").

Each setting runs in its own fresh process (OpenBLAS reads the variable when it loads);
the processes alternate, ``--rounds`` times each, and the table gives the medians over
all rounds. Per process, each scenario through numlora's harness
(``numlora.bench.harness.time_interleaved``): with a trigger (a small ``np.dot``, a pause,
an idle 0.3 s), ``--calls`` rounds (8 for the idle ones) of a 5 ms pause, one untimed
call, the trigger, the timed call; without one, a 0.3 s pause (so that the previous
scenario's BLAS workers are done spinning), one untimed call and ``--calls`` timed calls
back to back. 4096 x 4096 NF4 weight, rank 16; ``out=`` preallocated.

    python benchmarks/bench_blas_spin.py [--rounds 3] [--calls 25]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
import numlora as nl
from numlora.bench.harness import time_interleaved

calls = int(sys.argv[1])
g = np.random.default_rng(0)
N = 4096
W = (g.standard_normal((N, N), dtype=np.float32) * 0.02)
A = g.standard_normal((16, N), dtype=np.float32) * 0.01
B = g.standard_normal((N, 16), dtype=np.float32) * 0.01
t = nl.quantize_nf4(W)
lay = nl.QLoraLinear(t, A, B, 32)
xs = {n: g.standard_normal((n, N), dtype=np.float32) for n in (1, 8, 128)}
ys = {n: np.empty((n, N), np.float32) for n in (1, 8, 128)}
small_a = g.standard_normal((128, 16), dtype=np.float32)
small_b = g.standard_normal((16, N), dtype=np.float32)
M = g.standard_normal((512, 512), dtype=np.float32)
Mo = np.empty((512, 512), np.float32)
Wk = g.standard_normal((1024, 1024), dtype=np.float32)
v = g.standard_normal((8, 1024), dtype=np.float32)
vo = np.empty((8, 1024), np.float32)


def small_dot():
    np.dot(small_a, small_b)


def pause():
    time.sleep(0.002)


def idle():
    time.sleep(0.3)


def med(fn, before=None, n=None):
    # numlora's harness. With a trigger (run untimed after every call): rounds of a 5 ms
    # pause, one untimed call, the trigger, the timed call. Without: a 0.3 s pause (the
    # previous scenario's BLAS workers done spinning), one untimed call, n timed calls
    # back to back.
    if before is None:
        return time_interleaved([fn], 1, 0.3, calls=n or calls)[0].median_ms
    return time_interleaved([(fn, before)], n or calls, 0.005)[0].median_ms


def block():  # numpy and numlora back to back, no pauses
    for _ in range(3):
        np.dot(M, M, out=Mo)
        np.tanh(Mo[:8], out=Mo[:8])
        lay.forward(xs[8], out=ys[8])
        np.dot(v, Wk.T, out=vo)
        lay.forward(xs[1], out=ys[1])


rows = {
    "qlora_forward batch 1, after a small np.dot": med(lambda: lay.forward(xs[1], out=ys[1]), small_dot),
    "qlora_forward batch 8, after a small np.dot": med(lambda: lay.forward(xs[8], out=ys[8]), small_dot),
    "qlora_forward batch 8, back to back": med(lambda: lay.forward(xs[8], out=ys[8])),
    "nf4_matmul batch 128 bf16, after a small np.dot":
        med(lambda: nl.nf4_matmul(xs[128], t, out=ys[128], compute_dtype="bfloat16"), small_dot),
    "quantize_nf4 4096^2, after a small np.dot": med(lambda: nl.quantize_nf4(W), small_dot),
    "numpy 512^3 matmul, back to back": med(lambda: np.dot(M, M, out=Mo)),
    "numpy 512^3 matmul, after a 2 ms pause": med(lambda: np.dot(M, M, out=Mo), pause),
    "numpy 8 x 1024 @ 1024^2, after a 2 ms pause": med(lambda: np.dot(v, Wk.T, out=vo), pause),
    "numpy 512^3 matmul, after qlora_forward batch 8": med(lambda: np.dot(M, M, out=Mo),
                                                          lambda: lay.forward(xs[8], out=ys[8])),
    "numpy 8 x 1024 @ 1024^2, after 0.3 s idle": med(lambda: np.dot(v, Wk.T, out=vo), idle, 8),
    "numpy 512^3 matmul, after 0.3 s idle": med(lambda: np.dot(M, M, out=Mo), idle, 8),
    "qlora_forward batch 8, after 0.3 s idle": med(lambda: lay.forward(xs[8], out=ys[8]), idle, 8),
    "numpy + numlora block, 3 x (matmul, tanh, QLoRA b8, GEMV, QLoRA b1)": med(block),
}
print(json.dumps({"rows": rows}))
"""

SETTINGS = (("OPENBLAS_THREAD_TIMEOUT=18", {"OPENBLAS_THREAD_TIMEOUT": "18"}), ("OpenBLAS's default", {}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=25)
    args = ap.parse_args(argv)
    from numlora.bench.harness import machine

    runs = {name: [] for name, _ in SETTINGS}
    for r in range(args.rounds):
        for name, env in SETTINGS:
            print(f"round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            full = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
            full.update(env)
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.calls)], env=full, capture_output=True,
                                 text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(res["rows"])
    import numpy as np

    print(f"Machine: {machine()}\n")
    names = [n for n, _ in SETTINGS]
    print(f"| scenario (ms, median of {args.rounds} processes x {args.calls} calls, 8 after idle) | "
          f"{' | '.join(names)} | ratio |")
    print("|---|" + "---:|" * (len(names) + 1))
    for row in runs[names[0]][0]:
        meds = [float(np.median([run[row] for run in runs[n]])) for n in names]
        print(f"| {row} | " + " | ".join(f"{m:.3f}" for m in meds) + f" | {meds[0] / meds[1]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
