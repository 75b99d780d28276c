"""The op contract's shared rules (contract v2), for every op and every impl that runs here.

* Excluded means excluded: positions excluded by lengths/mask (padding) or by the cutoff may hold
  NaN / inf / huge values in q, k, v, sigma and clips and never change a valid output or
  gradient; padded rows and their gradients are exactly 0.
* Any finite sigma > 0 (1e-23, 1e-38, a denormal) gives finite outputs and gradients.
* Masks (bool / 0/1 float / 0/1 int, as PRVR codebases pass them) are interchangeable with lengths.
* Empty Nq / Nv / B / H give empty results of the right shape and dtype; a video of length 0
  scores -inf (index 0, no gradient) and never outranks a finite score; a sequence of length 0
  outputs zeros; fp64 runs on the reference and the fast paths say how to convert.

Impls: the reference and the Triton kernels (CPU interpreter) on every commit; the CUDA kernels
through the CPU emulation of the extension (``cuda-emulated``, marked slow: the real csrc/
kernels and bindings, see tests/cuda_emulation); on a GPU (``pytest -m gpu``) Triton and CUDA.

Why the garbage/clean comparisons are exact (``atol=0``): both runs are the same call on tensors
that differ only at excluded positions, whose contribution to every valid sum is exactly 0 (a
masked load, or a weight of exactly 0 times a zeroed value), so every valid element is computed
by the same operations on the same values. One exception, stated where it applies: bf16 on the
CUDA tensor-core kernels forms the 16-key step that holds a non-finite key / value with a select
product instead of an mma, which sums the same terms in another order.
"""

from __future__ import annotations

import functools

import pytest
import torch

import kdc_kernels as K
from kdc_kernels import _config, testing
from kdc_kernels.nn import DynamicTemporalAttention
from kdc_kernels.ops.max_similarity import api as ms_api
from kdc_kernels.ops.windowed_attention import api as wa_api

_interp = pytest.mark.skipif(not _config.triton_interpret(),
                             reason="the Triton interpreter is off (a GPU is present): the GPU targets cover this")
GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30, -3e38)
# The interpreter runs kernels in numpy, which warns about the NaN/inf these tests feed on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


# --- impls ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _build_emulation() -> str:
    from tests.cuda_emulation.build import build

    return build()


class Impl:
    """One implementation of the three ops on one device. ``cuda-emulated`` runs the compiled
    extension's CPU emulation through the ``_cuda.py`` wrappers after the public API's own
    validation (the public API sends CPU tensors to the CPU impls only)."""

    def __init__(self, name: str, device: str, emulated: bool = False):
        self.name, self.device, self.emulated = name, device, emulated

    def attention(self, q, k, v, rel_bias=None, sigma=None, lengths=None, *, cutoff=None, scale=None, mask=None):
        if self.emulated:
            from kdc_kernels.ops.windowed_attention import _cuda

            return _cuda.windowed_attention_cuda(**wa_api._validate(q, k, v, rel_bias, sigma, lengths, scale, cutoff,
                                                                    mask))
        return K.windowed_attention(q, k, v, rel_bias, sigma, lengths, cutoff=cutoff, scale=scale, mask=mask,
                                    impl=self.name)

    def max_similarity(self, queries, clips, lengths=None, *, return_index=False, mask=None, normalize=True):
        if self.emulated:
            from kdc_kernels.ops.max_similarity import _cuda

            case = ms_api._validate(queries, clips, lengths, mask)
            return _cuda.max_similarity_cuda(**case, normalize=normalize, return_index=return_index)
        return K.max_similarity(queries, clips, lengths, return_index=return_index, mask=mask, normalize=normalize,
                                impl=self.name)

    def topk(self, queries, clips, lengths=None, k=1, *, mask=None):
        if self.emulated:
            from kdc_kernels.ops.max_similarity import _cuda

            return _cuda.max_similarity_topk_cuda(**ms_api._validate(queries, clips, lengths, mask), k=k,
                                                  normalize=True)
        return K.max_similarity_topk(queries, clips, lengths, k, mask=mask, impl=self.name)


