"""Several processes on the CPU (gloo, 2 ranks, spawned like torchrun): a training step with
gathered embeddings equals one process on the global batch, sharded evaluation equals one process
(bit for bit on exact-arithmetic scores; on a model's scores up to the rounding of near-tied
scores, since each rank scores its videos in other blocks), a 2-rank run resumes on 1 rank, and
``torchrun -m kdcnet train`` works end to end."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdcnet import cli
from kdcnet import distributed as D
from kdcnet import evaluate as E
from kdcnet import trainer
from kdcnet.data import PRVRCollection, train_batches
from kdcnet.evaluate import fused_topk, sharded_topk
from kdcnet.model import BRANCHES, KDCNet
from kdcnet.rundir import RunDir
from kdcnet.synthetic import make_synthetic

from kdc_kernels import max_similarity, max_similarity_topk, testing

from .conftest import NAME
from .ranking import assert_evaluation_within, poison_embeddings
from .ranks import run_ranks
from .test_cli import TINY_SETS
from .test_trainer import tiny_train_config

pytestmark = pytest.mark.timeout(240)
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------- sharding (no ranks)


@pytest.mark.parametrize("n, b, size", [(6, 2, 2), (7, 2, 2), (9, 2, 4), (5, 3, 2), (3, 4, 2), (5, 4, 4), (1, 1, 3),
                                        (10, 3, 1)])
def test_epoch_videos_cover_every_video_once_in_equal_steps(n, b, size):
    shards = [D.epoch_videos(n, b, 4, 2, D.World(r, size)) for r in range(size)]
    steps = D.steps_per_epoch(n, b, D.World(0, size))
    batches = [[s[i:i + b] for i in range(0, len(s), b)] for s in shards]
    assert [len(bs) for bs in batches] == [steps] * size  # every rank runs the same number of steps
    assert all(1 <= len(x) <= b for bs in batches for x in bs)
    for step in range(steps):  # a step's videos are split as evenly as they go
        sizes = [len(batches[r][step]) for r in range(size)]
        assert max(sizes) - min(sizes) <= 1
    # step s of all ranks in rank order = the s-th run of size * b videos of the one-process order,
    # the last run padded with the first videos of the order only when it is shorter than size
    order = np.random.default_rng((4, 2)).permutation(n)
    last = n - (steps - 1) * size * b
    want = np.concatenate([order, np.resize(order, max(0, size - last))])
    got = np.concatenate([batches[r][step] for step in range(steps) for r in range(size)])
    assert got.tolist() == want.tolist()


def test_one_process_keeps_the_single_process_order(tiny_root):
    data = PRVRCollection(tiny_root, NAME, "train", max_frames=16, max_tokens=8)
    want = [b.video_index.tolist() for b in train_batches(data, 4, seed=3, epoch=5)]
    videos = D.epoch_videos(len(data.video_ids), 4, 3, 5, D.World())
    got = [b.video_index.tolist() for b in train_batches(data, 4, seed=3, epoch=5, shuffle=False, video_subset=videos)]
    assert got == want


@pytest.mark.parametrize("n, b, size", [(30, 5, 2), (30, 7, 2), (30, 256, 2), (10, 3, 4), (1, 4, 3)])
def test_batch_shards_are_contiguous_runs_of_whole_batches(n, b, size):
    shards = [D.batch_shard(n, b, r, size) for r in range(size)]
    assert [i for s in shards for i in s] == list(range(n))
    assert all(s.start % b == 0 for s in shards if len(s))


def test_plain_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with D.session("cpu") as world:
        assert world == D.World() and world.is_main and not D.launched()
        x = torch.arange(6.0).view(3, 2)
        assert D.all_gather_rows(x) is x and D.broadcast_object("a") == "a"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert D.launched() and D.env_rank() == 1 and D.resolve_device("cpu") == CPU


def test_gather_flag(tmp_path):
    args = cli.build_parser().parse_args(["train", "--gather"])
    assert cli.config_from_args(args).train.gather is True
    assert cli.config_from_args(cli.build_parser().parse_args(["train"])).train.gather is False
    with pytest.raises(ValueError, match="drop --gather"):
        cli.cmd_train(cli.build_parser().parse_args(["train", "--resume", str(tmp_path), "--gather"]))


# ----------------------------------------------------------------------------- one training step

B = 2          # videos per rank and step
SEED = 11
KD_LAMBDA = 0.3
LR = 0.1


def _step_setup(root, gather: bool):
    """Model, SGD (the update is -lr * gradient, so it shows any gradient scaling that an Adam
    step would normalise away), the tiny train split; no dropout, no clipping."""
    cfg = tiny_train_config(root, grad_clip=0.0, gather=gather)
    cfg.model.dropout = 0.0
    data = E.open_split(cfg, "train", teacher=True)
    cfg.model.visual_dim, cfg.model.text_dim = data.visual_dim, data.text_dim
    torch.manual_seed(0)
    model = KDCNet(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return cfg, data, model, optimizer, scheduler


def _first_batch(data, world: D.World, batch_size: int = B):
    videos = D.epoch_videos(len(data.video_ids), batch_size, SEED, 0, world)
    return next(train_batches(data, batch_size, seed=SEED, epoch=0, shuffle=False, video_subset=videos))


def _step(root, gather: bool, world: D.World, batch_size: int = B) -> dict:
    cfg, data, model, optimizer, scheduler = _step_setup(root, gather)
    batch = _first_batch(data, world, batch_size)
    encoder = trainer.wrap_encoders(model, CPU)
    terms = trainer.train_step(model, encoder, batch, optimizer, scheduler, cfg, KD_LAMBDA,
                               torch.Generator().manual_seed(7))
    return {"terms": {key: float(value.detach()) for key, value in terms.items()}, "videos": batch.video_index.tolist(),
            "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
            "params": {key: value.clone() for key, value in model.state_dict().items()}}


def _step_worker(rank, root, out):
    with D.session("cpu") as world:
        torch.save({mode: _step(root, mode == "gather", world) for mode in ("gather", "local")},
                   out / f"step{rank}.pt")


def _assert_close(got: dict, want: dict, what: str):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{what} {key}: {m}")


def test_gathered_step_equals_one_process_on_the_global_batch(tiny_root, tmp_path):
    run_ranks(_step_worker, tiny_root, tmp_path)
    ranks = [torch.load(tmp_path / f"step{r}.pt", weights_only=False) for r in range(2)]

    # train.gather: both ranks compute the loss of the global batch, and the update (gradients
    # reduce-scattered through the gather, then averaged by DDP) is that of one process on it
    one = _step(tiny_root, True, D.World(), batch_size=2 * B)
    got = [r["gather"] for r in ranks]
    assert got[0]["videos"] + got[1]["videos"] == one["videos"]  # the ranks' shares make up the global batch
    assert len(one["videos"]) == 2 * B
    for r in got:
        assert r["terms"] == pytest.approx(one["terms"], rel=1e-5, abs=1e-6)
        assert r["terms"]["kl_obj"] > 0 and r["terms"]["trip_inh"] > 0
        _assert_close(r["grads"], one["grads"], "gradient")
        _assert_close(r["params"], one["params"], "parameter")
    assert all(torch.equal(got[0]["params"][k], got[1]["params"][k]) for k in one["params"])
    assert sum(float(g.abs().sum()) for g in one["grads"].values()) > 0

    # without gathering each rank's loss is that of its own batch; DDP averages the gradients
    local = [r["local"] for r in ranks]
    alone = [_step(tiny_root, False, D.World(r, 2)) for r in range(2)]  # a rank's batch, one process
    for r in range(2):
        assert local[r]["videos"] == alone[r]["videos"]
        assert local[r]["terms"] == pytest.approx(alone[r]["terms"], rel=1e-5, abs=1e-6)
    mean = {k: (alone[0]["grads"][k] + alone[1]["grads"][k]) / 2 for k in alone[0]["grads"]}
    for r in range(2):
        _assert_close(local[r]["grads"], mean, "averaged gradient")
    assert not torch.allclose(mean["branches.inheritance.video.out.weight"],
                              one["grads"]["branches.inheritance.video.out.weight"])


# ------------------------------------------------------------------------------ sharded evaluation

EVAL_CASES = [(5, 5, 0.7), (7, 4, 0.7), (4, 3, 1.0), (256, 1024, 0.7)]  # batch, chunk, fusion: the last
# puts every video and query on rank 0 (rank 1 has nothing)


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("dist-eval"), "ev", seed=2, videos=60, test_fraction=0.5,
                          min_frames=6, max_frames=20, visual_dim=20, text_dim=12, teacher_dim=8)


# Scores of the same embeddings computed in other blocks differ by fp32 rounding (~1e-7 for these
# unit-norm dots); videos closer than this may rank either way (tests/kdcnet/ranking.py).
NEAR = 1e-5


@contextlib.contextmanager
def one_thread():
    """The thread count of the ranks (run_ranks, torchrun): the same batches then give the same
    embeddings by construction, whatever the machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _eval_setup(root, batch_size: int, chunk: int, fusion: float):
    cfg = tiny_train_config(root)
    cfg.data.collection, cfg.data.max_frames, cfg.data.max_tokens = "ev", 16, 12
    cfg.eval.batch_size, cfg.eval.video_chunk, cfg.model.fusion_weight = batch_size, chunk, fusion
    data = E.open_split(cfg, "test")
    cfg.model.visual_dim, cfg.model.text_dim = data.visual_dim, data.text_dim
    torch.manual_seed(0)
    return cfg, data, KDCNet(cfg).eval()


