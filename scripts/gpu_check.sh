#!/usr/bin/env bash
# The GPU check: one prepared command for a short GPU window (README, "GPU check").
#
#   OUT=DIR bash scripts/gpu_check.sh [all|part1|part2] [--dry-run]
#   bash scripts/gpu_check.sh [all|part1|part2] --plan
#
#   all    every step, in priority order (the default; about 540 s on an H200): install without the
#          extension (so Triton and torch run even if the build fails), probe, build the extension,
#          accuracy at [4096 x 14336], CUDA + Triton test subsets, eigensolver and Llama3-8B kernel
#          benchmarks, Llama3-8B projection, end-to-end batches, then the other shapes
#   part1  install, probe, build, accuracy, tests, kernel and eigensolver benchmarks
#   part2  install, probe, build, projection benchmarks (synthetic and real weights), end-to-end
#   STEP…  probe, build and the named steps (accuracy, tests, bench-kernels, bench-cuda,
#          bench-projection[-llama3-8b|-qwen2.5-7b|-qwen2.5-32b], bench-real, e2e): a rerun
#   --plan prints the steps a GPU call would run, in order, with each one's estimated cost on an H200,
#          its timeout and whether it fits the budget; it runs nothing and needs no OUT.
#
# Runs with the machine's python3 (PYTHON overrides it), no virtual environment, nothing
# downloaded. Each step has its own timeout and log, and the steps of one call share a budget
# (GPU_CHECK_BUDGET_S, default 540 s, so that a call fits a 10-minute command): a step that fails or
# times out loses nothing else, and a step the budget cannot hold is skipped with a message.
# GPU_CHECK_TIMEOUT_<STEP> (e.g. GPU_CHECK_TIMEOUT_E2E=300) overrides one step's timeout;
# GPU_CHECK_COMMIT names the commit where the copy being checked has no .git.
# GPU_CHECK_TESTS_K replaces the GPU tests' -k expression (a rerun of a few tests).
# GPU_CHECK_FAIL_BUILD=1 makes the build step fail on purpose, in a dry run too (the test of
# what a failed build leaves working).
# Without a CUDA device (or with --dry-run) the same command is a dry run: the GPU steps skip
# with a message and the rest runs at tiny shapes on CPU.
#
# Results (at most 4 files, so that they all come back from a GPU machine's $OUT):
#   $OUT/bench/results/<device>-gpu-check-<date>[-partN].json and .md   (bench/report.py)
#   $OUT/bench/results/<...>-e2e.png                                   (end-to-end batches)
#   $OUT/gpu-check-logs.tar.gz    every step's log and raw JSON, refreshed after each step
# Exit status: 0 when no step failed or timed out, else 1.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
mode=all
dry=0
plan=0
named=()
known=" accuracy tests bench-kernels bench-kernels-llama3-8b bench-kernels-qwen2.5-32b bench-cuda bench-projection bench-projection-llama3-8b bench-projection-qwen2.5-7b
bench-projection-qwen2.5-32b bench-real e2e "
for arg in "$@"; do
  case "$arg" in
    all|part1|part2) mode=$arg ;;
    --dry-run) dry=1 ;;
    --plan) plan=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *)
      if [[ "$known" == *[[:space:]]"$arg"[[:space:]]* ]]; then
        mode=steps
        named+=("$arg")
      else
        echo "gpu_check: unknown argument '$arg' (expected all, part1, part2, step names, --dry-run or --plan)" >&2
        exit 2
      fi ;;
  esac
done
[ "$plan" = 1 ] || : "${OUT:?gpu_check: set OUT to the folder the results go to}"
PY=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-540}
reserve=25  # kept back for the report and the last packing
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

