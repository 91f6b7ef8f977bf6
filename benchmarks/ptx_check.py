"""Compile every numlora CUDA kernel for a real GPU architecture, without a GPU.

The CUDA simulator runs the kernels' Python, so it cannot see what only the real compiler
sees: typing errors (a uint64 mixed with an int64 becomes a float64 index), arrays that
end up in local memory, spills, register counts that limit occupancy. This script:

1. records every kernel launch of the simulator tests and of ``gpu_check.py --sim-smoke``
   (kernel, argument types), in a subprocess with ``NUMBA_ENABLE_CUDASIM=1`` and the
   environment's own numba;
2. compiles each recorded signature with the real launch settings for compute capability
   ``--cc`` (default 9.0, H100 / H200) through numba-cuda's NVVM, and runs ``ptxas -v`` on
   the PTX: registers, stack frame, spills and shared memory per kernel.

Setup, once (numba-cuda goes into its own folder, so that this environment keeps numba's
built-in simulator for the tests; no GPU and no driver needed):

    pip install --target .ptx-site "numba-cuda[cu12]==0.30.4" nvidia-cuda-nvcc-cu12
    python benchmarks/ptx_check.py --site .ptx-site

Exit status 1 if a kernel fails to compile or uses a stack frame or spills.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_cuda.py", "tests/test_cuda_layers.py", "tests/test_cuda_multi.py"]

_RECORDER = r"""
import os, pickle, runpy, sys
import numpy as np
import numba
from numba.cuda.simulator import kernel as simk

rec = set()
orig = simk.FakeCUDAKernel.__call__


def ty(a):
    return numba.typeof(a._ary if hasattr(a, "_ary") else a)


def call(self, *args):
    if not self._device:
        rec.add((self.fn.__module__, self.fn.__name__, tuple(ty(a) for a in args)))
    return orig(self, *args)


simk.FakeCUDAKernel.__call__ = call
import pytest

rc = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "gpu", *sys.argv[2:]])
sys.argv = ["gpu_check.py", "--sim-smoke"]
try:
    runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
except SystemExit as e:
    rc = rc or e.code
with open(os.environ["NUMLORA_PTX_REC"], "wb") as fh:
    pickle.dump(rec, fh)
