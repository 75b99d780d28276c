"""The op table (``kdc_kernels.ops.OPS``): complete, consistent with the public API, every impl it
names exists and takes the op's case, and dispatch, ``info`` and the compiled op list read it."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kdc_kernels
from kdc_kernels import _backend, _config, _ext, info
from kdc_kernels.ops import OPS

ROOT = Path(__file__).resolve().parent.parent
SPECS = pytest.mark.parametrize("spec", OPS, ids=[spec.name for spec in OPS])


def _public_ops() -> list[str]:
    """The public functions that dispatch (they take ``impl=``); helpers such as ``merge_topk``
    work on scores already computed and have no implementations to choose from."""
    return [name for name in kdc_kernels.__all__ if not name.startswith("__")
            and "impl" in inspect.signature(getattr(kdc_kernels, name)).parameters]


def test_every_public_op_has_exactly_one_spec():
    names = [spec.name for spec in OPS]
    assert len(set(names)) == len(names), f"an op is registered twice: {names}"
    assert sorted(names) == sorted(_public_ops()), "kdc_kernels.__all__ and kdc_kernels.ops.OPS disagree"
    for spec in OPS:
        assert getattr(kdc_kernels, spec.name) is spec.function, spec.name
        assert _backend.op_spec(spec.name) is spec
    with pytest.raises(ValueError, match="no op named 'nope'; the ops are"):
        _backend.op_spec("nope")


@SPECS
def test_validate_takes_the_public_arguments(spec):
    """``validate`` has the public function's parameters (names, kinds, defaults), ``impl`` aside."""
    public = [p for p in inspect.signature(spec.function).parameters.values() if p.name != "impl"]
    validate = list(inspect.signature(spec.validate).parameters.values())
    shape = [(p.name, p.kind, p.default) for p in public]
    assert [(p.name, p.kind, p.default) for p in validate] == shape


def _materialize(value):
    """A CPU tensor of a meta tensor's shape (positive values: sigma must be > 0), else the value."""
    if isinstance(value, torch.Tensor):
        return torch.rand(value.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    return value


@SPECS
def test_probe_is_a_valid_case_of_the_op(spec):
    """The probe, made of real tensors, passes the op's validation unchanged in its entries, and the
    reference and the public function run it."""
    probe = spec.probe()
    assert all(t.device.type == "meta" for t in probe.values() if isinstance(t, torch.Tensor)), "probes allocate nothing"
    args = {name: _materialize(value) for name, value in probe.items()}
    case = spec.validate(**args)
    assert list(case) == list(probe)
    assert isinstance(case[spec.device_of], torch.Tensor)
    assert not spec.is_empty(case)
    want = spec.reference(**case)
    got = spec.function(**args, impl="reference")
    for g, w in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, want))):
        assert torch.equal(g, w)


@SPECS
def test_every_named_impl_exists_and_takes_the_case(spec):
    assert set(spec.fast_paths) <= set(_config.IMPLS) - {"reference"}
    probe = spec.probe()
    for impl, load in spec.fast_paths.items():
        if impl == "triton" and not _backend.triton_available():
            continue
        fast = load()
        assert isinstance(fast, _backend.FastPath), (spec.name, impl)
        inspect.signature(fast.run).bind(**probe)  # raises TypeError when the case does not fit
        reasons = fast.unsupported(**probe)
        assert isinstance(reasons, list) and all(isinstance(r, str) for r in reasons), (spec.name, impl)
        assert reasons == [], f"{spec.name} {impl}: the probe is a typical case, yet {reasons}"


@SPECS
def test_compiled_ops_come_from_the_table(spec):
    """``cuda_ops`` is declared exactly for the ops with a CUDA fast path, the ``_cuda.py`` module
    defines exactly those ``torch.ops.kdc`` ops, and ``_ext.CUDA_OPS`` lists the table's."""
    assert bool(spec.cuda_ops) == ("cuda" in spec.fast_paths)
    assert _ext.CUDA_OPS.get(spec.name, ()) == spec.cuda_ops
    if spec.cuda_ops:
        spec.fast_paths["cuda"]()
        for name in spec.cuda_ops:
            assert hasattr(torch.ops.kdc, name), f"kdc::{name} is declared by {spec.name} but never defined"


def test_info_lists_every_op():
    assert list(info.auto_choices("cpu")) == [spec.name for spec in OPS]
    assert set(info.auto_choices("cpu").values()) == {"reference"}
    report = info.report()
    for spec in OPS:
        assert f"cpu  {spec.name:<20} -> reference" in report and f"cuda {spec.name:<20} ->" in report


def test_dispatch_follows_the_table(monkeypatch):
    """An op without a fast path says so; what the table names is what runs."""
    spec = _backend.op_spec("max_similarity")
    no_cuda = dataclasses.replace(spec, fast_paths={"triton": spec.fast_paths["triton"]}, cuda_ops=())
    reasons = _backend.why_not(no_cuda, "cuda", torch.device("cpu"), no_cuda.probe())
    assert "the cuda implementation of max_similarity is not written yet" in reasons
    assert not any("rebuild" in r for r in reasons)

    calls = []
    fake = _backend.FastPath(run=lambda **case: calls.append(sorted(case)) or "ran", unsupported=lambda **case: [])
    monkeypatch.setattr(_backend, "triton_env_reasons", lambda device: [])
    rerouted = dataclasses.replace(spec, fast_paths={"triton": lambda: fake})
    case = rerouted.validate(**{k: _materialize(v) for k, v in spec.probe().items()})
    assert _backend.dispatch(rerouted, "triton", case) == "ran"
    assert calls == [sorted(case)]


@pytest.mark.skipif(not _backend.triton_available(), reason="needs triton (the interpreter)")
def test_fullgraph_compile_in_a_fresh_process():
    """torch.compile(fullgraph=True) traces the dispatch even when the fast-path modules are first
    imported while dynamo traces (a fresh process compiling before any eager call)."""
    script = textwrap.dedent("""
        import sys, torch
        import kdc_kernels as K
        from kdc_kernels import testing
        early = [name for name in sys.modules if name.startswith("kdc_kernels.ops.") and "._triton" in name]
        assert not early, f"imported before the compile: {early}"
        sim = testing.similarity_inputs(5, 6, 4, 8)
        attn = testing.attention_inputs(1, 2, 4, 8)

        def step(sim, attn):
            score = K.max_similarity(**sim, impl="triton")
            top = K.max_similarity_topk(**sim, k=2, impl="triton")
            return score, top[0], top[1], K.windowed_attention(**attn, impl="triton")

        got = torch.compile(step, fullgraph=True, backend="aot_eager")(sim, attn)
        want = step(sim, attn)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
