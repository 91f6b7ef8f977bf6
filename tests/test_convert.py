"""``numlora merge`` / ``quantize`` / ``inspect`` on generated checkpoints (single file and
sharded, float32 and bfloat16), against numpy references, the spec's NF4 reference, and
bad inputs that must leave no output behind."""

import json
import math
import os
import struct

import numpy as np
import pytest

from numlora import NF4Tensor, quantize_nf4
from numlora.cli import main
from numlora.convert import inspect_path, match_modules, merge_checkpoint, quantize_checkpoint
from numlora.errors import ConfigError, FormatError, NonFiniteError, ShapeError
from numlora.io.checkpoint import Checkpoint
from numlora.io.safetensors import SafetensorsFile, bf16_to_f32, f32_to_bf16, save_file

from conftest import full_disk
from reference import abs_err_stats_ref, merge_ref, nf4_dequantize_ref, nf4_quantize_ref

H, FF, V = 48, 80, 50  # hidden, intermediate, vocab of the generated model
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _model_tensors(rng, layers=2, prefix="model."):
    t = {f"{prefix}embed_tokens.weight": rng.standard_normal((V, H)).astype(np.float32)}
    for i in range(layers):
        p = f"{prefix}layers.{i}."
        for m in MODULES:
            t[p + f"self_attn.{m}.weight"] = (rng.standard_normal((H, H)) * 0.05).astype(np.float32)
        t[p + "self_attn.o_proj.bias"] = (rng.standard_normal(H) * 0.01).astype(np.float32)
        t[p + "mlp.up_proj.weight"] = (rng.standard_normal((FF, H)) * 0.05).astype(np.float32)
        t[p + "mlp.down_proj.weight"] = (rng.standard_normal((H, FF)) * 0.05).astype(np.float32)
        t[p + "input_layernorm.weight"] = np.ones(H, np.float32)
    t[f"{prefix}norm.weight"] = np.ones(H, np.float32)
    t["lm_head.weight"] = rng.standard_normal((V, H)).astype(np.float32)
    t["position_ids"] = np.arange(16, dtype=np.int64)[None]
    return t


def _write_model(path, tensors, dtype="F32", shards=1):
    """A single file (``path`` ends in .safetensors) or a model folder, ``shards`` files."""
    dtypes = {k: dtype for k, v in tensors.items() if v.dtype.kind == "f"}
    if str(path).endswith(".safetensors"):
        save_file(path, tensors, {"format": "pt"}, dtypes)
        return
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "toy", "torch_dtype": "bfloat16" if dtype == "BF16" else "float32"}, f)
    os.makedirs(os.path.join(path, "extra"))
    with open(os.path.join(path, "extra", "tokenizer.txt"), "w") as f:
        f.write("a b c")
    if shards == 1:
        save_file(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"}, dtypes)
        return
    names = list(tensors)
    wmap = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(os.path.join(path, fname), {k: tensors[k] for k in part}, {"format": "pt"},
                  {k: dtypes[k] for k in part if k in dtypes})
        wmap.update({k: fname for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 1}, "weight_map": wmap}, f)


def _stored(tensors, dtype):
    """What the model's floating tensors are once stored in ``dtype`` (as float32)."""
    if dtype == "BF16":
        return {k: bf16_to_f32(f32_to_bf16(v)) if v.dtype.kind == "f" else v for k, v in tensors.items()}
    if dtype == "F16":
        return {k: v.astype(np.float16).astype(np.float32) if v.dtype.kind == "f" else v for k, v in tensors.items()}
    return tensors


def _write_adapter(folder, rng, modules, r=4, alpha=8.0, extra_cfg=None, dtype="F32", prefix="model."):
    """A PEFT adapter folder written by hand from the format description."""
    os.makedirs(folder)
    tensors, dims = {}, {"q_proj": (H, H), "k_proj": (H, H), "v_proj": (H, H), "o_proj": (H, H),
                         "up_proj": (FF, H), "down_proj": (H, FF)}
    for mod in modules:
        out_f, in_f = dims[mod.split(".")[-1]]
        key = f"base_model.model.{prefix}{mod}"
        tensors[key + ".lora_A.weight"] = (rng.standard_normal((r, in_f)) * 0.1).astype(np.float32)
        tensors[key + ".lora_B.weight"] = (rng.standard_normal((out_f, r)) * 0.1).astype(np.float32)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha,
           "target_modules": sorted({m.split(".")[-1] for m in modules})}
    cfg.update(extra_cfg or {})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(os.path.join(folder, "adapter_model.safetensors"), tensors, {"format": "pt"},
              {k: dtype for k in tensors})
    return {k: bf16_to_f32(f32_to_bf16(v)) if dtype == "BF16" else v for k, v in tensors.items()}


def _read_all(path):
    with Checkpoint(path) as ck:
        return {k: np.array(ck.get(k)) for k in ck.keys()}, {k: ck.info(k).dtype for k in ck.keys()}


def _raw(path):
    with Checkpoint(path) as ck:
        return {k: ck.shard_of(k).file.read_bytes(k) for k in ck.keys()}


def _assert_merged(got, want, w, delta_abs, dtype):
    """``got`` is ``want`` up to float32 arithmetic (a few ulps of the operands' size)
    plus, in bfloat16, one rounding (half an ulp: 2**-9 relative)."""
    eps = float(np.finfo(np.float32).eps)
    bound = 8 * eps * (np.abs(w) + delta_abs)
    if dtype == "BF16":
        bound = bound + np.abs(want) * 2.0 ** -8
    if dtype == "F16":  # half an ulp relative, or of the subnormal spacing
        bound = bound + np.maximum(np.abs(want) * 2.0 ** -11, 2.0 ** -25)
    err = np.abs(got.astype(np.float64) - want)
    assert (err <= bound).all(), float((err - bound).max())


def _leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".numlora-")]


# --- merge -------------------------------------------------------------------------------
LAYER_MODS = [f"layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")] + \
             [f"layers.{i}.mlp.{m}" for i in range(2) for m in ("up_proj", "down_proj")]


