"""numlora: Numba-compiled kernels for LoRA and QLoRA over plain numpy arrays.

Importing numlora compiles nothing and does not import numba: kernels are imported and
compiled on first use (and cached on disk; see ``numlora._config``).
"""

from .adapter import LoraAdapter, LoraAdapterSummary
from .combine import combine_adapters
from .config import LoraConfig
from .conv import conv_forward, conv_lora_backward, conv_lora_forward, merge_conv, unmerge_conv
from .device import DeviceNF4Tensor, is_device_array, to_device, to_host
from .dora import dora_forward, dora_weight_norm, merge_dora
from .dropout import DropoutState, dropout_keep_mask, lora_dropout, mix_seed
from .embedding import (
    embedding_forward,
    embedding_lora_backward,
    embedding_lora_forward,
    merge_embedding,
    unmerge_embedding,
)
from .errors import (
    ConfigError,
    DetachedLayerError,
    DeviceError,
    DTypeError,
    DuplicateLayerError,
    FormatError,
    LayerNotFoundError,
    MergeStateError,
    NonFiniteError,
    NumloraError,
    ShapeError,
)
from .init import LoftQInit, LoraInit, as_plain_lora, init_lora, loftq_init
from .io.peft import load_peft_adapter
from .layers import LoraLinear, QLoraLinear
from .layers.conv import LoraConv
from .layers.embedding import LoraEmbedding
from .multi import LoraBank, multi_lora_forward
from .nf4 import (
    CODE8,
    FP4_CODE,
    NF4_CODE,
    NF4_MIDPOINTS,
    NF4Tensor,
    dequantize_4bit,
    dequantize_nf4,
    nf4_matmul,
    nf4_matmul_t,
    qlora_backward,
    qlora_forward,
    quantize_4bit,
    quantize_nf4,
)
from .ops import MergeRecord, linear_forward, lora_backward, lora_forward, merge_lora, unmerge_lora
from .rng import XorShift64
from .train import AdamW, Parameter, TrainStateError, adamw_update, clip_grad_norm

__version__ = "0.1.0"

__all__ = [
    "CODE8",
    "FP4_CODE",
    "NF4_CODE",
    "NF4_MIDPOINTS",
    "AdamW",
    "ConfigError",
    "DTypeError",
    "DetachedLayerError",
    "DeviceError",
    "DeviceNF4Tensor",
    "DropoutState",
    "DuplicateLayerError",
    "FormatError",
    "LayerNotFoundError",
    "LoftQInit",
    "LoraAdapter",
    "LoraAdapterSummary",
    "LoraBank",
    "LoraConfig",
    "LoraConv",
    "LoraEmbedding",
    "LoraInit",
    "LoraLinear",
    "MergeRecord",
    "MergeStateError",
    "NF4Tensor",
    "NonFiniteError",
    "NumloraError",
    "Parameter",
    "QLoraLinear",
    "ShapeError",
    "TrainStateError",
    "XorShift64",
    "adamw_update",
    "as_plain_lora",
    "clip_grad_norm",
    "combine_adapters",
    "conv_forward",
    "conv_lora_backward",
    "conv_lora_forward",
    "dequantize_4bit",
    "dequantize_nf4",
    "dora_forward",
    "dora_weight_norm",
    "dropout_keep_mask",
    "init_lora",
    "embedding_forward",
    "embedding_lora_backward",
    "embedding_lora_forward",
    "is_device_array",
    "linear_forward",
    "load_peft_adapter",
    "loftq_init",
    "lora_backward",
    "lora_dropout",
    "lora_forward",
    "merge_conv",
    "merge_dora",
    "merge_embedding",
    "merge_lora",
    "mix_seed",
    "multi_lora_forward",
    "nf4_matmul",
    "nf4_matmul_t",
    "qlora_backward",
    "qlora_forward",
    "quantize_4bit",
    "quantize_nf4",
    "to_device",
    "to_host",
    "unmerge_conv",
    "unmerge_embedding",
    "unmerge_lora",
]
