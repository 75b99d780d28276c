# Two commands on a fresh machine:
#   make train   create .venv if missing, install, run the main job (KDC-Net on synthetic data)
#   make test    create .venv if missing, install, run the CUDA compile check (needs nvcc; fails
#                without it unless KDC_SKIP_CUDA_CHECK=1), the whole test suite, then the portability
#                guard (make test-guard)
#
# Variables (override on the command line, e.g. `make test PYTEST_ARGS="-x -k topk"`):
#   PYTHON           interpreter that creates the venv               (python3)
#   VENV             virtual environment folder                      (.venv)
#   TORCH_SPEC       torch requirement installed when the venv lacks torch   (torch==2.13.0)
#   TORCH_INDEX_URL  extra package index for torch (auto): auto = the CPU wheels
#                    (https://download.pytorch.org/whl/cpu) on a machine without an NVIDIA GPU,
#                    none (PyPI's CUDA build) where nvidia-smi sees one; empty = none. A CUDA torch
#                    already in the system Python is reused (the venv gets --system-site-packages).
#   TRITON_SPEC      triton requirement when the venv lacks triton    (triton==3.6.0)
#   EXTRAS           extras of the editable install                  (dev)
#   NUMPY_SPEC       numpy requirement of the CPU venv (the Triton interpreter needs < 2.4)  (numpy<2.4)
#
# A PYTHON that already has a CUDA build of torch (a GPU machine) is used as it is: no venv, no
# download; kdc-kernels is installed into it offline (editable, no dependencies).
#   PYTEST_ARGS      extra arguments for pytest in `make test` and `make gpu-test`
#   GPU_WORKERS      pytest-xdist workers of `make gpu-test`                 (8)
#   TRAIN_ARGS       extra arguments for the main job in `make train`
#   GUARD_TESTS      the tests `make test-guard` re-runs (those whose results depend on summation order)

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?= auto
TRITON_SPEC ?= triton==3.6.0
EXTRAS ?= dev
NUMPY_SPEC ?= numpy<2.4
GPU_WORKERS ?= 8
SYSTEM_CUDA_TORCH := $(shell $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1 && echo yes)
ifeq ($(SYSTEM_CUDA_TORCH),yes)
PY := $(PYTHON)
STAMP := build/.kdc-installed
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdc-installed
endif
export PYTHON VENV TORCH_SPEC TORCH_INDEX_URL TRITON_SPEC EXTRAS NUMPY_SPEC

# The portability guard: the tests whose results depend on how dot products are summed, re-run on
# one thread, with an odd block size of the max-similarity reference and with its summation order
# made position- and block-shape-dependent on purpose (KDC_REF_REORDER=1). An equality that holds
# only where a BLAS happens to round equal vectors alike at every position, in every block shape
# and on every thread count fails here on every machine, not only on some CPUs. About a minute.
GUARD_TESTS ?= tests/ops/test_max_similarity_reference.py tests/kdcnet/test_metrics.py tests/kdcnet/test_evaluate.py \
	tests/test_backend.py::test_reference_ignores_autocast \
	tests/test_bench_max_similarity.py::test_competitors_compute_the_same_maths \
	tests/kdcnet/test_distributed.py::test_sharded_evaluation_equals_one_process \
	tests/ops/test_max_similarity_fast.py::test_exact_ties_go_to_the_lowest_clip \
	tests/ops/test_max_similarity_fast.py::test_topk_exact_ties_go_to_the_lower_video

.PHONY: install train test test-guard bench gpu-test gpu-suite clean

$(STAMP): pyproject.toml setup.py scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	@mkdir -p $(dir $@) && touch $@

install: $(STAMP)

train: $(STAMP)
	$(PY) -m kdcnet train $(TRAIN_ARGS)

test: $(STAMP)
	$(PY) scripts/check_cuda.py
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m pytest benchmarks --benchmark-disable -q -p no:cacheprovider
	$(MAKE) --no-print-directory test-guard

test-guard: $(STAMP)
	OMP_NUM_THREADS=1 KDC_REF_REORDER=1 KDC_REF_BLOCK_ELEMS=997 $(PY) -m pytest $(GUARD_TESTS) -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m pytest benchmarks $(PYTEST_ARGS)

# GPU tests in parallel where pytest-xdist is installed, one pinned Triton configuration per case.
gpu-test: $(STAMP)
	KDC_AUTOTUNE=0 $(PY) -m pytest -m gpu $$($(PY) -c "import xdist" 2>/dev/null && echo "-n $(GPU_WORKERS)") $(PYTEST_ARGS)

# The whole GPU check (build, GPU tests, memcheck, quick benchmarks) within a time budget;
# SUITE_ARGS e.g. "--budget 420 --out /tmp/r". Uses PYTHON as it is (see benchmarks/gpu_suite.py).
gpu-suite:
	PYTHON=$(PYTHON) bash benchmarks/gpu_suite.sh $(SUITE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
