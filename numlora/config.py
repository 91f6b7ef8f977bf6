"""``LoraConfig``: rank, alpha, dropout and the rest, validated on construction, with
conversion to and from PEFT's ``adapter_config.json``."""

from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from . import _validate as validate
from .errors import ConfigError, DTypeError

__all__ = ["LoraConfig", "lora_scaling", "pattern_key"]

_FIELDS = ("rank", "alpha", "dropout", "target_modules", "fan_in_fan_out", "use_rslora", "rank_pattern",
           "alpha_pattern", "use_dora", "lora_bias", "target_regex", "base_model_name_or_path", "task_type")


def pattern_key(patterns, name: str):
    """The first key of ``patterns`` that matches module path ``name`` the way PEFT
    matches ``rank_pattern`` / ``alpha_pattern`` keys (``re.match(rf"(.*\\.)?({key})$",
    name)``: the key, as a regex, matches the whole path or a dotted suffix of it), or
    None when none does."""
    _module_path(name)
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _frozen_pattern(name: str, value, check_value):
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise DTypeError(f"{name} must be a dict of regex -> value, got {type(value).__name__}")
    out = {}
    for key, val in value.items():
        if not isinstance(key, str):
            raise DTypeError(f"{name} keys must be str (regular expressions), got {type(key).__name__} ({key!r})")
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as e:
            raise ConfigError(f"{name} key {key!r} is not a valid regular expression: {e}") from None
        out[key] = check_value(f"{name}[{key!r}]", val)
    return MappingProxyType(out)


