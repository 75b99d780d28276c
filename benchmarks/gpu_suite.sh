#!/usr/bin/env bash
# One prepared check for a fresh GPU machine without network access (torch, triton, nvcc, pytest,
# numpy ... already in the system Python; nothing is downloaded):
#
#   1. build the CUDA extension (editable install, all cores, sm_90) and check it loads
#   2. pytest -m gpu (every GPU test: the CUDA and Triton paths against the reference)
#   3. compute-sanitizer memcheck (then racecheck, synccheck) on the small *sanitizer* test subset
#   4. every benchmark in --quick mode, CUDA and Triton side by side
#
# Results go to $OUT (default ./gpu-results), at most 8 files: summary.md (environment, step table,
# failures, benchmark tables), suite.json, logs.tar.gz (every log, JUnit XML, benchmark JSON).
# Every step has a time cap and the whole suite a budget (SUITE_BUDGET_S, default 450 s), so one
# hanging step cannot eat the machine's time: steps that no longer fit are reported as skipped.
# The last printed lines are the summary table (step, status, seconds).
#
#   bash benchmarks/gpu_suite.sh                 # from the repository root or anywhere
#   OUT=/tmp/r SUITE_BUDGET_S=300 bash benchmarks/gpu_suite.sh
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${SUITE_BUDGET_S:-450}
START=$(date +%s)
WORK=$(mktemp -d -t kdc-gpu-suite.XXXXXX)
LOGS="$WORK/logs"
mkdir -p "$LOGS" "$WORK/bench"
STEPS=()

# run_step NAME CAP_SECONDS COMMAND...: runs with min(CAP, budget left) seconds, logs to $LOGS/NAME.log.
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    echo "=== $name: skipped (suite budget of ${BUDGET}s spent)"
    STEPS+=("$name|skipped (budget)|0")
    return 1
  fi
  echo "=== $name (limit ${limit}s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  if ((rc == 0)); then
    status=ok
  elif ((rc == 124 || rc == 137)); then
    status="TIMEOUT (${limit}s)"
  else
    status="FAILED (rc=$rc)"
  fi
  tail -n 4 "$LOGS/$name.log" | sed 's/^/    /'
  STEPS+=("$name|$status|$(($(date +%s) - t0))")
  return $rc
}

find_tool() {  # find_tool NAME: on PATH, else in the CUDA toolkit
  command -v "$1" 2>/dev/null && return 0
  for home in "${CUDA_HOME:-}" /usr/local/cuda; do
    [ -n "$home" ] && [ -x "$home/bin/$1" ] && echo "$home/bin/$1" && return 0
  done
  return 1
}

# --- 0. environment ------------------------------------------------------------------------------
run_step environment 60 bash -c "
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  $PY -c 'import triton; print(\"triton\", triton.__version__)' || true
  $(find_tool nvcc || echo nvcc) --version | tail -n 2
  git rev-parse --short HEAD 2>/dev/null || true"

# --- 1. build ------------------------------------------------------------------------------------
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} KDC_BUILD_CUDA=1
if ! run_step build 330 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .; then
  # No usable pip / editable support: build in place and import from the source tree.
  run_step build-inplace 330 "$PY" setup.py build_ext --inplace
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
run_step extension 90 "$PY" -c "
from kdc_kernels import _ext, info
print(info.report())
ok, why = _ext.status()
assert ok, why
print('build info:', _ext.build_info())
missing = [op for op in _ext.CUDA_OPS if not _ext.has_op(op)]
assert not missing, f'no CUDA kernels for {missing}'"

# --- 2. tests ------------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfE)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST+=(--timeout=180); fi
run_step pytest-gpu 270 "${PYTEST[@]}" -m gpu --junitxml="$LOGS/pytest-gpu.xml"

