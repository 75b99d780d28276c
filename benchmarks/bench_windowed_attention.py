"""Benchmark ``windowed_attention``: the Triton kernels against every competitor named by the op
contract's speed section, in one process, on the same inputs.

Competitors:
  reference         the eager PyTorch oracle (materialises [B, H, chunk, L] logits)
  reference-compiled  the same under torch.compile
  flex              compiled FlexAttention: score_mod with the captured bias table and sigma; with
                    a cutoff, a block mask from a mask_mod on sigma, rebuilt every call (timed)
  sdpa-dense-bias   SDPA with a dense [B, H, L, L] float bias built from rel_bias and sigma (requires grad)
  sdpa-rank2        SDPA with the rank-2 Gaussian trick (two extra q/k columns). It cannot express
                    the bias table or the cutoff: cheaper maths than the others, shown as a floor.

Suites (benchmarks/shapes.py, the shapes every benchmark harness shares): PRVR training shapes
(B=256, H=8, D=64, L=32/64/128, R=32, adaptive sigma) and long videos with a cutoff (B=2, H=8,
D=64, L=2k..16k, sigma <= 64, cutoff=3), each in fwd, bwd and fwd+bwd.
Timing (benchmarks/common.py): per call, Python dispatch included (``ms``: CUDA events after
warm-up, median of >= 20 runs, rotating through several input sets), and kernel only
(``kernel_ms``: CUDA-graph replay), beside the roofline floor of the shape (``floor_ms``, from
benchmarks/roofline.py with this run's copy bandwidth and GEMM rate; ``floor_frac`` = floor /
kernel time). Output (``--out DIR``): windowed_attention.json / .md (ms, speedup of triton over
each competitor, effective GB/s, fraction of the measured copy bandwidth, peak memory, max error vs
triton), a plot, and the linear-scaling check (time at 2L / time at L) of the long suite. Rows are
printed as they are measured (``ROW {json}``), so a run cut short keeps them.

``--quick`` (about a minute on an H200, compiles included): PRVR L=32/128 and long L=2k/4k, no
compiled competitors (reference-compiled, flex: their compiles take most of a minute each), and
the Triton kernels' pinned launch configs (KDC_AUTOTUNE=0 unless set); ``--competitors`` picks
any subset, e.g. ``--quick --competitors triton,flex``.

On a CPU it is a smoke test only: toy sizes, the eager reference, the SDPA competitors and the
Triton kernels under the interpreter (no compiled competitors), in well under a minute.

Usage:
    python benchmarks/bench_windowed_attention.py [--quick] [--out DIR] [--dtype bf16|fp16|fp32]
        [--competitors triton,reference,...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `kdc_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not torch.cuda.is_available():  # the Triton kernels can only run on the interpreter here
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kdc_kernels as K  # noqa: E402
from benchmarks import common, roofline  # noqa: E402
from benchmarks import shapes as shape_sets  # noqa: E402
from kdc_kernels import _config, testing  # noqa: E402
from kdc_kernels.ops.windowed_attention import windowed_attention_ref  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
GRAD_NAMES = shape_sets.GRAD_NAMES
OURS = "triton"
DENSE_LIMIT = shape_sets.DENSE_LIMIT
Shape = shape_sets.AttentionShape


def shapes(device: torch.device, quick: bool) -> list[Shape]:
    """The shared windowed_attention shapes: full or quick on a GPU, the smoke sizes on a CPU."""
    return shape_sets.attention_shapes(shape_sets.tier_for(device, quick))


def make_inputs(s: Shape, dtype, device, seed: int) -> dict:
    return s.inputs(dtype, device, seed)


# ------------------------------------------------------------------------------ competitors
def _ours(x, s: Shape):
    return K.windowed_attention(x["q"], x["k"], x["v"], x["rel_bias"], x["sigma"], cutoff=s.cutoff, impl=OURS)


def _reference(x, s: Shape):
    return windowed_attention_ref(x["q"], x["k"], x["v"], x["rel_bias"], x["sigma"], cutoff=s.cutoff)


_reference_compiled = None


def _reference_compiled_fn(x, s: Shape):
    global _reference_compiled
    if _reference_compiled is None:
        _reference_compiled = torch.compile(windowed_attention_ref, dynamic=False)
    return _reference_compiled(x["q"], x["k"], x["v"], x["rel_bias"], x["sigma"], cutoff=s.cutoff)


def _flex_impl(q, k, v, bias, sigma, R: int, cutoff: float | None):
    """FlexAttention with the same maths: the bias table and sigma captured by score_mod; with a
    cutoff, a block mask from a mask_mod on sigma (a data-dependent window), built every call."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        d = kv_idx - q_idx
        sig = sigma[b, h, q_idx]
        return score + bias[h, torch.clamp(d, -R, R) + R] - (d * d).float() / (2.0 * sig * sig)

    block_mask = None
    if cutoff is not None:
        window = cutoff * sigma.detach()

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx - q_idx).abs() <= window[b, h, q_idx]

        B, H, L, _ = q.shape
        block_mask = create_block_mask(mask_mod, B, H, L, L, device=q.device)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)


