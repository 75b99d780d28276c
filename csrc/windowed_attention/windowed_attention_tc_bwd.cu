// windowed_attention backward on tensor cores (bf16 / fp16, head dim <= 128). With P = exp(logit -
// LSE) recomputed from the forward's LSE, dP = dO V^T, delta_i = sum_j P_ij dP_ij and
// dS = P (dP - delta):
//
//   dQ = scale * dS K      dK = scale * dS^T Q      dV = P^T dO
//   d sigma[b, h, i] = sum_j dS_ij (i - j)^2 / sigma_i^3
//   d rel_bias[h, r] = sum over (b, i, j) with clamp(j - i, -R, R) = r of dS_ij
//
// delta is the exact row sum of P dP in fp32 (not rowsum(dO * O) with O rounded to 16 bits: that
// rounding, summed over many rows, is what a bias bin shared by many pairs would collect).
//
// Two warp-level steps do all the work, each a few mma m16n8k16 with fp32 accumulation:
//   rows step (a warp owns 16 query rows): S and dP of a key tile, then dQ += dS K (the K tile
//     through the zero-weight-skipping product, so a NaN key beyond a window cannot leak), and the
//     d sigma row sums;
//   keys step (a warp owns 16 keys): S^T and dP^T of a query tile, then dV += P^T dO and
//     dK += dS^T Q, and dS^T (fp32) in shared memory for the diagonal sums of the bias table.
// Short sequences (L <= 64, packed as in the forward) run both steps in ONE kernel: a block owns
// whole sequences, so delta is a row sum within the block and nothing is atomic. Longer ones use
// two kernels: dq (rows step over the window's key tiles, twice: delta first, then dS) and dkdv
// (keys step over the query tiles whose window reaches the block's keys), double-buffered with
// cp.async. The bias table gradient is a per-block partial table (one per (sequence, 64-row block))
// reduced in a fixed order by a small last kernel: no atomics anywhere, bitwise reproducible.
//
// A valid row whose LSE or delta is not finite is poisoned (a NaN / inf key or value inside its
// window; see row_is_live in tile.cuh): once its delta is known the rows step treats it as not
// valid (its dq and d sigma are 0), and the keys step gives it P = dS = 0, so it adds nothing to
// any gradient. The dq kernel stores a poisoned row's non-finite delta for the dkdv kernel, which
// applies the same test to the same LSE and delta.
#include "windowed_attention/tc_tile.cuh"

namespace kdc {
namespace wattn {
// The bias-table reduction of the backward (windowed_attention_bwd.cu).
cudaError_t launch_bias_reduce(const float* partial, float* grad_bias, int B, int H, int nblocks, int R, int L,
                               cudaStream_t stream);
}  // namespace wattn

namespace wattn_tc {

constexpr int kDsLd = BN + 1;  // row stride of the fp32 dS^T tile (bias diagonal sums)

// Per-query-row values the keys step reads for the query tile it works on.
struct RowArrays {
  float* lse;
  float* delta;
  float* gauss;
  float* thr;
  int* valid;
};

__device__ __forceinline__ RowArrays row_arrays(float* base) {
  RowArrays r;
  r.lse = base;
  r.delta = base + BM;
  r.gauss = base + 2 * BM;
  r.thr = base + 3 * BM;
  r.valid = reinterpret_cast<int*>(base + 4 * BM);
  return r;
}
constexpr int kRowArrayFloats = 5 * BM;

// --- rows step ---------------------------------------------------------------------------------------

// P (0 for excluded pairs) and dP of this warp's 16 rows (shared row xrow of Qs / dOs; rows
// i = iw + g (+ 8)) against nk keys (shared row krow of Ks / Vs; keys j = j0 + column).
template <typename T, int DT>
__device__ __forceinline__ void warp_probs(float (&pr)[BN / 8][4], float (&dp)[BN / 8][4], const T* Qs, const T* dOs,
                                           int xrow, const T* Ks, const T* Vs, int krow, int nk, int iw, int j0,
                                           const RowWindow (&rw)[2], const float (&lse)[2], const TileGeometry& geo) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  warp_scores<T, DT>(pr, Qs, xrow, Ks, krow, nk);
  warp_scores<T, DT>(dp, dOs, xrow, Vs, krow, nk);
#pragma unroll
  for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e / 2;
      const int i = iw + g + 8 * h, j = j0 + n * 8 + 2 * t + (e % 2);
      const float logit = n * 8 < nk ? logit_of(pr[n][e], i, j, rw[h], geo) : -INFINITY;
      pr[n][e] = logit == -INFINITY ? 0.f : expf(logit - lse[h]);
    }
  }
}

