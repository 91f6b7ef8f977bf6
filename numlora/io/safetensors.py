"""safetensors files without PyTorch: a validating, lazy reader and a streaming, atomic writer.

The format: an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``),
then the raw little-endian tensor bytes, offsets relative to the end of the header.

Why our own reader rather than the ``safetensors`` package: numpy has no bfloat16 (the
package's numpy loader refuses BF16 files), the package reads a whole file at once, and
numlora needs to stream a checkpoint tensor by tensor with memory bounded by the largest
tensor. Tensors are read through a memory map of just their own bytes, dropped as soon as
the caller lets go of the array, so pages do not pile up in the resident set.

bfloat16 and float16 tensors are converted to float32 on request (:meth:`SafetensorsFile.get`)
and back on write (``dtypes=`` of :func:`save_file`, :class:`SafetensorsWriter`):
bfloat16 rounds to nearest, ties to even, as ``torch.Tensor.to(torch.bfloat16)`` does.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from .._validate import flag
from ..errors import ConfigError, DTypeError, FormatError, ShapeError
from ._files import brief, describe_os_error, open_regular, parse_json
from .atomic import AtomicFile, Transaction

__all__ = [
    "DTYPES",
    "SafetensorsFile",
    "SafetensorsWriter",
    "TensorInfo",
    "bf16_to_f32",
    "f32_to_bf16",
    "load_file",
    "load_metadata",
    "save_file",
    "storage_dtype",
]

# safetensors dtype name -> numpy storage dtype (little endian). BF16 is stored as its 16 bits.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_NUMPY_TO_ST = {
    np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16", np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64", np.dtype("uint32"): "U32", np.dtype("uint16"): "U16", np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit
MAX_NDIM = 32  # numpy's limit before 2.0
MAX_INDEX = 2 ** 63 - 1  # element counts and byte counts must fit an int64
_ALIGN = 8  # pad the header so tensor data starts 8-byte aligned (as the reference writer does)


def storage_dtype(name: str) -> np.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise DTypeError(f"unsupported safetensors dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def st_dtype_of(array: np.ndarray) -> str:
    """The safetensors dtype name of a numpy array's dtype (bfloat16 cannot be one)."""
    dt = np.dtype(array.dtype).newbyteorder("=") if array.dtype.byteorder not in "=|" else np.dtype(array.dtype)
    try:
        return _NUMPY_TO_ST[np.dtype(dt.str.replace(">", "<"))]
    except KeyError:
        raise DTypeError(f"cannot store numpy dtype {array.dtype} in safetensors; expected one of "
                         f"{sorted(str(d) for d in _NUMPY_TO_ST)}") from None


