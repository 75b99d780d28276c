"""Evaluation over a whole split equals brute-force scoring of one big batch, and the metrics
JSON has the documented keys."""

from __future__ import annotations

import json

import pytest
import torch

from kdcnet import config as C
from kdcnet import evaluate as E
from kdcnet.data import PRVRCollection, query_batches, video_batches
from kdcnet.metrics import retrieval_metrics
from kdcnet.model import BRANCHES, KDCNet
from kdcnet.synthetic import make_synthetic


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


@pytest.mark.parametrize("batch_size, chunk", [(7, 4), (256, 1024)])
def test_evaluate_equals_brute_force(split, batch_size, chunk):
    root, data = split
    cfg, model = _setup(root, data, batch_size=batch_size, video_chunk=chunk)
    got, widths = E.evaluate(model, data, cfg, torch.device("cpu"), return_widths=True)
    with torch.no_grad():
        vb, qb = next(video_batches(data, 10**6)), next(query_batches(data, 10**6))
        branch = model.branch_scores(model.encode_queries(qb), model.encode_videos(vb), vb.video_lengths)
        fused = model.fuse(branch)
    targets = torch.as_tensor(data.cap_video)
    want = retrieval_metrics(fused, targets)
    assert got["num_videos"] == len(data.video_ids) == 30 and got["num_queries"] == len(data.cap_ids)
    for key in ("R@1", "R@5", "R@10", "R@100", "SumR"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    for name in BRANCHES:
        assert got["branches"][name]["R@1"] == pytest.approx(retrieval_metrics(branch[name], targets)["R@1"])
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
