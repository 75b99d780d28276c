"""pytest-benchmark suite options.

``--bench-shapes``: ``standard`` (the op contract's shapes), ``small`` (scaled down for CPUs and
smoke runs) or ``auto`` (standard on a GPU, small otherwise; the default).
``--bench-device``: ``cuda`` or ``cpu`` (default: cuda if available).
"""

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("kdc benchmarks")
    group.addoption("--bench-shapes", default="auto", choices=("auto", "standard", "small"),
                    help="shape suite: standard (op contract), small (CPU/smoke), auto (standard on GPU)")
    group.addoption("--bench-device", default=None, choices=("cuda", "cpu"),
                    help="device to benchmark on (default: cuda if available, else cpu)")


@pytest.fixture(scope="session")
def bench_device(request):
    name = request.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device")
    return torch.device(name)


@pytest.fixture(scope="session")
def bench_suite(request, bench_device):
    choice = request.config.getoption("--bench-shapes")
    if choice == "auto":
        choice = "standard" if bench_device.type == "cuda" else "small"
    return choice
