r"""Triton kernels for ``windowed_attention``: fused forward and backward.

Maths (the op contract; see api.windowed_attention). For batch b, head h, query i, key j::

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
  are packed whole, e.g. 2 sequences of L = 32 in one 64 x 64 tile (not one in a 128-row tile);
  long ones use ``G = 1`` and FlashAttention-style query/key blocks.
* Softmax is online, in fp32, in log2 units; the forward saves the log-sum-exp (0 for padded
  rows, so it stays finite) and the backward recomputes P from it. No ``[B, H, L, L]`` tensor.
* With ``cutoff``, a tile only visits key blocks that intersect
  ``[i - cutoff * max(sigma), i + cutoff * max(sigma)]`` over its valid rows: cost O(L * window).
  Blocks past the longest sequence of a tile are never visited either.
* Backward for L <= 64 (L <= 128 when D <= 64) is one kernel per group of whole sequences (the
  key block is the whole sequence, so dq, d sigma and the bias partials of every query block are
  complete in the program that computes them: no atomics). Longer sequences use two kernels:
  ``_bwd_q`` (Delta, dq, d sigma, bias partials; one program per query block) then ``_bwd_kv``
  (dk, dv; one program per key block, skipping query blocks beyond cutoff * max(sigma)).
* d rel_bias: each tile of dS is reduced along its diagonals on chip (a gather that skews the
  tile, then a column sum), the diagonal sums are binned into the ``2R+1`` table columns in
  registers, and each program writes one row of a ``[programs, bins]`` partial buffer. A small
  second pass (a fixed-order ``torch.sum``) reduces the partials. Nothing uses atomics, so the
  gradients are bitwise reproducible run to run; ``KDC_DETERMINISTIC=1`` additionally pins the
  launch configuration (no autotuning), so they are reproducible across processes too.
* Dots take the inputs' dtype on the GPU (tensor cores) with fp32 accumulation; fp32 inputs use
  IEEE fp32 dots unless TF32 is allowed the torch way (``_config.fp32_dot_precision``). Under the
  CPU interpreter every tile is converted to fp32 first (its bf16 arithmetic is wrong).
* Excluded means excluded: padded query rows and keys are never read (masked loads); a key
  whose k or v holds NaN/inf inside the length is zeroed, and a NaN added to its logits poisons
  exactly the rows whose window holds it (output NaN, lse +inf: P = 0 and Delta = 0 in the
  backward), so a NaN/inf in a position a row excludes never reaches that row.
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
# _NATIVE_DOTS: on the interpreter, feed the dots the inputs' dtype as on a GPU instead of fp32
# (meaningful for fp16 only: the interpreter's bf16 arithmetic is wrong).
_POISON_OUTPUTS = False
_VISIT_LOG: list | None = None
_NATIVE_DOTS = False


# ------------------------------------------------------------------------------------ kernels
# Device helpers are @triton.jit functions, inlined by the compiler. Under the CPU interpreter
# (decided at import, as Triton itself decides) they are plain Python: the interpreter re-patches
# triton.language on every jit-function call, milliseconds each, which dominated the test time.
_helper = (lambda fn: fn) if _config.triton_interpret() else triton.jit


@_helper
def _group(B, G: tl.constexpr):
    """(group id, head, first batch row) of this program's G sequences. Groups are grid axis 0
    (up to 2^31 - 1 of them; axis 1, the blocks along L, is limited to 65535)."""
    gid = tl.program_id(0)
    nbg = tl.cdiv(B, G)
    return gid, gid // nbg, (gid % nbg) * G


@_helper
def _slots(start, b0, G: tl.constexpr, BLK: tl.constexpr):
    """Rows of a packed tile: G sequences x BLK positions from ``start``.
    Returns (sequence slot, position, batch row) per row."""
    r = tl.arange(0, G * BLK)
    s = r // BLK
    return s, start + r % BLK, b0 + s


@_helper
def _lengths(b, B, L, LENGTHS, HAS_LENGTHS: tl.constexpr):
    """Valid length of each row's sequence (0 for batch rows past B)."""
    if HAS_LENGTHS:
        return tl.load(LENGTHS + b, mask=b < B, other=0).to(tl.int32)
    return tl.where(b < B, L, 0)


