"""Many adapters in one batch (LoraBank); the code lives in
:mod:`numlora.bench.multi` so that ``numlora bench --multi`` runs it too.

    python benchmarks/bench_multi.py [--quick] [--json PATH] [--repeats R] [--no-peers]
"""

import sys

from numlora.bench.multi import main

if __name__ == "__main__":
    sys.exit(main())
