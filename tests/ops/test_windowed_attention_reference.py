"""The windowed_attention reference against a loop-level transcription of the contract, fp64
gradcheck of every differentiable input, the contract's backward formulas, and every error path."""

from __future__ import annotations

import math
import re

import pytest
import torch

import kdc_kernels as K
from kdc_kernels import testing
from kdc_kernels.ops.windowed_attention import reference as ref_module
from kdc_kernels.ops.windowed_attention import windowed_attention_ref


def loop_attention(q, k, v, rel_bias=None, sigma=None, lengths=None, scale=None, cutoff=None):
    """The contract's formulas, one (b, h, i, j) at a time, in float64 Python."""
    B, H, L, D = q.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, H, L, D, dtype=torch.float64)
    R = (rel_bias.shape[1] - 1) // 2 if rel_bias is not None else 0
    for b in range(B):
        n = L if lengths is None else int(lengths[b])
        for h in range(H):
            for i in range(n):
                logits = []
                for j in range(L):
                    if j >= n:
                        continue
                    if cutoff is not None and abs(i - j) > cutoff * float(sigma[b, h, i]):
                        continue
                    x = scale * float(q[b, h, i].double() @ k[b, h, j].double())
                    if rel_bias is not None:
                        x += float(rel_bias[h, min(max(j - i, -R), R) + R])
                    if sigma is not None:
                        x -= (i - j) ** 2 / (2 * float(sigma[b, h, i]) ** 2)
                    logits.append((j, x))
                m = max(x for _, x in logits)
                z = sum(math.exp(x - m) for _, x in logits)
                for j, x in logits:
                    out[b, h, i] += math.exp(x - m) / z * v[b, h, j].double()
    return out


