"""Recall metrics against hand-worked examples with ties, the top-k variant, chance level, the
M/V-bin table, the chunked fused top-k of evaluation, and NaN scores ranking last in every path.

Bitwise comparisons between differently chunked computations use sign-valued embeddings
(``testing.sign_valued``), on which every score is exact whatever the block shape; on random data
a BLAS may round a video's score differently in another chunk, so those comparisons allow
videos within rounding of each other to swap."""

from __future__ import annotations

import math

import pytest
import torch

import kdc_kernels as K
from kdc_kernels import testing
from kdcnet import metrics as M
from kdc_kernels import merge_topk
from kdcnet.evaluate import fused_topk

NAN = float("nan")


def test_ranks_by_hand_with_ties():
    scores = torch.tensor([
        [0.5, 0.5, 0.2],  # target 1 ties with video 0 (lower index wins) -> rank 2
        [0.1, 0.9, 0.9],  # target 1 ties with video 2 (higher index)     -> rank 1
        [0.3, 0.3, 0.3],  # all tied, target 2                            -> rank 3
        [0.3, 0.3, 0.3],  # all tied, target 0                            -> rank 1
        [0.7, 0.2, 0.9],  # target 1 below two others                     -> rank 3
    ])
    targets = torch.tensor([1, 1, 2, 0, 1])
    assert M.ranks_from_scores(scores, targets).tolist() == [2, 1, 3, 1, 3]
    got = M.retrieval_metrics(scores, targets)
    assert got == {"R@1": 40.0, "R@5": 100.0, "R@10": 100.0, "R@100": 100.0, "SumR": 340.0}


def test_recalls_at_every_cutoff_by_hand():
    nv = 150
    scores = torch.zeros(5, nv)
    targets = torch.tensor([0, 1, 5, 10, 100])  # all tied: rank = target + 1 -> 1, 2, 6, 11, 101
    assert M.ranks_from_scores(scores, targets).tolist() == [1, 2, 6, 11, 101]
    got = M.retrieval_metrics(scores.numpy(), targets.numpy())  # numpy inputs work too
    assert got == {"R@1": 20.0, "R@5": 40.0, "R@10": 60.0, "R@100": 80.0, "SumR": 200.0}
    assert math.isclose(M.retrieval_metrics(torch.rand(7, 3), torch.zeros(7, dtype=torch.int64))["R@100"], 100.0)


def test_sumr_is_summed_from_unrounded_recalls():
    scores = torch.eye(3)
    got = M.retrieval_metrics(scores, torch.tensor([0, 1, 0]))  # ranks 1, 1, 2
    assert got["R@1"] == pytest.approx(200 / 3) and got["SumR"] == pytest.approx(200 / 3 + 300)


def test_topk_ranks_equal_full_ranks_with_ties():
    args = testing.similarity_inputs(40, 30, 6, 16, seed=3)
    args["queries"], args["clips"] = testing.sign_valued(args["queries"]), testing.sign_valued(args["clips"])
    args["lengths"][29] = args["lengths"][1]
    args["clips"] = testing.with_ties(args["clips"], args["lengths"], seed=3)
    scores = K.max_similarity(**args)
    targets = torch.randint(0, 30, (40,), generator=torch.Generator().manual_seed(0))
    targets[0] = 29  # video 29 duplicates video 1: an exact tie, lower index first
    full = M.ranks_from_scores(scores, targets)
    _, top = K.max_similarity_topk(**args, k=30)
    assert torch.equal(M.ranks_from_topk(top, targets, 30), full)
    _, top5 = K.max_similarity_topk(**args, k=5)
    partial = M.ranks_from_topk(top5, targets, 30)
    assert torch.equal(partial[full <= 5], full[full <= 5]) and (partial[full > 5] == 31).all()
    assert M.topk_metrics(top, targets, 30) == M.retrieval_metrics(scores, targets)
    with pytest.raises(ValueError, match="k = 5 cannot give R@100 over 30 videos"):
        M.topk_metrics(top5, targets, 30)


def test_chance_level():
    assert M.chance_metrics(50) == {"R@1": 2.0, "R@5": 10.0, "R@10": 20.0, "R@100": 100.0, "SumR": 132.0}
    assert M.chance_metrics(1000)["SumR"] == pytest.approx(0.1 + 0.5 + 1 + 10)