# --- bfloat16 ---------------------------------------------------------------------------
def bf16_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact: the 16 bits become the top half)."""
    bits = np.asarray(bits, dtype=np.uint16)
    if out is None:
        out = np.empty(bits.shape, np.float32)
    wide = out.view(np.uint32)
    np.left_shift(bits, 16, out=wide, dtype=np.uint32)
    return out


def f32_to_bf16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, as torch rounds;
    infinities stay infinite, NaN stays a (quiet) NaN with its sign."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty(x.shape, np.uint16)
    elif out.shape != x.shape or out.dtype != np.uint16 or not out.flags.c_contiguous:
        raise ShapeError(f"out must be a C-contiguous uint16 array of shape {x.shape}, got {out.dtype} {out.shape}")
    flat_x, flat_o = x.reshape(-1), out.reshape(-1)
    step = 1 << 20  # bounded temporaries, whatever the tensor's size
    for i in range(0, flat_x.size, step):
        xs = flat_x[i:i + step]
        u = xs.view(np.uint32)
        tmp = u >> 16
        tmp &= 1
        tmp += 0x7FFF
        tmp += u
        tmp >>= 16
        nan = np.isnan(xs)
        if nan.any():
            tmp[nan] = (u[nan] >> 16) | 0x0040
        flat_o[i:i + step] = tmp
    return out


def to_float32(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """A stored tensor (as returned by :meth:`SafetensorsFile.raw`) as float32. Without
    ``out`` a float32 tensor comes back as it is (read-only when mapped); with ``out`` (a
    float32 array of the tensor's shape, e.g. a reused work buffer) the values are written
    there."""
    if dtype not in FLOAT_DTYPES:
        raise DTypeError(f"expected a floating tensor (F32, F16, BF16, F64), got {dtype}")
    if dtype == "BF16":
        return bf16_to_f32(raw, out=out)
    if out is not None:
        np.copyto(out, raw, casting="same_kind")
        return out
    return raw if dtype == "F32" else raw.astype(np.float32)


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 data in the storage dtype of safetensors ``dtype`` (F32, F16, BF16, F64)."""
    if dtype == "BF16":
        return f32_to_bf16(x)
    if dtype in ("F32", "F16", "F64"):
        return np.asarray(x).astype(DTYPES[dtype], copy=False)
    raise DTypeError(f"expected a floating safetensors dtype (F32, F16, BF16, F64), got {dtype}")


# --- reading ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple
    begin: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


class SafetensorsFile:
    """A safetensors file, header parsed and checked, tensors read on demand.

    ``keys()`` lists tensors in file order. :meth:`raw` gives a tensor as stored (bfloat16
    as uint16 bits), memory-mapped and read-only; :meth:`get` converts floating tensors to
    float32 (``float32=False`` keeps them as stored). Usable as a context manager.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._file = open_regular(self.path, "safetensors file")
        try:
            self._parse()
        except OSError as e:
            self._file.close()
            raise FormatError(f"cannot read the safetensors file {self.path}: {describe_os_error(e)}") from None
        except BaseException:
            self._file.close()
            raise

    def _fail(self, what: str):
        raise FormatError(f"{self.path}: not a valid safetensors file: {what}")

    def _parse(self):
        size = os.fstat(self._file.fileno()).st_size
        self.file_size = size
        head = self._file.read(8)
        if len(head) < 8:
            self._fail(f"expected an 8-byte header length, the file has {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            self._fail(f"header length {n} exceeds the {MAX_HEADER}-byte limit")
        if 8 + n > size:
            self._fail(f"header length {n} runs past the end of the file ({size} bytes): truncated?")
        raw = self._file.read(n)
        if len(raw) < n:
            self._fail(f"the file ended after {8 + len(raw)} bytes while reading its {n}-byte header: it shrank "
                       f"while being read")
        header = parse_json(raw, f"{self.path}: not a valid safetensors file: header")
        if not isinstance(header, dict):
            self._fail(f"header must be a JSON object, got {type(header).__name__}")
        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            self._fail(f"__metadata__ must be an object mapping str to str, got {type(meta).__name__}")
        for k, v in meta.items():
            if not isinstance(v, str):
                self._fail(f"__metadata__ must map str to str; the value of {brief(k)} is "
                           f"{type(v).__name__} {brief(v)}")
        self.metadata: dict[str, str] = dict(meta)
        self.data_start = 8 + n
        data_len = size - self.data_start
        infos = []
        for name, entry in header.items():
            infos.append(self._tensor_info(name, entry, data_len))
        infos.sort(key=lambda t: (t.begin, t.nbytes))
        end = self.data_start
        for t in infos:
            if t.begin < end:
                self._fail(f"tensor {brief(t.name)} overlaps the tensor before it")
            end = t.begin + t.nbytes
        self._infos = {t.name: t for t in infos}

    def _tensor_info(self, name: str, entry, data_len: int) -> TensorInfo:
        what = f"tensor {brief(name)}"
        if not isinstance(entry, dict):
            self._fail(f"{what}: expected an object with dtype, shape and data_offsets, got "
                       f"{type(entry).__name__} {brief(entry)}")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            self._fail(f"{what}: expected dtype, shape and data_offsets, {', '.join(missing)} missing")
        dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            self._fail(f"{what}: dtype must be a string such as \"F32\", got {type(dtype).__name__} {brief(dtype)}")
        if dtype not in DTYPES:
            self._fail(f"{what}: unknown dtype {brief(dtype)}; expected one of {sorted(DTYPES)}")
        if not isinstance(shape, list):
            self._fail(f"{what}: shape must be a list of non-negative integers, got {type(shape).__name__} "
                       f"{brief(shape)}")
        if len(shape) > MAX_NDIM:
            self._fail(f"{what}: shape has {len(shape)} dimensions; at most {MAX_NDIM} are supported")
        for d in shape:
            if type(d) is not int or d < 0:  # bool is an int subclass: refused too
                kind = "a negative integer" if type(d) is int else type(d).__name__
                self._fail(f"{what}: shape must be a list of non-negative integers, got {brief(shape)} "
                           f"(holding {kind} {brief(d)})")
        nonzero = math.prod(d for d in shape if d)
        itemsize = DTYPES[dtype].itemsize
        if nonzero * itemsize > MAX_INDEX:
            self._fail(f"{what}: shape {brief(shape)}: its nonzero dimensions make {nonzero} elements of {itemsize} "
                       f"bytes, more than 2**63 - 1 bytes (the int64 limit of any index)")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            self._fail(f"{what}: data_offsets must be a list of two integers [begin, end], got {brief(offs)}")
        if not 0 <= offs[0] <= offs[1]:
            self._fail(f"{what}: data_offsets {offs} must satisfy 0 <= begin <= end")
        nbytes = math.prod(shape) * itemsize
        if offs[1] - offs[0] != nbytes:
            self._fail(f"{what}: {dtype} {tuple(shape)} needs {nbytes} bytes, data_offsets {offs} give "
                       f"{offs[1] - offs[0]}")
        if offs[1] > data_len:
            self._fail(f"{what}: data ends at byte {offs[1]} of the data section, which has only {data_len} bytes: "
                       f"truncated?")
        return TensorInfo(name, dtype, tuple(shape), self.data_start + offs[0], nbytes)

    # mapping-like access -------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._infos)

    def __iter__(self):
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor named {name!r}") from None

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored, read-only, memory-mapped (only its own pages).

        A mapped file that is truncated by someone else while the array is in use makes
        the process die of SIGBUS when the missing pages are touched; :meth:`read_into`
        (used by ``numlora merge`` / ``quantize``) reads with ``pread`` instead and raises
        :class:`~numlora.errors.FormatError`."""
        t = self.info(name)
        dt = DTYPES[t.dtype]
        if t.nbytes == 0:
            return np.zeros(t.shape, dt)
        self._check_size(t)
        gran = mmap.ALLOCATIONGRANULARITY
        start = t.begin - t.begin % gran
        mm = mmap.mmap(self._file.fileno(), t.begin + t.nbytes - start, offset=start, access=mmap.ACCESS_READ)
        buf = np.frombuffer(mm, np.uint8, t.nbytes, t.begin - start)
        if (t.begin - start) % dt.itemsize:
            buf = buf.copy()  # unaligned data: a copy keeps numpy and numba happy
            buf.flags.writeable = False
        return buf.view(dt).reshape(t.shape)

    def _check_size(self, t: TensorInfo) -> None:
        size = os.fstat(self._file.fileno()).st_size
        if size < t.begin + t.nbytes:
            self._shrank(t.name, size)

    def _shrank(self, name: str, size=None):
        now = f" (now {size} bytes)" if size is not None else ""
        raise FormatError(f"{self.path}: the file was truncated while it was being read{now}: tensor {name!r} "
                          f"ends at byte {self._infos[name].begin + self._infos[name].nbytes}, but the file had "
                          f"{self.file_size} bytes when it was opened")

    def _pread_into(self, name: str, view: memoryview, pos: int) -> None:
        """Fill ``view`` (bytes) from file offset ``pos``."""
        fd = self._file.fileno()
        done, total = 0, len(view)
        while done < total:
            part = view[done:done + (1 << 26)]
            try:
                if hasattr(os, "preadv"):
                    got = os.preadv(fd, [part], pos + done)
                else:  # pragma: no cover - every platform numlora runs on has preadv
                    data = os.pread(fd, len(part), pos + done)
                    got = len(data)
                    part[:got] = data
            except OSError as e:
                raise FormatError(f"cannot read tensor {name!r} of {self.path}: {describe_os_error(e)}") from None
            if got == 0:
                self._shrank(name)
            done += got

    def read_into(self, name: str, out: np.ndarray) -> np.ndarray:
        """Read tensor ``name`` as stored into ``out`` (a writable C-contiguous array of its
        storage dtype and shape, e.g. a reused work buffer) with ``pread``: no mapping, so a
        file truncated meanwhile raises :class:`~numlora.errors.FormatError` instead of
        killing the process."""
        t = self.info(name)
        dt = DTYPES[t.dtype]
        if out.dtype != dt or out.shape != t.shape or not out.flags.c_contiguous or not out.flags.writeable:
            raise ShapeError(f"out must be a writable C-contiguous {dt} array of shape {t.shape}, got "
                             f"{out.dtype} {out.shape}")
        if t.nbytes:
            self._pread_into(name, memoryview(out.reshape(-1).view(np.uint8)), t.begin)
        return out

    def get(self, name: str, float32: bool = True) -> np.ndarray:
        """The tensor as a numpy array; floating tensors as float32 unless ``float32=False``."""
        t = self.info(name)
        a = self.raw(name)
        if float32 and t.is_float:
            return to_float32(a, t.dtype)
        return a

    def read_bytes(self, name: str) -> bytes:
        t = self.info(name)
        buf = bytearray(t.nbytes)
        if t.nbytes:
            self._pread_into(name, memoryview(buf), t.begin)
        return bytes(buf)

    def copy_bytes_to(self, name: str, dst, chunk: int = 1 << 24) -> None:
        """Copy a tensor's stored bytes into the binary file object ``dst`` in chunks
        (constant memory, no mapping)."""
        t = self.info(name)
        fd = self._file.fileno()
        pos, end = t.begin, t.begin + t.nbytes
        while pos < end:
            try:
                data = os.pread(fd, min(chunk, end - pos), pos)
            except OSError as e:
                raise FormatError(f"cannot read tensor {name!r} of {self.path}: {describe_os_error(e)}") from None
            if not data:
                self._shrank(name)
            dst.write(data)
            pos += len(data)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, tensors={len(self)})"


