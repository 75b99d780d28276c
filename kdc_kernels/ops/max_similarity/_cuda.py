r"""CUDA path of ``max_similarity`` and ``max_similarity_topk``: a thin wrapper over the compiled
kernels in ``csrc/max_similarity/``.

The ops are declared here (schema, fake implementation, autograd), so they exist for tracing,
fake tensors and ``opcheck`` whether or not the compiled extension is built. Their kernel is a
Python function that checks the arguments (every bad argument is reported here, before compiled
code runs) and calls the private op ``kdc::<name>_kernel`` (same schema) that loading the
extension registers:

* ``kdc::cuda_max_similarity_fwd(queries, clips, lengths, normalize) -> (score, index,
  query_norms, clip_norms)``: score fp32 ``[Nq, Nv]``, index int64 ``[Nq, Nv]`` (lowest argmax
  clip), and with normalize the fp32 L2 norms ``[Nq]`` / ``[Nv, L]`` saved for the backward (empty
  ``[0]`` tensors without).
* ``kdc::cuda_max_similarity_bwd(grad_score, queries, clips, lengths, index, query_norms,
  clip_norms, normalize) -> (grad_queries, grad_clips)``.
* ``kdc::cuda_max_similarity_topk(queries, clips, lengths, k, normalize) -> (scores, videos)``:
  fp32 / int64 ``[Nq, k]``; no ``[Nq, Nv]`` buffer; no autograd.

bf16 / fp16 scoring with D <= 512 runs on tensor cores (``csrc/max_similarity/tc_score.cuh``), fp32
on an exact SIMT loop; ``KDC_CUDA_NO_TENSOR_CORES=1`` selects the older WMMA scoring for bf16 / fp16.
The kernels use no floating-point atomics: results are bitwise reproducible run to run.
"""

from __future__ import annotations

import torch

from ... import _ext
from .api import MAX_SIMILARITY, MAX_SIMILARITY_TOPK

_FWD, _BWD = (f"kdc::{name}" for name in MAX_SIMILARITY.cuda_ops)
(_TOPK,) = (f"kdc::{name}" for name in MAX_SIMILARITY_TOPK.cuda_ops)
MAX_BACKWARD_DIM = 2048  # kMaxSimBwdMaxD in csrc/max_similarity/max_similarity.h
MAX_QUERIES = 65535 * 64  # grid limit of the scoring kernels (query tiles of 64)

_FWD_KERNEL, _BWD_KERNEL, _TOPK_KERNEL = (name + _ext.KERNEL_SUFFIX for name in (_FWD, _BWD, _TOPK))
_FWD_SCHEMA = "(Tensor queries, Tensor clips, Tensor? lengths, bool normalize) -> (Tensor, Tensor, Tensor, Tensor)"
_BWD_SCHEMA = ("(Tensor grad_score, Tensor queries, Tensor clips, Tensor? lengths, Tensor index, Tensor query_norms, "
               "Tensor clip_norms, bool normalize) -> (Tensor, Tensor)")
_TOPK_SCHEMA = "(Tensor queries, Tensor clips, Tensor? lengths, int k, bool normalize) -> (Tensor, Tensor)"
for _name, _schema in ((_FWD, _FWD_SCHEMA), (_BWD, _BWD_SCHEMA), (_TOPK, _TOPK_SCHEMA), (_FWD_KERNEL, _FWD_SCHEMA),
                       (_BWD_KERNEL, _BWD_SCHEMA), (_TOPK_KERNEL, _TOPK_SCHEMA)):
    torch.library.define(_name, _schema)


