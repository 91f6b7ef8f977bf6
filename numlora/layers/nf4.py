"""``QLoraLinear``: a LoRA adapter over an NF4-quantized frozen weight (QLoRA)."""

from __future__ import annotations

import numpy as np

from .. import _nf4_products as products
from .. import _validate as validate
from ..errors import ConfigError, DeviceError, DTypeError
from ..nf4 import NF4Tensor, quantize_nf4, weight_shape
from .base import LoraLayer, check_rank, init_lora_a

__all__ = ["QLoraLinear"]


class QLoraLinear(LoraLayer):
    """A LoRA adapter over an NF4-quantized frozen weight (QLoRA).

    The base weight lives only as an :class:`~numlora.nf4.NF4Tensor`; forward decodes it
    tile by tile and never holds a float32 copy. There is no in-place merge (it would
    have to re-quantize, silently losing the adapter's precision):
    :meth:`merged_weight` returns the dense ``deq(W) + scaling * B @ A`` instead.

    Training works as for :class:`~numlora.layers.LoraLinear` (``train()``, ``backward``,
    ``parameters()``); the backward's ``G deq(W)`` term never dequantizes W whole (see
    :func:`~numlora.nf4.qlora_backward`).

    ``compute_dtype``: ``"float32"`` (the default) or ``"bfloat16"`` / ``"float16"`` (also
    ``np.float16``, ``ml_dtypes.bfloat16``, ``"torch.bfloat16"``), as in bitsandbytes'
    ``Linear4bit``: the base product ``x deq(W)^T + b`` (and the backward's ``G deq(W)``)
    computed as that dtype computes it (see :func:`~numlora.nf4.nf4_matmul`); the adapter,
    its gradients and the result arrays stay float32. CPU only.
    """

    _ARRAYS = LoraLayer._ARRAYS + ("_nf4",)
    _compute_mode = 0  # float32 (also for layers pickled before compute_dtype existed)

    def __init__(self, nf4: NF4Tensor, lora_a, lora_b, alpha, *, bias=None, use_rslora=False, dropout=0.0,
                 dropout_seed=0, compute_dtype=None):
        out_f, in_f = weight_shape(nf4)
        self._compute_mode = products.compute_mode(compute_dtype)
        self._nf4 = nf4
        base = validate.Base("the NF4 weight", nf4.shape, None)
        self._init_low_rank(out_f, in_f, lora_a, lora_b, alpha, use_rslora, base)
        self._init_training(dropout, dropout_seed)
        check_rank(self._rank, out_f, in_f)
        self._set_bias(bias)

    @classmethod
    def from_weight(cls, weight, rank, alpha, blocksize=64, double_quant=False, init="seed",
                    seed=None, *, bias=None, use_rslora=False, dropout=0.0, dropout_seed=0,
                    quant_type="nf4", loftq_iters=1, compute_dtype=None) -> "QLoraLinear":
        """Quantize ``weight`` (out, in) to NF4 (or FP4 with ``quant_type="fp4"``) and add a
        fresh adapter (``init="seed"``: the seed module's ``QLoraLinear::from_weight`` init,
        xorshift seeded ``137 + in + out``). ``init="loftq"``: LoftQ
        (:func:`numlora.init.loftq_init`, ``loftq_iters`` alternations, NF4 only): the
        quantized base and the adapter are fitted together so that the layer's starting
        weight is closer to ``weight`` than the NF4 weight alone. ``compute_dtype``: as in
        the constructor."""
        products.compute_mode(compute_dtype)  # refused before the (long) quantization
        weight = validate.weight_array(weight, False)
        out_f, in_f = weight.shape
        rank = check_rank(rank, out_f, in_f)
        validate.real_scalar("alpha", alpha, positive=True)
        if init == "loftq":
            from ..init import loftq_init

            if quant_type != "nf4":
                raise ConfigError(f"expected quant_type 'nf4' with init='loftq' (LoftQ fits an NF4 base), got "
                                  f"{quant_type!r:.40}")
            nf4, a, b = loftq_init(weight, rank, alpha, iters=loftq_iters, blocksize=blocksize,
                                   double_quant=double_quant, use_rslora=use_rslora, seed=seed)
        else:
            nf4 = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
            a = init_lora_a(rank, in_f, out_f, init, seed, default_seed=137)
            b = np.zeros((out_f, rank), np.float32)
        return cls(nf4, a, b, alpha, bias=bias, use_rslora=use_rslora, dropout=dropout, dropout_seed=dropout_seed,
                   compute_dtype=compute_dtype)

    @property
    def nf4(self) -> NF4Tensor:
        return self._nf4

    @property
    def blocksize(self) -> int:
        return self._nf4.blocksize

    group_size = blocksize

    @property
    def compute_dtype(self) -> str:
        """``"float32"``, ``"bfloat16"`` or ``"float16"``: the dtype the base product is
        computed in (see the class docstring)."""
        return products.compute_name(self._compute_mode)

    def _compute_kw(self) -> dict:
        return {"compute_dtype": products.compute_name(self._compute_mode)} if self._compute_mode else {}

    def _forward_on(self, x, out, lora, x_lora=None, u_out=None):
        """The forward through the functional API: ``x deq(W)^T + b``, plus the LoRA
        branch on ``x_lora`` (x when None) when ``lora``, ``x_lora A^T`` into ``u_out``."""
        fn = self._backend.fn
        if lora:
            return fn.qlora_forward(x, self._nf4, self._lora_a, self._lora_b, self.scaling, self._bias, out=out,
                                    x_lora=x_lora, u_out=u_out, **self._compute_kw())
        return fn.nf4_matmul(x, self._nf4, out=out, bias=self._bias, **self._compute_kw())

    def _host_forward(self, x2, x_lora2, out2, lora, keep=True):
        """The CPU training forward: :func:`~numlora.nf4.qlora_forward`'s products
        (``_nf4_products.forward``) on the layer's arrays, checked
        when they were set; an ``out2`` sharing memory with them gets the result through a
        temporary, as qlora_forward does. Returns ``(y2, s x_lora2 A^T)`` with the bits of
        the default hook (the public function's ``u_out`` times the scaling)."""
        dest = None
        if out2 is None:
            out2 = np.empty((x2.shape[0], self._out_f), np.float32)
        elif validate.overlaps_any(out2, (self._lora_a, self._lora_b, self._bias, self._nf4.packed,
                                          self._nf4.scales)):
            dest, out2 = out2, np.empty(out2.shape, np.float32)
        a = b = u2 = None
        if lora:
            a, b = self._lora_a, self._lora_b
            u2 = np.empty((x2.shape[0], self._rank), np.float32) if keep else None
        s = self.scaling
        products.forward(x2, self._nf4, a, b, s, self._bias, out2, x_lora=x_lora2, u_out=u2, mode=self._compute_mode)
        return validate.deliver(out2, dest), (None if u2 is None else u2 * np.float32(s))

    def _host_grad_input(self, g2, dx):
        """``G deq(W)`` into dx, as :func:`~numlora.nf4.nf4_matmul_t` computes it."""
        products.grad_input(g2, self._nf4, dx, self._compute_mode)

    def _check_float32_base(self):
        if self._compute_mode:
            raise DeviceError(f"the GPU path computes in float32 only: this layer has compute_dtype="
                              f"{self.compute_dtype!r}; make it with compute_dtype='float32' to move it")
        if self._nf4.dtype != "float32":
            raise DTypeError(f"the GPU path is float32 only: the NF4 weight decodes to {self._nf4.dtype}")

    def _lora_backward(self, x, g, need_grad_x, dropout, x_drop, u, grad_a, grad_b):
        return self._backend.fn.qlora_backward(x, self._nf4, self._lora_a, self._lora_b, self.scaling, g,
                                               dropout=dropout, x_drop=x_drop, u=u, grad_a=grad_a, grad_b=grad_b,
                                               need_grad_x=need_grad_x, **self._compute_kw())

    def _grad_input(self, g):
        """``G deq(W)``, W never decoded whole."""
        return self._backend.fn.nf4_matmul_t(g, self._nf4, **self._compute_kw())

    def dequantize_weight(self, out=None) -> np.ndarray:
        """The float32 base weight as NF4 stores it."""
        return self._backend.fn.dequantize_nf4(self._nf4, out=out)

    def merged_weight(self, out=None) -> np.ndarray:
        """Dense float32 ``deq(W) + scaling * B @ A`` (the base stays quantized and
        untouched; nothing is re-quantized)."""
        w = self._backend.fn.dequantize_nf4(self._nf4, out=out)
        self._backend.fn.merge_lora(w, self._lora_a, self._lora_b, self.scaling)
        return w

    def memory_saved_bytes(self) -> int:
        """float32 bytes of the weight minus the bytes of its NF4 storage."""
        return max(0, 4 * self._nf4.numel - self._backend.nf4_nbytes(self._nf4))

    def __repr__(self) -> str:
        return (f"QLoraLinear(out_features={self._out_f}, in_features={self._in_f}, rank={self._rank}, "
                f"alpha={self._alpha}, blocksize={self.blocksize}, double_quant={self._nf4.double_quant}, "
                f"{'' if not self._compute_mode else f'compute_dtype={self.compute_dtype!r}, '}"
                f"enabled={self._enabled})")
