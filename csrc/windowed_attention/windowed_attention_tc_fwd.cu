// windowed_attention forward on tensor cores (bf16 / fp16, head dim <= 128): FlashAttention-2
// structure. Each warp keeps 16 query rows (Q fragments, the running max / sum and the output
// accumulator) in registers and streams its window's 64-key tiles: S = Q K^T (mma m16n8k16, fp32
// accumulation), bias gathered from the tile's diagonals, Gaussian window, lengths / cutoff masks,
// online softmax, then O += P V with P reused from the S registers as the A operand. K / V tiles go
// through shared memory with cp.async double buffering (tile t + 1 loads while tile t is used).
// Key tiles outside the block's window are never loaded, and a warp skips the tiles outside its
// own rows' window. Short sequences are packed several per block (see tc_tile.cuh). LSE is saved
// for the backward. fp32 inputs and D > 128 use the fp32 SIMT kernels (windowed_attention_fwd.cu).
//
//   logit[i, j] = scale * <q_i, k_j> + rel_bias[h, clamp(j - i, -R, R) + R]
//                 - (i - j)^2 / (2 * sigma[b, h, i]^2)
//   out[i] = sum_j softmax_j(logit[i, :]) v_j   (i < lengths[b]; padded rows are 0, LSE 0)
#include "windowed_attention/tc_tile.cuh"

