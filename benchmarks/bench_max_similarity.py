"""Benchmark ``max_similarity`` and ``max_similarity_topk``: the Triton kernels against the
competitors named by the op contract, in one process, on the same inputs.

Competitors:
  triton               ours, bf16 inputs (fp32 scores); ``triton-fp32``: fp32 inputs (IEEE dots)
  reference            the package's eager oracle (fp32, chunked [queries, videos, L] blocks)
  prvr-fp32/-bf16      the PRVR-codebase pattern: normalise, einsum to [Nq, L, Nv], mask, max over
                       clips (then torch.topk), with fp32 / bf16 inputs
  prvr-*-compiled      the same under torch.compile
  prvr-*-chunked       the pattern over chunks of videos with a running torch.topk: what a PRVR
                       codebase must do when [Nq, L, Nv] does not fit (the corpus case)
  gemm-bf16            a bare bf16 GEMM to [Nq, Nv*L] (over chunks of videos when that does not
                       fit): the ceiling of a fused epilogue

Scenarios (the op contract's speed targets; benchmarks/shapes.py, the shapes every benchmark
harness shares):
  train        max_similarity fwd+bwd at training shapes, Nq=640, Nv=128, L=128, D=384
  tvr-scores   max_similarity forward at the TVR test set, Nq=10,895, Nv=2,179, L=128, D=384
  tvr-topk     max_similarity_topk (k=100) at the TVR test set
  corpus-topk  max_similarity_topk (k=100) at Nq=10,000, Nv=100,000, L=32, D=512

Reported per competitor: median ms per call with the Python dispatch inside the timed window
(``ms``: CUDA events, warm-up, rotating input sets) and kernel only (``kernel_ms``: CUDA-graph
replay, benchmarks/common.py), the roofline floor of the scenario beside them (``floor_ms``:
benchmarks/roofline.py with this run's copy bandwidth and GEMM rate; ``floor_frac`` = floor /
kernel time), the speedup of ``triton`` over it (its ms / ours), achieved TFLOP/s (2 Nq Nv L D per
forward; x3 for fwd+bwd, the dense-equivalent work; from the kernel-only time) and that as a
fraction of the same run's bf16 GEMM rate, peak extra memory, and the max error of its scores
against the fp32 reference. Output (``--out DIR``): max_similarity.json / .md and
max_similarity.png (time of each competitor over ours). Rows are printed as they are measured
(``ROW {json}``), so a run cut short keeps them.

``--quick`` (about a minute on an H200, compiles included): train + TVR scenarios, no compiled or
fp32-Triton competitors, fewer runs, and the Triton kernels' pinned launch configs (KDC_AUTOTUNE=0
unless set); ``--competitors`` picks any subset.

On a CPU it is a smoke run only: toy sizes, the reference, the eager PRVR patterns and the Triton
kernels under the interpreter (no compiled competitors), in well under a minute.

Usage:
    python benchmarks/bench_max_similarity.py [--quick] [--out DIR] [--scenarios train,tvr-topk]
        [--competitors triton,prvr-bf16,...]
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
from kdc_kernels.ops.max_similarity import max_similarity_ref, max_similarity_topk_ref  # noqa: E402

OURS = "triton"
# Elements of one [Nq, L, chunk] fp32 block of the chunked PRVR pattern / one GEMM output chunk.
CHUNK_ELEMS = 2**30


Scenario = shape_sets.SimilarityShape
SCENARIOS = {s.name: s for s in shape_sets.similarity_shapes("full")}
SMOKE = {s.name: s for s in shape_sets.similarity_shapes("smoke")}  # CPU: the same scenarios at toy sizes


def make_inputs(s: Scenario, device: torch.device, seed: int) -> dict:
    """fp32 and bf16 copies of the same queries [Nq, D] and clips [Nv, L, D], ragged lengths."""
    x32 = s.inputs(torch.float32, device, seed)
    q, c, lengths = x32["queries"], x32["clips"], x32["lengths"]
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = dict(lengths=lengths, valid=torch.arange(s.L, device=device)[None] < lengths[:, None],
             fp32=(q, c), bf16=(q.bfloat16(), c.bfloat16()))
    if s.backward:  # upstream gradients: of the scores, and of the GEMM ceiling's [Nq, Nv*L] output
        x["grad"] = torch.randn(s.nq, s.nv, device=device, generator=g)
        x["grad_gemm"] = torch.randn(s.nq, s.nv * s.L, device=device, generator=g).bfloat16()
        x["fp32"] = tuple(t.requires_grad_(True) for t in x["fp32"])
        x["bf16"] = tuple(t.requires_grad_(True) for t in x["bf16"])
    return x


# ------------------------------------------------------------------------------ competitors
def _prvr_scores(q, c, valid):
    """The PRVR-codebase pattern: the full [Nq, L, Nv] similarity, masked, max over clips."""
    q, c = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
    sim = torch.einsum("nd,vld->nlv", q, c)
    sim = sim.masked_fill(~valid.t()[None], float("-inf"))
    return sim.max(dim=1).values.float()


def _prvr_topk(q, c, valid, k):
    return torch.topk(_prvr_scores(q, c, valid), k, dim=1)


_compiled = {}


def _prvr_compiled(topk: bool):
    key = "topk" if topk else "scores"
    if key not in _compiled:
        _compiled[key] = torch.compile(_prvr_topk if topk else _prvr_scores, dynamic=False)
    return _compiled[key]


def _prvr_chunked_topk(q, c, valid, k):
    """The pattern over chunks of videos, merging each chunk into a running top-k."""
    nq, (nv, L, _) = q.shape[0], c.shape
    chunk = max(1, CHUNK_ELEMS // (nq * L))
    best_s = q.new_empty(nq, 0, dtype=torch.float32)
    best_i = torch.empty(nq, 0, dtype=torch.int64, device=q.device)
    for v0 in range(0, nv, chunk):
        s = _prvr_scores(q, c[v0:v0 + chunk], valid[v0:v0 + chunk])
        ids = torch.arange(v0, v0 + s.shape[1], device=q.device).expand(nq, -1)
        top = torch.topk(torch.cat([best_s, s], 1), min(k, best_s.shape[1] + s.shape[1]), dim=1)
        best_s, best_i = top.values, torch.cat([best_i, ids], 1).gather(1, top.indices)
    return best_s, best_i


def _gemm(q, c):
    """The bare GEMM [Nq, Nv*L] (in chunks of videos when it is too large to hold)."""
    nq, (nv, L, D) = q.shape[0], c.shape
    if nq * nv * L <= CHUNK_ELEMS:
        return q @ c.reshape(nv * L, D).t()
    chunk = max(1, CHUNK_ELEMS // (nq * L))
    out = q.new_empty(nq, chunk * L)
    for v0 in range(0, nv, chunk):
        n = min(chunk, nv - v0)
        torch.mm(q, c[v0:v0 + n].reshape(n * L, D).t(), out=out[:, : n * L])
    return out


def competitors(s: Scenario) -> dict:
    """name -> (input dtype key, fn(x) -> scores [Nq, Nv] or (scores, videos) [Nq, k])."""
    k = s.k
    if k is None:
        out = {
            OURS: ("bf16", lambda x: K.max_similarity(*x["bf16"], x["lengths"], impl="triton")),
            "triton-fp32": ("fp32", lambda x: K.max_similarity(*x["fp32"], x["lengths"], impl="triton")),
            "reference": ("fp32", lambda x: max_similarity_ref(*x["fp32"], x["lengths"])),
        }
        for dt in ("fp32", "bf16"):
            out[f"prvr-{dt}"] = (dt, lambda x, dt=dt: _prvr_scores(*x[dt], x["valid"]))
            out[f"prvr-{dt}-compiled"] = (dt, lambda x, dt=dt: _prvr_compiled(False)(*x[dt], x["valid"]))
    else:
        out = {
            OURS: ("bf16", lambda x: K.max_similarity_topk(*x["bf16"], x["lengths"], k, impl="triton")),
            "triton-fp32": ("fp32", lambda x: K.max_similarity_topk(*x["fp32"], x["lengths"], k, impl="triton")),
            "reference": ("fp32", lambda x: max_similarity_topk_ref(*x["fp32"], x["lengths"], k)),
        }
        for dt in ("fp32", "bf16"):
            out[f"prvr-{dt}"] = (dt, lambda x, dt=dt: _prvr_topk(*x[dt], x["valid"], k))
            out[f"prvr-{dt}-compiled"] = (dt, lambda x, dt=dt: _prvr_compiled(True)(*x[dt], x["valid"], k))
            out[f"prvr-{dt}-chunked"] = (dt, lambda x, dt=dt: _prvr_chunked_topk(*x[dt], x["valid"], k))
    out["gemm-bf16"] = ("bf16", lambda x: _gemm(*x["bf16"]))
    return out


def _skip(name: str, s: Scenario, device: torch.device, quick: bool, chosen: set | None = None) -> str | None:
    """Why competitor ``name`` is not run for ``s`` (None: it is)."""
    if chosen is not None and name not in chosen:
        return "not among --competitors"
    if name == "triton-fp32" and device.type != "cuda":
        return "the interpreter computes in fp32 anyway (smoke run)"
    if name == "triton-fp32" and quick and chosen is None:
        return "skipped with --quick (bf16 is the fast path)"
    if name.endswith("-compiled") and device.type != "cuda":
        return "compiled competitors are skipped on CPU (smoke run)"
    if name.endswith("-compiled") and quick and chosen is None:
        return "compiled competitors are skipped with --quick"
    if name.endswith("-chunked") and s.nq * s.nv * s.L <= CHUNK_ELEMS:
        return "[Nq, L, Nv] fits: the unchunked pattern is the competitor"
    if name.endswith("-compiled") and s.nq * s.nv * s.L > CHUNK_ELEMS:
        return "[Nq, L, Nv] does not fit"
    return None


# ---------------------------------------------------------------------------------- timing
def _scores_of(result) -> torch.Tensor:
    """Scores of a competitor's result: [Nq, Nv], top-k values [Nq, k], or GEMM output (None)."""
    return result[0] if isinstance(result, tuple) else result