// This lane's share of delta_i = sum_j P_ij dP_ij (dP of an excluded key may be NaN: skipped).
__device__ __forceinline__ void add_delta(float (&delta)[2], const float (&pr)[BN / 8][4], const float (&dp)[BN / 8][4]) {
#pragma unroll
  for (int n = 0; n < BN / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) delta[e / 2] += pr[n][e] != 0.f ? pr[n][e] * dp[n][e] : 0.f;
}

// dS (in place of dP), its d sigma row sums (this lane's share), and dq += dS K.
template <typename T, int DT>
__device__ __forceinline__ void rows_grad(float (&dq)[DT / 8][4], float (&dsig)[2], const float (&pr)[BN / 8][4],
                                          float (&dp)[BN / 8][4], const float (&delta)[2], const T* Ks, int krow,
                                          int nk, int iw, int j0) {
  constexpr int LD = Smem<DT>::LD;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e / 2;
      const float ds = pr[n][e] != 0.f ? pr[n][e] * (dp[n][e] - delta[h]) : 0.f;
      const float dist = static_cast<float>(iw + g + 8 * h - (j0 + n * 8 + 2 * t + (e % 2)));
      dsig[h] = fmaf(ds, dist * dist, dsig[h]);
      dp[n][e] = ds;
    }
  }
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    if (kk * 16 >= nk) break;
    uint32_t a[4];
    acc_to_a<T>(a, dp, kk);
#pragma unroll
    for (int d2 = 0; d2 < DT / 16; ++d2) {
      uint32_t b[4];
      load_b_trans<LD>(b, Ks, krow + kk * 16, d2 * 16);
      mma_skip_zero_weights<T, LD>(dq[2 * d2], dq[2 * d2 + 1], a, b, Ks, krow + kk * 16, d2 * 16);
    }
  }
}

// Writes rows iw + g (+ 8) (below L) of dq (scaled; 0 for rows that are not valid) and d sigma.
template <typename T, int DT>
__device__ __forceinline__ void store_rows(const WindowAttnBwdParams& p, int64_t bh, int iw, int rows_in_slot,
                                           const float (&dq)[DT / 8][4], const float (&dsig_sum)[2],
                                           const RowWindow (&rw)[2]) {
  const WindowAttnFwdParams& f = p.fwd;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  T* dq_out = static_cast<T*>(p.grad_q) + bh * f.L * f.D;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = g + 8 * h, i = iw + r;
    if (r >= rows_in_slot || i >= f.L) continue;
    const bool valid = rw[h].valid;
    T* row = dq_out + static_cast<int64_t>(i) * f.D;
#pragma unroll
    for (int n = 0; n < DT / 8; ++n) {
      store_pair(row, n * 8 + 2 * t, f.D, valid ? f.scale * dq[n][2 * h] : 0.f, valid ? f.scale * dq[n][2 * h + 1] : 0.f);
    }
    if (p.grad_sigma != nullptr && t == 0) {
      p.grad_sigma[bh * f.L + i] = valid ? wattn::sigma_grad(dsig_sum[h], f.sigma[bh * f.L + i]) : 0.f;
    }
  }
}

// --- keys step ---------------------------------------------------------------------------------------

// Queries a keys step handles at once: all 64 of a tile, or 32 at a time for D = 128 (registers).
template <int DT>
__host__ __device__ constexpr int query_chunk() { return DT >= 128 ? 32 : 64; }

// For this warp's 16 keys (shared row krow of Ks / Vs; keys j = jw + g (+ 8)) and nq queries
// (shared row qrow of Qs / dOs; queries i = i0 + column, their values in `ra` at index column):
// dV += P^T dO, dK += dS^T Q, and dS^T (fp32, 0 where excluded) into dsf at shared row ds_row.
template <typename T, int DT>
__device__ __forceinline__ void keys_step(float (&dk)[DT / 8][4], float (&dv)[DT / 8][4], const T* Qs, const T* dOs,
                                          int qrow, int nq, const T* Ks, const T* Vs, int krow, int jw, int i0,
                                          const RowArrays& ra, const TileGeometry& geo, float* dsf, int ds_row) {
  constexpr int LD = Smem<DT>::LD, QC = query_chunk<DT>();
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int c0 = 0; c0 < nq; c0 += QC) {
    const int nc = min(QC, nq - c0);
    float pt[QC / 8][4], dst[QC / 8][4];
    warp_scores<T, DT, QC>(pt, Ks, krow, Qs, qrow + c0, nc);   // S^T
    warp_scores<T, DT, QC>(dst, Vs, krow, dOs, qrow + c0, nc);  // dP^T
#pragma unroll
    for (int n = 0; n < QC / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = c0 + n * 8 + 2 * t + (e % 2);
        const int j = jw + g + 8 * (e / 2), i = i0 + c;
        float prob = 0.f, ds = 0.f;
        if (n * 8 < nc) {
          RowWindow w;
          w.valid = ra.valid[c] != 0;
          w.gauss = ra.gauss[c];
          w.thr = ra.thr[c];
          const float logit = logit_of(pt[n][e], i, j, w, geo);
          prob = logit == -INFINITY ? 0.f : expf(logit - ra.lse[c]);
          ds = prob != 0.f ? prob * (dst[n][e] - ra.delta[c]) : 0.f;
          dsf[(ds_row + g + 8 * (e / 2)) * kDsLd + c] = ds;
        }
        pt[n][e] = prob;
        dst[n][e] = ds;
      }
    }