[ "$plan" = 1 ] && dry=0  # the plan of a GPU call
if [ "$dry" = 0 ] && [ "$plan" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  dry=1
fi
if [ "$dry" = 1 ]; then
  export SPHERE_FAST_BENCH_SHAPES=tiny OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
  tiny=(--tiny)
else
  export SPHERE_FAST_BENCH_SHAPES=gpu
  tiny=()
fi

start=$SECONDS
failed=0
planned=0  # --plan: the estimated seconds of the steps listed so far
work=""
if [ "$plan" = 0 ]; then
  work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
  mkdir -p "$work/logs" "$OUT/bench/results"
  : >"$work/steps.tsv"
fi

pack() {  # the logs and raw results so far, replaced atomically
  tar -czf "$OUT/.gpu-check-logs.tar.gz.tmp" -C "$work" . 2>/dev/null &&
    mv -f "$OUT/.gpu-check-logs.tar.gz.tmp" "$OUT/gpu-check-logs.tar.gz"
}

record() {  # name status rc seconds timeout note
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$work/steps.tsv"
  printf '[gpu_check] %-16s %-8s %6ss  %s\n' "$1" "$2" "$4" "$6"
}

# step NAME TIMEOUT_S ESTIMATE_S gpu|any COMMAND...: runs COMMAND with its log in logs/NAME.log.
# ESTIMATE_S is what the step is expected to cost on an H200 (--plan adds them up; the README's
# "GPU check" says which were measured).
step() {
  local name=$1 limit=$2 estimate=$3 needs=$4
  shift 4
  local override="GPU_CHECK_TIMEOUT_$(echo "$name" | tr 'a-z.-' 'A-Z__')"
  limit=${!override:-$limit}
  if [ "$plan" = 1 ]; then
    planned=$((planned + estimate))
    local fits=fits
    [ "$planned" -gt $((budget - reserve)) ] && fits="if budget is left"
    printf '%-28s %-4s %8s %8s %8s  %s\n' "$name" "$needs" "${estimate}s" "${limit}s" "${planned}s" "$fits"
    return
  fi
  if [ "$needs" = gpu ] && [ "$dry" = 1 ]; then
    record "$name" skipped "" 0 "" "dry run: needs a CUDA device"
    return
  fi
  local left=$((budget - reserve - (SECONDS - start)))
  if [ "$left" -lt 20 ]; then
    record "$name" skipped "" 0 "" "budget spent (GPU_CHECK_BUDGET_S=$budget)"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "[gpu_check] $name (timeout ${limit}s): $*"
  local t0=$SECONDS rc
  # SIGINT first: pytest then still prints its summary and writes its JUnit XML.
  timeout -s INT -k 10 "$limit" bash -c '"$@"' "$name" "$@" >"$work/logs/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - t0)) status=ok note=""
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status=timeout note="stopped after ${limit}s"
    failed=1
  elif [ "$rc" != 0 ]; then
    status=failed note="exit $rc; see logs/$name.log"
    failed=1
  fi
  record "$name" "$status" "$rc" "$took" "$limit" "$note"
  tail -n 15 "$work/logs/$name.log" | sed "s/^/    /"
  pack
}

install() {  # the package without the extension: Triton and torch run even if the build fails
  SPHERE_FAST_BUILD_CUDA=0 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . &&
    "$PY" -c 'import sphere_fast.kernels as k; print("imported", k.__file__)'
}

build() {  # the extension, into a build folder kept between calls (a rerun rebuilds only what changed)
  if [ "${GPU_CHECK_FAIL_BUILD:-0}" = 1 ]; then
    echo "gpu_check: GPU_CHECK_FAIL_BUILD=1: the build fails on purpose" >&2
    return 1
  fi
  SPHERE_FAST_BUILD_CUDA=1 SPHERE_FAST_BUILD_DIR="$here/build/gpu-check" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CUDA_ARCHITECTURES=${GPU_CHECK_CUDA_ARCHITECTURES:-90a-real}" \
    "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . &&
    "$PY" -c 'import sphere_fast._C as ext; print("imported", ext.__file__, "memory pools:", ext.memory_pools_supported())'
}

# The GPU test subset. -v prints each test's outcome as it ends, so a log cut short still names
# the failures; benchmarks are off (pytest-benchmark only warns under xdist).
tests() {
  local options=() workers=${GPU_CHECK_TEST_WORKERS:-8}
  if "$PY" -c 'import xdist' 2>/dev/null; then
    options+=(-n "$workers")  # Triton compiles in parallel
    # The workers' CPU oracles share the cores: a thread per core in every worker would oversubscribe them.
    export OMP_NUM_THREADS=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))
  fi
  if "$PY" -c 'import pytest_timeout' 2>/dev/null; then
    options+=(--timeout 60)  # a test that hangs fails alone instead of taking the step with it
  else
    options+=(-o faulthandler_timeout=60)  # at least says where a test hangs
  fi
  "$PY" -m pytest -v -rfE --tb=short --durations=20 -p no:cacheprovider -p no:randomly -p no:benchmark \
    "${options[@]}" --junitxml="$work/tests.xml" \
    tests/csrc/test_cuda_ext.py tests/kernels tests/test_projection.py tests/editing/test_editor.py \
    tests/test_gram_energy.py -k "${GPU_CHECK_TESTS_K:-(cuda or shared_memory) and not compile}"
}

bench() {  # bench FILE JSON [PYTEST ARGS]: one pytest-benchmark suite
  local file=$1 json=$2
  shift 2
  "$PY" -m pytest -q -p no:cacheprovider "$file" --benchmark-json="$work/$json" \
    --benchmark-columns=min,median,max,rounds "$@"
}

probe() {
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PY" bench/probe.py --out "$work/probe.json"
}

[ "$plan" = 1 ] && printf '%-28s %-4s %8s %8s %8s  %s\n' step runs estimate timeout "ends by" \
  "(budget ${budget}s, ${reserve}s of it kept for the report)"
export PY work here
export -f install build tests bench probe  # steps run them in a child bash, under timeout

