"""Batches of one split: padded tensors of videos with all their captions (training), or of videos or
queries alone (evaluation).

A batch is made in two steps. The *plan* says which videos and captions it holds: for training,
``np.random.default_rng((seed, epoch)).permutation`` of the videos cut into runs of ``batch_size``,
each video followed by all its captions in caption-file order; it is computed with NumPy from the
collection's index arrays, with no loop over items. The *assembly* reads the features: from the
prepared arrays (:mod:`kdcnet.prepared`) with one gather per tensor when the collection has them,
else item by item from the source files (through the item cache). Both give the same tensors, bit
for bit, from a float32 cache.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from .data import PRVRCollection


@dataclass
class Batch:
    """Padded tensors of B videos and Nq queries (:meth:`to` returns a moved float32 copy).

    ``query_video[j]`` is the batch position (``0..B-1``) of query j's video. In
    :func:`query_batches` (no videos in the batch) it is the index into ``collection.video_ids``,
    i.e. the position in the concatenation of :func:`video_batches`.

    Features are float32, or float16 when read from a float16 prepared cache (until :meth:`to`).
    """

    videos: torch.Tensor                    # [B, L, Dv] float32, zero-padded
    video_lengths: torch.Tensor             # [B] int64
    queries: torch.Tensor                   # [Nq, Lq, Dq] float32, zero-padded
    query_lengths: torch.Tensor             # [Nq] int64
    query_video: torch.Tensor               # [Nq] int64
    teacher_videos: torch.Tensor | None     # [B, L, Dt]
    teacher_queries: torch.Tensor | None    # [Nq, Dt]
    video_index: torch.Tensor               # [B] int64, into collection.video_ids
    query_index: torch.Tensor               # [Nq] int64, into collection.cap_ids

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A copy on ``device`` with float32 features (a tensor already there and float32 is reused)."""

        def move(x):
            if x is None:
                return None
            x = x.to(device, non_blocking=non_blocking)
            if not x.is_floating_point() or x.dtype == torch.float32:
                return x
            if x.device.type == "cpu":   # NumPy's allocation: huge pages, far fewer page faults (kdcnet.prepared)
                return torch.from_numpy(np.empty(tuple(x.shape), dtype=np.float32)).copy_(x)
            return x.float()

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})


