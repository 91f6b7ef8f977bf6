"""numlora layers over chunked ``dask.array`` inputs (optional: ``pip install 'numlora[dask]'``).

:func:`apply_layer` runs a :class:`~numlora.LoraLinear`, :class:`~numlora.QLoraLinear` or
:class:`~numlora.LoraBank` (with a per-row adapter column) on a dask array of rows, one
task per row block. The layer travels to each worker once, not with every task: with a
``distributed.Client`` it is scattered to every worker up front
(``client.scatter(..., broadcast=True)``), otherwise it is one key of the graph
(``dask.delayed``) that every block task depends on. Each block task then carries only
its own rows (or the key of a block computed on the worker). A worker that lost its
copy (distributed's active memory manager drops extra replicas between computations)
fetches the layer again once, at its first task that needs it.

Importing this module needs neither dask nor distributed; calling it without them
raises :class:`~numlora.errors.ConfigError` naming the extra. See docs/dask.md.
"""

from __future__ import annotations

import uuid

import numpy as np

from .errors import ConfigError, DTypeError, ShapeError, TrainStateError
from .layers import LoraLinear, QLoraLinear
from .multi import LoraBank

__all__ = ["apply_layer", "layer_ref"]


def _dask_array():
    try:
        import dask
        import dask.array as da
    except ImportError as e:
        raise ConfigError(f"numlora.dask needs the optional dependency dask[array] (pip install 'numlora[dask]'); "
                          f"it could not be imported: {e}") from None
    return dask, da


def layer_ref(layer, client=None):
    """What the block tasks of :func:`apply_layer` refer to instead of the layer itself:
    with ``client`` (a ``distributed.Client``) a future of the layer scattered to every
    worker (sent once per worker, now); without, a ``dask.delayed`` of it (one key of the
    graph). Reuse one reference for several :func:`apply_layer` calls to send the layer
    once for all of them. Distributed's active memory manager (on by default) may drop
    the extra copies of a future no task waits for; a worker that needs the layer again
    then fetches it once more, never once per task."""
    _check_layer(layer)
    dask, _ = _dask_array()
    if client is not None:
        [fut] = client.scatter([layer], broadcast=True, hash=False)
        return fut
    return dask.delayed(layer, name=f"numlora-{type(layer).__name__}-{uuid.uuid4().hex}", pure=False)


def _check_layer(layer) -> None:
    if not isinstance(layer, (LoraLinear, QLoraLinear, LoraBank)):
        raise DTypeError(f"expected a LoraLinear, QLoraLinear or LoraBank, got {type(layer).__name__}")
    if layer.device != "cpu":
        raise ConfigError(f"expected a layer on the host (device='cpu'), got device={layer.device!r}: the layer is "
                          f"pickled to the workers; pass layer.to('cpu')")
    if getattr(layer, "training", False):
        raise TrainStateError("expected a layer in eval mode: a training-mode forward draws dropout and keeps what "
                              "backward needs, which block tasks on other processes cannot do; call layer.eval()")


def _forward_block(x, layer):
    return layer.forward(x)


def _bank_block(x, ids, bank):
    return bank.forward(x, ids.reshape(-1))


def apply_layer(layer, x, adapters=None, *, client=None, ref=None):
    """``layer.forward`` over the rows of the 2-D dask array ``x`` (n, in), block by
    block: a dask array (n, out) with ``x``'s row chunks (``x`` is rechunked to one
    chunk across its columns if it has several).

    layer : a LoraLinear or QLoraLinear in eval mode, or a LoraBank (then ``adapters``)
    x : dask array (n, in) (a numpy array is wrapped as one chunk)
    adapters : LoraBank only: per row, the adapter id (``bank.ids(names)``; -1: base
        alone), a dask or numpy integer array (n,), rechunked to ``x``'s rows
    client : a ``distributed.Client``: the layer is scattered to every worker once (see
        :func:`layer_ref`); without one it is one ``dask.delayed`` key of the graph
    ref : a :func:`layer_ref` of ``layer`` made earlier (shared by several calls)

    Nothing is computed here: call ``.compute()`` (or ``client.compute``) on the result.
    """
    _check_layer(layer)
    dask, da = _dask_array()
    if not isinstance(x, da.Array):
        x = da.from_array(np.asarray(x), chunks=-1)
    if x.ndim != 2:
        raise ShapeError(f"expected x as a 2-D dask array (rows, {layer.in_features}), got shape {x.shape}")
    if x.shape[1] != layer.in_features:
        raise ShapeError(f"expected x with {layer.in_features} columns (the layer's in_features), got shape "
                         f"{x.shape}")
    if len(x.chunks[1]) != 1:
        x = x.rechunk({1: -1})
    if ref is None:
        ref = layer_ref(layer, client)
    sample = np.zeros((1, layer.in_features), x.dtype)
    out_f = layer.out_features
    if isinstance(layer, LoraBank):
        if adapters is None:
            raise ConfigError("a LoraBank needs adapters: per row, the adapter id (bank.ids(names); -1: base alone)")
        if not isinstance(adapters, da.Array):
            adapters = np.asarray(adapters)
        if adapters.shape != (x.shape[0],):
            raise ShapeError(f"expected one adapter id per row of x: shape ({x.shape[0]},), got {adapters.shape}")
        if adapters.dtype.kind not in "iu":
            raise DTypeError(f"expected adapter ids as integers (bank.ids(names)), got {adapters.dtype}")
        if not isinstance(adapters, da.Array):
            adapters = da.from_array(adapters, chunks=(x.chunks[0],))
        ids = adapters.rechunk((x.chunks[0],))[:, None]
        dtype = layer.forward(sample, [-1]).dtype
        return da.map_blocks(_bank_block, x, ids, ref, dtype=dtype, chunks=(x.chunks[0], (out_f,)),
                             meta=np.empty((0, 0), dtype))
    if adapters is not None:
        raise ConfigError(f"adapters is for a LoraBank; a {type(layer).__name__} has one adapter")
    dtype = layer.forward(sample).dtype
    return da.map_blocks(_forward_block, x, ref, dtype=dtype, chunks=(x.chunks[0], (out_f,)),
                         meta=np.empty((0, 0), dtype))
