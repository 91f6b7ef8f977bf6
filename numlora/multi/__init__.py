"""Many adapters, one batch: :class:`LoraBank` (a bank of LoRA adapters over one base
weight) and its batched forward :func:`multi_lora_forward`. See :mod:`numlora.multi.bank`."""

from .bank import BUCKETS, REF_ROWS, LoraBank, _no_lease, multi_lora_forward  # noqa: F401

__all__ = ["BUCKETS", "REF_ROWS", "LoraBank", "multi_lora_forward"]
