"""Training without a framework: parameters, the AdamW optimizer, gradient clipping.

The backward passes live in the functional layer (:func:`numlora.ops.lora_backward`,
:func:`numlora.nf4.qlora_backward`) and in the layers (``LoraLinear.backward``,
``QLoraLinear.backward``); this module updates what they computed.
"""

from __future__ import annotations

import math

import numpy as np

from . import _validate as v
from .device import is_device_array
from .errors import ConfigError, DeviceError, DTypeError, ShapeError, TrainStateError

__all__ = ["Parameter", "AdamW", "clip_grad_norm", "TrainStateError"]


class Parameter:
    """A trainable array: ``value`` (updated in place by optimizers), ``grad`` (an array
    of the same shape and dtype, or None before any gradient), ``name``.

    ``Parameter(value, grad=None, name="")`` wraps arrays you own (``value`` must be a
    C-contiguous, writable float32 / float64 ndarray: it is used as is, not copied).
    The parameters a layer returns from ``parameters()`` read ``value`` and ``grad``
    from the layer, so they follow it (a new ``lora_a`` assigned to the layer is what the
    optimizer updates next).
    """

    __slots__ = ("_value", "_grad", "name")

    def __init__(self, value, grad=None, name: str = ""):
        self._value = _param_array(name or "value", value)
        self._grad = None
        self.name = str(name)
        if grad is not None:
            self.grad = grad

    @property
    def value(self) -> np.ndarray:
        return self._value

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, g):
        self._grad = _check_grad(self, g)

    def zero_grad(self) -> None:
        """Fill the gradient with zeros in place (no-op while it is None)."""
        g = self.grad
        if g is not None:
            _zero_fill(g)

    def __repr__(self) -> str:
        value = self.value
        return (f"Parameter(name={self.name!r}, shape={value.shape}, dtype={value.dtype}, "
                f"grad={'None' if self.grad is None else 'set'})")


class _BoundParameter(Parameter):
    """A parameter whose value and gradient are attributes of an owner (a layer)."""

    __slots__ = ("_owner", "_vattr", "_gattr")

    def __init__(self, owner, value_attr, grad_attr, name):
        self._owner, self._vattr, self._gattr = owner, value_attr, grad_attr
        self.name = name

    @property
    def value(self):
        return getattr(self._owner, self._vattr)

    @property
    def grad(self):
        return getattr(self._owner, self._gattr)

    @grad.setter
    def grad(self, g):
        setattr(self._owner, self._gattr, _check_grad(self, g))


def _param_array(name, a):
    if is_device_array(a):
        from .device import as_cuda

        a = as_cuda(a)
        if np.dtype(a.dtype) != np.float32:
            raise DTypeError(f"{name}: a Parameter on the GPU must be float32, got {np.dtype(a.dtype)}")
        if a.size and not a.is_c_contiguous():
            raise ShapeError(f"{name}: a Parameter's value must be C-contiguous (it is updated in place)")
        return a
    if not isinstance(a, np.ndarray):
        raise DTypeError(f"{name}: a Parameter's value must be a numpy array (updated in place), "
                         f"got {type(a).__name__}")
    a = v.float_array(name, a, None)
    if not a.flags.c_contiguous or not a.flags.writeable:
        raise ShapeError(f"{name}: a Parameter's value must be C-contiguous and writable (it is updated in place)")
    return a


def _check_grad(p, g):
    if g is None:
        return None
    value = p.value
    dev_v, dev_g = is_device_array(value), is_device_array(g)
    if dev_v != dev_g:
        where = ("on the GPU like its value" if dev_v else "on the host like its value")
        hint = "numlora.to_device(grad)" if dev_v else "numlora.to_host(grad)"
        raise DeviceError(f"expected the gradient of {p.name or 'the parameter'} {where}, got a "
                          f"{'device' if dev_g else 'host'} {type(g).__name__}; move it with {hint}")
    if dev_v:
        from .device import as_cuda

        g = as_cuda(g)
        if np.dtype(g.dtype) != np.dtype(value.dtype):
            raise DTypeError(f"expected the gradient of {p.name or 'the parameter'} to be a {np.dtype(value.dtype)} "
                             f"device array, got {np.dtype(g.dtype)}")
        v.expect_shape(f"gradient of {p.name or 'the parameter'}", g, tuple(value.shape))
        return g
    if not isinstance(g, np.ndarray) or g.dtype != value.dtype:
        got = g.dtype if isinstance(g, np.ndarray) else type(g).__name__
        raise DTypeError(f"expected the gradient of {p.name or 'the parameter'} to be a {value.dtype} array, "
                         f"got {got}")
    v.expect_shape(f"gradient of {p.name or 'the parameter'}", g, value.shape)
    if v.shares_memory(g, value):
        raise ShapeError(f"the gradient of {p.name or 'the parameter'} shares memory with its value: optimizers "
                         "update the value in place while reading the gradient; give the gradient its own array")
    return g


