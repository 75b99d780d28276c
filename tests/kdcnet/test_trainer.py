"""Training end to end on small synthetic collections: the run folder, resume equality after an
interruption, and a short run that learns."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from kdcnet import config as C
from kdcnet import trainer
from kdcnet.synthetic import make_synthetic

from .conftest import NAME, TINY_READ

VOLATILE = ("seconds", "steps_per_s")


def tiny_train_config(root, plots=False, **train) -> C.Config:
    cfg = C.preset("synthetic")
    cfg.data.root, cfg.data.collection = str(root), NAME
    cfg.data.max_frames, cfg.data.max_tokens = TINY_READ["max_frames"], TINY_READ["max_tokens"]
    cfg.model.d, cfg.model.heads, cfg.model.dropout = 16, 2, 0.1
    cfg.train.epochs, cfg.train.batch_size, cfg.train.device, cfg.train.warmup = 2, 2, "cpu", 0.3
    cfg.eval.video_chunk = 2
    cfg.train.plots = plots
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return C.validate(cfg)


def _history(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _params(run_dir, name="last.pt"):
    return torch.load(run_dir / name, map_location="cpu", weights_only=False)["model"]


def test_run_folder_contents(tiny_root, tmp_path):
    run = tmp_path / "run"
    result = trainer.train(tiny_train_config(tiny_root, plots=True), run, progress=False, console=False)
    for name in ("config.json", "git_commit.txt", "environment.txt", "train.log", "metrics.jsonl", "last.pt",
                 "best.pt", "test_metrics.json", "curves.png", "test_mv_bins.png", "test_window_widths.png"):
        assert (run / name).is_file(), name
    assert "kdc_kernels" in (run / "environment.txt").read_text()
    if importlib.util.find_spec("tensorboard") is not None:
        assert list(run.glob("events.out.tfevents.*")), "tensorboard is installed: the run must write events"
    else:
        assert not list(run.glob("events.out.tfevents.*"))
    saved = C.load(run / "config.json")
    assert (saved.model.visual_dim, saved.model.text_dim) == (24, 16)  # read from the data
    assert (saved.data.root, saved.data.collection, saved.data.visual_feature) == (
        str(tiny_root.resolve()), NAME, "synthetic_visual")  # the data actually used
    history = _history(run)
    assert [h["epoch"] for h in history] == [0, 1]
    for key in ("loss/total", "loss/trip_inh", "loss/nce_inh", "loss/trip_exp", "loss/nce_exp", "loss/kl_seg",
                "loss/kl_obj", "val/R@1", "val/R@5", "val/R@10", "val/R@100", "val/SumR", "lr", "kd_weight"):
        assert all(isinstance(h[key], float) and math.isfinite(h[key]) for h in history), key
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "scheduler", "state", "rng", "config"} <= set(ckpt)
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"])
    assert ckpt["state"]["epoch"] == 1 and ckpt["state"]["step"] == 2 * 3  # 6 train videos, batches of 2
    saved_json = json.loads((run / "test_metrics.json").read_text())
    assert {"R@1", "R@5", "R@10", "R@100", "SumR", "num_queries", "num_videos", "chance_SumR", "mv_bins",
            "branches"} <= set(saved_json)
    assert saved_json["SumR"] == pytest.approx(result["SumR"]) and saved_json["num_videos"] == 3
    assert [row["bin"] for row in saved_json["mv_bins"]] == ["(0,0.2]", "(0.2,0.4]", "(0.4,0.6]", "(0.6,0.8]", "(0.8,1]"]
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    with pytest.raises(ValueError, match="already holds a run"):
        trainer.train(tiny_train_config(tiny_root), run, progress=False, console=False)


class Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_root, tmp_path):
    straight = tmp_path / "straight"
    want = trainer.train(tiny_train_config(tiny_root, epochs=3), straight, progress=False, console=False)

    def stop_after_first_epoch(epoch, record):
        if epoch == 0:
            raise Interrupt

    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        trainer.train(tiny_train_config(tiny_root, epochs=3), cut, progress=False, console=False,
                      on_epoch_end=stop_after_first_epoch)
    assert len(_history(cut)) == 1 and not (cut / "test_metrics.json").exists()
    got = trainer.train(trainer.resume_config(cut), cut, resume=True, progress=False, console=False)
    assert _history(cut) == _history(straight)
    assert got["SumR"] == want["SumR"]
    assert (cut / "test_metrics.json").read_text() == (straight / "test_metrics.json").read_text()
    for name in ("last.pt", "best.pt"):
        a, b = _params(straight, name), _params(cut, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(ValueError, match="no last.pt checkpoint"):
        trainer.train(trainer.resume_config(cut), tmp_path / "nothing", resume=True, console=False)


def test_early_stopping(tiny_root, tmp_path):
    cfg = tiny_train_config(tiny_root, epochs=30, early_stop=1, lr=1e-9, warmup=0.0)
    trainer.train(cfg, tmp_path / "run", progress=False, console=False)
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)["state"]
    assert state["stopped"] and state["epoch"] < 29 and state["bad_epochs"] == 1
    assert len(_history(tmp_path / "run")) == state["epoch"] + 1


@pytest.fixture(scope="module")
def learnable_root(tmp_path_factory):
    """400 short videos (240 train, 80 val, 80 test) of the default generator."""
    return make_synthetic(tmp_path_factory.mktemp("learn"), "learn", seed=1, videos=400, min_frames=16,
                          max_frames=32, max_captions=3, val_fraction=0.2, test_fraction=0.2)


def test_short_training_run_learns(learnable_root, tmp_path):
    cfg = C.preset("synthetic")
    cfg.data.root, cfg.data.collection, cfg.data.max_frames = str(learnable_root), "learn", 32
    cfg.model.d, cfg.model.dropout = 64, 0.0
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.device = 12, 32, 2e-3, "cpu"
    cfg.train.plots = False
    cfg.train.threads = 1  # robust speed on a shared CPU (spinning OpenMP threads; the CLI makes them sleep)
    result = trainer.train(C.validate(cfg), tmp_path / "run", progress=False, console=False)
    losses = [h["loss/total"] for h in _history(tmp_path / "run")]
    assert losses[-1] < 0.5 * losses[0], losses
    # 80 test videos: chance SumR = 120; a model that learned nothing stays within a few points
    assert result["SumR"] > result["chance_SumR"] + 25, (result["SumR"], result["chance_SumR"])


def test_killed_process_resumes_to_the_same_result(tiny_root, tmp_path):
    """SIGKILL a training process once its first checkpoint exists, resume in a new process, and
    compare with an uninterrupted run: same per-epoch metrics, test metrics and parameters."""
    import os
    import signal
    import subprocess
    import sys
    import time

    epochs = 4
    straight = tmp_path / "straight"
    trainer.train(tiny_train_config(tiny_root, epochs=epochs), straight, progress=False, console=False)
    cut = tmp_path / "cut"
    argv = [sys.executable, "-m", "kdcnet", "train", "--data-root", str(tiny_root), "--collection", NAME,
            "--epochs", str(epochs), "--batch-size", "2", "--device", "cpu", "--run-dir", str(cut),
            "--set", f"data.max_frames={TINY_READ['max_frames']}", "--set", f"data.max_tokens={TINY_READ['max_tokens']}",
            "--set", "model.d=16", "--set", "model.heads=2", "--set", "model.dropout=0.1", "--set", "train.warmup=0.3",
            "--set", "eval.video_chunk=2", "--set", "train.plots=false"]
    # the children run on this process's thread count: bit-identical results are promised for the
    # same machine and thread count (a BLAS may split and round work differently on other counts)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while not (cut / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert C.load(cut / "config.json") == C.load(straight / "config.json")
    resumed = subprocess.run([sys.executable, "-m", "kdcnet", "train", "--resume", str(cut)], capture_output=True,
                             text=True, timeout=120, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert _history(cut) == _history(straight)
    assert (cut / "test_metrics.json").read_text() == (straight / "test_metrics.json").read_text()
    a, b = _params(straight), _params(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
