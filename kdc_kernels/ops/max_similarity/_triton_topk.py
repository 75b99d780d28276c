r"""Triton kernels for ``max_similarity_topk``: the score tile of ``_triton.py`` with a running
per-query top-k in its epilogue, so no ``[Nq, Nv]`` buffer is ever written.

Scores are packed with their video into one int64 key (order-preserving float bits in the high
word, ``2^31 - 1 - video`` in the low word), so "descending score, ties to the lower video" is
plain descending key order. A running best list of ``K_PAD = max(16, next_pow2(k))`` keys per
query is kept sorted ascending; a block of ``K_PAD`` candidate keys sorted descending merges into
it exactly with ``bitonic_merge(maximum(best, cand))`` (the half-cleaner keeps the ``K_PAD``
largest of the union).

* ``K_PAD <= 128``: a fused kernel streams the videos of one split through the GEMM tile and keeps
  the running list in registers; a second small pass merges the splits' lists. Its tiles are
  autotuned (kdc_kernels/_launch.py) over a few configs with ``BLOCK_Q >= 64`` so that the dots
  reach the sm_90 warpgroup MMA (wgmma).
* larger k (up to 4096): the forward kernel scores a chunk of ``4 * K_PAD`` videos into a working
  block, and the merge kernel folds it into the running ``[Nq, K_PAD]`` list.

Peak extra memory is ``O(Nq * K_PAD)`` plus one working block and the ``[Nv, L]`` clip norm table;
there is never an ``[Nq, Nv]`` buffer (``_launch.hooks.on_alloc`` reports every buffer).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ... import _launch
from ._triton import _common_reasons, _dot_mode, _norms, _pow2, _scores_launch, _tile_ready, _video_max_tile

_SENTINEL = tl.constexpr(-(2**63))  # below every packed key: an empty slot
_TOPK_REGISTER_MAX = 128  # K_PAD up to this keeps the running list in registers (fused kernel)
_TOPK_MAX_K = 4096
_TOPK_CHUNK_BLOCKS = 4  # large-k path: videos per working chunk = this * K_PAD


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@_launch.device_helper
def _pack_keys(score, video):
    """int64 keys ordered like (score, -video): order-preserving float bits above, 2^31-1-video below."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 == +0.0: one key, so the tie goes by video
    bits = score.to(tl.int32, bitcast=True)
    hi = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    return (hi << 32) | (0x7FFFFFFF - video).to(tl.int64)


@_launch.device_helper
def _unpack_keys(keys):
    hi = (keys >> 32).to(tl.int32)
    bits = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - (keys & 0x7FFFFFFF)

# Bitonic networks over int64 keys. Triton's tl.sort finds each element's partner with an xor
# reduction, which the interpreter runs element by element in Python; a wrapping int64 sum finds
# the same partner ((a + b) - a == b) with the reductions both the compiler and the interpreter
# handle natively. The tensor is viewed as a hypercube [2] * N_DIMS: axis N_DIMS - 1 - b is bit b
# of the flat index, so the last LOG_K bits index the sorted dimension.


@_launch.device_helper
def _bit(N_DIMS: tl.constexpr, b: tl.constexpr):
    """0/1 indicator of bit b of the flat index, broadcastable over the hypercube."""
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - 1 - b) + [2] + [1] * b)


@_launch.device_helper
def _compare_swap(h, N_DIMS: tl.constexpr, b: tl.constexpr, desc):
    """Order every pair of elements whose flat index differs in bit b (descending where desc)."""
    partner = tl.sum(h, axis=N_DIMS - 1 - b, keep_dims=True) - h
    return tl.where((h > partner) != (desc ^ _bit(N_DIMS, b)), partner, h)


