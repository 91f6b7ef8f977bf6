"""Property-based fuzz suite over numlora's readers with mutated bytes (issue 12).

Files are first written by numlora itself (safetensors files, PEFT folders, bitsandbytes
state dicts, sharded checkpoints), then mutated: bit flips, truncation, appended bytes,
a rewritten header length, and structured edits of the JSON (duplicate keys, deep
nesting, wrong types, negative / huge shapes and offsets, booleans, non-UTF-8...).

The property: a clear NumloraError (non-empty message), or a load that agrees with a
strict reference reading of the same bytes (written here from the format's spec) - and
never a crash, a hang, a MemoryError or a RecursionError. Where the reference reading
finds the file invalid (a duplicate key, an overlap, a size that does not match...),
only a refusal is right.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import numlora
from numlora.io import SafetensorsFile, load_file, load_metadata, save_file
from numlora.io.checkpoint import Checkpoint

from fuzz_util import Example, Violation, collecting, expect_close, fuzz_guard, fuzz_settings, fuzz_summary  # noqa: F401
from reference import nf4_dequantize_ref

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?", "F8_E4M3": "u1",
          "F8_E5M2": "u1"}


def _run(name, prop, n, setup=None):
    with collecting(name) as col:
        tmp = tempfile.mkdtemp(prefix="numlora-fuzz-")
        try:
            ctx = setup(tmp) if setup else None

            @fuzz_settings(n)
            @given(st.data())
            def inner(data):
                prop(Example(col, data), tmp, ctx)

            inner()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# --- the reference reading of a safetensors file ------------------------------------------------------
class Invalid(Exception):
    pass


def _pairs_no_dupes(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise Invalid(f"duplicate key in {keys}")
    return dict(pairs)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def ref_read(blob: bytes):
    """(tensors {name: (dtype, shape, raw bytes)}, metadata) per the safetensors spec, or
    raise Invalid."""
    if len(blob) < 8:
        raise Invalid("shorter than the header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > 100 * 1024 * 1024 or 8 + n > len(blob):
        raise Invalid("header length")
    try:
        text = blob[8:8 + n].decode("utf-8")
        header = json.loads(text, object_pairs_hook=_pairs_no_dupes,
                            parse_constant=lambda c: (_ for _ in ()).throw(Invalid(c)))
    except Invalid:
        raise
    except RecursionError:
        raise Invalid("nesting") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise Invalid(f"json: {e}") from None
    if not isinstance(header, dict):
        raise Invalid("header not an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or
                             not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise Invalid("metadata")
    data = blob[8 + n:]
    out = {}
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise Invalid("an entry without dtype, shape and data_offsets")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise Invalid("dtype")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise Invalid("shape")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise Invalid("offsets")
        b, en = offs
        nbytes = math.prod(shape) * np.dtype(DTYPES[dt]).itemsize
        if not 0 <= b <= en or en - b != nbytes or en > len(data):
            raise Invalid("offsets/size")
        spans.append((b, en, name))
        out[name] = (dt, tuple(shape), data[b:en])
    spans.sort()
    end = 0
    for b, en, _name in spans:
        if b < end and en > b:
            raise Invalid("overlap")
        end = max(end, en)
    return out, meta or {}


def ref_array(dt, shape, raw, float32=True):
    a = np.frombuffer(raw, np.dtype(DTYPES[dt])).reshape(shape)
    if float32 and dt == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    if float32 and dt in ("F64", "F32", "F16"):
        return a.astype(np.float32)
    return a


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=") and \
        np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


# --- mutations ---------------------------------------------------------------------------------------------------
DEEP = 100_000

VALUE_EDITS = {
    "dtype": ["F33", "f32", 5, None, ["F32"], "BF16", "U64", "F8_E4M3", ""],
    "shape": [[-1, 3], [2 ** 62, 2 ** 62], [True, 2], [2.0, 3], "23", [[2]], [], [0], [10 ** 30], [2 ** 64],
              [1] * 64, None, [-0], [3, -2]],
    "data_offsets": [[-8, 0], [0, 2 ** 64], [0], [5, 3], [0, 24.0], "0,24", [True, False], [0, 0], [1, 25],
                     [2 ** 63, 2 ** 63 + 24], [0, 10 ** 30], None, [0, 24, 48]],
}


def _header_of(blob):
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _assemble(text: bytes, data: bytes, length=None):
    pad = (-(8 + len(text))) % 8
    text = text + b" " * pad
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def mutate_safetensors(ex, blob: bytes) -> bytes:
    """A mutated copy of the safetensors bytes ``blob``; the mutation is recorded in ex."""
    kind = ex.choice("mutation", ["none", "bitflip", "bitflip", "truncate", "append", "header_len", "edit", "edit",
                                  "edit", "edit", "dupkey", "deep", "meta", "text", "swap_offsets"])
    if kind != "none":
        ex.bad.append(kind)
    data = bytearray(blob)
    header, body = _header_of(blob)
    names = [k for k in header if k != "__metadata__"]
    if kind == "bitflip":
        for _ in range(ex.draw(st.integers(1, 4))):
            i = ex.draw(st.integers(0, len(data) - 1), "byte")
            data[i] ^= 1 << ex.draw(st.integers(0, 7))
        return bytes(data)
    if kind == "truncate":
        return bytes(data[:ex.draw(st.integers(0, len(data) - 1), "length")])
    if kind == "append":
        return bytes(data) + bytes(ex.draw(st.binary(min_size=1, max_size=16), "tail"))
    if kind == "header_len":
        (n,) = struct.unpack("<Q", blob[:8])
        v = ex.choice("new_len", [0, 1, n - 1, n + 1, n + 8, len(blob), 2 ** 63, 2 ** 64 - 1, 100 * 2 ** 20 + 1])
        return struct.pack("<Q", v % 2 ** 64) + bytes(data[8:])
    if kind == "edit" and names:
        name = ex.choice("tensor", names)
        field = ex.choice("field", ["dtype", "shape", "data_offsets", "drop", "extra", "not-a-dict", "rename"])
        e = dict(header[name])
        if field in VALUE_EDITS:
            e[field] = ex.choice("value", VALUE_EDITS[field])
        elif field == "drop":
            e.pop(ex.choice("dropped", ["dtype", "shape", "data_offsets"]))
        elif field == "extra":
            e["x"] = 1
        elif field == "not-a-dict":
            e = ex.choice("entry", [[1, 2], "F32", None, 3])
        header[name] = e
        if field == "rename":
            header[ex.choice("new_name", ["", "__metadata__x", "a" * 1000, "\u00e9\u0000", "x"])] = header.pop(name)
        text = json.dumps(header).encode()
        return _assemble(text, body)
    if kind == "dupkey" and names:
        name = ex.choice("tensor", names)
        other = json.dumps(header[names[-1]])
        text = json.dumps(header).encode()
        dup = f'"{name}": {other}, '.encode()
        text = text[:1] + dup + text[1:]
        return _assemble(text, body)
    if kind == "deep":
        where = ex.choice("where", ["value", "metadata", "top", "shape"])
        depth = ex.choice("depth", [DEEP, 5000, 1000])
        nest = "[" * depth + "]" * depth
        if where == "top":
            text = nest.encode()
        else:
            base = json.dumps(header)
            if where == "metadata":
                text = ('{"__metadata__": {"a": ' + nest + "}, " + base[1:]).encode()
            elif where == "shape" and names:
                e = header[names[0]]
                text = base.replace(json.dumps(e), json.dumps(e).replace(json.dumps(e["shape"]), nest, 1), 1).encode()
            else:
                text = ('{"zz": ' + nest + ", " + base[1:]).encode()
        return _assemble(text, body)
    if kind == "meta":
        header["__metadata__"] = ex.choice("metadata", [[1], 5, "x", {"a": 1}, {"a": None}, {"a": {"b": "c"}}, None,
                                                        {}, {"a": "b" * 100}])
        return _assemble(json.dumps(header).encode(), body)
    if kind == "text":
        (n,) = struct.unpack("<Q", blob[:8])
        t = bytes(blob[8:8 + n])
        how = ex.choice("how", ["bom", "latin1", "nan", "inf", "bigint", "trailing", "list", "empty", "nul"])
        t = {"bom": lambda: b"\xef\xbb\xbf" + t, "latin1": lambda: t.replace(b"{", b"{\"\xe9\": 1, ", 1),
             "nan": lambda: t.replace(b"[", b"[NaN, ", 1), "inf": lambda: t.replace(b"[", b"[1e400, ", 1),
             "bigint": lambda: t.replace(b"[", b"[" + b"9" * 5000 + b", ", 1), "trailing": lambda: t + b"{}",
             "list": lambda: b"[" + t + b"]", "empty": lambda: b"", "nul": lambda: t.replace(b" ", b"\x00")}[how]()
        return _assemble(t, body)
    if kind == "swap_offsets" and len(names) >= 2:
        a, b = names[0], names[1]
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        return _assemble(json.dumps(header).encode(), body)
    return blob


# --- safetensors ------------------------------------------------------------------------------------------------
def _st_setup(tmp):
    rng = np.random.default_rng(0)
    tensors = {
        "w": rng.standard_normal((2, 3)).astype(np.float32),
        "d": rng.standard_normal(3),
        "i": np.array([1, -2], np.int64),
        "u": np.arange(5, dtype=np.uint8),
        "h": rng.standard_normal((2, 2)).astype(np.float16),
        "b": np.array([True, False, True]),
        "z": np.zeros((0, 3), np.float32),
        "bf": rng.standard_normal(4).astype(np.float32),
    }
    path = os.path.join(tmp, "base.safetensors")
    save_file(path, tensors, {"format": "pt"}, dtypes={"bf": "BF16"})
    with open(path, "rb") as f:
        return f.read()


def _check_safetensors_load(ex, path, blob):
    """Open + read every tensor with numlora; compare with the reference reading."""
    try:
        ref = ref_read(blob)
    except Invalid as e:
        ref = None
        why = str(e)

    def load():
        with SafetensorsFile(path) as f:
            got = {k: (f.get(k), f.raw(k), f.info(k)) for k in f.keys()}
            meta = dict(f.metadata)
        full, meta2 = load_file(path, float32=True), load_metadata(path)
        return got, meta, full, meta2

    def expect(res):
        got, meta, full, meta2 = res
        tensors, rmeta = ref
        if set(got) != set(tensors) or set(full) != set(tensors):
            raise Violation("safetensors: loaded tensor names differ from the header's",
                            f"{sorted(got)} vs {sorted(tensors)}")
        if meta != rmeta or meta2 != rmeta:
            raise Violation("safetensors: metadata differs from the header's")
        for k, (dt, shape, raw) in tensors.items():
            g, r, info = got[k]
            if not _same(r, ref_array(dt, shape, raw, False)):
                raise Violation("safetensors: raw() bytes differ from the header's data_offsets", k)
            if not _same(g, ref_array(dt, shape, raw)) or not _same(full[k], ref_array(dt, shape, raw)):
                raise Violation("safetensors: get() / load_file values differ from the reference decoding", k)

    ex.call(load, expect=expect, must_refuse=None if ref is not None else f"the reference finds it invalid ({why})")


def prop_safetensors(ex, tmp, base):
    blob = mutate_safetensors(ex, base)
    path = os.path.join(tmp, "m.safetensors")
    with open(path, "wb") as f:
        f.write(blob)
    _check_safetensors_load(ex, path, blob)


def test_safetensors_mutated():
    _run("safetensors reader", prop_safetensors, 700, _st_setup)


# --- PEFT folders -----------------------------------------------------------------------------------------------
def _peft_setup(tmp):
    rng = np.random.default_rng(1)
    cfg = numlora.LoraConfig(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"), rank_pattern={"v_proj": 1})
    ad = numlora.LoraAdapter(cfg)
    ad.add_lora("model.layers.0.q_proj", rng.standard_normal((2, 4)).astype(np.float32),
                rng.standard_normal((3, 2)).astype(np.float32))
    ad.add_lora("model.layers.0.v_proj", rng.standard_normal((1, 4)).astype(np.float32),
                rng.standard_normal((3, 1)).astype(np.float32))
    src = os.path.join(tmp, "peft-src")
    ad.save_peft(src)
    with open(os.path.join(src, "adapter_config.json"), "rb") as f:
        cfg_bytes = f.read()
    with open(os.path.join(src, "adapter_model.safetensors"), "rb") as f:
        st_bytes = f.read()
    return cfg_bytes, st_bytes


CFG_EDITS = {
    "r": [0, -1, "8", 2 ** 64, 8.5, True, None, 2, 10 ** 400, []],
    "lora_alpha": [1e39, -1, 0, "16", None, 1e308, True, 3.4e38, 1e-45, [1]],
    "lora_dropout": [1.0, -0.1, "0.1", None, 1e39],
    "target_modules": [5, [1], {"a": 1}, "(", "q_proj", None, [], [None]],
    "rank_pattern": ["x", {"(": 2}, {"v_proj": "b"}, [], {"v_proj": 0}, {"v_proj": 2 ** 64}, {"v_proj": True}, None],
    "alpha_pattern": [{"v_proj": 1e39}, {"v_proj": -2}, {"v_proj": "a"}, [], {"(": 1.0}],
    "peft_type": ["LORA ", None, "lora", 1, "PREFIX_TUNING"],
    "use_rslora": ["yes", 1, None, True],
    "fan_in_fan_out": ["no", 2, True],
    "use_dora": [True, "x"],
    "lora_bias": [True, 1],
    "bias": ["all", None, 5],
    "layers_to_transform": [[0], 5],
    "base_model_name_or_path": [5, ["a"], None],
    "task_type": [5, {"a": 1}],
}


def prop_peft(ex, tmp, ctx):
    cfg_bytes, st_bytes = ctx
    folder = os.path.join(tmp, f"peft-{ex.seed() % 4}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    target = ex.choice("target", ["config", "config", "config", "weights", "weights", "files", "tensors"])
    cfg_out, st_out = cfg_bytes, st_bytes
    if target == "config":
        cfg = json.loads(cfg_bytes)
        how = ex.choice("how", ["edit", "edit", "edit", "drop", "deep", "dupkey", "latin1", "list", "empty", "nan"])
        ex.bad.append(f"config:{how}")
        if how == "edit":
            key = ex.choice("key", sorted(CFG_EDITS))
            cfg[key] = ex.choice("value", CFG_EDITS[key])
            cfg_out = json.dumps(cfg).encode()
        elif how == "drop":
            cfg.pop(ex.choice("key", sorted(cfg)))
            cfg_out = json.dumps(cfg).encode()
        elif how == "deep":
            cfg_out = ('{"r": ' + "[" * DEEP + "]" * DEEP + ', "peft_type": "LORA"}').encode()
        elif how == "dupkey":
            cfg_out = b'{"r": 1, ' + json.dumps(cfg).encode()[1:]
        elif how == "latin1":
            cfg_out = b'{"\xe9": 1, ' + json.dumps(cfg).encode()[1:]
        elif how == "list":
            cfg_out = b"[" + json.dumps(cfg).encode() + b"]"
        elif how == "empty":
            cfg_out = b""
        elif how == "nan":
            cfg["lora_alpha"] = float("nan")
            cfg_out = json.dumps(cfg).encode()
    elif target == "weights":
        st_out = mutate_safetensors(ex, st_bytes)
    elif target == "tensors":
        # numlora writes a valid safetensors file whose tensors are wrong for an adapter
        good, _ = ref_read(st_bytes)
        tensors = {k: ref_array(*v) for k, v in good.items()}
        k = ex.choice("key", sorted(tensors))
        how = ex.choice("tensor_edit", ["int32", "1-D", "3-D", "transpose", "nan", "inf", "huge", "drop", "empty",
                                        "f64", "embedding", "extra", "rank+1"])
        ex.bad.append(f"tensor:{how}:{k}")
        a = tensors[k]
        if how == "int32":
            tensors[k] = a.astype(np.int32)
        elif how == "1-D":
            tensors[k] = a.reshape(-1)
        elif how == "3-D":
            tensors[k] = a[None]
        elif how == "transpose":
            tensors[k] = np.ascontiguousarray(a.T)
        elif how == "nan":
            a = a.copy()
            a.reshape(-1)[0] = np.nan
            tensors[k] = a
        elif how == "inf":
            a = a.copy()
            a.reshape(-1)[-1] = -np.inf
            tensors[k] = a
        elif how == "huge":
            tensors[k] = (a * np.float32(1e38)).astype(np.float32)
        elif how == "drop":
            del tensors[k]
        elif how == "empty":
            tensors[k] = np.zeros((0,) + a.shape[1:], np.float32)
        elif how == "f64":
            tensors[k] = a.astype(np.float64)
        elif how == "embedding":
            tensors["base_model.model.embed.lora_embedding_A"] = a
        elif how == "extra":
            tensors["base_model.model.x.lora_A.weight.extra"] = a
        elif how == "rank+1":
            tensors[k] = np.concatenate([a, a[:1]], axis=0) if "lora_A" in k else np.concatenate([a, a[:, :1]], 1)
        p = os.path.join(tmp, "t.safetensors")
        save_file(p, tensors)
        with open(p, "rb") as f:
            st_out = f.read()
    else:
        how = ex.choice("files", ["no-config", "no-weights", "config-dir", "weights-dir", "bin-only", "path-file",
                                  "missing"])
        ex.bad.append(f"files:{how}")
    with open(os.path.join(folder, "adapter_config.json"), "wb") as f:
        f.write(cfg_out)
    with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as f:
        f.write(st_out)
    path = folder
    if target == "files":
        if how == "no-config":
            os.remove(os.path.join(folder, "adapter_config.json"))
        elif how == "no-weights":
            os.remove(os.path.join(folder, "adapter_model.safetensors"))
        elif how == "config-dir":
            os.remove(os.path.join(folder, "adapter_config.json"))
            os.mkdir(os.path.join(folder, "adapter_config.json"))
        elif how == "weights-dir":
            os.remove(os.path.join(folder, "adapter_model.safetensors"))
            os.mkdir(os.path.join(folder, "adapter_model.safetensors"))
        elif how == "bin-only":
            os.rename(os.path.join(folder, "adapter_model.safetensors"), os.path.join(folder, "adapter_model.bin"))
        elif how == "path-file":
            path = os.path.join(folder, "adapter_config.json")
        elif how == "missing":
            path = os.path.join(folder, "nope")
    try:
        ref_tensors, _ = ref_read(st_out)
    except Invalid:
        ref_tensors = None

    def expect(ad):
        if not isinstance(ad, numlora.LoraAdapter):
            raise Violation("load_peft_adapter returned no LoraAdapter")
        if ref_tensors is None:
            raise Violation("load_peft_adapter accepted a safetensors file the reference finds invalid")
        x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
        for name, layer in ad.items():
            key = "base_model.model." + name
            ra = ref_array(*ref_tensors[key + ".lora_A.weight"]).astype(np.float32)
            rb = ref_array(*ref_tensors[key + ".lora_B.weight"]).astype(np.float32)
            if not _same(np.asarray(layer.lora_a, np.float32), ra) or not _same(np.asarray(layer.lora_b, np.float32),
                                                                                rb):
                raise Violation("load_peft_adapter: layer tensors differ from the file's", name)
            s = layer.scaling
            if not (math.isfinite(s) and abs(s) <= 3.4028234663852886e38 and s > 0):
                raise Violation("load_peft_adapter: a layer's scaling is not finite in float32 / positive", f"{s}")
            # the loaded layer must compute (or refuse) cleanly
            w = np.ones(layer.base_shape, np.float32)
            y = layer.attach(w).forward(x) if layer.in_features == 4 else None
            if y is not None:
                w = w.T if layer.fan_in_fan_out else w
                ref = x.astype(np.float64) @ w.T + s * (x.astype(np.float64) @ ra.T.astype(np.float64)) @ \
                    rb.T.astype(np.float64)
                bnd = np.abs(x) @ np.abs(w).T + s * (np.abs(x) @ np.abs(ra).T) @ np.abs(rb).T
                expect_close("forward of a loaded PEFT layer", y, ref, bnd)

    ex.call(lambda: numlora.load_peft_adapter(path), expect=expect)


def test_peft_folder_mutated():
    _run("PEFT folder reader", prop_peft, 300, _peft_setup)


# --- NF4 state dicts -----------------------------------------------------------------------------------------------
QS = "quant_state.bitsandbytes__nf4"
QS_EDITS = {
    "blocksize": [2 ** 63, -64, 0, 64.0, True, "64", 2 ** 20 + 1, 2 ** 64, None, 1, 3],
    "shape": [[-4, -8], [2 ** 63, 2], [2 ** 32, 2 ** 32], [True, 32], [4.0, 8], "32", [], [[4], 8], [2 ** 64, 16],
              [32, 1], [1, 32], [-1, -32], [8, 4], [0, 32]],
    "dtype": ["int8", 5, None, "float64", "bfloat16", "float16"],
    "quant_type": ["fp4", None, 4],
    "nested_blocksize": [128, "256", 256.0, True],
    "nested_offset": [math.nan, "0.1", 1e39, None, 10 ** 400, [0.1]],
    "nested_dtype": ["float16", 1],
    "extra": [1],
}


def _sd_setup(tmp):
    w = np.random.default_rng(2).uniform(-2, 2, (4, 8)).astype(np.float32)
    return {dq: numlora.quantize_nf4(w, 16, double_quant=dq) for dq in (False, True)}


def prop_state_dict(ex, tmp, tensors):
    dq = ex.flag("double_quant", 0.3)
    t = tensors[dq]
    prefix = ex.choice("prefix", ["model.l0", "model.l0", "", "a"])
    sd = {k: np.array(v, copy=True) for k, v in t.to_state_dict(prefix).items()}
    w = f"{prefix}.weight" if prefix else "weight"
    qs_key = f"{w}.{QS}"
    read_prefix = prefix
    target = ex.choice("target", ["json", "json", "json", "array", "array", "keys", "mapping", "prefix", "raw"])
    meta = json.loads(sd[qs_key].tobytes())
    if target == "json":
        field = ex.choice("field", sorted(QS_EDITS))
        val = ex.choice("value", QS_EDITS[field])
        ex.bad.append(f"{field}={val!r}")
        if field == "extra":
            meta["extra"] = 1
        else:
            meta[field] = val
        sd[qs_key] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()
    elif target == "raw":
        how = ex.choice("how", ["deep", "dupkey", "latin1", "list", "empty", "nan", "2-D", "int8", "bitflip"])
        ex.bad.append(f"quant_state:{how}")
        raw = json.dumps(meta).encode()
        raw = {"deep": lambda: ("[" * DEEP + "]" * DEEP).encode(), "dupkey": lambda: b'{"blocksize": 2, ' + raw[1:],
               "latin1": lambda: b'{"\xe9": 1, ' + raw[1:], "list": lambda: b"[" + raw + b"]",
               "empty": lambda: b"", "nan": lambda: raw.replace(b'"blocksize": 16', b'"blocksize": NaN'),
               "2-D": lambda: raw, "int8": lambda: raw, "bitflip": lambda: raw}[how]()
        arr = np.frombuffer(raw, np.uint8).copy()
        if how == "2-D":
            arr = arr.reshape(1, -1)
        elif how == "int8":
            arr = arr.view(np.int8)
        elif how == "bitflip" and arr.size:
            arr[ex.draw(st.integers(0, arr.size - 1))] ^= 1 << ex.draw(st.integers(0, 7))
        sd[qs_key] = arr
    elif target == "array":
        k = ex.choice("key", sorted(k for k in sd if k != qs_key))
        how = ex.choice("array_edit", ["reversed", "strided", "F", "dtype", "shape", "nan", "inf", "list", "drop",
                                       "bitflip", "readonly", "big"])
        ex.bad.append(f"{k}:{how}")
        a = sd[k]
        if how == "reversed":
            sd[k] = np.ascontiguousarray(a[::-1])[::-1]
        elif how == "strided":
            big = np.zeros((a.shape[0] * 2,) + a.shape[1:], a.dtype)
            big[::2] = a
            sd[k] = big[::2]
        elif how == "F":
            sd[k] = np.asfortranarray(a.reshape(a.shape[0], -1)).reshape(a.shape, order="A")
        elif how == "dtype":
            sd[k] = a.astype(ex.choice("dtype", [np.float64, np.int8, np.float16, np.uint16, np.float32]))
        elif how == "shape":
            sd[k] = ex.choice("shape", ["flat", "2d", "short"]) and a.reshape(-1)[: max(0, a.size - 1)]
        elif how in ("nan", "inf") and a.dtype == np.float32 and a.size:
            a = a.copy()
            a.reshape(-1)[0] = np.nan if how == "nan" else np.inf
            sd[k] = a
        elif how == "list":
            sd[k] = a.tolist()
        elif how == "drop":
            del sd[k]
        elif how == "bitflip" and a.size:
            b = a.copy()
            b.view(np.uint8).reshape(-1)[ex.draw(st.integers(0, b.nbytes - 1))] ^= 1 << ex.draw(st.integers(0, 7))
            sd[k] = b
        elif how == "readonly":
            a.flags.writeable = False
        elif how == "big":
            sd[k] = np.zeros(a.size * 2, a.dtype)
    elif target == "keys":
        how = ex.choice("keys", ["fp4", "extra-nested", "int-key", "other-prefix"])
        ex.bad.append(f"keys:{how}")
        if how == "fp4":
            sd[f"{w}.quant_state.bitsandbytes__fp4"] = sd[qs_key]
        elif how == "extra-nested" and not dq:
            sd[f"{w}.nested_absmax"] = np.zeros(1, np.float32)
        elif how == "int-key":
            sd[5] = np.zeros(1)
        elif how == "other-prefix":
            read_prefix = "other"
    elif target == "mapping":
        sd = ex.choice("mapping", [None, [1], "x", 5])
        ex.bad.append(f"mapping={sd!r}")
    else:
        read_prefix = ex.choice("read_prefix", [".a", "a.", "a..b", 5, None, b"a"])
        ex.bad.append(f"prefix={read_prefix!r}")
    snap_inputs = {"sd": sd} if isinstance(sd, dict) else {}

    def expect(t2):
        if not isinstance(t2, numlora.NF4Tensor):
            raise Violation("from_state_dict returned no NF4Tensor")
        m = json.loads(np.asarray(sd[qs_key]).tobytes())
        dims = m["shape"]
        n = math.prod(dims)
        packed = np.asarray(sd[w]).reshape(-1)
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in dims) or (n + 1) // 2 != packed.size:
            raise Violation("from_state_dict accepted a shape that does not fit the packed codes", f"{dims}")
        if tuple(t2.shape) != tuple(dims) or t2.blocksize != m["blocksize"]:
            raise Violation("from_state_dict: shape / blocksize differ from the quant state")
        absmax = np.asarray(sd[f"{w}.absmax"])
        if "nested_offset" in m:
            q = absmax.astype(np.int64)
            sc = (np.asarray(sd[f"{w}.nested_quant_map"], np.float32)[q] *
                  np.asarray(sd[f"{w}.nested_absmax"], np.float32)[np.arange(q.size) // 256] +
                  np.float32(m["nested_offset"])).astype(np.float32)
        else:
            sc = absmax.astype(np.float32)
        ref = nf4_dequantize_ref(packed, sc, m["blocksize"], n).reshape(dims)
        got = numlora.dequantize_nf4(t2)
        if np.asarray(got).tobytes() != ref.tobytes():
            expect_close("dequantize of a state-dict tensor", got, ref, np.abs(ref) + 1e-30)

    ex.call(lambda: numlora.NF4Tensor.from_state_dict(sd, read_prefix), inputs=snap_inputs, expect=expect)


def test_nf4_state_dict_mutated():
    _run("NF4Tensor.from_state_dict", prop_state_dict, 400, _sd_setup)


# --- checkpoints ------------------------------------------------------------------------------------------------------
def _ckpt_setup(tmp):
    rng = np.random.default_rng(3)
    src = os.path.join(tmp, "ckpt-src")
    os.makedirs(src)
    shards = {"model-00001-of-00002.safetensors": {"a.weight": rng.standard_normal((2, 3)).astype(np.float32),
                                                   "a.bias": rng.standard_normal(2).astype(np.float32)},
              "model-00002-of-00002.safetensors": {"b.weight": rng.standard_normal((3, 2)).astype(np.float32)}}
    blobs = {}
    wmap = {}
    for name, tensors in shards.items():
        p = os.path.join(src, name)
        save_file(p, tensors)
        with open(p, "rb") as f:
            blobs[name] = f.read()
        wmap.update({k: name for k in tensors})
    index = {"metadata": {"total_size": 40}, "weight_map": wmap}
    # a valid safetensors file outside the folder, which an index must not be able to name
    save_file(os.path.join(tmp, "outside.safetensors"), {"secret": np.ones(2, np.float32)})
    return blobs, index


INDEX_EDITS = ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", 5, None, "", ".",
               "model-00002-of-00002.safetensors", "missing.safetensors", "model-00001-of-00002.safetensors\u0000"]


def prop_checkpoint(ex, tmp, ctx):
    blobs, index = ctx
    folder = os.path.join(tmp, f"ckpt-{ex.seed() % 4}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    index = json.loads(json.dumps(index))
    blobs = dict(blobs)
    target = ex.choice("target", ["index", "index", "shard", "shard", "single", "none"])
    idx_bytes = None
    if target == "index":
        how = ex.choice("how", ["map-value", "map-value", "map-type", "meta", "deep", "dupkey", "latin1", "list",
                                "drop-entry", "extra-entry", "empty"])
        ex.bad.append(f"index:{how}")
        if how == "map-value":
            index["weight_map"][ex.choice("tensor", sorted(index["weight_map"]))] = ex.choice("value", INDEX_EDITS)
        elif how == "map-type":
            index["weight_map"] = ex.choice("map", [[1], "x", None, 5, {}])
        elif how == "meta":
            index["metadata"] = ex.choice("metadata", [[1], "x", 5, {"total_size": "big"}])
        elif how == "drop-entry":
            index["weight_map"].pop("a.bias")
        elif how == "extra-entry":
            index["weight_map"]["c.weight"] = "model-00001-of-00002.safetensors"
        idx_bytes = json.dumps(index).encode()
        if how == "deep":
            idx_bytes = ('{"weight_map": ' + "[" * DEEP + "]" * DEEP + "}").encode()
        elif how == "dupkey":
            idx_bytes = b'{"weight_map": {"a.weight": "model-00002-of-00002.safetensors"}, ' + idx_bytes[1:]
        elif how == "latin1":
            idx_bytes = b'{"\xe9": 1, ' + idx_bytes[1:]
        elif how == "list":
            idx_bytes = b"[" + idx_bytes + b"]"
        elif how == "empty":
            idx_bytes = b""
    elif target == "shard":
        name = ex.choice("shard", sorted(blobs))
        blobs[name] = mutate_safetensors(ex, blobs[name])
    if target == "single":
        name = "model-00001-of-00002.safetensors"
        blob = mutate_safetensors(ex, blobs[name])
        path = os.path.join(folder, "single.safetensors")
        with open(path, "wb") as f:
            f.write(blob)
        expected = {"single.safetensors": blob}
    else:
        for name, blob in blobs.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(blob)
        with open(os.path.join(folder, "model.safetensors.index.json"), "wb") as f:
            f.write(idx_bytes if idx_bytes is not None else json.dumps(index).encode())
        path = folder
        expected = blobs
    # the reference: every shard valid and the index placing each tensor where it is
    refs = {}
    invalid = None
    for name, blob in expected.items():
        try:
            refs[name] = ref_read(blob)[0]
        except Invalid as e:
            invalid = f"shard {name}: {e}"
    if target == "index":
        try:
            ix = json.loads(idx_bytes, object_pairs_hook=_pairs_no_dupes)
            wm = ix["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) and v in refs for v in wm.values()):
                raise Invalid("weight_map")
            for k, v in wm.items():
                if k not in refs[v]:
                    raise Invalid(f"{k} not in {v}")
            if "metadata" in ix and not isinstance(ix["metadata"], dict):
                raise Invalid("metadata")
        except (Invalid, ValueError, KeyError, TypeError, RecursionError) as e:
            invalid = invalid or f"index: {type(e).__name__} {e}"

    if target != "single" and invalid is None:
        named = set(json.loads(idx_bytes if idx_bytes is not None else json.dumps(index))["weight_map"].values())
        refs = {k: v for k, v in refs.items() if k in named}  # an index opens the shards it names

    def load():
        with Checkpoint(path) as c:
            return {k: np.array(c.get(k), copy=True) for k in c.keys()}

    def expect(got):
        want = {k: ref_array(*v) for r in refs.values() for k, v in r.items()}
        if set(got) != set(want):
            raise Violation("Checkpoint: tensor names differ from the shards'", f"{sorted(got)} vs {sorted(want)}")
        for k in want:
            if not _same(got[k], want[k]):
                raise Violation("Checkpoint: tensor values differ from the reference decoding", k)

    ex.call(load, expect=expect, must_refuse=invalid)


def test_checkpoint_mutated():
    _run("Checkpoint reader", prop_checkpoint, 300, _ckpt_setup)
