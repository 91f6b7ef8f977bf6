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
    with pytest.raises(nl.LayerNotFoundError, match="'nonexistent' not found; known layers: 'q_proj', 'k_proj', 'v_proj'"):
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
