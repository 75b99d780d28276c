// windowed_attention backward. With P = exp(logit - LSE) recomputed from the saved LSE and
// dS = P * (dP - delta), dP = dO V^T, delta_i = rowsum(dO_i * O_i):
//
//   dV = P^T dO      dK = scale * dS^T Q      dQ = scale * dS K
//   d sigma[b, h, i] = sum_j dS[i, j] (i - j)^2 / sigma_i^3
//   d rel_bias[h, r] = sum over (b, i, j) with clamp(j - i, -R, R) = r of dS[i, j]
//
// These are the fp32 SIMT kernels (fp32 inputs, D > 128, or KDC_CUDA_NO_TENSOR_CORES=1); bf16 /
// fp16 with D <= 128 go to windowed_attention_tc_bwd.cu. Four kernels, no floating-point atomics
// anywhere (so results are bitwise reproducible):
//   1. prep:  delta for every row, and the window half-width of every query block;
//   2. dq:    one block per (b, h, query block) loops over its key window: dQ, d sigma (row sums
//             held by the row's threads) and the block's partial bias table (diagonal sums of
//             each dS tile, added by one thread per table entry, in a fixed order);
//   3. dkdv:  one block per (b, h, key block) loops over the query blocks whose window reaches it;
//   4. bias:  sums the partial tables over (b, query block) in a fixed order.
// For L <= BM one block owns a whole (b, h) sequence in kernels 2 and 3. A valid row whose LSE or
// delta is not finite (a NaN / inf key or value inside its window: see row_is_live in tile.cuh)
// is treated as not valid by kernels 2 and 3, so it adds nothing to any gradient.
#include "windowed_attention/tile.cuh"

namespace kdc {
namespace wattn {

// Partial bias tables hold offsets [-Rp, Rp] with Rp = min(R, L - 1): no pair (i, j) reaches
// further, and entries of rel_bias beyond that get a zero gradient.
__host__ __device__ inline int reach(int R, int L) { return R < L - 1 ? R : L - 1; }

template <int BM, int BN, int DT>
constexpr size_t dq_smem_bytes() {
  using C = Tile<BM, BN, DT>;
  // Q, dO, K, V tiles; dS tile; bias diagonals and diagonal sums
  return sizeof(float) * ((2 * BM + 2 * BN) * C::LDD + BM * C::LDS + 2 * (BM + BN));
}

template <int BM, int BN, int DT>
constexpr size_t dkdv_smem_bytes() {
  using C = Tile<BM, BN, DT>;
  // K, V, Q, dO tiles; P and dS tiles; bias diagonals
  return sizeof(float) * ((2 * BM + 2 * BN) * C::LDD + 2 * BM * C::LDS + (BM + BN));
}

// --- 1. prep -------------------------------------------------------------------------------------

template <typename T, int BM>
__global__ void __launch_bounds__(kThreads) window_attn_bwd_prep_kernel(const WindowAttnBwdParams p) {
  __shared__ int scratch[kThreads / 32];
  const WindowAttnFwdParams& f = p.fwd;
  const BlockCoords bc = block_coords(f, BM);
  const int64_t bh = bc.bh;
  const int i0 = bc.start;
  const int nrows = min(BM, bc.len - i0);  // <= 0: a block of padded rows only

  const T* go = head_slice<T>(p.grad_out, bc);
  const T* out = static_cast<const T*>(f.out) + bh * f.L * f.D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < BM && i0 + r < f.L; r += kThreads / 32) {
    const int i = i0 + r;
    float acc = 0.f;
    if (r < nrows) {
      for (int d = lane; d < f.D; d += 32) {
        acc = fmaf(load_f32(go, static_cast<int64_t>(i) * p.grad_out.stride[2] + d * p.grad_out.stride[3]),
                   load_f32(out, static_cast<int64_t>(i) * f.D + d), acc);
      }
    }
    acc = group_sum<32>(acc);
    if (lane == 0) p.delta[bh * f.L + i] = acc;
  }

