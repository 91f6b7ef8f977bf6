"""``LoraEmbedding``: a LoRA adapter over an embedding table, as PEFT's ``lora.Embedding``.

CPU only for now: :meth:`LoraEmbedding.to` ``("cuda")`` raises
:class:`~numlora.errors.DeviceError`.
"""

from __future__ import annotations

import numpy as np

from .. import _validate as validate
from ..embedding import (
    embedding_forward,
    embedding_lora_backward,
    embedding_lora_forward,
    merge_embedding,
    unmerge_embedding,
)
from ..errors import ConfigError, TrainStateError
from .base import LoraLayer, check_rank
from .host_only import HostOnly

__all__ = ["LoraEmbedding"]


class LoraEmbedding(HostOnly, LoraLayer):
    """An embedding table ``weight`` (num_embeddings, embedding_dim) with a LoRA adapter:
    ``y = weight[ids] + scaling * A[:, ids]^T B^T``, PEFT's ``lora.Embedding``.

    ``lora_a`` is (r, num_embeddings) and ``lora_b`` (embedding_dim, r), PEFT's
    ``lora_embedding_A`` / ``lora_embedding_B`` (so :attr:`in_features` is the vocabulary
    and :attr:`out_features` the embedding size). ``weight=None`` makes a detached layer
    (see :meth:`attach`). ``padding_idx``: the id whose row of A gets no gradient (as in
    PEFT, which passes the base's ``padding_idx`` to the LoRA lookup). There is no dropout:
    PEFT applies none to an embedding's ids.

    Training: ``train()``; ``forward(ids)``; ``backward(grad_out)`` accumulates
    :attr:`grad_a` / :attr:`grad_b` and returns None (integer ids have no gradient).
    CPU only for now.
    """

    _ARRAYS = LoraLayer._ARRAYS + ("_weight",)
    _KIND = "an embedding"

    def __init__(self, weight, lora_a, lora_b, alpha, *, use_rslora=False, padding_idx=None):
        if weight is None:
            a = validate.float_array("lora_a", lora_a, 2)
            b = validate.float_array("lora_b", lora_b, 2)
            vocab, dim = a.shape[1], b.shape[0]
            self._dtype = np.result_type(a.dtype, b.dtype)
        else:
            weight = validate.weight_array(weight, True)
            vocab, dim = weight.shape
            self._dtype = weight.dtype
        self._weight = weight
        self._init_low_rank(dim, vocab, lora_a, lora_b, alpha, use_rslora,
                            None if weight is None else validate.Base("the embedding table", weight.shape, True))
        self._init_training(0.0, 0)
        self._bias = None
        self._record = None
        self._padding_idx = None
        if padding_idx is not None:
            p = validate.int_scalar("padding_idx", padding_idx)
            if not -vocab <= p < vocab:
                raise ConfigError(f"padding_idx must be in -{vocab}..{vocab - 1}, got {p}")
            self._padding_idx = p % vocab

    @classmethod
    def from_weight(cls, weight, rank, alpha, seed=None, *, use_rslora=False, padding_idx=None,
                    copy=True) -> "LoraEmbedding":
        """A layer over ``weight`` with a fresh adapter, initialised as PEFT initialises an
        embedding's: A = 0, B ~ N(0, 1) (numpy ``Generator(seed)``), so the fresh layer
        computes the base's output."""
        weight = validate.weight_array(weight, True)
        vocab, dim = weight.shape
        rank = check_rank(rank, dim, vocab)
        if validate.flag("copy", copy):
            weight = np.array(weight, copy=True)
        seed = None if seed is None else validate.int_scalar("seed", seed, minimum=0)
        a = np.zeros((rank, vocab), weight.dtype)
        b = np.random.default_rng(seed).standard_normal((dim, rank)).astype(weight.dtype)
        return cls(weight, a, b, alpha, use_rslora=use_rslora, padding_idx=padding_idx)

    @property
    def num_embeddings(self) -> int:
        return self._in_f

    @property
    def embedding_dim(self) -> int:
        return self._out_f

    @property
    def padding_idx(self):
        return self._padding_idx

    @property
    def base_shape(self) -> tuple:
        """(num_embeddings, embedding_dim)."""
        return (self._in_f, self._out_f)

    _merge_fn = staticmethod(merge_embedding)
    _unmerge_fn = staticmethod(unmerge_embedding)

    def forward(self, ids, out=None) -> np.ndarray:
        """Integer ``ids`` of any shape -> ``ids.shape + (embedding_dim,)``. In training
        mode keeps the ids for :meth:`backward`."""
        self._need_weight("run forward")
        if self._training and self._merged:
            raise TrainStateError("cannot run a training forward on a merged layer: unmerge() first")
        lora = self._enabled and not self._merged
        if lora:
            y = embedding_lora_forward(ids, self._weight, self._lora_a, self._lora_b, self.scaling, out=out)
        else:
            y = embedding_forward(ids, self._weight, out=out)
        self._cache = None
        if self._training:
            kept = np.array(ids, copy=True)
            self._cache = (kept, lora, y.dtype)
        return y

    __call__ = forward

    def backward(self, grad_out, need_grad_x: bool = True):
        """Add ``dL/dA`` and ``dL/dB`` of the last training forward into :attr:`grad_a` /
        :attr:`grad_b`; returns None (the ids have no gradient)."""
        validate.flag("need_grad_x", need_grad_x)
        ids, lora, dtype = self._saved()
        if not lora:
            return None
        self._grads()
        grad_out = validate.float_array("grad_out", grad_out, None, allow_empty=True)
        if np.result_type(self._grad_a.dtype, dtype) != self._grad_a.dtype:
            ga, gb = embedding_lora_backward(ids, self._lora_a, self._lora_b, self.scaling, grad_out,
                                             padding_idx=self._padding_idx)
            self._grad_a += ga
            self._grad_b += gb
        else:
            embedding_lora_backward(ids, self._lora_a, self._lora_b, self.scaling,
                                    grad_out.astype(self._grad_a.dtype, copy=False), padding_idx=self._padding_idx,
                                    grad_a=self._grad_a, grad_b=self._grad_b)
        return None

    @property
    def saved_bytes(self) -> int:
        return 0 if self._cache is None else int(self._cache[0].nbytes)

    def __repr__(self) -> str:
        extra = "" if self._weight is not None else ", attached=False"
        return (f"LoraEmbedding(num_embeddings={self._in_f}, embedding_dim={self._out_f}, rank={self._rank}, "
                f"alpha={self._alpha}, enabled={self._enabled}, merged={self._merged}{extra})")
