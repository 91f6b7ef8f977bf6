"""Render a ``numlora bench --json`` result into docs/performance.md and the README's
performance section (between the ``<!-- bench:start -->`` / ``<!-- bench:end -->`` marks).

    numlora bench --compile --json bench.json
    python benchmarks/render_tables.py bench.json
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from numlora.bench import Row, to_markdown  # noqa: E402
from numlora.io import write_text_atomic  # noqa: E402


def render(data: dict, *, full: bool) -> str:
    rows = [Row(r["case"], r["numlora_ms"], r["competitor"], r["competitor_ms"], r["bytes_moved"], r["goal"])
            for r in data["rows"]]
    out = [f"Measured {data['date']} with `numlora bench` ({data['size']} x {data['size']} float32 weight, "
           f"rank {data['rank']}, median of {data['repeat']} interleaved rounds; ratio = numlora time / "
           f"competitor time, below 1 means numlora is faster) on: {data['machine']}.", "", to_markdown(rows)]
    if full:
        if data.get("peak_rss_mb"):
            out += ["", "Peak resident memory added by one call (MiB, Linux VmHWM):", ""]
            out += [f"- {k}: {v:.1f}" for k, v in data["peak_rss_mb"].items()]
        if data.get("accuracy"):
            out += ["", "Largest error of the fused NF4 kernels against dequantize-then-float64, relative to the "
                        "largest output:", ""]
            out += [f"- {k}: {v:.2e}" for k, v in data["accuracy"].items()]
        out += ["", f"`import numlora` in a fresh process: {data['import_ms']:.0f} ms "
                    f"(`import numpy` alone: {data['import_numpy_ms']:.0f} ms)."]
        ct = data.get("compile_s")
        if ct:
            labels = list(ct)
            out += ["", "First call of each kernel in a fresh process (seconds; numba compiles it, or loads it "
                        "from the on-disk cache):", "", "| call | " + " | ".join(labels) + " |",
                    "|---|" + "---:|" * len(labels)]
            for key in ct[labels[0]]:
                out.append(f"| {key} | " + " | ".join(f"{ct[lab][key]:.3f}" for lab in labels) + " |")
        for note in data.get("notes", []):
            out += ["", f"Note: {note}"]
    return "\n".join(out) + "\n"


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    perf = os.path.join(ROOT, "docs", "performance.md")
    with open(perf) as f:
        text = f.read()
    head = text.split("<!-- bench:start -->")[0]
    tail = text.split("<!-- bench:end -->")[1]
    write_text_atomic(perf, head + "<!-- bench:start -->\n" + render(data, full=True) + "<!-- bench:end -->" + tail)
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    head = text.split("<!-- bench:start -->")[0]
    tail = text.split("<!-- bench:end -->")[1]
    write_text_atomic(readme, head + "<!-- bench:start -->\n" + render(data, full=False) + "<!-- bench:end -->" + tail)
    print(f"updated {perf} and {readme}")


if __name__ == "__main__":
    main(sys.argv[1])