CASES = [
    dict(R=None, sigma=False, lengths=None, cutoff=None),
    dict(R=0, sigma=False, lengths="ragged", cutoff=None),
    dict(R=2, sigma=True, lengths="ragged", cutoff=None),
    dict(R=2, sigma=True, lengths="ragged", cutoff=1.5),
    dict(R=9, sigma=True, lengths="full", cutoff=0.7),  # R > L: every offset has its own entry
    dict(R=None, sigma=True, lengths=None, cutoff=2.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("L", [1, 5, 7])
def test_matches_loop_transcription(case, L):
    args = testing.attention_inputs(3, 2, L, 4, R=case["R"], sigma=case["sigma"], lengths=case["lengths"], seed=L)
    got = windowed_attention_ref(**args, cutoff=case["cutoff"])
    want = loop_attention(**args, cutoff=case["cutoff"])
    testing.assert_close(got, want, 1e-5)
    got_scaled = windowed_attention_ref(**args, cutoff=case["cutoff"], scale=0.3)
    testing.assert_close(got_scaled, loop_attention(**args, cutoff=case["cutoff"], scale=0.3), 1e-5)


@pytest.mark.parametrize("cutoff", [None, 1.5])
def test_gradcheck_fp64_all_inputs(cutoff):
    args = testing.attention_inputs(2, 2, 6, 3, R=2, sigma=True, lengths="ragged", seed=3)
    names = ["q", "k", "v", "rel_bias", "sigma"]
    inputs = [args[n].double().requires_grad_(True) for n in names]

    def fn(*xs):
        return windowed_attention_ref(*xs[:3], xs[3], xs[4], args["lengths"], cutoff=cutoff)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_backward_matches_contract_formulas():
    """dV = P^T dO, dQ = scale dS K, dK = scale dS^T Q, d rel_bias = diagonal sums of dS,
    d sigma = sum_j dS (i-j)^2 / sigma^3, with dS = P (dP - rowsum(dO * O))."""
    B, H, L, D, R = 2, 3, 9, 5, 3
    args = testing.attention_inputs(B, H, L, D, R=R, sigma=True, lengths="ragged", seed=5)
    x = {n: t.double().requires_grad_(True) if n != "lengths" else t for n, t in args.items()}
    cutoff, scale = 2.0, 0.4
    out = windowed_attention_ref(**x, scale=scale, cutoff=cutoff)
    dout = torch.randn_like(out)
    out.backward(dout)

    q, k, v, bias, sigma, lengths = (x[n].detach() if n != "lengths" else x[n] for n in
                                     ("q", "k", "v", "rel_bias", "sigma", "lengths"))
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    rel = (j - i).clamp(-R, R) + R
    logits = scale * q @ k.transpose(-1, -2) + bias[:, rel] - (i - j).double() ** 2 / (2 * sigma[..., None] ** 2)
    valid = torch.arange(L)[None] < lengths[:, None]
    inside = ((i - j).abs() <= cutoff * sigma[..., None]) | ~valid[:, None, :, None]
    allowed = valid[:, None, None, :] & inside
    P = torch.softmax(logits.masked_fill(~allowed, -math.inf), -1)
    P = P * valid[:, None, :, None]  # padded query rows contribute nothing
    O = P @ v
    dO = dout * valid[:, None, :, None]
    dP = dO @ v.transpose(-1, -2)
    dS = P * (dP - (dO * O).sum(-1, keepdim=True))
    torch.testing.assert_close(x["v"].grad, P.transpose(-1, -2) @ dO)
    torch.testing.assert_close(x["q"].grad, scale * dS @ k)
    torch.testing.assert_close(x["k"].grad, scale * dS.transpose(-1, -2) @ q)
    d_bias = torch.zeros_like(bias)
    d_bias.index_add_(1, rel.flatten(), dS.sum(0).reshape(H, -1))
    torch.testing.assert_close(x["rel_bias"].grad, d_bias)
    torch.testing.assert_close(x["sigma"].grad, (dS * (i - j).double() ** 2).sum(-1) / sigma**3)


def test_padded_rows_are_zero_with_zero_gradient():
    args = testing.attention_inputs(3, 2, 8, 4, R=2, lengths="ragged", requires_grad=True, seed=7)
    out = K.windowed_attention(**args, cutoff=0.6)
    out.sum().backward()
    for b, n in enumerate(args["lengths"].tolist()):
        assert torch.all(out[b, :, n:] == 0)
        assert torch.all(args["q"].grad[b, :, n:] == 0)
        assert torch.all(args["k"].grad[b, :, n:] == 0) and torch.all(args["v"].grad[b, :, n:] == 0)
        assert torch.all(args["sigma"].grad[b, :, n:] == 0)
    assert torch.isfinite(out).all()


def test_padded_keys_never_influence_valid_rows():
    args = testing.attention_inputs(2, 2, 10, 4, R=3, lengths="ragged", seed=8)
    base = K.windowed_attention(**args)
    for name in ("k", "v"):
        changed = dict(args)
        changed[name] = args[name].clone()
        for b, n in enumerate(args["lengths"].tolist()):
            changed[name][b, :, n:] = 1e4
        torch.testing.assert_close(K.windowed_attention(**changed), base, rtol=0, atol=0)


def test_cutoff_keeps_own_position_and_excludes_far_keys():
    q = torch.randn(1, 1, 6, 4)
    v = torch.randn(1, 1, 6, 4)
    sigma = torch.full((1, 1, 6), 1e-3)  # window shrinks to the diagonal
    out = K.windowed_attention(q, q, v, sigma=sigma, cutoff=1.0)
    torch.testing.assert_close(out, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtype_and_accuracy(dtype):
    args = testing.attention_inputs(2, 2, 12, 8, R=3, lengths="ragged", seed=9)
    low = {n: (t.to(dtype) if n in ("q", "k", "v") else t) for n, t in args.items()}
    out = K.windowed_attention(**low, cutoff=2.0)
    assert out.dtype == dtype
    exact = K.windowed_attention(**{n: (t.to(dtype).float() if n in ("q", "k", "v") else t) for n, t in args.items()},
                                 cutoff=2.0)
    testing.assert_close(out.float(), exact, testing.TOLERANCE[dtype])


def test_chunked_rows_match_unchunked(monkeypatch):
    args = testing.attention_inputs(2, 3, 33, 8, R=4, lengths="ragged", requires_grad=True, seed=10)
    full = windowed_attention_ref(**args, cutoff=2.5)
    grads = torch.autograd.grad(full.square().sum(), [args[n] for n in ("q", "k", "v", "rel_bias", "sigma")])
    monkeypatch.setattr(ref_module, "_CHUNK_ELEMS", 2 * 3 * 33 * 5)  # 5 rows a chunk
    chunked = windowed_attention_ref(**args, cutoff=2.5)
    grads_c = torch.autograd.grad(chunked.square().sum(), [args[n] for n in ("q", "k", "v", "rel_bias", "sigma")])
    torch.testing.assert_close(chunked, full)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b)


def test_long_sequence_4096():
    args = testing.attention_inputs(1, 2, 4096, 16, R=32, lengths="ragged", requires_grad=True, seed=11)
    out = K.windowed_attention(**args, cutoff=3.0)
    out.float().square().mean().backward()
    assert out.shape == (1, 2, 4096, 16) and torch.isfinite(out).all()
    assert torch.isfinite(args["sigma"].grad).all()


def test_noncontiguous_inputs_match_contiguous():
    args = testing.attention_inputs(2, 2, 9, 6, noncontiguous=True, seed=12)
    assert not args["q"].is_contiguous()
    dense = {n: (t.contiguous() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    torch.testing.assert_close(K.windowed_attention(**args), K.windowed_attention(**dense))


def test_lengths_as_list_and_int32():
    args = testing.attention_inputs(2, 2, 6, 4, lengths="ragged", seed=13)
    base = K.windowed_attention(**args)
    as_list = dict(args, lengths=args["lengths"].tolist())
    as_i32 = dict(args, lengths=args["lengths"].to(torch.int32))
    torch.testing.assert_close(K.windowed_attention(**as_list), base)
    torch.testing.assert_close(K.windowed_attention(**as_i32), base)


# ------------------------------------------------------------------------------------ errors
def _good():
    return testing.attention_inputs(2, 2, 6, 4, R=2, lengths="ragged", seed=14)


def _with(**changes):
    args = _good()
    args.update(changes)
    return args


ERRORS = [
    (lambda: _with(q=torch.randn(2, 6, 4)), ValueError, "q must be a 4-D tensor"),
    (lambda: _with(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (lambda: _with(k=torch.randn(2, 2, 5, 4)), ValueError, "k must have shape"),
    (lambda: _with(v=torch.ones(2, 2, 6, 4, dtype=torch.int32)), TypeError, "v must have dtype"),
    (lambda: _with(v=torch.randn(2, 2, 6, 4, dtype=torch.float64)), TypeError, "v must have the same dtype as q"),
    (lambda: _with(k=torch.randn(2, 2, 6, 4).half()), TypeError, "k must have the same dtype as q"),
    (lambda: _with(k=torch.randn(2, 2, 6, 4, device="meta")), ValueError, "k must be on the same device as q"),
    (lambda: _with(sigma=torch.rand(2, 2, 6, device="meta")), ValueError, "sigma must be on the same device as q"),
    (lambda: _with(q=torch.randn(2, 2, 0, 4), k=torch.randn(2, 2, 0, 4), v=torch.randn(2, 2, 0, 4)),
     ValueError, "q must have L >= 1"),
    (lambda: _with(q=torch.randn(2, 2, 6, 0)), ValueError, "q must have D >= 1"),
    (lambda: _with(rel_bias=torch.randn(3, 5)), ValueError, "rel_bias must have shape [H, 2R+1]"),
    (lambda: _with(rel_bias=torch.randn(2, 4)), ValueError, "odd number of columns"),
    (lambda: _with(rel_bias=torch.randn(10)), ValueError, "rel_bias must be a 2-D tensor"),
    (lambda: _with(sigma=torch.rand(2, 2, 5) + 1), ValueError, "sigma must have shape [B, H, L]"),
    (lambda: _with(sigma=torch.zeros(2, 2, 6)), ValueError, "sigma must be finite and > 0"),
    (lambda: _with(sigma=torch.full((2, 2, 6), -1.0)), ValueError, "sigma must be finite and > 0"),
    (lambda: _with(sigma=torch.full((2, 2, 6), float("nan"))), ValueError, "sigma must be finite and > 0"),
    (lambda: _with(sigma=torch.full((2, 2, 6), float("inf"))), ValueError, "sigma must be finite and > 0"),
    (lambda: _with(lengths=torch.tensor([3.0, 2.0])), TypeError, "lengths must have an integer dtype"),
    (lambda: _with(lengths=torch.tensor([3, 2, 1])), ValueError, "lengths must have shape [B]"),
    (lambda: _with(lengths=torch.tensor([2, -1])), ValueError, "lengths must lie in [0, 6], got -1 at index 1"),
    (lambda: _with(lengths=torch.tensor([7, 2])), ValueError, "lengths must lie in [0, 6], got 7 at index 0"),
    (lambda: _with(lengths=[1.5, 2]), TypeError, "lengths must hold integers"),
    (lambda: _with(lengths="all"), TypeError, "lengths must be an integer torch.Tensor"),
]


@pytest.mark.parametrize("make_args,exc,message", ERRORS)
def test_invalid_inputs_raise(make_args, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        K.windowed_attention(**make_args())


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(cutoff=0.0), ValueError, "cutoff must be a finite number > 0, got 0.0"),
    (dict(cutoff=-1), ValueError, "cutoff must be a finite number > 0"),
    (dict(cutoff="3"), TypeError, "cutoff must be a float"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale="x"), TypeError, "scale must be a float"),
    (dict(impl="fast"), ValueError, "impl must be one of"),
    (dict(impl=3), TypeError, "impl must be a str"),
])
def test_invalid_keywords_raise(kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        K.windowed_attention(**_good(), **kwargs)


def test_cutoff_without_sigma_raises():
    with pytest.raises(ValueError, match="cutoff needs sigma"):
        K.windowed_attention(**_with(sigma=None), cutoff=2.0)
