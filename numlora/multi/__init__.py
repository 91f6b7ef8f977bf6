"""Many adapters, one batch: :class:`LoraBank` (a bank of LoRA adapters over one base
weight) and its batched forward :func:`multi_lora_forward`. See :mod:`numlora.multi.bank`."""

from .bank import BUCKETS, REF_ROWS, LoraBank, multi_lora_forward

__all__ = ["BUCKETS", "REF_ROWS", "LoraBank", "multi_lora_forward"]


def _no_lease():
    """None. A pickle of a bank made while numlora.multi was one module names this
    function (the loader of its reader lease); pickles made since name ``NoneType``."""
    return None
