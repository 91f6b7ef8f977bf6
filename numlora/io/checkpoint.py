"""Model checkpoints: one ``.safetensors`` file, or a Hugging Face model folder (a single
``model.safetensors``, or shards with ``model.safetensors.index.json``)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from ..errors import FormatError
from ._files import brief, read_json
from .safetensors import SafetensorsFile, TensorInfo

__all__ = ["Checkpoint", "Shard"]


@dataclass
class Shard:
    name: str  # file name inside the folder (or the file's base name)
    path: str
    file: SafetensorsFile


class Checkpoint:
    """The tensors of a checkpoint, shard by shard, without reading any data.

    ``shards`` in index order (file order of the shard names), each an open
    :class:`SafetensorsFile`; ``weight_map`` maps every tensor to its shard's name;
    ``index_name`` / ``index_metadata`` describe the index file of a sharded folder
    (None / {} otherwise). ``files`` lists every input file (checkpoint files, index).
    """

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.exists(self.path):
            raise FormatError(f"no such checkpoint: {path}")
        self.is_dir = os.path.isdir(self.path)
        self.index_name = None
        self.index_metadata: dict = {}
        self.shards: list[Shard] = []
        try:
            if self.is_dir:
                self._open_folder()
            else:
                if not self.path.endswith(".safetensors"):
                    raise FormatError(f"expected a .safetensors file or a model folder, got {path}")
                self._add(os.path.basename(self.path), self.path)
            self.weight_map = {name: s.name for s in self.shards for name in s.file.keys()}
            if self.index_name:
                self._check_index()
        except BaseException:
            self.close()
            raise

    def _add(self, name, path):
        self.shards.append(Shard(name, path, SafetensorsFile(path)))

    def _open_folder(self):
        indexes = sorted(glob.glob(os.path.join(self.path, "*.safetensors.index.json")))
        if len(indexes) > 1:
            names = [os.path.basename(p) for p in indexes]
            raise FormatError(f"{self.path}: expected one *.safetensors.index.json, found {names}")
        if indexes:
            self.index_name = os.path.basename(indexes[0])
            index = read_json(indexes[0], "checkpoint index")
            self._index_map = self._read_index(indexes[0], index)
            for n in sorted(set(self._index_map.values())):
                p = os.path.join(self.path, n)
                if not os.path.lexists(p):
                    raise FormatError(f"{indexes[0]} names shard {n!r}, which is missing from {self.path}")
                self._add(n, p)
            return
        single = os.path.join(self.path, "model.safetensors")
        if os.path.isfile(single):
            self._add("model.safetensors", single)
            return
        found = sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
        if len(found) == 1:
            self._add(os.path.basename(found[0]), found[0])
            return
        if not found:
            bins = [os.path.basename(p) for p in glob.glob(os.path.join(self.path, "*.bin"))]
            hint = f" (found {bins}: pickled PyTorch files are not read; convert them to safetensors)" if bins else ""
            raise FormatError(f"{self.path}: no model.safetensors or *.safetensors.index.json{hint}")
        raise FormatError(f"{self.path}: several .safetensors files {[os.path.basename(p) for p in found]} "
                          "and no index naming them")

    def _read_index(self, path: str, index) -> dict:
        """The index's weight map, checked: an object of tensor name -> shard file name,
        each shard a plain ``*.safetensors`` name inside the folder (no folder part, no
        ``..``), so an index cannot make numlora read outside the model folder."""
        if not isinstance(index, dict):
            raise FormatError(f"{path}: expected a JSON object with a 'weight_map', got {type(index).__name__}")
        wmap = index.get("weight_map")
        if not isinstance(wmap, dict):
            got = "none" if wmap is None else f"{type(wmap).__name__} {brief(wmap)}"
            raise FormatError(f"{path}: expected a 'weight_map' object of tensor name -> shard file name, got {got}")
        if not wmap:
            raise FormatError(f"{path}: the 'weight_map' is empty; expected tensor name -> shard file name")
        for tensor, shard in wmap.items():
            if not isinstance(shard, str):
                raise FormatError(f"{path}: weight_map[{brief(tensor)}] must be a shard file name (a string), got "
                                  f"{type(shard).__name__} {brief(shard)}")
            if (shard in ("", ".", "..") or "/" in shard or "\\" in shard or "\0" in shard
                    or os.path.basename(shard) != shard or os.path.isabs(shard)):
                raise FormatError(f"{path}: weight_map[{brief(tensor)}] = {brief(shard)} is not a plain file name; "
                                  f"shards must lie in the model folder itself (no folders, no '..')")
            if not shard.endswith(".safetensors"):
                raise FormatError(f"{path}: weight_map[{brief(tensor)}] = {brief(shard)}; expected a "
                                  f"*.safetensors shard name")
        meta = index.get("metadata")
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise FormatError(f"{path}: 'metadata' must be an object, got {type(meta).__name__} {brief(meta)}")
        self.index_metadata = dict(meta)
        return dict(wmap)

    def _check_index(self):
        for tensor, shard in self._index_map.items():
            got = self.weight_map.get(tensor)
            if got is None:
                raise FormatError(f"{self.index_name} places {tensor!r} in {shard!r}, which has no such tensor")
            if got != shard:
                raise FormatError(f"{self.index_name} places {tensor!r} in {shard!r}, but it is in {got!r}")

    # ------------------------------------------------------------------------------------
    @property
    def files(self) -> list[str]:
        out = [s.path for s in self.shards]
        if self.index_name:
            out.append(os.path.join(self.path, self.index_name))
        return out

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name) -> bool:
        return name in self.weight_map

    def __len__(self) -> int:
        return len(self.weight_map)

    def shard_of(self, name: str) -> Shard:
        try:
            shard = self.weight_map[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor named {name!r}") from None
        return next(s for s in self.shards if s.name == shard)

    def info(self, name: str) -> TensorInfo:
        return self.shard_of(name).file.info(name)

    def get(self, name: str, float32: bool = True):
        return self.shard_of(name).file.get(name, float32)

    def infos(self) -> list[TensorInfo]:
        return [t for s in self.shards for t in s.file.infos()]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.infos())

    def other_files(self) -> list[str]:
        """Entries of a model folder that are not its tensors or index (config.json,
        tokenizer files, sub-folders such as a sentence-transformers ``1_Pooling``): a
        converted model folder carries them over. Hidden entries are skipped."""
        if not self.is_dir:
            return []
        mine = {os.path.basename(p) for p in self.files}
        return sorted(n for n in os.listdir(self.path)
                      if n not in mine and not n.startswith(".") and not n.endswith(".safetensors"))

    def close(self) -> None:
        for s in self.shards:
            s.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        kind = f"{len(self.shards)} shards" if self.index_name else "single file"
        return f"Checkpoint({self.path!r}, {kind}, tensors={len(self)})"
