"""``LoraLinear`` and ``QLoraLinear``: thin holders of arrays and flags whose methods
call the functional API (:mod:`numlora.ops`, :mod:`numlora.nf4`)."""

from __future__ import annotations

import math
import zlib

import numpy as np

from . import _validate as v
from .config import lora_scaling
from .dora import dora_forward, dora_weight_norm, merge_dora
from .device import is_device_array
from .errors import ConfigError, DetachedLayerError, DeviceError, DTypeError, MergeStateError, NonFiniteError
from .errors import ShapeError
from .nf4 import NF4Tensor, _nf4_forward, _nf4_grad_input, _weight_2d, dequantize_nf4, nf4_matmul, qlora_forward
from .nf4 import quantize_nf4
from .ops import _Base, _backward_core, _deliver, _drop_args, _input_rows, _low_rank_arrays, _prepare_out, _private_out
from .ops import _seed64, _weight_array, dropout_p, linear_forward
from .ops import lora_forward, merge_lora, mix_seed, train_forward_dense, unmerge_lora
from .rng import XorShift64
from .train import TrainStateError, _BoundParameter

__all__ = ["LoraLinear", "QLoraLinear", "init_lora_a"]

INITS = ("seed", "kaiming", "gaussian")


def _check_rank(rank, out_f, in_f):
    rank = v.int_scalar("rank", rank)
    if rank <= 0:
        raise ConfigError(f"LoRA rank must be > 0, got {rank}")
    if rank > min(out_f, in_f):
        raise ConfigError(
            f"LoRA rank ({rank}) must not exceed min(out_features, in_features) = {min(out_f, in_f)}"
        )
    return rank


def init_lora_a(rank: int, in_features: int, out_features: int, init: str = "seed",
                seed: int | None = None, default_seed: int = 42) -> np.ndarray:
    """Initial A (rank, in_features), float32.

    ``"seed"``: the seed module's init, bit for bit: xorshift64 seeded
    ``default_seed + in + out`` (or ``seed``), values times ``float32(sqrt(2 / in))``.
    ``"kaiming"``: PEFT's default, U(-1/sqrt(in), 1/sqrt(in)) (numpy Generator(seed)).
    ``"gaussian"``: PEFT's ``"gaussian"``, N(0, (1/rank)^2) (numpy Generator(seed)).

    ``seed``: None or a non-negative integer (below 2**64 for ``"seed"``, the generator's
    state); anything else is a :class:`~numlora.errors.NumloraError` naming it.
    """
    if not isinstance(init, str) or init not in INITS:
        raise ConfigError(f"init must be one of {INITS}, got {init!r}")
    rank = v.int_scalar("rank", rank, minimum=1)
    in_features = v.int_scalar("in_features", in_features, minimum=1)
    out_features = v.int_scalar("out_features", out_features, minimum=1)
    v.shape_arg("(rank, in_features)", (rank, in_features), 4)
    if seed is not None:
        seed = _seed64(seed) if init == "seed" else v.int_scalar("seed", seed, minimum=0)
    if init == "seed":
        rng = XorShift64(default_seed + in_features + out_features if seed is None else seed)
        scale = np.sqrt(np.float32(2.0) / np.float32(in_features))
        return rng.uniform((rank, in_features)) * scale
    if init == "kaiming":
        bound = 1.0 / math.sqrt(in_features)
        return np.random.default_rng(seed).uniform(-bound, bound, (rank, in_features)).astype(np.float32)
    if init == "gaussian":
        return np.random.default_rng(seed).normal(0.0, 1.0 / rank, (rank, in_features)).astype(np.float32)
    raise ConfigError(f"init must be one of {INITS}, got {init!r}")


