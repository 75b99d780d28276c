"""kdcnet.data: round trip against independently computed values, every malformed-input error, batching."""

import ast
import json
import multiprocessing
import pickle
import re

import h5py
import numpy as np
import pytest
import torch

from kdcnet.data import (DataError, Moment, PRVRCollection, num_train_batches, parse_video2frames, query_batches,
                         train_batches, video_batches)
from kdcnet.synthetic import VISUAL_FEATURE

from .conftest import NAME, TINY_READ


def _open(root, split="train", **kw):
    return PRVRCollection(root, NAME, split, **{**TINY_READ, **kw})


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _raw_videos(base):
    """video id -> raw frames [n, Dv] (float64), read straight from the BigFile files."""
    folder = base / "FeatureData" / VISUAL_FEATURE
    n, d = map(int, (folder / "shape.txt").read_text().split())
    feats = np.fromfile(folder / "feature.bin", dtype="<f4").reshape(n, d).astype(np.float64)
    row = {f: r for r, f in enumerate((folder / "id.txt").read_text().split())}
    v2f = ast.literal_eval((folder / "video2frames.txt").read_text())     # our own trusted test file
    return {v: feats[[row[f] for f in frames]] for v, frames in v2f.items()}


def _bins(n, max_frames):
    m = min(n, max_frames)
    return [(k * n // m, (k + 1) * n // m) for k in range(m)]


def _overlapping(a, b, n, n_t):
    """Teacher frames whose span [i/n_t, (i+1)/n_t) overlaps the student span [a/n, b/n)."""
    return [i for i in range(n_t) if i * n < b * n_t and (i + 1) * n > a * n_t]


# --------------------------------------------------------------------------- round trip

def test_round_trip_values(tiny_root):
    base = tiny_root / NAME
    raw = _raw_videos(base)
    text = h5py.File(base / "TextData" / f"roberta_{NAME}_query_feat.hdf5", "r")
    tq = h5py.File(base / "TextData" / f"clip_ViT_B_32_{NAME}_query_feat.hdf5", "r")
    tv = h5py.File(base / "FeatureData" / f"new_clip_vit_32_{NAME}_vid_features.hdf5", "r")
    binned = truncated = regridded = 0
    for split in ("train", "val", "test"):
        data = _open(tiny_root, split)
        lines = (base / "TextData" / f"{NAME}{split}.caption.txt").read_text().splitlines()
        assert data.cap_ids == [line.split(" ", 1)[0] for line in lines]
        assert data.video_ids == sorted({c.split("#")[0] for c in data.cap_ids})
        assert (data.visual_dim, data.text_dim, data.teacher_dim) == (24, 16, 8) and data.has_teacher
        for i, vid in enumerate(data.video_ids):
            x, t = raw[vid], tv[vid][()].astype(np.float64)
            bins = _bins(len(x), 16)
            want = _unit(np.stack([x[a:b].mean(0) for a, b in bins]))
            got = data.video(i)
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=1e-6)
            want_t = _unit(np.stack([t[_overlapping(a, b, len(x), len(t))].mean(0) for a, b in bins]))
            np.testing.assert_allclose(data.teacher_video(i), want_t, atol=1e-6)
            binned += len(x) > 16
            regridded += len(t) != len(x)
            assert [data.cap_ids[j].split("#")[0] for j in data.video_caps[i]] == [vid] * len(data.video_caps[i])
        for j, cap in enumerate(data.cap_ids):
            tokens = text[cap][()].astype(np.float64)
            np.testing.assert_allclose(data.query(j), _unit(tokens[:8]), atol=1e-6)
            truncated += len(tokens) > 8
            np.testing.assert_allclose(data.teacher_query(j), _unit(tq[cap][()].reshape(-1)), atol=1e-6)
            assert data.captions[cap] == lines[j].split(" ", 1)[1]
            assert data.video_ids[data.cap_video[j]] == cap.split("#")[0]
    assert binned and truncated and regridded, "the tiny collection must exercise bin-averaging, truncation and the teacher grid"


def test_bins_and_grid_rules():
    from kdcnet.data import bin_average, resample_to_grid
    x = np.arange(10, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(bin_average(x, 4)[:, 0], [0.5, 3, 5.5, 8])      # bins [0,2) [2,5) [5,7) [7,10)
    np.testing.assert_array_equal(bin_average(x, 10), x)                        # n <= max_frames: kept
    np.testing.assert_array_equal(resample_to_grid(x, 10, 4), bin_average(x, 4))   # same count: same bins
    t = np.array([[0.0], [10.0]], dtype=np.float32)                             # 2 teacher frames, 4 student
    np.testing.assert_array_equal(resample_to_grid(t, 4, 8)[:, 0], [0, 0, 10, 10])
    t3 = np.array([[0.0], [3.0], [6.0]], dtype=np.float32)                      # 3 teacher frames, 2 student
    np.testing.assert_array_equal(resample_to_grid(t3, 2, 8)[:, 0], [1.5, 4.5])   # the middle frame straddles


def test_moments_parsed(tiny_root):
    data = _open(tiny_root, "test")
    lines = (tiny_root / NAME / "TextData" / f"{NAME}test.moments.txt").read_text().splitlines()
    assert set(data.moments) == set(data.cap_ids) and len(lines) == len(data.cap_ids)
    for line in lines:
        cap, s, e, d = line.split()
        m = data.moments[cap]
        assert m == Moment(float(s), float(e), float(d))
        assert 0 < m.ratio <= 1 and m.ratio == pytest.approx((float(e) - float(s)) / float(d))
        assert m.duration == pytest.approx(data.num_frames(data.cap_video[data.cap_ids.index(cap)]) * 1.5)


def test_no_moments_file_and_no_teacher(tiny_copy):
    (tiny_copy / NAME / "TextData" / f"{NAME}val.moments.txt").unlink()
    data = _open(tiny_copy, "val", teacher=False)
    assert data.moments == {} and not data.has_teacher and data.teacher_dim is None
    batch = next(train_batches(data, 2, seed=0, epoch=0))
    assert batch.teacher_videos is None and batch.teacher_queries is None
    with pytest.raises(RuntimeError, match="without teacher"):
        data.teacher_query(0)


# --------------------------------------------------------------------------- video2frames parser

def test_video2frames_parser_forms():
    one_line = "{'a': ['a_0', 'a_1'], \"b\": [\"b'0\"], 'c': [], u'd': [u'd\\x41',],}"
    assert parse_video2frames(one_line) == {"a": ["a_0", "a_1"], "b": ["b'0"], "c": [], "d": ["dA"]}
    many = "{\n  'a': [\n    'a_0',\n    'a_1'\n  ],\n  'b': ['b_0']\n}\n"
    assert parse_video2frames(many) == {"a": ["a_0", "a_1"], "b": ["b_0"]}
    assert parse_video2frames("  {}  ") == {}


def test_video2frames_parser_matches_python_on_awkward_ids():
    ids = ["plain_1", "with,comma", "with]bracket", "it's", 'say "hi"', "back\\slash", "tab\tin", "", "ü-ñ", " spaced "]
    rng = np.random.default_rng(0)
    v2f = {f"v{i}{ids[i % len(ids)]}": [ids[k] for k in rng.integers(0, len(ids), size=int(rng.integers(0, 6)))]
           for i in range(40)}
    v2f["clean"] = ["clean_0", "clean_1"]
    assert parse_video2frames(repr(v2f)) == v2f
    assert parse_video2frames(json.dumps(v2f, indent=1)) == v2f


@pytest.mark.parametrize("text, line, what", [
    ("{'a': ['a_0'],\n 'b': ['b_0'\n}", 2, "list of quoted frame ids for video 'b'"),
    ("{'a': ['a_0'],\n 'b' ['b_0']}", 2, "expected ':'"),
    ("{'a': ['a_0']\n 'b': ['b_0']}", 2, "expected ',' or '}' after the frames of video 'a'"),
    ("{'a': ['a_0'],\n\n __import__('os').system('echo hacked'): []}", 3, "quoted video id"),
    ("{'a': ['a_0'], 'a': ['a_1']}", 1, "duplicate video id 'a'"),
    ("['a', 'b']", 1, "dict literal"),
    ("{'a': ['a_0']} extra", 1, "after the closing"),
    ("{'a': ['a_0'],", 1, "end of the file"),
])
def test_video2frames_parser_errors(text, line, what):
    with pytest.raises(DataError) as e:
        parse_video2frames(text, "v2f.txt")
    assert f"v2f.txt: line {line}:" in str(e.value) and what in str(e.value)


# --------------------------------------------------------------------------- malformed collections

def _bigfile(root):
    return root / NAME / "FeatureData" / VISUAL_FEATURE


def _text(root, name):
    return root / NAME / "TextData" / name


def _raises(root, *fragments, split="train", **kw):
    with pytest.raises(DataError) as e:
        _open(root, split, **kw)
    msg = str(e.value)
    for fragment in fragments:
        assert str(fragment) in msg, f"{fragment!r} not in {msg!r}"
    return msg


def test_missing_folders_and_files(tiny_copy, tmp_path):
    _raises(tmp_path / "nowhere", "nowhere", "folder missing", "TextData")
    _text(tiny_copy, f"{NAME}train.caption.txt").unlink()
    _raises(tiny_copy, f"{NAME}train.caption.txt", "caption file missing", f"{NAME}test.caption.txt")
    _raises(tiny_copy, "visual_features_x", "feature folder missing", VISUAL_FEATURE, split="val", visual_feature="visual_features_x")
    (_bigfile(tiny_copy) / "id.txt").unlink()
    _raises(tiny_copy, _bigfile(tiny_copy), "missing id.txt", "feature.bin, id.txt, shape.txt, video2frames.txt", split="val")


def test_missing_query_feature_file(tiny_copy):
    path = _text(tiny_copy, f"roberta_{NAME}_query_feat.hdf5")
    path.unlink()
    _raises(tiny_copy, path, "query feature file missing")


def test_several_bigfile_folders_need_a_choice(tiny_copy):
    import shutil
    shutil.copytree(_bigfile(tiny_copy), _bigfile(tiny_copy).parent / "other_feature")
    _raises(tiny_copy, "FeatureData", "cannot choose", "other_feature", VISUAL_FEATURE)
    assert _open(tiny_copy, visual_feature="other_feature").visual_feature == "other_feature"


@pytest.mark.parametrize("content", ["12\n", "12 x\n", "0 24\n", "1 2 3\n", ""])
def test_bad_shape_txt(tiny_copy, content):
    (_bigfile(tiny_copy) / "shape.txt").write_text(content)
    _raises(tiny_copy, _bigfile(tiny_copy) / "shape.txt", "line 1", "two positive integers")


def test_truncated_feature_bin(tiny_copy):
    path = _bigfile(tiny_copy) / "feature.bin"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 4)
    _raises(tiny_copy, path, f"size is {size - 4} bytes", "truncated")


def test_shape_txt_rows_disagree_with_feature_bin(tiny_copy):
    path = _bigfile(tiny_copy) / "shape.txt"
    n, d = map(int, path.read_text().split())
    path.write_text(f"{n + 1} {d}\n")
    _raises(tiny_copy, _bigfile(tiny_copy) / "feature.bin", f"shape.txt says {n + 1} x {d}")


def test_id_count_disagrees_with_shape_txt(tiny_copy):
    path = _bigfile(tiny_copy) / "id.txt"
    ids = path.read_text().split()
    path.write_text(" ".join(ids[:-1]))
    _raises(tiny_copy, path, f"holds {len(ids) - 1} frame ids", f"N = {len(ids)}")


def test_duplicate_frame_id(tiny_copy):
    path = _bigfile(tiny_copy) / "id.txt"
    ids = path.read_text().split()
    ids[5] = ids[2]
    path.write_text(" ".join(ids))
    _raises(tiny_copy, path, repr(ids[2]), "more than once")


def test_unparseable_video2frames_entry(tiny_copy):
    path = _bigfile(tiny_copy) / "video2frames.txt"
    lines = path.read_text().split("\n")
    lines[2] = lines[2].replace("]", "", 1)      # drop the closing bracket of the third entry
    path.write_text("\n".join(lines))
    _raises(tiny_copy, path, "line 3", "list of quoted frame ids")


def test_frame_id_not_in_id_txt(tiny_copy):
    data = _open(tiny_copy)
    vid = data.video_ids[1]
    path = _bigfile(tiny_copy) / "video2frames.txt"
    path.write_text(path.read_text().replace(f"'{vid}_3'", f"'{vid}_999'"))
    _raises(tiny_copy, path, f"video {vid!r}", f"'{vid}_999'", "id.txt")


def test_caption_video_without_features(tiny_copy):
    path = _text(tiny_copy, f"{NAME}train.caption.txt")
    path.write_text(path.read_text() + "ghost_video#enc#0 a person walks in\n")
    _raises(tiny_copy, "video2frames.txt", "'ghost_video'", "'ghost_video#enc#0'", "no features")


def test_video_listed_without_frames(tiny_copy):
    data = _open(tiny_copy)
    vid = data.video_ids[0]
    path = _bigfile(tiny_copy) / "video2frames.txt"
    path.write_text(re.sub(rf"'{vid}': \[[^\]]*\]", f"'{vid}': []", path.read_text()))
    _raises(tiny_copy, path, f"video {vid!r}", "lists no frames")


@pytest.mark.parametrize("line, what", [
    ("lonely_cap_id", "expected '<cap_id> <caption>'"),
    ("no_hash_here a caption", "not of the form <video_id>#enc#<k>"),
    ("#enc#0 a caption", "not of the form"),
])
def test_bad_caption_line(tiny_copy, line, what):
    path = _text(tiny_copy, f"{NAME}train.caption.txt")
    lines = path.read_text().splitlines()
    lines.insert(2, line)
    path.write_text("\n".join(lines) + "\n")
    _raises(tiny_copy, path, "line 3", what)


def test_duplicate_caption(tiny_copy):
    path = _text(tiny_copy, f"{NAME}train.caption.txt")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[0]]) + "\n")
    _raises(tiny_copy, path, f"line {len(lines) + 1}", "duplicate cap_id")


