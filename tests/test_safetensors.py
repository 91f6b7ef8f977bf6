"""numlora.io.safetensors and numlora.io.checkpoint: the format from its spec (bytes built
by hand here), round trips, bad files, and agreement with the reference ``safetensors``
package and torch's bfloat16 when installed."""

import json
import os
import struct
import sys

import numpy as np
import pytest

from numlora.errors import ConfigError, DTypeError, FormatError, ShapeError
from numlora.io.atomic import AtomicDir
from numlora.io.checkpoint import Checkpoint
from numlora.io.safetensors import (
    SafetensorsFile,
    SafetensorsWriter,
    bf16_to_f32,
    f32_to_bf16,
    load_file,
    load_metadata,
    save_file,
)

from conftest import full_disk


def _raw_file(path, header: dict, data: bytes, pad: int = 0):
    text = json.dumps(header).encode() + b" " * pad
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def _ref_bf16(x):
    """bfloat16 by the definition: the float32 value rounded to 8 significant bits, nearest,
    ties to even, computed with Python integers one element at a time."""
    out = []
    for u in np.asarray(x, np.float32).view(np.uint32).tolist():
        hi, lo = u >> 16, u & 0xFFFF
        if lo > 0x8000 or (lo == 0x8000 and hi & 1):
            hi += 1
        out.append(hi & 0xFFFF)
    return np.array(out, np.uint16)


def test_reads_hand_built_file(tmp_path):
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.array([1, -2, 3], "<i8")
    bf = np.array([0x3F80, 0xC000], "<u2")  # bfloat16 1.0, -2.0
    header = {"__metadata__": {"format": "pt"},
              "b": {"dtype": "I64", "shape": [3], "data_offsets": [24, 48]},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "h": {"dtype": "BF16", "shape": [2], "data_offsets": [48, 52]}}
    p = tmp_path / "x.safetensors"
    _raw_file(p, header, a.tobytes() + b.tobytes() + bf.tobytes(), pad=3)
    with SafetensorsFile(p) as f:
        assert f.keys() == ["a", "b", "h"]  # file order
        assert f.metadata == {"format": "pt"}
        assert np.array_equal(f.get("a"), a) and f.get("a").dtype == np.float32
        assert np.array_equal(f.get("b"), b)
        assert f.get("h").tolist() == [1.0, -2.0]
        assert f.raw("h").tolist() == [0x3F80, 0xC000]
        assert not f.raw("a").flags.writeable


def test_round_trip_every_dtype(tmp_path, rng):
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f64": rng.standard_normal(4),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "i8": np.array([-128, 0, 127], np.int8),
        "u8": np.arange(7, dtype=np.uint8),
        "i32": np.array([[1, 2], [3, -4]], np.int32),
        "bool": np.array([True, False]),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(3.5, np.float32),
    }
    p = tmp_path / "r.safetensors"
    save_file(p, tensors, {"k": "v"})
    back = load_file(p)
    assert load_metadata(p) == {"k": "v"}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert np.array_equal(back[k], v)
    with open(p, "rb") as f:  # data starts 8-byte aligned
        assert (8 + struct.unpack("<Q", f.read(8))[0]) % 8 == 0


def test_bf16_and_f16_written_back_in_their_dtype(tmp_path, rng):
    x = rng.standard_normal((4, 9)).astype(np.float32)
    p = tmp_path / "h.safetensors"
    save_file(p, {"a": x, "b": x}, dtypes={"a": "BF16", "b": "F16"})
    with SafetensorsFile(p) as f:
        assert f.info("a").dtype == "BF16" and f.info("b").dtype == "F16"
        assert np.array_equal(f.raw("a").reshape(-1), _ref_bf16(x.reshape(-1)))
        assert np.array_equal(f.get("b"), x.astype(np.float16).astype(np.float32))
        # bf16 -> f32 -> bf16 is the identity
        save_file(tmp_path / "h2.safetensors", {"a": f.get("a")}, dtypes={"a": "BF16"})
    with SafetensorsFile(tmp_path / "h2.safetensors") as g, SafetensorsFile(p) as f:
        assert np.array_equal(g.raw("a"), f.raw("a"))


