"""Per-call cost of a small layer's training step and eval forward (Python overhead).

One training step is ``layer.train(); layer.forward(x, out=y); layer.backward(g)``; the
eval forward is ``layer.forward(x, out=y)`` in eval mode. Cases: LoraLinear and
QLoraLinear (blocksize 64), with and without dropout, at ``--sizes`` (square layers),
``--rank`` and ``--batch`` rows, float32, ``out=`` preallocated. A sample times
``--inner`` calls; the cases take turns sample by sample (numlora's one harness), and the
table gives the median microseconds per call and the spread.

Comparing checkouts (another commit's tree, e.g. a ``git worktree``): each ``--checkout
LABEL=PATH`` runs this script in a child process with ``PYTHONPATH=PATH``, the children
taking turns ``--runs`` times, and the table gives the median over the runs of each
child's median. The children run with ``NUMBA_NUM_THREADS`` and ``OPENBLAS_NUM_THREADS``
set to ``--threads`` (1 by default: the figure is the per-call overhead, not the kernels'
parallel speed)::

    python benchmarks/bench_layer_step.py --checkout old=../old --checkout new=. --runs 5

Older checkouts whose API differs slightly are run through ``getattr`` fallbacks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

CASES = ("dense step", "dense step p=0.1", "qlora step", "qlora step p=0.1", "dense forward", "qlora forward")


def _harness():
    """``(time_interleaved, cpu_name)`` from numlora's harness, or local stand-ins for a
    checkout that has none."""
    try:
        from numlora.bench.harness import cpu_name, time_interleaved

        return time_interleaved, cpu_name
    except ImportError:
        def time_interleaved(fns, repeat, pause=0.0, calls=1):
            samples = [[] for _ in fns]
            for _ in range(repeat):
                for k, f in enumerate(fns):
                    f()
                    t0 = time.perf_counter()
                    f()
                    samples[k].append(time.perf_counter() - t0)
            return [type("T", (), {"samples": s})() for s in samples]

        return time_interleaved, platform.processor


def _layer(kind, size, rank, dropout, rng):
    import numlora as nl

    w = rng.standard_normal((size, size)).astype(np.float32) * np.float32(0.1)
    kw = {"dropout": dropout, "dropout_seed": 3} if dropout else {}
    if kind == "dense":
        layer = nl.LoraLinear.from_weight(w, rank, 16.0, **kw)
    else:
        layer = nl.QLoraLinear.from_weight(w, rank, 16.0, blocksize=64, **kw)
    layer.lora_b = rng.standard_normal((size, rank)).astype(np.float32) * np.float32(0.1)
    return layer


def make_case(name, size, rank, batch, inner, rng):
    """A function running ``inner`` calls of case ``name``."""
    kind = name.split()[0]
    dropout = 0.1 if "p=0.1" in name else 0.0
    layer = _layer(kind, size, rank, dropout, rng)
    x = rng.standard_normal((batch, size)).astype(np.float32)
    g = rng.standard_normal((batch, size)).astype(np.float32)
    y = np.empty((batch, size), np.float32)
    forward, backward, train = layer.forward, layer.backward, layer.train
    calls = range(inner)
    if "step" in name:
        def run():
            for _ in calls:
                train()
                forward(x, out=y)
                backward(g)
    else:
        layer.eval()

        def run():
            for _ in calls:
                forward(x, out=y)
    run()
    return run


def measure(args) -> dict:
    """``{case@size: median us per call}`` and the CPU name, timed in this process."""
    time_interleaved, cpu_name = _harness()
    rng = np.random.default_rng(0)
    names, fns = [], []
    for size in args.sizes:
        for case in args.cases:
            names.append(f"{case} {size}")
            fns.append(make_case(case, size, args.rank, args.batch, args.inner, rng))
    timings = time_interleaved(fns, args.repeat, 0.0)
    result = {}
    for name, t in zip(names, timings):
        per_call = np.asarray(t.samples) / args.inner * 1e6
        q1, med, q3 = np.percentile(per_call, [25, 50, 75])
        result[name] = {"median_us": float(med), "spread": float((q3 - q1) / 2 / med)}
    return {"cpu": cpu_name(), "results": result}


def compare(args) -> dict:
    """Run the checkouts in child processes, taking turns; ``{label: {case: [medians]}}``."""
    env = dict(os.environ)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(var, None)
    env["NUMBA_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = str(args.threads)
    child = [sys.executable, os.path.abspath(__file__), "--repeat", str(args.repeat), "--inner", str(args.inner),
             "--rank", str(args.rank), "--batch", str(args.batch), "--sizes", *map(str, args.sizes),
             "--cases", *args.cases, "--quiet"]
    runs = {label: {} for label, _ in args.checkout}
    cpu = ""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run.json")
        for k in range(args.runs):
            order = args.checkout if k % 2 == 0 else args.checkout[::-1]
            for label, path in order:
                env["PYTHONPATH"] = os.path.abspath(path)
                subprocess.run(child + ["--json", out], env=env, check=True, cwd=tmp)
                with open(out) as f:
                    got = json.load(f)
                cpu = got["cpu"]
                for case, r in got["results"].items():
                    runs[label].setdefault(case, []).append(r["median_us"])
                print(f"run {k + 1}/{args.runs} {label} done", file=sys.stderr, flush=True)
    return {"cpu": cpu, "threads": args.threads, "runs": runs}


def table(report) -> str:
    lines = [f"CPU: {report['cpu']}"]
    if "runs" in report:
        labels = list(report["runs"])
        lines.append(f"NUMBA_NUM_THREADS={report['threads']}; median over runs of each run's median, "
                     "us per call (min..max of the runs)")
        lines.append("| case | " + " | ".join(labels) + " |")
        lines.append("|---" * (len(labels) + 1) + "|")
        for case in report["runs"][labels[0]]:
            cells = []
            for label in labels:
                v = report["runs"][label].get(case, [])
                cells.append(f"{np.median(v):.1f} ({min(v):.1f}..{max(v):.1f})" if v else "-")
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
    else:
        lines.append("| case | median us | spread |")
        lines.append("|---|---|---|")
        for case, r in report["results"].items():
            lines.append(f"| {case} | {r['median_us']:.1f} | {r['spread'] * 100:.1f} % |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--repeat", type=int, default=101, help="samples per case")
    p.add_argument("--inner", type=int, default=50, help="calls per sample")
    p.add_argument("--checkout", action="append", default=[], metavar="LABEL=PATH",
                   help="compare checkouts in child processes (repeatable)")
    p.add_argument("--runs", type=int, default=5, help="child runs per checkout when comparing")
    p.add_argument("--threads", type=int, default=1, help="NUMBA / OpenBLAS threads of the children")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--quiet", action="store_true", help="print no table")
    args = p.parse_args(argv)
    if args.checkout:
        args.checkout = [tuple(c.split("=", 1)) for c in args.checkout]
        report = compare(args)
    else:
        report = measure(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if not args.quiet:
        print(table(report))


if __name__ == "__main__":
    main()
