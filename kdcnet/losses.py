r"""KDC-Net training losses: triplet ranking and InfoNCE per branch, and knowledge-refined
distillation (KRD) from a frozen CLIP teacher into the inheritance branch.

A batch holds B videos and all Nq captions of those videos; ``query_video[n]`` is the batch index
of caption n's video. Per branch b, with ``s_b = max_similarity(q_b, F_b)`` (cosine) ``[Nq, B]``
and ``u_b = max_similarity(q_b, F_b, normalize=False)`` (raw max dot product)::

    trip_b = mean_n relu(m + s[n, neg(n)] - s[n, pos(n)])              text-to-video
           + mean_v relu(m + max_{n not of v} s[n, v] - mean_{n of v} s[n, v])   video-to-text
             (random negatives instead of the hard ones before loss.hard_negative_start_epoch)
    nce_b  = mean_n (logsumexp_v u[n, :] - u[n, pos(n)])                text-to-video
           + mean_v (logsumexp_n u[:, v] - logsumexp_{n of v} u[n, v])  video-to-text

KRD on the inheritance branch (teacher features c, L2-normalised; temperature tau = 0.2)::

    c~_{v,i} = mean of c^_{v,j} over valid j with |i - j| <= krd_window // 2   (refinement)
    t~_i(n)  = <c^_n, c~_{pos(n), i}>,     s_i(n) = cos(q_inh_n, F_inh[pos(n), i])
    kl_seg   = sum_n KL(softmax_i(t~(n) / tau) || softmax_i(s(n) / tau))   over valid frames i
    T[n, v]  = max_i <c^_n, c~_{v,i}>   (max_similarity on the refined features)
    kl_obj   = mean_n KL(softmax_v(T[n] / tau) || softmax_v(S_inh[n] / tau))
             + mean_v KL(softmax_n(T[:, v] / tau) || softmax_n(S_inh[:, v] / tau))
    total    = sum_b (trip_b + nce_weight * nce_b) + lambda(e) * (kl_seg + kl_obj)

Choices the model specification leaves open, made here:

* The t2v negative is drawn uniformly among the ``min(hard_negatives, B - 1)`` highest-scoring
  other videos of the batch, with torch's global CPU generator (restored on resume), so the
  hardest negative is one of the candidates. Before epoch ``hard_negative_start_epoch`` (MS-SL's
  schedule) the negatives are random instead: the t2v one uniform among all other videos, the v2t
  one uniform among the other videos' queries. Hard negatives from the first step can drive a
  freshly initialised branch to the degenerate point where every score is equal (loss 2 x margin). (Several processes draw with a generator seeded by
  ``(seed, epoch)``, the same on every rank, so gathered global batches get the same negatives
  on every rank.)
* Reduction: triplet and InfoNCE terms are means (over queries for t2v, over videos for v2t), so
  the loss scale does not grow with the batch; kl_seg is a sum over queries and kl_obj a batch
  mean, as the specification writes them (``loss.krd_segment_reduction=mean`` averages kl_seg instead; the
  sum makes distillation the strongest signal early in training, which is what lets the
  synthetic demo learn in a few epochs).
* Every distillation quantity is computed in fp32 with autocast off (temperature 0.2 magnifies
  bf16 rounding of the cosines).
* A video with no negative query (B = 1) contributes no v2t triplet term; a batch with one video
  no t2v triplet term.
* InfoNCE uses temperature 1 on the raw max dot product; v2t treats every caption of the video as
  a positive (log of the summed positive probability).
* The refined teacher features are the plain window average (no re-normalisation to unit length),
  so ``t~`` is exactly the box-smoothed teacher curve; the teacher is never differentiated.
* ``lambda(e)``: exponential ``kd_weight * kd_decay^e``, linear ``kd_weight * (1 - e / epochs)``,
  or constant ``kd_weight`` (e counted from 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdc_kernels import max_similarity

from .config import LossConfig
from .model import length_mask

LOSS_TERMS = ("trip_inh", "nce_inh", "trip_exp", "nce_exp", "kl_seg", "kl_obj")
_SHORT = {"inheritance": "inh", "exploration": "exp"}


def kd_weight(cfg: LossConfig, epoch: int, epochs: int) -> float:
    """Distillation weight lambda(e) for epoch ``epoch`` (from 0) of ``epochs``; 0 when off."""
    if not cfg.distill:
        return 0.0
    if cfg.kd_schedule == "exponential":
        return cfg.kd_weight * cfg.kd_decay**epoch
    if cfg.kd_schedule == "linear":
        return cfg.kd_weight * max(0.0, 1.0 - epoch / max(1, epochs))
    return cfg.kd_weight


def _own_mask(query_video: torch.Tensor, num_videos: int) -> torch.Tensor:
    """``[Nq, B]`` bool, True where caption n belongs to video v."""
    return query_video[:, None] == torch.arange(num_videos, device=query_video.device)[None, :]


def triplet_loss(scores: torch.Tensor, query_video: torch.Tensor, margin: float, hard_negatives: int,
                 generator: torch.Generator | None = None, *, hard: bool = True) -> torch.Tensor:
    """Bidirectional triplet ranking on a cosine score matrix ``scores [Nq, B]`` (see module doc);
    the t2v negatives are drawn with ``generator`` (a CPU generator; None: torch's global one).

    ``hard=False`` samples MS-SL's random negatives instead (its first epochs): the t2v negative
    uniformly among all other videos of the batch, the v2t negative uniformly among the queries
    of other videos (both with ``generator``)."""
    nq, nv = scores.shape
    own = _own_mask(query_video, nv)
    zero = scores.new_zeros(())
    t2v = v2t = zero
    if nv >= 2:
        pos = scores.gather(1, query_video[:, None]).squeeze(1)  # [Nq]
        kk = min(hard_negatives, nv - 1) if hard else nv - 1
        hardest = scores.detach().masked_fill(own, float("-inf")).topk(kk, dim=1).indices  # [Nq, kk]
        pick = torch.randint(0, kk, (nq, 1), generator=generator).to(scores.device)
        neg = scores.gather(1, hardest.gather(1, pick)).squeeze(1)
        t2v = F.relu(margin + neg - pos).mean()
    count = own.sum(dim=0)  # captions per video
    has_neg = count < nq
    use = ((count > 0) & has_neg).to(scores.dtype)  # videos with a positive and a negative query
    # Masked sums rather than boolean indexing or `if use.any()`: no host-device sync per step.
    pos_v = (scores * own).sum(dim=0) / count.clamp_min(1)
    if hard:
        neg_v = scores.masked_fill(own, float("-inf")).amax(dim=0)
    else:  # a uniform random query of another video: the argmax of uniform keys over the negatives
        keys = torch.rand(nq, nv, generator=generator).to(scores.device).masked_fill(own, -1.0)
        neg_v = scores.gather(0, keys.argmax(dim=0, keepdim=True)).squeeze(0)
    # relu(margin - inf) = 0 where a video has no negative, so masked entries add exact zeros
    v2t = (F.relu(margin + neg_v - pos_v) * use).sum() / use.sum().clamp_min(1)
    return t2v + v2t


def hard_negatives_on(cfg: LossConfig, epoch: int | None) -> bool:
    """Whether epoch ``epoch`` (from 0) samples hard negatives: from ``loss.hard_negative_start_epoch``
    on (MS-SL's schedule; random negatives before), always when ``epoch`` is None."""
    return epoch is None or epoch >= cfg.hard_negative_start_epoch


def infonce_loss(dots: torch.Tensor, query_video: torch.Tensor) -> torch.Tensor:
    """Bidirectional InfoNCE on the raw max dot product ``dots [Nq, B]`` (see module doc)."""
    own = _own_mask(query_video, dots.shape[1])
    t2v = (torch.logsumexp(dots, dim=1) - dots.gather(1, query_video[:, None]).squeeze(1)).mean()
    has = own.any(dim=0)
    pos = torch.logsumexp(dots.masked_fill(~own, float("-inf")), dim=0)
    v2t = (torch.logsumexp(dots, dim=0) - pos)[has].mean()
    return t2v + v2t


def refine_teacher_frames(teacher: torch.Tensor, lengths: torch.Tensor, window: int) -> torch.Tensor:
    """Temporal-continuity refinement: each valid frame becomes the mean of the L2-normalised
    teacher frames within ``window // 2`` of it that are valid (fewer at borders and before
    padding: the average is renormalised by the count). ``teacher [B, L, Dt] -> [B, L, Dt]``,
    padded frames zero. ``window = 1`` only normalises."""
    mask = length_mask(lengths, teacher.shape[1])[..., None]  # [B, L, 1]
    valid = mask.to(teacher.dtype)
    c = torch.where(mask, F.normalize(teacher, dim=-1), 0.0)  # padded frames may hold anything, even NaN
    radius = window // 2
    if radius == 0:
        return c
    L = c.shape[1]
    padded_c = F.pad(c, (0, 0, radius, radius))
    padded_v = F.pad(valid, (0, 0, radius, radius))
    total = sum(padded_c[:, s : s + L] for s in range(2 * radius + 1))
    count = sum(padded_v[:, s : s + L] for s in range(2 * radius + 1))
    return total / count.clamp_min(1.0) * valid


def _kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor, dim: int) -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(student))`` along ``dim``; -inf logits are excluded."""
    log_p = torch.log_softmax(teacher_logits, dim=dim)
    log_q = torch.log_softmax(student_logits, dim=dim)
    p = log_p.exp()
    term = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return term.sum(dim=dim)


def segment_kl(teacher_curve: torch.Tensor, student_curve: torch.Tensor, valid: torch.Tensor,
               temperature: float, reduction: str = "sum") -> torch.Tensor:
    """Segment-aware KL summed (or averaged) over queries: curves ``[Nq, L]``, ``valid [Nq, L]`` bool."""
    t = (teacher_curve / temperature).masked_fill(~valid, float("-inf"))
    s = (student_curve / temperature).masked_fill(~valid, float("-inf"))
    per_query = _kl_rows(t, s, dim=1)
    return per_query.sum() if reduction == "sum" else per_query.mean()


def objective_kl(teacher_scores: torch.Tensor, student_scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Objective-aligned KL over videos (per query) plus over queries (per video), batch means."""
    t, s = teacher_scores / temperature, student_scores / temperature
    return _kl_rows(t, s, dim=1).mean() + _kl_rows(t, s, dim=0).mean()


