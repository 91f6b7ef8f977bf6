"""The CUDA backend: GPU twins of numlora's kernels (numba.cuda), and the functional API on
GPU arrays.

A plug-in of :mod:`numlora._dispatch`: loaded, by name, the first time a numlora function
is given a GPU array (or an object asks for ``_dispatch.backend("cuda")`` in its
``to()``), never by ``import numlora``; importing it registers the implementations of
:mod:`numlora.cuda.ops` under the names of the public functions they stand in for. Every
CUDA import of numlora lies in this package (and in :mod:`numlora.device`, which imports
``numba.cuda`` lazily to check for a GPU). Importing it raises
:class:`~numlora.errors.DeviceError` where numba.cuda finds no GPU (and the simulator,
``NUMBA_ENABLE_CUDASIM=1``, is off).

- :mod:`numlora.cuda.kernels`: the ``@cuda.jit`` kernels, the names of
  :mod:`numlora.kernels` (factories of kernels with compile-time sizes are ``make_*``;
  launch sizes are module settings, patched small in tests);
- :mod:`numlora.cuda.ops`: validation, allocation and launches for device arrays;
- :mod:`numlora.cuda.bank`: the launches of :class:`~numlora.LoraBank` on the GPU,
  registered as ``"bank"``.
"""

from ..device import cuda_module as _cuda_module

_cuda_module()

from . import bank  # noqa: E402, F401  (registers the bank's launches)
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