def _check_inputs(queries, clips, lengths, kernel_op: str) -> None:
    """The checks of the binding (csrc/max_similarity/max_similarity_binding.cpp), in Python."""
    _ext.check_tensor(queries, "queries", 2, "[Nq, D]")
    _ext.check_device(queries, "queries", queries, "queries", kernel_op)
    _ext.check_floating(queries, "queries")
    _ext.check_tensor(clips, "clips", 3, "[Nv, L, D]")
    _ext.check_device(clips, "clips", queries, "queries", kernel_op)
    if clips.dtype != queries.dtype:
        _ext.fail("clips must have the same dtype as queries (", queries.dtype, "), got ", clips.dtype)
    if clips.shape[2] != queries.shape[1]:
        _ext.fail("clips must have the embedding size D of queries (", queries.shape[1], ") in [Nv, L, D], got clips "
                  "of shape ", list(clips.shape))
    for value, what in ((clips.shape[1], "L"), (clips.shape[2], "D"), (clips.shape[0], "Nv")):
        _ext.check_below_2_31(value, what)
    if clips.shape[1] < 1 or clips.shape[2] < 1:
        _ext.fail("the CUDA max_similarity kernels need L >= 1 and D >= 1, got clips of shape ", list(clips.shape))
    _ext.check_lengths(lengths, clips.shape[0], "Nv", queries, kernel_op)


@torch.library.impl(_FWD, ["CPU", "CUDA"])
def _fwd_checked(queries, clips, lengths, normalize):
    _check_inputs(queries, clips, lengths, _FWD_KERNEL)
    if queries.shape[0] > MAX_QUERIES:
        _ext.fail("the CUDA max_similarity kernels support Nq <= ", MAX_QUERIES, ", got Nq = ", queries.shape[0])
    return torch.ops.kdc.cuda_max_similarity_fwd_kernel(queries, clips, lengths, normalize)


@torch.library.impl(_BWD, ["CPU", "CUDA"])
def _bwd_checked(grad_score, queries, clips, lengths, index, query_norms, clip_norms, normalize):
    _check_inputs(queries, clips, lengths, _BWD_KERNEL)
    nq, (nv, L, D) = queries.shape[0], clips.shape
    if D > MAX_BACKWARD_DIM:
        _ext.fail("the CUDA max_similarity backward supports D <= ", MAX_BACKWARD_DIM, ", got D = ", D)
    _ext.check_tensor(grad_score, "grad_score", 2, "[Nq, Nv]")
    _ext.check_device(grad_score, "grad_score", queries, "queries", _BWD_KERNEL)
    if grad_score.shape != (nq, nv):
        _ext.fail("grad_score must have shape [Nq, Nv] = ", [nq, nv], ", got ", list(grad_score.shape))
    _ext.check_tensor(index, "index", 2, "[Nq, Nv]")
    _ext.check_device(index, "index", queries, "queries", _BWD_KERNEL)
    if index.dtype != torch.int64:
        _ext.fail("index must be the forward's int64 index, got ", index.dtype)
    if index.shape != (nq, nv):
        _ext.fail("index must have shape [Nq, Nv] = ", [nq, nv], ", got ", list(index.shape))
    if normalize:
        for t, name in ((query_norms, "query_norms"), (clip_norms, "clip_norms")):
            _ext.check_device(t, name, queries, "queries", _BWD_KERNEL)
            if t.dtype != torch.float32 or not t.is_contiguous():
                _ext.fail(name, " must be the forward's float32 norms")
        if query_norms.numel() != nq or clip_norms.numel() != nv * L:
            _ext.fail("query_norms / clip_norms must hold Nq and Nv * L norms, got ", list(query_norms.shape),
                      " and ", list(clip_norms.shape))
    return torch.ops.kdc.cuda_max_similarity_bwd_kernel(grad_score, queries, clips, lengths, index, query_norms,
                                                        clip_norms, normalize)


@torch.library.impl(_TOPK, ["CPU", "CUDA"])
def _topk_checked(queries, clips, lengths, k, normalize):
    _check_inputs(queries, clips, lengths, _TOPK_KERNEL)
    if not 1 <= k <= clips.shape[0]:
        _ext.fail("k must lie in [1, Nv] = [1, ", clips.shape[0], "], got ", k)
    return torch.ops.kdc.cuda_max_similarity_topk_kernel(queries, clips, lengths, k, normalize)


def _norm_shapes(queries, clips, normalize):
    nq, (nv, L, _) = queries.shape[0], clips.shape
    return ((nq,), (nv, L)) if normalize else ((0,), (0,))


