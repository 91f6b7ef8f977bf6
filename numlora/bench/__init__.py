"""``numlora bench``: numlora against the obvious numpy baselines and, when installed,
torch / PEFT / bitsandbytes, in one process. The other modes live beside it: ``--train``
below, ``--multi`` in :mod:`numlora.bench.multi`, ``--pipeline`` (the kernels inside a
numpy model run back to back, against their isolated times) in
:mod:`numlora.bench.pipeline`.

Method: the competitors of a case are timed in rounds, interleaved (A, B, C, A, B, C,
...). Before each timed call the competitor sleeps ``PAUSE_S`` (so OpenBLAS's or OpenMP's
spinning threads from the previous competitor are gone) and then runs once untimed (so
its own threads are awake and its caches warm, as in a loop that calls it repeatedly);
the next ``CALLS_PER_ROUND`` calls are timed. Medians over all timed calls are reported. Inputs and outputs are
preallocated (``out=`` where a competitor has it), so first-touch page faults are not
timed. Kernels are compiled before timing; ``--compile`` reports compile times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import harness, inputs
from .harness import cpu_name, machine, peak_rss_delta_mb  # noqa: F401  (re-exported)

PAUSE_S = 0.12


@dataclass
class Row:
    case: str
    numlora_ms: float
    competitor: str
    competitor_ms: float
    bytes_moved: int = 0
    goal: str = ""
    numlora_spread: float = 0.0
    competitor_spread: float = 0.0

    @property
    def ratio(self) -> float:
        """numlora time / competitor time (below 1: numlora is faster)."""
        return self.numlora_ms / self.competitor_ms

    @property
    def gbps(self) -> float:
        return self.bytes_moved / (self.numlora_ms * 1e-3) / 1e9 if self.bytes_moved else 0.0


#: Timed calls per competitor and round, right after its untimed warm-up call.
CALLS_PER_ROUND = 3


def time_interleaved(fns, repeat, pause=None):
    """:func:`numlora.bench.harness.time_interleaved` with this module's ``PAUSE_S`` and
    ``CALLS_PER_ROUND`` (read at call time)."""
    return harness.time_interleaved(fns, repeat, PAUSE_S if pause is None else pause, CALLS_PER_ROUND)


def numpy_quantize_nf4(x, blocksize, mid):
    """Vectorised numpy NF4 quantizer (absmax per block, searchsorted on the midpoints):
    the numpy baseline of the quantize case. Assumes n % blocksize == 0 and an even n."""
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


class _Peers:
    """torch / PEFT / bitsandbytes competitors, each None when not installed."""

    def __init__(self, w, a, b, alpha, rank):
        self.notes = []
        self.torch = self.peft_lora = self.bnb_linear = self.peft_qlora = self.bnbf = self.bnb_linear_bf16 = None
        try:
            import torch
        except ImportError:
            self.notes.append("torch not installed: no torch / PEFT / bitsandbytes rows")
            return
        self.torch = torch
        torch.manual_seed(0)
        wt = torch.from_numpy(w)
        out_f, in_f = w.shape

        Net = _one_layer_net(torch)

        try:
            from peft import LoraConfig, get_peft_model

            lin = torch.nn.Linear(in_f, out_f, bias=False)
            with torch.no_grad():
                lin.weight.copy_(wt)
            cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0)
            model = get_peft_model(Net(lin), cfg)
            layer = model.base_model.model.lin
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
                layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
            self.peft_lora = model.eval()
            self.peft_lora_layer = layer
        except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
            self.notes.append(f"PEFT LoRA unavailable: {exc!r}")
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbf

            self.bnbf = bnbf
            q = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(wt.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
            self.bnb_linear = q.to("cpu").eval()
            qb = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
            qb.weight = bnb.nn.Params4bit(wt.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
            self.bnb_linear_bf16 = qb.to("cpu").eval()
            try:
                from peft import LoraConfig, get_peft_model

                q2 = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4")
                q2.weight = bnb.nn.Params4bit(wt.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
                qm = get_peft_model(Net(q2.to("cpu")), LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"],
                                                                   lora_dropout=0.0))
                ql = qm.base_model.model.lin
                with torch.no_grad():
                    ql.lora_A["default"].weight.copy_(torch.from_numpy(a))
                    ql.lora_B["default"].weight.copy_(torch.from_numpy(b))
                self.peft_qlora = qm.eval()
            except Exception as exc:  # noqa: BLE001
                self.notes.append(f"PEFT QLoRA unavailable: {exc!r}")
        except Exception as exc:  # noqa: BLE001
            self.notes.append(f"bitsandbytes unavailable: {exc!r}")

    def call(self, module, xt):
        torch = self.torch

        def f():
            with torch.no_grad():
                module(xt)

        return f


def run(size=4096, rank=16, repeat=7, batches=(1, 8, 128), lora_batches=(1, 8, 128, 1024), peers=True):
    import numlora as nl

    rng = inputs.rng(0)
    out_f = in_f = size
    alpha = 2 * rank
    s = alpha / rank
    w = inputs.weight(out_f, in_f)
    a, b = inputs.adapter(out_f, in_f, rank)
    wbytes = w.nbytes
    P = _Peers(w, a, b, alpha, rank) if peers else None
    torch = P.torch if P else None
    rows, notes = [], list(P.notes) if P else []

    def group(case, ours, others, nbytes=0, goals=None, rep=repeat):
        if not others:
            return
        fns = [ours] + [f for _, f in others]
        harness.progress(f"  {case} ...")
        ts = time_interleaved(fns, rep)
        for (name, _), t in zip(others, ts[1:]):
            rows.append(Row(case, ts[0].median_ms, name, t.median_ms, nbytes, (goals or {}).get(name, ""),
                            ts[0].spread, t.spread))

    t = nl.quantize_nf4(w)
    # --- QLoRA forward -------------------------------------------------------------------
    for n in batches:
        x = inputs.activations(n, in_f)
        o1, o2 = np.empty((n, out_f), np.float32), np.empty((n, out_f), np.float32)
        nl.qlora_forward(x, t, a, b, s, out=o1)
        others = [("numpy dense float32 x @ W.T", lambda: np.dot(x, w.T, out=o2))]
        if P and P.bnb_linear is not None:
            xt = torch.from_numpy(x)
            others.append(("bitsandbytes Linear4bit", P.call(P.bnb_linear, xt)))
            if P.peft_qlora is not None:
                others.append(("PEFT QLoRA (Linear4bit + LoRA)", P.call(P.peft_qlora, xt)))
        goal = {1: "<= 0.5x (stretch 0.35x)", 8: "<= 0.6x", 128: "<= 1.25x"}.get(n, "")
        group(f"QLoRA forward, batch {n}", lambda: nl.qlora_forward(x, t, a, b, s, out=o1), others, t.nbytes,
              {"numpy dense float32 x @ W.T": goal})

    # --- QLoRA forward in bfloat16 compute (bitsandbytes' compute_dtype) ------------------------
    if P and P.bnb_linear_bf16 is not None:
        for n in batches:
            x = inputs.activations(n, in_f)
            o1 = np.empty((n, out_f), np.float32)
            nl.qlora_forward(x, t, a, b, s, out=o1, compute_dtype="bfloat16")
            others = [("bitsandbytes Linear4bit, bf16 compute", P.call(P.bnb_linear_bf16, torch.from_numpy(x)))]
            group(f"QLoRA forward, bf16 compute, batch {n}",
                  lambda: nl.qlora_forward(x, t, a, b, s, out=o1, compute_dtype="bfloat16"), others, t.nbytes,
                  {"bitsandbytes Linear4bit, bf16 compute": "<= 1.0x"})

    # --- LoRA forward ----------------------------------------------------------------------
    for n in lora_batches:
        x = inputs.activations(n, in_f)
        o1, o2 = np.empty((n, out_f), np.float32), np.empty((n, out_f), np.float32)
        nl.lora_forward(x, w, a, b, s, out=o1)
        others = [("numpy base-only x @ W.T", lambda: np.dot(x, w.T, out=o2))]
        if P and P.peft_lora is not None:
            others.append(("PEFT LoRA Linear", P.call(P.peft_lora, torch.from_numpy(x))))
        group(f"LoRA float32 forward, batch {n}", lambda: nl.lora_forward(x, w, a, b, s, out=o1), others, wbytes,
              {"numpy base-only x @ W.T": "<= 1.1x"})

    # --- quantize / dequantize -------------------------------------------------------------------
    others = [("vectorised numpy quantizer", lambda: numpy_quantize_nf4(w.reshape(-1), 64, nl.NF4_MIDPOINTS))]
    if P and P.bnbf is not None:
        wt = torch.from_numpy(w)
        others.append(("bitsandbytes quantize_4bit",
                       lambda: P.bnbf.quantize_4bit(wt, blocksize=64, quant_type="nf4")))
    group("quantize_nf4 (blocksize 64)", lambda: nl.quantize_nf4(w), others, wbytes + t.nbytes,
          {"bitsandbytes quantize_4bit": ">= 25x faster (<= 0.04x)",
           "vectorised numpy quantizer": ">= 10x faster (<= 0.1x)"}, rep=max(3, repeat // 2))

    deq, deq2 = np.empty_like(w), np.empty_like(w)
    nl.dequantize_nf4(t, out=deq)
    others = [("numpy table lookup", lambda: numpy_dequantize_nf4(t.packed, t.absmax, 64, nl.NF4_CODE, deq2))]
    if P and P.bnbf is not None:
        qb, st = P.bnbf.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
        others.append(("bitsandbytes dequantize_4bit", lambda: P.bnbf.dequantize_4bit(qb, st)))
    group("dequantize_nf4 (out=)", lambda: nl.dequantize_nf4(t, out=deq), others, wbytes + t.nbytes,
          {"bitsandbytes dequantize_4bit": ">= 4x faster (<= 0.25x)"})

    # --- merge / unmerge -------------------------------------------------------------------------------
    wm, wm2 = w.copy(), w.copy()
    nl.merge_lora(wm, a, b, s)
    nl.unmerge_lora(wm, a, b, s, record=nl.merge_lora(wm, a, b, s, record=True))

    def np_merge():
        wm2.__iadd__(s * (b @ a))

    others = [("numpy W += s * (B @ A)", np_merge)]
    others_cycle = []
    if P and P.peft_lora is not None:
        layer = P.peft_lora_layer
        others.append(("PEFT merge() (unmerge untimed)", (layer.merge, layer.unmerge)))

        def peft_cycle():
            layer.merge()
            layer.unmerge()

        others_cycle = [("PEFT merge() + unmerge()", peft_cycle)]
    group("merge_lora (in place)", lambda: nl.merge_lora(wm, a, b, s), others, 2 * wbytes,
          {"numpy W += s * (B @ A)": ">= 2x faster (<= 0.5x)",
           "PEFT merge() (unmerge untimed)": ">= 5x faster (<= 0.2x)"})
    rec_box = []
    group("LoraLinear-style merge, record=True (unmerge untimed)",
          (lambda: rec_box.append(nl.merge_lora(wm, a, b, s, record=True)),
           lambda: nl.unmerge_lora(wm, a, b, s, record=rec_box.pop())),
          [("PEFT merge() (unmerge untimed)", (layer.merge, layer.unmerge))] if others_cycle else [], 2 * wbytes,
          {"PEFT merge() (unmerge untimed)": ">= 5x faster (<= 0.2x)"})

    def cycle():
        r = nl.merge_lora(wm, a, b, s, record=True)
        nl.unmerge_lora(wm, a, b, s, record=r)

    def np_cycle():
        wm2.__iadd__(s * (b @ a))
        wm2.__isub__(s * (b @ a))

    group("merge + unmerge, bit-exact (LoraLinear)", cycle,
          [("numpy add then subtract (not exact)", np_cycle)] + others_cycle, 4 * wbytes)

    # --- accuracy of the fused kernels against dequantize-then-float64 ----------------------------
    accuracy = {}
    wd = t.dequantize().astype(np.float64)
    for n in batches:
        x = rng.standard_normal((n, in_f), dtype=np.float32)
        ref = x.astype(np.float64) @ wd.T + s * (x.astype(np.float64) @ a.T) @ b.T
        got = nl.qlora_forward(x, t, a, b, s)
        accuracy[f"qlora_forward batch {n}"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    g = rng.standard_normal((8, out_f), dtype=np.float32)
    ref = g.astype(np.float64) @ wd
    accuracy["nf4_matmul_t batch 8"] = float(np.abs(nl.nf4_matmul_t(g, t) - ref).max() / np.abs(ref).max())
    del wd

    # --- memory -------------------------------------------------------------------------------------------
    mem = {}
    for n in (1, 128):
        x = rng.standard_normal((n, in_f), dtype=np.float32)
        o1 = np.empty((n, out_f), np.float32)
        mem[f"qlora_forward batch {n}, numlora"] = peak_rss_delta_mb(lambda: nl.qlora_forward(x, t, a, b, s, out=o1))
        if P and P.bnb_linear is not None:
            mem[f"qlora_forward batch {n}, bitsandbytes Linear4bit"] = peak_rss_delta_mb(
                P.call(P.bnb_linear, torch.from_numpy(x)))
    return rows, notes, mem, accuracy


def import_ms(repeat):
    def once(stmt):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", stmt], check=True)
        return time.perf_counter() - t0

    base, nl_t = [], []
    for _ in range(repeat):
        base.append(once("import numpy"))
        nl_t.append(once("import numlora"))
    return float(np.median(nl_t)) * 1e3, float(np.median(base)) * 1e3


COMPILE_CODE = r"""
import time, json
t0 = time.perf_counter()
import numlora as nl
import numpy as np
res = {"import numlora": time.perf_counter() - t0}
w = np.ones((64, 64), np.float32); a = np.ones((4, 64), np.float32); b = np.ones((64, 4), np.float32)
def first(name, f):
    t0 = time.perf_counter(); f(); res[name] = time.perf_counter() - t0
