"""The spread of every ``time_`` benchmark in an asv results file: half the interquartile
range over the median (asv's ``stats_q_25`` / ``stats_q_75``), the figure the suite
keeps at or below 3 %.

    python spreads.py [RESULTS.json] [--limit 0.03]

Without a file, the newest results file under ``.asv/results`` is read. Benchmarks whose
spread is above ``--limit`` are marked, and the exit status is 1 when there is one.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
import os
import sys


def spreads(path: str) -> list[tuple[str, float, float]]:
    """(benchmark[params], median seconds, spread) for each timed result in ``path``."""
    with open(path) as f:
        data = json.load(f)
    cols = data["result_columns"]
    out = []
    for name, row in sorted(data["results"].items()):
        if ".time_" not in name and not name.split(".")[-1].startswith("time_"):
            continue
        rec = dict(zip(cols, row))
        params = rec.get("params") or []
        combos = list(itertools.product(*params)) if params else [()]
        meds, q1s, q3s = rec.get("result") or [], rec.get("stats_q_25") or [], rec.get("stats_q_75") or []
        for i, combo in enumerate(combos):
            if i >= len(meds) or i >= len(q1s) or i >= len(q3s):
                break
            med, q1, q3 = meds[i], q1s[i], q3s[i]
            if med is None or q1 is None or q3 is None or (isinstance(med, float) and math.isnan(med)) or med <= 0:
                continue
            label = name + (f"({', '.join(str(c) for c in combo)})" if combo else "")
            out.append((label, med, (q3 - q1) / 2 / med))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?")
    ap.add_argument("--limit", type=float, default=0.03)
    args = ap.parse_args(argv)
    path = args.results
    if path is None:
        here = os.path.dirname(os.path.abspath(__file__))
        files = [f for f in glob.glob(os.path.join(here, ".asv", "results", "*", "*.json"))
                 if not f.endswith("machine.json")]
        if not files:
            print("no results under .asv/results: run asv first", file=sys.stderr)
            return 2
        path = max(files, key=os.path.getmtime)
    rows = spreads(path)
    print(f"{os.path.basename(path)}: {len(rows)} timed results\n")
    print("| benchmark | median | spread |")
    print("|---|---:|---:|")
    worst = 0
    for label, med, sp in rows:
        mark = " **over**" if sp > args.limit else ""
        worst += sp > args.limit
        print(f"| {label} | {med * 1e3:.3f} ms | {sp:.1%}{mark} |")
    print(f"\n{worst} of {len(rows)} above {args.limit:.0%}")
    return 1 if worst else 0


if __name__ == "__main__":
    raise SystemExit(main())
