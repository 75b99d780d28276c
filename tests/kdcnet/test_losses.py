"""Every loss term against a hand computation on a tiny batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcnet import losses as Lo
from kdcnet.config import LossConfig, apply_overrides, preset
from kdcnet.model import KDCNet

from .batches import make_batch, repad, tiny_config

QV = torch.tensor([0, 0, 1])
S = torch.tensor([[0.8, 0.5], [0.4, 0.6], [0.3, 0.7]])


def lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def kl(p_logits, q_logits):
    p = [math.exp(x - lse(*p_logits)) for x in p_logits]
    q = [math.exp(x - lse(*q_logits)) for x in q_logits]
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_triplet_by_hand():
    # t2v: q0 relu(.2+.5-.8)=0, q1 relu(.2+.6-.4)=.4, q2 relu(.2+.3-.7)=0   -> mean .4/3
    # v2t: v0 pos mean(.8,.4)=.6, hardest other query .3 -> 0; v1 pos .7, hardest .6 -> .1 -> mean .05
    got = Lo.triplet_loss(S, QV, margin=0.2, hard_negatives=20)
    assert abs(float(got) - (0.4 / 3 + 0.05)) < 1e-6


def test_triplet_negative_is_drawn_among_the_hardest():
    scores = torch.tensor([[0.5, 0.9, 0.7, 0.1]])  # one query of video 0; negatives .9 > .7 > .1
    seen = {round(float(Lo.triplet_loss(scores, torch.tensor([0]), 0.2, hard_negatives=2)), 4) for _ in range(60)}
    assert seen == {0.6, 0.4}  # .2 + .9 - .5 and .2 + .7 - .5, never the third-hardest (0)
    assert {round(float(Lo.triplet_loss(scores, torch.tensor([0]), 0.2, 1)), 4) for _ in range(10)} == {0.6}


def test_random_negatives_before_the_hard_ones():
    """MS-SL's first epochs: the t2v negative uniform among all other videos, the v2t negative
    uniform among the other videos' queries (not the hardest)."""
    scores = torch.tensor([[0.5, 0.9, 0.7, 0.1]])  # one query of video 0
    g = torch.Generator().manual_seed(0)
    t2v = {round(float(Lo.triplet_loss(scores, torch.tensor([0]), 0.2, 1, g, hard=False)), 4) for _ in range(80)}
    assert t2v == {0.6, 0.4, 0.0}                  # every negative, the third-hardest (.1) included
    # v2t alone (every t2v term is 0): video 0 owns q0, q1; video 1 owns q2, q3, q4 (mean .4667) and
    # its negative queries q0, q1 score .8 and .1: hardest -> .2 + .8 - .4667, random -> that or 0
    s = torch.tensor([[1.0, 0.8], [1.0, 0.1], [-1.0, 0.9], [-1.0, 0.5], [-1.0, 0.0]])
    qv = torch.tensor([0, 0, 1, 1, 1])
    hard = (0.2 + 0.8 - 1.4 / 3) / 2             # mean over the two videos (video 0's term is 0)
    assert abs(float(Lo.triplet_loss(s, qv, 0.2, 1, hard=True)) - hard) < 1e-6
    drawn = {round(float(Lo.triplet_loss(s, qv, 0.2, 1, g, hard=False)), 4) for _ in range(60)}
    assert drawn == {round(hard, 4), 0.0}


def test_hard_negative_schedule_flag():
    cfg = LossConfig(hard_negative_start_epoch=2)
    assert [Lo.hard_negatives_on(cfg, e) for e in (0, 1, 2, 9, None)] == [False, False, True, True, True]
    assert Lo.hard_negatives_on(LossConfig(hard_negative_start_epoch=0), 0)
    assert preset("tvr").loss.hard_negative_start_epoch == 20 and preset("synthetic").loss.hard_negative_start_epoch == 2
    with pytest.raises(ValueError, match="loss.hard_negative_start_epoch must be an int >= 0"):
        apply_overrides(preset("synthetic"), ["loss.hard_negative_start_epoch=-1"])


