"""LoRA layers: objects that hold a base weight and an adapter and call the functional API.

- :mod:`~numlora.layers.base`: what every layer shares (A, B, alpha, the flags, parameter
  counts, the training state, :meth:`~numlora.layers.base.LoraLayer.to`), and
  :func:`init_lora_a`;
- :mod:`~numlora.layers.dense`: :class:`LoraLinear` (a dense base weight);
- :mod:`~numlora.layers.nf4`: :class:`QLoraLinear` (an NF4 base weight);
- :mod:`~numlora.layers.variants`: plain LoRA, LoRA bias and DoRA as strategy objects;
- :mod:`~numlora.layers._host` and :mod:`~numlora.layers._gpu`: the CPU and GPU backends
  a layer holds (chosen in ``to()``).

Where a new layer type goes: docs/architecture.md.
"""

from .base import LoraLayer, init_lora_a
from .dense import LoraLinear
from .nf4 import QLoraLinear

__all__ = ["LoraLayer", "LoraLinear", "QLoraLinear", "init_lora_a"]