def bench_scenario(s: Scenario, device: torch.device, args, rates: dict) -> list[dict]:
    sets = [make_inputs(s, device, seed) for seed in range(args.rotate)]
    x0 = sets[0]
    with torch.no_grad():
        want = (max_similarity_ref(*x0["fp32"], x0["lengths"]) if s.k is None
                else max_similarity_topk_ref(*x0["fp32"], x0["lengths"], s.k)[0])
    rows, times = [], {}
    for name, (dt, fn) in competitors(s).items():
        row = dict(scenario=s.name, shape=s.label, mode=s.mode, impl=name, dtype=dt)
        rows.append(row)
        why = _skip(name, s, device, args.quick, args.competitors)
        if why is not None:
            row["note"] = why
            continue

        if s.backward:
            def run(i, fn=fn, dt=dt, name=name):
                x = sets[i % len(sets)]
                out = fn(x)
                return torch.autograd.grad(out, list(x[dt]), x["grad" if name != "gemm-bf16" else "grad_gemm"])
        else:
            def run(i, fn=fn):
                with torch.no_grad():
                    return fn(sets[i % len(sets)])
        try:
            if name != "gemm-bf16":
                with torch.no_grad():
                    got = _scores_of(fn(x0))
                row["err_vs_fp32_ref"] = testing.max_abs_err(got.float(), want)
            ms = common.time_fn(run, device, warmup=args.warmup, reps=args.reps, max_seconds=args.max_seconds)
            kernel_ms, how = common.time_kernel(lambda: run(0), device)
            row.update(ms=ms, kernel_ms=kernel_ms, kernel_how=how, tflops=s.tflop / ((kernel_ms or ms) * 1e-3),
                       peak_mib=common.peak_memory_mib(lambda: run(0), device))
            common.with_floor(row, *roofline.similarity_cost(s.nq, s.nv, s.L, s.D, s.k, s.backward), rates)
            times[name] = ms
        except torch.cuda.OutOfMemoryError:
            row["note"] = "out of memory"
        except Exception as exc:  # a failing competitor is reported, not fatal
            row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gemm = next((r["tflops"] for r in rows if r["impl"] == "gemm-bf16" and r.get("ms")), None)
    for r in rows:
        if r.get("ms") and times.get(OURS):
            r["speedup_of_triton"] = r["ms"] / times[OURS]
        if r.get("ms") and gemm:
            r["gemm_frac"] = r["tflops"] / gemm
    return rows


