r"""Retrieval metrics: R@1/5/10/100 and SumR, from a full score matrix or from top-k lists, and the
per moment-to-video (M/V) ratio breakdown.

Rank of the relevant video g of a query (1 = best)::

    rank = 1 + #{v : s_v > s_g  or  (s_v == s_g and v < g)}

so ties (equal scores as computed) go to the lower video index, the rule of
``kdc_kernels.max_similarity_topk``. A NaN score (a diverged model, non-finite features) ranks
last, below every number and ``-inf``; NaN scores rank among themselves by video index. So a NaN
score never counts as a hit ahead of a real one: when ``s_g`` is NaN, every video with a number
ranks above g, and ``rank = 1 + #{v : s_v is not NaN} + #{v < g : s_v is NaN}``. The top-k path
(:func:`ranks_from_topk` of ``kdc_kernels`` top-k lists and ``kdcnet.evaluate``) uses the same order.
``R@K`` is the percentage of queries with ``rank <= K`` and ``SumR = R@1 + R@5 + R@10 + R@100``,
summed from unrounded recalls.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

KS = (1, 5, 10, 100)
RECALL_KEYS = tuple(f"R@{k}" for k in KS)
MV_BINS = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0))


def _as_tensor(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t if dtype is None else t.to(dtype)


def ranks_from_scores(scores, targets) -> torch.Tensor:
    """Rank (1-based, ties to the lower index, NaN last) of ``targets[n]`` in ``scores[n]``:
    ``[Nq]`` int64 (see the module doc).

    ``scores [Nq, Nv]``, ``targets [Nq]`` (tensors or arrays).
    """
    scores = _as_tensor(scores)
    targets = _as_tensor(targets, torch.int64).to(scores.device)
    if scores.dim() != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores must be [Nq, Nv] and targets [Nq], got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")
    if scores.shape[0] and (int(targets.min()) < 0 or int(targets.max()) >= scores.shape[1]):
        raise ValueError(f"targets must lie in [0, Nv) = [0, {scores.shape[1]}), got "
                         f"{int(targets.min())}..{int(targets.max())}")
    own = scores.gather(1, targets[:, None])
    lower = torch.arange(scores.shape[1], device=scores.device)[None, :] < targets[:, None]
    # Comparisons with NaN are false: a NaN s_v never ranks above a number; a NaN s_g ranks below
    # every number and, among NaN scores, by index.
    nan, own_nan = torch.isnan(scores), torch.isnan(own)
    better = (scores > own) | ((scores == own) & lower) | (own_nan & (~nan | lower))
    return 1 + better.sum(dim=1)


def ranks_from_topk(topk_indices, targets, num_videos: int) -> torch.Tensor:
    """Rank from per-query top-k lists ``topk_indices [Nq, k]`` (best first, as returned by
    ``max_similarity_topk``): the 1-based position of ``targets[n]``, or ``num_videos + 1`` when it
    is not in the list (its rank is only known to exceed k)."""
    idx = _as_tensor(topk_indices, torch.int64)
    targets = _as_tensor(targets, torch.int64).to(idx.device)
    hit = idx == targets[:, None]
    pos = torch.where(hit, torch.arange(1, idx.shape[1] + 1, device=idx.device)[None, :], num_videos + 1)
    return pos.amin(dim=1) if idx.shape[1] else torch.full_like(targets, num_videos + 1)


def recalls_from_ranks(ranks) -> dict[str, float]:
    """``{"R@1", "R@5", "R@10", "R@100", "SumR"}`` in percent from 1-based ranks ``[Nq]``."""
    ranks = _as_tensor(ranks, torch.int64)
    if ranks.numel() == 0:
        return {**{key: float("nan") for key in RECALL_KEYS}, "SumR": float("nan")}
    out = {f"R@{k}": 100.0 * float((ranks <= k).double().mean()) for k in KS}
    out["SumR"] = sum(out[key] for key in RECALL_KEYS)
    return out


def retrieval_metrics(scores, targets) -> dict[str, float]:
    """R@1, R@5, R@10, R@100 and SumR (percent) of ``scores [Nq, Nv]`` with relevant video
    ``targets [Nq]`` (ties to the lower video index, NaN scores last: see the module doc).

    Example:
        >>> retrieval_metrics(torch.tensor([[0.9, 0.1], [0.5, 0.5]]), torch.tensor([0, 1]))["R@1"]
        50.0
    """
    return recalls_from_ranks(ranks_from_scores(scores, targets))


def topk_metrics(topk_indices, targets, num_videos: int) -> dict[str, float]:
    """:func:`retrieval_metrics` from top-k lists; exact for every ``K <= k`` (R@100 needs
    ``k >= min(100, num_videos)``)."""
    k = _as_tensor(topk_indices).shape[1]
    if k < min(max(KS), num_videos):
        raise ValueError(f"top-k lists of k = {k} cannot give R@100 over {num_videos} videos; need "
                         f"k >= {min(max(KS), num_videos)}")
    return recalls_from_ranks(ranks_from_topk(topk_indices, targets, num_videos))


def chance_metrics(num_videos: int) -> dict[str, float]:
    """Expected recalls of a uniformly random ranking of ``num_videos`` videos."""
    out = {f"R@{k}": 100.0 * min(k, num_videos) / num_videos for k in KS}
    out["SumR"] = sum(out[key] for key in RECALL_KEYS)
    return out


def mv_bin_label(lo: float, hi: float) -> str:
    return f"({lo:g},{hi:g}]"


def mv_bin_table(ranks, ratios: Sequence[float]) -> list[dict]:
    """Recalls per moment-to-video ratio bin ``(0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]``.

    ``ratios[n]`` is the M/V ratio of query n, NaN when unknown (those queries are left out).
    Ratios above 1 (a moment end past the stated duration) count in the last bin, ratios <= 0 in
    the first. Each row: ``{"bin", "num_queries", "R@1", ..., "SumR"}`` (NaN recalls when empty).
    """
    ranks = _as_tensor(ranks, torch.int64)
    r = torch.as_tensor(np.asarray(ratios, dtype=np.float64))
    known = ~torch.isnan(r)
    r = r.clamp(1e-12, 1.0)
    rows = []
    for lo, hi in MV_BINS:
        sel = known & (r > lo) & (r <= hi)
        rows.append({"bin": mv_bin_label(lo, hi), "num_queries": int(sel.sum()),
                     **recalls_from_ranks(ranks[sel.to(ranks.device)])})
    return rows


def format_table(rows: Sequence[dict], columns: Sequence[str], floatfmt: str = ".1f") -> str:
    """A plain-text table (aligned columns) for the terminal and the log."""
    def fmt(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else format(v, floatfmt)
        return "-" if v is None else str(v)

    cells = [[str(c) for c in columns]] + [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) if j else cell.ljust(w) for j, (cell, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
