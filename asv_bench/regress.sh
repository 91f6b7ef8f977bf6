#!/usr/bin/env bash
# Flag performance regressions of HEAD against a base commit, on a small machine.
#
#   bash asv_bench/regress.sh [BASE [HEAD]] [asv options, e.g. --bench bench_nf4]
#
# BASE defaults to main, HEAD to HEAD. Exit status 1 when a benchmark got slower (asv's
# own rule: the ratio of medians is above --factor AND the difference is statistically
# significant), 0 otherwise; 2 for a usage or build error.
#
# Why these settings (see README.md, "Regression check"):
# - thread counts and N come from asv.conf.json's env_nobuild matrix (1 thread each);
# - --interleave-rounds: the two commits alternate round by round, so drift of the
#   machine (other programs, thermal state) hits both alike;
# - rounds=4, repeat=10: four processes per commit and benchmark, 40 samples, enough for asv's
#   Mann-Whitney test to call a 10 % change significant when the spread is a few %;
# - --factor 1.05: a change must exceed 5 % of the median to be shown at all, so the
#   sub-5 % noise of a quiet 2-core machine never raises an alarm, and 10 % always can.
set -euo pipefail
cd "$(dirname "$0")"
base=main
head=HEAD
if [[ $# -gt 0 && $1 != -* ]]; then base=$1; shift; fi
if [[ $# -gt 0 && $1 != -* ]]; then head=$1; shift; fi
# These two slow numpy's BLAS where they are set (see the project notes); a benchmark run
# is the one place they are unset.
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
asv machine --yes >/dev/null
exec asv continuous --interleave-rounds -a rounds=4 -a repeat=10 --factor 1.05 --split --show-stderr "$@" "$base" "$head"