def load_file(filename, *, float32: bool = False, backend: str = "mmap") -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, read into memory: a dict of writable numpy arrays
    in file order, as ``safetensors.numpy.load_file(filename)`` returns (same keys, same
    values, same dtypes), so code written for one works with the other. The metadata comes
    from :func:`load_metadata`.

    Where the two differ: numpy has no bfloat16 or float8, and ``safetensors.numpy`` refuses
    files holding them (``TypeError``); here BF16 tensors arrive as their uint16 bit patterns
    and F8_E4M3 / F8_E5M2 as uint8, as :meth:`SafetensorsFile.raw` gives them (:func:`save_file`
    with ``dtypes={name: "BF16"}`` writes such bits back unchanged). ``float32=True`` converts
    every floating tensor (F64, F32, F16, BF16) to float32 instead (exact for F16 and BF16).

    ``backend`` (``"mmap"`` or ``"pread"``) is accepted as ``safetensors.numpy`` accepts it;
    both read with ``pread``, so a file truncated while it is read raises
    :class:`~numlora.errors.FormatError` instead of a bus error."""
    float32 = flag("float32", float32)
    if backend not in ("mmap", "pread"):
        raise ConfigError(f"backend must be 'mmap' or 'pread', got {backend!r:.60}")
    with SafetensorsFile(filename) as f:
        tensors = {}
        for name in f.keys():
            t = f.info(name)
            a = f.read_into(name, np.empty(t.shape, DTYPES[t.dtype]))
            tensors[name] = to_float32(a, t.dtype) if float32 and t.is_float else a
        return tensors


def load_metadata(filename) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (``{}`` when it has none), as
    ``safetensors.safe_open(filename, "np").metadata()`` gives it (which is ``None`` for a
    file without metadata); only the header is read."""
    with SafetensorsFile(filename) as f:
        return dict(f.metadata)


