"""Whole-checkpoint jobs behind ``numlora merge``, ``numlora quantize`` and ``numlora inspect``.

Both converters stream: one tensor is in memory at a time (as float32 while it is being
worked on), so peak memory follows the largest tensor, not the model. Tensors that are
not changed are copied byte for byte in chunks, never decoded. The output (a file, or a
folder for a folder) appears only when it is complete: files are written under temporary
names and renamed at the end; an interrupted or failed run (an exception, Ctrl-C,
SIGTERM under the CLI, disk full, a file-size limit, an input that changes) leaves
nothing behind, and an OS error becomes a :class:`~numlora.errors.FormatError` naming the
file and the cause. Inputs are read with ``pread`` (a truncated input is an error, not
SIGBUS) and never written to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field

import numpy as np

from ._progress import Progress
from .errors import ConfigError, FormatError, NonFiniteError, ShapeError
from .io._files import brief, describe_os_error, parse_json, read_json, regular_file_error
from .io.atomic import AtomicDir, check_interrupt, cleanup_scope, is_numlora_temp, point_of_no_return, write_text_atomic
from .io.checkpoint import Checkpoint
from .io.safetensors import DTYPES, SafetensorsFile, SafetensorsWriter

__all__ = [
    "DTYPE_NAMES",
    "MergeReport",
    "QuantizeReport",
    "inspect_path",
    "match_modules",
    "merge_checkpoint",
    "quantize_checkpoint",
]

DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
_ST_TO_NAME = {v: k for k, v in DTYPE_NAMES.items()}
DEFAULT_QUANT_EXCLUDE = r"(embed|norm|lm_head|(^|\.)wte|(^|\.)wpe|(^|\.)ln_)"


# --- output -----------------------------------------------------------------------------
def _real(p: str) -> str:
    """``p`` with every symlink of its existing part resolved (a path that does not exist
    yet resolves through its existing parents)."""
    return os.path.realpath(os.path.abspath(os.fspath(p)))


def _within(inner: str, outer: str) -> bool:
    """True when the resolved path ``inner`` is ``outer`` or lies inside it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _input_paths(paths: list[str]) -> list[str]:
    """Every path an input consists of, resolved: the paths themselves and, for a folder,
    each entry in it (a model folder in a hub cache holds symlinks to blobs elsewhere)."""
    found = []
    for p in paths:
        found.append(_real(p))
        if os.path.isdir(p):
            for n in os.listdir(p):
                found.append(_real(os.path.join(p, n)))
    return sorted(set(found))


def check_output_path(out, inputs: list[str]) -> str:
    """Refuse an output path that is, contains, or lies inside an input (after resolving
    symlinks), so that neither writing nor ``--overwrite`` can touch an input. Returns the
    output's absolute path."""
    if out is None or str(out) == "":
        raise ConfigError("an output path is required (-o OUT)")
    absout = os.path.abspath(os.fspath(out))
    real = _real(absout)
    paths = _input_paths(inputs)
    for p in paths:
        if real == p:
            raise FormatError(f"output {out} is one of the inputs ({p}); inputs are never overwritten: choose an "
                              f"output path outside every input")
    for p in paths:
        if _within(real, p):
            raise FormatError(f"output {out} lies inside the input {p}; inputs are never written to: choose an "
                              f"output path outside every input")
        if _within(p, real):
            raise FormatError(f"output {out} contains the input {p}; inputs are never overwritten or deleted: "
                              f"choose an output path outside every input")
    parent = os.path.dirname(absout)
    probe = parent
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise FormatError(f"the output's parent {probe} is a file, not a folder")
    return absout


