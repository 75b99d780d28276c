"""CPU smoke test of benchmarks/bench_max_similarity.py (toy sizes, the reference, the eager PRVR
patterns and the Triton kernels under the interpreter; checks the files it writes), and a check
that every competitor computes the op's maths."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_max_similarity as bench
from kdc_kernels import testing
from kdc_kernels.ops.max_similarity import max_similarity_ref, max_similarity_topk_ref


def test_benchmark_smoke_run(tmp_path):
    md = bench.main(["--out", str(tmp_path), "--reps", "1", "--warmup", "0", "--rotate", "1"])
    results = json.loads((tmp_path / "max_similarity.json").read_text())
    rows = results["results"]
    assert results["environment"]["torch"] and md.exists()
    for scenario in bench.SMOKE:
        timed = {r["impl"] for r in rows if r["scenario"] == scenario and r.get("ms")}
        assert {bench.OURS, "reference", "prvr-fp32", "prvr-bf16", "gemm-bf16"} <= timed, (scenario, timed)
    for r in rows:
        if r.get("ms") and r["impl"] != "gemm-bf16":
            assert r["err_vs_fp32_ref"] < (1e-4 if r["dtype"] == "fp32" else 2e-2), r
    assert not [r for r in rows if str(r.get("note", "")).startswith(("failed", "out of memory"))]
    for r in rows:  # every timed figure has its roofline floor beside it (nominal rates on CPU)
        if r.get("ms"):
            assert r["floor_ms"] > 0 and r["floor_rates"] == "nominal H200" and r["kernel_how"] == "-", r


def test_competitors_compute_the_same_maths(monkeypatch):
    monkeypatch.setattr(bench, "CHUNK_ELEMS", 200)  # force the chunked pattern and the chunked GEMM
    s = bench.Scenario("t", 5, 23, 4, 8, 6)
    x = bench.make_inputs(s, torch.device("cpu"), seed=3)
    q, c = x["fp32"]
    want = max_similarity_ref(q, c, x["lengths"])
    testing.assert_close(bench._prvr_scores(q, c, x["valid"]), want, 1e-5, "prvr pattern")
    top_s, top_v = bench._prvr_chunked_topk(q, c, x["valid"], s.k)
    ref_s, ref_v = max_similarity_topk_ref(q, c, x["lengths"], s.k)
    testing.assert_close(top_s, ref_s, 1e-5, "chunked prvr top-k scores")
    # another summation order than the reference: videos within rounding of each other may swap
    testing.assert_topk_equivalent(top_s, top_v, want, 1e-5, "chunked prvr top-k")
    # chunks of 200 // (Nq * L) = 10 videos share one output buffer: it ends holding videos 20..22
    testing.assert_close(bench._gemm(q, c)[:, : 3 * 4], q @ c[20:].reshape(12, 8).t(), 1e-5, "chunked GEMM")


@pytest.mark.gpu
def test_kernel_only_timing_replays_a_graph_and_falls_back_to_a_loop():
    from benchmarks import common

    device = torch.device("cuda")
    a = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16)
    ms, how = common.time_kernel(lambda: a @ a, device)
    assert how == "cudagraph" and ms > 0
    ms, how = common.time_kernel(lambda: float((a @ a)[0, 0]), device)  # a host sync: not capturable
    assert how == "loop" and ms > 0
