"""One fp32 precision rule for every op and impl: IEEE fp32 unless the user allowed TF32 the torch
way (``_config.fp32_dot_precision``), passed to every ``tl.dot`` of the Triton kernels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import kdc_kernels as K
from kdc_kernels import _config, _launch, testing
from kdc_kernels.ops.max_similarity import _triton as ms_triton
from kdc_kernels.ops.windowed_attention import _triton as wa_triton

# Every file that holds Triton kernels or device functions (kernels moved between files must
# stay covered: the list is found, not written down).
KERNEL_FILES = sorted((Path(K.__file__).parent / "ops").glob("*/_triton*.py"))


@pytest.fixture
def restore_tf32():
    allow, precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    yield
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.set_float32_matmul_precision(precision)


def test_rule_follows_the_torch_settings(restore_tf32):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    assert _config.fp32_dot_precision("cuda") == "ieee"
    torch.set_float32_matmul_precision("high")
    assert _config.fp32_dot_precision("cuda") == "tf32"
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = True
    assert _config.fp32_dot_precision("cuda") == "tf32"
    assert _config.fp32_dot_precision("cpu") == "ieee"  # no TF32 on the CPU (the interpreter)
    assert testing.tf32_enabled("cuda") and not testing.tf32_enabled("cpu")


def test_both_launchers_use_the_rule(monkeypatch):
    seen = []

    def rule(device_type):
        seen.append(device_type)
        return "tf32"

    monkeypatch.setattr(_config, "fp32_dot_precision", rule)
    assert wa_triton._precision(torch.empty(1, device="meta")) == "tf32"
    assert wa_triton._precision(torch.empty(1, device="meta", dtype=torch.bfloat16)) == "ieee"
    # max_similarity decides per kernel: compiled kernels run on CUDA tensors, the interpreter
    # computes in IEEE fp32 throughout
    kernel = ms_triton._max_sim_fwd_kernel
    monkeypatch.setattr(_launch, "interpreted", lambda k: False)
    assert ms_triton._dot_mode(torch.float32, kernel) == (True, "tf32")
    assert ms_triton._dot_mode(torch.bfloat16, kernel) == (False, "ieee")
    monkeypatch.setattr(_launch, "interpreted", lambda k: True)
    assert ms_triton._dot_mode(torch.float32, kernel) == (True, "ieee")
    assert seen == ["meta", "cuda"]


def test_the_scan_covers_every_kernel_file():
    """The scan below reads every kernel file, and finds the dots where the kernels have them
    (the max-similarity backward has none: it sums on the CUDA cores; the top-k shares the
    forward's score tile, ``_video_max_tile``)."""
    names = [f"{p.parent.name}/{p.name}" for p in KERNEL_FILES]
    assert {"windowed_attention/_triton.py", "windowed_attention/_triton_kernels.py", "max_similarity/_triton.py",
            "max_similarity/_triton_bwd.py", "max_similarity/_triton_topk.py"} <= set(names), names
    dots = {n for n, p in zip(names, KERNEL_FILES) if "tl.dot(" in p.read_text()}
    assert {"windowed_attention/_triton_kernels.py", "max_similarity/_triton.py"} <= dots, dots


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_dot_states_its_precision(path):
    """No tl.dot falls back to Triton's default (TF32 for fp32 on a GPU)."""
    source = path.read_text()
    calls = [m.start() for m in re.finditer(r"tl\.dot\(", source)]
    for start in calls:
        depth, end = 0, start + len("tl.dot")
        for end in range(start + len("tl.dot"), len(source)):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            if depth == 0:
                break
        call = source[start:end + 1]
        assert "input_precision=" in call, f"{module.__name__}: {call}"


@pytest.mark.gpu
def test_fp32_attention_is_ieee_unless_tf32_is_allowed(restore_tf32):
    args = testing.attention_inputs(2, 2, 130, 64, R=4, device="cuda", seed=3)
    ref = K.windowed_attention(**{n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in args.items()},
                               cutoff=3.0, impl="reference")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    ieee = K.windowed_attention(**args, cutoff=3.0, impl="triton")
    testing.check_fast_path(ieee.cpu(), ref, tf32=False, name="out (IEEE)")
    torch.backends.cuda.matmul.allow_tf32 = True
    tf32 = K.windowed_attention(**args, cutoff=3.0, impl="triton")
    testing.check_fast_path(tf32.cpu(), ref, tf32=True, name="out (TF32)")
    assert not torch.equal(ieee, tf32), "allowing TF32 changed nothing: the flag is not reaching the kernels"
