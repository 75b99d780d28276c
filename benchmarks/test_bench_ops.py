"""Regression timing of every available impl of each op at the shared benchmark shapes
(benchmarks/shapes.py; pytest-benchmark).

    pytest benchmarks/                                  # time everything that can run here
    pytest benchmarks/ --benchmark-autosave             # save a baseline under .benchmarks/
    pytest benchmarks/ --benchmark-compare              # compare with the last saved run
    pytest benchmarks/ --benchmark-compare=0001 --benchmark-compare-fail=median:10%
    pytest benchmarks/ --benchmark-disable              # smoke: run each case once, no timing

Impls of one op at one shape share a benchmark group, so they print side by side. On CUDA every
timed call ends with a synchronisation. Before it is timed, every case checks that the call it
times matches the reference (fp32 on the same input values): the output and every gradient by the
contract's rule, max-sim indices up to near-ties, top-k lists valid up to near-ties. So the smoke
run (``--benchmark-disable``, what CI runs) is a test; there the Triton kernels also run on the CPU
interpreter (checked once, never timed). The competitor comparisons (FlexAttention, SDPA,
torch.compile, GEMM ceilings) with tables and plots are the bench_*.py scripts.
"""

from __future__ import annotations

import pytest
import torch

import kdc_kernels as K
from benchmarks import shapes
from kdc_kernels import _backend, testing

IMPLS = ("reference", "triton", "cuda")


def _skip_unless_runnable(op_name, impl, device, args, benchmark):
    """Skip unless ``impl`` can run the op on ``args`` (its public arguments, as the timed call
    passes them)."""
    if device.type == "cpu" and impl == "triton" and not benchmark.disabled:
        pytest.skip("Triton on CPU runs only under the interpreter: not a speed measurement "
                    "(the smoke run, --benchmark-disable, checks it)")
    spec = _backend.op_spec(op_name)
    reasons = _backend.why_not(spec, impl, device, spec.validate(**args))
    if reasons:
        pytest.skip("; ".join(reasons))


def _run(benchmark, fn, device):
    def call():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return benchmark.pedantic(call, rounds=5 if device.type == "cpu" else 20, warmup_rounds=1)


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _fp32(args: dict, names) -> dict:
    """The same values in fp32, detached (the reference's inputs)."""
    return {n: (t.detach().float() if n in names else (t.detach() if isinstance(t, torch.Tensor) else t))
            for n, t in args.items()}


def _result(fn, args: dict, grad_names, dout):
    """Output and gradients of ``fn(**args)`` on fresh leaves."""
    x = {n: (t.detach().clone().requires_grad_(True) if n in grad_names and t is not None else t)
         for n, t in args.items()}
    out = fn(**x)
    wrt = [n for n in grad_names if x.get(n) is not None]
    return out, dict(zip(wrt, torch.autograd.grad(out, [x[n] for n in wrt], dout)))


# ------------------------------------------------------------------------- windowed_attention
def _check_attention(impl, args, s, dout, dtype, tf32):
    def op(impl):
        return lambda **x: K.windowed_attention(**x, cutoff=s.cutoff, impl=impl)

    out, grads = _result(op(impl), args, shapes.GRAD_NAMES, dout)
    ref, ref_grads = _result(op("reference"), _fp32(args, ("q", "k", "v")), shapes.GRAD_NAMES, dout.float())
    low, low_grads = (None, {}) if dtype == torch.float32 else _result(op("reference"), args, shapes.GRAD_NAMES, dout)
    testing.check_fast_path(out, ref, low, dtype=dtype, tf32=tf32, name=f"{impl} out")
    for n, g in grads.items():
        testing.check_fast_path(g, ref_grads[n], low_grads.get(n), dtype=dtype, tf32=tf32, name=f"{impl} d{n}")


