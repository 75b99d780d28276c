"""Evaluation test helpers: recall checks that hold on every machine, NaN embeddings on demand.

A ranking computed in other blocks than a reference (other chunks, shards or encoding batches)
may round each score differently in the last bits: a BLAS sums the same dot product in another
order at another position, in another block shape or with another thread count. A video whose
score is that close to the relevant video's may then rank on either side of it. These helpers
bound the recalls that any such ranking can give; where no score is that close the bounds meet,
and the check is exact equality.
"""

from __future__ import annotations

import torch

from kdcnet import metrics as M
from kdcnet.model import BRANCHES

KEYS = (*M.RECALL_KEYS, "SumR")


def rank_bounds(scores: torch.Tensor, targets: torch.Tensor, atol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Best and worst 1-based rank of each query's target when every score may move by up to
    ``atol / 2``: videos more than ``atol`` above the target always rank above it, those within
    ``atol`` on either side. NaN scores stay NaN whatever the rounding and rank last
    (``kdcnet.metrics``): a NaN target's rank is exact, and a NaN video never outranks a number."""
    s = scores.double()
    targets = targets.to(s.device)
    own = s.gather(1, targets[:, None])
    other = torch.arange(s.shape[1], device=s.device)[None, :] != targets[:, None]
    best = 1 + (s > own + atol).sum(dim=1)
    worst = 1 + ((s >= own - atol) & other).sum(dim=1)
    exact = M.ranks_from_scores(scores, targets)
    nan = torch.isnan(own[:, 0])
    return torch.where(nan, exact, best), torch.where(nan, exact, worst)


def assert_recalls_within(got: dict, scores: torch.Tensor, targets: torch.Tensor, atol: float, what: str = "") -> None:
    """``got``'s R@K and SumR lie between the worst and the best recalls of :func:`rank_bounds`."""
    best, worst = (M.recalls_from_ranks(r) for r in rank_bounds(scores, targets, atol))
    for key in KEYS:
        assert worst[key] - 1e-9 <= got[key] <= best[key] + 1e-9, (what, key, got[key], worst[key], best[key])


def assert_bins_within(rows: list[dict], scores: torch.Tensor, targets: torch.Tensor, ratios, atol: float) -> None:
    """The per-M/V-bin table the same way."""
    best, worst = (M.mv_bin_table(r, ratios) for r in rank_bounds(scores, targets, atol))
    assert [r["num_queries"] for r in rows] == [r["num_queries"] for r in best]
    for row, hi, lo in zip(rows, best, worst):
        for key in KEYS:
            if row["num_queries"]:
                assert lo[key] - 1e-9 <= row[key] <= hi[key] + 1e-9, (row["bin"], key, row[key], lo[key], hi[key])


def fused_scores(branch: dict, weight: float) -> torch.Tensor:
    """The evaluation's fused score matrix from per-branch ``[Nq, Nv]`` scores."""
    if weight in (0.0, 1.0):
        return branch["inheritance" if weight == 1.0 else "exploration"]
    return weight * branch["inheritance"] + (1.0 - weight) * branch["exploration"]


def assert_evaluation_within(got: dict, branch: dict, weight: float, targets: torch.Tensor, atol: float,
                             ratios=None) -> None:
    """An :func:`kdcnet.evaluate.evaluate` result against per-branch full score matrices computed
    elsewhere: fused and per-branch recalls (and the M/V bins) within the rounding ``atol``."""
    fused = fused_scores(branch, weight)
    assert_recalls_within(got, fused, targets, atol, "fused")
    for name in BRANCHES:
        if name in (got.get("branches") or {}):
            assert_recalls_within(got["branches"][name], branch[name], targets, atol, name)
    if ratios is not None:
        assert_bins_within(got["mv_bins"], fused, targets, ratios, atol)


def poison_embeddings(model, videos=(), queries=()) -> None:
    """Make ``model`` (in place) return NaN embeddings, in every branch, for the videos and
    queries with these global indices (``batch.video_index`` / ``batch.query_index``), as a
    diverged model or a NaN feature would."""
    encode_videos, encode_queries = model.encode_videos, model.encode_queries
    nan = float("nan")

    def poisoned_videos(batch, **kw):
        out = encode_videos(batch, **kw)
        emb = out[0] if isinstance(out, tuple) else out
        rows = torch.isin(batch.video_index, torch.tensor(list(videos), dtype=torch.int64))
        for name in emb:
            emb[name][rows.to(emb[name].device)] = nan
        return out

    def poisoned_queries(batch, **kw):
        emb = encode_queries(batch, **kw)
        rows = torch.isin(batch.query_index, torch.tensor(list(queries), dtype=torch.int64))
        for name in emb:
            emb[name][rows.to(emb[name].device)] = nan
        return emb

    model.encode_videos, model.encode_queries = poisoned_videos, poisoned_queries