# On a GPU the kernel and projection benchmarks run one model shape per step (a timeout loses
# one shape, and each step's JSON is written when it ends).
if [ "$dry" = 1 ]; then projection=(bench-projection); kernels=(bench-kernels); else
  projection=(bench-projection-llama3-8b bench-projection-qwen2.5-7b bench-projection-qwen2.5-32b)
  kernels=(bench-kernels-llama3-8b bench-kernels-qwen2.5-32b)
fi
# Priority order: what a short window must not lose comes first (correctness before speed);
# the budget skips the tail.
case $mode in
  part1) steps=(install probe build accuracy tests "${kernels[@]}" bench-cuda) ;;
  part2) steps=(install probe build "${projection[0]}" e2e "${projection[@]:1}" bench-real) ;;
  all) steps=(install probe build accuracy tests bench-cuda "${kernels[0]}" "${projection[0]}" e2e "${kernels[@]:1}"
              "${projection[@]:1}" bench-real) ;;
  steps) steps=(install probe build "${named[@]}") ;;
esac
build_needs=gpu
[ "${GPU_CHECK_FAIL_BUILD:-0}" = 1 ] && build_needs=any  # the failed build runs in a dry run too
[ "$plan" = 1 ] || echo "[gpu_check] mode $mode, $([ "$dry" = 1 ] && echo 'DRY RUN (no CUDA device)' || echo GPU), budget ${budget}s, work $work"
# The step table: name, timeout, estimate (seconds), where it runs, command.
for s in "${steps[@]}"; do
  case $s in
    install) step install 60 15 gpu install ;;
    probe) step probe 45 10 any probe ;;
    build) step build 240 45 "$build_needs" build ;;
    accuracy) step accuracy 120 45 any "$PY" bench/gpu_accuracy.py --out "$work/accuracy.json" "${tiny[@]}" ;;
    tests) step tests 300 240 gpu tests ;;
    bench-kernels) step bench-kernels 120 60 gpu bench bench/bench_kernels.py bench-kernels.json ;;
    bench-kernels-llama3-8b) step "$s" 75 25 gpu bench bench/bench_kernels.py "$s.json" -k llama3-8b ;;
    bench-kernels-qwen2.5-32b) step "$s" 90 30 gpu bench bench/bench_kernels.py "$s.json" -k qwen2.5-32b ;;
    bench-cuda) step bench-cuda 90 55 gpu bench bench/bench_cuda.py bench-cuda.json ;;
    bench-projection) step bench-projection 240 75 any bench bench/bench_projection.py bench-projection.json ;;
    bench-projection-llama3-8b) step "$s" 120 25 gpu bench bench/bench_projection.py "$s.json" -k 4096x14336 ;;
    bench-projection-qwen2.5-7b) step "$s" 120 25 gpu bench bench/bench_projection.py "$s.json" -k 3584x18944 ;;
    bench-projection-qwen2.5-32b) step "$s" 180 45 gpu bench bench/bench_projection.py "$s.json" -k 5120x27648 ;;
    bench-real) step bench-real 90 60 any bench bench/bench_real_weights.py bench-real.json ;;
    e2e) step e2e 360 150 any "$PY" bench/bench_e2e.py --out "$work/e2e.json" --png "$work/e2e.png" "${tiny[@]}" ;;
  esac
done
[ "$plan" = 1 ] && exit 0

# Results, named after the device and the date: <device>-gpu-check[-dry-run]-<date>[-partN].
name=$("$PY" - "$work/probe.json" "$dry" <<'EOF' 2>/dev/null || echo "unknown-gpu-check"
import datetime, json, re, sys
try:
    env = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    env = {}
device = re.sub(r"[^a-z0-9]+", "-", str(env.get("device", "unknown")).lower()).strip("-")
date = env.get("date") or datetime.date.today().isoformat()
print(f"{device}-gpu-check{'-dry-run' if sys.argv[2] == '1' else ''}-{date[:10]}")
EOF
)
prefix="$OUT/bench/results/$name"
[ "$mode" = steps ] && prefix="$prefix-$(IFS=+; echo "${named[*]}")"
[ "$mode" = part1 ] || [ "$mode" = part2 ] && prefix="$prefix-$mode"
report_args=(--gpu-check "$work" --out "$prefix" --mode "$mode")
[ "$dry" = 1 ] && report_args+=(--dry-run)
if timeout 60 "$PY" bench/report.py "${report_args[@]}" >"$work/logs/report.log" 2>&1; then
  echo "[gpu_check] report: $prefix.json, $prefix.md"
else
  echo "[gpu_check] report FAILED (see logs/report.log):"
  tail -n 20 "$work/logs/report.log" | sed "s/^/    /"
  failed=1
fi
[ -f "$work/e2e.png" ] && cp "$work/e2e.png" "$prefix-e2e.png"
pack
echo "[gpu_check] done in $((SECONDS - start))s; steps:"
column -t -s $'\t' "$work/steps.tsv" 2>/dev/null || cat "$work/steps.tsv"
[ "${GPU_CHECK_KEEP_WORK:-0}" = 1 ] || rm -rf "$work"
exit "$failed"
