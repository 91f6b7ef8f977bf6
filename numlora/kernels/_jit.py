"""All numba machinery in one place: how a numlora kernel is compiled, and how numba's
threads are started (before numlora's first parallel kernel; see :func:`_setup_threads`)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading
import types
import warnings

import numpy as np

from .. import _config
from . import _steer
from ._blas import DOZER, mapped_files


class _Refuse(importlib.abc.MetaPathFinder):
    """Refuses some top-level packages to one thread while it imports numba (see
    :func:`import_numba`)."""

    def __init__(self, names):
        self.names = frozenset(names)
        self.thread = threading.get_ident()

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names and threading.get_ident() == self.thread:
            raise ModuleNotFoundError(f"{name} is not imported while numlora imports numba", name=name)
        return None


class _LazyModule(types.ModuleType):
    """Stands for a module numba imported at its own import and uses rarely: imports the
    real one on first use."""

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self.__name__), attr)


def _truthy(value) -> bool:
    return str(value).strip().lower() not in ("", "0", "false", "no", "off")


def _optional_imports() -> list:
    """The packages numba imports at its own import only for features numlora's kernels
    do not use, and that are not imported yet:

    - ``scipy``: numba checks SciPy's version at import (the package alone), and
      ``numba.np.arraymath``, which numba imports before its first compile, imports
      ``scipy.linalg.cython_blas`` to learn whether jitted np.dot / np.convolve can call
      a BLAS (0.13-0.16 s, SciPy's own OpenBLAS included; see :class:`_ArraymathHook`);
    - ``coverage``: ``numba.misc.coverage_support`` imports coverage.py (0.04-0.06 s) for
      ``NUMBA_JIT_COVERAGE``, which is off unless the environment turns it on;
    - ``yaml``: ``numba.core.config`` imports PyYAML (0.01 s) to read a
      ``.numba_config.yaml``.

    coverage and yaml are imported as usual where ``NUMBA_JIT_COVERAGE`` is set or a
    ``.numba_config.yaml`` is in the working directory."""
    names = ["scipy"]
    if not _truthy(os.environ.get("NUMBA_JIT_COVERAGE", "")) and not os.path.isfile(".numba_config.yaml"):
        names += ["coverage", "yaml"]
    return [n for n in names if n not in sys.modules and importlib.util.find_spec(n) is not None]


class _ArraymathHook(importlib.abc.MetaPathFinder):
    """Imports ``numba.np.arraymath`` (once, in whichever thread first needs it: numba's
    first compile) with SciPy refused to that thread, then sets the module's BLAS flag to
    what its check would have found, SciPy being installed. User code jitted later then
    behaves as before: numba imports SciPy when it compiles a BLAS call
    (``numba.np.linalg.ensure_blas``)."""

    NAME = "numba.np.arraymath"

    def find_spec(self, name, path=None, target=None):
        if name != self.NAME:
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            return None
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderWithoutScipy(spec.loader)
        return spec


class _LoaderWithoutScipy(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, attr):  # get_source, get_filename, ... of the file loader
        return getattr(self.loader, attr)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if "scipy" in sys.modules:
            self.loader.exec_module(module)
            return
        finder = _Refuse(["scipy"])
        sys.meta_path.insert(0, finder)
        try:
            self.loader.exec_module(module)
        finally:
            sys.meta_path.remove(finder)
        if getattr(module, "_HAVE_BLAS", None) is False:
            module._HAVE_BLAS = True


def _coverage_on_demand(support) -> None:
    """numba imported without coverage.py: its coverage support re-runs with coverage
    imported the first time numba asks for the active coverage (it asks only when
    ``numba.config.JIT_COVERAGE`` is on and a function compiles)."""

    def get_active_coverage():
        support.get_active_coverage = original
        importlib.import_module("coverage")
        importlib.reload(support)  # defines coverage_available, NumbaTracer, ... as a plain import would
        return support.get_active_coverage()

    original = support.get_active_coverage
    support.get_active_coverage = get_active_coverage


def import_numba():
    """Import numba without the imports it does only for features numlora's kernels do not
    use (:func:`_optional_imports`): 0.2 s of a warm first call where SciPy and
    coverage.py are installed. Where numba is not imported yet, this thread imports it
    with those packages refused (other threads import them as usual meanwhile), then
    leaves numba as a plain import would have: ``numba.np.arraymath`` finds a BLAS where
    SciPy is installed (:class:`_ArraymathHook`); the config reads a
    ``.numba_config.yaml`` with PyYAML imported on first use; the coverage support
    imports coverage.py the first time it is asked for the active coverage."""
    if "numba" in sys.modules:
        import numba

        return numba
    refused = _optional_imports()
    finder = _Refuse(refused)
    sys.meta_path.insert(0, finder)
    try:
        import numba
        import numba.core.config as config
        import numba.misc.coverage_support as support
    finally:
        sys.meta_path.remove(finder)
    if "scipy" in refused and _ArraymathHook.NAME not in sys.modules:
        sys.meta_path.insert(0, _ArraymathHook())
    if "yaml" in refused and getattr(config, "_HAVE_YAML", None) is False:
        config.yaml = _LazyModule("yaml")
        config._HAVE_YAML = True
    if "coverage" in refused and getattr(support, "coverage_available", None) is False:
        _coverage_on_demand(support)
    return numba


numba = import_numba()

prange = numba.prange

#: Environment variables by which a user chooses numba's threads; numlora then leaves
#: numba's threading alone.
USER_THREAD_VARS = ("NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS", "OMP_WAIT_POLICY")


def _libgomp_files() -> set | None:
    """The libgomp files mapped into this process (None where that cannot be read)."""
    files = mapped_files()
    return None if files is None else {p for p in files if "libgomp" in p}


def _deep_binding_ok() -> bool:
    """Whether numba's OpenMP layer may be loaded with ``RTLD_DEEPBIND`` (glibc): its own
    dependencies looked up before the libraries already loaded. Not with ``LD_PRELOAD``
    (a preloaded allocator or sanitizer must see every library's calls)."""
    return hasattr(os, "RTLD_DEEPBIND") and not os.environ.get("LD_PRELOAD", "").strip()


def _setup_threads() -> str:
    """Start numba's thread pool before numlora's first parallel kernel, with OpenMP's
    *passive* wait policy for numba's OpenMP threads unless the user chose otherwise.

    Why: numpy's OpenBLAS threads and numba's OpenMP threads both spin on the cores for a
    while after their work. With the OpenMP default (spin, then sleep), a numlora kernel
    started right after a BLAS product, or a BLAS product right after a numlora kernel,
    waits for time slices the spinning threads hold: 3-28x slower on a 2-core machine.
    Passive threads sleep as soon as their share of a kernel is done, so nothing of
    numba's spins while numpy works (docs/performance.md has the measurements).

    ``OMP_WAIT_POLICY`` is set only while numba loads its OpenMP layer (libgomp reads it
    once, when it is loaded) and then restored, so other OpenMP runtimes loaded later
    (torch's) and child processes see the environment the user gave. Where another
    library loaded a libgomp before (torch loads its own, into the global symbol scope),
    numba's layer would bind to that copy, whose threads spin after their work: the layer
    is then loaded with ``RTLD_DEEPBIND`` (where :func:`_deep_binding_ok`), so it binds
    to its own libgomp, which reads the policy (the other copy and its threads are left
    as they are). Nothing is changed
    when the user set any of :data:`USER_THREAD_VARS`, when the program chose
    ``numba.config.THREADING_LAYER``, when numba's threads are already running, or with
    ``NUMLORA_PARALLEL=0``. Returns a line saying what was done."""
    if not _config.PARALLEL:
        return "none: serial kernels (NUMLORA_PARALLEL=0)"
    chosen = [v for v in USER_THREAD_VARS if os.environ.get(v, "").strip()]
    if chosen:
        return f"left to the user ({', '.join(chosen)} set)"
    if numba.config.THREADING_LAYER != "default":
        return f"left to the program (numba.config.THREADING_LAYER = {numba.config.THREADING_LAYER!r})"
    try:
        from numba.np.ufunc import parallel

        if parallel._is_initialized:
            return f"left as found: numba's threads were already running ({numba.threading_layer()} layer)"
        gomp_before = _libgomp_files()
        deep = bool(gomp_before) and _deep_binding_ok()
        flags = sys.getdlopenflags()
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            if deep:
                sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
            parallel._launch_threads()
        finally:
            sys.setdlopenflags(flags)
            del os.environ["OMP_WAIT_POLICY"]
        layer = numba.threading_layer()
    except Exception as exc:  # noqa: BLE001 - numba's own error surfaces at the first parallel call
        return f"not set up: {exc}"
    if layer != "omp":
        return f"{layer} layer (numba's choice; its threads sleep when idle)"
    if gomp_before:
        gomp_after = _libgomp_files() or set()
        if not (deep and gomp_after - gomp_before):
            return "omp layer; its libgomp was loaded before numlora, so its wait policy is the program's"
        return ("omp layer, OMP_WAIT_POLICY=PASSIVE for numba's OpenMP threads (their own libgomp, beside the one "
                "another library loaded before)")
    return "omp layer, OMP_WAIT_POLICY=PASSIVE for numba's OpenMP threads"


#: What :func:`_setup_threads` did in this process (``numlora bench`` prints it).
THREADS = _setup_threads()

#: Where numba's workers may wake (``_steer``; its ``state`` says what is done).
STEER = _steer.make(_config.STEER_WORKERS, THREADS)


#: Work from which numlora puts OpenBLAS's spinning workers to sleep for a parallel
#: kernel: elements of the weight for quantize / dequantize / merge (4096 x 4096 and up);
#: for the NF4 products, batches of PARK_MIN_ROWS rows and more (compute-bound: a kernel
#: sharing a core with a spinning worker ran at one thread's speed) and weight elements
#: times rows from PARK_MIN_WORK (a 1024 x 1024 weight at 8 rows). Measured in the
#: numpy + numlora block of ``numlora bench --pipeline`` (docs/performance.md, "OpenBLAS's
#: workers put to sleep, not stopped"): the training pass at batch 8 8.3-9.2 ms with 2^23
#: against 11.0-12.4 with 2^27, the batch-1 passes the same; from 2^20 the batch-1 passes
#: were slower (the next numpy product waits for its worker to wake), and at 1-4 rows on
#: 4096 x 4096 the products gained nothing (0.70-0.74 against 0.67 ms at batch 1).
PARK_MIN_ELEMS = 1 << 24
PARK_MIN_WORK = 1 << 23
PARK_MIN_ROWS = 8

#: The calling thread's pending park (``parked``: True from :func:`park_blas` until its
#: next parallel kernel returns); :data:`_blas.DOZER` counts the parks of every thread.
_LOCAL = threading.local()


def park_blas() -> bool:
    """Put OpenBLAS's spinning worker threads to sleep for the calling thread's next
    parallel kernel (``kernels._blas``: their spin timeout shortened until that kernel
    returns, when :func:`restart_blas` writes it back); True if it did.

    After a BLAS call OpenBLAS's workers spin (up to ~0.1 s; the scipy-openblas build
    numpy ships does not yield the core), and numba's worker on that core then gets
    next to nothing: a 10 ms kernel took 20 ms, one thread's time, for as long as they
    spin. The workers are not stopped (that was measured to cost the next BLAS call up to
    16 ms: see ``kernels._blas``), only sent to sleep; the next BLAS call wakes them. Done
    with ``NUMLORA_PARK_BLAS`` on (the default) and numba's kernels parallel, in any
    thread: each thread's park ends with its own next kernel, and the spin comes back when
    the last one does (another thread's BLAS call meanwhile only finds its workers asleep
    sooner)."""
    if not (_config.PARK_BLAS and _config.PARALLEL):
        return False
    if getattr(_LOCAL, "parked", False):
        return True
    if DOZER.doze():
        _LOCAL.parked = True
        return True
    return False


def restart_blas() -> None:
    """Let OpenBLAS's workers spin as long as before again, once no thread's park is
    pending (after :func:`park_blas`; called by the calling thread's parallel kernel that
    returns next). Sleeping workers stay asleep until the next BLAS call wakes them,
    where they were."""
    if getattr(_LOCAL, "parked", False):
        _LOCAL.parked = False
        DOZER.wake()


def park_before(work: int, minimum: int = PARK_MIN_ELEMS) -> None:
    """:func:`park_blas` before a parallel kernel of ``work`` weight elements (or, for the
    NF4 products, weight elements times input rows against :data:`PARK_MIN_WORK`): only
    from ``minimum`` on."""
    if work >= minimum:
        park_blas()


#: The counter of a team kernel's serial build (one slot: never written, never waited on).
_TEAM_ALONE = np.zeros(1, np.int64)


def kernel(parallel: bool = False, cache: bool = True, work=None, serial_below: int = 0, team: bool = False):
    """Decorate a kernel: lazy ``njit`` (compiled per signature on first call),
    ``parallel`` when asked and allowed, never fastmath, on-disk cache when possible
    (``cache=False`` for kernels whose code depends on a setting numba's cache key does
    not see). A parallel kernel comes as a :class:`ParallelKernel`: its serial build runs
    the calls made with one numba thread, and, given ``work`` (a function of the call's
    arguments) and ``serial_below``, the calls whose work is below that (see
    :data:`PRODUCT_SERIAL_BELOW`)."""

    def wrap(fn):
        par = parallel and _config.PARALLEL
        d = _compile(fn, par, cache=cache)
        d._numlora_cache = cache  # a serial twin is cached when its original is
        if team and not par:
            return _TeamSerial(d)
        return ParallelKernel(d, work, serial_below, team) if par else d

    return wrap


# --- Work too small for numba's threads ----------------------------------------------------
# Waking numba's sleeping threads and waiting for them costs 50-75 us on the 2-core AMD
# EPYC machine (numlora starts them with OpenMP's passive wait policy, see
# _setup_threads), more than small kernels take alone. benchmarks/bench_small_work.py,
# the 2-thread call against the serial build on one thread, back to back: a 384 x 384
# NF4 product at batch 1 103 against 28 us, 1024 x 1024 116-140 against 81 us, at
# batch 8 317-358 against 379-433 us; dequantize 1536 x 384 132-150 against 103 us,
# 1024 x 1024 218-229 against 178-268 us (memory-bound: either way from run to run);
# quantize 384^2 156 against 109 us, 1536 x 384 283 against 363 us; merge + unmerge
# 384^2 266 against 142 us, 1024^2 1252 against 1786 us. Below these thresholds the
# serial build runs (the same bits):

#: NF4 products (forward, input gradient, 16-bit compute dtypes): weight elements x rows.
PRODUCT_SERIAL_BELOW = 1 << 22
#: Whole-weight dequantize: elements.
DECODE_SERIAL_BELOW = 1 << 20
#: Quantize and merge / unmerge: weight elements.
ELEMENTWISE_SERIAL_BELOW = 1 << 18


def product_work(*args) -> int:
    """Work of an NF4 product kernel ``(packed, ..., y)``: weight elements (two per packed
    byte) times the rows of its output (1 for a vector)."""
    y = args[-1]
    return 2 * args[0].size * (y.shape[0] if y.ndim == 2 else 1)


def first_size(*args) -> int:
    """Work of a kernel over its first array (the weight to quantize or merge into)."""
    return args[0].size


def last_size(*args) -> int:
    """Work of a kernel that fills its last array (a dequantize)."""
    return args[-1].size


def _threads_getter():
    """numba's thread count of the calling thread (what ``numba.get_num_threads()``
    returns), as a function: numba's own getter once its threads run (0.1 us a call
    against 1 us through ``numba.get_num_threads``, which checks the pool each time)."""
    n = numba.get_num_threads()  # starts numba's threads if they are not running yet
    from numba.np.ufunc import parallel

    fn = getattr(parallel, "_get_num_threads", None)
    try:
        ok = fn is not None and fn() == n
    except Exception:  # noqa: BLE001 - a numba without that getter: the public one
        ok = False
    return fn if ok else numba.get_num_threads


_NUM_THREADS = []


def num_threads() -> int:
    """numba's thread count for the calling thread (``numba.set_num_threads`` is per
    thread)."""
    if not _NUM_THREADS:
        _NUM_THREADS.append(_threads_getter())
    return _NUM_THREADS[0]()


class ParallelKernel:
    """A kernel compiled with ``parallel=True``, and its serial build for the calls made
    with one numba thread (``numba.set_num_threads(1)`` in the calling thread, or
    ``NUMBA_NUM_THREADS=1``) and, where the kernel declares its work, for calls too small
    to pay for waking numba's threads (``NUMLORA_SMALL_SERIAL``). A program that runs
    numlora on one thread (a worker process of a pool, ``numlora demo``) compiles and runs
    the plain loops, without numba's parallel runtime. The serial build is the same code
    (:func:`serial_twin`), every task's operations in the same order, so the results are
    the same bits.

    Why: numba's parallel compilation of a ``prange`` kernel (its parfor passes and the
    gufunc they generate) takes 2-4x the time of the plain loops for numlora's SIMD
    kernels, measured (``nf4_matmul_simd`` 2.67 against 0.91 s; the cold ``numlora demo``
    spent 12 of its 14 s compiling). Each build is compiled on first use only, and cached
    on disk under its own name.

    A *team* kernel (``team=True``, see :mod:`numlora.kernels._team`) takes two more
    arguments, appended here at each call: a fresh one-element int64 counter and the slot
    count (numba's thread count; 1 for the serial build).

    Calls go through ``__call__`` (0.2-0.3 us more than the dispatcher itself); every
    other attribute is the parallel dispatcher's."""

    __slots__ = ("parallel", "_serial", "_name", "_work", "_below", "_team")

    def __init__(self, dispatcher, work=None, serial_below=0, team=False):
        self.parallel = dispatcher
        self._serial = None
        self._name = getattr(dispatcher, "py_func", dispatcher).__qualname__
        self._work = work
        self._below = serial_below if work is not None else 0
        self._team = team

    @property
    def serial(self):
        """The serial build (a numba dispatcher, made on first use)."""
        if self._serial is None:
            self._serial = serial_twin(self.parallel)
        return self._serial

    def __call__(self, *args):
        if DOZER.depth and getattr(_LOCAL, "parked", False):  # OpenBLAS's workers asleep for this kernel
            try:
                return self._run(args)
            finally:
                restart_blas()
        return self._run(args)

    def _run(self, args):
        n = num_threads()
        if n == 1 or (self._below and _config.SMALL_SERIAL and self._work(*args) < self._below):
            return self.serial(*args, _TEAM_ALONE, 1) if self._team else self.serial(*args)
        if self._team:
            args = args + (np.zeros(1, np.int64), n)
        if STEER.active:
            return STEER.run(self.parallel, args, n)
        return self.parallel(*args)

    def __getattr__(self, name):
        return getattr(self.parallel, name)

    def __repr__(self):
        return f"ParallelKernel({self._name})"


class _TeamSerial:
    """A team kernel compiled without ``parallel`` (``NUMLORA_PARALLEL=0``): called with
    one slot."""

    __slots__ = ("dispatcher",)

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher

    def __call__(self, *args):
        return self.dispatcher(*args, _TEAM_ALONE, 1)

    def __getattr__(self, name):
        return getattr(self.dispatcher, name)


def serial_twin(dispatcher):
    """The same kernel compiled without ``parallel``: for small work called right after
    a BLAS call, where waking numba's threads while OpenBLAS's threads still spin costs
    more than the work itself.

    numba's cache index does not tell a parallel build of a function from a serial one
    (it names its files after the function's qualified name and line), so the twin is
    compiled from a copy of the function named ``<name>_serial``: cached on disk under
    its own name, it never shares (or clashes with) the original's entries."""
    if isinstance(dispatcher, ParallelKernel):
        return dispatcher.serial
    fn = getattr(dispatcher, "py_func", dispatcher)
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__,
                              fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__module__ = fn.__module__
    twin.__doc__ = fn.__doc__
    return _compile(twin, False, cache=getattr(dispatcher, "_numlora_cache", True))


def _kernels_stamp() -> tuple:
    """(name, mtime_ns, size) of every source file of this folder."""
    folder = os.path.dirname(os.path.abspath(__file__))
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            out.append((name, st.st_mtime_ns, st.st_size))
    return tuple(out)


#: Folded into every cached kernel's source stamp (see :func:`_stamp_with_folder`).
KERNELS_STAMP = _kernels_stamp()


def _stamp_with_folder(dispatcher) -> None:
    """numba keys a cached kernel by its own source file's time and size only, so an edit
    to a helper or LLVM intrinsic in another file (``_simd.py``, ``nf4.py``'s inlined
    decoders) would leave stale machine code in the cache. Every kernel's stamp also
    carries the stamps of all files of ``numlora/kernels``: any edit there recompiles
    (an installed package never changes, so users never pay for it)."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if cache_file is not None and hasattr(cache_file, "_source_stamp"):
        cache_file._source_stamp = (cache_file._source_stamp, KERNELS_STAMP)


rtsys = None


def _load_cached(cache, sig, target_context):
    """numba's ``Cache.load_overload`` without its ``target_context.refresh()``.

    The refresh installs every typing and lowering registry of numba's CPU target (0.1 s
    on a process's first call); loading machine code from the cache uses none of them
    (unpickle, link the object code, wrap its entry point). What loading does need is
    numba's runtime (NRT: its C helpers in LLVM's symbol table, its atomic functions
    compiled), which the refresh starts first, and the hash secrets that
    ``numba.cpython.hashing`` puts in the symbol table at import. A compile still
    refreshes (numba's compiler does it before typing), so a cache miss compiles as
    before."""
    rtsys.initialize(target_context)
    with cache._guard_against_spurious_io_errors():
        return cache._load_overload(sig, target_context)


#: The newest numba whose cache loading :func:`_load_cached` was checked against (what a
#: load needs besides the refresh). A newer numba loads numlora's kernels its own way
#: until someone checks it and raises this (tests/test_process.py says so).
DEFER_REFRESH_UP_TO = (0, 68)


def _numba_minor() -> tuple:
    try:
        return tuple(int(p) for p in numba.__version__.split(".")[:2])
    except ValueError:
        return (99, 0)


#: Whether numlora's cached kernels load through :func:`_load_cached` (this numba checked).
DEFER_REFRESH = _numba_minor() <= DEFER_REFRESH_UP_TO


def _defer_refresh(dispatcher) -> None:
    global rtsys
    if not DEFER_REFRESH:
        return
    if rtsys is None:
        import numba.cpython.hashing  # noqa: F401  (symbols only; see _load_cached)
        from numba.core.runtime import rtsys

    cache = getattr(dispatcher, "_cache", None)
    if hasattr(cache, "_load_overload") and hasattr(cache, "_guard_against_spurious_io_errors"):
        cache.load_overload = types.MethodType(_load_cached, cache)


def _compile(fn, par, cache=True):
    if cache and _config.CACHE:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", numba.NumbaWarning)
                d = numba.njit(parallel=par, cache=True, nogil=True)(fn)
            _stamp_with_folder(d)
            _defer_refresh(d)
            return d
        except RuntimeError:
            # numba found no writable cache location (read-only install and no
            # usable NUMBA_CACHE_DIR): compile in memory instead.
            pass
    return numba.njit(parallel=par, cache=False, nogil=True)(fn)


def inline_helper(fn):
    """A small scalar helper called from kernels (inlined by LLVM, not cached alone)."""
    return numba.njit(inline="always", nogil=True)(fn)
