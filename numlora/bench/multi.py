"""Many adapters in one batch (numlora.LoraBank) on Punica's workloads.

    numlora bench --multi [--quick] [--json PATH] [--repeat R] [--no-peers]
    python benchmarks/bench_multi.py [--quick] [--json PATH] [--repeats R] [--no-peers]   (the same)

Base: a 4096 x 4096 float32 weight (N(0, 0.02)) and its NF4 quantization (blocksize 64).
Adapters: ranks drawn from {8, 16, 32, 64} (seeded), A and B ~ N(0, 0.01), scaling 2.
Workloads (Punica): ``identical`` (every row adapter 0), ``distinct`` (row i uses
adapter i mod N: every row its own adapter while batch <= N), ``uniform`` (uniform over
the N adapters), ``zipf`` (adapter k with probability proportional to (k + 1)^-1.5), at
batch 1 / 16 / 64 / 256 with N = 8 / 64 / 512 adapters, plus ``base`` (every row -1: the
base product alone, what the low-rank part is measured against).

Competitors, in the same process, interleaved per configuration (numlora, baseline,
numlora, ...), a pause (0.1 s: OpenBLAS's threads spin after a call) and one untimed
warm-up call before every timed call, medians of R rounds:

- numpy gather-einsum (vLLM's CPU path): every row's A and B gathered from stacks padded
  to the largest rank, two einsums, the base product with numpy (dense) or numlora's
  nf4_matmul (NF4). N <= 64 only (the padded stacks for N = 512 would take 1 GiB).
- PEFT's mixed-batch forward: ``peft`` LoRA over ``torch.nn.Linear(4096, 4096)`` with the
  N adapters loaded, ``model(x, adapter_names=[...])``, torch on the CPU (dense base only;
  batch 64 with 64 adapters, all workloads).

Also timed: ``LoraBank.add`` of each of 512 adapters into a growing bank (median of the
first 64 and last 64 adds: the cost must not grow with the bank).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

import numlora
from numlora.multi import LoraBank

from . import harness
from .harness import cpu_name
from .inputs import SCALING, WORKLOADS, activations, bank_adapter, nf4_weight, weight, workload

SIDE = 4096
PAUSE = 0.1


def adapter(k, side=SIDE):
    """The k-th adapter of the bank (see :func:`numlora.bench.inputs.bank_adapter`)."""
    return bank_adapter(k, side)


def race(fns, repeats):
    """{name: median seconds}, the competitors interleaved round by round (the harness,
    one timed call per turn after a pause and a warm-up call)."""
    ts = harness.time_interleaved(list(fns.values()), repeats, PAUSE, calls=1)
    return {k: t.median_ms * 1e-3 for k, t in zip(fns, ts)}


class GatherEinsum:
    """vLLM's CPU LoRA path over numpy: gather each row's A and B from padded stacks."""

    def __init__(self, n_ad, base_fn):
        ads = [adapter(k) for k in range(n_ad)]
        rmax = max(a.shape[0] for a, _ in ads)
        self.a = np.zeros((n_ad, rmax, SIDE), np.float32)
        self.b = np.zeros((n_ad, SIDE, rmax), np.float32)
        for k, (a, b) in enumerate(ads):
            self.a[k, : a.shape[0]] = a
            self.b[k, :, : a.shape[0]] = b
        self.s = np.full(n_ad, SCALING, np.float32)
        self.base_fn = base_fn

    def __call__(self, x, ids, out):
        self.base_fn(x, out)
        m = ids >= 0
        idx = ids[m]
        u = np.einsum("ni,nri->nr", x[m], self.a[idx]) * self.s[idx][:, None]
        out[m] += np.einsum("nr,nor->no", u, self.b[idx])
        return out


def peft_model(n_ad, weight):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(os.cpu_count() or 1)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(SIDE, SIDE, bias=False)

        def forward(self, x):
            return self.lin(x)

    base = M()
    with torch.no_grad():
        base.lin.weight.copy_(torch.from_numpy(weight))
    model = None
    for k in range(n_ad):
        a, b = adapter(k)
        r = a.shape[0]
        cfg = LoraConfig(r=r, lora_alpha=SCALING * r, target_modules=["lin"], lora_dropout=0.0)
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=f"a{k}")
        else:
            model.add_adapter(f"a{k}", cfg)
        lin = model.base_model.model.lin
        with torch.no_grad():
            lin.lora_A[f"a{k}"].weight.copy_(torch.from_numpy(a))
            lin.lora_B[f"a{k}"].weight.copy_(torch.from_numpy(b))
    model.eval()
    return model


def build_bank(base, n_ad, add_times=None):
    bank = LoraBank(base)
    for k in range(n_ad):
        a, b = adapter(k)
        t0 = time.perf_counter()
        bank.add(f"a{k}", a, b, SCALING)
        if add_times is not None:
            add_times.append(time.perf_counter() - t0)
    return bank


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 64 and N = 64 only (the issue's figures)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--no-peers", action="store_true", help="skip PEFT even if installed")
    args = ap.parse_args(argv)
    notes = set()
    batches = (64,) if args.quick else (1, 16, 64, 256)
    n_ads = (64,) if args.quick else (8, 64, 512)
    w = weight(SIDE)
    t = nf4_weight(SIDE)
    xs = {b: activations(b, SIDE) for b in batches}
    outs = {b: np.empty((b, SIDE), np.float32) for b in batches}
    rows = []
    add_times = []
    t_start = time.perf_counter()

    def dense_base(x, out):
        np.dot(x, w.T, out=out)

    def nf4_base(x, out):
        numlora.nf4_matmul(x, t, out=out)

    for base_name, base, base_fn in (("dense", w, dense_base), ("NF4", t, nf4_base)):
        for n_ad in n_ads:
            bank = build_bank(base, n_ad, add_times if (base_name == "dense" and n_ad == max(n_ads)) else None)
            ge = GatherEinsum(n_ad, base_fn) if n_ad <= 64 else None
            pm = None
            if base_name == "dense" and n_ad == 64 and 64 in batches and not args.no_peers:
                try:
                    pm = peft_model(n_ad, w)
                except ImportError as exc:
                    notes.add(f"PEFT column skipped: {exc} (pip install -e '.[peers]' brings torch and peft)")
            for batch in batches:
                x, out = xs[batch], outs[batch]
                base_ids = workload("base", batch, n_ad)
                for kind in ("base",) + WORKLOADS:
                    ids = workload(kind, batch, n_ad)
                    fns = {"numlora": lambda: bank.forward(x, ids, out=out)}
                    if kind != "base":  # the LoRA part against a base-only call of the same rounds
                        fns["numlora_base"] = lambda: bank.forward(x, base_ids, out=out)
                    if ge is not None and kind != "base":
                        fns["einsum"] = lambda: ge(x, ids, np.empty_like(out))
                    if pm is not None and batch == 64:
                        import torch

                        xt = torch.from_numpy(x)
                        names = [f"a{k}" if k >= 0 else "__base__" for k in ids]

                        def peft_call():
                            with torch.no_grad():
                                return pm(xt, adapter_names=names)

                        fns["peft"] = peft_call
                    # correctness: numlora against the einsum baseline, once
                    if "einsum" in fns:
                        y0 = bank.forward(x, ids).astype(np.float64)
                        y1 = ge(x, ids, np.empty_like(out)).astype(np.float64)
                        err = float(np.abs(y0 - y1).max() / np.abs(y1).max())
                        assert err < 1e-4, (base_name, n_ad, batch, kind, err)
                    med = race(fns, args.repeats)
                    rows.append({"base": base_name, "batch": batch, "adapters": n_ad, "workload": kind,
                                 **{k + "_ms": v * 1e3 for k, v in med.items()}})
                    harness.progress(f"  {base_name} batch {batch} N {n_ad} {kind}: "
                                     + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in med.items()))
            bank = ge = pm = None  # free them (not del: the timed closures above read these names)
    # adds into a bank whose pool was reserved up front (no page faults while adding)
    reserved_times = []
    bank = LoraBank(w)
    bank.reserve(sum(adapter(k)[0].shape[0] for k in range(max(n_ads))))
    for k in range(max(n_ads)):
        a, b = adapter(k)
        t0 = time.perf_counter()
        bank.add(f"a{k}", a, b, SCALING)
        reserved_times.append(time.perf_counter() - t0)
    bank = None  # freed before the report
    elapsed = time.perf_counter() - t_start
    print_report(rows, add_times, reserved_times, n_ads, elapsed, args)
    for n in sorted(notes):
        print(f"\nnote: {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "add_ms": [a * 1e3 for a in add_times],
                       "add_reserved_ms": [a * 1e3 for a in reserved_times], "env": env()}, f, indent=1)


def env():
    import numba

    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(),
            "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__}


def _base_ms(r, key) -> float:
    """numlora's base-only time for row ``r``'s bank and batch: timed in the same rounds
    as its workload (a base-only time from a race of its own came out 27 ms against 18 ms
    for the whole Zipf batch in one run on AMD Zen 3, 17 against 19 in a script
    alternating the two), else the "base" row's."""
    if "numlora_base_ms" in r:
        return r["numlora_base_ms"]
    return key[(r["base"], r["batch"], r["adapters"], "base")]["numlora_ms"]


