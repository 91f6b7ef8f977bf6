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

With ``scheduler=`` / ``workers=`` (``--scheduler`` / ``--workers``) the shards of a model
folder are converted as Dask tasks (:class:`_DaskRunner`): each task runs
:func:`_convert_shard`, the function the single-process loop runs, on a worker that reads
the input shard and writes the output shard into this process's temporary folder (a
path both see); the folder is committed here once every task has succeeded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ._lazy import kernels
from ._progress import Progress
from ._validate import flag
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


def _convert_shard(job, f: SafetensorsFile, dst: str, *, final: bool = False, on_tensor=None,
                   check=check_interrupt) -> dict:
    """Convert one shard: the one code path of the single-process run and of each Dask
    task. Declares the output tensors of ``f`` (``job.plan(info) -> [(name, dtype, shape
    or None), ...]``), writes them to ``dst`` (``job.write(file, writer, info, entries,
    part)``) and returns ``part``, what the job noted for its report. ``dst`` is complete
    when this returns: inside the output's temporary folder, or (``final``: a single-file
    output) committed by this function's last step. ``check()`` runs between tensors (an
    interrupt, or a stop requested by the client of a Dask run)."""
    part = job.new_part()
    planned = [(t, job.plan(t)) for t in f.infos()]
    entries = [e for _, es in planned for e in es]
    with SafetensorsWriter(dst, entries, dict(f.metadata)) as w:
        for t, es in planned:
            check()
            job.write(f, w, t, es, part)
            if on_tensor is not None:
                on_tensor(t)
        check()
        if final:  # a single file: this rename is the job's last step
            with point_of_no_return():
                w.commit()
    return part


def _stream(ckpt: Checkpoint, dest: _Output, desc: str, progress, job, config_update=None, dask=None) -> list:
    """The loop both converters share: shard by shard, :func:`_convert_shard` (in this
    process, or as Dask tasks when ``dask`` is given and the input is a model folder),
    keep the shard layout, write the index and the folder's other files, and commit.
    Returns the shards' parts, in shard order. On any exception the output is removed;
    an ``OSError`` (disk full, no permission, a file-size limit, an input that vanished)
    becomes a :class:`~numlora.errors.FormatError` saying which file and why."""
    try:
        dest.check_other_files()
        wmap = {name: shard.name for shard in ckpt.shards for t in shard.file.infos()
                for name, _, _ in job.plan(t)}
        with Progress(ckpt.total_bytes, desc, enabled=progress) as bar:
            if dask is not None and dest.dir is not None:
                parts = dask.run(job, [(s.path, s.file.file_size, dest.shard_path(s.name),
                                        sum(t.nbytes for t in s.file.infos())) for s in ckpt.shards], bar)
            else:
                parts = [_convert_shard(job, shard.file, dest.shard_path(shard.name), final=dest.dir is None,
                                        on_tensor=lambda t: bar.update(t.nbytes, t.name))
                         for shard in ckpt.shards]
        shards = [s.name for s in ckpt.shards]
        index = _index(ckpt, {k: _data_bytes(dest.shard_path(k)) for k in shards}, wmap) if dest.dir else None
        dest.finish(index, config_update)
        return parts
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


# --- the shards as Dask tasks ------------------------------------------------------------------
@contextlib.contextmanager
def _runner(scheduler, workers, src=None):
    """A :class:`_DaskRunner` for ``scheduler`` / ``workers`` (closed afterwards), or None
    when neither is given or ``src`` is a single file (this process does the work: a file
    is one task, not worth starting a cluster for)."""
    if scheduler is None and workers is None:
        yield None
        return
    if src is not None and os.path.isfile(os.fspath(src)):
        if scheduler is not None and workers is not None:
            raise ConfigError("give a Dask scheduler (--scheduler) or a number of local workers (--workers), not both")
        yield None
        return
    runner = _DaskRunner(scheduler, workers)
    try:
        yield runner
    finally:
        runner.close()