class _Output:
    """Where a converted checkpoint goes: a ``.safetensors`` file for a file, a folder for
    a folder. Refuses a path that is, contains or lies inside one of the inputs, and an
    existing output unless ``overwrite``; ``overwrite`` replaces only what looks like a
    previous output (a ``.safetensors`` file, or a folder holding ``*.safetensors``)."""

    def __init__(self, ckpt: Checkpoint, out, inputs: list[str], overwrite: bool):
        self.out = check_output_path(out, inputs + [ckpt.path])
        self.ckpt = ckpt
        self.dir = None
        self._others: list[str] = []
        if ckpt.is_dir:
            if overwrite and os.path.isdir(self.out) and os.listdir(self.out) and not any(
                    n.endswith(".safetensors") for n in os.listdir(self.out)):
                raise FormatError(f"output folder {out} exists and holds no *.safetensors file, so it is not a "
                                  f"previous output; --overwrite only replaces a previous output: choose a new "
                                  f"path")
            self.dir = AtomicDir(self.out, overwrite=overwrite)
        else:
            if os.path.isdir(self.out):
                raise FormatError(f"the input is a single .safetensors file, so the output must be a file path; "
                                  f"{out} is a folder")
            if not self.out.endswith(".safetensors"):
                raise FormatError(f"expected an output path ending in .safetensors, got {out}")
            if os.path.lexists(self.out) and not overwrite:
                raise FormatError(f"output {out} exists; choose a new path or pass overwrite (--overwrite)")
            if not os.path.isdir(os.path.dirname(self.out)):
                raise FormatError(f"the output's folder {os.path.dirname(self.out)} does not exist")

    def shard_path(self, shard_name: str) -> str:
        return self.dir.join(shard_name) if self.dir else self.out

    def check_other_files(self) -> None:
        """List, before anything is written, the model folder entries to carry over (the
        list is kept: one that disappears during the run is an error, not a silent gap),
        and refuse one that is neither a regular file nor a folder (a FIFO would block the
        copy forever)."""
        self._others = self.ckpt.other_files()
        for name in self._others:
            src = os.path.join(self.ckpt.path, name)
            if os.path.isdir(src):
                files = [os.path.join(d, n) for d, _, names in os.walk(src) for n in names]
            else:
                files = [src]
            for path in files:
                if os.path.islink(path) and not os.path.exists(path):
                    continue  # a dangling symlink is copied as a symlink
                err = regular_file_error(path, "model folder entry")
                if err is not None:
                    raise FormatError(f"{err}; numlora copies a model folder's other entries into the output, and "
                                      f"only regular files and folders")

    def finish(self, index: dict | None, config_update=None) -> None:
        if self.dir is None:
            return
        if index is not None:
            write_text_atomic(self.dir.join(self.ckpt.index_name), json.dumps(index, indent=2, sort_keys=True) + "\n")
        for name in self._others:
            src = os.path.join(self.ckpt.path, name)
            if name == "config.json" and config_update is not None:
                cfg = read_json(src, "model config")
                if not isinstance(cfg, dict):
                    raise FormatError(f"{src}: expected a JSON object, got {type(cfg).__name__}")
                config_update(cfg)
                write_text_atomic(self.dir.join(name), json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            elif os.path.isdir(src):
                shutil.copytree(src, self.dir.join(name), symlinks=True)
            else:
                err = regular_file_error(src, "model folder entry")
                if err is not None:
                    raise err
                shutil.copy2(src, self.dir.join(name))
        with point_of_no_return():
            self.dir.commit()

    def abort(self) -> None:
        if self.dir is not None:
            self.dir.abort()


def _make_output(ckpt: Checkpoint, out, inputs: list[str], overwrite: bool, job: str) -> _Output:
    try:
        return _Output(ckpt, out, inputs, overwrite)
    except OSError as e:
        raise FormatError(_os_failure(e, os.path.abspath(os.fspath(out)), job)) from e


def _index(ckpt: Checkpoint, sizes: dict[str, int], weight_map: dict[str, str]) -> dict | None:
    if not ckpt.index_name:
        return None
    meta = dict(ckpt.index_metadata)
    meta["total_size"] = int(sum(sizes.values()))
    return {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}


def _stream(ckpt: Checkpoint, dest: _Output, desc: str, progress, plan, write, config_update=None) -> None:
    """The loop both converters share: shard by shard, declare the output tensors
    (``plan(info) -> [(name, dtype, shape or None), ...]`` for each input tensor), write
    them (``write(file, writer, info, entries)``), keep the shard layout, write the index
    and the folder's other files, and commit. On any exception the output is removed; an
    ``OSError`` (disk full, no permission, a file-size limit, an input that vanished)
    becomes a :class:`~numlora.errors.FormatError` saying which file and why."""
    try:
        wmap, shards = {}, []
        dest.check_other_files()
        with Progress(ckpt.total_bytes, desc, enabled=progress) as bar:
            for shard in ckpt.shards:
                f = shard.file
                planned = [(t, plan(t)) for t in f.infos()]
                entries = [e for _, es in planned for e in es]
                wmap.update({name: shard.name for name, _, _ in entries})
                with SafetensorsWriter(dest.shard_path(shard.name), entries, dict(f.metadata)) as w:
                    for t, es in planned:
                        check_interrupt()
                        write(f, w, t, es)
                        bar.update(t.nbytes, t.name)
                    if dest.dir is None:  # a single file: this rename is the job's last step
                        with point_of_no_return():
                            w.commit()
                shards.append(shard.name)
        index = _index(ckpt, {k: _data_bytes(dest.shard_path(k)) for k in shards}, wmap) if dest.dir else None
        dest.finish(index, config_update)
    except OSError as e:
        dest.abort()
        raise FormatError(_os_failure(e, dest.out, desc)) from e
    except BaseException:
        dest.abort()
        raise


def _os_failure(e: OSError, out: str, job: str) -> str:
    """One sentence for an OS error met while writing ``out`` (or reading an input)."""
    paths = [p for p in (e.filename, getattr(e, "filename2", None)) if p]
    parent = os.path.dirname(out)
    shown = []
    for p in paths:
        p = os.path.abspath(os.fsdecode(p))
        parts = os.path.relpath(p, parent).split(os.sep) if p.startswith(parent + os.sep) else []
        if parts and is_numlora_temp(parts[0]):  # a file inside the temporary output folder
            p = os.path.join(out, *parts[1:])
        shown.append(p)
    writing = [p for p in shown if p == out or p.startswith(out.rstrip(os.sep) + os.sep)]
    reason = describe_os_error(e)
    if writing or not shown:
        where = writing[0] if writing else out
        return f"{job} failed: cannot write {where}: {reason}; nothing was written (the partial output was removed)"
    return (f"{job} failed: cannot read {shown[0]}: {reason}; nothing was written (was the input changed or "
            f"removed during the run?)")


# --- tensors in and out as float32, through buffers reused from tensor to tensor ----------
class _Buffers:
    """Work arrays sized to the largest tensor seen so far and reused: a fresh array per
    tensor costs more in page faults than the conversion itself."""

    def __init__(self):
        self._arrays = {}

    def get(self, key, n: int, dtype) -> np.ndarray:
        a = self._arrays.get(key)
        if a is None or a.size < n:
            self._arrays[key] = a = None  # free the old one first
            self._arrays[key] = a = np.empty(max(n, 1), dtype)
        return a[:n]


def _load_f32(f: SafetensorsFile, name: str, bufs: _Buffers, slot: str = "x") -> np.ndarray:
    """Floating tensor ``name`` as a float32 array in a reused buffer (writable,
    C-contiguous). Read with ``pread`` (:meth:`SafetensorsFile.read_into`), not a memory
    map: an input truncated during the run raises FormatError instead of SIGBUS."""
    from .io.safetensors import to_float32

    t = f.info(name)
    out = bufs.get(slot, t.numel, np.float32).reshape(t.shape)
    if t.dtype == "F32":
        return f.read_into(name, out)
    raw = f.read_into(name, bufs.get("raw-" + t.dtype, t.numel, DTYPES[t.dtype]).reshape(t.shape))
    return to_float32(raw, t.dtype, out=out)


def _store(w: SafetensorsWriter, name: str, x: np.ndarray, st: str, bufs: _Buffers) -> None:
    """Write float32 ``x`` as safetensors dtype ``st``."""
    if st == "BF16":
        from .kernels import convert as kc

        bits = bufs.get("bf16", x.size, np.uint16)
        kc.f32_to_bf16(x.reshape(-1), bits)
        w.write(name, bits.reshape(x.shape))
    else:
        w.write(name, x)


# --- adapter module -> checkpoint key ------------------------------------------------------
def match_modules(modules, keys) -> dict[str, str]:
    """Map adapter module names to checkpoint weight keys (``<module>.weight``).

    Exact match first; otherwise a suffix match, when the checkpoint has an extra prefix
    (``bert.encoder...`` for an adapter's ``encoder...``) or lacks one (``layers...`` for
    ``model.layers...``). A module that matches nothing, or several weights, raises
    :class:`~numlora.errors.FormatError` naming it."""
    weights = {k[: -len(".weight")] for k in keys if k.endswith(".weight")}
    out = {}
    for m in modules:
        if m in weights:
            out[m] = m + ".weight"
            continue
        cands = sorted(w for w in weights if w.endswith("." + m) or m.endswith("." + w))
        if len(cands) == 1:
            out[m] = cands[0] + ".weight"
        elif not cands:
            near = sorted(w for w in weights if w.split(".")[-1] == m.split(".")[-1])[:3]
            hint = f"; weights with the same last name: {near}" if near else ""
            raise FormatError(f"adapter module {m!r} matches no weight in the checkpoint "
                              f"(looked for {m + '.weight'!r} and suffix matches){hint}")
        else:
            raise FormatError(f"adapter module {m!r} matches several checkpoint weights {cands[:5]}; "
                              "the mapping is ambiguous")
    dup = {}
    for m, k in out.items():
        dup.setdefault(k, []).append(m)
    clash = {k: v for k, v in dup.items() if len(v) > 1}
    if clash:
        k, v = next(iter(clash.items()))
        raise FormatError(f"adapter modules {v} all map to checkpoint weight {k!r}")
    return out


# --- merge ----------------------------------------------------------------------------------
@dataclass
class MergeReport:
    output: str
    merged: list = field(default_factory=list)  # [{module, key, shape, dtype}]
    copied: int = 0
    converted: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _merge_one(w: np.ndarray, layer) -> None:
    """``W + s B A`` (DoRA: ``(m / ||W + s B A||) (W + s B A)``) in place on float32 ``w``."""
    merge_into = getattr(layer, "merge_into", None)
    if merge_into is not None:  # embedding / convolution layers add their delta in their own layout
        merge_into(w)
        return
    if getattr(layer, "use_dora", False):
        from .dora import merge_dora

        merge_dora(w, layer.lora_a, layer.lora_b, layer.scaling, layer.magnitude, layer.fan_in_fan_out)
    else:
        from .ops import merge_lora

        merge_lora(w, layer.lora_a, layer.lora_b, layer.scaling, layer.fan_in_fan_out)


def merge_checkpoint(base, adapter, out, *, dtype: str | None = None, overwrite: bool = False,
                     progress: bool | None = None) -> MergeReport:
    """Merge a PEFT adapter (a folder, or a :class:`~numlora.LoraAdapter`) into a checkpoint
    (a ``.safetensors`` file or a model folder, single or sharded) and write the merged
    checkpoint to ``out``.

    Targeted weights become ``W + s B A`` computed in float32 and stored in the base
    tensor's dtype, or in ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``), which
    then applies to every floating tensor. Everything else is copied byte for byte
    (integer tensors always). Metadata and shard layout are kept. ``progress``: a bar on
    stderr (default: when stderr is a terminal)."""
    import time

    t0 = time.perf_counter()
    from .io.peft import load_peft_adapter

    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    adapter_inputs = []
    if isinstance(adapter, (str, os.PathLike)):
        adapter_dir = os.fspath(adapter)
        adapter_inputs = [adapter_dir]  # check_output_path also covers every entry of the folder
        adapter = load_peft_adapter(adapter_dir)
    out_st = DTYPE_NAMES.get(dtype) if dtype else None
    with cleanup_scope(), Checkpoint(base) as ckpt:
        layers = dict(adapter.items())
        if not layers:
            raise FormatError("the adapter has no LoRA modules")
        targets = match_modules(list(layers), ckpt.keys())  # module -> key
        by_key = {k: m for m, k in targets.items()}
        bias_add = {}
        for m, key in targets.items():
            layer = layers[m]
            info = ckpt.info(key)
            want = (layer.in_features, layer.out_features) if layer.fan_in_fan_out else \
                (layer.out_features, layer.in_features)
            if hasattr(layer, "merge_into"):  # embedding (vocab, dim) / convolution (out, in, *kernel)
                want = tuple(layer.base_shape)
            if info.shape != want:
                raise ShapeError(f"adapter module {m!r}: expected checkpoint weight {key!r} of shape {want}, "
                                 f"got {info.shape}")
            if not info.is_float:
                raise FormatError(f"adapter module {m!r}: checkpoint weight {key!r} is {info.dtype}; expected a "
                                  "floating tensor (an NF4 checkpoint cannot be merged into; merge into the dense "
                                  "original)")
            lb = getattr(layer, "lora_bias", None)
            if lb is not None:
                bkey = key[: -len(".weight")] + ".bias"
                if bkey not in ckpt:
                    raise FormatError(f"adapter module {m!r} has a LoRA bias (lora_bias) but the checkpoint has no "
                                      f"{bkey!r} to add it to")
                bias_add[bkey] = layer
        report = MergeReport(output=os.path.abspath(os.fspath(out)))
        dest = _make_output(ckpt, out, ckpt.files + adapter_inputs, overwrite, "merge")
        bufs = _Buffers()

        def plan(t):
            return [(t.name, out_st if (out_st and t.is_float) else t.dtype, t.shape)]

        def write(f, w, t, entries):
            name, st, shape = entries[0]
            if name in by_key or name in bias_add:
                layer = layers[by_key[name]] if name in by_key else bias_add[name]
                x = _load_f32(f, name, bufs)
                if name in by_key:
                    _merge_one(x, layer)
                    report.merged.append({"module": by_key[name], "key": name, "shape": list(shape), "dtype": st})
                else:
                    x += np.float32(layer.scaling) * np.asarray(layer.lora_bias, np.float32)
                if not np.isfinite(x).all():
                    raise NonFiniteError(f"the merged {name!r} holds NaN or infinity; nothing was written")
                _store(w, name, x, st, bufs)
            elif st != t.dtype:
                _store(w, name, _load_f32(f, name, bufs), st, bufs)
                report.converted += 1
            else:
                w.copy_from(f, name)
                report.copied += 1

        def cfg_update(cfg):
            cfg["torch_dtype"] = dtype

        _stream(ckpt, dest, "merge", progress, plan, write, cfg_update if dtype else None)
        report.bytes_in = ckpt.total_bytes
    report.bytes_out = _output_bytes(report.output)
    report.seconds = time.perf_counter() - t0
    return report


def _data_bytes(path: str) -> int:
    with SafetensorsFile(path) as f:
        return sum(t.nbytes for t in f.infos())


def _output_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))
    return os.path.getsize(path)


