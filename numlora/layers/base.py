"""What every LoRA layer shares (:class:`LoraLayer`), the rank check and the
initialisation of A (:func:`init_lora_a`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import _validate as validate
from .._dispatch import check_device
from ..config import lora_scaling
from ..dropout import DropoutState, check_p, check_seed, mix_seed
from ..errors import ConfigError, DeviceError, MergeStateError, ShapeError, TrainStateError
from ..rng import XorShift64
from ..train import BoundParameter
from ._host import HOST
from .variants import LORA

__all__ = ["INITS", "LoraLayer", "check_rank", "init_lora_a"]

INITS = ("seed", "kaiming", "gaussian")


def check_rank(rank, out_f, in_f) -> int:
    """A LoRA rank for a base of (out_f, in_f): an integer in 1..min(out_f, in_f)."""
    rank = validate.int_scalar("rank", rank)
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
    rank = validate.int_scalar("rank", rank, minimum=1)
    in_features = validate.int_scalar("in_features", in_features, minimum=1)
    out_features = validate.int_scalar("out_features", out_features, minimum=1)
    validate.shape_arg("(rank, in_features)", (rank, in_features), 4)
    if seed is not None:
        seed = check_seed(seed) if init == "seed" else validate.int_scalar("seed", seed, minimum=0)
    if init == "seed":
        rng = XorShift64(default_seed + in_features + out_features if seed is None else seed)
        scale = np.sqrt(np.float32(2.0) / np.float32(in_features))
        return rng.uniform((rank, in_features)) * scale
    if init == "kaiming":
        bound = 1.0 / math.sqrt(in_features)
        return np.random.default_rng(seed).uniform(-bound, bound, (rank, in_features)).astype(np.float32)
    return np.random.default_rng(seed).normal(0.0, 1.0 / rank, (rank, in_features)).astype(np.float32)


class Saved(NamedTuple):
    """What a training forward keeps for its backward: the input ``x`` (by reference where
    it can), the dropped input ``x_drop`` (``x`` itself without dropout), ``us`` (``s x_drop
    A^T``, the product the CPU forward computed and the backward reuses, or None), the
    :class:`~numlora.dropout.DropoutState` (None without dropout), whether x was 1-D, whether
    the LoRA path ran, the compute dtype, and (on the CPU, with dropout) the
    :class:`~numlora.dropout.DropoutMask` the forward drew with, which its backward reuses."""

    x: object
    x_drop: object
    us: object
    dropout: object
    one_d: bool
    lora: bool
    dtype: np.dtype
    mask: object = None


def backend_on(device: str):
    """The layers' backend on ``device`` (``"cpu"`` or ``"cuda"``); the CUDA one is
    imported and made on first use."""
    if check_device(device) == "cpu":
        return HOST
    from ._gpu import cuda_backend

    return cuda_backend()


class LoraLayer:
    """The state every LoRA layer has: A, B, alpha, scaling, the enabled and merged flags,
    the training state, and the backend of the device its arrays live on.

    A layer type calls :meth:`_init_low_rank` and :meth:`_init_training` and defines
    ``forward`` and these hooks, which the backends call:

    - ``_forward_on(x, out, lora, x_lora=None, u_out=None)``: its public forward through
      ``self._backend.fn``, the LoRA branch (when ``lora``) on ``x_lora`` (x when None),
      ``x_lora A^T`` into ``u_out`` when given;
    - ``_lora_backward(x, g, need_grad_x, dropout, x_drop, u, grad_a, grad_b)``: the public
      backward of its base with the layer's arrays, accumulating into ``grad_a`` /
      ``grad_b`` (fresh when None), returning ``(dx, grad_a, grad_b)``;
    - ``_grad_input(g)``: ``G W`` alone (a disabled layer's backward);
    - ``_train_dtype(x)``: the compute dtype of a training forward on the CPU;
    - ``_check_float32_base()``: refuse a base the GPU path cannot run.

    The CPU backend's training step calls two more, whose defaults here go through the
    hooks above; a layer type whose functional API has an internal pipeline (the
    products after the checks) may run it directly on the arrays it owns and checked:

    - ``_host_forward(x2, x_lora2, out2, lora, keep=True)``: the forward over 2-D arrays
      in the compute dtype (``out2`` None: a new array), as ``_forward_on``; returns
      ``(y2, us)``, ``us = s x_lora2 A^T`` (the backward's, as the forward's ``u_out`` times
      the scaling) or None (also where ``keep`` is False: an eval forward, which
      :meth:`forward` runs through it for plain float32 inputs);
    - ``_host_grad_input(g2, dx)``: ``G W`` written into ``dx`` (the backward's base term).
    """

    _dtype = np.dtype(np.float32)
    #: The strategy of the LoRA path (see :mod:`~numlora.layers.variants`).
    _variant = LORA
    #: The arrays :meth:`to` moves.
    _ARRAYS = ("_lora_a", "_lora_b", "_bias", "_grad_a", "_grad_b")

    def _init_low_rank(self, out_f, in_f, lora_a, lora_b, alpha, use_rslora, base=None):
        self._backend = HOST
        self._out_f, self._in_f = out_f, in_f
        # A and B checked together first, so that a shape error can say what is likely
        # wrong (A and B swapped, a transposed weight, an adapter for another base)
        a, _, _ = validate.low_rank_arrays(lora_a, lora_b, out_f, in_f, base)
        self._rank = a.shape[0]
        self._alpha = validate.real_scalar("alpha", alpha, positive=True)
        self._use_rslora = validate.flag("use_rslora", use_rslora)
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

    def _set(self, name, a, shape):
        if self._merged:
            raise MergeStateError(f"cannot set {name} while the layer is merged; unmerge() first")
        setattr(self, "_" + name, self._backend.own(name, a, shape, self._dtype, self._factor_error(name, shape)))

    def _factor_error(self, name, shape):
        """The message of a wrong shape of A or B, with what it likely means."""
        other, other_shape = (("lora_b", (self._out_f, self._rank)) if name == "lora_a" else
                              ("lora_a", (self._rank, self._in_f)))

        def message(got):
            hint = ""
            if got == other_shape:
                hint = f": that is the shape of {other}; did you mean layer.{other} = ...?"
            elif got == tuple(shape)[::-1]:
                hint = f": that is the transpose; pass {name}.T"
            return f"expected {name} of shape {tuple(shape)}, got {got}{hint}"

        return message

    def _set_bias(self, bias, dtype=None):
        """Keep a validated copy of the bias (out_features,) in ``dtype`` (default: the
        layer's), or None."""
        self._bias = self._backend.vector("bias", bias, self._out_f, self._dtype if dtype is None else dtype)

    @property
    def bias(self):
        return self._bias

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
        """``rank * (in_features + out_features)``, plus ``out_features`` for each of the
        magnitude vector and the LoRA bias when present (as PEFT counts them)."""
        return self._rank * (self._in_f + self._out_f) + self._variant.vectors * self._out_f

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
        self._dropout = check_p(dropout)
        self._dropout_seed = check_seed(dropout_seed)
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
        self._dropout = check_p(p)

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
        return [BoundParameter(self, "_lora_a", "_grad_a", "lora_a"),
                BoundParameter(self, "_lora_b", "_grad_b", "lora_b")]

    def zero_grad(self) -> None:
        """Fill grad_a and grad_b with zeros in place (they stay None before the first
        backward)."""
        for g in (self._grad_a, self._grad_b):
            if g is not None:
                self._backend.zero(g)

    def _train_dtype(self, x):
        return np.dtype(np.float32)

    def _check_float32_base(self):
        pass

    def _plain_input(self, x) -> bool:
        """Whether an eval forward of ``x`` may skip the functional API's checks: a
        C-contiguous float32 numpy array of shape (in,) or (n, in), and a float32 layer."""
        return (type(x) is np.ndarray and x.dtype == np.float32 and x.ndim in (1, 2)
                and x.shape[-1] == self._in_f and x.flags.c_contiguous and self._train_dtype(x) == np.float32)

    def _host_forward(self, x2, x_lora2, out2, lora, keep=True):
        if not lora:
            return self._forward_on(x2, out2, False), None
        u2 = np.empty((x2.shape[0], self._rank), x2.dtype)
        y2 = self._forward_on(x2, out2, True, x_lora2, u2)
        return y2, u2 * x2.dtype.type(self.scaling)

    def _host_grad_input(self, g2, dx):
        dx[...] = self._grad_input(g2)

    def _check_trainable(self):
        if not self._variant.trainable:
            raise ConfigError("training a DoRA layer or a layer with a LoRA bias is not supported yet "
                              "(numlora trains lora_a and lora_b of plain LoRA layers)")

    def _need_weight(self, what):
        """Refuse ``what`` while the layer has no base weight (a layer type that can be
        detached says so)."""

    def forward(self, x, out=None) -> np.ndarray:
        """``x`` of shape (in,) or (n, in) -> (out,) or (n, out) (float32 over an NF4
        base). In training mode (see :meth:`train`) dropout applies to the LoRA input and
        the layer keeps what :meth:`backward` needs. ``out`` (optional, C-contiguous) may
        overlap ``x`` or the base weight: the result is then computed into a temporary
        and copied into it (in training mode the layer keeps its own copy of such an
        ``x`` for backward)."""
        self._need_weight("run forward")
        if self._training:
            return self._forward_train(x, out)
        self._cache = None
        if out is None and self._backend is HOST and self._plain_input(x):
            lora = self._enabled and not self._merged
            if not lora or self._variant is LORA:
                # the checks of the functional API are those the layer's arrays passed when
                # they were set and _plain_input's: straight to its products (the same bits)
                x2 = x.reshape(-1, self._in_f)
                y2, _ = self._host_forward(x2, x2, None, lora, keep=False)
                return y2.reshape(self._out_f) if x.ndim == 1 else y2
        x = self._backend.input("x", x)
        if self._merged or not self._enabled:
            return self._forward_on(x, out, False)
        return self._variant.forward(self, x, out)

    __call__ = forward

    def _keep(self, *saved):
        """Keep what this training forward's backward needs (the fields of :class:`Saved`)."""
        self._cache = Saved(*saved)

    def _forward_train(self, x, out):
        """The training-mode forward: as the eval forward, with dropout on the LoRA
        input; keeps what :meth:`backward` needs (:class:`Saved`)."""
        if self._merged:
            raise TrainStateError("cannot run a training forward on a merged layer: unmerge() first")
        self._check_trainable()
        return self._backend.train_forward(self, x, out)

    def _next_dropout(self):
        """The :class:`~numlora.dropout.DropoutState` of this training forward's draw, with
        the seed ``mix_seed(dropout_seed, k)`` for the k-th draw; None without dropout or
        with the LoRA path off."""
        if not self._enabled or self._dropout == 0:
            return None
        seed = mix_seed(self._dropout_seed, self._calls)
        self._calls += 1
        return DropoutState(self._dropout, seed)

    def _dropped(self, x):
        """``(x_drop, DropoutState)`` for this training forward's LoRA input, drawn by
        :func:`~numlora.dropout.lora_dropout` (see :meth:`_next_dropout`), into a buffer
        reused from one forward to the next; ``(x, None)`` without dropout or with the LoRA
        path off."""
        state = self._next_dropout()
        if state is None:
            return x, None
        buf = self._xd_buf
        if buf is not None and (tuple(buf.shape) != tuple(x.shape) or np.dtype(buf.dtype) != np.dtype(x.dtype)):
            buf = None
        xd, state = self._backend.fn.lora_dropout(x, state.p, state.seed, out=buf)
        self._xd_buf = xd
        return xd, state

    def backward(self, grad_out, need_grad_x: bool = True):
        """Backpropagate ``grad_out = dL/dy`` (the shape of the last training forward's
        output) through the layer: **adds** ``dL/dA`` and ``dL/dB`` into :attr:`grad_a`
        and :attr:`grad_b` (allocated as zeros on first use) and returns ``dL/dx`` (the
        shape of that forward's input), or None with ``need_grad_x=False`` (skips the
        ``G W`` product, most of the cost: for a first layer). A disabled layer computes
        only ``dL/dx``. Frees what the forward kept, so each training forward allows one
        backward."""
        need_grad_x = validate.flag("need_grad_x", need_grad_x)
        if self._cache is None:
            raise TrainStateError("backward needs a forward in training mode first: call layer.train(), then "
                                  "forward, then backward (once per forward)")
        dx = self._backend.backward(self, self._cache, grad_out, need_grad_x)
        self._cache = None
        return dx

    def _check_grad_out(self, saved, g):
        """Refuse a ``grad_out`` that is not the shape of the saved forward's output."""
        want = (self._out_f,) if saved.one_d else (saved.x.shape[0], self._out_f)
        if tuple(g.shape) != want:
            raise ShapeError(f"expected grad_out of shape {want} (the shape of the forward's output), got "
                             f"{tuple(g.shape)}")

    @property
    def saved_bytes(self) -> int:
        """Bytes held between a training forward and its backward beyond the input x
        (referenced, not copied, when it is C-contiguous in the compute dtype): on the
        CPU the (n, r) product ``x_drop A^T``, and, with dropout, the dropped input."""
        c = self._cache
        if c is None:
            return 0
        return (0 if c.us is None else validate.nbytes(c.us)) + (0 if c.x_drop is c.x else validate.nbytes(c.x_drop))

    # devices ------------------------------------------------------------------------------
    def __getstate__(self):
        """Pickling: a host layer's arrays as they are (protocol 5 sends them out of band);
        what a training forward kept for backward and the derived caches are not pickled
        (rebuilt on use, as after :meth:`to`). A GPU layer refuses: pickle ``layer.to("cpu")``."""
        if self._backend.name != "cpu":
            raise DeviceError(f"a {type(self).__name__} on the GPU cannot be pickled (device memory is not "
                              f"picklable): expected a layer with device='cpu', got device={self._backend.name!r}; "
                              f"pickle layer.to('cpu') instead")
        state = dict(self.__dict__)
        for name in ("_cache", "_xd_buf", "_norm_cache"):
            if name in state:
                state[name] = None
        return state

    def __setstate__(self, state):
        # a layer pickled before numlora.layers became a package kept a device name
        if "_backend" not in state:
            state["_backend"] = backend_on(state.pop("_device", "cpu"))
        self.__dict__.update(state)

    @property
    def device(self) -> str:
        """Where the layer's arrays live: ``"cpu"`` (numpy) or ``"cuda"`` (numba device
        arrays, see :meth:`to`)."""
        return self._backend.name

    def _check_move(self, device: str) -> None:
        """Raise what :meth:`to` would raise before copying anything."""
        backend_on(device).check_move(self)

    def to(self, device: str):
        """A copy of the layer with its arrays on ``device`` (``"cuda"`` or ``"cpu"``);
        ``self`` when it is there already. The layer it is called on is left as it was
        (a new layer is returned, its arrays copied: the GPU layer does not share memory
        with the host one). Flags, sizes, dropout settings and accumulated gradients
        travel; what a training forward kept for backward does not (run the forward
        again). See docs/gpu.md ("The layer classes on the GPU")."""
        backend = backend_on(device)
        if backend is self._backend:
            return self
        backend.check_move(self)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        for name in self._ARRAYS:
            a = getattr(self, name, None)
            if a is not None:
                setattr(new, name, backend.move(a))
        new._backend = backend
        new._cache = None
        new._xd_buf = None
        return new

    def __sizeof__(self) -> int:
        """The host bytes of the layer's arrays (weight or NF4 weight, adapter, bias,
        gradients) on top of the object itself, so that ``sys.getsizeof`` and Dask's
        ``sizeof`` (which place tasks by data size) see what it holds."""
        n = object.__sizeof__(self)
        for name in self._ARRAYS:
            a = getattr(self, name, None)
            if isinstance(a, np.ndarray):
                n += a.nbytes
            elif a is not None and not hasattr(a, "__cuda_array_interface__") and hasattr(a, "nbytes"):
                n += int(a.nbytes)  # an NF4Tensor
        return n