#pragma unroll
    for (int kk = 0; kk < QC / 16; ++kk) {
      if (kk * 16 >= nc) break;
      uint32_t ap[4], ad[4];
      acc_to_a<T>(ap, pt, kk);
      acc_to_a<T>(ad, dst, kk);
#pragma unroll
      for (int d2 = 0; d2 < DT / 16; ++d2) {
        uint32_t b[4];
        load_b_trans<LD>(b, dOs, qrow + c0 + kk * 16, d2 * 16);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        tc::mma_16816<T>(dv[2 * d2], ap, b0);
        tc::mma_16816<T>(dv[2 * d2 + 1], ap, b1);
        load_b_trans<LD>(b, Qs, qrow + c0 + kk * 16, d2 * 16);
        const uint32_t c0f[2] = {b[0], b[1]}, c1f[2] = {b[2], b[3]};
        tc::mma_16816<T>(dk[2 * d2], ad, c0f);
        tc::mma_16816<T>(dk[2 * d2 + 1], ad, c1f);
      }
    }
  }
}

// Writes keys jw + g (+ 8) (below L) of dk (scaled) and dv; keys at or past len get 0.
template <typename T, int DT>
__device__ __forceinline__ void store_keys(const WindowAttnBwdParams& p, int64_t bh, int jw, int keys_in_slot, int len,
                                           const float (&dk)[DT / 8][4], const float (&dv)[DT / 8][4]) {
  const WindowAttnFwdParams& f = p.fwd;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  T* dk_out = static_cast<T*>(p.grad_k) + bh * f.L * f.D;
  T* dv_out = static_cast<T*>(p.grad_v) + bh * f.L * f.D;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = g + 8 * h, j = jw + r;
    if (r >= keys_in_slot || j >= f.L) continue;
    const bool valid = j < len;
    T* krow = dk_out + static_cast<int64_t>(j) * f.D;
    T* vrow = dv_out + static_cast<int64_t>(j) * f.D;
#pragma unroll
    for (int n = 0; n < DT / 8; ++n) {
      const int col = n * 8 + 2 * t;
      store_pair(krow, col, f.D, valid ? f.scale * dk[n][2 * h] : 0.f, valid ? f.scale * dk[n][2 * h + 1] : 0.f);
      store_pair(vrow, col, f.D, valid ? dv[n][2 * h] : 0.f, valid ? dv[n][2 * h + 1] : 0.f);
    }
  }
}

// Diagonal sums of the fp32 dS^T tiles of every slot (rows = keys, columns = queries), added to
// the slot's partial bias table `part[s]` (2 Rp + 1 entries): table entry e collects the diagonals
// with clamp(j - i, -Rp, Rp) = e. A fixed order everywhere. `diag` holds 4 x 128 floats. Called by
// all threads of the block (it synchronises).
__device__ __forceinline__ void add_bias_diagonals(const float* dsf, float* diag, float* const (&part)[4],
                                                   const BlockPlan& bp, int nq, int Rp, int dmin0) {
  // Diagonal u of slot s holds the elements (key r, query c) with r - c = u - (nq - 1), i.e. the
  // offset j - i = dmin0 + u for slot s's tile (dmin0: the offset of u = 0).
  const int ndiag = bp.SL + nq - 1;
  for (int x = threadIdx.x; x < bp.G * ndiag; x += kThreads) {
    const int s = x / ndiag, u = x % ndiag;
    const int r_lo = max(0, u - (nq - 1)), r_hi = min(bp.SL - 1, u);
    float sum = 0.f;
    for (int r = r_lo; r <= r_hi; ++r) sum += dsf[(s * bp.SL + r) * kDsLd + (r - u + nq - 1)];
    diag[s * 128 + u] = sum;
  }
  __syncthreads();
  const int ntab = 2 * Rp + 1;
  for (int x = threadIdx.x; x < bp.G * ntab; x += kThreads) {
    const int s = x / ntab, e = x % ntab - Rp;
    float* ps = pick(part, s);
    if (ps == nullptr) continue;
    // Diagonals u with clamp(dmin0 + u, -Rp, Rp) = e.
    const int u_first = e == -Rp ? 0 : e - dmin0;
    const int u_last = e == Rp ? ndiag - 1 : e - dmin0;
    float sum = 0.f;
    for (int u = max(u_first, 0); u <= min(u_last, ndiag - 1); ++u) sum += diag[s * 128 + u];
    ps[e + Rp] += sum;
  }
}

