"""numlora starts numba's threads with OpenMP's passive wait policy (numlora.kernels._jit),
unless the user chose numba's threading: each case runs in a fresh process, because
libgomp reads its settings once, when it is loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from numlora.kernels._jit import USER_THREAD_VARS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import ctypes, json, os, sys, time
preload = os.environ.get("PROBE_PRELOAD_GOMP")
if preload:  # another library's libgomp, loaded first into the global scope (as torch does)
    ctypes.CDLL(preload, mode=os.RTLD_GLOBAL)
import numpy as np
import numlora as nl
w = np.ones((1024, 1024), np.float32)
nl.quantize_nf4(w)  # a parallel kernel ran (above the small-work size)
spins = []
for _ in range(3):  # a spinning runtime spins after every kernel: the least of three still shows it
    nl.quantize_nf4(w)
    c1 = time.process_time()
    time.sleep(0.2)
    spins.append(1e3 * (time.process_time() - c1))  # CPU time of all threads while the program sleeps
spin_ms = min(spins)
import numba
from numlora.kernels import _jit
try:
    layer = numba.threading_layer()
except ValueError:  # numba's threads never started
    layer = "none"
spin = None
gomps = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line})
if layer == "omp":
    path = next((p for p in gomps if not preload or not os.path.samefile(p, preload)), gomps[0])
    r, w = os.pipe()
    saved = os.dup(2)
    os.dup2(w, 2)
    ctypes.CDLL(path).omp_display_env(1)  # libgomp's settings, as it read them
    os.dup2(saved, 2)
    os.close(w)
    text = os.read(r, 1 << 16).decode()
    spin = next(line.split("=")[1].strip().strip("'") for line in text.splitlines() if "GOMP_SPINCOUNT" in line)
print(json.dumps({"layer": layer, "threads": _jit.THREADS, "spincount": spin, "gomps": gomps,
                  "spin_ms": spin_ms, "spins_ms": spins, "env_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))
"""


def clean_env(**env):
    """This process's environment without the thread settings (a fresh process chooses),
    plus ``env``, with the checkout on PYTHONPATH."""
    # NUMBA_DISABLE_JIT (the coverage run of .ci/run) would leave numba without threads
    drop = USER_THREAD_VARS + ("NUMLORA_PARALLEL", "GOMP_SPINCOUNT", "NUMBA_DISABLE_JIT")
    clean = {k: v for k, v in os.environ.items() if k not in drop}
    clean.update(env)
    clean["PYTHONPATH"] = ROOT + os.pathsep + clean.get("PYTHONPATH", "")
    return clean


