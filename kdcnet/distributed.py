r"""Several processes (GPUs, machines) with ``torchrun``: process group, sharding, gathering.

``torchrun --nproc_per_node N -m kdcnet train ...`` starts N processes; each finds its place in
the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``).
A process group is created only when ``WORLD_SIZE > 1``, so a plain ``kdcnet train`` (or
``torchrun --nproc_per_node 1``) never touches ``torch.distributed``.

Device and backend. ``train.device`` ``auto`` or ``cuda`` gives process ``LOCAL_RANK`` the GPU
``cuda:LOCAL_RANK`` and the NCCL backend; ``cpu`` (or ``auto`` without CUDA) the CPU and gloo.

Training data. Epoch ``e`` shuffles the training videos with
``np.random.default_rng((seed, e)).permutation`` (exactly the single-process order). Step ``s``
takes the next ``N * b`` videos of that order (``b = train.batch_size``, videos per process) and
splits them contiguously: rank ``r`` gets positions ``[r * n // N, (r + 1) * n // N)`` of the
``n`` videos of the step. So every rank runs ``ceil(V / (N * b))`` steps, every video is used once
per epoch, and the last step's smaller group is split as evenly as it goes (sizes differ by at most
one). Only when that last group has fewer than ``N`` videos is it padded with the first videos of
the epoch's order (those are then seen twice that epoch) so that no rank is left without a video.
The order is a function of ``(seed, epoch, N)``; with ``train.gather`` the N processes together see
exactly the batches of one process with ``train.batch_size = N * b`` (up to that padding).

Gathering with gradients. :func:`all_gather_rows` concatenates every rank's rows in rank order; its
backward sums the gradient that every rank's copy of this rank's rows received (a reduce-scatter)
and returns this rank's share. With ``train.gather`` each rank computes the loss of the *global*
batch, identical on every rank; the reduce-scatter then gives each rank ``N`` times its share of
that loss's gradient and DistributedDataParallel's mean over ranks divides it by ``N`` again: the
update is that of one process on the whole batch, with no extra scaling.

Evaluation. Each rank encodes a contiguous run of the single process's encoding batches of videos
and of queries (the same batches, so the embeddings one process computes with the same thread
count), the query embeddings are gathered, each rank ranks its videos for every query and the
ranks merge their top-k lists without loss (:func:`merge_topk_across_ranks`). A rank scores its
videos in other blocks than one process would, and a BLAS may round a dot product differently in
another block shape: the result is the single-process one bit for bit when every score is exact
in fp32, and otherwise up to the rounding of near-tied scores (see ``kdcnet.evaluate``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kdc_kernels import merge_topk

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8,
           torch.bool)
_HEADER = 8  # rows, dtype, number of trailing dims, the trailing dims (at most 5)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a job: ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, writes the run folder and shows progress bars."""
        return self.rank == 0


