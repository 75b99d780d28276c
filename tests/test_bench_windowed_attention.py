"""CPU smoke test of benchmarks/bench_windowed_attention.py: toy sizes, the reference, the SDPA
competitors and the Triton kernels under the interpreter; checks the files it writes."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_windowed_attention as bench
from kdc_kernels import testing


def test_benchmark_smoke_run(tmp_path):
    md = bench.main(["--out", str(tmp_path), "--reps", "1", "--warmup", "0", "--rotate", "1"])
    results = json.loads((tmp_path / "windowed_attention.json").read_text())
    rows = results["results"]
    assert results["environment"]["torch"] and md.exists()
    timed = {(r["impl"], r["mode"]) for r in rows if r.get("ms")}
    for impl in ("triton", "reference", "sdpa-dense-bias", "sdpa-rank2"):
        for mode in bench.MODES:
            assert (impl, mode) in timed, (impl, mode)
    assert all(r["err_vs_triton"] < 1e-4 for r in rows
               if r["impl"] in ("reference", "sdpa-dense-bias") and "err_vs_triton" in r)
    assert any(r["suite"] == "scaling" and r["impl"] == "triton" for r in rows)
    for r in rows:  # every timed figure has its roofline floor beside it (nominal rates on CPU)
        if r.get("ms") and r["suite"] != "scaling":
            assert r["floor_ms"] > 0 and r["floor_rates"] == "nominal H200" and r["kernel_how"] == "-", r
    assert not [r for r in rows if str(r.get("note", "")).startswith("failed")]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_competitors_compute_the_same_maths(monkeypatch):
    """FlexAttention (eager here) and SDPA with a dense bias express the full op; the rank-2 trick
    matches it without the bias table and the cutoff."""
    from kdc_kernels.ops.windowed_attention import windowed_attention_ref

    monkeypatch.setattr(bench, "_FLEX_COMPILE", False)
    monkeypatch.setattr(bench, "_flex_compiled", None)
    for s in (bench.Shape("t", 2, 2, 24, 16, 3, None, None), bench.Shape("t", 1, 2, 40, 16, 4, 4.0, 3.0)):
        x = {n: t.detach() if t is not None else None for n, t in bench.make_inputs(s, torch.float32, torch.device("cpu"), seed=1).items()}
        with torch.no_grad():
            want = windowed_attention_ref(x["q"], x["k"], x["v"], x["rel_bias"], x["sigma"], cutoff=s.cutoff)
            for name in ("flex", "sdpa-dense-bias"):
                testing.assert_close(bench.COMPETITORS[name](x, s), want, 1e-4, name)
            if s.cutoff is None:
                plain = windowed_attention_ref(x["q"], x["k"], x["v"], None, x["sigma"])
                testing.assert_close(bench.COMPETITORS["sdpa-rank2"](x, s), plain, 1e-4, "sdpa-rank2")
