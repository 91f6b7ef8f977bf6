"""The one place that routes a public function to its CPU or CUDA implementation.

A public function of the functional layer is written once, as its CPU implementation,
and decorated with :func:`dispatch`. A call whose arguments include a device array (an
object with ``__cuda_array_interface__``, a CUDA-simulator array) or a device object
(a class that sets ``__numlora_device__ = "cuda"``, such as
:class:`~numlora.device.DeviceNF4Tensor`) runs the implementation the CUDA backend
registered under the same name instead; every other call runs the CPU implementation.
Mixing host and device arrays is refused by the CUDA implementation (one
:class:`~numlora.errors.DeviceError` naming the host argument).

The CUDA backend (:mod:`numlora.cuda`) is a plug-in: it is loaded by name, on the first
call that sees a device array (or the first :func:`backend` ``("cuda")``), and registers
its implementations with :func:`register`. Nothing here imports numba; where numba.cuda
finds no GPU, loading the backend raises one DeviceError saying what is missing.

Objects (layers, the bank) choose their backend once, in ``to()``: ``backend("cuda")``
returns a namespace of the device implementations, ``backend("cpu")`` the CPU ones
(without the per-call routing), so their hot paths just call.

Names for the rest of the package (this module is private; none of this is public API):

- :func:`dispatch`: decorator of a public function's CPU implementation;
- :func:`register`: decorator of a backend's implementation of a function;
- :func:`backend`: a backend's implementations as attributes;
- :func:`where`: ``"cpu"`` or ``"cuda"``, where some arrays live;
- :func:`is_device_array`, :func:`on_device`: the device tests;
- :func:`check_device`: the one check of a ``device`` argument (``"cpu"`` / ``"cuda"``);
- :data:`BACKENDS`: the backend names.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np

from .errors import ConfigError, DeviceError

__all__ = ["BACKENDS", "backend", "check_device", "dispatch", "is_device_array", "on_device", "register", "where"]

#: The backends, and the module that registers each one's implementations when imported
#: (None: registered by the functional modules themselves, at import).
BACKENDS = {"cpu": None, "cuda": "numlora.cuda"}

_IMPLS: dict = {name: {} for name in BACKENDS}
_LOADED = {"cpu"}

SIM_MODULES = ("numba.cuda.simulator", "numba_cuda.numba.cuda.simulator")

#: Argument types that are never on a device (skipped without a closer look: most
#: arguments of a hot call are numpy arrays, scalars, None or flags).
_HOST_TYPES = frozenset({np.ndarray, type(None), bool, int, float, str, tuple, list, dict, np.float32,
                         np.float64, np.int64, np.int32, np.uint64, np.bool_})


def is_device_array(x) -> bool:
    """True for numba device arrays and any object exposing ``__cuda_array_interface__``
    (also the CUDA simulator's arrays). Never imports numba."""
    if isinstance(x, np.ndarray) or x is None:
        return False
    try:
        if hasattr(x, "__cuda_array_interface__"):
            return True
    except Exception:  # some libraries raise other errors from the property on host tensors
        return False
    return type(x).__module__.startswith(SIM_MODULES)


def on_device(x) -> bool:
    """True for a device array or a device object (``__numlora_device__ == "cuda"``)."""
    return getattr(type(x), "__numlora_device__", None) == "cuda" or is_device_array(x)


def _any_on_device(args, kwargs) -> bool:
    host = _HOST_TYPES
    for a in args:
        if type(a) not in host and on_device(a):
            return True
    if kwargs:
        for a in kwargs.values():
            if type(a) not in host and on_device(a):
                return True
    return False


def where(*objs) -> str:
    """``"cuda"`` if any of ``objs`` is on the device, else ``"cpu"``."""
    return "cuda" if _any_on_device(objs, None) else "cpu"


def check_device(device) -> str:
    """A ``device`` argument (``to(device)``): ``"cpu"`` or ``"cuda"``, else ConfigError."""
    if not isinstance(device, str) or device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be 'cuda' or 'cpu', got {device!r}")
    return device


def register(backend_name: str, name: str | None = None):
    """Decorator: register ``fn`` as backend ``backend_name``'s implementation of the
    function called ``name`` (default: ``fn.__name__``). Returns ``fn`` unchanged."""
    table = _IMPLS[backend_name]

    def deco(fn):
        table[name or fn.__name__] = fn
        return fn

    return deco


def _load(backend_name: str) -> dict:
    if backend_name not in _LOADED:
        importlib.import_module(BACKENDS[backend_name])  # registers its implementations
        _LOADED.add(backend_name)
    return _IMPLS[backend_name]


def implementation(backend_name: str, name: str):
    """Backend ``backend_name``'s implementation of ``name`` (loading the backend); a
    DeviceError when it has none."""
    impl = _load(backend_name).get(name)
    if impl is None:
        if backend_name == "cpu":
            raise DeviceError(f"{name} runs on the GPU only")
        raise DeviceError(f"{name} runs on the CPU only (no GPU implementation): move its arrays to the host "
                          "with numlora.to_host")
    return impl


def dispatch(fn=None, *, cpu_only: bool = False):
    """Decorator of a public function's CPU implementation: registers it as the ``"cpu"``
    implementation of ``fn.__name__`` and returns the routed function (same name,
    signature and docstring). ``cpu_only=True``: no GPU implementation exists; a device
    array is refused with a DeviceError (without loading the CUDA backend)."""
    if fn is None:
        return functools.partial(dispatch, cpu_only=cpu_only)
    name = fn.__name__
    _IMPLS["cpu"][name] = fn
    cuda_impls = _IMPLS["cuda"]

    if cpu_only:
        @functools.wraps(fn)
        def routed(*args, **kwargs):
            if _any_on_device(args, kwargs):
                raise DeviceError(f"{name} runs on the CPU only (no GPU implementation): move its arrays to the "
                                  "host with numlora.to_host")
            return fn(*args, **kwargs)
    else:
        @functools.wraps(fn)
        def routed(*args, **kwargs):
            if _any_on_device(args, kwargs):
                impl = cuda_impls.get(name) or implementation("cuda", name)
                return impl(*args, **kwargs)
            return fn(*args, **kwargs)

    return routed


class Backend:
    """The implementations of one backend as attributes (``backend("cuda").lora_forward``):
    what an object resolves once, in ``to()``."""

    __slots__ = ("name", "_table")

    def __init__(self, name: str, table: dict):
        self.name = name
        self._table = table

    def __getattr__(self, attr):
        try:
            return self._table[attr]
        except KeyError:
            raise AttributeError(f"the {self.name} backend has no implementation of {attr!r}") from None

    def __contains__(self, attr) -> bool:
        return attr in self._table

    def __repr__(self) -> str:
        return f"<numlora backend {self.name!r}: {', '.join(sorted(self._table))}>"


_BACKEND_OBJECTS: dict = {}


def backend(name: str) -> Backend:
    """The implementations of backend ``name`` (``"cpu"`` or ``"cuda"``), loading it: a
    DeviceError where numba.cuda finds no GPU. The CPU backend holds the implementations
    of the functional modules imported so far (``import numlora`` imports them all)."""
    name = check_device(name)
    b = _BACKEND_OBJECTS.get(name)
    if b is None:
        b = _BACKEND_OBJECTS[name] = Backend(name, _load(name))
    return b
