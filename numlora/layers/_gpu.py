"""The layers' GPU backend, all of their GPU plumbing: device arrays in and out, the
moves, the merge by a saved copy, and the training forward and backward on the device.

A layer holds a :class:`CudaBackend` after ``to("cuda")``, which imports this module and
loads the CUDA implementations of the functional API. The GPU path is float32 only and
runs plain LoRA (no DoRA, no LoRA bias). The CPU twin is :mod:`numlora.layers._host`.
"""

from __future__ import annotations

import numpy as np

from .._dispatch import backend, is_device_array
from ..device import as_cuda, cuda_module, to_device
from ..errors import ConfigError, DeviceError, DTypeError, MergeStateError, ShapeError


def _device_array(name, a, what):
    """``a`` as a numba device array; a host array is a DeviceError saying how to move it."""
    if not is_device_array(a):
        raise DeviceError(f"{what}, got a host {type(a).__name__}; move it with numlora.to_device({name})")
    return as_cuda(a)


def _input(name, a):
    return _device_array(name, a, f"expected {name} on the GPU like the layer (device='cuda')")


def _copy(name, a, shape):
    """A float32 device copy of the device array ``a`` of ``shape``."""
    a = _device_array(name, a, f"this layer is on the GPU: expected {name} as a device array")
    if np.dtype(a.dtype) != np.float32:
        raise DTypeError(f"expected {name} with dtype float32 on the GPU, got {np.dtype(a.dtype)}")
    if tuple(a.shape) != tuple(shape):
        raise ShapeError(f"expected {name} of shape {tuple(shape)}, got {tuple(a.shape)}")
    out = cuda_module().device_array(tuple(shape), np.float32)
    if out.size:
        out.copy_to_device(a)
    return out


def _view(name, a, shape):
    """The caller's float32 device array of ``shape`` itself."""
    a = _device_array(name, a, f"this layer is on the GPU: expected {name} as a device array")
    if np.dtype(a.dtype) != np.float32 or tuple(a.shape) != tuple(shape) or (a.size and not a.is_c_contiguous()):
        raise ShapeError(f"expected {name} as a C-contiguous float32 device array of shape {tuple(shape)}, got "
                         f"{np.dtype(a.dtype)} {tuple(a.shape)}")
    return a


class CudaBackend:
    """A layer's arrays and computations on the GPU."""

    name = "cuda"

    def __init__(self):
        #: The functional API's CUDA implementations (loading them: a DeviceError without a GPU).
        self.fn = backend("cuda")

    def __reduce__(self):
        return (cuda_backend, ())

    # arrays ---------------------------------------------------------------------------
    @staticmethod
    def move(a):
        return to_device(a)

    def check_move(self, layer) -> None:
        """Refuse, before anything is copied, a layer the GPU path cannot run."""
        if not layer._variant.on_gpu:
            raise ConfigError("DoRA layers and layers with a LoRA bias are CPU only (no GPU kernels for them "
                              "yet); keep this layer on the host")
        if layer._merged:
            raise MergeStateError("cannot move a merged layer to the GPU (its bit-exact merge record is CPU "
                                  "only); unmerge() first, then move it and merge there")
        for name in ("_lora_a", "_lora_b", "_bias"):
            a = getattr(layer, name)
            if a is not None and a.dtype != np.float32:
                raise DTypeError(f"the GPU path is float32 only: {name[1:]} is {a.dtype}; build the layer from "
                                 "float32 arrays to move it to the GPU")
        layer._check_float32_base()

    def check_variant(self, name, variant) -> None:
        if not variant.on_gpu:
            raise ConfigError(f"{name} (DoRA / LoRA bias) is CPU only: set it on the host layer "
                              "(layer.to('cpu'))")

    @staticmethod
    def input(name, a):
        """An input of the layer's computations: a device array."""
        return _input(name, a)

    @staticmethod
    def check_array(name, a, shape, message=None):
        return _view(name, a, shape)

    @staticmethod
    def attach_array(name, a, shape, copy, message=None):
        return _copy(name, a, shape) if copy else _view(name, a, shape)

    @staticmethod
    def own(name, a, shape, dtype, message=None):
        return _copy(name, a, shape)

    @staticmethod
    def vector(name, value, n, dtype):
        return None if value is None else _copy(name, value, (n,))

    @staticmethod
    def zero(g):
        if g.size:
            g.copy_to_device(np.zeros(g.shape, np.dtype(g.dtype)))

    @staticmethod
    def save(w):
        saved = cuda_module().device_array(w.shape, np.float32)
        saved.copy_to_device(w)
        return saved

    @staticmethod
    def restore(w, saved):
        w.copy_to_device(saved)

    def merge_lora(self, weight, lora_a, lora_b, scaling, fan_in_fan_out):
        """``W += s B A`` in place, after saving a copy of W: returns ``(None, copy)`` (the
        bit-exact merge record is CPU only; unmerge restores the copy)."""
        saved = self.save(weight)
        self.fn.merge_lora(weight, lora_a, lora_b, scaling, fan_in_fan_out)
        return None, saved

    @staticmethod
    def nf4_nbytes(t) -> int:
        """Device bytes of an NF4 weight: the codes and the float32 block scales."""
        return t.packed.nbytes + t.scales.nbytes

    # training -------------------------------------------------------------------------------
    def train_forward(self, layer, x, out):
        """The eval forward's kernels, the LoRA branch on the dropped input (the masks
        the CPU draws, drawn on the device); keeps references to x and the dropped x
        (``s x_drop A^T`` is recomputed in backward, an (n, r) shrink)."""
        x = _input("x", x)
        xd, state = layer._dropped(x)
        y = layer._forward_on(x, out, layer._enabled, None if state is None else xd)
        layer._keep(x, xd, None, state, len(x.shape) == 1, layer._enabled, np.dtype(np.float32))
        return y

    def backward(self, layer, saved, grad_out, need_grad_x):
        g = _input("grad_out", grad_out)
        layer._check_grad_out(saved, g)
        if not saved.lora:
            return layer._grad_input(g) if need_grad_x else None
        x_drop = None if saved.dropout is None else saved.x_drop
        dx, layer._grad_a, layer._grad_b = layer._lora_backward(saved.x, g, need_grad_x, saved.dropout, x_drop, None,
                                                                layer._grad_a, layer._grad_b)
        return dx


CUDA = None


def cuda_backend() -> CudaBackend:
    """The one CudaBackend, made on first use."""
    global CUDA
    if CUDA is None:
        CUDA = CudaBackend()
    return CUDA
