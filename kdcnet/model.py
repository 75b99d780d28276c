r"""KDC-Net: two branches (inheritance, exploration), each a text encoder with hierarchical semantic
aggregation (HSA) and a video encoder with dynamic temporal attention (DTA), scored by clip-level
max-similarity and fused.

Per branch b (no parameter sharing between branches)::

    text:   H0 = LN(Drop(ReLU(Linear(Drop(LN(tokens))))) + pos)        [Nq, Lq, d]
            P_k = ReLU(Conv1d_k(H0)) (padded tokens zeroed before and after), k in hsa_scales
            alpha = softmax_k(w^T tanh(W masked_mean(P_k)));  H = H0 + sum_k alpha_k P_k
            H = LN(H + MHSA(H))  (4 heads);   q_b = sum_i softmax_i(Linear(H)_i) H_i   [Nq, d]
    video:  X = ReLU(Linear(Drop(LN(frames)))) + pos                     [B, L, d]
            F_b = Linear(DTA(X))   (kdc_kernels.nn.DynamicTemporalAttention)
    score:  s_b(q, v) = max_i cos(q_b, F_b[v, i])   (kdc_kernels.max_similarity)
    fused:  S = w * s_inh + (1 - w) * s_exp         (w = model.fusion_weight, default 0.7)

The text self-attention is the same layer as DTA with no window and no bias table (plain
multi-head attention with residual and LayerNorm), so it also runs on the fast attention path.
Padded frames and tokens never change any score: they are masked in every attention, excluded from
pooling and from the max, and zeroed before every convolution.

Choices the paper leaves open, made here: dropout only where the specification lists it (text input and
after the text position embedding, video input, inside DTA and the text MHSA); the HSA gate's
hidden width is d; an even HSA kernel size k pads k/2 - 1 zeros
on the left and k/2 on the right ('same' length).

Initialisation (:func:`init_weights`, as the PRVR codebases MS-SL / GMMFormer / DL-DKD do it): every
``nn.Linear`` and ``nn.Embedding`` weight (the position tables, the input projections, attention
q/k/v/output projections, the DTA window projection, the HSA gate, the pooling and output layers)
~ N(0, 0.02), every Linear bias 0, LayerNorm weight 1 and bias 0; the HSA ``Conv1d`` layers keep
torch's default (MS-SL resets them to it); the DTA relative bias table and the fixed-window logits
start at 0. torch's default N(0, 1) for ``nn.Embedding`` would give each position row a norm of
sqrt(d) (8 at d = 64, 20 at d = 384), about three times the content after the input projection:
all queries then start nearly parallel, much of every score is a per-video term that ignores the
query, and ranking-only training settles where every score is equal (chance-level retrieval).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdc_kernels import max_similarity
from kdc_kernels.nn import DynamicTemporalAttention

from .config import Config

BRANCHES = ("inheritance", "exploration")


INIT_STD = 0.02


@torch.no_grad()
def init_weights(module: nn.Module, std: float = INIT_STD) -> None:
    """MS-SL's initialisation of one module (use with ``model.apply``): Linear and Embedding weights
    ~ N(0, std), Linear biases 0, LayerNorm 1 / 0; every other module (Conv1d, the DTA tables) keeps
    its own initialisation."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.normal_(0.0, std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()


def length_mask(lengths: torch.Tensor, L: int) -> torch.Tensor:
    """``[N, L]`` bool, True at valid positions ``i < lengths[n]``."""
    return torch.arange(L, device=lengths.device)[None, :] < lengths[:, None]


class _InputProjection(nn.Module):
    """``ReLU(Linear(Dropout(LayerNorm(x)))) + pos``: the first stage of both encoders."""

    def __init__(self, in_dim: int, d: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, d)
        self.pos = nn.Embedding(max_len, d)
        self.max_len = max_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds the position table ({self.max_len}); "
                             f"raise data.max_frames / data.max_tokens or truncate the inputs")
        h = F.relu(self.linear(self.dropout(self.norm(x))))
        return h + self.pos.weight[:L][None]