@pytest.mark.parametrize("dtype, shards", [("F32", 0), ("BF16", 3), ("F32", 1), ("F16", 0)])
def test_merge_equals_reference(tmp_path, rng, dtype, shards):
    tensors = _model_tensors(rng)
    base = tmp_path / ("base.safetensors" if shards == 0 else "base")
    _write_model(base, tensors, dtype, shards or 1)
    ad = _write_adapter(tmp_path / "ad", rng, LAYER_MODS, r=4, alpha=8.0,
                        extra_cfg={"rank_pattern": {}, "alpha_pattern": {"down_proj": 2.0}})
    out = tmp_path / ("out.safetensors" if shards == 0 else "out")
    rep = merge_checkpoint(base, tmp_path / "ad", out, progress=False)
    assert len(rep.merged) == len(LAYER_MODS)
    got, got_dt = _read_all(out)
    src = _stored(tensors, dtype)
    _, src_dt = _read_all(base)
    assert got_dt == src_dt  # every tensor keeps its dtype
    raw_in, raw_out = _raw(base), _raw(out)
    for k, w in src.items():
        mod = k[len("model."):-len(".weight")] if k.endswith(".weight") else None
        if mod in LAYER_MODS:
            pre = f"base_model.model.model.{mod}"
            s = (2.0 if "down_proj" in mod else 8.0) / 4
            a, b = ad[pre + ".lora_A.weight"], ad[pre + ".lora_B.weight"]
            want = merge_ref(w, a, b, s)
            _assert_merged(got[k], want, w, s * np.abs(b.astype(np.float64)) @ np.abs(a), dtype)
        else:
            assert raw_out[k] == raw_in[k], k  # untouched tensors: byte for byte
    if shards > 1:
        with Checkpoint(out) as ck, Checkpoint(base) as cb:
            assert [s.name for s in ck.shards] == [s.name for s in cb.shards]
            assert ck.weight_map == cb.weight_map
            assert ck.index_metadata["total_size"] == ck.total_bytes
        assert os.path.exists(out / "extra" / "tokenizer.txt") and os.path.exists(out / "config.json")
    assert _leftovers(tmp_path) == []


def test_merge_dtype_and_prefix_suffix_matching(tmp_path, rng):
    tensors = _model_tensors(rng, layers=1, prefix="")  # checkpoint lacks "model."
    _write_model(tmp_path / "b.safetensors", tensors)
    mods = ["layers.0.self_attn.q_proj"]
    ad = _write_adapter(tmp_path / "ad", rng, mods, prefix="model.")  # adapter has "model."
    main(["merge", str(tmp_path / "b.safetensors"), str(tmp_path / "ad"), "-o", str(tmp_path / "o.safetensors"),
          "--dtype", "bfloat16"])
    with SafetensorsFile(tmp_path / "o.safetensors") as f:
        assert {f.info(k).dtype for k in f.keys()} == {"BF16", "I64"}
        k = "layers.0.self_attn.q_proj.weight"
        pre = "base_model.model.model.layers.0.self_attn.q_proj"
        a, b = ad[pre + ".lora_A.weight"], ad[pre + ".lora_B.weight"]
        want = merge_ref(tensors[k], a, b, 2.0)
        _assert_merged(f.get(k), want, tensors[k], 2.0 * np.abs(b.astype(np.float64)) @ np.abs(a), "BF16")
        assert np.array_equal(f.raw("lm_head.weight"), f32_to_bf16(tensors["lm_head.weight"]))
        assert np.array_equal(f.get("position_ids"), tensors["position_ids"])
    # and the other way round: the checkpoint has an extra prefix
    assert match_modules(["encoder.q"], ["bert.encoder.q.weight", "bert.encoder.q.bias"]) == \
        {"encoder.q": "bert.encoder.q.weight"}


def test_merge_lora_bias_and_dora(tmp_path, rng):
    tensors = _model_tensors(rng, layers=1)
    _write_model(tmp_path / "b.safetensors", tensors)
    mod = "layers.0.self_attn.o_proj"
    pre = f"base_model.model.model.{mod}"
    ad = _write_adapter(tmp_path / "ad", rng, [mod], r=4, alpha=4.0, extra_cfg={"lora_bias": True, "use_rslora": True})
    lb = (rng.standard_normal(H) * 0.1).astype(np.float32)
    extra, _ = _read_all(tmp_path / "ad" / "adapter_model.safetensors")
    extra[pre + ".lora_B.bias"] = lb
    save_file(tmp_path / "ad" / "adapter_model.safetensors", extra, {"format": "pt"})
    merge_checkpoint(tmp_path / "b.safetensors", tmp_path / "ad", tmp_path / "o.safetensors", progress=False)
    got, _ = _read_all(tmp_path / "o.safetensors")
    s = 4.0 / np.sqrt(4)
    w = f"model.{mod}.weight"
    np.testing.assert_allclose(got[w], merge_ref(tensors[w], ad[pre + ".lora_A.weight"], ad[pre + ".lora_B.weight"], s),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[f"model.{mod}.bias"], tensors[f"model.{mod}.bias"] + s * lb, rtol=1e-6, atol=1e-7)
    # DoRA: W <- m / ||W + s B A||_row * (W + s B A)
    ad2 = _write_adapter(tmp_path / "dora", rng, [mod], r=4, alpha=8.0, extra_cfg={"use_dora": True})
    mag = (np.abs(rng.standard_normal(H)) + 0.5).astype(np.float32)
    extra, _ = _read_all(tmp_path / "dora" / "adapter_model.safetensors")
    extra[pre + ".lora_magnitude_vector"] = mag
    save_file(tmp_path / "dora" / "adapter_model.safetensors", extra, {"format": "pt"})
    merge_checkpoint(tmp_path / "b.safetensors", tmp_path / "dora", tmp_path / "d.safetensors", progress=False)
    got, _ = _read_all(tmp_path / "d.safetensors")
    vv = tensors[w].astype(np.float64) + 2.0 * ad2[pre + ".lora_B.weight"].astype(np.float64) @ \
        ad2[pre + ".lora_A.weight"].astype(np.float64)
    want = (mag / np.linalg.norm(vv, axis=1))[:, None] * vv
    np.testing.assert_allclose(got[w], want, rtol=1e-5, atol=1e-6)


