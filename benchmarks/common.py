"""Shared benchmark machinery: timing, environment record, tables, JSON and plots.

Every benchmark script measures competitors in one process on the same inputs and reports
ratios. Each figure is measured twice:

* per call (:func:`time_fn`): CUDA events around one call, Python dispatch inside the timed
  window (what a user calling the op gets), after warm-up, median of >= 20 runs, inputs rotated
  between runs so caches do not flatter anyone; on CPU, ``time.perf_counter`` (smoke runs only);
* kernel only (:func:`time_kernel`): the same call captured once in a CUDA graph and replayed
  (``triton.testing.do_bench_cudagraph``: no Python, no launch gaps); where a competitor cannot
  be captured, a loop of back-to-back calls between two events, per call (``kernel_how`` says
  which).

Beside each figure the roofline floor of the shape (benchmarks/roofline.py) with this run's
measured copy bandwidth and bf16 GEMM rate (:func:`machine_rates`).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    """GPU name, versions and commit: recorded in every results file."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm=f"{props.major}{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[int], object], device: torch.device, *, warmup: int = 5, reps: int = 20,
            max_seconds: float | None = None) -> float:
    """Median milliseconds of ``fn(i)`` over ``reps`` runs after ``warmup`` runs.

    ``fn`` receives the run index so it can rotate between several input sets. On CUDA each run is
    timed with its own pair of events; ``max_seconds`` stops early (at least 3 runs) for slow
    competitors.
    """
    for i in range(warmup):
        fn(i)
    sync(device)
    times = []
    start_wall = time.perf_counter()
    for i in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(warmup + i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(warmup + i)
            times.append((time.perf_counter() - t0) * 1e3)
        if max_seconds is not None and len(times) >= 3 and time.perf_counter() - start_wall > max_seconds:
            break
    return statistics.median(times)


def time_kernel(fn: Callable[[], object], device: torch.device, *, loop: int = 50) -> tuple[float | None, str]:
    """``(milliseconds, how)``: the kernel cost of one ``fn()``, without Python or launch gaps.

    ``fn`` runs once first (compiles and autotunes outside the capture), then is captured in a
    CUDA graph and replayed (``how = "cudagraph"``). If it cannot be captured (a host sync, a
    CPU-side decision), ``loop`` back-to-back calls are timed between two events instead
    (``how = "loop"``: launch overhead hidden only where the GPU is the bottleneck). CPU: (None, "-").
    """
    if device.type != "cuda":
        return None, "-"
    import triton.testing

    fn()
    sync(device)
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"), "cudagraph"
    except Exception:  # not capturable: fall back to a loop of calls
        sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(loop):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / loop, "loop"


def machine_rates(device: torch.device) -> dict:
    """This run's measured copy bandwidth (bytes/s) and bf16 GEMM rate (FLOP/s), for the floors."""
    if device.type != "cuda":
        return dict(bandwidth=None, flop_rate=None)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = time_fn(lambda i: a @ b, device, warmup=3, reps=10)
    return dict(bandwidth=copy_bandwidth_gbs(device) * 1e9, flop_rate=2 * 8192**3 / (ms * 1e-3))


def with_floor(row: dict, nbytes: float, flops: float, rates: dict) -> dict:
    """Add the roofline floor of ``nbytes`` / ``flops`` (measured rates; nominal H200 figures on
    CPU, labelled) and how far the kernel-only time is from it."""
    from benchmarks import roofline

    measured = rates.get("bandwidth") is not None
    floor, t_bytes, t_flops = roofline.floor_ms(
        nbytes, flops, *((rates["bandwidth"], rates["flop_rate"]) if measured else ()))
    row.update(floor_ms=floor, floor_bytes_ms=t_bytes, floor_flops_ms=t_flops,
               floor_rates="measured" if measured else "nominal H200")
    if row.get("kernel_ms"):
        row["floor_frac"] = floor / row["kernel_ms"]
    return row


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak extra device memory of one call of ``fn`` in MiB (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Measured device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_fn(lambda i: dst.copy_(src), device, warmup=3, reps=20)
    return bandwidth_gbs(2 * nbytes, ms)


def print_rows(rows: Sequence[dict]) -> None:
    """One JSON line per result row, flushed at once: a run cut by a time limit keeps what it measured."""
    for r in rows:
        print("ROW " + json.dumps(r, default=str), flush=True)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], floatfmt: str = ".3g") -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, out_dir: str | os.PathLike, env: dict, rows: list[dict], columns: Sequence[str]) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir``; return the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    header = ", ".join(f"{k}={v}" for k, v in env.items() if v is not None)
    md = out / f"{name}.md"
    md.write_text(f"# {name}\n\n{header}\n\n{markdown_table(rows, columns)}\n")
    return md


def bandwidth_gbs(nbytes: int, ms: float | None) -> float | None:
    """Effective bandwidth in GB/s of moving ``nbytes`` in ``ms`` milliseconds."""
    return None if not ms else nbytes / (ms * 1e-3) / 1e9


def bar_plot(path: str | os.PathLike, title: str, labels: Sequence[str], series: dict[str, Sequence[float]],
             ylabel: str, log_y: bool = False) -> bool:
    """Grouped bar chart (one group per label, one bar per series; ``log_y`` for values that span
    orders of magnitude). Returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return False
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(series)) / 2), 4))
    for n, (name, values) in enumerate(series.items()):
        xs = [i + n * width for i in range(len(labels))]
        ax.bar(xs, [float("nan") if v is None else v for v in values], width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