  int W = -1;  // no valid row: the block is skipped by the other kernels
  if (nrows > 0) {
    const bool cut = f.cutoff > 0.f && f.sigma != nullptr;
    W = cut ? block_window(f.sigma + bh * f.L, f.cutoff, i0, nrows, f.L, scratch) : f.L;
  }
  if (threadIdx.x == 0) p.block_window[blockIdx.x] = W;
}

// --- 2. dq, d sigma, partial bias tables ---------------------------------------------------------

template <typename T, int BM, int BN, int DT>
__global__ void __launch_bounds__(kThreads) window_attn_bwd_dq_kernel(const WindowAttnBwdParams p) {
  using C = Tile<BM, BN, DT>;
  const WindowAttnFwdParams& f = p.fwd;
  float* Qs = dynamic_smem();
  float* dOs = Qs + BM * C::LDD;
  float* Ks = dOs + BM * C::LDD;
  float* Vs = Ks + BN * C::LDD;
  float* dSs = Vs + BN * C::LDD;
  float* bias_s = dSs + BM * C::LDS;
  float* diag_s = bias_s + (BM + BN);

  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const BlockCoords bc = block_coords(f, BM);
  const int64_t bh = bc.bh;
  const int len = bc.len, i0 = bc.start;
  const int Rp = reach(f.R, f.L);
  float* part = p.bias_partial != nullptr ? p.bias_partial + static_cast<int64_t>(blockIdx.x) * (2 * Rp + 1) : nullptr;
  T* dq_out = static_cast<T*>(p.grad_q) + bh * f.L * f.D;
  float* dsig_out = p.grad_sigma != nullptr ? p.grad_sigma + bh * f.L : nullptr;

  if (part != nullptr) zero_floats(part, 2 * Rp + 1);  // visible to every thread after the first barrier
  if (i0 >= len) {
    const int i1 = min(i0 + BM, f.L);
    zero_rows(dq_out, i0, i1, f.D);
    if (dsig_out != nullptr) zero_floats(dsig_out + i0, i1 - i0);
    return;
  }
  const int nrows = min(BM, len - i0);
  const bool cut = f.cutoff > 0.f && f.sigma != nullptr;
  const float* sigma_bh = f.sigma != nullptr ? f.sigma + bh * f.L : nullptr;
  const int W = p.block_window[blockIdx.x];
  const int kmin = cut ? max(0, i0 - W) : 0;
  const int kmax = cut ? min(len, i0 + nrows + W) : len;

  BwdRow rows[C::RM];
#pragma unroll
  for (int a = 0; a < C::RM; ++a) rows[a] = bwd_row(p, bh, i0 + ty + 16 * a, ty + 16 * a < nrows, cut);
  const float* bias_h = f.rel_bias != nullptr ? f.rel_bias + static_cast<int64_t>(bc.h) * (2 * f.R + 1) : nullptr;
  const T* qb = head_slice<T>(f.q, bc);
  const T* kb = head_slice<T>(f.k, bc);
  const T* vb = head_slice<T>(f.v, bc);
  const T* gb = head_slice<T>(p.grad_out, bc);
  load_tile<T, BM, DT>(Qs, qb, f.q.stride[2], f.q.stride[3], i0, nrows, f.D);
  load_tile<T, BM, DT>(dOs, gb, p.grad_out.stride[2], p.grad_out.stride[3], i0, nrows, f.D);

  float dq[C::RM][C::RD], dsig[C::RM];
#pragma unroll
  for (int a = 0; a < C::RM; ++a) {
    dsig[a] = 0.f;
#pragma unroll
    for (int d = 0; d < C::RD; ++d) dq[a][d] = 0.f;
  }

  for (int j0 = kmin; j0 < kmax; j0 += BN) {
    const int ncols = min(BN, kmax - j0);
    __syncthreads();  // the previous block's K, V, dS and diagonal sums are no longer read
    const bool k_bad = load_tile<T, BN, DT>(Ks, kb, f.k.stride[2], f.k.stride[3], j0, ncols, f.D);
    load_tile<T, BN, DT>(Vs, vb, f.v.stride[2], f.v.stride[3], j0, ncols, f.D);
    load_bias_diagonals<BM, BN>(bias_s, bias_h, f.R, j0 - i0);
    const bool k_nonfinite = __syncthreads_or(k_bad);

    float s[C::RM][C::RN], dp[C::RM][C::RN];
    dot_rows<C::RM, C::RN, DT>(Qs, Ks, s, ty, tx);
    dot_rows<C::RM, C::RN, DT>(dOs, Vs, dp, ty, tx);
#pragma unroll
    for (int a = 0; a < C::RM; ++a) {
      const int r = ty + 16 * a;
      float row_dsig = 0.f;
#pragma unroll
      for (int c = 0; c < C::RN; ++c) {
        const int col = tx + 16 * c;
        const float bias = bias_h != nullptr ? bias_s[col - r + BM - 1] : 0.f;
        float pv, ds;
        prob_and_grad(s[a][c], dp[a][c], i0 + r, j0 + col, rows[a], kmax, cut, f.scale, bias, pv, ds);
        dSs[r * C::LDS + col] = ds;
        const float dist = static_cast<float>(r - col + (i0 - j0));
        row_dsig = fmaf(ds, dist * dist, row_dsig);  // ds = 0 for excluded keys, never NaN
      }
      if (dsig_out != nullptr) dsig[a] += group_sum<16>(row_dsig);
    }
    __syncthreads();

    if (!k_nonfinite) {
#pragma unroll 4
      for (int jj = 0; jj < BN; ++jj) {
        float kv[C::RD];
#pragma unroll
        for (int d = 0; d < C::RD; ++d) kv[d] = Ks[jj * C::LDD + tx + 16 * d];
#pragma unroll
        for (int a = 0; a < C::RM; ++a) {
          const float dsa = dSs[(ty + 16 * a) * C::LDS + jj];
#pragma unroll
          for (int d = 0; d < C::RD; ++d) dq[a][d] = fmaf(dsa, kv[d], dq[a][d]);
        }
      }
    } else {  // a NaN / inf key row: excluded pairs (dS = 0) must not turn it into a NaN
      for (int jj = 0; jj < BN; ++jj) {
#pragma unroll
        for (int a = 0; a < C::RM; ++a) {
          const float dsa = dSs[(ty + 16 * a) * C::LDS + jj];
#pragma unroll
          for (int d = 0; d < C::RD; ++d) dq[a][d] = fma_nonzero(dsa, Ks[jj * C::LDD + tx + 16 * d], dq[a][d]);
        }
      }
    }

    if (part != nullptr) {
      // Diagonal t of the tile holds the elements with col - row = t - (BM - 1).
      for (int t = tid; t < BM + BN - 1; t += kThreads) {
        const int r_lo = max(0, BM - 1 - t), r_hi = min(BM - 1, BM + BN - 2 - t);
        float sum = 0.f;
        for (int r = r_lo; r <= r_hi; ++r) sum += dSs[r * C::LDS + r + t - (BM - 1)];
        diag_s[t] = sum;
      }
      __syncthreads();
      // Diagonal t has offset j - i = o_lo + t; table entry e collects the diagonals with
      // clamp(offset, -Rp, Rp) = e (one, or a run of them at the two clamped ends).
      const int o_lo = j0 - i0 - (BM - 1);
      const int e_lo = min(max(o_lo, -Rp), Rp), e_hi = min(max(o_lo + BM + BN - 2, -Rp), Rp);
      for (int e = e_lo + tid; e <= e_hi; e += kThreads) {
        const int t_first = max(e == -Rp ? 0 : e - o_lo, 0);
        const int t_last = min(e == Rp ? BM + BN - 2 : e - o_lo, BM + BN - 2);
        float sum = 0.f;
        for (int t = t_first; t <= t_last; ++t) sum += diag_s[t];
        part[e + Rp] += sum;
      }
    }
  }

#pragma unroll
  for (int a = 0; a < C::RM; ++a) {
    const int i = i0 + ty + 16 * a;
    if (i >= f.L) continue;
    const bool valid = rows[a].w.valid;
#pragma unroll
    for (int d = 0; d < C::RD; ++d) {
      const int col = tx + 16 * d;
      if (col < f.D) dq_out[static_cast<int64_t>(i) * f.D + col] = from_f32<T>(valid ? f.scale * dq[a][d] : 0.f);
    }
    if (dsig_out != nullptr && tx == 0) {
      dsig_out[i] = valid ? sigma_grad(dsig[a], sigma_bh[i]) : 0.f;
    }
  }
}

// --- 3. dk, dv -----------------------------------------------------------------------------------

template <typename T, int BM, int BN, int DT>
__global__ void __launch_bounds__(kThreads) window_attn_bwd_dkdv_kernel(const WindowAttnBwdParams p) {
  using C = Tile<BM, BN, DT>;
  const WindowAttnFwdParams& f = p.fwd;
  float* Ks = dynamic_smem();
  float* Vs = Ks + BN * C::LDD;
  float* Qs = Vs + BN * C::LDD;
  float* dOs = Qs + BM * C::LDD;
  float* Ps = dOs + BM * C::LDD;
  float* dSs = Ps + BM * C::LDS;
  float* bias_s = dSs + BM * C::LDS;

  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int nqb = ceil_div(f.L, BM);
  const BlockCoords bc = block_coords(f, BN);  // this block owns key rows
  const int64_t bh = bc.bh;
  const int len = bc.len, j0 = bc.start;
  T* dk_out = static_cast<T*>(p.grad_k) + bh * f.L * f.D;
  T* dv_out = static_cast<T*>(p.grad_v) + bh * f.L * f.D;
  if (j0 >= len) {
    const int j1 = min(j0 + BN, f.L);
    zero_rows(dk_out, j0, j1, f.D);
    zero_rows(dv_out, j0, j1, f.D);
    return;
  }
  const int ncols = min(BN, len - j0);
  const bool cut = f.cutoff > 0.f && f.sigma != nullptr;
  const float* bias_h = f.rel_bias != nullptr ? f.rel_bias + static_cast<int64_t>(bc.h) * (2 * f.R + 1) : nullptr;
  const T* qb = head_slice<T>(f.q, bc);
  const T* kb = head_slice<T>(f.k, bc);
  const T* vb = head_slice<T>(f.v, bc);
  const T* gb = head_slice<T>(p.grad_out, bc);
  load_tile<T, BN, DT>(Ks, kb, f.k.stride[2], f.k.stride[3], j0, ncols, f.D);
  load_tile<T, BN, DT>(Vs, vb, f.v.stride[2], f.v.stride[3], j0, ncols, f.D);

  // Accumulators of the key rows ty + 16a of this block.
  float dk[C::RN][C::RD], dv[C::RN][C::RD];
#pragma unroll
  for (int a = 0; a < C::RN; ++a)
#pragma unroll
    for (int d = 0; d < C::RD; ++d) dk[a][d] = dv[a][d] = 0.f;

  for (int ib = 0; ib < nqb; ++ib) {
    const int i0 = ib * BM;
    if (i0 >= len) break;
    const int nrows = min(BM, len - i0);
    if (cut) {  // same decision in every thread: skip query blocks whose window misses these keys
      const int W = p.block_window[bh * nqb + ib];
      if (i0 - W > j0 + ncols - 1 || i0 + nrows - 1 + W < j0) continue;
    }
    __syncthreads();  // the previous query block's tiles are no longer read
    load_tile<T, BM, DT>(Qs, qb, f.q.stride[2], f.q.stride[3], i0, nrows, f.D);
    load_tile<T, BM, DT>(dOs, gb, p.grad_out.stride[2], p.grad_out.stride[3], i0, nrows, f.D);
    load_bias_diagonals<BM, BN>(bias_s, bias_h, f.R, j0 - i0);
    BwdRow rows[C::RM];
#pragma unroll
    for (int a = 0; a < C::RM; ++a) rows[a] = bwd_row(p, bh, i0 + ty + 16 * a, ty + 16 * a < nrows, cut);
    __syncthreads();

    float s[C::RM][C::RN], dp[C::RM][C::RN];
    dot_rows<C::RM, C::RN, DT>(Qs, Ks, s, ty, tx);
    dot_rows<C::RM, C::RN, DT>(dOs, Vs, dp, ty, tx);
#pragma unroll
    for (int a = 0; a < C::RM; ++a) {
      const int r = ty + 16 * a;
#pragma unroll
      for (int c = 0; c < C::RN; ++c) {
        const int col = tx + 16 * c;
        const float bias = bias_h != nullptr ? bias_s[col - r + BM - 1] : 0.f;
        prob_and_grad(s[a][c], dp[a][c], i0 + r, j0 + col, rows[a], len, cut, f.scale, bias, Ps[r * C::LDS + col],
                      dSs[r * C::LDS + col]);
      }
    }
    __syncthreads();

#pragma unroll 2
    for (int r = 0; r < BM; ++r) {
      float qv[C::RD], gv[C::RD];
#pragma unroll
      for (int d = 0; d < C::RD; ++d) {
        qv[d] = Qs[r * C::LDD + tx + 16 * d];
        gv[d] = dOs[r * C::LDD + tx + 16 * d];
      }
#pragma unroll
      for (int a = 0; a < C::RN; ++a) {
        const float pa = Ps[r * C::LDS + ty + 16 * a];
        const float dsa = dSs[r * C::LDS + ty + 16 * a];
#pragma unroll
        for (int d = 0; d < C::RD; ++d) {
          dv[a][d] = fmaf(pa, gv[d], dv[a][d]);
          dk[a][d] = fmaf(dsa, qv[d], dk[a][d]);
        }
      }
    }
  }

#pragma unroll
  for (int a = 0; a < C::RN; ++a) {
    const int j = j0 + ty + 16 * a;
    if (j >= f.L) continue;
    const bool valid = j < len;
#pragma unroll
    for (int d = 0; d < C::RD; ++d) {
      const int col = tx + 16 * d;
      if (col >= f.D) continue;
      dk_out[static_cast<int64_t>(j) * f.D + col] = from_f32<T>(valid ? f.scale * dk[a][d] : 0.f);
      dv_out[static_cast<int64_t>(j) * f.D + col] = from_f32<T>(valid ? dv[a][d] : 0.f);
    }
  }
}

// --- 4. bias table reduction ---------------------------------------------------------------------

// Block (32 entries x 8 groups): group y sums the partial tables y, y + 8, ... of one head, then
// the 8 group sums are added in order: a fixed summation order, so the result is reproducible.
__global__ void __launch_bounds__(256) window_attn_bias_reduce_kernel(const float* partial, float* grad_bias, int B,
                                                                     int H, int nqb, int R, int Rp) {
  __shared__ float sums[8][33];
  const int nb = 2 * R + 1, ntab = 2 * Rp + 1;
  const int chunks = ceil_div(nb, 32);
  const int h = blockIdx.x / chunks;
  const int r = (blockIdx.x % chunks) * 32 + threadIdx.x;
  const int off = r - R;
  const bool reachable = r < nb && off >= -Rp && off <= Rp;
  float sum = 0.f;
  if (reachable) {
    const int64_t tables = static_cast<int64_t>(B) * nqb;
    for (int64_t t = threadIdx.y; t < tables; t += 8) {
      const int64_t b = t / nqb, ib = t % nqb;
      sum += partial[((b * H + h) * nqb + ib) * ntab + off + Rp];
    }
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && r < nb) {
    float total = 0.f;
#pragma unroll
    for (int y = 0; y < 8; ++y) total += sums[y][threadIdx.x];
    grad_bias[static_cast<int64_t>(h) * nb + r] = total;
  }
}

cudaError_t launch_bias_reduce(const float* partial, float* grad_bias, int B, int H, int nblocks, int R, int L,
                               cudaStream_t stream) {
  const int chunks = ceil_div(2 * R + 1, 32);
  window_attn_bias_reduce_kernel<<<H * chunks, dim3(32, 8), 0, stream>>>(partial, grad_bias, B, H, nblocks, R,
                                                                        reach(R, L));
  return cudaGetLastError();
}

// --- launchers -----------------------------------------------------------------------------------

template <typename T, int DT>
cudaError_t launch_bwd(const WindowAttnBwdParams& p, cudaStream_t stream) {
  constexpr int BM = block_rows(DT), BN = BM;
  const WindowAttnFwdParams& f = p.fwd;
  const int nqb = ceil_div(f.L, BM);
  const int64_t blocks = static_cast<int64_t>(f.B) * f.H * nqb;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;

  window_attn_bwd_prep_kernel<T, BM><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  constexpr size_t dq_smem = dq_smem_bytes<BM, BN, DT>();
  auto dq_kernel = window_attn_bwd_dq_kernel<T, BM, BN, DT>;
  if ((err = prepare_smem(dq_kernel, dq_smem)) != cudaSuccess) return err;
  dq_kernel<<<static_cast<unsigned>(blocks), kThreads, dq_smem, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  constexpr size_t dkdv_smem = dkdv_smem_bytes<BM, BN, DT>();
  auto dkdv_kernel = window_attn_bwd_dkdv_kernel<T, BM, BN, DT>;
  if ((err = prepare_smem(dkdv_kernel, dkdv_smem)) != cudaSuccess) return err;
  dkdv_kernel<<<static_cast<unsigned>(blocks), kThreads, dkdv_smem, stream>>>(p);  // BN == BM
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  if (p.grad_rel_bias != nullptr) err = launch_bias_reduce(p.bias_partial, p.grad_rel_bias, f.B, f.H, nqb, f.R, f.L, stream);
  return err;
}

}  // namespace wattn