class _LowRank:
    """What LoraLinear and QLoraLinear share: A, B, alpha, scaling, the enabled flag."""

    _dtype = np.dtype(np.float32)
    _device = "cpu"

    def _init_low_rank(self, out_f, in_f, lora_a, lora_b, alpha, use_rslora, base=None):
        self._out_f, self._in_f = out_f, in_f
        # A and B checked together first, so that a shape error can say what is likely
        # wrong (A and B swapped, a transposed weight, an adapter for another base)
        a, _, _ = _low_rank_arrays(lora_a, lora_b, out_f, in_f, base)
        self._rank = a.shape[0]
        self._alpha = v.real_scalar("alpha", alpha, positive=True)
        self._use_rslora = v.flag("use_rslora", use_rslora)
        self._enabled = True
        self._merged = False
        self.lora_a = a
        self.lora_b = lora_b

    # A and B: validating setters -------------------------------------------------
    @property
    def lora_a(self) -> np.ndarray:
        """LoRA A, shape (rank, in_features)."""
        return self._lora_a

    @lora_a.setter
    def lora_a(self, a):
        self._set("lora_a", a, (self._rank, self._in_f))

    @property
    def lora_b(self) -> np.ndarray:
        """LoRA B, shape (out_features, rank)."""
        return self._lora_b

    @lora_b.setter
    def lora_b(self, b):
        self._set("lora_b", b, (self._out_f, self._rank))

    def _set_bias(self, bias, dtype=None):
        """Keep a validated copy of the bias (out_features,) in ``dtype`` (default: the
        layer's), or None."""
        if bias is not None:
            bias = v.float_array("bias", bias, 1)
            v.expect_shape("bias", bias, (self._out_f,))
            bias = np.array(bias, dtype=self._dtype if dtype is None else dtype, copy=True)
        self._bias = bias

    @property
    def bias(self):
        return self._bias

    def _set(self, name, a, shape):
        if self._merged:
            raise MergeStateError(f"cannot set {name} while the layer is merged; unmerge() first")
        if self._device == "cuda":
            setattr(self, "_" + name, _dev_copy(name, a, shape))
            return
        a = v.float_array(name, a, 2)
        if tuple(a.shape) != tuple(shape):
            hint = ""
            other = ("lora_b", (self._out_f, self._rank)) if name == "lora_a" else ("lora_a", (self._rank, self._in_f))
            if tuple(a.shape) == other[1]:
                hint = f": that is the shape of {other[0]}; did you mean layer.{other[0]} = ...?"
            elif tuple(a.shape) == tuple(shape)[::-1]:
                hint = f": that is the transpose; pass {name}.T"
            raise ShapeError(f"expected {name} of shape {tuple(shape)}, got {tuple(a.shape)}{hint}")
        setattr(self, "_" + name, np.array(a, dtype=self._dtype, order="C", copy=True))

    # flags and sizes ---------------------------------------------------------------
    def enable(self) -> None:
        """Turn the LoRA path on."""
        self._enabled = True

    def disable(self) -> None:
        """Turn the LoRA path off: forward gives the base layer's output."""
        if self._merged:
            raise MergeStateError("cannot disable a merged layer; unmerge() first")
        self._enabled = False

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def merged(self) -> bool:
        return self._merged

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def use_rslora(self) -> bool:
        return self._use_rslora

    @property
    def scaling(self) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA)."""
        return lora_scaling(self._alpha, self._rank, self._use_rslora)

    @property
    def in_features(self) -> int:
        return self._in_f

    @property
    def out_features(self) -> int:
        return self._out_f

    @property
    def trainable_params(self) -> int:
        """``rank * (in_features + out_features)``."""
        return self._rank * (self._in_f + self._out_f)

    @property
    def original_params(self) -> int:
        return self._in_f * self._out_f

    @property
    def total_params(self) -> int:
        """Frozen plus trainable parameters."""
        return self.original_params + self.trainable_params

    @property
    def compression_ratio(self) -> float:
        """Trainable over total parameters."""
        return self.trainable_params / self.total_params

    # training ---------------------------------------------------------------------------
    def _init_training(self, dropout, dropout_seed):
        self._dropout = dropout_p(dropout)
        self._dropout_seed = _seed64(dropout_seed)
        self._training = False
        self._grad_a = None
        self._grad_b = None
        self._cache = None
        self._calls = 0
        self._xd_buf = None

    @property
    def dropout(self) -> float:
        """Dropout probability on the LoRA input, applied only in training mode."""
        return self._dropout

    @dropout.setter
    def dropout(self, p):
        self._dropout = dropout_p(p)

    @property
    def dropout_seed(self) -> int:
        """The seed of the dropout masks: the k-th training forward uses the seed
        ``numlora.ops.mix_seed(dropout_seed, k)`` (k counts from 0 per layer)."""
        return self._dropout_seed

    @property
    def training(self) -> bool:
        """Whether the layer is in training mode (False, eval mode, by default)."""
        return self._training

    def train(self, mode: bool = True):
        """Training mode: forward applies dropout and keeps what :meth:`backward` needs.
        Returns the layer."""
        if not isinstance(mode, (bool, np.bool_)):
            raise ConfigError(f"mode must be True or False, got {mode!r}")
        self._training = bool(mode)
        if not mode:
            self._cache = None
        return self

    def eval(self):
        """Eval mode (the default): no dropout, nothing kept. Returns the layer."""
        return self.train(False)

    @property
    def grad_a(self):
        """Accumulated gradient of the loss with respect to ``lora_a`` (None before the
        first backward)."""
        return self._grad_a

    @property
    def grad_b(self):
        """Accumulated gradient with respect to ``lora_b`` (None before the first backward)."""
        return self._grad_b

    def parameters(self) -> list:
        """``[Parameter for lora_a, Parameter for lora_b]``, sharing this layer's arrays
        and gradients (an optimizer updates the layer's A and B in place)."""
        return [_BoundParameter(self, "_lora_a", "_grad_a", "lora_a"),
                _BoundParameter(self, "_lora_b", "_grad_b", "lora_b")]

    def zero_grad(self) -> None:
        """Fill grad_a and grad_b with zeros in place (they stay None before the first
        backward)."""
        for g in (self._grad_a, self._grad_b):
            if g is not None:
                _zero_fill(g)

    def _train_dtype(self, x):
        return np.dtype(np.float32)

    def _forward_train(self, x, out):
        """The training-mode forward: as the eval forward, with dropout on the LoRA
        input, keeping (a reference to) x, the dropped x and s x_drop A^T for backward."""
        if self._merged:
            raise TrainStateError("cannot run a training forward on a merged layer: unmerge() first")
        self._check_trainable()
        if self._device == "cuda":
            return self._forward_train_gpu(x, out)
        in_f, out_f = self._in_f, self._out_f
        x = _input_rows(x, in_f)
        dtype = self._train_dtype(x)
        dest = None
        out_given = out is not None
        out = _prepare_out(out, x, out_f, dtype)
        if out_given:  # out overlapping x or the base: computed into a temporary, copied at the end
            out, dest = _private_out(out, {"x": x, **self._base_arrays()})
        x2 = np.ascontiguousarray(x.reshape(-1, in_f), dtype)
        if dest is not None and v.shares_memory(dest, x2):
            x2 = x2.copy()  # backward reads x: keep it as it was before out overwrites it
        out2 = out.reshape(-1, out_f)
        lora = self._enabled
        drop = None
        xd2 = x2
        if lora and self._dropout > 0:
            seed = mix_seed(self._dropout_seed, self._calls)
            self._calls += 1
            drop = _drop_args(self._dropout, seed, dtype)
            buf = self._xd_buf
            if buf is None or buf.shape != x2.shape or buf.dtype != dtype:
                buf = self._xd_buf = np.empty(x2.shape, dtype)
            xd2 = buf
            if x2.size:
                from .kernels import train as k

                k.dropout_fill(x2, drop.thresh, drop.states(x2.shape[0]), drop.scale, xd2)
        us = self._train_forward_impl(x2, xd2, out2, lora, dtype)
        self._cache = (x2, xd2, us, drop, x.ndim == 1, lora, dtype)
        return _deliver(out, dest)

    def backward(self, grad_out, need_grad_x: bool = True):
        """Backpropagate ``grad_out = dL/dy`` (the shape of the last training forward's
        output) through the layer: **adds** ``dL/dA`` and ``dL/dB`` into :attr:`grad_a`
        and :attr:`grad_b` (allocated as zeros on first use) and returns ``dL/dx`` (the
        shape of that forward's input), or None with ``need_grad_x=False`` (skips the
        ``G W`` product, most of the cost: for a first layer). A disabled layer computes
        only ``dL/dx``. Frees what the forward kept, so each training forward allows one
        backward."""
        need_grad_x = v.flag("need_grad_x", need_grad_x)
        if self._cache is None:
            raise TrainStateError("backward needs a forward in training mode first: call layer.train(), then "
                                  "forward, then backward (once per forward)")
        if self._device == "cuda":
            return self._backward_gpu(grad_out, need_grad_x)
        x2, xd2, us, drop, one_d, lora, dtype = self._cache
        in_f, out_f = self._in_f, self._out_f
        g = _input_rows(grad_out, out_f, "grad_out", "out_features")
        want = (out_f,) if one_d else (x2.shape[0], out_f)
        if g.shape != want:
            raise ShapeError(f"expected grad_out of shape {want} (the shape of the forward's output), got {g.shape}")
        g2 = np.ascontiguousarray(g.reshape(-1, out_f), dtype)
        if lora:
            if self._grad_a is None:
                self._grad_a = np.zeros(self._lora_a.shape, self._lora_a.dtype)
                self._grad_b = np.zeros(self._lora_b.shape, self._lora_b.dtype)
            a = self._lora_a.astype(dtype, copy=False)
            b = self._lora_b.astype(dtype, copy=False)
            dx, _, _ = _backward_core(x2, xd2, a, b, self.scaling, g2, us, drop, self._grad_a, self._grad_b,
                                      bool(need_grad_x), self._grad_input)
        elif need_grad_x:
            dx = np.empty((x2.shape[0], in_f), dtype)
            if x2.shape[0]:
                self._grad_input(g2, dx)
        else:
            dx = None
        self._cache = None
        if dx is not None and one_d:
            dx = dx.reshape(in_f)
        return dx

    @property
    def saved_bytes(self) -> int:
        """Bytes held between a training forward and its backward beyond the input x
        (referenced, not copied, when it is C-contiguous in the compute dtype): the
        (n, r) product ``s x_drop A^T`` and, with dropout, the dropped input (n, in)."""
        if self._cache is None:
            return 0
        if self._device == "cuda":  # the GPU keeps x by reference and, with dropout, the dropped x
            xd = self._cache[2]
            return 0 if xd is None else int(xd.size) * 4
        x2, xd2, us, *_ = self._cache
        return us.nbytes + (xd2.nbytes if xd2 is not x2 else 0)

    def _check_trainable(self):
        pass

    # the GPU ------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """Where the layer's arrays live: ``"cpu"`` (numpy) or ``"cuda"`` (numba device
        arrays, see :meth:`to`)."""
        return self._device

    _ARRAYS = ("_lora_a", "_lora_b", "_bias", "_grad_a", "_grad_b")

    def to(self, device: str):
        """A copy of the layer with its arrays on ``device`` (``"cuda"`` or ``"cpu"``);
        ``self`` when it is there already. The layer it is called on is left as it was
        (a new layer is returned, its arrays copied: the GPU layer does not share memory
        with the host one). Flags, sizes, dropout settings and accumulated gradients
        travel; what a training forward kept for backward does not (run the forward
        again). See docs/gpu.md ("The layer classes on the GPU")."""
        from .device import _move

        if not isinstance(device, str) or device not in ("cuda", "cpu"):
            raise ConfigError(f"device must be 'cuda' or 'cpu', got {device!r}")
        if device == self._device:
            return self
        if device == "cuda":
            self._check_movable()
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        for name in self._ARRAYS:
            a = getattr(self, name, None)
            if a is not None:
                setattr(new, name, _move(a, device))
        new._device = device
        new._cache = None
        new._xd_buf = None
        return new

    def _check_movable(self):
        if self._merged:
            raise MergeStateError("cannot move a merged layer to the GPU (its bit-exact merge record is CPU "
                                  "only); unmerge() first, then move it and merge there")
        for name in ("_lora_a", "_lora_b", "_bias"):
            a = getattr(self, name)
            if a is not None and a.dtype != np.float32:
                raise DTypeError(f"the GPU path is float32 only: {name[1:]} is {a.dtype}; build the layer from "
                                 "float32 arrays to move it to the GPU")

    def _forward_train_gpu(self, x, out):
        """The GPU training forward: the eval forward's kernels, the LoRA branch on the
        dropped input (the same masks as on the CPU, drawn on the device); keeps
        references to x and the dropped x (``s x_drop A^T`` is recomputed in backward, an
        (n, r) shrink)."""
        lora = self._enabled
        if not is_device_array(x):
            raise DeviceError(f"expected x on the GPU like the layer (device='cuda'), got a host "
                              f"{type(x).__name__}; move it with numlora.to_device(x)")
        from .device import as_cuda

        x = as_cuda(x)
        xd = drop = None
        if lora and self._dropout > 0:
            from .cuda import ops as C

            seed = mix_seed(self._dropout_seed, self._calls)
            self._calls += 1
            buf = self._xd_buf
            if buf is None or tuple(buf.shape) != tuple(x.shape):
                buf = None
            xd, drop = C.lora_dropout(x, self._dropout, seed, out=buf)
            self._xd_buf = xd
        y = self._gpu_forward(x, out, lora, xd)
        self._cache = ("cuda", x, xd, drop, len(x.shape) == 1, lora)
        return y

    def _backward_gpu(self, grad_out, need_grad_x):
        _, x, xd, drop, one_d, lora = self._cache
        if not is_device_array(grad_out):
            raise DeviceError(f"expected grad_out on the GPU like the layer (device='cuda'), got a host "
                              f"{type(grad_out).__name__}; move it with numlora.to_device(grad_out)")
        from .device import as_cuda

        g = as_cuda(grad_out)
        want = (self._out_f,) if one_d else (x.shape[0], self._out_f)
        if tuple(g.shape) != want:
            raise ShapeError(f"expected grad_out of shape {want} (the shape of the forward's output), "
                             f"got {tuple(g.shape)}")
        if lora:
            dx, ga, gb = self._gpu_backward(x, g, bool(need_grad_x), xd, drop)
            self._grad_a, self._grad_b = ga, gb
        elif need_grad_x:
            dx = self._gpu_grad_input(g)
        else:
            dx = None
        self._cache = None
        return dx


def _dev_copy(name, a, shape):
    """A float32 device copy of the device array ``a`` of ``shape`` (a host array is a
    DeviceError: a GPU layer takes GPU arrays)."""
    from .device import as_cuda, cuda_module

    if not is_device_array(a):
        raise DeviceError(f"this layer is on the GPU: expected {name} as a device array, got a host "
                          f"{type(a).__name__}; move it with numlora.to_device({name})")
    a = as_cuda(a)
    if np.dtype(a.dtype) != np.float32:
        raise DTypeError(f"expected {name} with dtype float32 on the GPU, got {np.dtype(a.dtype)}")
    if tuple(a.shape) != tuple(shape):
        raise ShapeError(f"expected {name} of shape {tuple(shape)}, got {tuple(a.shape)}")
    out = cuda_module().device_array(tuple(shape), np.float32)
    if out.size:
        out.copy_to_device(a)
    return out


def _dev_view(name, a, shape):
    """The caller's float32 device array of ``shape`` itself (``attach(copy=False)``)."""
    from .device import as_cuda

    if not is_device_array(a):
        raise DeviceError(f"this layer is on the GPU: expected {name} as a device array, got a host "
                          f"{type(a).__name__}; move it with numlora.to_device({name})")
    a = as_cuda(a)
    if np.dtype(a.dtype) != np.float32 or tuple(a.shape) != tuple(shape) or (a.size and not a.is_c_contiguous()):
        raise ShapeError(f"expected {name} as a C-contiguous float32 device array of shape {tuple(shape)}, got "
                         f"{np.dtype(a.dtype)} {tuple(a.shape)}")
    return a


