"""``numlora demo``: a real QLoRA fine-tuning run, end to end, on real data.

1. Data: the UCI handwritten digits (1797 images of 8 x 8 pixels, the copy scikit-learn
   bundles, shipped inside numlora as ``numlora/data/digits.npz``: no network, no
   scikit-learn), split once into a training and a held-out part.
2. Base model: a dense MLP ``64 -> 256 -> 256 -> 10`` (ReLU) trained in plain numpy (Adam)
   to read the digits.
3. The base is frozen and quantized to NF4 (:class:`numlora.QLoraLinear`, bitsandbytes'
   layout); only LoRA adapters on its three layers are trained, with numlora's backward
   kernels and :class:`numlora.train.AdamW`.
4. The new task: the same digits **rotated by 90 degrees** (counter-clockwise), labelled
   with their digit. The base does not solve it: it learned where the strokes of each
   digit lie, and a rotation moves every stroke elsewhere (a horizontal bar becomes a
   vertical one), so on rotated images it scores little better than chance. The adapters
   learn to read rotated digits on top of the frozen, quantized base.
5. Checks: accuracy before and after on the held-out split, the base's memory in float32
   and NF4, the time per training step, the adapter merged into dense float32 weights
   giving the same predictions, and the adapter saved as a PEFT folder and loaded back.
   Where numba compiles kernels (or reads them from its on-disk cache), the time it spends
   is measured (:class:`KernelClock`) and reported with the step that paid it.

Everything that is not a timing is deterministic for a given ``seed``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import numpy as np

#: Layer names of the MLP (used as the adapter's module names in the PEFT folder).
LAYERS = ("fc1", "fc2", "fc3")
DEFAULT_OUT = "numlora-demo-adapter"


# --- data ---------------------------------------------------------------------------------
def load_digits():
    """The 8 x 8 digits shipped with numlora (``numlora/data/digits.npz``; their provenance
    and CC BY 4.0 licence are in that folder): ``(images, labels)``, uint8 arrays of shapes
    (1797, 64) (pixels 0..16, row by row) and (1797,) (digits 0..9), equal to scikit-learn's
    ``load_digits()`` data and target."""
    from importlib.resources import files

    with files("numlora.data").joinpath("digits.npz").open("rb") as f, np.load(f) as z:
        return z["images"], z["labels"]


def load_digits_split(seed: int, test_fraction: float = 0.25):
    """The digits as float32 in [0, 1], split per class (the same share of every digit held
    out) with a generator seeded ``seed``: ``(x_train, y_train, x_test, y_test)``."""
    images, labels = load_digits()
    x = (images / 16.0).astype(np.float32)
    y = labels.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[: int(round(test_fraction * len(idx)))]] = True
    tr, te = np.flatnonzero(~test), np.flatnonzero(test)
    tr = tr[rng.permutation(len(tr))]
    return x[tr], y[tr], x[te], y[te]


def rotate90(x: np.ndarray) -> np.ndarray:
    """Each 8 x 8 image (a row of 64 pixels) rotated by 90 degrees counter-clockwise."""
    return np.ascontiguousarray(np.rot90(x.reshape(-1, 8, 8), 1, axes=(1, 2)).reshape(-1, 64))


# --- the base model, in plain numpy --------------------------------------------------------
def _softmax_xent(logits, y):
    """Mean cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(np.maximum(p[np.arange(n), y], 1e-30)).mean())
    p[np.arange(n), y] -= 1.0
    return loss, (p / n).astype(np.float32)


def mlp_forward(params, x):
    """Logits of the dense MLP ``params = [(W1, b1), (W2, b2), (W3, b3)]`` (W as (out, in))."""
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w.T + b
        if i < len(params) - 1:
            h = np.maximum(h, 0)
    return h


