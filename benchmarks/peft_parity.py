"""PEFT parity table: for each PEFT LoRA layer type and init method, whether numlora has it
and the largest difference against PEFT on the same inputs.

    python benchmarks/peft_parity.py [--json PATH]

Layer types: a small torch model per case is wrapped by ``peft.get_peft_model``, its LoRA
parameters set to random values, saved with ``save_pretrained``, loaded by
``numlora.load_peft_adapter`` and attached to the same base weights; the table gives
max |numlora - PEFT| over the layer's output on random inputs, relative to max |PEFT|.
Init methods: numlora's ``init_lora`` against the A, B and residual base weight PEFT's
``get_peft_model`` computes for the same weight (a singular pair's sign is matched first).
Needs torch and peft (the ``peers`` extra).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

import numlora as nl


def _rel(ours, theirs) -> float:
    theirs = np.asarray(theirs, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def _randomize(torch, model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)


def layer_cases(torch, peft, rng):
    rows = []
    tmp = Path(tempfile.mkdtemp())

    def linear(label, **cfg):
        torch.manual_seed(0)
        base = torch.nn.Sequential()
        base.add_module("lin", torch.nn.Linear(64, 48, bias=True))
        sd = {k: v.detach().numpy().copy() for k, v in base.state_dict().items()}
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], **cfg))
        _randomize(torch, model)
        model.eval()
        x = rng.standard_normal((5, 64)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        path = tmp / label.replace(" ", "_")
        model.save_pretrained(path)
        ours = nl.load_peft_adapter(path)
        ours.attach({"lin": sd["lin.weight"]}, {"lin": sd["lin.bias"]})
        rows.append({"kind": "layer", "name": label, "numlora": "yes", "max_rel_diff": _rel(ours["lin"](x), want)})

    linear("Linear")
    linear("Linear, rsLoRA", use_rslora=True)
    linear("Linear, DoRA", use_dora=True)
    linear("Linear, LoRA bias", lora_bias=True)

    torch.manual_seed(0)
    emb = torch.nn.Sequential()
    emb.add_module("emb", torch.nn.Embedding(100, 32))
    sd = {k: v.detach().numpy().copy() for k, v in emb.state_dict().items()}
    model = peft.get_peft_model(emb, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["emb"]))
    _randomize(torch, model)
    ids = rng.integers(0, 100, (4, 9))
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(ids)).numpy()
    model.save_pretrained(tmp / "emb")
    ours = nl.load_peft_adapter(tmp / "emb")
    ours["emb"].attach(sd["emb.weight"])
    rows.append({"kind": "layer", "name": "Embedding", "numlora": "yes", "max_rel_diff": _rel(ours["emb"](ids), want)})

    for nd, label in ((1, "Conv1d"), (2, "Conv2d")):
        torch.manual_seed(0)
        conv_cls = torch.nn.Conv1d if nd == 1 else torch.nn.Conv2d
        net = torch.nn.Sequential()
        net.add_module("c", conv_cls(6, 5, 3, stride=2, padding=1))
        sd = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
        model = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c"]))
        _randomize(torch, model)
        x = rng.standard_normal((3, 6) + (11,) * nd).astype(np.float32)
        with torch.no_grad():
            want = model.eval()(torch.from_numpy(x)).numpy()
        model.save_pretrained(tmp / label)
        ours = nl.load_peft_adapter(tmp / label)
        ours["c"].attach(sd["c.weight"], sd["c.bias"], stride=2, padding=1)
        rows.append({"kind": "layer", "name": label, "numlora": "yes", "max_rel_diff": _rel(ours["c"](x), want)})
    for name in ("Conv3d", "MultiheadAttention", "ParamWrapper (nn.Parameter targets)"):
        rows.append({"kind": "layer", "name": name, "numlora": "no", "max_rel_diff": None})
    return rows


def init_cases(torch, peft, rng):
    rows = []
    w = (rng.standard_normal((48, 64)) @ np.diag(np.linspace(2, 0.01, 64))).astype(np.float32)
    for init in ("pissa", "olora"):
        base = torch.nn.Sequential()
        base.add_module("lin", torch.nn.Linear(64, 48, bias=False))
        with torch.no_grad():
            base.lin.weight.copy_(torch.from_numpy(w))
        lin = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["lin"],
                                                        init_lora_weights=init)).base_model.model.lin
        pa = lin.lora_A["default"].weight.detach().numpy()
        pb = lin.lora_B["default"].weight.detach().numpy()
        pw = lin.base_layer.weight.detach().numpy()
        a, b, res = nl.init_lora(w, 8, 16, init)
        if init == "pissa":
            sign = np.sign(np.sum(b * pb, axis=0))
            a, b = a * sign[:, None], b * sign
        diff = max(_rel(a, pa), _rel(b, pb), _rel(res, pw))
        rows.append({"kind": "init", "name": init, "numlora": "yes", "max_rel_diff": diff})
    rows += [
        {"kind": "init", "name": "True (kaiming-uniform A, zero B)", "numlora": "yes", "max_rel_diff": None,
         "note": "random: same distribution (tests/test_init.py), different draws"},
        {"kind": "init", "name": "gaussian", "numlora": "yes", "max_rel_diff": None,
         "note": "random: std 1/r as PEFT (tests/test_init.py)"},
        {"kind": "init", "name": "pissa_niter_N", "numlora": "yes", "max_rel_diff": None,
         "note": "randomized SVD: close to the full SVD (tests/test_init.py)"},
        {"kind": "init", "name": "loftq", "numlora": "yes", "max_rel_diff": None,
         "note": "PEFT's loftq_init needs CUDA / XPU: compared by its defining error reduction only"},
        {"kind": "init", "name": "eva, corda, orthogonal, mica, lora_ga", "numlora": "no", "max_rel_diff": None},
    ]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    try:
        import peft
        import torch
    except ImportError:
        print("torch / peft not installed: nothing to compare against (pip install -e '.[peers]')")
        return 0
    rng = np.random.default_rng(0)
    rows = layer_cases(torch, peft, rng) + init_cases(torch, peft, rng)
    print(f"PEFT {peft.__version__}, torch {torch.__version__}, numlora {nl.__version__}\n")
    print("| kind | PEFT feature | numlora | max relative difference |")
    print("|---|---|---|---|")
    for r in rows:
        d = f"{r['max_rel_diff']:.1e}" if r["max_rel_diff"] is not None else r.get("note", "-")
        print(f"| {r['kind']} | {r['name']} | {r['numlora']} | {d} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
