"""LoraBank's launches on the GPU: the base product, the plan of the low-rank part, the
adapter packing.

The forward of a GPU bank (:class:`numlora.multi.gpu.CudaBank`) runs the base product
(:func:`base_product`: the tiled kernel, or over NF4 the fused GEMV for one row when the
bank is not row-stable, with the bias in its epilogue), then the low-rank part: planned on
the host from the row ids of one snapshot of the bank (:func:`plan_rows`: the rows
grouped by pool block, then adapter), staged to the device and launched as one shrink and
one expand kernel per pool block (:func:`numlora.cuda.ops.multi_lora_add`). A row's
result does not depend on the rest of its batch: each output element is summed in a fixed
order whatever the batch.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .ops import gemv_ok, matmul, multi_lora_add, nf4_matmul

__all__ = ["add_low_rank", "base_product", "device_overlap", "pack_adapter", "plan_rows"]


def _flat(a):
    return a.reshape(a.size)


def base_product(weight, nf4, bias, row_stable: bool):
    """``product(x, out, n)``: ``out = x W^T + bias`` for n rows of the device arrays ``x``
    (n, in) and ``out`` (n, out), ``W`` the float32 device ``weight`` or the
    DeviceNF4Tensor ``nf4``; ``bias`` a float32 device array or None. Row-stable: the
    tiled kernel for every batch size; otherwise, over NF4, the fused GEMV for one row
    where it applies (a row's last bits then depend on the batch size)."""
    if nf4 is None:
        out_f, in_f = tuple(weight.shape)
        w = _flat(weight)

        def dense(x, out, n):
            matmul(_flat(x), in_f, 1, n, out_f, in_f, _flat(out), out_f, W=w, swo=in_f, swk=1, bias=bias)

        return dense
    out_f, in_f = nf4.shape

    def tiled(x, out, n):
        matmul(_flat(x), in_f, 1, n, out_f, in_f, _flat(out), out_f, t=nf4, swo=in_f, swk=1, U=None, sui=0, sut=1,
               Bm=None, sbo=0, sbt=1, R=0, bias=bias)

    if row_stable:
        return tiled

    def by_size(x, out, n):
        if gemv_ok(nf4, n):
            nf4_matmul(x, nf4, out, bias=bias)
        else:
            tiled(x, out, n)

    return by_size


def plan_rows(snap, ids, rowscale):
    """The low-rank work of a batch in the bank snapshot ``snap``: ``(table, rs, runs)``,
    or None when every row is the base alone. The adapter rows are sorted by pool block,
    then adapter (each adapter's A and B read together); ``table`` (3, N) int64: per
    grouped row its batch row, its adapter's float offset in the block and its rank;
    ``rs`` (N,) float32: the adapter's scaling times the row's scale; ``runs``:
    ``(block, p0, p1, max rank)`` per block, rows ``p0:p1`` of the table."""
    rows = np.flatnonzero(ids >= 0)
    if rows.size == 0:
        return None
    k = ids[rows]
    blk = snap.ad_block[k]
    order = np.lexsort((k, blk))
    rows, k, blk = rows[order], k[order], blk[order]
    table = np.ascontiguousarray(np.stack([rows, snap.ad_off[k], snap.ad_rank[k]]), np.int64)
    rs = np.ascontiguousarray(snap.ad_scaling[k] * rowscale[rows], np.float32)
    cuts = np.flatnonzero(blk[1:] != blk[:-1]) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [rows.size]])
    runs = [(snap.blocks[int(blk[p0])], int(p0), int(p1), int(table[2, p0:p1].max()))
            for p0, p1 in zip(starts, ends)]
    return table, rs, runs


def add_low_rank(x, out, plan) -> None:
    """``out +=`` the low-rank part of the rows of ``plan`` (:func:`plan_rows`): the plan
    staged to the device, then one shrink and one expand launch per pool block."""
    multi_lora_add(x, out, *plan)


def pack_adapter(lora_a, lora_b, pages) -> None:
    """Write device ``lora_a`` (r, in) and ``lora_b`` (out, r) into the device pool pages
    ``pages`` as the bank stores them (``A^T`` then ``B^T``), one thread per element."""
    threads = kernels.THREADS
    kernels.pack_adapter[max(1, -(-pages.size // threads)), threads](lora_a, lora_b, pages)


def _device_span(a):
    """(first byte, end byte) of a C-contiguous device array (a numba device array, an
    object with ``__cuda_array_interface__``, or the simulator's stand-in)."""
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:  # the CUDA simulator: a numpy array behind the device array
        cai = a.__array_interface__
    start = int(cai["data"][0])
    return start, start + int(np.prod(tuple(a.shape), dtype=np.int64)) * np.dtype(a.dtype).itemsize


def device_overlap(a, b) -> bool:
    """Whether the C-contiguous device arrays ``a`` and ``b`` share bytes."""
    a0, a1 = _device_span(a)
    b0, b1 = _device_span(b)
    return a0 < b1 and b0 < a1 and a1 > a0 and b1 > b0
