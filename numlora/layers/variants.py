"""How the LoRA path of a dense layer computes: plain LoRA, LoRA with a bias on B, DoRA.

A variant is a strategy object (PEFT's ``LoraVariant``), chosen when the layer's
magnitude or LoRA bias is set (:func:`variant_for`) and then just called: the layer's
forward, merge and parameter count do not ask which one they have. Variants hold no
state; what they cache lives on the layer.
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["DORA", "LORA", "LORA_BIAS", "LoraVariant", "variant_for"]


class LoraVariant:
    """Plain LoRA: ``y = x W^T + b + s (x A^T) B^T``; merge adds ``s B A`` into W."""

    name = "lora"
    #: Trainable vectors of length out_features beside A and B (as PEFT counts them).
    vectors = 0
    #: Whether the GPU path runs it.
    on_gpu = True
    #: Whether the layer trains with it (backward, parameters()).
    trainable = True

    def forward(self, layer, x, out):
        """The unmerged forward with the LoRA path on."""
        return layer._forward_on(x, out, True)

    def merged_bias(self, layer):
        """The bias of the merged layer."""
        return layer._bias

    def merge(self, layer):
        """Merge into the base weight in place; returns ``(record, saved)``: what
        unmerge needs (a :class:`~numlora.ops.MergeRecord`, or a copy of the weight)."""
        return layer._backend.merge_lora(layer._weight, layer._lora_a, layer._lora_b, layer.scaling,
                                         layer._fan_in_fan_out)

    def __repr__(self) -> str:
        return f"<LoRA variant {self.name!r}>"


class LoraBias(LoraVariant):
    """LoRA with a bias on B (PEFT's ``lora_bias``): the forward adds ``s * lora_bias``;
    merge adds it into the base bias (creating one if the base has none)."""

    name = "lora_bias"
    vectors = 1
    on_gpu = False
    trainable = False

    @staticmethod
    def path_bias(layer):
        """Base bias plus ``scaling * lora_bias`` (the bias the unmerged forward adds)."""
        lb = layer._lora_bias
        extra = lb * lb.dtype.type(layer.scaling)
        return extra if layer._bias is None else layer._bias + extra

    def forward(self, layer, x, out):
        return layer._backend.fn.lora_forward(x, layer._weight, layer._lora_a, layer._lora_b, layer.scaling,
                                              self.path_bias(layer), out=out, fan_in_fan_out=layer._fan_in_fan_out)

    def merged_bias(self, layer):
        dtype = layer._weight.dtype if layer._bias is None else layer._bias.dtype
        return np.array(self.path_bias(layer), dtype=dtype)


class Dora(LoraVariant):
    """DoRA (see :mod:`numlora.dora`): ``y = (m / n) (x W^T + s (x A^T) B^T) + b`` with
    ``n`` the row norms of ``W + s B A``. Its merge rescales every row, which has no exact
    inverse: it keeps a copy of the base weight instead."""

    name = "dora"
    vectors = 1
    on_gpu = False
    trainable = False

    @staticmethod
    def weight_norm(layer):
        """The row norms of ``W + scaling * B @ A``, cached on the layer while A, B, the
        scaling and the attached weight stay the same (assign through the setters; an
        in-place edit of the base weight array is not noticed: re-attach it)."""
        key = (id(layer._weight), layer.scaling, _crc(layer._lora_a), _crc(layer._lora_b))
        cache = layer._norm_cache
        if cache is None or cache[0] != key:
            norm = layer._backend.fn.dora_weight_norm(layer._weight, layer._lora_a, layer._lora_b, layer.scaling,
                                    layer._fan_in_fan_out)
            cache = layer._norm_cache = (key, norm)
        return cache[1]

    def forward(self, layer, x, out):
        return layer._backend.fn.dora_forward(x, layer._weight, layer._lora_a, layer._lora_b, layer.scaling,
                                              layer._magnitude, layer._bias, out=out,
                                              fan_in_fan_out=layer._fan_in_fan_out, weight_norm=self.weight_norm(layer))

    def merge(self, layer):
        saved = layer._backend.save(layer._weight)
        layer._backend.fn.merge_dora(layer._weight, layer._lora_a, layer._lora_b, layer.scaling, layer._magnitude,
                   layer._fan_in_fan_out)
        return None, saved


def _crc(a) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


LORA = LoraVariant()
LORA_BIAS = LoraBias()
DORA = Dora()


def variant_for(magnitude, lora_bias) -> LoraVariant:
    """The variant of a layer with these optional vectors (at most one of them is set)."""
    if magnitude is not None:
        return DORA
    if lora_bias is not None:
        return LORA_BIAS
    return LORA