def test_merge_bad_inputs_leave_nothing(tmp_path, rng):
    tensors = _model_tensors(rng, layers=1)
    _write_model(tmp_path / "b.safetensors", tensors)
    before = (tmp_path / "b.safetensors").read_bytes()
    _write_adapter(tmp_path / "ok", rng, ["layers.0.self_attn.q_proj"])
    _write_adapter(tmp_path / "ghost", rng, ["layers.7.self_attn.q_proj"])
    with pytest.raises(FormatError, match="'model.layers.7.self_attn.q_proj' matches no weight"):
        merge_checkpoint(tmp_path / "b.safetensors", tmp_path / "ghost", tmp_path / "o.safetensors")
    _write_adapter(tmp_path / "shape", rng, ["layers.0.mlp.up_proj"])
    os.rename(tmp_path / "shape" / "adapter_model.safetensors", tmp_path / "x.safetensors")
    t, _ = _read_all(tmp_path / "x.safetensors")
    t = {k.replace("mlp.up_proj", "self_attn.q_proj"): v for k, v in t.items()}  # (80, 48) onto a (48, 48) weight
    save_file(tmp_path / "shape" / "adapter_model.safetensors", t)
    with pytest.raises(ShapeError, match=r"'model.layers.0.self_attn.q_proj': expected checkpoint weight .* "
                                         r"of shape \(80, 48\), got \(48, 48\)"):
        merge_checkpoint(tmp_path / "b.safetensors", tmp_path / "shape", tmp_path / "o.safetensors")
    with pytest.raises(FormatError, match="is one of the inputs"):
        merge_checkpoint(tmp_path / "b.safetensors", tmp_path / "ok", tmp_path / "b.safetensors", overwrite=True)
    with pytest.raises(FormatError, match="one of the inputs"):
        merge_checkpoint(tmp_path / "b.safetensors", tmp_path / "ok", tmp_path / "ok" / "adapter_model.safetensors",
                         overwrite=True)
    (tmp_path / "exists.safetensors").write_bytes(b"keep")
    with pytest.raises(FormatError, match="exists"):
        merge_checkpoint(tmp_path / "b.safetensors", tmp_path / "ok", tmp_path / "exists.safetensors")
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep"
    # a truncated base: refused before anything is written
    (tmp_path / "t.safetensors").write_bytes(before[: len(before) // 2])
    with pytest.raises(FormatError, match="truncated"):
        merge_checkpoint(tmp_path / "t.safetensors", tmp_path / "ok", tmp_path / "o.safetensors")
    # a header that lies about a tensor's size
    n = struct.unpack("<Q", before[:8])[0]
    head = json.loads(before[8:8 + n])
    k = "model.layers.0.self_attn.q_proj.weight"
    head[k]["shape"] = [H, H + 1]
    text = json.dumps(head).encode()
    (tmp_path / "lie.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + before[8 + n:])
    with pytest.raises(FormatError, match="needs"):
        merge_checkpoint(tmp_path / "lie.safetensors", tmp_path / "ok", tmp_path / "o.safetensors")
    with pytest.raises(FormatError):
        merge_checkpoint(tmp_path / "b.safetensors", tmp_path / "missing", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    assert (tmp_path / "b.safetensors").read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_interrupted_merge_leaves_no_output(tmp_path, rng, monkeypatch):
    import numlora.convert as conv

    _write_model(tmp_path / "base", _model_tensors(rng), "BF16", shards=2)
    _write_adapter(tmp_path / "ad", rng, LAYER_MODS)
    calls = []
    real = conv._merge_one

    def flaky(w, layer):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(w, layer)

    monkeypatch.setattr(conv, "_merge_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoint(tmp_path / "base", tmp_path / "ad", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


# --- quantize ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, shards, dq, bs",
                         [("F32", 0, False, 64), ("BF16", 2, True, 64), ("F32", 1, False, 128)])
def test_quantize_layout_and_values(tmp_path, rng, dtype, shards, dq, bs):
    tensors = _model_tensors(rng)
    base = tmp_path / ("b.safetensors" if shards == 0 else "base")
    _write_model(base, tensors, dtype, shards or 1)
    out = tmp_path / ("q.safetensors" if shards == 0 else "q")
    rep = quantize_checkpoint(base, out, blocksize=bs, double_quant=dq, progress=False)
    src = _stored(tensors, dtype)
    chosen = sorted(k for k in tensors if k.endswith("_proj.weight"))
    assert sorted(q["key"] for q in rep.quantized) == chosen  # embeddings, norms, lm_head stay
    got, got_dt = _read_all(out)
    raw_in, raw_out = _raw(base), _raw(out)
    errs = []
    for k in chosen:
        p = k[: -len(".weight")]
        w = src[k]
        assert got[k].shape == ((w.size + 1) // 2, 1) and got_dt[k] == "U8"
        state = json.loads(bytes(got[p + ".weight.quant_state.bitsandbytes__nf4"]).decode())
        assert state["quant_type"] == "nf4" and state["blocksize"] == bs and list(state["shape"]) == list(w.shape)
        assert state["dtype"] == ("bfloat16" if dtype == "BF16" else "float32")
        t = NF4Tensor.from_state_dict({n: got[n] for n in got if n.startswith(p + ".weight")}, p)
        packed_ref, absmax_ref = nf4_quantize_ref(w.reshape(-1), bs)
        assert np.array_equal(got[k].reshape(-1), packed_ref)
        if not dq:
            assert np.array_equal(got[p + ".weight.absmax"], absmax_ref)
            deq = nf4_dequantize_ref(packed_ref, absmax_ref, bs, w.size).reshape(w.shape)
            assert np.array_equal(t.dequantize().reshape(w.shape), deq)
            errs.append(np.abs(deq - w))
    for k in tensors:
        if k not in chosen:
            assert raw_out[k] == raw_in[k]
    if errs:
        allerr = np.concatenate([e.reshape(-1) for e in errs])
        assert rep.max_abs_err == pytest.approx(float(allerr.max()), rel=1e-6)
        assert rep.mean_abs_err == pytest.approx(float(allerr.mean()), rel=1e-4)
    assert rep.bytes_before == sum(tensors[k].size * (2 if dtype == "BF16" else 4) for k in chosen)
    if shards:
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
        assert cfg["quantization_config"]["bnb_4bit_use_double_quant"] is dq
        with Checkpoint(out) as ck, Checkpoint(base) as cb:
            assert [s.name for s in ck.shards] == [s.name for s in cb.shards]
            if shards > 1:
                assert ck.index_metadata["total_size"] == ck.total_bytes
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_fp4_and_without_error_stats_same_bytes(tmp_path, rng, capsys, quant_type):
    """--quant-type picks the code book (each tensor equals quantize_nf4 of its stored
    values); --no-error-stats (bf16 straight from its bits) writes the same bytes."""
    tensors = _model_tensors(rng, layers=1)
    _write_model(tmp_path / "base", tensors, "BF16", shards=2)
    outs = {}
    for stats in (True, False):
        out = tmp_path / f"q-{stats}"
        args = ["quantize", str(tmp_path / "base"), "-o", str(out), "--quant-type", quant_type, "--double-quant"]
        assert main(args + ([] if stats else ["--no-error-stats"])) == 0
        text = capsys.readouterr().out
        assert f"to {quant_type.upper()}" in text
        assert ("not measured" in text) != stats
        outs[stats] = out
    assert sorted(os.listdir(outs[True])) == sorted(os.listdir(outs[False]))
    for name in os.listdir(outs[True]):
        if name.endswith(".safetensors"):
            assert (outs[True] / name).read_bytes() == (outs[False] / name).read_bytes(), name
    got, _ = _read_all(outs[False])
    src = _stored(tensors, "BF16")
    key = next(k for k in tensors if k.endswith("_proj.weight"))
    p = key[: -len(".weight")]
    t = NF4Tensor.from_state_dict({n: got[n] for n in got if n.startswith(p + ".weight")}, p)
    want = quantize_nf4(src[key], 64, double_quant=True, quant_type=quant_type)
    assert t.quant_type == quant_type and np.array_equal(t.packed, want.packed)
    assert np.array_equal(t.dequantize(), want.dequantize())
    cfg = json.loads((outs[False] / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == quant_type
    info = inspect_path(outs[False])
    assert len(info["nf4"]) == sum(k.endswith("_proj.weight") for k in tensors)


def test_quantize_selection_and_errors(tmp_path, rng, capsys):
    tensors = _model_tensors(rng, layers=1)
    _write_model(tmp_path / "b.safetensors", tensors)
    rep = quantize_checkpoint(tmp_path / "b.safetensors", tmp_path / "o.safetensors", include=r"mlp\.",
                              exclude="down", progress=False)
    assert [q["key"] for q in rep.quantized] == ["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ConfigError, match="no tensor selected"):
        quantize_checkpoint(tmp_path / "b.safetensors", tmp_path / "p.safetensors", include="nothing-matches")
    with pytest.raises(ConfigError, match="bad regular expression"):
        quantize_checkpoint(tmp_path / "b.safetensors", tmp_path / "p.safetensors", include="(")
    with pytest.raises(FormatError, match="one of the inputs"):
        quantize_checkpoint(tmp_path / "b.safetensors", tmp_path / "b.safetensors", overwrite=True)
    assert main(["quantize", str(tmp_path / "b.safetensors"), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "b.safetensors"), "-o", str(tmp_path / "c.safetensors"),
                 "--double-quant", "--blocksize", "256"]) == 0
    text = capsys.readouterr().out
    assert "quantizing 6 tensors to NF4" in text and "reconstruction error" in text
    assert not (tmp_path / "p.safetensors").exists() and _leftovers(tmp_path) == []


# --- inspect -------------------------------------------------------------------------------
def test_inspect_checkpoint_and_adapter(tmp_path, rng, capsys):
    tensors = _model_tensors(rng, layers=1)
    _write_model(tmp_path / "base", tensors, "BF16", shards=2)
    quantize_checkpoint(tmp_path / "base", tmp_path / "q", progress=False)
    info = inspect_path(tmp_path / "base")
    assert info["tensors"] == len(tensors) and info["sharded"] and not info["nf4"]
    assert info["dtypes"]["BF16"]["params"] == sum(v.size for v in tensors.values() if v.dtype.kind == "f")
    q = inspect_path(tmp_path / "q")
    assert sorted(x["module"] for x in q["nf4"]) == sorted(k[:-7] for k in tensors if k.endswith("_proj.weight"))
    _write_adapter(tmp_path / "ad", rng, ["layers.0.self_attn.q_proj", "layers.0.mlp.up_proj"], r=4, alpha=8,
                   extra_cfg={"rank_pattern": {}, "alpha_pattern": {"up_proj": 16}}, dtype="BF16")
    a = inspect_path(tmp_path / "ad")
    by = {m["module"]: m for m in a["modules"]}
    assert by["model.layers.0.mlp.up_proj"]["scaling"] == 4.0
    assert by["model.layers.0.self_attn.q_proj"]["scaling"] == 2.0
    assert a["trainable_params"] == 4 * (H + H) + 4 * (H + FF) and a["stored_dtypes"] == ["BF16"]
    assert main(["inspect", str(tmp_path / "ad")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj" in out and "2 modules" in out
    assert main(["inspect", str(tmp_path / "q"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "checkpoint"
    assert main(["inspect", str(tmp_path / "nothing")]) == 2


def test_conversion_kernels_match_the_definitions(rng):
    from numlora.kernels import convert as kc

    from test_safetensors import _ref_bf16

    bits = rng.integers(0, 2**32, 3 * kc.CHUNK + 17, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).copy()
    x[:4] = [np.inf, -np.inf, 0.0, -0.0]
    ties = (np.arange(64, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
    x[4:68] = ties
    out = np.empty(x.size, np.uint16)
    kc.f32_to_bf16(x, out)
    finite = ~np.isnan(x)
    assert np.array_equal(out[finite], _ref_bf16(x[finite]))
    nan = np.isnan(x)
    assert np.isnan(bf16_to_f32(out[nan])).all() and np.array_equal(out[nan] >> 15, bits[nan] >> 31)
    back = np.empty(x.size, np.float32)
    kc.bf16_to_f32(out, back)
    assert np.array_equal(back.view(np.uint32), out.astype(np.uint32) << 16)
    a = rng.standard_normal(2 * kc.CHUNK + 5).astype(np.float32)
    b = a + rng.standard_normal(a.size).astype(np.float32) * np.float32(1e-3)
    nch = -(-a.size // kc.CHUNK)
    ps, pm = np.empty(nch), np.empty(nch, np.float32)
    kc.abs_err_stats(a, b, ps, pm)
    d = np.abs(a.astype(np.float64) - b)
    assert ps.sum() == pytest.approx(d.sum(), rel=1e-6) and pm.max() == np.float32(np.abs(a - b).max())
    # the documented order, bit for bit (the vector build and the element loop alike)
    a[kc.CHUNK - 3:kc.CHUNK + 9] *= np.float32(1e6)  # large terms inside a group and across chunks
    kc.abs_err_stats(a, b, ps, pm)
    want_s, want_m = abs_err_stats_ref(a, b, kc.CHUNK)
    assert np.array_equal(ps.view(np.uint64), want_s.view(np.uint64))
    assert np.array_equal(pm.view(np.uint32), want_m.view(np.uint32))


# --- outputs that would touch an input (data loss) ----------------------------------------
def _tree_hashes(root):
    import hashlib

    out = {}
    for dirpath, _, files in os.walk(root):
        for n in files:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.parametrize("command", ["merge", "quantize"])
def test_output_never_is_contains_or_lies_inside_an_input(tmp_path, rng, command, capsys):
    """`-o` that contains an input folder (with --overwrite), lies inside one, or reaches one
    through a symlink is refused with exit 2, and every input file is left as it was."""
    work = tmp_path / "work"
    base, adapter = work / "models" / "base", work / "adapters" / "ad"
    _write_model(base, _model_tensors(rng, layers=1))
    os.makedirs(adapter.parent)
    _write_adapter(adapter, rng, ["layers.0.self_attn.q_proj"])
    os.symlink(base, tmp_path / "link-to-base")
    os.symlink(work / "models", tmp_path / "link-to-models")
    before = _tree_hashes(work)
    outs = [work / "models", work, work / "models" / "base" / "out", base, tmp_path / "link-to-base",
            tmp_path / "link-to-models", tmp_path / "link-to-models" / "base" / "sub"]
    if command == "merge":
        outs += [work / "adapters", adapter, adapter / "merged"]
    for out in outs:
        for extra in ([], ["--overwrite"]):
            args = ([command, str(base), str(adapter)] if command == "merge" else [command, str(base)])
            rc = main(args + ["-o", str(out)] + extra)
            err = capsys.readouterr().err
            assert rc == 2, (out, extra, err)
            assert "input" in err, err
            assert _tree_hashes(work) == before, (out, extra)
    # a file output inside the adapter folder, for a single-file base
    _write_model(tmp_path / "b.safetensors", _model_tensors(rng, layers=1))
    rc = main(["merge", str(tmp_path / "b.safetensors"), str(adapter), "-o", str(adapter / "m.safetensors")])
    assert rc == 2 and "lies inside the input" in capsys.readouterr().err
    assert _tree_hashes(work) == before
    assert not (adapter / "m.safetensors").exists()


def test_overwrite_replaces_only_a_previous_output(tmp_path, rng, capsys):
    base = tmp_path / "base"
    _write_model(base, _model_tensors(rng, layers=1))
    keep = tmp_path / "documents"
    keep.mkdir()
    (keep / "thesis.tex").write_text("years of work")
    assert main(["quantize", str(base), "-o", str(keep), "--overwrite"]) == 2
    assert "not a previous output" in capsys.readouterr().err
    assert (keep / "thesis.tex").read_text() == "years of work"
    # a real previous output is replaced
    out = tmp_path / "q"
    assert main(["quantize", str(base), "-o", str(out)]) == 0
    assert main(["quantize", str(base), "-o", str(out)]) == 2  # exists, no --overwrite
    assert main(["quantize", str(base), "-o", str(out), "--overwrite", "--blocksize", "32"]) == 0
    capsys.readouterr()
    with Checkpoint(out) as ck:
        assert any(k.endswith("quant_state.bitsandbytes__nf4") for k in ck.keys())
    # an output whose parent is a file
    (tmp_path / "afile").write_text("x")
    assert main(["quantize", str(base), "-o", str(tmp_path / "afile" / "q")]) == 2
    assert "is a file" in capsys.readouterr().err


# --- faults: signals, OS errors, inputs that change during the run -----------------------
def _fault_setup(tmp_path, rng):
    base, adapter = tmp_path / "in" / "base", tmp_path / "in" / "ad"
    os.makedirs(base.parent)
    _write_model(base, _model_tensors(rng), "BF16", shards=2)
    _write_adapter(adapter, rng, LAYER_MODS)
    (tmp_path / "out").mkdir()
    return base, adapter, _tree_hashes(tmp_path / "in")


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("sig, rc", [("SIGINT", 130), ("SIGTERM", 143)])
@pytest.mark.parametrize("command", ["merge", "quantize"])
def test_a_signal_mid_job_removes_everything(tmp_path, rng, monkeypatch, capsys, sig, rc, command):
    """SIGTERM is handled as Ctrl-C: the abort paths run, one line on stderr, exit 128 + signal."""
    import signal

    import numlora.convert as conv

    base, adapter, before = _fault_setup(tmp_path, rng)
    calls = []
    owner, target = (conv, "_merge_one") if command == "merge" else (conv._QuantizeJob, "write")
    real = getattr(owner, target)

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), getattr(signal, sig))
        return real(*a, **k)

    monkeypatch.setattr(owner, target, interrupted)

    def outside_the_job(signum, frame):  # what the test process does if numlora installs no handler
        raise AssertionError(f"{signum} reached the test's handler")

    # Both signals get the test's own handler first: a process started in the background
    # by a non-interactive shell inherits SIGINT ignored, and numlora leaves an ignored
    # signal ignored (the test below).
    previous = {s: signal.signal(s, outside_the_job) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        args = [command, str(base)] + ([str(adapter)] if command == "merge" else [])
        assert main(args + ["-o", str(tmp_path / "out" / "m"), "--json"]) == rc
        for s in previous:
            assert signal.getsignal(s) is outside_the_job  # restored after the job
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"numlora: error: interrupted by {sig}; the partial output was removed, the inputs are untouched"
    assert os.listdir(tmp_path / "out") == []
    assert _tree_hashes(tmp_path / "in") == before


def test_a_signal_ignored_at_the_start_stays_ignored_during_the_job(tmp_path, rng, monkeypatch):
    """As under ``nohup`` (or a background job of a non-interactive shell): SIGINT ignored
    when the job starts is left ignored while it runs, and the job completes."""
    import signal

    import numlora.convert as conv

    base, adapter, before = _fault_setup(tmp_path, rng)
    seen = []
    real = conv._merge_one

    def watched(*a, **k):
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        return real(*a, **k)

    monkeypatch.setattr(conv, "_merge_one", watched)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "out" / "m"), "--json"]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen and all(i is signal.SIG_IGN for i, _ in seen)
    assert all(callable(t) and t not in (signal.SIG_IGN, signal.SIG_DFL) for _, t in seen)  # SIGTERM: numlora's
    assert _tree_hashes(tmp_path / "in") == before
    assert (tmp_path / "out" / "m").is_dir()


def test_a_signal_after_the_final_commit_keeps_the_complete_output(tmp_path, rng, monkeypatch, capsys):
    import signal

    from numlora.io import atomic

    base, adapter, before = _fault_setup(tmp_path, rng)
    real = atomic.AtomicDir.commit

    def commit_then_signal(self):
        real(self)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(atomic.AtomicDir, "commit", commit_then_signal)
    out = tmp_path / "out" / "m"
    assert main(["merge", str(base), str(adapter), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "numlora: SIGTERM arrived after the output was complete; it was kept"
    assert "merged 8 LoRA modules" in captured.out
    got, _ = _read_all(out)
    assert len(got) == len(_model_tensors(rng))
    assert _leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("fault, expect", [
    ("enospc", "No space left on device (ENOSPC); free some space or write elsewhere"),
    ("eacces", "Permission denied (EACCES); check the folder's permissions or write elsewhere"),
    ("erofs", "Read-only file system (EROFS); the file system is mounted read-only: write elsewhere"),
    ("efbig", "File too large (EFBIG); the output exceeds the file-size limit"),
])
@pytest.mark.parametrize("command", ["merge", "quantize"])
@pytest.mark.parametrize("layout", ["folder", "file"])
def test_os_errors_are_one_line_and_leave_nothing(tmp_path, rng, monkeypatch, capsys, fault, expect, command, layout):
    """Disk full, an unwritable or read-only output folder, a file-size limit: exit 2 with
    one line naming the output and the cause; no output, no temporary file, inputs as they
    were. (Root ignores permissions, so EACCES / EROFS / EFBIG are injected where the
    temporary file is created or written.)"""
    import errno

    from numlora.io import atomic

    base, adapter, before = _fault_setup(tmp_path, rng)
    if layout == "file":
        _write_model(tmp_path / "in" / "b.safetensors", _model_tensors(rng))
        base = tmp_path / "in" / "b.safetensors"
        before = _tree_hashes(tmp_path / "in")
    out = tmp_path / "out" / ("m.safetensors" if layout == "file" else "m")
    if fault == "enospc":
        full_disk(monkeypatch)
    elif fault == "efbig":  # the third write of a file fails, as write() does past RLIMIT_FSIZE
        real_write, n = atomic.AtomicFile.write, []

        def too_big(data):
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

        def write(self, data):
            n.append(1)
            return self._io(too_big, data) if len(n) == 3 else real_write(self, data)

        monkeypatch.setattr(atomic.AtomicFile, "write", write)
    else:
        code = {"eacces": errno.EACCES, "erofs": errno.EROFS}[fault]

        def failing(path):
            raise OSError(code, os.strerror(code), path)

        monkeypatch.setattr(atomic, "_open_temp", failing)
    args = [command, str(base)] + ([str(adapter)] if command == "merge" else []) + ["-o", str(out), "--json"]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"numlora: error: {command} failed: cannot write {out}"), line
    assert expect in line and line.endswith("nothing was written (the partial output was removed)"), line
    assert os.listdir(tmp_path / "out") == []
    assert _tree_hashes(tmp_path / "in") == before


def test_inputs_truncated_or_removed_during_the_run(tmp_path, rng, monkeypatch, capsys):
    import numlora.convert as conv

    base, adapter, before = _fault_setup(tmp_path, rng)
    real = conv._merge_one
    shard = base / "model-00002-of-00002.safetensors"
    size = os.path.getsize(shard)

    def truncate_then_merge(w, layer):
        os.truncate(shard, size // 2)
        real(w, layer)

    monkeypatch.setattr(conv, "_merge_one", truncate_then_merge)
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "out" / "m")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{shard}: the file was truncated while it was being read" in line, line
    assert os.listdir(tmp_path / "out") == []
    monkeypatch.setattr(conv, "_merge_one", real)
    _write_model(tmp_path / "b2", _model_tensors(rng), shards=2)

    def remove_config(w, layer):
        if (tmp_path / "b2" / "config.json").exists():
            os.remove(tmp_path / "b2" / "config.json")
        real(w, layer)

    monkeypatch.setattr(conv, "_merge_one", remove_config)
    for extra in ([], ["--dtype", "bfloat16"]):  # copied, or read and rewritten
        (tmp_path / "b2" / "config.json").write_text("{}")
        assert main(["merge", str(tmp_path / "b2"), str(adapter), "-o", str(tmp_path / "out" / "m")] + extra) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "config.json" in line and "no such model" in line, line
        assert os.listdir(tmp_path / "out") == [] and sorted(os.listdir(tmp_path)) == ["b2", "in", "out"]


def test_model_folder_entries_that_are_not_files_are_refused_first(tmp_path, rng, capsys):
    base, adapter, _ = _fault_setup(tmp_path, rng)
    os.mkfifo(base / "tokenizer.fifo")
    assert main(["quantize", str(base), "-o", str(tmp_path / "out" / "q"), "--json"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "tokenizer.fifo to be a regular file, got a FIFO" in line, line
    assert os.listdir(tmp_path / "out") == []


def test_quantize_blocksize_is_bounded(tmp_path, rng, capsys):
    base, _, _ = _fault_setup(tmp_path, rng)
    for bs in ("9223372036854775808", "1", "2097152", "x"):
        with pytest.raises(SystemExit) as info:
            main(["quantize", str(base), "-o", str(tmp_path / "out" / "q"), "--blocksize", bs])
        assert info.value.code == 2
        assert "argument --blocksize" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="blocksize must be >= 2 and <= 1048576"):
        quantize_checkpoint(base, tmp_path / "out" / "q", blocksize=2 ** 63)
    assert os.listdir(tmp_path / "out") == []


def test_inspect_shows_a_broken_nf4_state_instead_of_failing(tmp_path, capsys):
    bad = np.frombuffer(b'{"shape": "x", "blocksize": [64]}', np.uint8).copy()
    one = np.frombuffer(b"[1]", np.uint8).copy()
    save_file(tmp_path / "q.safetensors", {"l.weight.quant_state.bitsandbytes__nf4": bad,
                                           "k.weight.quant_state.bitsandbytes__nf4": one})
    assert main(["inspect", str(tmp_path / "q.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "warning: l: unreadable NF4 quant state: invalid shape 'x', blocksize [64]" in out
    assert "warning: k: unreadable NF4 quant state: expected a JSON object, got list" in out


def test_a_fifo_deep_in_a_carried_subfolder_is_refused_first(tmp_path, rng, capsys):
    base, _, before = _fault_setup(tmp_path, rng)
    os.mkfifo(base / "extra" / "pipe")
    assert main(["quantize", str(base), "-o", str(tmp_path / "out" / "q"), "--json"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{base / 'extra' / 'pipe'} to be a regular file, got a FIFO" in line, line
    assert os.listdir(tmp_path / "out") == []


def test_a_signal_inside_a_finalizer_or_numba_still_stops_the_job(tmp_path, rng, monkeypatch, capsys):
    """A KeyboardInterrupt raised inside a __del__ is printed and dropped by Python (the job
    went on and exited 0), and one raised inside numba / llvmlite (a compile or cache load)
    leaves half-built objects that print tracebacks at exit. The CLI notes the signal,
    does not raise there, and the job stops at its next check: exit 143, one line."""
    import signal

    import numlora.convert as conv

    base, adapter, before = _fault_setup(tmp_path, rng)
    real = conv._merge_one
    finished = []

    class SignalsOnDelete:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # the handler runs here, inside __del__

    fake_numba = {"__name__": "numba.core.fake_compiler", "os": os, "signal": signal, "finished": finished}
    exec("def compile_step():\n    os.kill(os.getpid(), signal.SIGTERM)\n    sum(range(1000))\n"
         "    finished.append(1)\n", fake_numba)

    for where in ("finalizer", "numba"):
        calls = []

        def merge_with_a_signal(w, layer, calls=calls, where=where):
            calls.append(1)
            if len(calls) == 2:
                if where == "finalizer":
                    SignalsOnDelete()
                else:
                    fake_numba["compile_step"]()
            real(w, layer)

        monkeypatch.setattr(conv, "_merge_one", merge_with_a_signal)
        assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "out" / "m")]) == 143
        err = capsys.readouterr().err
        assert _one_error_line(err).startswith("numlora: error: interrupted by SIGTERM"), err
        assert os.listdir(tmp_path / "out") == []
    assert finished == [1]  # the fake compile step was not cut short
    assert _tree_hashes(tmp_path / "in") == before


# --- Dask options (the runs themselves are in test_dask.py) -----------------------------------
def test_dask_options_without_dask_are_a_clear_error(tmp_path, rng, monkeypatch, capsys):
    import sys

    base = tmp_path / "base"
    _write_model(base, _model_tensors(rng), "F32", shards=2)
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed: import fails
    with pytest.raises(ConfigError, match=r"needs the optional dependencies dask and distributed "
                                          r"\(pip install 'numlora\[dask\]'\)"):
        quantize_checkpoint(base, tmp_path / "q", workers=2)
    assert main(["quantize", str(base), "-o", str(tmp_path / "q"), "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "numlora[dask]" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "q") and _leftovers(tmp_path) == []


def test_dask_options_are_checked(tmp_path, capsys):
    for extra in (["--workers", "0"], ["--workers", "two"], ["--workers", "2", "--scheduler", "tcp://h:1"]):
        with pytest.raises(SystemExit):
            main(["quantize", "in", "-o", str(tmp_path / "q")] + extra)
        assert "--workers" in capsys.readouterr().err
    pytest.importorskip("distributed")
    with pytest.raises(ConfigError, match="not both"):
        quantize_checkpoint("in", tmp_path / "q", workers=2, scheduler="tcp://h:1")
    with pytest.raises(ConfigError, match="workers must be an integer >= 1, got 0"):
        quantize_checkpoint("in", tmp_path / "q", workers=0)


def test_numlora_dask_without_dask_is_a_clear_error(monkeypatch):
    import sys

    import numlora as nl
    from numlora.dask import apply_layer  # importable without dask

    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.array", None)
    layer = nl.LoraLinear.from_weight(np.ones((4, 8), np.float32), 2, 4.0)
    with pytest.raises(ConfigError, match=r"needs the optional dependency dask\[array\] "
                                          r"\(pip install 'numlora\[dask\]'\)"):
        apply_layer(layer, np.ones((3, 8), np.float32))


@pytest.mark.parametrize("shape,bs,dq,qt", [((256, 1024), 64, False, "nf4"), ((96, 4096), 128, True, "nf4"),
                                            ((70, 512), 32, False, "fp4"), ((3, 69632), 4096, False, "nf4")])
def test_bf16_error_pass_without_float32_copies_is_the_two_array_pass(rng, shape, bs, dq, qt):
    """quantize's error pass over a bf16 weight (kernels.nf4.bf16_error_stats: decode and
    widen in L1 steps) gives the partial sums and maxima of the pass over the float32 copy
    and the dequantized weight (kernels.convert.abs_err_stats) bit for bit: several chunks,
    a last chunk cut short, blocksizes 32-4096, double quant, FP4."""
    from numlora.io.safetensors import bf16_to_f32, f32_to_bf16
    from numlora.kernels import convert as kc
    from numlora.kernels import nf4 as kn
    from numlora.nf4 import quantize_bf16_bits

    if not kn.error_stats_ok(math.prod(shape), bs, kc.CHUNK):
        pytest.skip("no SIMD decode for this blocksize here: quantize keeps the two-array pass")
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(0.02)
    x[0, :5] = [0.0, -0.0, 1e-30, 3e38, -2.5]
    bits = f32_to_bf16(x)
    q = quantize_bf16_bits(bits, shape, bs, dq, qt)
    nch = -(-x.size // kc.CHUNK)
    want_s, want_m = np.empty(nch), np.empty(nch, np.float32)
    kc.abs_err_stats(bf16_to_f32(bits).reshape(-1), q.dequantize().reshape(-1), want_s, want_m)
    got_s, got_m = np.empty(nch), np.empty(nch, np.float32)
    kn.bf16_error_stats(bits.reshape(-1), q.packed.reshape(-1), q.scales, bs, q.code, kc.CHUNK, got_s, got_m)
    assert np.array_equal(got_s.view(np.uint64), want_s.view(np.uint64))
    assert np.array_equal(got_m.view(np.uint32), want_m.view(np.uint32))


@pytest.mark.parametrize("shape,bs", [((256, 1024), 64), ((5, 30720), 64), ((96, 4096), 128), ((3, 69632), 4096),
                                      ((1, 64), 64)])
def test_quantize_with_error_in_one_pass_is_the_two_passes(rng, shape, bs):
    """numlora quantize's default path for a bf16 weight (kernels.nf4.nf4_quantize_bf16_err:
    quantize and measure the error in one pass over the bits) gives the bytes and scales
    of quantize_bf16_bits and the partials of the error pass over them, bit for bit:
    several chunks, a last chunk cut short, a single block, zeros, tiny and huge values."""
    from numlora.kernels import convert as kc
    from numlora.kernels import nf4 as kn
    from numlora.nf4 import quantize_bf16_bits, quantize_bf16_bits_measured, quantize_error_fused_ok

    n = math.prod(shape)
    if not quantize_error_fused_ok(n, bs, "nf4", kc.CHUNK):
        pytest.skip("no SIMD quantizer for this blocksize here: quantize keeps two passes")
    assert not quantize_error_fused_ok(n, bs, "fp4", kc.CHUNK)
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(0.02)
    x.reshape(-1)[:5] = [0.0, -0.0, 1e-30, 3e38, -2.5]
    bits = f32_to_bf16(x)
    want = quantize_bf16_bits(bits, shape, bs)
    nch = -(-n // kc.CHUNK)
    want_s, want_m = np.empty(nch), np.empty(nch, np.float32)
    kn.bf16_error_stats(bits.reshape(-1), want.packed.reshape(-1), want.scales, bs, want.code, kc.CHUNK, want_s,
                        want_m)
    got_s, got_m = np.full(nch, np.nan), np.full(nch, np.nan, np.float32)
    got = quantize_bf16_bits_measured(bits, shape, bs, kc.CHUNK, got_s, got_m)
    assert got.shape == shape and got.dtype == "bfloat16" and not got.double_quant
    assert np.array_equal(got.packed, want.packed)
    assert np.array_equal(got.absmax.view(np.uint32), want.absmax.view(np.uint32))
    assert np.array_equal(got_s.view(np.uint64), want_s.view(np.uint64))
    assert np.array_equal(got_m.view(np.uint32), want_m.view(np.uint32))
    ref = np.abs(bf16_to_f32(bits).reshape(-1).astype(np.float64) - want.dequantize().reshape(-1))
    assert float(got_s.sum()) == pytest.approx(float(ref.sum()), rel=1e-9)
    with pytest.raises(ShapeError, match=r"partial_sum must be a writable float64 array of shape"):
        quantize_bf16_bits_measured(bits, shape, bs, kc.CHUNK, got_s[:-1] if nch > 1 else np.empty(2), got_m)
    with pytest.raises(ShapeError, match=r"expected \d+ non-zero bit patterns"):
        quantize_bf16_bits_measured(bits, (n + 1,), bs, kc.CHUNK, got_s, got_m)
    bad = bits.copy()
    bad.reshape(-1)[-1] = 0x7FC0  # NaN: the quantizer's own check still runs
    with pytest.raises(NonFiniteError, match=r"w must be finite, got nan at index"):
        quantize_bf16_bits_measured(bad, shape, bs, kc.CHUNK, got_s, got_m)


def test_quantize_checkpoint_reads_a_bf16_weight_once(tmp_path, rng, monkeypatch):
    """With the error report on (the default), an eligible bf16 weight is quantized and
    measured in one pass: the separate error pass never runs, and the report's errors are
    those of the two-pass path (error_stats measured with the separate pass forced)."""
    import numlora.nf4 as nf4mod
    from numlora.kernels import nf4 as kn

    if not kn.SIMD_LANES:
        pytest.skip("no SIMD quantizer here")
    tensors = _model_tensors(rng, layers=1)
    _write_model(tmp_path / "base", tensors, "BF16", shards=1)
    calls = []
    real = kn.bf16_error_stats

    def counted(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(kn, "bf16_error_stats", counted)
    one = quantize_checkpoint(tmp_path / "base", tmp_path / "one", progress=False)
    assert calls == []
    monkeypatch.setattr(nf4mod, "quantize_error_fused_ok", lambda *a: False)
    two = quantize_checkpoint(tmp_path / "base", tmp_path / "two", progress=False)
    assert len(calls) == len(two.quantized) > 0
    assert [q["mean_abs_err"] for q in one.quantized] == [q["mean_abs_err"] for q in two.quantized]
    assert [q["max_abs_err"] for q in one.quantized] == [q["max_abs_err"] for q in two.quantized]
    assert one.mean_abs_err == two.mean_abs_err and one.max_abs_err == two.max_abs_err
    one_bytes = (tmp_path / "one" / "model.safetensors").read_bytes()
    assert one_bytes == (tmp_path / "two" / "model.safetensors").read_bytes()


def test_bf16_error_pass_applies_only_to_whole_blocks_that_divide_its_steps():
    from numlora.kernels import convert as kc
    from numlora.kernels import nf4 as kn

    if not kn.SIMD_LANES:
        assert not kn.error_stats_ok(4096, 64, kc.CHUNK)
        return
    assert kn.error_stats_ok(4096, 64, kc.CHUNK)
    assert not kn.error_stats_ok(4096 + 32, 64, kc.CHUNK)  # a partial last block
    assert not kn.error_stats_ok(3 * 8192, 8192, kc.CHUNK)  # blocks larger than a step
    assert not kn.error_stats_ok(96, 24, kc.CHUNK)  # not a power of two: steps cut blocks


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_a_merge_that_overflows_writes_nothing(tmp_path, rng, dtype):
    """An adapter whose s B A overflows float32 raises NonFiniteError and leaves no output
    and the inputs as they were."""
    from numlora.errors import NonFiniteError

    base, adapter = tmp_path / "in" / "base", tmp_path / "in" / "ad"
    os.makedirs(base.parent)
    _write_model(base, _model_tensors(rng), dtype, shards=2)
    tensors = _write_adapter(adapter, rng, LAYER_MODS)
    key = sorted(k for k in tensors if k.endswith(".lora_B.weight"))[-1]
    tensors[key] = np.full_like(tensors[key], 3e38)
    tensors[key.replace("lora_B", "lora_A")] = np.ones_like(tensors[key.replace("lora_B", "lora_A")])
    save_file(os.path.join(adapter, "adapter_model.safetensors"), tensors, {"format": "pt"})
    before = _tree_hashes(tmp_path / "in")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m"
    with pytest.raises(NonFiniteError, match="inf"):
        merge_checkpoint(base, adapter, out, progress=False)
    assert not out.exists() and _leftovers(tmp_path / "out") == []
    assert _tree_hashes(tmp_path / "in") == before


@pytest.mark.parametrize("st", ["BF16", "F32"])
def test_a_weight_that_is_not_finite_is_refused_before_it_is_written(st):
    """The converters' store (convert._store with ``finite``): a NaN or infinity anywhere
    in the weight (first, last, a middle chunk) raises NonFiniteError before the writer
    sees it; a finite one is written, in bf16 the bits of f32_to_bf16."""
    import numlora.convert as conv
    from numlora.errors import NonFiniteError
    from numlora.kernels import convert as kc

    class Writer:
        def __init__(self):
            self.got = []

        def write(self, name, a):
            self.got.append((name, np.array(a)))

    n = 5 * (kc.CHUNK // 2 + 3)  # three chunks, the last one short
    x = np.linspace(-3.0, 3.0, n, dtype=np.float32).reshape(5, -1)
    w = Writer()
    conv._store(w, "ok", x, st, conv._Buffers(), finite="refused")
    assert w.got[0][0] == "ok"
    assert np.array_equal(w.got[0][1], f32_to_bf16(x) if st == "BF16" else x)
    for pos in (0, kc.CHUNK + 7, n - 1):
        for bad in (np.inf, -np.inf, np.nan):
            y = x.copy().reshape(-1)
            y[pos] = bad
            w = Writer()
            with pytest.raises(NonFiniteError, match="refused"):
                conv._store(w, "bad", y.reshape(x.shape), st, conv._Buffers(), finite="refused")
            assert w.got == []