@pytest.mark.parametrize("fields, what", [
    ("1.0 2.0", "expected '<cap_id> <start_s> <end_s> <duration_s>'"),
    ("1.0 x 3.0", "must be numbers"),
    ("3.0 2.0 10.0", "start <= end"),
    ("0.0 2.0 0", "duration > 0"),
    ("0.0 nan 3.0", "finite"),
])
def test_bad_moments_line(tiny_copy, fields, what):
    path = _text(tiny_copy, f"{NAME}test.moments.txt")
    lines = path.read_text().splitlines()
    lines[1] = lines[1].split()[0] + " " + fields
    path.write_text("\n".join(lines) + "\n")
    _raises(tiny_copy, path, "line 2", what, split="test")


def test_missing_hdf5_keys(tiny_copy):
    with _open(tiny_copy) as data:
        pass
    cap, vid = data.cap_ids[3], data.video_ids[2]
    for name in (f"roberta_{NAME}_query_feat.hdf5", f"clip_ViT_B_32_{NAME}_query_feat.hdf5"):
        with h5py.File(_text(tiny_copy, name), "a") as f:
            del f[cap]
        _raises(tiny_copy, name, f"key {cap!r}", "missing")
        _open(tiny_copy, split="val").close()           # other splits do not need that key
        with h5py.File(_text(tiny_copy, name), "a") as f:
            f[cap] = np.ones((5, data.text_dim if "roberta" in name else data.teacher_dim), np.float32)[:1 if "clip" in name else 5]
    with h5py.File(tiny_copy / NAME / "FeatureData" / f"new_clip_vit_32_{NAME}_vid_features.hdf5", "a") as f:
        del f[vid]
    _raises(tiny_copy, "new_clip_vit_32", f"key {vid!r}", "teacher video features", f"caption {data.cap_ids[data.video_caps[2][0]]!r}")
    assert not _open(tiny_copy, teacher=False).has_teacher


