"""File formats and file safety: safetensors files and checkpoints, atomic writes.
Nothing here imports numba."""

from .atomic import AtomicDir, AtomicFile, write_bytes_atomic, write_text_atomic
from .safetensors import SafetensorsFile, SafetensorsWriter, load_file, load_metadata, save_file

__all__ = [
    "AtomicDir",
    "AtomicFile",
    "SafetensorsFile",
    "SafetensorsWriter",
    "load_file",
    "load_metadata",
    "save_file",
    "write_bytes_atomic",
    "write_text_atomic",
]