@torch.library.register_fake(_FWD)
def _fwd_fake(queries, clips, lengths, normalize):
    nq, nv = queries.shape[0], clips.shape[0]
    qshape, cshape = _norm_shapes(queries, clips, normalize)
    f32 = dict(dtype=torch.float32)
    return (queries.new_empty((nq, nv), **f32), queries.new_empty((nq, nv), dtype=torch.int64),
            queries.new_empty(qshape, **f32), queries.new_empty(cshape, **f32))


@torch.library.register_fake(_BWD)
def _bwd_fake(grad_score, queries, clips, lengths, index, query_norms, clip_norms, normalize):
    return queries.new_empty(queries.shape), clips.new_empty(clips.shape)


@torch.library.register_fake(_TOPK)
def _topk_fake(queries, clips, lengths, k, normalize):
    nq = queries.shape[0]
    return queries.new_empty((nq, k), dtype=torch.float32), queries.new_empty((nq, k), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    queries, clips, lengths, normalize = inputs
    _, index, query_norms, clip_norms = output
    ctx.mark_non_differentiable(index, query_norms, clip_norms)
    ctx.save_for_backward(queries, clips, lengths, index, query_norms, clip_norms)
    ctx.normalize = normalize


def _backward(ctx, grad_score, grad_index, grad_query_norms, grad_clip_norms):
    queries, clips, lengths, index, query_norms, clip_norms = ctx.saved_tensors
    grad_queries, grad_clips = torch.ops.kdc.cuda_max_similarity_bwd(
        grad_score, queries, clips, lengths, index, query_norms, clip_norms, ctx.normalize)
    needs = ctx.needs_input_grad
    return grad_queries if needs[0] else None, grad_clips if needs[1] else None, None, None


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


def max_similarity_cuda(queries, clips, lengths=None, normalize=True, return_index=False):
    """Runs the compiled kernels on a validated case (see ``api._validate``)."""
    _ext.status()  # loads the extension (and its kernel registrations) on first use
    score, index, _, _ = torch.ops.kdc.cuda_max_similarity_fwd(queries, clips, lengths, normalize)
    return (score, index) if return_index else score


def max_similarity_unsupported(queries, clips, lengths=None, normalize=True, return_index=False) -> list[str]:
    """Every reason the CUDA kernels cannot run this case (shapes and dtypes only)."""
    reasons = _shape_reasons(queries, clips)
    D = queries.shape[1]
    if (queries.requires_grad or clips.requires_grad) and D > MAX_BACKWARD_DIM:
        reasons.append(f"the CUDA backward supports an embedding size D <= {MAX_BACKWARD_DIM}, got D = {D}")
    return reasons


def max_similarity_topk_cuda(queries, clips, lengths=None, k=100, normalize=True):
    """Runs the compiled top-k kernels on a validated case (no autograd)."""
    _ext.status()
    return torch.ops.kdc.cuda_max_similarity_topk(queries.detach(), clips.detach(), lengths, k, normalize)


def max_similarity_topk_unsupported(queries, clips, lengths=None, k=100, normalize=True) -> list[str]:
    """Every reason the CUDA kernels cannot run this case (shapes and dtypes only)."""
    return _shape_reasons(queries, clips, query_limit=False)  # queries are processed in chunks


def _shape_reasons(queries, clips, query_limit: bool = True) -> list[str]:
    reasons = []
    nq, (nv, L, D) = queries.shape[0], clips.shape
    if queries.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"the CUDA kernels take float32/float16/bfloat16 inputs, got {queries.dtype} "
                       "(convert with .float(), or use impl='reference')")
    if query_limit and nq > MAX_QUERIES:
        reasons.append(f"the CUDA kernels support Nq <= {MAX_QUERIES} queries per call, got {nq}")
    for name, value in (("Nv", nv), ("L", L), ("D", D)):
        if value >= 2**31 - 1:
            reasons.append(f"the CUDA kernels need {name} < 2^31 - 1, got {value}")
    if L < 1 or D < 1:
        reasons.append(f"the CUDA kernels need L >= 1 and D >= 1, got clips of shape {tuple(clips.shape)}")
    return reasons
