#!/usr/bin/env bash
# Creates the virtual environment (if missing) and installs the project into it.
# Called by `make`; every knob is an environment variable (documented in the Makefile and README).
set -euo pipefail

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TRITON_SPEC=${TRITON_SPEC:-triton==3.6.0}
EXTRAS=${EXTRAS:-dev}
NUMPY_SPEC=${NUMPY_SPEC:-numpy<2.4}

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# A Python that already has a CUDA build of torch (a GPU machine, possibly without any package
# registry): use it as it is. Nothing is downloaded; kdc-kernels goes in editable, without dependencies.
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
  echo "bootstrap: $PYTHON has a CUDA build of torch: installing kdc-kernels into it (offline, no dependencies)"
  "$PYTHON" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation --no-index -e .
  missing=$("$PYTHON" -c "
import importlib.util as u
need = ['triton', 'numpy', 'h5py', 'tqdm', 'pytest', 'pytest_benchmark', 'pytest_timeout']
print(' '.join(n for n in need if u.find_spec(n) is None))")
  [ -z "$missing" ] || echo "bootstrap: WARNING: $PYTHON lacks: $missing (install them; the tests that need them fail)"
  "$PYTHON" -m kdc_kernels.info | sed -n 's/^compiled extension: /bootstrap: compiled CUDA extension: /p'
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # TORCH_INDEX_URL chooses the build. "auto" (default): the CPU wheels on a machine without an
  # NVIDIA GPU (a CUDA build is several GB), the default index (CUDA builds on Linux) where there is
  # one. Empty: the default index only.
  TORCH_INDEX_URL=${TORCH_INDEX_URL-auto}
  if [ "$TORCH_INDEX_URL" = "auto" ]; then
    if has_gpu; then
      TORCH_INDEX_URL=""
    else
      TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
      if ! "$PY" -c "import socket; socket.getaddrinfo('download.pytorch.org', 443)" >/dev/null 2>&1; then
        echo "bootstrap: $TORCH_INDEX_URL is unreachable; taking $TORCH_SPEC from the configured indexes"
        TORCH_INDEX_URL=""
      fi
    fi
  fi
  echo "bootstrap: installing $TORCH_SPEC${TORCH_INDEX_URL:+ (extra index $TORCH_INDEX_URL)}"
  if [ -n "$TORCH_INDEX_URL" ]; then
    "${PIP[@]}" --retries 1 --extra-index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
  else
    "${PIP[@]}" "$TORCH_SPEC"
  fi
fi
if ! "$PY" -c "import triton" >/dev/null 2>&1; then
  echo "bootstrap: installing $TRITON_SPEC (fast paths on GPU; interpreter tests on CPU)"
  "${PIP[@]}" "$TRITON_SPEC"
fi
echo "bootstrap: installing kdc-kernels (editable, extras: $EXTRAS)"
# NUMPY_SPEC: the Triton interpreter (the CPU tests of the kernels) needs numpy < 2.4.
"${PIP[@]}" --no-build-isolation -e ".[$EXTRAS]" "$NUMPY_SPEC"
"$PY" -c "import torch, kdc_kernels; print(f'bootstrap: ready: torch {torch.__version__}, kdc_kernels {kdc_kernels.__version__}')"
# pip hides setup.py's output: say here whether the CUDA extension was compiled, and why not.
"$PY" -m kdc_kernels.info | sed -n 's/^compiled extension: /bootstrap: compiled CUDA extension: /p'
