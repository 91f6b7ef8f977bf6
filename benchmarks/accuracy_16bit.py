"""Accuracy of float16 / bfloat16 inputs (docs/dtypes.md): the largest error of
lora_forward and qlora_forward on a 16-bit input batch, relative to the largest output,
against float64 references computed on the same (16-bit) input values and on the input
before it was rounded to 16 bits.

    python benchmarks/accuracy_16bit.py   (the bfloat16 row needs ml_dtypes)
"""

from __future__ import annotations

import numpy as np

import numlora as nl


def main() -> int:
    rng = np.random.default_rng(0)
    out_f, in_f, r, s = 1024, 1024, 16, 0.5
    w = (rng.standard_normal((out_f, in_f)) * 0.02).astype(np.float32)
    a = (rng.standard_normal((r, in_f)) * 0.02).astype(np.float32)
    b = (rng.standard_normal((out_f, r)) * 0.02).astype(np.float32)
    x64 = rng.standard_normal((8, in_f))
    t = nl.quantize_nf4(w)
    w64, wq64, a64, b64 = (m.astype(np.float64) for m in (w, nl.dequantize_nf4(t), a, b))

    def rel(y, ref):
        return float(np.abs(y - ref).max() / np.abs(ref).max())

    dtypes = [np.float32, np.float16]
    try:
        import ml_dtypes

        dtypes.append(ml_dtypes.bfloat16)
    except ImportError:
        print("ml_dtypes not installed: no bfloat16 row")
    print(f"{out_f} x {in_f} weight, rank {r}, batch {x64.shape[0]}: max |error| / max |output|\n")
    print("| input dtype | lora_forward vs float64 on the same input values | lora_forward vs float64 on the "
          "unrounded input | qlora_forward vs float64 on the same input values |")
    print("|---|---|---|---|")
    for dt in dtypes:
        x = x64.astype(dt)
        xv = x.astype(np.float64)
        y = nl.lora_forward(x, w, a, b, s)
        yq = nl.qlora_forward(x, t, a, b, s)
        e_same = rel(y, xv @ w64.T + s * (xv @ a64.T) @ b64.T)
        e_orig = rel(y, x64 @ w64.T + s * (x64 @ a64.T) @ b64.T)
        e_q = rel(yq, xv @ wq64.T + s * (xv @ a64.T) @ b64.T)
        print(f"| {np.dtype(dt).name} | {e_same:.1e} | {e_orig:.1e} | {e_q:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
