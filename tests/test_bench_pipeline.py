"""The pipeline benchmark's model (numlora.bench.pipeline.Block) computes what it claims:
its hand-written numpy backward (layer norms, GELU, causal attention, the frozen products)
chained with the layers' backward gives the input gradient that finite differences of its
forward give, and its forward matches a plain numpy transcription of the block."""

from __future__ import annotations

import numpy as np

from numlora.bench.inputs import SCALING
from numlora.bench.pipeline import Block, Sizes, bank_factors, causal_softmax, gelu, layer_norm

SIZES = Sizes(d_model=16, d_ff=32, heads=2, rank=2, n_adapters=2)


def test_training_backward_matches_finite_differences():
    blk = Block(SIZES, 4)
    blk.train(True)
    x0 = np.array(blk.x, np.float32)
    g = blk.g.astype(np.float64)

    def loss(x):
        blk.x = x
        return float((blk.forward().astype(np.float64) * g).sum())

    eps = np.float32(1e-2)
    num = np.zeros(x0.shape)
    for idx in np.ndindex(*x0.shape):
        xp, xm = x0.copy(), x0.copy()
        xp[idx] += eps
        xm[idx] -= eps
        num[idx] = (loss(xp) - loss(xm)) / (2 * float(eps))
    blk.x = x0.copy()
    blk.forward()
    dx = blk.backward()
    assert np.abs(dx - num).max() <= 2e-3 * np.abs(num).max()


def test_forward_matches_a_plain_numpy_block():
    blk = Block(SIZES, 5)
    blk.train(False)
    y = blk.forward()
    d, h = SIZES.d_model, SIZES.heads
    dh = d // h
    x = blk.x.astype(np.float64)

    def lora(layer_w, a, b, v):
        return v @ layer_w.T + SIZES.alpha / SIZES.rank * (v @ a.T) @ b.T

    W = blk.w
    wq = blk.q.dequantize_weight().astype(np.float64)
    wup = blk.up.dequantize_weight().astype(np.float64)
    hh = layer_norm(x.astype(np.float32))[0].astype(np.float64)
    q = lora(wq, W["q"][1], W["q"][2], hh)
    k = hh @ W["k"][0].T
    v = lora(W["v"][0], W["v"][1], W["v"][2], hh)
    ctx = np.zeros_like(q)
    for j in range(h):
        s = slice(j * dh, (j + 1) * dh)
        sc = (q[:, s] @ k[:, s].T / np.sqrt(dh))[None]
        p = causal_softmax(sc.astype(np.float64))[0]
        ctx[:, s] = p @ v[:, s]
    x1 = x + ctx @ W["o"][0].T
    f = lora(wup, W["up"][1], W["up"][2], layer_norm(x1.astype(np.float32))[0].astype(np.float64))
    gl = gelu(f)[0]

    down = gl @ W["down"][0].T
    for i, k_ in enumerate(blk.ids):
        a, b = bank_factors(SIZES, int(k_))
        down[i] += SCALING * (gl[i] @ a.T) @ b.T
    ref = x1 + down
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_footprints_and_cache_matched_references(monkeypatch):
    """The reference phase reads each skipped numlora step's arrays (its layer's weights,
    factors, the optimizer's moments), and every row carries both references."""
    from numlora.bench import pipeline as pl

    blk = Block(SIZES, 3)
    blk.train(True)
    blk.step()
    fp = blk.footprint("q: QLoraLinear")
    packed = [a for a in fp if a.dtype == np.uint8]
    assert packed and sum(a.nbytes for a in packed) == SIZES.d_model * SIZES.d_model // 2  # the NF4 codes
    assert any(a.shape == (SIZES.rank, SIZES.d_model) for a in fp)  # lora A
    adam = blk.footprint("AdamW step")
    assert len(adam) >= 3 * 2 * len(blk.layers)  # every factor with its two moments
    assert len({id(a) for a in adam}) == len(adam)  # each base once
    others = {id(a) for a in blk.others("q: QLoraLinear")}
    assert not others & {id(a) for a in fp}  # everything the pass reads but q's own arrays
    v_own = {id(a) for a in blk.footprint("v: LoraLinear")} - {id(a) for a in fp}  # q and v share their input
    assert {id(blk.wk), id(blk.wo)} <= others and v_own <= others

    read = []
    monkeypatch.setattr(pl, "touch", lambda arrays: read.append(len(arrays)))
    blk.skip_numlora = "touch"
    blk.step()
    assert len(read) == sum(kind == Block.NUMLORA for kind in blk.kinds.values()) and all(read)
    monkeypatch.undo()
    blk.skip_numlora = False

    res = pl.run_batch(SIZES, 3, repeat=1, passes=1, peers=False)
    for mode in ("forward", "train"):
        rows = res[mode]["rows"]
        assert {r["reference"] for r in rows} == {"isolated, the pass's other memory read before",
                                                  "without numlora, its memory read"}
        assert all(r["reference_ms"] > 0 and r["warm_reference_ms"] > 0 for r in rows)
    assert 0 < res["pass_mib"] < 1
    assert "warm reference ms" in pl.to_markdown(res)


def test_compute_dtype_reaches_the_qlora_layers_and_the_cli_refuses_it_elsewhere(capsys):
    """``numlora bench --pipeline --compute-dtype bfloat16`` builds the block's QLoraLinear
    layers with that compute dtype (their forward then rounds to bf16: close to the float32
    block, not equal); the option without --pipeline is an error."""
    import dataclasses

    import pytest

    from numlora.cli import main

    bf = Block(dataclasses.replace(SIZES, compute_dtype="bfloat16"), 5)
    f32 = Block(SIZES, 5)
    assert [layer.compute_dtype for layer in (bf.q, bf.up, bf.down_t)] == ["bfloat16"] * 3
    assert f32.q.compute_dtype == "float32"
    for blk in (bf, f32):
        blk.train(False)
    y, ref = bf.forward(), f32.forward()
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert 0 < err <= 2e-2
    with pytest.raises(SystemExit):
        main(["bench", "--compute-dtype", "bfloat16", "--quick"])
    assert "--compute-dtype applies to --pipeline only" in capsys.readouterr().err
