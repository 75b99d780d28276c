"""The max_similarity / max_similarity_topk references against loop-level transcriptions of the
contract, tie rules built on purpose, fp64 gradcheck, gradient routing, chunking and errors.

Bitwise claims hold by construction: they use data on which every dot product is exact in fp32
(``testing.sign_valued``, ``testing.integer_valued``, ``testing.one_hot_valued``), so any
summation order, block shape, position or thread count gives the same bits. On random data a
BLAS may round the same dot product differently at another position or in another block (x86
CPUs do), so scores are compared with a tolerance and indices only away from near-ties."""

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


def loop_sims(queries, clips, normalize=True):
    """(n, v, l) -> the fp64 similarity, for the near-tie-aware index checks."""
    q, c = queries.double(), clips.double()
    if normalize:
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        c = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return lambda n, v, l: float(q[n] @ c[v, l])


def exact(args):
    """``args`` with sign-valued queries and clips: every score exact in fp32 (module doc)."""
    return dict(args, queries=testing.sign_valued(args["queries"]), clips=testing.sign_valued(args["clips"]))


def same_video_of(clips, lengths):
    def same(a, b):
        return (lengths is None or int(lengths[a]) == int(lengths[b])) and torch.equal(clips[a], clips[b])
    return same


# Random data: fp32 scores against an fp64 loop agree to rounding (~1e-7); the reference's argmax
# may differ only between clips whose similarities are that close.
NEAR = 1e-5


def loop_topk(score, k):
    """Per row: sort by (-score, video index)."""
    rows_s, rows_i = [], []
    for row in score.tolist():
        order = sorted(range(len(row)), key=lambda v: (-row[v], v))[:k]
        rows_i.append(order)
        rows_s.append([row[v] for v in order])
    return torch.tensor(rows_s), torch.tensor(rows_i)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 3, 4, 8), (7, 6, 9, 3), (6, 5, 7, 16)])
@pytest.mark.parametrize("lengths", [None, "ragged"])
def test_matches_loop_transcription(normalize, shape, lengths):
    args = testing.similarity_inputs(*shape, lengths=lengths, seed=sum(shape))
    score, index = max_similarity_ref(**args, normalize=normalize, return_index=True)
    want_s, want_i = loop_scores(**args, normalize=normalize)
    assert score.dtype == torch.float32 and index.dtype == torch.int64
    testing.assert_close(score, want_s, 1e-5)
    testing.assert_argmax_valid(index, want_i, loop_sims(args["queries"], args["clips"], normalize), args["clips"], NEAR)
    # Exact data: the fp32 scores are the fp64 ones, and every tie (there are many) goes to the
    # lowest clip.
    ex = exact(args)
    score, index = max_similarity_ref(**ex, normalize=normalize, return_index=True)
    want_s, want_i = loop_scores(**ex, normalize=normalize)
    assert torch.equal(score, want_s.float()) and torch.equal(index, want_i)


@pytest.mark.parametrize("normalize", [True, False])
def test_exact_ties_pick_lowest_clip_and_lower_video(normalize):
    args = exact(testing.similarity_inputs(6, 7, 5, 16, lengths="ragged", seed=3))
    args["lengths"][6] = args["lengths"][1]
    clips = testing.with_ties(args["clips"], args["lengths"], seed=3)
    score, index = max_similarity_ref(args["queries"], clips, args["lengths"], normalize=normalize, return_index=True)
    want_s, want_i = loop_scores(args["queries"], clips, args["lengths"], normalize=normalize)
    assert torch.equal(index, want_i) and torch.equal(score, want_s.float())
    sims = loop_sims(args["queries"], clips, normalize)
    maximal = sum(int(want_s[n, v] == sims(n, v, l)) for n in range(6) for v in range(7)
                  for l in range(int(args["lengths"][v])))
    assert maximal - want_s.numel() > 10, "the data must hold exact ties at the max for the rule to be tested"
    # Hand-built tie: one video whose clips are all the same vector -> index 0 everywhere.
    same = clips[:1, :1].expand(1, 5, 16).contiguous()
    _, idx = max_similarity_ref(args["queries"], same, return_index=True, normalize=normalize)
    assert torch.all(idx == 0)
    # Videos 1 and 6 are equal: in top-k the lower index comes first (as do all other ties).
    top_s, top_i = max_similarity_topk_ref(args["queries"], clips, args["lengths"], k=7, normalize=normalize)
    want_s, want_i = loop_topk(want_s.float(), 7)
    assert torch.equal(top_i, want_i) and torch.equal(top_s, want_s)
    pos = top_i.argsort(dim=1)
    assert torch.all(pos[:, 1] < pos[:, 6])


