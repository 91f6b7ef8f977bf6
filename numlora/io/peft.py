"""PEFT adapter folders: ``adapter_config.json`` and ``adapter_model.safetensors``.

What PEFT's ``save_pretrained`` writes, numlora reads (:func:`load_peft_adapter`), and
what numlora writes (:func:`save_peft`) ``PeftModel.from_pretrained`` loads. Tensor keys
are ``base_model.model.<module path>.lora_A.weight`` ``(r, in)``, ``...lora_B.weight``
``(out, r)``, with ``lora_bias`` ``...lora_B.bias`` ``(out,)``, with DoRA
``...lora_magnitude_vector`` ``(out,)``; numlora names a layer by its module path (the
key without the ``base_model.model.`` prefix and the suffix). Embedding layers have
``...lora_embedding_A`` ``(r, num_embeddings)`` and ``...lora_embedding_B``
``(embedding_dim, r)`` (:class:`~numlora.layers.embedding.LoraEmbedding`); convolutions
have 3-D / 4-D ``lora_A.weight`` ``(r, C_in, *kernel)`` and ``lora_B.weight``
``(C_out, r, 1[, 1])`` (:class:`~numlora.layers.conv.LoraConv`, detached: attach gives the
base weight and the stride, padding and dilation, which an adapter file does not hold). The legacy
``adapter_model.bin`` is a pickle and is never loaded.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np

from ..adapter import LoraAdapter, register_peft_format
from ..config import LoraConfig, pattern_key
from ..errors import ConfigError, DTypeError, FormatError, NumloraError, ShapeError
from ..layers.conv import LoraConv
from ..layers.embedding import LoraEmbedding
from ._files import brief, read_json
from .atomic import write_text_atomic
from .safetensors import load_file, save_file

__all__ = ["load_peft_adapter", "save_peft", "adapter_from_tensors", "adapter_tensors", "peft_config_for",
           "CONFIG_NAME", "WEIGHTS_NAME", "LEGACY_WEIGHTS_NAME", "KEY_PREFIX"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
SAVE_DTYPES = ("F32", "F16", "BF16")
MAX_RANK = 2 ** 16  # r and rank_pattern values read from a file
MAX_CONFIG = 16 * 1024 * 1024  # bytes of adapter_config.json (real ones are about 1 KB)

# key suffix -> part of the layer
_SUFFIXES = (
    (".lora_A.weight", "lora_a"),
    (".lora_B.weight", "lora_b"),
    (".lora_B.bias", "lora_bias"),
    (".lora_magnitude_vector", "magnitude"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_embedding_A", "embedding_a"),
    (".lora_embedding_B", "embedding_b"),
)
_KEY_OF = {"lora_a": ".lora_A.weight", "lora_b": ".lora_B.weight", "lora_bias": ".lora_B.bias",
           "magnitude": ".lora_magnitude_vector", "embedding_a": ".lora_embedding_A",
           "embedding_b": ".lora_embedding_B"}


# --- reading ------------------------------------------------------------------------------
def load_peft_adapter(path) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder into a :class:`~numlora.adapter.LoraAdapter` of
    detached layers (attach the base weights with :meth:`LoraAdapter.attach
    <numlora.adapter.LoraAdapter.attach>`).

    The config is read with :meth:`LoraConfig.from_peft <numlora.config.LoraConfig.from_peft>`
    (PEFT's defaults for missing keys, a warning for unknown ones, only ``peft_type``
    ``"LORA"``). Each layer's rank is the number of rows of its ``lora_A`` and must agree
    with ``r`` / ``rank_pattern``; its alpha comes from ``lora_alpha`` / ``alpha_pattern``.
    Tensors may be float32, float16 or bfloat16 (held as float32). Raises
    :class:`~numlora.errors.FormatError` for a missing folder or file, a legacy
    ``adapter_model.bin`` without safetensors, or tensors that do not make up LoRA layers.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(f"no such PEFT adapter folder: {path}")
    if not os.path.isdir(path):
        raise FormatError(f"expected a PEFT adapter folder ({CONFIG_NAME} and {WEIGHTS_NAME}), got a file: {path}")
    cfg_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.lexists(cfg_path):
        raise FormatError(f"{path}: no {CONFIG_NAME}; a PEFT adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not os.path.lexists(weights_path):
        if os.path.lexists(os.path.join(path, LEGACY_WEIGHTS_NAME)):
            raise FormatError(
                f"{path}: has {LEGACY_WEIGHTS_NAME} but no {WEIGHTS_NAME}. {LEGACY_WEIGHTS_NAME} is a pickled "
                "PyTorch file and numlora never unpickles (loading a pickle can run arbitrary code). Convert it "
                "once where you trust it: PeftModel.from_pretrained(model, path).save_pretrained(out) writes "
                f"{WEIGHTS_NAME}")
        raise FormatError(f"{path}: no {WEIGHTS_NAME}; a PEFT adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    data = read_json(cfg_path, "PEFT adapter config", limit=MAX_CONFIG)
    if not isinstance(data, dict):
        raise FormatError(f"{cfg_path}: expected a JSON object, got {type(data).__name__}")
    _check_config_types(data, cfg_path)
    # the warnings name the file; re-issue them at the caller of load_peft_adapter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = LoraConfig.from_peft(data, source=cfg_path)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    tensors = load_file(weights_path, float32=True)
    return adapter_from_tensors(config, tensors, source=weights_path, stacklevel=3)


def _check_config_types(data: dict, source: str) -> None:
    """The types and bounds of the keys numlora uses, checked where the file is read so the
    message names the file: ``r`` and ``rank_pattern`` values integers in
    ``1..MAX_RANK``, ``lora_alpha`` and ``alpha_pattern`` values real numbers (not
    booleans), ``target_modules`` a list of strings, a string or null, the patterns
    objects, the switches booleans. (LoraConfig checks the values' ranges.)"""

    def bad(key, expected, value):
        raise FormatError(f"{source}: {key} must be {expected}, got {type(value).__name__} {brief(value)}")

    def rank(key, value):
        if type(value) is not int:
            bad(key, f"an integer in 1..{MAX_RANK}", value)
        if not 1 <= value <= MAX_RANK:
            raise FormatError(f"{source}: {key} must be an integer in 1..{MAX_RANK} (2**16; a LoRA rank is far "
                              f"smaller than the layer it adapts), got {brief(value)}")

    def real(key, value):
        if type(value) not in (int, float):
            bad(key, "a number", value)

    if data.get("r") is not None:
        rank("r", data["r"])
    if data.get("lora_alpha") is not None:
        real("lora_alpha", data["lora_alpha"])
    if data.get("lora_dropout") is not None:
        real("lora_dropout", data["lora_dropout"])
    targets = data.get("target_modules")
    if targets is not None and not isinstance(targets, str):
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            bad("target_modules", "a list of module names (strings), a regex string or null", targets)
    for key, check in (("rank_pattern", rank), ("alpha_pattern", real)):
        pattern = data.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            bad(key, "an object of module regex -> value", pattern)
        for k, v in pattern.items():
            check(f"{key}[{brief(k)}]", v)
    for key in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode"):
        value = data.get(key)
        if value is not None and not isinstance(value, bool):
            bad(key, "true or false", value)


def _split_key(key: str):
    """(layer name, part) of a tensor key, or (None, None) when it is not a LoRA Linear key."""
    body = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    for suffix, part in _SUFFIXES:
        if body.endswith(suffix) and len(body) > len(suffix):
            return body[: -len(suffix)], part
    return None, None


def adapter_from_tensors(config: LoraConfig, tensors, *, source: str = "adapter tensors",
                         stacklevel: int = 2) -> LoraAdapter:
    """A :class:`~numlora.adapter.LoraAdapter` of detached layers from PEFT-keyed tensors
    (``{key: array}``, keys as in ``adapter_model.safetensors``, with or without the
    ``base_model.model.`` prefix) and their config. ``source`` names them in messages.
    Tensors that are not LoRA tensors (``modules_to_save`` copies, for instance) are
    ignored with a warning."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    ignored = []
    for key, arr in tensors.items():
        name, part = _split_key(key)
        if name is None:
            if "lora_" in key:
                raise FormatError(f"{source}: {key}: not a LoRA tensor numlora understands; expected keys ending "
                                  f"in {', '.join(s for s, _ in _SUFFIXES)}")
            ignored.append(key)
            continue
        layer = parts.setdefault(name, {})
        if part in layer:
            raise FormatError(f"{source}: layer '{name}' has its {part} twice (the last one: {key})")
        layer[part] = (key, arr)
    if ignored:
        warnings.warn(f"{source}: ignoring tensors that are not LoRA layer tensors: {ignored}", UserWarning,
                      stacklevel=stacklevel)
    if not parts:
        raise FormatError(f"{source}: no LoRA tensors (keys ending in .lora_A.weight / .lora_B.weight)")
    adapter = LoraAdapter(config)
    for name, layer in parts.items():
        arrays = {}
        for part, (key, arr) in layer.items():
            arrays[part] = _float32(source, key, arr)
        if "embedding_a" in arrays or "embedding_b" in arrays:
            _add_embedding(adapter, config, name, layer, arrays, source)
            continue
        if "lora_a" in arrays and arrays["lora_a"].ndim in (3, 4):
            _add_conv(adapter, config, name, layer, arrays, source)
            continue
        for part in ("lora_a", "lora_b"):
            if part not in arrays:
                have = ", ".join(k for k, _ in layer.values())
                raise FormatError(f"{source}: layer '{name}' has no {KEY_PREFIX}{name}{_KEY_OF[part]} "
                                  f"(it has {have})")
        a, b = arrays["lora_a"], arrays["lora_b"]
        for part, arr in (("lora_a", a), ("lora_b", b)):
            if arr.ndim != 2:
                raise FormatError(f"{source}: {layer[part][0]}: expected a 2-D tensor (Linear / Conv1D layers) or "
                                  f"a 3-D / 4-D lora_A (Conv1d / Conv2d), got shape {arr.shape}")
        r = a.shape[0]
        if b.shape[1] != r:
            raise ShapeError(f"{source}: layer '{name}': lora_A has shape {a.shape} (rank {r}), so lora_B must have "
                             f"shape (out_features, {r}); got {b.shape}")
        _check_rank(config, name, a, "lora_A", source)
        for part, flag in (("magnitude", "use_dora"), ("lora_bias", "lora_bias")):
            enabled = getattr(config, flag)
            if enabled and part not in arrays:
                raise FormatError(f"{source}: the config has {flag}=true but layer '{name}' has no "
                                  f"{KEY_PREFIX}{name}{_KEY_OF[part]}")
            if not enabled and part in arrays:
                raise FormatError(f"{source}: {layer[part][0]} is present but the config has {flag}=false")
        _add(adapter.add_lora, config, name, a, b, source, magnitude=arrays.get("magnitude"),
             lora_bias=arrays.get("lora_bias"))
    return adapter


def _check_rank(config, name, a, a_name, source):
    """The rank of the A tensor ``a`` (called ``a_name`` in messages) is the config's for the layer."""
    want_r, r = config.rank_for(name), a.shape[0]
    if want_r != r:
        key = pattern_key(config.rank_pattern, name)
        why = f"rank_pattern[{key!r}]" if key is not None else "r"
        raise FormatError(f"{source}: layer '{name}': the config gives rank {want_r} ({why}), but {a_name} has "
                          f"shape {a.shape} (rank {r})")


def _add(add, config, name, a, b, source, **kwargs):
    """``add(name, a, b, alpha=<the config's for the layer>, **kwargs)`` (the adapter's
    add_lora, add_embedding or add_conv), its errors prefixed with the file and the layer."""
    try:
        add(name, a, b, alpha=config.alpha_for(name), **kwargs)
    except NumloraError as e:
        raise type(e)(f"{source}: layer '{name}': {e}") from None


def _plain_parts(config, name, layer, arrays, source, kind, allowed):
    """Refuse parts and switches numlora has only for Linear layers (DoRA, a LoRA bias)."""
    extra = [layer[p][0] for p in arrays if p not in allowed]
    if extra:
        raise FormatError(f"{source}: layer '{name}' is {kind} layer but has {extra}; numlora supports plain LoRA "
                          f"(no DoRA magnitude, no LoRA bias) on {kind} layers")
    for flag in ("use_dora", "lora_bias"):
        if getattr(config, flag):
            raise FormatError(f"{source}: the config has {flag}=true, which numlora supports on Linear layers "
                              f"only, and layer '{name}' is {kind} layer")
    for part in allowed:
        if part not in arrays:
            have = ", ".join(k for k, _ in layer.values())
            raise FormatError(f"{source}: layer '{name}' has no {KEY_PREFIX}{name}{_KEY_OF[part]} (it has {have})")


def _add_embedding(adapter, config, name, layer, arrays, source):
    _plain_parts(config, name, layer, arrays, source, "an embedding", ("embedding_a", "embedding_b"))
    a, b = arrays["embedding_a"], arrays["embedding_b"]
    for part, arr in (("embedding_a", a), ("embedding_b", b)):
        if arr.ndim != 2:
            raise FormatError(f"{source}: {layer[part][0]}: expected a 2-D tensor, got shape {arr.shape}")
    if b.shape[1] != a.shape[0]:
        raise ShapeError(f"{source}: layer '{name}': lora_embedding_A has shape {a.shape} (rank {a.shape[0]}), so "
                         f"lora_embedding_B must have shape (embedding_dim, {a.shape[0]}); got {b.shape}")
    _check_rank(config, name, a, "lora_embedding_A", source)
    _add(adapter.add_embedding, config, name, a, b, source)


def _add_conv(adapter, config, name, layer, arrays, source):
    _plain_parts(config, name, layer, arrays, source, "a convolution", ("lora_a", "lora_b"))
    a, b = arrays["lora_a"], arrays["lora_b"]
    nd = a.ndim - 2
    if b.shape != (b.shape[0], a.shape[0]) + (1,) * nd:
        raise ShapeError(f"{source}: layer '{name}': lora_A has shape {a.shape} (a Conv{nd}d of rank {a.shape[0]}), "
                         f"so lora_B must have shape (C_out, {a.shape[0]}{', 1' * nd}); got {b.shape}")
    _check_rank(config, name, a, "lora_A", source)
    _add(adapter.add_conv, config, name, a, b, source)


def _float32(source, key, arr) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind != "f":
        raise DTypeError(f"{source}: {key}: expected a floating tensor (F32, F16, BF16), got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


# --- writing ------------------------------------------------------------------------------
def _target_modules(config: LoraConfig, names):
    """The config's targets if they cover every layer (PEFT's matching), else the config's
    list plus the layers it misses (a regex that misses some: the layer names)."""
    missed = [n for n in names if not config.targets(n)]
    if not missed:
        return config.target_regex if config.target_regex is not None else list(config.target_modules)
    if config.target_regex is not None:
        return list(names)
    return list(config.target_modules) + missed


def _pattern(names, values, default, config_pattern, lookup):
    r"""The config's pattern when it gives every layer its value, else one key per layer
    whose value differs from the global one: ``"^" + re.escape(name)``, which under PEFT's
    ``re.match(rf"(.*\.)?({key})$", path)`` matches that exact path and nothing else, so
    the keys' order does not matter (PEFT sorts them when it saves a config)."""
    if all(lookup(n) == values[n] for n in names):
        return dict(config_pattern)
    return {"^" + re.escape(n): values[n] for n in names if values[n] != default}


def peft_config_for(adapter: LoraAdapter) -> dict:
    """The ``adapter_config.json`` dict for ``adapter``: the config's :meth:`to_peft
    <numlora.config.LoraConfig.to_peft>` with ``target_modules``, ``rank_pattern`` and
    ``alpha_pattern`` made to give PEFT exactly the adapter's layers, ranks and alphas."""
    c = adapter.config
    names = list(adapter.layer_names)
    ranks = {n: adapter[n].rank for n in names}
    alphas = {n: adapter[n].alpha for n in names}
    d = c.to_peft()
    d["target_modules"] = _target_modules(c, names)
    d["rank_pattern"] = _pattern(names, ranks, c.rank, c.rank_pattern, c.rank_for)
    d["alpha_pattern"] = {k: (int(v) if float(v).is_integer() else v) for k, v in
                          _pattern(names, alphas, c.alpha, c.alpha_pattern, c.alpha_for).items()}
    return d


def adapter_tensors(adapter: LoraAdapter) -> dict:
    """The adapter's tensors under PEFT keys, float32 (a zero ``lora_B.bias`` for layers
    without one when the config has ``lora_bias``). Checks that every layer fits the
    config's global switches (PEFT has one ``use_dora``, ``lora_bias``, ``use_rslora`` and
    ``fan_in_fan_out`` for the whole adapter)."""
    c = adapter.config
    out = {}
    for name, layer in adapter.items():
        plain = isinstance(layer, (LoraEmbedding, LoraConv))
        _check_switches(c, name, layer, plain)
        key = KEY_PREFIX + name
        parts = ("embedding_a", "embedding_b") if isinstance(layer, LoraEmbedding) else ("lora_a", "lora_b")
        for part, arr in zip(parts, (layer.lora_a, layer.lora_b)):
            out[key + _KEY_OF[part]] = np.ascontiguousarray(arr, np.float32)
        if plain:
            continue
        if c.lora_bias:
            lb = layer.lora_bias
            out[key + _KEY_OF["lora_bias"]] = (np.zeros(layer.out_features, np.float32) if lb is None
                                               else np.ascontiguousarray(lb, np.float32))
        if c.use_dora:
            out[key + _KEY_OF["magnitude"]] = np.ascontiguousarray(layer.magnitude, np.float32)
    return out


def _check_switches(c, name, layer, plain):
    """The layer's switches are the config's (PEFT has one of each for the whole adapter);
    an embedding or a convolution (``plain``) has plain LoRA only (no DoRA, no LoRA bias)."""
    for flag in ("use_rslora",) if plain else ("use_dora", "use_rslora", "fan_in_fan_out"):
        have = getattr(layer, flag)
        if have != getattr(c, flag):
            raise ConfigError(f"layer '{name}' has {flag}={have} but the adapter's config has "
                              f"{flag}={getattr(c, flag)}; PEFT has one setting for every layer")
    if plain:
        for flag in ("use_dora", "lora_bias"):
            if getattr(c, flag):
                raise ConfigError(f"the adapter's config has {flag}=True, which numlora supports on Linear layers "
                                  f"only; layer '{name}' is a {type(layer).__name__}")
    elif layer.lora_bias is not None and not c.lora_bias:
        raise ConfigError(f"layer '{name}' has a LoRA bias but the adapter's config has lora_bias=False")


def save_peft(adapter: LoraAdapter, path, *, dtype: str = "F32") -> None:
    """Write ``adapter`` as a PEFT folder ``path`` (created if missing): first
    ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``), then
    ``adapter_config.json``, each atomically (a temporary file, then a rename); other files
    in the folder are left alone.

    ``dtype`` : ``"F32"`` (default), ``"F16"`` or ``"BF16"`` for the stored tensors (float64
    layers are stored as float32 at best). Layers of different ranks or alphas get
    ``rank_pattern`` / ``alpha_pattern`` entries (see :func:`peft_config_for`)."""
    if not isinstance(adapter, LoraAdapter):
        raise DTypeError(f"expected a LoraAdapter, got {type(adapter).__name__}")
    if dtype not in SAVE_DTYPES:
        raise ConfigError(f"dtype must be one of {SAVE_DTYPES}, got {dtype!r}")
    if len(adapter) == 0:
        raise ConfigError("the adapter has no layers; a PEFT adapter needs at least one")
    tensors = adapter_tensors(adapter)
    cfg = peft_config_for(adapter)
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FormatError(f"cannot write a PEFT adapter folder at {path}: it exists and is not a folder")
    os.makedirs(path, exist_ok=True)
    dtypes = None if dtype == "F32" else {k: dtype for k in tensors}
    save_file(os.path.join(path, WEIGHTS_NAME), tensors, {"format": "pt"}, dtypes=dtypes)
    # top-level keys sorted as PEFT writes them; the patterns keep their order (first match wins)
    text = json.dumps({k: cfg[k] for k in sorted(cfg)}, indent=2)
    write_text_atomic(os.path.join(path, CONFIG_NAME), text + "\n")


register_peft_format(load=load_peft_adapter, save=save_peft)
