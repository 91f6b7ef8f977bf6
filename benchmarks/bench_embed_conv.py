"""Embedding and Conv2d LoRA forward: numlora against torch + PEFT, in the same run.

Embedding: 128 token ids (``--batches`` for other counts), a 32000 x 4096 table, rank 16.
Conv2d: 64 -> 64 channels, 3x3, padding 1, 56x56, batch 8, rank 16. float32; numlora writes
into preallocated ``out=`` buffers; torch runs under ``torch.no_grad()`` with its default
threads and allocates its output, so the embedding is also timed with numlora allocating
its own (``numlora_alloc_ms``). All of a case's competitors are timed in turns in the same
run. Prints the median of ``--repeat`` timed calls (after warm-up) per case, and the ratio.

    python benchmarks/bench_embed_conv.py [--repeat 30] [--batches 1,8,128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

import numlora as nl
from numlora.bench.harness import cpu_name, start_threads, time_interleaved

#: Sleep before each competitor's turn and timed calls per turn (after one untimed call):
#: torch's OpenMP threads and OpenBLAS's spin after a call, and on 2 cores whoever runs
#: right after the other runtime shares the cores with them (measured: the Conv2d forward
#: 48 ms right after torch's against 25 ms alone); the first call of a turn absorbs that,
#: the timed ones then measure each library's own speed.
PAUSE_S = 0.05
CALLS = 5


def medians_ms(fns, repeat):
    """Median milliseconds of each of ``fns``, timed in turns by numlora's one harness
    (CALLS timed calls of each per round, after a pause and an untimed call), so that
    noise from other work falls on all alike."""
    return [t.median_ms for t in time_interleaved(fns, repeat, pause=PAUSE_S, calls=CALLS)]


def embedding_case(repeat, rng, n=128):
    import torch
    from peft import LoraConfig, get_peft_model

    vocab, dim, r = 32000, 4096, 16
    w = rng.standard_normal((vocab, dim), np.float32)
    a = rng.standard_normal((r, vocab), np.float32)
    b = rng.standard_normal((dim, r), np.float32) * np.float32(0.01)
    ids = rng.integers(0, vocab, n)
    out = np.empty((n, dim), np.float32)
    s = 32 / r

    def ours():
        nl.embedding_lora_forward(ids, w, a, b, s, out=out)

    def ours_alloc():
        nl.embedding_lora_forward(ids, w, a, b, s)

    model = torch.nn.Sequential()
    model.add_module("emb", torch.nn.Embedding(vocab, dim))
    model.emb.weight.data = torch.from_numpy(w)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=32, target_modules=["emb"]))
    layer = peft.base_model.model.emb
    layer.lora_embedding_A["default"].data = torch.from_numpy(a)
    layer.lora_embedding_B["default"].data = torch.from_numpy(b)
    tids = torch.from_numpy(ids)

    def theirs():
        with torch.no_grad():
            layer(tids)

    with torch.no_grad():
        diff = float(np.max(np.abs(layer(tids).numpy() - nl.embedding_lora_forward(ids, w, a, b, s))))
    ours_ms, peft_ms, alloc_ms = medians_ms([ours, theirs, ours_alloc], repeat)
    return {"case": f"embedding 32000x4096 r16, {n} ids", "numlora_ms": ours_ms, "peft_ms": peft_ms,
            "numlora_alloc_ms": alloc_ms, "max_abs_diff": diff}


def conv_case(repeat, rng):
    import torch
    from peft import LoraConfig, get_peft_model

    n, c, hw, r = 8, 64, 56, 16
    x = rng.standard_normal((n, c, hw, hw), np.float32)
    w = rng.standard_normal((c, c, 3, 3), np.float32) * np.float32(0.05)
    bias = rng.standard_normal(c, np.float32)
    a = rng.standard_normal((r, c, 3, 3), np.float32) * np.float32(0.05)
    b = rng.standard_normal((c, r, 1, 1), np.float32) * np.float32(0.05)
    s = 32 / r
    out = np.empty((n, c, hw, hw), np.float32)

    def ours():
        nl.conv_lora_forward(x, w, a, b, s, bias, out=out, padding=1)

    model = torch.nn.Sequential()
    model.add_module("conv", torch.nn.Conv2d(c, c, 3, padding=1))
    model.conv.weight.data = torch.from_numpy(w)
    model.conv.bias.data = torch.from_numpy(bias)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=32, target_modules=["conv"]))
    layer = peft.base_model.model.conv
    layer.lora_A["default"].weight.data = torch.from_numpy(a)
    layer.lora_B["default"].weight.data = torch.from_numpy(b)
    tx = torch.from_numpy(x)

    def theirs():
        with torch.no_grad():
            layer(tx)

    with torch.no_grad():
        diff = float(np.max(np.abs(layer(tx).numpy() - nl.conv_lora_forward(x, w, a, b, s, bias, padding=1))))
    ours_ms, peft_ms = medians_ms([ours, theirs], repeat)
    return {"case": "conv2d 64->64 3x3 56x56 batch 8 r16", "numlora_ms": ours_ms, "peft_ms": peft_ms,
            "max_abs_diff": diff}


def direct_case(repeat, rng):
    """The design choice: a direct numba convolution loop (no im2col; base + A, 80 output
    channels) against numlora's im2col + BLAS forward, same shapes, timed in turns."""
    import numba

    @numba.njit(parallel=True)
    def direct(x, w, out):
        n, c, h, wd = x.shape
        o, _, kh, kw = w.shape
        for oc in numba.prange(o):
            for b in range(n):
                for y in range(h):
                    for xx in range(wd):
                        out[b, oc, y, xx] = 0
                for ci in range(c):
                    for i in range(kh):
                        for j in range(kw):
                            wv = w[oc, ci, i, j]
                            for y in range(h):
                                yy = y - 1 + i
                                if yy < 0 or yy >= h:
                                    continue
                                for xx in range(wd):
                                    xi = xx - 1 + j
                                    if xi >= 0 and xi < wd:
                                        out[b, oc, y, xx] += wv * x[b, ci, yy, xi]

    n, c, hw, r = 8, 64, 56, 16
    x = rng.standard_normal((n, c, hw, hw), np.float32)
    w = rng.standard_normal((c, c, 3, 3), np.float32)
    a = rng.standard_normal((r, c, 3, 3), np.float32)
    b = rng.standard_normal((c, r, 1, 1), np.float32)
    wa = np.concatenate([w, a])
    out_d = np.empty((n, c + r, hw, hw), np.float32)
    out = np.empty((n, c, hw, hw), np.float32)
    ours_ms, direct_ms = medians_ms([lambda: nl.conv_lora_forward(x, w, a, b, 2.0, out=out, padding=1),
                                     lambda: direct(x, wa, out_d)], max(3, repeat // 3))
    return {"case": "conv2d: im2col + BLAS vs a direct loop", "numlora_ms": ours_ms, "peft_ms": direct_ms,
            "max_abs_diff": float("nan"), "baseline": "direct numba loop"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--json", default=None)
    p.add_argument("--direct", action="store_true", help="also time a direct numba convolution loop")
    p.add_argument("--batches", default="128", help="token counts of the embedding case, comma-separated")
    args = p.parse_args(argv)
    # torch first, then numba's threads, each with its own OpenMP runtime and default (had
    # numba's OpenMP layer shared torch's spinning threads, the Conv2d forward measured
    # 48-70 ms instead of 25-39; docs/performance.md)
    print(f"numba threads: {start_threads()}")
    import torch

    rng = np.random.default_rng(0)
    rows = [embedding_case(args.repeat, rng, int(n)) for n in args.batches.split(",")]
    rows.append(conv_case(args.repeat, rng))
    if args.direct:
        rows.append(direct_case(args.repeat, rng))
    meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "repeat": args.repeat}
    for row in rows:
        row["speedup"] = row["peft_ms"] / row["numlora_ms"]
        other = row.get("baseline", "torch+PEFT")
        alloc = f"   (allocating: {row['numlora_alloc_ms']:.3f} ms)" if "numlora_alloc_ms" in row else ""
        print(f"{row['case']:<40} numlora {row['numlora_ms']:8.3f} ms   {other} {row['peft_ms']:8.3f} ms   "
              f"x{row['speedup']:.2f}   max|diff| {row['max_abs_diff']:.2e}{alloc}")
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