def probe(**env):
    r = subprocess.run([sys.executable, "-c", PROBE], env=clean_env(**env), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_run():
    got = probe()
    if got["layer"] != "omp":
        pytest.skip(f"numba chose the {got['layer']} layer here; the wait policy concerns OpenMP only")
    return got


def test_numba_openmp_threads_are_passive_by_default(default_run):
    assert default_run["spincount"] == "0"  # what libgomp sets for OMP_WAIT_POLICY=PASSIVE
    assert "PASSIVE" in default_run["threads"]


def test_passive_threads_do_not_spin_after_a_kernel(default_run):
    # libgomp's default spins for about 300,000 rounds (milliseconds of CPU) after each kernel
    assert default_run["spin_ms"] < 2.0


def test_another_librarys_libgomp_loaded_first_leaves_numbas_threads_passive(default_run, tmp_path):
    # torch ships its own libgomp and loads it into the global symbol scope before numlora's
    # first kernel: numba's OpenMP layer would bind to that copy (spinning threads) unless
    # it is bound to its own, which read the passive policy
    if not hasattr(os, "RTLD_DEEPBIND"):
        pytest.skip("no RTLD_DEEPBIND here (not glibc)")
    private = tmp_path / "private" / "libgomp.so.1"
    private.parent.mkdir()
    shutil.copyfile(default_run["gomps"][0], private)
    got = probe(PROBE_PRELOAD_GOMP=str(private))
    assert len(got["gomps"]) == 2  # the private copy and numba's own
    assert "PASSIVE" in got["threads"] and "beside" in got["threads"]
    assert got["spincount"] == "0"
    assert got["spin_ms"] < 2.0  # numba's threads use their own libgomp: they sleep


def test_numbas_own_libgomp_loaded_first_keeps_the_programs_policy(default_run):
    # the same file numba's layer needs, loaded before: numba shares it, as it read its settings
    got = probe(PROBE_PRELOAD_GOMP=default_run["gomps"][0])
    assert len(got["gomps"]) == 1
    assert "program's" in got["threads"]
    assert got["spincount"] == "300000"
    # and the probe sees that spinning (the checks above can fail): after at least one of
    # the three kernels (the least of three read 1.76 ms once, in a CI run sharing the two
    # cores with another process; 8.5-9.8 ms each time otherwise)
    assert max(got["spins_ms"]) > 2.0


def test_the_environment_is_restored_after_numba_loaded_openmp(default_run):
    # later OpenMP runtimes (torch's) and child processes see the user's environment
    assert default_run["env_wait_policy"] is None


def test_an_explicit_wait_policy_is_kept(default_run):
    got = probe(OMP_WAIT_POLICY="active")
    assert got["spincount"] not in ("0", "300000")  # active: libgomp spins (practically) forever
    assert "left to the user" in got["threads"] and "OMP_WAIT_POLICY" in got["threads"]
    assert got["env_wait_policy"] == "active"


def test_an_explicit_thread_count_leaves_openmp_at_its_default(default_run):
    got = probe(NUMBA_NUM_THREADS="2")
    assert got["spincount"] == "300000"  # libgomp's own default: spin, then sleep
    assert "left to the user" in got["threads"]


def test_an_explicit_threading_layer_is_kept():
    got = probe(NUMBA_THREADING_LAYER="workqueue")
    assert got["layer"] == "workqueue"
    assert "left to the user" in got["threads"] and "NUMBA_THREADING_LAYER" in got["threads"]


def test_the_bench_starts_numbas_threads_after_torch_each_with_its_own_runtime(default_run):
    # imported after numba's threads started, torch shares numba's passive libgomp (its
    # users' threads spin); numba's layer started after torch without numlora's setup
    # shares torch's spinning one: the bench imports torch first, then starts numba's
    code = ("import sys\n"
            "from numlora.bench.harness import machine, start_threads\n"
            "line = start_threads(peers=True)\n"
            "from numba.np.ufunc import parallel\n"
            "gomps = {l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}\n"
            "import glob, os\n"
            "own = 'torch' in sys.modules and bool(glob.glob(os.path.join(os.path.dirname(\n"
            "    sys.modules['torch'].__file__), 'lib', 'libgomp*')))\n"
            "print(parallel._is_initialized, own, len(gomps))\n"
            "print(line)\n"
            "print(machine())\n")
    r = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    flags, line, mach = r.stdout.strip().splitlines()[-3:]
    started, torch_own_gomp, n_gomp = flags.split()
    assert started == "True"
    assert "PASSIVE" in line
    if torch_own_gomp == "True":  # torch installed with its own libgomp (the pip wheels)
        assert int(n_gomp) == 2 and "beside" in line
    assert line in mach  # the tables' machine line says how numba's threads run


@pytest.mark.slow
def test_threads_numba_already_started_are_left_alone():
    code = ("import numba, numpy as np\n"
            "@numba.njit(parallel=True)\n"
            "def f(a):\n"
            "    for i in numba.prange(a.size):\n"
            "        a[i] += 1\n"
            "f(np.zeros(10))\n" + PROBE)
    env = {k: v for k, v in os.environ.items() if k not in USER_THREAD_VARS + ("NUMLORA_PARALLEL",)}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert "already running" in got["threads"]
    if got["layer"] == "omp":
        assert got["spincount"] == "300000"


@pytest.mark.slow
def test_serial_kernels_leave_numba_alone():
    # no on-disk cache: numba's cache index does not tell serial builds from parallel ones
    got = probe(NUMLORA_PARALLEL="0", NUMLORA_CACHE="0")
    assert "NUMLORA_PARALLEL=0" in got["threads"]
    assert got["layer"] == "none"  # numba's threads were never started


PARK_PROBE = r"""
import json, os, threading, time
import numpy as np
from numlora.kernels import _blas, _jit

main = str(threading.get_native_id())


def states():  # the scheduler state of every thread but this one
    out = []
    for tid in os.listdir("/proc/self/task"):
        if tid != main:
            try:
                out.append(open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[0])
            except OSError:
                pass
    return out


def settle(running):  # until at most `running` threads run (up to 40 ms: a spinning worker
    # sleeps by itself after OpenBLAS's own timeout, ~0.1 s); the count then
    end = time.monotonic() + 0.04
    while states().count("R") > running and time.monotonic() < end:
        time.sleep(0.001)
    return states().count("R")


a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
before = a @ a  # OpenBLAS's workers spin after it
cells = _blas.DOZER.cells()
out = {"found": len(cells), "own": [c.value for c in cells], "spinning": states().count("R"),
       "threads": len(states())}
# two threads' parks: the spin comes back when the last one ends, each ending its own
done, go = threading.Event(), threading.Event()
seen = {}


def other():
    seen["parked"] = _jit.park_blas()
    done.set()
    go.wait()
    _jit.restart_blas()


th = threading.Thread(target=other)
th.start()
done.wait()
out["other_parked"] = seen["parked"]
out["own_park_too"] = _jit.park_blas()
_jit.restart_blas()  # this thread's: the other's still pending
out["one_pending"] = [c.value for c in cells]
_jit.restart_blas()  # a second call here ends nothing (the other thread's park is its own)
out["still_pending"] = [c.value for c in cells]
go.set()
th.join()
out["none_pending"] = [c.value for c in cells]
a @ a
out["parked"] = _jit.park_blas()
out["short"] = [c.value for c in cells]
out["spinning_parked"] = settle(0)
out["threads_parked"] = len(states())  # asleep, not gone
_jit.restart_blas()
out["restored"] = [c.value for c in cells]
again = a @ a  # wakes them
out["same_bits"] = bool(np.array_equal(before.view(np.uint32), again.view(np.uint32)))
out["spinning_again"] = states().count("R")
# a parallel kernel that returns after a park lets them spin again
_jit.park_blas()
from numlora.kernels import nf4 as k
x = np.linspace(-1, 1, 1 << 16, dtype=np.float32)
packed, absmax = np.empty(1 << 15, np.uint8), np.empty(1 << 10, np.float32)
k.nf4_quantize_simd(x, x.view(np.int32), 64, np.zeros(16, np.float32), packed, absmax, absmax.view(np.int32)) \
    if k.SIMD_LANES else k.nf4_dequantize_range(np.zeros(8, np.uint8), np.ones(1, np.float32), 16,
                                                np.zeros(16, np.float32), 0, 16, np.empty(16, np.float32))
out["after_kernel"] = [c.value for c in cells]
out["pending"] = bool(_blas.DOZER.depth)
print(json.dumps(out))
"""


def _park_probe(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("NUMLORA_PARK_BLAS", "NUMBA_DISABLE_JIT",
                                                             "NUMLORA_PARALLEL")}
    full.update(OPENBLAS_NUM_THREADS="2", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    r = subprocess.run([sys.executable, "-c", PARK_PROBE], env=full, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if not out["found"] or out["spinning"] < 1:
        pytest.skip("numpy's BLAS here is not a multi-threaded OpenBLAS whose spin timeout numlora can find")
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds OpenBLAS through /proc/self/maps")
def test_openblas_workers_sleep_through_a_parked_kernel_and_spin_again_after():
    out = _park_probe()
    own = out["own"]
    assert all(v >= 16 and v & (v - 1) == 0 for v in own)
    assert out["other_parked"] is True and out["own_park_too"] is True
    assert out["one_pending"] == out["still_pending"] == [16] * len(own)  # the other thread's park holds
    assert out["none_pending"] == own  # and its end brings the spin back
    assert out["parked"] is True and out["short"] == [16] * len(own)
    assert out["spinning_parked"] == 0 and out["threads_parked"] == out["threads"]  # asleep, still there
    assert out["restored"] == own and out["same_bits"]
    assert out["spinning_again"] >= 1  # the next BLAS call woke them and they spin as before
    assert out["after_kernel"] == own and out["pending"] is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds OpenBLAS through /proc/self/maps")
def test_numlora_park_blas_0_leaves_openblas_alone():
    out = _park_probe(NUMLORA_PARK_BLAS="0")
    assert out["parked"] is False and out["short"] == out["own"] and out["restored"] == out["own"]


def test_elf_symbols_reads_the_symbol_table(tmp_path):
    from numlora.kernels import _blas

    paths = sorted(_blas._openblas_paths())
    if paths:
        syms = _blas.elf_symbols(paths[0], ("blas_thread_shutdown_", "thread_timeout", "no_such_symbol"))
        assert "no_such_symbol" not in syms
        if "thread_timeout" in syms:
            assert syms["thread_timeout"][1:] == (4, 1)  # a 4-byte object
            assert syms["blas_thread_shutdown_"][2] == 2  # a function
    junk = tmp_path / "libopenblas_fake.so"
    junk.write_bytes(b"\x7fELF\x02\x01" + bytes(58))  # an ELF header with no sections
    assert _blas.elf_symbols(str(junk), ("thread_timeout",)) == {}
    junk.write_bytes(b"not an ELF file at all")
    assert _blas.elf_symbols(str(junk), ("thread_timeout",)) == {}
    assert _blas._timeout_of(str(junk)) is None


STEER_PROBE = r"""
import json, os, threading
import numpy as np
import numlora as nl
from numlora.kernels import _jit

S = _jit.STEER
cores = sorted(os.sched_getaffinity(0))
if os.environ.get("PROBE_OTHER_THREAD"):  # a second Python thread alive at the first parallel kernel
    ev = threading.Event()
    other = threading.Thread(target=ev.wait)
    other.start()
out = {"before": S.state, "line": S.line()}
t = nl.quantize_nf4(np.linspace(-1, 1, 1024 * 1024, dtype=np.float32).reshape(1024, 1024))  # parallel
if os.environ.get("PROBE_OTHER_THREAD"):
    ev.set()
    other.join()
x = np.linspace(-1, 1, 8 * 1024, dtype=np.float32).reshape(8, 1024)
ref = nl.nf4_matmul(x, t)
out["state"] = S.state
workers = [int(w) for w in S._workers or ()]
new = sorted(set(os.listdir("/proc/self/task")) - {str(threading.get_native_id())})
out["workers"] = len(workers)
out["masks_after_first"] = [sorted(os.sched_getaffinity(int(w))) for w in new]
moves = []
if S.active:
    for c in cores[1::-1] * 2:  # ends on cores[0], the workers kept on the others
        for _ in range(5):  # (the scheduler may move the caller between the two calls: again)
            os.sched_setaffinity(0, {c})  # the caller now runs on core c,
            os.sched_setaffinity(0, set(cores))  # and may run on all of them again
            y = nl.nf4_matmul(x, t)
            if S._cpu == c:
                break
        moves.append({"seen": S._cpu, "masks": [sorted(os.sched_getaffinity(w)) for w in workers],
                      "same": bool(np.array_equal(y.view(np.uint32), ref.view(np.uint32)))})
    os.sched_setaffinity(0, {cores[1]})  # the caller confined to the workers' core: steering stops
    y = nl.nf4_matmul(x, t)
    out["confined"] = {"state": S.state, "masks": [sorted(os.sched_getaffinity(w)) for w in workers],
                       "same": bool(np.array_equal(y.view(np.uint32), ref.view(np.uint32)))}
out["moves"] = moves
out["cores"] = cores
print(json.dumps(out))
"""


def _steer_probe(**env):
    r = subprocess.run([sys.executable, "-c", STEER_PROBE], env=clean_env(**env), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if len(out["cores"]) < 2:
        pytest.skip("one core: numba runs numlora's kernels serial, no worker to steer")
    return out


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread affinity through Linux's API")


@pytest.mark.slow
@linux_only
def test_numbas_workers_are_kept_off_the_callers_core(default_run):
    out = _steer_probe()
    assert out["before"].startswith("on: waiting") and out["line"] == "workers kept off the caller's core"
    # numba's default: a thread per core, the caller one of them, so one worker less
    assert out["state"].startswith("on:") and out["workers"] == len(out["cores"]) - 1
    seen = set()
    for m in out["moves"]:
        assert m["same"]  # the same bits wherever the threads ran
        assert all(mask == sorted(set(out["cores"]) - {m["seen"]}) for mask in m["masks"]), m
        seen.add(m["seen"])
    assert seen == set(out["cores"][:2])  # the caller was seen on both cores, the workers followed
    confined = out["confined"]
    assert confined["state"] == "off: the calling thread is allowed on one core only"
    # the workers get back the cores they had
    assert confined["same"] and all(mask == out["cores"] for mask in confined["masks"])


@pytest.mark.slow
@linux_only
@pytest.mark.parametrize("env, why", [
    ({"NUMLORA_STEER_WORKERS": "0"}, "off: NUMLORA_STEER_WORKERS=0"),
    ({"OMP_PROC_BIND": "false"}, "off: the program places OpenMP threads (OMP_PROC_BIND set)"),
    ({"NUMBA_NUM_THREADS": "2"}, "off: numlora did not start numba's threads (left to the user"),
    ({"PROBE_OTHER_THREAD": "1"}, "off: the first parallel kernel ran beside other Python threads"),
])
def test_workers_are_left_where_the_program_or_the_user_put_them(default_run, env, why):
    out = _steer_probe(**env)
    assert out["state"].startswith(why), out["state"]
    assert out["moves"] == [] and "confined" not in out
    # no thread's affinity touched (numba's workers, OpenBLAS's)
    assert all(mask == out["cores"] for mask in out["masks_after_first"])