sys.exit(int(rc))
"""


def record(path):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", NUMLORA_PTX_REC=str(path))
    env.pop("NUMBA_DISABLE_JIT", None)
    r = subprocess.run([sys.executable, "-c", _RECORDER, "-", *TESTS], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        sys.stdout.write(r.stdout[-4000:] + r.stderr[-2000:])
        raise SystemExit("recording the launches failed (the simulator tests or the smoke run failed)")
    with open(path, "rb") as fh:
        return pickle.load(fh)


def kernels(K):
    """Every dispatcher the functional layer may launch with the current settings, by name."""
    out = {}

    def add(d):
        out.setdefault(d.py_func.__name__, []).append(d)

    for name in ("nf4_codes", "merge_plain", "adamw_step", "pack_adapter"):
        add(getattr(K, name))
    for name in ("dropout_apply", "xorshift64_fill", "nf4_quantize_fused", "nf4_absmax", "nf4_dequantize_range",
                 "nf4_gemv", "lora_shrink", "multi_lora_shrink", "multi_lora_expand"):
        add(getattr(K, "make_" + name)())
    for tile in [t for _, t in K.GEMM_TILES] + [K.GEMM_TILE]:
        for nf4 in (False, True):
            for xk in (True, False):
                for wk in (True, False):
                    add(K.make_gemm(nf4, tile, xk, wk))
    return out


def settings(d):
    """The compile-time sizes a kernel closes over (or the tile of a generated gemm)."""
    f = d.py_func
    if f.__closure__:
        vals = {}
        for name, cell in zip(f.__code__.co_freevars, f.__closure__):
            try:
                v = cell.cell_contents
            except ValueError:
                continue
            if isinstance(v, (bool, int, tuple)):
                vals[name] = v
        return " ".join(f"{k}={v}" for k, v in sorted(vals.items()))
    return f.__code__.co_filename.strip("<>").replace("numlora.cuda.kernels.", "") if "gemm" in f.__name__ else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--site", required=True, help="folder numba-cuda and nvidia-cuda-nvcc-cu12 were installed into")
    ap.add_argument("--cc", default="9.0", help="compute capability to compile for (default 9.0)")
    ap.add_argument("--compile", metavar="LAUNCHES", help=argparse.SUPPRESS)  # the second phase (internal)
    args = ap.parse_args()
    site_dir = str(Path(args.site).resolve())
    major, minor = (int(p) for p in args.cc.split("."))
    ptxas = next(Path(site_dir).glob("nvidia/cuda_nvcc/bin/ptxas"), None)
    if ptxas is None:
        raise SystemExit(f"no ptxas under {site_dir}/nvidia/cuda_nvcc/bin: pip install --target {args.site} "
                         "nvidia-cuda-nvcc-cu12")
    if args.compile is None:
        with tempfile.TemporaryDirectory() as tmp:
            pkl = Path(tmp) / "launches.pkl"
            rec = record(pkl)
            print(f"{len(rec)} distinct launch signatures recorded from the simulator tests and the smoke run",
                  flush=True)
            # the compile phase in a fresh process: the dynamic loader reads LD_LIBRARY_PATH
            # (where NVVM and NVRTC are) at start-up, and numba.cuda must not be the simulator
            env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
            libs = [str(p) for p in (*Path(site_dir).glob("nvidia/cuda_nvcc/nvvm/lib64"),
                                     *Path(site_dir).glob("nvidia/cuda_nvrtc/lib"))]
            env["LD_LIBRARY_PATH"] = ":".join(libs + [env.get("LD_LIBRARY_PATH", "")])
            return subprocess.run([sys.executable, __file__, "--site", site_dir, "--cc", args.cc, "--compile",
                                   str(pkl)], env=env).returncode
    with open(args.compile, "rb") as fh:
        rec = pickle.load(fh)

    # the real compiler: numba-cuda from the site folder, a fake device of the asked capability
    import site

    site.addsitedir(site_dir)
    sys.path.insert(0, str(ROOT))
    from numba import cuda
    from numba.cuda import dispatcher

    try:  # no device to ask which architectures NVRTC supports: name the target directly
        from numba.cuda.cudadrv import nvrtc

        nvrtc.get_arch_option = lambda major_, minor_: f"compute_{major_}{minor_}"
    except (ImportError, AttributeError):
        pass

    class _Device:
        compute_capability = (major, minor)

    dispatcher.get_current_device = lambda: _Device()
    import numlora.device

    numlora.device.cuda_module = lambda: cuda
    from numlora.cuda import kernels as K

    cands = kernels(K)
    failed = flagged = 0
    seen = set()
    rows = []
    for mod, name, argtys in sorted(rec, key=str):
        if not (mod or "").startswith("numlora"):
            continue
        for d in cands.get(name, []):
            key = (id(d), argtys)
            if key in seen:
                continue
            seen.add(key)
            label = f"{name} {settings(d)}".strip()
            try:
                ptx, _ = cuda.compile_ptx(d.py_func, tuple(argtys), cc=(major, minor))
            except Exception as exc:  # a typing or lowering error: what this script is for
                failed += 1
                print(f"FAIL {label} {argtys}\n     {type(exc).__name__}: {str(exc)[:1200]}")
                continue
            cap = getattr(d, "targetoptions", {}).get("max_registers")
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
                # the NVVM of the wheel may stamp a newer PTX ISA than its ptxas reads
                fh.write(re.sub(r"^\.version 9\.\d+", ".version 8.8", ptx, flags=re.M))
            cmd = [str(ptxas), f"-arch=sm_{major}{minor}", "-v", fh.name, "-o", os.devnull]
            if cap:
                cmd.insert(1, f"-maxrregcount={cap}")
            r = subprocess.run(cmd, capture_output=True, text=True)
            os.unlink(fh.name)
            num = {k: int(m.group(1)) if (m := re.search(p, r.stderr)) else -1 for k, p in (
                ("regs", r"Used (\d+) registers"), ("stack", r"(\d+) bytes stack frame"),
                ("spill", r"(\d+) bytes spill stores"), ("smem", r"(\d+) bytes smem"))}
            bad = r.returncode != 0 or num["stack"] > 0 or num["spill"] > 0
            flagged += bad
            rows.append((label, num, cap, bad))
    print("\n| kernel (settings) | registers | stack B | spill B | shared B |\n|---|---|---|---|---|")
    for label, num, cap, bad in sorted(set((lb, tuple(n.items()), c, b) for lb, n, c, b in rows)):
        n = dict(num)
        capped = f" (cap {cap})" if cap else ""
        print(f"| {label} | {n['regs']}{capped} | {n['stack']} | {n['spill']} | {max(n['smem'], 0)} |"
              + ("  <- stack / spill" if bad else ""))
    print(f"\n{len(rows)} compiled for sm_{major}{minor}, {failed} failed, {flagged} with a stack frame or spills")
    return 1 if failed or flagged else 0


if __name__ == "__main__":
    sys.exit(main())
