"""``LoraConfig``: rank, alpha, dropout and the rest, validated on construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .errors import ConfigError, DTypeError

__all__ = ["LoraConfig"]


@dataclass(frozen=True)
class LoraConfig:
    """Configuration of a LoRA adapter.

    rank : int > 0
    alpha : float > 0
    dropout : float in [0, 1) (applied to the LoRA input in training)
    target_modules : names of the modules to adapt
    fan_in_fan_out : the base weights are stored (in, out) (GPT-2 ``Conv1D``)
    use_rslora : scaling ``alpha / sqrt(rank)`` instead of ``alpha / rank``
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple = ()
    fan_in_fan_out: bool = False
    use_rslora: bool = False

    def __post_init__(self):
        rank = self.rank
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise DTypeError(f"rank must be an integer, got {type(rank).__name__}")
        if rank <= 0:
            raise ConfigError(f"LoRA rank must be > 0, got {rank}")
        object.__setattr__(self, "rank", int(rank))
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise DTypeError(f"{name} must be a real number, got {type(value).__name__}")
            object.__setattr__(self, name, float(value))
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"LoRA alpha must be > 0 and finite, got {self.alpha}")
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        modules = self.target_modules
        if isinstance(modules, str):
            modules = (modules,)
        try:
            modules = tuple(modules)
        except TypeError:
            raise DTypeError(f"target_modules must be a list of str, got {type(self.target_modules).__name__}") from None
        for m in modules:
            if not isinstance(m, str):
                raise DTypeError(f"target_modules must hold str, got {type(m).__name__} ({m!r})")
        object.__setattr__(self, "target_modules", modules)
        for name in ("fan_in_fan_out", "use_rslora"):
            if not isinstance(getattr(self, name), bool):
                raise DTypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def scaling(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    def to_dict(self) -> dict:
        """A JSON-safe dict (lists, not tuples)."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "fan_in_fan_out": self.fan_in_fan_out,
            "use_rslora": self.use_rslora,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LoraConfig":
        if not isinstance(data, dict):
            raise DTypeError(f"expected a dict, got {type(data).__name__}")
        known = {"rank", "alpha", "dropout", "target_modules", "fan_in_fan_out", "use_rslora"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown LoraConfig keys {unknown}; expected some of {sorted(known)}")
        missing = [k for k in ("rank", "alpha") if k not in data]
        if missing:
            raise ConfigError(f"LoraConfig needs {missing}")
        return cls(**data)


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)