def test_mv_bin_table():
    ranks = torch.tensor([1, 3, 1, 20, 1, 200, 1])
    ratios = [0.1, 0.2, 0.2000001, 0.5, 1.0, 1.4, float("nan")]
    rows = M.mv_bin_table(ranks, ratios)
    assert [r["bin"] for r in rows] == ["(0,0.2]", "(0.2,0.4]", "(0.4,0.6]", "(0.6,0.8]", "(0.8,1]"]
    assert [r["num_queries"] for r in rows] == [2, 1, 1, 0, 2]
    assert rows[0]["R@1"] == 50.0 and rows[0]["R@5"] == 100.0
    assert rows[2]["R@10"] == 0.0 and rows[2]["R@100"] == 100.0
    assert rows[4]["R@1"] == 50.0 and rows[4]["R@100"] == 50.0
    assert math.isnan(rows[3]["SumR"])


def test_invalid_inputs():
    with pytest.raises(ValueError, match=r"scores must be \[Nq, Nv\] and targets \[Nq\]"):
        M.retrieval_metrics(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, Nv\) = \[0, 2\)"):
        M.retrieval_metrics(torch.zeros(2, 2), torch.tensor([0, 2]))


def _fused_corpus(exact: bool):
    g = torch.Generator().manual_seed(1)
    nq, nv, L, d = 23, 17, 5, 16
    queries = {b: torch.randn(nq, d, generator=g) for b in ("inheritance", "exploration")}
    frames = {b: torch.randn(nv, L, d, generator=g) for b in ("inheritance", "exploration")}
    if exact:
        queries = {b: testing.sign_valued(x) for b, x in queries.items()}
        frames = {b: testing.sign_valued(x) for b, x in frames.items()}
    return g, queries, frames, testing.ragged_lengths(nv, L, seed=2)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("weight", [0.7, 1.0, 0.0])
def test_fused_topk_is_exact_with_ties(chunk, weight):
    """Exact scores: the chunked top-k is a stable sort of the full fused matrix, bit for bit."""
    g, queries, frames, lengths = _fused_corpus(exact=True)
    nq, nv = 23, 17
    for b in frames:  # videos 9 and 16 duplicate videos 2 and 4: exact fused ties across chunks
        frames[b][9], frames[b][16] = frames[b][2], frames[b][4]
    lengths[9], lengths[16] = lengths[2], lengths[4]
    full = {b: K.max_similarity(queries[b], frames[b], lengths) for b in queries}
    fused = weight * full["inheritance"] + (1 - weight) * full["exploration"]
    k = 10
    scores, idx = fused_topk(queries, frames, lengths, weight, k, video_chunk=chunk)
    order = torch.sort(fused, dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(idx, order)
    assert torch.equal(scores, fused.gather(1, order))
    targets = torch.randint(0, nv, (nq,), generator=g)
    targets[:4] = torch.tensor([9, 16, 2, 4])
    _, all_idx = fused_topk(queries, frames, lengths, weight, nv, video_chunk=chunk)
    assert torch.equal(M.ranks_from_topk(all_idx, targets, nv), M.ranks_from_scores(fused, targets))
    assert (fused[:, :, None] == fused[:, None, :]).sum() > fused.numel() + 100, "the data must hold exact ties"


@pytest.mark.parametrize("chunk", [1, 7])
def test_fused_topk_matches_the_full_matrix_up_to_rounding(chunk):
    """Random embeddings: each chunk is scored by its own max_similarity call, whose rounding may
    differ from one call over all videos by ~1e-7, so videos within 1e-5 may swap."""
    _, queries, frames, lengths = _fused_corpus(exact=False)
    full = {b: K.max_similarity(queries[b], frames[b], lengths) for b in queries}
    fused = 0.7 * full["inheritance"] + 0.3 * full["exploration"]
    scores, idx = fused_topk(queries, frames, lengths, 0.7, 10, video_chunk=chunk)
    testing.assert_topk_equivalent(scores, idx, fused, 1e-5)
    assert (scores.diff(dim=1) <= 0).all()


# ------------------------------------------------------------------------------ NaN ranks last


def test_nan_score_is_never_a_hit():
    assert M.ranks_from_scores(torch.tensor([[0.9, NAN]]), torch.tensor([1])).tolist() == [2]
    assert M.retrieval_metrics(torch.tensor([[0.9, NAN]]), torch.tensor([1]))["R@1"] == 0.0
    scores = torch.tensor([
        [NAN, 0.2, NAN, -math.inf],  # target 2 (NaN): after 0.2 and -inf, after NaN video 0 -> 4
        [NAN, 0.2, NAN, -math.inf],  # target 0 (NaN): after the numbers, first NaN -> 3
        [NAN, 0.2, NAN, -math.inf],  # target 3 (-inf): NaN never ranks above a number -> 2
        [0.5, NAN, 0.5, 0.7],        # target 2: tie with 0, below 0.7, NaN ignored -> 3
    ])
    assert M.ranks_from_scores(scores, torch.tensor([2, 0, 3, 2])).tolist() == [4, 3, 2, 3]


def test_all_nan_matrix_ranks_by_video_index():
    """A diverged model's all-NaN scores: every video ties last, so videos rank in index order."""
    scores = torch.full((4, 150), NAN)
    targets = torch.tensor([0, 3, 40, 120])
    assert M.ranks_from_scores(scores, targets).tolist() == [1, 4, 41, 121]
    got = M.retrieval_metrics(scores, targets)
    assert got == {"R@1": 25.0, "R@5": 50.0, "R@10": 50.0, "R@100": 75.0, "SumR": 200.0}
    assert M.retrieval_metrics(torch.full((3, 3), NAN), torch.tensor([0, 1, 2]))["SumR"] < 400


def _nan_sorted(scores: torch.Tensor, k: int):
    """Per row: sort by (NaN last, descending score, video index) in Python."""
    rows_s, rows_i = [], []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda v: (math.isnan(row[v]), -row[v] if not math.isnan(row[v]) else 0, v))[:k]
        rows_i.append(order)
        rows_s.append([row[v] for v in order])
    return torch.tensor(rows_s), torch.tensor(rows_i)