// Per-query-row values of rows [row0, row0 + SL) of each slot (shared index s * SL + r): LSE and
// delta (from global), the window (from sigma), validity (0 for a poisoned row).
__device__ __forceinline__ void stage_row_arrays(const RowArrays& ra, const WindowAttnBwdParams& p, const BlockPlan& bp,
                                                 int row0, bool cut) {
  const WindowAttnFwdParams& f = p.fwd;
  for (int x = threadIdx.x; x < BM; x += kThreads) {
    const int s = x / bp.SL, i = row0 + x % bp.SL;
    const int64_t bh = pick(bp.bh, s);
    const bool valid = bh >= 0 && i < pick(bp.len, s);
    const RowWindow w = wattn::row_window(f.sigma != nullptr && bh >= 0 ? f.sigma + bh * f.L : nullptr, f.cutoff, cut,
                                          i, valid);
    const float lse = valid ? f.lse[bh * f.L + i] : 0.f;
    const float delta = valid ? p.delta[bh * f.L + i] : 0.f;
    ra.valid[x] = valid && wattn::row_is_live(lse, delta) ? 1 : 0;  // a poisoned row: P = dS = 0
    ra.gauss[x] = w.gauss;
    ra.thr[x] = w.thr;
    ra.lse[x] = lse;
    ra.delta[x] = delta;
  }
}

// --- short sequences (L <= 64): one kernel ------------------------------------------------------------

template <int DT>
constexpr size_t short_smem_bytes() {
  // Q, K, V, dO tiles; fp32 dS^T tile; per-row arrays; bias diagonals (4 x 128); diagonal sums (4 x 128)
  return 2 * 4 * Smem<DT>::TILE + sizeof(float) * (BM * kDsLd + kRowArrayFloats + 2 * 4 * 128);
}