def _import_distributed():
    try:
        import distributed
    except ImportError as e:
        raise ConfigError(f"a Dask run (--scheduler / --workers) needs the optional dependencies dask and distributed "
                          f"(pip install 'numlora[dask]'); they could not be imported: {e}") from None
    return distributed


class _DaskRunner:
    """Runs :func:`_convert_shard` for each shard of a model folder as a Dask task.

    Workers read the input shards and write the output shards at the paths they are given
    (both on a filesystem they share with this process: the output's temporary folder is
    created here). The job (its adapter layers, for a merge) is scattered to every worker
    once. If a task fails or this process is interrupted, a stop flag (a
    ``distributed.Event``) makes the running tasks stop at their next tensor, this process
    waits for them, and only then is the temporary folder removed."""

    def __init__(self, scheduler=None, workers=None):
        distributed = _import_distributed()
        if scheduler is not None and workers is not None:
            raise ConfigError("give a Dask scheduler (--scheduler) or a number of local workers (--workers), not both")
        self._cluster = None
        self._own = True
        t0 = time.perf_counter()
        if workers is not None:
            if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
                raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
            self._cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                     dashboard_address=None)
            self.client = distributed.Client(self._cluster)
        elif isinstance(scheduler, distributed.Client):
            self.client, self._own = scheduler, False
        elif isinstance(scheduler, str) and scheduler:
            try:
                self.client = distributed.Client(scheduler, timeout="20s")
            except OSError as e:
                raise ConfigError(f"cannot connect to the Dask scheduler at {scheduler!r}: {e}") from None
        else:
            raise ConfigError(f"scheduler must be an address (tcp://host:8786) or a distributed.Client, got "
                              f"{scheduler!r}")
        self.startup = time.perf_counter() - t0
        self.wall = 0.0
        self.tasks: list[dict] = []

    def run(self, job, shards, bar) -> list:
        """``shards``: ``(input path, its size, output path, tensor bytes)`` each. Returns
        the tasks' parts in shard order; raises the first task's error."""
        import uuid

        distributed = _import_distributed()
        client = self.client
        token = uuid.uuid4().hex[:12]
        stop = distributed.Event(f"numlora-stop-{token}", client=client)
        t0 = time.perf_counter()
        [job_f] = client.scatter([job], broadcast=True, hash=False)
        futures = [client.submit(_shard_task, job_f, src, size, dst, stop.name, pure=False,
                                 key=f"numlora-shard-{i}-{token}") for i, (src, size, dst, _) in enumerate(shards)]
        order = {f.key: i for i, f in enumerate(futures)}
        parts = [None] * len(futures)
        try:
            for fut in distributed.as_completed(futures):
                i = order[fut.key]
                parts[i] = fut.result()  # a task's error is raised here
                bar.update(shards[i][3], os.path.basename(shards[i][2]))
        except BaseException:
            stop.set()  # the running tasks stop at their next tensor; wait for them before cleaning up
            with contextlib.suppress(Exception):
                distributed.wait(futures, timeout=120)
            raise
        finally:
            with contextlib.suppress(Exception):
                client.cancel([job_f])
        self.wall = time.perf_counter() - t0
        self.tasks = [p.pop("_task") for p in parts]
        return parts

    def summary(self) -> dict:
        info = self.client.scheduler_info()
        return {"workers": len(info.get("workers", {})), "startup_seconds": self.startup,
                "wall_seconds": self.wall, "tasks": self.tasks}

    def close(self) -> None:
        if self._own:
            with contextlib.suppress(Exception):
                self.client.close()
            if self._cluster is not None:
                with contextlib.suppress(Exception):
                    self._cluster.close()


