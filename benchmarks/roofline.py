"""A simple roofline model of the benchmarked shapes: the least time a kernel can take, from the
bytes it must move and the FLOPs it must do.

    floor = max(bytes / bandwidth, FLOPs / rate)

Bytes count every input read once and every output written once (nothing re-read: the ideal
fused kernel); FLOPs count the useful multiply-adds (2 per MAC) of the op's maths. The benchmarks
print this floor beside each measurement with the same run's measured copy bandwidth and bf16
GEMM rate; ``predicted`` uses the H100/H200 nominal figures below (what benchmarks/RESULTS.md
lists before any GPU run), so the first GPU run shows at once how far each kernel is from it.

    python benchmarks/roofline.py              # the predicted tables (markdown), as in RESULTS.md
    python benchmarks/roofline.py --write      # rewrite them in benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HBM_BYTES_PER_S = 4.3e12  # H200 HBM3e copy bandwidth, about 4.3 TB/s (4.8 TB/s nominal)
BF16_FLOPS_PER_S = 790e12  # dense bf16 tensor-core rate reachable by a GEMM (989 TFLOP/s nominal)
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def floor_ms(nbytes: float, flops: float, bandwidth: float = HBM_BYTES_PER_S,
             flop_rate: float = BF16_FLOPS_PER_S) -> tuple[float, float, float]:
    """``(floor, byte floor, FLOP floor)`` in milliseconds."""
    t_bytes = nbytes / bandwidth * 1e3
    t_flops = flops / flop_rate * 1e3
    return max(t_bytes, t_flops), t_bytes, t_flops


# --------------------------------------------------------------------------- windowed_attention
def attention_keys_per_query(L: int, sigma_max: float | None, cutoff: float | None) -> int:
    """Keys each query must see: all L, or the cutoff window (2 * cutoff * sigma_max + 1)."""
    if cutoff is None or sigma_max is None:
        return L
    return min(L, 2 * math.floor(cutoff * sigma_max) + 1)


def attention_cost(B: int, H: int, L: int, D: int, dtype: str, mode: str, sigma_max: float | None = None,
                   cutoff: float | None = None, keys: int | None = None) -> tuple[int, int]:
    """``(bytes, FLOPs)`` of windowed_attention in ``mode`` (fwd | bwd | fwd+bwd). Bytes: q, k, v,
    o (+ dO, dq, dk, dv) once, sigma (+ d sigma) and the fp32 log-sum-exp; FLOPs: the two GEMMs
    of the forward (QK^T, PV) and the five of the backward (QK^T again, dO V^T, dV, dQ, dK) over
    the keys each query sees (``keys``, or :func:`attention_keys_per_query` of the cutoff)."""
    n = B * H * L * D * ELEMENT_BYTES[dtype]
    rows = B * H * L * 4
    fwd_bytes, bwd_bytes = 4 * n + 2 * rows, 8 * n + 3 * rows
    mac = B * H * L * (min(keys, L) if keys else attention_keys_per_query(L, sigma_max, cutoff)) * D
    fwd_flops, bwd_flops = 2 * 2 * mac, 5 * 2 * mac
    return {"fwd": (fwd_bytes, fwd_flops), "bwd": (bwd_bytes, bwd_flops),
            "fwd+bwd": (fwd_bytes + bwd_bytes, fwd_flops + bwd_flops)}[mode]


# ------------------------------------------------------------------------------ max_similarity
def similarity_cost(nq: int, nv: int, L: int, D: int, k: int | None, backward: bool,
                    dtype: str = "bf16") -> tuple[int, int]:
    """``(bytes, FLOPs)`` of max_similarity (``k`` None; fwd, or fwd+bwd) or max_similarity_topk.
    Bytes: queries and clips once, the fp32 score + int64 index per (query, video) (top-k: per
    kept entry); backward: the score gradient, score and index read, dq and dc written. FLOPs: the
    [Nq, Nv * L] GEMM; the backward's useful work is two gathers, 2 Nq Nv D MACs."""
    e = ELEMENT_BYTES[dtype]
    inputs = (nq + nv * L) * D * e
    outputs = nq * (k if k is not None else nv) * (4 + 8)
    nbytes, flops = inputs + outputs, 2 * nq * nv * L * D
    if backward:
        nbytes += nq * nv * (4 + 4 + 8) + inputs + inputs  # grad, score, index; q, c again; dq, dc
        flops += 2 * 2 * nq * nv * D
    return nbytes, flops


