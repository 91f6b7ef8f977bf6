"""Start-up costs, each sample in a fresh Python process (asv ``timeraw_``).

``timeraw_import_numlora``
    ``import numlora`` (which imports numpy, but neither numba nor any kernel).

``timeraw_first_call_<kernel>``
    The first call of one kernel in a new process, on tiny inputs so the run itself is
    negligible: this is what a user waits for on first use, i.e. importing numba plus
    compiling the kernel, or loading it from numba's on-disk cache. Imports and input
    creation are in the untimed setup part of the snippet; only the call is timed.
    ``NUMLORA_CACHE`` is left at its default (on), and each benchmark's ``setup`` runs
    the same snippet once in a subprocess first, so every timed process finds the cache
    filled: with the cache, what is measured is the *second* (and every later) process,
    a cache load. If numba cannot write a cache next to the installed package (read-only
    install, no ``NUMBA_CACHE_DIR``), numlora compiles in memory and these numbers equal
    the ``_cold`` ones. A ``NUMLORA_CACHE=0`` already in asv's environment also makes them
    cold.

``timeraw_first_call_<kernel>_cold``
    The same with ``os.environ["NUMLORA_CACHE"] = "0"`` set before numlora is imported:
    a full JIT compile in every process (numba's cache neither read nor written).
"""

import subprocess
import sys
import textwrap

_PRELUDE = """
import numpy as np, numlora
g = np.random.default_rng(0)
"""

_COLD = """
import os
os.environ["NUMLORA_CACHE"] = "0"
"""

#: kernel name -> (setup code after the prelude, the timed first call)
_SNIPPETS = {
    "quantize": (
        "w = g.standard_normal((64, 64), dtype=np.float32)\n",
        "numlora.quantize_nf4(w)",
    ),
    "qlora_forward": (
        "t = numlora.NF4Tensor(g.integers(0, 256, 64 * 64 // 2, dtype=np.uint8),\n"
        "                      np.ones(64 * 64 // 64, np.float32), (64, 64), 64)\n"
        "x = g.standard_normal((1, 64), dtype=np.float32)\n"
        "a = g.standard_normal((16, 64), dtype=np.float32)\n"
        "b = g.standard_normal((64, 16), dtype=np.float32)\n",
        "numlora.qlora_forward(x, t, a, b, 2.0)",
    ),
    "merge_lora": (
        "w = g.standard_normal((64, 64), dtype=np.float32)\n"
        "a = g.standard_normal((16, 64), dtype=np.float32)\n"
        "b = g.standard_normal((64, 16), dtype=np.float32)\n",
        "numlora.merge_lora(w, a, b, 2.0)",
    ),
}


def _first_call(kernel, cold=False):
    """(stmt, setup) for asv's timeraw: ``setup`` imports numpy and numlora and builds
    the inputs (untimed), ``stmt`` is the kernel's first call (timed)."""
    setup, stmt = _SNIPPETS[kernel]
    prelude = (_COLD if cold else "") + _PRELUDE
    return stmt, textwrap.dedent(prelude) + setup


def _prime_cache(kernel):
    """A setup that runs the kernel's snippet once in a child process so numba's
    on-disk cache holds the kernel before the timed processes start."""

    def setup():
        stmt, code = _first_call(kernel)
        subprocess.run([sys.executable, "-c", code + stmt + "\n"], check=True)

    return setup


def timeraw_import_numlora():
    return "import numlora"


def timeraw_first_call_quantize():
    return _first_call("quantize")


def timeraw_first_call_qlora_forward():
    return _first_call("qlora_forward")


def timeraw_first_call_merge_lora():
    return _first_call("merge_lora")


def timeraw_first_call_quantize_cold():
    return _first_call("quantize", cold=True)


def timeraw_first_call_qlora_forward_cold():
    return _first_call("qlora_forward", cold=True)


def timeraw_first_call_merge_lora_cold():
    return _first_call("merge_lora", cold=True)


for _kernel in _SNIPPETS:
    _cached = globals()[f"timeraw_first_call_{_kernel}"]
    _cached.setup = _prime_cache(_kernel)
    _cold = globals()[f"timeraw_first_call_{_kernel}_cold"]
    for _f in (_cached, _cold):
        # The cache is primed explicitly (or deliberately unused): no warm-up process.
        _f.warmup_time = 0.0
        _f.number = 1
    # A cold compile takes seconds: a few samples are enough.
    _cold.repeat = (2, 5, 30.0)
    _cold.timeout = 300.0
del _kernel, _cached, _cold, _f
