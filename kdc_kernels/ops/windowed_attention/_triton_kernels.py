r"""Triton kernels of ``windowed_attention`` (the launchers, tile plans and registered ops are in
``_triton.py``, which documents the maths and the work layout).

Kernels: ``_window_attn_fwd_kernel`` (out, log-sum-exp), ``_window_attn_bwd_q_kernel`` (Delta,
dq, d sigma, bias partials of long sequences), ``_window_attn_bwd_kv_kernel`` (dk, dv; FUSED: every
gradient of whole short sequences) and ``_window_attn_bias_reduce_kernel`` (the fixed-order sum of
the bias partials into the table gradient).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ... import _launch

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)

# ------------------------------------------------------------------------------------ kernels
# Device helpers: @triton.jit on a GPU, plain Python under the interpreter (see _launch.device_helper).
_helper = _launch.device_helper


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
def _softmax_grad_rows(x, lse, do, v, PRECISION: tl.constexpr):
    """:func:`_softmax_grad` for a tile that holds every key of its rows, with Delta from the tile
    itself (rowsum(P * dP)) rather than from the stored, rounded output: sum_j dS[i, j] is then 0
    up to fp32 rounding, as in exact arithmetic, so a bias bin that sums dS over many rows carries
    no error from the fp16/bf16 rounding of O. A poisoned row (lse = +inf) has P = 0, hence
    Delta = 0 and dS = 0 (its dP is finite: non-finite values were zeroed in v)."""
    p = tl.exp2(x - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p, p * (dp - tl.sum(p * dp, 1)[:, None])


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
    """One key block: dk, dv. FUSED (the key block is each whole sequence): also dq, d sigma and
    the bias partials of every query block, which this program then owns alone (Delta comes from
    the tile; OUT is not read)."""
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
        x, d = _logits(q, k, 0.0, qk_scale, i, j, s_i, s_j, n_i, coef, win, h, BIAS, sb_h, sb_r, R,
                       HAS_BIAS, HAS_SIGMA, HAS_CUTOFF, G, PRECISION)
        if FUSED:  # the tile holds every key of its rows: Delta = rowsum(P * dP), exact in fp32
            p, ds = _softmax_grad_rows(x, lse, do, v, PRECISION)
        else:
            p, ds = _softmax_grad(x, lse, do, v, tl.load(DELTA + stat_rows, mask=row_in, other=0.0), PRECISION)
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


@triton.jit
def _window_attn_bias_reduce_kernel(
    PART, DBIAS, P, R, RB, sd_h, sd_r,
    NBP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """d rel_bias ``[H, 2R+1]`` of one head and BLOCK_R table columns: the sum of the head's P
    partial rows ``PART [H, P, NBP]`` in a fixed order (deterministic); columns beyond the
    2 RB + 1 bins the gradient can reach (|j - i| <= L - 1 < R) get 0."""
    h = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    bins = r - (R - RB)
    ok = (bins >= 0) & (bins <= 2 * RB)
    pp = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_R], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = (h * P + p0 + pp).to(tl.int64) * NBP
        acc += tl.sum(tl.load(PART + rows[:, None] + bins[None, :], mask=(p0 + pp < P)[:, None] & ok[None, :],
                              other=0.0), 0)
    tl.store(DBIAS + h * sd_h + r * sd_r, acc.to(DBIAS.dtype.element_ty), mask=r <= 2 * R)
