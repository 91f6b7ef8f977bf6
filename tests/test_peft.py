"""PEFT adapter folders: numlora.load_peft_adapter and LoraAdapter.save_peft.

The first part needs only numpy: round trips and refusals. The second part runs PEFT
itself (torch + peft installed) as the reference: adapters PEFT saves load in numlora and
compute what PEFT computes, adapters numlora saves load in PEFT, merges agree.
"""

import copy
import dataclasses
import json
import os
import warnings

import numpy as np
import pytest

import numlora as nl
from numlora.errors import FormatError
from numlora.io.peft import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME
from numlora.io.safetensors import load_file, load_metadata, save_file


def _f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _write_folder(path, config, tensors, metadata=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f)
    if tensors is not None:
        save_file(os.path.join(path, WEIGHTS_NAME), tensors, metadata or {"format": "pt"})
    return path


def _mixed_adapter(rng, **config):
    """Three layers: two ranks, two alphas, LoRA biases."""
    cfg = nl.LoraConfig(4, 8.0, dropout=0.05, target_modules=("q", "v"), use_rslora=True, lora_bias=True,
                        base_model_name_or_path="tiny-model", task_type="CAUSAL_LM", **config)
    ad = nl.LoraAdapter(cfg)
    ad.add_lora("layers.0.attn.q", _f32(rng, 4, 16), _f32(rng, 12, 4), lora_bias=_f32(rng, 12))
    ad.add_lora("layers.1.attn.q", _f32(rng, 2, 16), _f32(rng, 12, 2), alpha=3.0, lora_bias=_f32(rng, 12))
    ad.add_lora("layers.0.attn.v", _f32(rng, 4, 16), _f32(rng, 12, 4))  # zero LoRA bias
    return ad


def _assert_same_adapter(got, want):
    assert got.layer_names == want.layer_names
    for name, layer in want.items():
        g = got[name]
        assert (g.rank, g.alpha, g.scaling, g.use_rslora, g.fan_in_fan_out, g.use_dora) == \
            (layer.rank, layer.alpha, layer.scaling, layer.use_rslora, layer.fan_in_fan_out, layer.use_dora)
        assert _bits_equal(g.lora_a, layer.lora_a) and _bits_equal(g.lora_b, layer.lora_b)
        for part in ("lora_bias", "magnitude"):
            assert (getattr(g, part) is None) == (getattr(layer, part) is None)
            if getattr(layer, part) is not None:
                assert _bits_equal(getattr(g, part), getattr(layer, part))
        assert not g.attached


# --- round trips ------------------------------------------------------------------------------

def test_round_trip_is_bit_exact(tmp_path, rng):
    ad = _mixed_adapter(rng)
    out = tmp_path / "new" / "adapter"  # folders are created
    ad.save_peft(out)
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary files left
    back = nl.load_peft_adapter(out)
    _assert_same_adapter(back, ad)
    # the config read back is the one saved, plus the patterns that give layers.1.attn.q its rank / alpha
    assert dataclasses.replace(back.config, rank_pattern={}, alpha_pattern={}) == ad.config
    assert back["layers.1.attn.q"].scaling == 3.0 / np.sqrt(2)
    assert np.array_equal(back["layers.0.attn.v"].lora_bias, np.zeros(12, np.float32))
    with open(out / CONFIG_NAME) as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "LORA" and cfg["bias"] == "none" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"], cfg["lora_bias"]) == \
        (4, 8, 0.05, True, True)
    assert cfg["target_modules"] == ["q", "v"]
    assert cfg["rank_pattern"] == {r"^layers\.1\.attn\.q": 2} and cfg["alpha_pattern"] == {r"^layers\.1\.attn\.q": 3}
    tensors = load_file(out / WEIGHTS_NAME)
    assert load_metadata(out / WEIGHTS_NAME) == {"format": "pt"}
    assert sorted(tensors) == sorted(KEY_PREFIX + n + s for n in ad for s in
                                     (".lora_A.weight", ".lora_B.weight", ".lora_B.bias"))
    # saving over an existing folder replaces both files and keeps others
    (out / "README.md").write_text("hello")
    ad["layers.0.attn.q"].lora_b = np.zeros((12, 4), np.float32)
    ad.save_peft(out)
    assert np.all(nl.load_peft_adapter(out)["layers.0.attn.q"].lora_b == 0)
    assert (out / "README.md").read_text() == "hello"


