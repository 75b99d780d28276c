"""Every Triton kernel of max_similarity compiles for sm_90, on any machine.

The interpreter runs the kernels' maths on CPU but never lowers them to a GPU; this test does, with
Triton's own compiler and ptxas (no GPU needed), for the first GPU config of each kernel - what
deterministic mode runs - in bf16 (and the forward in fp32 too). It runs in a subprocess because
this process already defined the kernels for the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kdc_kernels.ops.max_similarity import _triton as T

    INPUT_PTRS = {"q_ptr", "c_ptr", "dq_ptr", "dc_ptr"}
    INT64_PTRS = {"len_ptr", "index_ptr", "index_out_ptr", "part_ptr", "best_ptr"}

    def compile_for_sm90(kernel, dtype, consts, int64_src=False):
        consts = dict(consts)
        options = dict(num_warps=consts.pop("num_warps", 4), num_stages=consts.pop("num_stages", 3))
        signature = {}
        for p in kernel.params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
            elif p.name.endswith("_ptr"):
                int64 = p.name in INT64_PTRS or (p.name == "src_ptr" and int64_src)
                signature[p.name] = "*" + dtype if p.name in INPUT_PTRS else "*i64" if int64 else "*fp32"
            else:
                signature[p.name] = "i32"
        triton.compile(ASTSource(kernel, signature, consts), target=GPUTarget("cuda", 90, 32), options=options)
        print("compiled", kernel.__name__, dtype, flush=True)

    fwd = dict(NORMALIZE=True, HAS_LENGTHS=True, WRITE_INDEX=True, PRECISION="ieee", L_POW2=128)
    compile_for_sm90(T._max_sim_fwd_kernel, "bf16", dict(fwd, DOT_FP32=False, **T._FWD[False].first))
    compile_for_sm90(T._max_sim_fwd_kernel, "fp32", dict(fwd, DOT_FP32=True, **T._FWD[True].first))
    compile_for_sm90(T._max_sim_bwd_dq_kernel, "bf16", dict(NORMALIZE=True, **T._DQ.first))
    compile_for_sm90(T._max_sim_bwd_dc_kernel, "bf16",
                     dict(NORMALIZE=True, SPLIT_W=True, PRECISION="ieee", L_POW2=32, **T._DC[False].first))
    partial = T._topk_partial_config(128, 32, interpret=False)
    compile_for_sm90(T._topk_partial_kernel, "bf16",
                     dict(NORMALIZE=True, HAS_LENGTHS=True, DOT_FP32=False, PRECISION="ieee", L_POW2=32,
                          LOG_K=7, LOG_Q=T._log2(partial.pop("BLOCK_Q")), **partial))
    merge = T._topk_merge_config(1024, interpret=False)
    compile_for_sm90(T._topk_merge_kernel, "fp32", dict(FROM_SCORES=True, FIRST=False, WRITE_OUT=True, LOG_K=10,
                                                        LOG_ROWS=T._log2(merge.pop("ROWS")), **merge))
''')


def test_every_kernel_compiles_for_sm90():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert done.stdout.count("compiled") == 6, done.stdout
