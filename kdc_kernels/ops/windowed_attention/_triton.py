r"""Triton kernels for ``windowed_attention``: fused forward and backward.

Maths (KERNELS.md section 1). For batch b, head h, query i, key j::

    x[i, j] = scale <q_i, k_j> + rel_bias[h, clamp(j - i, -R, R) + R] - (i - j)^2 / (2 sigma_i^2)
    key j is excluded when j >= lengths[b] or |i - j| > cutoff * sigma_i
    out[i]  = sum_j P[i, j] v_j,   P = softmax_j(x),   out[i] = 0 for padded rows i >= lengths[b]

Backward, with dP = dO V^T, Delta_i = rowsum(dO_i * O_i) and dS = P * (dP - Delta)::

    dV = P^T dO     dQ = scale dS K     dK = scale dS^T Q
    d rel_bias[h, r] = sum of dS over (b, i, j) with clamp(j - i, -R, R) + R = r
    d sigma_i = sum_j dS[i, j] (i - j)^2 / sigma_i^3

How the work is laid out:

* A tile holds ``G`` sequences (batch rows of one head) x ``BM`` query positions against ``G`` x
  ``BN`` key positions, with a block-diagonal mask between sequences. Short sequences (L <= 64)
  are packed, e.g. 4 sequences of L = 32 in one 128-row tile; long ones use ``G = 1`` and
  FlashAttention-style query/key blocks.
* Softmax is online, in fp32, in log2 units; the forward saves the log-sum-exp (0 for padded
  rows, so it stays finite) and the backward recomputes P from it. No ``[B, H, L, L]`` tensor.
* With ``cutoff``, a tile only visits key blocks that intersect
  ``[i - cutoff * max(sigma), i + cutoff * max(sigma)]`` over its valid rows: cost O(L * window).
  Blocks past the longest sequence of a tile are never visited either.
* Backward for L <= 128 is one kernel per group of whole sequences (the key block is the whole
  sequence, so dq, d sigma and the bias partials of every query block are complete in the program
  that computes them: no atomics). Longer sequences use two kernels: ``_bwd_q`` (dq, d sigma,
  Delta, bias partials; one program per query block) then ``_bwd_kv`` (dk, dv; one program per
  key block, same window skipping).
* d rel_bias: each tile of dS is reduced along its diagonals on chip (a gather that skews the
  tile, then a column sum), the diagonal sums are binned into the ``2R+1`` table columns in
  registers, and each program writes one row of a ``[programs, bins]`` partial buffer. A small
  second pass (a fixed-order ``torch.sum``) reduces the partials. Nothing uses atomics, so the
  gradients are bitwise reproducible run to run; ``KDC_DETERMINISTIC=1`` additionally pins the
  launch configuration (no autotuning), so they are reproducible across processes too.
* Dots take the inputs' dtype on the GPU (tensor cores; fp32 uses TF32) with fp32 accumulation;
  under the CPU interpreter every tile is converted to fp32 first (its bf16 arithmetic is wrong).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ... import _config, testing

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)
# Bias-table gradient bins kept in registers per program: 2 * min(R, L - 1) + 1 must fit.
MAX_BIAS_BINS = 4096
MAX_HEAD_DIM = 256

# Test hooks. _POISON_OUTPUTS: fill every buffer the launchers allocate with NaN before the
# kernels run, so an element a kernel forgets to write fails the comparison with the reference.
# _VISIT_LOG: when a list, each launch appends {"kernel", "visited", "total"}: the key (or query)
# blocks the kernel's programs visited against the number a dense kernel would visit.
_POISON_OUTPUTS = False
_VISIT_LOG: list | None = None


# ------------------------------------------------------------------------------------ kernels
# Device helpers are @triton.jit functions, inlined by the compiler. Under the CPU interpreter
# (decided at import, as Triton itself decides) they are plain Python: the interpreter re-patches
# triton.language on every jit-function call, milliseconds each, which dominated the test time.
_helper = (lambda fn: fn) if _config.triton_interpret() else triton.jit


@_helper
def _seq_rows(start, B, L, b0, LENGTHS, HAS_LENGTHS: tl.constexpr, G: tl.constexpr, BLK: tl.constexpr):
    """Rows of a packed tile: G sequences (batch rows b0 .. b0+G-1) x BLK positions from start.
    Returns (sequence slot, position, batch row, valid length of that row's sequence)."""
    r = tl.arange(0, G * BLK)
    s = r // BLK
    pos = start + r % BLK
    b = b0 + s
    if HAS_LENGTHS:
        n = tl.load(LENGTHS + b, mask=b < B, other=0).to(tl.int32)
    else:
        n = tl.where(b < B, L, 0)
    return s, pos, b, n


@_helper
def _row_offsets(b, h, pos, s_b, s_h, s_l):
    return b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + pos.to(tl.int64) * s_l


@_helper
def _load_tile(X, rows, ok, dd, s_d, D, DOT_FP32: tl.constexpr):
    x = tl.load(X + rows[:, None] + dd[None, :] * s_d, mask=ok[:, None] & (dd[None, :] < D), other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@_helper
def _row_sigma(SIGMA, b, h, i, ok, ss_b, ss_h, ss_l, cutoff, HAS_SIGMA: tl.constexpr):
    """Per query row: sigma (fp32), the Gaussian coefficient log2(e) / (2 sigma^2) and the cutoff
    half-width cutoff * sigma (rows outside the tensor read sigma = 1)."""
    if HAS_SIGMA:
        sig = tl.load(SIGMA + _row_offsets(b, h, i, ss_b, ss_h, ss_l), mask=ok, other=1.0).to(tl.float32)
    else:
        sig = tl.full(i.shape, 1.0, tl.float32)
    return sig, 0.5 / (sig * sig) * LOG2E, cutoff * sig


@_helper
def _logits(qk, i, j, s_i, s_j, n_i, coef, win, h, BIAS, sb_h, sb_r, R,
            HAS_BIAS: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_CUTOFF: tl.constexpr, G: tl.constexpr):
    """Logits of a tile in log2 units (qk is already scale * log2(e) * <q, k>), -inf where the key
    is excluded (other sequence, padding, cutoff). Also returns j - i (fp32: positions are exact,
    and float index math is as cheap as int32 on the GPU and much cheaper in the interpreter)."""
    d = j.to(tl.float32)[None, :] - i.to(tl.float32)[:, None]
    ok = (i[:, None] < n_i[:, None]) & (j[None, :] < n_i[:, None])
    if G > 1:
        ok = ok & (s_i[:, None] == s_j[None, :])
    x = qk
    if HAS_BIAS:
        col = (tl.minimum(tl.maximum(d, -R), R) + R).to(tl.int32)  # always inside the table
        x += tl.load(BIAS + h * sb_h + col * sb_r).to(tl.float32) * LOG2E
    if HAS_SIGMA:
        # d == 0 contributes exactly 0 (also when sigma is so small that coef overflows to inf).
        x -= tl.where(d == 0.0, 0.0, d * d * coef[:, None])
        if HAS_CUTOFF:
            ok = ok & (tl.abs(d) <= win[:, None])
    return tl.where(ok, x, float("-inf")), d


@_helper
def _key_range(m0, maxlen, win, row_ok, HAS_CUTOFF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Key blocks [lo, hi) (step BN) a query tile at rows m0 .. m0+BM-1 can see: within the cutoff
    window of its widest valid row and below the longest sequence; empty without a valid row."""
    lo = m0 * 0
    hi = maxlen
    if HAS_CUTOFF:
        wmax = tl.max(tl.where(row_ok, win, 0.0), 0)
        lo = tl.maximum(m0 - wmax - 1.0, 0.0).to(tl.int32)
        hi = tl.minimum(m0 + BM + wmax + 1.0, maxlen.to(tl.float32)).to(tl.int32)
    any_row = tl.max(row_ok.to(tl.int32), 0)
    return (lo // BN) * BN * any_row, hi * any_row


@_helper
def _diag_bins(acc, ds, d, dbase, RB, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               NC: tl.constexpr, NBP: tl.constexpr):
    """Add the bias-table gradient of one dS tile to ``acc`` ([NBP] bins for j - i clamped to
    [-RB, RB]). ``d`` holds j - i per element and ``dbase`` is n0 - m0, so tile element (r, c) of
    one sequence sits on diagonal j - i = dbase + c - r. Entries outside the valid mask must be 0
    in ``ds``. NC >= the number of inner diagonals (|j - i| < RB) a tile can hold."""
    r = tl.arange(0, NBP)
    dlo = dbase - (BM - 1)
    dhi = dbase + (BN - 1)
    if dlo >= RB:  # the whole tile clamps to the last column
        acc += tl.where(r == 2 * RB, tl.sum(tl.sum(ds, 1), 0), 0.0)
    elif dhi <= -RB:  # ... or to the first
        acc += tl.where(r == 0, tl.sum(tl.sum(ds, 1), 0), 0.0)
    else:
        low = tl.sum(tl.sum(tl.where(d <= -RB, ds, 0.0), 1), 0)
        high = tl.sum(tl.sum(tl.where((d >= RB) & (d > -RB), ds, 0.0), 1), 0)  # R = 0: one bin, counted once
        acc += tl.where(r == 0, low, 0.0) + tl.where(r == 2 * RB, high, 0.0)
        if RB > 0:
            # Inner diagonals, one bin each. Skew the tile: z[row, c] = ds[row, key on diagonal
            # dlo + c0 + c of the row's sequence], so the column sums of z are the diagonal sums
            # t[c]; c0 skips the diagonals below the inner band.
            c0 = tl.maximum(1 - RB - dlo, 0)
            rows = tl.arange(0, G * BM)
            s = rows // BM
            c = c0 + tl.arange(0, NC)
            col = (rows % BM)[:, None] + c[None, :] - (BM - 1)
            inside = (col >= 0) & (col < BN)
            src = s[:, None] * BN + tl.minimum(tl.maximum(col, 0), BN - 1)
            t = tl.sum(tl.where(inside, tl.gather(ds, src, 1), 0.0), 0)
            tc = r - RB - dlo - c0  # entry of t for inner bin r (j - i = r - RB)
            inner = (r > 0) & (r < 2 * RB) & (tc >= 0) & (tc < NC)
            acc += tl.where(inner, tl.gather(t, tl.minimum(tl.maximum(tc, 0), NC - 1), 0), 0.0)
    return acc


@triton.jit
def _window_attn_fwd_kernel(
    Q, K, V, BIAS, SIGMA, LENGTHS, OUT, LSE, VISITS,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    so_b, so_h, so_l, so_d, sb_h, sb_r, ss_b, ss_h, ss_l,
    B, H, L, D, R, qk_scale, cutoff,
    HAS_BIAS: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_CUTOFF: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, COUNT_VISITS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    gid = tl.program_id(1)
    nbg = tl.cdiv(B, G)
    h = gid // nbg
    b0 = (gid % nbg) * G
    m0 = pid_m * BM
    dd = tl.arange(0, BLOCK_D)

    s_i, i, b_i, n_i = _seq_rows(m0, B, L, b0, LENGTHS, HAS_LENGTHS, G, BM)
    row_in = (i < L) & (b_i < B)
    row_ok = i < n_i
    q = _load_tile(Q, _row_offsets(b_i, h, i, sq_b, sq_h, sq_l), row_in, dd, sq_d, D, DOT_FP32)
    sig, coef, win = _row_sigma(SIGMA, b_i, h, i, row_in, ss_b, ss_h, ss_l, cutoff, HAS_SIGMA)
    lo, hi = _key_range(m0, tl.max(n_i, 0), win, row_ok, HAS_CUTOFF, BM, BN)

    m_run = tl.full([G * BM], float("-inf"), tl.float32)
    l_run = tl.zeros([G * BM], tl.float32)
    acc = tl.zeros([G * BM, BLOCK_D], tl.float32)
    visits = pid_m * 0
    for n0 in range(lo, hi, BN):
        c = tl.arange(0, G * BN)
        s_j = c // BN
        j = n0 + c % BN
        b_j = b0 + s_j
        col_in = (j < L) & (b_j < B)
        k = _load_tile(K, _row_offsets(b_j, h, j, sk_b, sk_h, sk_l), col_in, dd, sk_d, D, DOT_FP32)
        v = _load_tile(V, _row_offsets(b_j, h, j, sv_b, sv_h, sv_l), col_in, dd, sv_d, D, DOT_FP32)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        x, _ = _logits(qk, i, j, s_i, s_j, n_i, coef, win, h, BIAS, sb_h, sb_r, R,
                       HAS_BIAS, HAS_SIGMA, HAS_CUTOFF, G)
        m_new = tl.maximum(m_run, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = tl.exp2(x - m_safe[:, None])
        alpha = tl.exp2(m_run - m_safe)
        l_run = l_run * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_run = m_new
        if COUNT_VISITS:
            visits += 1

    l_safe = tl.where(l_run > 0.0, l_run, 1.0)
    out = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    o_rows = _row_offsets(b_i, h, i, so_b, so_h, so_l)
    tl.store(OUT + o_rows[:, None] + dd[None, :] * so_d, out.to(OUT.dtype.element_ty),
             mask=row_in[:, None] & (dd[None, :] < D))
    lse = tl.where(row_ok, m_run + tl.log2(l_safe), 0.0)
    tl.store(LSE + _row_offsets(b_i, h, i, H * L, L, 1), lse, mask=row_in)
    if COUNT_VISITS:
        tl.store(VISITS + gid * tl.num_programs(0) + pid_m, visits)


@triton.jit
def _window_attn_bwd_q_kernel(
    Q, K, V, BIAS, SIGMA, LENGTHS, OUT, DOUT, LSE, DELTA, DQ, DSIGMA, DBIAS_PART, VISITS,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    so_b, so_h, so_l, so_d, sdo_b, sdo_h, sdo_l, sdo_d, sb_h, sb_r, ss_b, ss_h, ss_l,
    B, H, L, D, R, RB, scale, qk_scale, cutoff,
    HAS_BIAS: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_CUTOFF: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    NEED_BIAS: tl.constexpr, NEED_SIGMA: tl.constexpr,
    G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr,
    NBP: tl.constexpr, DOT_FP32: tl.constexpr, COUNT_VISITS: tl.constexpr,
):
    """One query block: Delta, dq, d sigma and this program's bias partials (long sequences)."""
    pid_m = tl.program_id(0)
    gid = tl.program_id(1)
    nbg = tl.cdiv(B, G)
    h = gid // nbg
    b0 = (gid % nbg) * G
    m0 = pid_m * BM
    dd = tl.arange(0, BLOCK_D)

    s_i, i, b_i, n_i = _seq_rows(m0, B, L, b0, LENGTHS, HAS_LENGTHS, G, BM)
    row_in = (i < L) & (b_i < B)
    row_ok = i < n_i
    q = _load_tile(Q, _row_offsets(b_i, h, i, sq_b, sq_h, sq_l), row_in, dd, sq_d, D, DOT_FP32)
    do = _load_tile(DOUT, _row_offsets(b_i, h, i, sdo_b, sdo_h, sdo_l), row_ok, dd, sdo_d, D, DOT_FP32)
    o = _load_tile(OUT, _row_offsets(b_i, h, i, so_b, so_h, so_l), row_ok, dd, so_d, D, DOT_FP32)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stat_rows = _row_offsets(b_i, h, i, H * L, L, 1)
    tl.store(DELTA + stat_rows, delta, mask=row_in)
    lse = tl.load(LSE + stat_rows, mask=row_in, other=0.0)
    sig, coef, win = _row_sigma(SIGMA, b_i, h, i, row_in, ss_b, ss_h, ss_l, cutoff, HAS_SIGMA)
    lo, hi = _key_range(m0, tl.max(n_i, 0), win, row_ok, HAS_CUTOFF, BM, BN)

    dq = tl.zeros([G * BM, BLOCK_D], tl.float32)
    dsig = tl.zeros([G * BM], tl.float32)
    bias_acc = tl.zeros([NBP], tl.float32)
    visits = pid_m * 0
    for n0 in range(lo, hi, BN):
        c = tl.arange(0, G * BN)
        s_j = c // BN
        j = n0 + c % BN
        b_j = b0 + s_j
        col_in = (j < L) & (b_j < B)
        k = _load_tile(K, _row_offsets(b_j, h, j, sk_b, sk_h, sk_l), col_in, dd, sk_d, D, DOT_FP32)
        v = _load_tile(V, _row_offsets(b_j, h, j, sv_b, sv_h, sv_l), col_in, dd, sv_d, D, DOT_FP32)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        x, d = _logits(qk, i, j, s_i, s_j, n_i, coef, win, h, BIAS, sb_h, sb_r, R,
                       HAS_BIAS, HAS_SIGMA, HAS_CUTOFF, G)
        p = tl.exp2(x - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
        if NEED_SIGMA:
            dsig += tl.sum(ds * d * d, 1)
        if NEED_BIAS:
            bias_acc = _diag_bins(bias_acc, ds, d, n0 - m0, RB, G, BM, BN, NC, NBP)
        if COUNT_VISITS:
            visits += 1

    q_rows = _row_offsets(b_i, h, i, H * L * D, L * D, D)  # dq is contiguous
    tl.store(DQ + q_rows[:, None] + dd[None, :], tl.where(row_ok[:, None], dq * scale, 0.0).to(DQ.dtype.element_ty),
             mask=row_in[:, None] & (dd[None, :] < D))
    if NEED_SIGMA:
        tl.store(DSIGMA + stat_rows, tl.where(row_ok, dsig / (sig * sig * sig), 0.0).to(DSIGMA.dtype.element_ty),
                 mask=row_in)
    pid = gid * tl.num_programs(0) + pid_m
    if NEED_BIAS:
        r = tl.arange(0, NBP)
        tl.store(DBIAS_PART + pid.to(tl.int64) * NBP + r, bias_acc)
    if COUNT_VISITS:
        tl.store(VISITS + pid, visits)


@triton.jit
def _window_attn_bwd_kv_kernel(
    Q, K, V, BIAS, SIGMA, LENGTHS, OUT, DOUT, LSE, DELTA, SIGMA_MAX, DQ, DK, DV, DSIGMA, DBIAS_PART, VISITS,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    so_b, so_h, so_l, so_d, sdo_b, sdo_h, sdo_l, sdo_d, sb_h, sb_r, ss_b, ss_h, ss_l,
    B, H, L, D, R, RB, scale, qk_scale, cutoff,
    HAS_BIAS: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_CUTOFF: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    NEED_BIAS: tl.constexpr, NEED_SIGMA: tl.constexpr, FUSED: tl.constexpr,
    G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr,
    NBP: tl.constexpr, DOT_FP32: tl.constexpr, COUNT_VISITS: tl.constexpr,
):
    """One key block: dk, dv. FUSED (the key block is each whole sequence): also Delta, dq,
    d sigma and the bias partials of every query block, which this program then owns alone."""
    pid_n = tl.program_id(0)
    gid = tl.program_id(1)
    nbg = tl.cdiv(B, G)
    h = gid // nbg
    b0 = (gid % nbg) * G
    n0 = pid_n * BN
    dd = tl.arange(0, BLOCK_D)

    s_j, j, b_j, n_j = _seq_rows(n0, B, L, b0, LENGTHS, HAS_LENGTHS, G, BN)
    col_in = (j < L) & (b_j < B)
    k = _load_tile(K, _row_offsets(b_j, h, j, sk_b, sk_h, sk_l), col_in, dd, sk_d, D, DOT_FP32)
    v = _load_tile(V, _row_offsets(b_j, h, j, sv_b, sv_h, sv_l), col_in, dd, sv_d, D, DOT_FP32)
    maxlen = tl.max(n_j, 0)
    # Query rows that can see this key block: those within cutoff * max(sigma) of it.
    lo = pid_n * 0
    hi = maxlen * (n0 < maxlen).to(tl.int32)
    if HAS_CUTOFF and not FUSED:
        smax = tl.load(SIGMA_MAX + b_j * H + h, mask=b_j < B, other=0.0)
        wmax = cutoff * tl.max(smax, 0)
        lo = tl.maximum(n0 - wmax - 1.0, 0.0).to(tl.int32)
        hi = tl.minimum(n0 + BN + wmax + 1.0, hi.to(tl.float32)).to(tl.int32)
    lo = (lo // BM) * BM

    dk = tl.zeros([G * BN, BLOCK_D], tl.float32)
    dv = tl.zeros([G * BN, BLOCK_D], tl.float32)
    bias_acc = tl.zeros([NBP], tl.float32)
    visits = pid_n * 0
    for m0 in range(lo, hi, BM):
        s_i, i, b_i, n_i = _seq_rows(m0, B, L, b0, LENGTHS, HAS_LENGTHS, G, BM)
        row_in = (i < L) & (b_i < B)
        row_ok = i < n_i
        q = _load_tile(Q, _row_offsets(b_i, h, i, sq_b, sq_h, sq_l), row_in, dd, sq_d, D, DOT_FP32)
        do = _load_tile(DOUT, _row_offsets(b_i, h, i, sdo_b, sdo_h, sdo_l), row_ok, dd, sdo_d, D, DOT_FP32)
        stat_rows = _row_offsets(b_i, h, i, H * L, L, 1)
        lse = tl.load(LSE + stat_rows, mask=row_in, other=0.0)
        if FUSED:
            o = _load_tile(OUT, _row_offsets(b_i, h, i, so_b, so_h, so_l), row_ok, dd, so_d, D, DOT_FP32)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        else:
            delta = tl.load(DELTA + stat_rows, mask=row_in, other=0.0)
        sig, coef, win = _row_sigma(SIGMA, b_i, h, i, row_in, ss_b, ss_h, ss_l, cutoff, HAS_SIGMA)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        x, d = _logits(qk, i, j, s_i, s_j, n_i, coef, win, h, BIAS, sb_h, sb_r, R,
                       HAS_BIAS, HAS_SIGMA, HAS_CUTOFF, G)
        p = tl.exp2(x - lse[:, None])
        dv += tl.dot(tl.trans(p).to(do.dtype), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q)
        if FUSED:
            dq = tl.dot(ds.to(k.dtype), k) * scale
            q_rows = _row_offsets(b_i, h, i, H * L * D, L * D, D)
            tl.store(DQ + q_rows[:, None] + dd[None, :], tl.where(row_ok[:, None], dq, 0.0).to(DQ.dtype.element_ty),
                     mask=row_in[:, None] & (dd[None, :] < D))
            if NEED_SIGMA:
                dsig = tl.sum(ds * d * d, 1) / (sig * sig * sig)
                tl.store(DSIGMA + stat_rows, tl.where(row_ok, dsig, 0.0).to(DSIGMA.dtype.element_ty), mask=row_in)
            if NEED_BIAS:
                bias_acc = _diag_bins(bias_acc, ds, d, n0 - m0, RB, G, BM, BN, NC, NBP)
        if COUNT_VISITS:
            visits += 1

    if FUSED:
        # Query blocks past the longest sequence hold padded rows only: zero gradient.
        for m0 in range(tl.cdiv(maxlen, BM) * BM, L, BM):
            s_i, i, b_i, n_i = _seq_rows(m0, B, L, b0, LENGTHS, HAS_LENGTHS, G, BM)
            row_in = (i < L) & (b_i < B)
            q_rows = _row_offsets(b_i, h, i, H * L * D, L * D, D)
            tl.store(DQ + q_rows[:, None] + dd[None, :], tl.zeros([G * BM, BLOCK_D], DQ.dtype.element_ty),
                     mask=row_in[:, None] & (dd[None, :] < D))
            if NEED_SIGMA:
                tl.store(DSIGMA + _row_offsets(b_i, h, i, H * L, L, 1),
                         tl.zeros([G * BM], DSIGMA.dtype.element_ty), mask=row_in)

    kv_rows = _row_offsets(b_j, h, j, H * L * D, L * D, D)
    kv_mask = col_in[:, None] & (dd[None, :] < D)
    tl.store(DK + kv_rows[:, None] + dd[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_rows[:, None] + dd[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)
    pid = gid * tl.num_programs(0) + pid_n
    if FUSED and NEED_BIAS:
        r = tl.arange(0, NBP)
        tl.store(DBIAS_PART + pid.to(tl.int64) * NBP + r, bias_acc)
    if COUNT_VISITS:
        tl.store(VISITS + pid, visits)


# ---------------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class _Tiles:
    """Launch shape: G sequences per program, BM query and BN key positions per sequence."""

    G: int
    BM: int
    BN: int
    num_warps: int = 4
    num_stages: int = 2


def _pack(B: int, LP: int, rows: int) -> int:
    """Sequences per program so a tile has about ``rows`` rows (and at least the 16 a dot needs)."""
    g = min(max(1, rows // LP), triton.next_power_of_2(B))
    return max(g, max(1, 16 // LP))


def _fwd_tiles(B: int, L: int, D: int) -> _Tiles:
    LP = triton.next_power_of_2(L)
    if LP <= 64:  # whole sequences, packed: one key block, no wasted 128-row tile
        return _Tiles(_pack(B, LP, 128), LP, LP, 4)
    if LP <= 128:  # one sequence, the whole key range in one block
        return _Tiles(1, 64, LP, 4 if D <= 64 else 8)
    return _Tiles(1, 128 if D <= 128 else 64, 64, 8 if D >= 64 else 4)


def _bwd_tiles(B: int, L: int, D: int) -> tuple[bool, _Tiles]:
    """(fused, tiles). Fused: the key block is each whole sequence, so one kernel does it all."""
    LP = triton.next_power_of_2(L)
    if LP <= 64 or (LP <= 128 and D <= 64):  # dk, dv of a whole L = 128 sequence stay in registers
        G = _pack(B, LP, 128)
        BM = min(LP, max(64 // G, 16 // G, 1))
        return True, _Tiles(G, BM, LP, 4 if G * LP <= 64 else 8, 1)
    return False, _Tiles(1, 64, 64 if D <= 128 else 32, 4, 2)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _bias_radius(rel_bias: Optional[torch.Tensor], L: int) -> tuple[int, int]:
    """(R of the table, RB = the clamp radius the gradient bins need: offsets never exceed L - 1)."""
    if rel_bias is None:
        return 0, 0
    R = (rel_bias.shape[1] - 1) // 2
    return R, min(R, L - 1)


def _new_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.empty(shape, dtype=dtype, device=device)
    return testing.poison_(x) if _POISON_OUTPUTS else x


def _visit_buffer(grid, device: torch.device) -> Optional[torch.Tensor]:
    if _VISIT_LOG is None:
        return None
    return torch.full((grid[0] * grid[1],), -1, dtype=torch.int32, device=device)


def _log_visits(kernel: str, visits: Optional[torch.Tensor], dense: int) -> None:
    if visits is not None and _VISIT_LOG is not None:
        _VISIT_LOG.append(dict(kernel=kernel, visited=int(visits.sum()), total=dense,
                               unwritten=int((visits < 0).sum())))


_TUNE_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 1), (4, 2), (8, 2), (8, 3))]
_TUNE_KEY = ["L", "D", "G", "BM", "BN", "HAS_BIAS", "HAS_SIGMA", "HAS_CUTOFF"]
_TUNED: dict = {}


def _launch(kernel, grid, args: list, meta: dict, tiles: _Tiles) -> None:
    """Run ``kernel``. On a GPU, num_warps / num_stages are autotuned per shape (block sizes come
    from the plan, so grids and partial buffers do not depend on the pick); under the interpreter
    or in deterministic mode the plan's single configuration runs."""
    if _config.triton_interpret() or _config.deterministic():
        kernel[grid](*args, **meta, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
        return
    tuned = _TUNED.get(kernel)
    if tuned is None:
        tuned = _TUNED[kernel] = triton.autotune(configs=_TUNE_CONFIGS, key=_TUNE_KEY)(kernel)
    tuned[grid](*args, **meta)


def _common_args(q, k, v, rel_bias, sigma):
    """Strides of q, k, v and of the optional bias table and sigma (zeros when absent)."""
    return [*q.stride(), *k.stride(), *v.stride()], [
        *(rel_bias.stride() if rel_bias is not None else (0, 0)),
        *(sigma.stride() if sigma is not None else (0, 0, 0)),
    ]


def _window_attn_fwd(q, k, v, rel_bias, sigma, lengths, scale: float, cutoff: Optional[float]):
    """Forward launcher: ``(out [B, H, L, D] in q's dtype, lse [B, H, L] fp32, log2 units)``."""
    B, H, L, D = q.shape
    t = _fwd_tiles(B, L, D)
    out = _new_empty((B, H, L, D), q.dtype, q.device)
    lse = _new_empty((B, H, L), torch.float32, q.device)
    lengths = lengths.contiguous() if lengths is not None else None
    grid = (triton.cdiv(L, t.BM), H * triton.cdiv(B, t.G))
    visits = _visit_buffer(grid, q.device)
    R, _ = _bias_radius(rel_bias, L)
    qkv_strides, table_strides = _common_args(q, k, v, rel_bias, sigma)
    args = [q, k, v, _or(rel_bias, q), _or(sigma, q), _or(lengths, q), out, lse, _or(visits, q),
            *qkv_strides, *out.stride(), *table_strides,
            B, H, L, D, R, scale * math.log2(math.e), cutoff or 0.0]
    meta = dict(HAS_BIAS=rel_bias is not None, HAS_SIGMA=sigma is not None, HAS_CUTOFF=cutoff is not None,
                HAS_LENGTHS=lengths is not None, G=t.G, BM=t.BM, BN=t.BN, BLOCK_D=_block_d(D),
                DOT_FP32=_config.triton_interpret(), COUNT_VISITS=visits is not None)
    _launch(_window_attn_fwd_kernel, grid, args, meta, t)
    _log_visits("fwd", visits, grid[0] * grid[1] * triton.cdiv(L, t.BN))
    return out, lse


def _or(x: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    """A placeholder pointer for an absent optional tensor (never dereferenced)."""
    return dummy if x is None else x


def _window_attn_bwd(dout, q, k, v, out, lse, rel_bias, sigma, lengths, scale: float, cutoff: Optional[float],
                     need_bias: bool, need_sigma: bool):
    """Backward launcher: ``(dq, dk, dv, d rel_bias, d sigma)``; the last two are empty tensors
    when not asked for."""
    B, H, L, D = q.shape
    fused, t = _bwd_tiles(B, L, D)
    dev = q.device
    need_bias = need_bias and rel_bias is not None
    need_sigma = need_sigma and sigma is not None
    dq, dk, dv = (_new_empty((B, H, L, D), q.dtype, dev) for _ in range(3))
    dsigma = _new_empty((B, H, L), sigma.dtype, dev) if need_sigma else q.new_empty(0)
    lengths = lengths.contiguous() if lengths is not None else None
    R, RB = _bias_radius(rel_bias, L)
    NBP = triton.next_power_of_2(2 * RB + 1) if need_bias else 1
    groups = H * triton.cdiv(B, t.G)
    qkv_strides, table_strides = _common_args(q, k, v, rel_bias, sigma)
    tail = [*qkv_strides, *out.stride(), *dout.stride(), *table_strides,
            B, H, L, D, R, RB, scale, scale * math.log2(math.e), cutoff or 0.0]
    meta = dict(HAS_BIAS=rel_bias is not None, HAS_SIGMA=sigma is not None, HAS_CUTOFF=cutoff is not None,
                HAS_LENGTHS=lengths is not None, NEED_BIAS=need_bias, NEED_SIGMA=need_sigma,
                G=t.G, BM=t.BM, BN=t.BN, BLOCK_D=_block_d(D), NBP=NBP, DOT_FP32=_config.triton_interpret(),
                NC=triton.next_power_of_2(max(1, min(t.BM + t.BN - 1, 2 * RB - 1))))
    inputs = [q, k, v, _or(rel_bias, q), _or(sigma, q), _or(lengths, q), out, dout, lse]
    grid_kv = (triton.cdiv(L, t.BN), groups)
    if fused:
        partial = _new_empty((groups, NBP), torch.float32, dev) if need_bias else None
        visits = _visit_buffer(grid_kv, dev)
        _launch(_window_attn_bwd_kv_kernel, grid_kv,
                [*inputs, lse, q, dq, dk, dv, _or(dsigma if need_sigma else None, q), _or(partial, q),
                 _or(visits, q), *tail],
                dict(meta, FUSED=True, COUNT_VISITS=visits is not None), t)
        _log_visits("bwd_kv", visits, grid_kv[0] * grid_kv[1] * triton.cdiv(L, t.BM))
    else:
        delta = _new_empty((B, H, L), torch.float32, dev)
        grid_q = (triton.cdiv(L, t.BM), groups)
        partial = _new_empty((grid_q[0] * groups, NBP), torch.float32, dev) if need_bias else None
        visits = _visit_buffer(grid_q, dev)
        _launch(_window_attn_bwd_q_kernel, grid_q,
                [*inputs, delta, dq, _or(dsigma if need_sigma else None, q), _or(partial, q), _or(visits, q), *tail],
                dict(meta, COUNT_VISITS=visits is not None), t)
        _log_visits("bwd_q", visits, grid_q[0] * grid_q[1] * triton.cdiv(L, t.BN))
        sigma_max = q
        if cutoff is not None:  # widest window of each (b, h) over its valid rows
            sig = sigma.float()
            if lengths is not None:
                sig = sig.masked_fill(torch.arange(L, device=dev) >= lengths[:, None, None], 0.0)
            sigma_max = sig.amax(-1).contiguous()
        visits = _visit_buffer(grid_kv, dev)
        _launch(_window_attn_bwd_kv_kernel, grid_kv,
                [*inputs, delta, sigma_max, dq, dk, dv, q, q, _or(visits, q), *tail],
                dict(meta, FUSED=False, NEED_BIAS=False, NEED_SIGMA=False, COUNT_VISITS=visits is not None), t)
        _log_visits("bwd_kv", visits, grid_kv[0] * grid_kv[1] * triton.cdiv(L, t.BM))
    if need_bias:
        # Second pass: reduce the per-program partials ([H, groups per head, programs, bins]) in
        # a fixed order, then place the 2 RB + 1 bins into the 2 R + 1 table columns.
        sums = partial.view(H, groups // H, -1, NBP).sum(dim=(1, 2))
        dbias = torch.zeros(rel_bias.shape, dtype=torch.float32, device=dev)
        dbias[:, R - RB:R + RB + 1] = sums[:, :2 * RB + 1]
        dbias = dbias.to(rel_bias.dtype)
    else:
        dbias = q.new_empty(0)
    return dq, dk, dv, dbias, dsigma


# ------------------------------------------------------------------ registered ops and autograd
@torch.library.custom_op("kdc_triton::windowed_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_bias: Optional[torch.Tensor],
            sigma: Optional[torch.Tensor], lengths: Optional[torch.Tensor], scale: float,
            cutoff: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, L, D], lse [B, H, L] fp32)`` of windowed attention (the lse is for backward)."""
    return _window_attn_fwd(q, k, v, rel_bias, sigma, lengths, scale, cutoff)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, rel_bias, sigma, lengths, scale, cutoff):
    B, H, L, D = q.shape
    return q.new_empty((B, H, L, D)), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("kdc_triton::windowed_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, rel_bias: Optional[torch.Tensor], sigma: Optional[torch.Tensor],
            lengths: Optional[torch.Tensor], scale: float, cutoff: Optional[float], need_bias: bool,
            need_sigma: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, d rel_bias, d sigma)``; the last two are empty unless asked for."""
    return _window_attn_bwd(dout, q, k, v, out, lse, rel_bias, sigma, lengths, scale, cutoff, need_bias, need_sigma)


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, lse, rel_bias, sigma, lengths, scale, cutoff, need_bias, need_sigma):
    B, H, L, D = q.shape
    grads = [q.new_empty((B, H, L, D)) for _ in range(3)]
    dbias = rel_bias.new_empty(rel_bias.shape) if need_bias and rel_bias is not None else q.new_empty(0)
    dsigma = sigma.new_empty((B, H, L)) if need_sigma and sigma is not None else q.new_empty(0)
    return (*grads, dbias, dsigma)


def _setup_context(ctx, inputs, output):
    q, k, v, rel_bias, sigma, lengths, scale, cutoff = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rel_bias, sigma, lengths)
    ctx.scale, ctx.cutoff = scale, cutoff
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, rel_bias, sigma, lengths = ctx.saved_tensors
    need_bias = rel_bias is not None and ctx.needs_input_grad[3]
    need_sigma = sigma is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dbias, dsigma = _bwd_op(dout, q, k, v, out, lse, rel_bias, sigma, lengths, ctx.scale,
                                        ctx.cutoff, need_bias, need_sigma)
    return dq, dk, dv, dbias if need_bias else None, dsigma if need_sigma else None, None, None, None


torch.library.register_autograd("kdc_triton::windowed_attention_fwd", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- fast-path protocol
def windowed_attention_triton(q, k, v, rel_bias=None, sigma=None, lengths=None, scale=None, cutoff=None):
    """Run the fused Triton kernels on validated arguments (see ``api.windowed_attention``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _fwd_op(q, k, v, rel_bias, sigma, lengths, scale, cutoff)
    return out


def windowed_attention_unsupported(q, k, v, rel_bias=None, sigma=None, lengths=None, scale=None,
                                   cutoff=None) -> list[str]:
    """Why these kernels cannot run this case (shapes/dtypes only; empty when they can)."""
    reasons = []
    B, H, L, D = q.shape
    if D > MAX_HEAD_DIM:
        reasons.append(f"head dim D = {D} is larger than the {MAX_HEAD_DIM} the Triton kernels support")
    if rel_bias is not None and rel_bias.requires_grad and torch.is_grad_enabled():
        _, RB = _bias_radius(rel_bias, L)
        if 2 * RB + 1 > MAX_BIAS_BINS:
            reasons.append(
                f"the rel_bias gradient needs 2 * min(R, L - 1) + 1 = {2 * RB + 1} bins per program, more than "
                f"the {MAX_BIAS_BINS} the Triton kernels keep in registers (R = {(rel_bias.shape[1] - 1) // 2}, L = {L})"
            )
    return reasons
