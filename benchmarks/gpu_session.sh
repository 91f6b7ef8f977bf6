#!/bin/bash
# Everything to run on a machine with an NVIDIA GPU, in one go, from the repository root
# (a bare copy of the tree is enough: numlora is imported from it, nothing is installed).
# Sized for a 10-minute call: gpu_check (the figures) first, then the GPU tests, then the
# tuning sweeps with what time is left. Logs go to $OUT (default /tmp/numlora-gpu).
#
#   bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/numlora-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
start=$(date +%s)
left() { echo $((570 - ($(date +%s) - start))); }

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import sys, numpy, numba; print(sys.version.split()[0], 'numpy', numpy.__version__, 'numba', numba.__version__)"
  "$PY" -c "import numba_cuda; print('numba-cuda', numba_cuda.__version__)" 2>&1 | tail -1
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== gpu_check ($(left) s left)"
timeout 420 "$PY" benchmarks/gpu_check.py > "$OUT/gpu_check.txt" 2>&1
echo "gpu_check exit $?"
tail -40 "$OUT/gpu_check.txt"

echo "== GPU tests ($(left) s left)"
timeout $(( $(left) > 60 ? $(left) - 40 : 20 )) "$PY" -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_cuda.py tests/test_cuda_layers.py tests/test_cuda_multi.py > "$OUT/tests.txt" 2>&1
echo "tests exit $?"
tail -15 "$OUT/tests.txt"

if [ "$(left)" -gt 60 ]; then
  echo "== sweeps ($(left) s left)"
  timeout $(( $(left) - 10 )) "$PY" benchmarks/gpu_check.py --sweep > "$OUT/sweep.txt" 2>&1
  echo "sweep exit $?"
  grep "^|" "$OUT/sweep.txt"
fi
echo "done in $(( $(date +%s) - start )) s"