WindowAttnWorkspace window_attn_bwd_workspace(int B, int H, int L, int D, int R, bool has_bias) {
  const int BM = wattn::block_rows(wattn::head_tile(D));
  const int64_t tables = static_cast<int64_t>(B) * H * ceil_div(L, BM);
  WindowAttnWorkspace ws;
  ws.delta = static_cast<int64_t>(B) * H * L;
  ws.block_window = tables;
  ws.bias_partial = has_bias ? tables * (2 * wattn::reach(R, L) + 1) : 0;
  return ws;
}

cudaError_t window_attn_bwd(const WindowAttnBwdParams& p, cudaStream_t stream) {
  const WindowAttnFwdParams& f = p.fwd;
  if (f.B < 1 || f.H < 1 || f.L < 1 || f.D < 1 || f.D > kWindowAttnMaxD || f.R < 0) return cudaErrorInvalidValue;
  if (f.cutoff > 0.f && f.sigma == nullptr) return cudaErrorInvalidValue;
  if (p.delta == nullptr || p.block_window == nullptr) return cudaErrorInvalidValue;
  if ((p.grad_rel_bias != nullptr) != (f.rel_bias != nullptr && p.bias_partial != nullptr)) return cudaErrorInvalidValue;
  if (p.grad_sigma != nullptr && f.sigma == nullptr) return cudaErrorInvalidValue;
  if (f.R > (0x7fffffff - 1) / 2) return cudaErrorInvalidValue;
  if (f.tensor_cores && window_attn_tc_supported(f)) return window_attn_tc_bwd(p, stream);
  KDC_DISPATCH_DTYPE(f.dtype, {
    switch (wattn::head_tile(f.D)) {
      case 32: return wattn::launch_bwd<scalar_t, 32>(p, stream);
      case 64: return wattn::launch_bwd<scalar_t, 64>(p, stream);
      case 128: return wattn::launch_bwd<scalar_t, 128>(p, stream);
      default: return wattn::launch_bwd<scalar_t, 256>(p, stream);
    }
  });
  return cudaErrorInvalidValue;
}

}  // namespace kdc
