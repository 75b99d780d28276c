"""Implementation choice: impl keyword, KDC_IMPL, auto rules, and the reasons an impl cannot run."""

from __future__ import annotations

import pytest
import torch

import kdc_kernels as K
from kdc_kernels import _backend, info, testing


def _attention_case():
    return testing.attention_inputs(1, 2, 4, 8, seed=0)


def test_auto_on_cpu_is_reference_even_with_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pick = _backend.resolve("windowed_attention", "auto", torch.device("cpu"), lambda name: [])
    assert pick == "reference"


def test_auto_on_cuda_is_triton_until_a_measurement_says_otherwise(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "AUTO_MEASURED", {})
    assert _backend.resolve("x", "auto", cuda, lambda name: []) == "triton"
    assert _backend.resolve("x", "auto", cuda, lambda name: ["no"] if name == "triton" else []) == "cuda"
    assert _backend.resolve("x", "auto", cuda, lambda name: [] if name == "reference" else ["no"]) == "reference"


def test_auto_follows_the_measured_table(monkeypatch):
    """A measured preference for an op and GPU generation is tried first, then the other fast path."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_backend, "AUTO_MEASURED", {("x", 9): "cuda"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_backend, "_capability_major", lambda index: 9)
    assert _backend.resolve("x", "auto", cuda, lambda name: []) == "cuda"
    assert _backend.resolve("y", "auto", cuda, lambda name: []) == "triton"
    assert _backend.resolve("x", "auto", cuda, lambda name: ["no"] if name == "cuda" else []) == "triton"
    monkeypatch.setattr(_backend, "_capability_major", lambda index: 8)  # another generation: unmeasured
    assert _backend.resolve("x", "auto", cuda, lambda name: []) == "triton"
    # an explicit request gets exactly what it asks for, measured or not
    assert _backend.resolve("x", "cuda", cuda, lambda name: []) == "cuda"
    with pytest.raises(NotImplementedError):
        _backend.resolve("x", "cuda", cuda, lambda name: ["not built"] if name == "cuda" else [])


def test_explicit_impl_lists_every_reason():
    with pytest.raises(NotImplementedError) as info:
        _backend.resolve("op", "triton", torch.device("cpu"), lambda name: ["reason one", "reason two"])
    assert "op(impl='triton') cannot run this call" in str(info.value)
    assert "reason one" in str(info.value) and "reason two" in str(info.value)


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = _backend.triton_env_reasons(torch.device("cpu"))
    assert any("TRITON_INTERPRET=1" in r for r in reasons)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not any("TRITON_INTERPRET" in r for r in _backend.triton_env_reasons(torch.device("cpu")))


def test_cuda_impl_on_cpu_tensors_raises_with_reasons():
    with pytest.raises(NotImplementedError, match="CUDA tensors"):
        K.windowed_attention(**_attention_case(), impl="cuda")
    with pytest.raises(NotImplementedError, match="compiled extension"):
        K.max_similarity(**testing.similarity_inputs(2, 2, 2, 4), impl="cuda")


def test_kdc_impl_environment_variable(monkeypatch):
    args = testing.similarity_inputs(3, 2, 4, 8)
    monkeypatch.setenv("KDC_IMPL", "reference")
    ref = K.max_similarity(**args)
    torch.testing.assert_close(ref, K.max_similarity(**args, impl="reference"))
    monkeypatch.setenv("KDC_IMPL", "cuda")
    with pytest.raises(NotImplementedError):
        K.max_similarity(**args)
    # an explicit keyword wins over the variable
    torch.testing.assert_close(K.max_similarity(**args, impl="auto"), ref)
    monkeypatch.setenv("KDC_IMPL", "bogus")
    with pytest.raises(ValueError, match="KDC_IMPL must be one of"):
        K.max_similarity(**args)


def test_impl_keyword_is_case_insensitive_and_validated():
    args = testing.similarity_inputs(3, 2, 4, 8)
    K.max_similarity(**args, impl="Reference")
    with pytest.raises(ValueError, match="impl must be one of"):
        K.max_similarity(**args, impl="fastest")


def test_skip_value_checks(monkeypatch):
    args = testing.attention_inputs(1, 1, 4, 4, seed=0)
    args["sigma"] = -args["sigma"]
    with pytest.raises(ValueError):
        K.windowed_attention(**args)
    monkeypatch.setenv("KDC_SKIP_VALUE_CHECKS", "1")
    K.windowed_attention(**args)  # trusted: no device sync, no check
    monkeypatch.setenv("KDC_SKIP_VALUE_CHECKS", "maybe")
    with pytest.raises(ValueError, match="KDC_SKIP_VALUE_CHECKS must be 0 or 1"):
        K.windowed_attention(**args)


def test_info_reports_versions_and_choices(capsys):
    """What ``python -m kdc_kernels.info`` prints (its ``main``, in this process: a new interpreter
    would cost seconds)."""
    info.main()
    text = capsys.readouterr().out
    for needle in (f"torch {torch.__version__}", "triton", "compiled extension:", "Triton interpreter",
                   "cpu  windowed_attention   -> reference", "cuda max_similarity_topk", "auto picks"):
        assert needle in text, needle


def test_reference_ignores_autocast():
    """Under bf16 autocast the ops still compute in fp32 and return the contract's dtypes."""
    sim = testing.similarity_inputs(5, 4, 6, 16, lengths="ragged", seed=1)
    attn = testing.attention_inputs(2, 2, 8, 16, seed=2)
    want_s = K.max_similarity(**sim)
    want_top = K.max_similarity_topk(**sim, k=2)
    want_a = K.windowed_attention(**attn)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got_s = K.max_similarity(**sim)
        got_top = K.max_similarity_topk(**sim, k=2)
        got_a = K.windowed_attention(**attn)
    assert got_s.dtype == torch.float32 and got_top[0].dtype == torch.float32 and got_a.dtype == torch.float32
    torch.testing.assert_close(got_s, want_s)
    torch.testing.assert_close(got_top[0], want_top[0])
    assert torch.equal(got_top[1], want_top[1])
    torch.testing.assert_close(got_a, want_a)
