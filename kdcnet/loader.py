"""Training batches ready before the step needs them.

:func:`epoch_batches` is what the trainer iterates: the batches of :func:`kdcnet.batches.train_batches`
for this process's video order of one epoch, already on the training device, in float32. Where
they are made depends on ``data.on_device`` (:func:`place_train_split`):

* **On the device.** The prepared train split is held on the training device and every batch is
  one gather per tensor there; only the small index arrays cross from the host. ``auto`` does this
  on a GPU when the split fits in ``data.device_share`` of the free GPU memory (measured once,
  before the first epoch); ``true`` insists (on the CPU it reads the split into memory as
  tensors: the same code path, which is how it is tested without a GPU); ``false`` never.
* **On the host, ahead of the step.** A background thread (:func:`prefetch`) assembles up to
  ``data.prefetch`` batches ahead, from the prepared memory maps (on a GPU into page-locked
  memory); :func:`copy_ahead` issues each batch's copy to the GPU on a side stream one batch
  early, so that copy overlaps the previous step.

Every path yields the same batches in the same order as iterating ``train_batches`` directly
(the producer runs that very iterator; the order is a pure function of seed, epoch and the
number of processes), so resuming stays exact. The thread stops when the consumer stops: at the
end of the epoch, on an error in the step, on Ctrl-C, or when the iterator is closed; an error in
the producer (e.g. a bad data file) is raised in the consumer, at the batch where it occurred.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch

from .batches import Batch, train_batches
from .prepared import BufferRing

log = logging.getLogger("kdcnet")
T = TypeVar("T")
_END = object()


def _close(it) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """The items of ``items``, produced by a background thread at most ``depth`` ahead of the
    consumer (a bounded queue); ``depth <= 0`` iterates in the calling thread.

    Closing the returned generator (or leaving a ``for`` loop over it by an exception, Ctrl-C
    included) stops and joins the thread; an exception raised while producing is re-raised here.
    """
    if depth <= 0:
        it = iter(items)
        try:
            yield from it
        finally:
            _close(it)
        return
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        it = iter(items)
        try:
            for item in it:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put((False, e))
        finally:
            _close(it)

    thread = threading.Thread(target=work, name="kdcnet-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = box.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _tensors(batch: Batch):
    return [t for t in vars(batch).values() if isinstance(t, torch.Tensor)]


def copy_ahead(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """Each batch on ``device`` in float32. On a GPU the copy of batch ``k + 1`` is issued on a side
    stream before batch ``k`` is handed out, so it runs while step ``k`` computes (asynchronous
    from page-locked memory); the compute stream waits for each batch's own copy only."""
    it = iter(batches)
    try:
        if device.type != "cuda":
            for batch in it:
                yield batch.to(device)
            return
        stream = torch.cuda.Stream(device)
        pending = None
        for batch in it:
            with torch.cuda.stream(stream):
                moved = batch.to(device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            if pending is not None:
                yield _ready(*pending, device)
            pending = (moved, done)
        if pending is not None:
            yield _ready(*pending, device)
    finally:
        _close(it)


def _ready(batch: Batch, done, device) -> Batch:
    current = torch.cuda.current_stream(device)
    current.wait_event(done)
    for t in _tensors(batch):      # memory made on the side stream, used on this one
        t.record_stream(current)
    return batch


def place_train_split(collection, cfg, device: torch.device) -> bool:
    """Apply ``data.on_device`` to the prepared ``collection`` (once; later calls return the same
    decision): hold its arrays on ``device`` when asked to and, on a GPU, when they fit in
    ``data.device_share`` of the free memory. Returns whether they are on ``device``. Raises
    ValueError for ``on_device=true`` when they do not fit."""
    mode, store = cfg.data.on_device, collection.prepared
    if store is None or mode == "false":
        return False
    if store.device is not None:
        return store.device == device
    if getattr(collection, "_host_decided", False):
        return False
    need = store.nbytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = cfg.data.device_share * free
        if need > budget:
            msg = (f"the prepared {collection.split} split takes {need / 1e9:.2f} GB, more than data.device_share = "
                   f"{cfg.data.device_share:g} of the {free / 1e9:.2f} GB free on {device}")
            if mode == "true":
                raise ValueError(f"data.on_device=true: {msg}; use data.on_device=auto, or raise data.device_share, "
                                 f"or data.cache_dtype=float16 to halve it")
            log.info("training batches are assembled on the host: %s", msg)
            collection._host_decided = True
            return False
    elif mode == "auto":                 # on the CPU the memory maps already are host memory
        collection._host_decided = True
        return False
    t0 = time.perf_counter()
    collection.prepared = store.to(device)
    log.info("training data held on %s: %.2f GB (%s) read in %.1f s", device, need / 1e9, store.dtype,
             time.perf_counter() - t0)
    return True


def epoch_batches(collection, cfg, device: torch.device, videos: np.ndarray) -> Iterator[Batch]:
    """The training batches of one epoch on ``device``, float32: runs of ``train.batch_size`` of
    ``videos`` (this process's order, e.g. :func:`kdcnet.distributed.epoch_videos`), each with all
    its captions, made where the module doc says. Close it (``contextlib.closing``) to stop its
    thread early.

    On the CPU the feature tensors of a batch live in recycled memory: they are valid until the
    next batch is requested (a training step is done with them by then); copy what you keep."""
    on_device = place_train_split(collection, cfg, device)
    host = collection.prepared is not None and not on_device
    pinned = host and device.type == "cuda"
    ring = _ring(collection, cfg.data.prefetch + 2) if host and device.type == "cpu" else None
    batches = train_batches(collection, cfg.train.batch_size, seed=cfg.train.seed, epoch=0, shuffle=False,
                            video_subset=videos, pin_memory=pinned, buffers=ring)
    if on_device:
        return _on_device(batches, device)
    return copy_ahead(prefetch(batches, cfg.data.prefetch), device)


def _ring(collection, slots: int) -> BufferRing:
    """The collection's recycled host buffers, kept from epoch to epoch. On the CPU a batch is used
    where it is made, so its memory can be reused once the consumer has moved on: at most
    ``prefetch`` batches wait in the queue, one is being made and one is in use (an epoch's
    iterator is closed, its thread joined, before the next epoch's starts)."""
    ring = getattr(collection, "_buffer_ring", None)
    if ring is None or ring.slots != slots:
        ring = collection._buffer_ring = BufferRing(slots)
    return ring


def _on_device(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """Batches gathered on ``device`` itself, converted to float32 in place of issue (same stream)."""
    with contextlib.closing(batches):
        for batch in batches:
            yield batch.to(device)