@_launch.device_helper
def _sort_keys(x, LOG_ROWS: tl.constexpr, LOG_K: tl.constexpr, DESCENDING: tl.constexpr):
    """Sort int64 keys ``x [2^LOG_ROWS, 2^LOG_K]`` along the last dim."""
    N_DIMS: tl.constexpr = LOG_ROWS + LOG_K
    h = tl.reshape(x, [2] * N_DIMS)
    for stage in tl.static_range(1, LOG_K + 1):
        # runs of 2^stage end sorted, alternating in direction (bit `stage`) until the last stage
        if stage < LOG_K:
            desc = _bit(N_DIMS, stage)
        else:
            desc = DESCENDING
        for j in tl.static_range(stage):
            h = _compare_swap(h, N_DIMS, stage - 1 - j, desc)
    return tl.reshape(h, x.shape)


@_launch.device_helper
def _merge_keys(x, LOG_ROWS: tl.constexpr, LOG_K: tl.constexpr, DESCENDING: tl.constexpr):
    """Sort int64 keys ``x [2^LOG_ROWS, 2^LOG_K]`` whose rows are bitonic (the last sort stage)."""
    N_DIMS: tl.constexpr = LOG_ROWS + LOG_K
    h = tl.reshape(x, [2] * N_DIMS)
    for j in tl.static_range(LOG_K):
        h = _compare_swap(h, N_DIMS, LOG_K - 1 - j, DESCENDING)
    return tl.reshape(h, x.shape)


