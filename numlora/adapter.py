"""``LoraAdapter``: a named collection of LoRA layers sharing one configuration."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np

from . import _validate as validate
from ._dispatch import check_device
from .config import LoraConfig
from .dora import dora_weight_norm
from .errors import ConfigError, DTypeError, DuplicateLayerError, LayerNotFoundError, MergeStateError, NumloraError
from .layers import LoraLinear
from .layers.conv import LoraConv
from .layers.embedding import LoraEmbedding

__all__ = ["LoraAdapter", "LoraAdapterSummary"]

#: The PEFT folder format :meth:`LoraAdapter.load_peft` and :meth:`LoraAdapter.save_peft`
#: delegate to. It is built on this module (:mod:`numlora.io.peft` makes adapters), so it
#: registers itself here when imported (``import numlora`` imports it) rather than this
#: module importing it back.
_PEFT = SimpleNamespace(load=None, save=None)


def register_peft_format(*, load, save) -> None:
    """Set the PEFT folder reader ``load(path) -> LoraAdapter`` and writer
    ``save(adapter, path, *, dtype)`` (called by :mod:`numlora.io.peft`)."""
    _PEFT.load, _PEFT.save = load, save


def _peft_format():
    if _PEFT.load is None:
        raise ConfigError("the PEFT folder format (numlora.io.peft) is not loaded: import numlora first")
    return _PEFT


def _name_seed(name: str) -> int:
    """A dropout seed per layer name, the same in every run (unlike ``hash``)."""
    import zlib

    return zlib.crc32(name.encode("utf-8"))


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
    """Named LoRA layers under one :class:`LoraConfig`; behaves as a read-only mapping
    from layer name to :class:`LoraLinear` (``[]``, ``in``, ``len``, iteration in
    insertion order).

    Layers may have different ranks and alphas (PEFT's ``rank_pattern`` /
    ``alpha_pattern``): the config keeps the global ``rank`` / ``alpha``, each layer its
    own ``rank``, ``alpha`` and ``scaling``. Layers may be detached (adapter tensors
    without base weights, as :func:`numlora.load_peft_adapter` gives them):
    :meth:`attach` gives them their base weights. PEFT folders: :meth:`save_peft`,
    :meth:`load_peft`.
    """

    def __init__(self, config: LoraConfig):
        if not isinstance(config, LoraConfig):
            raise DTypeError(f"expected a LoraConfig, got {type(config).__name__}")
        self._config = config
        self._layers: dict[str, LoraLinear] = {}
        self._device = "cpu"

    @property
    def device(self) -> str:
        """Where the layers' arrays live: ``"cpu"`` or ``"cuda"`` (see :meth:`to`)."""
        return self._device

    def to(self, device: str) -> "LoraAdapter":
        """A new adapter with every layer moved to ``device`` (``"cuda"`` or ``"cpu"``, see
        :meth:`LoraLinear.to`); ``self`` when it is there already. This adapter is left as
        it was. Layers added to a GPU adapter later are built on the host and moved. Every
        layer is checked (merged, DoRA, LoRA bias, float64) before any is copied."""
        device = check_device(device)
        if device == self._device:
            return self
        for name, layer in self._layers.items():
            try:
                layer._check_move(device)
            except NumloraError as e:
                raise type(e)(f"layer '{name}': {e}") from None
        new = LoraAdapter(self._config)
        new._layers = {name: layer.to(device) for name, layer in self._layers.items()}
        new._device = device
        return new

    def _place(self, layer):
        return layer.to(self._device)

    @property
    def config(self) -> LoraConfig:
        return self._config

    def _new_name(self, name):
        if not isinstance(name, str):
            raise DTypeError(f"layer name must be a str, got {type(name).__name__}")
        if name in self._layers:
            raise DuplicateLayerError(f"LoRA layer '{name}' already exists")

    def add_layer(self, name: str, weight, *, bias=None, init: str = "seed", seed=None) -> LoraLinear:
        """Wrap ``weight`` in a new :class:`LoraLinear` with the adapter's rank, alpha,
        rsLoRA and fan_in_fan_out settings (init as :meth:`LoraLinear.from_weight`; with
        ``use_dora`` / ``lora_bias`` in the config, the magnitude starts as the weight's row
        norms and the LoRA bias as zeros). The rank and alpha are the config's for
        ``name`` (``rank_pattern`` / ``alpha_pattern`` apply)."""
        self._new_name(name)
        c = self._config
        layer = LoraLinear.from_weight(weight, c.rank_for(name), c.alpha_for(name), init=init, seed=seed, bias=bias,
                                       use_rslora=c.use_rslora, fan_in_fan_out=c.fan_in_fan_out,
                                       use_dora=c.use_dora, lora_bias=c.lora_bias, dropout=c.dropout,
                                       dropout_seed=_name_seed(name))
        layer = self._place(layer)
        self._layers[name] = layer
        return layer

    def add_lora(self, name: str, lora_a, lora_b, *, alpha=None, magnitude=None, lora_bias=None,
                 weight=None, bias=None, copy=True) -> LoraLinear:
        """Add a layer from adapter tensors: ``lora_a`` ``(r, in)``, ``lora_b`` ``(out, r)``
        (the rank is ``r``, whatever the config's), ``alpha`` (default: the config's for
        ``name``), DoRA ``magnitude`` ``(out,)`` and ``lora_bias`` ``(out,)``. Without
        ``weight`` the layer is detached (see :meth:`attach`).

        rsLoRA and fan_in_fan_out come from the config. With ``use_dora`` in the config a
        magnitude is required (or a ``weight`` to initialise it from, as PEFT does); with
        ``lora_bias`` a missing LoRA bias starts at zero. Giving either when the config
        does not enable it raises :class:`~numlora.errors.ConfigError`."""
        self._new_name(name)
        c = self._config
        if magnitude is not None and not c.use_dora:
            raise ConfigError(f"layer '{name}': a DoRA magnitude was given but the adapter's config has use_dora=False")
        if lora_bias is not None and not c.lora_bias:
            raise ConfigError(f"layer '{name}': a LoRA bias was given but the adapter's config has lora_bias=False")
        if c.use_dora and magnitude is None and weight is None:
            raise ConfigError(f"layer '{name}': the adapter's config has use_dora=True: give its magnitude "
                              "(or the base weight to initialise it from)")
        alpha = c.alpha_for(name) if alpha is None else alpha
        layer = LoraLinear(None, lora_a, lora_b, alpha, use_rslora=c.use_rslora, fan_in_fan_out=c.fan_in_fan_out,
                           magnitude=magnitude, lora_bias=lora_bias, dropout=c.dropout,
                           dropout_seed=_name_seed(name))
        if c.lora_bias and lora_bias is None:
            layer.lora_bias = np.zeros(layer.out_features, layer.lora_a.dtype)
        if weight is not None:
            layer.attach(weight, bias, copy=copy)
            if c.use_dora and magnitude is None:
                layer.magnitude = dora_weight_norm(layer.weight, layer.lora_a, layer.lora_b, layer.scaling,
                                                   layer.fan_in_fan_out)
        elif bias is not None:
            raise ConfigError(f"layer '{name}': bias belongs to the base layer: give it with weight")
        layer = self._place(layer)
        self._layers[name] = layer
        return layer

    def _plain_lora_only(self, name, kind):
        c = self._config
        for flag in ("use_dora", "lora_bias"):
            if getattr(c, flag):
                raise ConfigError(f"layer '{name}': the adapter's config has {flag}=True, which numlora supports on "
                                  f"Linear layers only, not on {kind} layers")

    def add_embedding(self, name: str, lora_a, lora_b, *, alpha=None, weight=None, padding_idx=None,
                      copy=True) -> LoraEmbedding:
        """Add a LoRA embedding layer (:class:`~numlora.layers.embedding.LoraEmbedding`)
        from PEFT's ``lora_embedding_A`` (r, num_embeddings) and ``lora_embedding_B``
        (embedding_dim, r); ``alpha`` defaults to the config's for ``name``. Without
        ``weight`` (the table) the layer is detached (see :meth:`attach`)."""
        self._new_name(name)
        self._plain_lora_only(name, "embedding")
        c = self._config
        alpha = c.alpha_for(name) if alpha is None else alpha
        layer = LoraEmbedding(None, lora_a, lora_b, alpha, use_rslora=c.use_rslora, padding_idx=padding_idx)
        if weight is not None:
            layer.attach(weight, copy=copy)
        self._place(layer)
        self._layers[name] = layer
        return layer

    def add_conv(self, name: str, lora_a, lora_b, *, alpha=None, weight=None, bias=None, stride=1, padding=0,
                 dilation=1, copy=True) -> LoraConv:
        """Add a LoRA convolution layer (:class:`~numlora.layers.conv.LoraConv`) from
        PEFT's ``lora_A`` (r, C_in, *kernel) and ``lora_B`` (C_out, r, 1[, 1]) weights;
        ``stride`` / ``padding`` / ``dilation`` are the base convolution's (an adapter
        file does not hold them). Without ``weight`` the layer is detached (see
        :meth:`attach`; :meth:`LoraConv.attach <numlora.layers.conv.LoraConv.attach>`
        also takes the options)."""
        self._new_name(name)
        self._plain_lora_only(name, "convolution")
        c = self._config
        alpha = c.alpha_for(name) if alpha is None else alpha
        layer = LoraConv(None, lora_a, lora_b, alpha, stride=stride, padding=padding, dilation=dilation,
                         use_rslora=c.use_rslora, dropout=c.dropout, dropout_seed=_name_seed(name))
        if weight is not None:
            layer.attach(weight, bias, copy=copy)
        elif bias is not None:
            raise ConfigError(f"layer '{name}': bias belongs to the base layer: give it with weight")
        self._place(layer)
        self._layers[name] = layer
        return layer

    def attach(self, weights, biases=None, *, copy=True) -> None:
        """Give every layer its base weight (and bias).

        ``weights`` : a mapping from layer name to array, or a callable ``name -> array``;
        ``biases`` : likewise (a mapping may leave layers out, a callable may return None).
        Every weight is checked before any is attached, so a wrong shape leaves the
        adapter as it was. ``copy=False`` keeps the caller's arrays (merges then change
        them in place)."""
        def lookup(source, name, what, required):
            if callable(source) and not isinstance(source, Mapping):
                return source(name)
            if not isinstance(source, Mapping):
                raise DTypeError(f"{what} must be a mapping from layer name to array or a callable, "
                                 f"got {type(source).__name__}")
            if name in source:
                return source[name]
            if required:
                raise LayerNotFoundError(f"no base weight for LoRA layer '{name}' in {what}")
            return None

        staged = []
        for name, layer in self._layers.items():
            if layer.merged:
                raise MergeStateError(f"layer '{name}' is merged; unmerge it before attaching base weights")
            w = lookup(weights, name, "weights", True)
            if w is None:
                raise LayerNotFoundError(f"no base weight for LoRA layer '{name}': the weights callable returned None")
            b = None if biases is None else lookup(biases, name, "biases", False)
            try:
                staged.append((layer, *layer.check_base(w, b)))
            except NumloraError as e:
                raise type(e)(f"layer '{name}': {e}") from None
        for layer, w, b in staged:
            layer.attach(w, b, copy=copy)

    @property
    def attached(self) -> bool:
        """Whether every layer has a base weight."""
        return all(layer.attached for layer in self._layers.values())

    def save_peft(self, path, *, dtype: str = "F32") -> None:
        """Write the adapter as a PEFT folder (see :func:`numlora.io.peft.save_peft`)."""
        _peft_format().save(self.to("cpu"), path, dtype=dtype)

    @classmethod
    def load_peft(cls, path) -> "LoraAdapter":
        """Read a PEFT folder (see :func:`numlora.io.peft.load_peft_adapter`)."""
        return _peft_format().load(path)

    def get_layer(self, name: str) -> LoraLinear:
        if not isinstance(name, str):
            raise DTypeError(f"layer name must be a str, got {type(name).__name__}")
        try:
            return self._layers[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self._layers) or "none"
            raise LayerNotFoundError(f"LoRA layer '{name}' not found; known layers: {known}") from None

    __getitem__ = get_layer

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._layers

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
        """Merge every layer that is not merged yet.

        Layers whose base weights share memory (attached with ``copy=False`` to one array,
        tied weights) are refused with :class:`~numlora.errors.MergeStateError` before
        anything is merged: the deltas would stack in one array, and no unmerge could
        restore it."""
        weights = [(i, name, layer.weight) for i, (name, layer) in enumerate(self._layers.items())]
        pair = validate.overlapping_pair(weights)
        if pair is not None:
            (_, a), (_, b) = pair
            raise MergeStateError(f"layers '{a}' and '{b}' share their base weight's memory (attached with "
                                  "copy=False to one array?): merging both would stack their deltas in one array; "
                                  "attach copies, or merge them one at a time into separate arrays")
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
