"""The asv suite (asv_bench/benchmarks) runs, not only imports: every benchmark class is
set up and every ``time_`` / ``peakmem_`` method called once at a tiny N, as asv would,
so a broken benchmark fails CI (flox does the same). CUDA benchmarks must skip cleanly
(``NotImplementedError`` in setup) without a GPU. ``timeraw_`` benchmarks return code
that asv runs in fresh processes: checked to compile, not run (seconds each)."""

from __future__ import annotations

import importlib
import itertools
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_SMOKE = "128"


def _modules():
    folder = os.path.join(ROOT, "asv_bench", "benchmarks")
    return sorted(n[:-3] for n in os.listdir(folder) if n.startswith("bench_") and n.endswith(".py"))


@pytest.fixture(scope="module")
def asv_package(monkeypatch_module):
    monkeypatch_module.setenv("NUMLORA_ASV_N", N_SMOKE)
    monkeypatch_module.syspath_prepend(os.path.join(ROOT, "asv_bench"))
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        del sys.modules[name]
    yield
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _cases(cls):
    params = getattr(cls, "params", None)
    if params is None:
        return [()]
    if not all(isinstance(p, list) for p in params):  # asv: a flat list is one parameter's values
        params = [params]
    return list(itertools.product(*params))


@pytest.mark.slow
@pytest.mark.parametrize("module", _modules())
def test_every_benchmark_runs_once(asv_package, module):
    mod = importlib.import_module(f"benchmarks.{module}")
    assert mod.N == int(N_SMOKE) if hasattr(mod, "N") else True
    ran = skipped = 0
    for cls in [c for c in vars(mod).values() if isinstance(c, type) and c.__module__ == mod.__name__]:
        methods = [m for m in vars(cls) if m.startswith(("time_", "peakmem_", "track_", "timeraw_", "mem_"))]
        if not methods:
            continue
        assert not any(m.startswith("track_") for m in methods), \
            f"{cls.__name__}: time_ benchmarks only (asv reads track_ as lower-is-better)"
        for case in _cases(cls):
            obj = cls()
            try:
                if hasattr(obj, "setup"):
                    obj.setup(*case)
            except NotImplementedError:
                assert module == "bench_cuda", f"{cls.__name__}{case} skipped without being a CUDA benchmark"
                skipped += 1
                continue
            for m in methods:
                result = getattr(obj, m)(*case)
                if m.startswith("timeraw_"):
                    code = result if isinstance(result, str) else result[0]
                    compile(code, f"{cls.__name__}.{m}", "exec")
                ran += 1
            if hasattr(obj, "teardown"):
                obj.teardown(*case)
    for name, fn in vars(mod).items():
        if callable(fn) and name.startswith("timeraw_"):
            result = fn()
            for code in ([result] if isinstance(result, str) else result):
                compile(code, name, "exec")
            ran += 1
    assert ran + skipped > 0


def test_asv_config_pins_threads_and_size():
    import json
    import re

    with open(os.path.join(ROOT, "asv_bench", "asv.conf.json")) as f:
        conf = json.loads(re.sub(r"^\s*//.*$", "", f.read(), flags=re.M))
    env = conf["matrix"]["env_nobuild"]
    for var in ("NUMLORA_ASV_N", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        assert var in env and all(str(v).isdigit() for v in env[var]), var