@triton.jit
def _topk_partial_kernel(
    q_ptr, c_ptr, len_ptr, qn_ptr, cn_ptr, part_ptr,
    Nq, Nv, L, D, groups_per_split,
    s_qn, s_qd, s_cv, s_cl, s_cd, s_nv, s_ps,
    NORMALIZE: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    L_POW2: tl.constexpr, LOG_K: tl.constexpr, LOG_Q: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Best K_PAD keys (ascending) of BLOCK_Q queries over one split of the videos, kept in
    registers while the split streams through the GEMM tile, K_PAD videos per merge."""
    BLOCK_L: tl.constexpr = L_POW2 if L_POW2 < BLOCK_COLS else BLOCK_COLS
    BLOCK_V: tl.constexpr = BLOCK_COLS // BLOCK_L  # <= K_PAD (launcher)
    BLOCK_Q: tl.constexpr = 1 << LOG_Q
    K_PAD: tl.constexpr = 1 << LOG_K
    pid = tl.program_id(0)
    n_qb = tl.cdiv(Nq, BLOCK_Q)
    pid_s = pid // n_qb
    q0 = (pid % n_qb) * BLOCK_Q
    q064 = q0.to(tl.int64)
    g_begin = pid_s * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, tl.cdiv(Nv, K_PAD))
    v0 = g_begin * K_PAD
    v064 = v0.to(tl.int64)
    c_tile, len_tile, cn_tile = c_ptr + v064 * s_cv, len_ptr + v064, cn_ptr + v064 * s_nv
    vv = tl.arange(0, BLOCK_V)
    slot_rows = tl.arange(0, K_PAD // BLOCK_V)
    best = tl.full((BLOCK_Q, K_PAD), _SENTINEL, tl.int64)
    for g in range(g_begin, g_end):
        # K_PAD candidates gathered tile by tile: slot order is irrelevant (sorted below), so
        # tile t fills row t of a [BLOCK_Q, K_PAD // BLOCK_V, BLOCK_V] view
        cand = tl.full((BLOCK_Q, K_PAD // BLOCK_V, BLOCK_V), _SENTINEL, tl.int64)
        for t in range(0, K_PAD // BLOCK_V):
            if v0 < Nv:
                s, _ = _video_max_tile(
                    q_ptr + q064 * s_qn, c_tile, len_tile, qn_ptr + q064, cn_tile, Nq - q0, Nv - v0, L, D,
                    s_qn, s_qd, s_cv, s_cl, s_cd, s_nv,
                    NORMALIZE, HAS_LENGTHS, DOT_FP32, PRECISION, BLOCK_Q, BLOCK_V, BLOCK_L, BLOCK_D,
                )
                keys = tl.where((vv < Nv - v0)[None, :], _pack_keys(s, (v0 + vv)[None, :]), _SENTINEL)
                cand = tl.where((slot_rows == t)[None, :, None], keys[:, None, :], cand)
            v0 += BLOCK_V
            c_tile += BLOCK_V * s_cv
            len_tile += BLOCK_V
            cn_tile += BLOCK_V * s_nv
        cand = _sort_keys(tl.reshape(cand, (BLOCK_Q, K_PAD)), LOG_Q, LOG_K, True)
        best = _merge_keys(tl.maximum(best, cand), LOG_Q, LOG_K, False)
    rows = tl.arange(0, BLOCK_Q)
    out = part_ptr + pid_s.to(tl.int64) * s_ps + q064 * K_PAD + rows[:, None] * K_PAD + tl.arange(0, K_PAD)[None, :]
    tl.store(out, best, mask=(rows < Nq - q0)[:, None])


@triton.jit
def _topk_merge_kernel(
    best_ptr, src_ptr, score_out_ptr, index_out_ptr,
    Nq, n_blocks, n_cols, v_base, k,
    s_sb, s_sn, s_sc,
    FROM_SCORES: tl.constexpr, FIRST: tl.constexpr, WRITE_OUT: tl.constexpr,
    LOG_K: tl.constexpr, LOG_ROWS: tl.constexpr,
):
    """Fold ``n_blocks`` candidate blocks of K_PAD into the running ascending best list of ROWS
    queries. FROM_SCORES: blocks are raw fp32 scores ``src[n, col]`` of videos ``v_base + col``;
    otherwise ascending partial lists ``src[b, n, :]``. WRITE_OUT: write the top k (descending)."""
    K_PAD: tl.constexpr = 1 << LOG_K
    ROWS: tl.constexpr = 1 << LOG_ROWS
    r0 = tl.program_id(0) * ROWS
    r064 = r0.to(tl.int64)
    rows = tl.arange(0, ROWS)
    r_ok = rows < Nq - r0
    slots = tl.arange(0, K_PAD)
    best_ptrs = best_ptr + r064 * K_PAD + rows[:, None] * K_PAD + slots[None, :]
    if FIRST:
        best = tl.full((ROWS, K_PAD), _SENTINEL, tl.int64)
    else:
        best = tl.load(best_ptrs, mask=r_ok[:, None], other=_SENTINEL)
    if FROM_SCORES:
        src_ptrs = src_ptr + r064 * s_sn + rows[:, None] * s_sn + slots[None, :] * s_sc
    else:  # a partial list is ascending: read it backwards
        src_ptrs = src_ptr + r064 * K_PAD + rows[:, None] * K_PAD + (K_PAD - 1 - slots)[None, :]
    for b in range(n_blocks):
        if FROM_SCORES:
            col = b * K_PAD + slots
            ok = r_ok[:, None] & (col < n_cols)[None, :]
            s = tl.load(src_ptrs, mask=ok, other=0.0)
            cand = _sort_keys(tl.where(ok, _pack_keys(s, (v_base + col)[None, :]), _SENTINEL), LOG_ROWS, LOG_K, True)
            src_ptrs += K_PAD * s_sc
        else:
            cand = tl.load(src_ptrs, mask=r_ok[:, None], other=_SENTINEL)
            src_ptrs += s_sb
        best = _merge_keys(tl.maximum(best, cand), LOG_ROWS, LOG_K, False)
    if WRITE_OUT:
        rank = K_PAD - 1 - slots
        score, video = _unpack_keys(best)
        out = r064 * k + rows[:, None] * k + rank[None, :]
        ok = r_ok[:, None] & (rank < k)[None, :]
        tl.store(score_out_ptr + out, score, mask=ok)
        tl.store(index_out_ptr + out, video, mask=ok)
    else:
        tl.store(best_ptrs, best, mask=r_ok[:, None])

# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------


def _log2(n: int) -> int:
    """log2 of a power of two."""
    return n.bit_length() - 1


def _topk_kpad(k: int) -> int:
    return max(16, _pow2(k))


_TOPK_INTERPRET = dict(BLOCK_Q=16, BLOCK_COLS=64, BLOCK_D=32)


def _topk_configs(k_pad: int, dot_fp32: bool) -> list[dict]:
    """GPU configs of the fused top-k kernel for this K_PAD (the first is the pinned one). fp16 /
    bf16: 64 queries per tile, so the dots reach the warpgroup MMA (wgmma), and 8 warps, since the
    running list and its candidates take 2 * BLOCK_Q * K_PAD int64 registers. fp32 tiles (IEEE or
    TF32 dots) take twice the registers: 32 queries. None of these spills."""
    if dot_fp32:
        return [dict(BLOCK_Q=32, BLOCK_COLS=64, BLOCK_D=32, num_warps=8, num_stages=3)]
    if k_pad <= 32:
        return [dict(BLOCK_Q=64, BLOCK_COLS=128, BLOCK_D=64, num_warps=8, num_stages=3),
                dict(BLOCK_Q=64, BLOCK_COLS=64, BLOCK_D=64, num_warps=8, num_stages=3)]
    return [dict(BLOCK_Q=64, BLOCK_COLS=64, BLOCK_D=64, num_warps=8, num_stages=3),
            dict(BLOCK_Q=64, BLOCK_COLS=64, BLOCK_D=32, num_warps=8, num_stages=4)]


def _topk_merge_configs(k_pad: int) -> tuple[list[dict], dict]:
    """(GPU configs, interpreter config) of the merge kernel: ROWS queries x K_PAD keys per program."""
    return ([dict(ROWS=max(1, 2048 // k_pad), num_warps=4 if k_pad <= 256 else 8, num_stages=1)],
            dict(ROWS=max(1, 4096 // k_pad)))


def _topk_merge(best, src, scores, videos, n_blocks, n_cols, v_base, k, src_strides, *, from_scores, first, last):
    nq, k_pad = scores.shape[0], _topk_kpad(k)
    dummy = scores if best is None else best

    def launch(config):
        meta, options = _launch.launch_options(config)
        rows = meta.pop("ROWS")
        _topk_merge_kernel[(_launch.cdiv(nq, rows),)](
            dummy, src, scores, videos, nq, n_blocks, n_cols, v_base, k, *src_strides,
            FROM_SCORES=from_scores, FIRST=first, WRITE_OUT=last, LOG_K=_log2(k_pad), LOG_ROWS=_log2(rows), **options,
        )

    _launch.run(_topk_merge_kernel, *_topk_merge_configs(k_pad), (k_pad,), launch, src.device)


def _topk_splits(n_qblocks: int, n_groups: int, device: torch.device) -> int:
    """Video splits of the fused top-k: enough programs to fill the GPU, each split >= 4 groups."""
    if _launch.hooks.topk_splits is not None:
        return max(1, min(_launch.hooks.topk_splits, n_groups))
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(_launch.cdiv(target, n_qblocks), n_groups // 4))


def _max_sim_topk(queries, clips, lengths, k: int, normalize: bool):
    """``(scores fp32 [Nq, k], videos int64 [Nq, k])``: descending, ties to the lower video."""
    nq, d = queries.shape
    nv, L, _ = clips.shape
    device = queries.device
    k_pad = _topk_kpad(k)
    queries, clips = _tile_ready(queries, clips)
    qnorm, cnorm = _norms(queries, clips) if normalize else (None, None)
    scores = _launch.new_buffer("topk_scores", (nq, k), torch.float32, device)
    videos = _launch.new_buffer("topk_videos", (nq, k), torch.int64, device)
    if nq == 0:
        return scores, videos
    if k_pad <= _TOPK_REGISTER_MAX:
        dot_fp32, precision = _dot_mode(queries.dtype, _topk_partial_kernel)
        l_pow2 = _pow2(L)
        norm_args = (qnorm, cnorm) if normalize else (queries, queries)
        consts = dict(NORMALIZE=normalize, HAS_LENGTHS=lengths is not None, DOT_FP32=dot_fp32, PRECISION=precision,
                      L_POW2=l_pow2, LOG_K=_log2(k_pad))

        def launch(config):
            meta, options = _launch.launch_options(config)
            block_q = meta.pop("BLOCK_Q")
            # at most K_PAD videos per tile; at least 16 columns for tl.dot
            meta["BLOCK_COLS"] = max(16, min(meta["BLOCK_COLS"], k_pad * min(l_pow2, meta["BLOCK_COLS"])))
            n_qb, n_groups = _launch.cdiv(nq, block_q), _launch.cdiv(nv, k_pad)
            per_split = _launch.cdiv(n_groups, _topk_splits(n_qb, n_groups, device))
            splits = _launch.cdiv(n_groups, per_split)
            partial = _launch.new_buffer("topk_partial", (splits, nq, k_pad), torch.int64, device)
            _topk_partial_kernel[(n_qb * splits,)](
                queries, clips, queries if lengths is None else lengths, *norm_args, partial,
                nq, nv, L, d, per_split, *queries.stride(), *clips.stride(), cnorm.stride(0) if normalize else 0,
                partial.stride(0), LOG_Q=_log2(block_q), **consts, **meta, **options,
            )
            _topk_merge(None, partial, scores, videos, splits, 0, 0, k, (partial.stride(0), 0, 0),
                        from_scores=False, first=True, last=True)

        key = (queries.dtype, precision, normalize, k_pad, l_pow2, d, _launch.bucket(nq), _launch.bucket(nv))
        _launch.run(_topk_partial_kernel, _topk_configs(k_pad, dot_fp32), _TOPK_INTERPRET, key, launch, device)
        return scores, videos
    chunk = _TOPK_CHUNK_BLOCKS * k_pad
    n_chunks = _launch.cdiv(nv, chunk)
    work = _launch.new_buffer("topk_working_scores", (nq, min(chunk, nv)), torch.float32, device)
    best = _launch.new_buffer("topk_running", (nq, k_pad), torch.int64, device) if n_chunks > 1 else None
    for c in range(n_chunks):
        v0, v1 = c * chunk, min(nv, (c + 1) * chunk)
        block = work[:, : v1 - v0]
        _scores_launch(queries, clips[v0:v1], None if lengths is None else lengths[v0:v1], qnorm,
                       None if cnorm is None else cnorm[v0:v1], block, None)
        _topk_merge(best, block, scores, videos, _launch.cdiv(v1 - v0, k_pad), v1 - v0, v0, k,
                    (0, *block.stride()), from_scores=True, first=c == 0, last=c == n_chunks - 1)
    return scores, videos


# ------------------------------------------------------------------------------------------------
# registered op (no autograd) and the fast-path entry points
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("kdc_triton::max_similarity_topk", mutates_args=())
def max_similarity_topk_op(queries: torch.Tensor, clips: torch.Tensor, lengths: Optional[torch.Tensor], k: int,
                           normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _max_sim_topk(queries, clips, lengths, k, normalize)


@max_similarity_topk_op.register_fake
def _(queries, clips, lengths, k, normalize):
    shape = (queries.shape[0], k)
    return queries.new_empty(shape, dtype=torch.float32), queries.new_empty(shape, dtype=torch.int64)


def max_similarity_topk_unsupported(queries, clips, lengths, k, normalize) -> list[str]:
    reasons = _common_reasons(queries, clips)
    if k > _TOPK_MAX_K:
        reasons.append(f"the Triton top-k keeps at most k = {_TOPK_MAX_K} per query, got k = {k} "
                       "(impl='reference' has no limit)")
    if clips.shape[0] >= 2**31:
        reasons.append(f"the Triton top-k packs video indices into 31 bits, got Nv = {clips.shape[0]}")
    return reasons


def max_similarity_topk_triton(queries, clips, lengths, k, normalize):
    with torch.no_grad():
        return torch.ops.kdc_triton.max_similarity_topk(queries, clips, lengths, k, normalize)
