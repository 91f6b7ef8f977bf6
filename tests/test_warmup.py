"""``numlora warmup`` fills numba's on-disk cache so that a later process compiles nothing.
The full check compiles every kernel into an empty cache (tens of seconds on 2 cores):
marked slow."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from numlora import _config, cli, warmup
from numlora.errors import NumloraError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Runs every warmup job in this process and lists numba's compile events of numlora's
#: functions (a kernel loaded from the cache raises none). numba's own helpers are left
#: out: the LoraBank hands its blocks to the kernel as a numba typed list, whose helpers
#: numba compiles in every process (its own code, not cacheable from outside).
COUNT_COMPILES = r"""
import json
import sys
import numba.core.event as ev
from numlora.warmup import JOBS, run_job

class Count(ev.Listener):
    def __init__(self):
        self.names = []
    def on_start(self, event):
        fn = getattr(event.data.get("dispatcher"), "py_func", None)
        if fn is None or fn.__module__.startswith("numlora"):
            self.names.append(f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}")
    def on_end(self, event):
        pass

c = Count()
ev.register("numba:compile", c)
only = set(sys.argv[1:])  # job names to run (default: every job)
for name, _ in JOBS:
    if not only or name in only:
        run_job(name)
print(json.dumps(c.names))
"""


def _env(cache_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMLORA_CACHE", "NUMBA_DISABLE_JIT")}
    env["NUMBA_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _compiles(cache_dir, *jobs):
    r = subprocess.run([sys.executable, "-c", COUNT_COMPILES, *jobs], env=_env(cache_dir), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_warmup_fills_the_cache_and_a_later_process_compiles_nothing(tmp_path, monkeypatch):
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    bar = io.StringIO()
    seconds = warmup.warmup(jobs=2, progress=True, stream=bar)
    assert set(seconds) == {name for name, _ in warmup.JOBS}
    assert "100.0%" in bar.getvalue()
    assert any(f.endswith(".nbi") for _, _, files in os.walk(tmp_path) for f in files)
    assert _compiles(tmp_path) == []


@pytest.mark.slow
def test_without_warmup_the_same_process_compiles(tmp_path):
    # the control of the test above: the count sees compiles when there are some (two
    # jobs into an empty cache: every job would take a minute on 2 cores to show the same)
    names = _compiles(tmp_path / "empty", "rng", "nf4_matmul_t")
    assert any(n.startswith("numlora.kernels.rng.") for n in names), names
    assert any(n.startswith("numlora.kernels.nf4.nf4_matmul_t") for n in names), names


def test_warmup_refuses_when_the_cache_is_off(monkeypatch):
    monkeypatch.setattr(_config, "CACHE", False)
    with pytest.raises(NumloraError, match="NUMLORA_CACHE=0"):
        warmup.warmup(jobs=1)


def test_a_failing_job_is_reported_by_name(monkeypatch, tmp_path):
    monkeypatch.setattr(warmup, "JOBS", (("no_such_job", "a job the worker does not know"),))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    with pytest.raises(NumloraError, match="job no_such_job failed: KeyError"):
        warmup.warmup(jobs=1, progress=False)


def test_cli_refuses_zero_jobs(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["warmup", "--jobs", "0"])
    assert e.value.code == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err


COUNT_DEQUANT_COMPILES = r"""
import json
import numba.core.event as ev
import numpy as np
import numlora

names = []

class Count(ev.Listener):
    def on_start(self, event):
        fn = getattr(event.data.get("dispatcher"), "py_func", None)
        if fn is not None and fn.__module__.startswith("numlora"):
            names.append(fn.__qualname__)
    def on_end(self, event):
        pass

ev.register("numba:compile", Count())
t = numlora.quantize_nf4(np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 64))
numlora.dequantize_nf4(t)
print(json.dumps([numlora.__file__, names]))
"""


def test_an_edit_to_any_kernel_file_recompiles_the_cached_kernels(tmp_path):
    """numba keys its cache by the kernel's own file only; numlora folds the stamps of
    every file of numlora/kernels in, so an edit to an intrinsic in _simd.py (called by the
    kernels of nf4.py) cannot leave stale machine code in the cache."""
    import shutil

    if _config.__dict__.get("CACHE") is False:
        pytest.skip("NUMLORA_CACHE=0")
    copy = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "numlora"), copy / "numlora", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("NUMLORA_CACHE", "NUMBA_DISABLE_JIT")}
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(copy)

    def run():
        r = subprocess.run([sys.executable, "-c", COUNT_DEQUANT_COMPILES], env=env, capture_output=True, text=True,
                           timeout=600, cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
        where, names = json.loads(r.stdout.strip().splitlines()[-1])
        assert where.startswith(str(copy)), where  # the copy, not the checkout
        return names

    first = run()
    assert len(first) >= 2  # quantize and dequantize kernels compiled into the empty cache
    assert run() == []  # loaded from the cache
    simd = copy / "numlora" / "kernels" / "_simd.py"
    simd.write_text(simd.read_text() + "\n# edited\n")
    assert sorted(run()) == sorted(first)  # the same kernels again: the edit made the cache stale
    assert run() == []
