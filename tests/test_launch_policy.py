"""kdc_kernels/_launch.py, the one Triton launch policy: interpreter -> its config; deterministic
mode or KDC_AUTOTUNE=0 -> the pinned (first) config; otherwise autotuned once per bucketed key.

The interpreter ignores launch configurations, so the CPU tests of the ops cannot tell whether
pinning works; here the policy is exercised directly on a compiled-kernel object (never launched)
with a fake timer in place of triton.testing.do_bench. The GPU test at the end autotunes for real.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from kdc_kernels import _launch, testing  # noqa: E402

CONFIGS = [dict(BLOCK=16, num_warps=4, num_stages=2), dict(BLOCK=32, num_warps=8, num_stages=3),
           dict(BLOCK=64, num_warps=8, num_stages=2)]
INTERPRET = dict(BLOCK=128)
DEVICE = torch.device("cpu")


def _body(x):
    return x


@pytest.fixture
def compiled_kernel():
    """A JITFunction as the GPU build has it (constructed directly: the conftest's interpreter
    flag only changes what @triton.jit returns)."""
    return triton.runtime.JITFunction(_body)


@pytest.fixture
def timer(monkeypatch):
    """do_bench replaced: the second config is the fastest; every timing is logged."""
    runs = []

    def fake_do_bench(fn, warmup, rep, return_mode):
        fn()
        return {16: 3.0, 32: 1.0, 64: 2.0}[runs[-1]["BLOCK"]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(_launch, "_TUNED", {})
    monkeypatch.delenv("KDC_DETERMINISTIC", raising=False)
    monkeypatch.delenv("KDC_AUTOTUNE", raising=False)
    return runs


def test_autotunes_once_per_bucketed_key(compiled_kernel, timer):
    assert not _launch.interpreted(compiled_kernel) and _launch.mode() == "autotune"
    pick = _launch.choose(compiled_kernel, CONFIGS, INTERPRET, (_launch.bucket(100),), timer.append, DEVICE)
    assert pick == CONFIGS[1] and [r["BLOCK"] for r in timer] == [16, 32, 64]
    # another size in the same power-of-two bucket reuses the decision; a new bucket tunes again
    assert _launch.choose(compiled_kernel, CONFIGS, INTERPRET, (_launch.bucket(128),), timer.append, DEVICE) == CONFIGS[1]
    assert len(timer) == 3
    _launch.choose(compiled_kernel, CONFIGS, INTERPRET, (_launch.bucket(129),), timer.append, DEVICE)
    assert len(timer) == 6
    assert [_launch.bucket(n) for n in (0, 1, 2, 3, 100, 128, 129)] == [1, 1, 2, 4, 128, 128, 256]


@pytest.mark.parametrize("how", ["KDC_AUTOTUNE=0", "KDC_DETERMINISTIC=1", "torch"])
def test_pinned_modes_take_the_first_config_without_timing(compiled_kernel, timer, monkeypatch, how):
    if how == "torch":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    else:
        monkeypatch.setenv(*how.split("="))
    assert _launch.mode() == "pinned"
    assert _launch.choose(compiled_kernel, CONFIGS, INTERPRET, (1,), timer.append, DEVICE) == CONFIGS[0]
    assert timer == []


def test_the_interpreter_gets_its_own_config(timer):
    @triton.jit
    def kernel(x):
        pass

    assert _launch.interpreted(kernel)  # the conftest runs Triton on the interpreter here
    ran = []
    _launch.run(kernel, CONFIGS, INTERPRET, (1,), ran.append, DEVICE)
    assert ran == [INTERPRET] and timer == []


def test_autotune_flag_values(monkeypatch):
    from kdc_kernels import _config

    for raw, want in (("", True), ("1", True), ("0", False), ("off", False)):
        monkeypatch.setenv("KDC_AUTOTUNE", raw)
        assert _config.autotune() is want
    monkeypatch.setenv("KDC_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="KDC_AUTOTUNE"):
        _config.autotune()


@pytest.mark.gpu
def test_autotuning_on_the_gpu_picks_a_config_and_matches_the_reference(monkeypatch):
    """The one GPU test that autotunes (the GPU suite runs with KDC_AUTOTUNE=0): max_similarity
    and windowed_attention, forward and backward, with the cache cleared first."""
    import kdc_kernels as K
    from kdc_kernels.ops.max_similarity import max_similarity_ref

    monkeypatch.setenv("KDC_AUTOTUNE", "1")
    monkeypatch.delenv("KDC_DETERMINISTIC", raising=False)
    monkeypatch.setattr(_launch, "_TUNED", {})
    args = testing.similarity_inputs(300, 70, 40, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    score = K.max_similarity(**args, impl="triton")
    score.sum().backward()
    assert len(_launch._TUNED) >= 2, "the forward and backward kernels were not autotuned"
    ref = max_similarity_ref(**{k: (v.detach().float().requires_grad_(v.requires_grad) if k != "lengths" else v)
                                for k, v in args.items()})
    testing.assert_close(score, ref, 2e-2, "score")
    x = testing.attention_inputs(16, 4, 100, 64, R=8, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    before = len(_launch._TUNED)
    out = K.windowed_attention(**x, impl="triton", cutoff=3.0)
    out.float().sum().backward()
    assert len(_launch._TUNED) > before
    ref = K.windowed_attention(**{k: (v.detach().float() if k in ("q", "k", "v") else v) for k, v in x.items()},
                               impl="reference", cutoff=3.0)
    testing.assert_close(out.float(), ref, 3e-2, "attention out")
