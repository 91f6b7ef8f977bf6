"""The kernel modules, imported on first use and then looked up.

Importing a kernel module imports numba, so the functional layer does not import them
at ``import numlora`` (see :mod:`numlora.kernels`). An import statement inside a
function costs ~1 us each time it runs, even when the module is loaded, and a small
product ran three or four of them per call; :func:`kernels` costs a dict read.
"""

from __future__ import annotations

import importlib

_MODULES: dict = {}


def kernels(name: str):
    """The module ``numlora.kernels.<name>``, imported on the first call."""
    m = _MODULES.get(name)
    if m is None:
        m = _MODULES[name] = importlib.import_module(f"{__package__}.kernels.{name}")
    return m