class HierarchicalSemanticAggregation(nn.Module):
    """Multi-scale phrase features fused by a softmax gate over scales: ``H0 + sum_k alpha_k P_k``."""

    def __init__(self, d: int, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.convs = nn.ModuleList(nn.Conv1d(d, d, k) for k in self.scales)
        self.gate_hidden = nn.Linear(d, d)
        self.gate_out = nn.Linear(d, 1, bias=False)

    def forward(self, h0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[..., None].to(h0.dtype)  # [N, L, 1]
        x = h0 * m
        N, L, d = x.shape
        # All scales' convolutions as one GEMM (CPU conv1d is far slower): project every token by
        # every tap W_{k,t}, then shift-and-add the taps ('same' padding: (k-1)//2 zeros on the
        # left, k//2 on the right; the extra one of an even kernel goes right). Taps are taken one by
        # one (not as a permuted view) so each weight's gradient comes out in the weight's own
        # layout, as DistributedDataParallel's gradient buckets expect.
        taps = torch.cat([conv.weight[:, :, t] for conv in self.convs
                          for t in range(conv.kernel_size[0])])  # [sum_k k*d, d]
        proj = (x @ taps.T).view(N, L, -1, d)  # [N, L, sum_k k, d]
        phrases, tap = [], 0
        for k, conv in zip(self.scales, self.convs):
            left = (k - 1) // 2
            out = conv.bias.expand(N, L, d)
            for t in range(k):
                shift = max(-L, min(L, t - left))  # output i reads input i + shift (|shift| >= L: all padding)
                src = proj[:, max(0, shift): L + min(0, shift), tap + t]
                out = out + F.pad(src, (0, 0, max(0, -shift), max(0, shift)))
            phrases.append(F.relu(out) * m)  # P_k [N, L, d]
            tap += k
        pooled = torch.stack([p.sum(dim=1) for p in phrases], dim=1) / m.sum(dim=1)[:, None]  # [N, K, d]
        alpha = torch.softmax(self.gate_out(torch.tanh(self.gate_hidden(pooled))).squeeze(-1), dim=1)  # [N, K]
        return h0 + sum(alpha[:, i, None, None] * p for i, p in enumerate(phrases))


class TextEncoder(nn.Module):
    """Token features ``[Nq, Lq, Dq]`` + lengths -> one query embedding ``[Nq, d]`` per query."""

    def __init__(self, cfg: Config, text_dim: int) -> None:
        super().__init__()
        m = cfg.model
        self.input = _InputProjection(text_dim, m.d, cfg.data.max_tokens, m.dropout)
        self.norm = nn.LayerNorm(m.d)
        self.dropout = nn.Dropout(m.dropout)
        self.hsa = HierarchicalSemanticAggregation(m.d, m.hsa_scales) if m.hsa else None
        self.attn = DynamicTemporalAttention(m.d, m.heads, max_rel_dist=0, window="none", dropout=m.dropout,
                                             impl=m.impl, rel_bias=False)
        self.pool = nn.Linear(m.d, 1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = length_mask(lengths, tokens.shape[1])
        h = self.dropout(self.norm(self.input(tokens)))
        if self.hsa is not None:
            h = self.hsa(h, mask)
        h = self.attn(h, lengths)
        logits = self.pool(h).squeeze(-1).float().masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=1).to(h.dtype)  # [Nq, Lq]
        return torch.einsum("nl,nld->nd", weights, h)


class VideoEncoder(nn.Module):
    """Frame features ``[B, L, Dv]`` + lengths -> frame embeddings ``[B, L, d]`` (padded rows 0)."""

    def __init__(self, cfg: Config, visual_dim: int) -> None:
        super().__init__()
        m = cfg.model
        self.input = _InputProjection(visual_dim, m.d, cfg.data.max_frames, m.dropout)
        window, rel_bias = (m.window, m.rel_bias) if m.dta else ("none", False)
        self.attn = DynamicTemporalAttention(m.d, m.heads, max_rel_dist=m.max_rel_dist, window=window,
                                             sigma_min=m.sigma_min, cutoff=m.cutoff, dropout=m.dropout,
                                             impl=m.impl, rel_bias=rel_bias)
        self.out = nn.Linear(m.d, m.d)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor, return_widths: bool = False):
        x = self.input(frames)
        y = self.out(self.attn(x, lengths))
        y = y * length_mask(lengths, frames.shape[1])[..., None].to(y.dtype)
        if return_widths:
            return y, self.attn.window_widths(x, lengths)
        return y


class Branch(nn.Module):
    def __init__(self, cfg: Config, visual_dim: int, text_dim: int) -> None:
        super().__init__()
        self.text = TextEncoder(cfg, text_dim)
        self.video = VideoEncoder(cfg, visual_dim)


class KDCNet(nn.Module):
    """The two-branch KDC-Net student. Build with ``KDCNet(config)`` once ``config.model.visual_dim``
    and ``config.model.text_dim`` are set (the trainer reads them from the data).

    A ``batch`` is a :class:`kdcnet.data.Batch` (or any object with its fields) on the model's device.

    Example:
        >>> cfg = preset("synthetic"); cfg.model.visual_dim, cfg.model.text_dim = 256, 128
        >>> model = KDCNet(cfg).eval()
        >>> frames = model.encode_videos(batch)     # {"inheritance": [B, L, d], "exploration": ...}
        >>> queries = model.encode_queries(batch)   # {"inheritance": [Nq, d], ...}
        >>> S = model.fuse(model.branch_scores(queries, frames, batch.video_lengths))  # [Nq, B]
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        m = config.model
        if m.visual_dim is None or m.text_dim is None:
            raise ValueError("config.model.visual_dim and config.model.text_dim must be set (read them from the "
                             f"data first), got {m.visual_dim} and {m.text_dim}")
        self.fusion_weight = float(m.fusion_weight)
        self.impl = m.impl
        self.branches = nn.ModuleDict({name: Branch(config, m.visual_dim, m.text_dim) for name in BRANCHES})
        self.apply(init_weights)

    def encode_videos(self, batch, return_widths: bool = False):
        """Frame embeddings per branch ``{branch: [B, L, d]}``; with ``return_widths`` also the DTA
        window widths ``{branch: sigma [B, H, L] or None}``."""
        out = {name: br.video(batch.videos, batch.video_lengths, return_widths) for name, br in self.branches.items()}
        if return_widths:
            return {n: o[0] for n, o in out.items()}, {n: o[1] for n, o in out.items()}
        return out

    def encode_queries(self, batch) -> dict[str, torch.Tensor]:
        """Query embeddings per branch ``{branch: [Nq, d]}``."""
        return {name: br.text(batch.queries, batch.query_lengths) for name, br in self.branches.items()}

    def branch_scores(self, queries: dict, frames: dict, lengths: torch.Tensor, *,
                      normalize: bool = True) -> dict[str, torch.Tensor]:
        """``{branch: max_i <q^, F^_i> [Nq, Nv]}`` (cosine when ``normalize``), float32.

        Autocast is off inside: the op takes bf16 inputs itself and accumulates in fp32 (autocast
        would turn the reference's matmuls into bf16 ones). Queries follow the frames' dtype (under
        autocast the two encoders may end in different dtypes)."""
        out = {}
        with torch.autocast(lengths.device.type, enabled=False):
            for name in BRANCHES:
                q = queries[name].to(frames[name].dtype)
                out[name] = max_similarity(q, frames[name], lengths, normalize=normalize, impl=self.impl)
        return out

    def fuse(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """``S = w * s_inh + (1 - w) * s_exp``."""
        w = self.fusion_weight
        return w * scores["inheritance"] + (1.0 - w) * scores["exploration"]

    def forward(self, batch) -> torch.Tensor:
        """Fused score matrix ``[Nq, B]`` of the batch's queries against its videos."""
        frames, queries = self.encode_videos(batch), self.encode_queries(batch)
        return self.fuse(self.branch_scores(queries, frames, batch.video_lengths))
