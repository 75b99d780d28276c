"""The GPU suite's plumbing, without a GPU: ``benchmarks/gpu_suite.py --dry-run`` runs every stage
as a fake with the real time limits, cuts one stage at its limit, and writes the summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
STAGES = ["environment", "build", "extension", "pytest-gpu", "memcheck", "bench-max-similarity",
          "bench-windowed-attention", "bench-cuda-kernels", "bench-end-to-end"]


def _dry(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), "--dry-run", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=90, cwd=ROOT)


def test_dry_run_exercises_every_stage_and_keeps_what_a_cut_stage_measured(tmp_path):
    done = _dry(tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and {"summary.md", "suite.json", "logs.tar.gz"} <= set(files), files
    data = json.loads((tmp_path / "suite.json").read_text())
    status = {s["name"]: s["status"] for s in data["stages"]}
    assert list(status) == STAGES
    assert status["bench-windowed-attention"].startswith("CUT at its 4 s limit")
    assert status["pytest-gpu"].startswith("FAILED")  # the fake test run has one failure
    assert all(status[s] == "ok" for s in STAGES if s not in ("bench-windowed-attention", "pytest-gpu"))
    # rows printed before the cut are kept and reach the target table
    cut_rows = [r for r in data["rows"] if r["bench"] == "bench-windowed-attention"]
    assert len(cut_rows) == 2
    targets = {t["target"]: t for t in data["targets"]}
    eager = targets["windowed_attention B=256 H=8 L=128 D=64 fwd+bwd: >= 4.0x reference"]
    assert eager["measured"] == "3.00x" and eager["met"] == "NOT met"
    assert targets["max_similarity_topk TVR test set: >= 10x the fp32 PRVR pattern"]["met"] == "met"
    assert targets["windowed_attention L=32 fwd+bwd: >= 2x flex"]["met"] == "not measured"
    e2e = {t["target"].split(":")[1].split(",")[0].strip(): t for t in data["targets"]
           if t["target"].startswith("end to end")}
    assert set(e2e) == {"training steps/s", "test-split evaluation time"}, e2e
    assert e2e["training steps/s"]["measured"].startswith("2.50x (auto 25 steps/s, reference 10 steps/s")
    assert e2e["test-split evaluation time"]["measured"].startswith("4.00x (auto 0.5 s, reference 2 s")
    assert all(t["met"] == "no target" for t in e2e.values())
    assert "## bench-end-to-end" in (tmp_path / "summary.md").read_text()
    summary = (tmp_path / "summary.md").read_text()
    assert "tests.fake::test_bad - AssertionError: dry-run failure" in summary
    assert "ERROR SUMMARY: 0 errors" in summary
    assert data["environment"]["python"] == sys.version.split()[0]
    assert "| bench-windowed-attention | CUT" in done.stdout  # the stage table is printed last


def test_budget_skips_the_stages_that_no_longer_fit(tmp_path):
    budget = 27  # the first stage starts; a stage needs 10 s + the 15 s SIGINT grace left to start
    done = _dry(tmp_path, "--budget", str(budget))
    assert done.returncode == 0, done.stderr + done.stdout
    stages = json.loads((tmp_path / "suite.json").read_text())["stages"]
    assert [s["name"] for s in stages] == STAGES
    assert stages[0]["name"] == "environment" and stages[0]["status"] == "ok"
    ran = [s for s in stages if not s["status"].startswith("skipped")]
    assert all(s["limit_s"] <= budget - 15 for s in ran), stages
    # How many fake stages still fit depends on how fast the environment stage was (under 2 s on an
    # idle machine, more on a loaded one); at the latest, the 4 s of the stage cut by its limit
    # leave too little. From the first stage skipped for the budget on, every stage is skipped:
    # those that need the build say so when it was skipped, the others were out of budget.
    first = next((i for i, s in enumerate(stages) if s["status"] == "skipped (suite budget spent)"), None)
    assert first is not None and first <= STAGES.index("bench-cuda-kernels"), stages
    assert all(s["status"] in ("skipped (suite budget spent)", "skipped (build did not pass)")
               for s in stages[first:]), stages


def test_targets_read_the_roofline_model_and_judge_the_per_call_time():
    """benchmarks/targets.py has no constants of its own: its floors are roofline.py's (the model
    behind RESULTS.md's predicted column). A target is met or not on the per-call ``ms``; the
    kernel-only ``kernel_ms`` (CUDA-graph replay) is shown beside it when the rows have it."""
    from benchmarks import roofline, targets

    assert (targets.COPY_BYTES_PER_S, targets.BF16_FLOP_PER_S) == (roofline.HBM_BYTES_PER_S, roofline.BF16_FLOPS_PER_S)
    assert targets.floor_ms(3e9, 2e12) == roofline.floor_ms(3e9, 2e12)[0]
    for mode in ("fwd", "bwd", "fwd+bwd"):
        assert targets.attention_floor_ms(256, 8, 128, 64, mode) == \
            roofline.floor_ms(*roofline.attention_cost(256, 8, 128, 64, "bf16", mode))[0]
    long = roofline.attention_cost(2, 8, 16384, 64, "bf16", "fwd+bwd", targets.LONG_SIGMA_MAX, targets.LONG_CUTOFF)
    assert targets.attention_floor_ms(2, 8, 16384, 64, "fwd+bwd", 385) == roofline.floor_ms(*long)[0]
    assert targets.similarity_floor_ms(640, 128, 128, 384, backward=True) == \
        roofline.floor_ms(*roofline.similarity_cost(640, 128, 128, 384, None, True))[0]
    assert targets.similarity_floor_ms(10895, 2179, 128, 384, k=100) == \
        roofline.floor_ms(*roofline.similarity_cost(10895, 2179, 128, 384, 100, False))[0]

    def row(impl, ms, kernel_ms=None):
        return dict(bench="bench-windowed-attention", suite="prvr", L=128, mode="fwd+bwd", impl=impl, ms=ms,
                    **({"kernel_ms": kernel_ms} if kernel_ms is not None else {}))

    eager = "windowed_attention B=256 H=8 L=128 D=64 fwd+bwd: >= 4.0x reference"
    got = {t["target"]: t for t in targets.evaluate([row("triton", 1.0, 0.5), row("reference", 3.0, 2.5)])}[eager]
    assert got["measured"] == "3.00x (kernel only 5.00x)" and got["met"] == "NOT met"  # per call decides
    got = {t["target"]: t for t in targets.evaluate([row("triton", 1.0), row("reference", 4.5)])}[eager]
    assert got["measured"] == "4.50x" and got["met"] == "met"