def train_base(x, y, seed, hidden=256, epochs=20, batch=64, lr=2e-3):
    """Train the dense MLP ``64 -> hidden -> hidden -> 10`` with Adam in numpy; returns
    ``[(W, b), ...]`` in float32, W as (out, in)."""
    rng = np.random.default_rng(seed)
    sizes = [x.shape[1], hidden, hidden, 10]
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        w = (rng.standard_normal((fan_out, fan_in)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        params.append((w, np.zeros(fan_out, np.float32)))
    flat = [p for wb in params for p in wb]
    m = [np.zeros_like(p) for p in flat]
    v = [np.zeros_like(p) for p in flat]
    b1, b2, t = 0.9, 0.999, 0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch):
            idx = order[start:start + batch]
            hs = [x[idx]]
            for i, (w, b) in enumerate(params):
                h = hs[-1] @ w.T + b
                hs.append(np.maximum(h, 0) if i < len(params) - 1 else h)
            _, g = _softmax_xent(hs[-1], y[idx])
            grads = []
            for i in range(len(params) - 1, -1, -1):
                w, _ = params[i]
                grads[:0] = [g.T @ hs[i], g.sum(axis=0)]
                if i:
                    g = (g @ w) * (hs[i] > 0)
            t += 1
            for p, gp, mp, vp in zip(flat, grads, m, v):
                mp *= b1
                mp += (1 - b1) * gp
                vp *= b2
                vp += (1 - b2) * gp * gp
                p -= (lr * (mp / (1 - b1 ** t)) / (np.sqrt(vp / (1 - b2 ** t)) + 1e-8)).astype(np.float32)
    return params


@contextlib.contextmanager
def one_thread():
    """numba kernels and BLAS on one thread for the duration (restored afterwards). The
    demo's matrices are small (a batch of 32 rows, 256 wide): a second thread buys nothing
    there, while threads that spin after each call (OpenBLAS's, numba's) slow each other and
    slow badly when other work keeps the cores busy. One thread also gives the same BLAS
    sums on any machine (numlora's kernels give the same results on any thread count), and
    with one numba thread numlora runs (and so compiles) only the serial build of each
    parallel kernel, a third to a half of the cold compile time. BLAS
    is limited through threadpoolctl where it is installed (scikit-learn brings it); without
    it, BLAS keeps its own thread count."""
    import numba

    try:
        from threadpoolctl import threadpool_limits  # optional: not a dependency of numlora
    except ImportError:  # pragma: no cover
        threadpool_limits = None
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        if threadpool_limits is None:  # pragma: no cover
            yield
        else:
            with threadpool_limits(1, "blas"):
                yield
    finally:
        numba.set_num_threads(before)


def accuracy(logits, y) -> float:
    return float((np.argmax(logits, axis=1) == y).mean())


class KernelClock:
    """What numba spends on numlora's kernels during the run, measured with numba's own
    compiler events (``numba.core.event``) rather than guessed from a slow first step:

    - ``compile``: the time inside ``"numba:compile"`` events, i.e. kernels being compiled
      (a cache miss: the first run in an environment, or ``NUMLORA_CACHE=0``);
    - ``cache``: the rest of the time the compiler lock was held (``"numba:compiler_lock"``):
      reading compiled kernels from numba's on-disk cache, or writing new ones to it.

    Nested events (a kernel compiling the functions it calls) count once. A kernel already
    compiled in this process costs neither. :meth:`lap` gives the two figures since the
    previous lap, :attr:`total` since the start."""

    _KINDS = ("numba:compiler_lock", "numba:compile")

    def __init__(self):
        import numba.core.event as ev

        class _Timer(ev.Listener):
            def __init__(self):
                self.depth, self.start, self.seconds = 0, 0.0, 0.0

            def on_start(self, event):
                if self.depth == 0:
                    self.start = time.perf_counter()
                self.depth += 1

            def on_end(self, event):
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - self.start

        self._ev = ev
        self._timers = {kind: _Timer() for kind in self._KINDS}
        self._last = (0.0, 0.0)

    def __enter__(self):
        for kind, t in self._timers.items():
            self._ev.register(kind, t)
        return self

    def __exit__(self, *exc):
        for kind, t in self._timers.items():
            self._ev.unregister(kind, t)

    @property
    def total(self) -> tuple[float, float]:
        """``(compile seconds, cache seconds)`` since the clock started."""
        lock = self._timers["numba:compiler_lock"].seconds
        comp = self._timers["numba:compile"].seconds
        return comp, max(lock - comp, 0.0)

    def lap(self) -> tuple[float, float]:
        """``(compile seconds, cache seconds)`` since the previous lap."""
        now = self.total
        d = (now[0] - self._last[0], now[1] - self._last[1])
        self._last = now
        return d

    @staticmethod
    def describe(lap) -> str:
        comp, cache = lap
        return f"{comp:.2f} s compiling kernels, {cache:.2f} s reading or writing its on-disk cache"


# --- the QLoRA model -----------------------------------------------------------------------
class QLoraMLP:
    """The frozen base as three :class:`numlora.QLoraLinear` layers (NF4 weights, float32
    biases) with trainable LoRA adapters; forward and backward through the ReLUs."""

    def __init__(self, params, rank, alpha, dropout, seed, blocksize=64):
        import numlora as nl

        self.layers = [
            nl.QLoraLinear.from_weight(w, rank, alpha, blocksize=blocksize, init="kaiming", seed=seed + i, bias=b,
                                       dropout=dropout, dropout_seed=seed + 100 + i)
            for i, (w, b) in enumerate(params)
        ]
        self._relu = []

    @classmethod
    def from_layers(cls, layers):
        """A model over given :class:`numlora.QLoraLinear` layers (nothing quantized)."""
        model = cls.__new__(cls)
        model.layers, model._relu = list(layers), []
        return model

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]

    def train(self, mode=True):
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def set_enabled(self, on: bool):
        for layer in self.layers:
            layer.enable() if on else layer.disable()

    def forward(self, x):
        self._relu = []
        h = x
        for i, layer in enumerate(self.layers):
            h = layer.forward(h)
            if i < len(self.layers) - 1:
                mask = h > 0
                h *= mask
                self._relu.append(mask)
        return h

    def backward(self, g):
        """Accumulate every layer's grad_a / grad_b from the gradient of the logits."""
        for i in range(len(self.layers) - 1, -1, -1):
            g = self.layers[i].backward(g, need_grad_x=i > 0)
            if i:
                g *= self._relu[i - 1]

    def merged_params(self):
        """Dense float32 ``(deq(W) + scaling * B @ A, bias)`` per layer."""
        return [(layer.merged_weight(), layer.bias) for layer in self.layers]

    @property
    def base_float32_bytes(self) -> int:
        return sum(4 * layer.nf4.numel for layer in self.layers)

    @property
    def base_nf4_bytes(self) -> int:
        return sum(layer.nf4.nbytes for layer in self.layers)


