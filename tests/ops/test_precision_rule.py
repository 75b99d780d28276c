"""One fp32 precision rule for every op and impl: IEEE fp32 unless the user allowed TF32 the torch
way (``_config.fp32_dot_precision``), passed to every ``tl.dot`` of the Triton kernels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import kdc_kernels as K
from kdc_kernels import _config, testing
from kdc_kernels.ops.max_similarity import _triton as ms_triton
from kdc_kernels.ops.windowed_attention import _triton as wa_triton


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
    assert ms_triton._dot_mode(torch.float32, torch.device("cuda")) == (True, "tf32")
    assert ms_triton._dot_mode(torch.bfloat16, torch.device("cuda")) == (False, "ieee")
    assert seen == ["meta", "cuda"]


@pytest.mark.parametrize("module", [wa_triton, ms_triton], ids=["windowed_attention", "max_similarity"])
def test_every_dot_states_its_precision(module):
    """No tl.dot falls back to Triton's default (TF32 for fp32 on a GPU)."""
    source = Path(module.__file__).read_text()
    calls = [m.start() for m in re.finditer(r"tl\.dot\(", source)]
    assert calls
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