def test_bf16_rounding_matches_definition(rng):
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    ties = (np.arange(64, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exact halfway cases
    x = np.concatenate([x, ties, [np.inf, -np.inf, 0.0, -0.0, 3.3895e38]]).astype(np.float32)
    assert np.array_equal(f32_to_bf16(x), _ref_bf16(x))
    back = bf16_to_f32(f32_to_bf16(x))
    assert np.array_equal(f32_to_bf16(back), f32_to_bf16(x))
    nan = f32_to_bf16(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(bf16_to_f32(nan)).all() and (nan >> 15).tolist() == [0, 1]


def test_streaming_writer_order_and_deferred_length(tmp_path):
    p = tmp_path / "w.safetensors"
    src = tmp_path / "s.safetensors"
    save_file(src, {"x": np.arange(5, dtype=np.float32)})
    with SafetensorsFile(src) as s, SafetensorsWriter(p, [("j", "U8", None), ("x", "F32", (5,))], {"a": "b"}) as w:
        w.write("j", np.frombuffer(b'{"k": 12345}', np.uint8))
        w.copy_from(s, "x")
    with SafetensorsFile(p) as f:
        assert bytes(f.get("j")) == b'{"k": 12345}'
        assert f.get("x").tolist() == [0, 1, 2, 3, 4]
        assert f.metadata == {"a": "b"}
    q = tmp_path / "bad.safetensors"
    with pytest.raises(FormatError, match="declared order: expected 'a', got 'b'"):
        with SafetensorsWriter(q, [("a", "F32", (1,)), ("b", "F32", (1,))]) as w:
            w.write("b", np.zeros(1, np.float32))
    with pytest.raises(ShapeError, match=r"declared shape \(2,\), got \(3,\)"):
        with SafetensorsWriter(q, [("a", "F32", (2,))]) as w:
            w.write("a", np.zeros(3, np.float32))
    with pytest.raises(FormatError, match="were not written"):
        with SafetensorsWriter(q, [("a", "F32", (2,)), ("b", "I8", (1,))]) as w:
            w.write("a", np.zeros(2, np.float32))
    with pytest.raises(DTypeError, match="declared I8"):
        with SafetensorsWriter(q, [("a", "I8", (2,))]) as w:
            w.write("a", np.zeros(2, np.int64))
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors", "w.safetensors"]  # nothing half-written


@pytest.mark.parametrize("case, match", [
    ("short", "8-byte header length"),
    ("hlen", "runs past the end of the file"),
    ("json", "header: not valid JSON"),
    ("size", r"needs 24 bytes, data_offsets \[0, 20\] give 20"),
    ("trunc", "truncated"),
    ("overlap", "overlaps"),
    ("dtype", "unknown dtype 'Q7'"),
    ("shape", "shape must be a list"),
])
def test_bad_files_are_refused(tmp_path, case, match):
    p = tmp_path / "bad.safetensors"
    good = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    data = bytes(24)
    if case == "short":
        p.write_bytes(b"\x01\x02")
    elif case == "hlen":
        p.write_bytes(struct.pack("<Q", 1 << 20) + b"{}")
    elif case == "json":
        p.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    elif case == "size":
        _raw_file(p, {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, data)
    elif case == "trunc":
        _raw_file(p, good, data[:10])
    elif case == "overlap":
        _raw_file(p, {"a": good["a"], "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, data)
    elif case == "dtype":
        _raw_file(p, {"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, data)
    elif case == "shape":
        _raw_file(p, {"a": {"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 24]}}, data)
    with pytest.raises(FormatError, match=match):
        SafetensorsFile(p)


def _header_file(path, text: bytes, data: bytes = bytes(8)):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


_T = '"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'


@pytest.mark.parametrize("header, match", [
    # the spec disallows duplicate keys (json's default keeps the last one silently)
    ('{"a": {%s}, "a": {%s}}' % (_T, _T), "key 'a' appears twice"),
    ('{"a": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}', "key 'dtype' appears twice"),
    ('{"__metadata__": ' + "[" * 50000 + "]" * 50000 + "}", "nested too deeply"),
    ('{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 8]}}', "JSON value out of range"),
    ('{"__metadata__": [], "a": {%s}}' % _T, "__metadata__ must be an object mapping str to str, got list"),
    ('{"__metadata__": "x", "a": {%s}}' % _T, "__metadata__ must be an object mapping str to str, got str"),
    ('{"__metadata__": {"k": 1}, "a": {%s}}' % _T, "the value of 'k' is int 1"),
    ('{"__metadata__": {"k": {"n": "v"}}, "a": {%s}}' % _T, "the value of 'k' is dict"),
    ('{"a": {"dtype": "F32", "shape": [true, 2], "data_offsets": [0, 8]}}', r"holding bool True"),
    ('{"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}', r"holding float 2.0"),
    ('{"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}', r"holding str '2'"),
    ('{"a": {"dtype": "F32", "shape": [[2]], "data_offsets": [0, 8]}}', r"holding list"),
    ('{"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}', "shape must be a list .* got int 2"),
    ('{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', "holding a negative integer -2"),
    ('{"a": {"dtype": "F32", "shape": [4611686018427387904, 4, 0], "data_offsets": [0, 0]}}', "2\\*\\*63 - 1 bytes"),
    ('{"a": {"dtype": "F32", "shape": [%s], "data_offsets": [0, 8]}}' % ",".join(["1"] * 40), "40 dimensions"),
    ('{"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}', "dtype must be a string .* got list"),
    ('{"a": {"dtype": 32, "shape": [2], "data_offsets": [0, 8]}}', "dtype must be a string .* got int"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [false, 8]}}', r"two integers \[begin, end\], got \[False"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}}', r"two integers"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}}', r"two integers"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": {"0": 8}}}', r"two integers"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', r"0 <= begin <= end"),
    ('{"a": [1, 2]}', "expected an object with dtype, shape and data_offsets, got list"),
    ('{"a": {"dtype": "F32", "shape": [2]}}', "data_offsets missing"),
    ('[1, 2]', "header must be a JSON object, got list"),
])
def test_hostile_headers_are_clean_format_errors(tmp_path, header, match):
    """Every malformed header is a FormatError naming the file and what was wrong, never a
    RecursionError / TypeError / ValueError from deeper down, and never accepted."""
    p = tmp_path / "bad.safetensors"
    _header_file(p, header.encode())
    with pytest.raises(FormatError, match=match) as info:
        SafetensorsFile(p)
    assert str(p) in str(info.value)
    assert len(str(info.value)) < 600  # a hostile value does not blow up the message
    with pytest.raises(FormatError):
        load_file(p)


def _fifo_open_returns(target, timeout=10.0):
    """Call ``target()`` in a thread; if it is still blocked after ``timeout`` (a FIFO open
    waiting for a writer), unblock it and fail."""
    import threading

    box = {}

    def run():
        try:
            box["value"] = target()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    return th, box


def test_non_regular_files_are_refused_without_blocking(tmp_path, rng):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    th, box = _fifo_open_returns(lambda: SafetensorsFile(fifo))
    if th.is_alive():  # the regression: open() blocks until a writer appears
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("opening a FIFO named *.safetensors blocked")
    assert isinstance(box.get("error"), FormatError), box
    assert "FIFO" in str(box["error"]) and str(fifo) in str(box["error"])
    os.symlink("/dev/zero", tmp_path / "zero.safetensors")
    with pytest.raises(FormatError, match="character device"):
        SafetensorsFile(tmp_path / "zero.safetensors")
    with pytest.raises(FormatError, match="character device"):
        Checkpoint(tmp_path / "zero.safetensors")
    # a model folder whose single file or index is a FIFO
    (tmp_path / "m").mkdir()
    os.mkfifo(tmp_path / "m" / "model.safetensors")
    with pytest.raises(FormatError, match="FIFO"):
        Checkpoint(tmp_path / "m")
    _sharded(tmp_path / "n", rng)
    os.remove(tmp_path / "n" / "model.safetensors.index.json")
    os.mkfifo(tmp_path / "n" / "model.safetensors.index.json")
    with pytest.raises(FormatError, match="FIFO"):
        Checkpoint(tmp_path / "n")


def test_a_file_truncated_after_opening_is_a_format_error(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file(p, {"a": np.arange(1000, dtype=np.float32), "b": np.arange(3000, dtype=np.float32)})
    with SafetensorsFile(p) as f:
        os.truncate(p, f.info("b").begin + 10)
        assert np.array_equal(f.read_into("a", np.empty(1000, np.float32)), np.arange(1000))
        for read in (lambda: f.read_into("b", np.empty(3000, np.float32)), lambda: f.read_bytes("b"),
                     lambda: f.copy_bytes_to("b", open(os.devnull, "wb")), lambda: f.raw("b")):
            with pytest.raises(FormatError, match="truncated while it was being read"):
                read()
    save_file(p, {"a": np.arange(4, dtype=np.float32)})
    with SafetensorsFile(p) as f:
        with pytest.raises(ShapeError, match="writable C-contiguous"):
            f.read_into("a", np.empty(4, np.float64))
        with pytest.raises(ShapeError, match="writable C-contiguous"):
            f.read_into("a", np.empty(8, np.float32)[::2])


@pytest.mark.parametrize("index, match", [
    ({"weight_map": {"a.weight": "../outside.safetensors"}}, "is not a plain file name"),
    ({"weight_map": {"a.weight": "/etc/passwd.safetensors"}}, "is not a plain file name"),
    ({"weight_map": {"a.weight": "sub/model.safetensors"}}, "is not a plain file name"),
    ({"weight_map": {"a.weight": ".."}}, "is not a plain file name"),
    ({"weight_map": {"a.weight": "config.json"}}, "expected a \\*.safetensors shard name"),
    ({"weight_map": {"a.weight": 3}}, "must be a shard file name .* got int 3"),
    ({"weight_map": ["model-00001-of-00002.safetensors"]}, "expected a 'weight_map' object .* got list"),
    ({"weight_map": {}}, "'weight_map' is empty"),
    ({"metadata": {}}, "got none"),
    ({"metadata": "x", "weight_map": {"a.weight": "model-00001-of-00002.safetensors"}}, "'metadata' must be an object"),
    ([1], "expected a JSON object with a 'weight_map', got list"),
])
def test_checkpoint_index_is_checked(tmp_path, rng, index, match):
    """A hostile model.safetensors.index.json cannot make numlora read outside the folder
    and cannot raise anything but a FormatError naming it."""
    (tmp_path / "outside.safetensors").write_bytes(b"")
    _sharded(tmp_path / "m", rng)
    path = tmp_path / "m" / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match=match) as info:
        Checkpoint(tmp_path / "m")
    assert str(path) in str(info.value)


def test_checkpoint_index_duplicate_key(tmp_path, rng):
    _sharded(tmp_path / "m", rng)
    path = tmp_path / "m" / "model.safetensors.index.json"
    path.write_text('{"weight_map": {"a.weight": "model-00001-of-00002.safetensors", '
                    '"a.weight": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(FormatError, match="'a.weight' appears twice"):
        Checkpoint(tmp_path / "m")


def test_missing_and_directory(tmp_path):
    with pytest.raises(FormatError, match="no such safetensors file"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    with pytest.raises(FormatError, match="regular file, got a folder"):
        SafetensorsFile(tmp_path)


def _sharded(folder, rng, dtype="F32"):
    os.makedirs(folder, exist_ok=True)
    t1 = {"a.weight": rng.standard_normal((4, 3)).astype(np.float32), "ids": np.arange(3)}
    t2 = {"b.weight": rng.standard_normal((2, 4)).astype(np.float32)}
    save_file(os.path.join(folder, "model-00001-of-00002.safetensors"), t1, {"format": "pt"},
              dtypes={"a.weight": dtype})
    save_file(os.path.join(folder, "model-00002-of-00002.safetensors"), t2, {"format": "pt"},
              dtypes={"b.weight": dtype})
    index = {"metadata": {"total_size": 0},
             "weight_map": {"a.weight": "model-00001-of-00002.safetensors", "ids": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return {**t1, **t2}


def test_checkpoint_sharded_and_single(tmp_path, rng):
    t = _sharded(tmp_path / "m", rng)
    with Checkpoint(tmp_path / "m") as ck:
        assert ck.index_name == "model.safetensors.index.json"
        assert [s.name for s in ck.shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert sorted(ck.keys()) == sorted(t)
        for k, v in t.items():
            assert np.array_equal(ck.get(k), v)
    save_file(tmp_path / "one.safetensors", {"w": np.ones(3, np.float32)})
    with Checkpoint(tmp_path / "one.safetensors") as ck:
        assert not ck.is_dir and ck.keys() == ["w"]


def test_checkpoint_bad_folders(tmp_path, rng):
    _sharded(tmp_path / "m", rng)
    os.remove(tmp_path / "m" / "model-00002-of-00002.safetensors")
    with pytest.raises(FormatError, match="names shard 'model-00002-of-00002.safetensors', which is missing"):
        Checkpoint(tmp_path / "m")
    _sharded(tmp_path / "n", rng)
    idx = json.loads((tmp_path / "n" / "model.safetensors.index.json").read_text())
    idx["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "n" / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(FormatError, match="'ghost.weight'"):
        Checkpoint(tmp_path / "n")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FormatError, match="pickled PyTorch files are not read"):
        Checkpoint(tmp_path / "e")
    with pytest.raises(FormatError, match="no such checkpoint"):
        Checkpoint(tmp_path / "absent")


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with AtomicDir(out) as d:
            open(d.join("f"), "w").write("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with AtomicDir(out) as d:
        open(d.join("f"), "w").write("x")
    assert os.listdir(out) == ["f"]
    with pytest.raises(FormatError, match="not empty"):
        AtomicDir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temp_names_and_stale_temp_cleanup(tmp_path):
    from numlora.io import atomic

    host = atomic._HOST
    dead = _dead_pid()
    stale_file = f".numlora-{dead}-{host}-00112233aabb.tmp"
    stale_dir = f".numlora-{dead}-{host}-44556677ccdd.tmp"
    stale_old = f".numlora-old-{dead}-{host}-8899aabbccdd.tmp"
    keep = [f".numlora-1-{host}-0123456789ab.tmp",  # pid 1 is alive
            f".numlora-{dead}-0badc0de-0123456789ab.tmp",  # another host: cannot tell
            ".numlora-abcdef.tmp",  # the old unnamed pattern: cannot tell
            f"numlora-{dead}-{host}-0123456789ab.tmp", "notes.txt"]
    for n in [stale_file] + keep:
        (tmp_path / n).write_text("x")
    for n in (stale_dir, stale_old):
        (tmp_path / n).mkdir()
        (tmp_path / n / "model.safetensors").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / stale_file).write_text("x")  # only the output's own folder is cleaned
    with atomic.AtomicFile(tmp_path / "out.bin") as f:
        name = os.path.basename(f.tmp)
        assert atomic.is_numlora_temp(name) and name.startswith(f".numlora-{os.getpid()}-{host}-")
        f.write(b"data")
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["out.bin", "sub"])
    assert os.listdir(tmp_path / "sub") == [stale_file]
    (tmp_path / stale_dir).mkdir()
    with AtomicDir(tmp_path / "d") as d:
        assert atomic.is_numlora_temp(os.path.basename(d.tmp))
    assert not (tmp_path / stale_dir).exists()


def test_atomic_writes_clean_up_after_os_errors(tmp_path, monkeypatch):
    """Disk full (writes go to /dev/full, so the error arrives at a flush), no permission to
    create the temporary file, a failing commit: an OSError naming the destination, with
    the same errno, and no file left behind."""
    import errno

    from numlora.io import atomic

    full_disk(monkeypatch)
    with pytest.raises(OSError) as info:
        save_file(tmp_path / "a.safetensors", {"x": np.zeros(1 << 16, np.float32)})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "a.safetensors")
    with pytest.raises(OSError) as info:
        atomic.write_text_atomic(tmp_path / "c.json", "{}")  # small: fails only at the commit's flush
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(atomic, "_open_temp", denied)
    with pytest.raises(PermissionError) as info:
        save_file(tmp_path / "a.safetensors", {"x": np.zeros(4, np.float32)})
    assert info.value.filename == str(tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == []


def test_atomic_file_starts_writeback_as_it_goes(tmp_path, monkeypatch):
    """Every WRITEBACK_STEP bytes an AtomicFile flushes and asks the kernel to start writing
    the new range (sync_file_range on Linux): contiguous ranges from byte 0, each at least
    a step long and already in the file when asked; the content is what was written,
    whatever the call returns (advisory: a failing call changes nothing)."""
    from numlora.io import atomic

    if sys.platform.startswith("linux"):  # the real call resolves and accepts a real file
        monkeypatch.setattr(atomic, "_sync_file_range", None)
        with open(tmp_path / "probe", "wb") as f:
            f.write(b"x" * 8192)
            f.flush()
            atomic._start_writeback(f.fileno(), 0, 8192)
        assert atomic._sync_file_range
    calls = []

    def record(fd, offset, nbytes, flags):
        calls.append((offset, nbytes, os.fstat(fd).st_size))
        assert flags == atomic._SYNC_FILE_RANGE_WRITE
        return -1  # as a file system that refuses it

    monkeypatch.setattr(atomic, "_sync_file_range", record)
    monkeypatch.setattr(atomic, "WRITEBACK_STEP", 4096)
    rng = np.random.default_rng(5)
    parts = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(1, 6000, 40)]
    with atomic.AtomicFile(tmp_path / "out.bin") as f:
        for b in parts:
            f.write(b)
    data = b"".join(parts)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert len(calls) >= len(data) // 6000 - 1 and calls[0][0] == 0
    for (o0, n0, size), (o1, _, _) in zip(calls, calls[1:] + [(None, None, None)]):
        assert n0 >= 4096 and size >= o0 + n0  # flushed before it was asked for
        if o1 is not None:
            assert o1 == o0 + n0
    assert calls[-1][0] + calls[-1][1] > len(data) - 6000 - 4096


def test_atomic_dir_removes_the_parents_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with AtomicDir(out):
            assert (tmp_path / "a" / "b").is_dir()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        AtomicDir(tmp_path / "file" / "sub" / "out")
    assert os.listdir(tmp_path) == ["file"]


# --- against the reference implementation ------------------------------------------------
torch = None
try:  # optional peers
    import safetensors.torch as st_torch
    import torch  # noqa: F811
except ImportError:  # pragma: no cover - depends on the environment
    st_torch = None


@pytest.mark.skipif(st_torch is None, reason="needs torch and safetensors: pip install -e '.[test,peers]'")
def test_against_reference_package(tmp_path, rng):
    x = torch.from_numpy(rng.standard_normal((33, 17)).astype(np.float32))
    theirs = {"bf": x.to(torch.bfloat16), "h": x.half(), "f": x, "i": torch.arange(5),
              "u": torch.ones(2, dtype=torch.uint8)}
    p = tmp_path / "t.safetensors"
    st_torch.save_file(theirs, p, metadata={"format": "pt"})
    ours = load_file(p, float32=True)
    assert load_metadata(p) == {"format": "pt"}
    assert np.array_equal(ours["bf"], x.to(torch.bfloat16).float().numpy())
    assert np.array_equal(ours["h"], x.half().float().numpy())
    q = tmp_path / "o.safetensors"
    save_file(q, ours, {"format": "pt"}, dtypes={"bf": "BF16", "h": "F16"})
    back = st_torch.load_file(q)
    for k, v in theirs.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # our float32 -> bfloat16 rounding is torch's
    y = rng.standard_normal(100000).astype(np.float32) * np.float32(1e3)
    theirs = torch.from_numpy(y).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(f32_to_bf16(y), theirs)
    # a file whose length is declared late (header padded with spaces) loads in the reference
    with SafetensorsWriter(tmp_path / "d.safetensors", [("j", "U8", None)]) as w:
        w.write("j", np.arange(3, dtype=np.uint8))
    assert st_torch.load_file(tmp_path / "d.safetensors")["j"].tolist() == [0, 1, 2]


# --- load_file / load_metadata: the contract of safetensors.numpy --------------------------
try:
    import safetensors.numpy as st_numpy
    from safetensors import safe_open
except ImportError:  # pragma: no cover - depends on the environment
    st_numpy = None


def _numpy_dtypes_file(path, rng):
    tensors = {
        "w": rng.standard_normal((5, 3)).astype(np.float32),
        "d": rng.standard_normal(7),
        "h": rng.standard_normal((2, 3)).astype(np.float16),
        "i64": np.array([-(2 ** 40), 0, 3], np.int64),
        "i16": np.array([[-7, 8]], np.int16),
        "u32": np.array([2 ** 31 + 5], np.uint32),
        "b": np.array([True, False, True]),
        "empty": np.zeros((0, 2), np.float32),
        "scalar": np.array(2.5, np.float64),
    }
    save_file(path, tensors, {"format": "np", "note": "x"})
    return tensors


@pytest.mark.skipif(st_numpy is None, reason="needs safetensors: pip install -e '.[test,peers]'")
def test_load_file_returns_what_safetensors_numpy_returns(tmp_path, rng):
    p = tmp_path / "n.safetensors"
    _numpy_dtypes_file(p, rng)
    theirs = st_numpy.load_file(p)
    for kwargs in ({}, {"backend": "pread"}, {"backend": "mmap"}):
        ours = load_file(p, **kwargs)
        assert type(ours) is dict and list(ours) == list(theirs)
        for k, v in theirs.items():
            assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
            assert ours[k].tobytes() == v.tobytes(), k
            assert ours[k].flags.writeable and ours[k].flags.c_contiguous
    with safe_open(p, "np") as f:
        assert load_metadata(p) == f.metadata() == {"format": "np", "note": "x"}
    # a file written by the package reads back the same here, str and PathLike alike
    q = tmp_path / "from_package.safetensors"
    st_numpy.save_file(theirs, str(q), metadata={"a": "b"})
    ours, again = load_file(str(q)), st_numpy.load_file(str(q))
    assert list(ours) == list(again)  # file order (the package writes in its own order)
    assert all(ours[k].dtype == v.dtype and ours[k].tobytes() == v.tobytes() for k, v in theirs.items())
    assert load_metadata(q) == {"a": "b"}
    # no metadata: the package says None, load_metadata an empty dict
    st_numpy.save_file({"z": np.zeros(2, np.float32)}, str(tmp_path / "m.safetensors"))
    with safe_open(tmp_path / "m.safetensors", "np") as f:
        assert f.metadata() is None
    assert load_metadata(tmp_path / "m.safetensors") == {}


@pytest.mark.skipif(st_torch is None, reason="needs torch and safetensors: pip install -e '.[test,peers]'")
def test_load_file_bf16_where_safetensors_numpy_refuses(tmp_path, rng):
    """safetensors.numpy cannot load bfloat16 (numpy has no such dtype): load_file gives the
    uint16 bit patterns, or float32 values with float32=True, both torch's own bits."""
    x = torch.from_numpy(rng.standard_normal((6, 4)).astype(np.float32))
    p = tmp_path / "bf.safetensors"
    st_torch.save_file({"bf": x.to(torch.bfloat16), "h": x.half(), "f": x.double()}, p)
    bits = load_file(p)
    if st_numpy is not None:
        # safetensors.numpy refuses BF16 unless ml_dtypes (numpy's bfloat16) was imported
        # first; then it returns ml_dtypes.bfloat16 arrays: the same bits as ours
        try:
            theirs = st_numpy.load_file(p)
        except TypeError:
            assert "ml_dtypes" not in sys.modules
        else:
            assert theirs["bf"].dtype.name == "bfloat16"
            assert np.array_equal(theirs["bf"].view(np.uint16), bits["bf"])
    assert bits["bf"].dtype == np.uint16 and bits["h"].dtype == np.float16 and bits["f"].dtype == np.float64
    assert np.array_equal(bits["bf"], x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    floats = load_file(p, float32=True)
    assert all(v.dtype == np.float32 for v in floats.values())
    assert np.array_equal(floats["bf"], x.to(torch.bfloat16).float().numpy())
    assert np.array_equal(floats["h"], x.half().float().numpy())
    assert np.array_equal(floats["f"], x.double().float().numpy())
    # the bits go back out as BF16 unchanged
    q = tmp_path / "back.safetensors"
    save_file(q, bits, dtypes={"bf": "BF16"})
    assert torch.equal(st_torch.load_file(q)["bf"], x.to(torch.bfloat16))


def test_load_file_arguments_are_checked(tmp_path, rng):
    p = tmp_path / "a.safetensors"
    save_file(p, {"a": np.zeros(3, np.float32)})
    with pytest.raises(ConfigError, match="backend must be 'mmap' or 'pread', got 'disk'"):
        load_file(p, backend="disk")
    with pytest.raises(ConfigError, match="float32 must be True or False"):
        load_file(p, float32="yes")
    with pytest.raises(TypeError):
        load_file(p, True)  # float32 is keyword-only, as the package has no second positional argument
    with pytest.raises(FormatError, match="no-such"):
        load_metadata(tmp_path / "no-such.safetensors")