def _evaluate(root, batch_size: int, chunk: int, fusion: float):
    cfg, data, model = _eval_setup(root, batch_size, chunk, fusion)
    return E.evaluate(model, data, cfg, CPU, return_widths=True)


# (videos, queries) given NaN embeddings: video 23 lies in rank 1's shard (batches of 5), so rank
# 0 learns of it only through the ranks' exchange; queries 3 and 60 are encoded by different ranks.
NAN_CASES = [((23,), ()), ((), (3, 60))]


def _evaluate_nan(root, videos, queries):
    """The first EVAL_CASES evaluation with NaN embeddings; also the warnings it logged."""
    cfg, data, model = _eval_setup(root, *EVAL_CASES[0])
    poison_embeddings(model, videos, queries)
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("kdcnet")
    logger.addHandler(handler)
    try:
        return E.evaluate(model, data, cfg, CPU), messages
    finally:
        logger.removeHandler(handler)


def _full_scores(root, batch_size: int, chunk: int, fusion: float, videos=(), queries=()):
    """One process's per-branch [Nq, Nv] score matrices (one max_similarity call each), targets
    and M/V ratios."""
    cfg, data, model = _eval_setup(root, batch_size, chunk, fusion)
    poison_embeddings(model, videos, queries)
    frames, lengths, queries, _ = E.encode_collection(model, data, cfg, CPU)
    branch = {name: max_similarity(queries[name], frames[name], lengths) for name in BRANCHES}
    return branch, torch.as_tensor(data.cap_video), E.moment_ratios(data)


