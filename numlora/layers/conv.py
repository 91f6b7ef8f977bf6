"""``LoraConv``: a LoRA adapter over a 1-D or 2-D convolution, as PEFT's ``lora.Conv1d`` /
``lora.Conv2d``.

CPU only for now: :meth:`LoraConv.to` ``("cuda")`` raises
:class:`~numlora.errors.DeviceError`.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _validate as validate
from ..conv import (
    conv_forward,
    conv_lora_backward,
    conv_lora_forward,
    conv_options,
    conv_weight,
    merge_conv,
    unmerge_conv,
)
from ..errors import ConfigError, ShapeError, TrainStateError
from .base import LoraLayer, Saved
from .host_only import HostOnly

__all__ = ["LoraConv"]


class LoraConv(HostOnly, LoraLayer):
    """A convolution ``weight`` (C_out, C_in, k) (Conv1d) or (C_out, C_in, kh, kw)
    (Conv2d) with a LoRA adapter: ``y = conv(x, W) + b + scaling * conv1x1(conv(x, A), B)``.

    ``lora_a`` is (r, C_in, *kernel) and ``lora_b`` (C_out, r, 1[, 1]), PEFT's ``lora_A`` /
    ``lora_B`` weights (the flat (r, C_in * prod(kernel)) and (C_out, r) are accepted);
    the properties give them in PEFT's shapes, as views of the arrays the layer holds flat.
    :attr:`in_features` is ``C_in * prod(kernel)``, :attr:`out_features` ``C_out``.

    ``stride``, ``padding``, ``dilation``: as torch's ``Conv1d`` / ``Conv2d`` (``groups=1``
    and ``padding_mode="zeros"`` only). ``weight=None`` makes a detached layer: then
    ``lora_a`` must have PEFT's shape (it gives C_in and the kernel).

    Training: ``train()``; forward applies ``dropout`` to the LoRA input (one dropout row
    per image); ``backward(grad_out)`` accumulates :attr:`grad_a` / :attr:`grad_b` and
    returns ``dL/dx``. CPU only for now.
    """

    _ARRAYS = LoraLayer._ARRAYS + ("_weight",)
    _KIND = "a convolution"

    def __init__(self, weight, lora_a, lora_b, alpha, *, bias=None, stride=1, padding=0, dilation=1, groups=1,
                 padding_mode="zeros", use_rslora=False, dropout=0.0, dropout_seed=0):
        if weight is None:
            a = validate.float_array("lora_a", lora_a, (3, 4))
            b = validate.float_array("lora_b", lora_b, None)
            c_out, c_in, kernel = b.shape[0], a.shape[1], tuple(a.shape[2:])
            self._dtype = np.result_type(a.dtype, b.dtype)
            if bias is not None:
                raise ConfigError("bias belongs to the base layer: pass it to attach() with the base weight")
        else:
            weight = conv_weight(weight)
            c_out, c_in, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
            self._dtype = weight.dtype
        self._kernel = kernel
        self._c_in = c_in
        nd = len(kernel)
        self._options = dict(zip(("stride", "dilation"), conv_options(nd, kernel, stride, padding, dilation,
                                                                      groups, padding_mode)[:2]))
        self._options["padding"] = padding
        self._weight = weight
        k = int(np.prod(kernel))
        self._init_low_rank(c_out, c_in * k, self._flat_a(lora_a), self._flat_b(lora_b), alpha, use_rslora,
                            validate.Base("the flattened conv weight", (c_out, c_in * k), None))
        self._init_training(dropout, dropout_seed)
        self._bias = None
        self._record = None
        if weight is not None and bias is not None:
            self._bias = np.array(self._check_bias(bias), dtype=weight.dtype, copy=True)

    @classmethod
    def from_weight(cls, weight, rank, alpha, seed=None, *, bias=None, stride=1, padding=0, dilation=1,
                    use_rslora=False, dropout=0.0, dropout_seed=0, copy=True) -> "LoraConv":
        """A layer over ``weight`` with a fresh adapter, initialised as PEFT initialises a
        convolution's (its default): A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in =
        C_in * prod(kernel) (numpy ``Generator(seed)``), B = 0."""
        weight = conv_weight(weight)
        if validate.flag("copy", copy):
            weight = np.array(weight, copy=True)
        rank = validate.int_scalar("rank", rank, minimum=1)
        fan_in = int(np.prod(weight.shape[1:]))
        seed = None if seed is None else validate.int_scalar("seed", seed, minimum=0)
        bound = 1.0 / math.sqrt(fan_in)
        a = np.random.default_rng(seed).uniform(-bound, bound, (rank,) + weight.shape[1:]).astype(weight.dtype)
        b = np.zeros((weight.shape[0], rank) + (1,) * (weight.ndim - 2), weight.dtype)
        return cls(weight, a, b, alpha, bias=bias, stride=stride, padding=padding, dilation=dilation,
                   use_rslora=use_rslora, dropout=dropout, dropout_seed=dropout_seed)

    # PEFT's shapes over the flat arrays --------------------------------------------------
    def _flat_a(self, a):
        a = validate.float_array("lora_a", a, None)
        if a.ndim == len(self._kernel) + 2:
            if tuple(a.shape[1:]) != (self._c_in,) + self._kernel:
                raise ShapeError(f"expected lora_a of shape (r, {self._c_in}, {', '.join(map(str, self._kernel))}) "
                                 f"(PEFT's lora_A for this convolution), got {a.shape}")
            a = a.reshape(a.shape[0], -1)
        return a

    def _flat_b(self, b):
        b = validate.float_array("lora_b", b, None)
        nd = len(self._kernel)
        if b.ndim == nd + 2:
            if tuple(b.shape[2:]) != (1,) * nd:
                raise ShapeError(f"expected lora_b of shape (C_out, r{', 1' * nd}) (PEFT's 1x1 lora_B), got "
                                 f"{b.shape}")
            b = b.reshape(b.shape[:2])
        return b

    @property
    def lora_a(self) -> np.ndarray:
        """LoRA A in PEFT's shape (r, C_in, *kernel) (a view of the flat array the layer holds)."""
        return self._lora_a.reshape((self._rank, self._c_in) + self._kernel)

    @lora_a.setter
    def lora_a(self, a):
        self._set("lora_a", self._flat_a(a), (self._rank, self._in_f))

    @property
    def lora_b(self) -> np.ndarray:
        """LoRA B in PEFT's shape (C_out, r, 1[, 1])."""
        return self._lora_b.reshape((self._out_f, self._rank) + (1,) * len(self._kernel))

    @lora_b.setter
    def lora_b(self, b):
        self._set("lora_b", self._flat_b(b), (self._out_f, self._rank))

    @property
    def grad_a(self):
        """Accumulated ``dL/dA`` in PEFT's shape (None before the first backward)."""
        return None if self._grad_a is None else self._grad_a.reshape(self.lora_a.shape)

    @property
    def grad_b(self):
        return None if self._grad_b is None else self._grad_b.reshape(self.lora_b.shape)

    # the base ---------------------------------------------------------------------------
    @property
    def base_shape(self) -> tuple:
        """(C_out, C_in, *kernel)."""
        return (self._out_f, self._c_in) + self._kernel

    @property
    def in_channels(self) -> int:
        return self._c_in

    @property
    def out_channels(self) -> int:
        return self._out_f

    @property
    def kernel_size(self) -> tuple:
        return self._kernel

    @property
    def conv_options(self) -> dict:
        """``stride``, ``padding``, ``dilation`` as given (torch's conventions)."""
        return dict(self._options)

    def _check_bias(self, bias):
        bias = validate.float_array("bias", bias, 1)
        validate.expect_shape("bias", bias, (self._out_f,))
        return bias

    def attach(self, weight, bias=None, *, copy=True, stride=None, padding=None, dilation=None) -> "LoraConv":
        """Give the layer its base weight (C_out, C_in, *kernel) and optional bias (C_out,),
        and (when given) the base convolution's ``stride`` / ``padding`` / ``dilation``
        (an adapter file does not hold them). Returns the layer."""
        options = dict(self._options)
        for key, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
            if value is not None:
                options[key] = value
        nd = len(self._kernel)
        stride_t, dilation_t, _ = conv_options(nd, self._kernel, options["stride"], options["padding"],
                                               options["dilation"])
        super().attach(weight, bias, copy=copy)
        self._options = {"stride": stride_t, "dilation": dilation_t, "padding": options["padding"]}
        return self

    _merge_fn = staticmethod(merge_conv)
    _unmerge_fn = staticmethod(unmerge_conv)

    # computing ----------------------------------------------------------------------------
    def forward(self, x, out=None) -> np.ndarray:
        """``x`` (N, C_in, L) / (N, C_in, H, W) (or unbatched) -> the convolution's output.
        In training mode dropout applies to the LoRA input and the layer keeps what
        :meth:`backward` needs."""
        self._need_weight("run forward")
        x = self._backend.input("x", x)
        if self._training:
            if self._merged:
                raise TrainStateError("cannot run a training forward on a merged layer: unmerge() first")
            return self._train_forward(x, out)
        self._cache = None
        if self._merged or not self._enabled:
            return conv_forward(x, self._weight, self._bias, out=out, **self._options)
        return conv_lora_forward(x, self._weight, self._lora_a, self._lora_b, self.scaling, self._bias, out=out,
                                 **self._options)

    __call__ = forward

    def _train_forward(self, x, out):
        x = validate.float_array("x", x, (len(self._kernel) + 1, len(self._kernel) + 2))
        batched = x.ndim == len(self._kernel) + 2
        x_keep = np.array(x, copy=True)  # backward reads x as it was, whatever happens to the caller's array
        rows = x_keep.reshape(x_keep.shape[0] if batched else 1, -1)
        xd, state = self._dropped(rows)
        xd = xd.reshape(x.shape)
        if self._enabled:
            y = conv_lora_forward(x_keep, self._weight, self._lora_a, self._lora_b, self.scaling, self._bias,
                                  out=out, x_lora=None if state is None else xd, **self._options)
        else:
            y = conv_forward(x_keep, self._weight, self._bias, out=out, **self._options)
        self._keep(x_keep, xd if state is not None else x_keep, None, state, False, self._enabled, y.dtype)
        return y

    def backward(self, grad_out, need_grad_x: bool = True):
        """Add ``dL/dA`` and ``dL/dB`` of the last training forward into :attr:`grad_a` /
        :attr:`grad_b`; return ``dL/dx`` (None with ``need_grad_x=False``)."""
        need_grad_x = validate.flag("need_grad_x", need_grad_x)
        saved = self._saved()
        if not saved.lora:
            if not need_grad_x:
                return None
            dx, _, _ = conv_lora_backward(saved.x, self._weight, self._lora_a, self._lora_b, 0.0, grad_out,
                                          **self._options)
            return dx
        self._grads()
        g = validate.float_array("grad_out", grad_out, None)
        dt = self._grad_a.dtype
        if np.result_type(dt, saved.dtype) != dt:
            dx, ga, gb = conv_lora_backward(saved.x, self._weight, self._lora_a, self._lora_b, self.scaling, g,
                                            dropout=saved.dropout, x_drop=saved.x_drop if saved.dropout else None,
                                            need_grad_x=need_grad_x, **self._options)
            self._grad_a += ga
            self._grad_b += gb
            return dx
        dx, _, _ = conv_lora_backward(saved.x, self._weight, self._lora_a, self._lora_b, self.scaling,
                                      g.astype(dt, copy=False), dropout=saved.dropout,
                                      x_drop=saved.x_drop if saved.dropout else None, grad_a=self._grad_a,
                                      grad_b=self._grad_b, need_grad_x=need_grad_x, **self._options)
        return dx

    @property
    def saved_bytes(self) -> int:
        c = self._cache
        if not isinstance(c, Saved):
            return 0
        return int(c.x.nbytes) + (0 if c.x_drop is c.x else int(c.x_drop.nbytes))

    def __repr__(self) -> str:
        extra = "" if self._weight is not None else ", attached=False"
        kind = "Conv1d" if len(self._kernel) == 1 else "Conv2d"
        return (f"LoraConv({kind}: in_channels={self._c_in}, out_channels={self._out_f}, "
                f"kernel_size={self._kernel}, rank={self._rank}, alpha={self._alpha}, enabled={self._enabled}, "
                f"merged={self._merged}{extra})")