def test_triplet_single_video_batch_is_zero():
    assert float(Lo.triplet_loss(torch.tensor([[0.3], [0.1]]), torch.tensor([0, 0]), 0.2, 20)) == 0.0


def test_infonce_by_hand():
    u = S * 3
    t2v = sum(lse(*u[n].tolist()) - float(u[n, QV[n]]) for n in range(3)) / 3
    v0 = lse(*u[:, 0].tolist()) - lse(float(u[0, 0]), float(u[1, 0]))
    v1 = lse(*u[:, 1].tolist()) - float(u[2, 1])
    assert abs(float(Lo.infonce_loss(u, QV)) - (t2v + (v0 + v1) / 2)) < 1e-5


def test_refinement_by_hand():
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [2.0, 0.0], [5.0, 5.0]]])  # frame 3 is padding
    lengths = torch.tensor([3])
    smooth = Lo.refine_teacher_frames(teacher, lengths, 3)
    expected = torch.tensor([[[0.5, 0.5], [2 / 3, 1 / 3], [0.5, 0.5], [0.0, 0.0]]])
    torch.testing.assert_close(smooth, expected)
    torch.testing.assert_close(Lo.refine_teacher_frames(teacher, lengths, 1),
                               torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]]))
    wide = Lo.refine_teacher_frames(teacher, lengths, 5)
    torch.testing.assert_close(wide[0, 0], torch.tensor([2 / 3, 1 / 3]))  # frames 0..2 (3 is padding)


def test_refined_teacher_targets_are_the_box_smoothed_curve_of_the_specification():
    """SPEC: t~ = box-smoothing of t_i = cos(c_q, c_{v,i}) along i (window w), renormalised at the
    video's borders and before padding; T[q, v] = max_i t~_i; the segment target is
    softmax_i(t~_i / 0.2). Teacher frames are built so that the raw curve is t = (.9, .1, -.2, .5)
    over 4 valid frames (a 5th, padded frame holds garbage)."""
    t = [0.9, 0.1, -0.2, 0.5]
    frames = torch.tensor([[[3 * x, 3 * math.sqrt(1 - x * x)] for x in t] + [[float("nan"), 7.0]]])  # any norm
    query = torch.tensor([[2.0, 0.0]])
    lengths = torch.tensor([4])
    by_hand = {1: t,
               3: [(0.9 + 0.1) / 2, (0.9 + 0.1 - 0.2) / 3, (0.1 - 0.2 + 0.5) / 3, (-0.2 + 0.5) / 2],
               5: [(0.9 + 0.1 - 0.2) / 3, (0.9 + 0.1 - 0.2 + 0.5) / 4, (0.9 + 0.1 - 0.2 + 0.5) / 4, (0.1 - 0.2 + 0.5) / 3]}
    for window, want in by_hand.items():
        refined = Lo.refine_teacher_frames(frames, lengths, window)
        curve = (F.normalize(query, dim=-1) @ refined[0].T)[0]
        torch.testing.assert_close(curve, torch.tensor(want + [0.0]), atol=1e-6, rtol=0)
        score = Lo.max_similarity(F.normalize(query, dim=-1), refined, lengths, normalize=False)
        assert abs(float(score) - max(want)) < 1e-6
        # the segment-aware target the student is pulled to: KL is 0 exactly when the student's
        # curve equals the refined teacher curve on the valid frames (padding is ignored)
        student = torch.tensor([want + [123.0]])
        valid = torch.tensor([[True] * 4 + [False]])
        assert abs(float(Lo.segment_kl(curve[None], student, valid, 0.2))) < 1e-6
    # the window flattens a short peak: what it costs on data with short, sharp-edged moments
    assert max(by_hand[3]) < max(by_hand[1]) and max(by_hand[5]) < max(by_hand[3])


