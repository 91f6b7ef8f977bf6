import json

import numpy as np
import pytest

import numlora as nl

from conftest import make_weight


def test_multi_layer():
    cfg = nl.LoraConfig(4, 8.0, target_modules=["q_proj", "k_proj", "v_proj"])
    ad = nl.LoraAdapter(cfg)
    for name in cfg.target_modules:
        ad.add_layer(name, make_weight(32, 16))
    assert ad.layer_names == ["q_proj", "k_proj", "v_proj"]
    assert len(ad) == 3 and "k_proj" in ad and "o_proj" not in ad
    assert list(ad) == ad.layer_names
    x = np.ones(16, np.float32)
    for name in ad:
        assert ad.forward_layer(name, x).shape == (32,)
        assert ad[name] is ad.get_layer(name)
    with pytest.raises(nl.LayerNotFoundError,
                       match="'nonexistent' not found; known layers: 'q_proj', 'k_proj', 'v_proj'"):
        ad.forward_layer("nonexistent", x)
    with pytest.raises(KeyError):
        ad["nonexistent"]


def test_duplicate_layer():
    ad = nl.LoraAdapter(nl.LoraConfig(4, 8.0))
    ad.add_layer("a", make_weight(16, 8))
    with pytest.raises(nl.DuplicateLayerError, match="'a' already exists"):
        ad.add_layer("a", make_weight(16, 8))


def test_merge_all_keeps_outputs_and_unmerge_all_restores():
    ad = nl.LoraAdapter(nl.LoraConfig(4, 8.0))
    ad.add_layer("layer_0", make_weight(16, 8))
    ad.add_layer("layer_1", make_weight(16, 8))
    i, j = np.meshgrid(np.arange(16), np.arange(4), indexing="ij")
    ad["layer_0"].lora_b = ((i + j) * 0.01).astype(np.float32)
    x = np.full(8, 0.5, np.float32)
    before = {n: ad.forward_layer(n, x) for n in ad}
    ad["layer_1"].merge()
    ad.merge_all()
    assert all(ad[n].merged for n in ad)
    for n in ad:
        assert np.abs(ad.forward_layer(n, x) - before[n]).max() < 1e-4
    ad.unmerge_all()
    for n in ad:
        assert not ad[n].merged
        assert np.array_equal(ad[n].weight, make_weight(16, 8))


def test_summary():
    ad = nl.LoraAdapter(nl.LoraConfig(8, 16.0))
    ad.add_layer("proj_q", make_weight(64, 32))
    ad.add_layer("proj_v", make_weight(64, 32))
    s = ad.summary()
    assert (s.num_layers, s.rank, s.alpha, s.total_trainable, s.total_original) == (2, 8, 16.0, 1536, 4096)
    assert abs(s.compression_ratio - 1536 / (1536 + 4096)) < 1e-12
    assert "1,536" in str(s)
    assert json.loads(json.dumps(s.to_dict()))["total_original"] == 4096
    empty = nl.LoraAdapter(nl.LoraConfig(8, 16.0)).summary()
    assert empty.num_layers == 0 and empty.compression_ratio == 0.0


def test_adapter_uses_config_settings(rng):
    cfg = nl.LoraConfig(4, 8.0, use_rslora=True, fan_in_fan_out=True)
    ad = nl.LoraAdapter(cfg)
    layer = ad.add_layer("c_attn", rng.standard_normal((12, 30)).astype(np.float32))
    assert layer.fan_in_fan_out and layer.scaling == cfg.scaling == 4.0
    assert layer.out_features == 30


