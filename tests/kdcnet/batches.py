"""Tiny in-memory batches and configs for the kdcnet unit tests."""

from __future__ import annotations

import torch

from kdcnet.config import preset

from kdcnet.data import Batch


def tiny_config(**model):
    cfg = preset("synthetic")
    cfg.model.d, cfg.model.heads, cfg.model.dropout = 16, 2, 0.0
    cfg.model.visual_dim, cfg.model.text_dim = 12, 10
    cfg.data.max_frames, cfg.data.max_tokens = 24, 12
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def make_batch(video_lengths=(7, 3, 5), caps_per_video=(2, 1, 3), query_lengths=None, *, Dv=12, Dq=10, Dt=8,
               teacher=True, seed=0):
    """A batch of ``len(video_lengths)`` videos with ``caps_per_video`` captions each, zero-padded,
    features L2-normalised per row."""
    g = torch.Generator().manual_seed(seed)
    B = len(video_lengths)
    query_video = torch.tensor([v for v, n in enumerate(caps_per_video) for _ in range(n)])
    nq = len(query_video)
    if query_lengths is None:
        query_lengths = [1 + (3 * n) % 6 for n in range(nq)]

    def padded(lengths, dim):
        x = torch.nn.functional.normalize(torch.randn(len(lengths), max(lengths), dim, generator=g), dim=-1)
        return x * (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None])[..., None]

    return Batch(
        videos=padded(video_lengths, Dv),
        video_lengths=torch.tensor(video_lengths),
        queries=padded(query_lengths, Dq),
        query_lengths=torch.tensor(query_lengths),
        query_video=query_video,
        teacher_videos=padded(video_lengths, Dt) if teacher else None,
        teacher_queries=torch.nn.functional.normalize(torch.randn(nq, Dt, generator=g), dim=-1) if teacher else None,
        video_index=torch.arange(B),
        query_index=torch.arange(nq),
    )


def repad(batch, frames: int = 0, tokens: int = 0, value: float = 7.0):
    """A copy of ``batch`` with ``frames`` / ``tokens`` more padded positions, every padded
    position (old and new) holding ``value`` instead of zeros."""

    def grow(x, lengths, extra):
        if x is None:
            return None
        out = torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], dim=1)
        out[torch.arange(out.shape[1])[None, :] >= lengths[:, None]] = value
        return out

    fields = dict(vars(batch))
    fields["videos"] = grow(batch.videos, batch.video_lengths, frames)
    fields["teacher_videos"] = grow(batch.teacher_videos, batch.video_lengths, frames)
    fields["queries"] = grow(batch.queries, batch.query_lengths, tokens)
    return Batch(**fields)