def _tied_corpus():
    """Sign-valued frames and queries (every score exact in fp32, so the same in any block or
    shard) with score ties: videos 3, 9 (same shard as 3), 14 and 20 (the other shard) are
    copies, and so are videos 0 and 22."""
    g = torch.Generator().manual_seed(5)
    nq, nv, L, d = 7, 23, 4, 16
    lengths = torch.randint(1, L + 1, (nv,), generator=g)
    frames = {name: testing.sign_valued(torch.randn(nv, L, d, generator=g)) for name in BRANCHES}
    for name in BRANCHES:
        for src, dst in ((3, 9), (3, 14), (3, 20), (0, 22)):
            frames[name][dst] = frames[name][src]
    lengths[[9, 14, 20]], lengths[22] = int(lengths[3]), int(lengths[0])
    queries = {name: testing.sign_valued(torch.randn(nq, d, generator=g)) for name in BRANCHES}
    queries["inheritance"][2] = frames["inheritance"][3, 0]  # a query whose best videos tie
    return queries, frames, lengths


def _tied_topk(k: int, batch_size: int = 4):
    """(fused top-k, inheritance top-k) of the tied corpus, each rank ranking its shard."""
    queries, frames, lengths = _tied_corpus()
    world = D.current()
    shard = D.batch_shard(len(lengths), batch_size, world.rank, world.size)
    mine = {name: f[shard.start:shard.stop] for name, f in frames.items()}
    nq, nv, own = len(queries["inheritance"]), len(lengths), lengths[shard.start:shard.stop]
    fused = sharded_topk(lambda kk: fused_topk(queries, mine, own, 0.7, kk, video_chunk=3), nq, nv, k, batch_size, CPU)
    inh = sharded_topk(lambda kk: max_similarity_topk(queries["inheritance"], mine["inheritance"], own, kk),
                       nq, nv, k, batch_size, CPU)
    return fused, inh


