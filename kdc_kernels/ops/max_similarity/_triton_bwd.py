r"""Triton kernel of the ``max_similarity`` backward (the maths, the work layout and the
registered ops are in ``_triton.py``): one launch; the first programs gather dq, each following
one buckets the queries of one video by argmax clip and sums them into that video's dc rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _launch
from . import _triton  # the launcher's shared helpers (a module reference: either may load first)
from .reference import _NORM_EPS

_EPS = tl.constexpr(_NORM_EPS)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@_launch.device_helper
def _run_start(l, nn):
    """Index (in the chunk) of the entry before each entry's run of equal ``l`` (-1: none). ``l``
    is sorted, so the run is contiguous."""
    return nn - tl.sum(((l[None, :] == l[:, None]) & (nn[None, :] < nn[:, None])).to(tl.int32), axis=1) - 1


@_launch.device_helper
def _segment_sums(x, before):
    """Sums of ``x [BLOCK_N, BLOCK_D]`` along axis 0 over each run, up to each entry: a prefix sum
    minus its value before the run (an fp32 error of about eps * sum |x| over the chunk, like any
    fp32 sum of the same terms)."""
    cs = tl.cumsum(x, 0)
    base = tl.gather(cs, tl.broadcast_to(tl.maximum(before, 0)[:, None], x.shape), 0)
    return cs - tl.where((before >= 0)[:, None], base, 0.0)


@_launch.device_helper
def _segment_sums_1d(x, before):
    """:func:`_segment_sums` of a ``[BLOCK_N]`` vector."""
    cs = tl.cumsum(x, 0)
    return cs - tl.where(before >= 0, tl.gather(cs, tl.maximum(before, 0), 0), 0.0)


@_launch.device_helper
def _bwd_dq(
    pid, g_ptr, score_ptr, index_ptr, q_ptr, c_ptr, qn_ptr, cn_ptr, dq_ptr,
    Nq, Nv, D,
    s_gn, s_gv, s_on, s_ov, s_qn, s_qd, s_cv, s_cl, s_cd, s_nv, s_dn, s_dd,
    NORMALIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq for BLOCK_Q queries x BLOCK_D features: gathers each video's argmax clip row; videos
    are visited in order, so the sum is reproducible."""
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
        # a -inf score (a video of length 0) has no gradient, and its index points at padding
        # (which may hold NaN): neither its clip row nor its norm is read
        ok = ok & (s > float("-inf"))
        l = tl.load(index_ptr + nv_ptrs, mask=ok, other=0).to(tl.int32)
        g = tl.load(g_ptrs, mask=ok, other=0.0)
        w = g
        if NORMALIZE:
            proj += tl.sum(g * tl.where(g != 0.0, s, 0.0), axis=1)
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


