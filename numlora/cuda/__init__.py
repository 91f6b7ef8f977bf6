"""GPU twins of numlora's kernels (numba.cuda), and the functional API on GPU arrays.

Imported only when a numlora function is given a GPU array or ``numlora.to_device`` is
called, never by ``import numlora``. Every CUDA import of numlora lies in this package
(and in :mod:`numlora.device`, which imports ``numba.cuda`` lazily to check for a GPU).
Importing it raises :class:`~numlora.errors.DeviceError` where numba.cuda finds no GPU
(and the simulator, ``NUMBA_ENABLE_CUDASIM=1``, is off).

- :mod:`numlora.cuda.kernels`: the ``@cuda.jit`` kernels, same names as
  :mod:`numlora.kernels` (launch sizes are module settings, patched small in tests);
- :mod:`numlora.cuda.ops`: validation, allocation and launches for device arrays.
"""

from ..device import cuda_module as _cuda_module

_cuda_module()

from .ops import (  # noqa: E402
    adamw_update,
    dequantize_nf4,
    linear_forward,
    lora_backward,
    lora_dropout,
    lora_forward,
    merge_lora,
    nf4_matmul,
    nf4_matmul_t,
    qlora_backward,
    qlora_forward,
    quantize_nf4,
    uniform,
    unmerge_lora,
    xorshift64_fill,
)

__all__ = [
    "adamw_update",
    "dequantize_nf4",
    "linear_forward",
    "lora_backward",
    "lora_dropout",
    "lora_forward",
    "merge_lora",
    "nf4_matmul",
    "nf4_matmul_t",
    "qlora_backward",
    "qlora_forward",
    "quantize_nf4",
    "uniform",
    "unmerge_lora",
    "xorshift64_fill",
]
