"""kdcnet.prepared: the cache holds exactly the unprepared path's items, is keyed by the source files
and the settings, is written atomically and built once under concurrency; non-finite features are
reported when they are read, naming the file and the video or caption id."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kdcnet import config as C
from kdcnet import prepared as P
from kdcnet.batches import Batch, train_plan
from kdcnet.data import DataError, PRVRCollection, query_batches, train_batches, video_batches
from kdcnet.synthetic import VISUAL_FEATURE

from .conftest import NAME, TINY_READ

REPO = Path(__file__).resolve().parents[2]


def _open(root, split="train", **kw):
    return PRVRCollection(root, NAME, split, **{**TINY_READ, **kw})


def assert_same_batch(a: Batch, b: Batch, what=""):
    for f in fields(Batch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (x is None) == (y is None), (what, f.name)
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, (what, f.name, x.dtype, y.dtype, x.shape, y.shape)
            assert torch.equal(x, y), (what, f.name)


def _all_batches(data):
    nv, nq = len(data.video_ids), len(data.cap_ids)
    out = []
    for seed, epoch, size, kw in ((7, 0, 4, {}), (7, 1, 2, {}), (1, 2, 2, {"drop_last": True}),
                                  (0, 0, 2, {"video_subset": [nv - 1, 0, nv // 2]}), (0, 0, 4, {"shuffle": False})):
        out += list(train_batches(data, size, seed=seed, epoch=epoch, **kw))
    return out + list(video_batches(data, 4)) + list(video_batches(data, 2, video_subset=range(1, nv))) + \
        list(query_batches(data, 5)) + list(query_batches(data, 3, query_subset=[nq - 1, 1]))


def _count_builds(monkeypatch) -> list:
    builds = []
    real = P._build

    def counting(collection, folder, key, progress):
        builds.append(folder)
        real(collection, folder, key, progress)

    monkeypatch.setattr(P, "_build", counting)
    return builds


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize("split, teacher", [("train", True), ("val", False)])
def test_prepared_batches_and_items_equal_the_unprepared_ones(tiny_root, tmp_path, split, teacher):
    plain = _open(tiny_root, split, teacher=teacher, cache_bytes=0)
    data = _open(tiny_root, split, teacher=teacher).prepare(tmp_path)
    assert data.prepared is not None and data.prepared.built and data.has_teacher == teacher
    want, got = _all_batches(plain), _all_batches(data)
    assert len(want) == len(got) > 10
    for n, (a, b) in enumerate(zip(want, got)):
        assert_same_batch(a, b, n)
    for i in range(len(data.video_ids)):
        assert np.array_equal(data.video(i), plain.video(i))
        if teacher:
            assert np.array_equal(data.teacher_video(i), plain.teacher_video(i))
    for j in range(len(data.cap_ids)):
        assert np.array_equal(data.query(j), plain.query(j))
        if teacher:
            assert np.array_equal(data.teacher_query(j), plain.teacher_query(j))
    on_cpu = _open(tiny_root, split, teacher=teacher)          # the device-agnostic path (tensors on the CPU)
    on_cpu.prepared = data.prepared.to("cpu")
    assert on_cpu.prepared.device == torch.device("cpu") and on_cpu.prepared.nbytes == data.prepared.nbytes
    for n, (a, b) in enumerate(zip(want, _all_batches(on_cpu))):
        assert_same_batch(a, b, n)
    assert np.array_equal(on_cpu.video(1), plain.video(1))
    clone = pickle.loads(pickle.dumps(data))                  # memory maps reopened, not pickled
    assert_same_batch(want[0], next(train_batches(clone, 4, seed=7, epoch=0)))


def test_vectorised_plan_is_the_item_loop(tiny_root):
    data = _open(tiny_root)
    for seed, epoch, size, kw in ((7, 0, 4, {}), (3, 5, 1, {}), (0, 1, 5, {"drop_last": True}),
                                  (2, 2, 2, {"video_subset": [5, 0, 3, 2, 4]}), (0, 0, 4, {"shuffle": False})):
        order = np.arange(len(data.video_ids)) if "video_subset" not in kw else np.array(kw["video_subset"])
        if kw.get("shuffle", True):
            order = order[np.random.default_rng((seed, epoch)).permutation(len(order))]
        stop = len(order) - len(order) % size if kw.get("drop_last") else len(order)
        plans = list(train_plan(data, size, seed=seed, epoch=epoch, **kw))
        assert len(plans) == -(-stop // size)
        for n, (videos, queries, query_video) in enumerate(plans):
            want_v = order[n * size:min(stop, (n + 1) * size)].tolist()
            want_q = [j for i in want_v for j in data.video_caps[i]]
            want_qv = [pos for pos, i in enumerate(want_v) for _ in data.video_caps[i]]
            assert (videos.tolist(), queries.tolist(), query_video.tolist()) == (want_v, want_q, want_qv)


def test_float16_cache_is_the_rounded_float32_one(tiny_root, tmp_path):
    f32 = _open(tiny_root).prepare(tmp_path, dtype="float32")
    f16 = _open(tiny_root).prepare(tmp_path, dtype="float16")
    assert f16.prepared.folder != f32.prepared.folder
    assert f16.prepared.nbytes * 2 == f32.prepared.nbytes
    for a, b in zip(train_batches(f32, 4, seed=0, epoch=0), train_batches(f16, 4, seed=0, epoch=0)):
        assert b.videos.dtype == torch.float16 and b.teacher_queries.dtype == torch.float16
        for name in ("videos", "queries", "teacher_videos", "teacher_queries"):
            x, y = getattr(a, name), getattr(b, name)
            assert torch.equal(y, x.half()), name                     # round to nearest, nothing else
            moved = b.to("cpu")
            z = getattr(moved, name)
            assert z.dtype == torch.float32 and torch.equal(z, y.float())
            # the bound of the module doc: 2^-11 relative, 2^-25 absolute below the normal range
            assert bool(((z - x).abs() <= x.abs() * 2.0**-11 + 2.0**-25).all()), name
    assert f16.video(0).dtype == np.float32


def test_float16_storage_moves_bf16_autocast_inputs_by_at_most_one_ulp(tiny_root, tmp_path):
    """Where ``auto`` picks float16 (a GPU under bf16 autocast) the first layer sees bf16 of the
    float16 value instead of bf16 of the float32 one: the same number, or one bf16 step away
    (double rounding), or, below float16's range, a difference under 2^-24."""
    batch = next(train_batches(_open(tiny_root).prepare(tmp_path), 6, seed=0, epoch=0))
    changed = total = 0
    for name in ("videos", "queries", "teacher_videos", "teacher_queries"):
        x = getattr(batch, name)
        direct, via16 = x.bfloat16().float(), x.half().bfloat16().float()
        step = torch.where(direct != 0, 2.0 ** (torch.floor(torch.log2(direct.abs())) - 7), torch.zeros_like(direct))
        assert bool(((direct - via16).abs() <= step + 2.0**-24).all()), name
        changed, total = changed + int((direct != via16).sum()), total + x.numel()
    assert 0 < changed < total // 4       # some values move (double rounding), most do not