def _eval_worker(rank, root, out):
    with D.session("cpu"):
        results = [_evaluate(root, *case) for case in EVAL_CASES]
        ties = [_tied_topk(k) for k in (5, 23)]
        nan = [_evaluate_nan(root, *case) for case in NAN_CASES]
        torch.save({"results": results, "ties": ties, "nan": nan}, out / f"eval{rank}.pt")


def test_sharded_evaluation_equals_one_process(eval_root, tmp_path):
    run_ranks(_eval_worker, eval_root, tmp_path)
    ranks = [torch.load(tmp_path / f"eval{r}.pt", weights_only=False) for r in range(2)]
    for case, *got in zip(EVAL_CASES, ranks[0]["results"], ranks[1]["results"]):
        with one_thread():
            want_metrics, want_widths = _evaluate(eval_root, *case)
            branch, targets, ratios = _full_scores(eval_root, *case)
        assert want_metrics["num_videos"] == 30
        assert_evaluation_within(want_metrics, branch, case[2], targets, NEAR, ratios)
        for metrics, widths in got:
            assert json.dumps(metrics) == json.dumps(got[0][0]), case  # every rank: the same result
            for key in ("num_queries", "num_videos", "chance_SumR", "nan_queries"):
                assert metrics[key] == want_metrics[key], (case, key)
            # equal to one process's recalls unless a score lies within rounding of the target's
            assert_evaluation_within(metrics, branch, case[2], targets, NEAR, ratios)
            # the same encoding batches on the same thread count: the same embeddings, bit for bit
            assert widths.keys() == want_widths.keys()
            assert all(torch.equal(widths[n], want_widths[n]) for n in want_widths), case

    queries, frames, lengths = _tied_corpus()  # exact scores: bit for bit
    for k, *got in zip((5, 23), ranks[0]["ties"], ranks[1]["ties"]):
        want_fused = fused_topk(queries, frames, lengths, 0.7, k, video_chunk=3)
        want_inh = max_similarity_topk(queries["inheritance"], frames["inheritance"], lengths, k)
        for fused, inh in got:
            assert torch.equal(fused[1], want_fused[1]) and torch.equal(fused[0], want_fused[0])
            assert torch.equal(inh[1], want_inh[1]) and torch.equal(inh[0], want_inh[0])
    # the ties are there, and go to the lower global index
    row = want_inh[1][2].tolist()
    assert row[:4] == [3, 9, 14, 20]

    # NaN embeddings: NaN ranks last on every rank; rank 0 alone warns, with the global count
    for (videos, queries), (got0, said0), (got1, said1) in zip(NAN_CASES, ranks[0]["nan"], ranks[1]["nan"]):
        with one_thread():
            one, said = _evaluate_nan(eval_root, videos, queries)
            branch, targets, ratios = _full_scores(eval_root, *EVAL_CASES[0], videos=videos, queries=queries)
        nq = one["num_queries"]
        affected = nq if videos else len(queries)
        assert got0["nan_queries"] == got1["nan_queries"] == one["nan_queries"] == affected
        assert said0 == said and len(said) == 1 and f"{affected} of {nq} queries have NaN scores" in said[0]
        assert said1 == []
        assert json.dumps(got0) == json.dumps(got1)
        assert_evaluation_within(got0, branch, EVAL_CASES[0][2], targets, NEAR, ratios)


# ------------------------------------------------------------------------------ a whole training run


def _deterministic_config(root, batch_size: int):
    """Dropout 0 and the hardest negative from the first epoch (no random draws): N gathered ranks
    of batch b train exactly like one process of batch N * b."""
    cfg = tiny_train_config(root, epochs=2, batch_size=batch_size, gather=True)
    cfg.model.dropout, cfg.loss.hard_negatives, cfg.loss.hard_negative_start_epoch = 0.0, 1, 0
    return cfg


def _gathered_run_worker(rank, root, run):
    with D.session("cpu"):
        trainer.train(_deterministic_config(root, 2), run, progress=False, console=False)


