#!/usr/bin/env bash
# Prove that asv_bench/regress.sh flags a 10 % slowdown of each key kernel and raises no
# alarm when nothing changed (issue: "performance tracking you can trust").
#
#   bash benchmarks/asv_detection_check.sh [BASE] > detection.log
#
# For each kernel below it makes a throwaway commit on top of BASE (default HEAD) that
# wraps the public function in a calibrated busy-wait of 10 % of the call's own duration
# (measured inside the wrapper, so the slowdown is 10 % at every size), runs regress.sh
# BASE <that commit> on the kernel's benchmarks, and records whether asv flagged it. Then
# an A/A comparison: a throwaway commit that changes only a comment, over the same
# benchmarks. The throwaway commits live on temporary branches (asv clones by ref) that
# are deleted at the end; the working tree is not touched (a temporary git worktree).
set -uo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
base=$(git -C "$repo" rev-parse "${1:-HEAD}")
wt=$(mktemp -d)
logs=${LOGDIR:-$(mktemp -d)}
mkdir -p "$logs"
echo "full asv logs in $logs"
git -C "$repo" worktree add -q --detach "$wt" "$base"
trap 'git -C "$repo" worktree remove --force "$wt"; for b in $(git -C "$repo" branch --list "asv-proof-*" --format="%(refname:short)"); do git -C "$repo" branch -q -D "$b"; done' EXIT

# name | python target in numlora/__init__.py | benchmark regex
cases=(
  "lora_forward|lora_forward|bench_lora.LoraForward.time_lora_forward"
  "qlora_forward|qlora_forward|bench_nf4.QloraForward.time_qlora_forward"
  "quantize_nf4|quantize_nf4|bench_nf4.Quantize"
  "dequantize_nf4|dequantize_nf4|bench_nf4.Dequantize"
  "merge_lora|merge_lora|bench_lora.Merge.time_merge_lora"
  "lora_backward|lora_backward|bench_train.Backward.time_backward"
  "LoraBank.forward|LoraBank.forward|bench_multi.MultiForward"
)
slow_code() {  # $1: target (a name in numlora/__init__.py, or Class.method)
  cat <<PY

# --- throwaway: a calibrated 10 % slowdown of $1 (asv detection check) ---
def _asv_proof_slow(fn):
    import functools as _ft
    import time as _t

    @_ft.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = _t.perf_counter()
        r = fn(*args, **kwargs)
        end = _t.perf_counter() + 0.10 * (_t.perf_counter() - t0)
        while _t.perf_counter() < end:
            pass
        return r

    return wrapper


PY
  if [[ $1 == *.* ]]; then
    echo "${1%%.*}.${1#*.} = _asv_proof_slow(${1%%.*}.${1#*.})"
  else
    echo "$1 = _asv_proof_slow($1)"
  fi
}

# ONLY=name1,name2 runs those cases only; ASV_ARGS adds options to every asv call (e.g.
# "--cpu-affinity 1" to keep the benchmarks on one core while something else runs on the other).
all_benches=()
for c in "${cases[@]}"; do
  IFS='|' read -r name target bench <<<"$c"
  if [[ -n ${ONLY:-} && ",$ONLY," != *",$name,"* ]]; then continue; fi
  all_benches+=("$bench")
  git -C "$wt" checkout -q --detach "$base"
  slow_code "$target" >> "$wt/numlora/__init__.py"
  git -C "$wt" commit -qam "throwaway: 10 % slower $name"
  br="asv-proof-${name//./-}"
  git -C "$repo" branch -q -f "$br" "$(git -C "$wt" rev-parse HEAD)"
  echo "=== $name: regress.sh $base $br --bench $bench"
  (cd "$repo/asv_bench" && bash regress.sh "$base" "$br" --bench "$bench" ${ASV_ARGS:-}) > "$logs/$br.log" 2>&1
  rc=$?
  sed -n '/^ *Change \|BENCHMARKS/,$p' "$logs/$br.log" | tail -25
  echo "=== $name: regress.sh exit $rc ($([[ $rc == 1 ]] && echo FLAGGED || echo not flagged))"
done

[[ ${SKIP_AA:-0} == 1 ]] && exit 0
git -C "$wt" checkout -q --detach "$base"
echo "# throwaway: a comment only (A/A check)" >> "$wt/numlora/__init__.py"
git -C "$wt" commit -qam "throwaway: comment only"
git -C "$repo" branch -q -f asv-proof-aa "$(git -C "$wt" rev-parse HEAD)"
regex=$(IFS='|'; echo "${all_benches[*]}")
echo "=== A/A: regress.sh $base asv-proof-aa --bench '$regex'"
(cd "$repo/asv_bench" && bash regress.sh "$base" asv-proof-aa --bench "$regex" ${ASV_ARGS:-}) > "$logs/asv-proof-aa.log" 2>&1
rc=$?
sed -n '/^ *Change \|BENCHMARKS/,$p' "$logs/asv-proof-aa.log" | tail -40
echo "=== A/A: regress.sh exit $rc ($([[ $rc == 0 ]] && echo 'no alarm' || echo 'FALSE ALARM'))"
