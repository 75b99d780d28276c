"""Public ``windowed_attention``: validation, implementation choice, dispatch, and the op's entry
in the op table (``WINDOWED_ATTENTION``, listed in ``kdc_kernels.ops.OPS``)."""

from __future__ import annotations

import math

import torch

from ... import _backend, _checks
from .reference import windowed_attention_ref


def _validate(q, k, v, rel_bias, sigma, lengths, scale, cutoff, mask=None) -> dict:
    layout = "[B, H, L, D]"
    empty_ok = ("B", "H")
    _checks.tensor("q", q, layout, _checks.OP_DTYPES, empty_ok)
    B, H, L, D = q.shape
    for name, x in (("k", k), ("v", v)):
        _checks.tensor(name, x, layout, _checks.OP_DTYPES, empty_ok)
        _checks.same_device(name, x, "q", q)
        _checks.same_dtype(name, x, "q", q)
        _checks.shape(name, x, (B, H, L, D), layout)
    if rel_bias is not None:
        _checks.tensor("rel_bias", rel_bias, "[H, 2R+1]", _checks.OP_DTYPES, ("H",))
        _checks.same_device("rel_bias", rel_bias, "q", q)
        if rel_bias.shape[0] != H or rel_bias.shape[1] % 2 != 1:
            raise ValueError(
                f"rel_bias must have shape [H, 2R+1] with H = {H} and an odd number of columns, "
                f"got {tuple(rel_bias.shape)}"
            )
    lengths = _checks.lengths_or_mask(lengths, mask, B, L, q, "B")
    if sigma is not None:
        _checks.tensor("sigma", sigma, "[B, H, L]", _checks.OP_DTYPES, empty_ok)
        _checks.same_device("sigma", sigma, "q", q)
        _checks.shape("sigma", sigma, (B, H, L), "[B, H, L]")
        _check_sigma(sigma, lengths)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    cutoff = _checks.positive_float("cutoff", cutoff)
    if cutoff is not None and sigma is None:
        raise ValueError("cutoff needs sigma: the window is |i - j| <= cutoff * sigma[b, h, i], got sigma=None")
    return dict(q=q, k=k, v=v, rel_bias=rel_bias, sigma=sigma, lengths=lengths, scale=scale, cutoff=cutoff)