def test_files_read_by_the_safetensors_package(tmp_path, rng):
    st = pytest.importorskip("safetensors.numpy", reason="needs safetensors: pip install -e '.[test,peers]'")
    from safetensors import safe_open

    ad = _mixed_adapter(rng)
    ad.save_peft(tmp_path)
    tensors = st.load_file(str(tmp_path / WEIGHTS_NAME))
    for name, layer in ad.items():
        assert _bits_equal(tensors[KEY_PREFIX + name + ".lora_A.weight"], layer.lora_a)
        assert _bits_equal(tensors[KEY_PREFIX + name + ".lora_B.weight"], layer.lora_b)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "np") as f:
        assert f.metadata() == {"format": "pt"}


def test_config_patterns_are_kept_when_they_fit(tmp_path, rng):
    cfg = nl.LoraConfig(4, 8.0, target_modules=("q", "fc1"), rank_pattern={"fc1": 2}, alpha_pattern={"fc.*": 5})
    ad = nl.LoraAdapter(cfg)
    ad.add_lora("b.0.q", _f32(rng, 4, 6), _f32(rng, 5, 4))
    ad.add_lora("b.0.fc1", _f32(rng, 2, 6), _f32(rng, 5, 2))
    ad.save_peft(tmp_path)
    with open(tmp_path / CONFIG_NAME) as f:
        written = json.load(f)
    assert written["rank_pattern"] == {"fc1": 2} and written["alpha_pattern"] == {"fc.*": 5}
    back = nl.load_peft_adapter(tmp_path)
    assert back["b.0.fc1"].alpha == 5.0 and back["b.0.q"].alpha == 8.0 and back.config == cfg


def test_nested_names_get_exact_patterns_in_any_order(tmp_path, rng):
    ad = nl.LoraAdapter(nl.LoraConfig(4, 8.0))  # no target_modules: the layer names are written
    ad.add_lora("a.q", _f32(rng, 2, 6), _f32(rng, 6, 2))
    ad.add_lora("x.a.q", _f32(rng, 3, 6), _f32(rng, 6, 3), alpha=1.5)
    ad.add_lora("y.a.q", _f32(rng, 4, 6), _f32(rng, 6, 4))
    ad.save_peft(tmp_path)
    path = tmp_path / CONFIG_NAME
    cfg = json.loads(path.read_text())
    assert cfg["target_modules"] == ["a.q", "x.a.q", "y.a.q"]
    for order in (1, -1):  # PEFT sorts the keys when it re-saves a config: order must not matter
        cfg["rank_pattern"] = dict(sorted(cfg["rank_pattern"].items())[::order])
        path.write_text(json.dumps(cfg))
        back = nl.load_peft_adapter(tmp_path)
        assert [back[n].rank for n in ("a.q", "x.a.q", "y.a.q")] == [2, 3, 4]
        assert [back[n].alpha for n in ("a.q", "x.a.q", "y.a.q")] == [8.0, 1.5, 8.0]


