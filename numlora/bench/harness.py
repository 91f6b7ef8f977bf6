"""The one timing harness of numlora's own benchmarks (``numlora bench`` in all its
modes and the scripts in ``benchmarks/``; the asv suite is timed by asv itself and draws
its inputs from :mod:`numlora.bench.inputs` like these).

Method: competitors are timed in rounds, interleaved (A, B, C, A, B, C, ...), so drift
of the machine hits them alike. Before each competitor's turn the harness sleeps
``pause`` seconds (OpenBLAS's and OpenMP's threads spin for a while after a call and
would steal the cores from the next competitor), runs it once untimed (its own threads
awake, its caches warm, as in a loop that calls it repeatedly), then times ``calls``
calls. A :class:`Timing` keeps every sample, its median and its spread.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np

#: Spread (half the interquartile range over the median) above which a figure is
#: flagged as taken on a machine too noisy to trust it.
NOISY_SPREAD = 0.10


@dataclass
class Timing:
    """Samples of one competitor, in seconds."""

    samples: list = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples)) * 1e3

    @property
    def spread(self) -> float:
        """Half the interquartile range over the median (0.03 = +-3 %)."""
        q1, med, q3 = np.percentile(self.samples, [25, 50, 75])
        return float((q3 - q1) / 2 / med) if med > 0 else 0.0


def time_interleaved(fns, repeat: int, pause: float, calls: int = 1, warm: int = 1) -> list[Timing]:
    """One :class:`Timing` per function, timed as the module docstring says (``warm``
    untimed calls per turn instead of one: a steady-state phase of each competitor). An
    entry may be a pair ``(f, after)``: ``after`` runs untimed after every call of ``f``
    (to undo what f did, e.g. unmerge after a timed merge)."""
    pairs = [f if isinstance(f, tuple) else (f, None) for f in fns]
    timings = [Timing() for _ in fns]
    for _ in range(repeat):
        for k, (f, after) in enumerate(pairs):
            if pause:
                time.sleep(pause)
            for _ in range(warm):
                f()
                if after:
                    after()
            for _ in range(calls):
                t0 = time.perf_counter()
                f()
                timings[k].samples.append(time.perf_counter() - t0)
                if after:
                    after()
    return timings


def noise_warning(spreads) -> str:
    """A warning line when any of ``spreads`` (see :attr:`Timing.spread`) is above
    ``NOISY_SPREAD``, i.e. the machine was too noisy to trust the figures; else ''."""
    worst = max(spreads, default=0.0)
    if worst > NOISY_SPREAD:
        return (f"warning: the machine was noisy during this run (spread up to ±{worst:.0%}, above "
                f"±{NOISY_SPREAD:.0%}): close other programs or raise --repeat before trusting these ratios")
    return ""


def peak_rss_delta_mb(f) -> float:
    """Peak resident memory added by one call of f (Linux: VmHWM after resetting it)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return float("nan")

    def status(key):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        return float("nan")

    before = status("VmRSS")
    f()
    return status("VmHWM") - before


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def start_threads(peers: bool = True) -> str:
    """Start numba's threads as a program that uses numlora and torch runs them, before
    anything is timed: torch imported first (where installed and ``peers``), then numba's
    threads. torch then keeps its own OpenMP runtime and its default (threads that spin
    after a call) and numba gets its own with numlora's (passive threads; see
    ``kernels._jit._setup_threads``). Imported after numba's threads started, torch
    would share numba's runtime, passive, and be timed with threads its users do not get;
    started after torch without numlora's setup, numba would share torch's spinning ones.
    Returns how numba's threads run (what :func:`machine` prints)."""
    if peers:
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
    from ..kernels._jit import THREADS

    return THREADS


def machine() -> str:
    """One line naming the CPU, cores, Python, numpy, numba, numba's thread count, how
    numba's threads were started (their wait policy changes every parallel timing) and
    whether numlora steers them (``kernels._steer``)."""
    import numba

    from ..kernels._jit import STEER, THREADS

    return (f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}, "
            f"numba {numba.__version__} ({numba.get_num_threads()} threads; {THREADS}; {STEER.line()})")


def progress(msg: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    import sys

    print(msg, file=sys.stderr, flush=True)