_flex_compiled = None
_FLEX_COMPILE = True  # tests check the maths with the eager (unfused) FlexAttention


def _flex(x, s: Shape):
    global _flex_compiled
    if _flex_compiled is None:
        # One compiled region (closures, mask build and attention), so the per-call closures over
        # new tensors are traced, not guarded on.
        _flex_compiled = torch.compile(_flex_impl, dynamic=False) if _FLEX_COMPILE else _flex_impl
    return _flex_compiled(x["q"], x["k"], x["v"], x["rel_bias"], x["sigma"], s.R, s.cutoff)


def _dense_bias(x, s: Shape) -> torch.Tensor:
    """The full [B, H, L, L] logit bias (table + Gaussian, -inf outside the cutoff), with autograd."""
    L, R = s.L, s.R
    pos = torch.arange(L, device=x["q"].device)
    rel = pos[None, :] - pos[:, None]
    sig = x["sigma"][..., None]
    bias = x["rel_bias"][:, rel.clamp(-R, R) + R][None] - rel.float().square() / (2 * sig * sig)
    if s.cutoff is not None:
        bias = bias.masked_fill(rel.abs() > s.cutoff * sig, float("-inf"))
    return bias.to(x["q"].dtype)


def _sdpa_dense(x, s: Shape):
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=_dense_bias(x, s))


def _sdpa_rank2(x, s: Shape):
    """-(i-j)^2/(2 s_i^2) = const_i + i j / s_i^2 - j^2 / (2 s_i^2): two extra columns on q and k
    (padded to a multiple of 8 for the fused SDPA kernels). No bias table, no cutoff."""
    q, k, v, sigma = x["q"], x["k"], x["v"], x["sigma"]
    B, H, L, D = q.shape
    pos = torch.arange(L, device=q.device, dtype=torch.float32)
    inv = 1.0 / sigma.float().square()
    pad = (-(D + 2)) % 8
    zq = q.new_zeros(B, H, L, pad)
    qa = torch.cat([q * D**-0.5, (pos * inv)[..., None].to(q.dtype), (-0.5 * inv)[..., None].to(q.dtype), zq], -1)
    kcols = torch.stack([pos, pos * pos], -1).to(q.dtype).expand(B, H, L, 2)
    ka = torch.cat([k, kcols, zq], -1)
    va = torch.cat([v, q.new_zeros(B, H, L, 2 + pad)], -1)
    return F.scaled_dot_product_attention(qa, ka, va, scale=1.0)[..., :D]


COMPETITORS = {
    OURS: _ours,
    "reference": _reference,
    "reference-compiled": _reference_compiled_fn,
    "flex": _flex,
    "sdpa-dense-bias": _sdpa_dense,
    "sdpa-rank2": _sdpa_rank2,
}
COMPILED = {"reference-compiled", "flex"}
DENSE = {"reference", "reference-compiled", "sdpa-dense-bias"}


def _applicable(name: str, s: Shape, device: torch.device, quick: bool = False,
                chosen: set | None = None) -> str | None:
    """Why competitor ``name`` is not run for ``s`` (None: it is)."""
    if chosen is not None and name not in chosen:
        return "not among --competitors"
    if device.type != "cuda" and name in COMPILED:
        return "compiled competitors are skipped on CPU (smoke run)"
    if quick and chosen is None and name in COMPILED:
        return "compiled competitors are skipped with --quick (see --competitors)"
    if name in DENSE and s.logits > DENSE_LIMIT:
        return f"O(L^2) memory: {s.logits:.2e} logits"
    return None


