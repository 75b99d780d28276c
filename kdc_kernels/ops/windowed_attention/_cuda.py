r"""CUDA path of ``windowed_attention``: a thin wrapper over the compiled kernels in
``csrc/windowed_attention/``.

The ops are declared here (schema, fake implementation, autograd), so they exist for tracing,
fake tensors and ``opcheck`` whether or not the compiled extension is built; loading the
extension registers their CUDA kernels:

* ``kdc::cuda_windowed_attention_fwd(q, k, v, rel_bias, sigma, lengths, scale, cutoff) -> (out, lse)``
  ``out [B, H, L, D]`` in q's dtype (padded rows 0), ``lse [B, H, L]`` fp32 log-sum-exp of each
  valid row (0 for padded rows), saved for the backward.
* ``kdc::cuda_windowed_attention_bwd(grad_out, q, k, v, rel_bias, sigma, lengths, out, lse, scale,
  cutoff) -> (grad_q, grad_k, grad_v, grad_rel_bias, grad_sigma)``; the last two are fp32
  (``[H, 2R+1]`` / ``[B, H, L]``), empty ``[0]`` tensors when rel_bias / sigma is None.

The kernels use no floating-point atomics: results are bitwise reproducible run to run, so
``KDC_DETERMINISTIC`` needs no separate mode here.
"""

from __future__ import annotations

import torch

from ... import _ext

_FWD, _BWD = (f"kdc::{name}" for name in _ext.CUDA_OPS["windowed_attention"])
MAX_HEAD_DIM = 256  # kWindowAttnMaxD in csrc/windowed_attention/windowed_attention.h

torch.library.define(
    _FWD,
    "(Tensor q, Tensor k, Tensor v, Tensor? rel_bias, Tensor? sigma, Tensor? lengths, float scale, "
    "float? cutoff) -> (Tensor, Tensor)",
)
torch.library.define(
    _BWD,
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? rel_bias, Tensor? sigma, Tensor? lengths, "
    "Tensor out, Tensor lse, float scale, float? cutoff) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)


@torch.library.register_fake(_FWD)
def _fwd_fake(q, k, v, rel_bias, sigma, lengths, scale, cutoff):
    B, H, L, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.register_fake(_BWD)
def _bwd_fake(grad_out, q, k, v, rel_bias, sigma, lengths, out, lse, scale, cutoff):
    f32 = dict(dtype=torch.float32)
    grad_bias = q.new_empty(rel_bias.shape, **f32) if rel_bias is not None else q.new_empty((0,), **f32)
    grad_sigma = q.new_empty(sigma.shape, **f32) if sigma is not None else q.new_empty((0,), **f32)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), grad_bias, grad_sigma


def _setup_context(ctx, inputs, output):
    q, k, v, rel_bias, sigma, lengths, scale, cutoff = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, rel_bias, sigma, lengths, out, lse)
    ctx.scale, ctx.cutoff = scale, cutoff


def _backward(ctx, grad_out, grad_lse):
    q, k, v, rel_bias, sigma, lengths, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v, grad_bias, grad_sigma = torch.ops.kdc.cuda_windowed_attention_bwd(
        grad_out, q, k, v, rel_bias, sigma, lengths, out, lse, ctx.scale, ctx.cutoff)
    needs = ctx.needs_input_grad
    return (
        grad_q if needs[0] else None,
        grad_k if needs[1] else None,
        grad_v if needs[2] else None,
        grad_bias.to(rel_bias.dtype) if rel_bias is not None and needs[3] else None,
        grad_sigma.to(sigma.dtype) if sigma is not None and needs[4] else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


def windowed_attention_cuda(q, k, v, rel_bias=None, sigma=None, lengths=None, scale=None, cutoff=None):
    """Runs the compiled kernels on a validated case (see ``api._validate``)."""
    _ext.status()  # loads the extension (and its kernel registrations) on first use
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.kdc.cuda_windowed_attention_fwd(q, k, v, rel_bias, sigma, lengths, scale, cutoff)
    return out


def windowed_attention_unsupported(q, k, v, rel_bias=None, sigma=None, lengths=None, scale=None,
                                   cutoff=None) -> list[str]:
    """Every reason the CUDA kernels cannot run this case (shapes and dtypes only)."""
    reasons = []
    B, H, L, D = q.shape
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"the CUDA kernels take float32/float16/bfloat16 inputs, got {q.dtype} "
                       "(convert with .float(), or use impl='reference')")
    if D > MAX_HEAD_DIM:
        reasons.append(f"the CUDA kernels support a head dimension D <= {MAX_HEAD_DIM}, got D = {D}")
    if B * H * L >= 2**31:
        reasons.append(f"the CUDA kernels need B * H * L < 2^31, got {B * H * L}")
    if rel_bias is not None and rel_bias.shape[1] >= 2**31:
        reasons.append(f"the CUDA kernels need 2R+1 < 2^31, got {rel_bias.shape[1]}")
    return reasons
