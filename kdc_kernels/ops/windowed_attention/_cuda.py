r"""CUDA path of ``windowed_attention``: a thin wrapper over the compiled kernels in
``csrc/windowed_attention/``.

The ops are declared here (schema, fake implementation, autograd), so they exist for tracing,
fake tensors and ``opcheck`` whether or not the compiled extension is built. Their kernel is a
Python function that checks the arguments (every bad argument is reported here, before compiled
code runs) and calls the private op ``kdc::<name>_kernel`` (same schema) that loading the
extension registers:

* ``kdc::cuda_windowed_attention_fwd(q, k, v, rel_bias, sigma, lengths, scale, cutoff) -> (out, lse)``
  ``out [B, H, L, D]`` in q's dtype (padded rows 0), ``lse [B, H, L]`` fp32 log-sum-exp of each
  valid row (0 for padded rows), saved for the backward.
* ``kdc::cuda_windowed_attention_bwd(grad_out, q, k, v, rel_bias, sigma, lengths, out, lse, scale,
  cutoff) -> (grad_q, grad_k, grad_v, grad_rel_bias, grad_sigma)``; the last two are fp32
  (``[H, 2R+1]`` / ``[B, H, L]``), empty ``[0]`` tensors when rel_bias / sigma is None.

bf16 / fp16 with D <= 128 run on tensor cores (FlashAttention-2 structure, see
``csrc/windowed_attention/windowed_attention_tc_*.cu``); fp32 and D > 128 run fp32 SIMT kernels
(exact IEEE fp32), as does everything with ``KDC_CUDA_NO_TENSOR_CORES=1``. The kernels use no
floating-point atomics: results are bitwise reproducible run to run, so ``KDC_DETERMINISTIC`` needs
no separate mode here.
"""

from __future__ import annotations

import math

import torch

from ... import _ext
from .api import WINDOWED_ATTENTION

_FWD, _BWD = (f"kdc::{name}" for name in WINDOWED_ATTENTION.cuda_ops)
MAX_HEAD_DIM = 256  # kWindowAttnMaxD in csrc/windowed_attention/windowed_attention.h

_FWD_KERNEL, _BWD_KERNEL = _FWD + _ext.KERNEL_SUFFIX, _BWD + _ext.KERNEL_SUFFIX
_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? rel_bias, Tensor? sigma, Tensor? lengths, float scale, "
               "float? cutoff) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? rel_bias, Tensor? sigma, Tensor? lengths, "
               "Tensor out, Tensor lse, float scale, float? cutoff) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
for _name, _schema in ((_FWD, _FWD_SCHEMA), (_BWD, _BWD_SCHEMA), (_FWD_KERNEL, _FWD_SCHEMA),
                       (_BWD_KERNEL, _BWD_SCHEMA)):
    torch.library.define(_name, _schema)


def _check_inputs(q, k, v, rel_bias, sigma, lengths, scale, cutoff) -> None:
    """The checks of the binding (csrc/windowed_attention/windowed_attention_binding.cpp), in Python."""
    layout = "[B, H, L, D]"
    _ext.check_tensor(q, "q", 4, layout)
    _ext.check_device(q, "q", q, "q", _FWD_KERNEL)
    _ext.check_floating(q, "q")
    B, H, L, D = q.shape
    _ext.check_like(k, "k", q, "q", layout, _FWD_KERNEL)
    _ext.check_like(v, "v", q, "q", layout, _FWD_KERNEL)
    if D > MAX_HEAD_DIM or D < 1:
        _ext.fail("the CUDA windowed_attention kernels support a head dimension 1 <= D <= ", MAX_HEAD_DIM,
                  ", got D = ", D)
    for value, what in ((B, "B"), (H, "H"), (L, "L"), (B * H * L, "B * H * L")):
        _ext.check_below_2_31(value, what)
    if not math.isfinite(scale):
        _ext.fail("scale must be finite, got ", scale)
    if rel_bias is not None:
        _ext.check_tensor(rel_bias, "rel_bias", 2, "[H, 2R+1]")
        _ext.check_device(rel_bias, "rel_bias", q, "q", _FWD_KERNEL)
        _ext.check_floating(rel_bias, "rel_bias")
        if rel_bias.shape[0] != H or rel_bias.shape[1] % 2 != 1:
            _ext.fail("rel_bias must have shape [H, 2R+1] with H = ", H, " and an odd number of columns, got ",
                      list(rel_bias.shape))
        _ext.check_below_2_31(rel_bias.shape[1], "2R+1")
    if sigma is not None:
        _ext.check_tensor(sigma, "sigma", 3, "[B, H, L]")
        _ext.check_device(sigma, "sigma", q, "q", _FWD_KERNEL)
        _ext.check_floating(sigma, "sigma")
        if sigma.shape != (B, H, L):
            _ext.fail("sigma must have shape [B, H, L] = ", [B, H, L], ", got ", list(sigma.shape))
    _ext.check_lengths(lengths, B, "B", q, _FWD_KERNEL)
    if cutoff is not None:
        if not (math.isfinite(cutoff) and cutoff > 0):
            _ext.fail("cutoff must be a finite number > 0, got ", cutoff)
        if sigma is None:
            _ext.fail("cutoff needs sigma: the window is |i - j| <= cutoff * sigma[b, h, i]")


@torch.library.impl(_FWD, ["CPU", "CUDA"])
def _fwd_checked(q, k, v, rel_bias, sigma, lengths, scale, cutoff):
    _check_inputs(q, k, v, rel_bias, sigma, lengths, scale, cutoff)
    return torch.ops.kdc.cuda_windowed_attention_fwd_kernel(q, k, v, rel_bias, sigma, lengths, scale, cutoff)


@torch.library.impl(_BWD, ["CPU", "CUDA"])
def _bwd_checked(grad_out, q, k, v, rel_bias, sigma, lengths, out, lse, scale, cutoff):
    _check_inputs(q, k, v, rel_bias, sigma, lengths, scale, cutoff)
    layout = "[B, H, L, D]"
    _ext.check_like(grad_out, "grad_out", q, "q", layout, _BWD_KERNEL)
    _ext.check_like(out, "out", q, "q", layout, _BWD_KERNEL)
    if not out.is_contiguous():
        _ext.fail("out must be the forward's (contiguous) output")
    _ext.check_tensor(lse, "lse", 3, "[B, H, L]")
    _ext.check_device(lse, "lse", q, "q", _BWD_KERNEL)
    if lse.dtype != torch.float32 or not lse.is_contiguous():
        _ext.fail("lse must be the forward's float32 output")
    if lse.shape != q.shape[:3]:
        _ext.fail("lse must have shape [B, H, L] = ", list(q.shape[:3]), ", got ", list(lse.shape))
    return torch.ops.kdc.cuda_windowed_attention_bwd_kernel(grad_out, q, k, v, rel_bias, sigma, lengths, out, lse,
                                                             scale, cutoff)


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
    if D > MAX_HEAD_DIM or D < 1:
        reasons.append(f"the CUDA kernels support a head dimension 1 <= D <= {MAX_HEAD_DIM}, got D = {D}")
    if B * H * L >= 2**31:
        reasons.append(f"the CUDA kernels need B * H * L < 2^31, got {B * H * L}")
    if rel_bias is not None and rel_bias.shape[1] >= 2**31:
        reasons.append(f"the CUDA kernels need 2R+1 < 2^31, got {rel_bias.shape[1]}")
    return reasons
