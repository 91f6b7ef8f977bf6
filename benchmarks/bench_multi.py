"""Issue 6's figures (many adapters in one batch); the code lives in
:mod:`numlora.bench_multi` so that ``numlora bench --multi`` runs it too.

    python benchmarks/bench_multi.py [--quick] [--json PATH] [--repeats R]
"""

import sys

from numlora.bench_multi import main

if __name__ == "__main__":
    sys.exit(main())
