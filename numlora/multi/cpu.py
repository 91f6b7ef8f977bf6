"""The bank on the CPU: its forward, and the host memory of its pool.

The forward: the base product (:func:`~numlora.multi.product.base_product`, row-stable
or not), then the low-rank part of every adapter row by the fixed-order kernel of
:mod:`numlora.kernels.multi`, over the rows grouped by adapter (a stable sort, so each
adapter's A and B are read once per batch whatever the row order), then the bias.
:class:`CpuBank` has the methods of its twin, :class:`numlora.multi.gpu.CudaBank`.
"""

from __future__ import annotations

import numpy as np

from .._dispatch import is_device_array
from .._validate import first_nonfinite, input_rows, low_rank_arrays, prepare_out, shares_memory
from ..device import to_host
from ..errors import DeviceError, ShapeError
from .product import base_product

__all__ = ["CpuBank", "kernel_blocks", "plan_rows"]


def host_adapter(lora_a, lora_b, out_f: int, in_f: int):
    """``(lora_a, lora_b, rank)`` of an adapter given as host arrays, checked against the
    base's shape and stored as the pool stores them: C-contiguous float32, finite (NaN /
    inf, or a float64 value beyond float32's range, is refused, naming the element). Both
    backends' ``add`` from host arrays go through here."""
    lora_a, lora_b, r = low_rank_arrays(lora_a, lora_b, out_f, in_f)
    lora_a = np.ascontiguousarray(lora_a, np.float32)
    lora_b = np.ascontiguousarray(lora_b, np.float32)
    for name, m in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not np.isfinite(m).all():
            raise first_nonfinite(f"{name} (as stored: float32)", m.reshape(-1), m.shape)
    return lora_a, lora_b, r


class CpuBank:
    """The CPU backend of a bank over ``weight`` (dense float32) or ``nf4`` (an
    NF4Tensor), with an optional float32 ``bias``. ``base(x2, out2)`` is its base
    product."""

    device = "cpu"
    #: what the bank's repr adds for this device
    repr_device = ""

    def __init__(self, weight, nf4, bias, row_stable, nf4_path):
        self._weight, self._nf4, self._bias = weight, nf4, bias
        self._out_f, self._in_f = (weight if nf4 is None else nf4).shape
        self.base = base_product(weight, nf4, row_stable, nf4_path)
        from ..kernels import multi  # here, not at import: numba loads with the first bank

        self._kernels = multi

    #: an array or NF4 tensor of the bank, moved here (``to()``)
    adopt = staticmethod(to_host)

    def forward(self, registry, x, adapters, scale, out):
        """:meth:`LoraBank.forward <numlora.multi.LoraBank.forward>` in the registry's
        current snapshot."""
        x = input_rows(x, self._in_f)
        one_d = x.ndim == 1
        n = 1 if one_d else x.shape[0]
        given = out
        rlock = registry.rlock
        with rlock:  # registry.enter(), inline: this is the hot path
            snap = registry.snap
            snap.readers += 1
        try:
            ids, rowscale = snap.rows(adapters, scale, n, one_d)
            out = prepare_out(out, x, self._out_f, np.float32)
            if n == 0:
                return out
            x2 = np.ascontiguousarray(x.reshape(-1, self._in_f), np.float32)
            plan = plan_rows(snap, ids)  # ids are not read after this: they may overlap out
            if given is not None:
                x2, rowscale = self._unaliased(out, x2, rowscale, scale)
            out2 = out.reshape(-1, self._out_f)
            self.base(x2, out2)
            if plan is not None:
                order, seg_start, seg_adapter, u = plan
                # positions in u are relative to the grouped rows; the kernel reads x /
                # rowscale / out by batch row through `order`; all tables from one snapshot
                add_rows(self._kernels, out2)(x2, order, seg_start, seg_adapter, rowscale, kernel_blocks(snap),
                                              snap.ad_block, snap.ad_off, snap.ad_rank, snap.ad_scaling, u, out2)
            if self._bias is not None:
                out2 += self._bias
            return out
        finally:
            with rlock:
                snap.readers -= 1

    def _unaliased(self, out, x2, rowscale, scale):
        """``x2`` and ``rowscale``, copied where they share memory with the caller's
        ``out`` (written while they are read); refuses an ``out`` over the base weight."""
        w = self._weight
        if w is not None and shares_memory(out, w):
            raise ShapeError("out shares memory with the bank's base weight: the forward would overwrite the weight "
                             "while reading it; expected a separate out buffer")
        if np.may_share_memory(out, x2):
            x2 = x2.copy()
        if scale is not None and np.may_share_memory(out, rowscale):
            rowscale = rowscale.copy()
        return x2, rowscale

    # --- the pool's memory -----------------------------------------------------------
    @staticmethod
    def new_block(size):
        return np.empty(size, np.float32)

    @staticmethod
    def touch(block):
        """Map a new block's memory now (no page faults when adds write into it later)."""
        block.fill(0)

    @staticmethod
    def settle():
        """Nothing runs after a forward returns: freed pages may be recycled at once."""

    def packer(self, lora_a, lora_b):
        """``(rank, pack)`` for an adapter: ``pack(pages)`` writes its ``A^T`` and ``B^T``
        into the pool pages ``pages``. Host arrays only."""
        if is_device_array(lora_a) or is_device_array(lora_b):
            raise DeviceError("this bank is on the CPU: expected lora_a and lora_b as host arrays, got a device "
                              "array; copy them with numlora.to_host, or move the bank with bank.to('cuda')")
        lora_a, lora_b, r = host_adapter(lora_a, lora_b, self._out_f, self._in_f)
        pack_adapter = self._kernels.pack_adapter_best

        def pack(pages):
            pack_adapter(lora_a, lora_b, pages)

        return r, pack

    @staticmethod
    def host(a):
        """Pool pages as a host array (to read them)."""
        return a

    @staticmethod
    def result(a):
        """A host array as this backend returns arrays."""
        return a

    def base_nbytes(self) -> int:
        return self._weight.nbytes if self._nf4 is None else self._nf4.nbytes

    @staticmethod
    def check_pickle():
        """A CPU bank pickles."""


