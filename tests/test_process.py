"""Behaviour that needs a fresh process: import cost, thread-count independence."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import JIT_DISABLED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    e = dict(os.environ)
    e.update(env)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_import_compiles_nothing_and_skips_numba():
    out = _run("""
        import sys, numlora
        print(int('numba' in sys.modules), int(any(m.startswith('numlora.kernels') for m in sys.modules)))
    """)
    assert out.split() == ["0", "0"]


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
