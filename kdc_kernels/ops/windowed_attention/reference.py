r"""Plain PyTorch oracle for ``windowed_attention``: dynamic temporal windowed attention with a
relative position bias table.

For batch b, head h, query i, key j (0-based)::

    logit[i, j] = scale * <q_i, k_j>
                + rel_bias[h, clamp(j - i, -R, R) + R]        (if rel_bias is given)
                - (i - j)^2 / (2 * sigma[b, h, i]^2)            (if sigma is given)
    key j is excluded when j >= lengths[b]  or  |i - j| > cutoff * sigma[b, h, i]
    out[i] = sum_j softmax_j(logit[i, :]) v_j   for i < lengths[b],   0 otherwise

Softmax and accumulation run in fp32 whatever the input dtype (fp64 inputs, accepted by the
reference only, for gradcheck, stay fp64); the output has q's dtype.
Gradients come from PyTorch autograd. Query rows are processed in chunks so that the extra
memory of one chunk stays near ``_CHUNK_ELEMS`` fp32 values (L up to a few thousand is fine).
"""

from __future__ import annotations

import torch

# fp32 elements of one [B, H, chunk, L] logits block.
_CHUNK_ELEMS = 1 << 25


def windowed_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_bias: torch.Tensor | None = None,
    sigma: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    cutoff: float | None = None,
) -> torch.Tensor:
    """Reference windowed attention on already-validated inputs.

    Args:
        q, k, v: ``[B, H, L, D]``.
        rel_bias: ``[H, 2R+1]`` or None.
        sigma: ``[B, H, L]`` (> 0) or None.
        lengths: ``[B]`` integers in ``[1, L]`` or None.
        scale: logit scale, default ``D ** -0.5``.
        cutoff: hard window ``|i - j| <= cutoff * sigma_i``, needs sigma.

    Returns:
        ``[B, H, L, D]`` in q's dtype; padded query rows are zero.

    Example:
        >>> q = k = v = torch.randn(2, 4, 16, 32)
        >>> windowed_attention_ref(q, k, v, sigma=torch.full((2, 4, 16), 3.0)).shape
        torch.Size([2, 4, 16, 32])
    """
    B, H, L, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    device = q.device
    # fp32 math for fp32/fp16/bf16 inputs; fp64 stays fp64 (gradcheck of the oracle).
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    pos = torch.arange(L, device=device)
    if lengths is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=device)
    else:
        valid = pos[None, :] < lengths.to(device)[:, None]  # [B, L]
    key_ok = valid[:, None, None, :]  # [B, 1, 1, L]
    bias = rel_bias.to(acc) if rel_bias is not None else None
    R = (bias.shape[1] - 1) // 2 if bias is not None else 0

    chunk = max(1, min(L, _CHUNK_ELEMS // max(1, B * H * L)))
    outs = []
    for start in range(0, L, chunk):
        stop = min(L, start + chunk)
        rel = pos[None, :] - pos[start:stop, None]  # [c, L]: j - i
        logits = scale * torch.matmul(qf[:, :, start:stop], kf.transpose(-1, -2))  # [B, H, c, L]
        if bias is not None:
            logits = logits + bias[:, rel.clamp(-R, R) + R]  # [H, c, L]
        allowed = key_ok
        if sigma is not None:
            s = sigma[:, :, start:stop].to(acc)[..., None]  # [B, H, c, 1]
            dist2 = rel.to(acc).square()
            logits = logits - dist2 / (2.0 * s * s)
            if cutoff is not None:
                inside = rel.abs().to(acc) <= cutoff * s  # [B, H, c, L]
                # Padded query rows ignore the cutoff so they stay finite; their output is zeroed.
                inside = inside | ~valid[:, None, start:stop, None]
                allowed = allowed & inside
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out = torch.matmul(probs, vf)
        outs.append(out * valid[:, None, start:stop, None])
    return torch.cat(outs, dim=2).to(q.dtype)
