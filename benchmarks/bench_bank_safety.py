"""Issue 12's figure: what the thread safety of ``LoraBank`` costs a single-threaded
``forward`` (goal: under 2 % at batch 1).

The baseline is ``numlora/multi.py`` as it was before the change (``--baseline``, a git
revision; default 21e6c87, the last commit before it), loaded from git into a module of
its own next to the current one, so that both run in the same process on the same
kernels, BLAS and inputs: two banks with the same base weight and adapters (8 adapters of
rank 16, rows spread over them and the base alone), ``forward(x, ids, out=out)`` with
preallocated ``out`` and int64 ids, checked to give the same bits, then timed alternately
by :func:`numlora.bench.harness.time_interleaved` (rounds of ``old, new``). The table
gives each one's median call and the median over rounds of the per-round ratio (drift of
a shared machine cancels within a round). Also timed alone, because on a busy machine
it is below the noise of a whole call: the work the change adds to every call
(registering on the bank's snapshot and leaving it, two short lock holds; the test of a
given ``out`` against ``x``, ``scale`` and the base weight). Read ratios within a few
percent of 1 with that column: two banks of the *same* code, timed the same way, differ
by up to ~5 % at 256 x 256, batch 64 on a shared 2-core machine (memory placement).

    python benchmarks/bench_bank_safety.py [--quick] [--baseline REV] [--seconds S]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from numlora.bench.harness import machine, progress, time_interleaved
from numlora.multi import LoraBank

ROOT = Path(__file__).resolve().parents[1]
#: numlora/multi.py before the snapshot / reader-counting change
BASELINE = "21e6c87"


#: imports of the baseline whose names have moved since: each statement -> the same names
#: from their home now
MOVED = {
    "from .ops import _input_rows, _prepare_out":
        "from ._validate import input_rows as _input_rows, prepare_out as _prepare_out",
    "from .ops import _low_rank_arrays": "from ._validate import low_rank_arrays as _low_rank_arrays",
}


def baseline_module(rev: str):
    """``numlora/multi.py`` at git revision ``rev``, as module ``numlora._multi_baseline``
    (its relative imports resolve to the current package; see ``MOVED``)."""
    src = subprocess.run(["git", "show", f"{rev}:numlora/multi.py"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    for old, new in MOVED.items():
        src = src.replace(old, new)
    spec = importlib.util.spec_from_loader("numlora._multi_baseline", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "numlora"
    sys.modules[spec.name] = mod
    exec(compile(src, f"{rev}:numlora/multi.py", "exec"), mod.__dict__)  # noqa: S102 - our own file from git
    return mod


def banks(old_cls, side, row_stable, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((side, side), dtype=np.float32) * np.float32(0.02)
    made = [old_cls(w, row_stable=row_stable), LoraBank(w, row_stable=row_stable)]
    for k in range(8):
        a = rng.standard_normal((16, side), dtype=np.float32) * np.float32(0.02)
        b = rng.standard_normal((side, 16), dtype=np.float32) * np.float32(0.02)
        for bank in made:
            bank.add(f"a{k}", a, b, 2.0)
    return made


def added_us(bank, x, ids, out, reps=2000, rounds=200) -> tuple[float, float]:
    """Microseconds per call of the two steps the change adds to ``forward(x, ids,
    out=out)``: registering on the snapshot and leaving it (through the methods, an upper
    bound of the inline code), and the check of ``out`` against the inputs. The minimum
    over many short rounds (what the step costs when nothing else runs)."""
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), np.float32)
    ones = np.ones(x2.shape[0], np.float32)
    enter, leave, unaliased = bank._registry.enter, bank._registry.leave, bank._backend._unaliased
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            leave(enter())
        t1 = time.perf_counter()
        for _ in range(reps):
            unaliased(out, x2, ones, None)
        t2 = time.perf_counter()
        best = [min(best[0], (t1 - t0) / reps), min(best[1], (t2 - t1) / reps)]
    return best[0] * 1e6, best[1] * 1e6


def paired_ratio(t_new, t_old, repeat, calls) -> tuple[float, float, float]:
    """Median and quartiles over rounds of (new's median call / old's median call) in the
    same round: the machine's drift cancels within a round."""
    per_new = np.median(np.reshape(t_new.samples, (repeat, calls)), axis=1)
    per_old = np.median(np.reshape(t_old.samples, (repeat, calls)), axis=1)
    q1, med, q3 = np.percentile(per_new / per_old, [25, 50, 75])
    return float(med), float(q1), float(q3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default=BASELINE, help="git revision of the old numlora/multi.py")
    p.add_argument("--seconds", type=float, default=4.0, help="timing budget per configuration")
    p.add_argument("--quick", action="store_true", help="one small layer, short timings (a smoke run)")
    args = p.parse_args(argv)
    old = baseline_module(args.baseline)
    configs = [(1024, True), (256, False), (1024, False), (4096, False)]
    if args.quick:
        configs, args.seconds = [(256, True)], 1.0
    print(f"# LoraBank.forward(x, ids, out=out), one thread: {args.baseline} (old) vs the working tree (new)")
    print(f"# {machine()}")
    print("# new/old: median over interleaved rounds of the per-round ratio [quartiles]; added: the new steps "
          "timed alone (snapshot registration + out check), in us and as a share of old")
    print("| base | row_stable | batch | old us/call | new us/call | new/old [q1, q3] | added us (share) |")
    print("|---|---|---:|---:|---:|---|---:|")
    for side, stable in configs:
        b_old, b_new = banks(old.LoraBank, side, stable)
        for batch in (1, 64):
            rng = np.random.default_rng(batch)
            x = rng.standard_normal((batch, side), dtype=np.float32)
            ids = (np.arange(batch) % 9 - 1).astype(np.int64)  # the base alone and each adapter
            outs = [np.empty((batch, side), np.float32) for _ in range(2)]
            def fo(b=b_old, x=x, ids=ids, out=outs[0]):
                return b.forward(x, ids, out=out)

            def fn(b=b_new, x=x, ids=ids, out=outs[1]):
                return b.forward(x, ids, out=out)

            for _ in range(3):
                fo(), fn()
            assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32)), "old and new disagree"
            t0 = time.perf_counter()
            fo(), fn()
            one = (time.perf_counter() - t0) / 2
            calls = max(3, int(0.01 / one))           # rounds of ~10 ms per competitor, 3 calls at least
            repeat = max(10, int(args.seconds / (2 * calls * one)))
            progress(f"{side} x {side} row_stable={stable} batch {batch}: {repeat} rounds of {calls} calls")
            t_old, t_new = time_interleaved([fo, fn], repeat=repeat, pause=0.0, calls=calls)
            med, q1, q3 = paired_ratio(t_new, t_old, repeat, calls)
            snap_us, check_us = added_us(b_new, x, ids, outs[1])
            old_us = t_old.median_ms * 1e3
            print(f"| {side} x {side} | {stable} | {batch} | {old_us:.1f} | {t_new.median_ms * 1e3:.1f} "
                  f"| {med:.3f} [{q1:.3f}, {q3:.3f}] | {snap_us:.2f} + {check_us:.2f} "
                  f"({(snap_us + check_us) / old_us:.2%}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
