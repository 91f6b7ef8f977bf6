"""Adapters for the bank from PEFT folders (read with :func:`numlora.load_peft_adapter`)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..errors import ConfigError, DTypeError

__all__ = ["named_folders", "peft_layer"]


def peft_layer(folder, module=None):
    """``(lora_a, lora_b, scaling)`` of layer ``module`` of the PEFT adapter folder
    ``folder``; ``module`` may be None when the folder holds a single layer. DoRA and
    LoRA-bias layers are refused (the bank computes plain LoRA)."""
    from ..io.peft import load_peft_adapter

    adapter = load_peft_adapter(folder)
    if module is None:
        layers = list(adapter.layer_names)
        if len(layers) != 1:
            raise ConfigError(f"the adapter in {os.fspath(folder)!r} has {len(layers)} layers "
                              f"({', '.join(layers[:8])}{', ...' if len(layers) > 8 else ''}): "
                              "say which one with module=")
        module = layers[0]
    layer = adapter.get_layer(module)
    if layer.use_dora or layer.lora_bias is not None:
        what = "DoRA" if layer.use_dora else "a LoRA bias"
        raise ConfigError(f"layer {module!r} of {os.fspath(folder)!r} uses {what}; LoraBank serves plain LoRA only")
    return layer.lora_a, layer.lora_b, layer.scaling


def named_folders(folders) -> list:
    """``[(name, folder)]`` of a ``{name: folder}`` mapping or a sequence of folders (each
    named by its last path component)."""
    if isinstance(folders, Mapping):
        return list(folders.items())
    if isinstance(folders, (str, os.PathLike)):
        raise DTypeError("folders must be a sequence of folders or a {name: folder} mapping, got one path; "
                         "wrap it in a list")
    return [(os.path.basename(os.path.normpath(os.fspath(f))), f) for f in folders]