first("quantize_nf4", lambda: nl.quantize_nf4(w))
t = nl.quantize_nf4(w)
first("dequantize_nf4", lambda: nl.dequantize_nf4(t))
first("qlora_forward, batch 1", lambda: nl.qlora_forward(w[0], t, a, b, 1.0))
first("qlora_forward, batch 4", lambda: nl.qlora_forward(w[:4], t, a, b, 1.0))
first("nf4_matmul_t", lambda: nl.nf4_matmul_t(w[:4], t))
first("lora_forward", lambda: nl.lora_forward(w, w, a, b, 1.0))
first("merge_lora", lambda: nl.merge_lora(w, a, b, 1.0))
first("merge_lora(record=True)", lambda: nl.merge_lora(w, a, b, 1.0, record=True))
first("XorShift64.uniform", lambda: nl.XorShift64(1).uniform(10))
print(json.dumps(res))
"""


def compile_times():
    """Seconds of each first call in a fresh process: cache off, and cache on in a second
    process (the first one fills the cache). The calls' inputs are small, so the child
    runs with ``NUMLORA_SMALL_SERIAL=0``: these are the parallel builds, what a program
    with numba's threads compiles for a large weight (small work and one-thread programs
    compile the serial builds, faster: docs/performance.md). The process that fills the
    cache runs without ``PYTHONDONTWRITEBYTECODE``, so that the second one, as any import
    of an installed package, reads numlora's compiled bytecode instead of compiling its
    sources (50-60 ms where that variable is set and the checkout's .pyc files are old)."""
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for label, env in (("cache off", {"NUMLORA_CACHE": "0"}),
                           ("cache on, 2nd process", {"NUMBA_CACHE_DIR": cache})):
            e = dict(os.environ, NUMLORA_SMALL_SERIAL="0", **env)
            if "2nd" in label:  # the filling process also writes the bytecode caches (.pyc), as a first
                # import does unless PYTHONDONTWRITEBYTECODE is set (pip writes them at install)
                fill = {k: v for k, v in e.items() if k != "PYTHONDONTWRITEBYTECODE"}
                subprocess.run([sys.executable, "-c", COMPILE_CODE], env=fill, check=True, capture_output=True)
            r = subprocess.run([sys.executable, "-c", COMPILE_CODE], env=e, check=True, capture_output=True, text=True)
            out[label] = json.loads(r.stdout)
    return out


def to_markdown(rows) -> str:
    lines = ["| case | numlora ms | competitor | competitor ms | ratio | goal | numlora GB/s |",
             "|---|---:|---|---:|---:|---|---:|"]

    def ms(t, spread):
        return f"{t:.2f} ±{spread:.0%}" if spread else f"{t:.2f}"

    for r in rows:
        gb = f"{r.gbps:.1f}" if r.bytes_moved else "-"
        lines.append(f"| {r.case} | {ms(r.numlora_ms, r.numlora_spread)} | {r.competitor} | "
                     f"{ms(r.competitor_ms, r.competitor_spread)} | {r.ratio:.2f}x | {r.goal} | {gb} |")
    return "\n".join(lines)


def _noise_line(rows) -> str:
    """The harness's noise warning for a table's rows (spreads kept in the rows)."""
    return harness.noise_warning([s for r in rows for s in (r.numlora_spread, r.competitor_spread)])


#: ``--quick``: the largest weight side and the repeats of a quick run (every mode).
QUICK_SIZE, QUICK_REPEAT = 1024, 3


def _quick(args) -> None:
    """``--quick``: a smaller weight, fewer rounds, two batch sizes - a smoke run of the
    whole table in seconds (its ratios are not the documented ones)."""
    if getattr(args, "quick", False):
        args.size = min(args.size, QUICK_SIZE)
        args.repeat = min(args.repeat, QUICK_REPEAT)
        args.batch = args.batch or [1, 128]


def main(args) -> int:
    _quick(args)
    batches = tuple(args.batch) if args.batch else (1, 8, 128)
    lora_batches = tuple(args.batch) if args.batch else (1, 8, 128, 1024)
    rows, notes, mem, accuracy = run(size=args.size, rank=args.rank, repeat=args.repeat, batches=batches,
                           lora_batches=lora_batches, peers=not args.no_peers)
    date = time.strftime("%Y-%m-%d")
    mach = machine()
    print(f"numlora bench, {date}: {args.size} x {args.size} float32 weight, rank {args.rank}; median of "
          f"{args.repeat} interleaved rounds (ratio = numlora / competitor)\n\nMachine: {mach}\n")
    print(to_markdown(rows))
    if warning := _noise_line(rows):
        print(f"\n{warning}")
    if mem:
        print("\nPeak resident memory added by one call (MiB):\n")
        for k, mb in mem.items():
            print(f"- {k}: {mb:.1f}")
    print("\nLargest error of the fused NF4 kernels against dequantize-then-float64, relative to the "
          "largest output:\n")
    for k, e in accuracy.items():
        print(f"- {k}: {e:.2e}")
    imp, npimp = import_ms(args.repeat)
    print(f"\nimport numlora in a fresh process: {imp:.0f} ms (import numpy alone: {npimp:.0f} ms)")
    result = {"machine": mach, "date": date, "size": args.size, "rank": args.rank, "repeat": args.repeat,
              "rows": [dict(asdict(r), ratio=r.ratio, gbps=r.gbps) for r in rows], "peak_rss_mb": mem,
              "accuracy": accuracy, "import_ms": imp, "import_numpy_ms": npimp, "notes": notes}
    if args.compile:
        ct = compile_times()
        result["compile_s"] = ct
        print("\nFirst call per kernel in a fresh process (s):\n")
        keys = list(next(iter(ct.values())))
        print("| call | " + " | ".join(ct) + " |")
        print("|---|" + "---:|" * len(ct))
        for k in keys:
            print(f"| {k} | " + " | ".join(f"{ct[label][k]:.3f}" for label in ct) + " |")
    for n in notes:
        print(f"\nnote: {n}")
    if args.json:
        from ..io import write_text_atomic

        write_text_atomic(args.json, json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0


# --- training step (numlora bench --train) ---------------------------------------------------------
#: Pause before each competitor's warm-up call in the training benchmark (seconds).
TRAIN_PAUSE_S = 0.3
TRAIN_LR = 1e-4

TRAIN_METHOD = (
    "One training step = forward in training mode + backward (grad of x, A and B, given a fixed "
    "dL/dy) + AdamW step on A and B (lr 1e-4, no weight decay, no dropout). Competitors are "
    "interleaved in rounds; each sleeps {pause:g} s and runs one untimed warm-up step before its "
    "{calls} timed steps; medians of all timed steps. Buffers: the numpy step writes every product "
    "and the AdamW temporaries into preallocated arrays (out=); numlora's forward writes into a "
    "preallocated out= and accumulates into its persistent grad_a / grad_b (grad_x is a fresh "
    "array, as the API returns it); torch allocates as autograd does (x.grad reset to None each "
    "step, optimizer zero_grad(set_to_none=False)). The bf16 rows: the NF4 layers with a bfloat16 "
    "compute dtype (numlora's QLoraLinear(compute_dtype=\"bfloat16\"), bitsandbytes' Linear4bit("
    "compute_dtype=torch.bfloat16) under PEFT), gradients of A and B only (a first layer: "
    "numlora's backward(need_grad_x=False), x without requires_grad in torch).")


class _NumpyTrainStep:
    """The hand-written numpy equivalent of a LoRA training step over a dense base, BLAS for
    every product, every buffer preallocated:

    forward ``U = s x A^T``, ``y = x W^T + U B^T``; backward ``H = G B``, ``dB = G^T U``,
    ``dA = s H^T x``, ``dx = G W + s H A``; AdamW (decoupled weight decay, bias correction)
    on A and B in place."""

    def __init__(self, w, a, b, s, x, g, lr=TRAIN_LR, betas=(0.9, 0.999), eps=1e-8, wd=0.0):
        self.w, self.a, self.b, self.s, self.x, self.g = w, a, b, np.float32(s), x, g
        n, out_f, in_f, r = x.shape[0], w.shape[0], w.shape[1], a.shape[0]
        f = np.float32
        self.y, self.y2 = np.empty((n, out_f), f), np.empty((n, out_f), f)
        self.u, self.h = np.empty((n, r), f), np.empty((n, r), f)
        self.dx, self.dx2 = np.empty((n, in_f), f), np.empty((n, in_f), f)
        self.ga, self.gb = np.empty_like(a), np.empty_like(b)
        self.state = [(a, self.ga, np.zeros_like(a), np.zeros_like(a), np.empty_like(a)),
                      (b, self.gb, np.zeros_like(b), np.zeros_like(b), np.empty_like(b))]
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.t = lr, betas, eps, wd, 0

    def __call__(self):
        x, w, a, b, g, s = self.x, self.w, self.a, self.b, self.g, self.s
        # forward
        np.dot(x, w.T, out=self.y)
        np.dot(x, a.T, out=self.u)
        self.u *= s
        np.dot(self.u, b.T, out=self.y2)
        self.y += self.y2
        # backward
        np.dot(g, b, out=self.h)
        np.dot(g.T, self.u, out=self.gb)
        np.dot(self.h.T, x, out=self.ga)
        self.ga *= s
        np.dot(g, w, out=self.dx)
        self.h *= s
        np.dot(self.h, a, out=self.dx2)
        self.dx += self.dx2
        # AdamW
        self.t += 1
        b1, b2, lr = self.b1, self.b2, self.lr
        bc1, bc2s = 1.0 - b1 ** self.t, np.sqrt(1.0 - b2 ** self.t)
        for p, gp, m, v, tmp in self.state:
            if self.wd:
                p *= np.float32(1.0 - lr * self.wd)
            m *= np.float32(b1)
            np.multiply(gp, np.float32(1.0 - b1), out=tmp)
            m += tmp
            v *= np.float32(b2)
            np.multiply(gp, gp, out=tmp)
            tmp *= np.float32(1.0 - b2)
            v += tmp
            np.sqrt(v, out=tmp)
            tmp *= np.float32(1.0 / bc2s)
            tmp += np.float32(self.eps)
            np.divide(m, tmp, out=tmp)
            tmp *= np.float32(lr / bc1)
            p -= tmp
        return self.dx


class _TorchTrainStep:
    """torch: a PEFT-wrapped module in train mode, ``y = model(x)``, ``y.backward(G)``
    (x requires grad, so dx is computed as in the other competitors), AdamW step on the
    LoRA parameters."""

    def __init__(self, torch, model, x, g, lr=TRAIN_LR, grad_x=True):
        self.torch, self.model = torch, model.train()
        self.x = torch.from_numpy(x.copy()).requires_grad_(grad_x)
        self.g = torch.from_numpy(g)
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    def __call__(self):
        self.opt.zero_grad(set_to_none=False)
        if self.x.requires_grad:
            self.x.grad = None
        y = self.model(self.x)
        y.backward(self.g)
        self.opt.step()


def _one_layer_net(torch):
    """A torch model class holding one layer named "lin", for PEFT to wrap."""

    class Net(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    return Net


def _peft_models(torch, w, a, b, rank, alpha, notes):
    """(PEFT LoRA over nn.Linear, PEFT QLoRA over bitsandbytes Linear4bit nf4 with float32
    compute, the same with bfloat16 compute), each None when unavailable (reason appended
    to notes)."""
    out_f, in_f = w.shape

    Net = _one_layer_net(torch)

    def wrap(base):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(Net(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"],
                                                     lora_dropout=0.0))
        layer = model.base_model.model.lin
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
        return model

    lora = qlora = qlora_bf16 = None
    try:
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
        lora = wrap(lin)
    except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
        notes.append(f"PEFT LoRA unavailable: {exc!r}")
    try:
        import bitsandbytes as bnb

        def quantized(dtype):
            q = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(torch.from_numpy(w).clone(), requires_grad=False, quant_type="nf4",
                                         blocksize=64)
            return wrap(q.to("cpu"))

        qlora = quantized(torch.float32)
        qlora_bf16 = quantized(torch.bfloat16)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"PEFT QLoRA (bitsandbytes) unavailable: {exc!r}")
    return lora, qlora, qlora_bf16


BF16_OURS = "numlora QLoRA step, bf16 compute, grads of A and B only"
BF16_PEER = "PEFT QLoRA (Linear4bit nf4, bf16 compute), grads of A and B only"


def run_train(size=4096, rank=16, batch=128, repeat=7, peers=True):
    """Time one training step of each competitor (see :data:`TRAIN_METHOD`); returns
    ``(rows, medians_ms, notes, checks)``."""
    import numlora as nl
    from numlora.train import AdamW

    out_f = in_f = size
    alpha = 2 * rank
    s = alpha / rank
    w = inputs.weight(out_f, in_f)
    a, b = (v.copy() for v in inputs.adapter(out_f, in_f, rank))  # trained in place: not the cached arrays
    x = inputs.activations(batch, in_f)
    g = inputs.activations(batch, out_f, stream=5) / np.float32(batch)
    notes, checks = [], {}

    def numlora_step(layer, need_grad_x=True):
        opt = AdamW(layer.parameters(), lr=TRAIN_LR)
        layer.train()
        y = np.empty((batch, out_f), np.float32)

        def f():
            opt.zero_grad()
            layer.forward(x, out=y)
            dx = layer.backward(g, need_grad_x=need_grad_x)
            opt.step()
            return dx

        return f

    dense = nl.LoraLinear(w, a, b, alpha)
    qlayer = nl.QLoraLinear(nl.quantize_nf4(w, 64), a, b, alpha)
    fns = {
        "numlora LoRA step, dense base": numlora_step(dense),
        "hand-written numpy (BLAS)": _NumpyTrainStep(w, a.copy(), b.copy(), s, x, g),
        "numlora QLoRA step, NF4 base": numlora_step(qlayer),
        BF16_OURS: numlora_step(nl.QLoraLinear(nl.quantize_nf4(w, 64), a.copy(), b.copy(), alpha,
                                               compute_dtype="bfloat16"), need_grad_x=False),
    }

    # agreement of the first step: numlora dense against the numpy equivalent (same formulas)
    probe = nl.LoraLinear(w, a, b, alpha).train()
    probe.forward(x)
    dx_nl = probe.backward(g)
    ref = _NumpyTrainStep(w, a.copy(), b.copy(), s, x, g)
    dx_np = ref()
    checks["grad_x, numlora dense vs numpy (max rel)"] = float(np.abs(dx_nl - dx_np).max() / np.abs(dx_np).max())
    checks["grad_a, numlora dense vs numpy (max rel)"] = float(np.abs(probe.grad_a - ref.ga).max()
                                                              / np.abs(ref.ga).max())
    checks["grad_b, numlora dense vs numpy (max rel)"] = float(np.abs(probe.grad_b - ref.gb).max()
                                                              / np.abs(ref.gb).max())
    del probe, ref

    if peers:
        try:
            import torch
        except ImportError:
            notes.append("torch not installed: no torch + PEFT rows")
        else:
            torch.manual_seed(0)
            lora, qlora, qlora_bf16 = _peft_models(torch, w, a, b, rank, alpha, notes)
            if lora is not None:
                fns["torch + PEFT LoRA (nn.Linear)"] = _TorchTrainStep(torch, lora, x, g)
            if qlora is not None:
                fns["PEFT QLoRA (bitsandbytes Linear4bit nf4)"] = _TorchTrainStep(torch, qlora, x, g)
            if qlora_bf16 is not None:
                fns[BF16_PEER] = _TorchTrainStep(torch, qlora_bf16, x, g, grad_x=False)

    names = list(fns)
    harness.progress(f"  timing {len(names)} training steps, {repeat} rounds ...")
    ts = time_interleaved([fns[k] for k in names], repeat, pause=TRAIN_PAUSE_S)
    med = {k: t.median_ms for k, t in zip(names, ts)}
    spread = {k: t.spread for k, t in zip(names, ts)}

    dense_k, np_k, nf4_k = names[0], names[1], names[2]
    case_d = f"LoRA training step, dense base, batch {batch}"
    case_q = f"QLoRA training step, NF4 base, batch {batch}"
    def row(case, ours, other, goal):
        return Row(case, med[ours], other, med[other], goal=goal, numlora_spread=spread[ours],
                   competitor_spread=spread[other])

    rows = [row(case_d, dense_k, np_k, "<= 1.1x")]
    if "torch + PEFT LoRA (nn.Linear)" in med:
        rows.append(row(case_d, dense_k, "torch + PEFT LoRA (nn.Linear)", "< 1x (faster)"))
    if "PEFT QLoRA (bitsandbytes Linear4bit nf4)" in med:
        rows.append(row(case_q, nf4_k, "PEFT QLoRA (bitsandbytes Linear4bit nf4)", "<= 0.6x"))
    rows.append(row(case_q, nf4_k, dense_k, "<= 1.3x"))
    if BF16_PEER in med:
        rows.append(row(f"QLoRA training step, bf16 compute, grads of A and B only, batch {batch}", BF16_OURS,
                        BF16_PEER, "<= 1.0x"))
    return rows, med, notes, checks


def train_markdown(rows) -> str:
    lines = ["| case | numlora ms | competitor | competitor ms | ratio | goal |",
             "|---|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.case} | {r.numlora_ms:.2f} ±{r.numlora_spread:.0%} | {r.competitor} | "
                     f"{r.competitor_ms:.2f} ±{r.competitor_spread:.0%} | {r.ratio:.2f}x | {r.goal} |")
    return "\n".join(lines)


def main_train(args) -> int:
    if getattr(args, "quick", False):
        args.size, args.repeat = min(args.size, QUICK_SIZE), min(args.repeat, QUICK_REPEAT)
    batch = args.batch[0] if args.batch else 128
    rows, med, notes, checks = run_train(size=args.size, rank=args.rank, batch=batch, repeat=args.repeat,
                                         peers=not args.no_peers)
    date = time.strftime("%Y-%m-%d")
    mach = machine()
    print(f"numlora bench --train, {date}: {args.size} x {args.size} float32 base, rank {args.rank}, batch {batch}; "
          f"median of {args.repeat} interleaved rounds x {CALLS_PER_ROUND} steps (ratio = numlora / competitor)"
          f"\n\nMachine: {mach}\n")
    print(train_markdown(rows))
    if warning := _noise_line(rows):
        print(f"\n{warning}")
    print("\nMedian ms per training step, every competitor (same run):\n")
    for k, ms in med.items():
        print(f"- {k}: {ms:.2f}")
    print("\nFirst step agreement:\n")
    for k, e in checks.items():
        print(f"- {k}: {e:.1e}")
    method = TRAIN_METHOD.format(pause=TRAIN_PAUSE_S, calls=CALLS_PER_ROUND)
    print(f"\nMethod: {method}")
    for n in notes:
        print(f"\nnote: {n}")
    if args.json:
        from ..io import write_text_atomic

        result = {"machine": mach, "date": date, "size": args.size, "rank": args.rank, "batch": batch,
                  "repeat": args.repeat, "calls_per_round": CALLS_PER_ROUND, "pause_s": TRAIN_PAUSE_S,
                  "rows": [dict(asdict(r), ratio=r.ratio) for r in rows], "median_ms": med, "checks": checks,
                  "method": method, "notes": notes}
        write_text_atomic(args.json, json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0
