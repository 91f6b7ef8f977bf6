"""``numlora demo``: the QLoRA fine-tuning run on the 8 x 8 digits numlora ships."""

import re

import numpy as np
import pytest

import numlora as nl
from numlora import demo
from numlora.cli import main

SMALL = ["--epochs", "4", "--base-epochs", "8", "--hidden", "64"]
TIMING = re.compile(r"\d+(\.\d+)? (ms|s)\b")


def _run(capsys, *args):
    rc = main(["demo", *SMALL, *args])
    text = capsys.readouterr().out
    return rc, text


def _untimed(text):
    """The report without its timings and without the note about a replaced folder."""
    return "\n".join(TIMING.sub("<t>", line) for line in text.splitlines() if "replaced the adapter" not in line)


def test_shipped_digits_are_scikit_learns():
    """numlora/data/digits.npz holds exactly what sklearn.datasets.load_digits() returns."""
    datasets = pytest.importorskip("sklearn.datasets",
                                   reason="compares with scikit-learn's copy: pip install -e '.[test]'")
    images, labels = demo.load_digits()
    assert images.dtype == np.uint8 and images.shape == (1797, 64) and int(images.max()) == 16
    assert labels.dtype == np.uint8 and labels.shape == (1797,)
    d = datasets.load_digits()
    np.testing.assert_array_equal(images, d.data)
    np.testing.assert_array_equal(labels, d.target)
    np.testing.assert_array_equal(images.reshape(-1, 8, 8), d.images)


def test_split_is_stratified_and_deterministic():
    a = demo.load_digits_split(3)
    b = demo.load_digits_split(3)
    for u, w in zip(a, b):
        np.testing.assert_array_equal(u, w)
    x_tr, y_tr, x_te, y_te = a
    assert x_tr.dtype == np.float32 and x_tr.shape[1] == 64 and len(y_tr) + len(y_te) == 1797
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    held = np.bincount(y_te, minlength=10) / np.bincount(np.concatenate([y_tr, y_te]), minlength=10)
    assert np.all(np.abs(held - 0.25) < 0.02)
    assert not np.array_equal(demo.load_digits_split(4)[3], y_te)


def test_rotate90_is_a_quarter_turn():
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    r = demo.rotate90(x)
    np.testing.assert_array_equal(r[0].reshape(8, 8), np.rot90(x[0].reshape(8, 8)))
    np.testing.assert_array_equal(demo.rotate90(demo.rotate90(demo.rotate90(r))), x)
    assert r.flags.c_contiguous


def test_base_model_learns_and_is_deterministic():
    x_tr, y_tr, x_te, y_te = demo.load_digits_split(0)
    p1 = demo.train_base(x_tr, y_tr, seed=0, hidden=32, epochs=6)
    p2 = demo.train_base(x_tr, y_tr, seed=0, hidden=32, epochs=6)
    for (w1, b1), (w2, b2) in zip(p1, p2):
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_array_equal(b1, b2)
        assert w1.dtype == np.float32
    assert [w.shape for w, _ in p1] == [(32, 64), (32, 32), (10, 32)]
    assert demo.accuracy(demo.mlp_forward(p1, x_te), y_te) > 0.85
    # the new task is one the base does not solve
    assert demo.accuracy(demo.mlp_forward(p1, demo.rotate90(x_te)), y_te) < 0.35


def test_softmax_xent_gradient():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5, 10)).astype(np.float64)
    y = rng.integers(0, 10, 5)
    loss, g = demo._softmax_xent(z, y)
    eps = 1e-6
    for i, j in [(0, 0), (2, 7), (4, y[4])]:
        zp = z.copy()
        zp[i, j] += eps
        zm = z.copy()
        zm[i, j] -= eps
        fd = (demo._softmax_xent(zp, y)[0] - demo._softmax_xent(zm, y)[0]) / (2 * eps)
        assert abs(fd - g[i, j]) < 1e-5


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    import numba

    threads = numba.get_num_threads()
    out = tmp_path / "adapter"
    rc, text = _run(capsys, "--out", str(out), "--seed", "1")
    assert rc == 0, text
    assert numba.get_num_threads() == threads  # the demo's one-thread setting is undone
    m = re.search(r"rotated digits \(seed 1\): ([\d.]+) % before -> ([\d.]+) % after", text)
    assert m, text
    before, after = float(m.group(1)), float(m.group(2))
    assert after > before + 40, text
    assert re.search(r"same predictions as the QLoRA model on (\d+)/\1 held-out images", text), text
    assert "float32 330.0 KiB" not in text  # hidden 64: a smaller base than the default
    assert "bits/weight" in text and "time per training step" in text and "epoch  4/4" in text
    assert "tensors and scaling equal: yes" in text

    back = nl.load_peft_adapter(out)
    assert back.layer_names == list(demo.LAYERS)
    assert back["fc1"].lora_a.shape == (8, 64) and back["fc3"].lora_b.shape == (10, 8)
    assert back.config.dropout == pytest.approx(0.05)
    assert all(np.any(back[n].lora_b != 0) for n in back)

    # the same seed gives the same report (timings aside); the second run says it replaced the adapter
    rc2, text2 = _run(capsys, "--out", str(out), "--seed", "1")
    assert rc2 == 0
    assert "replaced the adapter an earlier run had saved there" in text2
    assert "replaced" not in text
    assert _untimed(text2) == _untimed(text)
    back2 = nl.load_peft_adapter(out)
    for n in back:
        np.testing.assert_array_equal(back2[n].lora_a, back[n].lora_a)
        np.testing.assert_array_equal(back2[n].lora_b, back[n].lora_b)


