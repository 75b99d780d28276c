#!/usr/bin/env bash
# The GPU suite (`make gpu-suite`): build, GPU tests, memcheck and quick benchmarks on a fresh,
# offline GPU machine, every stage under a time limit; results under $OUT or ./gpu-results.
# All options and the stage list: python3 benchmarks/gpu_suite.py --help
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_suite.py "$@"
