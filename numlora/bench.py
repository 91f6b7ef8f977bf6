"""``numlora bench``: numlora against the obvious numpy baselines, in one process.

Every case times numlora and its baseline interleaved (A, B, A, B, ...), with a short
pause before each timed call so OpenBLAS's spinning threads do not slow the next one,
and reports medians. Inputs and outputs are preallocated (``out=``) so first-touch page
faults are not timed. Kernels are compiled before timing; compile time is reported
separately by ``--compile``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

PAUSE_S = 0.12


@dataclass
class Row:
    case: str
    numlora_ms: float
    baseline: str
    baseline_ms: float
    bytes_moved: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.numlora_ms / self.baseline_ms

    @property
    def gbps(self) -> float:
        return self.bytes_moved / (self.numlora_ms * 1e-3) / 1e9 if self.bytes_moved else 0.0


def _time_interleaved(fns, repeat):
    times = [[] for _ in fns]
    for _ in range(repeat):
        for k, f in enumerate(fns):
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return [float(np.median(t)) * 1e3 for t in times]


def numpy_quantize_nf4(x, blocksize, mid):
    """Vectorised numpy NF4 quantizer (absmax per block, searchsorted on the midpoints):
    the baseline of the quantize case. Assumes n % blocksize == 0 and an even n."""
    blocks = x.reshape(-1, blocksize)
    am = np.abs(blocks).max(axis=1, keepdims=True)
    y = blocks * (np.float32(1) / np.maximum(am, np.float32(1e-38)))
    q = np.searchsorted(mid, y.reshape(-1), side="left").astype(np.uint8)
    return (q[0::2] << 4) | q[1::2], am.reshape(-1)


def numpy_dequantize_nf4(packed, absmax, blocksize, code, out):
    q = np.empty(packed.size * 2, np.uint8)
    q[0::2] = packed >> 4
    q[1::2] = packed & 15
    np.multiply(code[q].reshape(-1, blocksize), absmax[:, None], out=out.reshape(-1, blocksize))


def run(size=4096, rank=16, repeat=7, batches=(1, 128), quick=False):
    import numlora as nl

    rng = np.random.default_rng(0)
    out_f = in_f = size
    w = (rng.standard_normal((out_f, in_f), dtype=np.float32) * 0.02).astype(np.float32)
    a = (rng.standard_normal((rank, in_f), dtype=np.float32) * 0.01).astype(np.float32)
    b = (rng.standard_normal((out_f, rank), dtype=np.float32) * 0.01).astype(np.float32)
    wbytes = w.nbytes
    rows = []

    for n in batches:
        x = rng.standard_normal((n, in_f), dtype=np.float32)
        o1 = np.empty((n, out_f), np.float32)
        o2 = np.empty((n, out_f), np.float32)
        nl.lora_forward(x, w, a, b, 2.0, out=o1)
        t_nl, t_np = _time_interleaved(
            [lambda: nl.lora_forward(x, w, a, b, 2.0, out=o1), lambda: np.dot(x, w.T, out=o2)], repeat)
        rows.append(Row(f"lora_forward, batch {n}", t_nl, "numpy x @ W.T (base only)", t_np, wbytes))

    t = nl.quantize_nf4(w)
    t_nl, t_np = _time_interleaved(
        [lambda: nl.quantize_nf4(w), lambda: numpy_quantize_nf4(w.reshape(-1), 64, nl.NF4_MIDPOINTS)],
        max(3, repeat // 2))
    rows.append(Row("quantize_nf4 (blocksize 64)", t_nl, "vectorised numpy quantizer", t_np, wbytes + t.nbytes))

    deq = np.empty_like(w)
    deq2 = np.empty_like(w)
    nl.dequantize_nf4(t, out=deq)
    t_nl, t_np = _time_interleaved(
        [lambda: nl.dequantize_nf4(t, out=deq),
         lambda: numpy_dequantize_nf4(t.packed, t.absmax, 64, nl.NF4_CODE, deq2)], repeat)
    rows.append(Row("dequantize_nf4 (out=)", t_nl, "numpy table lookup", t_np, wbytes + t.nbytes))

    wm = w.copy()
    wm2 = w.copy()
    nl.merge_lora(wm, a, b, 2.0)
    rec = nl.merge_lora(wm, a, b, 2.0, record=True)
    nl.unmerge_lora(wm, a, b, 2.0, record=rec)

    def np_merge():
        wm2.__iadd__(2.0 * (b @ a))

    t_nl, t_np = _time_interleaved([lambda: nl.merge_lora(wm, a, b, 2.0), np_merge], repeat)
    rows.append(Row("merge_lora (plain)", t_nl, "numpy W += s * (B @ A)", t_np, 2 * wbytes))

    def tracked_cycle():
        r = nl.merge_lora(wm, a, b, 2.0, record=True)
        nl.unmerge_lora(wm, a, b, 2.0, record=r)

    def np_cycle():
        wm2.__iadd__(2.0 * (b @ a))
        wm2.__isub__(2.0 * (b @ a))

    t_nl, t_np = _time_interleaved([tracked_cycle, np_cycle], repeat)
    rows.append(Row("merge + unmerge, bit-exact (record=True)", t_nl, "numpy add then subtract", t_np,
                    4 * wbytes, note="numpy does not restore W bit for bit"))

    for n in batches:
        x = rng.standard_normal((n, in_f), dtype=np.float32)
        o1 = np.empty((n, out_f), np.float32)
        o2 = np.empty((n, out_f), np.float32)
        nl.qlora_forward(x, t, a, b, 2.0, out=o1)

        def np_qlora():
            numpy_dequantize_nf4(t.packed, t.absmax, 64, nl.NF4_CODE, deq2)
            np.dot(x, deq2.T, out=o2)

        t_nl, t_np = _time_interleaved([lambda: nl.qlora_forward(x, t, a, b, 2.0, out=o1), np_qlora],
                                       max(3, repeat // 2))
        rows.append(Row(f"qlora_forward, batch {n}", t_nl, "numpy dequantize, then x @ W.T", t_np, t.nbytes))

    imp_nl, imp_np = import_times(repeat)
    rows.append(Row("import numlora (fresh process)", imp_nl, "import numpy (fresh process)", imp_np,
                    note="wall time of python -c 'import ...' minus python -c 'pass'"))
    return rows


def import_times(repeat):
    def once(stmt):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", stmt], check=True)
        return time.perf_counter() - t0

    base, nl_t, np_t = [], [], []
    for _ in range(repeat):
        base.append(once("pass"))
        nl_t.append(once("import numlora"))
        np_t.append(once("import numpy"))
    b = float(np.median(base))
    return (float(np.median(nl_t)) - b) * 1e3, (float(np.median(np_t)) - b) * 1e3


def compile_times():
    """Seconds of the first call of each kernel in a fresh process (cache on and off)."""
    code = r"""
