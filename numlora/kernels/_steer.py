"""Keep numba's sleeping OpenMP workers off the core of the thread that calls a kernel.

numlora starts numba's OpenMP threads with the *passive* wait policy (``_jit._setup_threads``):
between kernels they sleep, and each parallel kernel wakes them. Linux picks the core a
woken thread runs on. On the 2-vCPU AMD EPYC VM numlora is measured on, after the program
slept (``time.sleep``, I/O, a pause between requests) the kernel woke numba's worker on the
*calling* thread's vCPU, and the two then shared one vCPU call after call (each kernel
wakes the worker again, on the same vCPU): a bf16 NF4 product at batch 8 ran 2.7-3.1 ms
after a sleep, 1.4-1.9 ms after a busy pause with the pair apart, and ``numlora bench``'s QLoRA
rows at batch 1 and 8 read 1.5-2.4x their times with the worker steered as below
(docs/performance.md, "Where numba's worker wakes"). That guest's scheduler packs threads
onto fewer vCPUs (``/proc/sys/kernel/sched_vcpu_pack``), and its balancer never sees the
pair as a lasting imbalance because the worker sleeps again after each kernel.

So numlora tells the scheduler: before a parallel kernel, if the calling thread is on
another core than at its last one, numba's workers are allowed on the caller's cores but
that one (``sched_setaffinity``, one call per worker; the calling thread itself is never
restricted). On 2 cores that puts the worker on the other core; on more, the workers still
spread as the scheduler likes. Cost: ~0.3 us a call (``sched_getcpu``) while the caller
stays on its core. Results never depend on it (every thread runs the same operations
wherever it runs). The price: while another program keeps the other cores busy, the
worker waits there instead of moving onto the caller's core once the caller's share is
done (measured in docs/performance.md).

Only where it is safe and wanted: Linux with ``sched_getcpu``; numlora started numba's
OpenMP layer itself (the user chose no threading layer, thread count or wait policy); no
OpenMP affinity variable set (``OMP_PROC_BIND``, ``OMP_PLACES``, ``GOMP_CPU_AFFINITY``,
``KMP_AFFINITY``); the calling thread allowed on two cores or more; the workers seen
being created by numlora's first parallel kernel in a process with one Python thread (their
thread ids then are certain); calls from that same thread only (another thread's kernels
run with their own OpenMP team, left alone); ``NUMLORA_STEER_WORKERS=0`` turns it off.
After a ``fork`` the child leaves its threads alone.
"""

from __future__ import annotations

import os
import sys
import threading

#: Environment variables by which a program places OpenMP threads itself.
AFFINITY_VARS = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")


def _getcpu():
    """libc's ``sched_getcpu`` as a Python callable (None where it is missing)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = ()
    return fn


def _tasks() -> set | None:
    try:
        return set(os.listdir("/proc/self/task"))
    except OSError:
        return None


class Steering:
    """The state of the steering in this process (one instance: :data:`STEER`)."""

    def __init__(self, enabled: bool, why: str):
        #: Whether the next parallel kernel goes through :meth:`run` (False: straight to numba).
        self.active = enabled
        #: A line saying what is done (``numlora bench`` prints it).
        self.state = why
        self._getcpu = _getcpu() if enabled else None
        if enabled and self._getcpu is None:
            self.active, self.state = False, "off: no sched_getcpu (Linux only)"
        self._workers = None  # thread ids (str) of numba's OpenMP workers, once seen
        self._masks = {}  # their affinity when seen
        self._owner = None  # (pid, thread ident) of the thread whose team they are
        self._cpu = -1  # the calling thread's core at its last parallel kernel
        self._lock = threading.Lock()

    def off(self, why: str) -> None:
        self.active = False
        self.state = f"off: {why}"

    def line(self) -> str:
        """What is done, in a few words (``numlora bench``'s machine line)."""
        return "workers kept off the caller's core" if self.active else f"workers not steered ({self.state[5:]})"

    def run(self, fn, args, threads: int):
        """Call ``fn(*args)`` (a parallel kernel on ``threads`` numba threads), steering first."""
        if self._workers is None:
            return self._first(fn, args, threads)
        if self._owner == (os.getpid(), threading.get_ident()):
            cpu = self._getcpu()
            if cpu != self._cpu and cpu >= 0:
                self._steer(cpu)
        return fn(*args)

    def _first(self, fn, args, threads):
        """The first parallel kernel: note the threads it creates (numba's OpenMP team)."""
        with self._lock:
            if self._workers is not None:
                return fn(*args)
            single = threading.active_count() == 1
            before = _tasks() if single else None
            try:
                return fn(*args)
            finally:
                after = _tasks() if single else None
                self._note_workers(single, before, after, threads)

    def _note_workers(self, single, before, after, threads):
        if before is None or after is None:
            self._workers = ()
            return self.off("the first parallel kernel ran beside other Python threads" if not single
                            else "/proc/self/task unreadable")
        new = sorted(after - before)
        if len(new) != threads - 1:
            self._workers = ()
            return self.off(f"numlora's first parallel kernel started {len(new)} threads, not the "
                            f"{threads - 1} workers of numba's team (its threads already ran)")
        self._workers = tuple(new)
        self._masks = {tid: os.sched_getaffinity(int(tid)) for tid in new}  # given back by _release
        self._owner = (os.getpid(), threading.get_ident())
        self.state = f"on: {len(new)} worker(s) kept off the calling thread's core"

    def _steer(self, cpu):
        """The caller is on core ``cpu`` now: every worker may run on the caller's allowed
        cores but that one."""
        try:
            allowed = os.sched_getaffinity(0) - {cpu}
            if not allowed:
                return self._release("the calling thread is allowed on one core only")
            for tid in self._workers:
                if not os.path.exists(f"/proc/self/task/{tid}"):  # never another process's thread
                    raise ProcessLookupError(f"numba worker {tid} is gone")
                os.sched_setaffinity(int(tid), allowed)
            self._cpu = cpu
        except (OSError, ValueError) as exc:
            self._release(f"{type(exc).__name__}: {exc}")

    def _release(self, why):
        """Stop steering; the workers get back the cores they had before it."""
        for tid, mask in self._masks.items():
            try:
                if os.path.exists(f"/proc/self/task/{tid}"):
                    os.sched_setaffinity(int(tid), mask)
            except OSError:
                pass
        self.off(why)


def make(enabled: bool, threads_line: str) -> Steering:
    """The process's :class:`Steering`, given ``NUMLORA_STEER_WORKERS`` and what
    ``_jit._setup_threads`` did."""
    if not enabled:
        return Steering(False, "off: NUMLORA_STEER_WORKERS=0")
    if not threads_line.startswith("omp layer, OMP_WAIT_POLICY=PASSIVE"):
        return Steering(False, "off: numlora did not start numba's threads (" + threads_line + ")")
    placed = [v for v in AFFINITY_VARS if os.environ.get(v, "").strip()]
    if placed:
        return Steering(False, f"off: the program places OpenMP threads ({', '.join(placed)} set)")
    return Steering(True, "on: waiting for numlora's first parallel kernel")
