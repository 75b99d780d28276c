"""kdcnet.loader: batches made ahead of the step are exactly the batches of the plain iterator (every
placement: unprepared, prepared on the host with or without a thread, held on the device), the
thread is bounded and stops on every way out, and training is unchanged by where batches are made."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import numpy as np
import pytest
import torch

from kdcnet import config as C
from kdcnet import distributed as D
from kdcnet import loader as L
from kdcnet import trainer
from kdcnet.data import DataError, PRVRCollection, train_batches
from kdcnet.prepared import BufferRing

from .conftest import NAME, TINY_READ
from .test_prepared import assert_same_batch

CUDA = torch.cuda.is_available()


def _open(root, split="train", **kw):
    return PRVRCollection(root, NAME, split, **{**TINY_READ, **kw})


def _threads():
    return [t for t in threading.enumerate() if t.name == "kdcnet-prefetch"]


def _cfg(**data):
    cfg = C.preset("synthetic")
    cfg.train.batch_size, cfg.train.seed = 2, 5
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return C.validate(cfg)


# --------------------------------------------------------------------------- prefetch


class Source:
    """Counts what was produced; optionally fails at item ``fail_at``."""

    def __init__(self, n, fail_at=None):
        self.n, self.fail_at, self.made = n, fail_at, 0

    def __iter__(self):
        for i in range(self.n):
            if i == self.fail_at:
                raise DataError(f"bad item {i}")
            self.made += 1
            yield i


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_yields_the_same_items_and_stays_bounded(depth):
    source = Source(20)
    got = []
    for item in L.prefetch(source, depth):
        time.sleep(0.002)
        assert source.made <= len(got) + 1 + depth + 1   # queued (depth) + being put + just handed out
        got.append(item)
    assert got == list(range(20)) and not _threads()


def test_prefetch_raises_the_producers_error_where_it_happened():
    got = []
    with pytest.raises(DataError, match="bad item 5"):
        for item in L.prefetch(Source(20, fail_at=5), 2):
            got.append(item)
    assert got == [0, 1, 2, 3, 4] and not _threads()


@pytest.mark.parametrize("how", ["error", "ctrl-c", "abandoned", "close"])
def test_prefetch_thread_stops_when_the_consumer_stops(how):
    """As the trainer consumes it (``contextlib.closing``), or abandoned in a for loop."""
    source = Source(10**6)
    if how == "close":
        batches = L.prefetch(source, 2)
        next(batches)
        batches.close()
    elif how == "abandoned":
        for n, _ in enumerate(L.prefetch(source, 2)):
            if n == 3:
                break
    else:
        exc = RuntimeError if how == "error" else KeyboardInterrupt
        with pytest.raises(exc), contextlib.closing(L.prefetch(source, 2)) as batches:
            for n, _ in enumerate(batches):
                if n == 3:
                    raise exc("stop")
    deadline = time.time() + 5
    while _threads() and time.time() < deadline:
        time.sleep(0.01)
    assert not _threads()
    assert source.made < 10


# --------------------------------------------------------------------------- epoch batches


@pytest.mark.parametrize("setup", ["unprepared", "host", "host-no-thread", "host-float16", "on-device"])
def test_epoch_batches_are_the_plain_batches(tiny_root, tmp_path, setup):
    """Every placement yields the plain iterator's batches, in order and bit for bit (float16: the
    rounded ones), over two epochs of a 2-process order."""
    data = {"unprepared": dict(prepared=False), "host": dict(prefetch=2), "host-no-thread": dict(prefetch=0),
            "host-float16": dict(cache_dtype="float16"), "on-device": dict(on_device="true", prefetch=3)}[setup]
    cfg = _cfg(cache_dir=str(tmp_path), **data)
    collection = _open(tiny_root)
    if cfg.data.prepared:
        collection.prepare(cfg.data.cache_dir, "float16" if setup == "host-float16" else "float32")
    plain = _open(tiny_root, cache_bytes=0)
    device = torch.device("cpu")
    for epoch in range(2):
        videos = D.epoch_videos(len(plain.video_ids), 2, cfg.train.seed, epoch, D.World(1, 2))
        want = train_batches(plain, 2, seed=0, epoch=0, shuffle=False, video_subset=videos)
        n = 0
        for n, (a, b) in enumerate(zip(want, L.epoch_batches(collection, cfg, device, videos)), 1):
            if setup == "host-float16":
                a = a.to(device)
                for name in ("videos", "queries", "teacher_videos", "teacher_queries"):
                    setattr(a, name, getattr(a, name).half().float())
            assert_same_batch(a, b, (epoch, n))
        assert n == len(videos) // 2 + len(videos) % 2 and not _threads()
    assert (collection.prepared is not None) == (setup != "unprepared")
    assert (getattr(collection.prepared, "device", None) is not None) == (setup == "on-device")


@pytest.mark.parametrize("prefetch", [0, 2])
def test_host_batches_on_the_cpu_recycle_memory(tiny_root, tmp_path, prefetch):
    cfg = _cfg(cache_dir=str(tmp_path), prefetch=prefetch)
    cfg.train.batch_size = 1
    data = _open(tiny_root).prepare(tmp_path)
    videos = D.epoch_videos(len(data.video_ids), 1, 0, 0, D.World())
    pointers = []
    for a, b in zip(train_batches(_open(tiny_root), 1, seed=0, epoch=0), L.epoch_batches(data, cfg, torch.device("cpu"), videos)):
        assert_same_batch(a, b)                 # compared before the ring comes round to its memory
        pointers.append(b.videos.data_ptr())
    slots = prefetch + 2
    assert len(pointers) == 6 and pointers[slots:] == pointers[:6 - slots] and len(set(pointers[:slots])) == slots


def test_buffer_ring_recycles_slots():
    ring = BufferRing(2)
    ptrs = []
    for _ in range(4):
        ring.advance()
        ptrs.append(ring.take("videos", (5, 3), np.float32).data_ptr())
    assert ptrs[0] == ptrs[2] and ptrs[1] == ptrs[3] and ptrs[0] != ptrs[1]
    ring.advance()
    assert ring.take("videos", (50, 3), np.float32).shape == (50, 3)   # grows
    with pytest.raises(ValueError, match="slots"):
        BufferRing(0)


def test_placement_rules_on_the_cpu(tiny_root, tmp_path):
    cpu = torch.device("cpu")
    for mode, held in (("auto", False), ("false", False), ("true", True)):
        data = _open(tiny_root).prepare(tmp_path)
        assert L.place_train_split(data, _cfg(on_device=mode), cpu) is held
        assert L.place_train_split(data, _cfg(on_device=mode), cpu) is held          # decided once
        assert (data.prepared.device is not None) is held
    assert L.place_train_split(_open(tiny_root), _cfg(on_device="auto"), cpu) is False   # unprepared
    with pytest.raises(ValueError, match="data.on_device.*data.prepared=false"):
        C.apply_overrides(C.preset("synthetic"), ["data.prepared=false", "data.on_device=true"])
    for bad in ("data.on_device=yes", "data.cache_dtype=bf16", "data.prefetch=-1", "data.device_share=0",
                "data.device_share=nan"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            C.apply_overrides(C.preset("synthetic"), [bad])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["false", "auto", "true"])
def test_epoch_batches_on_a_gpu_are_the_plain_batches(tiny_root, tmp_path, mode):
    """Host path (page-locked memory, copies one batch ahead on a side stream) and on-device path
    (auto: the tiny split fits)."""
    cfg = _cfg(cache_dir=str(tmp_path), on_device=mode)
    device = torch.device("cuda")
    data = _open(tiny_root).prepare(tmp_path, "float16")
    plain = _open(tiny_root, cache_bytes=0)
    videos = D.epoch_videos(len(plain.video_ids), 2, cfg.train.seed, 0, D.World())
    want = train_batches(plain, 2, seed=0, epoch=0, shuffle=False, video_subset=videos)
    for a, b in zip(want, L.epoch_batches(data, cfg, device, videos)):
        torch.cuda.synchronize()
        b = b.to("cpu")
        a = a.to("cpu")
        for name in ("videos", "queries", "teacher_videos", "teacher_queries"):
            setattr(a, name, getattr(a, name).half().float())
        assert_same_batch(a, b)
    assert (data.prepared.device is not None) == (mode != "false")
    with pytest.raises(ValueError, match="data.device_share"):
        L.place_train_split(_open(tiny_root).prepare(tmp_path, "float16"),
                            _cfg(on_device="true", device_share=1e-12), device)


# --------------------------------------------------------------------------- training


def _train(root, run, **data):
    cfg = C.preset("synthetic")
    cfg.data.root, cfg.data.collection = str(root), NAME
    cfg.data.max_frames, cfg.data.max_tokens = TINY_READ["max_frames"], TINY_READ["max_tokens"]
    cfg.model.d, cfg.model.heads, cfg.model.dropout = 16, 2, 0.1
    cfg.train.epochs, cfg.train.batch_size, cfg.train.device, cfg.train.plots = 2, 2, "cpu", False
    cfg.eval.video_chunk = 2
    for key, value in data.items():
        setattr(cfg.data, key, value)
    trainer.train(C.validate(cfg), run, progress=False, console=False)
    history = [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "steps_per_s")}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    return history, torch.load(run / "last.pt", map_location="cpu", weights_only=False)["model"]


def test_training_is_the_same_wherever_batches_are_made(tiny_root, tmp_path):
    want, params = _train(tiny_root, tmp_path / "plain", prepared=False, prefetch=0)
    for name, data in (("default", {}), ("on-device", {"on_device": "true"})):
        got, got_params = _train(tiny_root, tmp_path / name, **data)
        assert got == want, name
        assert all(torch.equal(params[k], got_params[k]) for k in params), name


def test_ctrl_c_in_a_step_stops_the_loading_thread(tiny_root, tmp_path, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_root, tmp_path / "run")
    assert len(calls) == 2 and not _threads()