def _check_sigma(sigma: torch.Tensor, lengths: torch.Tensor | None) -> None:
    """sigma must be finite and > 0 on valid query rows; padded rows may hold anything."""
    ok = torch.isfinite(sigma) & (sigma > 0)
    if lengths is not None:
        L = sigma.shape[-1]
        ok = ok | (torch.arange(L, device=sigma.device) >= lengths[:, None])[:, None, :]

    def explain():
        at = _checks.first_false(ok)
        return f"sigma must be finite and > 0 on every valid query row, got {float(sigma[at])} at index {at}"

    _checks.require(ok, "sigma must be finite and > 0 on every valid query row", explain, _checks.value_mode(sigma))


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_bias: torch.Tensor | None = None,
    sigma: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    cutoff: float | None = None,
    mask: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    r"""Dynamic temporal windowed attention with a relative position bias table.

    For batch b, head h, query i and key j::

        logit[i, j] = scale * <q_i, k_j> + rel_bias[h, clamp(j - i, -R, R) + R]
                      - (i - j)^2 / (2 * sigma[b, h, i]^2)
        key j is excluded when j >= lengths[b] or |i - j| > cutoff * sigma[b, h, i]
        out[i] = softmax_j(logit[i, :]) @ v   (i < lengths[b]),   0 for padded rows

    Args:
        q, k, v: ``[B, H, L, D]``, fp32 / fp16 / bf16 (fp64: reference only), same dtype and
            device, any strides. ``B`` or ``H`` may be 0 (empty output).
        rel_bias: ``[H, 2R+1]`` float relative position bias table, or None.
        sigma: ``[B, H, L]`` float, finite and > 0 on valid rows (any tiny value works), the
            per-query Gaussian window width in positions, or None.
        lengths: ``[B]`` integers in ``[0, L]`` (valid prefix of each sequence; a list of ints
            works too), or None (all L). A sequence of length 0 outputs zeros.
        scale: logit scale, default ``D ** -0.5``.
        cutoff: float > 0: drop keys with ``|i - j| > cutoff * sigma_i`` (needs sigma).
        mask: instead of ``lengths``: ``[B, L]`` bool or 0/1 (true = valid), a prefix per row,
            as PRVR codebases pass ``video_mask``. Not both.
        impl: ``None`` (= ``KDC_IMPL``, default ``"auto"``), ``"auto"``, ``"reference"``,
            ``"triton"`` or ``"cuda"``.

    Returns:
        ``[B, H, L, D]`` in q's dtype. Softmax and accumulation run in fp32 (fp32 dots in IEEE
        fp32 unless TF32 is allowed the torch way). Gradients flow to q, k, v, rel_bias and
        sigma. Excluded positions (padding, keys beyond a row's cutoff) may hold anything, NaN
        included, and never change a valid output or gradient; a NaN/inf that a valid row's
        window does hold makes that row NaN (not checked).

    Raises:
        TypeError / ValueError: invalid arguments (the message names the argument). Data checks
            (lengths, mask, sigma values) follow ``KDC_VALUE_CHECKS``: a ValueError on CPU
            tensors, a device-side assert (no host sync) on GPU tensors unless
            ``KDC_VALUE_CHECKS=sync``.
        NotImplementedError: an explicit ``impl`` cannot run this call (every reason listed).

    Example:
        >>> B, H, L, D = 2, 4, 32, 16
        >>> q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
        >>> out = windowed_attention(q, k, v, rel_bias=torch.zeros(H, 9),
        ...                          sigma=torch.full((B, H, L), 4.0), lengths=torch.tensor([32, 7]))
        >>> out.shape
        torch.Size([2, 4, 32, 16])
        >>> video_mask = torch.arange(L)[None] < torch.tensor([32, 7])[:, None]   # [B, L]
        >>> torch.equal(windowed_attention(q, k, v, mask=video_mask.float()),
        ...             windowed_attention(q, k, v, lengths=torch.tensor([32, 7])))
        True
    """
    case = _case(q, k, v, rel_bias, sigma, lengths, scale=scale, cutoff=cutoff, mask=mask)
    return _backend.dispatch(WINDOWED_ATTENTION, impl, case)


def _case(q, k, v, rel_bias=None, sigma=None, lengths=None, *, scale=None, cutoff=None, mask=None) -> dict:
    """The validated case of a :func:`windowed_attention` call (its arguments but ``impl``)."""
    return _validate(q, k, v, rel_bias, sigma, lengths, scale, cutoff, mask)


def _probe() -> dict:
    """A small fp32 case on the meta device (nothing is allocated)."""
    q = torch.empty(2, 4, 32, 16, device="meta")
    return dict(q=q, k=q, v=q, rel_bias=torch.empty(4, 9, device="meta"), sigma=torch.empty(2, 4, 32, device="meta"),
                lengths=None, scale=None, cutoff=None)


def _load_triton() -> _backend.FastPath:
    from . import _triton

    return _backend.FastPath(run=_triton.windowed_attention_triton, unsupported=_triton.windowed_attention_unsupported)


def _load_cuda() -> _backend.FastPath:
    from . import _cuda

    return _backend.FastPath(run=_cuda.windowed_attention_cuda, unsupported=_cuda.windowed_attention_unsupported)


WINDOWED_ATTENTION = _backend.OpSpec(
    name="windowed_attention",
    function=windowed_attention,
    validate=_case,
    reference=windowed_attention_ref,
    fast_paths={"triton": _load_triton, "cuda": _load_cuda},
    probe=_probe,
    device_of="q",
    is_empty=lambda case: case["q"].numel() == 0,
    cuda_ops=("cuda_windowed_attention_fwd", "cuda_windowed_attention_bwd"),
)