@_helper
def _offsets(b, h, pos, s_b, s_h, s_l):
    return b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + pos.to(tl.int64) * s_l


@_helper
def _load_rows(X, rows, ok, dd, s_d, D, DOT_FP32: tl.constexpr):
    x = tl.load(X + rows[:, None] + dd[None, :] * s_d, mask=ok[:, None] & (dd[None, :] < D), other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@_helper
def _store_rows(X, rows, ok, dd, D, value):
    """Store ``value`` into a contiguous [.., D] tensor (the launchers' outputs and gradients)."""
    tl.store(X + rows[:, None] + dd[None, :], value.to(X.dtype.element_ty), mask=ok[:, None] & (dd[None, :] < D))


@_helper
def _query_tile(Q, SIGMA, LENGTHS, m0, b0, h, B, L, D, sq_b, sq_h, sq_l, sq_d, ss_b, ss_h, ss_l, cutoff, dd,
                HAS_SIGMA: tl.constexpr, HAS_LENGTHS: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
                DOT_FP32: tl.constexpr):
    """Query rows of a tile: slots, positions, batch rows, lengths, which rows exist (row_in) and
    are valid (row_ok), q, and per row sigma (fp32), the Gaussian coefficient log2(e) / (2 sigma^2)
    and the cutoff half-width cutoff * sigma."""
    s_i, i, b_i = _slots(m0, b0, G, BM)
    n_i = _lengths(b_i, B, L, LENGTHS, HAS_LENGTHS)
    row_in = (i < L) & (b_i < B)
    row_ok = i < n_i
    # Padded rows are never read (they may hold anything, NaN included).
    q = _load_rows(Q, _offsets(b_i, h, i, sq_b, sq_h, sq_l), row_ok, dd, sq_d, D, DOT_FP32)
    if HAS_SIGMA:
        sig = tl.load(SIGMA + _offsets(b_i, h, i, ss_b, ss_h, ss_l), mask=row_ok, other=1.0).to(tl.float32)
    else:
        sig = tl.full([G * BM], 1.0, tl.float32)
    return s_i, i, b_i, n_i, row_in, row_ok, q, sig, 0.5 / (sig * sig) * LOG2E, cutoff * sig


@_helper
def _key_tile(K, V, LENGTHS, n0, b0, h, B, L, D, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d, dd,
              HAS_LENGTHS: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, DOT_FP32: tl.constexpr,
              FLAG: tl.constexpr):
    """Key columns of a tile: slots, positions, batch rows, which exist, k and v with every
    non-finite element zeroed, and (FLAG) per key 0, or NaN when its k or v held a non-finite
    value (then its whole k and v rows are zeroed).

    Excluded means excluded: padded keys are never read, and a NaN/inf inside the length is
    zeroed so that 0 * NaN cannot reach a row whose window excludes the key (an excluded key has
    weight exactly 0 in every dot). The forward adds the NaN flag to the logits of the rows whose
    window holds the key, which poisons exactly those rows; the backward needs no flag (poisoned
    rows have lse = +inf, so P = 0 there) and zeroes element-wise, without a row reduction."""
    s_j, j, b_j = _slots(n0, b0, G, BN)
    col_in = (j < L) & (b_j < B)
    col_ok = j < _lengths(b_j, B, L, LENGTHS, HAS_LENGTHS)
    k = _load_rows(K, _offsets(b_j, h, j, sk_b, sk_h, sk_l), col_ok, dd, sk_d, D, DOT_FP32)
    v = _load_rows(V, _offsets(b_j, h, j, sv_b, sv_h, sv_l), col_ok, dd, sv_d, D, DOT_FP32)
    if FLAG:  # x * 0 is 0 for finite x and NaN for NaN/inf: one row sum flags a key
        flag = tl.sum(k.to(tl.float32) * 0.0, 1) + tl.sum(v.to(tl.float32) * 0.0, 1)
        bad = (flag != flag)[:, None]
        return s_j, j, b_j, col_in, tl.where(bad, 0.0, k).to(k.dtype), tl.where(bad, 0.0, v).to(v.dtype), flag
    k = tl.where(k * 0.0 == 0.0, k, 0.0).to(k.dtype)
    v = tl.where(v * 0.0 == 0.0, v, 0.0).to(v.dtype)
    return s_j, j, b_j, col_in, k, v, tl.zeros([G * BN], tl.float32)  # unused


@_helper
def _logits(q, k, flag, qk_scale, i, j, s_i, s_j, n_i, coef, win, h, BIAS, sb_h, sb_r, R,
            HAS_BIAS: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_CUTOFF: tl.constexpr, G: tl.constexpr,
            PRECISION: tl.constexpr):
    """Logits of a tile in log2 units, -inf where the key is excluded (other sequence, padding,
    cutoff), and j - i (fp32: positions are exact, and float index math is as cheap as int32 on
    the GPU and much cheaper in the interpreter). ``flag`` (0, or NaN for a key that held a
    non-finite value) is added before the mask: it poisons the included entries only."""
    x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + flag
    d = j.to(tl.float32)[None, :] - i.to(tl.float32)[:, None]
    ok = (i[:, None] < n_i[:, None]) & (j[None, :] < n_i[:, None])
    if G > 1:
        ok = ok & (s_i[:, None] == s_j[None, :])
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
def _softmax_grad(x, lse, do, v, delta, PRECISION: tl.constexpr):
    """P = exp2(x - lse) (0 where masked, and in poisoned rows, whose lse is +inf) and
    dS = P * (dO V^T - Delta), both fp32."""
    p = tl.exp2(x - lse[:, None])
    return p, p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])


