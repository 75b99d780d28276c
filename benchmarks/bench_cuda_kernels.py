"""The compiled CUDA kernels beside the Triton kernels and the eager reference, same process, same
inputs, per op and shape: time per call (Python dispatch included) and the ratio to the CUDA path.

    python benchmarks/bench_cuda_kernels.py --quick --out gpu-results     # about a minute on an H200
    python benchmarks/bench_cuda_kernels.py --impls cuda,cuda-simt,triton --dtype fp16

Impls: ``cuda`` (bf16 / fp16 on the tensor-core kernels), ``cuda-simt`` (the same op with
``KDC_CUDA_NO_TENSOR_CORES=1``: the fp32 SIMT / WMMA kernels the tensor-core ones replaced),
``triton``, ``reference``. ``cuda`` is measured first in every case, so each row carries its ratio
to it (``vs_cuda`` > 1: slower than the CUDA kernels) and the largest difference of its forward
output from the CUDA path's (a sanity check next to the timing, not a test). The shapes are the
ones every benchmark harness shares (benchmarks/shapes.py): ``--quick`` takes its quick tier.

Every row is printed as a JSON line (``ROW {...}``) the moment it is measured, so a run cut by a
time limit keeps what it measured; the case's table follows its rows. ``--budget`` stops starting
new measurements after that many seconds (the remaining rows say so). Impls that cannot run a
case are listed with the reason. On a machine without a GPU the shapes shrink to a smoke run of
whatever can run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks import shapes as shape_sets  # noqa: E402
from kdc_kernels import _backend, testing  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = ["case", "impl", "dtype", "ms", "vs_cuda", "tflops", "max_diff_vs_cuda", "peak_mib", "note"]


def cases(quick: bool, on_gpu: bool) -> list[dict]:
    """The shared shapes (benchmarks/shapes.py): every one, or the --quick tier, on a GPU; their CPU
    smoke sizes without one (the case names keep the GPU shapes' L)."""
    tier = ("quick" if quick else "full") if on_gpu else "smoke"
    attn = {s.name: s for s in shape_sets.attention_shapes(tier)}
    sim = {s.name: s for s in shape_sets.similarity_shapes(tier)}
    gpu_L = {s.name: s.L for s in shape_sets.ATTENTION}
    longest = max((n for n, s in attn.items() if s.suite == "long"), key=lambda n: gpu_L[n])
    return [
        dict(name="attn L=128 fwd+bwd", op="windowed_attention", backward=True, shape=attn["prvr-L128"]),
        dict(name="attn L=32 fwd+bwd", op="windowed_attention", backward=True, shape=attn["prvr-L32"]),
        dict(name="attn L=128 fwd", op="windowed_attention", backward=False, shape=attn["prvr-L128"]),
        dict(name=f"attn L={gpu_L[longest]} cutoff=3 fwd+bwd", op="windowed_attention", backward=True,
             shape=attn[longest]),
        dict(name="maxsim train fwd+bwd", op="max_similarity", backward=True, shape=sim["train"]),
        dict(name="maxsim eval fwd", op="max_similarity", backward=False, shape=sim["tvr-scores"]),
        dict(name="topk TVR k=100", op="max_similarity_topk", backward=False, shape=sim["tvr-topk"]),
    ]


def flops(case: dict) -> float:
    """Matmul FLOPs of one call (the GEMM-shaped work; masks and window skipping not counted)."""
    sh = case["shape"]
    if case["op"] == "windowed_attention":
        fwd = 4.0 * sh.B * sh.H * sh.L * sh.L * sh.D  # S = QK^T and PV
        return fwd * (3.5 if case["backward"] else 1.0)  # backward: recompute S, dP, dV, dK, dQ
    fwd = 2.0 * sh.nq * sh.nv * sh.L * sh.D
    return fwd * (1.0 if not case["backward"] else 1.0 + 2.0 / sh.L)


def make_inputs(case: dict, dtype, device, seed: int) -> dict:
    sh = case["shape"]
    if case["op"] == "windowed_attention":
        return dict(sh.inputs(dtype, device, seed, requires_grad=False), cutoff=sh.cutoff)
    args = sh.inputs(dtype, device, seed)
    if case["op"] == "max_similarity_topk":
        args["k"] = sh.k
    return args


def base_impl(impl: str) -> str:
    return "cuda" if impl == "cuda-simt" else impl


@contextlib.contextmanager
def impl_environment(impl: str):
    """cuda-simt: the CUDA op with its tensor-core kernels switched off (read by the bindings per call)."""
    if impl != "cuda-simt":
        yield
        return
    old = os.environ.get("KDC_CUDA_NO_TENSOR_CORES")
    os.environ["KDC_CUDA_NO_TENSOR_CORES"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KDC_CUDA_NO_TENSOR_CORES", None)
        else:
            os.environ["KDC_CUDA_NO_TENSOR_CORES"] = old


def why_not(case: dict, impl: str, device: torch.device, args: dict) -> list[str]:
    spec = _backend.op_spec(case["op"])
    return _backend.why_not(spec, base_impl(impl), device, spec.validate(**args))


def runner(case: dict, impl: str, inputs: list[dict]):
    """fn(i) running the op (and its backward) on input set i % len(inputs)."""
    op = _backend.op_spec(case["op"]).function
    grad_names = ("q", "k", "v", "rel_bias", "sigma") if case["op"] == "windowed_attention" else ("queries", "clips")

    def run(i: int):
        args = inputs[i % len(inputs)]
        with impl_environment(impl):
            if not case["backward"]:
                with torch.no_grad():
                    return op(**args, impl=base_impl(impl))
            leaves = {n: (t.detach().requires_grad_(True) if n in grad_names and t is not None else t)
                      for n, t in args.items()}
            out = op(**leaves, impl=base_impl(impl))
            out.backward(torch.ones_like(out))
            return out

    return run


def first_output(result):
    return result[0] if isinstance(result, tuple) else result


def order_impls(impls: list[str]) -> list[str]:
    """cuda first, so that every later row can carry its ratio to it."""
    return sorted(impls, key=lambda i: 0 if i == "cuda" else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    parser.add_argument("--out", default=None, help="folder for the JSON and markdown results")
    parser.add_argument("--impls", default="cuda,cuda-simt,triton,reference",
                        help="comma-separated impls to compare (cuda, cuda-simt, triton, reference)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--cases", default=None, help="comma-separated substrings: only the cases whose name has one")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which no new measurement starts (default: 55 with --quick, none otherwise)")
    opts = parser.parse_args()

    t_start = time.perf_counter()
    budget = opts.budget if opts.budget is not None else (55.0 if opts.quick else None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[opts.dtype] if device.type == "cuda" else torch.float32
    impls = order_impls([i.strip() for i in opts.impls.split(",") if i.strip()])
    env = common.environment(device)
    reps, warmup, max_seconds = (10, 2, 3.0) if opts.quick else (20, 5, 10.0)
    selected = [c for c in cases(opts.quick, device.type == "cuda")
                if opts.cases is None or any(s.strip() in c["name"] for s in opts.cases.split(","))]
    rows = []
    for case in selected:
        case_rows, base_ms, base_out = [], None, None
        inputs = None
        for impl in impls:
            row = dict(case=case["name"], impl=impl, dtype=str(dtype).replace("torch.", ""))
            if budget is not None and time.perf_counter() - t_start > budget:
                row["note"] = f"not measured: the {budget:.0f} s budget was spent"
            else:
                if inputs is None:
                    inputs = [make_inputs(case, dtype, device, seed) for seed in (0, 1)]
                reasons = why_not(case, impl, device, inputs[0])
                if reasons:
                    row["note"] = "; ".join(reasons)[:160]
                else:
                    fn = runner(case, impl, inputs)
                    try:
                        out = first_output(fn(0)).detach().float()
                        ms = common.time_fn(fn, device, warmup=warmup, reps=reps, max_seconds=max_seconds)
                        row.update(ms=ms, tflops=flops(case) / (ms * 1e-3) / 1e12 if ms else None,
                                   peak_mib=common.peak_memory_mib(lambda: fn(0), device))
                        if impl == "cuda":
                            base_ms, base_out = ms, out
                        else:
                            if base_ms is not None:
                                row["vs_cuda"] = ms / base_ms
                            if base_out is not None and out.shape == base_out.shape:
                                row["max_diff_vs_cuda"] = testing.max_abs_err(
                                    torch.nan_to_num(out, neginf=0.0), torch.nan_to_num(base_out, neginf=0.0))
                    except Exception as exc:  # noqa: BLE001 - one failing impl must not hide the others
                        row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:140]}"
            common.print_rows([row])
            case_rows.append(row)
        rows += case_rows
        print(common.markdown_table(case_rows, COLUMNS), flush=True)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"bench_cuda_kernels: {time.perf_counter() - t_start:.1f} s", flush=True)
    if opts.out:
        path = common.write_results("bench_cuda_kernels", opts.out, env, rows, COLUMNS)
        print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