def test_one_teacher_file_missing(tiny_copy):
    path = _text(tiny_copy, f"clip_ViT_B_32_{NAME}_query_feat.hdf5")
    path.unlink()
    _raises(tiny_copy, path, "teacher file missing", f"new_clip_vit_32_{NAME}_vid_features.hdf5", "teacher=False")


def test_bad_item_shapes_are_named_when_read(tiny_copy):
    with _open(tiny_copy) as data:
        pass
    cap, vid = data.cap_ids[1], data.video_ids[1]
    with h5py.File(_text(tiny_copy, f"roberta_{NAME}_query_feat.hdf5"), "a") as f:
        del f[cap]
        f[cap] = np.ones((4, data.text_dim + 1), np.float32)
    with h5py.File(tiny_copy / NAME / "FeatureData" / f"new_clip_vit_32_{NAME}_vid_features.hdf5", "a") as f:
        del f[vid]
        f[vid] = np.ones((3, 5), np.float32)
    cap2, cap3 = data.cap_ids[2], data.cap_ids[3]
    with h5py.File(_text(tiny_copy, f"roberta_{NAME}_query_feat.hdf5"), "a") as f:
        del f[cap2], f[cap3]
        f.create_group(cap2)
        f[cap3] = np.array([b"not", b"numbers"])
    data = _open(tiny_copy)          # structure is fine at open time
    with pytest.raises(DataError, match=rf"roberta_{NAME}_query_feat.hdf5: key '{re.escape(cap)}': expected \[n_tokens >= 1, 16\], got \(4, 17\)"):
        data.query(1)
    with pytest.raises(DataError, match=rf"key '{re.escape(cap2)}': is not a dataset"):
        data.query(2)
    with pytest.raises(DataError, match=rf"key '{re.escape(cap3)}': cannot be read as float32"):
        data.query(3)
    with pytest.raises(DataError, match=rf"key '{vid}': expected \[n_frames >= 1, 8\], got \(3, 5\)"):
        data.teacher_video(1)


