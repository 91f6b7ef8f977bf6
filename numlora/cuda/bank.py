"""LoraBank's launches on the GPU: the base product (:func:`base_product`), the row plan
of the low-rank part (:func:`plan_rows`), its launches through a ring of pinned staging
slots (:func:`multi_lora_add`), the adapter packing. A row's result does not depend on
the rest of its batch: each output element is summed in a fixed order whatever the
batch. Registered with :mod:`numlora._dispatch` as ``"bank"``, with the device input
checks the bank shares with the functional API (:func:`rows`, :func:`output`,
:func:`low_rank`): :class:`numlora.multi.gpu.CudaBank` reaches them as
``backend("cuda").bank``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from .._dispatch import register
from . import kernels
from ._launch import flat, grid, low_rank, matmul, numba_cuda, output, rows, scratch
from .ops import gemv_ok, nf4_matmul

__all__ = ["base_product", "device_overlap", "multi_lora_add", "pack_adapter", "plan_rows"]


def base_product(weight, nf4, bias, row_stable: bool):
    """``product(x, out, n)``: ``out = x W^T + bias`` for n rows of the device arrays ``x``
    (n, in) and ``out`` (n, out), ``W`` the float32 device ``weight`` or the
    DeviceNF4Tensor ``nf4``; ``bias`` a float32 device array or None. Row-stable: the
    tiled kernel for every batch size; otherwise, over NF4, the fused GEMV for one row
    where it applies (a row's last bits then depend on the batch size)."""
    if nf4 is None:
        out_f, in_f = tuple(weight.shape)
        w = flat(weight)

        def dense(x, out, n):
            matmul(flat(x), in_f, 1, n, out_f, in_f, flat(out), out_f, W=w, swo=in_f, swk=1, bias=bias)

        return dense
    out_f, in_f = nf4.shape

    def tiled(x, out, n):
        matmul(flat(x), in_f, 1, n, out_f, in_f, flat(out), out_f, t=nf4, swo=in_f, swk=1, U=None, sui=0, sut=1,
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
    ``(block, p0, p1, max rank)`` per block, rows ``p0:p1`` of the table: the arguments
    of :func:`multi_lora_add` after ``x`` and ``y``."""
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


# --- the low-rank part: the row plan staged to the device, the shrink and expand launches -------

class _Staging:
    """Small per-call host tables (the bank's row plan) to the device without blocking
    the host: a ring of SLOTS pinned host buffers and device buffers; each call writes
    the next slot's pinned buffer and queues an asynchronous copy on the default stream
    (ordered before the kernels that read it), then records an event. A slot is reused
    only after the work of its previous use has completed: the caller records the slot's
    event after the kernels that read it (:meth:`done`), and :meth:`put` waits on it, which
    only blocks when SLOTS calls are queued on the GPU. A plain synchronous copy from
    pageable memory would first wait for all the work already queued on the stream. A lock
    makes the ring safe for forwards from several host threads."""

    SLOTS = 32

    def __init__(self):
        import threading

        self._slots = [None] * self.SLOTS
        self._next = 0
        self._lock = threading.Lock()

    @staticmethod
    def _stream(cuda):
        return cuda.default_stream() if hasattr(cuda, "default_stream") else 0  # (the simulator has none)

    def put(self, table, rs):
        """Device copies of ``table`` ((3, N) int64) and ``rs`` ((N,) float32), valid for
        the kernels queued after this call on the default stream, and the slot's event:
        pass it to :meth:`done` once those kernels are launched."""
        cuda = numba_cuda()
        n = rs.size
        with self._lock:
            i = self._next
            self._next = (i + 1) % self.SLOTS
            slot = self._slots[i]
            if slot is not None:
                slot[4].synchronize()  # the copies and kernels of this slot's last use are done
            if slot is None or slot[1].size < n:
                cap = max(256, 1 << (n - 1).bit_length())
                slot = [cuda.pinned_array(3 * cap, np.int64), cuda.pinned_array(cap, np.float32),
                        cuda.device_array(3 * cap, np.int64), cuda.device_array(cap, np.float32),
                        _event(cuda)]
                self._slots[i] = slot
            hi, hf, di, df, ev = slot
            hi[:3 * n] = table.reshape(-1)
            hf[:n] = rs
            stream = self._stream(cuda)
            dt = di[:3 * n]
            dt.copy_to_device(hi[:3 * n], stream=stream)
            dr = df[:n]
            dr.copy_to_device(hf[:n], stream=stream)
            # recorded now too, so that the slot is never reused before its copies even if
            # the caller fails before done()
            self._record(ev, stream)
        return dt.reshape(3, n), dr, ev

    def done(self, ev):
        """Record ``ev`` after the kernels that read the slot (on the default stream)."""
        self._record(ev, self._stream(numba_cuda()))

    @staticmethod
    def _record(ev, stream):
        if stream:
            ev.record(stream=stream)
        else:
            ev.record()


def _event(cuda):
    """An event without timing (cheaper to record); the simulator's takes no arguments."""
    try:
        return cuda.event(timing=False)
    except TypeError:
        return cuda.event()


_STAGING = _Staging()


def multi_lora_add(x, y, table, rs, runs):
    """``y[src_p] += rs[p] (x[src_p] A_k^T) B_k^T`` for every grouped row p (the GPU
    :func:`numlora.kernels.multi.multi_lora_add`). ``table`` (3, N) int64 host: per grouped
    row the batch row, the adapter's float offset in its pool block and its rank; ``rs``
    (N,) float32 host; ``runs``: ``(pool block, p0, p1, max rank)`` per block, rows
    ``p0:p1`` of the table using that block. Validated by :class:`numlora.LoraBank`."""
    n_rows = table.shape[1]
    rmax = max(run[3] for run in runs)
    dtable, drs, ev = _STAGING.put(table, rs)
    u = scratch("multi_u", (n_rows, rmax))
    xf, yf = flat(x), flat(y)
    in_f, out_f = tuple(x.shape)[-1], tuple(y.shape)[-1]
    T, RT = kernels.MULTI_THREADS, kernels.MULTI_RANKS
    shrink_k, expand_k = kernels.make_multi_lora_shrink(), kernels.make_multi_lora_expand()
    for pool, p0, p1, r in runs:
        shrink_k[(p1 - p0, grid(r, RT)), T](xf, in_f, dtable, drs, pool, p0, u)
        expand_k[(p1 - p0, grid(out_f, T)), T](u, dtable, pool, in_f, out_f, p0, yf)
    _STAGING.done(ev)


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


register("cuda", "bank")(SimpleNamespace(
    rows=rows, output=output, low_rank=low_rank, base_product=base_product, plan_rows=plan_rows,
    multi_lora_add=multi_lora_add, pack_adapter=pack_adapter, device_overlap=device_overlap))
