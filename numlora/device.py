"""Where arrays live: host (numpy) or an NVIDIA GPU (numba.cuda).

Importing this module imports neither numba nor CUDA. The GPU is touched only when a
function here is asked to move something to it, or when a numlora function is given a
GPU array (then :mod:`numlora.cuda` runs the kernels).

A *device array* is a numba device array or any object with ``__cuda_array_interface__``
(CuPy arrays, PyTorch CUDA tensors): numlora uses such inputs in place (zero-copy, through
``numba.cuda.as_cuda_array``) and returns numba device arrays, which CuPy
(``cupy.asarray``) and PyTorch (``torch.as_tensor(..., device="cuda")``) wrap without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._dispatch import SIM_MODULES, check_device, is_device_array
from .errors import DeviceError

__all__ = ["DeviceNF4Tensor", "cuda_available", "is_device_array", "to_device", "to_host"]


def cuda_module():
    """``numba.cuda``, checked to have a usable GPU (or the simulator); else one
    :class:`~numlora.errors.DeviceError` saying what is missing and what to do."""
    try:
        from numba import cuda
    except Exception as exc:  # numba without its CUDA part, broken toolkit
        raise DeviceError(f"a GPU was asked for, but numba.cuda cannot be imported ({exc}); "
                          "install numlora[cuda] (the numba-cuda package) on a machine with an NVIDIA GPU") from exc
    try:
        ok = bool(cuda.is_available())
    except Exception:
        ok = False
    if not ok:
        raise DeviceError("a GPU was asked for, but numba.cuda finds no usable NVIDIA GPU (expected a CUDA "
                          "driver and device, got none); install numlora[cuda] on a machine with an NVIDIA GPU, "
                          "keep the data on the host, or set NUMBA_ENABLE_CUDASIM=1 to run the GPU kernels "
                          "on the CPU simulator")
    return cuda


def cuda_available() -> bool:
    """Whether numba.cuda finds a GPU (or runs the simulator). Imports numba.cuda."""
    try:
        cuda_module()
    except DeviceError:
        return False
    return True


_AS_CUDA_SYNC_KW: list = []


def _as_cuda_takes_sync(cuda) -> bool:
    """Whether ``cuda.as_cuda_array`` accepts ``sync=`` (numba-cuda and numba >= 0.57)."""
    if not _AS_CUDA_SYNC_KW:
        import inspect

        try:
            ok = "sync" in inspect.signature(cuda.as_cuda_array).parameters
        except (TypeError, ValueError, AttributeError):
            ok = False
        _AS_CUDA_SYNC_KW.append(ok)
    return _AS_CUDA_SYNC_KW[0]


def as_cuda(x):
    """A numba device array for a device array (zero-copy for ``__cuda_array_interface__``
    objects).

    Stream semantics: the wrap passes ``sync=False`` where numba supports it, so it does
    not synchronise on the stream the producer exported (PyTorch exports its current
    stream; synchronising on it would block the host on every call and stall the launch
    queue). numlora launches on the legacy default stream, which orders its kernels after
    the work already queued on PyTorch's default stream and on any other blocking stream.
    Data produced on a *non-blocking* stream (``torch.cuda.Stream()`` side streams, CuPy
    non-blocking streams) must be synchronised by the caller before the numlora call
    (``stream.synchronize()``), as with any CUDA library on another stream."""
    cuda = cuda_module()
    if type(x).__module__.startswith(SIM_MODULES) or hasattr(x, "copy_to_host"):
        return x  # already a numba (or simulator) device array
    if _as_cuda_takes_sync(cuda):
        return cuda.as_cuda_array(x, sync=False)
    return cuda.as_cuda_array(x)


@dataclass(eq=False)
class DeviceNF4Tensor:
    """An :class:`~numlora.nf4.NF4Tensor` whose packed codes and float32 block scales
    live on the GPU (``numlora.to_device(t)``; back with ``numlora.to_host``).

    ``packed``: uint8 device array ((n + 1) // 2,); ``scales``: float32 device array
    (n_blocks,), an attribute as :attr:`NF4Tensor.scales <numlora.nf4.NF4Tensor.scales>`
    is - the decoded scales when the host tensor was double-quantized, whose 8-bit codes
    are kept on the host in ``host_dq`` so that ``to_host`` gives back the same tensor.
    The numlora functions given one run on the GPU."""

    #: Where a DeviceNF4Tensor lives: numlora's dispatch routes calls with one to the GPU.
    __numlora_device__ = "cuda"

    packed: object
    scales: object
    shape: tuple
    blocksize: int
    dtype: str = "float32"
    host_dq: tuple | None = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def double_quant(self) -> bool:
        return self.host_dq is not None

    def to(self, device: str):
        """``"cpu"`` gives the host NF4Tensor; ``"cuda"`` returns self."""
        return _move(self, device)

    def dequantize(self):
        from .nf4 import dequantize_nf4

        return dequantize_nf4(self)

    def __reduce__(self):
        raise DeviceError("a DeviceNF4Tensor cannot be pickled (device memory is not picklable): expected a host "
                          "NF4Tensor, got one on the GPU; pickle numlora.to_host(t) instead")

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return f"DeviceNF4Tensor(shape={self.shape}, blocksize={self.blocksize}{dq})"


def to_device(x):
    """Move ``x`` to the GPU: a numpy array (or anything ``numpy.asarray`` takes) is
    copied; a device array (numba, CuPy, PyTorch CUDA) is wrapped without a copy; an
    :class:`~numlora.nf4.NF4Tensor` becomes a :class:`DeviceNF4Tensor`. Raises
    :class:`~numlora.errors.DeviceError` where there is no GPU."""
    from .nf4 import NF4Tensor

    if isinstance(x, DeviceNF4Tensor):
        return x
    if isinstance(x, NF4Tensor) and x.quant_type != "nf4":
        raise DeviceError(f"expected an NF4 weight: the CUDA kernels decode NF4 only, got quant_type "
                          f"{x.quant_type!r} (run FP4 weights on the CPU)")
    cuda = cuda_module()
    if isinstance(x, NF4Tensor):
        dq = None
        if x.double_quant:
            dq = (x.absmax, x.absmax2, x.offset, x.code8)
        return DeviceNF4Tensor(cuda.to_device(x.packed), cuda.to_device(np.ascontiguousarray(x.scales)),
                               x.shape, x.blocksize, x.dtype, dq)
    if is_device_array(x):
        return as_cuda(x)
    return cuda.to_device(np.ascontiguousarray(np.asarray(x)))


def to_host(x):
    """Copy ``x`` to the host: device arrays become numpy arrays, a
    :class:`DeviceNF4Tensor` an :class:`~numlora.nf4.NF4Tensor`; host objects are
    returned as they are."""
    if isinstance(x, DeviceNF4Tensor):
        from .nf4 import NF4Tensor

        packed = x.packed.copy_to_host()
        if x.host_dq is not None:
            absmax, absmax2, offset, code8 = x.host_dq
            return NF4Tensor(packed, absmax, x.shape, x.blocksize, absmax2=absmax2, offset=offset, code8=code8,
                             dtype=x.dtype)
        return NF4Tensor(packed, x.scales.copy_to_host(), x.shape, x.blocksize, dtype=x.dtype)
    if is_device_array(x):
        if hasattr(x, "copy_to_host"):
            return x.copy_to_host()
        return as_cuda(x).copy_to_host()
    return x


def _move(x, device: str):
    return to_device(x) if check_device(device) == "cuda" else to_host(x)