def _pad(arrays: list[np.ndarray], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[n_i, dim]`` arrays into a zero-padded ``[len, max n_i, dim]`` tensor and lengths."""
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    out = np.zeros((len(arrays), int(lengths.max(initial=0)), dim), dtype=np.float32)
    for k, a in enumerate(arrays):
        out[k, :a.shape[0]] = a
    return torch.from_numpy(out), torch.from_numpy(lengths)


def _from_items(data: PRVRCollection, videos: np.ndarray, queries: np.ndarray, query_video: np.ndarray) -> Batch:
    """The unprepared path: item by item from the source files (or the item cache)."""
    v, v_len = _pad([data._item("video", i) for i in videos], data.visual_dim)
    q, q_len = _pad([data._item("query", j) for j in queries], data.text_dim)
    tv = tq = None
    if data.has_teacher:
        tv, _ = _pad([data._item("teacher_video", i) for i in videos], data.teacher_dim)
        tq = torch.from_numpy(np.stack([data._item("teacher_query", j) for j in queries]) if len(queries)
                              else np.zeros((0, data.teacher_dim), dtype=np.float32))
    return Batch(
        videos=v, video_lengths=v_len, queries=q, query_lengths=q_len,
        query_video=torch.from_numpy(query_video), teacher_videos=tv, teacher_queries=tq,
        video_index=torch.from_numpy(videos), query_index=torch.from_numpy(queries),
    )


def make_batch(data: PRVRCollection, videos: Sequence[int], queries: Sequence[int], query_video: Sequence[int],
               pin_memory: bool = False, buffers=None) -> Batch:
    """The batch of ``videos`` and ``queries`` (indices into ``video_ids`` / ``cap_ids``), from the
    prepared arrays when ``data`` has them (``pin_memory``: into page-locked memory; ``buffers``:
    into a :class:`kdcnet.prepared.BufferRing`), else from the items."""
    videos, queries, query_video = (np.array(x, dtype=np.int64).reshape(-1) for x in (videos, queries, query_video))
    if data.prepared is not None:
        return data.prepared.batch(videos, queries, query_video, pin_memory=pin_memory, buffers=buffers)
    return _from_items(data, videos, queries, query_video)


# ----------------------------------------------------------------------------------------- plans


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _subset(data: PRVRCollection, subset, queries: bool = False) -> np.ndarray:
    n, name = (len(data.cap_ids), "query_subset") if queries else (len(data.video_ids), "video_subset")
    if subset is None:
        return np.arange(n, dtype=np.int64)
    idx = np.asarray(subset, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{name} must hold {'query' if queries else 'video'} indices in [0, {n}), "
                         f"got values in [{idx.min()}, {idx.max()}]")
    return idx


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])`` without a Python loop."""
    counts = np.asarray(counts, dtype=np.int64)
    before = np.cumsum(counts) - counts
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(np.asarray(starts, dtype=np.int64) - before, counts)


def captions_of(data: PRVRCollection, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(queries, query_video)``: every caption of ``videos`` in order, each video's in caption-file
    order, and the position in ``videos`` of each caption's video."""
    counts = data.caps_start[videos + 1] - data.caps_start[videos]
    queries = data.caps_by_video[ranges(data.caps_start[videos], counts)]
    return queries, np.repeat(np.arange(len(videos), dtype=np.int64), counts)


def num_train_batches(collection: PRVRCollection, batch_size: int, drop_last: bool = False, video_subset=None) -> int:
    """Number of batches :func:`train_batches` yields with these arguments."""
    _check_batch_size(batch_size)
    n = len(_subset(collection, video_subset))
    return n // batch_size if drop_last else -(-n // batch_size)


def train_plan(collection: PRVRCollection, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
               drop_last: bool = False, video_subset=None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(videos, queries, query_video)`` of each batch :func:`train_batches` yields (index arrays)."""
    _check_batch_size(batch_size)
    order = _subset(collection, video_subset)
    if shuffle:
        order = order[np.random.default_rng((seed, epoch)).permutation(len(order))]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        videos = order[start:start + batch_size]
        yield (videos, *captions_of(collection, videos))


def train_batches(collection: PRVRCollection, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                  drop_last: bool = False, video_subset=None, pin_memory: bool = False, buffers=None) -> Iterator[Batch]:
    """Batches of ``batch_size`` videos with **all** their captions, each video once per epoch.

    The video order is ``np.random.default_rng((seed, epoch)).permutation`` of the videos (or of
    ``video_subset``) when ``shuffle``, else their index order; queries follow their videos in
    caption-file order. ``pin_memory``: assemble prepared batches in page-locked memory (for
    asynchronous copies to a GPU); ``buffers``: in the recycled slots of a
    :class:`kdcnet.prepared.BufferRing` (each batch valid until the ring wraps around).

    Example:
        >>> for batch in train_batches(data, 128, seed=0, epoch=3):
        ...     batch.videos.shape, batch.queries.shape    # [B, L, Dv], [Nq, Lq, Dq]
    """
    for videos, queries, query_video in train_plan(collection, batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                                                   drop_last=drop_last, video_subset=video_subset):
        yield make_batch(collection, videos, queries, query_video, pin_memory=pin_memory, buffers=buffers)


def video_batches(collection: PRVRCollection, batch_size: int, video_subset=None) -> Iterator[Batch]:
    """Videos in index order (or ``video_subset`` order), ``batch_size`` at a time, no queries."""
    _check_batch_size(batch_size)
    order = _subset(collection, video_subset)
    none = np.zeros(0, dtype=np.int64)
    for start in range(0, len(order), batch_size):
        yield make_batch(collection, order[start:start + batch_size], none, none)


def query_batches(collection: PRVRCollection, batch_size: int, query_subset=None) -> Iterator[Batch]:
    """Queries in caption-file order (or ``query_subset`` order), ``batch_size`` at a time, no
    videos; ``query_video`` indexes ``video_ids``."""
    _check_batch_size(batch_size)
    order = _subset(collection, query_subset, queries=True)
    none = np.zeros(0, dtype=np.int64)
    for start in range(0, len(order), batch_size):
        queries = order[start:start + batch_size]
        yield make_batch(collection, none, queries, collection.cap_video_index[queries])
