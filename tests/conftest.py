"""Test setup. Without a GPU, Triton kernels run on the CPU interpreter: the flag must be set
before any Triton kernel is defined, so it is set here, before kdc_kernels is imported."""

import os

# Spinning OpenMP threads slow CPU training several-fold on a small shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One compile per test case: the GPU tests run every Triton kernel in its pinned launch config
    # (tests/test_launch_policy.py autotunes on purpose).
    os.environ.setdefault("KDC_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run with `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