def _zero_fill(g):
    """``g[...] = 0`` for numpy and device arrays."""
    if isinstance(g, np.ndarray):
        g[...] = 0
    elif g.size:
        g.copy_to_device(np.zeros(g.shape, np.dtype(g.dtype)))


class LoraLinear(_LowRank):
    """A linear layer ``y = x W^T + b`` with a LoRA adapter ``scaling * (x A^T) B^T``.

    Build it with :meth:`from_weight`, or from adapter tensors alone with
    ``LoraLinear(None, lora_a, lora_b, alpha, ...)``: a *detached* layer (in and out
    features from A and B) whose forward and merge raise
    :class:`~numlora.errors.DetachedLayerError` until :meth:`attach` gives it a base weight.

    Optional parts, as PEFT has them: ``lora_bias`` ``(out,)`` (the bias of LoRA B, added as
    ``scaling * lora_bias``) and ``magnitude`` ``(out,)`` (DoRA: see :mod:`numlora.dora`).

    ``merge()`` adds ``scaling * B @ A`` into the weight in place; ``unmerge()`` restores the
    weight **bit for bit**, however many cycles: the merge keeps one signed byte per weight
    element (see :class:`numlora.ops.MergeRecord`), a quarter of the float32 weight's
    memory, for as long as the layer is merged. A DoRA merge rescales every row, which has
    no exact inverse: it keeps a full copy of the base weight instead (see
    :attr:`merge_overhead_bytes`). With a LoRA bias the merge adds ``scaling * lora_bias``
    into the bias (creating one if the base has none) and unmerge restores the old one.
    While merged, A, B and the optional vectors cannot be changed.

    Training (see docs/training.md): ``train()`` / ``eval()``; in training mode forward
    applies ``dropout`` to the LoRA input and keeps what :meth:`backward` needs (a
    reference to x, ``s x_drop A^T`` (n, r) and, with dropout, the dropped x);
    ``backward(grad_out)`` accumulates :attr:`grad_a` / :attr:`grad_b` and returns dL/dx;
    ``parameters()`` gives them to :class:`numlora.train.AdamW`.
    """

    def __init__(self, weight, lora_a, lora_b, alpha, *, bias=None, use_rslora=False,
                 fan_in_fan_out=False, magnitude=None, lora_bias=None, dropout=0.0, dropout_seed=0):
        self._fan_in_fan_out = v.flag("fan_in_fan_out", fan_in_fan_out)
        if weight is None:
            a = v.float_array("lora_a", lora_a, 2)
            b = v.float_array("lora_b", lora_b, 2)
            in_f, out_f = a.shape[1], b.shape[0]
            self._dtype = np.result_type(a.dtype, b.dtype)
            if bias is not None:
                raise ConfigError("bias belongs to the base layer: pass it to attach() with the base weight")
        else:
            weight = _weight_array(weight, self._fan_in_fan_out)
            in_f, out_f = weight.shape if fan_in_fan_out else weight.shape[::-1]
            self._dtype = weight.dtype
        self._weight = weight
        self._magnitude = None
        self._lora_bias = None
        self._norm_cache = None
        base = None if weight is None else _Base("the weight", weight.shape, self._fan_in_fan_out)
        self._init_low_rank(out_f, in_f, lora_a, lora_b, alpha, use_rslora, base)
        self._init_training(dropout, dropout_seed)
        self._set_bias(bias)
        self._record = None
        self._saved_weight = None
        self._saved_bias = None
        if magnitude is not None:
            self.magnitude = magnitude
        if lora_bias is not None:
            self.lora_bias = lora_bias

    @classmethod
    def from_weight(cls, weight, rank, alpha, init="seed", seed=None, *, bias=None,
                    use_rslora=False, fan_in_fan_out=False, copy=True, use_dora=False,
                    lora_bias=False, dropout=0.0, dropout_seed=0) -> "LoraLinear":
        """A layer over ``weight`` (out, in) (``(in, out)`` with ``fan_in_fan_out``) with a
        fresh adapter: A initialised by ``init`` (see :func:`init_lora_a`; ``"seed"``
        reproduces the seed module's ``LoraLinear::new`` bit for bit), B = 0.
        ``use_dora``: a magnitude vector initialised to the row norms of the weight (PEFT's
        init, so the fresh layer computes the base layer's output); ``lora_bias``: a zero
        LoRA bias.

        ``copy=False`` keeps the caller's array (merge() then changes it in place).
        ``dropout`` / ``dropout_seed``: see :attr:`dropout` (training mode only)."""
        fan_in_fan_out = v.flag("fan_in_fan_out", fan_in_fan_out)
        copy, use_dora, lora_bias = v.flag("copy", copy), v.flag("use_dora", use_dora), v.flag("lora_bias", lora_bias)
        weight = _weight_array(weight, fan_in_fan_out)
        in_f, out_f = weight.shape if fan_in_fan_out else weight.shape[::-1]
        rank = _check_rank(rank, out_f, in_f)
        v.real_scalar("alpha", alpha, positive=True)
        if copy:
            weight = np.array(weight, copy=True)
        a = init_lora_a(rank, in_f, out_f, init, seed, default_seed=42)
        b = np.zeros((out_f, rank), weight.dtype)
        layer = cls(weight, a, b, alpha, bias=bias, use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out,
                    dropout=dropout, dropout_seed=dropout_seed)
        if use_dora:
            layer.magnitude = dora_weight_norm(weight, layer.lora_a, layer.lora_b, layer.scaling, fan_in_fan_out)
        if lora_bias:
            layer.lora_bias = np.zeros(out_f, weight.dtype)
        return layer

    # the base weight ------------------------------------------------------------------
    @property
    def weight(self):
        """The base weight (with the delta added while merged); None while detached."""
        return self._weight

    @property
    def attached(self) -> bool:
        """Whether the layer has a base weight."""
        return self._weight is not None

    @property
    def base_shape(self) -> tuple:
        """The shape the base weight must have: ``(out, in)``, ``(in, out)`` with
        ``fan_in_fan_out``."""
        return (self._in_f, self._out_f) if self._fan_in_fan_out else (self._out_f, self._in_f)

    def check_base(self, weight, bias=None):
        """Validate a base weight (and bias) for this layer without attaching it; return
        them as arrays. Raises ShapeError naming the expected shape."""
        if self._device == "cuda":
            return (_dev_view("weight", weight, self.base_shape),
                    None if bias is None else _dev_view("bias", bias, (self._out_f,)))
        weight = v.float_array("weight", weight, 2)
        want = self.base_shape
        if tuple(weight.shape) != want:
            hint = ""
            if tuple(weight.shape) == want[::-1]:
                hint = (f"; that is the transpose: is fan_in_fan_out (now {self._fan_in_fan_out}) set as the base "
                        "layer stores its weight?")
            layout = "(in, out)" if self._fan_in_fan_out else "(out, in)"
            raise ShapeError(f"expected weight of shape {layout} = {want} for this adapter "
                             f"(fan_in_fan_out={self._fan_in_fan_out}), got {tuple(weight.shape)}{hint}")
        if bias is not None:
            bias = v.float_array("bias", bias, 1)
            v.expect_shape("bias", bias, (self._out_f,))
        return weight, bias

    def attach(self, weight, bias=None, *, copy=True) -> "LoraLinear":
        """Give the layer its base weight ``(out, in)`` (``(in, out)`` with
        ``fan_in_fan_out``) and optional bias ``(out,)``, replacing any it had. A and B keep
        their dtype; the bias is kept in the weight's dtype. ``copy=False`` keeps the
        caller's array (merge() then changes it in place). Returns the layer."""
        if self._merged:
            raise MergeStateError("cannot attach a base weight while the layer is merged; unmerge() first")
        copy = v.flag("copy", copy)
        if self._device == "cuda":
            self._weight = _dev_copy("weight", weight, self.base_shape) if copy else _dev_view("weight", weight,
                                                                                             self.base_shape)
            self._bias = None if bias is None else _dev_copy("bias", bias, (self._out_f,))
            self._norm_cache = None
            return self
        weight, bias = self.check_base(weight, bias)
        if copy:
            weight = np.array(weight, copy=True)
        self._weight = weight
        self._set_bias(bias, weight.dtype)
        self._norm_cache = None
        return self

    def detach(self) -> None:
        """Drop the base weight and bias (the adapter stays)."""
        if self._merged:
            raise MergeStateError("cannot detach a merged layer; unmerge() first")
        self._weight = None
        self._bias = None
        self._norm_cache = None

    def _need_weight(self, what):
        if self._weight is None:
            raise DetachedLayerError(
                f"cannot {what}: this LoraLinear (out_features={self._out_f}, in_features={self._in_f}, "
                f"rank={self._rank}) has no base weight attached; call attach(weight) first")

    # optional vectors -------------------------------------------------------------------
    def _set_vector(self, name, value):
        if self._merged:
            raise MergeStateError(f"cannot set {name} while the layer is merged; unmerge() first")
        if self._device == "cuda" and value is not None:
            raise ConfigError(f"{name} (DoRA / LoRA bias) is CPU only: set it on the host layer "
                              "(layer.to('cpu'))")
        if value is not None:
            value = v.float_array(name, value, 1)
            v.expect_shape(name, value, (self._out_f,))
            value = np.array(value, dtype=self._dtype, copy=True)
        self._norm_cache = None
        return value

    @property
    def magnitude(self):
        """DoRA's magnitude vector ``(out,)``, or None for a plain LoRA layer."""
        return self._magnitude

    @magnitude.setter
    def magnitude(self, m):
        if m is not None and self._lora_bias is not None:
            raise ConfigError("a LoRA bias is not supported together with DoRA (PEFT refuses it too)")
        self._magnitude = self._set_vector("magnitude", m)

    @property
    def lora_bias(self):
        """The bias of LoRA B ``(out,)`` (added as ``scaling * lora_bias``), or None."""
        return self._lora_bias

    @lora_bias.setter
    def lora_bias(self, lb):
        if lb is not None and self._magnitude is not None:
            raise ConfigError("a LoRA bias is not supported together with DoRA (PEFT refuses it too)")
        lb = self._set_vector("lora_bias", lb)
        if lb is not None and lb.size:
            with np.errstate(over="ignore", invalid="ignore"):
                top = float(np.max(np.abs(lb))) * self.scaling
            if not top <= v.F32_MAX:
                raise NonFiniteError(f"scaling * lora_bias is not finite in float32 (scaling {self.scaling:g}, "
                                     f"max |lora_bias| {float(np.max(np.abs(lb))):g}): the forward would add inf")
        self._lora_bias = lb

    @property
    def use_dora(self) -> bool:
        return self._magnitude is not None

    def _set(self, name, a, shape):
        super()._set(name, a, shape)
        self._norm_cache = None

    @property
    def fan_in_fan_out(self) -> bool:
        return self._fan_in_fan_out

    @property
    def trainable_params(self) -> int:
        """``rank * (in_features + out_features)``, plus ``out_features`` for each of the
        magnitude vector and the LoRA bias when present (as PEFT counts them)."""
        extra = (self._magnitude is not None) + (self._lora_bias is not None)
        return self._rank * (self._in_f + self._out_f) + extra * self._out_f

    # computing ------------------------------------------------------------------------
    def _weight_norm(self):
        """DoRA's row norms of ``W + scaling * B @ A``, cached while A, B, the scaling and
        the attached weight stay the same (assign through the setters; an in-place edit of
        the base weight array is not noticed: re-:meth:`attach` it)."""
        key = (id(self._weight), self.scaling, _crc(self._lora_a), _crc(self._lora_b))
        if self._norm_cache is None or self._norm_cache[0] != key:
            norm = dora_weight_norm(self._weight, self._lora_a, self._lora_b, self.scaling, self._fan_in_fan_out)
            self._norm_cache = (key, norm)
        return self._norm_cache[1]

    def _lora_path_bias(self):
        """Base bias plus ``scaling * lora_bias`` (the bias the unmerged forward adds)."""
        if self._lora_bias is None:
            return self._bias
        extra = self._lora_bias * self._lora_bias.dtype.type(self.scaling)
        return extra if self._bias is None else self._bias + extra

    def forward(self, x, out=None) -> np.ndarray:
        """``x`` of shape (in,) or (n, in) -> (out,) or (n, out). In training mode (see
        :meth:`train`) dropout applies to the LoRA input and the layer keeps what
        :meth:`backward` needs. ``out`` (optional, C-contiguous) may overlap ``x`` or the
        base weight: the result is then computed into a temporary and copied into it (in
        training mode the layer keeps its own copy of such an ``x`` for backward)."""
        self._need_weight("run forward")
        if self._training:
            return self._forward_train(x, out)
        self._cache = None
        if self._merged or not self._enabled:
            return linear_forward(x, self._weight, self._bias, out=out, fan_in_fan_out=self._fan_in_fan_out)
        if self._magnitude is not None:
            return dora_forward(x, self._weight, self._lora_a, self._lora_b, self.scaling, self._magnitude,
                                self._bias, out=out, fan_in_fan_out=self._fan_in_fan_out,
                                weight_norm=self._weight_norm())
        return lora_forward(x, self._weight, self._lora_a, self._lora_b, self.scaling, self._lora_path_bias(),
                            out=out, fan_in_fan_out=self._fan_in_fan_out)

    __call__ = forward

    def _check_trainable(self):
        if self._magnitude is not None or self._lora_bias is not None:
            raise ConfigError("training a DoRA layer or a layer with a LoRA bias is not supported yet "
                              "(numlora trains lora_a and lora_b of plain LoRA layers)")

    def _train_dtype(self, x):
        return np.result_type(x.dtype, self._weight.dtype, self._lora_a.dtype, self._lora_b.dtype)

    def _base_arrays(self):
        """The caller-visible arrays a forward reads (for the ``out=`` overlap checks)."""
        return {"weight": self._weight}

    def _train_forward_impl(self, x2, xd2, out2, lora, dtype):
        w = self._weight.astype(dtype, copy=False)
        bias = None if self._bias is None else self._bias.astype(dtype, copy=False)
        if not lora:
            from .ops import _base_product

            _base_product(x2, w, self._fan_in_fan_out, out2)
            if bias is not None:
                out2 += bias
            return None
        return train_forward_dense(x2, xd2, w, self._lora_a.astype(dtype, copy=False),
                                   self._lora_b.astype(dtype, copy=False), self.scaling, bias, out2,
                                   self._fan_in_fan_out)

    def _grad_input(self, g2, dx):
        w = self._weight.astype(dx.dtype, copy=False)
        np.dot(g2, w.T if self._fan_in_fan_out else w, out=dx)

    # the GPU ----------------------------------------------------------------------------
    _ARRAYS = _LowRank._ARRAYS + ("_weight", "_saved_weight", "_saved_bias")

    def _check_movable(self):
        if self._magnitude is not None or self._lora_bias is not None:
            raise ConfigError("DoRA layers and layers with a LoRA bias are CPU only (no GPU kernels for them "
                              "yet); keep this layer on the host")
        super()._check_movable()
        if self._weight is not None and self._weight.dtype != np.float32:
            raise DTypeError(f"the GPU path is float32 only: the weight is {self._weight.dtype}; build the layer "
                             "from a float32 weight to move it to the GPU")

    def _gpu_forward(self, x, out, lora, x_lora=None):
        if lora:
            from .cuda import ops as C

            return C.lora_forward(x, self._weight, self._lora_a, self._lora_b, self.scaling, self._bias, out=out,
                                  fan_in_fan_out=self._fan_in_fan_out, x_lora=x_lora)
        return linear_forward(x, self._weight, self._bias, out=out, fan_in_fan_out=self._fan_in_fan_out)

    def _gpu_backward(self, x, g, need_grad_x, x_drop=None, dropout=None):
        from .cuda import ops as C

        return C.lora_backward(x, self._weight, self._lora_a, self._lora_b, self.scaling, g,
                               fan_in_fan_out=self._fan_in_fan_out, dropout=dropout, x_drop=x_drop,
                               grad_a=self._grad_a, grad_b=self._grad_b, need_grad_x=need_grad_x)

    def _gpu_grad_input(self, g):
        # dx = G W: W (out, in) read as the (in', out') = (out, in) fan_in_fan_out layout, and back
        return linear_forward(g, self._weight, None, fan_in_fan_out=not self._fan_in_fan_out)

    def merge(self) -> None:
        """``W += scaling * B @ A`` in place (DoRA: ``W <- (m / n)(W + scaling * B @ A)``;
        with a LoRA bias, ``b += scaling * lora_bias``). Raises if already merged, disabled
        or detached."""
        self._need_weight("merge")
        if self._merged:
            raise MergeStateError("LoRA weights are already merged")
        if not self._enabled:
            raise MergeStateError("cannot merge a disabled layer; enable() first")
        if self._device == "cuda":
            from .device import cuda_module

            saved = cuda_module().device_array(self._weight.shape, np.float32)
            saved.copy_to_device(self._weight)
            merge_lora(self._weight, self._lora_a, self._lora_b, self.scaling, self._fan_in_fan_out)
            self._saved_weight = saved
            self._saved_bias = self._bias
            self._merged = True
            return
        new_bias = self._lora_path_bias() if self._lora_bias is not None else self._bias
        if new_bias is not None:
            new_bias = np.array(new_bias, dtype=self._weight.dtype if self._bias is None else self._bias.dtype)
        if self._magnitude is not None:
            saved = self._weight.copy(order="K")
            merge_dora(self._weight, self._lora_a, self._lora_b, self.scaling, self._magnitude,
                       self._fan_in_fan_out)
            self._saved_weight = saved
        else:
            self._record = merge_lora(self._weight, self._lora_a, self._lora_b, self.scaling,
                                      self._fan_in_fan_out, record=True)
        self._saved_bias = self._bias
        self._bias = new_bias
        self._merged = True

    def unmerge(self) -> None:
        """Restore the base weight (and bias) exactly as they were before :meth:`merge`."""
        if not self._merged:
            raise MergeStateError("LoRA weights are not merged")
        if self._saved_weight is not None:
            if isinstance(self._weight, np.ndarray):
                self._weight[...] = self._saved_weight
            else:
                self._weight.copy_to_device(self._saved_weight)
            self._saved_weight = None
        else:
            unmerge_lora(self._weight, self._lora_a, self._lora_b, self.scaling, self._fan_in_fan_out,
                         record=self._record)
            self._record = None
        self._bias = self._saved_bias
        self._saved_bias = None
        self._merged = False

    @property
    def merge_overhead_bytes(self) -> int:
        """Memory held to make unmerge exact (0 while unmerged): the merge record, or for a
        DoRA layer the copy of the base weight."""
        n = 0 if self._record is None else self._record.nbytes
        n += 0 if self._saved_weight is None else self._saved_weight.nbytes
        return n

    def __repr__(self) -> str:
        extra = "".join([", dora=True" if self._magnitude is not None else "",
                         ", lora_bias=True" if self._lora_bias is not None else "",
                         ", attached=False" if self._weight is None else ""])
        return (f"LoraLinear(out_features={self._out_f}, in_features={self._in_f}, rank={self._rank}, "
                f"alpha={self._alpha}, dtype={self._dtype}, enabled={self._enabled}, merged={self._merged}"
                f"{extra})")