def test_config_validation():
    assert nl.LoraConfig(8, 16.0).scaling == 2.0
    for kwargs, match in [({"rank": 0, "alpha": 16}, "rank must be > 0"),
                          ({"rank": 8, "alpha": -1.0}, "alpha must be > 0"),
                          ({"rank": 8, "alpha": 0.0}, "alpha must be > 0"),
                          ({"rank": 8, "alpha": 16, "dropout": 1.5}, r"dropout must be in \[0, 1\)"),
                          ({"rank": 8, "alpha": 16, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
                          ({"rank": 8, "alpha": 16, "dropout": -0.1}, "dropout")]:
        with pytest.raises(nl.ConfigError, match=match):
            nl.LoraConfig(**kwargs)
    for kwargs in [{"rank": 8.0, "alpha": 16}, {"rank": True, "alpha": 16}, {"rank": 8, "alpha": "16"},
                   {"rank": 8, "alpha": 16, "target_modules": [1]}, {"rank": 8, "alpha": 16, "use_rslora": 1}]:
        with pytest.raises(nl.DTypeError):
            nl.LoraConfig(**kwargs)
    with pytest.raises(nl.DTypeError):
        nl.LoraAdapter({"rank": 8})


def test_config_dict_roundtrip():
    cfg = nl.LoraConfig(16, 32, dropout=0.05, target_modules=("q_proj", "v_proj"), use_rslora=True)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert nl.LoraConfig.from_dict(d) == cfg
    assert nl.LoraConfig(4, 4, target_modules="q_proj").target_modules == ("q_proj",)
    with pytest.raises(nl.ConfigError, match="unknown LoraConfig keys"):
        nl.LoraConfig.from_dict({"rank": 4, "alpha": 4, "lr": 1})
    with pytest.raises(nl.ConfigError, match="needs"):
        nl.LoraConfig.from_dict({"rank": 4})


# --- adapters from tensors, several ranks, base weights attached later ------------------

def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _lora_ref(x, w, a, b, s):
    x = x.astype(np.float64)
    return x @ w.astype(np.float64).T + s * (x @ a.astype(np.float64).T) @ b.astype(np.float64).T


def _close(got, ref, rel=1e-5):
    return np.abs(np.asarray(got, np.float64) - ref).max() <= rel * np.abs(ref).max()


def test_add_lora_mixed_ranks_then_attach(rng):
    cfg = nl.LoraConfig(4, 8.0, alpha_pattern={"v": 2.0})
    ad = nl.LoraAdapter(cfg)
    tensors = {"blk.q": (_f32(rng, 4, 8), _f32(rng, 6, 4)), "blk.v": (_f32(rng, 2, 8), _f32(rng, 6, 2))}
    for name, (a, b) in tensors.items():
        ad.add_lora(name, a, b)
    q, v = ad["blk.q"], ad["blk.v"]
    assert (q.rank, q.alpha, q.scaling) == (4, 8.0, 2.0)
    assert (v.rank, v.alpha, v.scaling) == (2, 2.0, 1.0)  # alpha from alpha_pattern, own rank
    assert not ad.attached
    with pytest.raises(nl.DetachedLayerError):
        ad.forward_layer("blk.q", np.ones(8, np.float32))
    weights = {"blk.q": _f32(rng, 6, 8), "blk.v": _f32(rng, 6, 8)}
    # every weight is checked before any is attached
    with pytest.raises(nl.ShapeError, match=r"layer 'blk.v': expected weight of shape"):
        ad.attach({"blk.q": weights["blk.q"], "blk.v": _f32(rng, 6, 7)})
    assert not q.attached
    with pytest.raises(nl.LayerNotFoundError, match="no base weight for LoRA layer 'blk.v'"):
        ad.attach({"blk.q": weights["blk.q"]})
    with pytest.raises(nl.DTypeError, match="mapping"):
        ad.attach([weights["blk.q"]])
    biases = {"blk.q": _f32(rng, 6)}
    ad.attach(weights.__getitem__, biases)
    assert ad.attached and v.bias is None and np.array_equal(q.bias, biases["blk.q"])
    x = _f32(rng, 3, 8)
    ref_q = _lora_ref(x, weights["blk.q"], *tensors["blk.q"], 2.0) + biases["blk.q"]
    assert _close(ad.forward_layer("blk.q", x), ref_q)
    assert _close(ad.forward_layer("blk.v", x), _lora_ref(x, weights["blk.v"], *tensors["blk.v"], 1.0))
    s = ad.summary()
    assert s.total_trainable == 4 * 14 + 2 * 14 and s.rank == 4
    ad.merge_all()
    with pytest.raises(nl.MergeStateError, match="layer 'blk.q' is merged"):
        ad.attach(weights)
    ad.unmerge_all()
    assert np.array_equal(q.weight, weights["blk.q"])


def test_add_lora_follows_the_config_switches(rng):
    a, b, w = _f32(rng, 2, 5), _f32(rng, 4, 2), _f32(rng, 4, 5)
    plain = nl.LoraAdapter(nl.LoraConfig(2, 4.0))
    with pytest.raises(nl.ConfigError, match="use_dora=False"):
        plain.add_lora("x", a, b, magnitude=np.ones(4, np.float32))
    with pytest.raises(nl.ConfigError, match="lora_bias=False"):
        plain.add_lora("x", a, b, lora_bias=np.ones(4, np.float32))
    with pytest.raises(nl.ConfigError, match="with weight"):
        plain.add_lora("x", a, b, bias=np.ones(4, np.float32))
    dora = nl.LoraAdapter(nl.LoraConfig(2, 4.0, use_dora=True))
    with pytest.raises(nl.ConfigError, match="give its magnitude"):
        dora.add_lora("x", a, b)
    layer = dora.add_lora("x", a, b, weight=w)  # magnitude from W + s B A, as PEFT initialises it
    x = _f32(rng, 3, 5)
    assert _close(layer.forward(x), _lora_ref(x, w, a, b, 2.0))
    fresh = dora.add_layer("y", w)  # B = 0: magnitude = row norms of W, output = base output
    assert fresh.use_dora and _close(fresh.forward(x), x.astype(np.float64) @ w.T.astype(np.float64))
    biased = nl.LoraAdapter(nl.LoraConfig(2, 4.0, lora_bias=True)).add_lora("x", a, b)
    assert np.array_equal(biased.lora_bias, np.zeros(4, np.float32))


def test_config_patterns_follow_peft_matching():
    cfg = nl.LoraConfig(8, 16.0, rank_pattern={r"layers\.0\.q": 2, "q": 4, "fc.*": 6},
                        alpha_pattern={"^top": 1.0, "v": 3})
    # the first key that matches the whole path or a dotted suffix of it wins
    assert cfg.rank_for("layers.0.q") == 2
    assert cfg.rank_for("layers.1.q") == 4
    assert cfg.rank_for("model.layers.0.q") == 2
    assert cfg.rank_for("layers.0.xq") == 8  # "q" is not a dotted suffix of "xq"
    assert cfg.rank_for("layers.3.fc1") == 6
    assert cfg.alpha_for("top") == 1.0 and cfg.alpha_for("a.top") == 16.0  # "^" anchors at the path start
    assert cfg.alpha_for("a.v") == 3.0 and cfg.scaling_for("a.v") == 3.0 / 8
    assert nl.LoraConfig(8, 16, target_modules=["q", "mlp.fc1"]).targets("layers.0.mlp.fc1")
    assert not nl.LoraConfig(8, 16, target_modules=["q"]).targets("layers.0.xq")
    ad = nl.LoraAdapter(cfg)
    assert ad.add_layer("layers.0.q", make_weight(16, 8)).rank == 2


def test_config_new_fields_validate_and_round_trip():
    cfg = nl.LoraConfig(16, 32, dropout=0.1, target_modules=("q", "v"), rank_pattern={"q": 4},
                        alpha_pattern={"v": 8}, use_dora=True, base_model_name_or_path="m", task_type="CAUSAL_LM")
    assert nl.LoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert hash(cfg) == hash(nl.LoraConfig.from_dict(cfg.to_dict()))
    with pytest.raises(TypeError):
        cfg.rank_pattern["v"] = 2  # read-only
    peft = json.loads(json.dumps(cfg.to_peft()))
    assert peft["peft_type"] == "LORA" and peft["r"] == 16 and peft["lora_alpha"] == 32
    assert nl.LoraConfig.from_peft(peft) == cfg
    regex = nl.LoraConfig.from_peft({"peft_type": "LORA", "target_modules": r".*\.(q|v)"})
    assert regex.target_regex == r".*\.(q|v)" and regex.targets("a.q") and not regex.targets("a.k")
    assert nl.LoraConfig.from_peft(regex.to_peft()) == regex
    for kwargs, err, match in [
        ({"rank_pattern": {"q": 0}}, nl.ConfigError, r"rank_pattern\['q'\]: LoRA rank must be > 0"),
        ({"rank_pattern": {"q": 2.5}}, nl.DTypeError, "must be an integer"),
        ({"alpha_pattern": {"(": 2}}, nl.ConfigError, "not a valid regular expression"),
        ({"alpha_pattern": {"q": -1}}, nl.ConfigError, "alpha must be > 0"),
        ({"use_dora": True, "lora_bias": True}, nl.ConfigError, "not supported together"),
        ({"use_dora": 1}, nl.DTypeError, "True or False"),
        ({"rank_pattern": [("q", 2)]}, nl.DTypeError, "dict"),
    ]:
        with pytest.raises(err, match=match):
            nl.LoraConfig(8, 8, **kwargs)


def test_config_from_peft_defaults_warnings_and_refusals():
    d = nl.LoraConfig.from_peft({"peft_type": "LORA"})
    assert (d.rank, d.alpha, d.dropout, d.fan_in_fan_out, d.use_rslora, d.use_dora, d.lora_bias) == \
        (8, 8.0, 0.0, False, False, False, False)
    assert dict(d.rank_pattern) == {} and d.target_modules == () and d.target_regex is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's own keys are known: no warning
        nl.LoraConfig.from_peft({"peft_type": "LORA", "inference_mode": True, "layers_pattern": None,
                                 "init_lora_weights": "gaussian", "rank_pattern": None, "revision": None})
    with pytest.warns(UserWarning, match=r"x\.json: ignoring keys numlora does not know: \['shiny_new_option'\]"):
        nl.LoraConfig.from_peft({"peft_type": "LORA", "shiny_new_option": 3}, source="x.json")
    with pytest.warns(UserWarning, match="modules_to_save"):
        nl.LoraConfig.from_peft({"peft_type": "LORA", "modules_to_save": ["classifier"]})
    for data, match in [({"peft_type": "IA3"}, "expected peft_type 'LORA', got peft_type 'IA3'"),
                        ({"r": 8}, "expected peft_type 'LORA', got no peft_type"),
                        ({"peft_type": "LORA", "bias": "all"}, "bias='all' is not supported"),
                        ({"peft_type": "LORA", "use_qalora": True}, "use_qalora=True is not supported"),
                        ({"peft_type": "LORA", "layer_replication": [[0, 2]]}, "layer_replication"),
                        ({"peft_type": "LORA", "r": 0}, "rank must be > 0"),
                        ({"peft_type": "LORA", "lora_alpha": 0}, "alpha must be > 0")]:
        with pytest.raises(nl.ConfigError, match=match):
            nl.LoraConfig.from_peft(data)
    with pytest.raises(nl.DTypeError, match="target_modules"):
        nl.LoraConfig.from_peft({"peft_type": "LORA", "target_modules": 3})


def test_layers_get_the_config_dropout_with_a_seed_per_name():
    rng = np.random.default_rng(3)
    cfg = nl.LoraConfig(rank=2, alpha=4.0, dropout=0.25)
    ad = nl.LoraAdapter(cfg)
    w = rng.standard_normal((6, 8)).astype(np.float32)
    a = ad.add_layer("x.q", w)
    b = ad.add_lora("x.v", np.ones((2, 8), np.float32), np.ones((6, 2), np.float32))
    assert a.dropout == 0.25 and b.dropout == 0.25
    assert a.dropout_seed != b.dropout_seed
    ad2 = nl.LoraAdapter(cfg)
    assert ad2.add_layer("x.q", w).dropout_seed == a.dropout_seed  # stable across adapters and runs