def _distinct(arrays, what):
    """Refuse arrays that share memory, given as ``(index, label, array)``: the same
    parameter twice, or two views of one array, would be updated twice by ``what``."""
    pair = v.overlapping_pair(arrays)
    if pair is not None:
        (i, li), (j, lj) = pair
        raise ConfigError(f"parameters[{i}] and parameters[{j}] share memory ({li}, {lj}): {what} would "
                          "change the same elements twice; give each parameter once")


def _param_list(parameters):
    if isinstance(parameters, Parameter):
        parameters = [parameters]
    try:
        params = list(parameters)
    except TypeError:
        raise DTypeError(f"parameters must be an iterable of Parameter, got {type(parameters).__name__}") from None
    for i, p in enumerate(params):
        if not isinstance(p, Parameter):
            raise DTypeError(f"parameters[{i}] must be a Parameter (e.g. from layer.parameters()), "
                             f"got {type(p).__name__}")
    return params


class AdamW:
    """AdamW with decoupled weight decay and bias correction, as ``torch.optim.AdamW``
    (``amsgrad=False``, ``maximize=False``): for every parameter with a gradient, at step t

    ``p <- p (1 - lr wd)``; ``m <- b1 m + (1 - b1) g``; ``v <- b2 v + (1 - b2) g^2``;
    ``p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    One serial numba kernel per parameter updates ``value``, ``m`` and ``v`` in place
    (each element in float64, stored in the parameter's dtype). State: ``m`` and ``v``,
    two arrays per parameter in its dtype (twice the adapter's memory). Parameters
    whose ``grad`` is None are skipped, and their step count does not advance (as torch).
    """

    def __init__(self, parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params = _param_list(parameters)
        if not self.params:
            raise ConfigError("AdamW got an empty parameter list")
        _distinct([(i, f"values of {p.name or 'unnamed'}", p.value) for i, p in enumerate(self.params)],
                  "each step")
        self.lr = lr
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise ConfigError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        self.betas = (_unit("betas[0]", b1), _unit("betas[1]", b2))
        self.eps = _nonneg("eps", eps)
        self.weight_decay = _nonneg("weight_decay", weight_decay)
        _decay(self._lr, self.weight_decay)
        self._state = {}

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value):
        """The learning rate; may be changed between steps (schedules)."""
        lr = _nonneg("lr", value)
        if hasattr(self, "weight_decay"):
            _decay(lr, self.weight_decay)
        self._lr = lr

    def state(self, p: Parameter):
        """``(step, m, v)`` of a parameter, or None before its first step."""
        return self._state.get(id(p))

    def step(self) -> None:
        from .kernels import train as k

        b1, b2 = self.betas
        for p in self.params:
            g = p.grad
            if g is None:
                continue
            value = p.value
            g = _check_grad(p, g)
            if is_device_array(value):
                self._step_device(p, value, g)
                continue
            if not value.flags.c_contiguous or not value.flags.writeable:
                raise ShapeError(f"{p.name or 'parameter'}: value must be C-contiguous and writable")
            st = self._state.get(id(p))
            if st is None or not isinstance(st[1], np.ndarray) or st[1].shape != value.shape \
                    or st[1].dtype != value.dtype:
                st = [0, np.zeros_like(value), np.zeros_like(value)]
                self._state[id(p)] = st
            st[0] += 1
            t = st[0]
            bc1 = 1.0 - b1 ** t
            bc2_sqrt = math.sqrt(1.0 - b2 ** t)
            decay = _decay(self._lr, self.weight_decay)
            k.adamw_step(value.reshape(-1), np.ascontiguousarray(g).reshape(-1), st[1].reshape(-1),
                         st[2].reshape(-1), self._lr, b1, b2, self.eps, decay, bc1, bc2_sqrt)

    def _step_device(self, p, value, g):
        """One step for a parameter whose value lives on the GPU: the state (m, v) is
        kept on the GPU too, updated by :func:`numlora.cuda.adamw_update` (no host copy)."""
        from .cuda import ops as C
        from .device import as_cuda, cuda_module

        value = as_cuda(value)
        st = self._state.get(id(p))
        if st is None or isinstance(st[1], np.ndarray) or tuple(st[1].shape) != tuple(value.shape):
            cuda = cuda_module()
            zeros = np.zeros(tuple(value.shape), np.float32)
            st = [0, cuda.to_device(zeros), cuda.to_device(zeros)]
            self._state[id(p)] = st
        st[0] += 1
        b1, b2 = self.betas
        C.adamw_update(value, g, st[1], st[2], lr=self._lr, beta1=b1, beta2=b2, eps=self.eps,
                       weight_decay=self.weight_decay, step=st[0])

    def zero_grad(self) -> None:
        """Fill every parameter's gradient with zeros in place (gradients that are None
        stay None)."""
        for p in self.params:
            p.zero_grad()

    def __repr__(self) -> str:
        return (f"AdamW(lr={self._lr}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay}, "
                f"parameters={len(self.params)})")