def test_merge_topk_puts_nan_last_in_index_order():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(-3, 4, (6, 40), generator=g).float()  # many exact ties
    scores[torch.rand(6, 40, generator=g) < 0.3] = NAN
    scores[torch.rand(6, 40, generator=g) < 0.1] = -math.inf
    scores[5] = NAN
    ids = torch.arange(40).expand(6, -1)
    for k, block in ((40, 40), (12, 7), (5, 1)):
        best_s, best_i = torch.empty(6, 0), torch.empty(6, 0, dtype=torch.int64)
        for v0 in range(0, 40, block):
            best_s, best_i = merge_topk(best_s, best_i, scores[:, v0:v0 + block], ids[:, v0:v0 + block], k)
        want_s, want_i = _nan_sorted(scores, k)
        assert torch.equal(best_i, want_i), (k, block)
        torch.testing.assert_close(best_s, want_s, equal_nan=True)



@pytest.mark.parametrize("args, error, words", [
    ((torch.empty(2, 0), torch.empty(2, 0, dtype=torch.int64), torch.rand(2, 3),
      torch.arange(3).expand(2, -1), 0), ValueError, "k must be >= 1"),
    ((torch.empty(2, 0), torch.empty(2, 0, dtype=torch.int64), torch.rand(2, 3),
      torch.arange(3).expand(2, -1), 2.0), TypeError, "k must be an int"),
    ((torch.empty(2, 0), torch.empty(2, 0, dtype=torch.int64), torch.rand(3, 3),
      torch.arange(3).expand(3, -1), 2), ValueError, "new_scores must have Nq = 2"),
    ((torch.empty(2, 0), torch.empty(2, 0, dtype=torch.int64), torch.rand(2, 3),
      torch.arange(4).expand(2, -1), 2), ValueError, "new_indices must have shape"),
    ((torch.empty(2, 0), torch.empty(2, 0, dtype=torch.int64), torch.rand(2, 3),
      torch.arange(3).expand(2, -1).int(), 2), TypeError, "new_indices must have dtype torch.int64"),
    ((torch.empty(2, 0), torch.empty(2, 0, dtype=torch.int64), torch.rand(2, 3).double(),
      torch.arange(3).expand(2, -1), 2), TypeError, "new_scores must have the same dtype"),
    ((torch.empty(2, 0), torch.empty(2, 0, dtype=torch.int64), torch.rand(6),
      torch.arange(6), 2), ValueError, "new_scores must be a 2-D tensor"),
    (([], torch.empty(2, 0, dtype=torch.int64), torch.rand(2, 3),
      torch.arange(3).expand(2, -1), 2), TypeError, "best_scores must be a torch.Tensor"),
])
def test_public_merge_topk_names_the_bad_argument(args, error, words):
    import kdc_kernels
    with pytest.raises(error, match=words):
        kdc_kernels.merge_topk(*args)