# ---------------------------------------------------------------------------------- timing
def cost(s: Shape, dtype: torch.dtype, mode: str) -> tuple[int, int]:
    """``(bytes, FLOPs)`` a kernel must move / do at least (benchmarks/roofline.py)."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return roofline.attention_cost(s.B, s.H, s.L, s.D, name, mode, s.sigma_max, s.cutoff)


def runner(fn, s: Shape, sets: list[dict], mode: str):
    """``run(i)``: one call in ``mode`` on input set ``i % len(sets)`` (bwd: of a graph built once
    per input set, outside the timed region)."""
    douts = [torch.randn_like(x["q"]) for x in sets]
    wrt = [[x[n] for n in GRAD_NAMES] for x in sets]
    if mode == "fwd":
        def run(i):
            with torch.no_grad():
                fn(sets[i % len(sets)], s)
    elif mode == "fwd+bwd":
        def run(i):
            j = i % len(sets)
            torch.autograd.grad(fn(sets[j], s), wrt[j], douts[j], allow_unused=True)
    else:
        outs = [fn(x, s) for x in sets]

        def run(i):
            j = i % len(sets)
            torch.autograd.grad(outs[j], wrt[j], douts[j], retain_graph=True, allow_unused=True)
    return run


def measure(fn, s: Shape, sets: list[dict], mode: str, device, reps: int, warmup: int,
            max_seconds: float | None) -> tuple[float, float | None, str]:
    """``(per-call ms, kernel-only ms, how the kernel time was taken)`` of one call in ``mode``."""
    run = runner(fn, s, sets, mode)
    ms = common.time_fn(run, device, warmup=warmup, reps=reps, max_seconds=max_seconds)
    kernel_ms, how = common.time_kernel(lambda: run(0), device)
    return ms, kernel_ms, how


def bench_shape(s: Shape, dtype, device, args, rates) -> list[dict]:
    sets = [make_inputs(s, dtype, device, seed) for seed in range(args.rotate)]
    rows, ours_ms = [], {}
    copy_bw = rates["bandwidth"] / 1e9 if rates.get("bandwidth") else None
    with torch.no_grad():
        ours_out = _ours(sets[0], s).float()
    for name, fn in COMPETITORS.items():
        skip = _applicable(name, s, device, args.quick, args.competitors)
        if skip is not None:
            rows.append(dict(suite=s.suite, shape=s.label, L=s.L, impl=name, note=skip))
            continue
        try:
            with torch.no_grad():
                err = testing.max_abs_err(fn(sets[0], s).float(), ours_out)
            peak = common.peak_memory_mib(lambda: torch.autograd.grad(
                fn(sets[0], s), [sets[0][n] for n in GRAD_NAMES], torch.ones_like(sets[0]["q"]), allow_unused=True), device)
            for mode in MODES:
                ms, kernel_ms, how = measure(fn, s, sets, mode, device, args.reps, args.warmup, args.max_seconds)
                if name == OURS:
                    ours_ms[mode] = ms
                nbytes, flops = cost(s, dtype, mode)
                gbs = common.bandwidth_gbs(nbytes, kernel_ms or ms)
                rows.append(common.with_floor(
                    dict(suite=s.suite, shape=s.label, L=s.L, impl=name, mode=mode, ms=ms, kernel_ms=kernel_ms,
                         kernel_how=how, gbs=gbs, copy_frac=gbs / copy_bw if copy_bw else None, peak_mib=peak,
                         err_vs_triton=err), nbytes, flops, rates))
        except Exception as exc:  # a competitor that fails (unsupported shape, OOM) is reported, not fatal
            rows.append(dict(suite=s.suite, shape=s.label, L=s.L, impl=name, note=f"failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else ''}"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in rows:  # speedup of ours over each competitor: their ms / our ms
        if r.get("ms") and ours_ms.get(r["mode"]):
            r["triton_speedup"] = r["ms"] / ours_ms[r["mode"]]
        if r["impl"] == "sdpa-rank2" and "note" not in r:
            r["note"] = "no bias table, no cutoff (less maths)"
    return rows


def scaling_rows(rows: list[dict]) -> list[dict]:
    """Long suite, fwd+bwd: time at 2L over time at L for every impl measured at both."""
    out = []
    timed = {(r["impl"], r["L"]): r["ms"] for r in rows if r["suite"] == "long" and r.get("mode") == "fwd+bwd"
             and r.get("ms")}
    for (impl, L), ms in sorted(timed.items()):
        if (impl, 2 * L) in timed:
            out.append(dict(suite="scaling", impl=impl, shape=f"L={L} -> {2 * L}", L=2 * L, mode="fwd+bwd",
                            ms=timed[(impl, 2 * L)], time_ratio_2x_L=timed[(impl, 2 * L)] / ms))
    return out


def plot(rows: list[dict], path: Path) -> bool:
    timed = [r for r in rows if r.get("mode") == "fwd+bwd" and r.get("ms") and r["suite"] != "scaling"]
    labels = list(dict.fromkeys(r["shape"] for r in timed))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    series = {i: [next((r["ms"] for r in timed if r["impl"] == i and r["shape"] == lab), None) for lab in labels]
              for i in impls}
    return common.bar_plot(path, "windowed_attention fwd+bwd (lower is better)", labels, series, "ms", log_y=True)


COLUMNS = ["suite", "shape", "mode", "impl", "ms", "kernel_ms", "floor_bytes_ms", "floor_flops_ms", "floor_frac",
           "triton_speedup", "gbs", "copy_frac", "peak_mib", "err_vs_triton", "time_ratio_2x_L", "note"]


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes, no compiled competitors, pinned Triton configs (about a minute on an H200)")
    parser.add_argument("--competitors", default=None,
                        help=f"comma-separated subset of {','.join(COMPETITORS)} (default: all; --quick: no compiled ones)")
    parser.add_argument("--out", default="runs/bench", help="output folder (JSON, markdown, plot)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="input dtype on a GPU (CPU: fp32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 20; CPU 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5; CPU 1)")
    parser.add_argument("--rotate", type=int, default=3, help="input sets rotated between runs")
    args = parser.parse_args(argv)
    if args.competitors is not None:
        args.competitors = set(args.competitors.split(","))
        unknown = args.competitors - set(COMPETITORS)
        if unknown:
            parser.error(f"unknown competitor(s) {sorted(unknown)}; choose from {list(COMPETITORS)}")
        args.competitors |= {OURS}  # every ratio is against ours
    if args.quick:  # one compile per Triton kernel and shape: no autotuning runs
        os.environ.setdefault("KDC_AUTOTUNE", "0")
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.reps = args.reps or (20 if on_gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    args.max_seconds = None if on_gpu else 5.0
    dtype = DTYPES[args.dtype] if on_gpu else torch.float32
    if on_gpu:
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    # The bwd mode replays one graph (retain_graph=True), which compiled backward functions with
    # donated buffers refuse; give the compiled competitors undonated buffers.
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False
    env = common.environment(device)
    env.update(dtype=str(dtype).replace("torch.", ""), reps=args.reps, quick=args.quick,
               triton_interpret=os.environ.get("TRITON_INTERPRET", "0"),
               skip_value_checks=os.environ.get("KDC_SKIP_VALUE_CHECKS"), autotune=os.environ.get("KDC_AUTOTUNE"),
               value_checks=_config.value_check_mode(device.type), fp32_dots=_config.fp32_dot_precision(device.type))
    rates = common.machine_rates(device)
    env["copy_bandwidth_gbs"] = rates["bandwidth"] / 1e9 if rates["bandwidth"] else None
    env["bf16_gemm_tflops"] = rates["flop_rate"] / 1e12 if rates["flop_rate"] else None

    rows = []
    for s in shapes(device, args.quick):
        print(f"[{s.suite}] {s.label}", flush=True)
        new = bench_shape(s, dtype, device, args, rates)
        common.print_rows(new)
        rows += new
    rows += scaling_rows(rows)
    md = common.write_results("windowed_attention", args.out, env, rows, COLUMNS)
    plot(rows, Path(args.out) / "windowed_attention.png")
    print(md.read_text())
    return md


if __name__ == "__main__":
    # The public op checks lengths/sigma values (a device sync) unless told not to; the
    # competitors called directly check nothing, and a training loop would skip them too.
    os.environ.setdefault("KDC_SKIP_VALUE_CHECKS", "1")
    main()
