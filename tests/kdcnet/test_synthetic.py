"""kdcnet.synthetic: determinism, atomic writes, options, the default cache, the CLI, learnability."""

import argparse
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import kdc_kernels as K
from kdcnet import synthetic
from kdcnet.data import PRVRCollection, query_batches, video_batches
from kdcnet.synthetic import (MARKER, SyntheticConfig, add_make_synthetic_parser, default_synthetic_root,
                              ensure_default_synthetic, make_synthetic, run_make_synthetic)

from .conftest import NAME, TINY


def _hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tiny_root, tmp_path):
    again = make_synthetic(tmp_path, NAME, seed=3, **TINY)
    first, second = _hashes(tiny_root / NAME), _hashes(again / NAME)
    assert first == second
    assert {"FeatureData/synthetic_visual/feature.bin", f"TextData/roberta_{NAME}_query_feat.hdf5",
            f"TextData/clip_ViT_B_32_{NAME}_query_feat.hdf5", f"FeatureData/new_clip_vit_32_{NAME}_vid_features.hdf5",
            f"TextData/{NAME}test.moments.txt", MARKER} <= set(first)


def test_different_seed_differs(tiny_root, tmp_path):
    other = _hashes(make_synthetic(tmp_path, NAME, seed=4, **TINY) / NAME)
    mine = _hashes(tiny_root / NAME)
    assert set(other) == set(mine)
    differ = {k for k in mine if mine[k] != other[k]}
    assert {"FeatureData/synthetic_visual/feature.bin", f"TextData/roberta_{NAME}_query_feat.hdf5",
            f"TextData/{NAME}train.caption.txt"} <= differ


def test_sizes_and_marker(tiny_root):
    info = json.loads((tiny_root / NAME / MARKER).read_text())
    assert info["splits"] == {s: {"videos": v, "captions": info["splits"][s]["captions"]}
                              for s, v in (("train", 6), ("val", 3), ("test", 3))}
    assert info["seed"] == 3 and info["config"]["visual_dim"] == 24
    counts = {s: len(PRVRCollection(tiny_root, NAME, s).cap_ids) for s in ("train", "val", "test")}
    assert counts == {s: info["splits"][s]["captions"] for s in counts}
    assert SyntheticConfig().split_sizes() == (600, 150, 150)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write(path, items):
        calls.append(path)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(synthetic, "write_hdf5", failing_write)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(tmp_path, "c", seed=0, **TINY)
    assert calls and list(tmp_path.iterdir()) == []


def test_existing_collection_needs_overwrite(tmp_path):
    make_synthetic(tmp_path, "c", seed=0, **TINY)
    with pytest.raises(FileExistsError, match="already exists"):
        make_synthetic(tmp_path, "c", seed=1, **TINY)
    before = _hashes(tmp_path / "c")
    make_synthetic(tmp_path, "c", seed=1, overwrite=True, **TINY)
    assert _hashes(tmp_path / "c") != before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


@pytest.mark.parametrize("options, message", [
    (dict(videos=2), "videos must be large enough"),
    (dict(min_frames=0), "min_frames must be >= 1"),
    (dict(max_frames=5, min_frames=6), "max_frames must be >= min_frames (6)"),
    (dict(max_captions=1), "max_captions must be >= min_captions (2)"),
    (dict(role_mix=1.5), "role_mix must be in [0, 1]"),
    (dict(teacher_coverage=0.0), "teacher_coverage must be in (0, 1]"),
    (dict(ratio_alpha=0.0), "ratio_alpha must be > 0"),
    (dict(frame_noise=-1.0), "frame_noise must be >= 0"),
    (dict(visual_dim=2.5), "visual_dim must be an int"),
    (dict(val_fraction=1.0), "val_fraction must be in (0, 1)"),
])
def test_bad_options(tmp_path, options, message):
    with pytest.raises(ValueError) as e:
        make_synthetic(tmp_path, "c", **options)
    assert message in str(e.value)


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="unknown options \\['frames'\\]"):
        make_synthetic(tmp_path, "c", frames=3)
    with pytest.raises(ValueError, match="collection must be a plain folder name"):
        make_synthetic(tmp_path, "a/b")
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        make_synthetic(tmp_path, "c", seed=-1)


