"""Training without a framework: parameters, the AdamW optimizer, gradient clipping.

The backward passes live in the functional layer (:func:`numlora.ops.lora_backward`,
:func:`numlora.nf4.qlora_backward`) and in the layers (``LoraLinear.backward``,
``QLoraLinear.backward``); this module updates what they computed. Parameters and
gradients live on the host or on the GPU; the device-specific checks and updates are the
backends' (``register("cpu", ...)`` here, their GPU twins in :mod:`numlora.cuda.ops`),
chosen by :mod:`numlora._dispatch` from where the arrays live.
"""

from __future__ import annotations

import math

import numpy as np

from . import _backward as bw
from . import _dispatch
from . import _validate as validate
from ._dispatch import dispatch, register
from .errors import ConfigError, DeviceError, DTypeError, NonFiniteError, ShapeError, TrainStateError

__all__ = ["AdamW", "Parameter", "TrainStateError", "adamw_update", "clip_grad_norm"]


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
            _backend_of(g).fill_zero(g)

    def __repr__(self) -> str:
        value = self.value
        return (f"Parameter(name={self.name!r}, shape={value.shape}, dtype={value.dtype}, "
                f"grad={'None' if self.grad is None else 'set'})")


class BoundParameter(Parameter):
    """A parameter whose value and gradient are attributes of an owner: what a layer's
    ``parameters()`` returns (it reads the layer's current arrays)."""

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


def _backend_of(a):
    return _dispatch.backend(_dispatch.where(a))


def _param_array(name, a):
    return _backend_of(a).param_array(name, a)


@register("cpu", "param_array")
def _param_array_host(name, a):
    """A parameter's value on the host: a C-contiguous, writable float ndarray."""
    if not isinstance(a, np.ndarray):
        raise DTypeError(f"{name}: a Parameter's value must be a numpy array (updated in place), "
                         f"got {type(a).__name__}")
    a = validate.float_array(name, a, None)
    if not a.flags.c_contiguous or not a.flags.writeable:
        raise ShapeError(f"{name}: a Parameter's value must be C-contiguous and writable (it is updated in place)")
    return a


def _check_grad(p, g):
    if g is None:
        return None
    value = p.value
    where_v, where_g = _dispatch.where(value), _dispatch.where(g)
    if where_v != where_g:
        on_gpu = where_v == "cuda"
        where = "on the GPU like its value" if on_gpu else "on the host like its value"
        hint = "numlora.to_device(grad)" if on_gpu else "numlora.to_host(grad)"
        raise DeviceError(f"expected the gradient of {p.name or 'the parameter'} {where}, got a "
                          f"{'host' if on_gpu else 'device'} {type(g).__name__}; move it with {hint}")
    return _dispatch.backend(where_v).grad_array(p.name or "the parameter", g, value)


@register("cpu", "grad_array")
def _grad_array_host(label, g, value):
    """The gradient ``g`` of the host parameter ``value`` (named ``label``), checked."""
    if not isinstance(g, np.ndarray) or g.dtype != value.dtype:
        got = g.dtype if isinstance(g, np.ndarray) else type(g).__name__
        raise DTypeError(f"expected the gradient of {label} to be a {value.dtype} array, got {got}")
    validate.expect_shape(f"gradient of {label}", g, value.shape)
    if validate.shares_memory(g, value):
        raise ShapeError(f"the gradient of {label} shares memory with its value: optimizers "
                         "update the value in place while reading the gradient; give the gradient its own array")
    return g


