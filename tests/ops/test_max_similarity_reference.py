"""The max_similarity / max_similarity_topk references against loop-level transcriptions of the
contract, tie rules built on purpose, fp64 gradcheck, gradient routing, chunking and errors."""

from __future__ import annotations

import re

import pytest
import torch

import kdc_kernels as K
from kdc_kernels import testing
from kdc_kernels.ops.max_similarity import max_similarity_ref, max_similarity_topk_ref
from kdc_kernels.ops.max_similarity import reference as ref_module


def loop_scores(queries, clips, lengths=None, normalize=True):
    """score/index one (n, v, l) at a time in float64, lowest l on ties."""
    nq, (nv, L, _) = queries.shape[0], clips.shape
    q = queries.double()
    c = clips.double()
    if normalize:
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        c = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    score = torch.empty(nq, nv, dtype=torch.float64)
    index = torch.empty(nq, nv, dtype=torch.int64)
    for n in range(nq):
        for v in range(nv):
            best, arg = None, None
            for l in range(L if lengths is None else int(lengths[v])):
                s = float(q[n] @ c[v, l])
                if best is None or s > best:
                    best, arg = s, l
            score[n, v], index[n, v] = best, arg
    return score, index


def loop_topk(score, k):
    """Per row: sort by (-score, video index)."""
    rows_s, rows_i = [], []
    for row in score.tolist():
        order = sorted(range(len(row)), key=lambda v: (-row[v], v))[:k]
        rows_i.append(order)
        rows_s.append([row[v] for v in order])
    return torch.tensor(rows_s), torch.tensor(rows_i)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 3, 4, 8), (7, 6, 9, 3)])
@pytest.mark.parametrize("lengths", [None, "ragged"])
def test_matches_loop_transcription(normalize, shape, lengths):
    args = testing.similarity_inputs(*shape, lengths=lengths, seed=sum(shape))
    score, index = max_similarity_ref(**args, normalize=normalize, return_index=True)
    want_s, want_i = loop_scores(**args, normalize=normalize)
    assert score.dtype == torch.float32 and index.dtype == torch.int64
    testing.assert_close(score, want_s, 1e-5)
    assert torch.equal(index, want_i)


@pytest.mark.parametrize("normalize", [True, False])
def test_exact_ties_pick_lowest_clip_and_lower_video(normalize):
    args = testing.similarity_inputs(6, 7, 5, 4, lengths="ragged", seed=3)
    if not normalize:  # integer data: every dot product exact, so ties are ties in any order
        args["queries"], args["clips"] = testing.integer_valued(args["queries"]), testing.integer_valued(args["clips"])
    clips = testing.with_ties(args["clips"], args["lengths"], seed=3)
    score, index = max_similarity_ref(args["queries"], clips, args["lengths"], normalize=normalize, return_index=True)
    _, want_i = loop_scores(args["queries"], clips, args["lengths"], normalize=normalize)
    assert torch.equal(index, want_i)
    # Hand-built tie: one video whose clips are all the same vector -> index 0 everywhere.
    same = args["clips"][:1, :1].expand(1, 5, 4).contiguous()
    _, idx = max_similarity_ref(args["queries"], same, return_index=True)
    assert torch.all(idx == 0)
    # Videos 1 and 6 are equal: in top-k the lower index comes first.
    top_s, top_i = max_similarity_topk_ref(args["queries"], clips, args["lengths"], k=7, normalize=normalize)
    want_s, want_i = loop_topk(loop_scores(args["queries"], clips, args["lengths"], normalize=normalize)[0].float(), 7)
    assert torch.equal(top_i, want_i)
    testing.assert_close(top_s, want_s, 1e-6)


@pytest.mark.parametrize("k", [1, 3, 11])
@pytest.mark.parametrize("normalize", [True, False])
def test_topk_matches_sorted_loop(k, normalize):
    args = testing.similarity_inputs(9, 11, 6, 5, lengths="ragged", seed=k)
    if not normalize:
        args["queries"], args["clips"] = testing.integer_valued(args["queries"]), testing.integer_valued(args["clips"])
    args["clips"] = testing.with_ties(args["clips"], args["lengths"], seed=k)
    score = loop_scores(**args, normalize=normalize)[0].float()
    got_s, got_i = max_similarity_topk_ref(**args, k=k, normalize=normalize)
    want_s, want_i = loop_topk(score, k)
    assert got_s.shape == (9, k) and got_i.dtype == torch.int64
    assert torch.equal(got_i, want_i)
    testing.assert_close(got_s, want_s, 1e-6)