@pytest.mark.slow
def test_demo_other_seed_and_unwritable_out(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    rc, text = _run(capsys, "--out", str(target), "--seed", "2", "--epochs", "1")
    assert rc == 1
    assert "not saved" in text and target.read_text() == "not a folder"


def test_demo_option_checks():
    for bad in (["--rank", "0"], ["--rank", "11"], ["--epochs", "0"], ["--seed", "-1"]):
        with pytest.raises(SystemExit):
            main(["demo", *bad])


@pytest.mark.slow
def test_saved_adapter_loads_in_peft(tmp_path, capsys):
    """PEFT's own loader applies the demo's adapter to a torch copy of the dequantized base
    and reaches the accuracy the demo printed."""
    torch = pytest.importorskip("torch", reason="needs torch: pip install -e '.[test,peers]'")
    peft = pytest.importorskip("peft", reason="needs peft: pip install -e '.[test,peers]'")
    out = tmp_path / "adapter"
    rc, text = _run(capsys, "--out", str(out), "--seed", "0")
    assert rc == 0
    after = float(re.search(r"% before -> ([\d.]+) % after", text).group(1))
    x_tr, y_tr, x_te, y_te = demo.load_digits_split(0)
    with demo.one_thread():
        params = demo.train_base(x_tr, y_tr, 0, hidden=64, epochs=8)
    model = demo.QLoraMLP(params, 8, 16.0, 0.0, 0)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    net = MLP()
    with torch.no_grad():
        for lin, layer in zip((net.fc1, net.fc2, net.fc3), model.layers):
            lin.weight.copy_(torch.from_numpy(layer.dequantize_weight()))
            lin.bias.copy_(torch.from_numpy(layer.bias))
    pm = peft.PeftModel.from_pretrained(net, str(out)).eval()
    with torch.no_grad():
        logits = pm(torch.from_numpy(demo.rotate90(x_te))).numpy()
    assert 100 * demo.accuracy(logits, y_te) == pytest.approx(after, abs=0.25)


@pytest.mark.slow
def test_demo_compiles_later_steps_in_a_second_process(tmp_path, capsys, monkeypatch):
    """With two CPUs the demo starts one child that compiles the short batch's and steps
    4-5's kernels into the cache, waits for it, and says so; without background compile
    (or on one CPU) no child and no such line, and the same report otherwise."""
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    lines = []
    assert demo.main(seed=3, out_dir=str(tmp_path / "a"), epochs=2, base_epochs=4, hidden=64, out=lines.append) == 0
    text = "\n".join(lines)
    assert re.search(r"a second process compiled the kernels .* s of CPU; this one waited [\d.]+ s for it", text), text
    lines2 = []
    assert demo.main(seed=3, out_dir=str(tmp_path / "a"), epochs=2, base_epochs=4, hidden=64, out=lines2.append,
                     background_compile=False) == 0
    text2 = "\n".join(lines2)
    assert "second process" not in text2
    assert _untimed("\n".join(x for x in lines if "second process" not in x)) == _untimed(text2)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 1)
    assert demo.LaterSteps.start(3, 10, 64, 8, 16.0, 0.05) is None


def test_a_demo_that_fails_leaves_no_second_process(tmp_path, monkeypatch):
    """An error in the middle of the demo (here: in the base model's training) ends the
    child too."""
    import numba

    if numba.config.DISABLE_JIT:
        pytest.skip("no second process where nothing compiles (NUMBA_DISABLE_JIT=1)")
    started = []
    real_start = demo.LaterSteps.start

    def start(*args):
        later = real_start(*args)
        started.append(later)
        return later

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo.LaterSteps, "start", staticmethod(start))
    monkeypatch.setattr(demo, "_softmax_xent", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        demo.main(seed=3, out_dir=str(tmp_path / "a"), epochs=1, base_epochs=1, hidden=64, out=lambda line: None)
    assert len(started) == 1 and started[0] is not None
    assert started[0]._proc.poll() is not None  # ended, and waited for


def test_a_failed_second_process_ends_the_waits(capsys):
    """If the child dies before its lines, the demo's waits return at once and the report
    says the demo compiled those kernels itself."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", "import sys; print('short', flush=True); sys.exit(3)"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    later = demo.LaterSteps(proc)
    t0 = time.perf_counter()
    later.wait("short")
    later.wait("later", timeout=30)
    assert time.perf_counter() - t0 < 20
    lines = []
    later.finish(lines.append)
    assert proc.returncode == 3
    assert lines == ["   (the second process that compiles later steps' kernels failed; this one compiled them)"]

