"""KDC-Net learns from each of its losses on synthetic data, and starts where it can.

Short trainings (8 epochs of 19 batches, d = 32, frames bin-averaged to 32) on the default
synthetic generator (600 / 150 / 150 videos), tested on its 150 test videos (chance: R@1 0.7,
SumR 77.3):

* ``kdcnet``'s own trainer with ``loss.distill=false`` (ranking losses only, as MS-SL trains);
* each branch trained alone with its ranking losses, and each loss trained alone (triplet,
  InfoNCE, distillation), with the same optimiser, schedule and data as the trainer;
* beside them a plain model (a linear projection of the mean token, one of each frame, max over
  frames) trained the same way: the data carries the signal, so a branch that ends near chance
  while the plain model learns is a bug of the model, not of the data.

The initialisation test guards the cause of the bug these catch: torch's N(0, 1) position tables
swamped the content, every query started nearly parallel to every other, and ranking-only
training settled where every score is equal.

Thresholds keep a wide margin (measured on a 2-core AMD EPYC, README "Tests"): these runs end at
SumR 265-322, and with the old initialisation the ranking-only ones at 84-105. Training is not
bitwise reproducible across CPUs or thread counts (BLAS blocking differs), so only such margins
are asserted; the bitwise promise (same machine, same thread count) has its own test at the end.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdc_kernels import max_similarity
from kdcnet import metrics as M
from kdcnet.config import apply_overrides, preset
from kdcnet.data import PRVRCollection, query_batches, train_batches, video_batches
from kdcnet.losses import distillation_losses, hard_negatives_on, infonce_loss, triplet_loss
from kdcnet.model import BRANCHES, KDCNet, length_mask
from kdcnet.synthetic import make_synthetic

NAME = "learn"
D, FRAMES, EPOCHS = 32, 32, 8   # the synthetic preset (d 64, 64 frames, 10 epochs), smaller and shorter
PLAIN_D = 128  # the plain model is linear: a wider joint space is all it can use
SEED = 0
# A run "learns" when it ends far above chance on all of these (chance: 0.7 / 6.7 / 77.3).
MIN_R1, MIN_R10, MIN_SUMR = 10.0, 35.0, 180.0


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The default synthetic collection (seconds to generate)."""
    return make_synthetic(tmp_path_factory.mktemp("learning"), NAME, seed=0)


@pytest.fixture(scope="module")
def splits(root):
    return {s: PRVRCollection(root, NAME, s, max_frames=FRAMES) for s in ("train", "test")}


def _config(root=None, *overrides):
    cfg = preset("synthetic")
    cfg.model.d, cfg.data.max_frames, cfg.train.epochs = D, FRAMES, EPOCHS
    cfg.train.plots = False
    if root is not None:
        cfg.data.root, cfg.data.collection = str(root), NAME
    return apply_overrides(cfg, list(overrides))


# ----------------------------------------------------------------------------------- the models


class PlainModel(nn.Module):
    """The comparison model: ``q = W_q mean(tokens)``, ``F_i = W_v frame_i``, score ``max_i cos(q, F_i)``."""

    def __init__(self, visual_dim: int, text_dim: int, d: int) -> None:
        super().__init__()
        self.video = nn.Linear(visual_dim, d)
        self.text = nn.Linear(text_dim, d)

    def encode_videos(self, batch) -> torch.Tensor:
        return self.video(batch.videos)

    def encode_queries(self, batch) -> torch.Tensor:
        m = length_mask(batch.query_lengths, batch.queries.shape[1])[..., None].float()
        return self.text((batch.queries * m).sum(1) / m.sum(1))


class OneBranch(nn.Module):
    """One KDC-Net branch (text and video encoder) of a freshly initialised model, on its own."""

    def __init__(self, cfg, visual_dim: int, text_dim: int, branch: str) -> None:
        super().__init__()
        cfg.model.visual_dim, cfg.model.text_dim = visual_dim, text_dim
        self.branch = KDCNet(cfg).branches[branch]

    def encode_videos(self, batch) -> torch.Tensor:
        return self.branch.video(batch.videos, batch.video_lengths)

    def encode_queries(self, batch) -> torch.Tensor:
        return self.branch.text(batch.queries, batch.query_lengths)


# ------------------------------------------------------------------------- losses, fit, evaluate


