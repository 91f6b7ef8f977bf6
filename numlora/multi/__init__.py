"""Many adapters, one batch: a bank of LoRA adapters over one base weight (multi-tenant
serving, Punica / S-LoRA style) and its batched forward.

``y[i] = x[i] W^T + scale_i * scaling_k * (x[i] A_k^T) B_k^T`` with ``k = adapter[i]``
(``-1``: the base alone). See ``docs/multi.md`` for the design. The pieces:

- :mod:`~numlora.multi.bank`: :class:`LoraBank`, the composition of the others, and
  :func:`multi_lora_forward`;
- :mod:`~numlora.multi.pool`: **storage**. Adapters live in float32 pool blocks, each in
  ``rank`` consecutive *pages* of ``in + out`` floats (its ``A^T`` then its ``B^T``),
  never padded to the largest rank; ``add`` copies only the new adapter (first fit, a new
  block when none fits), ``remove`` returns its pages to the free lists;
- :mod:`~numlora.multi.registry`: **names and ids**, and the **threads** rule. Readers
  work on an immutable *snapshot* (the per-id tables, the names, the tuple of blocks)
  that writers (one at a time) replace whole, copy-on-write; the pages of a removed
  adapter are recycled only when no reader of an older snapshot remains, so a kernel
  never reads a block that was freed, resized or refilled under it;
- :mod:`~numlora.multi.product`: **row stability** of the base product (calibrated
  batch sizes; ``row_stable=False`` takes the fastest path for each batch size, and a
  row may then differ in the last bits between batch sizes). The low-rank part is a
  kernel with a fixed per-row summation order;
- :mod:`~numlora.multi.cpu`: the forward on the CPU (rows **grouped** by adapter, so each
  adapter's A and B are read once per batch whatever the row order: SGMV);
  :mod:`~numlora.multi.gpu` its GPU twin, whose launches are :mod:`numlora.cuda.bank`'s;
- :mod:`~numlora.multi.peft`: adapters from PEFT folders.
"""

from .bank import LoraBank, multi_lora_forward
from .product import BUCKETS, REF_ROWS

__all__ = ["BUCKETS", "REF_ROWS", "LoraBank", "multi_lora_forward"]


def _no_lease():
    """None. A pickle of a bank made while numlora.multi was one module names this
    function (the loader of its reader lease); pickles made since name ``NoneType``."""
    return None
