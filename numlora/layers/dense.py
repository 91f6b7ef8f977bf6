"""``LoraLinear``: a LoRA adapter over a dense (float32 / float64) linear layer."""

from __future__ import annotations

import numpy as np

from .. import _backward as bw
from .. import _validate as validate
from ..dora import dora_weight_norm
from ..errors import ConfigError, DetachedLayerError, DTypeError, MergeStateError, NonFiniteError
from .base import LoraLayer, check_rank, init_lora_a
from .variants import LORA, variant_for

__all__ = ["LoraLinear"]


class LoraLinear(LoraLayer):
    """A linear layer ``y = x W^T + b`` with a LoRA adapter ``scaling * (x A^T) B^T``.

    Build it with :meth:`from_weight`, or from adapter tensors alone with
    ``LoraLinear(None, lora_a, lora_b, alpha, ...)``: a *detached* layer (in and out
    features from A and B) whose forward and merge raise
    :class:`~numlora.errors.DetachedLayerError` until :meth:`attach` gives it a base weight.

    Optional parts, as PEFT has them: ``lora_bias`` ``(out,)`` (the bias of LoRA B, added as
    ``scaling * lora_bias``) and ``magnitude`` ``(out,)`` (DoRA: see :mod:`numlora.dora`);
    they choose the layer's variant (see :mod:`numlora.layers.variants`).

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
    reference to x, ``x_drop A^T`` (n, r) and, with dropout, the dropped x);
    ``backward(grad_out)`` accumulates :attr:`grad_a` / :attr:`grad_b` and returns dL/dx;
    ``parameters()`` gives them to :class:`numlora.train.AdamW`.
    """

    _ARRAYS = LoraLayer._ARRAYS + ("_weight", "_saved_weight", "_saved_bias")

    def __init__(self, weight, lora_a, lora_b, alpha, *, bias=None, use_rslora=False,
                 fan_in_fan_out=False, magnitude=None, lora_bias=None, dropout=0.0, dropout_seed=0):
        self._fan_in_fan_out = validate.flag("fan_in_fan_out", fan_in_fan_out)
        if weight is None:
            a = validate.float_array("lora_a", lora_a, 2)
            b = validate.float_array("lora_b", lora_b, 2)
            in_f, out_f = a.shape[1], b.shape[0]
            self._dtype = np.result_type(a.dtype, b.dtype)
            if bias is not None:
                raise ConfigError("bias belongs to the base layer: pass it to attach() with the base weight")
        else:
            weight = validate.weight_array(weight, self._fan_in_fan_out)
            in_f, out_f = weight.shape if fan_in_fan_out else weight.shape[::-1]
            self._dtype = weight.dtype
        self._weight = weight
        self._magnitude = None
        self._lora_bias = None
        self._norm_cache = None
        base = None if weight is None else validate.Base("the weight", weight.shape, self._fan_in_fan_out)
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
        reproduces the seed module's ``LoraLinear::new`` bit for bit), B = 0; or, with
        ``init="pissa"``, ``"pissa_niter_N"`` or ``"olora"``, PEFT's initialisations
        (:func:`numlora.init.init_lora`): A and B from the weight's principal part, and the
        layer's base weight the residual (a new array; save it, as PEFT users save
        the modified base model).
        ``use_dora``: a magnitude vector initialised to the row norms of the weight (PEFT's
        init, so the fresh layer computes the base layer's output); ``lora_bias``: a zero
        LoRA bias.

        ``copy=False`` keeps the caller's array (merge() then changes it in place).
        ``dropout`` / ``dropout_seed``: see :attr:`dropout` (training mode only)."""
        fan_in_fan_out = validate.flag("fan_in_fan_out", fan_in_fan_out)
        copy, use_dora = validate.flag("copy", copy), validate.flag("use_dora", use_dora)
        lora_bias = validate.flag("lora_bias", lora_bias)
        weight = validate.weight_array(weight, fan_in_fan_out)
        in_f, out_f = weight.shape if fan_in_fan_out else weight.shape[::-1]
        rank = check_rank(rank, out_f, in_f)
        validate.real_scalar("alpha", alpha, positive=True)
        if isinstance(init, str) and (init == "olora" or init.startswith("pissa")):
            from ..init import init_lora

            a, b, weight = init_lora(weight, rank, alpha, init, use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out,
                                     seed=seed)
        else:
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
        weight = self._backend.check_array("weight", weight, self.base_shape, self._weight_error)
        return weight, None if bias is None else self._backend.check_array("bias", bias, (self._out_f,))

    def _weight_error(self, got) -> str:
        want, fio = self.base_shape, self._fan_in_fan_out
        hint = ""
        if got == want[::-1]:
            hint = f"; that is the transpose: is fan_in_fan_out (now {fio}) set as the base layer stores its weight?"
        layout = "(in, out)" if fio else "(out, in)"
        return (f"expected weight of shape {layout} = {want} for this adapter (fan_in_fan_out={fio}), got "
                f"{got}{hint}")

    def attach(self, weight, bias=None, *, copy=True) -> "LoraLinear":
        """Give the layer its base weight ``(out, in)`` (``(in, out)`` with
        ``fan_in_fan_out``) and optional bias ``(out,)``, replacing any it had. A and B keep
        their dtype; the bias is kept in the weight's dtype. ``copy=False`` keeps the
        caller's array (merge() then changes it in place). Returns the layer."""
        if self._merged:
            raise MergeStateError("cannot attach a base weight while the layer is merged; unmerge() first")
        copy = validate.flag("copy", copy)
        weight = self._backend.attach_array("weight", weight, self.base_shape, copy, self._weight_error)
        self._weight, self._bias = weight, self._backend.vector("bias", bias, self._out_f, weight.dtype)
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

    # the variant: DoRA's magnitude, the LoRA bias ---------------------------------------
    def _check_vector(self, name, value):
        """``value`` validated as the optional vector ``name`` (``"magnitude"`` or
        ``"lora_bias"``; at most one of them is set)."""
        other = self._lora_bias if name == "magnitude" else self._magnitude
        if value is not None and other is not None:
            raise ConfigError("a LoRA bias is not supported together with DoRA (PEFT refuses it too)")
        if self._merged:
            raise MergeStateError(f"cannot set {name} while the layer is merged; unmerge() first")
        self._backend.check_variant(name, variant_for(value, None) if name == "magnitude" else
                                    variant_for(None, value))
        return self._backend.vector(name, value, self._out_f, self._dtype)

    def _choose_variant(self):
        self._variant = variant_for(self._magnitude, self._lora_bias)
        self._norm_cache = None

    @property
    def magnitude(self):
        """DoRA's magnitude vector ``(out,)``, or None for a plain LoRA layer."""
        return self._magnitude

    @magnitude.setter
    def magnitude(self, m):
        self._magnitude = self._check_vector("magnitude", m)
        self._choose_variant()

    @property
    def lora_bias(self):
        """The bias of LoRA B ``(out,)`` (added as ``scaling * lora_bias``), or None."""
        return self._lora_bias

    @lora_bias.setter
    def lora_bias(self, lb):
        lb = self._check_vector("lora_bias", lb)
        if lb is not None and lb.size:
            with np.errstate(over="ignore", invalid="ignore"):
                top = float(np.max(np.abs(lb))) * self.scaling
            if not top <= validate.F32_MAX:
                raise NonFiniteError(f"scaling * lora_bias is not finite in float32 (scaling {self.scaling:g}, "
                                     f"max |lora_bias| {float(np.max(np.abs(lb))):g}): the forward would add inf")
        self._lora_bias = lb
        self._choose_variant()

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_variant" not in state:  # pickled before the variants existed
            self._choose_variant()

    @property
    def use_dora(self) -> bool:
        return self._magnitude is not None

    def _set(self, name, a, shape):
        super()._set(name, a, shape)
        self._norm_cache = None

    @property
    def fan_in_fan_out(self) -> bool:
        return self._fan_in_fan_out

    # computing ------------------------------------------------------------------------
    def _forward_on(self, x, out, lora, x_lora=None, u_out=None):
        """The plain forward through the functional API: ``x W^T + b``, plus the LoRA
        branch on ``x_lora`` (x when None) when ``lora``, ``x_lora A^T`` into ``u_out``."""
        fn = self._backend.fn
        if lora:
            return fn.lora_forward(x, self._weight, self._lora_a, self._lora_b, self.scaling, self._bias, out=out,
                                   fan_in_fan_out=self._fan_in_fan_out, x_lora=x_lora, u_out=u_out)
        return fn.linear_forward(x, self._weight, self._bias, out=out, fan_in_fan_out=self._fan_in_fan_out)

    def _train_dtype(self, x):
        return validate.compute_dtype(x.dtype, self._weight.dtype, self._lora_a.dtype, self._lora_b.dtype)

    def _host_forward(self, x2, x_lora2, out2, lora, keep=True):
        """The CPU training forward: :func:`~numlora.ops.lora_forward`'s pipeline
        (:func:`numlora._backward.dense_forward`) on the layer's arrays, checked when they
        were set; an ``out2`` that shares memory with them gets the result through a
        temporary, as lora_forward does (x2 and x_lora2 are the backend's own). Returns
        ``(y2, s x_lora2 A^T)``."""
        dt = x2.dtype
        w, a, b, bias = self._weight, self._lora_a, self._lora_b, self._bias
        dest = None
        if out2 is None:
            out2 = np.empty((x2.shape[0], self._out_f), dt)
        elif validate.overlaps_any(out2, (w, a, b, bias)):
            dest, out2 = out2, np.empty(out2.shape, dt)
        if lora:
            a, b = a.astype(dt, copy=False), b.astype(dt, copy=False)
        else:
            a = b = None
        us = bw.dense_forward(x2, x_lora2, w.astype(dt, copy=False), a, b, self.scaling,
                              None if bias is None else bias.astype(dt, copy=False), self._fan_in_fan_out, out2)
        return validate.deliver(out2, dest), us

    def _host_grad_input(self, g2, dx):
        """``G W`` into dx (``G W^T`` under fan_in_fan_out), as lora_backward computes it."""
        w = self._weight.astype(dx.dtype, copy=False)
        np.dot(g2, w.T if self._fan_in_fan_out else w, out=dx)

    def _check_float32_base(self):
        if self._weight is not None and self._weight.dtype != np.float32:
            raise DTypeError(f"the GPU path is float32 only: the weight is {self._weight.dtype}; build the layer "
                             "from a float32 weight to move it to the GPU")

    def _lora_backward(self, x, g, need_grad_x, dropout, x_drop, u, grad_a, grad_b):
        return self._backend.fn.lora_backward(x, self._weight, self._lora_a, self._lora_b, self.scaling, g,
                                              fan_in_fan_out=self._fan_in_fan_out, dropout=dropout, x_drop=x_drop,
                                              u=u, grad_a=grad_a, grad_b=grad_b, need_grad_x=need_grad_x)

    def _grad_input(self, g):
        """``G W`` (``G W^T`` under fan_in_fan_out): W read in the transposed layout."""
        return self._backend.fn.linear_forward(g, self._weight, None, fan_in_fan_out=not self._fan_in_fan_out)

    def merge(self) -> None:
        """``W += scaling * B @ A`` in place (DoRA: ``W <- (m / n)(W + scaling * B @ A)``;
        with a LoRA bias, ``b += scaling * lora_bias``). Raises if already merged, disabled
        or detached."""
        self._need_weight("merge")
        if self._merged:
            raise MergeStateError("LoRA weights are already merged")
        if not self._enabled:
            raise MergeStateError("cannot merge a disabled layer; enable() first")
        bias = self._variant.merged_bias(self)
        self._record, self._saved_weight = self._variant.merge(self)
        self._saved_bias, self._bias = self._bias, bias
        self._merged = True

    def unmerge(self) -> None:
        """Restore the base weight (and bias) exactly as they were before :meth:`merge`."""
        if not self._merged:
            raise MergeStateError("LoRA weights are not merged")
        if self._saved_weight is not None:
            self._backend.restore(self._weight, self._saved_weight)
        else:
            self._backend.fn.unmerge_lora(self._weight, self._lora_a, self._lora_b, self.scaling,
                                          self._fan_in_fan_out, record=self._record)
        self._record = self._saved_weight = None
        self._bias, self._saved_bias = self._saved_bias, None
        self._merged = False

    @property
    def merge_overhead_bytes(self) -> int:
        """Memory held to make unmerge exact (0 while unmerged): the merge record, or (DoRA,
        or a merge on the GPU) the copy of the base weight."""
        n = 0 if self._record is None else self._record.nbytes
        n += 0 if self._saved_weight is None else self._saved_weight.nbytes
        return n

    def __repr__(self) -> str:
        extra = "" if self._variant is LORA else f", {self._variant.name}=True"
        if self._weight is None:
            extra += ", attached=False"
        return (f"LoraLinear(out_features={self._out_f}, in_features={self._in_f}, rank={self._rank}, "
                f"alpha={self._alpha}, dtype={self._dtype}, enabled={self._enabled}, merged={self._merged}"
                f"{extra})")
