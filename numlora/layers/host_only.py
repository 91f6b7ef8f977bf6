"""What the embedding and convolution layers share beside :class:`~numlora.layers.base.LoraLayer`:
CPU only, a base weight attached later, merge / unmerge through a bit-exact record."""

from __future__ import annotations

import numpy as np

from .. import _validate as validate
from .._dispatch import check_device
from ..errors import ConfigError, DetachedLayerError, DeviceError, MergeStateError, TrainStateError

__all__ = ["HostOnly"]


class HostOnly:
    """What the embedding and convolution layers share: CPU only (``to("cuda")`` is a
    DeviceError), a base weight that may be attached later, merge / unmerge through a
    bit-exact :class:`~numlora.ops.MergeRecord`, and the PEFT switches they do not have
    (no DoRA, no LoRA bias, no ``fan_in_fan_out``)."""

    _KIND = "layer"

    # devices ------------------------------------------------------------------------------
    def _check_move(self, device: str) -> None:
        if check_device(device) == "cuda":
            raise DeviceError(f"{type(self).__name__} runs on the CPU only (no GPU implementation yet); keep it "
                              "on the host")

    def to(self, device: str):
        """``self`` for ``"cpu"``; ``"cuda"`` raises :class:`~numlora.errors.DeviceError`
        (this layer type has no GPU implementation yet)."""
        self._check_move(device)
        return self

    # what PEFT's Linear has and these do not -------------------------------------------------
    fan_in_fan_out = False
    use_dora = False
    magnitude = None
    lora_bias = None

    # the base weight ------------------------------------------------------------------
    @property
    def weight(self):
        """The base weight (with the delta added while merged); None while detached."""
        return self._weight

    @property
    def attached(self) -> bool:
        return self._weight is not None

    def _need_weight(self, what):
        if self._weight is None:
            raise DetachedLayerError(f"cannot {what}: this {type(self).__name__} has no base weight attached; call "
                                     "attach(weight) first")

    def _weight_error(self, got):
        return f"expected weight of shape {self.base_shape} for this adapter ({self._KIND}), got {got}"

    def check_base(self, weight, bias=None):
        """Validate a base weight (and bias) without attaching it; return them."""
        weight = self._backend.check_array("weight", weight, self.base_shape, self._weight_error)
        if bias is not None:
            bias = self._check_bias(bias)
        return weight, bias

    def _check_bias(self, bias):
        raise ConfigError(f"a {self._KIND} has no bias")

    def attach(self, weight, bias=None, *, copy=True):
        """Give the layer its base weight (and bias, for a convolution); ``copy=False``
        keeps the caller's array (merge() then changes it in place). Returns the layer."""
        if self._merged:
            raise MergeStateError("cannot attach a base weight while the layer is merged; unmerge() first")
        copy = validate.flag("copy", copy)
        weight, bias = self.check_base(weight, bias)
        self._weight = np.array(weight, copy=True) if copy else weight
        self._bias = None if bias is None else np.array(bias, dtype=self._weight.dtype, copy=True)
        return self

    def detach(self) -> None:
        """Drop the base weight (and bias); the adapter stays."""
        if self._merged:
            raise MergeStateError("cannot detach a merged layer; unmerge() first")
        self._weight = None
        self._bias = None

    # merging --------------------------------------------------------------------------
    def merge(self) -> None:
        """Add the delta into the base weight in place; :meth:`unmerge` restores it bit for
        bit (one byte per weight element is kept meanwhile, see
        :class:`~numlora.ops.MergeRecord`)."""
        self._need_weight("merge")
        if self._merged:
            raise MergeStateError("LoRA weights are already merged")
        if not self._enabled:
            raise MergeStateError("cannot merge a disabled layer; enable() first")
        self._record = self._merge_fn(self._weight, self._lora_a, self._lora_b, self.scaling, record=True)
        self._merged = True

    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before :meth:`merge`."""
        if not self._merged:
            raise MergeStateError("LoRA weights are not merged")
        self._unmerge_fn(self._weight, self._lora_a, self._lora_b, self.scaling, record=self._record)
        self._record = None
        self._merged = False

    def merge_into(self, weight) -> None:
        """Add this adapter's delta into ``weight`` (an array of :attr:`base_shape`) in
        place, plainly (what a checkpoint merge does)."""
        self._merge_fn(weight, self._lora_a, self._lora_b, self.scaling)

    @property
    def merge_overhead_bytes(self) -> int:
        return 0 if self._record is None else self._record.nbytes

    def _saved(self):
        if self._cache is None:
            raise TrainStateError("backward needs a forward in training mode first: call layer.train(), then "
                                  "forward, then backward (once per forward)")
        saved, self._cache = self._cache, None
        return saved

    def _grads(self):
        if self._grad_a is None:
            self._grad_a = np.zeros(self._lora_a.shape, self._lora_a.dtype)
            self._grad_b = np.zeros(self._lora_b.shape, self._lora_b.dtype)