def _check_rank(name, rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise DTypeError(f"{name} must be an integer, got {type(rank).__name__}")
    if rank <= 0:
        raise ConfigError(f"LoRA rank must be > 0, got {rank}" if name == "rank" else
                          f"{name}: LoRA rank must be > 0, got {rank}")
    return int(rank)


def _check_alpha(name, alpha) -> float:
    """``alpha`` by the one rule for scalars (:func:`numlora._validate.real_scalar`: a real
    number, finite in float32, here also > 0), the message prefixed with ``name`` when it
    is a pattern entry."""
    try:
        return validate.real_scalar("LoRA alpha", alpha, positive=True)
    except (ConfigError, DTypeError) as e:
        if name == "alpha":
            raise
        raise type(e)(f"{name}: {e}") from None


def _module_path(name):
    if not isinstance(name, str):
        raise DTypeError(f"a module path must be a str (e.g. 'model.layers.0.self_attn.q_proj'), "
                         f"got {type(name).__name__}")


def _json_number(x: float):
    """``16.0`` -> ``16`` (PEFT writes integer alphas as integers), other floats as they are."""
    return int(x) if float(x).is_integer() else x


@dataclass(frozen=True)
class LoraConfig:
    """Configuration of a LoRA adapter.

    rank : int > 0 (PEFT's ``r``); the rank of every layer no ``rank_pattern`` key matches
    alpha : float > 0 (PEFT's ``lora_alpha``); likewise the default for ``alpha_pattern``
    dropout : float in [0, 1) (applied to the LoRA input in training)
    target_modules : names of the modules to adapt (PEFT's list form: a module path
        matches a name when it equals it or ends with ``"." + name``)
    fan_in_fan_out : the base weights are stored (in, out) (GPT-2 ``Conv1D``)
    use_rslora : scaling ``alpha / sqrt(rank)`` instead of ``alpha / rank``
    rank_pattern, alpha_pattern : per-module rank / alpha, PEFT's semantics: the first
        key (a regex) for which ``re.match(rf"(.*\\.)?({key})$", module_path)`` matches
        decides (see :meth:`rank_for`, :meth:`alpha_for`). Read-only mappings; order kept.
    use_dora : DoRA layers (a magnitude vector per layer; see :mod:`numlora.dora`)
    lora_bias : LoRA B has a bias ``(out,)``, scaled like the low-rank path
    target_regex : PEFT's string form of ``target_modules`` (a regex full-matched
        against the module path, or ``"all-linear"``); None when the list form is used
    base_model_name_or_path, task_type : PEFT metadata, kept for round trips
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple = ()
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    rank_pattern: Mapping = field(default_factory=dict)
    alpha_pattern: Mapping = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    target_regex: str | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "rank", _check_rank("rank", self.rank))
        object.__setattr__(self, "alpha", _check_alpha("alpha", self.alpha))
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise DTypeError(f"dropout must be a real number, got {type(dropout).__name__}")
        try:
            object.__setattr__(self, "dropout", float(dropout))
        except OverflowError:  # an integer beyond float64
            raise ConfigError(f"LoRA dropout must be in [0, 1), got an integer of {len(str(abs(dropout)))} digits") \
                from None
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        modules = self.target_modules
        if isinstance(modules, str):
            modules = (modules,)
        try:
            modules = tuple(modules)
        except TypeError:
            raise DTypeError(
                f"target_modules must be a list of str, got {type(self.target_modules).__name__}") from None
        for m in modules:
            if not isinstance(m, str):
                raise DTypeError(f"target_modules must hold str, got {type(m).__name__} ({m!r})")
        object.__setattr__(self, "target_modules", modules)
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                raise DTypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.use_dora and self.lora_bias:
            raise ConfigError("lora_bias=True is not supported together with use_dora=True (PEFT refuses it too)")
        object.__setattr__(self, "rank_pattern", _frozen_pattern("rank_pattern", self.rank_pattern, _check_rank))
        object.__setattr__(self, "alpha_pattern", _frozen_pattern("alpha_pattern", self.alpha_pattern, _check_alpha))
        for name in ("target_regex", "base_model_name_or_path", "task_type"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise DTypeError(f"{name} must be a str or None, got {type(value).__name__}")
        if self.target_regex is not None and self.target_regex != "all-linear":
            try:
                re.compile(self.target_regex)
            except re.error as e:
                raise ConfigError(
                    f"target_regex {self.target_regex!r} is not a valid regular expression: {e}") from None

    def __hash__(self):
        return hash(tuple(tuple(v.items()) if isinstance(v, Mapping) else v
                          for v in (getattr(self, f) for f in _FIELDS)))

    def __reduce__(self):
        # the patterns are read-only mapping proxies, which do not pickle: rebuilt (and
        # checked again) from plain dicts
        kw = {f: (dict(v) if isinstance(v, Mapping) else v) for f, v in ((f, getattr(self, f)) for f in _FIELDS)}
        return (_config_from_fields, (kw,))

    @property
    def scaling(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    # per-module values ------------------------------------------------------------------
    def rank_for(self, name: str) -> int:
        """The rank PEFT gives module path ``name``: ``rank_pattern``'s first matching key,
        else ``rank``."""
        _module_path(name)
        key = pattern_key(self.rank_pattern, name)
        return self.rank if key is None else self.rank_pattern[key]

    def alpha_for(self, name: str) -> float:
        """The alpha PEFT gives module path ``name`` (``alpha_pattern``, else ``alpha``)."""
        _module_path(name)
        key = pattern_key(self.alpha_pattern, name)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, name: str) -> float:
        return lora_scaling(self.alpha_for(name), self.rank_for(name), self.use_rslora)

    def targets(self, name: str) -> bool:
        """Whether PEFT would adapt module path ``name``: ``target_regex`` full-matches it
        (``"all-linear"``: any module), or a ``target_modules`` entry equals it or is a
        dotted suffix of it."""
        _module_path(name)
        if self.target_regex is not None:
            return self.target_regex == "all-linear" or re.fullmatch(self.target_regex, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)

    # dicts ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-safe dict (lists and dicts, not tuples and mapping proxies)."""
        d = {}
        for name in _FIELDS:
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            d[name] = value
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "LoraConfig":
        if not isinstance(data, dict):
            raise DTypeError(f"expected a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"unknown LoraConfig keys {unknown}; expected some of {sorted(_FIELDS)}")
        missing = [k for k in ("rank", "alpha") if k not in data]
        if missing:
            raise ConfigError(f"LoraConfig needs {missing}")
        return cls(**data)

    # PEFT ----------------------------------------------------------------------------------
    @classmethod
    def from_peft(cls, data: dict, *, source: str = "adapter_config.json") -> "LoraConfig":
        """The config of a PEFT ``adapter_config.json`` (as a parsed dict).

        Only ``peft_type`` is required and it must be ``"LORA"``; missing keys get PEFT's
        defaults (``r`` 8, ``lora_alpha`` 8, ``lora_dropout`` 0, ...). Keys numlora has no
        use for are ignored; keys it does not know are ignored with a warning naming them.
        Features that change what the adapter computes and that numlora does not
        implement (``bias`` other than ``"none"``, aLoRA, QALoRA, VeLoRA, layer
        replication, ...) raise :class:`~numlora.errors.ConfigError`. ``source`` names the
        file in messages.
        """
        if not isinstance(data, dict):
            raise DTypeError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type")
        if peft_type != "LORA":
            got = "no peft_type" if "peft_type" not in data else f"peft_type {peft_type!r}"
            raise ConfigError(f"{source}: expected peft_type 'LORA', got {got}")
        unknown = [k for k in data if k not in _PEFT_USED and k not in _PEFT_IGNORED and k not in _PEFT_UNSUPPORTED]
        if unknown:
            warnings.warn(f"{source}: ignoring keys numlora does not know: {unknown}", UserWarning, stacklevel=2)
        for key, default in _PEFT_UNSUPPORTED.items():
            value = data.get(key, default)
            if (value not in ("none", None)) if key == "bias" else (value not in (None, False, [], {})):
                raise ConfigError(f"{source}: {key}={value!r} is not supported by numlora "
                                  f"(expected {default!r}): {_UNSUPPORTED_WHY[key]}")
        if data.get("modules_to_save"):
            warnings.warn(f"{source}: modules_to_save={data['modules_to_save']!r}: numlora reads only the LoRA "
                          "layers; the fully trained modules saved with the adapter are ignored", UserWarning,
                          stacklevel=2)

        def get(key, default):
            value = data.get(key, default)
            return default if value is None else value

        targets = data.get("target_modules")
        target_regex = None
        if isinstance(targets, str):
            target_regex, targets = targets, ()
        elif targets is None:
            targets = ()
        elif not isinstance(targets, (list, tuple)):
            raise DTypeError(f"{source}: target_modules must be a list of str, a str or null, "
                             f"got {type(targets).__name__}")
        task_type = data.get("task_type")
        try:
            return cls(
                rank=get("r", 8),
                alpha=get("lora_alpha", 8),
                dropout=get("lora_dropout", 0.0),
                target_modules=tuple(targets),
                fan_in_fan_out=get("fan_in_fan_out", False),
                use_rslora=get("use_rslora", False),
                rank_pattern=get("rank_pattern", {}),
                alpha_pattern=get("alpha_pattern", {}),
                use_dora=get("use_dora", False),
                lora_bias=get("lora_bias", False),
                target_regex=target_regex,
                base_model_name_or_path=data.get("base_model_name_or_path"),
                task_type=None if task_type is None else str(task_type),
            )
        except (ConfigError, DTypeError) as e:
            raise type(e)(f"{source}: {e}") from None

    def to_peft(self) -> dict:
        """A dict for PEFT's ``adapter_config.json`` (``LoraConfig.from_pretrained`` and
        ``PeftModel.from_pretrained`` read it). Use :meth:`LoraAdapter.save_peft` to write a
        folder: it also makes ``target_modules`` and the patterns cover its layers."""
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": self.rank,
            "lora_alpha": _json_number(self.alpha),
            "lora_dropout": self.dropout,
            "target_modules": self.target_regex if self.target_regex is not None else list(self.target_modules),
            "exclude_modules": None,
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": "none",
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "lora_bias": self.lora_bias,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": {k: _json_number(v) for k, v in self.alpha_pattern.items()},
            "modules_to_save": None,
            "init_lora_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }


# PEFT keys numlora reads.
_PEFT_USED = frozenset({
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out", "use_rslora",
    "rank_pattern", "alpha_pattern", "use_dora", "lora_bias", "base_model_name_or_path", "task_type",
    "modules_to_save",
})
# PEFT keys that do not change what a saved adapter computes (metadata, initialisation,
# which modules were chosen: the tensors in the file say which layers there are).
_PEFT_IGNORED = frozenset({
    "auto_mapping", "peft_version", "revision", "inference_mode", "exclude_modules", "init_lora_weights",
    "layers_to_transform", "layers_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "qalora_group_size", "runtime_config", "ensure_weight_tying",
    "merge_weights", "target_modules_to_tie",
})
# PEFT keys whose non-default values change the computation in ways numlora does not implement.
_PEFT_UNSUPPORTED = {
    "bias": "none",
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "velora_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "enable_lora": None,
}
_UNSUPPORTED_WHY = {
    "bias": "the adapter then carries trained base-layer biases, which numlora does not apply",
    "use_qalora": "QALoRA pools the LoRA input in groups",
    "alora_invocation_tokens": "activated LoRA depends on token positions",
    "velora_config": "VeLoRA changes the forward pass",
    "monteclora_config": "MonteCLoRA changes the forward pass",
    "use_bdlora": "block-diagonal LoRA changes the layout of A and B",
    "arrow_config": "Arrow routes between several adapters",
    "kasa_config": "KaSA changes the forward pass",
    "layer_replication": "the adapter applies to a model with replicated layers",
    "target_parameters": "the adapter targets parameters (not Linear modules)",
    "trainable_token_indices": "the adapter carries trained token embeddings",
    "enable_lora": "a fused layer adapted in parts (old MergedLinear format)",
}


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def _config_from_fields(fields: dict) -> LoraConfig:
    """A pickled :class:`LoraConfig` from its fields."""
    return LoraConfig(**fields)
