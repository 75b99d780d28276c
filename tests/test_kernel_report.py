"""scripts/kernel_report.py on every commit: every Triton kernel, in every configuration its
launcher can pick at the op contract's target shapes, compiles for sm_90 without register spills,
and the fp16/bf16 GEMM-shaped kernels (attention forward and backward, max-sim forward, top-k)
use tensor-core instructions. The CUDA kernels are compiled and reported beside them (no
assertion on them here: scripts/check_cuda.py owns their build).

The full report takes one to two minutes on two cores (Triton and ptxas compile every config);
``pytest -s`` prints its table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "kernel_report.py"


def _report_module():
    spec = importlib.util.spec_from_file_location("kernel_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kernel_report", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _has_nvidia_backend() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def test_parsers_and_the_check_flag_what_they_must():
    """The pieces the big test relies on: ptxas' log and the SASS are read right, and check()
    flags a spilling config, a config that does not compile and a GEMM without tensor cores."""
    KR = _report_module()
    log = ("ptxas info    : Function properties for k\n    968 bytes stack frame, 1606 bytes spill stores, "
           "1408 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers\n")
    assert KR._ptxas_numbers(log) == (255, 1606, 1408)
    assert KR._ptxas_numbers("ptxas info    : Used 40 registers\n") == (40, 0, 0)
    sass = ("  /*0100*/  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;\n"
            "  /*0110*/  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n  /*0120*/  FFMA R1, R2, R3, R1 ;\n")
    assert KR._tensor_core_counts(sass) == (2, "mma+wgmma")
    assert KR._tensor_core_counts("FFMA R1, R2, R3, R1 ;") == (0, "none")
    good = KR.Row("k", "triton", "op", "fwd", "bf16", "c", registers=200, spill_bytes=0, spill_load_bytes=0,
                  tensor_core_instructions=4, needs_tensor_cores=True)
    spills = KR.Row("k", "triton", "op", "fwd", "bf16", "c2", registers=255, spill_bytes=8, spill_load_bytes=8,
                    tensor_core_instructions=4)
    no_tc = KR.Row("k", "triton", "op", "fwd", "fp16", "c3", registers=100, spill_bytes=0, spill_load_bytes=0,
                   tensor_core_instructions=0, needs_tensor_cores=True)
    broken = KR.Row("k", "triton", "op", "fwd", "fp32", "c4", error="OutOfResources: shared memory")
    cuda_spill = KR.Row("c", "cuda", "op", "fwd", "bf16", "c5", spill_bytes=8)
    problems = KR.check([good, spills, no_tc, broken, cuda_spill])
    assert len(problems) == 3 and not good.problems and not cuda_spill.problems
    assert "spills 8 B" in spills.problems[0] and "no tensor-core" in no_tc.problems[0]
    assert "does not compile" in broken.problems[0]


@pytest.mark.timeout(1800)
@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton's NVIDIA backend (with ptxas) is not installed")
def test_every_triton_config_compiles_for_sm90_without_spills_and_gemms_use_tensor_cores(tmp_path):
    out = tmp_path / "kernel_report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--check", "--json", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1700)
    print(run.stdout)
    report = json.loads(out.read_text()) if out.exists() else None
    assert run.returncode == 0 and report is not None, \
        (report or {}).get("problems") or run.stdout[-3000:] + run.stderr[-3000:]
    rows = [r for r in report["rows"] if r["impl"] == "triton"]
    KR = _report_module()
    assert {r["kernel"] for r in rows} == set(KR.KERNELS), "a kernel of the package was never compiled"
    for r in rows:
        assert r["error"] is None and r["spill_bytes"] == 0 and r["spill_load_bytes"] == 0, r
    gemms = [(op, stage) for op, stage in {(r["op"], r["stage"]) for r in rows}
             if stage in ("fwd", "bwd", "bwd_q", "bwd_kv", "topk") and (op, stage) != ("max_similarity", "bwd")]
    assert {("windowed_attention", "fwd"), ("windowed_attention", "bwd"), ("windowed_attention", "bwd_q"),
            ("windowed_attention", "bwd_kv"), ("max_similarity", "fwd"), ("max_similarity_topk", "topk")} <= set(gemms)
    for op, stage in gemms:
        for dtype in ("bf16", "fp16"):
            these = [r for r in rows if (r["op"], r["stage"], r["dtype"]) == (op, stage, dtype)]
            assert these, f"no {dtype} row of {op} {stage}"
            for r in these:
                assert r["needs_tensor_cores"] and r["tensor_core_instructions"] > 0, r
    if report["cuda_note"] is None:
        assert any(r["impl"] == "cuda" for r in report["rows"]), "nvcc is there but no CUDA kernel was reported"
