"""``numlora bench --pipeline``: numlora's kernels inside a real program, not alone.

The other tables time each kernel with a pause and a warm-up call before every timed
call. A model does not pause: it alternates numpy's BLAS products, element-wise numpy
and numlora kernels. This benchmark runs one transformer-block-shaped model (``Block``)
written in numpy with numlora layers, pass after pass with no pause, and times every step
inside it:

- forward (inference): layer norm, q = ``QLoraLinear`` (NF4 base), k = a numpy product
  with a frozen weight, v = ``LoraLinear``, causal softmax attention over the batch rows
  (numpy products per head), output projection (numpy), residual, layer norm, up =
  ``QLoraLinear`` (d -> ff), GELU (numpy), down = a ``LoraBank`` layer (ff -> d, each row
  its adapter, Zipf popularity), residual;
- a training step: the same block in training mode with down = ``QLoraLinear``, then the
  backward pass (numpy for the norms, GELU, attention and frozen products; the layers'
  ``backward`` for the LoRA ones) and one ``AdamW`` step over every LoRA factor.

Reported, per batch size: each numlora call's median time inside the pipeline against
its isolated time (the harness's method: pause, warm-up call, timed calls) with the
memory the rest of a pass reads read before each timed call; each numpy product's time inside the pipeline
against the same product in a phase of the same program that skips the numlora calls
and reads their memory instead (numpy next to numpy only, the caches as in the
program); and the whole pass against the same model built with torch + PEFT +
bitsandbytes (skipped, with a note, when they are not installed). Phases alternate in
rounds so drift hits them alike.

Why cache-matched references: where a pass reads more than the last-level cache holds
(the default model reads ~30 MiB of weights per pass), every weight comes from main
memory inside the program, and a product timed warm (its weight left in cache by the
previous call) is 3-4x faster at batch 1 for that reason alone, numpy's as much as
numlora's. The warm references are reported beside them, so both effects stay visible:
threads fighting for the cores (the ratio to the cache-matched reference) and the caches.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from . import harness, inputs

#: Model sizes of the documented run and of ``--quick``.
D_MODEL, D_FF, HEADS, N_ADAPTERS = 1024, 4096, 8, 4
QUICK = dict(d_model=256, d_ff=1024, heads=4, batches=(1, 8), repeat=3, passes=4)
#: Pause between phases (s): each phase starts without another phase's spinning threads.
PHASE_PAUSE_S = 0.2
#: Pause before an isolated call's warm-up (the main table's pause).
ISOLATED_PAUSE_S = 0.12
LR = 1e-4


def layer_norm(x):
    """(x - mean) / sqrt(var + 1e-5) per row (no affine: the block's norms are frozen)."""
    mu = x.mean(axis=1, keepdims=True)
    xc = x - mu
    inv = 1.0 / np.sqrt((xc * xc).mean(axis=1, keepdims=True) + np.float32(1e-5))
    return (xc * inv).astype(np.float32, copy=False), inv


def layer_norm_backward(xhat, inv, g):
    """dL/dx of :func:`layer_norm` given dL/dy."""
    return (inv * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))).astype(
        np.float32, copy=False)


_C = np.float32(math.sqrt(2.0 / math.pi))


def gelu(x):
    """GELU, tanh approximation (as torch's ``approximate="tanh"``)."""
    t = np.tanh(_C * (x + np.float32(0.044715) * x * x * x))
    return np.float32(0.5) * x * (np.float32(1) + t), t


def gelu_backward(x, t, g):
    dt = (np.float32(1) - t * t) * _C * (np.float32(1) + np.float32(3 * 0.044715) * x * x)
    return g * (np.float32(0.5) * (np.float32(1) + t) + np.float32(0.5) * x * dt)


def causal_softmax(s):
    """Row softmax of (heads, n, n) scores with a causal mask, in place."""
    rows, cols = np.triu_indices(s.shape[-1], 1)
    s[:, rows, cols] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


@dataclass
class Sizes:
    d_model: int = D_MODEL
    d_ff: int = D_FF
    heads: int = HEADS
    rank: int = inputs.RANK
    n_adapters: int = N_ADAPTERS
    #: The QLoraLinear layers' compute dtype (``numlora bench --pipeline --compute-dtype``).
    compute_dtype: str = "float32"

    @property
    def alpha(self) -> float:
        return inputs.SCALING * self.rank


