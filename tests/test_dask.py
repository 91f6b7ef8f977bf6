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
from numlora.errors import ConfigError, NonFiniteError  # noqa: E402
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


@pytest.mark.parametrize("double_quant, kw", [(False, {}), (True, {}),
                                               (False, {"quant_type": "fp4", "error_stats": False})])
def test_quantize_on_dask_writes_the_same_bytes(tmp_path, model, client, double_quant, kw):
    base, _ = model
    before = _tree_hashes(tmp_path / "in")
    one = quantize_checkpoint(base, tmp_path / "one", double_quant=double_quant, **kw)
    many = quantize_checkpoint(base, tmp_path / "many", double_quant=double_quant, scheduler=client, **kw)
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


def test_a_single_file_starts_no_cluster(tmp_path, rng, monkeypatch):
    import numlora.convert as conv

    def no_cluster(*a, **k):
        raise AssertionError("a cluster was started for a single file")

    monkeypatch.setattr(conv, "_DaskRunner", no_cluster)
    src = tmp_path / "in.safetensors"
    _write_model(src, _model_tensors(rng), "BF16")
    rep = quantize_checkpoint(src, tmp_path / "one.safetensors", workers=2)
    assert rep.dask is None and (tmp_path / "one.safetensors").exists()
    with pytest.raises(ConfigError, match="not both"):
        quantize_checkpoint(src, tmp_path / "two.safetensors", workers=2, scheduler="tcp://127.0.0.1:1")


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


# --- layers over dask arrays -------------------------------------------------------------------
from numlora.dask import apply_layer, layer_ref  # noqa: E402


def _bits(a):
    return np.asarray(a).view(np.uint32)


def _layers(rng):
    w = rng.standard_normal((96, 160)).astype(np.float32)
    plain = nl.LoraLinear(w, rng.standard_normal((8, 160)).astype(np.float32),
                          rng.standard_normal((96, 8)).astype(np.float32), 16.0, bias=np.ones(96, np.float32))
    dora = nl.LoraLinear.from_weight(w, 4, 8.0, use_dora=True)
    dora.lora_b = rng.standard_normal((96, 4)).astype(np.float32)
    q = nl.QLoraLinear.from_weight(w, 8, 16.0, double_quant=True)
    q.lora_b = rng.standard_normal((96, 8)).astype(np.float32)
    return {"LoraLinear": plain, "DoRA": dora, "QLoraLinear": q}