def _part_ratio(other, other_base, ours, our_base):
    a, b = other - other_base, ours - our_base
    if a <= 0 or b <= 0:
        return f"n/a (a base-only time came out above its workload's: {other:.2f} vs {other_base:.2f}, " \
               f"{ours:.2f} vs {our_base:.2f} ms; timing noise)"
    return f"{a / b:.1f}x ({a:.2f} vs {b:.2f} ms)"


def print_report(rows, add_times, reserved_times, n_ads, elapsed, args):
    import numba

    try:
        import peft
        import torch

        tv = f", torch {torch.__version__}, peft {peft.__version__}"
    except ImportError:
        tv = ""
    print(f"Measured {time.strftime('%Y-%m-%d')} with `python benchmarks/bench_multi.py"
          f"{' --quick' if args.quick else ''}` on {cpu_name()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}{tv}; "
          f"4096 x 4096 base, ranks from {{8, 16, 32, 64}}, median of {args.repeats} interleaved rounds "
          f"(whole run {elapsed:.0f} s).\n")
    print("| base | batch | adapters | workload | numlora ms | vs identical | LoRA part ms | "
          "gather-einsum ms | numlora speed-up | PEFT ms | numlora speed-up |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    key = {(r["base"], r["batch"], r["adapters"], r["workload"]): r for r in rows}
    for r in rows:
        if r["workload"] == "base":
            continue
        ident = key[(r["base"], r["batch"], r["adapters"], "identical")]["numlora_ms"]
        base = _base_ms(r, key)
        ms = r["numlora_ms"]
        ein = r.get("einsum_ms")
        pf = r.get("peft_ms")
        print(f"| {r['base']} | {r['batch']} | {r['adapters']} | {r['workload']} | {ms:.2f} | {ms / ident:.2f}x | "
              f"{ms - base:.2f} | {'' if ein is None else f'{ein:.2f}'} | "
              f"{'' if ein is None else f'{ein / ms:.1f}x'} | {'' if pf is None else f'{pf:.2f}'} | "
              f"{'' if pf is None else f'{pf / ms:.1f}x'} |")
    print("\n(LoRA part = numlora time minus the same bank's time with every row -1, base only, timed in the "
          "same interleaved rounds.)\n")
    for b in ("dense", "NF4"):
        for n_ad in n_ads:
            for batch in (64,):
                r = key.get((b, batch, n_ad, "base"))
                if r and "peft_ms" in r:
                    print(f"Base only (every row -1), {b}, batch {batch}: numlora {r['numlora_ms']:.2f} ms, "
                          f"PEFT (torch) '__base__' rows {r['peft_ms']:.2f} ms.\n")
    print("Figures the issue asks for (same-run ratios):\n")
    for b in ("dense", "NF4"):
        d = key.get((b, 64, 64, "distinct"))
        i = key.get((b, 64, 64, "identical"))
        if d and i:
            ratio = d["numlora_ms"] / i["numlora_ms"]
            print(f"- {b}: every-row-different / every-row-the-same, batch 64, 64 adapters: {ratio:.2f}x "
                  f"(goal <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
        z = key.get((b, 64, 64, "zipf"))
        base = key.get((b, 64, 64, "base"))
        if z and "einsum_ms" in z:
            zb = _base_ms(z, key)
            s = z["einsum_ms"] / z["numlora_ms"]
            print(f"- {b}: Zipf, batch 64, 64 adapters, numpy gather-einsum / numlora: {s:.1f}x "
                  f"(goal >= 3x: {'met' if s >= 3 else 'NOT met'}); LoRA parts only (each minus numlora's "
                  f"base-only time): "
                  f"{_part_ratio(z['einsum_ms'], zb, z['numlora_ms'], zb)}")
        if z and "peft_ms" in z:
            s = z["peft_ms"] / z["numlora_ms"]
            print(f"- {b}: Zipf, batch 64, 64 adapters, PEFT mixed-batch / numlora: {s:.1f}x "
                  f"(goal >= 10x: {'met' if s >= 10 else 'NOT met'}); LoRA parts only (each minus its own "
                  f"base-only time, every row -1 / '__base__'): "
                  f"{_part_ratio(z['peft_ms'], base['peft_ms'], z['numlora_ms'], base['numlora_ms'])}")
    for label, times in (("growing pool, fresh memory", add_times),
                         ("pool reserved up front with bank.reserve()", reserved_times)):
        if not times:
            continue
        a = np.array(times[1:]) * 1e3  # the first add compiles / loads the copy kernel
        k = min(64, len(a) // 2)
        print(f"- LoraBank.add into a bank of up to {len(times)} adapters ({label}; ranks 8-64, 4096 x 4096): "
              f"median {np.median(a):.3f} ms, first {k} adds {np.median(a[:k]):.3f} ms, last {k} adds "
              f"{np.median(a[-k:]):.3f} ms, 95th percentile {np.percentile(a, 95):.3f} ms, max {a.max():.3f} ms "
              f"(goal < 1 ms, independent of the bank's size: "
              f"{'met' if np.median(a[-k:]) < 1 and np.percentile(a, 95) < 1 else 'NOT met'} for the median and "
              f"95th percentile)")

if __name__ == "__main__":
    main()
