"""kdcnet.synthetic: determinism, atomic writes, options, the default cache, the CLI, learnability."""

import argparse
import hashlib
import json

import numpy as np
import pytest
import torch

import kdc_kernels as K
from kdcnet import synthetic
from kdcnet.data import PRVRCollection, query_batches, video_batches
from kdcnet.synthetic import (MARKER, SyntheticConfig, add_make_synthetic_parser, default_synthetic_root,
                              ensure_default_synthetic, make_synthetic, run_make_synthetic, unseen_path)

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


# --------------------------------------------------------------------------- the unseen-events variant

UNSEEN = dict(TINY, videos=24, unseen_fraction=0.5, unseen_words=6)


@pytest.fixture(scope="module")
def unseen_root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("unseen"), "u", seed=5, **UNSEEN)


def _caption_words(root, split):
    return {line.split(" ", 1)[0]: set(line.split()[1:])
            for line in (root / "u" / "TextData" / f"u{split}.caption.txt").read_text().splitlines()}


def test_unseen_events_never_occur_in_train_or_val_captions(unseen_root):
    info = json.loads((unseen_root / "u" / MARKER).read_text())
    unseen_words = set(info["unseen_words"])
    assert len(unseen_words) == 6
    for split in ("train", "val"):
        assert unseen_path(unseen_root, "u", split).read_text() == ""     # written, and empty
        assert info["splits"][split]["unseen_captions"] == 0
        assert all(not words & unseen_words for words in _caption_words(unseen_root, split).values())
    test = _caption_words(unseen_root, "test")
    marked = set(unseen_path(unseen_root, "u", "test").read_text().split())
    assert 0 < len(marked) < len(test) and info["splits"]["test"]["unseen_captions"] == len(marked)
    vocabulary = {w for words in test.values() for w in words} - set(synthetic._FILLER_WORDS)
    for cap, words in test.items():          # an unseen event is spelled with unseen words only
        concept = words & vocabulary
        assert (concept <= unseen_words) if cap in marked else not concept & unseen_words, (cap, concept)


def test_unseen_option_off_writes_no_ground_truth(tiny_root):
    info = json.loads((tiny_root / NAME / MARKER).read_text())
    assert "unseen_words" not in info and info["config"]["unseen_fraction"] == 0.0
    assert not unseen_path(tiny_root, NAME, "test").exists()


@pytest.mark.parametrize("options, message", [
    (dict(unseen_fraction=1.5), "unseen_fraction must be in [0, 1]"),
    (dict(unseen_fraction=0.3, unseen_words=62), "unseen_words must be between phrase_len (3) and vocab_size"),
    (dict(unseen_fraction=0.3, unseen_words=2), "unseen_words must be between"),
])
def test_bad_unseen_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[")
                       .replace("]", "\\]")):
        make_synthetic(tmp_path, "c", **options)


def test_the_teacher_knows_the_unseen_events(tmp_path):
    """Unseen words lie in the teacher's subspace: zero-shot, it finds their videos at least as
    well as the others' (the student never saw a caption with them)."""
    root = make_synthetic(tmp_path, "s", seed=0, videos=240, unseen_fraction=0.5)
    data, vb, qb = _test_split(root)
    marked = set(unseen_path(root, "s", "test").read_text().split())
    unseen = torch.tensor([c in marked for c in data.cap_ids])
    _, top = K.max_similarity_topk(qb.teacher_queries, vb.teacher_videos, vb.video_lengths, k=len(data.video_ids))
    rank = (top == qb.query_video[:, None]).float().argmax(1) + 1
    r1 = {name: float((rank[keep] == 1).float().mean()) * 100 for name, keep in (("unseen", unseen), ("seen", ~unseen))}
    assert r1["unseen"] > 10 * 100 / len(data.video_ids) and r1["unseen"] >= r1["seen"] - 5, r1


def test_unseen_report_matches_the_evaluator(unseen_root, tmp_path, capsys):
    """The 'all' rows of the unseen/seen report are the evaluator's test metrics; the subsets add up."""
    from kdcnet import config as C
    from kdcnet import trainer

    from .conftest import TINY_READ

    cfg = C.preset("synthetic")
    cfg.data.root, cfg.data.collection = str(unseen_root), "u"
    cfg.data.max_frames, cfg.data.max_tokens = TINY_READ["max_frames"], TINY_READ["max_tokens"]
    cfg.model.d, cfg.model.heads, cfg.train.epochs, cfg.train.batch_size, cfg.train.plots = 16, 2, 1, 4, False
    result = trainer.train(cfg, tmp_path / "run", progress=False, console=False)
    rows = {(r["scorer"], r["captions"]): r for r in synthetic.unseen_report(tmp_path / "run")}
    assert rows["KDC-Net", "all"]["SumR"] == pytest.approx(result["SumR"], abs=1e-9)
    for name in ("inheritance", "exploration"):
        assert rows[f"{name} branch", "all"]["R@1"] == pytest.approx(result["branches"][name]["R@1"], abs=1e-9)
    n_unseen, n_seen = rows["KDC-Net", "unseen"]["queries"], rows["KDC-Net", "seen"]["queries"]
    assert n_unseen + n_seen == result["num_queries"] and n_unseen > 0
    r1 = (n_unseen * rows["KDC-Net", "unseen"]["R@1"] + n_seen * rows["KDC-Net", "seen"]["R@1"]) / result["num_queries"]
    assert r1 == pytest.approx(result["R@1"], abs=1e-9)
    assert synthetic._report_main(["unseen", str(tmp_path / "run")]) == 0
    assert "teacher (zero-shot)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unseen.txt is missing"):
        synthetic.unseen_report(_trained_without_unseen(tmp_path))


def _trained_without_unseen(tmp_path):
    """A run folder whose collection was made without unseen events (only its config is read)."""
    from kdcnet import config as C

    root = make_synthetic(tmp_path / "plain", NAME, seed=3, **TINY)
    run = tmp_path / "plain-run"
    run.mkdir()
    cfg = C.preset("synthetic")
    cfg.data.root, cfg.data.collection = str(root), NAME
    C.save(cfg, run / "config.json")
    return run


def test_teacher_report_window_one_is_the_plain_teacher(tiny_root, capsys):
    rows = synthetic.teacher_report(tiny_root, NAME, "test", (1, 3), max_frames=16)
    data = PRVRCollection(tiny_root, NAME, "test", max_frames=16)
    vb, qb = next(video_batches(data, 10 ** 6)), next(query_batches(data, 10 ** 6))
    from kdcnet import metrics as M

    plain = M.retrieval_metrics(K.max_similarity(qb.teacher_queries, vb.teacher_videos, vb.video_lengths),
                                qb.query_video)
    assert rows[0]["krd_window"] == 1 and rows[0]["SumR"] == pytest.approx(plain["SumR"])
    assert 0 < rows[0]["target % in moment"] <= 100 and rows[1]["krd_window"] == 3
    assert synthetic._report_main(["teacher", "--data-root", str(tiny_root), "--collection", NAME,
                                   "--max-frames", "16", "--windows", "1", "3"]) == 0
    assert "target % in moment" in capsys.readouterr().out
