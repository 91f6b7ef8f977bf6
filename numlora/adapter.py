"""``LoraAdapter``: a named collection of LoRA layers sharing one configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import LoraConfig
from .errors import DTypeError, DuplicateLayerError, LayerNotFoundError
from .layers import LoraLinear

__all__ = ["LoraAdapter", "LoraAdapterSummary"]


@dataclass(frozen=True)
class LoraAdapterSummary:
    """Parameter counts of an adapter (the seed's fields)."""

    num_layers: int
    total_trainable: int
    total_original: int
    compression_ratio: float
    rank: int
    alpha: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        rows = [
            ("layers", f"{self.num_layers}"),
            ("rank / alpha", f"{self.rank} / {self.alpha:g}"),
            ("trainable params", f"{self.total_trainable:,}"),
            ("frozen params", f"{self.total_original:,}"),
            ("trainable share", f"{100 * self.compression_ratio:.3f} %"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {val}" for k, val in rows)


class LoraAdapter:
    """Named LoRA layers built from one :class:`LoraConfig`; behaves as a read-only
    mapping from layer name to :class:`LoraLinear` (``[]``, ``in``, ``len``, iteration in
    insertion order)."""

    def __init__(self, config: LoraConfig):
        if not isinstance(config, LoraConfig):
            raise DTypeError(f"expected a LoraConfig, got {type(config).__name__}")
        self._config = config
        self._layers: dict[str, LoraLinear] = {}

    @property
    def config(self) -> LoraConfig:
        return self._config

    def add_layer(self, name: str, weight, *, bias=None, init: str = "seed", seed=None) -> LoraLinear:
        """Wrap ``weight`` in a new :class:`LoraLinear` with the adapter's rank, alpha,
        rsLoRA and fan_in_fan_out settings (init as :meth:`LoraLinear.from_weight`)."""
        if not isinstance(name, str):
            raise DTypeError(f"layer name must be a str, got {type(name).__name__}")
        if name in self._layers:
            raise DuplicateLayerError(f"LoRA layer '{name}' already exists")
        c = self._config
        layer = LoraLinear.from_weight(weight, c.rank, c.alpha, init=init, seed=seed, bias=bias,
                                       use_rslora=c.use_rslora, fan_in_fan_out=c.fan_in_fan_out)
        self._layers[name] = layer
        return layer

    def get_layer(self, name: str) -> LoraLinear:
        try:
            return self._layers[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self._layers) or "none"
            raise LayerNotFoundError(f"LoRA layer '{name}' not found; known layers: {known}") from None

    __getitem__ = get_layer

    def __contains__(self, name) -> bool:
        return name in self._layers

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self):
        return iter(self._layers)

    def items(self):
        return self._layers.items()

    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    def forward_layer(self, name: str, x, out=None):
        return self.get_layer(name).forward(x, out=out)

    def merge_all(self) -> None:
        """Merge every layer that is not merged yet."""
        for layer in self._layers.values():
            if not layer.merged:
                layer.merge()

    def unmerge_all(self) -> None:
        """Unmerge every merged layer (each restored bit for bit)."""
        for layer in self._layers.values():
            if layer.merged:
                layer.unmerge()

    def summary(self) -> LoraAdapterSummary:
        trainable = sum(layer.trainable_params for layer in self._layers.values())
        original = sum(layer.original_params for layer in self._layers.values())
        total = trainable + original
        return LoraAdapterSummary(
            num_layers=len(self._layers),
            total_trainable=trainable,
            total_original=original,
            compression_ratio=trainable / total if total else 0.0,
            rank=self._config.rank,
            alpha=self._config.alpha,
        )

    def __repr__(self) -> str:
        return f"LoraAdapter(rank={self._config.rank}, alpha={self._config.alpha}, layers={self.layer_names})"
