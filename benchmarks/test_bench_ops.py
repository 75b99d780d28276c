"""Regression timing of every available impl of each op at the standard shapes (pytest-benchmark).

    pytest benchmarks/                                  # time everything that can run here
    pytest benchmarks/ --benchmark-autosave             # save a baseline under .benchmarks/
    pytest benchmarks/ --benchmark-compare              # compare with the last saved run
    pytest benchmarks/ --benchmark-compare=0001 --benchmark-compare-fail=median:10%
    pytest benchmarks/ --benchmark-disable              # smoke: run each case once, no timing

Impls of one op at one shape share a benchmark group, so they print side by side. On CUDA every
timed call ends with a synchronisation. The competitor comparisons (FlexAttention, SDPA,
torch.compile, GEMM ceilings) with tables and plots are the bench_*.py scripts.
"""

from __future__ import annotations

import pytest
import torch

import kdc_kernels as K
from kdc_kernels import _backend, testing

# name -> (standard shape, small shape); the op contract's standard shapes.
ATTENTION_SHAPES = {
    "prvr-L128": (dict(B=256, H=8, L=128, D=64, cutoff=None), dict(B=8, H=4, L=64, D=32, cutoff=None)),
    "prvr-L32": (dict(B=256, H=8, L=32, D=64, cutoff=None), dict(B=8, H=4, L=32, D=32, cutoff=None)),
    "long-L16k-cutoff": (dict(B=1, H=8, L=16384, D=64, cutoff=3.0), dict(B=1, H=2, L=1024, D=32, cutoff=3.0)),
}
SIMILARITY_SHAPES = {
    "train-640x128x128x384": (dict(nq=640, nv=128, L=128, D=384), dict(nq=64, nv=32, L=32, D=64)),
}
TOPK_SHAPES = {
    "tvr-test": (dict(nq=10895, nv=2179, L=128, D=384, k=100), dict(nq=256, nv=512, L=32, D=64, k=100)),
}
IMPLS = ("reference", "triton", "cuda")


def _pick(shapes, name, suite):
    standard, small = shapes[name]
    return standard if suite == "standard" else small


def _skip_unless_runnable(op_name, package, impl, device, case):
    if device.type == "cpu" and impl == "triton":
        pytest.skip("Triton on CPU runs only under the interpreter: not a speed measurement")
    reasons = _backend.why_not(op_name, package, impl, device, case)
    if reasons:
        pytest.skip("; ".join(reasons))


def _run(benchmark, fn, device):
    def call():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return benchmark.pedantic(call, rounds=5 if device.type == "cpu" else 20, warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_name", list(ATTENTION_SHAPES))
def test_windowed_attention_fwd_bwd(benchmark, bench_device, bench_suite, shape_name, impl):
    s = _pick(ATTENTION_SHAPES, shape_name, bench_suite)
    dtype = torch.bfloat16 if bench_device.type == "cuda" else torch.float32
    sigma_max = 64.0 if s["cutoff"] else None
    args = testing.attention_inputs(s["B"], s["H"], s["L"], s["D"], R=32, dtype=dtype, device=bench_device,
                                    lengths="ragged", requires_grad=True, seed=0)
    if sigma_max:
        with torch.no_grad():
            args["sigma"].clamp_(max=sigma_max)
    case = dict(args, scale=None, cutoff=s["cutoff"])
    _skip_unless_runnable("windowed_attention", "kdc_kernels.ops.windowed_attention", impl, bench_device, case)
    benchmark.group = f"windowed_attention fwd+bwd {shape_name}"
    grad = torch.randn_like(args["q"])

    def step():
        out = K.windowed_attention(**args, cutoff=s["cutoff"], impl=impl)
        out.backward(grad)

    _run(benchmark, step, bench_device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_name", list(SIMILARITY_SHAPES))
def test_max_similarity_fwd_bwd(benchmark, bench_device, bench_suite, shape_name, impl):
    s = _pick(SIMILARITY_SHAPES, shape_name, bench_suite)
    dtype = torch.bfloat16 if bench_device.type == "cuda" else torch.float32
    args = testing.similarity_inputs(s["nq"], s["nv"], s["L"], s["D"], dtype=dtype, device=bench_device,
                                     requires_grad=True, seed=0)
    _skip_unless_runnable("max_similarity", "kdc_kernels.ops.max_similarity", impl, bench_device,
                          dict(args, normalize=True, return_index=False))
    benchmark.group = f"max_similarity fwd+bwd {shape_name}"

    def step():
        K.max_similarity(**args, impl=impl).sum().backward()

    _run(benchmark, step, bench_device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_name", list(TOPK_SHAPES))
def test_max_similarity_topk(benchmark, bench_device, bench_suite, shape_name, impl):
    s = _pick(TOPK_SHAPES, shape_name, bench_suite)
    dtype = torch.bfloat16 if bench_device.type == "cuda" else torch.float32
    args = testing.similarity_inputs(s["nq"], s["nv"], s["L"], s["D"], dtype=dtype, device=bench_device, seed=0)
    _skip_unless_runnable("max_similarity_topk", "kdc_kernels.ops.max_similarity", impl, bench_device,
                          dict(args, k=s["k"], normalize=True))
    benchmark.group = f"max_similarity_topk {shape_name}"
    _run(benchmark, lambda: K.max_similarity_topk(**args, k=s["k"], impl=impl), bench_device)