def _distinct(arrays, what):
    """Refuse arrays that share memory, given as ``(index, label, array)``: the same
    parameter twice, or two views of one array, would be updated twice by ``what``."""
    pair = validate.overlapping_pair(arrays)
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
        self.betas = (validate.unit_scalar("betas[0]", b1), validate.unit_scalar("betas[1]", b2))
        self.eps = validate.nonneg_scalar("eps", eps)
        self.weight_decay = validate.nonneg_scalar("weight_decay", weight_decay)
        bw.decay_factor(self._lr, self.weight_decay)
        self._state = {}

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value):
        """The learning rate; may be changed between steps (schedules)."""
        lr = validate.nonneg_scalar("lr", value)
        if hasattr(self, "weight_decay"):
            bw.decay_factor(lr, self.weight_decay)
        self._lr = lr

    def state(self, p: Parameter):
        """``(step, m, v)`` of a parameter, or None before its first step."""
        return self._state.get(id(p))

    def step(self) -> None:
        b1, b2 = self.betas
        for p in self.params:
            g = p.grad
            if g is None:
                continue
            value = p.value
            g = _check_grad(p, g)
            st = self._state.get(id(p))
            if st is None or not _same_kind(st[1], value):
                backend = _backend_of(value)
                st = [0, backend.zeros_like(value), backend.zeros_like(value)]
                self._state[id(p)] = st
            st[0] += 1
            adamw_update(value, g, st[1], st[2], lr=self._lr, beta1=b1, beta2=b2, eps=self.eps,
                         weight_decay=self.weight_decay, step=st[0])

    def zero_grad(self) -> None:
        """Fill every parameter's gradient with zeros in place (gradients that are None
        stay None)."""
        for p in self.params:
            p.zero_grad()

    def __getstate__(self):
        # the moments are keyed by id(parameter), which pickling does not keep: by position
        state = dict(self.__dict__)
        state["_state"] = [self._state.get(id(p)) for p in self.params]
        return state

    def __setstate__(self, state):
        state = dict(state)
        moments = state.pop("_state")
        self.__dict__.update(state)
        self._state = {id(p): st for p, st in zip(self.params, moments) if st is not None}

    def __repr__(self) -> str:
        return (f"AdamW(lr={self._lr}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay}, "
                f"parameters={len(self.params)})")


def _same_kind(a, b) -> bool:
    """Whether optimizer state ``a`` fits value ``b``: same device, shape and dtype."""
    return (_dispatch.where(a) == _dispatch.where(b) and tuple(a.shape) == tuple(b.shape)
            and np.dtype(a.dtype) == np.dtype(b.dtype))


@dispatch
def adamw_update(value, grad, m, v, *, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1):
    """One AdamW step on one parameter, in place, as :meth:`AdamW.step` does at step
    ``step`` (1-based): ``value`` (C-contiguous, writable), its gradient ``grad`` and the
    moments ``m`` and ``v`` (C-contiguous, writable), all of one shape and float dtype.
    On GPU arrays the step runs on the GPU."""
    value, m, v = (_param_array_host(nm, a) for nm, a in (("value", value), ("m", m), ("v", v)))
    grad = validate.float_array("grad", grad, None, allow_empty=True)
    for nm, a in (("grad", grad), ("m", m), ("v", v)):
        validate.expect_shape(nm, a, value.shape)
        if a.dtype != value.dtype:
            raise DTypeError(f"expected {nm} with dtype {value.dtype} (the value's), got {a.dtype}")
    scalars = bw.adamw_scalars(lr, beta1, beta2, eps, weight_decay, step)
    from .kernels import train as k

    k.adamw_step(value.reshape(-1), np.ascontiguousarray(grad).reshape(-1), m.reshape(-1), v.reshape(-1),
                 *scalars)


def clip_grad_norm(parameters, max_norm) -> float:
    """Scale all gradients in place so that their joint L2 norm is at most ``max_norm``
    (as ``torch.nn.utils.clip_grad_norm_``: factor ``max_norm / (norm + 1e-6)`` when below
    1). Parameters without a gradient are ignored. Returns the norm before clipping
    (computed in float64)."""
    params = _param_list(parameters)
    max_norm = validate.nonneg_scalar("max_norm", max_norm)
    _distinct([(i, f"gradients of {p.name or 'unnamed'}", p.grad) for i, p in enumerate(params)], "clipping")
    grads = [p.grad for p in params if p.grad is not None]
    total = math.sqrt(sum(_backend_of(g).sum_squares(g) for g in grads))
    if not math.isfinite(total):
        raise NonFiniteError(f"the gradient norm is {total}: a gradient holds NaN or inf")
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            _backend_of(g).scale_(g, coef)
    return total


@register("cpu", "sum_squares")
def _sum_squares_host(g) -> float:
    """sum(g**2) in float64."""
    g64 = g.reshape(-1).astype(np.float64, copy=False)
    return float(np.dot(g64, g64))


@register("cpu", "scale_")
def _scale_host(g, coef) -> None:
    g *= g.dtype.type(coef)


@register("cpu", "fill_zero")
def _fill_zero_host(g) -> None:
    g[...] = 0


register("cpu", "zeros_like")(np.zeros_like)