import time, json, numpy as np
t0 = time.perf_counter(); import numlora as nl; t_import = time.perf_counter() - t0
w = np.ones((64, 64), np.float32); a = np.ones((4, 64), np.float32); b = np.ones((64, 4), np.float32)
res = {"import": t_import}
def first(name, f):
    t0 = time.perf_counter(); f(); res[name] = time.perf_counter() - t0
first("quantize_nf4", lambda: nl.quantize_nf4(w))
t = nl.quantize_nf4(w)
first("dequantize_nf4", lambda: nl.dequantize_nf4(t))
first("qlora_forward", lambda: nl.qlora_forward(w[0], t, a, b, 1.0))
first("merge_lora", lambda: nl.merge_lora(w, a, b, 1.0))
first("merge_lora(record=True)", lambda: nl.merge_lora(w, a, b, 1.0, record=True))
first("XorShift64.uniform", lambda: nl.XorShift64(1).uniform(10))
print(json.dumps(res))
"""
    out = {}
    for label, env in (("no cache", {"NUMLORA_CACHE": "0"}), ("cached, 2nd process", {})):
        e = dict(os.environ, **env)
        if label.startswith("cached"):
            subprocess.run([sys.executable, "-c", code], env=e, check=True, capture_output=True)
        r = subprocess.run([sys.executable, "-c", code], env=e, check=True, capture_output=True, text=True)
        out[label] = json.loads(r.stdout)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba

    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}, "
            f"numba {numba.__version__}, {numba.get_num_threads()} numba threads")


def to_markdown(rows, title) -> str:
    lines = [title, "", "| case | numlora (ms) | baseline | baseline (ms) | ratio | numlora GB/s |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        gb = f"{r.gbps:.1f}" if r.bytes_moved else "-"
        lines.append(f"| {r.case} | {r.numlora_ms:.2f} | {r.baseline} | {r.baseline_ms:.2f} | "
                     f"{r.ratio:.2f}x | {gb} |")
    notes = [f"- {r.case}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(args) -> int:
    batches = tuple(args.batch) if args.batch else (1, 128)
    rows = run(size=args.size, rank=args.rank, repeat=args.repeat, batches=batches)
    title = (f"numlora bench: {args.size} x {args.size} float32 weight, rank {args.rank}, medians of "
             f"{args.repeat} interleaved runs, {time.strftime('%Y-%m-%d')}\n\nMachine: {machine()}")
    print(to_markdown(rows, title))
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "size": args.size, "rank": args.rank,
              "rows": [dict(asdict(r), ratio=r.ratio, gbps=r.gbps) for r in rows]}
    if args.compile:
        ct = compile_times()
        result["compile_s"] = ct
        print("\nFirst call per kernel (s), fresh process:\n")
        keys = list(next(iter(ct.values())))
        print("| call | " + " | ".join(ct) + " |")
        print("|---|" + "---:|" * len(ct))
        for k in keys:
            print(f"| {k} | " + " | ".join(f"{ct[label][k]:.3f}" for label in ct) + " |")
    if args.json:
        from .io import write_text_atomic

        write_text_atomic(args.json, json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0