# --- writing --------------------------------------------------------------------------------
def _header_json(entries, shapes, metadata, offsets_width: int | None = None) -> bytes:
    """The header JSON. With ``offsets_width`` every number that is not known yet (data
    offsets, undeclared lengths) is written with that many digits: an upper bound on the
    length of the final header."""
    header = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    big = 10 ** (offsets_width or 1) - 1
    for (name, dtype, _), shape in zip(entries, shapes):
        if shape is None:
            shape = (big,)
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        offs = [big, big] if offsets_width else [offset, offset + nbytes]
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": offs}
        offset += nbytes
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def _padded(text: bytes, length: int | None = None) -> bytes:
    if length is None:
        length = len(text) + (-(8 + len(text))) % _ALIGN
    return struct.pack("<Q", length) + text + b" " * (length - len(text))


class SafetensorsWriter(Transaction):
    """Write a safetensors file tensor by tensor without holding them all.

    ``entries`` declares every tensor up front: ``(name, dtype, shape)`` in the order they
    will be written. A shape of ``None`` declares a 1-D tensor whose length is known only
    when it is written (the header then reserves room and is padded with spaces, which the
    format allows). Then call :meth:`write` (an array, converted to the declared dtype when
    floating) or :meth:`copy_from` (the stored bytes of a tensor of a
    :class:`SafetensorsFile`) once per tensor, in order, and :meth:`commit`. The file
    appears at ``path`` only on commit (temporary file, fsync, rename); on an exception
    inside ``with`` nothing is left behind.
    """

    def __init__(self, path, entries: Iterable[tuple[str, str, tuple | None]],
                 metadata: Mapping[str, str] | None = None):
        self.entries = []
        seen = set()
        for name, dtype, shape in entries:
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise FormatError(f"invalid tensor name {name!r}")
            if name in seen:
                raise FormatError(f"tensor name {name!r} appears twice")
            seen.add(name)
            storage_dtype(dtype)
            self.entries.append((name, dtype, None if shape is None else tuple(int(x) for x in shape)))
        if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise DTypeError("safetensors metadata must map str to str")
        self.metadata = dict(metadata or {})
        self._shapes = [shape for _, _, shape in self.entries]
        self._deferred = any(shape is None for shape in self._shapes)
        self._file = AtomicFile(path)
        self._next = 0
        try:
            if self._deferred:
                self._reserved = len(_padded(_header_json(self.entries, self._shapes, self.metadata, 20))) - 8
                self._file.write(b"\0" * (8 + self._reserved))
            else:
                self._file.write(_padded(_header_json(self.entries, self._shapes, self.metadata)))
        except BaseException:
            self._file.abort()
            raise

    @property
    def path(self) -> str:
        return self._file.path

    def _expect(self, name):
        if self._next >= len(self.entries):
            raise FormatError(f"all {len(self.entries)} declared tensors are written; got one more ({name!r})")
        exp = self.entries[self._next]
        if name != exp[0]:
            raise FormatError(f"tensors must be written in declared order: expected {exp[0]!r}, got {name!r}")
        return exp

    def _check_shape(self, name, declared, got):
        if declared is None:
            if len(got) != 1:
                raise ShapeError(f"tensor {name!r}: declared 1-D of any length, got shape {got}")
            self._shapes[self._next] = got
        elif got != declared:
            raise ShapeError(f"tensor {name!r}: declared shape {declared}, got {got}")

    def write(self, name: str, array: np.ndarray) -> None:
        _, dtype, shape = self._expect(name)
        a = np.asarray(array)
        self._check_shape(name, shape, tuple(a.shape))
        store = DTYPES[dtype]
        if dtype in FLOAT_DTYPES and a.dtype.kind == "f":
            if dtype == "BF16":
                a = f32_to_bf16(a)
            elif a.dtype != store:
                a = a.astype(store)
        elif dtype == "BF16" and a.dtype == np.uint16:
            pass  # already bfloat16 bits
        elif a.dtype.newbyteorder("<") != store.newbyteorder("<"):
            raise DTypeError(f"tensor {name!r}: declared {dtype} (numpy {store}), got numpy {a.dtype}")
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.size:
            self._file.write(memoryview(a.reshape(-1)).cast("B"))
        self._next += 1

    def copy_from(self, src: SafetensorsFile, name: str, as_name: str | None = None) -> None:
        """Copy tensor ``name`` of ``src`` byte for byte (it must match the declaration)."""
        target = name if as_name is None else as_name
        _, dtype, shape = self._expect(target)
        t = src.info(name)
        if t.dtype != dtype:
            raise FormatError(f"tensor {target!r}: declared {dtype}, source has {t.dtype}")
        self._check_shape(target, shape, t.shape)
        src.copy_bytes_to(name, self._file)
        self._next += 1

    def commit(self) -> None:
        if self._file._done:  # committed (or aborted) already
            return
        if self._next != len(self.entries):
            missing = [n for n, _, _ in self.entries[self._next:]]
            self.abort()
            raise FormatError(f"{len(missing)} declared tensors were not written: {missing[:5]}")
        if self._deferred:
            text = _header_json(self.entries, self._shapes, self.metadata)
            self._file.seek(0)
            self._file.write(_padded(text, self._reserved))
        self._file.commit()

    def abort(self) -> None:
        self._file.abort()



def save_file(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None,
              dtypes: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` atomically. ``dtypes`` maps a name to the safetensors dtype to store
    it in (``"BF16"``, ``"F16"``, ...): floating arrays are converted; by default the numpy
    dtype decides. Tensors are laid out in the mapping's order."""
    dtypes = dict(dtypes or {})
    unknown = sorted(set(dtypes) - set(tensors))
    if unknown:
        raise FormatError(f"dtypes names tensors that are not being saved: {unknown}")
    entries = []
    for name, a in tensors.items():
        a = np.asarray(a)
        entries.append((name, dtypes.get(name) or st_dtype_of(a), a.shape))
    if not isinstance(metadata, (Mapping, type(None))):
        raise DTypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    with SafetensorsWriter(path, entries, metadata) as w:
        for name, a in tensors.items():
            w.write(name, a)