# --- 3. compute-sanitizer on the small subset ----------------------------------------------------
SANITIZER=$(find_tool compute-sanitizer)
SUBSET=("${PYTEST[@]}" -m gpu -k "sanitizer and gpu" tests/ops/test_cuda_ops.py)
SAN=(--error-exitcode 1 --report-api-errors no --print-limit 20)  # API errors of torch/triton are not ours
if [ -n "$SANITIZER" ]; then
  run_step sanitizer-memcheck 150 "$SANITIZER" --tool memcheck "${SAN[@]}" "${SUBSET[@]}"
else
  echo "=== sanitizer: compute-sanitizer not found"
  STEPS+=("sanitizer-memcheck|skipped (compute-sanitizer not found)|0")
fi

# --- 4. benchmarks (--quick), CUDA and Triton side by side ---------------------------------------
run_step bench-cuda-kernels 150 "$PY" benchmarks/bench_cuda_kernels.py --quick --out "$WORK/bench" \
  --impls cuda,triton,reference
for bench in benchmarks/bench_windowed_attention.py benchmarks/bench_max_similarity.py; do
  [ -f "$bench" ] || { STEPS+=("$(basename "$bench" .py)|absent|0"); continue; }
  args=(--quick --out "$WORK/bench")
  usage=$("$PY" "$bench" --help 2>/dev/null || true)
  if grep -q -- "--impls IMPLS \[IMPLS" <<<"$usage"; then
    args+=(--impls cuda triton)
  elif grep -q -- "--impls" <<<"$usage"; then
    args+=(--impls cuda,triton)
  fi
  run_step "$(basename "$bench" .py)" 120 "$PY" "$bench" "${args[@]}"
done

# --- 5. further sanitizer tools while the budget lasts -------------------------------------------
if [ -n "$SANITIZER" ]; then
  run_step sanitizer-racecheck 120 "$SANITIZER" --tool racecheck "${SAN[@]}" "${SUBSET[@]}"
  run_step sanitizer-synccheck 90 "$SANITIZER" --tool synccheck "${SAN[@]}" "${SUBSET[@]}"
fi

# --- results -------------------------------------------------------------------------------------
TOTAL=$(($(date +%s) - START))
TABLE="| step | status | seconds |
| --- | --- | --- |"
JSON_STEPS=""
for entry in "${STEPS[@]}"; do
  IFS='|' read -r name status seconds <<<"$entry"
  TABLE+=$'\n'"| $name | $status | $seconds |"
  JSON_STEPS+="${JSON_STEPS:+,}{\"step\": \"$name\", \"status\": \"$status\", \"seconds\": $seconds}"
done
TABLE+=$'\n'"| total | | $TOTAL |"

{
  echo "# GPU suite"
  echo
  echo "Commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s."
  echo
  echo '```'
  cat "$LOGS/environment.log" 2>/dev/null
  echo '```'
  echo
  echo "$TABLE"
  echo
  echo "## pytest -m gpu"
  echo
  echo '```'
  grep -E "^(FAILED|ERROR)|passed|failed|skipped|error" "$LOGS/pytest-gpu.log" 2>/dev/null | tail -n 60
  echo '```'
  for log in "$LOGS"/sanitizer-*.log; do
    [ -f "$log" ] || continue
    echo
    echo "## $(basename "$log" .log)"
    echo
    echo '```'
    grep -E "ERROR SUMMARY|========= (Invalid|Race|Barrier|Error)|passed|failed" "$log" | head -n 30
    echo '```'
  done
  for table in "$WORK"/bench/*.md; do
    [ -f "$table" ] || continue
    echo
    cat "$table"
  done
} >"$OUT/summary.md"

cat >"$OUT/suite.json" <<EOF
{"commit": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)", "budget_s": $BUDGET, "total_s": $TOTAL, "steps": [$JSON_STEPS]}
EOF
cp -r "$WORK/bench" "$LOGS/bench" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
rm -rf "$WORK"

echo
echo "Results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
echo
echo "$TABLE"
