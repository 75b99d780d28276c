"""KDC-Net forward/backward shapes, the flags, and masking: padded frames and tokens never
change any score."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcnet.model import BRANCHES, HierarchicalSemanticAggregation, KDCNet

from .batches import make_batch, repad, tiny_config

FLAG_SETS = [
    {},
    {"hsa": False},
    {"dta": False},
    {"window": "fixed"},
    {"window": "none", "rel_bias": False},
    {"cutoff": 2.0, "hsa_scales": (2, 4)},
]


def _model(seed=0, **flags):
    torch.manual_seed(seed)
    return KDCNet(tiny_config(**flags)).eval()


def test_shapes_and_every_parameter_gets_a_gradient():
    model = _model()
    model.train()
    batch = make_batch()
    frames, queries = model.encode_videos(batch), model.encode_queries(batch)
    assert set(frames) == set(queries) == set(BRANCHES)
    for name in BRANCHES:
        assert frames[name].shape == (3, 7, 16) and queries[name].shape == (6, 16)
    scores = model(batch)
    assert scores.shape == (6, 3) and scores.dtype == torch.float32
    (scores * torch.randn_like(scores)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # rows of the position tables past the batch's length get no gradient; the attention-pooling
        # bias adds the same value to every token's logit, which the softmax cancels: its gradient
        # is 0 up to rounding (MS-SL's pooling layer has no bias)
        if "pos" not in name and not name.endswith("text.pool.bias"):
            assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "default")
def test_padding_never_changes_scores(flags):
    model = _model(**flags)
    batch = make_batch(video_lengths=(7, 1, 5, 7), caps_per_video=(2, 1, 3, 1), query_lengths=(1, 4, 6, 2, 6, 3, 1))
    ref = model(batch)
    ref_frames = model.encode_videos(batch)
    for frames_pad, tokens_pad in ((0, 0), (5, 0), (0, 4), (3, 2)):
        other = repad(batch, frames_pad, tokens_pad, value=9.0)
        torch.testing.assert_close(model(other), ref, atol=1e-6, rtol=0)
        got = model.encode_videos(other)
        for name in BRANCHES:
            torch.testing.assert_close(got[name][:, :7], ref_frames[name], atol=1e-6, rtol=0)
            assert (got[name][:, 7:] == 0).all() and (got[name][1, 1:] == 0).all(), "padded frames must be zero"


def test_scores_are_the_fused_max_cosine():
    model = _model()
    batch = make_batch()
    frames, queries = model.encode_videos(batch), model.encode_queries(batch)
    valid = torch.arange(7)[None, :] < batch.video_lengths[:, None]
    expected = {}
    for name in BRANCHES:
        cos = torch.einsum("nd,vld->nvl", F.normalize(queries[name], dim=-1), F.normalize(frames[name], dim=-1))
        expected[name] = cos.masked_fill(~valid[None], -2).amax(dim=-1)
        torch.testing.assert_close(model.branch_scores(queries, frames, batch.video_lengths)[name], expected[name])
    torch.testing.assert_close(model(batch), 0.7 * expected["inheritance"] + 0.3 * expected["exploration"])


def test_branches_share_no_parameters_and_flags_shape_the_model():
    model = _model()
    inh, exp = model.branches["inheritance"], model.branches["exploration"]
    ids = {id(p) for p in inh.parameters()}
    assert not ids & {id(p) for p in exp.parameters()}
    assert not torch.equal(inh.video.input.linear.weight, exp.video.input.linear.weight)
    assert inh.text.hsa is not None and inh.video.attn.window == "adaptive" and inh.video.attn.rel_bias is not None
    plain = _model(hsa=False, dta=False).branches["inheritance"]
    assert plain.text.hsa is None and plain.video.attn.window == "none" and plain.video.attn.rel_bias is None
    assert _model(window="fixed").branches["exploration"].video.attn.sigma_logit is not None
    assert _model(cutoff=3.0).branches["inheritance"].video.attn.cutoff == 3.0
    assert len(_model(hsa_scales=(1, 2, 3, 4)).branches["inheritance"].text.hsa.convs) == 4


def test_window_widths_are_returned_per_branch():
    model = _model()
    batch = make_batch()
    _, widths = model.encode_videos(batch, return_widths=True)
    for name in BRANCHES:
        sigma = widths[name]
        assert sigma.shape == (3, 2, 7)
        valid = torch.arange(7)[None, None, :] < batch.video_lengths[:, None, None]
        assert ((sigma >= 1.0) & (sigma <= batch.video_lengths[:, None, None].float()))[valid.expand_as(sigma)].all()
    assert _model(dta=False).encode_videos(batch, return_widths=True)[1]["inheritance"] is None


def test_hsa_matches_its_formula():
    torch.manual_seed(1)
    hsa = HierarchicalSemanticAggregation(4, (1, 2, 3))
    h0 = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    got = hsa(h0, mask)
    for n in range(2):
        m = int(mask[n].sum())
        x = h0[n, :m]  # padded tokens are zeros for the convolution: truncating is the same
        phrases = []
        for k, conv in zip((1, 2, 3), hsa.convs):
            left, right = (k - 1) // 2, k // 2
            xp = torch.cat([torch.zeros(left, 4), x, torch.zeros(right, 4)])
            p = torch.stack([torch.relu(conv.bias + sum(conv.weight[:, :, t] @ xp[i + t] for t in range(k)))
                             for i in range(m)])
            phrases.append(p)
        g = torch.stack([p.mean(dim=0) for p in phrases])  # [K, d]
        alpha = torch.softmax(hsa.gate_out(torch.tanh(hsa.gate_hidden(g))).squeeze(-1), dim=0)
        expected = x + sum(a * p for a, p in zip(alpha, phrases))
        torch.testing.assert_close(got[n, :m], expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_initialisation_is_ms_sl_s():
    """Linear and Embedding weights ~ N(0, 0.02) (position tables included), biases 0, LayerNorm
    1 / 0, the DTA bias table 0; the HSA convolutions keep torch's default."""
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.model.d, cfg.model.heads = 64, 4
    model = KDCNet(cfg)
    linear_or_embedding = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    assert len(linear_or_embedding) >= 20
    weights = torch.cat([m.weight.flatten() for m in linear_or_embedding])
    assert abs(float(weights.std()) - 0.02) < 0.001 and abs(float(weights.mean())) < 0.001
    for m in linear_or_embedding:
        assert float(m.weight.std()) < 0.03, m            # every one of them, not only on average
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            assert (m.bias == 0).all()
    for name in BRANCHES:
        branch = model.branches[name]
        for pos in (branch.text.input.pos.weight, branch.video.input.pos.weight):
            assert float(pos.norm(dim=1).mean()) < 0.2   # sqrt(64) * 0.02 = 0.16; torch's default gave 8
        assert (branch.video.attn.rel_bias == 0).all()
        convs = branch.text.hsa.convs
        bound = 1 / math.sqrt(64 * convs[-1].kernel_size[0])           # torch's default uniform bound
        assert float(convs[-1].weight.abs().max()) <= bound and float(convs[-1].weight.std()) > 0.5 * bound / math.sqrt(3)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert (m.weight == 1).all() and (m.bias == 0).all()


def test_bad_configs_and_inputs():
    cfg = tiny_config()
    cfg.model.visual_dim = None
    with pytest.raises(ValueError, match="visual_dim and config.model.text_dim must be set"):
        KDCNet(cfg)
    with pytest.raises(ValueError, match="sequence length 30 exceeds the position table \\(24\\)"):
        _model().encode_videos(make_batch(video_lengths=(30, 3), caps_per_video=(1, 1)))