def _weights(sz: Sizes):
    """The block's float32 weights and LoRA factors (fixed seeds, shared with the torch
    twin): name -> (weight (out, in), A, B)."""
    d, ff = sz.d_model, sz.d_ff
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "up": (ff, d), "down": (d, ff)}
    out = {}
    for i, (name, (o, n)) in enumerate(shapes.items()):
        g = inputs.rng(100 + i)
        w = g.standard_normal((o, n), dtype=np.float32) * np.float32(1 / math.sqrt(n))
        a = g.standard_normal((sz.rank, n), dtype=np.float32) * np.float32(0.01)
        b = g.standard_normal((o, sz.rank), dtype=np.float32) * np.float32(0.01)
        out[name] = (w, a, b)
    return out


def arrays_of(objs, depth: int = 4) -> list:
    """Every numpy array (its owning base, once) reachable from ``objs`` through
    attributes, lists, tuples and dicts, ``depth`` levels deep."""
    seen, out = set(), []

    def walk(o, level):
        if isinstance(o, np.ndarray):
            while isinstance(o.base, np.ndarray):
                o = o.base
            if id(o) not in seen:
                seen.add(id(o))
                out.append(o)
            return
        if level == 0 or o is None or isinstance(o, (str, bytes, int, float, bool)) or callable(o) and \
                not hasattr(o, "__dict__"):
            return
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, dict):
            items = o.values()
        elif isinstance(o, (list, tuple)):
            items = o
        else:
            items = list(getattr(o, "__dict__", {}).values())
            items += [getattr(o, k, None) for k in getattr(type(o), "__slots__", ())]
        for v in items:
            walk(v, level - 1)

    for o in objs:
        walk(o, depth)
    return out