@_helper
def _dsigma(t, sig):
    """d sigma = t / sigma^3 with t = sum_j dS (i - j)^2. t is exactly 0 when sigma is so small
    that sigma^3 underflows (every off-diagonal weight is 0 then), so any sigma > 0 is finite."""
    return tl.where(t == 0.0, 0.0, t / (sig * sig * sig))


@_helper
def _window(start, maxlen, win, ok, HAS_CUTOFF: tl.constexpr, BLK: tl.constexpr, STEP: tl.constexpr):
    """Blocks [lo, hi) (step STEP) that rows start .. start+BLK-1 can reach: within the widest
    cutoff window ``win`` among the rows marked ``ok`` and below ``maxlen``; empty if none is ok."""
    lo = start * 0
    hi = maxlen
    if HAS_CUTOFF:
        wmax = tl.max(tl.where(ok, win, 0.0), 0)
        lo = tl.maximum(start - wmax - 1.0, 0.0).to(tl.int32)
        hi = tl.minimum(start + BLK + wmax + 1.0, maxlen.to(tl.float32)).to(tl.int32)
    any_ok = tl.max(ok.to(tl.int32), 0)
    return (lo // STEP) * STEP * any_ok, hi * any_ok


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
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d, sb_h, sb_r, ss_b, ss_h, ss_l,
    B, H, L, D, R, qk_scale, cutoff,
    HAS_BIAS: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_CUTOFF: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, COUNT_VISITS: tl.constexpr,
):
    """One query block of G sequences: out and the log-sum-exp (log2 units). A row whose window
    holds a non-finite key or value outputs NaN and gets lse = +inf (its backward is then 0)."""
    pid_m = tl.program_id(1)
    gid, h, b0 = _group(B, G)
    m0 = pid_m * BM
    dd = tl.arange(0, BLOCK_D)
    s_i, i, b_i, n_i, row_in, row_ok, q, sig, coef, win = _query_tile(
        Q, SIGMA, LENGTHS, m0, b0, h, B, L, D, sq_b, sq_h, sq_l, sq_d, ss_b, ss_h, ss_l, cutoff, dd,
        HAS_SIGMA, HAS_LENGTHS, G, BM, DOT_FP32)
    lo, hi = _window(m0, tl.max(n_i, 0), win, row_ok, HAS_CUTOFF, BM, BN)

    m_run = tl.full([G * BM], float("-inf"), tl.float32)
    l_run = tl.zeros([G * BM], tl.float32)
    acc = tl.zeros([G * BM, BLOCK_D], tl.float32)
    visits = pid_m * 0
    for n0 in range(lo, hi, BN):
        s_j, j, b_j, col_in, k, v, flag = _key_tile(K, V, LENGTHS, n0, b0, h, B, L, D, sk_b, sk_h, sk_l, sk_d,
                                                    sv_b, sv_h, sv_l, sv_d, dd, HAS_LENGTHS, G, BN, DOT_FP32, True)
        x, _d = _logits(q, k, flag[None, :], qk_scale, i, j, s_i, s_j, n_i, coef, win, h, BIAS, sb_h, sb_r, R,
                        HAS_BIAS, HAS_SIGMA, HAS_CUTOFF, G, PRECISION)
        m_new = tl.maximum(m_run, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = tl.exp2(x - m_safe[:, None])
        alpha = tl.exp2(m_run - m_safe)
        l_run = l_run * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_run = m_new
        if COUNT_VISITS:
            visits += 1

    poisoned = l_run != l_run  # a key in the row's window held NaN/inf
    l_safe = tl.where(l_run > 0.0, l_run, 1.0)
    out = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    _store_rows(OUT, _offsets(b_i, h, i, H * L * D, L * D, D), row_in, dd, D,
                tl.where(poisoned[:, None], float("nan"), out))
    # 0 for padded rows (and for a row with no key, which valid inputs never produce): finite;
    # +inf for poisoned rows, so that the backward's P = exp2(x - lse) is 0 there.
    lse = tl.where(row_ok & (l_run > 0.0), m_run + tl.log2(l_safe), 0.0)
    lse = tl.where(poisoned, float("inf"), lse)
    tl.store(LSE + _offsets(b_i, h, i, H * L, L, 1), lse, mask=row_in)
    if COUNT_VISITS:
        tl.store(VISITS + gid * tl.num_programs(1) + pid_m, visits)


@triton.jit
def _window_attn_bwd_q_kernel(
    Q, K, V, BIAS, SIGMA, LENGTHS, OUT, DOUT, LSE, DELTA, DQ, DSIGMA, DBIAS_PART, VISITS,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    sdo_b, sdo_h, sdo_l, sdo_d, sb_h, sb_r, ss_b, ss_h, ss_l,
    B, H, L, D, R, RB, scale, qk_scale, cutoff,
    HAS_BIAS: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_CUTOFF: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    NEED_BIAS: tl.constexpr, NEED_SIGMA: tl.constexpr,
    G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr,
    NBP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, COUNT_VISITS: tl.constexpr,
):
    """One query block (long sequences): Delta, dq, d sigma and this program's bias partials."""
    pid_m = tl.program_id(1)
    gid, h, b0 = _group(B, G)
    m0 = pid_m * BM
    dd = tl.arange(0, BLOCK_D)
    s_i, i, b_i, n_i, row_in, row_ok, q, sig, coef, win = _query_tile(
        Q, SIGMA, LENGTHS, m0, b0, h, B, L, D, sq_b, sq_h, sq_l, sq_d, ss_b, ss_h, ss_l, cutoff, dd,
        HAS_SIGMA, HAS_LENGTHS, G, BM, DOT_FP32)
    do = _load_rows(DOUT, _offsets(b_i, h, i, sdo_b, sdo_h, sdo_l), row_ok, dd, sdo_d, D, DOT_FP32)
    o = _load_rows(OUT, _offsets(b_i, h, i, H * L * D, L * D, D), row_ok, dd, 1, D, DOT_FP32)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    delta = tl.where(delta == delta, delta, 0.0)  # NaN (a poisoned row's output): P = 0 there, keep dS 0
    stat_rows = _offsets(b_i, h, i, H * L, L, 1)
    tl.store(DELTA + stat_rows, delta, mask=row_in)
    lse = tl.load(LSE + stat_rows, mask=row_in, other=0.0)
    lo, hi = _window(m0, tl.max(n_i, 0), win, row_ok, HAS_CUTOFF, BM, BN)

    dq = tl.zeros([G * BM, BLOCK_D], tl.float32)
    dsig = tl.zeros([G * BM], tl.float32)
    bias_acc = tl.zeros([NBP], tl.float32)
    visits = pid_m * 0
    for n0 in range(lo, hi, BN):
        s_j, j, b_j, col_in, k, v, _flag = _key_tile(K, V, LENGTHS, n0, b0, h, B, L, D, sk_b, sk_h, sk_l, sk_d,
                                                     sv_b, sv_h, sv_l, sv_d, dd, HAS_LENGTHS, G, BN, DOT_FP32, False)
        x, d = _logits(q, k, 0.0, qk_scale, i, j, s_i, s_j, n_i, coef, win, h, BIAS, sb_h, sb_r, R,
                       HAS_BIAS, HAS_SIGMA, HAS_CUTOFF, G, PRECISION)
        p, ds = _softmax_grad(x, lse, do, v, delta, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if NEED_SIGMA:
            dsig += tl.sum(ds * d * d, 1)
        if NEED_BIAS:
            bias_acc = _diag_bins(bias_acc, ds, d, n0 - m0, RB, G, BM, BN, NC, NBP)
        if COUNT_VISITS:
            visits += 1

    _store_rows(DQ, _offsets(b_i, h, i, H * L * D, L * D, D), row_in, dd, D,
                tl.where(row_ok[:, None], dq * scale, 0.0))
    if NEED_SIGMA:
        tl.store(DSIGMA + stat_rows, tl.where(row_ok, _dsigma(dsig, sig), 0.0).to(DSIGMA.dtype.element_ty),
                 mask=row_in)
    pid = gid * tl.num_programs(1) + pid_m
    if NEED_BIAS:
        tl.store(DBIAS_PART + pid.to(tl.int64) * NBP + tl.arange(0, NBP), bias_acc)
    if COUNT_VISITS:
        tl.store(VISITS + pid, visits)


@triton.jit
def _window_attn_bwd_kv_kernel(
    Q, K, V, BIAS, SIGMA, LENGTHS, OUT, DOUT, LSE, DELTA, SIGMA_MAX, DQ, DK, DV, DSIGMA, DBIAS_PART, VISITS,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
    sdo_b, sdo_h, sdo_l, sdo_d, sb_h, sb_r, ss_b, ss_h, ss_l,
    B, H, L, D, R, RB, scale, qk_scale, cutoff,
    HAS_BIAS: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_CUTOFF: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    NEED_BIAS: tl.constexpr, NEED_SIGMA: tl.constexpr, FUSED: tl.constexpr,
    G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr,
    NBP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, COUNT_VISITS: tl.constexpr,
):
    """One key block: dk, dv. FUSED (the key block is each whole sequence): also Delta, dq,
    d sigma and the bias partials of every query block, which this program then owns alone."""
    pid_n = tl.program_id(1)
    gid, h, b0 = _group(B, G)
    n0 = pid_n * BN
    dd = tl.arange(0, BLOCK_D)
    s_j, j, b_j, col_in, k, v, _flag = _key_tile(K, V, LENGTHS, n0, b0, h, B, L, D, sk_b, sk_h, sk_l, sk_d,
                                                 sv_b, sv_h, sv_l, sv_d, dd, HAS_LENGTHS, G, BN, DOT_FP32, False)
    n_j = _lengths(b_j, B, L, LENGTHS, HAS_LENGTHS)
    maxlen = tl.max(n_j, 0)
    # Query rows that can see this key block: within cutoff * (widest sigma of the sequence).
    if HAS_CUTOFF and not FUSED:
        win_j = cutoff * tl.load(SIGMA_MAX + b_j * H + h, mask=b_j < B, other=0.0)
    else:
        win_j = tl.zeros([G * BN], tl.float32)
    lo, hi = _window(n0, maxlen, win_j, j < n_j, HAS_CUTOFF and not FUSED, BN, BM)

    dk = tl.zeros([G * BN, BLOCK_D], tl.float32)
    dv = tl.zeros([G * BN, BLOCK_D], tl.float32)
    bias_acc = tl.zeros([NBP], tl.float32)
    visits = pid_n * 0
    for m0 in range(lo, hi, BM):
        s_i, i, b_i, n_i, row_in, row_ok, q, sig, coef, win = _query_tile(
            Q, SIGMA, LENGTHS, m0, b0, h, B, L, D, sq_b, sq_h, sq_l, sq_d, ss_b, ss_h, ss_l, cutoff, dd,
            HAS_SIGMA, HAS_LENGTHS, G, BM, DOT_FP32)
        do = _load_rows(DOUT, _offsets(b_i, h, i, sdo_b, sdo_h, sdo_l), row_ok, dd, sdo_d, D, DOT_FP32)
        stat_rows = _offsets(b_i, h, i, H * L, L, 1)
        lse = tl.load(LSE + stat_rows, mask=row_in, other=0.0)
        if FUSED:
            o = _load_rows(OUT, _offsets(b_i, h, i, H * L * D, L * D, D), row_ok, dd, 1, D, DOT_FP32)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            delta = tl.where(delta == delta, delta, 0.0)  # NaN (a poisoned row's output): P = 0 there
        else:
            delta = tl.load(DELTA + stat_rows, mask=row_in, other=0.0)
        x, d = _logits(q, k, 0.0, qk_scale, i, j, s_i, s_j, n_i, coef, win, h, BIAS, sb_h, sb_r, R,
                       HAS_BIAS, HAS_SIGMA, HAS_CUTOFF, G, PRECISION)
        p, ds = _softmax_grad(x, lse, do, v, delta, PRECISION)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        if FUSED:
            _store_rows(DQ, _offsets(b_i, h, i, H * L * D, L * D, D), row_in, dd, D,
                        tl.where(row_ok[:, None], tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale, 0.0))
            if NEED_SIGMA:
                dsig = _dsigma(tl.sum(ds * d * d, 1), sig)
                tl.store(DSIGMA + stat_rows, tl.where(row_ok, dsig, 0.0).to(DSIGMA.dtype.element_ty), mask=row_in)
            if NEED_BIAS:
                bias_acc = _diag_bins(bias_acc, ds, d, n0 - m0, RB, G, BM, BN, NC, NBP)
        if COUNT_VISITS:
            visits += 1

    if FUSED:
        # Query blocks past the longest sequence hold padded rows only: zero gradient.
        for m0 in range(tl.cdiv(maxlen, BM) * BM, L, BM):
            _, i, b_i = _slots(m0, b0, G, BM)
            row_in = (i < L) & (b_i < B)
            _store_rows(DQ, _offsets(b_i, h, i, H * L * D, L * D, D), row_in, dd, D,
                        tl.zeros([G * BM, BLOCK_D], tl.float32))
            if NEED_SIGMA:
                tl.store(DSIGMA + _offsets(b_i, h, i, H * L, L, 1),
                         tl.zeros([G * BM], DSIGMA.dtype.element_ty), mask=row_in)

    kv_rows = _offsets(b_j, h, j, H * L * D, L * D, D)
    _store_rows(DK, kv_rows, col_in, dd, D, dk * scale)
    _store_rows(DV, kv_rows, col_in, dd, D, dv)
    pid = gid * tl.num_programs(1) + pid_n
    if FUSED and NEED_BIAS:
        tl.store(DBIAS_PART + pid.to(tl.int64) * NBP + tl.arange(0, NBP), bias_acc)
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
    """Sequences per program for short sequences: a tile of about ``rows`` rows, at least the 16
    a dot needs. Packing G sequences block-diagonally costs G x the elementwise work of one, so on
    a GPU it stops at the row count the tensor cores and memory transactions want."""
    return max(1, min(rows // LP, triton.next_power_of_2(B)), 16 // LP)


# Tile plans (block sizes and warps per regime). On the GPU they are chosen so that the sm_90
# builds fit in registers (bf16, D = 64: no spills at the PRVR and long-video shapes). The CPU
# interpreter pays per operation, not per element, so there the tiles are larger (the same code
# paths: packing, several query blocks per fused program, skipped key blocks).
def _fwd_tiles(B: int, L: int, D: int, interpret: bool = False) -> _Tiles:
    LP = triton.next_power_of_2(L)
    if LP <= 64:  # whole sequences, packed: one key block per program
        return _Tiles(_pack(B, LP, 128 if interpret else min(64, 2 * LP)), LP, LP, 4 if D <= 64 else 8)
    if LP <= 128 and not interpret:
        return _Tiles(1, 64, 64, 4 if D <= 64 else 8)
    return _Tiles(1, 128 if D <= 128 else 64, 64 if D <= 128 else 32, 8)


def _bwd_tiles(B: int, L: int, D: int, interpret: bool = False) -> tuple[bool, _Tiles, _Tiles]:
    """(fused, tiles of _bwd_q, tiles of _bwd_kv). Fused: each key block is a whole sequence, so
    _bwd_kv alone computes every gradient (the _bwd_q tiles are then unused)."""
    LP = triton.next_power_of_2(L)
    if LP <= 64 or (LP <= 128 and D <= 64):  # dk, dv of whole sequences stay in registers
        G = _pack(B, LP, 128 if interpret else min(64, 2 * LP))
        kv = _Tiles(G, min(LP, max(1, (64 if interpret else 32) // G)), LP, 8, 1)
        return True, kv, kv
    if interpret:
        return False, _Tiles(1, 64, 64), _Tiles(1, 64, 64)
    wide = D > 64
    return False, _Tiles(1, 32 if wide else 64, 32, 8, 1), _Tiles(1, 32, 64 if D <= 128 else 32, 8 if wide else 4, 1)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _bias_radius(rel_bias: Optional[torch.Tensor], L: int) -> tuple[int, int]:
    """(R of the table, RB = the clamp radius the gradient bins need: offsets never exceed L - 1)."""
    if rel_bias is None:
        return 0, 0
    R = (rel_bias.shape[1] - 1) // 2
    return R, min(R, L - 1)


def _dot_fp32() -> bool:
    """Convert tiles to fp32 before each dot: on the interpreter (see _NATIVE_DOTS)."""
    return _config.triton_interpret() and not _NATIVE_DOTS


def _precision(q: torch.Tensor) -> str:
    """``input_precision`` of the dots: fp32 inputs follow the package's TF32 rule
    (``_config.fp32_dot_precision``); fp16/bf16 tiles use the tensor cores as they are."""
    return _config.fp32_dot_precision(q.device.type) if q.dtype == torch.float32 else "ieee"


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
_TUNE_KEY = ["L", "D", "G", "BM", "BN", "HAS_BIAS", "HAS_SIGMA", "HAS_CUTOFF", "HAS_LENGTHS", "FUSED", "NEED_BIAS",
             "NEED_SIGMA"]
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
    t = _fwd_tiles(B, L, D, _config.triton_interpret())
    out = _new_empty((B, H, L, D), q.dtype, q.device)
    lse = _new_empty((B, H, L), torch.float32, q.device)
    lengths = lengths.contiguous() if lengths is not None else None
    grid = (H * triton.cdiv(B, t.G), triton.cdiv(L, t.BM))
    visits = _visit_buffer(grid, q.device)
    R, _ = _bias_radius(rel_bias, L)
    qkv_strides, table_strides = _common_args(q, k, v, rel_bias, sigma)
    args = [q, k, v, _or(rel_bias, q), _or(sigma, q), _or(lengths, q), out, lse, _or(visits, q),
            *qkv_strides, *table_strides, B, H, L, D, R, scale * math.log2(math.e), cutoff or 0.0]
    meta = dict(HAS_BIAS=rel_bias is not None, HAS_SIGMA=sigma is not None, HAS_CUTOFF=cutoff is not None,
                HAS_LENGTHS=lengths is not None, G=t.G, BM=t.BM, BN=t.BN, BLOCK_D=_block_d(D),
                DOT_FP32=_dot_fp32(), PRECISION=_precision(q), COUNT_VISITS=visits is not None)
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
    fused, tq, tkv = _bwd_tiles(B, L, D, _config.triton_interpret())
    dev = q.device
    out = out.contiguous()  # as the forward wrote it
    need_bias = need_bias and rel_bias is not None
    need_sigma = need_sigma and sigma is not None
    dq, dk, dv = (_new_empty((B, H, L, D), q.dtype, dev) for _ in range(3))
    dsigma = _new_empty((B, H, L), sigma.dtype, dev) if need_sigma else q.new_empty(0)
    lengths = lengths.contiguous() if lengths is not None else None
    R, RB = _bias_radius(rel_bias, L)
    NBP = triton.next_power_of_2(2 * RB + 1) if need_bias else 1
    qkv_strides, table_strides = _common_args(q, k, v, rel_bias, sigma)
    tail = [*qkv_strides, *dout.stride(), *table_strides,
            B, H, L, D, R, RB, scale, scale * math.log2(math.e), cutoff or 0.0]
    inputs = [q, k, v, _or(rel_bias, q), _or(sigma, q), _or(lengths, q), out, dout, lse]

    def meta(t: _Tiles, **extra):
        return dict(HAS_BIAS=rel_bias is not None, HAS_SIGMA=sigma is not None, HAS_CUTOFF=cutoff is not None,
                    HAS_LENGTHS=lengths is not None, NEED_BIAS=need_bias, NEED_SIGMA=need_sigma,
                    G=t.G, BM=t.BM, BN=t.BN, BLOCK_D=_block_d(D), NBP=NBP, DOT_FP32=_dot_fp32(),
                    PRECISION=_precision(q),
                    NC=triton.next_power_of_2(max(1, min(t.BM + t.BN - 1, 2 * RB - 1))), **extra)

    grid_kv = (H * triton.cdiv(B, tkv.G), triton.cdiv(L, tkv.BN))
    if fused:
        partial = _new_empty((grid_kv[0] * grid_kv[1], NBP), torch.float32, dev) if need_bias else None
        visits = _visit_buffer(grid_kv, dev)
        _launch(_window_attn_bwd_kv_kernel, grid_kv,
                [*inputs, lse, q, dq, dk, dv, _or(dsigma if need_sigma else None, q), _or(partial, q),
                 _or(visits, q), *tail],
                meta(tkv, FUSED=True, COUNT_VISITS=visits is not None), tkv)
        _log_visits("bwd_kv", visits, grid_kv[0] * grid_kv[1] * triton.cdiv(L, tkv.BM))
    else:
        delta = _new_empty((B, H, L), torch.float32, dev)
        grid_q = (H * triton.cdiv(B, tq.G), triton.cdiv(L, tq.BM))
        partial = _new_empty((grid_q[0] * grid_q[1], NBP), torch.float32, dev) if need_bias else None
        visits = _visit_buffer(grid_q, dev)
        _launch(_window_attn_bwd_q_kernel, grid_q,
                [*inputs, delta, dq, _or(dsigma if need_sigma else None, q), _or(partial, q), _or(visits, q), *tail],
                meta(tq, COUNT_VISITS=visits is not None), tq)
        _log_visits("bwd_q", visits, grid_q[0] * grid_q[1] * triton.cdiv(L, tq.BN))
        sigma_max = q
        if cutoff is not None:  # widest window of each (b, h) over its valid rows
            sig = sigma.float()
            if lengths is not None:
                sig = sig.masked_fill(torch.arange(L, device=dev) >= lengths[:, None, None], 0.0)
            sigma_max = sig.amax(-1).contiguous()
        visits = _visit_buffer(grid_kv, dev)
        _launch(_window_attn_bwd_kv_kernel, grid_kv,
                [*inputs, delta, sigma_max, dq, dk, dv, q, q, _or(visits, q), *tail],
                meta(tkv, FUSED=False, COUNT_VISITS=visits is not None) | dict(NEED_BIAS=False, NEED_SIGMA=False), tkv)
        _log_visits("bwd_kv", visits, grid_kv[0] * grid_kv[1] * triton.cdiv(L, tkv.BM))
    if need_bias:
        # Second pass: reduce the per-program partials (rows ordered group-major, and a group's
        # head is its index // groups per head, so they view as [H, programs of a head, bins]) in
        # a fixed order, then place the 2 RB + 1 bins into the 2 R + 1 table columns.
        sums = partial.view(H, -1, NBP).sum(dim=1)
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
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"the Triton kernels take float32/float16/bfloat16 inputs, got {q.dtype} "
                       "(convert with .float(), or use impl='reference')")
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
