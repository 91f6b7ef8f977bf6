"""numlora on Dask: checkpoint conversion as tasks, and layers applied to dask arrays.

One LocalCluster of 2 worker processes serves the whole module (starting one takes a
few seconds). Skipped, with the reason, when the optional extra (numlora[dask]) is
absent."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

distributed = pytest.importorskip("distributed", reason="numlora[dask] (dask, distributed) is not installed")
da = pytest.importorskip("dask.array", reason="numlora[dask] (dask[array]) is not installed")

import numlora as nl  # noqa: E402
from numlora.cli import main  # noqa: E402
from numlora.convert import merge_checkpoint, quantize_checkpoint  # noqa: E402
from numlora.errors import NonFiniteError  # noqa: E402
from numlora.io.safetensors import save_file  # noqa: E402

from test_convert import LAYER_MODS, _leftovers, _model_tensors, _tree_hashes, _write_adapter, _write_model  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c


def _files(root):
    """Every file under ``root`` (relative path -> bytes)."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def _comparable(report):
    d = report.to_dict()
    for k in ("seconds", "output", "dask"):
        d.pop(k)
    return d


# --- checkpoint conversion as tasks ------------------------------------------------------------
@pytest.fixture
def model(tmp_path, rng):
    base, adapter = tmp_path / "in" / "base", tmp_path / "in" / "ad"
    os.makedirs(base.parent)
    _write_model(base, _model_tensors(rng), "BF16", shards=3)
    _write_adapter(adapter, rng, LAYER_MODS)
    return base, adapter


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_on_dask_writes_the_same_bytes(tmp_path, model, client, double_quant):
    base, _ = model
    before = _tree_hashes(tmp_path / "in")
    one = quantize_checkpoint(base, tmp_path / "one", double_quant=double_quant)
    many = quantize_checkpoint(base, tmp_path / "many", double_quant=double_quant, scheduler=client)
    assert _files(tmp_path / "many") == _files(tmp_path / "one")
    assert len(_files(tmp_path / "one")) == 6  # 3 shards, the index, config.json, extra/tokenizer.txt
    assert _comparable(many) == _comparable(one) and one.dask is None
    assert many.dask["workers"] == 2 and sorted(t["shard"] for t in many.dask["tasks"]) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert _tree_hashes(tmp_path / "in") == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_merge_on_dask_writes_the_same_bytes(tmp_path, model, client, dtype):
    base, adapter = model
    before = _tree_hashes(tmp_path / "in")
    one = merge_checkpoint(base, adapter, tmp_path / "one", dtype=dtype)
    many = merge_checkpoint(base, adapter, tmp_path / "many", dtype=dtype, scheduler=client)
    assert _files(tmp_path / "many") == _files(tmp_path / "one")
    assert _comparable(many) == _comparable(one) and len(one.merged) == len(LAYER_MODS)
    assert len(many.dask["tasks"]) == 3
    assert _tree_hashes(tmp_path / "in") == before


def test_the_cli_takes_a_scheduler_address(tmp_path, model, client, capsys):
    base, _ = model
    addr = client.scheduler.address
    assert main(["quantize", str(base), "-o", str(tmp_path / "one"), "--json"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(base), "-o", str(tmp_path / "many"), "--scheduler", addr, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["dask"]["tasks"]) == 3
    assert _files(tmp_path / "many") == _files(tmp_path / "one")


@pytest.mark.filterwarnings("ignore:Port .* is already in use")  # the module's cluster holds the default port
def test_the_cli_starts_a_local_cluster_with_workers(tmp_path, model, capsys):
    base, adapter = model
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "one"), "--json"]) == 0
    capsys.readouterr()
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "many"), "--workers", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["dask"]["workers"] == 1 and len(rep["dask"]["tasks"]) == 3
    assert _files(tmp_path / "many") == _files(tmp_path / "one")


def test_a_single_file_is_converted_in_this_process(tmp_path, rng, client):
    src = tmp_path / "in.safetensors"
    _write_model(src, _model_tensors(rng), "BF16")
    quantize_checkpoint(src, tmp_path / "one.safetensors")
    many = quantize_checkpoint(src, tmp_path / "many.safetensors", scheduler=client)
    assert many.dask is None
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "many.safetensors").read_bytes()


def test_a_failing_task_leaves_nothing(tmp_path, rng, client):
    """A worker's error (a NaN merged into one shard's weight) reaches the caller as the
    same numlora error; the other tasks stop; the temporary folder is removed."""
    base, adapter = tmp_path / "in" / "base", tmp_path / "in" / "ad"
    os.makedirs(base.parent)
    tensors = _model_tensors(rng)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan
    _write_model(base, tensors, "F32", shards=3)
    _write_adapter(adapter, rng, LAYER_MODS)
    (tmp_path / "out").mkdir()
    before = _tree_hashes(tmp_path / "in")
    with pytest.raises(NonFiniteError, match="down_proj.weight"):
        merge_checkpoint(base, adapter, tmp_path / "out" / "m", scheduler=client)
    assert os.listdir(tmp_path / "out") == []
    assert _tree_hashes(tmp_path / "in") == before
    # the cluster is fine afterwards
    assert client.submit(sum, [1, 2]).result() == 3


def test_an_interrupt_stops_the_tasks_and_removes_everything(tmp_path, rng, client, monkeypatch):
    """Ctrl-C in this process while the tasks run: the stop flag ends the running tasks at
    their next tensor, and only then is the temporary folder removed (no task writes into
    it afterwards)."""
    import time

    import numlora.convert as conv

    base = tmp_path / "in" / "base"
    os.makedirs(base.parent)
    tensors = {f"layers.{i}.proj.weight": rng.standard_normal((256, 256)).astype(np.float32) for i in range(60)}
    _write_model(base, tensors, "BF16", shards=4)
    (tmp_path / "out").mkdir()

    class Bar:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n, item=""):
            raise KeyboardInterrupt  # at the first shard done

    monkeypatch.setattr(conv, "Progress", Bar)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(base, tmp_path / "out" / "q", scheduler=client)
    assert os.listdir(tmp_path / "out") == []
    time.sleep(0.5)
    assert os.listdir(tmp_path / "out") == []
    assert client.submit(sum, [1, 2]).result() == 3


def test_a_shard_changed_under_the_run_is_an_error(tmp_path, rng, client):
    base = tmp_path / "in" / "base"
    os.makedirs(base.parent)
    _write_model(base, _model_tensors(rng), "F32", shards=2)
    (tmp_path / "out").mkdir()
    from numlora.convert import _shard_task  # the task a worker runs

    shard = base / "model-00001-of-00002.safetensors"
    size = shard.stat().st_size
    save_file(shard, {"x.weight": np.ones((4, 4), np.float32)})  # replaced by another file
    job = conv_job()
    fut = client.submit(_shard_task, job, str(shard), size, str(tmp_path / "out" / "s.safetensors"), "unset-flag",
                        pure=False)
    with pytest.raises(nl.FormatError, match="changed during the run"):
        fut.result()
    assert os.listdir(tmp_path / "out") == []


def conv_job():
    from numlora.convert import _QuantizeJob

    return _QuantizeJob(set(), 64, False)