IMPLS = [
    pytest.param(("reference", "cpu", False), id="reference"),
    pytest.param(("triton", "cpu", False), marks=_interp, id="triton-interpreter"),
    pytest.param(("cuda", "cpu", True), marks=pytest.mark.slow, id="cuda-emulated"),
    pytest.param(("triton", "cuda", False), marks=pytest.mark.gpu, id="triton-gpu"),
    pytest.param(("cuda", "cuda", False), marks=pytest.mark.gpu, id="cuda-gpu"),
]
# Through the public API only (the emulation is reached below the API).
API_IMPLS = [p for p in IMPLS if p.id != "cuda-emulated"]


@pytest.fixture(params=IMPLS)
def impl(request) -> Impl:
    return _make_impl(request.param)


@pytest.fixture(params=API_IMPLS)
def api_impl(request) -> Impl:
    return _make_impl(request.param)


def _make_impl(param) -> Impl:
    name, device, emulated = param
    if emulated:
        from torch.utils import cpp_extension

        if not cpp_extension.is_ninja_available():
            pytest.skip("the CUDA emulation is built with ninja, which is not installed")
        _build_emulation()
    if name == "cuda" and not emulated:
        from kdc_kernels import _ext

        loaded, why = _ext.status()
        if not loaded:
            pytest.fail(f"the CUDA extension is not loaded on this GPU machine: {why}")
    return Impl(name, device, emulated)