# --------------------------------------------------------------------------- key and rebuilds


def test_cache_is_reused_and_rebuilt_when_a_source_or_setting_changes(tiny_copy, tmp_path, monkeypatch):
    builds = _count_builds(monkeypatch)
    cache = tmp_path / "cache"
    first = _open(tiny_copy).prepare(cache).prepared
    again = _open(tiny_copy).prepare(cache).prepared
    assert len(builds) == 1 and again.folder == first.folder and not again.built
    assert _open(tiny_copy, max_frames=12).prepare(cache).prepared.folder != first.folder     # a setting
    assert _open(tiny_copy, teacher=False).prepare(cache).prepared.folder != first.folder
    assert len(builds) == 3
    # new values in feature.bin (size unchanged): rebuilt in place, and the batches follow the file
    feature = tiny_copy / NAME / "FeatureData" / VISUAL_FEATURE / "feature.bin"
    x = np.fromfile(feature, dtype="<f4")
    (x * 2 + 1).astype("<f4").tofile(feature)
    st = feature.stat()
    os.utime(feature, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # a distinct stamp on coarse clocks
    rebuilt = _open(tiny_copy).prepare(cache)
    assert len(builds) == 4 and rebuilt.prepared.folder == first.folder and rebuilt.prepared.built
    plain = _open(tiny_copy, cache_bytes=0)
    assert_same_batch(next(train_batches(plain, 6, seed=0, epoch=0)), next(train_batches(rebuilt, 6, seed=0, epoch=0)))
    assert not np.array_equal(plain.video(0), first.item("video", 0))      # the old maps still read the old file
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == sorted(
        {b.name for b in builds})                                          # no temporary or old folders left


@pytest.mark.parametrize("damage", ["truncate", "no index", "bad index", "index a list", "other shape"])
def test_damaged_cache_is_rebuilt(tiny_root, tmp_path, monkeypatch, damage):
    builds = _count_builds(monkeypatch)
    folder = _open(tiny_root).prepare(tmp_path).prepared.folder
    if damage == "truncate":
        with open(folder / "videos.npy", "r+b") as f:
            f.truncate(os.path.getsize(folder / "videos.npy") - 4)
    elif damage == "no index":
        (folder / "index.json").unlink()
    elif damage == "bad index":
        (folder / "index.json").write_text("{not json")
    elif damage == "index a list":
        (folder / "index.json").write_text("[1, 2]")
    else:
        np.save(folder / "queries.npy", np.zeros((3, 16), np.float32))
    data = _open(tiny_root).prepare(tmp_path)
    assert len(builds) == 2 and data.prepared.built
    assert_same_batch(next(train_batches(_open(tiny_root), 6, seed=0, epoch=0)),
                      next(train_batches(data, 6, seed=0, epoch=0)))


def test_failed_build_leaves_nothing(tiny_root, tmp_path, monkeypatch):
    def fail_on_fourth(self, kind, i, real=PRVRCollection.read_item):
        if kind == "query" and i == 3:
            raise DataError("boom")
        return real(self, kind, i)

    monkeypatch.setattr(PRVRCollection, "read_item", fail_on_fourth)
    with pytest.raises(DataError, match="boom"):
        _open(tiny_root).prepare(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


_SLOW_BUILD = """
import sys, time
from kdcnet.data import PRVRCollection
real = PRVRCollection.read_item
def slow(self, kind, i):
    print("reading", flush=True)
    time.sleep(0.2)
    return real(self, kind, i)
PRVRCollection.read_item = slow
PRVRCollection(sys.argv[1], sys.argv[2], "train", max_frames=16, max_tokens=8).prepare(sys.argv[3])
"""


def test_killed_build_is_replaced_by_a_complete_one(tiny_root, tmp_path):
    """SIGKILL a process in the middle of a build: no cache folder appears, and the next prepare
    removes the temporary folder and builds a complete cache."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(tiny_root), NAME, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "reading"
        time.sleep(0.3)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    left = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert len(left) == 1 and ".building-" in left[0], left      # only the temporary folder
    data = _open(tiny_root).prepare(tmp_path)
    assert data.prepared.built
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [data.prepared.folder.name]
    assert_same_batch(next(train_batches(_open(tiny_root), 6, seed=0, epoch=0)),
                      next(train_batches(data, 6, seed=0, epoch=0)))


def _prepare_in_child(root, cache, marker):
    real = P._build

    def build(collection, folder, key, progress):
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)             # long enough for the other process to reach the lock
        real(collection, folder, key, progress)

    P._build = build
    _open(root).prepare(cache)


def test_concurrent_processes_build_once(tiny_root, tmp_path):
    ctx = multiprocessing.get_context("fork")
    marker = tmp_path / "builds.txt"
    children = [ctx.Process(target=_prepare_in_child, args=(tiny_root, tmp_path / "cache", marker)) for _ in range(2)]
    for c in children:
        c.start()
    for c in children:
        c.join(timeout=60)
    assert [c.exitcode for c in children] == [0, 0]
    assert len(marker.read_text().split()) == 1
    assert not _open(tiny_root).prepare(tmp_path / "cache").prepared.built


def test_unwritable_cache_folder_is_named_and_open_split_reads_the_files(tiny_root, tmp_path, caplog):
    from kdcnet import evaluate as E

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match=re.escape(str(blocker / "sub")) + ".*data.cache_dir"):
        _open(tiny_root).prepare(blocker / "sub")
    cfg = C.preset("synthetic")
    cfg.data.root, cfg.data.collection, cfg.data.cache_dir = str(tiny_root), NAME, str(blocker / "sub")
    with E.open_split(cfg, "val") as data:          # slower, not wrong: the source files, with a warning
        assert data.prepared is None and len(data.video_ids) == 3
    assert "reading the val split from its source files instead" in caplog.text


def test_default_cache_folder_follows_kdc_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KDC_CACHE_DIR", str(tmp_path))
    assert P.cache_root() == tmp_path / "prepared" and P.cache_root(tmp_path / "x") == tmp_path / "x"
    assert P.resolve_dtype("auto", "cpu") == "float32" and P.resolve_dtype("auto", "cuda:1") == "float16"
    assert P.resolve_dtype("auto", "cuda", bf16=False) == "float32" and P.resolve_dtype("float16", "cpu") == "float16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        P.prepare_split(None, tmp_path, dtype="bfloat16")


# --------------------------------------------------------------------------- non-finite features


def _frame_row(root, vid, k):
    folder = root / NAME / "FeatureData" / VISUAL_FEATURE
    ids = (folder / "id.txt").read_text().split()
    frame = f"{vid}_{k}"
    return folder / "feature.bin", ids.index(frame), frame, int((folder / "shape.txt").read_text().split()[1])


def test_nan_in_feature_bin_is_named_at_prepare_and_when_read(tiny_copy, tmp_path):
    vid = _open(tiny_copy).video_ids[2]
    path, row, frame, dim = _frame_row(tiny_copy, vid, 3)
    mm = np.memmap(path, dtype="<f4", mode="r+")
    mm[row * dim + 5] = np.nan
    mm.flush()
    del mm
    want = rf"feature.bin: video '{vid}', frame '{frame}' \(row {row}\): NaN in the features"
    with pytest.raises(DataError, match=want):
        _open(tiny_copy).prepare(tmp_path)
    plain = _open(tiny_copy)
    batches = train_batches(plain, 1, seed=0, epoch=0, shuffle=False)
    next(batches), next(batches)                               # videos 0 and 1 are fine
    with pytest.raises(DataError, match=want):
        next(batches)                                          # the batch holding video 2


@pytest.mark.parametrize("kind", ["query", "teacher_query", "teacher_video"])
def test_inf_in_an_hdf5_entry_is_named(tiny_copy, tmp_path, kind):
    with _open(tiny_copy) as data:
        pass
    text = tiny_copy / NAME / "TextData"
    if kind == "teacher_video":
        path, key = tiny_copy / NAME / "FeatureData" / f"new_clip_vit_32_{NAME}_vid_features.hdf5", data.video_ids[1]
        where = "frame 2"
    else:
        path = text / (f"roberta_{NAME}_query_feat.hdf5" if kind == "query" else f"clip_ViT_B_32_{NAME}_query_feat.hdf5")
        key = data.cap_ids[4]
        where = "token 1" if kind == "query" else "row 0"
    with h5py.File(path, "a") as f:
        x = f[key][()]
        x[int(where.split()[1]), 0] = -np.inf
        f[key][...] = x
    with pytest.raises(DataError, match=rf"{re.escape(path.name)}: key '{re.escape(key)}': an infinity in {where}"):
        _open(tiny_copy).prepare(tmp_path)


def test_non_finite_tokens_beyond_max_tokens_do_not_matter(tiny_copy, tmp_path):
    with _open(tiny_copy) as data:
        pass
    path = tiny_copy / NAME / "TextData" / f"roberta_{NAME}_query_feat.hdf5"
    with h5py.File(path, "a") as f:
        key = next(k for k in data.cap_ids if f[k].shape[0] > TINY_READ["max_tokens"])
        x = f[key][()]
        x[TINY_READ["max_tokens"]:] = np.nan                  # excluded positions
        f[key][...] = x
    prepared = _open(tiny_copy).prepare(tmp_path)
    j = data.cap_ids.index(key)
    assert np.isfinite(prepared.query(j)).all() and len(prepared.query(j)) == TINY_READ["max_tokens"]


# --------------------------------------------------------------------------- kdcnet prepare


def test_prepare_command_builds_what_training_reads(tiny_root, tmp_path, capsys):
    from kdcnet import cli
    from kdcnet import evaluate as E

    argv = ["prepare", "--data-root", str(tiny_root), "--collection", NAME, "--device", "cpu",
            "--set", f"data.max_frames={TINY_READ['max_frames']}", "--set", f"data.max_tokens={TINY_READ['max_tokens']}",
            "--set", f"data.cache_dir={tmp_path}"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["train", "val", "test"] and all("built" in x for x in lines)
    assert cli.main(argv) == 0
    assert all("up to date" in x for x in capsys.readouterr().out.strip().splitlines())
    cfg = cli.config_from_args(cli.build_parser().parse_args(["train", *argv[1:]]))
    for split, teacher in (("train", cfg.loss.distill), ("val", False), ("test", False)):  # what the trainer opens
        with E.open_split(cfg, split, teacher=teacher) as data:
            assert not data.prepared.built and data.prepared.folder.parent == tmp_path
    assert cli.main([*argv, "--splits", "train,dev"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--splits: expected train, val or test, got 'dev'" in err


def test_prepare_command_names_a_non_finite_feature(tiny_copy, tmp_path, capsys):
    from kdcnet import cli

    with _open(tiny_copy, "val") as data:
        vid = data.video_ids[0]
    path, row, frame, dim = _frame_row(tiny_copy, vid, 0)
    mm = np.memmap(path, dtype="<f4", mode="r+")
    mm[row * dim] = np.inf
    mm.flush()
    del mm
    assert cli.main(["prepare", "--data-root", str(tiny_copy), "--collection", NAME, "--splits", "val",
                     "--set", f"data.cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()     # the log's "preparing ..." line, then the error
    last = err.splitlines()[-1]
    assert last.startswith("kdcnet prepare: error:") and "Traceback" not in err
    assert f"feature.bin: video '{vid}', frame '{frame}'" in last and "an infinity" in last


@pytest.mark.parametrize("prepared", [True, False])
def test_training_on_a_nan_feature_stops_naming_it(tiny_copy, tmp_path, capsys, prepared):
    """Found when the split is prepared (before the run folder exists), or without a prepared cache
    when the batch holding it is loaded: one line naming the file and the video, exit code 2."""
    from kdcnet import cli

    with _open(tiny_copy) as data:
        vid = data.video_ids[1]
    path, row, frame, dim = _frame_row(tiny_copy, vid, 2)
    mm = np.memmap(path, dtype="<f4", mode="r+")
    mm[row * dim + 1] = np.nan
    mm.flush()
    del mm
    run = tmp_path / "run"
    argv = ["train", "--data-root", str(tiny_copy), "--collection", NAME, "--epochs", "1", "--device", "cpu",
            "--run-dir", str(run), "--set", f"data.max_frames={TINY_READ['max_frames']}", "--set", "model.d=16",
            "--set", "model.heads=2", "--set", f"data.prepared={str(prepared).lower()}", "--set", "train.plots=false"]
    assert cli.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("kdcnet train: error:") and f"feature.bin: video '{vid}', frame '{frame}'" in last
    assert "NaN in the features" in last
    assert run.exists() is not prepared
