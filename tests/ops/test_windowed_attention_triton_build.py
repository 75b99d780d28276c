"""The windowed_attention Triton kernels build for an H100 (sm_90) on a machine without a GPU.

The CPU tests run the kernels on the Triton interpreter, which accepts code the GPU compiler
rejects. Here the Triton frontend, the lowering to PTX and ptxas run for the plans the launchers
use on a GPU (packed short sequences, the fused backward, the long-sequence kernels), in a
subprocess with the interpreter off. Register use and spills are printed (`pytest -s`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import pytest

POINTERS = {"Q", "K", "V", "BIAS", "SIGMA", "LENGTHS", "OUT", "LSE", "VISITS", "DOUT", "DELTA", "DQ", "DK", "DV",
            "DSIGMA", "DBIAS_PART", "SIGMA_MAX"}
FP32_POINTERS = {"LSE", "DELTA", "SIGMA", "BIAS", "DBIAS_PART", "SIGMA_MAX", "DSIGMA"}
FLOAT_SCALARS = {"qk_scale", "cutoff", "scale"}


def _has_nvidia_backend() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(ptxas)


@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton's NVIDIA backend (with ptxas) is not installed")
def test_kernels_build_for_sm90():
    # the kernels of this checkout, not of whatever kdc_kernels is installed
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-6000:]
    assert run.stdout.count("built") == 5


def _build(kernel, consts: dict, num_warps: int, num_stages: int, dtype: str = "bf16") -> str:
    """Compile ``kernel`` for sm_90 and return ptxas' register and spill report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = ("*i64" if name == "LENGTHS" else "*i32" if name == "VISITS"
                               else "*fp32" if name in FP32_POINTERS else f"*{dtype}")
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return f"{regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} bytes spilled, " \
           f"{compiled.metadata.shared} bytes shared memory"


def _main() -> None:
    import triton

    from kdc_kernels.ops.windowed_attention import _triton as W

    assert isinstance(W._window_attn_fwd_kernel, triton.runtime.JITFunction), "the interpreter is on"
    flags = dict(HAS_BIAS=True, HAS_SIGMA=True, HAS_CUTOFF=True, HAS_LENGTHS=True, DOT_FP32=False, COUNT_VISITS=False,
                 PRECISION="ieee")
    R, D = 32, 64
    for B, L in ((256, 32), (2, 4096)):
        t = W._fwd_tiles(B, L, D)
        info = _build(W._window_attn_fwd_kernel, dict(flags, G=t.G, BM=t.BM, BN=t.BN, BLOCK_D=D), t.num_warps,
                      t.num_stages)
        print(f"fwd    B={B} L={L} {t}: built, {info}", flush=True)
    for B, L in ((256, 128), (2, 4096)):
        fused, tq, tkv = W._bwd_tiles(B, L, D)
        RB = min(R, L - 1)

        def consts(t, **extra):
            nc = triton.next_power_of_2(max(1, min(t.BM + t.BN - 1, 2 * RB - 1)))
            return dict(flags, NEED_BIAS=True, NEED_SIGMA=True, G=t.G, BM=t.BM, BN=t.BN, BLOCK_D=D, NC=nc,
                        NBP=triton.next_power_of_2(2 * RB + 1), **extra)

        if not fused:
            info = _build(W._window_attn_bwd_q_kernel, consts(tq), tq.num_warps, tq.num_stages)
            print(f"bwd_q  B={B} L={L} {tq}: built, {info}", flush=True)
        extra = dict(FUSED=True) if fused else dict(FUSED=False, NEED_BIAS=False, NEED_SIGMA=False)
        info = _build(W._window_attn_bwd_kv_kernel, consts(tkv) | extra, tkv.num_warps, tkv.num_stages)
        print(f"bwd_kv B={B} L={L} fused={fused} {tkv}: built, {info}", flush=True)


if __name__ == "__main__":
    _main()