template <typename T, int DT>
__global__ void __launch_bounds__(kThreads) window_attn_tc_bwd_short_kernel(const WindowAttnBwdParams p, bool vec) {
  constexpr int TILE = Smem<DT>::TILE;
  const WindowAttnFwdParams& f = p.fwd;
  T* Qs = reinterpret_cast<T*>(dynamic_smem());
  T* Ks = Qs + TILE;
  T* Vs = Ks + TILE;
  T* dOs = Vs + TILE;
  float* dsf = reinterpret_cast<float*>(dOs + TILE);
  const RowArrays ra = row_arrays(dsf + BM * kDsLd);
  float* bias_s = dsf + BM * kDsLd + kRowArrayFloats;  // [4][128]
  float* diag_s = bias_s + 4 * 128;                     // [4][128]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const BlockPlan bp = block_plan(f);
  const int slot = warp / (kWarps / bp.G);
  const int wrow = (warp % (kWarps / bp.G)) * 16;
  const int64_t bh = pick(bp.bh, slot);
  const int len = pick(bp.len, slot);
  const bool cut = f.cutoff > 0.f && f.sigma != nullptr;
  const int Rp = reach_of(f.R, f.L);

  int zero[4] = {0, 0, 0, 0}, lens[4] = {bp.len[0], bp.len[1], bp.len[2], bp.len[3]};
  stage_rows<T, DT>(Qs, f.q, bp, zero, lens, f.H, f.D, vec);
  stage_rows<T, DT>(Ks, f.k, bp, zero, lens, f.H, f.D, vec);
  stage_rows<T, DT>(Vs, f.v, bp, zero, lens, f.H, f.D, vec);
  stage_rows<T, DT>(dOs, p.grad_out, bp, zero, lens, f.H, f.D, vec);
  tc::cp_async_commit();
  if (f.rel_bias != nullptr) {
    for (int s = 0; s < bp.G; ++s) {
      if (bp.bh[s] >= 0) {
        stage_bias(bias_s + s * 128, f.rel_bias + (bp.bh[s] % f.H) * (2 * f.R + 1), f.R, -(bp.SL - 1), threadIdx.x,
                   kThreads);
      }
    }
  }
  tc::cp_async_wait<0>();
  __syncthreads();

  TileGeometry geo;
  geo.kend = len;
  geo.cut = cut;
  geo.scale = f.scale;
  geo.bias_t = f.rel_bias != nullptr ? bias_s + slot * 128 : nullptr;
  geo.dmin = -(bp.SL - 1);
  const int srow = slot * bp.SL;  // the slot's first shared row
  const bool active = bh >= 0 && wrow < len;

  // Rows step: this warp's 16 rows against all keys of its sequence.
  {
    RowWindow rw[2];
    float lse[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = wrow + g + 8 * h;
      const bool valid = active && i < len;
      rw[h] = wattn::row_window(f.sigma != nullptr && bh >= 0 ? f.sigma + bh * f.L : nullptr, f.cutoff, cut, i, valid);
      lse[h] = valid ? f.lse[bh * f.L + i] : 0.f;
    }
    float dq[DT / 8][4];
#pragma unroll
    for (int n = 0; n < DT / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
    float delta[2] = {0.f, 0.f}, dsig[2] = {0.f, 0.f};
    if (active) {
      float pr[BN / 8][4], dp[BN / 8][4];
      warp_probs<T, DT>(pr, dp, Qs, dOs, srow + wrow, Ks, Vs, srow, bp.SL, wrow, 0, rw, lse, geo);
      add_delta(delta, pr, dp);
      delta[0] = quad_sum(delta[0]);
      delta[1] = quad_sum(delta[1]);
      // A poisoned row is not valid from here on: store_rows writes 0 for its dq and d sigma (what
      // rows_grad computes for it is discarded) and the keys step gives it P = dS = 0.
      rw[0].valid = rw[0].valid && wattn::row_is_live(lse[0], delta[0]);
      rw[1].valid = rw[1].valid && wattn::row_is_live(lse[1], delta[1]);
      rows_grad<T, DT>(dq, dsig, pr, dp, delta, Ks, srow, bp.SL, wrow, 0);
      dsig[0] = quad_sum(dsig[0]);
      dsig[1] = quad_sum(dsig[1]);
    }
    if (bh >= 0) store_rows<T, DT>(p, bh, wrow, bp.SL - wrow, dq, dsig, rw);
    if (t == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wrow + g + 8 * h;
        if (r >= bp.SL) continue;
        ra.valid[srow + r] = rw[h].valid ? 1 : 0;
        ra.gauss[srow + r] = rw[h].gauss;
        ra.thr[srow + r] = rw[h].thr;
        ra.lse[srow + r] = lse[h];
        ra.delta[srow + r] = delta[h];
      }
    }
  }
  // dS^T tiles are written by every warp for its keys; padding elements stay 0.
  for (int x = threadIdx.x; x < BM * kDsLd; x += kThreads) dsf[x] = 0.f;
  __syncthreads();

  // Keys step: this warp's 16 keys against all queries of its sequence.
  {
    float dk[DT / 8][4], dv[DT / 8][4];
#pragma unroll
    for (int n = 0; n < DT / 8; ++n) dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.f;
    if (active) {
      const RowArrays rs = {ra.lse + srow, ra.delta + srow, ra.gauss + srow, ra.thr + srow, ra.valid + srow};
      keys_step<T, DT>(dk, dv, Qs, dOs, srow, bp.SL, Ks, Vs, srow + wrow, wrow, 0, rs, geo, dsf, srow + wrow);
    }
    if (bh >= 0) store_keys<T, DT>(p, bh, wrow, bp.SL - wrow, len, dk, dv);
  }
  if (p.bias_partial == nullptr) return;  // (uniform: no barrier is skipped by a subset)
  __syncthreads();
  const int ntab = 2 * Rp + 1;
  float* part[4] = {nullptr, nullptr, nullptr, nullptr};
  for (int s = 0; s < bp.G; ++s) {
    if (bp.bh[s] >= 0) part[s] = p.bias_partial + bp.bh[s] * ntab;  // one 64-row block per sequence
  }
  for (int x = threadIdx.x; x < bp.G * ntab; x += kThreads) {
    float* ps = pick(part, x / ntab);
    if (ps != nullptr) ps[x % ntab] = 0.f;
  }
  // Within slot s: key r, query c, offset j - i = r - c; u = r - c + SL - 1 -> dmin0 = -(SL - 1).
  add_bias_diagonals(dsf, diag_s, part, bp, bp.SL, Rp, -(bp.SL - 1));
}

// --- long sequences (L > 64): dq kernel, then dkdv kernel --------------------------------------------

template <int DT>
constexpr size_t dq_smem_bytes() {
  // Q, dO, two K and two V tiles; bias diagonals of two tiles; 4 window ints
  return 2 * 6 * Smem<DT>::TILE + sizeof(float) * 2 * 128 + sizeof(int) * 8;
}

