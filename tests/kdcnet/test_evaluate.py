"""Evaluation over a whole split equals brute-force scoring of one big batch (up to the rounding of
near-tied scores: the batches and blocks differ), NaN embeddings rank last with one warning, and
the metrics JSON has the documented keys."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from kdcnet import config as C
from kdcnet import evaluate as E
from kdcnet.data import PRVRCollection, query_batches, video_batches
from kdcnet.metrics import retrieval_metrics
from kdcnet.model import BRANCHES, KDCNet
from kdcnet.synthetic import make_synthetic

from .ranking import assert_evaluation_within, fused_scores, poison_embeddings

# Encoding in batches of 7 and scoring in chunks vs one batch and one block: scores differ by
# fp32 rounding (1.2e-7 measured); videos closer than this may rank either way.
NEAR = 1e-5


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = make_synthetic(tmp_path_factory.mktemp("eval"), "ev", seed=2, videos=60, test_fraction=0.5,
                          min_frames=6, max_frames=20, visual_dim=20, text_dim=12, teacher_dim=8)
    return root, PRVRCollection(root, "ev", "test", max_frames=16, max_tokens=12)


def _setup(root, data, **eval_):
    cfg = C.preset("synthetic")
    cfg.data.root, cfg.data.collection, cfg.data.max_frames, cfg.data.max_tokens = str(root), "ev", 16, 12
    cfg.model.d, cfg.model.heads = 16, 2
    cfg.model.visual_dim, cfg.model.text_dim = data.visual_dim, data.text_dim
    for key, value in eval_.items():
        setattr(cfg.eval, key, value)
    torch.manual_seed(0)
    return cfg, KDCNet(cfg).eval()


def _brute_force(model, data):
    with torch.no_grad():
        vb, qb = next(video_batches(data, 10**6)), next(query_batches(data, 10**6))
        branch = model.branch_scores(model.encode_queries(qb), model.encode_videos(vb), vb.video_lengths)
    return branch, model.fuse(branch), torch.as_tensor(data.cap_video)


@pytest.mark.parametrize("batch_size, chunk", [(7, 4), (256, 1024)])
def test_evaluate_equals_brute_force(split, batch_size, chunk):
    root, data = split
    cfg, model = _setup(root, data, batch_size=batch_size, video_chunk=chunk)
    got, widths = E.evaluate(model, data, cfg, torch.device("cpu"), return_widths=True)
    branch, fused, targets = _brute_force(model, data)
    vb = next(video_batches(data, 10**6))
    torch.testing.assert_close(fused_scores(branch, cfg.model.fusion_weight), fused)
    assert got["num_videos"] == len(data.video_ids) == 30 and got["num_queries"] == len(data.cap_ids)
    assert got["nan_queries"] == 0
    assert_evaluation_within(got, branch, cfg.model.fusion_weight, targets, NEAR, E.moment_ratios(data))
    assert sum(r["num_queries"] for r in got["mv_bins"]) == len(data.cap_ids)
    assert got["chance_SumR"] == pytest.approx(100 * (1 + 5 + 10) / 30 + 100)
    assert widths["inheritance"].numel() == 2 * int(vb.video_lengths.sum())  # heads x valid frames


def test_metrics_json(split, tmp_path):
    root, data = split
    cfg, model = _setup(root, data)
    result = E.evaluate(model, data, cfg, torch.device("cpu"))
    saved = json.loads(E.save_metrics(result, tmp_path, "test").read_text())
    assert {"R@1", "R@5", "R@10", "R@100", "SumR", "num_queries", "num_videos", "chance_SumR", "mv_bins",
            "branches"} <= set(saved)
    assert saved["R@100"] == 100.0 and saved["SumR"] == pytest.approx(result["SumR"])
    assert "chance (random ranking)" in E.results_table(result) and "(0,0.2]" in E.bins_table(result)


@pytest.mark.parametrize("videos, queries", [((), (0, 7, 40)), ((3,), ()), ((), ())], ids=["queries", "video", "none"])
def test_nan_embeddings_rank_last_with_one_warning(split, caplog, videos, queries):
    """Non-finite embeddings give NaN scores: they rank last (as retrieval_metrics does on the
    full matrix), and evaluation warns once, naming the split and the affected queries."""
    root, data = split
    cfg, model = _setup(root, data, batch_size=7, video_chunk=4)
    poison_embeddings(model, videos, queries)
    with caplog.at_level(logging.WARNING, logger="kdcnet"):
        got = E.evaluate(model, data, cfg, torch.device("cpu"))
    branch, fused, targets = _brute_force(model, data)
    nq = len(data.cap_ids)
    affected = nq if videos else len(queries)
    assert int(torch.isnan(fused).any(dim=1).sum()) == affected == got["nan_queries"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if affected:
        assert warnings == [f"split 'test': {affected} of {nq} queries have NaN scores (non-finite query or video "
                            f"embeddings, e.g. a diverged model or NaN/inf features); NaN scores rank last"]
    else:
        assert warnings == []
    assert_evaluation_within(got, branch, cfg.model.fusion_weight, targets, NEAR, E.moment_ratios(data))
    for q in queries:  # an all-NaN row ranks its videos in index order
        assert retrieval_metrics(fused[q:q + 1], targets[q:q + 1])["R@1"] == (100.0 if targets[q] == 0 else 0.0)


def test_all_nan_model_reports_no_perfect_recall(split, caplog):
    root, data = split
    cfg, model = _setup(root, data)
    poison_embeddings(model, range(len(data.video_ids)), range(len(data.cap_ids)))  # every embedding NaN
    with caplog.at_level(logging.WARNING, logger="kdcnet"):
        got = E.evaluate(model, data, cfg, torch.device("cpu"))
    nq = len(data.cap_ids)
    assert got["nan_queries"] == nq and f"{nq} of {nq} queries have NaN scores" in caplog.text
    # every video ties last: the ranking is the video order, far from SumR 400
    want = retrieval_metrics(torch.full((nq, len(data.video_ids)), float("nan")), torch.as_tensor(data.cap_video))
    assert {key: got[key] for key in want} == want and got["SumR"] < 300
    assert all(math.isfinite(got["branches"][name]["SumR"]) for name in BRANCHES)
