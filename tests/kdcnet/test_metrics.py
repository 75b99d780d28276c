"""Recall metrics against hand-worked examples with ties, the top-k variant, chance level, the
M/V-bin table, and the exact chunked fused top-k of evaluation."""

from __future__ import annotations

import math

import pytest
import torch

import kdc_kernels as K
from kdc_kernels import testing
from kdcnet import metrics as M
from kdcnet.evaluate import fused_topk


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
    args = testing.similarity_inputs(40, 30, 6, 8, seed=3)
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


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("weight", [0.7, 1.0, 0.0])
def test_fused_topk_is_exact_with_ties(chunk, weight):
    g = torch.Generator().manual_seed(1)
    nq, nv, L, d = 23, 17, 5, 8
    queries = {b: torch.randn(nq, d, generator=g) for b in ("inheritance", "exploration")}
    frames = {b: torch.randn(nv, L, d, generator=g) for b in ("inheritance", "exploration")}
    lengths = testing.ragged_lengths(nv, L, seed=2)
    for b in frames:  # videos 9 and 16 duplicate videos 2 and 4: exact fused ties across chunks
        frames[b][9], frames[b][16] = frames[b][2], frames[b][4]
    lengths[9], lengths[16] = lengths[2], lengths[4]
    full = {b: K.max_similarity(queries[b], frames[b], lengths) for b in queries}
    fused = weight * full["inheritance"] + (1 - weight) * full["exploration"]
    k = 10
    scores, idx = fused_topk(queries, frames, lengths, weight, k, video_chunk=chunk)
    order = torch.sort(fused, dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(idx, order)
    torch.testing.assert_close(scores, fused.gather(1, order))
    targets = torch.randint(0, nv, (nq,), generator=g)
    targets[:4] = torch.tensor([9, 16, 2, 4])
    _, all_idx = fused_topk(queries, frames, lengths, weight, nv, video_chunk=chunk)
    assert torch.equal(M.ranks_from_topk(all_idx, targets, nv), M.ranks_from_scores(fused, targets))