def test_chunked_blocks_match(monkeypatch):
    args = testing.similarity_inputs(13, 17, 7, 6, lengths="ragged", seed=4)
    args["clips"] = testing.with_ties(args["clips"], args["lengths"])
    full = max_similarity_ref(**args, return_index=True)
    full_top = max_similarity_topk_ref(**args, k=9)
    monkeypatch.setattr(ref_module, "_CHUNK_ELEMS", 7 * 3 * 2)  # forces 2-3 queries x 3 videos blocks
    assert ref_module._chunk_sizes(13, 17, 7) != (13, 17)
    chunked = max_similarity_ref(**args, return_index=True)
    chunked_top = max_similarity_topk_ref(**args, k=9)
    # Block shapes change the GEMM's summation order: scores agree to rounding, indices exactly.
    testing.assert_close(chunked[0], full[0], 1e-6)
    assert torch.equal(chunked[1], full[1])
    testing.assert_close(chunked_top[0], full_top[0], 1e-6)
    assert torch.equal(chunked_top[1], full_top[1])


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_fp64(normalize):
    args = testing.similarity_inputs(4, 3, 5, 6, lengths="ragged", seed=5)
    q = args["queries"].double().requires_grad_(True)
    c = args["clips"].double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, c: max_similarity_ref(q, c, args["lengths"], normalize=normalize), (q, c), eps=1e-6, atol=1e-6
    )


def test_gradient_reaches_only_the_argmax_clip():
    args = testing.similarity_inputs(5, 4, 6, 8, lengths="ragged", requires_grad=True, seed=6)
    score, index = K.max_similarity(**args, return_index=True)
    g = torch.rand_like(score)
    score.backward(g)
    hit = torch.zeros(4, 6, dtype=torch.bool)
    hit[torch.arange(4)[None].expand(5, -1), index] = True
    grad_norm = args["clips"].grad.norm(dim=-1)
    assert torch.all(grad_norm[~hit] == 0)
    assert torch.all(grad_norm[hit] > 0)
    # With ties the gradient goes to the lowest index only.
    q = torch.randn(3, 4, requires_grad=True)
    c = torch.randn(1, 1, 4).expand(2, 3, 4).clone().requires_grad_(True)
    K.max_similarity(q, c).sum().backward()
    assert torch.all(c.grad[:, 1:] == 0) and torch.all(c.grad[:, 0] != 0)


def test_gradient_formula_without_normalisation():
    """dq_n = sum_v g[n,v] c_{v,l*}, dc_{v,l} = sum_{n: l*=l} g[n,v] q_n."""
    args = testing.similarity_inputs(6, 5, 4, 3, lengths="ragged", requires_grad=True, seed=7)
    score, index = K.max_similarity(**args, normalize=False, return_index=True)
    g = torch.randn_like(score)
    score.backward(g)
    q, c = args["queries"].detach(), args["clips"].detach()
    chosen = c[torch.arange(5)[None], index]  # [Nq, Nv, D]
    torch.testing.assert_close(args["queries"].grad, torch.einsum("nv,nvd->nd", g, chosen))
    dc = torch.zeros_like(c)
    for n in range(6):
        for v in range(5):
            dc[v, index[n, v]] += g[n, v] * q[n]
    torch.testing.assert_close(args["clips"].grad, dc)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_float32(dtype):
    args = testing.similarity_inputs(7, 5, 6, 16, lengths="ragged", seed=8)
    low = dict(args, queries=args["queries"].to(dtype), clips=args["clips"].to(dtype))
    score, index = K.max_similarity(**low, return_index=True)
    assert score.dtype == torch.float32 and index.dtype == torch.int64
    exact = K.max_similarity(low["queries"].float(), low["clips"].float(), args["lengths"])
    testing.assert_close(score, exact, 1e-5)
    top_s, _ = K.max_similarity_topk(**low, k=3)
    assert top_s.dtype == torch.float32