template <typename T, int DT>
__global__ void __launch_bounds__(kThreads) window_attn_tc_bwd_dq_kernel(const WindowAttnBwdParams p, bool vec) {
  constexpr int TILE = Smem<DT>::TILE;
  const WindowAttnFwdParams& f = p.fwd;
  T* Qs = reinterpret_cast<T*>(dynamic_smem());
  T* dOs = Qs + TILE;
  T* Ks = dOs + TILE;  // two buffers
  T* Vs = Ks + 2 * TILE;
  float* bias_s = reinterpret_cast<float*>(Vs + 2 * TILE);  // [2][128]
  int* win_s = reinterpret_cast<int*>(bias_s + 2 * 128);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
  const BlockPlan bp = block_plan(f);  // G = 1
  const int64_t bh = bp.bh[0];
  const int len = bp.len[0], i0 = bp.i0;
  const int iw = i0 + warp * 16;
  const bool cut = f.cutoff > 0.f && f.sigma != nullptr;
  const float* sigma_bh = f.sigma != nullptr ? f.sigma + bh * f.L : nullptr;
  const bool active = iw < len;

  int kmin = 0, kmax = len, wkmin = 0, wkmax = len, Wb = i0 < len ? f.L : -1;
  if (cut) {
    const int W = active ? warp_window(sigma_bh, f.cutoff, iw, len, f.L) : -1;
    if (lane == 0) win_s[warp] = W;
    __syncthreads();
    Wb = -1;
    for (int w = 0; w < kWarps; ++w) Wb = max(Wb, win_s[w]);
    kmin = max(0, i0 - Wb);
    kmax = Wb < 0 ? 0 : min(len, i0 + min(BM, len - i0) + Wb);
    wkmin = max(0, iw - W);
    wkmax = W < 0 ? 0 : min(len, min(iw + 16, len) + W);
  }
  if (threadIdx.x == 0) p.block_window[blockIdx.x] = Wb;  // read by the dkdv kernel
  const int ntiles = kmax > kmin ? ceil_div(kmax - kmin, BN) : 0;

  int q0[4] = {i0, 0, 0, 0}, qn[4] = {len, 0, 0, 0};
  stage_rows<T, DT>(Qs, f.q, bp, q0, qn, f.H, f.D, vec);
  stage_rows<T, DT>(dOs, p.grad_out, bp, q0, qn, f.H, f.D, vec);
  tc::cp_async_commit();

  RowWindow rw[2];
  float lse[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = iw + g + 8 * h;
    const bool valid = active && i < len;
    rw[h] = wattn::row_window(sigma_bh, f.cutoff, cut, i, valid);
    lse[h] = valid ? f.lse[bh * f.L + i] : 0.f;
  }
  float dq[DT / 8][4];
#pragma unroll
  for (int n = 0; n < DT / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
  float delta[2] = {0.f, 0.f}, dsig[2] = {0.f, 0.f};

  // Two passes over the key tiles (delta, then dS), each double-buffered: tile t + 1 loads while
  // tile t is used. Step s of the 2 * ntiles steps works on tile s % ntiles.
  const int kn[4] = {kmax, 0, 0, 0};
  auto stage_tile = [&](int step, int buf) {
    int k0[4] = {kmin + (step % ntiles) * BN, 0, 0, 0};
    stage_rows<T, DT>(Ks + buf * TILE, f.k, bp, k0, kn, f.H, f.D, vec);
    stage_rows<T, DT>(Vs + buf * TILE, f.v, bp, k0, kn, f.H, f.D, vec);
  };
  if (ntiles > 0) stage_tile(0, 0);
  tc::cp_async_commit();
  for (int step = 0; step < 2 * ntiles; ++step) {
    const int buf = step % 2, tile = step % ntiles;
    const int j0 = kmin + tile * BN;
    __syncthreads();
    if (step + 1 < 2 * ntiles) stage_tile(step + 1, 1 - buf);
    tc::cp_async_commit();
    if (f.rel_bias != nullptr) {
      stage_bias(bias_s + buf * 128, f.rel_bias + (bh % f.H) * (2 * f.R + 1), f.R, j0 - i0 - (BM - 1), threadIdx.x,
                 kThreads);
    }
    tc::cp_async_wait<1>();
    __syncthreads();
    if (step == ntiles) {  // delta complete: the row sums of the whole window
      delta[0] = quad_sum(delta[0]);
      delta[1] = quad_sum(delta[1]);
      // A poisoned row is not valid in the second pass: P = dS = 0, its dq and d sigma are 0.
      rw[0].valid = rw[0].valid && wattn::row_is_live(lse[0], delta[0]);
      rw[1].valid = rw[1].valid && wattn::row_is_live(lse[1], delta[1]);
    }
    if (!active || (cut && (j0 >= wkmax || j0 + BN <= wkmin))) continue;
    TileGeometry geo;
    geo.kend = kmax;
    geo.cut = cut;
    geo.scale = f.scale;
    geo.bias_t = f.rel_bias != nullptr ? bias_s + buf * 128 : nullptr;
    geo.dmin = j0 - i0 - (BM - 1);
    float pr[BN / 8][4], dp[BN / 8][4];
    warp_probs<T, DT>(pr, dp, Qs, dOs, warp * 16, Ks + buf * TILE, Vs + buf * TILE, 0, BN, iw, j0, rw, lse, geo);
    if (step < ntiles) {
      add_delta(delta, pr, dp);
    } else {
      rows_grad<T, DT>(dq, dsig, pr, dp, delta, Ks + buf * TILE, 0, BN, iw, j0);
    }
  }
  tc::cp_async_wait<0>();
  if (ntiles == 0) delta[0] = delta[1] = 0.f;
  dsig[0] = quad_sum(dsig[0]);
  dsig[1] = quad_sum(dsig[1]);
  store_rows<T, DT>(p, bh, iw, 16, dq, dsig, rw);
  if (lane % 4 == 0) {
    // delta is exactly 0 for rows that are not valid (P = 0 there); a poisoned row keeps its
    // non-finite delta, so that the dkdv kernel sees it poisoned too.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = iw + g + 8 * h;
      if (i < f.L) p.delta[bh * f.L + i] = delta[h];
    }
  }
}