def test_not_hdf5(tiny_copy):
    path = _text(tiny_copy, f"roberta_{NAME}_query_feat.hdf5")
    path.write_bytes(b"not an hdf5 file")
    _raises(tiny_copy, path, "cannot be opened as HDF5")


def test_argument_errors(tiny_root):
    with pytest.raises(ValueError, match="split must be one of"):
        PRVRCollection(tiny_root, NAME, "dev")
    with pytest.raises(ValueError, match="max_frames must be an int >= 1, got 0"):
        PRVRCollection(tiny_root, NAME, "train", max_frames=0)
    data = _open(tiny_root)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        next(train_batches(data, 0, seed=0, epoch=0))
    with pytest.raises(ValueError, match="video_subset must hold video indices in"):
        next(train_batches(data, 2, seed=0, epoch=0, video_subset=[0, 99]))


# --------------------------------------------------------------------------- batches

def _check_batch(data, b, with_queries=True, with_videos=True):
    assert b.videos.dtype == torch.float32 and b.video_lengths.dtype == torch.int64
    for pos, i in enumerate(b.video_index.tolist()):
        n = data.video_length(i)
        assert b.video_lengths[pos] == n
        assert torch.equal(b.videos[pos, :n], torch.from_numpy(data.video(i)))
        assert not b.videos[pos, n:].any()
        assert torch.equal(b.teacher_videos[pos, :n], torch.from_numpy(data.teacher_video(i)))
        assert not b.teacher_videos[pos, n:].any()
    assert b.videos.shape[1] == (int(b.video_lengths.max()) if len(b.video_lengths) else 0)
    for pos, j in enumerate(b.query_index.tolist()):
        n = len(data.query(j))
        assert b.query_lengths[pos] == n
        assert torch.equal(b.queries[pos, :n], torch.from_numpy(data.query(j)))
        assert not b.queries[pos, n:].any()
        assert torch.equal(b.teacher_queries[pos], torch.from_numpy(data.teacher_query(j)))
    assert b.queries.shape[1] == (int(b.query_lengths.max()) if len(b.query_lengths) else 0)