def test_default_root_and_ensure(tmp_path, monkeypatch):
    monkeypatch.setenv("KDC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "DEFAULT_OPTIONS", TINY)
    root = default_synthetic_root()
    assert root == tmp_path / "cache" / f"synthetic-v{synthetic.SYNTHETIC_VERSION}"
    assert ensure_default_synthetic() == (root, "synthetic")
    marker = root / "synthetic" / MARKER
    stamp = marker.stat().st_mtime_ns
    assert ensure_default_synthetic() == (root, "synthetic") and marker.stat().st_mtime_ns == stamp   # not regenerated
    marker.unlink()                                   # a folder without its marker is not trusted
    ensure_default_synthetic()
    assert marker.is_file() and len(PRVRCollection(root, "synthetic", "train").video_ids) == 6
    info = json.loads(marker.read_text())
    info["config"]["frame_noise"] = 0.123              # made by other generator settings: regenerated
    marker.write_text(json.dumps(info))
    ensure_default_synthetic()
    assert json.loads(marker.read_text())["config"]["frame_noise"] == SyntheticConfig().frame_noise
    assert [p.name for p in root.iterdir()] == ["synthetic"]
    monkeypatch.delenv("KDC_CACHE_DIR")
    assert default_synthetic_root().parent == default_synthetic_root().home() / ".cache" / "kdcnet"


def _parser():
    parser = argparse.ArgumentParser(prog="kdcnet")
    add_make_synthetic_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_writes_a_collection(tmp_path, capsys):
    argv = ["make-synthetic", "--out", str(tmp_path), "--collection", "cli", "--seed", "3"]
    for key, value in TINY.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    args = _parser().parse_args(argv)
    assert run_make_synthetic(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cli") in out and "train 6 videos" in out
    data = PRVRCollection(tmp_path, "cli", "val")
    assert (data.visual_dim, data.text_dim, data.teacher_dim) == (24, 16, 8)


def test_cli_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["make-synthetic", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ["out", "collection", "seed", "force"] + [f.replace("_", "-") for f in SyntheticConfig.__dataclass_fields__]:
        assert f"--{name}" in text
    assert text.count("(default:") >= len(SyntheticConfig.__dataclass_fields__) + 3


@pytest.mark.parametrize("argv", [["--videos", "many"], ["--seed", "-1"], ["--role-mix", "x"]])
def test_cli_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["make-synthetic"] + argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


# --------------------------------------------------------------------------- learnability (no model)

@pytest.fixture(scope="module")
def small_default(tmp_path_factory):
    """The default generator settings with fewer videos (40 test videos)."""
    return make_synthetic(tmp_path_factory.mktemp("small"), "s", seed=0, videos=240)


def _recalls(queries, clips, lengths, targets):
    _, top = K.max_similarity_topk(queries, clips, lengths, k=clips.shape[0])
    rank = (top == targets[:, None]).float().argmax(1) + 1
    return {k: (rank <= k).float().mean().item() * 100 for k in (1, 5, 10)}


def _test_split(root):
    data = PRVRCollection(root, "s", "test")
    return data, next(video_batches(data, 10 ** 6)), next(query_batches(data, 10 ** 6))


def test_teacher_alone_retrieves_the_right_video(small_default):
    data, vb, qb = _test_split(small_default)
    chance = {k: 100 * k / len(data.video_ids) for k in (1, 5, 10)}
    got = _recalls(qb.teacher_queries, vb.teacher_videos, vb.video_lengths, qb.query_video)
    assert got[1] > 10 * chance[1] and got[5] > 4 * chance[5], (got, chance)
    # and it points at the captioned moment: the best teacher frame of the right video lies in it
    _, frame = K.max_similarity(qb.teacher_queries, vb.teacher_videos, vb.video_lengths, return_index=True)
    best = frame[torch.arange(len(qb.query_video)), qb.query_video].tolist()
    inside = [data.moments[c].start <= 1.5 * f + 0.75 <= data.moments[c].end for c, f in zip(data.cap_ids, best)]
    assert np.mean(inside) > 0.6


def test_student_features_are_linearly_learnable(small_default):
    """Ridge regression from mean-pooled tokens to the frames of the moment, fitted on train,
    retrieves test videos far above chance: the student's features carry the events."""
    def pairs(data):
        x = np.stack([data.query(j).mean(0) for j in range(len(data.cap_ids))])
        y = np.stack([data.video(data.cap_video[j])[round(m.start / 1.5):round(m.end / 1.5)].mean(0)
                      for j, m in enumerate(data.moments[c] for c in data.cap_ids)])
        return x, y

    x, y = pairs(PRVRCollection(small_default, "s", "train"))
    mean = x.mean(0)
    w = np.linalg.solve((x - mean).T @ (x - mean) + np.eye(x.shape[1]), (x - mean).T @ y)
    data, vb, qb = _test_split(small_default)
    xt, _ = pairs(data)
    got = _recalls(torch.from_numpy(((xt - mean) @ w).astype(np.float32)), vb.videos, vb.video_lengths, qb.query_video)
    chance = 100 / len(data.video_ids)
    assert got[1] > 8 * chance, got


def test_moment_ratios_follow_the_chosen_distribution(small_default):
    cfg = SyntheticConfig()
    ratios = np.array([m.ratio for s in ("train", "val", "test")
                       for m in PRVRCollection(small_default, "s", s).moments.values()])
    assert abs(ratios.mean() - cfg.ratio_alpha / (cfg.ratio_alpha + cfg.ratio_beta)) < 0.03
    counts = np.histogram(ratios, bins=[0, 0.2, 0.4, 0.6, 0.8, 1.0])[0]
    assert (counts > 0).all() and counts[0] > counts[-1], counts