def distillation_losses(cfg: LossConfig, batch, queries: torch.Tensor, frames: torch.Tensor,
                        scores: torch.Tensor, impl=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kl_seg, kl_obj)`` for the inheritance branch: ``queries [Nq, d]``, ``frames [B, L, d]``,
    cosine ``scores [Nq, B]``; the teacher comes from ``batch.teacher_videos / teacher_queries``."""
    kl_seg = kl_obj = scores.new_zeros(())
    lengths, qv = batch.video_lengths, batch.query_video
    with torch.autocast(scores.device.type, enabled=False), torch.no_grad():  # fp32: KL at temperature 0.2
        refined = refine_teacher_frames(batch.teacher_videos.float(), lengths, cfg.krd_window)
        cq = F.normalize(batch.teacher_queries.float(), dim=-1)
        teacher_curve = torch.einsum("nd,nld->nl", cq, refined[qv]) if cfg.krd_segment else None
        teacher_scores = max_similarity(cq, refined, lengths, normalize=False, impl=impl) if cfg.krd_objective else None
    with torch.autocast(scores.device.type, enabled=False):
        if cfg.krd_segment:
            student_curve = torch.einsum("nd,nld->nl", F.normalize(queries.float(), dim=-1),
                                         F.normalize(frames.float(), dim=-1)[qv])
            valid = length_mask(lengths[qv], frames.shape[1])
            kl_seg = segment_kl(teacher_curve, student_curve, valid, cfg.kd_temperature, cfg.krd_segment_reduction)
        if cfg.krd_objective:
            kl_obj = objective_kl(teacher_scores, scores.float(), cfg.kd_temperature)
    return kl_seg, kl_obj


def embedding_losses(model, batch, frames: dict, queries: dict, cfg: LossConfig, kd_lambda: float, *,
                     generator: torch.Generator | None = None, epoch: int | None = None) -> dict[str, torch.Tensor]:
    """Every loss term of one batch (each a scalar tensor) plus ``"total"`` (the one to minimise),
    from the batch's embeddings ``frames {branch: [B, L, d]}`` and ``queries {branch: [Nq, d]}``
    (``model.encode_videos`` / ``encode_queries``; ``model`` only scores them here). ``batch``
    supplies ``video_lengths``, ``query_video`` and the teacher features.

    ``kd_lambda`` is :func:`kd_weight` of the epoch (0 skips distillation). Terms that are switched
    off are 0. ``generator``: see :func:`triplet_loss`; ``epoch`` (from 0) selects random or hard
    negatives (:func:`hard_negatives_on`; None: hard).
    """
    lengths, qv = batch.video_lengths, batch.query_video
    cos = model.branch_scores(queries, frames, lengths)
    dots = model.branch_scores(queries, frames, lengths, normalize=False)
    terms: dict[str, torch.Tensor] = {}
    total = cos["inheritance"].new_zeros(())
    hard = hard_negatives_on(cfg, epoch)
    for name in cos:
        short = _SHORT[name]
        terms[f"trip_{short}"] = triplet_loss(cos[name], qv, cfg.margin, cfg.hard_negatives, generator, hard=hard)
        terms[f"nce_{short}"] = infonce_loss(dots[name].float(), qv)
        total = total + terms[f"trip_{short}"] + cfg.nce_weight * terms[f"nce_{short}"]
    terms["kl_seg"] = terms["kl_obj"] = total.new_zeros(())
    if kd_lambda > 0 and batch.teacher_videos is not None and batch.teacher_queries is not None:
        terms["kl_seg"], terms["kl_obj"] = distillation_losses(
            cfg, batch, queries["inheritance"], frames["inheritance"], cos["inheritance"], impl=model.impl)
        total = total + kd_lambda * (terms["kl_seg"] + terms["kl_obj"])
    terms["total"] = total
    return terms