namespace kdc {
namespace wattn_tc {

template <int DT>
constexpr size_t fwd_smem_bytes() {
  // Q, two K and two V tiles (16-bit), bias diagonals of two tiles (4 slots x 128), 4 window ints.
  return 2 * 5 * Smem<DT>::TILE + sizeof(float) * 2 * 4 * 128 + sizeof(int) * 8;
}

template <typename T, int DT>
__global__ void __launch_bounds__(kThreads) window_attn_tc_fwd_kernel(const WindowAttnFwdParams p, bool vec) {
  constexpr int LD = Smem<DT>::LD, TILE = Smem<DT>::TILE, DTILES = DT / 8;
  T* Qs = reinterpret_cast<T*>(dynamic_smem());
  T* Ks = Qs + TILE;              // two buffers
  T* Vs = Ks + 2 * TILE;          // two buffers
  float* bias_s = reinterpret_cast<float*>(Vs + 2 * TILE);  // [2][4 slots][128]
  int* win_s = reinterpret_cast<int*>(bias_s + 2 * 4 * 128);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const BlockPlan bp = block_plan(p);
  const int slot = warp / (kWarps / bp.G);
  const int wrow = (warp % (kWarps / bp.G)) * 16;  // the warp's first row within its slot
  const int64_t bh = pick(bp.bh, slot);
  const int len = pick(bp.len, slot);
  const int iw = bp.i0 + wrow;  // the warp's first query row in its sequence
  const bool cut = p.cutoff > 0.f && p.sigma != nullptr;
  const float* sigma_bh = (p.sigma != nullptr && bh >= 0) ? p.sigma + bh * p.L : nullptr;
  const float* bias_h =
      (p.rel_bias != nullptr && bh >= 0) ? p.rel_bias + static_cast<int64_t>(bh % p.H) * (2 * p.R + 1) : nullptr;

  // The key range of the block (long sequences: the union of its rows' windows) and of the warp.
  int kmin = 0, kmax = len, wkmin = 0, wkmax = len;
  const bool warp_active = bh >= 0 && iw < len;
  if (bp.G == 1 && cut) {
    const int W = warp_active ? warp_window(sigma_bh, p.cutoff, iw, len, p.L) : -1;
    if (lane == 0) win_s[warp] = W;
    __syncthreads();
    int Wb = -1;
    for (int w = 0; w < kWarps; ++w) Wb = max(Wb, win_s[w]);
    const int nrows = min(BM, len - bp.i0);
    kmin = max(0, bp.i0 - Wb);
    kmax = Wb < 0 ? 0 : min(len, bp.i0 + nrows + Wb);
    wkmin = max(0, iw - W);
    wkmax = W < 0 ? 0 : min(len, min(iw + 16, len) + W);
  }
  const int ntiles = bp.G == 1 ? (kmax > kmin ? ceil_div(kmax - kmin, BN) : 0) : 1;

  // Stage Q (its own commit group) and the first K / V tile.
  int q0[4] = {bp.i0, 0, 0, 0}, qn[4] = {bp.len[0], bp.len[1], bp.len[2], bp.len[3]};
  stage_rows<T, DT>(Qs, p.q, bp, q0, qn, p.H, p.D, vec);
  tc::cp_async_commit();
  int k0[4] = {kmin, 0, 0, 0}, kn[4] = {kmax, bp.len[1], bp.len[2], bp.len[3]};
  if (bp.G > 1) k0[0] = 0, kn[0] = bp.len[0];
  if (ntiles > 0) {
    stage_rows<T, DT>(Ks, p.k, bp, k0, kn, p.H, p.D, vec);
    stage_rows<T, DT>(Vs, p.v, bp, k0, kn, p.H, p.D, vec);
  }
  tc::cp_async_commit();

  // Row state: rows g and g + 8 of the warp.
  RowWindow rw[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = iw + g + 8 * h;
    rw[h] = wattn::row_window(sigma_bh, p.cutoff, cut, i, warp_active && i < len);
  }
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[DTILES][4];
#pragma unroll
  for (int n = 0; n < DTILES; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  const int nkeys_warp = bp.G == 1 ? BN : bp.SL;  // keys of a tile this warp may use
  const int krow0 = bp.G == 1 ? 0 : slot * bp.SL;  // its first shared key row
  for (int tile = 0; tile < ntiles; ++tile) {
    const int buf = tile % 2;
    const int j0 = bp.G == 1 ? kmin + tile * BN : 0;
    __syncthreads();  // every warp is done with buffer (tile + 1) % 2 and bias buffer buf
    if (tile + 1 < ntiles) {
      int k1[4] = {j0 + BN, 0, 0, 0};
      stage_rows<T, DT>(Ks + (1 - buf) * TILE, p.k, bp, k1, kn, p.H, p.D, vec);
      stage_rows<T, DT>(Vs + (1 - buf) * TILE, p.v, bp, k1, kn, p.H, p.D, vec);
    }
    tc::cp_async_commit();
    if (p.rel_bias != nullptr) {  // the diagonals this tile meets, per slot
      for (int s = 0; s < bp.G; ++s) {
        if (bp.bh[s] < 0) continue;
        const float* bh_bias = p.rel_bias + static_cast<int64_t>(bp.bh[s] % p.H) * (2 * p.R + 1);
        const int dmin = bp.G == 1 ? j0 - bp.i0 - (BM - 1) : -(bp.SL - 1);
        stage_bias(bias_s + (buf * 4 + s) * 128, bh_bias, p.R, dmin, threadIdx.x, kThreads);
      }
    }
    tc::cp_async_wait<1>();  // Q and this tile have landed (the next tile may be in flight)
    __syncthreads();
    // Warps without valid rows, or whose window misses this tile, skip it (no barrier inside).
    if (!warp_active || (bp.G == 1 && cut && (j0 >= wkmax || j0 + BN <= wkmin))) continue;

    const T* Kt = Ks + buf * TILE;
    const T* Vt = Vs + buf * TILE;
    float s[BN / 8][4];
    warp_scores<T, DT>(s, Qs, slot * bp.SL + wrow, Kt, krow0, nkeys_warp);

    // Logits, masks and the online softmax of rows g (h = 0) and g + 8 (h = 1).
    TileGeometry geo;
    geo.kend = bp.G == 1 ? kmax : len;
    geo.cut = cut;
    geo.scale = p.scale;
    geo.bias_t = bias_h != nullptr ? bias_s + (buf * 4 + slot) * 128 : nullptr;
    geo.dmin = bp.G == 1 ? j0 - bp.i0 - (BM - 1) : -(bp.SL - 1);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2;
        const int i = iw + g + 8 * h, j = j0 + n * 8 + 2 * t + (e % 2);
        s[n][e] = n * 8 < nkeys_warp ? logit_of(s[n][e], i, j, rw[h], geo) : -INFINITY;
        mx[h] = fmaxf(mx[h], s[n][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_new = fmaxf(m[h], quad_max(mx[h]));
      // A row with no key yet keeps m = -inf; exponentiate against 0 so no -inf - -inf NaN appears.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[h] = expf(m[h] - m_use);
      m[h] = m_new;
      mx[h] = m_use;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = expf(s[n][e] - mx[e / 2]);
        rs[e / 2] += s[n][e];
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) l[h] = l[h] * alpha[h] + rs[h];  // this lane's share of the row sum
#pragma unroll
    for (int n = 0; n < DTILES; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }

    // O += P V, P (rounded to T) straight from the S registers.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      if (kk * 16 >= nkeys_warp) break;
      uint32_t a[4];
      acc_to_a<T>(a, s, kk);
#pragma unroll
      for (int dp = 0; dp < DT / 16; ++dp) {
        uint32_t b[4];
        load_b_trans<LD>(b, Vt, krow0 + kk * 16, dp * 16);
        mma_skip_zero_weights<T, LD>(o[2 * dp], o[2 * dp + 1], a, b, Vt, krow0 + kk * 16, dp * 16);
      }
    }
  }
  tc::cp_async_wait<0>();

  // Epilogue: out = O / l for valid rows (key i = i is always in the window, so l >= 1), 0 else.
  if (bh < 0) return;
  T* out = static_cast<T*>(p.out) + bh * p.L * p.D;
  float* lse = p.lse + bh * p.L;
  const float sums[2] = {quad_sum(l[0]), quad_sum(l[1])};  // every lane: no divergent shuffle
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = iw + g + 8 * h;
    const bool row_in_slot = wrow + g + 8 * h < bp.SL;
    if (!row_in_slot || i >= p.L) continue;
    const float sum = sums[h];
    const bool valid = rw[h].valid;
    const float inv = valid ? 1.f / sum : 0.f;
    T* row = out + static_cast<int64_t>(i) * p.D;
#pragma unroll
    for (int n = 0; n < DTILES; ++n) {
      store_pair(row, n * 8 + 2 * t, p.D, valid ? o[n][2 * h] * inv : 0.f, valid ? o[n][2 * h + 1] * inv : 0.f);
    }
    if (t == 0) lse[i] = valid ? m[h] + logf(sum) : 0.f;
  }
}

template <typename T, int DT>
cudaError_t launch_tc_fwd(const WindowAttnFwdParams& p, cudaStream_t stream) {
  constexpr size_t smem = fwd_smem_bytes<DT>();
  const int64_t blocks = num_blocks(p.B, p.H, p.L);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const bool vec = vec16_ok(p.q, p.D) && vec16_ok(p.k, p.D) && vec16_ok(p.v, p.D);
  auto kernel = window_attn_tc_fwd_kernel<T, DT>;
  cudaError_t err = prepare_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p, vec);
  return cudaGetLastError();
}

}  // namespace wattn_tc

// The tensor-core forward for bf16 / fp16 inputs with D <= 128 (false: the caller uses the fp32
// SIMT kernels).
bool window_attn_tc_supported(const WindowAttnFwdParams& p) {
  return (p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16) && p.D >= 1 && p.D <= wattn_tc::kMaxD;
}

cudaError_t window_attn_tc_fwd(const WindowAttnFwdParams& p, cudaStream_t stream) {
  if (!window_attn_tc_supported(p)) return cudaErrorInvalidValue;
  return wattn_tc::dispatch_dtype_and_tile(p.dtype, p.D, [&](auto type, auto tile) {
    return wattn_tc::launch_tc_fwd<typename decltype(type)::type, decltype(tile)::value>(p, stream);
  });
}

}  // namespace kdc