template <int DT>
constexpr size_t dkdv_smem_bytes() {
  // K, V tiles; two Q and two dO tiles; fp32 dS^T tile; two sets of row arrays; bias diagonals and
  // diagonal sums of one tile
  return 2 * 6 * Smem<DT>::TILE + sizeof(float) * (BM * kDsLd + 2 * kRowArrayFloats + 2 * 128);
}

template <typename T, int DT>
__global__ void __launch_bounds__(kThreads) window_attn_tc_bwd_dkdv_kernel(const WindowAttnBwdParams p, bool vec) {
  constexpr int TILE = Smem<DT>::TILE;
  const WindowAttnFwdParams& f = p.fwd;
  T* Ks = reinterpret_cast<T*>(dynamic_smem());
  T* Vs = Ks + TILE;
  T* Qs = Vs + TILE;    // two buffers
  T* dOs = Qs + 2 * TILE;  // two buffers
  float* dsf = reinterpret_cast<float*>(dOs + 2 * TILE);
  float* rows_base = dsf + BM * kDsLd;  // two sets of row arrays
  float* bias_s = rows_base + 2 * kRowArrayFloats;
  float* diag_s = bias_s + 128;

  const int warp = threadIdx.x / 32;
  const BlockPlan bp = block_plan(f);  // G = 1: this block owns keys [j0, j0 + 64) of sequence bh
  const int64_t bh = bp.bh[0];
  const int len = bp.len[0], j0 = bp.i0;
  const int nqb = ceil_div(f.L, BM);
  const int jw = j0 + warp * 16;
  const bool cut = f.cutoff > 0.f && f.sigma != nullptr;
  const int Rp = reach_of(f.R, f.L);
  const int ntab = 2 * Rp + 1;
  float* part = p.bias_partial != nullptr ? p.bias_partial + static_cast<int64_t>(blockIdx.x) * ntab : nullptr;
  if (part != nullptr) {
    for (int x = threadIdx.x; x < ntab; x += kThreads) part[x] = 0.f;
  }

  // The query blocks whose window reaches this block's keys (the same decision in every thread).
  const int ncols = min(BN, len - j0);  // <= 0: no valid key
  auto reaches = [&](int ib) {
    if (ncols <= 0 || ib * BM >= len) return false;
    const int W = p.block_window[bh * nqb + ib];
    if (W < 0) return false;
    const int i0 = ib * BM, nrows = min(BM, len - i0);
    return !(cut && (i0 - W > j0 + ncols - 1 || i0 + nrows - 1 + W < j0));
  };
  int kv0[4] = {j0, 0, 0, 0}, kvn[4] = {len, 0, 0, 0};
  stage_rows<T, DT>(Ks, f.k, bp, kv0, kvn, f.H, f.D, vec);
  stage_rows<T, DT>(Vs, f.v, bp, kv0, kvn, f.H, f.D, vec);
  tc::cp_async_commit();

  float dk[DT / 8][4], dv[DT / 8][4];
#pragma unroll
  for (int n = 0; n < DT / 8; ++n) dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.f;

  const int qn[4] = {len, 0, 0, 0};
  auto stage_queries = [&](int ib, int buf) {
    int q0[4] = {ib * BM, 0, 0, 0};
    stage_rows<T, DT>(Qs + buf * TILE, f.q, bp, q0, qn, f.H, f.D, vec);
    stage_rows<T, DT>(dOs + buf * TILE, p.grad_out, bp, q0, qn, f.H, f.D, vec);
  };
  int ib = 0;
  while (ib < nqb && !reaches(ib)) ++ib;
  if (ib < nqb) stage_queries(ib, 0);
  tc::cp_async_commit();
  for (int buf = 0; ib < nqb; buf ^= 1) {
    int next = ib + 1;
    while (next < nqb && !reaches(next)) ++next;
    __syncthreads();  // every warp is done with buffer 1 - buf, the bias diagonals and dsf
    if (next < nqb) stage_queries(next, 1 - buf);
    tc::cp_async_commit();
    const int i0 = ib * BM;
    const RowArrays ra = row_arrays(rows_base + buf * kRowArrayFloats);
    stage_row_arrays(ra, p, bp, i0, cut);
    const int dmin = j0 - i0 - (BM - 1);
    if (f.rel_bias != nullptr) {
      stage_bias(bias_s, f.rel_bias + (bh % f.H) * (2 * f.R + 1), f.R, dmin, threadIdx.x, kThreads);
    }
    if (part != nullptr) {
      for (int x = threadIdx.x; x < BM * kDsLd; x += kThreads) dsf[x] = 0.f;
    }
    tc::cp_async_wait<1>();
    __syncthreads();
    if (jw < len) {
      TileGeometry geo;
      geo.kend = len;
      geo.cut = cut;
      geo.scale = f.scale;
      geo.bias_t = f.rel_bias != nullptr ? bias_s : nullptr;
      geo.dmin = dmin;
      keys_step<T, DT>(dk, dv, Qs + buf * TILE, dOs + buf * TILE, 0, BN, Ks, Vs, warp * 16, jw, i0, ra, geo, dsf,
                       warp * 16);
    }
    if (part != nullptr) {
      __syncthreads();
      float* parts[4] = {part, nullptr, nullptr, nullptr};
      // key r, query c: offset j - i = (j0 + r) - (i0 + c) = dmin + (r - c + BM - 1)
      add_bias_diagonals(dsf, diag_s, parts, bp, BN, Rp, dmin);
    }
    ib = next;
  }
  tc::cp_async_wait<0>();
  store_keys<T, DT>(p, bh, jw, 16, len, dk, dv);
}