def test_public_merge_topk_is_the_one_the_evaluation_uses():
    import kdc_kernels
    import kdcnet.distributed
    import kdcnet.evaluate
    assert kdcnet.evaluate.merge_topk is kdc_kernels.merge_topk
    assert kdcnet.distributed.merge_topk is kdc_kernels.merge_topk


@pytest.mark.gpu
def test_merge_topk_puts_nan_last_on_cuda():
    scores = torch.tensor([[0.3, NAN, -math.inf, 0.3, NAN, 1.0]], device="cuda")
    ids = torch.arange(6, device="cuda")[None]
    best_s, best_i = merge_topk(scores[:, :0], ids[:, :0], scores, ids, 6)
    assert best_i.tolist() == [[5, 0, 3, 2, 1, 4]]


def test_topk_paths_rank_nan_last_like_the_full_matrix():
    """NaN embeddings (one query, one frame of one video) give NaN scores: the reference top-k and
    the fused top-k rank them last, exactly as ranks_from_scores does on the full matrix."""
    _, queries, frames, lengths = _fused_corpus(exact=True)
    queries["inheritance"][3] = NAN
    frames["exploration"][5, 0] = NAN  # a valid frame (every video has length >= 1)
    nq, nv = 23, 17
    targets = torch.arange(nq) % nv
    targets[3], targets[7] = 16, 5
    full = {b: K.max_similarity(queries[b], frames[b], lengths) for b in queries}
    for weight in (0.7, 1.0, 0.0):  # weight 0 or 1: the fused score is one branch's score
        fused = {1.0: full["inheritance"], 0.0: full["exploration"]}.get(
            weight, weight * full["inheritance"] + (1 - weight) * full["exploration"])
        assert torch.isnan(fused).any()
        _, idx = fused_topk(queries, frames, lengths, weight, nv, video_chunk=4)
        assert torch.equal(M.ranks_from_topk(idx, targets, nv), M.ranks_from_scores(fused, targets)), weight
        assert M.topk_metrics(idx, targets, nv) == M.retrieval_metrics(fused, targets)
        _, top3 = fused_topk(queries, frames, lengths, weight, 3, video_chunk=4)
        enough = (~torch.isnan(fused)).sum(dim=1) >= 3  # rows with 3 numbers list no NaN in their top 3
        assert enough.sum() > 10 and not torch.isnan(fused.gather(1, top3))[enough].any()
    _, idx = K.max_similarity_topk(queries["inheritance"], frames["inheritance"], lengths, k=nv)
    assert idx[3].tolist() == list(range(nv))  # an all-NaN row: index order
    assert M.ranks_from_topk(idx, targets, nv)[3] == 17


@pytest.mark.gpu
@pytest.mark.parametrize("weight", [0.7, 1.0])
def test_fused_topk_on_cuda_ranks_like_the_reference(weight):
    """On CUDA tensors evaluation ranks with the fast paths: on exact scores (every dot product
    exact, so any kernel computes the reference's values) with NaN embeddings, the ranks equal
    those of the reference's full matrix: ties to the lower index, non-finite scores last."""
    _, queries, frames, lengths = _fused_corpus(exact=True)
    queries["inheritance"][3] = NAN
    frames["inheritance"][5, 0] = NAN
    nq, nv = 23, 17
    targets = torch.arange(nq) % nv
    targets[3] = 16
    full = {b: K.max_similarity(queries[b], frames[b], lengths) for b in queries}
    fused = full["inheritance"] if weight == 1.0 else weight * full["inheritance"] + (1 - weight) * full["exploration"]
    cuda = ({b: x.cuda() for b, x in queries.items()}, {b: x.cuda() for b, x in frames.items()}, lengths.cuda())
    _, idx = fused_topk(*cuda, weight, nv, video_chunk=4)
    assert torch.equal(M.ranks_from_topk(idx.cpu(), targets, nv), M.ranks_from_scores(fused, targets))
