"""numlora: Numba-compiled kernels for LoRA and QLoRA over plain numpy arrays.

Importing numlora compiles nothing and does not import numba: kernels are imported and
compiled on first use (and cached on disk; see ``numlora._config``).
"""

from .adapter import LoraAdapter, LoraAdapterSummary
from .config import LoraConfig
from .dora import dora_forward, dora_weight_norm, merge_dora
from .errors import (
    ConfigError,
    DetachedLayerError,
    FormatError,
    DTypeError,
    DuplicateLayerError,
    LayerNotFoundError,
    MergeStateError,
    NonFiniteError,
    NumloraError,
    ShapeError,
)
from .io.peft import load_peft_adapter
from .layers import LoraLinear, QLoraLinear
from .nf4 import (
    CODE8,
    NF4_CODE,
    NF4_MIDPOINTS,
    NF4Tensor,
    dequantize_nf4,
    nf4_matmul,
    nf4_matmul_t,
    qlora_forward,
    quantize_nf4,
)
from .ops import MergeRecord, linear_forward, lora_forward, merge_lora, unmerge_lora
from .rng import XorShift64
from .nf4 import qlora_backward
from .ops import DropoutState, lora_backward, lora_dropout
from .train import AdamW, Parameter, TrainStateError, clip_grad_norm
from .multi import LoraBank, multi_lora_forward
from .combine import combine_adapters
from .device import DeviceNF4Tensor, is_device_array, to_device, to_host
from .errors import DeviceError

__version__ = "0.1.0"

__all__ = [
    "CODE8",
    "NF4_CODE",
    "NF4_MIDPOINTS",
    "ConfigError",
    "DTypeError",
    "DuplicateLayerError",
    "LayerNotFoundError",
    "LoraAdapter",
    "LoraAdapterSummary",
    "LoraConfig",
    "LoraLinear",
    "MergeRecord",
    "MergeStateError",
    "NF4Tensor",
    "NonFiniteError",
    "NumloraError",
    "QLoraLinear",
    "ShapeError",
    "XorShift64",
    "dequantize_nf4",
    "linear_forward",
    "lora_forward",
    "merge_lora",
    "nf4_matmul",
    "nf4_matmul_t",
    "qlora_forward",
    "quantize_nf4",
    "unmerge_lora",
    "DetachedLayerError",
    "FormatError",
    "dora_forward",
    "dora_weight_norm",
    "load_peft_adapter",
    "merge_dora",
    "AdamW",
    "DropoutState",
    "Parameter",
    "TrainStateError",
    "clip_grad_norm",
    "lora_backward",
    "lora_dropout",
    "qlora_backward",
    "combine_adapters",
    "LoraBank",
    "multi_lora_forward",
    "DeviceError",
    "DeviceNF4Tensor",
    "is_device_array",
    "to_device",
    "to_host",
]