@pytest.mark.parametrize("k", [1, 3, 11])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("data", ["random", "exact"])
def test_topk_matches_sorted_loop(k, normalize, data):
    args = testing.similarity_inputs(9, 11, 6, 16, lengths="ragged", seed=k)
    if data == "exact":
        args = exact(args)
    args["clips"] = testing.with_ties(args["clips"], args["lengths"], seed=k)
    score64 = loop_scores(**args, normalize=normalize)[0]
    got_s, got_i = max_similarity_topk_ref(**args, k=k, normalize=normalize)
    want_s, want_i = loop_topk(score64.float(), k)
    assert got_s.shape == (9, k) and got_i.dtype == torch.int64
    if data == "exact":
        assert torch.equal(got_i, want_i) and torch.equal(got_s, want_s)
    else:  # fp32 against fp64: videos whose scores are within rounding may swap
        testing.assert_topk_valid(got_s, got_i, want_s, want_i, score64, same_video_of(args["clips"], args["lengths"]),
                                  NEAR)


@pytest.mark.parametrize("data", ["random", "exact"])
def test_chunked_blocks_match(monkeypatch, data):
    args = testing.similarity_inputs(13, 17, 7, 16, lengths="ragged", seed=4)
    if data == "exact":
        args = exact(args)
    args["clips"] = testing.with_ties(args["clips"], args["lengths"])
    full = max_similarity_ref(**args, return_index=True)
    full_top = max_similarity_topk_ref(**args, k=9)
    monkeypatch.setenv("KDC_REF_BLOCK_ELEMS", str(7 * 6))  # blocks of 6 queries x 1 video
    assert ref_module._chunk_sizes(13, 17, 7) == (6, 1)
    chunked = max_similarity_ref(**args, return_index=True)
    chunked_top = max_similarity_topk_ref(**args, k=9)
    if data == "exact":  # every dot product exact: the block shape cannot matter
        for got, want in zip((*chunked, *chunked_top), (*full, *full_top)):
            assert torch.equal(got, want)
        return
    # Block shapes change the GEMM's summation order: scores agree to rounding, and indices except
    # between clips or videos whose scores are within that rounding.
    sims = loop_sims(args["queries"], args["clips"])
    testing.assert_close(chunked[0], full[0], 1e-6)
    testing.assert_argmax_valid(chunked[1], full[1], sims, args["clips"], NEAR)
    score64 = loop_scores(**args)[0]
    testing.assert_topk_valid(chunked_top[0], chunked_top[1], full_top[0], full_top[1], score64,
                              same_video_of(args["clips"], args["lengths"]), NEAR)


def test_block_size_variable(monkeypatch):
    monkeypatch.setenv("KDC_REF_BLOCK_ELEMS", "0")
    with pytest.raises(ValueError, match="KDC_REF_BLOCK_ELEMS must be an integer >= 1"):
        ref_module._chunk_sizes(4, 4, 4)
    monkeypatch.setenv("KDC_REF_BLOCK_ELEMS", "1")
    assert ref_module._chunk_sizes(4, 5, 6) == (1, 1)
    monkeypatch.delenv("KDC_REF_BLOCK_ELEMS")
    assert ref_module._chunk_sizes(4, 5, 6) == (4, 5)


def test_reorder_hook_changes_rounding_but_not_exact_scores(monkeypatch):
    """KDC_REF_REORDER=1 (the CI guard) sums neighbouring positions in other orders: random copies
    at neighbouring positions stop tying on every machine, exact data is untouched."""
    args = testing.similarity_inputs(16, 40, 8, 37, lengths=None, seed=12)
    copies = args["clips"][:, :1].expand(-1, 8, -1).contiguous()  # each video: one vector, 8 times
    plain = max_similarity_ref(args["queries"], copies, return_index=True)
    monkeypatch.setenv("KDC_REF_REORDER", "1")
    reordered = max_similarity_ref(args["queries"], copies, return_index=True)
    testing.assert_close(reordered[0], plain[0], 1e-6)
    assert (reordered[1] != 0).any(), "the hook must break ties between copies of random vectors"
    ex = exact(args)
    copies = ex["clips"][:, :1].expand(-1, 8, -1).contiguous()
    score, index = max_similarity_ref(ex["queries"], copies, return_index=True)
    monkeypatch.delenv("KDC_REF_REORDER")
    assert torch.equal(score, max_similarity_ref(ex["queries"], copies)) and torch.all(index == 0)


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
    # With ties the gradient goes to the lowest index only. The clips are copies of a one-hot
    # vector, so their scores are exact and tie in any summation order.
    q = torch.randn(3, 4, requires_grad=True)
    c = testing.one_hot_valued(torch.randn(1, 1, 4)).expand(2, 3, 4).clone().requires_grad_(True)
    K.max_similarity(q, c).sum().backward()
    assert torch.all(c.grad[:, 1:] == 0) and torch.all(c.grad[:, 0].abs().sum(dim=-1) > 0)


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