def _loss(kind: str, cfg, batch, frames, queries, epoch: int, generator) -> torch.Tensor:
    lengths, qv = batch.video_lengths, batch.query_video
    lo = cfg.loss
    trip = lambda: triplet_loss(max_similarity(queries, frames, lengths), qv, lo.margin, lo.hard_negatives,  # noqa: E731
                                generator, hard=hard_negatives_on(lo, epoch))
    nce = lambda: infonce_loss(max_similarity(queries, frames, lengths, normalize=False), qv)  # noqa: E731
    if kind == "ranking":  # what the trainer optimises per branch with loss.distill=false
        return trip() + lo.nce_weight * nce()
    if kind == "triplet":
        return trip()
    if kind == "infonce":
        return nce()
    if kind == "distillation":  # both KL terms against the teacher, nothing else
        kl_seg, kl_obj = distillation_losses(lo, batch, queries, frames, max_similarity(queries, frames, lengths))
        return kl_seg + kl_obj
    raise ValueError(kind)


def _fit(model: nn.Module, kind: str, cfg, train: PRVRCollection) -> nn.Module:
    """The trainer's recipe: AdamW, linear warm-up then linear decay, grad-norm clipping, batches of
    videos with all their captions, random negatives for the first epochs (``cfg``'s values)."""
    t = cfg.train
    steps = t.epochs * math.ceil(len(train.video_ids) / t.batch_size)
    warm = math.ceil(t.warmup * steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / (steps - warm)))
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(t.epochs):
        for batch in train_batches(train, t.batch_size, seed=SEED, epoch=epoch):
            loss = _loss(kind, cfg, batch, model.encode_videos(batch), model.encode_queries(batch), epoch, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def _test_metrics(model: nn.Module, test: PRVRCollection) -> dict:
    videos, queries = next(video_batches(test, 10 ** 6)), next(query_batches(test, 10 ** 6))
    scores = max_similarity(model.encode_queries(queries), model.encode_videos(videos), videos.video_lengths)
    return M.retrieval_metrics(scores, queries.query_video)


def _assert_learned(result: dict, what: str) -> None:
    shown = {k: round(result[k], 1) for k in (*M.RECALL_KEYS, "SumR")}
    assert result["R@1"] >= MIN_R1 and result["R@10"] >= MIN_R10 and result["SumR"] >= MIN_SUMR, \
        f"{what} did not learn: {shown} (chance: R@1 0.7, R@10 6.7, SumR 77.3)"


@pytest.fixture(scope="module")
def plain(splits):
    train = splits["train"]
    torch.manual_seed(SEED)
    model = PlainModel(train.visual_dim, train.text_dim, PLAIN_D)
    return _test_metrics(_fit(model, "ranking", _config(), train), splits["test"])


# ------------------------------------------------------------------------------------ the tests


def _spread(model: KDCNet, batch) -> dict:
    """Per branch: mean pairwise cosine of the query embeddings, and the share of the score
    variance that is a per-video term (the variance of the column means over the total)."""
    with torch.no_grad():
        queries, frames = model.encode_queries(batch), model.encode_videos(batch)
        scores = model.branch_scores(queries, frames, batch.video_lengths)
    out = {}
    for name in BRANCHES:
        q = F.normalize(queries[name], dim=-1)
        n = q.shape[0]
        cosine = float(((q @ q.T).sum() - n) / (n * (n - 1)))
        s = scores[name]
        out[name] = (cosine, float(s.mean(0).var(unbiased=False) / s.var(unbiased=False)))
    return out


def _legacy_position_tables(model: KDCNet) -> None:
    """torch's default N(0, 1) for the position tables: the initialisation the model used to have."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.reset_parameters()


def test_initial_queries_are_spread_and_scores_follow_the_query(splits):
    cfg = _config()
    train = splits["train"]
    cfg.model.visual_dim, cfg.model.text_dim = train.visual_dim, train.text_dim
    batch = next(train_batches(train, 64, seed=SEED, epoch=0))
    for seed in range(3):
        torch.manual_seed(seed)
        model = KDCNet(cfg).eval()
        for name, (cosine, video_share) in _spread(model, batch).items():
            assert cosine < 0.5, f"seed {seed}, {name}: initial queries nearly parallel (mean cosine {cosine:.2f})"
            assert video_share < 0.25, f"seed {seed}, {name}: {video_share:.0%} of the score variance ignores the query"
    # the check sees the old initialisation: N(0, 1) position tables make every query alike
    _legacy_position_tables(model)
    assert all(cosine > 0.6 for cosine, _ in _spread(model, batch).values())


@pytest.mark.parametrize("name", ["tvr", "activitynet", "charades"])
def test_real_presets_start_with_spread_queries(name):
    """At d = 384 the N(0, 1) position rows had norm ~20 against ~6 for the content."""
    cfg = preset(name)
    cfg.model.visual_dim, cfg.model.text_dim = 96, 80   # the input sizes do not matter here
    torch.manual_seed(0)
    model = KDCNet(cfg).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 31, (48,), generator=g)
    tokens = F.normalize(torch.randn(48, 30, 80, generator=g), dim=-1)
    with torch.no_grad():
        q = F.normalize(model.encode_queries(SimpleNamespace(queries=tokens, query_lengths=lengths))["inheritance"],
                        dim=-1)
    assert float(((q @ q.T).sum() - 48) / (48 * 47)) < 0.5


def test_plain_model_learns(plain):
    """The data carries the signal at this training length."""
    _assert_learned(plain, "the plain model")


@pytest.mark.parametrize("branch", BRANCHES)
def test_each_branch_learns_alone_from_its_ranking_losses(branch, splits, plain):
    train = splits["train"]
    cfg = _config()
    torch.manual_seed(SEED)
    model = OneBranch(cfg, train.visual_dim, train.text_dim, branch)
    got = _test_metrics(_fit(model, "ranking", cfg, train), splits["test"])
    _assert_learned(got, f"the {branch} branch (triplet + 0.04 InfoNCE)")
    assert got["SumR"] >= 0.75 * plain["SumR"], (got, plain)


@pytest.mark.parametrize("loss", ["triplet", "infonce", "distillation"])
def test_each_loss_learns_alone(loss, splits):
    train = splits["train"]
    cfg = _config()
    torch.manual_seed(SEED)
    model = OneBranch(cfg, train.visual_dim, train.text_dim, "inheritance")
    _assert_learned(_test_metrics(_fit(model, loss, cfg, train), splits["test"]), f"the {loss} loss alone")


def test_kdcnet_train_without_distillation_learns(root, tmp_path, plain):
    """The trainer end to end, ranking losses only: the fused score and each branch learn."""
    from kdcnet import trainer

    cfg = _config(root, "loss.distill=false")
    result = trainer.train(cfg, tmp_path / "run", progress=False, console=False)
    _assert_learned(result, "KDC-Net (loss.distill=false)")
    for name in BRANCHES:
        _assert_learned(result["branches"][name], f"the {name} branch of KDC-Net (loss.distill=false)")
    assert result["SumR"] >= 0.75 * plain["SumR"], (result, plain)


# ------------------------------------------------------------------------------- reproducibility


def test_same_command_gives_bit_identical_numbers_with_a_fixed_thread_count(tiny_root, tmp_path):
    """What the README promises: on one machine, with the same thread count, the same run gives the
    same bits (per-epoch losses and validation, test metrics, parameters). Nothing is claimed across
    CPUs or thread counts: BLAS kernels block sums differently there."""
    from kdcnet import trainer

    from .conftest import NAME as TINY, TINY_READ

    cfg = preset("synthetic")
    cfg.data.root, cfg.data.collection = str(tiny_root), TINY
    cfg.data.max_frames, cfg.data.max_tokens = TINY_READ["max_frames"], TINY_READ["max_tokens"]
    cfg.model.d, cfg.model.heads, cfg.model.dropout = 16, 2, 0.1      # dropout draws are part of the run
    cfg.train.epochs, cfg.train.batch_size, cfg.train.threads, cfg.train.plots = 3, 2, 2, False
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        trainer.train(cfg, run, progress=False, console=False)
    a, b = ([{k: v for k, v in json.loads(line).items() if k not in ("seconds", "steps_per_s")}
             for line in (run / "metrics.jsonl").read_text().splitlines()] for run in runs)
    assert a == b and len(a) == 3
    assert (runs[0] / "test_metrics.json").read_text() == (runs[1] / "test_metrics.json").read_text()
    pa, pb = (torch.load(run / "last.pt", map_location="cpu", weights_only=False)["model"] for run in runs)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