def test_segment_and_objective_kl_by_hand():
    teacher = torch.tensor([[0.2, 0.4, 9.0], [0.1, -0.3, 0.5]])
    student = torch.tensor([[0.1, 0.1, -9.0], [0.3, 0.2, 0.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    expected = kl([1.0, 2.0], [0.5, 0.5]) + kl([0.5, -1.5, 2.5], [1.5, 1.0, 0.0])
    assert abs(float(Lo.segment_kl(teacher, student, valid, 0.2)) - expected) < 1e-5

    T = torch.tensor([[0.5, 0.1, 0.2], [0.0, 0.3, 0.4]])
    Sx = torch.tensor([[0.4, 0.4, 0.1], [0.2, 0.1, 0.6]])
    rows = sum(kl((T[n] / 0.2).tolist(), (Sx[n] / 0.2).tolist()) for n in range(2)) / 2
    cols = sum(kl((T[:, v] / 0.2).tolist(), (Sx[:, v] / 0.2).tolist()) for v in range(3)) / 3
    assert abs(float(Lo.objective_kl(T, Sx, 0.2)) - (rows + cols)) < 1e-5


def test_kd_weight_schedules():
    cfg = LossConfig()
    assert [round(Lo.kd_weight(cfg, e, 10), 6) for e in (0, 1, 2)] == [0.1, 0.095, 0.09025]
    cfg.kd_schedule = "linear"
    assert [round(Lo.kd_weight(cfg, e, 10), 6) for e in (0, 5, 10)] == [0.1, 0.05, 0.0]
    cfg.kd_schedule = "constant"
    assert Lo.kd_weight(cfg, 7, 10) == 0.1
    cfg.distill = False
    assert Lo.kd_weight(cfg, 0, 10) == 0.0


@torch.no_grad()
def _explicit_losses(model, batch, cfg: LossConfig, lam: float) -> dict:
    """All terms, one query / video at a time from the model's embeddings (B = 3, hardest
    negative: hard_negatives = 1 makes the t2v choice deterministic)."""
    frames, queries = model.encode_videos(batch), model.encode_queries(batch)
    lengths, qv = batch.video_lengths.tolist(), batch.query_video.tolist()
    nq, B = len(qv), len(lengths)
    out = {}
    cos_inh = None
    for name, short in (("inheritance", "inh"), ("exploration", "exp")):
        q, f = queries[name], frames[name]
        cos = torch.stack([torch.stack([(F.normalize(q[n], dim=0) @ F.normalize(f[v, :lengths[v]], dim=1).T).max()
                                        for v in range(B)]) for n in range(nq)])
        dot = torch.stack([torch.stack([(q[n] @ f[v, :lengths[v]].T).max() for v in range(B)]) for n in range(nq)])
        t2v = sum(torch.relu(cfg.margin + max(cos[n, v] for v in range(B) if v != qv[n]) - cos[n, qv[n]])
                  for n in range(nq)) / nq
        v2t = sum(torch.relu(cfg.margin + max(cos[n, v] for n in range(nq) if qv[n] != v)
                             - sum(cos[n, v] for n in range(nq) if qv[n] == v) / qv.count(v)) for v in range(B)) / B
        out[f"trip_{short}"] = t2v + v2t
        nce_t = sum(torch.logsumexp(dot[n], 0) - dot[n, qv[n]] for n in range(nq)) / nq
        nce_v = sum(torch.logsumexp(dot[:, v], 0) - torch.logsumexp(dot[[n for n in range(nq) if qv[n] == v], v], 0)
                    for v in range(B)) / B
        out[f"nce_{short}"] = nce_t + nce_v
        if name == "inheritance":
            cos_inh = cos
    tv, tq = batch.teacher_videos, F.normalize(batch.teacher_queries, dim=1)
    r = cfg.krd_window // 2

    def refined(v, i):
        js = [j for j in range(i - r, i + r + 1) if 0 <= j < lengths[v]]
        return sum(F.normalize(tv[v, j], dim=0) for j in js) / len(js)

    curve = [[float(tq[n] @ refined(qv[n], i)) for i in range(lengths[qv[n]])] for n in range(nq)]
    q, f = F.normalize(queries["inheritance"], dim=1), F.normalize(frames["inheritance"], dim=2)
    seg = 0.0
    for n in range(nq):
        student = [float(q[n] @ f[qv[n], i]) / 0.2 for i in range(lengths[qv[n]])]
        seg += kl([c / 0.2 for c in curve[n]], student)
    T = [[max(float(tq[n] @ refined(v, i)) for i in range(lengths[v])) / 0.2 for v in range(B)] for n in range(nq)]
    Sx = (cos_inh / 0.2).tolist()
    obj = sum(kl(T[n], Sx[n]) for n in range(nq)) / nq
    obj += sum(kl([T[n][v] for n in range(nq)], [Sx[n][v] for n in range(nq)]) for v in range(B)) / B
    out["kl_seg"], out["kl_obj"] = seg, obj
    out["total"] = (out["trip_inh"] + out["trip_exp"] + cfg.nce_weight * (out["nce_inh"] + out["nce_exp"])
                    + lam * (seg + obj))
    return {k: float(v) for k, v in out.items()}


def losses_of(model, batch, cfg: LossConfig, kd_lambda: float) -> dict:
    """The loss terms of ``batch`` as the trainer computes them on one process (``trainer.step_losses``:
    the model's encoders, then ``embedding_losses``)."""
    return Lo.embedding_losses(model, batch, model.encode_videos(batch), model.encode_queries(batch), cfg, kd_lambda)


@pytest.mark.parametrize("window", [3, 1])
def test_losses_match_an_explicit_computation(window):
    torch.manual_seed(0)
    model = KDCNet(tiny_config()).eval()
    batch = make_batch()
    cfg = LossConfig(hard_negatives=1, krd_window=window)
    got = {k: float(v.detach()) for k, v in losses_of(model, batch, cfg, 0.3).items()}
    want = _explicit_losses(model, batch, cfg, 0.3)
    assert set(got) == set(Lo.LOSS_TERMS) | {"total"}
    for key in want:
        assert abs(got[key] - want[key]) < 1e-4 * max(1.0, abs(want[key])), (key, got[key], want[key])


def test_switches_and_padding():
    torch.manual_seed(0)
    model = KDCNet(tiny_config()).eval()
    batch = make_batch()
    base = losses_of(model, batch, LossConfig(hard_negatives=1), 0.1)
    padded = losses_of(model, repad(batch, 4, 3), LossConfig(hard_negatives=1), 0.1)
    for key in base:
        assert abs(float(base[key].detach()) - float(padded[key].detach())) < 1e-5, key
    off = losses_of(model, batch, LossConfig(hard_negatives=1), 0.0)
    assert float(off["kl_seg"]) == float(off["kl_obj"]) == 0.0
    no_obj = losses_of(model, batch, LossConfig(hard_negatives=1, krd_objective=False), 0.1)
    assert float(no_obj["kl_obj"]) == 0.0
    assert float(no_obj["kl_seg"].detach()) == pytest.approx(float(base["kl_seg"].detach()))
    no_teacher = losses_of(model, make_batch(teacher=False), LossConfig(hard_negatives=1), 0.1)
    assert float(no_teacher["kl_seg"]) == 0.0
    # gradients of the distillation terms reach only the inheritance branch
    model.zero_grad()
    (base["kl_seg"] + base["kl_obj"]).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.branches["exploration"].parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.branches["inheritance"].parameters())


def test_losses_under_bf16_autocast():
    """The GPU trains under bf16 autocast; CPU autocast exercises the same mixed dtypes."""
    torch.manual_seed(0)
    model = KDCNet(tiny_config()).eval()
    batch = make_batch()
    ref = losses_of(model, batch, LossConfig(hard_negatives=1), 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = losses_of(model, batch, LossConfig(hard_negatives=1), 0.1)
    got["total"].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    for key in ref:
        assert got[key].dtype == torch.float32, key
        assert abs(float(got[key].detach()) - float(ref[key].detach())) < 0.05 * max(1.0, abs(float(ref[key].detach()))), key