# ------------------------------------------------------------------------------ process group


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched as one of several); usable
    before the process group exists, e.g. to keep all but rank 0 quiet."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def current() -> World:
    """The :class:`World` of the initialised process group, or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size())


def resolve_device(name: str) -> torch.device:
    """The device of ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) for this process;
    under torchrun ``auto``/``cuda`` mean ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available to torch here (use --device cpu)")
    if not launched() or device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"--device {name}: under torchrun every process takes cuda:LOCAL_RANK; "
                         f"pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                         f"start at most that many processes per machine (--nproc_per_node)")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[World]:
    """The process group for the duration, when launched by torchrun with ``WORLD_SIZE > 1``:
    NCCL when this process's device (:func:`resolve_device`) is a GPU, gloo on the CPU. Yields
    :func:`current`. Re-entrant: inside an existing group (or a single process) it does nothing."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed: run a single process (plain kdcnet)")
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if current().size > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` (picklable) on every rank."""
    if current().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (a new tensor; ``x`` itself on one process)."""
    size = current().size
    if size == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / size


def derived_seed(*key: int) -> int:
    """A 62-bit seed that is a pure function of the integers ``key``."""
    return int(np.random.default_rng(key).integers(2**62))


# ------------------------------------------------------------------------------------- sharding


def steps_per_epoch(num_videos: int, batch_size: int, world: World) -> int:
    """Steps of one epoch: ``ceil(num_videos / (world.size * batch_size))``."""
    return -(-num_videos // (world.size * batch_size))


def epoch_videos(num_videos: int, batch_size: int, seed: int, epoch: int, world: World) -> np.ndarray:
    """Video indices rank ``world.rank`` trains on in ``epoch``, in order: consecutive runs of
    ``batch_size`` are its batches (the last may be smaller). See the module doc."""
    order = np.random.default_rng((seed, epoch)).permutation(num_videos)
    if world.size == 1:
        return order
    group = world.size * batch_size
    steps = steps_per_epoch(num_videos, batch_size, world)
    last = num_videos - (steps - 1) * group
    if last < world.size:  # pad the last group with the epoch's first videos: no rank goes empty
        order = np.concatenate([order, np.resize(order, world.size - last)])
        last = world.size
    parts = []
    for step in range(steps):
        n = group if step < steps - 1 else last
        start = step * group
        parts.append(order[start + world.rank * n // world.size:start + (world.rank + 1) * n // world.size])
    return np.concatenate(parts)


def batch_shard(num_items: int, batch_size: int, rank: int, size: int) -> range:
    """The items rank ``rank`` of ``size`` encodes: a contiguous run of the ``ceil(num_items /
    batch_size)`` batches one process would encode (empty when there are fewer batches than ranks)."""
    batches = -(-num_items // batch_size)
    lo, hi = rank * batches // size, (rank + 1) * batches // size
    return range(min(num_items, lo * batch_size), min(num_items, hi * batch_size))


# ------------------------------------------------------------------------------------ gathering


def _single(name: str):
    """``all_gather_single`` / ``reduce_scatter_single`` (torch >= 2.13; ``*_tensor`` before)."""
    return getattr(dist, f"{name}_single", None) or getattr(dist, f"{name}_tensor")


class _AllGather(torch.autograd.Function):
    """All-gather of equal-shaped tensors along dim 0; the backward reduce-scatters (sums) the
    gradients of every rank's copy and returns this rank's share."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int) -> torch.Tensor:
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        _single("all_gather")(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((grad.shape[0] // current().size, *grad.shape[1:]))
        _single("reduce_scatter")(out, grad.contiguous())
        return out, None


def _comm_device() -> torch.device:
    """Where collectives take tensors: this process's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_sizes(*sizes: int) -> list[tuple[int, ...]]:
    """Every rank's ``sizes`` (the same count of ints on each), in rank order."""
    mine = torch.tensor([sizes], dtype=torch.int64, device=_comm_device())
    return [tuple(row) for row in _AllGather.apply(mine, current().size).tolist()]


def _pad_to(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``x`` zero-padded at the end of every dim to ``shape`` (differentiable)."""
    pad = []
    for have, want in zip(reversed(x.shape), reversed(shape)):
        pad += [0, want - have]
    return F.pad(x, pad) if any(pad) else x


def _shapes(x: torch.Tensor | None) -> tuple[list[int], torch.dtype, list[int]]:
    """Every rank's row count of ``x``, and the dtype and the largest trailing dims of the ranks
    that pass a tensor (one small all-gather)."""
    trailing = [] if x is None else list(x.shape[1:])
    if len(trailing) > _HEADER - 3:
        raise ValueError(f"all_gather_rows takes at most {_HEADER - 3} trailing dims, got {len(trailing)}")
    mine = [0, -1, 0] if x is None else [x.shape[0], _DTYPES.index(x.dtype), len(trailing)]
    headers = all_gather_sizes(*mine, *trailing, *[0] * (_HEADER - 3 - len(trailing)))
    known = [h for h in headers if h[1] >= 0]
    if not known:
        raise ValueError("all_gather_rows: every rank passed None")
    ndim = known[0][2]
    return [h[0] for h in headers], _DTYPES[known[0][1]], [max(h[3 + d] for h in known) for d in range(ndim)]


def all_gather_rows(x: torch.Tensor | None, counts: Sequence[int] | None = None) -> torch.Tensor:
    """The rows of every rank's ``x [n_r, ...]`` concatenated in rank order, on ``x``'s device,
    differentiable: gradients flow back to this rank's rows (see the module doc).

    Without ``counts`` a small all-gather first exchanges the shapes: trailing dims may then differ
    between ranks (each is zero-padded to the largest) and a rank with no rows may pass None.
    With ``counts`` (every rank's ``n_r``, known to all) that exchange is skipped and every rank
    passes a tensor of the same trailing dims and dtype.
    """
    world = current()
    if world.size == 1:
        return x
    if counts is None:
        counts, dtype, trailing = _shapes(x)
    else:
        dtype, trailing = x.dtype, list(x.shape[1:])
    home, comm = (_comm_device() if x is None else x.device), _comm_device()
    if x is None:
        x = torch.zeros((0, *trailing), dtype=dtype, device=comm)
    rows = max(counts)
    out = _AllGather.apply(_pad_to(x.to(comm), [rows, *trailing]), world.size).view(world.size, rows, *trailing)
    return torch.cat([out[r, :n] for r, n in enumerate(counts)]).to(home)


def gather_batch(batch, frames: dict, queries: dict):
    """The global batch of one training step, on every rank: ``(batch, frames, queries)`` with every
    rank's videos and queries in rank order (``query_video`` re-based to the global video
    positions, frames and teacher frames zero-padded to the longest video of the step) and
    gradients flowing back to this rank's embeddings. The raw features (``videos``, ``queries``)
    are not gathered: the losses need only the embeddings."""
    world = current()
    length = next(iter(frames.values())).shape[1]
    sizes = all_gather_sizes(len(batch.video_lengths), len(batch.query_video), length)
    videos, rows, longest = [s[0] for s in sizes], [s[1] for s in sizes], max(s[2] for s in sizes)
    offset = sum(videos[:world.rank])

    def per_video(x):  # [B, ...]; frame dim 1 of [B, L, D] padded to the longest video
        if x is None:
            return None
        return all_gather_rows(_pad_to(x, [x.shape[0], longest, *x.shape[2:]]) if x.dim() == 3 else x, videos)

    def per_query(x):
        return None if x is None else all_gather_rows(x, rows)

    gathered = replace(batch, videos=None, queries=None, video_lengths=per_video(batch.video_lengths),
                       video_index=per_video(batch.video_index), teacher_videos=per_video(batch.teacher_videos),
                       query_lengths=per_query(batch.query_lengths), query_video=per_query(batch.query_video + offset),
                       query_index=per_query(batch.query_index), teacher_queries=per_query(batch.teacher_queries))
    return (gathered, {name: per_video(f) for name, f in frames.items()},
            {name: per_query(q) for name, q in queries.items()})


def merge_topk_across_ranks(scores: torch.Tensor, indices: torch.Tensor, k: int,
                            counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The global top-k ``[Nq, k]`` from every rank's top-k of its shard: ``scores [Nq,
    counts[rank]]`` (descending, ties to the lower index, NaN last) with *global* video indices,
    rank r's shard holding lower indices than rank r + 1's; ``counts`` (every rank's list length)
    is known to all. Rank by rank, each list is broadcast and merged into a running best list with
    a stable sort that keeps earlier (lower-index) entries first on ties and NaN last, so the
    result is the top-k of all the ranks' scores as given, ties to the lower global index. Peak
    memory ``O(Nq * k)`` per rank."""
    world = current()
    if world.size == 1:
        return scores, indices
    device = scores.device
    nq = scores.shape[0]
    best_s = torch.empty(nq, 0, dtype=scores.dtype, device=_comm_device())
    best_i = torch.empty(nq, 0, dtype=torch.int64, device=best_s.device)
    for src, n in enumerate(counts):
        if n == 0:
            continue
        if src == world.rank:
            s, i = scores.to(best_s.device).contiguous(), indices.to(best_s.device, torch.int64).contiguous()
        else:
            s, i = best_s.new_empty(nq, n), best_i.new_empty(nq, n)
        dist.broadcast(s, src)
        dist.broadcast(i, src)
        best_s, best_i = merge_topk(best_s, best_i, s, i, k)
    return best_s.to(device), best_i.to(device)


def shard_counts(num_items: int, batch_size: int, k: int | None = None) -> list[int]:
    """Every rank's :func:`batch_shard` size (capped at ``k`` when given)."""
    world = current()
    sizes = [len(batch_shard(num_items, batch_size, r, world.size)) for r in range(world.size)]
    return sizes if k is None else [min(k, n) for n in sizes]