def _fill_garbage(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Copy of ``x`` with the positions ``where`` (broadcast to x) cycling through NaN, +-inf and
    huge values."""
    where = where.expand_as(x)
    junk = torch.tensor(GARBAGE, dtype=torch.float32)[torch.arange(int(where.sum())) % len(GARBAGE)]
    out = x.detach().clone()
    out[where] = junk.to(x.dtype).to(x.device)
    return out


def _grads(out: torch.Tensor, leaves: dict, dout: torch.Tensor) -> dict:
    names = [n for n, t in leaves.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    return dict(zip(names, torch.autograd.grad(out, [leaves[n] for n in names], dout)))


def _leaves(args: dict) -> dict:
    return {n: (t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
                else t) for n, t in args.items()}


def _exact(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=False, msg=lambda m: f"{name}: {m}")


# --- windowed_attention ----------------------------------------------------------------------------

ATTN_CASES = {
    # one key block per program (packed whole sequences) / FlashAttention-style tiles with skipping
    "packed": dict(L=37, cutoff=2.0),
    "tiled": dict(L=131, cutoff=2.5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_excluded_positions_never_change_valid_results(impl, case, dtype):
    """Garbage in padded q/k/v/sigma (a length-0 sequence included), a NaN key + inf value and
    (another sequence) an inf value alone, each valid but beyond the cutoff of most rows: every
    valid output and every gradient equals a run with finite values there (bit-identical, but
    see below for bf16 on the CUDA kernels); padded rows and their gradients are 0; the rows whose
    window holds a non-finite key / value are not silently finite, and (with zero upstream
    gradient) add nothing to any gradient. fp32 runs the CUDA SIMT kernels, bf16 (D <= 128) the
    tensor-core ones: "packed" the one-kernel short-sequence backward, "tiled" the dq / dkdv pair."""
    L, cutoff = ATTN_CASES[case]["L"], ATTN_CASES[case]["cutoff"]
    B, H, D = 3, 2, 16
    args = testing.attention_inputs(B, H, L, D, R=3, dtype=dtype, device=impl.device, seed=11)
    g = testing.make_generator(12)
    args["sigma"] = (0.5 + 2.5 * torch.rand(B, H, L, generator=g)).to(impl.device)
    args["lengths"] = torch.tensor([L, L // 2 + 1, 0], device=impl.device)
    pos = torch.arange(L, device=impl.device)
    padded = pos[None, :] >= args["lengths"][:, None]  # [B, L]
    # Sequence 0: key j0 holds a NaN (its logits) and an inf value; sequence 1: key j1 only an inf
    # value (finite logits: the row's output is inf / NaN, its LSE finite). Most windows exclude them.
    bad = {0: 5, 1: 9}
    touch = torch.zeros(B, H, L, dtype=torch.bool, device=impl.device)  # rows whose window holds one
    for b, j in bad.items():
        touch[b] = ((pos - j).abs()[None, :] <= cutoff * args["sigma"][b].float()) & ~padded[b]
        assert 0 < int(touch[b].sum()) < H * L // 4

    dirty = dict(args)
    for name in ("q", "k", "v"):
        dirty[name] = _fill_garbage(args[name], padded[:, None, :, None])
    dirty["sigma"] = _fill_garbage(args["sigma"], padded[:, None, :])
    dirty["k"][0, :, bad[0], :2] = float("nan")
    dirty["v"][0, :, bad[0], 1] = float("inf")
    dirty["v"][1, :, bad[1], 3] = float("inf")

    dout = torch.randn(B, H, L, D, generator=g).to(dtype).to(impl.device)
    dout = torch.where(touch[..., None], 0.0, dout)  # rows holding a non-finite key pass no gradient
    runs = []
    for a in (args, dirty):
        leaves = _leaves(a)
        out = impl.attention(**leaves, cutoff=cutoff)
        runs.append((out, _grads(out, leaves, dout)))
    (clean, clean_grads), (out, grads) = runs

    # bf16 on the CUDA kernels runs on tensor cores, where the 16-key step that holds the non-finite
    # key (dq += dS K) or value (out += P V) is formed by the zero-weight-skipping select product
    # instead (tc_tile.cuh): the same finite terms summed in another order, so out and dq of the
    # rows next to it may differ by one bf16 rounding step (2^-7 relative) plus the fp32 summation
    # error near 0 on a GPU (the emulation multiplies in the same order: bitwise there). Every other
    # comparison, impl and dtype is exact.
    reordered = ("out", "q") if impl.name == "cuda" and dtype != torch.float32 else ()

    def same(actual, expected, name):
        if name.lstrip("d") in reordered:
            scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
            torch.testing.assert_close(actual, expected, rtol=2**-7, atol=1e-5 * scale, equal_nan=False,
                                       msg=lambda m: f"{name}: {m}")
        else:
            _exact(actual, expected, name)

    rows_ok = ~padded[:, None, :].expand(B, H, L) & ~touch
    same(out[rows_ok], clean[rows_ok], "out")
    assert torch.all(out[padded[:, None, :].expand(B, H, L)] == 0), "padded output rows must be 0"
    assert (~torch.isfinite(out[touch])).any(-1).all(), "a row whose window holds a NaN/inf key or value is finite"
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), f"d{name} is not finite"
        same(grad, clean_grads[name], f"d{name}")
    for name in ("q", "k", "v", "sigma"):
        mask = padded[:, None, :, None] if name != "sigma" else padded[:, None, :]
        assert torch.all(grads[name][mask.expand_as(grads[name])] == 0), f"d{name} is not 0 on padded positions"


@pytest.mark.parametrize("sigma_value", [1e-23, 1e-38, 1e-44])
@pytest.mark.parametrize("cutoff", [None, 3.0])
def test_attention_any_positive_sigma_is_finite(impl, sigma_value, cutoff):
    """Windows narrower than fp32 can square (sigma^2 underflows to 0): each row attends to itself
    only, exactly, and every gradient (d sigma included) is finite and matches the reference."""
    B, H, L, D = 2, 2, 20, 16
    args = testing.attention_inputs(B, H, L, D, R=2, device=impl.device, seed=21)
    args["sigma"][:, 0] = sigma_value  # head 0: tiny everywhere; head 1: random widths
    leaves = _leaves(args)
    out = impl.attention(**leaves, cutoff=cutoff)
    dout = torch.randn_like(out)
    grads = _grads(out, leaves, dout)
    valid = (torch.arange(L, device=impl.device)[None, :] < args["lengths"][:, None])[..., None]
    assert torch.isfinite(out).all()
    _exact(out[:, 0], torch.where(valid, args["v"][:, 0], 0.0), "tiny-sigma rows (= their own value)")
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), f"d{name} is not finite at sigma = {sigma_value}"
    assert torch.all(grads["sigma"][:, 0] == 0)
    ref_leaves = _leaves({n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in args.items()})
    ref = K.windowed_attention(**ref_leaves, cutoff=cutoff, impl="reference")
    ref_grads = _grads(ref, ref_leaves, dout.cpu())
    assert torch.isfinite(ref).all()
    tf32 = testing.tf32_enabled(impl.device)
    testing.check_fast_path(out.cpu(), ref, tf32=tf32, name="out")
    for name, grad in grads.items():
        assert torch.isfinite(ref_grads[name]).all(), f"reference d{name} is not finite"
        testing.check_fast_path(grad.cpu(), ref_grads[name], tf32=tf32, name=f"d{name}")


def test_issue_reproducer_nan_in_padded_value(api_impl):
    q, k, v = (torch.randn(1, 1, 4, 2, generator=testing.make_generator(s)).to(api_impl.device) for s in range(3))
    v[0, 0, 3] = float("nan")
    out = api_impl.attention(q, k, v, lengths=torch.tensor([2], device=api_impl.device))
    assert torch.isfinite(out).all() and torch.all(out[0, 0, 2:] == 0)


# --- max_similarity / max_similarity_topk -----------------------------------------------------------


def test_max_similarity_excluded_clips_and_empty_videos(impl):
    """Garbage in padded clips (a length-0 video among them): scores, indices and gradients equal
    a run with finite padding; padded clips get gradient 0; the length-0 video scores -inf with
    index 0, sends no gradient anywhere, and ranks after every finite score in the top-k."""
    nq, nv, L, D = 9, 7, 37, 16
    args = testing.similarity_inputs(nq, nv, L, D, device=impl.device, seed=31)
    args["lengths"][3] = 0
    padded = torch.arange(L, device=impl.device)[None, :] >= args["lengths"][:, None]
    dirty = dict(args, clips=_fill_garbage(args["clips"], padded[..., None]))
    g = testing.make_generator(32)
    grad = torch.randn(nq, nv, generator=g).to(impl.device)  # finite, also on the -inf column
    runs = []
    for a in (args, dirty):
        leaves = _leaves(a)
        score, index = impl.max_similarity(**leaves, return_index=True)
        runs.append((score, index, _grads(score, leaves, grad)))
    (s0, i0, g0), (s1, i1, g1) = runs
    _exact(s1, s0, "score")
    assert torch.equal(i1, i0)
    assert torch.all(s1[:, 3] == float("-inf")) and torch.all(i1[:, 3] == 0)
    assert torch.isfinite(s1[:, [v for v in range(nv) if v != 3]]).all()
    for name in ("queries", "clips"):
        assert torch.isfinite(g1[name]).all(), f"d{name} is not finite"
        _exact(g1[name], g0[name], f"d{name}")
    assert torch.all(g1["clips"][padded] == 0), "padded clips must get zero gradient"
    # the length-0 video sends nothing to the queries either
    leaves = _leaves(dirty)
    score = impl.max_similarity(**leaves)
    no_col = grad.clone()
    no_col[:, 3] = 0
    (dq_all,) = torch.autograd.grad(score, leaves["queries"], grad, retain_graph=True)
    (dq_without,) = torch.autograd.grad(score, leaves["queries"], no_col)
    _exact(dq_all, dq_without, "dq with and without a gradient on the length-0 video")
    # top-k over all videos: identical to the clean run, the empty video last
    top_clean = impl.topk(args["queries"], args["clips"], args["lengths"], k=nv)
    top_s, top_v = impl.topk(dirty["queries"], dirty["clips"], dirty["lengths"], k=nv)
    _exact(top_s, top_clean[0], "top-k scores")
    assert torch.equal(top_v, top_clean[1])
    assert torch.all(top_v[:, -1] == 3) and torch.all(top_s[:, -1] == float("-inf"))


# --- masks ---------------------------------------------------------------------------------------

MASK_DTYPES = [torch.bool, torch.float32, torch.int64, torch.uint8]


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_mask_equals_lengths(impl, mask_dtype):
    """A PRVR-style mask gives bit-identical outputs and gradients to the lengths it marks."""
    attn = testing.attention_inputs(3, 2, 21, 16, R=2, device=impl.device, seed=41)
    attn["lengths"][1] = 0
    mask = testing.prefix_mask(attn["lengths"], 21, mask_dtype)
    dout = torch.randn(3, 2, 21, 16, generator=testing.make_generator(42)).to(impl.device)
    results = []
    for how in ("lengths", "mask"):
        leaves = _leaves(attn)
        if how == "mask":
            leaves["lengths"], leaves["mask"] = None, mask
        out = impl.attention(**leaves, cutoff=2.0)
        results.append((out, _grads(out, leaves, dout)))
    _exact(results[1][0], results[0][0], "windowed_attention with mask")
    for name in results[0][1]:
        _exact(results[1][1][name], results[0][1][name], f"d{name} with mask")

    sim = testing.similarity_inputs(5, 6, 9, 16, device=impl.device, seed=43)
    sim["lengths"][2] = 0
    vmask = testing.prefix_mask(sim["lengths"], 9, mask_dtype)
    grad = torch.randn(5, 6, generator=testing.make_generator(44)).to(impl.device)
    by_len, by_mask = _leaves(sim), _leaves(dict(sim, lengths=None))
    s_len, i_len = impl.max_similarity(**by_len, return_index=True)
    s_mask, i_mask = impl.max_similarity(**by_mask, mask=vmask, return_index=True)
    _exact(s_mask, s_len, "max_similarity with mask")
    assert torch.equal(i_mask, i_len)
    g_len, g_mask = _grads(s_len, by_len, grad), _grads(s_mask, by_mask, grad)
    for name in g_len:
        _exact(g_mask[name], g_len[name], f"d{name} with mask")
    top_len = impl.topk(sim["queries"], sim["clips"], sim["lengths"], k=4)
    top_mask = impl.topk(sim["queries"], sim["clips"], None, k=4, mask=vmask)
    _exact(top_mask[0], top_len[0], "top-k scores with mask")
    assert torch.equal(top_mask[1], top_len[1])


def _attn_small(**changes):
    args = testing.attention_inputs(2, 1, 5, 4, R=1, lengths=None, seed=45)
    args.update(changes)
    return args


def _sim_small():
    return testing.similarity_inputs(3, 2, 5, 4, lengths=None, seed=46)


BAD_MASKS = [
    (torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0]]), ValueError, "mask must be a prefix mask", "row 1 is not: 10100"),
    (torch.tensor([[True] * 5, [False, True, True, True, True]]), ValueError, "mask must be a prefix mask", "row 1"),
    (torch.tensor([[1.0, 0.5, 0, 0, 0], [1, 1, 1, 1, 1]]), ValueError, "mask must hold only 0 and 1",
     "0.5 at [0, 1]"),
    (torch.tensor([[1, 1, 1, 1, 1], [1, 2, 0, 0, 0]]), ValueError, "mask must hold only 0 and 1", "2 at [1, 1]"),
    (torch.ones(2, 4), ValueError, "mask must have shape [B, L] = (2, 5)", "(2, 4)"),
    (torch.ones(2, 5, dtype=torch.complex64), TypeError, "mask must be bool or a 0/1 integer/float tensor", "complex"),
    ([[1, 1, 1, 1, 1]] * 2, TypeError, "mask must be a bool or 0/1 torch.Tensor", "list"),
]


@pytest.mark.parametrize("mask,exc,first,second", BAD_MASKS)
def test_bad_masks_are_refused(mask, exc, first, second):
    """Errors name ``mask``, what was expected and the first offending row (CPU: sync checks)."""
    for call in (lambda: K.windowed_attention(**_attn_small(), mask=mask),
                 lambda: K.max_similarity(**_sim_small(), mask=mask),
                 lambda: K.max_similarity_topk(**_sim_small(), k=1, mask=mask),
                 lambda: DynamicTemporalAttention(8, 2)(torch.randn(2, 5, 8), mask=mask)):
        with pytest.raises(exc) as info:
            call()
        text = str(info.value).replace("[Nv, L]", "[B, L]")
        assert first in text and second in text, text


def test_mask_and_lengths_together_are_refused():
    m = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="pass lengths or mask, not both"):
        K.windowed_attention(**_attn_small(lengths=torch.tensor([5, 2])), mask=m)
    with pytest.raises(ValueError, match="pass lengths or mask, not both"):
        K.max_similarity(**dict(_sim_small(), lengths=torch.tensor([5, 2])), mask=m)
    with pytest.raises(TypeError, match=r"lengths must have an integer dtype, got torch.float32 \(a float mask\? pass it as mask=\)"):
        K.max_similarity(**dict(_sim_small(), lengths=m.float().sum(1)))


def test_bad_mask_in_async_mode_still_errors(monkeypatch):
    """The default mode on a GPU (device-side asserts, no host sync), run on the CPU: still an
    error, with a message that names mask (on a GPU: a device-side assert)."""
    monkeypatch.setenv("KDC_VALUE_CHECKS", "async")
    bad = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0]])
    with pytest.raises(RuntimeError, match="mask must be a 0/1 prefix mask"):
        K.max_similarity(**_sim_small(), mask=bad)
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, 5\]"):
        K.windowed_attention(**_attn_small(lengths=torch.tensor([6, 1])))
    with pytest.raises(RuntimeError, match="sigma must be finite and > 0"):
        K.windowed_attention(**_attn_small(sigma=torch.zeros(2, 1, 5)))


# --- empty inputs, length 0, fp64 ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_empty_inputs_give_empty_outputs(api_impl, dtype):
    dev = api_impl.device
    for B, H in ((0, 2), (2, 0)):
        q = torch.randn(B, H, 6, 8, device=dev, dtype=dtype, requires_grad=True)
        sigma = torch.ones(B, H, 6, device=dev, requires_grad=True)
        bias = torch.zeros(H, 3, device=dev, requires_grad=True)
        out = api_impl.attention(q, q, q, bias, sigma, torch.zeros(B, dtype=torch.int64, device=dev), cutoff=2.0)
        assert out.shape == (B, H, 6, 8) and out.dtype == dtype
        out.sum().backward()
        assert q.grad.shape == q.shape and torch.all(bias.grad == 0)
    queries = torch.randn(4, 8, device=dev, dtype=dtype, requires_grad=True)
    clips = torch.randn(3, 5, 8, device=dev, dtype=dtype, requires_grad=True)
    for nq, nv in ((0, 3), (4, 0), (0, 0)):
        qq, cc = queries[:nq], clips[:nv]
        score, index = api_impl.max_similarity(qq, cc, torch.full((nv,), 2, device=dev), return_index=True)
        assert score.shape == (nq, nv) and score.dtype == torch.float32 and index.dtype == torch.int64
        assert index.shape == (nq, nv)
        score.sum().backward()
    assert torch.all(queries.grad == 0) and torch.all(clips.grad == 0)
    s, v = api_impl.topk(queries[:0].detach(), clips.detach(), None, k=2)
    assert s.shape == (0, 2) and s.dtype == torch.float32 and v.shape == (0, 2) and v.dtype == torch.int64
    with pytest.raises(ValueError, match=r"k must lie in \[1, Nv\] = \[1, 0\]"):
        api_impl.topk(queries.detach(), clips[:0].detach(), None, k=1)


def test_length_zero_sequence_outputs_zeros(impl):
    args = testing.attention_inputs(2, 2, 9, 16, R=2, device=impl.device, seed=51)
    args["lengths"] = torch.tensor([0, 9], device=impl.device)
    leaves = _leaves(args)
    out = impl.attention(**leaves, cutoff=2.0)
    grads = _grads(out, leaves, torch.randn_like(out))
    assert torch.all(out[0] == 0) and torch.isfinite(out).all()
    for name in ("q", "k", "v", "sigma"):
        assert torch.all(grads[name][0] == 0), f"d{name} of the empty sequence is not 0"


def test_fp64_runs_on_the_reference_and_fast_paths_say_how_to_convert():
    sim = testing.similarity_inputs(4, 3, 5, 8, seed=61)
    attn = testing.attention_inputs(2, 2, 6, 8, R=2, seed=62)
    s64 = K.max_similarity(sim["queries"].double(), sim["clips"].double(), sim["lengths"])
    assert s64.dtype == torch.float64
    torch.testing.assert_close(s64.float(), K.max_similarity(**sim), atol=1e-6, rtol=0)
    t64 = K.max_similarity_topk(sim["queries"].double(), sim["clips"].double(), sim["lengths"], k=2)
    assert torch.equal(t64[1], K.max_similarity_topk(**sim, k=2)[1])
    a64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in attn.items()}
    out = K.windowed_attention(**a64, cutoff=2.0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), K.windowed_attention(**attn, cutoff=2.0), atol=1e-5, rtol=0)
    if not _config.triton_interpret():
        return
    for call in (lambda: K.max_similarity(sim["queries"].double(), sim["clips"].double(), impl="triton"),
                 lambda: K.windowed_attention(**a64, impl="triton")):
        with pytest.raises(NotImplementedError, match=r"got torch.float64 \(convert with .float\(\)"):
            call()


# --- the layer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl_name", ["reference", pytest.param("triton", marks=_interp)])
def test_layer_ignores_garbage_in_padded_frames(impl_name):
    """NaN/inf in padded frames of x (an uninitialised collate buffer): no error, outputs and every
    parameter gradient identical to finite padding, padded outputs and input gradients 0."""
    torch.manual_seed(0)
    layer = DynamicTemporalAttention(16, 2, max_rel_dist=3, cutoff=2.5, impl=impl_name)
    with torch.no_grad():
        layer.rel_bias.normal_()
    x = torch.randn(3, 11, 16)
    lengths = torch.tensor([11, 4, 0])
    padded = torch.arange(11)[None, :] >= lengths[:, None]
    dy = torch.randn(3, 11, 16)
    runs = []
    for xx in (x, _fill_garbage(x, padded[..., None])):
        leaf = xx.clone().requires_grad_(True)
        layer.zero_grad()
        y = layer(leaf, lengths.tolist())  # lengths as a Python list
        y.backward(dy)
        runs.append((y, leaf.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (y0, gx0, gp0), (y1, gx1, gp1) = runs
    _exact(y1, y0, "y")
    assert torch.all(y1[padded] == 0) and torch.all(gx1[padded] == 0)
    _exact(gx1, gx0, "dx")
    for name in gp0:
        assert torch.isfinite(gp1[name]).all(), name
        _exact(gp1[name], gp0[name], f"d{name}")
    y_mask = layer(x, mask=testing.prefix_mask(lengths, 11, torch.float32))
    _exact(y_mask, y0, "y with mask")


def test_layer_dropout_none_and_bad_dropout():
    layer = DynamicTemporalAttention(8, 2, dropout=None)
    assert layer.dropout.p == 0.0
    with pytest.raises(TypeError, match="dropout must be a float in \\[0, 1\\) or None, got str"):
        DynamicTemporalAttention(8, 2, dropout="0.1")
    with pytest.raises(ValueError, match="dropout must lie in \\[0, 1\\)"):
        DynamicTemporalAttention(8, 2, dropout=1.5)