# --- quantize -------------------------------------------------------------------------------
@dataclass
class QuantizeReport:
    output: str
    blocksize: int
    double_quant: bool
    quantized: list = field(default_factory=list)  # [{key, shape, dtype, mean_abs_err, max_abs_err}]
    copied: int = 0
    bytes_before: int = 0  # of the quantized tensors, as stored in the input
    bytes_after: int = 0  # of their NF4 state (codes, scales, maps, JSON)
    total_in: int = 0
    total_out: int = 0
    mean_abs_err: float = 0.0
    max_abs_err: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        mib = 1 << 20
        return (f"quantized {len(self.quantized)} tensors to NF4 (blocksize {self.blocksize}"
                f"{', double quant' if self.double_quant else ''}), copied {self.copied}\n"
                f"quantized tensors: {self.bytes_before / mib:,.1f} MiB -> {self.bytes_after / mib:,.1f} MiB\n"
                f"checkpoint: {self.total_in / mib:,.1f} MiB -> {self.total_out / mib:,.1f} MiB\n"
                f"reconstruction error: mean |w - deq(q(w))| = {self.mean_abs_err:.3g}, "
                f"max = {self.max_abs_err:.3g}\n"
                f"{self.seconds:.2f} s -> {self.output}")


def select_for_quantization(infos, include: str | None = None, exclude: str | None = None) -> list[str]:
    """Names of the tensors ``numlora quantize`` turns into NF4: 2-D floating ``*.weight``
    tensors, minus embeddings and norms (:data:`DEFAULT_QUANT_EXCLUDE`); ``include``
    (regex, searched) keeps only matching names; ``exclude`` drops matching names."""
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as e:
        raise ConfigError(f"bad regular expression ({e})") from None
    default_exc = re.compile(DEFAULT_QUANT_EXCLUDE, re.IGNORECASE)
    out = []
    for t in infos:
        if not (t.is_float and len(t.shape) == 2 and t.name.endswith(".weight") and t.numel > 0):
            continue
        if inc is not None:
            if not inc.search(t.name):
                continue
        elif default_exc.search(t.name):
            continue
        if exc is not None and exc.search(t.name):
            continue
        out.append(t.name)
    return out