def _shard_task(job, src: str, size: int, dst: str, stop_name: str) -> dict:
    """A Dask task: :func:`_convert_shard` of the input shard ``src`` into ``dst``,
    stopping between tensors when the client sets the event ``stop_name``."""
    distributed = _import_distributed()
    t0 = time.perf_counter()
    stop = distributed.Event(stop_name)

    def check():
        if stop.is_set():
            raise FormatError(f"stopped before {dst} was complete: the run was interrupted or another shard failed")

    check()
    with SafetensorsFile(src) as f:
        if f.file_size != size:
            raise FormatError(f"{src}: expected {size} bytes (its size when the run started), found {f.file_size}; "
                              f"was the input changed during the run?")
        part = _convert_shard(job, f, dst, check=check)
    part["_task"] = {"shard": os.path.basename(dst), "worker": distributed.get_worker().address,
                     "seconds": time.perf_counter() - t0}
    return part


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
    if t.dtype == "BF16":  # numba's threads (numpy's shift: one thread), the same bits
        kernels("convert").bf16_to_f32(raw.reshape(-1), out.reshape(-1))
        return out
    return to_float32(raw, t.dtype, out=out)


def _store(w: SafetensorsWriter, name: str, x: np.ndarray, st: str, bufs: _Buffers, finite: str | None = None) -> None:
    """Write float32 ``x`` as safetensors dtype ``st``; with ``finite`` (the message) a NaN
    or infinity in ``x`` raises NonFiniteError before anything is written (for bf16 in the
    conversion's pass)."""
    kc = kernels("convert")
    if st == "BF16":
        bits = bufs.get("bf16", x.size, np.uint16)
        if finite is None:
            kc.f32_to_bf16(x.reshape(-1), bits)
        else:
            bad = bufs.get("bad", -(-x.size // kc.CHUNK), np.int64)
            kc.f32_to_bf16_finite(x.reshape(-1), bits, bad)
            if bad.any():
                raise NonFiniteError(finite)
        w.write(name, bits.reshape(x.shape))
        return
    if finite is not None and not np.isfinite(x).all():
        raise NonFiniteError(finite)
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
    dask: dict | None = None  # a Dask run: workers, cluster start, wall time, each shard's task

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


class _Job:
    """What a converter does to each tensor: ``plan`` declares a tensor's outputs,
    ``write`` writes them and notes what the report needs in the shard's ``part``. Pickles
    (without its work buffers) so that Dask workers can run it."""

    def __init__(self):
        self._bufs = None

    @property
    def bufs(self) -> _Buffers:
        if self._bufs is None:
            self._bufs = _Buffers()
        return self._bufs

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_bufs"] = None
        return state


class _MergeJob(_Job):
    def __init__(self, layers_by_key: dict, modules_by_key: dict, bias_add: dict, out_st: str | None):
        super().__init__()
        self.layers, self.modules, self.bias_add, self.out_st = layers_by_key, modules_by_key, bias_add, out_st

    @staticmethod
    def new_part() -> dict:
        return {"merged": [], "copied": 0, "converted": 0}

    def plan(self, t):
        return [(t.name, self.out_st if (self.out_st and t.is_float) else t.dtype, t.shape)]

    def write(self, f, w, t, entries, part):
        name, st, shape = entries[0]
        bufs = self.bufs
        if name in self.layers or name in self.bias_add:
            x = _load_f32(f, name, bufs)
            if name in self.layers:
                _merge_one(x, self.layers[name])
                part["merged"].append({"module": self.modules[name], "key": name, "shape": list(shape), "dtype": st})
            else:
                layer = self.bias_add[name]
                x += np.float32(layer.scaling) * np.asarray(layer.lora_bias, np.float32)
            _store(w, name, x, st, bufs, finite=f"the merged {name!r} holds NaN or infinity; nothing was written")
        elif st != t.dtype:
            _store(w, name, _load_f32(f, name, bufs), st, bufs)
            part["converted"] += 1
        else:
            w.copy_from(f, name)
            part["copied"] += 1


def merge_checkpoint(base, adapter, out, *, dtype: str | None = None, overwrite: bool = False,
                     progress: bool | None = None, scheduler=None, workers: int | None = None) -> MergeReport:
    """Merge a PEFT adapter (a folder, or a :class:`~numlora.LoraAdapter`) into a checkpoint
    (a ``.safetensors`` file or a model folder, single or sharded) and write the merged
    checkpoint to ``out``.

    Targeted weights become ``W + s B A`` computed in float32 and stored in the base
    tensor's dtype, or in ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``), which
    then applies to every floating tensor. Everything else is copied byte for byte
    (integer tensors always). Metadata and shard layout are kept. ``progress``: a bar on
    stderr (default: when stderr is a terminal). ``scheduler`` (a Dask scheduler address
    or a ``distributed.Client``) or ``workers`` (a local cluster of that many worker
    processes): the shards of a model folder are converted as Dask tasks (see
    docs/dask.md); same output bytes, same guarantees."""
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
    with _runner(scheduler, workers, base) as runner, cleanup_scope(), Checkpoint(base) as ckpt:
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
        job = _MergeJob({k: layers[m] for k, m in by_key.items()}, by_key, bias_add, out_st)

        def cfg_update(cfg):
            cfg["torch_dtype"] = dtype

        parts = _stream(ckpt, dest, "merge", progress, job, cfg_update if dtype else None, runner)
        for part in parts:
            report.merged += part["merged"]
            report.copied += part["copied"]
            report.converted += part["converted"]
        report.bytes_in = ckpt.total_bytes
        report.dask = runner.summary() if runner is not None and ckpt.is_dir else None
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
    quant_type: str = "nf4"
    quantized: list = field(default_factory=list)  # [{key, shape, dtype, mean_abs_err, max_abs_err}]
    copied: int = 0
    bytes_before: int = 0  # of the quantized tensors, as stored in the input
    bytes_after: int = 0  # of their NF4 state (codes, scales, maps, JSON)
    total_in: int = 0
    total_out: int = 0
    mean_abs_err: float | None = 0.0  # None: the error pass was skipped (error_stats=False)
    max_abs_err: float | None = 0.0
    seconds: float = 0.0
    dask: dict | None = None  # a Dask run: workers, cluster start, wall time, each shard's task

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        mib = 1 << 20
        err = ("reconstruction error: not measured (--no-error-stats)" if self.mean_abs_err is None else
               f"reconstruction error: mean |w - deq(q(w))| = {self.mean_abs_err:.3g}, max = {self.max_abs_err:.3g}")
        return (f"quantized {len(self.quantized)} tensors to {self.quant_type.upper()} (blocksize {self.blocksize}"
                f"{', double quant' if self.double_quant else ''}), copied {self.copied}\n"
                f"quantized tensors: {self.bytes_before / mib:,.1f} MiB -> {self.bytes_after / mib:,.1f} MiB\n"
                f"checkpoint: {self.total_in / mib:,.1f} MiB -> {self.total_out / mib:,.1f} MiB\n"
                f"{err}\n"
                f"{self.seconds:.2f} s -> {self.output}" + _dask_line(self.dask))


def _dask_line(info: dict | None) -> str:
    if not info:
        return ""
    busy = sum(t["seconds"] for t in info["tasks"])
    return (f"\nDask: {len(info['tasks'])} shard tasks on {info['workers']} workers in {info['wall_seconds']:.2f} s "
            f"({busy:.2f} s inside the tasks; cluster start {info['startup_seconds']:.2f} s)")


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


def _nf4_entries(prefix: str, numel: int, blocksize: int, double_quant: bool, quant_type: str = "nf4"):
    nblocks = -(-numel // blocksize)
    e = [(f"{prefix}.weight", "U8", ((numel + 1) // 2, 1)),
         (f"{prefix}.weight.absmax", "U8" if double_quant else "F32", (nblocks,)),
         (f"{prefix}.weight.quant_map", "F32", (16,))]
    if double_quant:
        e += [(f"{prefix}.weight.nested_absmax", "F32", (-(-nblocks // 256),)),
              (f"{prefix}.weight.nested_quant_map", "F32", (256,))]
    e.append((f"{prefix}.weight.quant_state.bitsandbytes__{quant_type}", "U8", None))
    return e


class _QuantizeJob(_Job):
    def __init__(self, chosen, blocksize: int, double_quant: bool, quant_type: str = "nf4", error_stats: bool = True):
        super().__init__()
        self.chosen, self.blocksize, self.double_quant = frozenset(chosen), blocksize, double_quant
        self.quant_type, self.error_stats = quant_type, error_stats

    @staticmethod
    def new_part() -> dict:
        return {"quantized": [], "copied": 0}

    def plan(self, t):
        if t.name in self.chosen:
            return _nf4_entries(t.name[: -len(".weight")], t.numel, self.blocksize, self.double_quant,
                                self.quant_type)
        return [(t.name, t.dtype, t.shape)]

    def write(self, f, w, t, entries, part):
        from .nf4 import quantize_bf16_bits, quantize_bf16_bits_measured, quantize_error_fused_ok, quantize_nf4

        if t.name not in self.chosen:
            w.copy_from(f, t.name)
            part["copied"] += 1
            return
        bufs = self.bufs
        kc, kn = kernels("convert"), kernels("nf4")
        if t.dtype == "BF16" and (not self.error_stats or kn.error_stats_ok(t.numel, self.blocksize, kc.CHUNK)):
            # straight from the bits: the kernel widens block by block, no float32 copy (and
            # the error is measured in the same pass, or decoded and widened in L1 steps:
            # kn.nf4_quantize_bf16_err, kn.bf16_error_stats)
            bits = f.read_into(t.name, bufs.get("raw-BF16", t.numel, np.uint16).reshape(t.shape))
            x = None
            measured = self.error_stats and not self.double_quant and quantize_error_fused_ok(
                t.numel, self.blocksize, self.quant_type, kc.CHUNK)
        else:
            x = _load_f32(f, t.name, bufs)
            measured = False
        if self.error_stats:
            nchunks = -(-t.numel // kc.CHUNK)
            psum, pmax = bufs.get("psum", nchunks, np.float64), bufs.get("pmax", nchunks, np.float32)
        if measured:  # one pass: quantized and its error measured as it goes (the bits read once)
            q = quantize_bf16_bits_measured(bits, t.shape, self.blocksize, kc.CHUNK, psum, pmax)
        elif x is None:
            q = quantize_bf16_bits(bits, t.shape, self.blocksize, self.double_quant, self.quant_type)
        else:
            q = quantize_nf4(x, self.blocksize, double_quant=self.double_quant, quant_type=self.quant_type)
        q.dtype = _ST_TO_NAME[t.dtype]
        sd = q.to_state_dict(t.name[: -len(".weight")])
        names = [n for n, _, _ in entries]
        if set(sd) != set(names):
            raise FormatError(f"internal: NF4 state dict keys {sorted(sd)} differ from the declared "
                              f"{sorted(names)}")
        for n in names:
            w.write(n, sd[n])
        mean_err = max_err = None
        if self.error_stats:
            if measured:
                pass  # the partials came with the quantized tensor
            elif x is None:
                kn.bf16_error_stats(bits.reshape(-1), q.packed.reshape(-1), q.scales, q.blocksize, q.code, kc.CHUNK,
                                    psum, pmax)
            else:
                d = q.dequantize(out=bufs.get("deq", t.numel, np.float32).reshape(t.shape))
                kc.abs_err_stats(x.reshape(-1), d.reshape(-1), psum, pmax)
            mean_err, max_err = float(psum.sum()) / t.numel, float(pmax.max())
        part["quantized"].append({"key": t.name, "shape": list(t.shape), "dtype": t.dtype,
                                  "mean_abs_err": mean_err, "max_abs_err": max_err,
                                  "bytes_before": t.nbytes,
                                  "bytes_after": sum(np.asarray(sd[n]).nbytes for n in names)})


def quantize_checkpoint(src, out, *, blocksize: int = 64, double_quant: bool = False, include: str | None = None,
                        exclude: str | None = None, overwrite: bool = False,
                        progress: bool | None = None, scheduler=None, workers: int | None = None,
                        quant_type: str = "nf4", error_stats: bool = True) -> QuantizeReport:
    """Quantize the Linear weights of a checkpoint to NF4 (or FP4: ``quant_type="fp4"``) in
    the bitsandbytes / transformers layout (see :meth:`~numlora.NF4Tensor.to_state_dict`)
    and copy every other tensor byte for byte. A model folder's ``config.json`` gets the
    ``quantization_config`` transformers reads. ``scheduler`` / ``workers``: the shards of
    a model folder as Dask tasks, as in :func:`merge_checkpoint`.

    ``error_stats=False`` skips the reconstruction-error pass (a dequantize and a
    comparison per tensor; the report's errors are then None), and bf16 weights are then
    quantized straight from their bits, without a float32 copy: the output bytes are the
    same either way."""
    from .nf4 import QUANT_TYPES, check_blocksize

    t0 = time.perf_counter()
    blocksize = check_blocksize(blocksize)
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quant_type must be one of {sorted(QUANT_TYPES)}, got {quant_type!r:.40}")
    error_stats = flag("error_stats", error_stats)
    with _runner(scheduler, workers, src) as runner, cleanup_scope(), Checkpoint(src) as ckpt:
        infos = ckpt.infos()
        chosen = set(select_for_quantization(infos, include, exclude))
        if not chosen:
            raise ConfigError("no tensor selected for quantization (2-D floating *.weight tensors; check "
                              "--include / --exclude)")
        rep = QuantizeReport(output=os.path.abspath(os.fspath(out)), blocksize=blocksize, double_quant=double_quant,
                             quant_type=quant_type)
        dest = _make_output(ckpt, out, ckpt.files, overwrite, "quantize")
        job = _QuantizeJob(chosen, blocksize, double_quant, quant_type, error_stats)

        skipped = sorted({t.name[: -len(".weight")] for t in infos
                          if t.name.endswith(".weight") and t.name not in chosen and len(t.shape) == 2})

        def cfg_update(cfg):
            compute = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
            cfg["quantization_config"] = {
                "quant_method": "bitsandbytes",
                "load_in_4bit": True,
                "load_in_8bit": False,
                "bnb_4bit_quant_type": quant_type,
                "bnb_4bit_use_double_quant": bool(double_quant),
                "bnb_4bit_compute_dtype": compute,
                "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": skipped,
            }

        parts = _stream(ckpt, dest, "quantize", progress, job, cfg_update, runner)
        err_sum, err_n = 0.0, 0
        for part in parts:  # tensor by tensor, in checkpoint order, whichever process did the work
            rep.copied += part["copied"]
            for q in part["quantized"]:
                if error_stats:
                    n = math.prod(q["shape"])
                    err_sum += q["mean_abs_err"] * n
                    err_n += n
                    rep.max_abs_err = max(rep.max_abs_err, q["max_abs_err"])
                rep.bytes_before += q.pop("bytes_before")
                rep.bytes_after += q.pop("bytes_after")
                rep.quantized.append(q)
        rep.total_in = ckpt.total_bytes
        rep.dask = runner.summary() if runner is not None and ckpt.is_dir else None
    rep.total_out = _output_bytes(rep.output)
    rep.mean_abs_err = (err_sum / err_n if err_n else 0.0) if error_stats else None
    if not error_stats:
        rep.max_abs_err = None
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
        nf4 = []
        for t in infos:
            for qt in ("nf4", "fp4"):
                suffix = f".weight.quant_state.bitsandbytes__{qt}"
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