def _workers_blas_threads(client):
    """threadpoolctl's limit to the workers' BLAS thread count (distributed's nanny starts
    them with OPENBLAS_NUM_THREADS=1 and the like). Above 16 rows the layers' products go
    through numpy's BLAS, and OpenBLAS's one-thread kernels sum in another order than its
    threaded ones on some CPUs (its Haswell kernels on AMD Zen 3: a 128 x 160 x 96 product
    differs in the last bits), so a block is compared with a forward under the same limit."""
    tpc = pytest.importorskip("threadpoolctl", reason="needs threadpoolctl (a scikit-learn dependency)")

    def blas_threads():
        import threadpoolctl

        return sorted({i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"})

    counts = {n for v in client.run(blas_threads).values() for n in v}
    assert len(counts) == 1, counts
    return tpc.threadpool_limits(counts.pop(), user_api="blas")


@pytest.mark.parametrize("kind", ["LoraLinear", "DoRA", "QLoraLinear"])
@pytest.mark.parametrize("scatter", [True, False])
def test_apply_layer_block_by_block(rng, client, kind, scatter):
    layer = _layers(rng)[kind]
    xn = rng.standard_normal((700, 160)).astype(np.float32)
    x = da.from_array(xn, chunks=(128, 80))  # several column chunks: joined first
    y = apply_layer(layer, x, client=client if scatter else None)
    assert y.shape == (700, 96) and y.chunks[0] == x.chunks[0] and y.dtype == np.float32
    got = client.compute(y).result()
    with _workers_blas_threads(client):
        want = np.concatenate([layer.forward(xn[i:i + 128]) for i in range(0, 700, 128)])
    assert np.array_equal(_bits(got), _bits(want))


def test_apply_a_bank_with_a_per_row_adapter_column(rng, client):
    w = rng.standard_normal((48, 64)).astype(np.float32)
    bank = nl.LoraBank(nl.quantize_nf4(w, 64))
    for k, r in enumerate((2, 5, 3)):
        bank.add(f"user{k}", rng.standard_normal((r, 64)).astype(np.float32),
                 rng.standard_normal((48, r)).astype(np.float32), 1.0 + k)
    xn = rng.standard_normal((500, 64)).astype(np.float32)
    ids = rng.integers(-1, 3, 500)
    x = da.from_array(xn, chunks=(100, 64))
    for adapters in (ids, da.from_array(ids, chunks=250)):  # a numpy column, a dask column chunked otherwise
        got = client.compute(apply_layer(bank, x, adapters, client=client)).result()
        # a row-stable bank gives each row the same bits whatever its batch
        assert np.array_equal(_bits(got), _bits(bank.forward(xn, ids)))


def _task_sizes(y):
    """The pickled size of every task in y's graph (what the scheduler sends per task)."""
    import pickle

    return {k: len(pickle.dumps(v)) for k, v in dict(y.__dask_graph__()).items()}


@pytest.mark.parametrize("scatter", [True, False])
def test_the_layer_is_sent_once_per_worker_not_per_task(rng, client, scatter):
    import pickle

    w = rng.standard_normal((512, 512)).astype(np.float32)
    layer = nl.QLoraLinear.from_weight(w, 16, 32.0)
    layer_bytes = len(pickle.dumps(layer, protocol=5))
    assert layer_bytes > 150_000
    x = da.random.default_rng(1).standard_normal((4000, 512), chunks=(200, 512), dtype=np.float32)
    # distributed's active memory manager drops replicas nobody waits for (every 2 s by
    # default): paused here so that the check of the broadcast cannot race it
    client.amm.stop()
    try:
        ref = layer_ref(layer, client if scatter else None)
        if scatter:  # scattered to every worker at once
            assert set(client.who_has([ref])[ref.key]) == set(client.scheduler_info()["workers"])
    finally:
        client.amm.start()
    y = apply_layer(layer, x, ref=ref)
    sizes = _task_sizes(y)
    big = [k for k, n in sizes.items() if n >= layer_bytes]
    if scatter:  # the layer is on the workers already: not in the graph at all
        assert big == [] and ref.key not in sizes
    else:  # one key of the graph, whatever the number of blocks
        assert big == [ref.key]
    small = [n for k, n in sizes.items() if k != getattr(ref, "key", None)]
    assert len(small) == 2 * 20 and max(small) < 2048  # 20 random blocks + 20 layer blocks, no weights inside
    client.run(lambda dask_worker: dask_worker.transfer_incoming_log.clear())
    client.compute(y).result()
    # what the workers fetched from each other: the layer at most once per worker, never
    # per task (the delayed key is computed on one worker; a scattered copy may have been
    # dropped by distributed's active memory manager since, then it is fetched once again)
    logs = client.run(lambda dask_worker: [dict(t["keys"]) for t in dask_worker.transfer_incoming_log])
    key = ref.key
    fetched = [sum(1 for t in log if key in t) for log in logs.values()]
    assert all(n <= 1 for n in fetched), fetched


def test_apply_layer_refuses_what_it_cannot_run(rng, client):
    layer = _layers(rng)["LoraLinear"]
    x = da.zeros((10, 160), chunks=5, dtype=np.float32)
    with pytest.raises(nl.ShapeError, match="160 columns"):
        apply_layer(layer, da.zeros((10, 12), chunks=5))
    with pytest.raises(nl.DTypeError, match="LoraLinear, QLoraLinear or LoraBank"):
        apply_layer(object(), x)
    layer.train()
    with pytest.raises(nl.TrainStateError, match="eval mode"):
        apply_layer(layer, x)
    bank = nl.LoraBank(np.zeros((4, 160), np.float32))
    with pytest.raises(nl.ConfigError, match="needs adapters"):
        apply_layer(bank, x)
    with pytest.raises(nl.ShapeError, match="one adapter id per row"):
        apply_layer(bank, x, np.zeros(3, np.int64))
    with pytest.raises(nl.DTypeError, match="integers"):
        apply_layer(bank, x, np.zeros(10))


def test_ctrl_c_on_the_cli_with_local_workers_removes_everything(tmp_path, rng):
    """SIGINT to `numlora quantize --workers 2` while its tasks run: exit 130, one line,
    no output, no temporary folder, and nothing written afterwards by a worker."""
    import signal
    import subprocess
    import sys
    import time

    base = tmp_path / "in" / "base"
    os.makedirs(base.parent)
    tensors = {f"layers.{i}.proj.weight": rng.standard_normal((512, 512)).astype(np.float32) for i in range(48)}
    _write_model(base, tensors, "BF16", shards=4)
    before = _tree_hashes(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "numlora", "quantize", str(base), "-o", str(out / "q"), "--workers",
                          "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _leftovers(out) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the temporary output folder appears once the cluster is up
        assert _leftovers(out), "the job ended before its temporary folder was seen"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=180)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "interrupted by SIGINT; the partial output was removed, the inputs are untouched" in err
    assert os.listdir(out) == []
    time.sleep(1.0)
    assert os.listdir(out) == [] and _tree_hashes(tmp_path / "in") == before