def test_targets_extended_to_cover_every_layer(tmp_path, rng):
    ad = nl.LoraAdapter(nl.LoraConfig(2, 4.0, target_modules=("q",)))
    ad.add_lora("l.0.q", _f32(rng, 2, 4), _f32(rng, 4, 2))
    ad.add_lora("l.0.out", _f32(rng, 2, 4), _f32(rng, 4, 2))
    ad.save_peft(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"] == ["q", "l.0.out"]
    regex = nl.LoraAdapter(nl.LoraConfig(2, 4.0, target_regex=r".*\.q"))
    regex.add_lora("l.0.q", _f32(rng, 2, 4), _f32(rng, 4, 2))
    regex.save_peft(tmp_path / "r")
    assert json.loads((tmp_path / "r" / CONFIG_NAME).read_text())["target_modules"] == r".*\.q"
    assert nl.load_peft_adapter(tmp_path / "r").config.target_regex == r".*\.q"


def test_half_precision_files(tmp_path, rng):
    ad = _mixed_adapter(rng)
    ad.save_peft(tmp_path / "f16", dtype="F16")
    back = nl.load_peft_adapter(tmp_path / "f16")
    raw = load_file(tmp_path / "f16" / WEIGHTS_NAME)
    assert all(a.dtype == np.float16 for a in raw.values())
    for name, layer in ad.items():
        assert back[name].lora_a.dtype == np.float32
        assert _bits_equal(back[name].lora_a, layer.lora_a.astype(np.float16).astype(np.float32))
        assert _bits_equal(back[name].lora_bias, layer.lora_bias.astype(np.float16).astype(np.float32))
    ad.save_peft(tmp_path / "bf16", dtype="BF16")
    raw = load_file(tmp_path / "bf16" / WEIGHTS_NAME)
    assert all(a.dtype == np.uint16 for a in raw.values())  # bfloat16 bits
    back = nl.load_peft_adapter(tmp_path / "bf16")
    for name, layer in ad.items():
        # bfloat16 keeps the top 16 bits: what comes back is within half a bf16 ulp (2^-8 relative)
        err = np.abs(back[name].lora_b - layer.lora_b)
        assert np.all(err <= np.abs(layer.lora_b) * 2.0 ** -8)
        assert np.all(back[name].lora_b.view(np.uint32) & 0xFFFF == 0)


def test_bf16_matches_torch_rounding(tmp_path, rng):
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
    ad = _mixed_adapter(rng)
    ad.save_peft(tmp_path, dtype="BF16")
    back = nl.load_peft_adapter(tmp_path)
    for name, layer in ad.items():
        ref = torch.from_numpy(layer.lora_a).to(torch.bfloat16).float().numpy()
        assert _bits_equal(back[name].lora_a, ref)


def test_dora_round_trip(tmp_path, rng):
    ad = nl.LoraAdapter(nl.LoraConfig(2, 4.0, use_dora=True, target_modules=("c_attn",), fan_in_fan_out=True))
    for i in range(2):
        ad.add_lora(f"h.{i}.attn.c_attn", _f32(rng, 2, 8), _f32(rng, 24, 2), magnitude=np.abs(_f32(rng, 24)))
    ad.save_peft(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert KEY_PREFIX + "h.0.attn.c_attn.lora_magnitude_vector" in tensors
    back = nl.load_peft_adapter(tmp_path)
    _assert_same_adapter(back, ad)
    assert back.config.use_dora and back.config.fan_in_fan_out
    assert back["h.1.attn.c_attn"].base_shape == (8, 24)


def test_f64_tensors_and_keys_without_prefix(tmp_path, rng):
    a, b = rng.standard_normal((2, 5)), rng.standard_normal((3, 2))
    _write_folder(tmp_path, {"peft_type": "LORA", "r": 2}, {"m.lin.lora_A.weight": a, "m.lin.lora_B.weight": b})
    layer = nl.load_peft_adapter(tmp_path)["m.lin"]
    assert layer.lora_a.dtype == np.float32 and _bits_equal(layer.lora_a, a.astype(np.float32))
    assert layer.alpha == 8.0  # PEFT's default lora_alpha


# --- refusals -----------------------------------------------------------------------------------

def _good_tensors(rng, name="m.q", r=2):
    return {f"{KEY_PREFIX}{name}.lora_A.weight": _f32(rng, r, 6), f"{KEY_PREFIX}{name}.lora_B.weight": _f32(rng, 4, r)}


def test_missing_folder_and_files(tmp_path, rng):
    with pytest.raises(FormatError, match="no such PEFT adapter folder: .*nowhere"):
        nl.load_peft_adapter(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FormatError, match="expected a PEFT adapter folder.*got a file"):
        nl.load_peft_adapter(tmp_path / "file")
    with pytest.raises(FormatError, match=f"no {CONFIG_NAME}"):
        nl.load_peft_adapter(tmp_path)
    _write_folder(tmp_path / "a", {"peft_type": "LORA", "r": 2}, None)
    with pytest.raises(FormatError, match=f"no {WEIGHTS_NAME}"):
        nl.load_peft_adapter(tmp_path / "a")
    _write_folder(tmp_path / "bad", {}, _good_tensors(rng))
    (tmp_path / "bad" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        nl.load_peft_adapter(tmp_path / "bad")


def test_legacy_bin_is_never_unpickled(tmp_path):
    _write_folder(tmp_path, {"peft_type": "LORA"}, None)
    # a pickle that would fail loudly if anything unpickled it
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04cbuiltins\nexit\n(K\x07tR.")
    with pytest.raises(FormatError, match=r"adapter_model.bin but no adapter_model.safetensors.*never unpickles"):
        nl.load_peft_adapter(tmp_path)


def test_config_problems_name_the_file(tmp_path, rng):
    _write_folder(tmp_path / "ia3", {"peft_type": "IA3"}, _good_tensors(rng))
    with pytest.raises(nl.ConfigError, match=r"adapter_config.json: expected peft_type 'LORA', got peft_type 'IA3'"):
        nl.load_peft_adapter(tmp_path / "ia3")
    _write_folder(tmp_path / "unk", {"peft_type": "LORA", "r": 2, "frobnicate": 1}, _good_tensors(rng))
    with pytest.warns(UserWarning, match=r"ignoring keys numlora does not know: \['frobnicate'\]") as rec:
        nl.load_peft_adapter(tmp_path / "unk")
    assert rec[0].filename == __file__  # the warning points at the caller
    _write_folder(tmp_path / "bias", {"peft_type": "LORA", "r": 2, "bias": "lora_only"}, _good_tensors(rng))
    with pytest.raises(nl.ConfigError, match="bias='lora_only' is not supported"):
        nl.load_peft_adapter(tmp_path / "bias")


_CFG = '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]%s}'


@pytest.mark.parametrize("extra, match", [
    (', "r": 4', "the key 'r' appears twice"),  # json would keep r=4 silently
    (', "rank_pattern": {"q": 2, "q": 3}', "the key 'q' appears twice"),
    (', "x": ' + "[" * 50000 + "]" * 50000, "nested too deeply"),
    (', "x": ' + "7" * 5000, "JSON value out of range"),
])
def test_config_json_that_cannot_be_read_unambiguously(tmp_path, rng, extra, match):
    _write_folder(tmp_path, {}, _good_tensors(rng))
    (tmp_path / CONFIG_NAME).write_text(_CFG % extra)
    with pytest.raises(FormatError, match=match) as info:
        nl.load_peft_adapter(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)


@pytest.mark.parametrize("key, value, match", [
    ("r", True, "r must be an integer in 1..65536, got bool True"),
    ("r", 2.0, "r must be an integer in 1..65536, got float 2.0"),
    ("r", "2", "r must be an integer in 1..65536, got str '2'"),
    ("r", 2 ** 70, r"r must be an integer in 1..65536 \(2\*\*16"),
    ("r", 0, "r must be an integer in 1..65536"),
    ("lora_alpha", "8", "lora_alpha must be a number, got str '8'"),
    ("lora_alpha", False, "lora_alpha must be a number, got bool False"),
    ("lora_alpha", [8], "lora_alpha must be a number, got list"),
    ("lora_dropout", "0.1", "lora_dropout must be a number"),
    ("target_modules", 5, "target_modules must be a list of module names"),
    ("target_modules", ["q", 1], "target_modules must be a list of module names"),
    ("target_modules", {"q": 1}, "target_modules must be a list of module names"),
    ("rank_pattern", ["q"], "rank_pattern must be an object"),
    ("rank_pattern", {"q": "2"}, r"rank_pattern\['q'\] must be an integer in 1..65536, got str"),
    ("rank_pattern", {"q": 10 ** 9}, r"rank_pattern\['q'\] must be an integer in 1..65536"),
    ("alpha_pattern", {"q": None}, r"alpha_pattern\['q'\] must be a number, got NoneType"),
    ("use_dora", "yes", "use_dora must be true or false, got str 'yes'"),
    ("fan_in_fan_out", 1, "fan_in_fan_out must be true or false, got int 1"),
])
def test_config_types_are_checked_where_the_file_is_read(tmp_path, rng, key, value, match):
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"], key: value}
    _write_folder(tmp_path, cfg, _good_tensors(rng))
    with pytest.raises(FormatError, match=match) as info:
        nl.load_peft_adapter(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)


def test_config_that_is_not_a_regular_file(tmp_path, rng):
    _write_folder(tmp_path, {}, _good_tensors(rng))
    os.remove(tmp_path / CONFIG_NAME)
    os.mkfifo(tmp_path / CONFIG_NAME)  # would block json.load forever
    with pytest.raises(FormatError, match="adapter_config.json to be a regular file, got a FIFO"):
        nl.load_peft_adapter(tmp_path)
    os.remove(tmp_path / CONFIG_NAME)
    os.mkdir(tmp_path / CONFIG_NAME)
    with pytest.raises(FormatError, match="regular file, got a folder"):
        nl.load_peft_adapter(tmp_path)
    os.rmdir(tmp_path / CONFIG_NAME)
    _write_folder(tmp_path, {"peft_type": "LORA", "r": 2, "target_modules": ["q"]}, None)
    os.remove(tmp_path / WEIGHTS_NAME)
    os.mkfifo(tmp_path / WEIGHTS_NAME)
    with pytest.raises(FormatError, match="adapter_model.safetensors to be a regular file, got a FIFO"):
        nl.load_peft_adapter(tmp_path)


@pytest.mark.parametrize("case", ["shape", "missing_b", "missing_a", "rank", "int", "conv", "embedding",
                                  "magnitude_unexpected", "magnitude_missing", "lora_bias_missing", "bad_vector"])
def test_bad_tensors(tmp_path, rng, case):
    cfg = {"peft_type": "LORA", "r": 2}
    t = _good_tensors(rng)
    ka, kb = f"{KEY_PREFIX}m.q.lora_A.weight", f"{KEY_PREFIX}m.q.lora_B.weight"
    err, match = {
        "shape": (nl.ShapeError, r"layer 'm.q': lora_A has shape \(2, 6\) \(rank 2\), so lora_B must have shape "
                                 r"\(out_features, 2\); got \(4, 3\)"),
        "missing_b": (FormatError, r"layer 'm.q' has no base_model.model.m.q.lora_B.weight"),
        "missing_a": (FormatError, r"layer 'm.q' has no base_model.model.m.q.lora_A.weight"),
        "rank": (FormatError, r"layer 'm.q': the config gives rank 4 \(r\), but lora_A has shape \(2, 6\)"),
        "int": (nl.DTypeError, r"lora_A.weight: expected a floating tensor .* got int32"),
        "conv": (nl.ShapeError, r"lora_A has shape \(2, 6, 1, 1\) \(a Conv2d of rank 2\), so lora_B must have "
                                r"shape \(C_out, 2, 1, 1\); got \(4, 2\)"),
        "embedding": (FormatError, r"layer 'emb' has no base_model.model.emb.lora_embedding_B"),
        "magnitude_unexpected": (FormatError, "lora_magnitude_vector is present but the config has use_dora=false"),
        "magnitude_missing": (FormatError, "use_dora=true but layer 'm.q' has no .*lora_magnitude_vector"),
        "lora_bias_missing": (FormatError, "lora_bias=true but layer 'm.q' has no .*lora_B.bias"),
        "bad_vector": (nl.ShapeError, r"layer 'm.q': expected magnitude of shape \(4,\), got \(6,\)"),
    }[case]
    if case == "shape":
        t[kb] = _f32(rng, 4, 3)
    elif case == "missing_b":
        del t[kb]
    elif case == "missing_a":
        del t[ka]
    elif case == "rank":
        cfg["r"] = 4
    elif case == "int":
        t[ka] = np.ones((2, 6), np.int32)
    elif case == "conv":
        t[ka] = _f32(rng, 2, 6, 1, 1)
    elif case == "embedding":
        t[KEY_PREFIX + "emb.lora_embedding_A"] = _f32(rng, 2, 6)
    elif case == "magnitude_unexpected":
        t[KEY_PREFIX + "m.q.lora_magnitude_vector"] = _f32(rng, 4)
    elif case == "magnitude_missing":
        cfg["use_dora"] = True
    elif case == "lora_bias_missing":
        cfg["lora_bias"] = True
    elif case == "bad_vector":
        cfg["use_dora"] = True
        t[KEY_PREFIX + "m.q.lora_magnitude_vector"] = _f32(rng, 6)
    _write_folder(tmp_path, cfg, t)
    with pytest.raises(err, match=match):
        nl.load_peft_adapter(tmp_path)


def test_other_tensors_are_ignored_with_a_warning(tmp_path, rng):
    t = _good_tensors(rng)
    t[KEY_PREFIX + "classifier.weight"] = _f32(rng, 3, 4)
    _write_folder(tmp_path, {"peft_type": "LORA", "r": 2}, t)
    with pytest.warns(UserWarning, match=r"ignoring tensors that are not LoRA layer tensors: "
                                         r"\['base_model.model.classifier.weight'\]"):
        ad = nl.load_peft_adapter(tmp_path)
    assert ad.layer_names == ["m.q"]
    _write_folder(tmp_path / "none", {"peft_type": "LORA"}, {"x.weight": _f32(rng, 2, 2)})
    with pytest.raises(FormatError, match="no LoRA tensors"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nl.load_peft_adapter(tmp_path / "none")


def test_save_refusals(tmp_path, rng):
    ad = _mixed_adapter(rng)
    with pytest.raises(nl.ConfigError, match=r"dtype must be one of \('F32', 'F16', 'BF16'\), got 'F64'"):
        ad.save_peft(tmp_path, dtype="F64")
    with pytest.raises(nl.ConfigError, match="no layers"):
        nl.LoraAdapter(nl.LoraConfig(2, 2)).save_peft(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(FormatError, match="exists and is not a folder"):
        ad.save_peft(tmp_path / "f")
    dora = nl.LoraAdapter(nl.LoraConfig(2, 4.0, use_dora=True))
    dora.add_lora("a", _f32(rng, 2, 4), _f32(rng, 4, 2), magnitude=np.ones(4, np.float32))
    dora["a"].magnitude = None  # now a plain layer in a DoRA adapter: PEFT cannot express it
    with pytest.raises(nl.ConfigError, match="use_dora=False but the adapter's config has use_dora=True"):
        dora.save_peft(tmp_path / "d")
    assert not (tmp_path / "d").exists()


# --- against PEFT itself ---------------------------------------------------------------------------

def _torch_stack():
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
    peft = pytest.importorskip("peft", reason="needs peft: pip install -e '.[test,peers]'")
    return torch, peft


def _net(torch, conv1d=False):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            if conv1d:
                from transformers.pytorch_utils import Conv1D

                self.c_attn = Conv1D(24, 16)  # GPT-2 layout: weight (in, out) = (16, 24)
                self.c_proj = Conv1D(16, 24)
            else:
                self.q = nn.Linear(16, 12)
                self.v = nn.Linear(16, 12)
                self.fc1 = nn.Linear(12, 10)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(10, 4)

    return Net()


def _lora_modules(peft_model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def _randomize(torch, peft_model):
    """Nonzero A, B, LoRA bias and magnitude (PEFT starts B at 0: a no-op adapter)."""
    with torch.no_grad():
        for m in _lora_modules(peft_model).values():
            m.lora_A["default"].weight.normal_()
            m.lora_B["default"].weight.normal_(0.0, 0.5)
            if m.lora_B["default"].bias is not None:
                m.lora_B["default"].bias.normal_()
            if "default" in m.lora_magnitude_vector:
                mag = m.lora_magnitude_vector["default"].weight
                mag.mul_(1.0 + 0.3 * torch.rand_like(mag))


def _base(module):
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _attach_from_torch(adapter, modules):
    adapter.attach(lambda n: _base(modules[n]).weight.detach().numpy(),
                   lambda n: None if _base(modules[n]).bias is None else _base(modules[n]).bias.detach().numpy())


def _assert_forward_matches_peft(torch, adapter, peft_modules, rng):
    """numlora's layer forward equals PEFT's module output within 1e-5 relative, and the
    adapter visibly changes the output (so the comparison is not vacuous)."""
    assert sorted(adapter.layer_names) == sorted(peft_modules)
    for name, layer in adapter.items():
        m = peft_modules[name]
        assert layer.rank == m.r["default"] and layer.alpha == m.lora_alpha["default"]
        assert layer.scaling == pytest.approx(m.scaling["default"], rel=1e-12)
        x = rng.standard_normal((5, layer.in_features)).astype(np.float32)
        with torch.no_grad():
            ref = m(torch.from_numpy(x)).numpy().astype(np.float64)
            base = _base(m)(torch.from_numpy(x)).numpy().astype(np.float64)
        got = layer.forward(x)
        assert np.abs(ref - base).max() > 0.05 * np.abs(ref).max(), name
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), name


def _assert_merge_matches_peft(adapter, peft_model):
    merged = dict(peft_model.merge_and_unload().named_modules())
    for name, layer in adapter.items():
        layer.merge()
        ref_w = merged[name].weight.detach().numpy().astype(np.float64)
        assert np.abs(layer.weight - ref_w).max() <= 1e-5 * np.abs(ref_w).max(), name
        if merged[name].bias is not None:
            ref_b = merged[name].bias.detach().numpy().astype(np.float64)
            assert np.abs(layer.bias - ref_b).max() <= 1e-5 * np.abs(ref_b).max(), name


def _peft_config(peft, **kw):
    return peft.LoraConfig(**kw)


PLAIN = dict(r=4, lora_alpha=8, target_modules=["q", "v", "fc1"], use_rslora=True, lora_bias=True,
             rank_pattern={r"layers\.1\.q": 6, "fc1": 3}, alpha_pattern={"v": 10, r"^layers\.0\.fc1": 5},
             lora_dropout=0.1)
DORA = dict(r=4, lora_alpha=8, target_modules=["q", "v", "fc1"], use_dora=True, rank_pattern={"fc1": 2},
            alpha_pattern={"q": 12})


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["plain", "dora"])
def test_peft_saved_adapter_runs_and_merges_like_peft(tmp_path, rng, kind):
    torch, peft = _torch_stack()
    torch.manual_seed(0)
    pm = peft.get_peft_model(_net(torch), _peft_config(peft, **(PLAIN if kind == "plain" else DORA)))
    _randomize(torch, pm)
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    ad = nl.load_peft_adapter(tmp_path)
    assert ad.config.use_dora == (kind == "dora") and ad.config.lora_bias == (kind == "plain")
    if kind == "plain":
        assert ad.config.dropout == 0.1 and ad.config.use_rslora
        assert ad["layers.1.q"].rank == 6 and ad["layers.0.q"].rank == 4 and ad["layers.1.fc1"].rank == 3
        assert ad["layers.0.fc1"].alpha == 5 and ad["layers.1.fc1"].alpha == 8 and ad["layers.0.v"].alpha == 10
    mods = _lora_modules(pm)
    _attach_from_torch(ad, mods)
    _assert_forward_matches_peft(torch, ad, mods, rng)
    _assert_merge_matches_peft(ad, pm)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["plain", "dora"])
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_numlora_saved_adapter_loads_in_peft(tmp_path, rng, kind, dtype):
    torch, peft = _torch_stack()
    torch.manual_seed(1)
    base = _net(torch)
    keep = copy.deepcopy(base)
    modules = dict(base.named_modules())
    dora = kind == "dora"
    ad = nl.LoraAdapter(nl.LoraConfig(4, 8.0, target_modules=("q", "fc1"), use_rslora=not dora,
                                      lora_bias=not dora, use_dora=dora))
    for name, m in modules.items():
        if not name.endswith((".q", ".fc1")):
            continue
        r = 6 if name == "layers.1.q" else (2 if name.endswith("fc1") else 4)
        out_f, in_f = m.weight.shape
        extra = {"magnitude": np.abs(_f32(rng, out_f)) + 0.5} if dora else {"lora_bias": _f32(rng, out_f)}
        ad.add_lora(name, _f32(rng, r, in_f, scale=0.5), _f32(rng, out_f, r, scale=0.5),
                    alpha=5.0 if name == "layers.0.fc1" else None, **extra)
    ad.save_peft(tmp_path, dtype=dtype)
    pm = peft.PeftModel.from_pretrained(keep, str(tmp_path))
    pm.eval()
    mods = _lora_modules(pm)
    back = nl.load_peft_adapter(tmp_path)  # (bf16: the values PEFT holds too)
    _attach_from_torch(back, mods)
    _assert_forward_matches_peft(torch, back, mods, rng)
    if dtype == "F32":
        for name, layer in ad.items():
            assert np.array_equal(mods[name].lora_B["default"].weight.detach().numpy(), layer.lora_b)
    _assert_merge_matches_peft(back, pm)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["plain", "dora"])
def test_conv1d_fan_in_fan_out_against_peft(tmp_path, rng, kind):
    torch, peft = _torch_stack()
    pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[test,peers]'")
    torch.manual_seed(2)
    cfg = _peft_config(peft, r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                       use_dora=kind == "dora", rank_pattern={"c_proj": 2})
    pm = peft.get_peft_model(_net(torch, conv1d=True), cfg)
    _randomize(torch, pm)
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    ad = nl.load_peft_adapter(tmp_path)
    assert ad.config.fan_in_fan_out and ad["layers.0.c_attn"].base_shape == (16, 24)
    mods = _lora_modules(pm)
    _attach_from_torch(ad, mods)
    _assert_forward_matches_peft(torch, ad, mods, rng)
    _assert_merge_matches_peft(ad, pm)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_half_precision_files_written_by_torch(tmp_path, rng, torch_dtype):
    torch, peft = _torch_stack()
    st_torch = pytest.importorskip("safetensors.torch", reason="needs safetensors: pip install -e '.[test,peers]'")
    torch.manual_seed(3)
    base = _net(torch)
    keep = copy.deepcopy(base)
    pm = peft.get_peft_model(base, _peft_config(peft, **PLAIN))
    _randomize(torch, pm)
    pm.save_pretrained(str(tmp_path / "f32"))
    tensors = st_torch.load_file(str(tmp_path / "f32" / WEIGHTS_NAME))
    half = {k: v.to(getattr(torch, torch_dtype)) for k, v in tensors.items()}
    os.makedirs(tmp_path / "half")
    st_torch.save_file(half, str(tmp_path / "half" / WEIGHTS_NAME), metadata={"format": "pt"})
    (tmp_path / "half" / CONFIG_NAME).write_text((tmp_path / "f32" / CONFIG_NAME).read_text())
    ad = nl.load_peft_adapter(tmp_path / "half")
    for name, layer in ad.items():
        assert _bits_equal(layer.lora_a, half[KEY_PREFIX + name + ".lora_A.weight"].float().numpy())
        assert _bits_equal(layer.lora_bias, half[KEY_PREFIX + name + ".lora_B.bias"].float().numpy())
    loaded = peft.PeftModel.from_pretrained(keep, str(tmp_path / "half"))
    loaded.eval()
    mods = _lora_modules(loaded)
    _attach_from_torch(ad, mods)
    _assert_forward_matches_peft(torch, ad, mods, rng)


def test_pattern_matching_is_peft_matching():
    _, _ = _torch_stack()
    from peft.utils.other import get_pattern_key

    patterns = {r"layers\.0\.q": 2, "q": 4, "fc.*": 6, "^top": 7, "attn.v": 9}
    cfg = nl.LoraConfig(8, 8.0, rank_pattern=patterns)
    names = ["layers.0.q", "layers.1.q", "model.layers.0.q", "layers.0.xq", "layers.3.fc1", "top", "a.top",
             "x.attn.v", "x.attnXv", "q", "fc", "block.fc_out"]
    for name in names:
        assert cfg.rank_for(name) == patterns.get(get_pattern_key(patterns.keys(), name), 8), name
