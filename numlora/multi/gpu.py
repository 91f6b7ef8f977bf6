"""The bank on the GPU: :class:`CudaBank`, the twin of :class:`~numlora.multi.cpu.CpuBank`
(the same methods) over device memory. The device input checks, the launches and their
planning are :mod:`numlora.cuda.bank`'s, which the CUDA backend registers with
:mod:`numlora._dispatch` as ``"bank"``. Imported by the bank's ``to("cuda")`` only:
importing it loads the CUDA backend (a DeviceError where there is no GPU).
"""

from __future__ import annotations

import numpy as np

from .._dispatch import backend, is_device_array
from .._validate import nbytes
from ..device import cuda_module, to_device
from ..errors import DeviceError
from .cpu import host_adapter

__all__ = ["CudaBank"]

#: The bank's launches and device checks (numlora.cuda.bank, loaded through the dispatch).
launch = backend("cuda").bank


class CudaBank:
    """The CUDA backend of a bank over ``weight`` (a float32 device array) or ``nf4`` (a
    DeviceNF4Tensor), with an optional float32 device ``bias``. ``base(x, out, n)`` is its
    base product (bias included)."""

    device = "cuda"
    #: what the bank's repr adds for this device
    repr_device = ", device='cuda'"

    def __init__(self, weight, nf4, bias, row_stable, nf4_path):
        self._weight, self._nf4 = weight, nf4
        self._out_f, self._in_f = tuple(weight.shape) if nf4 is None else nf4.shape
        self.base = launch.base_product(weight, nf4, bias, row_stable)

    #: an array or NF4 tensor of the bank, moved here (``to()``)
    adopt = staticmethod(to_device)

    def forward(self, registry, x, adapters, scale, out):
        """:meth:`LoraBank.forward <numlora.multi.LoraBank.forward>` on device ``x`` and
        ``out`` (``adapters`` and ``scale`` on the host or the device), in the registry's
        current snapshot. An ``out`` overlapping ``x`` reads ``x`` from a device copy."""
        if not is_device_array(x):
            raise DeviceError(f"this bank is on the GPU: expected x as a device array, got a host "
                              f"{type(x).__name__}; move it with numlora.to_device(x)")
        x, n = launch.rows("x", x, self._in_f)
        snap = registry.enter()
        try:
            ids, rowscale = snap.rows(adapters, scale, n, len(x.shape) == 1)
            out = launch.output(out, x, self._out_f)
            if n == 0:
                return out
            if launch.device_overlap(out, x):
                xc = cuda_module().device_array(tuple(x.shape), np.float32)
                xc.copy_to_device(x)
                x = xc
            self.base(x, out, n)
            plan = launch.plan_rows(snap, ids, rowscale)
            if plan is not None:
                launch.multi_lora_add(x, out, *plan)
            return out
        finally:
            registry.leave(snap)

    # --- the pool's memory -----------------------------------------------------------
    @staticmethod
    def new_block(size):
        return cuda_module().device_array(size, np.float32)

    @staticmethod
    def touch(block):
        """Nothing to do: device memory is mapped when allocated."""

    @staticmethod
    def settle():
        """Wait for the kernels already launched: forwards return without waiting for
        theirs, which must be done before the pages they read are written or freed."""
        cuda_module().synchronize()

    def packer(self, lora_a, lora_b):
        """``(rank, pack)`` for an adapter from host or device arrays: ``pack(pages)``
        writes its ``A^T`` and ``B^T`` into the device pool pages ``pages`` (device
        arrays by a kernel; host arrays packed on the host, then one copy)."""
        if is_device_array(lora_a) or is_device_array(lora_b):
            lora_a, lora_b, r = launch.low_rank(lora_a, lora_b, self._out_f, self._in_f)
            return r, lambda pages: launch.pack_adapter(lora_a, lora_b, pages)
        lora_a, lora_b, r = host_adapter(lora_a, lora_b, self._out_f, self._in_f)
        from ..kernels.multi import pack_adapter_best as pack_adapter

        def pack_on_host(pages):
            tmp = np.empty(pages.size, np.float32)
            pack_adapter(lora_a, lora_b, tmp)
            pages.copy_to_device(tmp)

        return r, pack_on_host

    @staticmethod
    def host(a):
        """Pool pages copied to the host (an inspection, not a hot path)."""
        return a.copy_to_host()

    #: a host array as this backend returns arrays
    result = staticmethod(to_device)

    def base_nbytes(self) -> int:
        if self._nf4 is None:
            return nbytes(self._weight)
        return nbytes(self._nf4.packed) + nbytes(self._nf4.scales)

    @staticmethod
    def check_pickle():
        raise DeviceError("a LoraBank on the GPU cannot be pickled (device memory is not picklable): expected a "
                          "CPU bank, got device='cuda'; pickle bank.to('cpu') instead")
