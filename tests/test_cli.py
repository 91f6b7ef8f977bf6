import json

import numpy as np
import pytest

from numlora import bench
from numlora.cli import main


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--base-epochs", "5", "--hidden", "64", "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "QLoRA fine-tuning" in text and "rotated by 90 degrees" in text
    assert "4.50 bits/weight" in text
    assert "tensors and scaling equal: yes" in text
    assert (tmp_path / "a" / "adapter_config.json").is_file()


def test_help_and_no_command(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--rank", "0"])
    with pytest.raises(SystemExit):
        main(["bench", "--train", "--batch", "1", "--batch", "8"])


@pytest.mark.slow
def test_bench_small_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "PAUSE_S", 0.0)
    monkeypatch.setattr(bench, "CALLS_PER_ROUND", 1)
    path = tmp_path / "bench.json"
    assert main(["bench", "--size", "256", "--rank", "4", "--repeat", "1", "--batch", "1", "--no-peers",
                 "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "| LoRA float32 forward, batch 1 |" in text and "quantize_nf4" in text
    data = json.loads(path.read_text())
    assert {r["case"] for r in data["rows"]} >= {"LoRA float32 forward, batch 1", "quantize_nf4 (blocksize 64)"}
    assert all(r["numlora_ms"] > 0 and r["competitor_ms"] > 0 for r in data["rows"])


@pytest.mark.slow
def test_bench_train_small_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "TRAIN_PAUSE_S", 0.0)
    monkeypatch.setattr(bench, "CALLS_PER_ROUND", 1)
    path = tmp_path / "train.json"
    assert main(["bench", "--train", "--size", "128", "--rank", "4", "--repeat", "1", "--batch", "8", "--no-peers",
                 "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "| LoRA training step, dense base, batch 8 |" in text
    assert "| QLoRA training step, NF4 base, batch 8 |" in text
    data = json.loads(path.read_text())
    assert {r["competitor"] for r in data["rows"]} == {"hand-written numpy (BLAS)", "numlora LoRA step, dense base"}
    assert all(r["numlora_ms"] > 0 and r["competitor_ms"] > 0 for r in data["rows"])
    assert all(e < 1e-4 for e in data["checks"].values()), data["checks"]


def test_numpy_train_step_matches_float64():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 10)).astype(np.float32)
    a = rng.standard_normal((3, 10)).astype(np.float32)
    b = rng.standard_normal((12, 3)).astype(np.float32)
    x = rng.standard_normal((5, 10)).astype(np.float32)
    g = rng.standard_normal((5, 12)).astype(np.float32)
    s = 2.0
    a0, b0 = a.copy(), b.copy()
    step = bench._NumpyTrainStep(w, a, b, s, x, g, lr=0.01)
    dx = step()
    W, A, B, X, G = (t.astype(np.float64) for t in (w, a0, b0, x, g))
    np.testing.assert_allclose(step.y, X @ W.T + s * (X @ A.T) @ B.T, rtol=1e-5, atol=1e-5)
    ga, gb = s * (G @ B).T @ X, s * G.T @ (X @ A.T)
    np.testing.assert_allclose(step.ga, ga, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(step.gb, gb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, G @ W + s * (G @ B) @ A, rtol=1e-5, atol=1e-5)
    # first AdamW step: m / sqrt(v) after bias correction is sign(g) (up to eps)
    np.testing.assert_allclose(a, a0 - 0.01 * np.sign(ga), atol=1e-6)
    np.testing.assert_allclose(b, b0 - 0.01 * np.sign(gb), atol=1e-6)


def test_bench_multi_passes_its_options(monkeypatch):
    import numlora.bench.multi as bm
    from numlora.cli import main

    seen = []
    monkeypatch.setattr(bm, "main", lambda argv=None: seen.append(argv) or 0)
    assert main(["bench", "--multi", "--quick", "--repeat", "3", "--json", "out.json"]) == 0
    assert main(["bench", "--multi", "--no-peers"]) == 0
    assert seen == [["--repeats", "3", "--quick", "--json", "out.json"], ["--repeats", "5", "--no-peers"]]


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"numlora {version('numlora')}"


@pytest.mark.parametrize("command, words", [("bench", "Time numlora's kernels"), ("inspect", "Describe PATH"),
                                            ("merge", "Write BASE"), ("quantize", "Quantize 2-D")])
def test_every_command_has_a_description(capsys, command, words):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert words in out.split("options:")[0].replace("\n", " "), out


def test_batch_takes_repeats_and_comma_lists(monkeypatch, capsys):
    import numlora.bench as nb

    seen = []
    monkeypatch.setattr(nb, "main", lambda args: seen.append(args.batch) or 0)
    assert main(["bench", "--batch", "1,8", "--batch", "64", "--no-peers"]) == 0
    assert main(["bench", "--no-peers"]) == 0
    assert seen == [[1, 8, 64], None]
    assert "repeat the option or give a comma list" in " ".join(_help(capsys, ["bench", "--help"]).split())
    for bad in ("0", "1,,2", "x", "-4", "8,0"):
        with pytest.raises(SystemExit) as info:
            main(["bench", "--batch", bad])
        assert info.value.code == 2 and "argument --batch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--train", "--batch", "1,8"])
    assert "--train takes one --batch" in capsys.readouterr().err


def _help(capsys, argv):
    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().out


def _cli(args, **kw):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "numlora.cli"] + args, env=env, **kw)


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    """`numlora inspect --json DIR | head -1`: the reader goes away; no BrokenPipeError
    traceback, exit 1 (Python's recipe)."""
    import subprocess

    from numlora.io.safetensors import save_file

    save_file(tmp_path / "m.safetensors", {"w": np.zeros(2, np.float32)}, {"note": "x" * 300_000})
    p = _cli(["inspect", "--json", str(tmp_path / "m.safetensors")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(10) == b'{\n  "kind"'
    p.stdout.close()  # like head after its first line
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 1
    assert err == "", err


def test_inspect_a_fifo_does_not_block(tmp_path):
    import os
    import subprocess

    os.mkfifo(tmp_path / "x.safetensors")
    p = _cli(["inspect", str(tmp_path / "x.safetensors")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("numlora inspect blocked on a FIFO")
    assert p.returncode == 2 and out == b""
    assert err.decode().strip() == (f"numlora: error: expected the safetensors file {tmp_path / 'x.safetensors'} "
                                    "to be a regular file, got a FIFO (named pipe)")
