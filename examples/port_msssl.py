"""Port an MS-SL-style PRVR model to kdc_kernels: clip-scale scoring and evaluation ranking.

PRVR codebases (MS-SL, DL-DKD, GMMFormer) score a query against a video by the best of its clips:
normalise, one einsum to a ``[Nq, L, Nv]`` similarity tensor, mask the padded clips, max over L;
evaluation then ranks every video for every query with an argsort of the full ``[Nq, Nv]`` matrix.
``ClipScaleScorer`` below is such a module, written in that style (it is not their code). The
port replaces two calls and nothing else:

* ``ClipScaleScorer.scores``  ->  ``kdc_kernels.max_similarity(query, clips, mask=video_mask)``
  (the same float ``video_mask`` the codebase passes; gradients too);
* the argsort ranking          ->  ``kdc_kernels.max_similarity_topk(..., k=100)`` (no ``[Nq, Nv]``
  matrix at all on the fast paths).

The script checks that scores, gradients and recalls agree, shows that the fp16 path of a
``-1e10`` additive mask (DL-DKD style) returns NaN where the op does not, and prints the peak
memory of both scorings on the same inputs (CUDA: the allocator's peak; CPU: the process's peak
resident memory, Linux only).

    python examples/port_msssl.py                                  # 2000 queries x 1000 videos
    python examples/port_msssl.py --queries 64 --videos 40 --clips 16 --dim 32   # seconds
    python examples/port_msssl.py --device cuda
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import kdc_kernels as K


# --- the codebase's side (written in its style) -----------------------------------------------------


class ClipScaleScorer(nn.Module):
    """Clip-scale similarity as PRVR codebases compute it: cosine of every (query, clip) pair in
    one ``[Nq, L, Nv]`` tensor, padded clips masked out, best clip per video."""

    @staticmethod
    def scores(query: torch.Tensor, clip_feat: torch.Tensor, video_mask: torch.Tensor | None = None):
        query = F.normalize(query, dim=-1)  # [Nq, D]
        clip_feat = F.normalize(clip_feat, dim=-1)  # [Nv, L, D]
        sims = torch.einsum("qd,vld->qlv", query, clip_feat)  # [Nq, L, Nv]
        if video_mask is not None:  # float [Nv, L], 1 = valid clip
            sims = sims.masked_fill(video_mask.t().unsqueeze(0) == 0, float("-inf"))
        return sims.max(dim=1).values  # [Nq, Nv]

    @staticmethod
    def additive_mask_scores(query, clip_feat, video_mask):
        """The other common masking: add ``(1 - mask) * -1e10`` to the similarities."""
        sims = torch.einsum("qd,vld->qlv", F.normalize(query, dim=-1), F.normalize(clip_feat, dim=-1))
        mask = video_mask.t().unsqueeze(0).to(sims.dtype)
        return (sims * mask + (1 - mask) * -1e10).max(dim=1).values


def recalls_by_argsort(scores: torch.Tensor, gt: torch.Tensor, ks=(1, 5, 10, 100)) -> dict:
    """R@k (in %) the codebase way: sort every video for every query, find the true video."""
    order = torch.argsort(-scores, dim=1, stable=True)  # [Nq, Nv]
    rank = (order == gt[:, None]).float().argmax(dim=1) + 1
    return {k: 100.0 * float((rank <= k).float().mean()) for k in ks}


# --- the port ----------------------------------------------------------------------------------------


def kdc_scores(query, clip_feat, video_mask=None):
    return K.max_similarity(query, clip_feat, mask=video_mask)  # [Nq, Nv] float32


def recalls_by_topk(query, clip_feat, video_mask, gt, ks=(1, 5, 10, 100)) -> dict:
    """R@k from the top max(ks) list only; the [Nq, Nv] score matrix is never built."""
    k = min(max(ks), clip_feat.shape[0])
    _, videos = K.max_similarity_topk(query, clip_feat, k=k, mask=video_mask)  # [Nq, k]
    hit = videos == gt[:, None]
    rank = torch.where(hit.any(1), hit.float().argmax(1) + 1, k + 1)
    return {kk: 100.0 * float((rank <= kk).float().mean()) for kk in ks}


# --- measuring ---------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mib(fn, device: torch.device) -> tuple[object, float | None]:
    """(fn(), peak extra memory in MiB while it ran, or None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:  # Linux: reset the process's peak resident memory, run, read the new peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return fn(), None
    base = _rss_kib("VmRSS")
    out = fn()
    peak = _rss_kib("VmHWM")
    return out, None if base is None or peak is None else (peak - base) / 1024


def make_data(nq, nv, L, D, device, seed=0):
    """Queries, clip features, an MS-SL-style float video_mask (ragged lengths, one empty video
    none of the queries belongs to) and each query's true video."""
    g = torch.Generator().manual_seed(seed)
    clips = torch.randn(nv, L, D, generator=g)
    lengths = torch.randint(1, L + 1, (nv,), generator=g)
    lengths[-1] = 0 if nv > 1 else lengths[-1]
    video_mask = (torch.arange(L)[None, :] < lengths[:, None]).float()
    clips = clips * video_mask[..., None]  # zero padding, as a collate function leaves it
    gt = torch.randint(0, max(1, nv - 1), (nq,), generator=g)
    # each query resembles one valid clip of its video
    pick = (torch.rand(nq, generator=g) * lengths[gt].clamp_min(1)).long()
    query = clips[gt, pick] + 5.0 * torch.randn(nq, D, generator=g)
    return query.to(device), clips.to(device), video_mask.to(device), gt.to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--videos", type=int, default=1000)
    p.add_argument("--clips", type=int, default=32, help="clips per video (L)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    query, clips, video_mask, gt = make_data(args.queries, args.videos, args.clips, args.dim, device)
    print(f"{args.queries} queries x {args.videos} videos x {args.clips} clips x {args.dim} dims on {device}")

    # 1. clip-scale scores: the same numbers (fp32 sums in another order: rounding-level differences)
    with torch.no_grad():
        theirs, mem_theirs = peak_memory_mib(lambda: ClipScaleScorer.scores(query, clips, video_mask), device)
        ours, mem_ours = peak_memory_mib(lambda: kdc_scores(query, clips, video_mask), device)
    assert torch.equal(torch.isinf(theirs), torch.isinf(ours)), "the same (empty) videos score -inf"
    assert torch.all(ours[:, -1] == float("-inf")), "an empty video scores -inf"
    finite = torch.isfinite(theirs)
    err = float((theirs[finite] - ours[finite]).abs().max())
    assert err <= 1e-5, f"scores differ by {err}"

    # 2. training: the same gradients (to the query and to the argmax clip only)
    n = min(64, args.queries)
    grads = []
    for scorer in (ClipScaleScorer.scores, kdc_scores):
        q, c = query[:n].clone().requires_grad_(True), clips.clone().requires_grad_(True)
        s = scorer(q, c, video_mask)
        F.cross_entropy(s[:, :-1] * 20, gt[:n]).backward()  # the empty video left out of the loss
        grads.append((q.grad, c.grad))
    for (a, b), name in zip(zip(*grads), ("query", "clips")):
        gerr = float((a - b).abs().max())
        assert gerr <= 1e-5, f"d{name} differs by {gerr}"

    # 3. evaluation: recalls from a full argsort and from the top-100 lists agree
    with torch.no_grad():
        r_theirs, mem_rank_theirs = peak_memory_mib(
            lambda: recalls_by_argsort(ClipScaleScorer.scores(query, clips, video_mask), gt), device)
        r_ours, mem_rank_ours = peak_memory_mib(lambda: recalls_by_topk(query, clips, video_mask, gt), device)
    assert r_theirs == r_ours, (r_theirs, r_ours)

    # 4. fp16: the additive -1e10 mask overflows to -inf, and (1 - 1) * -inf is NaN
    small = slice(0, min(8, args.queries))
    half = (query[small].half(), clips[: min(8, args.videos)].half(), video_mask[: min(8, args.videos)])
    try:
        additive = ClipScaleScorer.additive_mask_scores(*half)
        additive_nan = bool(torch.isnan(additive).any())
    except RuntimeError:  # an fp16 einsum this torch build cannot run on this device
        additive_nan = None
    op_half = K.max_similarity(half[0], half[1], mask=half[2])
    assert not torch.isnan(op_half).any()

    def mib(x):
        return "n/a" if x is None else f"{x:.1f} MiB"

    recall = ", ".join(f"R@{k} {v:.1f}" for k, v in r_ours.items())
    print(f"scores agree (max abs diff {err:.1e}); gradients agree; recalls agree: {recall}")
    print(f"peak memory of the scores: codebase einsum {mib(mem_theirs)}, kdc_kernels.max_similarity {mib(mem_ours)}")
    print(f"peak memory of scoring + ranking: codebase einsum + argsort {mib(mem_rank_theirs)}, "
          f"kdc_kernels.max_similarity_topk {mib(mem_rank_ours)}")
    if additive_nan is not None:
        print(f"fp16 with a -1e10 additive mask: NaN scores: {additive_nan}; kdc_kernels in fp16: NaN: False")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    raise SystemExit(main())