@_launch.device_helper
def _bwd_dc(
    v, g_ptr, score_ptr, index_ptr, q_ptr, c_ptr, qn_ptr, cn_ptr, dc_ptr, sort_ptr,
    Nq, L, D,
    s_gn, s_gv, s_on, s_ov, s_qn, s_qd, s_cv, s_cl, s_cd, s_nv, s_dv, s_dl, s_dd,
    NORMALIZE: tl.constexpr, L_POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dc of video v: bucket the queries by argmax clip (stable counting sort into
    ``sort_ptr[v] = [2, Nq]``: query, clip), then segmented sums along the sorted list."""
    v064 = v.to(tl.int64)
    nn = tl.arange(0, BLOCK_N)
    col = index_ptr + v064 * s_ov  # index[:, v]
    # 1. how many queries picked each clip
    counts = tl.zeros((L_POW2,), tl.int32)
    for n0 in range(0, Nq, BLOCK_N):
        n = n0 + nn
        l = tl.load(col + n.to(tl.int64) * s_on, mask=n < Nq, other=0).to(tl.int32)
        counts += tl.histogram(l, L_POW2, mask=n < Nq)
    # 2. stable scatter: a query's slot = its bucket's start + the earlier queries of the bucket
    slot = tl.cumsum(counts, 0) - counts
    sort_n = sort_ptr + v064 * 2 * Nq
    sort_l = sort_n + Nq
    for n0 in range(0, Nq, BLOCK_N):
        n = n0 + nn
        ok = n < Nq
        l = tl.load(col + n.to(tl.int64) * s_on, mask=ok, other=0).to(tl.int32)
        earlier = tl.sum(((l[None, :] == l[:, None]) & (nn[None, :] < nn[:, None])).to(tl.int32), axis=1)
        pos = tl.gather(slot, l, 0) + earlier
        tl.store(sort_n + pos, n, mask=ok)
        tl.store(sort_l + pos, l, mask=ok)
        slot += tl.histogram(l, L_POW2, mask=ok)
    tl.debug_barrier()  # the sorted list is read back by other threads of this program
    # 3. per feature block: clips no query picked get zeros; the others, segmented sums of
    #    g s_q q over their bucket (carried across chunks), stored at the bucket's last entry
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        for r0 in range(0, L, BLOCK_N):
            r = r0 + nn
            empty = (r < L) & (tl.gather(counts, tl.minimum(r, L_POW2 - 1), 0) == 0)
            tl.store(dc_ptr + v064 * s_dv + r[:, None] * s_dl + dd[None, :] * s_dd,
                     tl.zeros((BLOCK_N, BLOCK_D), dc_ptr.dtype.element_ty), mask=empty[:, None] & d_ok[None, :])
        carry = tl.zeros((BLOCK_D,), tl.float32)
        carry_p = tl.sum(tl.zeros((BLOCK_N,), tl.float32), axis=0)
        carry_h = carry_p
        carry_l = tl.sum(tl.zeros((BLOCK_N,), tl.int32), axis=0) - 1
        for n0 in range(0, Nq, BLOCK_N):
            k = n0 + nn
            ok = k < Nq
            n = tl.load(sort_n + k, mask=ok, other=0)
            l = tl.load(sort_l + k, mask=ok, other=-2)
            end = ok & (l != tl.load(sort_l + k + 1, mask=k + 1 < Nq, other=-4))
            n64 = n.to(tl.int64)
            s = tl.load(score_ptr + n64 * s_on + v064 * s_ov, mask=ok, other=0.0)
            g = tl.where(s > float("-inf"), tl.load(g_ptr + n64 * s_gn + v064 * s_gv, mask=ok, other=0.0), 0.0)
            cont = (nn == 0) & (l == carry_l)  # the first bucket continues the previous chunk's last
            before = _run_start(l, nn)
            if NORMALIZE:
                p = _segment_sums_1d(g * tl.where(g != 0.0, s, 0.0) + tl.where(cont, carry_p, 0.0), before)
                carry_p = tl.sum(tl.where(nn == BLOCK_N - 1, p, 0.0), axis=0)
                # how many of the bucket's weights are nonzero: a bucket with none (the clip of
                # -inf scores, padding that may hold NaN) gets exactly 0, its clip row unread
                hits = _segment_sums_1d((g != 0.0).to(tl.float32) + tl.where(cont, carry_h, 0.0), before)
                carry_h = tl.sum(tl.where(nn == BLOCK_N - 1, hits, 0.0), axis=0)
                g = g * (1.0 / tl.maximum(tl.load(qn_ptr + n, mask=ok, other=1.0), _EPS))
            x = tl.load(q_ptr + n64[:, None] * s_qn + dd[None, :] * s_qd, mask=ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            x = _segment_sums(x * g[:, None] + tl.where(cont[:, None], carry[None, :], 0.0), before)
            carry = tl.sum(tl.where((nn == BLOCK_N - 1)[:, None], x, 0.0), axis=0)
            carry_l = tl.sum(tl.where(nn == BLOCK_N - 1, l, 0), axis=0)
            if NORMALIZE:
                hit = end & (hits > 0.0)
                c_norm = tl.load(cn_ptr + v064 * s_nv + l, mask=hit, other=1.0)
                c_scale = 1.0 / tl.maximum(c_norm, _EPS)
                ct = tl.load(c_ptr + v064 * s_cv + l[:, None] * s_cl + dd[None, :] * s_cd,
                             mask=hit[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                proj = tl.where(c_norm > _EPS, c_scale * p, 0.0)
                x = tl.where(hit[:, None], c_scale[:, None] * (x - proj[:, None] * ct), 0.0)
            tl.store(dc_ptr + v064 * s_dv + l[:, None] * s_dl + dd[None, :] * s_dd, x.to(dc_ptr.dtype.element_ty),
                     mask=end[:, None] & d_ok[None, :])


@triton.jit
def _max_sim_bwd_kernel(
    g_ptr, score_ptr, index_ptr, q_ptr, c_ptr, qn_ptr, cn_ptr, dq_ptr, dc_ptr, sort_ptr,
    Nq, Nv, L, D, n_dq_programs,
    s_gn, s_gv, s_on, s_ov, s_qn, s_qd, s_cv, s_cl, s_cd, s_nv, s_dqn, s_dqd, s_dcv, s_dcl, s_dcd,
    NORMALIZE: tl.constexpr, L_POW2: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DC: tl.constexpr,
):
    """The whole backward in one launch: programs ``[0, n_dq_programs)`` compute dq, each
    following one computes dc of one video."""
    pid = tl.program_id(0)
    if pid < n_dq_programs:
        _bwd_dq(pid, g_ptr, score_ptr, index_ptr, q_ptr, c_ptr, qn_ptr, cn_ptr, dq_ptr, Nq, Nv, D,
                s_gn, s_gv, s_on, s_ov, s_qn, s_qd, s_cv, s_cl, s_cd, s_nv, s_dqn, s_dqd,
                NORMALIZE, BLOCK_Q, BLOCK_V, BLOCK_DQ)
    else:
        _bwd_dc(pid - n_dq_programs, g_ptr, score_ptr, index_ptr, q_ptr, c_ptr, qn_ptr, cn_ptr, dc_ptr, sort_ptr,
                Nq, L, D, s_gn, s_gv, s_on, s_ov, s_qn, s_qd, s_cv, s_cl, s_cd, s_nv, s_dcv, s_dcl, s_dcd,
                NORMALIZE, L_POW2, BLOCK_N, BLOCK_DC)


# ------------------------------------------------------------------------------------------------
# launcher
# ------------------------------------------------------------------------------------------------

# Launch configurations (kdc_kernels/_launch.py): the first is the pinned one; none spills on sm_90.
_BWD_INTERPRET = dict(BLOCK_Q=16, BLOCK_V=8, BLOCK_DQ=32, BLOCK_N=64, BLOCK_DC=64)
_BWD = [  # fewer, longer chunks first: the dc pass is a chain of gathers, latency-bound
    dict(BLOCK_Q=32, BLOCK_V=4, BLOCK_DQ=128, BLOCK_N=64, BLOCK_DC=128, num_warps=8, num_stages=2),
    dict(BLOCK_Q=32, BLOCK_V=4, BLOCK_DQ=64, BLOCK_N=32, BLOCK_DC=64, num_warps=4, num_stages=2),
    dict(BLOCK_Q=64, BLOCK_V=2, BLOCK_DQ=128, BLOCK_N=64, BLOCK_DC=128, num_warps=8, num_stages=2),
]


def _max_sim_bwd(grad, queries, clips, score, index, qnorm, cnorm, normalize: bool, need_dq: bool, need_dc: bool):
    """``(dq [Nq, D], dc [Nv, L, D])`` in the input dtype; an empty tensor for a gradient not needed."""
    nq, d = queries.shape
    nv, L, _ = clips.shape
    device = queries.device
    queries, clips = _triton._tile_ready(queries, clips)
    grad = _triton._int32_tiles(grad, (_triton._TILE_QUERIES, _triton._TILE_QUERIES))
    score, index = score.contiguous(), index.contiguous()  # the kernels index both with one stride pair
    dq = _launch.new_buffer("dq", (nq, d), queries.dtype, device) if need_dq else queries.new_empty(0)
    dc = _launch.new_buffer("dc", (nv, L, d), clips.dtype, device) if need_dc else clips.new_empty(0)
    buckets = _launch.new_buffer("argmax_buckets", (nv, 2, nq), torch.int32, device) if need_dc else index
    if not normalize:
        qnorm = cnorm = queries
    if nq * nv * d == 0 or not (need_dq or need_dc):
        dq.zero_()
        dc.zero_()
        return dq, dc
    args = (grad, score, index, queries, clips, qnorm, cnorm, dq if need_dq else queries, dc if need_dc else clips,
            buckets, nq, nv, L, d)
    strides = (*grad.stride(), *score.stride(), *queries.stride(), *clips.stride(), cnorm.stride(0) if normalize else 0,
               *(dq.stride() if need_dq else (0, 0)), *(dc.stride() if need_dc else (0, 0, 0)))

    def launch(config):
        meta, options = _launch.launch_options(config)
        n_dq = _launch.cdiv(nq, meta["BLOCK_Q"]) * _launch.cdiv(d, meta["BLOCK_DQ"]) if need_dq else 0
        grid = (n_dq + (nv if need_dc else 0),)
        _max_sim_bwd_kernel[grid](*args, n_dq, *strides, NORMALIZE=normalize, L_POW2=_triton._pow2(L), **meta,
                                  **options)

    key = (queries.dtype, normalize, need_dq, need_dc, _triton._pow2(L), d, _launch.bucket(nq), _launch.bucket(nv))
    _launch.run(_max_sim_bwd_kernel, _BWD, _BWD_INTERPRET, key, launch, device)
    return dq, dc