# --- the later steps' kernels, compiled in a second process ---------------------------------
def compile_later_steps(rows: int, n_eval: int, hidden: int, rank: int, alpha: float, dropout: float) -> None:
    """What the demo's second process runs (see :class:`LaterSteps`): the demo's three
    QLoRA layers (NF4 weights of its shapes from random codes, so no quantizer is compiled
    here) through the forward and backward of a training step of ``rows`` rows (the
    epoch's short last batch; none when 0), then the merge and the base-only forward of
    ``n_eval`` rows of steps 4-5, on one thread like the demo, so that numba compiles those
    kernels into its on-disk cache, where the demo's own process then finds them."""
    import numlora as nl

    g = np.random.default_rng(0)
    layers = []
    for i, (in_f, out_f) in enumerate(((64, hidden), (hidden, hidden), (hidden, 10))):
        t = nl.NF4Tensor(g.integers(0, 256, size=out_f * in_f // 2, dtype=np.uint8),
                         g.uniform(0.01, 0.1, size=out_f * in_f // 64).astype(np.float32), (out_f, in_f), 64)
        a = (g.standard_normal((rank, in_f)) * 0.01).astype(np.float32)
        b = (g.standard_normal((out_f, rank)) * 0.01).astype(np.float32)
        layers.append(nl.QLoraLinear(t, a, b, alpha, bias=np.zeros(out_f, np.float32), dropout=dropout,
                                     dropout_seed=i))
    model = QLoraMLP.from_layers(layers)
    with one_thread():  # in the order the demo needs them (AdamW: its 32-row step compiled it)
        if rows:
            model.train()
            x = g.random((rows, 64), dtype=np.float32)
            _, grad = _softmax_xent(model.forward(x), g.integers(0, 10, rows))
            model.backward(grad)
        print("short", flush=True)  # the demo's process waits for these lines (LaterSteps)
        model.merged_params()
        model.set_enabled(False)
        _evaluate(model, g.random((n_eval, 64), dtype=np.float32))
        print("later", flush=True)


class LaterSteps:
    """:func:`compile_later_steps` in a second process, started by :meth:`start`. numba
    compiles in the thread that calls a kernel, so one process compiles on one core; with
    an empty cache the epoch's short last batch (fewer than 17 rows: the fused NF4 kernels,
    not the 32-row step's tiles) and steps 4-5 would compile their kernels in the middle of
    the run while the second core sits idle (4-5 s of a cold demo on AMD Zen 3). The child
    prints ``short`` once the short batch's kernels are in the cache and ``later`` once
    those of steps 4-5 are; :meth:`wait` blocks until a line has come (or the child has
    ended), so the demo loads those kernels instead of compiling them a second time."""

    def __init__(self, proc):
        self._proc = proc
        self._seen = {"short": threading.Event(), "later": threading.Event()}
        self.waited = 0.0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, rows, n_eval, hidden, rank, alpha, dropout):
        """The second process, or None where it cannot help: one CPU, numba's on-disk
        cache off (``NUMLORA_CACHE=0``), or nothing compiled (``NUMBA_DISABLE_JIT=1``)."""
        import numba

        from ._config import CACHE
        from .warmup import child_env

        if not CACHE or numba.config.DISABLE_JIT or (os.cpu_count() or 1) < 2:
            return None
        code = (f"from numlora.demo import compile_later_steps; "
                f"compile_later_steps({rows}, {n_eval}, {hidden}, {rank}, {float(alpha)!r}, {float(dropout)!r})")
        try:
            proc = subprocess.Popen([sys.executable, "-c", code], env=child_env(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # pragma: no cover  (no second process: the demo compiles as before)
            return None
        return cls(proc)

    def _read(self):
        for line in self._proc.stdout:
            if line.strip() in self._seen:
                self._seen[line.strip()].set()
        for e in self._seen.values():  # the child ended (done, or failed): nothing more to wait for
            e.set()

    def wait(self, what, timeout=30.0):
        t0 = time.perf_counter()
        self._seen[what].wait(timeout)
        self.waited += time.perf_counter() - t0

    def stop(self):
        """End the child now if it still runs (numba writes each cache file whole, under a
        temporary name, so nothing half-written stays behind)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()

    def finish(self, out):
        """Wait for the child to end and say what it did (its CPU time where the platform
        reports it)."""
        try:
            import resource
        except ImportError:  # pragma: no cover  (Windows)
            resource = None
        before = resource.getrusage(resource.RUSAGE_CHILDREN) if resource else None
        try:
            rc = self._proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self._proc.kill()
            rc = self._proc.wait()
        self._reader.join(5)
        cpu = ""
        if resource:
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = f"{after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime:.1f} s of CPU; "
        if rc == 0:
            out(f"   (a second process compiled the kernels of the epoch's short last batch and of steps 4-5 "
                f"meanwhile, into numba's on-disk cache: {cpu}this one waited {self.waited:.2f} s for it)")
        else:  # pragma: no cover  (the demo compiled them itself)
            out("   (the second process that compiles later steps' kernels failed; this one compiled them)")


def _evaluate(model, x, batch=512):
    model.eval()
    return np.concatenate([model.forward(x[i:i + batch]) for i in range(0, len(x), batch)])


def _kib(n) -> str:
    return f"{n / 1024:.1f} KiB"


def _save_adapter(model, rank, alpha, dropout, path, out):
    import numlora as nl

    cfg = nl.LoraConfig(rank=rank, alpha=alpha, dropout=dropout, target_modules=LAYERS)
    adapter = nl.LoraAdapter(cfg)
    for name, layer in zip(LAYERS, model.layers):
        adapter.add_lora(name, layer.lora_a, layer.lora_b)
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        out(f"   not saved: {path} exists and is not a folder")
        return False
    replaced = os.path.isfile(os.path.join(path, "adapter_model.safetensors"))
    adapter.save_peft(path)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in ("adapter_config.json", "adapter_model.safetensors"))
    out(f"6. adapter saved as a PEFT folder: {path} (adapter_config.json + adapter_model.safetensors, "
        f"{_kib(size)})" + ("\n   note: replaced the adapter an earlier run had saved there" if replaced else ""))
    back = nl.load_peft_adapter(path)
    same = sorted(back.layer_names) == sorted(LAYERS) and all(
        np.array_equal(back[n].lora_a, layer.lora_a) and np.array_equal(back[n].lora_b, layer.lora_b)
        and back[n].scaling == layer.scaling for n, layer in zip(LAYERS, model.layers))
    out(f"   loaded back with numlora.load_peft_adapter: {len(back)} layers, tensors and scaling equal: "
        f"{'yes' if same else 'NO'}")
    return same


def main(seed: int = 0, out_dir=DEFAULT_OUT, epochs: int = 20, base_epochs: int = 20, rank: int = 8,
         alpha: float = 16.0, dropout: float = 0.05, lr: float = 5e-3, batch: int = 32, hidden: int = 256,
         out=print, progress: bool | None = None, background_compile: bool = True) -> int:
    """Run the demo; ``out`` receives each line of the report. Returns 0 when every check
    passed, 1 otherwise. Runs on one thread (see :func:`one_thread`); with
    ``background_compile`` (and two or more CPUs) a second process compiles the kernels
    of the later steps meanwhile (:class:`LaterSteps`)."""
    children = []
    try:
        with one_thread(), KernelClock() as clock:
            return _main(seed, out_dir, epochs, base_epochs, rank, alpha, dropout, lr, batch, hidden, out, progress,
                         clock, background_compile, children)
    finally:
        for later in children:  # the demo failed or was interrupted: no process left behind
            later.stop()


def _main(seed, out_dir, epochs, base_epochs, rank, alpha, dropout, lr, batch, hidden, out, progress,
          clock, background_compile=True, children=None) -> int:
    import numlora as nl
    from numlora._progress import Progress
    from numlora.train import AdamW

    t_start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    later = LaterSteps.start(len(y_tr) % batch, len(y_te), hidden, rank, alpha, dropout) if background_compile else None
    if later is not None and children is not None:
        children.append(later)
    xr_tr, xr_te = rotate90(x_tr), rotate90(x_te)
    out(f"numlora {nl.__version__} demo: QLoRA fine-tuning of a small MLP on handwritten digits (seed {seed})\n")
    out(f"data: {len(y_tr) + len(y_te)} handwritten digits, 8 x 8 pixels (UCI, shipped with numlora), "
        f"{len(y_tr)} for training, {len(y_te)} held out")
    out("new task: the same digits rotated by 90 degrees. The base learned where each digit's strokes lie;")
    out("          rotated, every stroke is elsewhere (a bar becomes a column), so the base reads them badly.\n")

    # 1. base model -----------------------------------------------------------------------
    t0 = time.perf_counter()
    params = train_base(x_tr, y_tr, seed, hidden=hidden, epochs=base_epochs)
    t_base = time.perf_counter() - t0
    acc_base = accuracy(mlp_forward(params, x_te), y_te)
    pred_rot = np.argmax(mlp_forward(params, xr_te), axis=1)
    acc_base_rot = float((pred_rot == y_te).mean())
    common = np.bincount(pred_rot, minlength=10)
    out(f"1. base model: dense MLP 64 -> {hidden} -> {hidden} -> 10 (ReLU), float32, trained in numpy "
        f"(Adam, {base_epochs} epochs, {t_base:.1f} s)")
    out(f"   held-out accuracy: digits {100 * acc_base:.1f} %, rotated digits {100 * acc_base_rot:.1f} % "
        f"(it calls {common.max()} of the {len(y_te)} rotated images a {common.argmax()}; chance is 10 %)")

    # 2. freeze and quantize ----------------------------------------------------------------
    model = QLoraMLP(params, rank, alpha, dropout, seed)
    f32, q4 = model.base_float32_bytes, model.base_nf4_bytes
    acc_q = accuracy(_evaluate(model, x_te), y_te)  # B = 0: the adapters add nothing yet
    logits_before = _evaluate(model, xr_te)
    acc_before = accuracy(logits_before, y_te)
    out("2. base frozen and quantized to NF4 (blocksize 64, bitsandbytes layout):")
    out(f"   base weights: float32 {_kib(f32)} -> NF4 {_kib(q4)} ({f32 / q4:.1f}x smaller, "
        f"{8 * q4 / (f32 / 4):.2f} bits/weight)")
    out(f"   held-out accuracy on digits: {100 * acc_base:.1f} % float32, {100 * acc_q:.1f} % NF4")
    out(f"   numba, for quantize and the NF4 forward: {clock.describe(clock.lap())}")

    # 3. train the adapters -----------------------------------------------------------------
    trainable = sum(layer.trainable_params for layer in model.layers)
    frozen = sum(layer.original_params for layer in model.layers)
    out(f"3. LoRA on {', '.join(LAYERS)}: rank {rank}, alpha {alpha:g}, dropout {dropout:g}; "
        f"{trainable:,} trainable parameters ({100 * trainable / frozen:.1f} % of the base's {frozen:,})")
    out(f"   AdamW (lr {lr:g}), batch {batch}, {epochs} epochs on the rotated training images")
    opt = AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed + 1)
    steps_per_epoch = -(-len(y_tr) // batch)
    step_times, firsts = [], {}  # firsts: rows -> (seconds, numba's (compile, cache) seconds) of the first such step
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(y_tr))
        losses = []
        bar = Progress(steps_per_epoch, f"   epoch {epoch:>2}/{epochs}", unit="step", enabled=progress)
        for start in range(0, len(y_tr), batch):
            idx = order[start:start + batch]
            xb = xr_tr[idx]
            if later is not None and len(idx) < batch and len(idx) not in firsts:
                later.wait("short")  # its kernels: from the cache the second process is filling
            k0 = clock.total
            t0 = time.perf_counter()
            opt.zero_grad()
            loss, g = _softmax_xent(model.forward(xb), y_tr[idx])
            model.backward(g)
            opt.step()
            dt = time.perf_counter() - t0
            if len(idx) not in firsts:
                k1 = clock.total
                firsts[len(idx)] = (dt, (k1[0] - k0[0], k1[1] - k0[1]))
            elif len(idx) == batch:
                step_times.append(dt)
            losses.append(loss)
            bar.update(1)
        if bar.enabled:  # the epoch's line below takes the bar's place
            bar.stream.write("\r" + " " * 100 + "\r")
            bar.stream.flush()
        acc = accuracy(_evaluate(model, xr_te), y_te)
        out(f"   epoch {epoch:>2}/{epochs}  loss {np.mean(losses):.4f}  held-out accuracy (rotated) {100 * acc:5.1f} %")
    ms = 1e3 * float(np.median(step_times)) if step_times else 1e3 * firsts[min(firsts)][0]
    out(f"   time per training step (batch {batch}: forward + backward + AdamW over 3 layers, one thread): "
        f"median {ms:.2f} ms")
    for rows, (dt, lap) in firsts.items():
        what = "" if rows == batch else " (an epoch's last, short batch)"
        out(f"   first step of {rows} rows{what}: {dt:.2f} s, of which numba: {clock.describe(lap)}")
    clock.lap()

    # 4. before / after ----------------------------------------------------------------------
    if later is not None:
        later.wait("later")
    logits = _evaluate(model, xr_te)
    acc_after = accuracy(logits, y_te)
    model.set_enabled(False)
    acc_off = accuracy(_evaluate(model, x_te), y_te)
    model.set_enabled(True)
    out(f"4. held-out accuracy on the rotated digits (seed {seed}): {100 * acc_before:.1f} % before -> "
        f"{100 * acc_after:.1f} % after")
    out(f"   adapter switched off, the NF4 base still reads upright digits: {100 * acc_off:.1f} %")

    # 5. merge -------------------------------------------------------------------------------
    merged = model.merged_params()
    logits_m = mlp_forward(merged, xr_te)
    same = int((np.argmax(logits_m, axis=1) == np.argmax(logits, axis=1)).sum())
    diff = float(np.abs(logits_m - logits).max())
    out(f"5. merged into dense float32 weights (deq(W) + s B A per layer, "
        f"{_kib(sum(w.nbytes for w, _ in merged))}): same predictions as the QLoRA model on "
        f"{same}/{len(y_te)} held-out images (largest logit difference {diff:.1e})")
    out(f"   numba, for steps 4 and 5 (base-only forward, merge): {clock.describe(clock.lap())}")

    # 6. save --------------------------------------------------------------------------------
    saved = _save_adapter(model, rank, alpha, dropout, out_dir, out)
    if later is not None:
        later.finish(out)
    out(f"\ndone in {time.perf_counter() - t_start:.1f} s, of which numba: {clock.describe(clock.total)}")
    ok = saved and same == len(y_te) and acc_after > acc_before
    return 0 if ok else 1
