// windowed_attention forward: one block per (b, h, query block of BM rows), FlashAttention-style
// online softmax over the key blocks of the block's window, fp32 accumulation, LSE saved for the
// backward. For L <= BM a block owns a whole (b, h) sequence: Q, K and V are read once.
//
//   logit[i, j] = scale * <q_i, k_j> + rel_bias[h, clamp(j - i, -R, R) + R]
//                 - (i - j)^2 / (2 * sigma[b, h, i]^2)
//   out[i] = sum_j softmax_j(logit[i, :]) v_j   (i < lengths[b]; padded rows are 0, LSE 0)
#include "windowed_attention/tile.cuh"

namespace kdc {
namespace wattn {

template <int BM, int BN, int DT>
constexpr size_t fwd_smem_bytes() {
  using C = Tile<BM, BN, DT>;
  // Q, K, V tiles, P tile, bias diagonals, 8 ints of scratch
  return sizeof(float) * ((BM + 2 * BN) * C::LDD + BM * C::LDS + (BM + BN) + 8);
}

template <typename T, int BM, int BN, int DT>
__global__ void __launch_bounds__(kThreads) window_attn_fwd_kernel(const WindowAttnFwdParams p) {
  using C = Tile<BM, BN, DT>;
  float* Qs = dynamic_smem();
  float* Ks = Qs + BM * C::LDD;
  float* Vs = Ks + BN * C::LDD;
  float* Ps = Vs + BN * C::LDD;
  float* bias_s = Ps + BM * C::LDS;
  int* scratch = reinterpret_cast<int*>(bias_s + BM + BN);

  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const BlockCoords bc = block_coords(p, BM);
  const int64_t bh = bc.bh;
  const int len = bc.len, i0 = bc.start;
  T* out = static_cast<T*>(p.out) + bh * p.L * p.D;
  float* lse = p.lse + bh * p.L;

  if (i0 >= len) {  // only padded query rows: zeros, finite LSE
    const int i1 = min(i0 + BM, p.L);
    zero_rows(out, i0, i1, p.D);
    zero_floats(lse + i0, i1 - i0);
    return;
  }
  const int nrows = min(BM, len - i0);
  const bool cut = p.cutoff > 0.f && p.sigma != nullptr;
  const float* sigma_bh = p.sigma != nullptr ? p.sigma + bh * p.L : nullptr;
  const int W = cut ? block_window(sigma_bh, p.cutoff, i0, nrows, p.L, scratch) : p.L;
  const int kmin = cut ? max(0, i0 - W) : 0;
  const int kmax = cut ? min(len, i0 + nrows + W) : len;

  RowWindow rw[C::RM];
#pragma unroll
  for (int a = 0; a < C::RM; ++a) {
    const int r = ty + 16 * a;
    rw[a] = row_window(sigma_bh, p.cutoff, cut, i0 + r, r < nrows);
  }
  const float* bias_h = p.rel_bias != nullptr ? p.rel_bias + static_cast<int64_t>(bc.h) * (2 * p.R + 1) : nullptr;
  const T* qb = head_slice<T>(p.q, bc);
  const T* kb = head_slice<T>(p.k, bc);
  const T* vb = head_slice<T>(p.v, bc);
  load_tile<T, BM, DT>(Qs, qb, p.q.stride[2], p.q.stride[3], i0, nrows, p.D);

  float m[C::RM], l[C::RM], o[C::RM][C::RD];
#pragma unroll
  for (int a = 0; a < C::RM; ++a) {
    m[a] = -INFINITY;
    l[a] = 0.f;
#pragma unroll
    for (int d = 0; d < C::RD; ++d) o[a][d] = 0.f;
  }

  for (int j0 = kmin; j0 < kmax; j0 += BN) {
    const int ncols = min(BN, kmax - j0);
    __syncthreads();  // the previous block's K, V and P are no longer read
    load_tile<T, BN, DT>(Ks, kb, p.k.stride[2], p.k.stride[3], j0, ncols, p.D);
    const bool v_bad = load_tile<T, BN, DT>(Vs, vb, p.v.stride[2], p.v.stride[3], j0, ncols, p.D);
    load_bias_diagonals<BM, BN>(bias_s, bias_h, p.R, j0 - i0);
    const bool v_nonfinite = __syncthreads_or(v_bad);

    float s[C::RM][C::RN];
    dot_rows<C::RM, C::RN, DT>(Qs, Ks, s, ty, tx);
#pragma unroll
    for (int a = 0; a < C::RM; ++a) {
      const int r = ty + 16 * a;
      float mx = -INFINITY;
#pragma unroll
      for (int c = 0; c < C::RN; ++c) {
        const int col = tx + 16 * c;
        const float bias = bias_h != nullptr ? bias_s[col - r + BM - 1] : 0.f;
        s[a][c] = masked_logit(s[a][c], i0 + r, j0 + col, rw[a], kmax, cut, p.scale, bias);
        mx = fmaxf(mx, s[a][c]);
      }
      mx = group_max<16>(mx);
      const float m_new = fmaxf(m[a], mx);
      // A row with no key yet keeps m = -inf; exponentiate against 0 so no -inf - -inf NaN appears.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = expf(m[a] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < C::RN; ++c) {
        const float pv = expf(s[a][c] - m_use);
        Ps[r * C::LDS + tx + 16 * c] = pv;
        sum += pv;
      }
      sum = group_sum<16>(sum);
      l[a] = l[a] * alpha + sum;
      m[a] = m_new;
#pragma unroll
      for (int d = 0; d < C::RD; ++d) o[a][d] *= alpha;
    }
    __syncthreads();

    if (!v_nonfinite) {
#pragma unroll 4
      for (int jj = 0; jj < BN; ++jj) {
        float vv[C::RD];
#pragma unroll
        for (int d = 0; d < C::RD; ++d) vv[d] = Vs[jj * C::LDD + tx + 16 * d];
#pragma unroll
        for (int a = 0; a < C::RM; ++a) {
          const float pa = Ps[(ty + 16 * a) * C::LDS + jj];
#pragma unroll
          for (int d = 0; d < C::RD; ++d) o[a][d] = fmaf(pa, vv[d], o[a][d]);
        }
      }
    } else {  // a NaN / inf value row: excluded pairs (P = 0) must not turn it into a NaN
      for (int jj = 0; jj < BN; ++jj) {
#pragma unroll
        for (int a = 0; a < C::RM; ++a) {
          const float pa = Ps[(ty + 16 * a) * C::LDS + jj];
#pragma unroll
          for (int d = 0; d < C::RD; ++d) o[a][d] = fma_nonzero(pa, Vs[jj * C::LDD + tx + 16 * d], o[a][d]);
        }
      }
    }
  }

#pragma unroll
  for (int a = 0; a < C::RM; ++a) {
    const int i = i0 + ty + 16 * a;
    if (i >= p.L) continue;
    const bool valid = rw[a].valid;  // key j = i is always in the window, so l >= 1 here
    const float inv_l = valid ? 1.f / l[a] : 0.f;
#pragma unroll
    for (int d = 0; d < C::RD; ++d) {
      const int col = tx + 16 * d;
      if (col < p.D) out[static_cast<int64_t>(i) * p.D + col] = from_f32<T>(valid ? o[a][d] * inv_l : 0.f);
    }
    if (tx == 0) lse[i] = valid ? m[a] + logf(l[a]) : 0.f;
  }
}

template <typename T, int DT>
cudaError_t launch_fwd(const WindowAttnFwdParams& p, cudaStream_t stream) {
  constexpr int BM = block_rows(DT), BN = BM;
  constexpr size_t smem = fwd_smem_bytes<BM, BN, DT>();
  const int64_t blocks = static_cast<int64_t>(p.B) * p.H * ceil_div(p.L, BM);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto kernel = window_attn_fwd_kernel<T, BM, BN, DT>;
  cudaError_t err = prepare_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace wattn

cudaError_t window_attn_fwd(const WindowAttnFwdParams& p, cudaStream_t stream) {
  if (p.B < 1 || p.H < 1 || p.L < 1 || p.D < 1 || p.D > kWindowAttnMaxD || p.R < 0) return cudaErrorInvalidValue;
  if (p.cutoff > 0.f && p.sigma == nullptr) return cudaErrorInvalidValue;
  if (p.tensor_cores && window_attn_tc_supported(p)) return window_attn_tc_fwd(p, stream);
  KDC_DISPATCH_DTYPE(p.dtype, {
    switch (wattn::head_tile(p.D)) {
      case 32: return wattn::launch_fwd<scalar_t, 32>(p, stream);
      case 64: return wattn::launch_fwd<scalar_t, 64>(p, stream);
      case 128: return wattn::launch_fwd<scalar_t, 128>(p, stream);
      default: return wattn::launch_fwd<scalar_t, 256>(p, stream);
    }
  });
  return cudaErrorInvalidValue;
}

}  // namespace kdc
