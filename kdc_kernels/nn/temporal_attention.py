"""``DynamicTemporalAttention``: the DTA sublayer of KDC-Net as a drop-in layer."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .._checks import positive_float
from ..ops.windowed_attention import windowed_attention

WINDOWS = ("adaptive", "fixed", "none")


class DynamicTemporalAttention(nn.Module):
    r"""Multi-head temporal self-attention with a relative position bias table and an adaptive
    Gaussian window, followed by output projection, dropout, residual and LayerNorm.

    For each head h and position i of a sequence of valid length ``len``::

        logits[i, j] = <q_i, k_j> / sqrt(d_h) + bias[h, clamp(j - i, -R, R) + R]
                       - (i - j)^2 / (2 sigma[h, i]^2)
        sigma[h, i] = sigma_min + (len - sigma_min) * sigmoid(w_h^T x_i + b_h)   (window="adaptive")
        sigma[h]    = sigma_min + (len - sigma_min) * sigmoid(p_h)               (window="fixed")
        no Gaussian term                                                           (window="none")

    computed by :func:`kdc_kernels.windowed_attention`, then
    ``y = LayerNorm(x + Dropout(W_o attn))``. Padded positions (``i >= lengths[b]``) may hold
    anything (NaN too): they are replaced by 0 on entry, never influence valid positions or any
    gradient, and their outputs are zero.

    Args:
        dim: model width (divisible by ``num_heads``).
        num_heads: attention heads.
        max_rel_dist: R, the relative-distance clamp of the bias table (``[num_heads, 2R+1]``,
            zero-initialised).
        window: ``"adaptive"`` (per frame, per head sigma), ``"fixed"`` (one learnable sigma per
            head) or ``"none"``.
        sigma_min: smallest window width, in positions (> 0).
        cutoff: if set, keys with ``|i - j| > cutoff * sigma_i`` are dropped (needs a window).
        dropout: dropout on the attention output before the residual (None: 0).
        impl: implementation of the op (None: ``KDC_IMPL`` / auto).
        rel_bias: include the relative position bias table (default True).

    Shapes:
        ``forward(x [B, L, dim], lengths [B] | None, *, mask [B, L] | None) -> [B, L, dim]``;
        ``lengths`` (a tensor or a list of ints) or ``mask`` (bool or 0/1, true = valid, a
        prefix), not both.

    Example:
        >>> layer = DynamicTemporalAttention(384, 4)
        >>> y = layer(torch.randn(2, 128, 384), torch.tensor([128, 40]))
        >>> y.shape
        torch.Size([2, 128, 384])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        max_rel_dist: int = 32,
        window: str = "adaptive",
        sigma_min: float = 1.0,
        cutoff: float | None = None,
        dropout: float | None = 0.0,
        impl: str | None = None,
        *,
        rel_bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        if isinstance(max_rel_dist, bool) or not isinstance(max_rel_dist, int) or max_rel_dist < 0:
            raise ValueError(f"max_rel_dist must be an int >= 0, got {max_rel_dist!r}")
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
        self.sigma_min = positive_float("sigma_min", sigma_min, allow_none=False)
        self.cutoff = positive_float("cutoff", cutoff)
        if self.cutoff is not None and window == "none":
            raise ValueError("cutoff needs a window: got window='none' with cutoff set")
        if dropout is None:
            dropout = 0.0
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a float in [0, 1) or None, got {type(dropout).__name__}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.max_rel_dist, self.window, self.impl = max_rel_dist, window, impl

        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(float(dropout))
        self.norm = nn.LayerNorm(dim)
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, 2 * max_rel_dist + 1)) if rel_bias else None
        self.sigma_proj = nn.Linear(dim, num_heads) if window == "adaptive" else None
        self.sigma_logit = nn.Parameter(torch.zeros(num_heads)) if window == "fixed" else None

    def window_widths(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor | None:
        """sigma ``[B, H, L]`` (fp32) for ``x [B, L, dim]`` and int lengths ``[B]`` (or None), or
        None when ``window="none"``."""
        if self.window == "none":
            return None
        B, L, _ = x.shape
        if lengths is None:
            span = torch.full((B,), float(L), device=x.device)
        else:
            span = lengths.to(device=x.device, dtype=torch.float32)
        span = (span - self.sigma_min).clamp_min(0.0)[:, None, None]  # [B, 1, 1]
        if self.window == "adaptive":
            gate = torch.sigmoid(self.sigma_proj(x).float()).transpose(1, 2)  # [B, H, L]
        else:
            gate = torch.sigmoid(self.sigma_logit.float())[None, :, None].expand(B, -1, L)
        return self.sigma_min + span * gate

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None, *,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor [B, L, dim] with dim = {self.dim}, got {got}")
        B, L, _ = x.shape
        # One int64 [B] tensor from lengths (tensor or list) or a prefix mask; checked without a
        # host sync (see _checks.require).
        lengths = _checks.lengths_or_mask(lengths, mask, B, L, x, "B")
        valid = None
        if lengths is not None:
            valid = (torch.arange(L, device=x.device)[None, :] < lengths[:, None])[..., None]  # [B, L, 1]
            # Excluded means excluded: padded frames may hold garbage (NaN from an uninitialised
            # collate buffer). Replaced here (their gradient is exactly 0), they cannot reach the
            # window widths, the projections' weight gradients or the LayerNorm.
            x = torch.where(valid, x, 0.0)
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        sigma = self.window_widths(x, lengths)
        attn = windowed_attention(
            q, k, v, self.rel_bias, sigma, lengths, cutoff=self.cutoff, impl=self.impl
        )  # [B, H, L, Dh]
        y = self.norm(x + self.dropout(self.out_proj(attn.transpose(1, 2).reshape(B, L, self.dim))))
        if valid is not None:
            y = torch.where(valid, y, 0.0)
        return y

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, max_rel_dist={self.max_rel_dist}, "
            f"rel_bias={self.rel_bias is not None}, window={self.window!r}, sigma_min={self.sigma_min}, "
            f"cutoff={self.cutoff}, dropout={self.dropout.p}, impl={self.impl!r}"
        )