def _nf4_entries(prefix: str, numel: int, blocksize: int, double_quant: bool):
    nblocks = -(-numel // blocksize)
    e = [(f"{prefix}.weight", "U8", ((numel + 1) // 2, 1)),
         (f"{prefix}.weight.absmax", "U8" if double_quant else "F32", (nblocks,)),
         (f"{prefix}.weight.quant_map", "F32", (16,))]
    if double_quant:
        e += [(f"{prefix}.weight.nested_absmax", "F32", (-(-nblocks // 256),)),
              (f"{prefix}.weight.nested_quant_map", "F32", (256,))]
    e.append((f"{prefix}.weight.quant_state.bitsandbytes__nf4", "U8", None))
    return e


def quantize_checkpoint(src, out, *, blocksize: int = 64, double_quant: bool = False, include: str | None = None,
                        exclude: str | None = None, overwrite: bool = False,
                        progress: bool | None = None) -> QuantizeReport:
    """Quantize the Linear weights of a checkpoint to NF4 in the bitsandbytes /
    transformers layout (see :meth:`~numlora.NF4Tensor.to_state_dict`) and copy every other
    tensor byte for byte. A model folder's ``config.json`` gets the
    ``quantization_config`` transformers reads."""
    import time

    from .nf4 import check_blocksize, quantize_nf4

    t0 = time.perf_counter()
    blocksize = check_blocksize(blocksize)
    with cleanup_scope(), Checkpoint(src) as ckpt:
        infos = ckpt.infos()
        chosen = set(select_for_quantization(infos, include, exclude))
        if not chosen:
            raise ConfigError("no tensor selected for quantization (2-D floating *.weight tensors; check "
                              "--include / --exclude)")
        rep = QuantizeReport(output=os.path.abspath(os.fspath(out)), blocksize=blocksize, double_quant=double_quant)
        dest = _make_output(ckpt, out, ckpt.files, overwrite, "quantize")
        bufs = _Buffers()
        from .kernels import convert as kc

        err = [0.0, 0]  # sum of |w - deq(q(w))|, element count

        def plan(t):
            if t.name in chosen:
                return _nf4_entries(t.name[: -len(".weight")], t.numel, blocksize, double_quant)
            return [(t.name, t.dtype, t.shape)]

        def write(f, w, t, entries):
            if t.name not in chosen:
                w.copy_from(f, t.name)
                rep.copied += 1
                return
            x = _load_f32(f, t.name, bufs)
            q = quantize_nf4(x, blocksize, double_quant=double_quant)
            q.dtype = _ST_TO_NAME[t.dtype]
            sd = q.to_state_dict(t.name[: -len(".weight")])
            names = [n for n, _, _ in entries]
            if set(sd) != set(names):
                raise FormatError(f"internal: NF4 state dict keys {sorted(sd)} differ from the declared "
                                  f"{sorted(names)}")
            for n in names:
                w.write(n, sd[n])
            d = q.dequantize(out=bufs.get("deq", t.numel, np.float32).reshape(t.shape))
            nchunks = -(-t.numel // kc.CHUNK)
            psum, pmax = bufs.get("psum", nchunks, np.float64), bufs.get("pmax", nchunks, np.float32)
            kc.abs_err_stats(x.reshape(-1), d.reshape(-1), psum, pmax)
            mean, mx = float(psum.sum()) / t.numel, float(pmax.max())
            err[0] += mean * t.numel
            err[1] += t.numel
            rep.max_abs_err = max(rep.max_abs_err, mx)
            rep.bytes_before += t.nbytes
            rep.bytes_after += sum(np.asarray(sd[n]).nbytes for n in names)
            rep.quantized.append({"key": t.name, "shape": list(t.shape), "dtype": t.dtype,
                                  "mean_abs_err": mean, "max_abs_err": mx})

        skipped = sorted({t.name[: -len(".weight")] for t in infos
                          if t.name.endswith(".weight") and t.name not in chosen and len(t.shape) == 2})

        def cfg_update(cfg):
            compute = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
            cfg["quantization_config"] = {
                "quant_method": "bitsandbytes",
                "load_in_4bit": True,
                "load_in_8bit": False,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": bool(double_quant),
                "bnb_4bit_compute_dtype": compute,
                "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": skipped,
            }

        _stream(ckpt, dest, "quantize", progress, plan, write, cfg_update)
        err_sum, err_n = err
        rep.total_in = ckpt.total_bytes
    rep.total_out = _output_bytes(rep.output)
    rep.mean_abs_err = err_sum / err_n if err_n else 0.0
    rep.seconds = time.perf_counter() - t0
    return rep


# --- inspect --------------------------------------------------------------------------------
def inspect_path(path) -> dict:
    """What ``numlora inspect`` reports, as a JSON-safe dict: for a PEFT adapter folder its
    modules (rank, alpha, scaling, shapes, parameters, dtype); for a checkpoint its tensors
    (count, dtypes, total size, shards, which tensors are NF4)."""
    p = os.fspath(path)
    if os.path.isdir(p) and (os.path.exists(os.path.join(p, "adapter_config.json"))
                             or os.path.exists(os.path.join(p, "adapter_model.safetensors"))):
        return _inspect_adapter(p)
    return _inspect_checkpoint(p)


def _inspect_adapter(p: str) -> dict:
    from .io.peft import load_peft_adapter

    adapter = load_peft_adapter(p)
    with SafetensorsFile(os.path.join(p, "adapter_model.safetensors")) as f:
        stored = sorted({t.dtype for t in f.infos()})
    mods = []
    for name, layer in adapter.items():
        params = layer.lora_a.size + layer.lora_b.size
        for extra in ("magnitude", "lora_bias"):
            v = getattr(layer, extra, None)
            if v is not None:
                params += v.size
        mods.append({"module": name, "rank": layer.rank, "alpha": layer.alpha, "scaling": layer.scaling,
                     "in_features": layer.in_features, "out_features": layer.out_features,
                     "dora": bool(getattr(layer, "use_dora", False)),
                     "lora_bias": getattr(layer, "lora_bias", None) is not None, "params": int(params)})
    cfg = adapter.config
    return {"kind": "peft_adapter", "path": os.path.abspath(p), "modules": mods,
            "trainable_params": int(sum(m["params"] for m in mods)), "stored_dtypes": stored,
            "rank": cfg.rank, "alpha": cfg.alpha, "use_rslora": cfg.use_rslora,
            "use_dora": bool(getattr(cfg, "use_dora", False)), "fan_in_fan_out": cfg.fan_in_fan_out}


def _inspect_checkpoint(p: str) -> dict:
    with Checkpoint(p) as ckpt:
        infos = ckpt.infos()
        dtypes: dict[str, dict] = {}
        for t in infos:
            d = dtypes.setdefault(t.dtype, {"tensors": 0, "bytes": 0, "params": 0})
            d["tensors"] += 1
            d["bytes"] += t.nbytes
            d["params"] += t.numel
        suffix = ".weight.quant_state.bitsandbytes__nf4"
        nf4 = []
        for t in infos:
            if t.name.endswith(suffix):
                nf4.append(_nf4_summary(ckpt, t, t.name[: -len(suffix)]))
        return {"kind": "checkpoint", "path": ckpt.path, "sharded": bool(ckpt.index_name),
                "shards": [s.name for s in ckpt.shards], "tensors": len(infos),
                "total_bytes": int(sum(t.nbytes for t in infos)), "dtypes": dtypes,
                "metadata": {s.name: s.file.metadata for s in ckpt.shards}, "nf4": nf4}


def _nf4_summary(ckpt: Checkpoint, t, prefix: str) -> dict:
    """What inspect shows of one NF4 quant state: shape, blocksize, double quant, dtype;
    a state that cannot be read is shown with ``error`` saying why (inspect describes a
    broken file rather than failing on it)."""
    row = {"module": prefix, "shape": None, "blocksize": None, "double_quant": None, "dtype": None}
    if t.dtype != "U8" or len(t.shape) != 1 or t.nbytes > (1 << 20):
        row["error"] = f"expected a U8 vector of JSON (at most 1 MiB), got {t.dtype} {list(t.shape)}"
        return row
    try:
        state = parse_json(ckpt.shard_of(t.name).file.read_bytes(t.name), t.name)
    except FormatError as e:
        row["error"] = str(e)
        return row
    if not isinstance(state, dict):
        row["error"] = f"expected a JSON object, got {type(state).__name__}"
        return row
    problems = []
    shape, bs, dtype = state.get("shape"), state.get("blocksize"), state.get("dtype")
    if isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
        row["shape"] = shape
    else:
        problems.append(f"shape {brief(shape)}")
    if type(bs) is int:
        row["blocksize"] = bs
    else:
        problems.append(f"blocksize {brief(bs)}")
    if isinstance(dtype, str):
        row["dtype"] = dtype[:40]
    row["double_quant"] = "nested_blocksize" in state
    if problems:
        row["error"] = "invalid " + ", ".join(problems)
    return row


def format_inspect(info: dict) -> str:
    """A human-readable table of :func:`inspect_path`'s dict."""
    lines = []
    if info["kind"] == "peft_adapter":
        lines.append(f"PEFT LoRA adapter: {info['path']}")
        lines.append(f"global rank {info['rank']}, alpha {info['alpha']:g}, rsLoRA {info['use_rslora']}, "
                     f"DoRA {info['use_dora']}, fan_in_fan_out {info['fan_in_fan_out']}, stored as "
                     f"{', '.join(info['stored_dtypes'])}")
        rows = [("module", "rank", "alpha", "scaling", "in x out", "params", "extra")]
        for m in info["modules"]:
            extra = ",".join(x for x, on in (("dora", m["dora"]), ("bias", m["lora_bias"])) if on)
            rows.append((m["module"], str(m["rank"]), f"{m['alpha']:g}", f"{m['scaling']:.4g}",
                         f"{m['in_features']} x {m['out_features']}", f"{m['params']:,}", extra))
        lines += _table(rows)
        lines.append(f"{len(info['modules'])} modules, {info['trainable_params']:,} trainable parameters")
        return "\n".join(lines)
    mib = 1 << 20
    kind = f"{len(info['shards'])} shards" if info["sharded"] else "single file"
    lines.append(f"checkpoint: {info['path']} ({kind})")
    lines.append(f"{info['tensors']} tensors, {info['total_bytes'] / mib:,.1f} MiB")
    rows = [("dtype", "tensors", "parameters", "MiB")]
    for d, s in sorted(info["dtypes"].items()):
        rows.append((d, str(s["tensors"]), f"{s['params']:,}", f"{s['bytes'] / mib:,.1f}"))
    lines += _table(rows)
    if info["nf4"]:
        lines.append(f"{len(info['nf4'])} NF4 tensors (bitsandbytes layout):")
        rows = [("module", "shape", "blocksize", "double quant", "dtype")]
        for q in info["nf4"]:
            rows.append((q["module"], "x".join(map(str, q["shape"] or [])), str(q["blocksize"]),
                         str(q["double_quant"]), str(q["dtype"])))
        lines += _table(rows)
        for q in info["nf4"]:
            if q.get("error"):
                lines.append(f"warning: {q['module']}: unreadable NF4 quant state: {q['error']}")
    else:
        lines.append("no NF4 tensors")
    return "\n".join(lines)


def _table(rows) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
