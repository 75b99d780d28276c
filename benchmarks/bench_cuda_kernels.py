"""The compiled CUDA kernels beside the Triton kernels and the eager reference, same process, same
inputs, at the contract's target shapes: time per call and the ratio to the CUDA path.

    python benchmarks/bench_cuda_kernels.py --quick --out gpu-results     # a couple of minutes on an H100
    python benchmarks/bench_cuda_kernels.py --impls cuda,triton --dtype bf16

Each row also records the largest difference of the forward output from the CUDA path's (a sanity
check next to the timing, not a test). Impls that cannot run a case are listed with the reason.
On a machine without a GPU the shapes shrink to a smoke run of whatever can run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kdc_kernels as K  # noqa: E402
from benchmarks import common  # noqa: E402
from kdc_kernels import _backend, testing  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = {
    "windowed_attention": ("kdc_kernels.ops.windowed_attention", K.windowed_attention),
    "max_similarity": ("kdc_kernels.ops.max_similarity", K.max_similarity),
    "max_similarity_topk": ("kdc_kernels.ops.max_similarity", K.max_similarity_topk),
}


def cases(quick: bool, on_gpu: bool) -> list[dict]:
    """(name, op, shape kwargs, backward?) at the contract's target shapes (smaller with --quick)."""
    s = 1 if on_gpu else 0  # CPU: a smoke run on tiny shapes
    B = (64 if quick else 256) if s else 2
    long_L = (8192 if quick else 16384) if s else 256
    return [
        dict(name="attn L=128 fwd+bwd", op="windowed_attention", backward=True,
             shape=dict(B=B, H=8 if s else 2, L=128 if s else 16, D=64 if s else 8, R=16, cutoff=None)),
        dict(name="attn L=32 fwd+bwd", op="windowed_attention", backward=True,
             shape=dict(B=B, H=8 if s else 2, L=32 if s else 8, D=64 if s else 8, R=8, cutoff=None)),
        dict(name="attn L=128 fwd", op="windowed_attention", backward=False,
             shape=dict(B=B, H=8 if s else 2, L=128 if s else 16, D=64 if s else 8, R=16, cutoff=None)),
        dict(name=f"attn L={long_L} cutoff=3 fwd+bwd", op="windowed_attention", backward=True,
             shape=dict(B=1, H=8 if s else 1, L=long_L, D=64 if s else 8, R=16, cutoff=3.0, max_sigma=64.0)),
        dict(name="maxsim train fwd+bwd", op="max_similarity", backward=True,
             shape=dict(nq=640 if s else 8, nv=128 if s else 4, L=128 if s else 8, D=384 if s else 16)),
        dict(name="topk TVR k=100", op="max_similarity_topk", backward=False,
             shape=dict(nq=(2048 if quick else 10895) if s else 8, nv=2179 if s else 30, L=128 if s else 8,
                        D=384 if s else 16, k=100 if s else 5)),
    ]


def make_inputs(case: dict, dtype, device, seed: int) -> dict:
    sh = case["shape"]
    if case["op"] == "windowed_attention":
        args = testing.attention_inputs(sh["B"], sh["H"], sh["L"], sh["D"], R=sh["R"], lengths="ragged", dtype=dtype,
                                        device=device, seed=seed)
        if "max_sigma" in sh:  # narrow windows: sigma in [1, max_sigma]
            g = testing.make_generator(seed)
            args["sigma"] = (1 + (sh["max_sigma"] - 1) * torch.rand(sh["B"], sh["H"], sh["L"], generator=g)).to(device)
        args["cutoff"] = sh["cutoff"]
        return args
    args = testing.similarity_inputs(sh["nq"], sh["nv"], sh["L"], sh["D"], lengths="ragged", dtype=dtype,
                                     device=device, seed=seed)
    if case["op"] == "max_similarity_topk":
        args["k"] = sh["k"]
    return args


def why_not(case: dict, impl: str, device: torch.device, args: dict) -> list[str]:
    package, _ = OPS[case["op"]]
    validated = {k: v for k, v in args.items()}
    if case["op"] == "windowed_attention":
        validated.setdefault("scale", None)
    else:
        validated["normalize"] = True
        if case["op"] == "max_similarity":
            validated["return_index"] = False
    return _backend.why_not(case["op"], package, impl, device, validated)


def runner(case: dict, impl: str, inputs: list[dict]):
    """fn(i) running the op (and its backward) on input set i % len(inputs)."""
    _, op = OPS[case["op"]]
    grad_names = ("q", "k", "v", "rel_bias", "sigma") if case["op"] == "windowed_attention" else ("queries", "clips")

    def run(i: int):
        args = inputs[i % len(inputs)]
        if not case["backward"]:
            with torch.no_grad():
                return op(**args, impl=impl)
        leaves = {n: (t.detach().requires_grad_(True) if n in grad_names and t is not None else t)
                  for n, t in args.items()}
        out = op(**leaves, impl=impl)
        out.backward(torch.ones_like(out))
        return out

    return run


def first_output(result):
    return result[0] if isinstance(result, tuple) else result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    parser.add_argument("--out", default=None, help="folder for the JSON and markdown results")
    parser.add_argument("--impls", default="cuda,triton,reference", help="comma-separated impls to compare")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    opts = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[opts.dtype] if device.type == "cuda" else torch.float32
    impls = [i.strip() for i in opts.impls.split(",") if i.strip()]
    env = common.environment(device)
    reps = 10 if opts.quick else 20
    rows = []
    for case in cases(opts.quick, device.type == "cuda"):
        inputs = [make_inputs(case, dtype, device, seed) for seed in (0, 1)]
        times, outputs = {}, {}
        for impl in impls:
            reasons = why_not(case, impl, device, inputs[0])
            row = dict(case=case["name"], impl=impl, dtype=str(dtype).replace("torch.", ""))
            if reasons:
                rows.append(dict(row, note="; ".join(reasons)[:160]))
                continue
            fn = runner(case, impl, inputs)
            try:
                outputs[impl] = first_output(fn(0)).detach().float()
                times[impl] = common.time_fn(fn, device, warmup=3, reps=reps, max_seconds=10.0)
                memory = common.peak_memory_mib(lambda: fn(0), device)
            except Exception as exc:  # noqa: BLE001 - one failing impl must not hide the others
                rows.append(dict(row, note=f"failed: {type(exc).__name__}: {str(exc)[:140]}"))
                continue
            rows.append(dict(row, ms=times[impl], peak_mib=memory))
        base = times.get("cuda")
        for row in rows:
            if row["case"] != case["name"] or "ms" not in row:
                continue
            if base is not None:
                row["vs_cuda"] = row["ms"] / base  # > 1: slower than the CUDA kernels
            if "cuda" in outputs and row["impl"] in outputs and row["impl"] != "cuda":
                row["max_diff_vs_cuda"] = testing.max_abs_err(outputs[row["impl"]], outputs["cuda"])
        print(common.markdown_table([r for r in rows if r["case"] == case["name"]],
                                    ["case", "impl", "dtype", "ms", "vs_cuda", "max_diff_vs_cuda", "peak_mib", "note"]),
              flush=True)
    columns = ["case", "impl", "dtype", "ms", "vs_cuda", "max_diff_vs_cuda", "peak_mib", "note"]
    if opts.out:
        path = common.write_results("bench_cuda_kernels", opts.out, env, rows, columns)
        print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
