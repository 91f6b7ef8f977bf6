"""Behaviour that needs a fresh process: import cost, thread-count independence."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import JIT_DISABLED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, cwd=None, drop=(), **env):
    """stdout of ``code`` in a fresh interpreter: this environment less ``drop``, plus ``env``."""
    e = {k: v for k, v in os.environ.items() if k not in drop}
    e.update(env)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                       timeout=600, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_import_compiles_nothing_and_skips_numba():
    out = _run("""
        import sys, numlora
        print(int('numba' in sys.modules), int(any(m.startswith('numlora.kernels') for m in sys.modules)))
    """)
    assert out.split() == ["0", "0"]


NO_SCIPY = """
    import sys, numpy as np, numlora
    numlora.quantize_nf4(np.ones((64, 64), np.float32))  # loads numba and a kernel
    loaded = 'scipy' in sys.modules
    import numba, numba.np.arraymath as am

    @numba.njit
    def f(a, b):
        return np.dot(a, b), np.convolve(a, b)

    a = np.arange(1.0, 6.0)
    d, c = f(a, a)
    print(int(loaded), int(am._HAVE_BLAS), int(d == a @ a), int(np.array_equal(c, np.convolve(a, a))))
"""


def test_loading_numba_skips_scipy_and_leaves_numba_as_it_would_be():
    """numlora imports numba without SciPy (numba imports it only to look for a BLAS);
    numba's flag must then say what a plain ``import numba`` finds, and jitted BLAS
    calls of user code must still work (numba imports SciPy when it compiles one)."""
    pytest.importorskip("scipy")
    plain = _run("import numba.np.arraymath as am; print(int(am._HAVE_BLAS))").split()
    assert _run(NO_SCIPY).split() == ["0"] + plain + ["1", "1"]


def test_scipy_is_refused_only_to_the_thread_importing_numba():
    import threading

    from numlora.kernels._jit import _Refuse

    finder = _Refuse(["scipy"])
    with pytest.raises(ModuleNotFoundError, match="scipy.linalg"):
        finder.find_spec("scipy.linalg")
    assert finder.find_spec("scipyx") is None and finder.find_spec("numpy") is None
    seen = []
    t = threading.Thread(target=lambda: seen.append(finder.find_spec("scipy")))
    t.start()
    t.join()
    assert seen == [None]


# A cached kernel's first call: numba loads it without its target's registries (numpy's
# array implementations among them) and without coverage.py / PyYAML; a compile afterwards
# loads them. The first process fills the cache (or finds it filled).
WARM_CALL = """
    import sys, numpy as np, numlora
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    t = numlora.quantize_nf4(w)
    print(int('numba.np.arrayobj' in sys.modules), int('coverage' in sys.modules), int('yaml' in sys.modules))
    print(t.packed.tobytes().hex()[:64])
    import numba

    @numba.njit
    def f(a):
        return np.empty_like(a) * 0 + a.sum()

    print(int(f(np.ones(3))[0]), int('numba.np.arrayobj' in sys.modules))
"""


@pytest.mark.skipif(JIT_DISABLED, reason="numba's cache and registries only exist with the JIT")
def test_a_cached_kernel_loads_without_numbas_registries(tmp_path):
    from numlora.kernels import _jit

    if not _jit.DEFER_REFRESH:
        pytest.skip(f"numba {_jit.numba.__version__} is newer than the one _jit._load_cached was checked against: "
                    "check what its cache loading needs and raise _jit.DEFER_REFRESH_UP_TO")
    opts = dict(cwd=tmp_path, drop=("NUMBA_JIT_COVERAGE", "COVERAGE_PROCESS_START"), NUMBA_CACHE_DIR=str(tmp_path),
                NUMLORA_CACHE="1")
    first = _run(WARM_CALL, **opts).splitlines()
    second = _run(WARM_CALL, **opts).splitlines()
    assert first[0].split()[0] == "1"  # the first process compiled: numba's registries loaded
    assert second[1] == first[1]  # the same bytes from the cached kernel
    assert first[2] == second[2] == "3 1"  # a user's function compiles afterwards
    arrays, cov, yaml = second[0].split()
    assert arrays == "0", "a cached kernel loaded numba's registries (the refresh)"
    if importlib.util.find_spec("coverage"):
        assert cov == "0"
    if importlib.util.find_spec("yaml"):
        assert yaml == "0"


NUMBA_STATE = """
    import os, sys
    {imp}
    import numba
    from numba.core import config
    from numba.misc import coverage_support as cs
    os.chdir({conf_dir!r})
    config.reload_config()  # reads the .numba_config.yaml found there
    perf = int(config.DISABLE_PERFORMANCE_WARNINGS)
    import coverage
    cov = coverage.Coverage(data_file=None)
    cov.start()
    active = cs.get_active_coverage()  # what numba's notifier asks when JIT_COVERAGE is on
    cov.stop()
    print(perf, int(active is cov), int(cs.coverage_available), int(hasattr(cs, "NumbaTracer")))
