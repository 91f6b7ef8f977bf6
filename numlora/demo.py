"""``numlora demo``: the seed module's scenario end to end, on generated weights."""

from __future__ import annotations

import time

import numpy as np


def _ms(f, repeat=5):
    """Median ms of ``repeat`` calls, after a pause (OpenBLAS threads spin for a while after
    a BLAS call and would slow a numba kernel timed right after) and one warm-up call."""
    time.sleep(0.15)
    f()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def main(seed: int = 0, size: int = 1024, out=print) -> int:
    import numlora as nl

    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    d = size
    out(f"numlora {nl.__version__} demo: LoRA and QLoRA on generated {d} x {d} weights (seed {seed})\n")

    cfg = nl.LoraConfig(rank=8, alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj"))
    out(f"1. LoraConfig: rank {cfg.rank}, alpha {cfg.alpha:g}, scaling {cfg.scaling:g}, "
        f"targets {', '.join(cfg.target_modules)}")
    adapter = nl.LoraAdapter(cfg)
    for name in cfg.target_modules:
        layer = adapter.add_layer(name, (rng.standard_normal((d, d)) * 0.02).astype(np.float32))
        # a fresh adapter is a no-op (B = 0); give it something to do, as training would
        layer.lora_b = (rng.standard_normal((d, cfg.rank)) * 0.01).astype(np.float32)
    out("   adapter summary:")
    for line in str(adapter.summary()).splitlines():
        out("     " + line)

    x = rng.standard_normal((4, d)).astype(np.float32)
    out("\n2. forward, batch of 4 rows, per layer:")
    before = {}
    for name in adapter:
        layer = adapter[name]
        y = layer.forward(x)
        base = nl.linear_forward(x, layer.weight)
        before[name] = y
        out(f"   {name}: output {y.shape}, mean |LoRA contribution| {np.abs(y - base).mean():.4f}")

    out("\n3. merge_all / unmerge_all:")
    originals = {name: adapter[name].weight.copy() for name in adapter}
    adapter.merge_all()
    worst = max(float(np.abs(adapter.forward_layer(n, x) - before[n]).max()) for n in adapter)
    held = sum(adapter[n].merge_overhead_bytes for n in adapter)
    out(f"   merged: max |y_merged - y_unmerged| = {worst:.2e} (float32 rounding)")
    out(f"   kept for exact unmerge: {held / 2**20:.1f} MiB (1 byte per weight)")
    adapter.unmerge_all()
    exact = all(np.array_equal(adapter[n].weight.view(np.uint32), originals[n].view(np.uint32)) for n in adapter)
    out(f"   unmerged: base weights restored bit for bit: {'yes' if exact else 'NO'}")

    out("\n4. QLoRA layer: NF4 base (bitsandbytes layout), LoRA in float32")
    w = (rng.standard_normal((d, d)) * 0.02).astype(np.float32)
    q = nl.QLoraLinear.from_weight(w, rank=8, alpha=16.0, blocksize=64)
    q.lora_b = (rng.standard_normal((d, 8)) * 0.01).astype(np.float32)
    deq = q.dequantize_weight()
    rel = float(np.linalg.norm(deq - w) / np.linalg.norm(w))
    out(f"   {q.nf4!r}")
    out(f"   float32 {w.nbytes / 2**20:.2f} MiB -> NF4 {q.nf4.nbytes / 2**20:.2f} MiB "
        f"(saved {q.memory_saved_bytes() / 2**20:.2f} MiB, {8 * q.nf4.nbytes / w.size:.2f} bits/weight)")
    out(f"   relative reconstruction error ||deq(W) - W|| / ||W|| = {rel:.4f}")
    dq = nl.quantize_nf4(w, 64, double_quant=True)
    out(f"   with double quantization: {dq.nbytes / 2**20:.2f} MiB ({8 * dq.nbytes / w.size:.3f} bits/weight)")
    yq = q.forward(x)
    ydense = nl.lora_forward(x, w, q.lora_a, q.lora_b, q.scaling)
    out(f"   forward vs the unquantized layer: relative error "
        f"{float(np.linalg.norm(yq - ydense) / np.linalg.norm(ydense)):.4f}")
    merged = q.merged_weight()
    out(f"   merged_weight(): dense float32 {merged.shape}, base left quantized")
    out(f"   first packed bytes: {' '.join(f'{b:02x}' for b in q.nf4.packed[:8])} "
        f"(element 2i in the high nibble, as bitsandbytes)")

    out("\n5. timings (median of 5 after a warm-up call; kernels already compiled):")
    layer = adapter["q_proj"]
    x1 = x[:1]
    o1 = np.empty((1, d), np.float32)
    ob = np.empty((4, d), np.float32)
    rows = [
        ("LoraLinear.forward, 1 row", _ms(lambda: layer.forward(x1, out=o1))),
        ("LoraLinear.forward, 4 rows", _ms(lambda: layer.forward(x, out=ob))),
        ("numpy x @ W.T, 4 rows (base only)", _ms(lambda: np.dot(x, layer.weight.T, out=ob))),
        ("merge + unmerge (bit-exact)", _ms(lambda: (layer.merge(), layer.unmerge()))),
        ("quantize_nf4", _ms(lambda: nl.quantize_nf4(w))),
        ("dequantize_nf4", _ms(lambda: q.dequantize_weight(out=deq))),
        ("QLoraLinear.forward, 4 rows", _ms(lambda: q.forward(x, out=ob))),
    ]
    width = max(len(k) for k, _ in rows)
    for k, ms in rows:
        out(f"   {k:<{width}}  {ms:8.3f} ms")
    out(f"\ndone in {time.perf_counter() - t_start:.1f} s (including first-call compilation)")
    return 0
