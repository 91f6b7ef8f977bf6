"""The one exception family of numlora.

Every error numlora raises on bad input derives from :class:`NumloraError`. The
subclasses also derive from the matching builtin (``ValueError``, ``TypeError``,
``KeyError``, ``RuntimeError``), so callers can catch either the numlora class or
the builtin they already expect.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DTypeError",
    "DetachedLayerError",
    "DeviceError",
    "DuplicateLayerError",
    "FormatError",
    "LayerNotFoundError",
    "MergeStateError",
    "NonFiniteError",
    "NumloraError",
    "ShapeError",
    "TrainStateError",
]


class NumloraError(Exception):
    """Base class of every error numlora raises on bad input or bad state."""


class ConfigError(NumloraError, ValueError):
    """A configuration value is out of range (rank, alpha, dropout, blocksize...)."""


class ShapeError(NumloraError, ValueError):
    """An array has the wrong number of dimensions, the wrong shape, or is empty; or its
    memory does not fit the call: an ``out=`` buffer that is not C-contiguous or is
    read-only, or an array written in place that shares memory with one the call reads
    (where numlora refuses the overlap instead of computing through a copy)."""


class DTypeError(NumloraError, TypeError):
    """An array or argument has a dtype or type numlora does not accept."""


class NonFiniteError(NumloraError, ValueError):
    """An input holds NaN or infinity where only finite values make sense."""


class MergeStateError(NumloraError, RuntimeError):
    """An operation does not fit the merge state (merging twice, unmerging an unmerged
    layer, changing adapter weights while merged)."""


class LayerNotFoundError(NumloraError, KeyError):
    """A layer name is not in the adapter."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateLayerError(NumloraError, ValueError):
    """A layer name is already in the adapter."""


class FormatError(NumloraError, ValueError):
    """A file is not what it claims to be (a truncated safetensors file, a header that
    disagrees with the data, a PEFT folder without its config, a checkpoint tensor that
    does not match the adapter), or an output path is not allowed."""


class DetachedLayerError(NumloraError, RuntimeError):
    """The layer holds an adapter (A, B, ...) but no base weight: forward and merge need
    one; attach it with ``attach(weight)`` first."""


class TrainStateError(NumloraError, RuntimeError):
    """A training call does not fit the layer's state (backward without a training-mode
    forward, training a merged layer)."""


class DeviceError(NumloraError, RuntimeError):
    """A GPU was asked for (a GPU array, ``to_device``) where numba.cuda finds none, or
    host and GPU arrays were mixed in one call."""