"""


@pytest.mark.skipif(JIT_DISABLED, reason="the JIT-off run imports coverage.py before numba")
def test_numba_imported_by_numlora_reads_its_config_file_and_reports_coverage_as_plain_numba(tmp_path):
    """numlora imports numba without PyYAML and coverage.py; numba's config file and its
    JIT coverage must still work as after a plain ``import numba``."""
    pytest.importorskip("yaml")
    pytest.importorskip("coverage")
    (tmp_path / ".numba_config.yaml").write_text("disable_performance_warnings: 1\n")
    drop = ("NUMBA_JIT_COVERAGE", "COVERAGE_PROCESS_START", "NUMBA_DISABLE_PERFORMANCE_WARNINGS")
    via = "import numlora.kernels; assert 'yaml' not in sys.modules and 'coverage' not in sys.modules"
    plain = _run(NUMBA_STATE.format(imp="", conf_dir=str(tmp_path)), drop=drop)
    ours = _run(NUMBA_STATE.format(imp=via, conf_dir=str(tmp_path)), drop=drop)
    assert ours == plain
    assert plain.split() == ["1", "1", "1", "1"]


CHECKSUMS = """
    import hashlib, json, numpy as np, numlora as nl, numba
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((257, 300)) * 0.02).astype(np.float32)
    w[3, :50] = 1e-20
    a = rng.standard_normal((8, 300)).astype(np.float32)
    b = (rng.standard_normal((257, 8)) * 0.1).astype(np.float32)
    x = rng.standard_normal((5, 300)).astype(np.float32)
    h = {}
    h['threads'] = numba.get_num_threads()
    t = nl.quantize_nf4(w, 64, double_quant=True)
    h['quant'] = hashlib.sha256(t.packed.tobytes() + t.absmax.tobytes() + t.absmax2.tobytes()).hexdigest()
    h['quant3'] = hashlib.sha256(nl.quantize_nf4(w, 3).packed.tobytes()).hexdigest()
    h['deq'] = hashlib.sha256(t.dequantize().tobytes()).hexdigest()
    h['qlora'] = hashlib.sha256(nl.qlora_forward(x, t, a, b, 2.0).tobytes()).hexdigest()
    w2 = np.ascontiguousarray(w[:, :256])
    t2 = (nl.quantize_nf4(w2, 64), nl.quantize_nf4(w2, 32))  # the bf16 dot-product kernel, and not
    for cd in ('bfloat16', 'float16'):
        h[cd] = hashlib.sha256(b''.join(nl.nf4_matmul(x[:, :256], q, compute_dtype=cd).tobytes()
                                        for q in t2)).hexdigest()
    h['fwd'] = hashlib.sha256(nl.lora_forward(x, w, a, b, 2.0).tobytes()).hexdigest()
    wm = w.copy(); rec = nl.merge_lora(wm, a, b, 2.0, record=True)
    h['merge'] = hashlib.sha256(wm.tobytes() + rec.corr.tobytes()).hexdigest()
    nl.unmerge_lora(wm, a, b, 2.0, record=rec)
    h['unmerge_exact'] = wm.tobytes() == w.tobytes()
    h['rng'] = hashlib.sha256(nl.XorShift64(5).uniform(1000).tobytes()).hexdigest()
    print(json.dumps(h))