// --- launchers -----------------------------------------------------------------------------------------

template <typename T, int DT>
cudaError_t launch_tc_bwd(const WindowAttnBwdParams& p, cudaStream_t stream) {
  const WindowAttnFwdParams& f = p.fwd;
  const bool vec = vec16_ok(f.q, f.D) && vec16_ok(f.k, f.D) && vec16_ok(f.v, f.D) && vec16_ok(p.grad_out, f.D);
  const int64_t blocks = num_blocks(f.B, f.H, f.L);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaError_t err;
  if (f.L <= BM) {
    constexpr size_t smem = short_smem_bytes<DT>();
    auto kernel = window_attn_tc_bwd_short_kernel<T, DT>;
    if ((err = prepare_smem(kernel, smem)) != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p, vec);
  } else {
    constexpr size_t dq_smem = dq_smem_bytes<DT>();
    auto dq_kernel = window_attn_tc_bwd_dq_kernel<T, DT>;
    if ((err = prepare_smem(dq_kernel, dq_smem)) != cudaSuccess) return err;
    dq_kernel<<<static_cast<unsigned>(blocks), kThreads, dq_smem, stream>>>(p, vec);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    constexpr size_t dkdv_smem = dkdv_smem_bytes<DT>();
    auto dkdv_kernel = window_attn_tc_bwd_dkdv_kernel<T, DT>;
    if ((err = prepare_smem(dkdv_kernel, dkdv_smem)) != cudaSuccess) return err;
    dkdv_kernel<<<static_cast<unsigned>(blocks), kThreads, dkdv_smem, stream>>>(p, vec);  // BN == BM
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (p.grad_rel_bias != nullptr) {
    // Partial tables: one per (sequence, 64-row block), as the SIMT kernels lay them out.
    return wattn::launch_bias_reduce(p.bias_partial, p.grad_rel_bias, f.B, f.H, ceil_div(f.L, BM), f.R, f.L, stream);
  }
  return cudaSuccess;
}

}  // namespace wattn_tc

cudaError_t window_attn_tc_bwd(const WindowAttnBwdParams& p, cudaStream_t stream) {
  const WindowAttnFwdParams& f = p.fwd;
  if (!window_attn_tc_supported(f)) return cudaErrorInvalidValue;
  return wattn_tc::dispatch_dtype_and_tile(f.dtype, f.D, [&](auto type, auto tile) {
    return wattn_tc::launch_tc_bwd<typename decltype(type)::type, decltype(tile)::value>(p, stream);
  });
}

}  // namespace kdc
