"""numlora on Dask: the figures of docs/dask.md, measured in one run.

    python benchmarks/bench_dask.py [--ckpt-mb 300] [--rows 1000000] [--chunks 100] [--json PATH]

1. Pickled size of each public object against the bytes of its arrays: protocol 5 with
   a ``buffer_callback`` (the stream plus the out-of-band buffers, what Dask sends), at a
   realistic layer size (2048 x 2048, rank 16). The goal is <= 1.05x.
2. ``numlora quantize`` of a generated bf16 model folder (``--ckpt-mb`` of weights in
   ``--shards`` shards of 2048 x 2048 weights, each one of four random N(0, 0.02)
   matrices times its own scale, written once into the work folder): in
   this process against a 2-worker ``distributed.LocalCluster`` (processes, one thread
   each). Both run once untimed first (numba's cache loaded in every process), then
   ``--repeats`` interleaved rounds; medians. Reported for the cluster: its start (not in
   the job time), the wall time of the tasks phase, the seconds inside the tasks, and the
   time in scheduling (the tasks phase's wall time minus the busiest worker's seconds
   inside tasks). The outputs are compared byte for byte.
3. ``numlora.dask.apply_layer`` of a QLoraLinear (``--features`` square, rank 16, NF4
   blocksize 64) over ``--rows`` x ``--features`` float32 rows in ``--chunks`` chunks,
   generated on the workers (uniform, one seeded generator per block) and reduced to column sums on the
   workers (so the 4 GB of outputs do not travel to the client): 2 workers against the
   same graph run by dask's synchronous scheduler in this process. Rows per second
   (median of ``--repeats``), and what is sent per task: the pickled size of each block
   task of the graph (what the scheduler ships), the layer's bytes (scattered once per
   worker), and the bytes the workers fetched from each other during the run.

The machine is shared (2 cores): timings are noisy, and 2 workers on 2 cores share them
with this process and the scheduler.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

import numlora as nl
from numlora.bench.harness import cpu_name


def _pickled(obj):
    bufs = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    return len(data), sum(b.raw().nbytes for b in bufs)


def _arrays_of(obj, seen=None) -> int:
    """Bytes of the distinct numpy arrays reachable through obj's attributes (what the
    object holds), counted once each."""
    seen = set() if seen is None else seen
    total = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, np.ndarray):
            base = o if o.base is None else o.base
            if id(base) in seen and base is not o:
                continue
            total += o.nbytes
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and type(o).__module__.startswith("numlora"):
            stack.extend(vars(o).values())
        elif hasattr(o, "__slots__") and type(o).__module__.startswith("numlora"):
            stack.extend(getattr(o, s) for s in o.__slots__ if hasattr(o, s))
    return total


def sizes(n=2048, r=16) -> list[dict]:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)

    def f(*s):
        return (rng.standard_normal(s) * 0.02).astype(np.float32)

    lin = nl.LoraLinear(w, f(r, n), f(n, r), 32.0, bias=f(n))
    dora = nl.LoraLinear.from_weight(w, r, 32.0, use_dora=True)
    lbias = nl.LoraLinear.from_weight(w, r, 32.0, lora_bias=True)
    merged = nl.LoraLinear(w.copy(), f(r, n), f(n, r), 32.0)
    merged.merge()
    q = nl.QLoraLinear.from_weight(w, r, 32.0, double_quant=True)
    bank = nl.LoraBank(nl.quantize_nf4(w))
    for k in range(8):
        bank.add(f"a{k}", f(r, n), f(n, r), 2.0)
    ad = nl.LoraAdapter(nl.LoraConfig(r, 32.0))
    ad.add_layer("q_proj", w)
    ad.add_layer("v_proj", w)
    opt_layer = nl.LoraLinear.from_weight(w, r, 32.0)
    opt_layer.train()
    opt = nl.AdamW(opt_layer.parameters(), lr=1e-3)
    x = f(64, n)
    opt_layer.forward(x)
    opt_layer.backward(f(64, n))
    opt.step()
    rec = nl.merge_lora(w.copy(), f(r, n), f(n, r) * np.float32(100), 2.0, record=True)
    objs = [("NF4Tensor (double quant)", nl.quantize_nf4(w, 64, double_quant=True)),
            ("LoraLinear", lin), ("LoraLinear DoRA", dora), ("LoraLinear LoRA bias", lbias),
            ("LoraLinear merged (+ MergeRecord)", merged), ("QLoraLinear (double quant)", q),
            ("LoraBank (NF4 base, 8 adapters)", bank), ("LoraAdapter (2 layers)", ad),
            ("AdamW (with state, + its layer)", opt), ("Parameter", nl.Parameter(w.copy(), grad=w.copy())),
            ("MergeRecord", rec)]
    rows = []
    for name, o in objs:
        stream, oob = _pickled(o)
        arrays = _arrays_of(o)
        rows.append({"object": name, "array_bytes": arrays, "stream_bytes": stream, "buffer_bytes": oob,
                     "ratio": (stream + oob) / arrays})
    mem = bank.memory()
    rows[6]["note"] = (f"arrays = base {mem.get('base', 0)} + pool blocks {mem['pool']} bytes (the pool's free pages "
                       f"included; the 8 adapters' values are {8 * r * 2 * n * 4} bytes)")
    return rows


# --- checkpoint ---------------------------------------------------------------------------------
def make_checkpoint(folder, mb: int, shards: int, d: int = 2048) -> None:
    from numlora.io.safetensors import SafetensorsWriter

    spec = f"{mb} MB bf16 in {shards} shards, d={d}"
    tag = os.path.join(folder, ".spec")
    if os.path.exists(tag) and open(tag).read() == spec:
        return
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    per = d * d * 2  # bytes of one d x d bf16 weight
    n = max(shards, round(mb * 1e6 / per))
    rng = np.random.default_rng(0)
    # four random N(0, 0.02) matrices, each tensor one of them scaled (generating a fresh
    # normal matrix per tensor would take minutes here; the quantizer's work is the same)
    bases = [rng.standard_normal((d, d), dtype=np.float32) * np.float32(0.02) for _ in range(4)]
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(n)]
    wmap = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        with SafetensorsWriter(os.path.join(folder, fname), [(k, "BF16", (d, d)) for k in part],
                               {"format": "pt"}) as w:
            for k in part:
                i = names.index(k)
                w.write(k, bases[i % 4] * np.float32(1 + i / n))
        wmap.update(dict.fromkeys(part, fname))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": n * per}, "weight_map": wmap}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "toy", "torch_dtype": "bfloat16"}, f)
    with open(tag, "w") as f:
        f.write(spec)


def _tree(root):
    out = {}
    for dp, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dp, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def convert(work, mb, shards, repeats, client, cluster_start) -> dict:
    from numlora.convert import quantize_checkpoint

    src = os.path.join(work, "ckpt")
    make_checkpoint(src, mb, shards)
    size = sum(os.path.getsize(os.path.join(src, n)) for n in os.listdir(src) if n.endswith(".safetensors"))
    one_t, dask_t, phases = [], [], []
    for k in range(repeats + 1):
        for mode in ("one", "dask"):
            out = os.path.join(work, f"out-{mode}")
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            rep = quantize_checkpoint(src, out, scheduler=client if mode == "dask" else None)
            t = time.perf_counter() - t0
            if k == 0:
                continue  # untimed: loads numba's cache in every process
            if mode == "one":
                one_t.append(t)
            else:
                dask_t.append(t)
                per_worker = {}
                for task in rep.dask["tasks"]:
                    per_worker[task["worker"]] = per_worker.get(task["worker"], 0.0) + task["seconds"]
                phases.append({"wall": rep.dask["wall_seconds"], "inside": sum(per_worker.values()),
                               "scheduling": rep.dask["wall_seconds"] - max(per_worker.values())})
    identical = _tree(os.path.join(work, "out-one")) == _tree(os.path.join(work, "out-dask"))
    med = statistics.median
    return {"checkpoint_bytes": size, "shards": shards, "one_process_s": med(one_t), "dask_2_workers_s": med(dask_t),
            "runs_one": one_t, "runs_dask": dask_t, "tasks_phase_s": med(p["wall"] for p in phases),
            "inside_tasks_s": med(p["inside"] for p in phases), "scheduling_s": med(p["scheduling"] for p in phases),
            "cluster_start_s": cluster_start, "bytes_identical": identical}


# --- inference ------------------------------------------------------------------------------------
def _rows(block_id=None, block_info=None):
    """A block of uniform [-1, 1) float32 rows, seeded by its index (cheap to make)."""
    shape = block_info[None]["chunk-shape"]
    g = np.random.default_rng(block_id[0])
    return g.random(shape, dtype=np.float32) * np.float32(2) - np.float32(1)


def inference(rows, chunks, features, repeats, client) -> dict:
    import dask
    import dask.array as da

    from numlora.dask import apply_layer, layer_ref

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((features, features)) * 0.02).astype(np.float32)
    layer = nl.QLoraLinear.from_weight(w, 16, 32.0)
    layer.lora_b = (rng.standard_normal((features, 16)) * 0.02).astype(np.float32)
    layer_bytes = sum(_pickled(layer))
    step = -(-rows // chunks)
    sizes_ = tuple(min(step, rows - i) for i in range(0, rows, step))
    x = da.map_blocks(_rows, dtype=np.float32, chunks=(sizes_, (features,)), meta=np.empty((0, 0), np.float32))

    def graph(ref):
        return apply_layer(layer, x, ref=ref).sum(axis=0)

    ref = layer_ref(layer, client)
    y = graph(ref)
    apply_keys = {k for k in dict(y.__dask_graph__()) if isinstance(k, tuple) and "_forward_block" in k[0]}
    task_sizes = [len(pickle.dumps(v)) for k, v in dict(y.__dask_graph__()).items() if k in apply_keys]
    local = graph(dask.delayed(layer, name="numlora-bench-layer", pure=False))
    timings = {"dask": [], "one": []}
    fetched = []
    for k in range(repeats + 1):
        client.run(lambda dask_worker: dask_worker.transfer_incoming_log.clear())
        t0 = time.perf_counter()
        got = client.compute(y).result()
        t_d = time.perf_counter() - t0
        logs = client.run(lambda dask_worker: [dict(t["keys"]) for t in dask_worker.transfer_incoming_log])
        t0 = time.perf_counter()
        want = local.compute(scheduler="synchronous")
        t_o = time.perf_counter() - t0
        if k == 0:
            continue
        timings["dask"].append(t_d)
        timings["one"].append(t_o)
        fetched.append({"total": sum(n for log in logs.values() for t in log for n in t.values()),
                        "layer_fetches": {w: sum(ref.key in t for t in log) for w, log in logs.items()}})
    med = statistics.median
    assert np.allclose(got, want, rtol=1e-4, atol=1e-2 * np.sqrt(rows))  # same sums up to summation order
    return {"rows": rows, "features": features, "chunks": len(x.chunks[0]), "rows_per_chunk": step,
            "dask_2_workers_s": med(timings["dask"]), "one_process_s": med(timings["one"]),
            "dask_rows_per_s": rows / med(timings["dask"]), "one_rows_per_s": rows / med(timings["one"]),
            "runs": timings, "task_bytes_per_chunk_max": max(task_sizes), "task_bytes_per_chunk_median":
                med(task_sizes), "layer_bytes_scattered_per_worker": layer_bytes,
            "fetched_between_workers_bytes": fetched, "layer_keys_in_graph": int(ref.key in dict(y.__dask_graph__()))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt-mb", type=int, default=300)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--chunks", type=int, default=100)
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--skip", action="append", default=[], choices=["sizes", "convert", "inference"])
    a = p.parse_args(argv)
    import distributed

    work = a.workdir or tempfile.mkdtemp(prefix="numlora-bench-dask-")
    res = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": sys.version.split()[0],
           "dask": __import__("dask").__version__, "distributed": distributed.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "sizes" not in a.skip:
        res["sizes"] = sizes()
        print("\npickled size (protocol 5, out-of-band buffers) / bytes of the arrays held:")
        for row in res["sizes"]:
            print(f"  {row['object']:36s} {row['array_bytes']:>12,d} B arrays  stream {row['stream_bytes']:>6,d} B  "
                  f"ratio {row['ratio']:.4f}")
    t0 = time.perf_counter()
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    start = time.perf_counter() - t0
    try:
        if "convert" not in a.skip:
            c = res["convert"] = convert(work, a.ckpt_mb, a.shards, a.repeats, client, start)
            print(f"\nquantize {c['checkpoint_bytes'] / 1e6:,.0f} MB bf16 in {c['shards']} shards: one process "
                  f"{c['one_process_s']:.2f} s, 2-worker LocalCluster {c['dask_2_workers_s']:.2f} s (tasks phase "
                  f"{c['tasks_phase_s']:.2f} s, inside tasks {c['inside_tasks_s']:.2f} s, scheduling "
                  f"{c['scheduling_s']:.2f} s; cluster start {start:.2f} s, not included); bytes identical: "
                  f"{c['bytes_identical']}")
        if "inference" not in a.skip:
            r = res["inference"] = inference(a.rows, a.chunks, a.features, a.repeats, client)
            print(f"\nQLoraLinear {r['features']}x{r['features']} r16 over {r['rows']:,} rows in {r['chunks']} chunks: "
                  f"2 workers {r['dask_rows_per_s']:,.0f} rows/s ({r['dask_2_workers_s']:.2f} s), one process "
                  f"{r['one_rows_per_s']:,.0f} rows/s ({r['one_process_s']:.2f} s); per chunk task "
                  f"{r['task_bytes_per_chunk_max']} B max; layer {r['layer_bytes_scattered_per_worker']:,} B "
                  f"scattered once per worker; fetched between workers: {r['fetched_between_workers_bytes']}")
    finally:
        client.close()
        cluster.close()
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{res['cpu']}, {res['cores']} cores, shared with other jobs (timings are noisy); {res['date']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