"""


@pytest.mark.skipif(JIT_DISABLED, reason="thread count is meaningless without the JIT")
def test_results_do_not_depend_on_thread_count():
    one = json.loads(_run(CHECKSUMS, NUMBA_NUM_THREADS="1"))
    two = json.loads(_run(CHECKSUMS, NUMBA_NUM_THREADS="2"))
    assert (one.pop("threads"), two.pop("threads")) == (1, 2)
    assert one["unmerge_exact"] is True
    assert one == two


AVX2_CHECK = """
    import numpy as np, numlora as nl
    from numlora.kernels import nf4 as k
    print(k.SIMD_LANES)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 256)).astype(np.float32)
    t = nl.quantize_nf4(w, 64)
    x = rng.standard_normal((9, 256)).astype(np.float32)
    y = nl.nf4_matmul(x, t)
    ref = x.astype(np.float64) @ t.dequantize().astype(np.float64).T
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    assert all(np.array_equal(nl.nf4_matmul(x[:n], t), y[:n]) for n in (1, 4, 5))
    d = t.dequantize()
    assert np.array_equal(d, (nl.NF4_CODE[np.stack([t.packed >> 4, t.packed & 15], 1).reshape(-1)]
                              * np.repeat(t.absmax, 64)).reshape(40, 256))
    x40 = np.concatenate([x] * 5)[:40]
    half = {cd: (nl.nf4_matmul(x, t, compute_dtype=cd), nl.nf4_matmul(x40, t, compute_dtype=cd))
            for cd in ("bfloat16", "float16")}
    gt = rng.standard_normal((2, 40)).astype(np.float32)
    for tt in (t, nl.quantize_nf4(w, 32)):  # the input gradient's word decode: whole and half chunks
        for n in (1, 2):
            p = np.empty((n, 256), np.float32)
            k.nf4_matmul_t(tt.packed, tt.scales, tt.blocksize, tt.code, gt[:n], p)
            assert np.array_equal(nl.nf4_matmul_t(gt[:n], tt), p)
    import hashlib  # the word decode's results, compared across NUMLORA_WORDS8 by the test
    from numlora.kernels import _simd
    outs = [nl.nf4_matmul(x[:n], tt) for tt in (t, nl.quantize_nf4(w, 32)) for n in (1, 2, 3, 4, 9)]
    outs += [nl.nf4_matmul_t(gt[:n], tt) for tt in (t, nl.quantize_nf4(w, 32)) for n in (1, 2)]
    print(int(_simd.PLANES8), hashlib.sha256(b''.join(o.tobytes() for o in outs)).hexdigest())
    k.SIMD_LANES = 0  # the portable quantizer must give the same bytes
    t0 = nl.quantize_nf4(w, 64)
    assert np.array_equal(t0.packed, t.packed) and np.array_equal(t0.absmax, t.absmax)
    for cd, (small, large) in half.items():  # and the portable 16-bit products the same bits
        assert np.array_equal(nl.nf4_matmul(x, t, compute_dtype=cd), small)
        assert np.array_equal(nl.nf4_matmul(x40, t, compute_dtype=cd), large)
    print("ok")
"""


@pytest.mark.skipif(JIT_DISABLED, reason="the SIMD paths exist only compiled")
def test_avx2_path_when_the_cpu_has_it():
    from llvmlite import binding

    if not binding.get_host_cpu_features().get("avx2", False):
        pytest.skip("no AVX2 on this CPU")
    runs = {how: _run(AVX2_CHECK, NUMLORA_SIMD="8", NUMLORA_WORDS8=how).split() for how in ("planes", "permute")}
    assert [r[:2] + r[3:] for r in runs.values()] == [["8", "1", "ok"], ["8", "0", "ok"]]
    # the byte-plane and the permute decode: the same vectors, so the same product bits
    assert runs["planes"][2] == runs["permute"][2]


def test_words8_setting_is_checked():
    out = _run("""
        import numlora
        try:
            from numlora.kernels import _simd
            print(_simd.LANES, _simd.PLANES8)
        except numlora.ConfigError as e:
            print("refused:", e)
    """, NUMLORA_WORDS8="fast")
    assert out.startswith("refused: NUMLORA_WORDS8: expected 'planes' or 'permute', got 'fast'"), out
