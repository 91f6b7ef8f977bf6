import json

import pytest

from numlora import bench
from numlora.cli import main


def test_demo_runs_and_reports(capsys):
    assert main(["demo", "--size", "64"]) == 0
    text = capsys.readouterr().out
    assert "restored bit for bit: yes" in text
    assert "trainable params  3,072" in text  # 3 layers x 8 * (64 + 64)
    assert "4.50 bits/weight" in text


def test_help_and_no_command(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--size", "3"])


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