def _crc(a) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


class QLoraLinear(_LowRank):
    """A LoRA adapter over an NF4-quantized frozen weight (QLoRA).

    The base weight lives only as an :class:`~numlora.nf4.NF4Tensor`; forward decodes it
    tile by tile and never holds a float32 copy. There is no in-place merge (it would
    have to re-quantize, silently losing the adapter's precision):
    :meth:`merged_weight` returns the dense ``deq(W) + scaling * B @ A`` instead.

    Training works as for :class:`LoraLinear` (``train()``, ``backward``, ``parameters()``);
    the backward's ``G deq(W)`` term never dequantizes W whole (fused kernel up to 16 rows,
    decoded 8 MiB tiles and BLAS above).
    """

    def __init__(self, nf4: NF4Tensor, lora_a, lora_b, alpha, *, bias=None, use_rslora=False, dropout=0.0,
                 dropout_seed=0):
        out_f, in_f = _weight_2d(nf4)
        self._nf4 = nf4
        self._init_low_rank(out_f, in_f, lora_a, lora_b, alpha, use_rslora, _Base("the NF4 weight", nf4.shape, None))
        self._init_training(dropout, dropout_seed)
        _check_rank(self._rank, out_f, in_f)
        self._set_bias(bias)

    @classmethod
    def from_weight(cls, weight, rank, alpha, blocksize=64, double_quant=False, init="seed",
                    seed=None, *, bias=None, use_rslora=False, dropout=0.0, dropout_seed=0) -> "QLoraLinear":
        """Quantize ``weight`` (out, in) to NF4 and add a fresh adapter (``init="seed"``:
        the seed module's ``QLoraLinear::from_weight`` init, xorshift seeded
        ``137 + in + out``)."""
        weight = _weight_array(weight, False)
        out_f, in_f = weight.shape
        rank = _check_rank(rank, out_f, in_f)
        v.real_scalar("alpha", alpha, positive=True)
        nf4 = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
        a = init_lora_a(rank, in_f, out_f, init, seed, default_seed=137)
        b = np.zeros((out_f, rank), np.float32)
        return cls(nf4, a, b, alpha, bias=bias, use_rslora=use_rslora, dropout=dropout, dropout_seed=dropout_seed)

    @property
    def nf4(self) -> NF4Tensor:
        return self._nf4

    @property
    def blocksize(self) -> int:
        return self._nf4.blocksize

    group_size = blocksize

    def forward(self, x, out=None) -> np.ndarray:
        """``x`` of shape (in,) or (n, in) -> (out,) or (n, out), float32. In training
        mode dropout applies to the LoRA input and the layer keeps what :meth:`backward`
        needs. ``out`` may overlap ``x`` (as in :meth:`LoraLinear.forward`)."""
        if self._training:
            return self._forward_train(x, out)
        self._cache = None
        if self._device == "cuda":
            return self._gpu_forward(x, out, self._enabled)
        if not self._enabled:
            out = nf4_matmul(x, self._nf4, out=out)
            if self._bias is not None:
                out += self._bias
            return out
        return qlora_forward(x, self._nf4, self._lora_a, self._lora_b, self.scaling, self._bias, out=out)

    __call__ = forward

    # the GPU ----------------------------------------------------------------------------
    _ARRAYS = _LowRank._ARRAYS + ("_nf4",)

    def _check_movable(self):
        super()._check_movable()
        if self._nf4.dtype != "float32":
            raise DTypeError(f"the GPU path is float32 only: the NF4 weight decodes to {self._nf4.dtype}")

    def _gpu_forward(self, x, out, lora, x_lora=None):
        from .cuda import ops as C

        if lora:
            s = self.scaling
            return C._nf4_forward(x, C._tensor(self._nf4), self._lora_a, self._lora_b, s, self._bias, out, x_lora)
        return C._nf4_forward(x, C._tensor(self._nf4), None, None, 0.0, self._bias, out)

    def _gpu_backward(self, x, g, need_grad_x, x_drop=None, dropout=None):
        from .cuda import ops as C

        return C.qlora_backward(x, self._nf4, self._lora_a, self._lora_b, self.scaling, g, dropout=dropout,
                                x_drop=x_drop, grad_a=self._grad_a, grad_b=self._grad_b, need_grad_x=need_grad_x)

    def _gpu_grad_input(self, g):
        from .nf4 import nf4_matmul_t

        return nf4_matmul_t(g, self._nf4)

    def _train_forward_impl(self, x2, xd2, out2, lora, dtype):
        if not lora:
            _nf4_forward(x2, self._nf4, None, None, 0.0, self._bias, out2)
            return None
        us = np.empty((x2.shape[0], self._rank), np.float32)
        _nf4_forward(x2, self._nf4, self._lora_a, self._lora_b, self.scaling, self._bias, out2, x_lora=xd2, u_out=us)
        return us

    def _grad_input(self, g2, dx):
        _nf4_grad_input(g2, self._nf4, dx)

    def _base_arrays(self):
        from .nf4 import _tensor_arrays

        return _tensor_arrays(self._nf4)

    def dequantize_weight(self, out=None) -> np.ndarray:
        """The float32 base weight as NF4 stores it."""
        return dequantize_nf4(self._nf4, out=out)

    def merged_weight(self, out=None) -> np.ndarray:
        """Dense float32 ``deq(W) + scaling * B @ A`` (the base stays quantized and
        untouched; nothing is re-quantized)."""
        w = dequantize_nf4(self._nf4, out=out)
        merge_lora(w, self._lora_a, self._lora_b, self.scaling)
        return w

    def memory_saved_bytes(self) -> int:
        """float32 bytes of the weight minus the bytes of its NF4 storage."""
        nbytes = self._nf4.nbytes if self._device == "cpu" else self._nf4.packed.nbytes + self._nf4.scales.nbytes
        return max(0, 4 * self._nf4.numel - nbytes)

    def __repr__(self) -> str:
        return (f"QLoraLinear(out_features={self._out_f}, in_features={self._in_f}, rank={self._rank}, "
                f"alpha={self._alpha}, blocksize={self.blocksize}, double_quant={self._nf4.double_quant}, "
                f"enabled={self._enabled})")
