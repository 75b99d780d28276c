#!/usr/bin/env bash
# AddressSanitizer run of the CUDA kernels on the CPU emulation (tests/cuda_emulation): the CPU
# stand-in for `compute-sanitizer --tool memcheck`. Out-of-bounds reads / writes of global memory
# (torch tensors) and of the per-block shared memory buffer abort the run with a report naming the
# kernel. Builds an instrumented copy of the emulated extension first (a few minutes, cached in
# .cache/cuda-emulation-asan). Extra arguments go to pytest.
#
#   bash scripts/emulated_sanitizer.sh
#   bash scripts/emulated_sanitizer.sh -k "emulated and windowed"     # another selection
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export KDC_EMU_ASAN=1
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
LIBASAN=$(${CC:-gcc} -print-file-name=libasan.so)
# libstdc++ preloaded too: ASAN intercepts __cxa_throw, and with only libasan preloaded into Python
# (which does not link libstdc++) the first C++ exception (an error raised by a Python kernel
# through the dispatcher) aborts with "real___cxa_throw != 0".
LIBSTDCXX=$(${CXX:-g++} -print-file-name=libstdc++.so)
SELECT=(-k "emulated and (sanitizer or window_edges or rounds)")
for arg in "$@"; do [ "$arg" = "-k" ] && SELECT=(); done
LD_PRELOAD="$LIBASAN $LIBSTDCXX" exec "$PY" -m pytest tests/ops/test_cuda_ops.py tests/ops/test_windowed_attention_fast.py \
  -q -p no:cacheprovider "${SELECT[@]}" "$@"