def plot(rows: list[dict], path: Path) -> bool:
    timed = [r for r in rows if r.get("speedup_of_triton") and r["impl"] != OURS]
    labels = list(dict.fromkeys(r["scenario"] for r in timed))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    series = {i: [next((r["speedup_of_triton"] for r in timed if r["impl"] == i and r["scenario"] == lab), None)
                  for lab in labels] for i in impls}
    return common.bar_plot(path, "max_similarity: competitor time / triton time (higher: triton faster)",
                           labels, series, "time / triton time")


COLUMNS = ["scenario", "mode", "impl", "dtype", "ms", "kernel_ms", "floor_bytes_ms", "floor_flops_ms", "floor_frac",
           "speedup_of_triton", "tflops", "gemm_frac", "peak_mib", "err_vs_fp32_ref", "note"]


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="train + TVR scenarios, no compiled or fp32-Triton competitors, fewer runs "
                             "(under 2 minutes on a GPU)")
    parser.add_argument("--out", default="runs/bench", help="output folder (JSON, markdown, plot)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scenarios", default=None, help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 20; quick 10; CPU 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5; quick 2; CPU 1)")
    parser.add_argument("--rotate", type=int, default=2, help="input sets rotated between runs")
    parser.add_argument("--competitors", default=None, help="comma-separated subset of the competitors "
                        "(triton, triton-fp32, reference, prvr-fp32, prvr-bf16, prvr-*-compiled, prvr-*-chunked, "
                        "gemm-bf16; default: all, --quick: no compiled or fp32-Triton ones)")
    args = parser.parse_args(argv)
    if args.competitors is not None:
        args.competitors = set(args.competitors.split(",")) | {OURS}  # every ratio is against ours
    if args.quick:  # one compile per Triton kernel and shape: no autotuning runs
        os.environ.setdefault("KDC_AUTOTUNE", "0")
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.reps = args.reps or (2 if not on_gpu else 10 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if not on_gpu else 2 if args.quick else 5)
    args.max_seconds = 10.0 if on_gpu else 5.0
    table = SCENARIOS if on_gpu else SMOKE
    names = args.scenarios.split(",") if args.scenarios else [n for n in table if table[n].quick or not args.quick]
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(table)}")
    env = common.environment(device)
    env.update(reps=args.reps, quick=args.quick, triton_interpret=os.environ.get("TRITON_INTERPRET", "0"),
               skip_value_checks=os.environ.get("KDC_SKIP_VALUE_CHECKS"), autotune=os.environ.get("KDC_AUTOTUNE"),
               value_checks=_config.value_check_mode(device.type), fp32_dots=_config.fp32_dot_precision(device.type))
    rates = common.machine_rates(device)
    env["copy_bandwidth_gbs"] = rates["bandwidth"] / 1e9 if rates["bandwidth"] else None
    env["bf16_gemm_tflops"] = rates["flop_rate"] / 1e12 if rates["flop_rate"] else None
    if hasattr(torch._functorch.config, "donated_buffer"):  # compiled backward replayed by the kernel timing
        torch._functorch.config.donated_buffer = False

    rows = []
    for n in names:
        print(f"[{n}] {table[n].label}", flush=True)
        new = bench_scenario(table[n], device, args, rates)
        common.print_rows(new)
        rows += new
    md = common.write_results("max_similarity", args.out, env, rows, COLUMNS)
    plot(rows, Path(args.out) / "max_similarity.png")
    print(md.read_text())
    return md


if __name__ == "__main__":
    # The public ops check lengths values (a device sync) unless told not to; the competitors
    # check nothing, a training loop would skip them too, and a CUDA graph cannot hold a sync.
    os.environ.setdefault("KDC_SKIP_VALUE_CHECKS", "1")
    main()
