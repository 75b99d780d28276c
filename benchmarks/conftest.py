"""pytest-benchmark suite options and the parametrization of its cases.

``--bench-shapes``: ``standard`` (every shape of benchmarks/shapes.py: the op contract's target
shapes), ``small`` (the same shapes' CPU smoke sizes) or ``auto`` (standard on a GPU, small
otherwise; the default).
``--bench-device``: ``cuda`` or ``cpu`` (default: cuda if available).

Tests taking ``attention_shape`` / ``similarity_shape`` / ``topk_shape`` run once per shape of the
chosen suite (ids: the shape names), those taking ``impl`` once per implementation.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # the smoke run checks the Triton kernels on the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import shapes  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("kdc benchmarks")
    group.addoption("--bench-shapes", default="auto", choices=("auto", "standard", "small"),
                    help="shape suite: standard (op contract), small (CPU/smoke), auto (standard on GPU)")
    group.addoption("--bench-device", default=None, choices=("cuda", "cpu"),
                    help="device to benchmark on (default: cuda if available, else cpu)")


def _device_name(config) -> str:
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def _suite(config) -> str:
    choice = config.getoption("--bench-shapes")
    if choice == "auto":
        choice = "standard" if _device_name(config) == "cuda" else "small"
    return choice


def pytest_generate_tests(metafunc):
    tier = "full" if _suite(metafunc.config) == "standard" else "smoke"
    similarity = shapes.similarity_shapes(tier)
    cases = {
        "attention_shape": shapes.attention_shapes(tier),
        "similarity_shape": [s for s in similarity if s.k is None],
        "topk_shape": [s for s in similarity if s.k is not None],
    }
    for name, values in cases.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, values, ids=[s.name for s in values])
    if "impl" in metafunc.fixturenames:
        from benchmarks.test_bench_ops import IMPLS

        metafunc.parametrize("impl", IMPLS)


@pytest.fixture(scope="session")
def bench_device(request):
    name = _device_name(request.config)
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device")
    return torch.device(name)