def test_windowed_attention_fwd_bwd(benchmark, bench_device, attention_shape, impl):
    s = attention_shape
    dtype = _dtype(bench_device)
    args = s.inputs(dtype, bench_device)
    _skip_unless_runnable("windowed_attention", impl, bench_device, dict(args, cutoff=s.cutoff), benchmark)
    benchmark.group = f"windowed_attention fwd+bwd {s.name}"
    grad = torch.randn(args["q"].shape, generator=testing.make_generator(1)).to(bench_device, dtype)
    _check_attention(impl, args, s, grad, dtype, impl == "triton" and testing.tf32_enabled(bench_device))

    def step():
        out = K.windowed_attention(**args, cutoff=s.cutoff, impl=impl)
        out.backward(grad)

    _run(benchmark, step, bench_device)


# ----------------------------------------------------------------------------- max_similarity
def _check_max_similarity(impl, args, s, grad, dtype, tf32):
    x = {n: (t.detach().clone().requires_grad_(s.backward) if n in ("queries", "clips") else t)
         for n, t in args.items()}
    score, index = K.max_similarity(**x, return_index=True, impl=impl)
    same = _fp32(args, ("queries", "clips"))
    ref, ref_index = K.max_similarity(**same, return_index=True, impl="reference")
    low = None if dtype == torch.float32 else ref  # the reference computes in fp32 on the same values
    testing.check_fast_path(score, ref, low, dtype=dtype, tf32=tf32, name=f"{impl} score")
    scale = max(1.0, float(ref.abs().max()))
    testing.assert_argmax_valid(index, ref_index, testing.similarity_at(same["queries"], same["clips"]),
                                same["clips"], (testing.TF32_TOLERANCE if tf32 else 1e-4) * scale, f"{impl} index")
    if s.backward:
        got = torch.autograd.grad(score, [x["queries"], x["clips"]], grad)
        want = testing.max_similarity_grads_at(same["queries"], same["clips"], index, grad)
        floor = testing.TOLERANCE[dtype] if dtype != torch.float32 else (testing.TF32_TOLERANCE if tf32 else 1e-4)
        for g, w, name in zip(got, want, ("d queries", "d clips")):
            testing.assert_close(g.float(), w, floor * max(1.0, float(w.abs().max())), f"{impl} {name}")


def test_max_similarity(benchmark, bench_device, similarity_shape, impl):
    s = similarity_shape
    dtype = _dtype(bench_device)
    args = s.inputs(dtype, bench_device, requires_grad=s.backward)
    _skip_unless_runnable("max_similarity", impl, bench_device, args, benchmark)
    benchmark.group = f"max_similarity {s.mode} {s.name}"
    grad = torch.randn(s.nq, s.nv, generator=testing.make_generator(2)).to(bench_device)
    tf32 = impl == "triton" and testing.tf32_enabled(bench_device)
    _check_max_similarity(impl, args, s, grad, dtype, tf32)

    def step():
        if s.backward:
            K.max_similarity(**args, impl=impl).backward(grad)
        else:
            with torch.no_grad():
                K.max_similarity(**args, impl=impl)

    _run(benchmark, step, bench_device)


def test_max_similarity_topk(benchmark, bench_device, topk_shape, impl):
    s = topk_shape
    dtype = _dtype(bench_device)
    args = s.inputs(dtype, bench_device)
    _skip_unless_runnable("max_similarity_topk", impl, bench_device, dict(args, k=s.k), benchmark)
    benchmark.group = f"max_similarity_topk {s.name}"
    scores, videos = K.max_similarity_topk(**args, k=s.k, impl=impl)
    full = K.max_similarity(**_fp32(args, ("queries", "clips")), impl="reference")
    tol = testing.TF32_TOLERANCE if impl == "triton" and testing.tf32_enabled(bench_device) else 1e-4
    assert scores.dtype == torch.float32 and videos.shape == (s.nq, s.k)
    testing.assert_topk_equivalent(scores, videos, full, tol * max(1.0, float(full.abs().max())), f"{impl} top-k")
    _run(benchmark, lambda: K.max_similarity_topk(**args, k=s.k, impl=impl), bench_device)
