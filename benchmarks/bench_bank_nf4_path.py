"""LoraBank over an NF4 base, row-stable mode: the two arithmetics (``nf4_path="tiles"``
and ``"fused"``) at batch 1 / 16 / 64 / 256, 64 adapters of ranks 8-64, 4096 x 4096,
uniform adapter choice. Each cell: the smaller of two interleaved medians (tiles, fused,
tiles, fused) of 7 calls, each call after a 0.2 s pause and an untimed call;
preallocated ``out=``. Usage: ``python benchmarks/bench_bank_nf4_path.py``."""

import time

import numpy as np

import numlora as nl


def main():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4096, 4096)) * 0.02).astype(np.float32)
    t = nl.quantize_nf4(w, 64)
    banks = {p: nl.LoraBank(t, nf4_path=p) for p in ("tiles", "fused")}
    for i in range(64):
        r = (8, 16, 32, 64)[i % 4]
        a = (rng.standard_normal((r, 4096)) * 0.01).astype(np.float32)
        b = (rng.standard_normal((4096, r)) * 0.01).astype(np.float32)
        for bank in banks.values():
            bank.add(f"a{i}", a, b, 1.0)
    print("| batch | nf4_path='tiles' ms | nf4_path='fused' ms |")
    print("|---:|---:|---:|")
    for n in (1, 16, 64, 256):
        x = rng.standard_normal((n, 4096)).astype(np.float32)
        out = np.empty((n, 4096), np.float32)
        ids = rng.integers(0, 64, n)
        res = {}
        for _ in range(2):  # interleaved: tiles, fused, tiles, fused
            for p, bank in banks.items():
                bank.forward(x, ids, out=out)
                ts = []
                for _ in range(7):
                    time.sleep(0.2)
                    bank.forward(x, ids, out=out)
                    t0 = time.perf_counter()
                    bank.forward(x, ids, out=out)
                    ts.append(time.perf_counter() - t0)
                res.setdefault(p, []).append(float(np.median(ts)) * 1e3)
        print(f"| {n} | {min(res['tiles']):.2f} | {min(res['fused']):.2f} |")


if __name__ == "__main__":
    main()