# ------------------------------------------------------------------------------ the table
def predicted_rows() -> list[dict]:
    """The predicted floor of every shape the competitor benchmarks measure (full mode)."""
    import torch

    from benchmarks import bench_max_similarity as bms
    from benchmarks import bench_windowed_attention as bwa

    rows = []
    for s in bwa.shapes(torch.device("cuda"), quick=False):
        for mode in bwa.MODES:
            nbytes, flops = attention_cost(s.B, s.H, s.L, s.D, "bf16", mode, s.sigma_max, s.cutoff)
            rows.append(_row("windowed_attention", s.label, mode, nbytes, flops))
    for s in bms.SCENARIOS.values():
        nbytes, flops = similarity_cost(s.nq, s.nv, s.L, s.D, s.k, s.backward)
        rows.append(_row("max_similarity_topk" if s.k else "max_similarity", s.label, s.mode, nbytes, flops))
    return rows


def _row(op: str, shape: str, mode: str, nbytes: int, flops: int) -> dict:
    t, t_bytes, t_flops = floor_ms(nbytes, flops)
    return dict(op=op, shape=shape, mode=mode, MB=nbytes / 1e6, GFLOP=flops / 1e9, predicted_ms=t,
                bound="memory" if t_bytes >= t_flops else "compute")


# The op contract's speed targets (benchmarks/RESULTS.md), each at the shape and mode it names.
TARGETS = [
    ("windowed_attention B=256 H=8 L=128 D=64 fwd+bwd: >= 4x eager, >= 1.5x compiled FlexAttention, "
     ">= 1.8x SDPA dense bias", ("windowed_attention", (256, 8, 128, 64, None, None), "fwd+bwd")),
    ("windowed_attention L=32: >= 2x FlexAttention", ("windowed_attention", (256, 8, 32, 64, None, None), "fwd+bwd")),
    ("windowed_attention forward >= 70% of the HBM-bandwidth floor (L=128)",
     ("windowed_attention", (256, 8, 128, 64, None, None), "fwd")),
    ("windowed_attention cutoff, L=16384: 2x L -> <= 2.2x time, beats FlexAttention + block mask",
     ("windowed_attention", (2, 8, 16384, 64, 64.0, 3.0), "fwd+bwd")),
    ("max_similarity_topk TVR test set: >= 10x fp32 PRVR pattern, >= 60% of bf16 GEMM TFLOP/s, no [Nq, Nv] buffer",
     ("max_similarity_topk", (10_895, 2_179, 128, 384, 100, False), "fwd")),
    ("max_similarity fwd+bwd 640x128x128x384: >= 3x eager, >= 10x lower peak memory",
     ("max_similarity", (640, 128, 128, 384, None, True), "fwd+bwd")),
]


def target_rows() -> list[dict]:
    rows = []
    for text, (op, shape, mode) in TARGETS:
        if op == "windowed_attention":
            B, H, L, D, sigma_max, cutoff = shape
            nbytes, flops = attention_cost(B, H, L, D, "bf16", mode, sigma_max, cutoff)
        else:
            nbytes, flops = similarity_cost(*shape)
        row = _row(op, "", mode, nbytes, flops)
        rows.append(dict(target=text, mode=mode, predicted_ms=row["predicted_ms"], bound=row["bound"],
                         measured="not yet", met="-"))
    return rows


def markdown() -> str:
    """The generated block of benchmarks/RESULTS.md: the targets with their predicted floor, then
    every benchmarked shape."""
    from benchmarks.common import markdown_table

    return (markdown_table(target_rows(), ["target", "mode", "predicted_ms", "bound", "measured", "met"]) +
            "\n\nEvery shape the competitor benchmarks measure (full mode), bf16:\n\n" +
            markdown_table(predicted_rows(), ["op", "shape", "mode", "MB", "GFLOP", "predicted_ms", "bound"]))


RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- roofline: begin (python benchmarks/roofline.py --write) -->", "<!-- roofline: end -->"


def results_block(text: str) -> str:
    """The generated block of a RESULTS.md text (between the markers)."""
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"replace the generated block of {RESULTS.name}")
    args = parser.parse_args(argv)
    table = markdown()
    if args.write:
        text = RESULTS.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        RESULTS.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    print(table)


if __name__ == "__main__":
    main()
