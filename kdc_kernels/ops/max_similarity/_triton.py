r"""Triton kernels for ``max_similarity``: forward, registered ops and autograd (the backward
kernel is in ``_triton_bwd.py``; ``max_similarity_topk`` in ``_triton_topk.py``, on the same
score tile).

Notation: ``s_q[n] = 1 / max(|q_n|, 1e-12)`` and ``s_c[v, l] = 1 / max(|c_{v,l}|, 1e-12)`` when
``normalize=True`` (both 1 otherwise); ``q^ = s_q q``, ``c^ = s_c c``; ``l* = index[n, v]``.

Forward (two launches): one small kernel writes the fp32 norms of the query and clip rows (kept
for the backward), then a GEMM with a fused epilogue. A program owns a tile of ``BLOCK_Q`` queries
x ``BLOCK_COLS`` clip columns (``BLOCK_V`` whole videos x ``BLOCK_L`` clips); it loops over D with
``tl.dot`` (fp32 accumulation) and over clip chunks when ``L > BLOCK_L``::

    score[n, v] = max_{l < len_v} s_q[n] s_c[v, l] <q_n, c_{v,l}>
    index[n, v] = the lowest l attaining it

Padded clips score ``-inf``; the running max over clip chunks only moves on a strictly larger
value, so ties keep the lowest clip. Only ``[Nq, Nv]`` scores (fp32) and indices (int64) are written.

Backward (one launch), with ``g = dLoss/dscore``: the useful work only, ``O(Nq Nv D)``::

    dq^_n      = sum_v g[n, v] c^_{v, l*}               gather of the argmax clip rows
    dc^_{v, l} = sum_{n : l* = l} g[n, v] q^_n          the queries whose argmax is clip l
    dx         = s_x (dx^ - x^ <x^, dx^>)               the normalisation Jacobian (dx = s_x dx^
                                                        where the norm is clamped at 1e-12)
    <q^_n, dq^_n>         = sum_v g[n, v] score[n, v]
    <c^_{v,l}, dc^_{v,l}> = sum_{n : l* = l} g[n, v] score[n, v]

The first programs compute dq (one per block of queries x features, videos visited in order).
The others own one video each: a stable counting sort buckets the queries by their argmax clip
(a histogram of ``index[:, v]``, then each query's slot), after which every clip's queries are
contiguous and one pass of segmented sums over the sorted list gives
every ``dc`` row (prefix sums minus their value before the bucket), written once, Jacobian
applied, at the end of its bucket; clips no query picked get zeros. No one-hot matrix, no atomics: every output row is reduced by one program in a fixed
order, so the gradients are bitwise reproducible. Deterministic mode (``KDC_DETERMINISTIC=1``)
also pins the launch configuration (kdc_kernels/_launch.py), so they are reproducible across
processes too. The two projections come from the saved scores and norms, so the Jacobian needs
no second pass over D.

Precision: fp16/bf16 tiles go to the tensor cores as they are (fp32 accumulation); fp32 inputs
use IEEE fp32 dots unless TF32 is allowed the torch way (``_config.fp32_dot_precision``: then
expect errors up to about 1e-3). The backward has no dot: it sums in fp32 on the CUDA cores for
every dtype. Under ``TRITON_INTERPRET=1`` every dot runs in fp32.

Excluded positions: padded clips (``l >= lengths[v]``, any value, NaN included) score ``-inf``
before the max; a video of length 0 scores ``-inf`` with index 0 and gets no gradient (the
backward gives ``-inf`` scores zero weight and never reads the clip their index points at), and
a clip that no score chose with a nonzero weight gets exactly zero gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ... import _config, _launch
from . import _triton_bwd
from .reference import _NORM_EPS

_EPS = tl.constexpr(_NORM_EPS)
# The backward's counting sort keeps an L-bin histogram of each video in registers.
_MAX_BWD_L = 4096


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _row_norms_kernel(
    q_ptr, c_ptr, qn_ptr, cn_ptr, Nq, NC, L, D,
    s_qn, s_qd, s_cv, s_cl, s_cd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """fp32 L2 norms of the query rows (``[Nq]``) and of the clip rows (``[Nv, L]``, NC = Nv * L
    rows): the first programs take queries, the others clips."""
    pid = tl.program_id(0)
    n_qb = tl.cdiv(Nq, BLOCK_R)
    rr = tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    if pid < n_qb:
        r = pid * BLOCK_R + rr
        ok = r < Nq
        rows = q_ptr + r.to(tl.int64) * s_qn
        s_d = s_qd
        out = qn_ptr + r
    else:
        r = (pid - n_qb) * BLOCK_R + rr
        ok = r < NC
        r64 = r.to(tl.int64)
        rows = c_ptr + (r64 // L) * s_cv + (r64 % L) * s_cl
        s_d = s_cd
        out = cn_ptr + r
    acc = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = tl.load(rows[:, None] + (d0 + dd)[None, :] * s_d, mask=ok[:, None] & (dd < D - d0)[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(out, tl.sqrt(acc), mask=ok)


@_launch.device_helper
def _video_max_tile(
    q_ptr, c_ptr, len_ptr, qn_ptr, cn_ptr, q_left, v_left, L, D,
    s_qn, s_qd, s_cv, s_cl, s_cd, s_nv,
    NORMALIZE: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Max score and lowest argmax clip of BLOCK_Q queries x BLOCK_V videos:
    ``([BLOCK_Q, BLOCK_V] fp32, [BLOCK_Q, BLOCK_V] int32)``, ``-inf`` for videos past ``v_left``.

    The pointers are already moved to the tile's first query / video (64-bit, once per tile);
    offsets inside the tile are int32 (the launcher checks they fit)."""
    COLS: tl.constexpr = BLOCK_V * BLOCK_L
    rows = tl.arange(0, BLOCK_Q)
    q_ok = rows < q_left
    cols = tl.arange(0, COLS)
    vv = cols // BLOCK_L
    lc = cols % BLOCK_L
    v_ok = vv < v_left
    dd = tl.arange(0, BLOCK_D)
    if HAS_LENGTHS:
        n_valid = tl.load(len_ptr + vv, mask=v_ok, other=0)
    else:
        n_valid = L
    if NORMALIZE:
        q_scale = 1.0 / tl.maximum(tl.load(qn_ptr + rows, mask=q_ok, other=1.0), _EPS)
    best = tl.full((BLOCK_Q, BLOCK_V), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_Q, BLOCK_V), tl.int32)
    for l0 in range(0, L, BLOCK_L):
        l = l0 + lc
        col_ok = v_ok & (l < L)
        q_ptrs = q_ptr + rows[:, None] * s_qn + dd[None, :] * s_qd
        c_ptrs = c_ptr + (vv * s_cv + l * s_cl)[None, :] + dd[:, None] * s_cd
        acc = tl.zeros((BLOCK_Q, COLS), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = dd < D - d0
            qt = tl.load(q_ptrs, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            ct = tl.load(c_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_FP32:
                qt = qt.to(tl.float32)
                ct = ct.to(tl.float32)
            acc = tl.dot(qt, ct, acc, input_precision=PRECISION)
            q_ptrs += BLOCK_D * s_qd
            c_ptrs += BLOCK_D * s_cd
        if NORMALIZE:
            c_norm = tl.load(cn_ptr + vv * s_nv + l, mask=col_ok, other=1.0)
            acc = acc * q_scale[:, None] * (1.0 / tl.maximum(c_norm, _EPS))[None, :]
        acc = tl.where((col_ok & (l < n_valid))[None, :], acc, float("-inf"))
        # segmented max over each video's clips; the lowest clip wins a tie inside the chunk, and a
        # later chunk replaces the running max only when strictly larger
        m, a = tl.max(tl.reshape(acc, (BLOCK_Q, BLOCK_V, BLOCK_L)), axis=2, return_indices=True,
                      return_indices_tie_break_left=True)
        upd = m > best
        best = tl.where(upd, m, best)
        arg = tl.where(upd, a + l0, arg)
    return best, arg


@triton.jit
def _max_sim_fwd_kernel(
    q_ptr, c_ptr, len_ptr, qn_ptr, cn_ptr, score_ptr, index_ptr,
    Nq, Nv, L, D,
    s_qn, s_qd, s_cv, s_cl, s_cd, s_nv, s_on, s_ov,
    NORMALIZE: tl.constexpr, HAS_LENGTHS: tl.constexpr, WRITE_INDEX: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, L_POW2: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """score/index ``[Nq, Nv]`` for one tile of BLOCK_Q queries x BLOCK_V whole videos."""
    BLOCK_L: tl.constexpr = L_POW2 if L_POW2 < BLOCK_COLS else BLOCK_COLS
    BLOCK_V: tl.constexpr = BLOCK_COLS // BLOCK_L
    # query blocks vary fastest: programs running together share one clip tile in L2
    pid = tl.program_id(0)
    n_qb = tl.cdiv(Nq, BLOCK_Q)
    q0 = (pid % n_qb) * BLOCK_Q
    v0 = (pid // n_qb) * BLOCK_V
    q064, v064 = q0.to(tl.int64), v0.to(tl.int64)
    best, arg = _video_max_tile(
        q_ptr + q064 * s_qn, c_ptr + v064 * s_cv, len_ptr + v064, qn_ptr + q064, cn_ptr + v064 * s_nv,
        Nq - q0, Nv - v0, L, D, s_qn, s_qd, s_cv, s_cl, s_cd, s_nv,
        NORMALIZE, HAS_LENGTHS, DOT_FP32, PRECISION, BLOCK_Q, BLOCK_V, BLOCK_L, BLOCK_D,
    )
    rows = tl.arange(0, BLOCK_Q)
    vv = tl.arange(0, BLOCK_V)
    out = rows[:, None] * s_on + vv[None, :] * s_ov
    ok = (rows < Nq - q0)[:, None] & (vv < Nv - v0)[None, :]
    base = q064 * s_on + v064 * s_ov
    tl.store(score_ptr + base + out, best, mask=ok)
    if WRITE_INDEX:
        tl.store(index_ptr + base + out, arg.to(tl.int64), mask=ok)



# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------


def _dot_mode(dtype: torch.dtype, kernel) -> tuple[bool, str]:
    """(cast tiles to fp32 before ``tl.dot``, ``input_precision`` of fp32 dots: the package's
    one rule, ``_config.fp32_dot_precision``) for ``kernel``."""
    if _launch.interpreted(kernel):  # fp32 math throughout (the interpreter's bf16 arithmetic is wrong)
        return True, "ieee"
    if dtype == torch.float32:
        return True, _config.fp32_dot_precision("cuda")
    return False, "ieee"  # fp16/bf16 tiles go to the tensor cores as they are


def _pow2(n: int) -> int:
    return _launch.next_pow2(n)


# Launch configurations (kdc_kernels/_launch.py: the first of each list is the pinned one; the
# interpreter runs one config with few, large programs). Every GPU config compiles for sm_90
# without register spills (scripts/kernel_report.py checks it on every commit).
_NORMS = [dict(BLOCK_R=16, BLOCK_D=128, num_warps=4, num_stages=2)]
_NORMS_INTERPRET = dict(BLOCK_R=64, BLOCK_D=64)
_FWD_INTERPRET = dict(BLOCK_Q=16, BLOCK_COLS=64, BLOCK_D=32)
_FWD = {  # by DOT_FP32: fp16/bf16 tiles on the tensor cores, or fp32 (IEEE / TF32) dots
    False: [
        dict(BLOCK_Q=128, BLOCK_COLS=128, BLOCK_D=64, num_warps=8, num_stages=3),
        dict(BLOCK_Q=64, BLOCK_COLS=128, BLOCK_D=64, num_warps=4, num_stages=4),
        dict(BLOCK_Q=128, BLOCK_COLS=256, BLOCK_D=32, num_warps=8, num_stages=3),
        dict(BLOCK_Q=64, BLOCK_COLS=256, BLOCK_D=64, num_warps=8, num_stages=3),
    ],
    True: [
        dict(BLOCK_Q=64, BLOCK_COLS=128, BLOCK_D=32, num_warps=8, num_stages=3),
        dict(BLOCK_Q=128, BLOCK_COLS=64, BLOCK_D=32, num_warps=8, num_stages=3),
        dict(BLOCK_Q=64, BLOCK_COLS=64, BLOCK_D=32, num_warps=4, num_stages=3),
    ],
}
# The kernels move a 64-bit base pointer to each tile's first row and index inside the tile in
# int32 (far fewer registers than 64-bit offsets). A tile spans at most these many rows.
_TILE_QUERIES = 128
_INT32_LIMIT = 2**31


def _clip_tile(L: int, D: int) -> tuple[int, int, int]:
    """Most videos, clips and features one tile of clips spans."""
    return max(8, 256 // min(_pow2(L), 256)), L, D


def _tile_span(shape, stride, extents) -> int:
    """Largest element offset inside a tile spanning at most ``extents[i]`` along dim i."""
    return sum((min(n, e) - 1) * abs(s) for n, s, e in zip(shape, stride, extents))


def _int32_tiles(x: torch.Tensor, extents) -> torch.Tensor:
    """``x``, or a contiguous copy where its strides would overflow int32 offsets inside a tile."""
    return x if _tile_span(x.shape, x.stride(), extents) < _INT32_LIMIT else x.contiguous()


def _tile_ready(queries: torch.Tensor, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, (L, _) = queries.shape[1], clips.shape[1:]
    return _int32_tiles(queries, (_TILE_QUERIES, d)), _int32_tiles(clips, _clip_tile(L, d))


def _norms(queries: torch.Tensor, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 L2 norms ``([Nq], [Nv, L])`` of the query and clip rows, in one launch."""
    nq, d = queries.shape
    nv, L, _ = clips.shape
    qnorm = _launch.new_buffer("query_norms", (nq,), torch.float32, queries.device)
    cnorm = _launch.new_buffer("clip_norms", (nv, L), torch.float32, queries.device)
    if nq + nv * L == 0:
        return qnorm, cnorm

    def launch(config):
        meta, options = _launch.launch_options(config)
        grid = (_launch.cdiv(nq, meta["BLOCK_R"]) + _launch.cdiv(nv * L, meta["BLOCK_R"]),)
        _row_norms_kernel[grid](queries, clips, qnorm, cnorm, nq, nv * L, L, d, *queries.stride(), *clips.stride(),
                                **meta, **options)

    _launch.run(_row_norms_kernel, _NORMS, _NORMS_INTERPRET, (), launch, queries.device)
    return qnorm, cnorm


def _scores_launch(queries, clips, lengths, qnorm, cnorm, score, index) -> None:
    """score (and index unless None) ``[Nq, Nv']`` of ``clips [Nv', L, D]``; norms None: raw dots."""
    nq, d = queries.shape
    nv, L, _ = clips.shape
    if nq == 0 or nv == 0:
        return
    normalize = qnorm is not None
    dot_fp32, precision = _dot_mode(queries.dtype, _max_sim_fwd_kernel)
    args = (queries, clips, queries if lengths is None else lengths, qnorm if normalize else queries,
            cnorm if normalize else queries, score, score if index is None else index,
            nq, nv, L, d, *queries.stride(), *clips.stride(), cnorm.stride(0) if normalize else 0, *score.stride())
    consts = dict(NORMALIZE=normalize, HAS_LENGTHS=lengths is not None, WRITE_INDEX=index is not None,
                  DOT_FP32=dot_fp32, PRECISION=precision, L_POW2=_pow2(L))

    def launch(config):
        meta, options = _launch.launch_options(config)
        block_v = meta["BLOCK_COLS"] // min(consts["L_POW2"], meta["BLOCK_COLS"])
        grid = (_launch.cdiv(nq, meta["BLOCK_Q"]) * _launch.cdiv(nv, block_v),)
        _max_sim_fwd_kernel[grid](*args, **consts, **meta, **options)

    key = (queries.dtype, precision, normalize, index is not None, consts["L_POW2"], d, _launch.bucket(nq),
           _launch.bucket(nv))
    _launch.run(_max_sim_fwd_kernel, _FWD[dot_fp32], _FWD_INTERPRET, key, launch, queries.device)


def _max_sim_fwd(queries, clips, lengths, normalize: bool):
    """``(score fp32 [Nq, Nv], index int64 [Nq, Nv], query norms [Nq], clip norms [Nv, L])``; the
    norms (fp32, kept for the backward) are empty when ``normalize`` is False."""
    device = queries.device
    queries, clips = _tile_ready(queries, clips)
    if normalize:
        qnorm, cnorm = _norms(queries, clips)
    else:  # two distinct empty tensors (a custom op's outputs must not alias)
        qnorm, cnorm = (queries.new_empty(0, dtype=torch.float32) for _ in range(2))
    score = _launch.new_buffer("score", (queries.shape[0], clips.shape[0]), torch.float32, device)
    index = _launch.new_buffer("index", (queries.shape[0], clips.shape[0]), torch.int64, device)
    _scores_launch(queries, clips, lengths, qnorm if normalize else None, cnorm if normalize else None, score, index)
    return score, index, qnorm, cnorm


# ------------------------------------------------------------------------------------------------
# registered ops (namespace kdc_triton; kdc is the compiled extension's) + fakes + autograd
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("kdc_triton::max_similarity_fwd", mutates_args=())
def max_similarity_fwd_op(queries: torch.Tensor, clips: torch.Tensor, lengths: Optional[torch.Tensor],
                          normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(score, index, query norms, clip norms)``; the norms are for the backward."""
    return _max_sim_fwd(queries, clips, lengths, normalize)


@max_similarity_fwd_op.register_fake
def _(queries, clips, lengths, normalize):
    shape = (queries.shape[0], clips.shape[0])
    norms = (queries.shape[:1], clips.shape[:2]) if normalize else ((0,), (0,))
    return (queries.new_empty(shape, dtype=torch.float32), queries.new_empty(shape, dtype=torch.int64),
            *(queries.new_empty(s, dtype=torch.float32) for s in norms))


@torch.library.custom_op("kdc_triton::max_similarity_bwd", mutates_args=())
def max_similarity_bwd_op(grad: torch.Tensor, queries: torch.Tensor, clips: torch.Tensor, score: torch.Tensor,
                          index: torch.Tensor, query_norms: torch.Tensor, clip_norms: torch.Tensor, normalize: bool,
                          need_dq: bool, need_dc: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_bwd._max_sim_bwd(grad, queries, clips, score, index, query_norms, clip_norms, normalize,
                                    need_dq, need_dc)


@max_similarity_bwd_op.register_fake
def _(grad, queries, clips, score, index, query_norms, clip_norms, normalize, need_dq, need_dc):
    return (torch.empty_like(queries, memory_format=torch.contiguous_format) if need_dq else queries.new_empty(0),
            torch.empty_like(clips, memory_format=torch.contiguous_format) if need_dc else clips.new_empty(0))


def _fwd_setup_context(ctx, inputs, output):
    queries, clips, _lengths, normalize = inputs
    score, index, qnorm, cnorm = output
    ctx.save_for_backward(queries, clips, score, index, qnorm, cnorm)
    ctx.normalize = normalize
    ctx.mark_non_differentiable(index, qnorm, cnorm)


def _fwd_backward(ctx, grad_score, _grad_index, _grad_qnorm, _grad_cnorm):
    queries, clips, score, index, qnorm, cnorm = ctx.saved_tensors
    need_dq, need_dc = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dq, dc = max_similarity_bwd_op(grad_score, queries, clips, score, index, qnorm, cnorm, ctx.normalize,
                                   need_dq, need_dc)
    return (dq if need_dq else None), (dc if need_dc else None), None, None


max_similarity_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ------------------------------------------------------------------------------------------------
# fast-path entry points (called by api.py through _backend with the validated case)
# ------------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _common_reasons(queries: torch.Tensor, clips: torch.Tensor) -> list[str]:
    """Shape/dtype reasons only (the case may live on the meta device)."""
    if queries.dtype not in _DTYPES:
        return [f"the Triton kernels take float32/float16/bfloat16 inputs, got {queries.dtype} "
                "(convert with .float(), or use impl='reference')"]
    (nv, L, d), reasons = clips.shape, []
    if _tile_span((nv, L, d), (L * d, d, 1), _clip_tile(L, d)) >= _INT32_LIMIT:
        reasons.append(f"a tile of clips would span 2^31 elements or more (L = {L}, D = {d})")
    return reasons


def max_similarity_unsupported(queries, clips, lengths, normalize, return_index) -> list[str]:
    reasons = _common_reasons(queries, clips)
    nv, L = clips.shape[:2]
    if _tile_span((queries.shape[0], nv), (nv, 1), (_TILE_QUERIES, nv)) >= _INT32_LIMIT:
        reasons.append(f"an [Nq, Nv] output tile would span 2^31 elements or more (Nv = {nv}); "
                       "max_similarity_topk streams any number of videos")
    if L > _MAX_BWD_L and clips.requires_grad and torch.is_grad_enabled():
        reasons.append(f"the Triton backward buckets each video's queries by argmax clip with an L-bin histogram "
                       f"of at most {_MAX_BWD_L} bins, got L = {L} (clips require grad)")
    return reasons


def max_similarity_triton(queries, clips, lengths, normalize, return_index):
    score, index, _, _ = torch.ops.kdc_triton.max_similarity_fwd(queries, clips, lengths, normalize)
    return (score, index) if return_index else score