def _decay(lr, weight_decay):
    """The decoupled weight decay factor ``1 - lr * weight_decay``, refused when it is not
    finite in float32 (two finite scalars whose product overflows the compute type)."""
    decay = 1.0 - lr * weight_decay
    if not abs(decay) <= v.F32_MAX:
        raise ConfigError(f"lr * weight_decay = {lr:g} * {weight_decay:g} overflows float32: the weight decay factor "
                          f"1 - lr * weight_decay would be {decay:g}; use a smaller lr or weight_decay")
    return decay


def _unit(name, x):
    x = v.real_scalar(name, x)
    if not 0.0 <= x < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {x}")
    return x


def _nonneg(name, x):
    x = v.real_scalar(name, x)
    if x < 0:
        raise ConfigError(f"{name} must be >= 0, got {x}")
    return x


def clip_grad_norm(parameters, max_norm) -> float:
    """Scale all gradients in place so that their joint L2 norm is at most ``max_norm``
    (as ``torch.nn.utils.clip_grad_norm_``: factor ``max_norm / (norm + 1e-6)`` when below
    1). Parameters without a gradient are ignored. Returns the norm before clipping
    (computed in float64)."""
    params = _param_list(parameters)
    max_norm = _nonneg("max_norm", max_norm)
    _distinct([(i, f"gradients of {p.name or 'unnamed'}", p.grad) for i, p in enumerate(params)], "clipping")
    grads = [p.grad for p in params if p.grad is not None]
    if any(is_device_array(g) for g in grads):
        return _clip_device(grads, max_norm)
    total = math.sqrt(sum(float(np.dot(g.reshape(-1).astype(np.float64, copy=False),
                                       g.reshape(-1).astype(np.float64, copy=False))) for g in grads))
    if not math.isfinite(total):
        from .errors import NonFiniteError

        raise NonFiniteError(f"the gradient norm is {total}: a gradient holds NaN or inf")
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= g.dtype.type(coef)
    return total


def _clip_device(grads, max_norm):
    """clip_grad_norm for GPU gradients: the norm is computed on the host (one copy of each
    gradient, small for LoRA), the scaled gradients copied back."""
    host = [g.copy_to_host() if hasattr(g, "copy_to_host") else np.asarray(g) for g in grads]
    total = math.sqrt(sum(float(np.dot(h.reshape(-1).astype(np.float64), h.reshape(-1).astype(np.float64)))
                          for h in host))
    if not math.isfinite(total):
        from .errors import NonFiniteError

        raise NonFiniteError(f"the gradient norm is {total}: a gradient holds NaN or inf")
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g, h in zip(grads, host):
            h *= h.dtype.type(coef)
            g.copy_to_device(h)
    return total


def _zero_fill(g):
    if isinstance(g, np.ndarray):
        g[...] = 0
    elif g.size:
        g.copy_to_device(np.zeros(tuple(g.shape), np.dtype(g.dtype)))
