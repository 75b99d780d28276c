"""No host-device synchronisation on the default path of any op (the op contract, v2).

On a GPU (``pytest -m gpu``): a training step of the DTA layer and of ``max_similarity`` (forward
and backward), and a ``max_similarity_topk`` call, run under ``torch.cuda.set_sync_debug_mode
("error")`` after a warm-up (autotuning benchmarks synchronise by design).

On the CPU the same steps run with ``KDC_VALUE_CHECKS=async`` (the GPU default) while
:class:`HostReads` records every operation on the ops' Python path that would wait for a device:
a tensor read into Python (``item``, ``bool``/``int``/``float`` of a tensor, ``tolist``, ``numpy``:
all of them reach ``aten::_local_scalar_dense`` or are patched here), and the aten ops whose
output size depends on the data (``nonzero``, ``masked_select``, ``unique``, boolean indexing,
...). What runs inside the ops' kernels (the Triton interpreter reads its tensors by design) is
not the Python path and is not counted. A control run with ``KDC_VALUE_CHECKS=sync`` shows that
the recorder sees the explicit checks.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdc_kernels as K
from kdc_kernels import _config, testing
from kdc_kernels.nn import DynamicTemporalAttention

_interp = pytest.mark.skipif(not _config.triton_interpret(), reason="the Triton interpreter is off")

# aten ops that make the host wait for the device: reading a value, or an output whose size
# depends on the data.
_SYNCING = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "is_nonzero", "equal", "allclose", "repeat_interleave",
            "bincount", "histc"}
_PYTHON_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__")


class HostReads(TorchDispatchMode):
    """Records host reads of tensor data outside the ops' kernels (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self._in_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        namespace, _, op = name.partition("::")
        if namespace in ("kdc_triton", "kdc"):  # an op's kernels: what they read is not the Python path
            self._in_kernel += 1
            try:
                return func(*args, **kwargs)
            finally:
                self._in_kernel -= 1
        if op in _SYNCING:
            self.events.append(name)
        elif op == "index" and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                   for t in (args[1] if len(args) > 1 else ()) if t is not None):
            self.events.append("aten::index with a bool mask")
        elif op == "_assert_async" and args[0].device.type != "cpu":
            pass  # a device-side assert: no host wait on a GPU
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def patched(self):
        """Also catch Python-level reads that bypass the dispatcher on CPU tensors."""
        originals = {name: getattr(torch.Tensor, name) for name in _PYTHON_READS}

        def wrap(name, fn):
            def reader(t, *a, **kw):
                if not self._in_kernel:
                    self.events.append(f"Tensor.{name}")
                return fn(t, *a, **kw)
            return reader

        try:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, wrap(name, fn))
            with self:
                yield self
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)


def _layer_step(layer, x, lengths=None, mask=None):
    y = layer(x, lengths, mask=mask)
    (y * y).mean().backward()


def _similarity_step(impl, q, c, lengths=None, mask=None):
    q, c = q.detach().requires_grad_(True), c.detach().requires_grad_(True)
    score = K.max_similarity(q, c, lengths, mask=mask, impl=impl)
    torch.nn.functional.cross_entropy(score * 20, torch.arange(q.shape[0], device=q.device) % c.shape[0]).backward()