def add_rows(kernels, out2):
    """The serial LoRA kernel for this output: the sums in vector registers on the SIMD
    build with a C-contiguous output (``multi_lora_add_simd_serial``), else element by
    element (``multi_lora_add_serial``); the same bits. Serial: it runs right after the
    base product, whose BLAS threads still spin."""
    if kernels.SIMD_LANES and out2.flags.c_contiguous:
        return kernels.multi_lora_add_simd_serial
    return kernels.multi_lora_add_serial


def plan_rows(snap, ids):
    """The grouping of a batch's adapter rows (made before anything is written to
    ``out``, so ``ids`` may share memory with it): ``(order, seg_start, seg_adapter,
    u)`` or None when every row is the base alone. ``order[seg_start[g]:seg_start[g +
    1]]`` are the batch rows of adapter ``seg_adapter[g]``; ``u`` is the kernel's
    scratch, sized by the largest rank of the snapshot the kernel reads."""
    order = np.argsort(ids, kind="stable")
    sid = ids[order]
    first = int(np.searchsorted(sid, 0))
    if first == sid.size:
        return None
    order = order[first:]
    sid = sid[first:]
    cuts = np.flatnonzero(sid[1:] != sid[:-1]) + 1
    seg_start = np.empty(cuts.size + 2, np.int64)
    seg_start[0] = 0
    seg_start[1:-1] = cuts
    seg_start[-1] = sid.size
    seg_adapter = np.ascontiguousarray(sid[seg_start[:-1]])
    rmax = int(snap.ad_rank[seg_adapter].max())
    return order, seg_start, seg_adapter, np.empty((sid.size, rmax), np.float32)


def kernel_blocks(snap):
    """The snapshot's blocks as a numba typed list (what the kernel takes), made once
    per snapshot whose blocks changed."""
    lst = snap.kblocks
    if lst is None:
        from numba import types
        from numba.typed import List

        lst = List.empty_list(types.float32[::1])
        for b in snap.blocks:
            lst.append(b)
        snap.kblocks = lst
    return lst