def test_zero_vectors_and_padding():
    q = torch.randn(3, 4)
    c = torch.randn(2, 3, 4)
    c[0, 1] = 0  # normalises to zero, never NaN
    s = K.max_similarity(q, c, torch.tensor([2, 1]))
    assert torch.isfinite(s).all()
    changed = c.clone()
    changed[1, 1:] = 1e6  # padded clips of video 1
    torch.testing.assert_close(K.max_similarity(q, changed, torch.tensor([2, 1])), s, rtol=0, atol=0)


def test_noncontiguous_matches_contiguous():
    args = testing.similarity_inputs(5, 4, 6, 7, noncontiguous=True, seed=9)
    assert not args["clips"].is_contiguous()
    dense = {n: (t.contiguous() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    torch.testing.assert_close(K.max_similarity(**args), K.max_similarity(**dense))


# ------------------------------------------------------------------------------------ errors
def _good():
    return testing.similarity_inputs(4, 3, 5, 6, lengths="ragged", seed=10)


ERRORS = [
    (dict(queries=torch.randn(4, 1, 6)), ValueError, "queries must be a 2-D tensor [Nq, D]"),
    (dict(queries="q"), TypeError, "queries must be a torch.Tensor"),
    (dict(clips=torch.randn(3, 6)), ValueError, "clips must be a 3-D tensor [Nv, L, D]"),
    (dict(clips=torch.randn(3, 5, 7)), ValueError, "clips must have the embedding size D of queries (6)"),
    (dict(clips=torch.randn(3, 5, 6).half()), TypeError, "clips must have the same dtype as queries"),
    (dict(clips=torch.ones(3, 5, 6, dtype=torch.int32)), TypeError, "clips must have dtype in"),
    (dict(clips=torch.randn(3, 5, 6, dtype=torch.float64)), TypeError, "clips must have the same dtype as queries"),
    (dict(clips=torch.randn(3, 5, 6, device="meta")), ValueError, "clips must be on the same device as queries"),
    (dict(queries=torch.randn(4, 0)), ValueError, "queries must have D >= 1 in [Nq, D]"),
    (dict(clips=torch.randn(3, 0, 6), lengths=None), ValueError, "clips must have L >= 1 in [Nv, L, D]"),
    (dict(lengths=torch.tensor([1, 2])), ValueError, "lengths must have shape [Nv] = (3,)"),
    (dict(lengths=torch.tensor([1, -1, 2])), ValueError, "lengths must lie in [0, 5], got -1 at index 1"),
    (dict(lengths=torch.tensor([1, 6, 2])), ValueError, "lengths must lie in [0, 5], got 6 at index 1"),
    (dict(lengths=torch.tensor([1.0, 2.0, 3.0])), TypeError, "lengths must have an integer dtype"),
]


@pytest.mark.parametrize("changes,exc,message", ERRORS)
@pytest.mark.parametrize("op", ["max_similarity", "max_similarity_topk"])
def test_invalid_inputs_raise(op, changes, exc, message):
    args = _good()
    args.update(changes)
    extra = dict(k=1) if op == "max_similarity_topk" else {}
    with pytest.raises(exc, match=re.escape(message)):
        getattr(K, op)(**args, **extra)


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(k=0), ValueError, "k must lie in [1, Nv] = [1, 3], got 0"),
    (dict(k=4), ValueError, "k must lie in [1, Nv] = [1, 3], got 4"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(k=True), TypeError, "k must be an int"),
    (dict(k=1, normalize=1), TypeError, "normalize must be a bool"),
    (dict(k=1, impl="gpu"), ValueError, "impl must be one of"),
])
def test_topk_invalid_keywords(kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        K.max_similarity_topk(**_good(), **kwargs)


def test_max_similarity_invalid_flags():
    with pytest.raises(TypeError, match="return_index must be a bool"):
        K.max_similarity(**_good(), return_index="yes")