def _steps(impl, device):
    """(name, thunk) of the steps that must not synchronise."""
    torch.manual_seed(0)
    layer = DynamicTemporalAttention(32, 2, max_rel_dist=4, cutoff=3.0, impl=impl).to(device)
    x = torch.randn(3, 40, 32, device=device)
    lengths = torch.tensor([40, 17, 0], device=device)
    mask = testing.prefix_mask(lengths, 40, torch.float32)
    sim = testing.similarity_inputs(6, 5, 12, 32, device=device, seed=1)
    vmask = testing.prefix_mask(sim["lengths"], 12)
    attn = testing.attention_inputs(2, 2, 9, 16, device=device)  # built outside: a host-to-device copy waits
    return [
        ("layer, lengths", lambda: _layer_step(layer, x, lengths)),
        ("layer, mask", lambda: _layer_step(layer, x, mask=mask)),
        ("layer, no lengths", lambda: _layer_step(layer, x)),
        ("max_similarity, lengths", lambda: _similarity_step(impl, sim["queries"], sim["clips"], sim["lengths"])),
        ("max_similarity, mask", lambda: _similarity_step(impl, sim["queries"], sim["clips"], mask=vmask)),
        ("max_similarity_topk, lengths", lambda: K.max_similarity_topk(**sim, k=3, impl=impl)),
        ("windowed_attention, sigma + lengths",
         lambda: K.windowed_attention(**attn, cutoff=2.0, impl=impl)),
    ]


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=_interp)])
def test_training_steps_read_nothing_on_the_host(impl, monkeypatch):
    monkeypatch.setenv("KDC_VALUE_CHECKS", "async")  # what a GPU runs by default
    for name, step in _steps(impl, "cpu"):
        step()  # warm-up (first-call imports and caches)
        with HostReads().patched() as reads:
            step()
        assert reads.events == [], f"{name} ({impl}) read tensor data on the host: {reads.events}"


def test_the_recorder_sees_the_explicit_checks(monkeypatch):
    """Control: the debug mode's checks are host reads, and the recorder reports them."""
    monkeypatch.setenv("KDC_VALUE_CHECKS", "sync")
    for name, step in _steps("reference", "cpu")[:4]:
        with HostReads().patched() as reads:
            step()
        assert reads.events, f"{name}: the sync-mode checks were not seen"
    with HostReads().patched() as reads:
        torch.tensor([1.0]).item()
        torch.arange(4)[torch.arange(4) > 1]
    assert set(reads.events) == {"Tensor.item", "aten::_local_scalar_dense", "aten::index with a bool mask"}, \
        reads.events


def test_value_check_modes(monkeypatch):
    monkeypatch.delenv("KDC_VALUE_CHECKS", raising=False)
    monkeypatch.delenv("KDC_SKIP_VALUE_CHECKS", raising=False)
    assert _config.value_check_mode("cpu") == "sync" and _config.value_check_mode("cuda") == "async"
    for mode in ("sync", "async", "off"):
        monkeypatch.setenv("KDC_VALUE_CHECKS", mode)
        assert _config.value_check_mode("cuda") == mode == _config.value_check_mode("cpu")
    monkeypatch.setenv("KDC_SKIP_VALUE_CHECKS", "1")
    assert _config.value_check_mode("cuda") == "off"
    monkeypatch.delenv("KDC_SKIP_VALUE_CHECKS")
    monkeypatch.setenv("KDC_VALUE_CHECKS", "later")
    with pytest.raises(ValueError, match="KDC_VALUE_CHECKS must be one of"):
        _config.value_check_mode("cpu")


def test_off_mode_trusts_the_data(monkeypatch):
    monkeypatch.setenv("KDC_VALUE_CHECKS", "off")
    args = testing.attention_inputs(2, 1, 5, 4, R=1, lengths=None, seed=3)
    args["sigma"] = -args["sigma"]
    K.windowed_attention(**args)  # not checked: the caller vouches for the data


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_training_steps_do_not_synchronise_on_gpu(impl, monkeypatch):
    monkeypatch.delenv("KDC_VALUE_CHECKS", raising=False)
    monkeypatch.delenv("KDC_SKIP_VALUE_CHECKS", raising=False)
    steps = _steps(impl, "cuda")
    for _, step in steps:
        step()  # warm-up: autotuning and first-call work may synchronise
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, step in steps:
            try:
                step()
            except RuntimeError as exc:
                raise AssertionError(f"{name} ({impl}) synchronised with the device: {exc}") from exc
    finally:
        torch.cuda.set_sync_debug_mode(previous)