def test_train_batches_cover_every_caption_once(tiny_root):
    data = _open(tiny_root)
    nv = len(data.video_ids)
    for epoch in range(2):
        batches = list(train_batches(data, 4, seed=7, epoch=epoch))
        assert len(batches) == num_train_batches(data, 4) == -(-nv // 4)
        videos = torch.cat([b.video_index for b in batches]).tolist()
        queries = torch.cat([b.query_index for b in batches]).tolist()
        assert sorted(videos) == list(range(nv)) and sorted(queries) == list(range(len(data.cap_ids)))
        for b in batches:
            _check_batch(data, b)
            # all captions of each video are in its batch, and query_video points at that video
            want = [j for i in b.video_index.tolist() for j in data.video_caps[i]]
            assert b.query_index.tolist() == want
            assert b.video_index[b.query_video].tolist() == [data.cap_video[j] for j in want]
        if epoch == 0:
            first = videos
    assert videos != first, "epochs must reshuffle"
    again = torch.cat([b.video_index for b in train_batches(data, 4, seed=7, epoch=1)]).tolist()
    assert again == videos, "same (seed, epoch) must give the same order"
    assert torch.cat([b.video_index for b in train_batches(data, 4, seed=7, epoch=0, shuffle=False)]).tolist() == list(range(nv))


def test_train_batches_subset_and_drop_last(tiny_root):
    data = _open(tiny_root)
    subset = [5, 0, 3, 2, 4]
    batches = list(train_batches(data, 2, seed=0, epoch=0, drop_last=True, video_subset=subset))
    assert len(batches) == num_train_batches(data, 2, drop_last=True, video_subset=subset) == 2
    assert all(len(b.video_index) == 2 for b in batches)
    assert set(torch.cat([b.video_index for b in batches]).tolist()) < set(subset)
    assert num_train_batches(data, 2, video_subset=subset) == 3


def test_eval_batches(tiny_root):
    data = _open(tiny_root, "val")
    vbs = list(video_batches(data, 2))
    assert torch.cat([b.video_index for b in vbs]).tolist() == list(range(len(data.video_ids)))
    for b in vbs:
        _check_batch(data, b)
        assert b.queries.shape == (0, 0, data.text_dim) and b.query_lengths.shape == (0,)
        assert b.teacher_queries.shape == (0, data.teacher_dim)
    qbs = list(query_batches(data, 3))
    assert torch.cat([b.query_index for b in qbs]).tolist() == list(range(len(data.cap_ids)))
    for b in qbs:
        _check_batch(data, b)
        assert b.videos.shape == (0, 0, data.visual_dim) and b.teacher_videos.shape == (0, 0, data.teacher_dim)
        assert b.query_video.tolist() == [data.cap_video[j] for j in b.query_index.tolist()]


def test_batch_to_returns_a_moved_copy(tiny_root):
    b = next(train_batches(_open(tiny_root), 3, seed=0, epoch=0))
    moved = b.to("meta")
    assert moved is not b and moved.videos.device.type == "meta" and b.videos.device.type == "cpu"
    assert moved.teacher_queries.shape == b.teacher_queries.shape
    copy = b.to("cpu")
    assert torch.equal(copy.queries, b.queries)


def test_item_cache(tiny_root):
    data = _open(tiny_root)
    first = data.video(0)
    first[:] = 0                                              # callers get their own copy
    cached = data._item("video", 0)
    assert data._item("video", 0) is cached and not cached.flags.writeable and cached.any()
    assert data._cached_bytes == cached.nbytes
    uncached = _open(tiny_root, cache_bytes=0)
    assert uncached._item("video", 0) is not uncached._item("video", 0) and uncached._cached_bytes == 0
    np.testing.assert_array_equal(uncached.video(0), cached)


def _child_read(data, queue):
    queue.put((data.video(1).tolist(), data.query(2).tolist(), data.teacher_video(1).tolist()))


def test_pickle_and_fork(tiny_root):
    data = _open(tiny_root, cache_bytes=0)
    want = (data.video(1).tolist(), data.query(2).tolist(), data.teacher_video(1).tolist())   # opens files here
    clone = pickle.loads(pickle.dumps(data))
    assert (clone.video(1).tolist(), clone.query(2).tolist(), clone.teacher_video(1).tolist()) == want
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_read, args=(data, queue))
    child.start()
    got = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0 and got == want
    assert data.video(1).tolist() == want[0]          # the parent's handles still work
