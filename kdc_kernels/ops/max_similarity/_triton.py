r"""Triton kernels for ``max_similarity`` (forward + backward) and ``max_similarity_topk``.

Notation: ``s_q[n] = 1 / max(|q_n|, 1e-12)`` and ``s_c[v, l] = 1 / max(|c_{v,l}|, 1e-12)`` when
``normalize=True`` (both 1 otherwise); ``q^ = s_q q``, ``c^ = s_c c``; ``l* = index[n, v]``.

Forward: a GEMM with a fused epilogue. A program owns a tile of ``BLOCK_Q`` queries x
``BLOCK_COLS`` clip columns (``BLOCK_V`` whole videos x ``BLOCK_L`` clips); it loops over D with
``tl.dot`` (fp32 accumulation) and over clip chunks when ``L > BLOCK_L``::

    score[n, v] = max_{l < len_v} s_q[n] s_c[v, l] <q_n, c_{v,l}>        (the norms are a
    index[n, v] = the lowest l attaining it                                 [Nq] + [Nv, L] table)

Padded clips score ``-inf``; the running max over clip chunks only moves on a strictly larger
value, so ties keep the lowest clip. Only ``[Nq, Nv]`` scores (fp32) and indices (int64) are written.

Backward, with ``g = dLoss/dscore``::

    dq^_n      = sum_v g[n, v] c^_{v, l*}               gather of the argmax clip rows
    dc^_{v, l} = sum_{n : l* = l} g[n, v] q^_n          a one-hot GEMM per clip block, over queries
    dx         = s_x (dx^ - x^ <x^, dx^>)               the normalisation Jacobian (dx = s_x dx^
                                                        where the norm is clamped at 1e-12)
    <q^_n, dq^_n>       = sum_v g[n, v] score[n, v]
    <c^_{v,l}, dc^_{v,l}> = sum_{n : l* = l} g[n, v] score[n, v]

The two projections come from the saved scores, so the Jacobian needs no second pass over D.
Every output row is owned by one program that reduces in a fixed order: no atomics, and the
gradients are bitwise reproducible. Deterministic mode (``KDC_DETERMINISTIC=1`` or
``torch.use_deterministic_algorithms(True)``) also pins every kernel to one fixed config instead of
the autotuned one, so the reduction order cannot change from one process to the next.

Top-k: scores are packed with their video into one int64 key (order-preserving float bits in the
high word, ``2^31 - 1 - video`` in the low word), so "descending score, ties to the lower video"
is plain descending key order. A running best list of ``K_PAD = max(16, next_pow2(k))`` keys per
query is kept sorted ascending; a block of ``K_PAD`` candidate keys sorted descending merges into
it exactly with ``bitonic_merge(maximum(best, cand))`` (the half-cleaner keeps the ``K_PAD``
largest of the union).

* ``K_PAD <= 128``: a fused kernel streams the videos of one split through the GEMM tile and keeps
  the running list in registers; a second small pass merges the splits' lists.
* larger k (up to 4096): the forward kernel scores a chunk of ``4 * K_PAD`` videos into a working
  block, and the merge kernel folds it into the running ``[Nq, K_PAD]`` list.

Peak extra memory is ``O(Nq * K_PAD)`` plus one working block and the ``[Nv, L]`` clip norm table;
there is never an ``[Nq, Nv]`` buffer (``launch_hooks.on_alloc`` reports every buffer).

Precision: fp16/bf16 tiles go to the tensor cores as they are (fp32 accumulation); fp32 inputs
use IEEE fp32 dots unless TF32 is allowed the torch way (``_config.fp32_dot_precision``: then
expect errors up to about 1e-3). The backward one-hot GEMM splits its fp32 weights into two TF32
parts for fp16/bf16 inputs, so the gradients stay fp32-accurate. Under ``TRITON_INTERPRET=1``
every dot runs in fp32.

Excluded positions: padded clips (``l >= lengths[v]``, any value, NaN included) score ``-inf``
before the max; a video of length 0 scores ``-inf`` with index 0 and gets no gradient (the
backward skips ``-inf`` scores), and a clip that no score chose gets exactly zero gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from ... import _config
from ...testing import poison_
from .reference import _NORM_EPS

_EPS = tl.constexpr(_NORM_EPS)
_SENTINEL = tl.constexpr(-(2**63))  # below every packed key: an empty slot
_TOPK_REGISTER_MAX = 128  # K_PAD up to this keeps the running list in registers (fused kernel)
_TOPK_MAX_K = 4096
_TOPK_CHUNK_BLOCKS = 4  # large-k path: videos per working chunk = this * K_PAD


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
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


@triton.jit
def _max_sim_bwd_dq_kernel(
    g_ptr, score_ptr, index_ptr, q_ptr, c_ptr, qn_ptr, cn_ptr, dq_ptr,
    Nq, Nv, D,
    s_gn, s_gv, s_on, s_ov, s_qn, s_qd, s_cv, s_cl, s_cd, s_nv, s_dn, s_dd,
    NORMALIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq for BLOCK_Q queries x BLOCK_D features: gathers each video's argmax clip row; videos
    are visited in order, so the sum is reproducible."""
    pid = tl.program_id(0)
    n_db = tl.cdiv(D, BLOCK_D)
    q0 = (pid // n_db) * BLOCK_Q
    d0 = (pid % n_db) * BLOCK_D
    q064 = q0.to(tl.int64)
    rows = tl.arange(0, BLOCK_Q)
    vv = tl.arange(0, BLOCK_V)
    dd = tl.arange(0, BLOCK_D)
    n_ok = rows < Nq - q0
    d_ok = dd < D - d0
    g_ptrs = g_ptr + q064 * s_gn + rows[:, None] * s_gn + vv[None, :] * s_gv
    nv_ptrs = q064 * s_on + rows[:, None] * s_on + vv[None, :] * s_ov  # offsets into score / index
    c_base = c_ptr + d0 * s_cd
    cn_base = cn_ptr
    acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    proj = tl.zeros((BLOCK_Q,), tl.float32)
    for v0 in range(0, Nv, BLOCK_V):
        ok = n_ok[:, None] & (vv < Nv - v0)[None, :]
        s = tl.load(score_ptr + nv_ptrs, mask=ok, other=0.0)
        ok = ok & (s != float("-inf"))  # a video of length 0 has no clip: no gradient
        l = tl.load(index_ptr + nv_ptrs, mask=ok, other=0).to(tl.int32)
        g = tl.load(g_ptrs, mask=ok, other=0.0)
        w = g
        if NORMALIZE:
            proj += tl.sum(g * tl.where(ok, s, 0.0), axis=1)
            c_norm = tl.load(cn_base + vv[None, :] * s_nv + l, mask=ok, other=1.0)
            w = g * (1.0 / tl.maximum(c_norm, _EPS))
        row = vv[None, :] * s_cv + l * s_cl
        rows3 = tl.load(c_base + row[:, :, None] + dd[None, None, :] * s_cd,
                        mask=ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w[:, :, None] * rows3, axis=1)
        g_ptrs += BLOCK_V * s_gv
        nv_ptrs += BLOCK_V * s_ov
        c_base += BLOCK_V * s_cv
        cn_base += BLOCK_V * s_nv
    if NORMALIZE:
        q_norm = tl.load(qn_ptr + q064 + rows, mask=n_ok, other=1.0)
        q_scale = 1.0 / tl.maximum(q_norm, _EPS)
        qt = tl.load(q_ptr + q064 * s_qn + rows[:, None] * s_qn + (d0 + dd)[None, :] * s_qd,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        # <q^, dq^> = proj and q^ = s q; no projection where the norm is clamped
        proj = tl.where(q_norm > _EPS, q_scale * proj, 0.0)
        acc = q_scale[:, None] * (acc - proj[:, None] * qt)
    tl.store(dq_ptr + q064 * s_dn + rows[:, None] * s_dn + (d0 + dd)[None, :] * s_dd,
             acc.to(dq_ptr.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _tf32_split(w):
    """fp32 ``w = hi + lo`` exactly, with ``hi`` exact in TF32 (the low 13 mantissa bits cleared)
    and ``|lo| <= 2^-10 |w|``."""
    hi = (w.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, w - hi


@triton.jit
def _max_sim_bwd_dc_kernel(
    g_ptr, score_ptr, index_ptr, q_ptr, c_ptr, qn_ptr, cn_ptr, dc_ptr,
    Nq, Nv, L, D,
    s_gn, s_gv, s_on, s_ov, s_qn, s_qd, s_cv, s_cl, s_cd, s_nv, s_dv, s_dl, s_dd,
    NORMALIZE: tl.constexpr, SPLIT_W: tl.constexpr, PRECISION: tl.constexpr, L_POW2: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dc for BLOCK_ROWS clip rows (BLOCK_V videos x BLOCK_L clips) x BLOCK_D features:
    ``W @ q`` with the one-hot weights ``W[(v,l), n] = g[n, v] s_q[n] [index[n, v] == l]``,
    queries visited in order (no atomics, reproducible)."""
    BLOCK_L: tl.constexpr = L_POW2 if L_POW2 < BLOCK_ROWS else BLOCK_ROWS
    BLOCK_V: tl.constexpr = BLOCK_ROWS // BLOCK_L
    pid = tl.program_id(0)
    n_db = tl.cdiv(D, BLOCK_D)
    n_lb = tl.cdiv(L, BLOCK_L)
    d0 = (pid % n_db) * BLOCK_D
    l0 = ((pid // n_db) % n_lb) * BLOCK_L
    v064 = ((pid // (n_db * n_lb)) * BLOCK_V).to(tl.int64)
    r = tl.arange(0, BLOCK_ROWS)
    vv = r // BLOCK_L
    l = l0 + r % BLOCK_L
    row_ok = (vv < Nv - v064) & (l < L)
    nn = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D - d0
    nv_ptrs = v064 * s_ov + nn[None, :] * s_on + vv[:, None] * s_ov  # offsets into score / index
    g_ptrs = g_ptr + v064 * s_gv + nn[None, :] * s_gn + vv[:, None] * s_gv
    q_ptrs = q_ptr + nn[:, None] * s_qn + (d0 + dd)[None, :] * s_qd
    acc = tl.zeros((BLOCK_ROWS, BLOCK_D), tl.float32)
    proj = tl.zeros((BLOCK_ROWS,), tl.float32)
    hits = tl.zeros((BLOCK_ROWS,), tl.int32)
    for n0 in range(0, Nq, BLOCK_N):
        n_ok = nn < Nq - n0
        idx = tl.load(index_ptr + nv_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=-1)
        hit = idx == l[:, None]
        w = tl.load(g_ptrs, mask=hit, other=0.0)
        # weights of -inf scores (a video of length 0, whose index 0 is padding) are 0 (launcher)
        hits += tl.sum((w != 0.0).to(tl.int32), axis=1)
        if NORMALIZE:
            proj += tl.sum(tl.where(w != 0.0, w * tl.load(score_ptr + nv_ptrs, mask=hit, other=0.0), 0.0), axis=1)
            w = w * (1.0 / tl.maximum(tl.load(qn_ptr + n0 + nn, mask=n_ok, other=1.0), _EPS))[None, :]
        qt = tl.load(q_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if SPLIT_W:
            # fp16/bf16 queries are exact in TF32; the fp32 weights are split into a TF32-exact high
            # part and the rest, so two TF32 dots give ~fp32-accurate sums on the tensor cores.
            w_hi, w_lo = _tf32_split(w)
            acc = tl.dot(w_hi, qt, acc, input_precision="tf32")
            acc = tl.dot(w_lo, qt, acc, input_precision="tf32")
        else:
            acc = tl.dot(w, qt, acc, input_precision=PRECISION)
        nv_ptrs += BLOCK_N * s_on
        g_ptrs += BLOCK_N * s_gn
        q_ptrs += BLOCK_N * s_qn
    if NORMALIZE:
        c_norm = tl.load(cn_ptr + v064 * s_nv + vv * s_nv + l, mask=row_ok, other=1.0)
        c_scale = 1.0 / tl.maximum(c_norm, _EPS)
        ct = tl.load(c_ptr + v064 * s_cv + (vv * s_cv + l * s_cl)[:, None] + (d0 + dd)[None, :] * s_cd,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        proj = tl.where(c_norm > _EPS, c_scale * proj, 0.0)
        # a clip no score chose with a nonzero weight (padding included, which may hold NaN) gets
        # exactly 0 (and would get 0 anyway when its clip is finite)
        acc = tl.where(hits[:, None] > 0, c_scale[:, None] * (acc - proj[:, None] * ct), 0.0)
    out = dc_ptr + v064 * s_dv + (vv * s_dv + l * s_dl)[:, None] + (d0 + dd)[None, :] * s_dd
    tl.store(out, acc.to(dc_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _pack_keys(score, video):
    """int64 keys ordered like (score, -video): order-preserving float bits above, 2^31-1-video below."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 == +0.0: one key, so the tie goes by video
    bits = score.to(tl.int32, bitcast=True)
    hi = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    return (hi << 32) | (0x7FFFFFFF - video).to(tl.int64)


@triton.jit
def _unpack_keys(keys):
    hi = (keys >> 32).to(tl.int32)
    bits = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - (keys & 0x7FFFFFFF)

# Bitonic networks over int64 keys. Triton's tl.sort finds each element's partner with an xor
# reduction, which the interpreter runs element by element in Python; a wrapping int64 sum finds
# the same partner ((a + b) - a == b) with the reductions both the compiler and the interpreter
# handle natively. The tensor is viewed as a hypercube [2] * N_DIMS: axis N_DIMS - 1 - b is bit b
# of the flat index, so the last LOG_K bits index the sorted dimension.


@triton.jit
def _bit(N_DIMS: tl.constexpr, b: tl.constexpr):
    """0/1 indicator of bit b of the flat index, broadcastable over the hypercube."""
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - 1 - b) + [2] + [1] * b)


@triton.jit
def _compare_swap(h, N_DIMS: tl.constexpr, b: tl.constexpr, desc):
    """Order every pair of elements whose flat index differs in bit b (descending where desc)."""
    partner = tl.sum(h, axis=N_DIMS - 1 - b, keep_dims=True) - h
    return tl.where((h > partner) != (desc ^ _bit(N_DIMS, b)), partner, h)


@triton.jit
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


@triton.jit
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


@dataclasses.dataclass
class LaunchHooks:
    """Test hooks of the launchers (module state; tests set them with ``monkeypatch``)."""

    poison: bool = False  # NaN-fill (integers: -1) every buffer a launcher allocates
    on_alloc: Optional[Callable[[str, torch.Tensor], None]] = None  # told about every buffer
    topk_splits: Optional[int] = None  # force the number of video splits of the fused top-k


launch_hooks = LaunchHooks()


def _new(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers allocate comes from here (so the hooks see all of them)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if launch_hooks.poison:
        poison_(t)
    if launch_hooks.on_alloc is not None:
        launch_hooks.on_alloc(name, t)
    return t


def _norms(name: str, x: torch.Tensor) -> torch.Tensor:
    """fp32 L2 norms over the last dim (``[Nq]`` or ``[Nv, L]``), without an fp32 copy of x."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32, out=_new(name, x.shape[:-1], torch.float32, x.device))


def _dot_mode(dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """(cast tiles to fp32 before ``tl.dot``, ``input_precision`` of fp32 dots: the package's
    one rule, ``_config.fp32_dot_precision``)."""
    if device.type == "cpu":  # the interpreter: fp32 math throughout (its bf16 arithmetic is wrong)
        return True, "ieee"
    if dtype == torch.float32:
        return True, _config.fp32_dot_precision(device.type)
    return False, "ieee"  # fp16/bf16 tiles go to the tensor cores as they are


class _Configs:
    """The GPU configs of one kernel: autotuned over all, or pinned to the first in deterministic
    mode (so the reduction order, hence every bit of the result, is the same in every process)."""

    def __init__(self, kernel, configs: list[dict], key: list[str]):
        self.kernel, self.first = kernel, configs[0]
        self.tuned = triton.autotune(
            [triton.Config({k: v for k, v in c.items() if not k.startswith("num_")},
                           num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs],
            key=key,
        )(kernel)


# Interpreted kernels (CPU tests) get one config with few, large programs. GPU configs: every one
# compiles for sm_90 without register spills; fp32 (IEEE / TF32 dots) needs smaller tiles.
_FWD_INTERPRET = dict(BLOCK_Q=16, BLOCK_COLS=64, BLOCK_D=32)
_FWD_KEY = ["L_POW2", "D", "NORMALIZE", "WRITE_INDEX", "PRECISION"]
_FWD = {
    False: _Configs(_max_sim_fwd_kernel, [
        dict(BLOCK_Q=128, BLOCK_COLS=128, BLOCK_D=64, num_warps=8, num_stages=3),
        dict(BLOCK_Q=64, BLOCK_COLS=128, BLOCK_D=64, num_warps=4, num_stages=4),
        dict(BLOCK_Q=128, BLOCK_COLS=256, BLOCK_D=32, num_warps=8, num_stages=3),
        dict(BLOCK_Q=64, BLOCK_COLS=256, BLOCK_D=64, num_warps=8, num_stages=3),
    ], _FWD_KEY),
    True: _Configs(_max_sim_fwd_kernel, [
        dict(BLOCK_Q=64, BLOCK_COLS=128, BLOCK_D=32, num_warps=8, num_stages=3),
        dict(BLOCK_Q=128, BLOCK_COLS=64, BLOCK_D=32, num_warps=8, num_stages=3),
        dict(BLOCK_Q=64, BLOCK_COLS=64, BLOCK_D=32, num_warps=4, num_stages=3),
    ], _FWD_KEY),
}
_DQ_INTERPRET = dict(BLOCK_Q=16, BLOCK_V=8, BLOCK_D=32)
_DQ = _Configs(_max_sim_bwd_dq_kernel, [
    dict(BLOCK_Q=32, BLOCK_V=4, BLOCK_D=64, num_warps=4, num_stages=3),
    dict(BLOCK_Q=16, BLOCK_V=8, BLOCK_D=64, num_warps=4, num_stages=3),
    dict(BLOCK_Q=32, BLOCK_V=2, BLOCK_D=128, num_warps=4, num_stages=3),
], ["D", "NORMALIZE"])
_DC_INTERPRET = dict(BLOCK_ROWS=64, BLOCK_N=16, BLOCK_D=32)
_DC_KEY = ["L_POW2", "D", "NORMALIZE", "PRECISION"]
_DC = {
    False: _Configs(_max_sim_bwd_dc_kernel, [
        dict(BLOCK_ROWS=128, BLOCK_N=32, BLOCK_D=64, num_warps=8, num_stages=3),
        dict(BLOCK_ROWS=64, BLOCK_N=32, BLOCK_D=64, num_warps=4, num_stages=3),
        dict(BLOCK_ROWS=128, BLOCK_N=16, BLOCK_D=64, num_warps=8, num_stages=3),
    ], _DC_KEY),
    True: _Configs(_max_sim_bwd_dc_kernel, [
        dict(BLOCK_ROWS=128, BLOCK_N=16, BLOCK_D=64, num_warps=8, num_stages=3),
        dict(BLOCK_ROWS=64, BLOCK_N=32, BLOCK_D=128, num_warps=8, num_stages=3),
        dict(BLOCK_ROWS=64, BLOCK_N=16, BLOCK_D=64, num_warps=4, num_stages=3),
    ], _DC_KEY),
}
_TOPK_INTERPRET = dict(BLOCK_Q=16, BLOCK_COLS=64, BLOCK_D=32)


def _launch(configs: _Configs, interpret: dict, grid, device: torch.device, *args, **consts) -> None:
    """Run a kernel on ``grid(meta)``: one config when interpreting or deterministic, else autotuned."""
    if device.type == "cpu":
        meta = dict(interpret)
    elif _config.deterministic():
        meta = dict(configs.first)
    else:
        configs.tuned[grid](*args, **consts)
        return
    configs.kernel[grid({**consts, **meta})](*args, **consts, **meta)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(n)


def _log2(n: int) -> int:
    """log2 of a power of two."""
    return n.bit_length() - 1


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


def _scores_launch(queries, clips, lengths, qnorm, cnorm, score, index) -> None:
    """score (and index unless None) ``[Nq, Nv']`` of ``clips [Nv', L, D]``; norms None: raw dots."""
    nq, d = queries.shape
    nv, L, _ = clips.shape
    normalize = qnorm is not None
    dot_fp32, precision = _dot_mode(queries.dtype, queries.device)

    def grid(meta):
        block_v = meta["BLOCK_COLS"] // min(meta["L_POW2"], meta["BLOCK_COLS"])
        return (triton.cdiv(nq, meta["BLOCK_Q"]) * triton.cdiv(nv, block_v),)

    _launch(
        _FWD[dot_fp32], _FWD_INTERPRET, grid, queries.device,
        queries, clips, queries if lengths is None else lengths, qnorm if normalize else queries,
        cnorm if normalize else queries, score, score if index is None else index,
        nq, nv, L, d, *queries.stride(), *clips.stride(), cnorm.stride(0) if normalize else 0, *score.stride(),
        NORMALIZE=normalize, HAS_LENGTHS=lengths is not None, WRITE_INDEX=index is not None,
        DOT_FP32=dot_fp32, PRECISION=precision, L_POW2=_pow2(L),
    )


def _max_sim_fwd(queries, clips, lengths, normalize: bool):
    """``(score fp32 [Nq, Nv], index int64 [Nq, Nv])``."""
    device = queries.device
    queries, clips = _tile_ready(queries, clips)
    qnorm = _norms("query_norms", queries) if normalize else None
    cnorm = _norms("clip_norms", clips) if normalize else None
    score = _new("score", (queries.shape[0], clips.shape[0]), torch.float32, device)
    index = _new("index", (queries.shape[0], clips.shape[0]), torch.int64, device)
    _scores_launch(queries, clips, lengths, qnorm, cnorm, score, index)
    return score, index


def _max_sim_bwd(grad, queries, clips, score, index, normalize: bool, need_dq: bool, need_dc: bool):
    """``(dq [Nq, D], dc [Nv, L, D])`` in the input dtype; an empty tensor for a gradient not needed."""
    nq, d = queries.shape
    nv, L, _ = clips.shape
    device = queries.device
    queries, clips = _tile_ready(queries, clips)
    grad = _int32_tiles(grad, (_TILE_QUERIES, _TILE_QUERIES))
    score, index = score.contiguous(), index.contiguous()  # the kernels index both with one stride pair
    qnorm = _norms("query_norms", queries) if normalize else queries
    cnorm = _norms("clip_norms", clips) if normalize else queries
    s_nv = cnorm.stride(0) if normalize else 0
    _, precision = _dot_mode(queries.dtype, device)
    common = (grad, score, index, queries, clips, qnorm, cnorm)
    dq = _new("dq", (nq, d), queries.dtype, device) if need_dq else queries.new_empty(0)
    dc = _new("dc", (nv, L, d), clips.dtype, device) if need_dc else clips.new_empty(0)
    if need_dq:
        _launch(
            _DQ, _DQ_INTERPRET,
            lambda meta: (triton.cdiv(nq, meta["BLOCK_Q"]) * triton.cdiv(d, meta["BLOCK_D"]),), device,
            *common, dq, nq, nv, d, *grad.stride(), *score.stride(), *queries.stride(), *clips.stride(), s_nv,
            *dq.stride(), NORMALIZE=normalize,
        )
    if need_dc:

        def grid(meta):
            block_l = min(meta["L_POW2"], meta["BLOCK_ROWS"])
            block_v = meta["BLOCK_ROWS"] // block_l
            return (triton.cdiv(nv, block_v) * triton.cdiv(L, block_l) * triton.cdiv(d, meta["BLOCK_D"]),)

        _launch(
            _DC[queries.dtype == torch.float32], _DC_INTERPRET, grid, device,
            *common, dc, nq, nv, L, d, *grad.stride(), *score.stride(), *queries.stride(), *clips.stride(), s_nv,
            *dc.stride(), NORMALIZE=normalize, SPLIT_W=queries.dtype != torch.float32, PRECISION=precision,
            L_POW2=_pow2(L),
        )
    return dq, dc


def _topk_kpad(k: int) -> int:
    return max(16, _pow2(k))


def _topk_partial_config(k_pad: int, l_pow2: int, interpret: bool) -> dict:
    """Meta-parameters of the fused top-k kernel. Not autotuned: BLOCK_Q sizes the partial buffer."""
    if interpret:
        meta = dict(_TOPK_INTERPRET)
    else:  # the running list and its candidates take 2 * BLOCK_Q * K_PAD int64 registers
        meta = dict(BLOCK_Q=64 if k_pad <= 32 else 32, BLOCK_COLS=128, BLOCK_D=64,
                    num_warps=4 if k_pad <= 32 else 8, num_stages=3)
    # at most K_PAD videos per tile; at least 16 columns for tl.dot
    meta["BLOCK_COLS"] = max(16, min(meta["BLOCK_COLS"], k_pad * min(l_pow2, meta["BLOCK_COLS"])))
    return meta


def _topk_merge_config(k_pad: int, interpret: bool) -> dict:
    """Meta-parameters of the merge kernel: ROWS queries x K_PAD keys per program."""
    rows = max(1, (4096 if interpret else 2048) // k_pad)
    return dict(ROWS=rows) if interpret else dict(ROWS=rows, num_warps=4 if k_pad <= 256 else 8)


def _topk_merge(best, src, scores, videos, n_blocks, n_cols, v_base, k, src_strides, *, from_scores, first, last):
    nq, k_pad = scores.shape[0], _topk_kpad(k)
    meta = _topk_merge_config(k_pad, src.device.type == "cpu")
    rows = meta.pop("ROWS")
    dummy = scores if best is None else best
    _topk_merge_kernel[(triton.cdiv(nq, rows),)](
        dummy, src, scores, videos, nq, n_blocks, n_cols, v_base, k, *src_strides,
        FROM_SCORES=from_scores, FIRST=first, WRITE_OUT=last, LOG_K=_log2(k_pad), LOG_ROWS=_log2(rows), **meta,
    )


def _topk_splits(n_qblocks: int, n_groups: int, device: torch.device) -> int:
    """Video splits of the fused top-k: enough programs to fill the GPU, each split >= 4 groups."""
    if launch_hooks.topk_splits is not None:
        return max(1, min(launch_hooks.topk_splits, n_groups))
    if device.type == "cpu":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, n_qblocks), n_groups // 4))


def _max_sim_topk(queries, clips, lengths, k: int, normalize: bool):
    """``(scores fp32 [Nq, k], videos int64 [Nq, k])``: descending, ties to the lower video."""
    nq, d = queries.shape
    nv, L, _ = clips.shape
    device = queries.device
    k_pad = _topk_kpad(k)
    queries, clips = _tile_ready(queries, clips)
    qnorm = _norms("query_norms", queries) if normalize else None
    cnorm = _norms("clip_norms", clips) if normalize else None
    scores = _new("topk_scores", (nq, k), torch.float32, device)
    videos = _new("topk_videos", (nq, k), torch.int64, device)
    if k_pad <= _TOPK_REGISTER_MAX:
        dot_fp32, precision = _dot_mode(queries.dtype, device)
        l_pow2 = _pow2(L)
        meta = _topk_partial_config(k_pad, l_pow2, device.type == "cpu")
        block_q = meta.pop("BLOCK_Q")
        n_qb, n_groups = triton.cdiv(nq, block_q), triton.cdiv(nv, k_pad)
        per_split = triton.cdiv(n_groups, _topk_splits(n_qb, n_groups, device))
        splits = triton.cdiv(n_groups, per_split)
        partial = _new("topk_partial", (splits, nq, k_pad), torch.int64, device)
        norm_args = (qnorm, cnorm) if normalize else (queries, queries)
        _topk_partial_kernel[(n_qb * splits,)](
            queries, clips, queries if lengths is None else lengths, *norm_args, partial,
            nq, nv, L, d, per_split, *queries.stride(), *clips.stride(), cnorm.stride(0) if normalize else 0,
            partial.stride(0), NORMALIZE=normalize, HAS_LENGTHS=lengths is not None, DOT_FP32=dot_fp32,
            PRECISION=precision, L_POW2=l_pow2, LOG_K=_log2(k_pad), LOG_Q=_log2(block_q), **meta,
        )
        _topk_merge(None, partial, scores, videos, splits, 0, 0, k, (partial.stride(0), 0, 0),
                    from_scores=False, first=True, last=True)
        return scores, videos
    chunk = _TOPK_CHUNK_BLOCKS * k_pad
    n_chunks = triton.cdiv(nv, chunk)
    work = _new("topk_working_scores", (nq, min(chunk, nv)), torch.float32, device)
    best = _new("topk_running", (nq, k_pad), torch.int64, device) if n_chunks > 1 else None
    for c in range(n_chunks):
        v0, v1 = c * chunk, min(nv, (c + 1) * chunk)
        block = work[:, : v1 - v0]
        _scores_launch(queries, clips[v0:v1], None if lengths is None else lengths[v0:v1], qnorm,
                       None if cnorm is None else cnorm[v0:v1], block, None)
        _topk_merge(best, block, scores, videos, triton.cdiv(v1 - v0, k_pad), v1 - v0, v0, k,
                    (0, *block.stride()), from_scores=True, first=c == 0, last=c == n_chunks - 1)
    return scores, videos


# ------------------------------------------------------------------------------------------------
# registered ops (namespace kdc_triton; kdc is the compiled extension's) + fakes + autograd
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("kdc_triton::max_similarity_fwd", mutates_args=())
def max_similarity_fwd_op(queries: torch.Tensor, clips: torch.Tensor, lengths: Optional[torch.Tensor],
                          normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _max_sim_fwd(queries, clips, lengths, normalize)


@max_similarity_fwd_op.register_fake
def _(queries, clips, lengths, normalize):
    shape = (queries.shape[0], clips.shape[0])
    return queries.new_empty(shape, dtype=torch.float32), queries.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("kdc_triton::max_similarity_bwd", mutates_args=())
def max_similarity_bwd_op(grad: torch.Tensor, queries: torch.Tensor, clips: torch.Tensor, score: torch.Tensor,
                          index: torch.Tensor, normalize: bool, need_dq: bool,
                          need_dc: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _max_sim_bwd(grad, queries, clips, score, index, normalize, need_dq, need_dc)


@max_similarity_bwd_op.register_fake
def _(grad, queries, clips, score, index, normalize, need_dq, need_dc):
    return (torch.empty_like(queries, memory_format=torch.contiguous_format) if need_dq else queries.new_empty(0),
            torch.empty_like(clips, memory_format=torch.contiguous_format) if need_dc else clips.new_empty(0))


@torch.library.custom_op("kdc_triton::max_similarity_topk", mutates_args=())
def max_similarity_topk_op(queries: torch.Tensor, clips: torch.Tensor, lengths: Optional[torch.Tensor], k: int,
                           normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _max_sim_topk(queries, clips, lengths, k, normalize)


@max_similarity_topk_op.register_fake
def _(queries, clips, lengths, k, normalize):
    shape = (queries.shape[0], k)
    return queries.new_empty(shape, dtype=torch.float32), queries.new_empty(shape, dtype=torch.int64)


def _fwd_setup_context(ctx, inputs, output):
    queries, clips, _lengths, normalize = inputs
    score, index = output
    ctx.save_for_backward(queries, clips, score, index)
    ctx.normalize = normalize
    ctx.mark_non_differentiable(index)


def _fwd_backward(ctx, grad_score, _grad_index):
    queries, clips, score, index = ctx.saved_tensors
    need_dq, need_dc = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # a -inf score (a video of length 0) passes no gradient: its index points at padding
    grad_score = grad_score.masked_fill(score == float("-inf"), 0.0)
    dq, dc = max_similarity_bwd_op(grad_score, queries, clips, score, index, ctx.normalize, need_dq, need_dc)
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
    nv = clips.shape[0]
    if _tile_span((queries.shape[0], nv), (nv, 1), (_TILE_QUERIES, nv)) >= _INT32_LIMIT:
        reasons.append(f"an [Nq, Nv] output tile would span 2^31 elements or more (Nv = {nv}); "
                       "max_similarity_topk streams any number of videos")
    return reasons


def max_similarity_topk_unsupported(queries, clips, lengths, k, normalize) -> list[str]:
    reasons = _common_reasons(queries, clips)
    if k > _TOPK_MAX_K:
        reasons.append(f"the Triton top-k keeps at most k = {_TOPK_MAX_K} per query, got k = {k} "
                       "(impl='reference' has no limit)")
    if clips.shape[0] >= 2**31:
        reasons.append(f"the Triton top-k packs video indices into 31 bits, got Nv = {clips.shape[0]}")
    return reasons


def max_similarity_triton(queries, clips, lengths, normalize, return_index):
    score, index = torch.ops.kdc_triton.max_similarity_fwd(queries, clips, lengths, normalize)
    return (score, index) if return_index else score


def max_similarity_topk_triton(queries, clips, lengths, k, normalize):
    with torch.no_grad():
        return torch.ops.kdc_triton.max_similarity_topk(queries, clips, lengths, k, normalize)
