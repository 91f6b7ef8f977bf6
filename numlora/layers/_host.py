"""The layers' CPU backend: numpy arrays, validated and copied on the way in, and the
training forward and backward over them.

A layer holds :data:`HOST` while its arrays are on the host (the GPU twin is
:mod:`numlora.layers._gpu`); what depends on the layer type (its products, its compute
dtype) comes from the layer's hooks (see :class:`~numlora.layers.base.LoraLayer`).
"""

from __future__ import annotations

import numpy as np

from .. import _backward as bw
from .. import _validate as validate
from .._dispatch import backend, is_device_array
from ..device import to_host
from ..dropout import drop_rows
from ..errors import DeviceError, ShapeError


class HostBackend:
    """A layer's arrays and computations on the CPU."""

    name = "cpu"
    #: The functional API's CPU implementations, called without per-call routing.
    fn = backend("cpu")

    def __reduce__(self):
        return "HOST"  # one per process: a pickled layer comes back holding it

    # arrays ---------------------------------------------------------------------------
    @staticmethod
    def move(a):
        return to_host(a)

    def check_move(self, layer) -> None:
        """Anything may come back to the host."""

    @staticmethod
    def input(name, a):
        """An input of the layer's computations: not a device array."""
        if is_device_array(a):
            raise DeviceError(f"expected {name} on the host like the layer (device='cpu'), got a device array; "
                              f"move it with numlora.to_host({name}), or the layer with layer.to('cuda')")
        return a

    def check_variant(self, name, variant) -> None:
        """Every variant runs on the CPU."""

    @staticmethod
    def check_array(name, a, shape, message=None):
        """The caller's float array ``a`` of ``shape``, validated (not copied); a wrong
        shape is a ShapeError saying ``message(got)`` when given."""
        a = validate.float_array(name, a, len(shape))
        if tuple(a.shape) != tuple(shape):
            raise ShapeError(message(tuple(a.shape)) if message else
                             f"expected {name} of shape {tuple(shape)}, got {tuple(a.shape)}")
        return a

    def attach_array(self, name, a, shape, copy, message=None):
        """A base array for the layer: ``a`` validated, copied when ``copy``."""
        a = self.check_array(name, a, shape, message)
        return np.array(a, copy=True) if copy else a

    def own(self, name, a, shape, dtype, message=None):
        """A private C-contiguous copy of the float array ``a`` of ``shape`` in ``dtype``."""
        return np.array(self.check_array(name, a, shape, message), dtype=dtype, order="C", copy=True)

    def vector(self, name, value, n, dtype):
        """A private copy of the vector ``value`` (n,) in ``dtype``, or None."""
        return None if value is None else np.array(self.check_array(name, value, (n,)), dtype=dtype, copy=True)

    @staticmethod
    def zero(g):
        g[...] = 0

    @staticmethod
    def save(w):
        """A copy of the base weight, to restore it exactly."""
        return w.copy(order="K")

    @staticmethod
    def restore(w, saved):
        w[...] = saved

    def merge_lora(self, weight, lora_a, lora_b, scaling, fan_in_fan_out):
        """``W += s B A`` in place, tracked: returns ``(record, None)``, the
        :class:`~numlora.ops.MergeRecord` that makes the unmerge bit-exact."""
        return self.fn.merge_lora(weight, lora_a, lora_b, scaling, fan_in_fan_out, record=True), None

    @staticmethod
    def nf4_nbytes(t) -> int:
        return t.nbytes

    # training ---------------------------------------------------------------------------
    def train_forward(self, layer, x, out):
        """The training forward over 2-D arrays in the layer's compute dtype (the layer's
        ``_host_forward``), the LoRA branch on the dropped input (drawn as
        :func:`~numlora.dropout.lora_dropout` draws it, into a buffer the layer reuses),
        ``us = s x_drop A^T`` kept for backward; ``out`` may overlap x (x is then copied
        first: it is kept as it was for backward)."""
        in_f, out_f = layer._in_f, layer._out_f
        x = validate.input_rows(self.input("x", x), in_f)
        dtype = layer._train_dtype(x)
        x2 = np.ascontiguousarray(x.reshape(-1, in_f), dtype)
        out2 = None
        if out is not None:
            out = validate.prepare_out(out, x, out_f, dtype)
            if validate.shares_memory(out, x2):
                x2 = x2.copy()
            out2 = out.reshape(-1, out_f)
        lora = layer._enabled
        xd2, state, mask = self._dropped(layer, x2)
        y, us = layer._host_forward(x2, xd2, out2, lora)
        layer._keep(x2, xd2, us, state, x.ndim == 1, lora, dtype, mask)
        return y.reshape(out_f) if out is None and x.ndim == 1 else (y if out is None else out)

    @staticmethod
    def _dropped(layer, x2):
        """``(x_drop2, DropoutState, DropoutMask)`` of this training forward (see
        :meth:`~numlora.layers.base.LoraLayer._next_dropout`), drawn into the layer's
        reused buffer; ``(x2, None, None)`` without dropout."""
        state = layer._next_dropout()
        if state is None:
            return x2, None, None
        buf = layer._xd_buf
        if (buf is None or buf.shape != x2.shape or buf.dtype != x2.dtype
                or validate.shares_memory(buf, x2)):
            buf = layer._xd_buf = np.empty(x2.shape, x2.dtype)
        return buf, state, drop_rows(state, x2, buf)

    def backward(self, layer, saved, grad_out, need_grad_x):
        """The backward pipeline (:func:`numlora._backward.backward_core`, what
        :func:`~numlora.ops.lora_backward` runs after its checks) over what the training
        forward kept and the layer's factors; fresh gradients, then added into the
        layer's (into zeros or the previous sum, as an accumulating backward would)."""
        in_f, out_f = layer._in_f, layer._out_f
        x2, xd2, us, state, one_d, lora, dtype, mask = saved
        g = validate.input_rows(self.input("grad_out", grad_out), out_f, "grad_out", "out_features")
        layer._check_grad_out(saved, g)
        g2 = np.ascontiguousarray(g.reshape(-1, out_f), dtype)
        if lora:
            s = layer.scaling
            a = layer._lora_a.astype(dtype, copy=False)
            b = layer._lora_b.astype(dtype, copy=False)
            if state is not None and mask is None:
                mask = state.mask(dtype)
            dx, ga, gb = bw.backward_core(x2, xd2, a, b, s, g2, us, mask, None, None, need_grad_x,
                                          layer._host_grad_input)
            if layer._grad_a is None:
                layer._grad_a = np.zeros(layer._lora_a.shape, layer._lora_a.dtype)
                layer._grad_b = np.zeros(layer._lora_b.shape, layer._lora_b.dtype)
            layer._grad_a += ga
            layer._grad_b += gb
        else:
            dx = layer._grad_input(g2) if need_grad_x else None
        if dx is not None and one_d:
            dx = dx.reshape(in_f)
        return dx


HOST = HostBackend()