def touch(arrays) -> None:
    """Read one element of every 64-byte line of each array (numpy, one thread): their
    bytes come into the caches as a kernel's reading them would bring them."""
    for a in arrays:
        if a.size and a.flags.c_contiguous:
            a.reshape(-1)[:: max(1, 64 // a.itemsize)].max()


def _l3_bytes() -> int:
    """The last-level cache's size (0 when the system does not say)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip().upper()
        return int(text[:-1]) * {"K": 2 ** 10, "M": 2 ** 20}[text[-1]] if text[-1] in "KM" else int(text)
    except (OSError, ValueError, KeyError, IndexError):
        return 0


class Block:
    """The numpy + numlora model. Every step goes through :meth:`_step`, which times it
    and remembers its last arguments (for the isolated replay); with ``skip_numlora`` the
    numlora steps are skipped (their last outputs reused), leaving numpy next to numpy."""

    NUMLORA, PRODUCT, NUMPY = "numlora", "numpy product", "numpy"

    def __init__(self, sz: Sizes, batch: int):
        import numlora as nl

        self.sz, self.n = sz, batch
        W = _weights(sz)
        self.w = W
        alpha = sz.alpha
        d, ff = sz.d_model, sz.d_ff
        cd = sz.compute_dtype
        self.q = nl.QLoraLinear(nl.quantize_nf4(W["q"][0]), W["q"][1], W["q"][2], alpha, compute_dtype=cd)
        self.v = nl.LoraLinear(W["v"][0], W["v"][1], W["v"][2], alpha)
        self.up = nl.QLoraLinear(nl.quantize_nf4(W["up"][0]), W["up"][1], W["up"][2], alpha, compute_dtype=cd)
        self.down_t = nl.QLoraLinear(nl.quantize_nf4(W["down"][0]), W["down"][1], W["down"][2], alpha,
                                     compute_dtype=cd)
        self.wk, self.wo = W["k"][0], W["o"][0]
        self.bank = nl.LoraBank(W["down"][0])
        for k in range(sz.n_adapters):
            a, b = bank_factors(sz, k)
            self.bank.add(f"a{k}", a, b, scaling=inputs.SCALING)
        self.ids = inputs.workload("zipf", batch, sz.n_adapters)
        self.layers = [self.q, self.v, self.up, self.down_t]
        self.opt = nl.AdamW([p for lay in self.layers for p in lay.parameters()], lr=LR)
        self.x = inputs.activations(batch, d, stream=7)
        self.g = inputs.activations(batch, d, stream=8) / np.float32(batch)
        self.qb, self.vb = np.empty((batch, d), np.float32), np.empty((batch, d), np.float32)
        self.kb, self.ob = np.empty((batch, d), np.float32), np.empty((batch, d), np.float32)
        self.fb, self.db = np.empty((batch, ff), np.float32), np.empty((batch, d), np.float32)
        self.times = defaultdict(list)
        self.kinds, self.replay, self.last = {}, {}, {}
        self.skip_numlora = False  # or "skip", or "touch" (see _step)
        self._footprints = {}
        self.training = False

    def _step(self, name, kind, fn, *args, prep=None):
        self.kinds[name] = kind
        self.replay[name] = (fn, args, prep)
        if kind == self.NUMLORA and self.skip_numlora:
            if self.skip_numlora == "touch":  # the step's memory read instead: the caches as in the program
                touch(self.footprint(name))
            return self.last[name]
        t0 = time.perf_counter()
        r = fn(*args)
        self.times[name].append(time.perf_counter() - t0)
        if kind == self.NUMLORA:
            self.last[name] = r
        return r

    def others(self, name):
        """The arrays the rest of a pass reads (every other step's footprint, the numpy
        products' operands): read before an isolated call of ``name``, they leave the
        caches as the program leaves them for it."""
        key = ("others", name, self.training)
        if key not in self._footprints:
            mine = {id(a) for a in self.footprint(name)}
            objs = [self.footprint(k) if kind == self.NUMLORA else self.replay[k][1]
                    for k, kind in self.kinds.items() if k != name and kind != self.NUMPY]
            self._footprints[key] = [a for a in arrays_of(objs) if id(a) not in mine]
        return self._footprints[key]

    def footprint(self, name):
        """The arrays a numlora step reads: those of its layer (or optimizer) and its
        arguments (collected once per step)."""
        if name not in self._footprints:
            fn, args, _ = self.replay[name]
            self._footprints[name] = arrays_of((getattr(fn, "__self__", None),) + tuple(args))
        return self._footprints[name]

    def train(self, mode: bool):
        self.training = mode
        for lay in self.layers:
            lay.train(mode)

    # -- the model --------------------------------------------------------------------------
    def forward(self):
        S, H = self._step, self.sz.heads
        n, d = self.n, self.sz.d_model
        dh = d // H
        x = self.x
        h, inv1 = S("layer norm 1", self.NUMPY, layer_norm, x)
        q = S("q: QLoraLinear", self.NUMLORA, self.q.forward, h, self.qb)
        k = S("k: x @ Wk.T", self.PRODUCT, np.dot, h, self.wk.T, self.kb)
        v = S("v: LoraLinear", self.NUMLORA, self.v.forward, h, self.vb)
        qh, kh, vh = (t.reshape(n, H, dh).transpose(1, 0, 2) for t in (q, k, v))
        s = S("attention q @ k.T", self.PRODUCT, np.matmul, qh, kh.transpose(0, 2, 1))
        s *= np.float32(1 / math.sqrt(dh))
        p = S("softmax", self.NUMPY, causal_softmax, s)
        ctx = S("attention p @ v", self.PRODUCT, np.matmul, p, vh)
        ctx2 = np.ascontiguousarray(ctx.transpose(1, 0, 2)).reshape(n, d)
        o = S("o: x @ Wo.T", self.PRODUCT, np.dot, ctx2, self.wo.T, self.ob)
        x1 = x + o
        h2, inv2 = S("layer norm 2", self.NUMPY, layer_norm, x1)
        f = S("up: QLoraLinear", self.NUMLORA, self.up.forward, h2, self.fb)
        gl, t = S("GELU", self.NUMPY, gelu, f)
        if self.training:
            dn = S("down: QLoraLinear", self.NUMLORA, self.down_t.forward, gl, self.db)
        else:
            dn = S("down: LoraBank", self.NUMLORA, self.bank.forward, gl, self.ids, None, self.db)
        self.saved = (x, h, inv1, qh, kh, vh, p, ctx2, x1, h2, inv2, f, t)
        return x1 + dn

    def backward(self):
        S, H = self._step, self.sz.heads
        n, d = self.n, self.sz.d_model
        dh = d // H
        x, h, inv1, qh, kh, vh, p, ctx2, x1, h2, inv2, f, t = self.saved
        g = self.g
        fw = self._refresh  # a backward frees what its forward kept: the replay runs the forward first
        dgl = S("down.backward", self.NUMLORA, self.down_t.backward, g, prep=fw(self.down_t, self.db))
        df = S("GELU backward", self.NUMPY, gelu_backward, f, t, dgl)
        dh2 = S("up.backward", self.NUMLORA, self.up.backward, df, prep=fw(self.up, self.fb))
        dx1 = g + S("layer norm 2 backward", self.NUMPY, layer_norm_backward, h2, inv2, dh2)
        dctx = S("dctx = g @ Wo", self.PRODUCT, np.dot, dx1, self.wo)
        dch = dctx.reshape(n, H, dh).transpose(1, 0, 2)
        dp = S("attention dP = dctx @ v.T", self.PRODUCT, np.matmul, dch, vh.transpose(0, 2, 1))
        dv = S("attention dV = P.T @ dctx", self.PRODUCT, np.matmul, p.transpose(0, 2, 1), dch)
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * np.float32(1 / math.sqrt(dh))
        dq = S("attention dQ = dS @ k", self.PRODUCT, np.matmul, ds, kh)
        dk = S("attention dK = dS.T @ q", self.PRODUCT, np.matmul, ds.transpose(0, 2, 1), qh)

        def flat(a):
            return np.ascontiguousarray(a.transpose(1, 0, 2)).reshape(n, d)

        dq, dk, dv = flat(dq), flat(dk), flat(dv)
        dhq = S("q.backward", self.NUMLORA, self.q.backward, dq, prep=fw(self.q, self.qb))
        dhv = S("v.backward", self.NUMLORA, self.v.backward, dv, prep=fw(self.v, self.vb))
        dhk = S("dh = dK @ Wk", self.PRODUCT, np.dot, dk, self.wk)
        dx = dx1 + S("layer norm 1 backward", self.NUMPY, layer_norm_backward, h, inv1, dhq + dhv + dhk)
        S("AdamW step", self.NUMLORA, self.opt.step)
        S("zero_grad", self.NUMLORA, self.opt.zero_grad)
        return dx

    def _refresh(self, layer, out):
        """For the isolated replay of ``layer.backward``: the training forward it needs
        (untimed), on the input the pipeline gave it last."""
        x_of = {id(self.q): 0, id(self.v): 0, id(self.up): 1, id(self.down_t): 2}

        def prep():
            xs = (self.saved[1], self.saved[9], gelu(self.saved[11])[0])
            layer.forward(xs[x_of[id(layer)]], out)

        return prep

    def step(self):
        y = self.forward()
        if self.training:
            self.backward()
        return y


def bank_factors(sz: Sizes, k: int):
    """The k-th adapter of the block's bank layer (rank ``sz.rank``)."""
    g = inputs.rng(200 + k)
    a = g.standard_normal((sz.rank, sz.d_ff), dtype=np.float32) * np.float32(0.01)
    b = g.standard_normal((sz.d_model, sz.rank), dtype=np.float32) * np.float32(0.01)
    return a, b


# -- the torch + PEFT + bitsandbytes twin ------------------------------------------------------
def torch_block(sz: Sizes, batch: int, notes: list):
    """The same block with torch + PEFT (+ bitsandbytes ``Linear4bit`` nf4, float32 compute,
    for the NF4 layers); ``(forward, train_step)`` callables, or None with a note."""
    try:
        import torch
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        notes.append(f"torch / PEFT not installed ({exc}): no torch + PEFT + bitsandbytes column")
        return None
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        notes.append(f"bitsandbytes not installed ({exc}): no torch + PEFT + bitsandbytes column")
        return None
    W = _weights(sz)
    d, H = sz.d_model, sz.heads
    F = torch.nn.functional

    def linear(name, nf4):
        w = torch.from_numpy(W[name][0].copy())
        if nf4:
            lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.float32, quant_type="nf4")
            lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=inputs.BLOCKSIZE)
            return lin.to("cpu")
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        lin.weight.requires_grad_(False)
        return lin

    class TBlock(torch.nn.Module):
        def __init__(self, down_nf4):
            super().__init__()
            self.q, self.k, self.v = linear("q", True), linear("k", False), linear("v", False)
            self.o, self.up, self.down = linear("o", False), linear("up", True), linear("down", down_nf4)

        def forward(self, x, names=None):
            n = x.shape[0]
            h = F.layer_norm(x, (d,))
            q, k, v = self.q(h), self.k(h), self.v(h)
            q, k, v = (t.view(n, H, d // H).transpose(0, 1) for t in (q, k, v))
            s = q @ k.transpose(1, 2) / math.sqrt(d // H)
            s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
            ctx = (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(n, d)
            x1 = x + self.o(ctx)
            f = F.gelu(self.up(F.layer_norm(x1, (d,))), approximate="tanh")
            dn = self.down(f) if names is None else self.down(f, adapter_names=names)
            return x1 + dn

    def peft(model, targets):
        cfg = LoraConfig(r=sz.rank, lora_alpha=sz.alpha, target_modules=targets, lora_dropout=0.0)
        pm = get_peft_model(model, cfg)
        inner = pm.base_model.model
        with torch.no_grad():
            for name in targets:
                inner.get_submodule(name).lora_A["default"].weight.copy_(torch.from_numpy(W[name][1]))
                inner.get_submodule(name).lora_B["default"].weight.copy_(torch.from_numpy(W[name][2]))
        return pm, inner

    try:
        torch.manual_seed(0)
        # inference: down is a dense layer carrying the bank's adapters, mixed batch by name
        pm_inf, inf = peft(TBlock(False), ["q", "v", "up"])
        for k in range(sz.n_adapters):
            a, b = bank_factors(sz, k)
            pm_inf.add_adapter(f"a{k}", LoraConfig(r=sz.rank, lora_alpha=sz.alpha, target_modules=["down"],
                                                   lora_dropout=0.0))
            with torch.no_grad():
                inf.down.lora_A[f"a{k}"].weight.copy_(torch.from_numpy(a))
                inf.down.lora_B[f"a{k}"].weight.copy_(torch.from_numpy(b))
        pm_inf.set_adapter("default")
        pm_inf.eval()
        ids = inputs.workload("zipf", batch, sz.n_adapters)
        names = [f"a{k}" for k in ids]
        x = torch.from_numpy(inputs.activations(batch, d, stream=7))

        def fwd():
            with torch.no_grad():
                return inf(x, names)

        # training: down is a QLoRA layer, as in the numpy block
        pm_tr, tr = peft(TBlock(True), ["q", "v", "up", "down"])
        pm_tr.train()
        xt = x.clone().requires_grad_(True)
        g = torch.from_numpy(inputs.activations(batch, d, stream=8) / np.float32(batch))
        opt = torch.optim.AdamW([p for p in pm_tr.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)

        def train_step():
            opt.zero_grad(set_to_none=False)
            xt.grad = None
            y = tr(xt)
            y.backward(g)
            opt.step()

        return fwd, train_step
    except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
        notes.append(f"torch + PEFT + bitsandbytes block unavailable: {exc!r}")
        return None


# -- timing --------------------------------------------------------------------------------------
def _isolated(fn, args, prep, repeat, cold=None):
    """The harness's isolated method for one step: pause, warm-up call, timed calls; an
    untimed ``prep`` before each call when the step needs one, and an untimed ``cold()``
    right before each timed call when given."""
    t = harness.Timing()
    for _ in range(repeat):
        time.sleep(ISOLATED_PAUSE_S)
        if prep:
            prep()
        fn(*args)
        for _ in range(3):
            if prep:
                prep()
            if cold:
                cold()
            t0 = time.perf_counter()
            fn(*args)
            t.samples.append(time.perf_counter() - t0)
    return t


def _phase(fn, passes, pause=PHASE_PAUSE_S):
    """``passes`` calls of ``fn`` back to back after a pause and one untimed pass; the
    wall time of each pass."""
    time.sleep(pause)
    fn()
    out = []
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _block_phase(blk, passes, skip_numlora=False):
    """A :func:`_phase` of the block (numlora steps skipped or not): the pass times and
    the per-step times of the timed passes (not the untimed first one)."""
    blk.skip_numlora = skip_numlora
    blk.times.clear()
    first = [True]

    def one():
        if first[0]:  # the untimed pass: its step times go too
            first[0] = False
            blk.step()
            blk.times.clear()
        else:
            blk.step()

    walls = _phase(one, passes)
    steps = {k: list(v) for k, v in blk.times.items()}
    blk.times.clear()
    blk.skip_numlora = False
    return walls, steps


def run_batch(sz: Sizes, batch: int, repeat: int = 5, passes: int = 8, peers: bool = True):
    """Time the block at one batch size (see the module docstring). Returns a dict: per
    mode (``forward`` / ``train``) the per-step rows and the pass totals."""
    notes: list = []
    blk = Block(sz, batch)
    tw = torch_block(sz, batch, notes) if peers else None
    result = {"batch": batch, "notes": notes}
    blk.step()
    names = [k for k, kind in blk.kinds.items() if kind == Block.NUMLORA]
    read = arrays_of([blk.footprint(k) for k in names] + [blk.wk, blk.wo])
    result["pass_mib"] = sum(a.nbytes for a in read) / 2 ** 20
    if tw is not None:  # before the training phase changes the numlora block's factors
        result["agreement"] = _agreement(blk, tw)
    for mode in ("forward", "train"):
        blk.train(mode == "train")
        blk.step()  # compile, fill the buffers
        blk.times.clear()
        totals = defaultdict(list)
        inside, without, touched = defaultdict(list), defaultdict(list), defaultdict(list)
        for _ in range(repeat):
            walls, steps = _block_phase(blk, passes)
            totals["numlora pipeline"] += walls
            for k, v in steps.items():
                inside[k] += v
            for k, v in _block_phase(blk, passes, skip_numlora="skip")[1].items():
                without[k] += v
            for k, v in _block_phase(blk, passes, skip_numlora="touch")[1].items():
                touched[k] += v
            if tw is not None:
                totals["torch + PEFT + bitsandbytes"] += _phase(tw[0] if mode == "forward" else tw[1], passes)
        rows = []
        for name, samples in inside.items():
            kind = blk.kinds[name]
            if kind == Block.NUMLORA:
                fn, args, prep = blk.replay[name]
                warm = _isolated(fn, args, prep, max(2, repeat // 2)).samples
                others = blk.others(name)
                ref = _isolated(fn, args, prep, max(2, repeat // 2), cold=lambda o=others: touch(o)).samples
                ref_label, goal = "isolated, the pass's other memory read before", 1.25
            elif kind == Block.PRODUCT:
                warm = without.get(name, [])
                ref, ref_label, goal = touched.get(name, []), "without numlora, its memory read", 1.1
            else:
                continue

            def med(v):
                return float(np.median(v)) * 1e3 if v else float("nan")

            med_in, med_ref, med_warm = med(samples), med(ref), med(warm)
            rows.append({"step": name, "kind": kind, "inside_ms": med_in, "reference": ref_label,
                         "reference_ms": med_ref, "ratio": med_in / med_ref, "goal": goal,
                         "warm_reference_ms": med_warm, "warm_ratio": med_in / med_warm})
        tot = {k: float(np.median(v)) * 1e3 for k, v in totals.items()}
        result[mode] = {"rows": rows, "totals_ms": tot}
    return result


def _agreement(blk: Block, tw) -> float:
    """Largest difference of the forward outputs, numlora block against the torch one,
    relative to the largest output (both computed in float32 from the same NF4 codes)."""
    blk.train(False)
    blk.skip_numlora = False
    y = blk.forward()
    yt = tw[0]().numpy()
    return float(np.abs(y - yt).max() / np.abs(yt).max())


def to_markdown(res: dict) -> str:
    b = res["batch"]
    lines = [f"### batch {b}", ""]
    for mode, label in (("forward", "forward (inference)"), ("train", "training step")):
        r = res[mode]
        lines += [f"**{label}**", "",
                  "| step | kind | inside the pipeline ms | reference | reference ms | ratio | goal | "
                  "warm reference ms | ratio to it |",
                  "|---|---|---:|---|---:|---:|---|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {row['step']} | {row['kind']} | {row['inside_ms']:.3f} | {row['reference']} | "
                         f"{row['reference_ms']:.3f} | {row['ratio']:.2f}x | <= {row['goal']}x | "
                         f"{row['warm_reference_ms']:.3f} | {row['warm_ratio']:.2f}x |")
        tot = r["totals_ms"]
        ours = tot["numlora pipeline"]
        line = f"\nwhole pass: numpy + numlora {ours:.2f} ms"
        if "torch + PEFT + bitsandbytes" in tot:
            theirs = tot["torch + PEFT + bitsandbytes"]
            line += f"; torch + PEFT + bitsandbytes {theirs:.2f} ms (ratio {ours / theirs:.2f}x, goal < 1x)"
        lines += [line, ""]
    if "agreement" in res:
        lines.append(f"forward agreement with the torch block (max abs diff / max abs output): "
                     f"{res['agreement']:.1e}\n")
    return "\n".join(lines)


def main(args) -> int:
    """``numlora bench --pipeline``: print the tables (and write --json)."""
    quick = getattr(args, "quick", False)
    if quick:
        sz = Sizes(QUICK["d_model"], QUICK["d_ff"], QUICK["heads"], rank=args.rank)
    elif args.size == 4096:  # the main table's default side: the block's documented sizes
        sz = Sizes(rank=args.rank)
    else:  # --size SIZE: d_model SIZE, d_ff 4 SIZE
        sz = Sizes(args.size, 4 * args.size, HEADS if args.size % HEADS == 0 else 1, rank=args.rank)
    sz.compute_dtype = getattr(args, "compute_dtype", None) or "float32"
    batches = tuple(args.batch) if args.batch else (QUICK["batches"] if quick else (1, 8, 128))
    repeat = min(args.repeat, QUICK["repeat"]) if quick else args.repeat
    passes = QUICK["passes"] if quick else 8
    peers = not args.no_peers
    results = []
    for b in batches:
        harness.progress(f"  pipeline, batch {b} ...")
        results.append(run_batch(sz, b, repeat=repeat, passes=passes, peers=peers))
    date = time.strftime("%Y-%m-%d")
    mach = harness.machine()
    print(f"numlora bench --pipeline, {date}: a transformer block (d_model {sz.d_model}, d_ff {sz.d_ff}, "
          f"{sz.heads} heads, rank {sz.rank}, {sz.n_adapters} bank adapters, QLoraLinear compute dtype "
          f"{sz.compute_dtype}), {repeat} rounds x {passes} passes "
          f"back to back per phase; medians\n\nMachine: {mach}\n")
    l3 = _l3_bytes()
    print("Reference of a numlora call: the same call isolated (pause, warm-up, timed calls), with what the "
          "rest of a pass reads read before each timed call (untimed, numpy, one thread); of a numpy product: "
          "the same product in a phase of the program that skips the numlora calls and reads their memory "
          "instead. So the caches are as the program leaves them. Warm references: isolated without the "
          "reads; the phase that skips the numlora calls and reads nothing (weights left in cache). A pass "
          f"reads {results[0]['pass_mib']:.0f} MiB"
          + (f"; the last-level cache holds {l3 / 2 ** 20:.0f} MiB.\n" if l3 else ".\n"))
    notes = []
    for res in results:
        print(to_markdown(res))
        notes += [n for n in res["notes"] if n not in notes]
    for n in notes:
        print(f"note: {n}")
    if args.json:
        from ..io import write_text_atomic

        write_text_atomic(args.json, json.dumps({"machine": mach, "date": date, "sizes": sz.__dict__,
                                                 "repeat": repeat, "passes": passes, "results": results},
                                                indent=2))
        print(f"\nwrote {args.json}")
    return 0