def test_gathered_run_tracks_one_process_with_the_global_batch(tiny_root, tmp_path):
    run_ranks(_gathered_run_worker, tiny_root, tmp_path / "two")
    trainer.train(_deterministic_config(tiny_root, 4), tmp_path / "one", progress=False, console=False)
    two, one = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                for name in ("two", "one"))
    assert len(two) == len(one) == 2
    for a, b in zip(two, one):
        assert a["step"] == b["step"] and a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        for key in b:
            if key.startswith("loss/"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert (json.loads((tmp_path / "two" / "test_metrics.json").read_text())["SumR"]
            == pytest.approx(json.loads((tmp_path / "one" / "test_metrics.json").read_text())["SumR"]))


# ------------------------------------------------------------------------------------- resume on 1


class Interrupt(Exception):
    pass


def _stop_after_first_epoch(epoch, record):
    if epoch == 0:
        raise Interrupt


def _interrupted_worker(rank, root, run):
    with D.session("cpu"):
        try:
            trainer.train(tiny_train_config(root, epochs=3, gather=True), run, progress=False, console=False,
                          on_epoch_end=_stop_after_first_epoch)
        except Interrupt:
            pass


def test_two_rank_run_resumes_on_one_rank(tiny_root, tmp_path):
    run = tmp_path / "run"
    run_ranks(_interrupted_worker, tiny_root, run)
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in first] == [0] and first[0]["step"] == 2  # 6 videos, 2 ranks x 2: 2 steps
    assert not (run / "test_metrics.json").exists()
    assert "2 processes" in (run / "train.log").read_text()

    result = trainer.train(trainer.resume_config(run), run, resume=True, progress=False, console=False)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[0] == first[0]
    assert [h["step"] for h in history] == [2, 5, 8]  # then 3 steps per epoch on one process
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule ended where it should
    assert (run / "test_metrics.json").is_file() and math.isfinite(result["SumR"])


# ------------------------------------------------------------------------------------ torchrun CLI


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "kdcnet", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _checkpoint_scores(run, split: str, checkpoint: str):
    """Per-branch [Nq, Nv] scores of a run's checkpoint on a split (one process), the fusion
    weight, targets and M/V ratios."""
    cfg = trainer.resume_config(run)
    ckpt = RunDir(run).load_checkpoint(f"{checkpoint}.pt", need=("model",))
    model = KDCNet(cfg)
    trainer.load_weights(model, ckpt["model"], RunDir(run) / f"{checkpoint}.pt")
    data = E.open_split(cfg, split)
    frames, lengths, queries, _ = E.encode_collection(model, data, cfg, CPU)
    branch = {name: max_similarity(queries[name], frames[name], lengths) for name in BRANCHES}
    return branch, cfg.model.fusion_weight, torch.as_tensor(data.cap_video), E.moment_ratios(data)


def _assert_same_evaluation(run, split: str, checkpoint: str, sharded: dict, one: dict):
    """torchrun's sharded metrics against one process's: the same counts and window widths (the
    same batches, and this process ran on one thread like the ranks), recalls equal up to the
    rounding of near-tied scores."""
    for key in ("num_queries", "num_videos", "chance_SumR", "nan_queries", "window_widths"):
        assert sharded[key] == one[key], key
    branch, weight, targets, ratios = _checkpoint_scores(run, split, checkpoint)
    for result in (sharded, one):
        assert_evaluation_within(result, branch, weight, targets, NEAR, ratios)


def test_torchrun_train_and_eval_match_one_process(tiny_root, tmp_path):
    run = tmp_path / "run"
    done = _torchrun("train", "--data-root", str(tiny_root), "--collection", NAME, "--epochs", "1", "--batch-size", "2",
                     "--device", "cpu", "--gather", "--run-dir", str(run), *TINY_SETS)
    assert done.stdout.count("chance (random ranking)") == 1 and done.stdout.count("run folder:") == 1  # rank 0 only
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((run / "config.json").read_text())["train"]["gather"] is True
    sharded = json.loads((run / "test_metrics.json").read_text())
    with one_thread():
        assert cli.main(["eval", "--run", str(run)]) == 0  # one process evaluates the same checkpoint
    _assert_same_evaluation(run, "test", "best", sharded, json.loads((run / "test_metrics.json").read_text()))

    _torchrun("eval", "--run-dir", str(run), "--split", "val", "--checkpoint", "last")  # torchrun takes --run itself
    sharded = json.loads((run / "val_metrics.json").read_text())
    with one_thread():
        assert cli.main(["eval", "--run", str(run), "--split", "val", "--checkpoint", "last"]) == 0
    _assert_same_evaluation(run, "val", "last", sharded, json.loads((run / "val_metrics.json").read_text()))
