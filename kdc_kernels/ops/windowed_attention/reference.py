r"""Plain PyTorch oracle for ``windowed_attention``: dynamic temporal windowed attention with a
relative position bias table.

For batch b, head h, query i, key j (0-based)::

    logit[i, j] = scale * <q_i, k_j>
                + rel_bias[h, clamp(j - i, -R, R) + R]        (if rel_bias is given)
                - (i - j)^2 / (2 * sigma[b, h, i]^2)            (if sigma is given)
    key j is excluded when j >= lengths[b]  or  |i - j| > cutoff * sigma[b, h, i]
    out[i] = sum_j softmax_j(logit[i, :]) v_j   for i < lengths[b],   0 otherwise

Softmax and accumulation run in fp32 whatever the input dtype (fp64 inputs, which only the
reference runs, stay fp64); the output has q's dtype.

Excluded means excluded: padded positions (``>= lengths[b]``) may hold any value, NaN and inf
included, in q, k, v and sigma, and never change a valid output or gradient; padded rows are 0 and
a sequence of length 0 outputs zeros. A non-finite key or value inside the length changes only
the rows whose window holds it (they become NaN). Any finite sigma > 0 gives finite results and
gradients.
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
        lengths: ``[B]`` integers in ``[0, L]`` or None.
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
    pos = torch.arange(L, device=device)
    if lengths is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=device)
    else:
        valid = pos[None, :] < lengths.to(device)[:, None]  # [B, L]
    # Excluded means excluded: padded positions may hold anything (NaN, inf). They are replaced
    # (torch.where: their gradient is exactly 0) before any arithmetic, so 0 * NaN never reaches a
    # valid output or gradient. Inside the length, a non-finite key/value is zeroed too and the
    # rows whose window contains it are set to NaN at the end (below): a key outside a row's
    # cutoff window never touches that row, one inside it poisons the row as IEEE would.
    row_ok = valid[:, None, :, None]  # [B, 1, L, 1]
    qf = torch.where(row_ok, q.to(acc), 0.0)
    kf, vf = k.to(acc), v.to(acc)
    key_bad = ~(torch.isfinite(kf).all(-1) & torch.isfinite(vf).all(-1)) & valid[:, None, :]  # [B, H, L]
    clean = row_ok & ~key_bad[..., None]
    kf, vf = torch.where(clean, kf, 0.0), torch.where(clean, vf, 0.0)
    key_ok = valid[:, None, None, :]  # [B, 1, 1, L]
    bias = rel_bias.to(acc) if rel_bias is not None else None
    R = (bias.shape[1] - 1) // 2 if bias is not None else 0
    if sigma is not None:
        sig = torch.where(valid[:, None, :], sigma.to(acc), 1.0)
        # 1 / (2 sigma^2) in fp64 from sigma >= 1e-150, clamped to the largest finite value of the
        # compute dtype: any finite sigma > 0 (1e-23, a denormal) gives a finite coefficient, and
        # no step of its gradient multiplies 0 by inf. Both clamps are exact: at such widths every
        # off-diagonal key has weight 0 and d sigma is 0.
        coef = (0.5 / sig.double().clamp(min=1e-150).square()).clamp(max=torch.finfo(acc).max).to(acc)

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
            dist2 = rel.to(acc).square()
            logits = logits - dist2 * coef[:, :, start:stop, None]
            if cutoff is not None:
                inside = rel.abs().to(acc) <= cutoff * sig[:, :, start:stop, None]  # [B, H, c, L]
                # Padded query rows ignore the cutoff so they stay finite; their output is zeroed.
                inside = inside | ~valid[:, None, start:stop, None]
                allowed = allowed & inside
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out = torch.matmul(probs, vf)
        poisoned = (allowed & key_bad[:, :, None, :]).any(-1, keepdim=True)  # [B, H, c, 1]
        out = torch.where(poisoned, float("nan"), out)
        outs.append(torch.where(valid[:, None, start:stop, None], out, 0.0))
    return torch.cat(outs, dim=2).to(q.dtype)
