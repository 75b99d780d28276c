"""CPU smoke run of benchmarks/bench_input_pipeline.py: a small collection, every path timed after
its first batch was checked against the old path's, the files it writes and the verdict."""

from __future__ import annotations

import json

from benchmarks import bench_input_pipeline as bench

PATHS = {"old, cold", "old, warm", "prepare", "prepared, cold", "prepared, warm", "loader, prefetch=2",
         "loader, prefetch=2, busy step", "loader, prefetch=0", "loader, prefetch=0, busy step", "on-device"}


def test_benchmark_smoke_run(tmp_path):
    md = bench.main(["--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--step-reps", "1"])
    results = json.loads((tmp_path / "out" / "input_pipeline.json").read_text())
    rows = results["results"]
    assert md.exists() and "bound by" in results["environment"]["verdict"]
    for dtype in ("float32", "float16"):
        timed = {r["path"] for r in rows if r["dtype"] == dtype and r["path"] != "model step"
                 and (r.get("batches_per_s") or r["path"] == "prepare")}
        want = PATHS if dtype == "float32" else PATHS - {"old, cold", "old, warm"}
        assert timed == want, (dtype, want ^ timed)
    assert all(r["batches"] == 3 for r in rows if r["path"] not in ("prepare", "model step"))
    assert [r["path"] for r in rows][-1] == "model step" and rows[-1]["batches_per_s"] > 0
    prepared = [r for r in rows if r["path"] == "prepare"]
    assert prepared[0]["cache_bytes"] == 2 * prepared[1]["cache_bytes"]    # float32, float16
    assert not list((tmp_path / "work").glob("prepared-*"))                   # the fresh cache is removed
