// Building blocks of the tensor-core windowed_attention kernels (bf16 / fp16, head dim <= 128).
//
// A block is 4 warps and 64 query rows. Each warp owns 16 consecutive rows of one (b, h)
// sequence and keeps its rows' state in mma fragments (see common/tensor_core.cuh for the
// layouts): lane (g, t) = (lane / 4, lane % 4) holds rows g and g + 8 of the warp and, in every
// 8-column n-tile, columns 2t and 2t + 1.
//
// Slots: a block owns G = 64 / SL sequences ("slots") of SL rows. Long sequences (L > 32) use
// G = 1, SL = 64: the block is one 64-row query block of one sequence and loops over its window's
// 64-key tiles. Short ones (L <= 32) are packed: SL = L rounded up to 16 (16 or 32), G = 4 or 2
// sequences share the block, each warp works on the keys of its own slot only (no cross-sequence
// mask is ever needed: a warp never touches another slot's keys).
//
// Tiles are staged in shared memory as 16-bit rows of LD = DT + 8 elements (16-byte aligned rows,
// conflict-free ldmatrix), loaded with 16-byte cp.async when the tensor allows it (last dim
// contiguous, D and the other strides multiples of 8 elements, 16-byte aligned base) and element
// by element otherwise. Rows past a length, past the block's key range and columns past D are
// zero-filled and never read from global memory: whatever they hold cannot reach a result.
#pragma once

#include "common/tensor_core.cuh"
#include "windowed_attention/tile.cuh"

namespace kdc {
namespace wattn_tc {

using wattn::BwdRow;
using wattn::RowWindow;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int BM = 64;  // query rows of a block
constexpr int BN = 64;  // keys of a tile

// Largest head dimension of the tensor-core kernels (larger ones use the fp32 SIMT kernels).
constexpr int kMaxD = 128;

__host__ __device__ constexpr int head_tile(int D) { return D <= 32 ? 32 : D <= 64 ? 64 : 128; }

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls launch(TypeTag<T>{}, std::integral_constant<int, DT>{}) with the 16-bit element type T of
// dtype (bf16, else fp16) and the head tile DT of D: the one instantiation table of the
// tensor-core entry points.
template <typename Launch>
cudaError_t dispatch_dtype_and_tile(DType dtype, int D, Launch&& launch) {
  if (dtype == DType::kBFloat16) {
    switch (head_tile(D)) {
      case 32: return launch(TypeTag<__nv_bfloat16>{}, std::integral_constant<int, 32>{});
      case 64: return launch(TypeTag<__nv_bfloat16>{}, std::integral_constant<int, 64>{});
      default: return launch(TypeTag<__nv_bfloat16>{}, std::integral_constant<int, 128>{});
    }
  }
  switch (head_tile(D)) {
    case 32: return launch(TypeTag<__half>{}, std::integral_constant<int, 32>{});
    case 64: return launch(TypeTag<__half>{}, std::integral_constant<int, 64>{});
    default: return launch(TypeTag<__half>{}, std::integral_constant<int, 128>{});
  }
}

// Bias-table offsets any pair (i, j) reaches: [-Rp, Rp] with Rp = min(R, L - 1) (entries of rel_bias
// beyond get a zero gradient). The same as the SIMT kernels' partial tables.
__host__ __device__ inline int reach_of(int R, int L) { return R < L - 1 ? R : L - 1; }

template <int DT>
struct Smem {
  static constexpr int LD = DT + 8;        // 16-bit elements per shared-memory row
  static constexpr int TILE = 64 * LD;     // elements of a 64-row tile
};

// Slots per block for sequences of length L: 4 x 16 rows, 2 x 32 rows, or 1 x 64 rows.
__host__ __device__ inline int slots_for(int L) { return L <= 16 ? 4 : L <= 32 ? 2 : 1; }

// a[s] for a slot index s known only at run time, without indexing the array (which would put it
// in local memory): a chain of selects in registers.
template <typename X>
__device__ __forceinline__ X pick(const X (&a)[4], int s) {
  return s == 0 ? a[0] : s == 1 ? a[1] : s == 2 ? a[2] : a[3];
}

// What a block owns: up to 4 slots (sequences), their lengths, and the first query row (long
// sequences; 0 when packed).
struct BlockPlan {
  int G = 1, SL = 64;
  int64_t bh[4] = {-1, -1, -1, -1};  // sequence b * H + h of each slot, -1: none
  int len[4] = {0, 0, 0, 0};
  int i0 = 0;
  int qblock = 0;                    // query block index (long sequences)
};

// Blocks are numbered bh * nqb + query block (G = 1) or slot group (G > 1, nqb = 1).
__device__ __forceinline__ BlockPlan block_plan(const WindowAttnFwdParams& p) {
  BlockPlan bp;
  bp.G = slots_for(p.L);
  bp.SL = BM / bp.G;
  const int64_t nseq = static_cast<int64_t>(p.B) * p.H;
  if (bp.G == 1) {
    const int nqb = ceil_div(p.L, BM);
    bp.bh[0] = blockIdx.x / nqb;
    bp.qblock = static_cast<int>(blockIdx.x % nqb);
    bp.i0 = bp.qblock * BM;
    bp.len[0] = wattn::sequence_length(p.lengths, static_cast<int>(bp.bh[0] / p.H), p.L);
  } else {
    for (int s = 0; s < bp.G; ++s) {
      const int64_t bh = static_cast<int64_t>(blockIdx.x) * bp.G + s;
      if (bh < nseq) {
        bp.bh[s] = bh;
        bp.len[s] = wattn::sequence_length(p.lengths, static_cast<int>(bh / p.H), p.L);
      }
    }
  }
  return bp;
}

__host__ __device__ inline int64_t num_blocks(int B, int H, int L) {
  const int G = slots_for(L);
  const int64_t nseq = static_cast<int64_t>(B) * H;
  return G == 1 ? nseq * ceil_div(L, BM) : ceil_div<int64_t>(nseq, G);
}

// Whether every [B, H, L, D] tensor here can be staged with 16-byte cp.async.
__host__ inline bool vec16_ok(const ConstStrided& t, int D) {
  const auto addr = reinterpret_cast<uintptr_t>(t.ptr);
  return D % 8 == 0 && t.stride[3] == 1 && t.stride[2] % 8 == 0 && t.stride[1] % 8 == 0 && t.stride[0] % 8 == 0 &&
         addr % 16 == 0;
}

// Stages rows [row0, row0 + SL) of every slot's [L, D] slice of `t` into dst (64 rows x LD):
// slot s fills shared rows [s * SL, (s + 1) * SL). Rows at or past nvalid[s] (or of an empty
// slot) and columns past D are zero. With vec the copies are cp.async (the caller commits and
// waits), otherwise plain loads and stores.
template <typename T, int DT>
__device__ __forceinline__ void stage_rows(T* dst, const ConstStrided& t, const BlockPlan& bp, const int (&row0)[4],
                                           const int (&nvalid)[4], int H, int D, bool vec) {
  constexpr int LD = Smem<DT>::LD, CHUNKS = DT / 8;
  const T* base = static_cast<const T*>(t.ptr);
  for (int e = threadIdx.x; e < BM * CHUNKS; e += kThreads) {
    const int r = e / CHUNKS, c = e % CHUNKS;
    const int s = r / bp.SL, rr = r % bp.SL;
    const int first = pick(row0, s);
    const int64_t bh = pick(bp.bh, s);
    const int row = first + rr;
    const bool ok = bh >= 0 && rr < pick(nvalid, s) - first && c * 8 < D;
    T* d = dst + r * LD + c * 8;
    const T* src = base;
    if (ok) {
      src = base + (bh / H) * t.stride[0] + (bh % H) * t.stride[1] + static_cast<int64_t>(row) * t.stride[2] +
            static_cast<int64_t>(c) * 8 * t.stride[3];
    }
    if (vec) {
      tc::cp_async_16(d, src, ok);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) d[k] = (ok && c * 8 + k < D) ? src[k * t.stride[3]] : from_f32<T>(0.f);
    }
  }
}

// --- fragments -------------------------------------------------------------------------------------

// Fragments of the shared tiles (row stride LD): see common/tensor_core.cuh.
template <int LD, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int r0, int c0) {
  tc::load_a(a, tile, LD, r0, c0);
}
template <int LD, typename T>
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[4], const T* tile, int n0, int c0) {
  tc::load_b_rows(b, tile, LD, n0, c0);
}
template <int LD, typename T>
__device__ __forceinline__ void load_b_trans(uint32_t (&b)[4], const T* tile, int k0, int n0) {
  tc::load_b_trans(b, tile, LD, k0, n0);
}

// A fragment of the k-step kk (columns 16 kk .. 16 kk + 15) of a 16-row fp32 accumulator acc[n][4]
// (8-column n-tiles), rounded to T: the register reuse of P (and dS) as the next mma's A operand.
template <typename T, int N>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&acc)[N][4], int kk) {
  a[0] = tc::pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = tc::pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = tc::pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = tc::pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// Eight fp32 accumulator values (two n-tiles of one lane), passed by value so that the caller's
// accumulator arrays never have their address taken (they stay in registers).
struct Acc8 {
  float v[8];
};

// The select product of mma_skip_zero_weights (rare: only tiles holding NaN / inf run it), kept out
// of line so that its code is not repeated at every call site.
template <typename T, int LD>
__device__ __noinline__ Acc8 mma_select_slow(Acc8 c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, const T* tile,
                                             int k0, int n0) {
  // Weights of rows g and g + 8 for the 16 k of this step, gathered from the 4 lanes of the quad
  // (lane (g, t') holds k = 2t', 2t' + 1 in a0 / a1 and k = 2t' + 8, 2t' + 9 in a2 / a3).
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const uint32_t a[4] = {a0, a1, a2, a3};
  float w[2][16];
#pragma unroll
  for (int tq = 0; tq < 4; ++tq) {
    const int src = g * 4 + tq;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // row g (a0, a2) and row g + 8 (a1, a3)
      const uint32_t lo = __shfl_sync(kFullMask, a[half], src);
      const uint32_t hi = __shfl_sync(kFullMask, a[half + 2], src);
      w[half][2 * tq] = tc::unpack_lo<T>(lo);
      w[half][2 * tq + 1] = tc::unpack_hi<T>(lo);
      w[half][2 * tq + 8] = tc::unpack_lo<T>(hi);
      w[half][2 * tq + 9] = tc::unpack_hi<T>(hi);
    }
  }
#pragma unroll
  for (int x = 0; x < 8; ++x) {  // n-tile x / 4, element x % 4
    const int col = n0 + (x / 4) * 8 + 2 * t + (x % 2);
    float acc = c.v[x];
#pragma unroll
    for (int k = 0; k < 16; ++k) acc = wattn::fma_nonzero(w[(x % 4) / 2][k], to_f32<T>(tile[(k0 + k) * LD + col]), acc);
    c.v[x] = acc;
  }
  return c;
}

// acc[n0 / 8 + {0, 1}] += A (16 x 16, fragment a) x Y (16 x 16 of `tile` at rows k0, columns n0,
// fragments b from load_b_trans), where A may weight rows of Y that hold NaN / inf by exactly 0
// (excluded pairs): if any element of b is not finite (a warp vote), the product is formed with
// a select that skips zero weights instead of on tensor cores, so that 0 * NaN never appears.
// For finite data this costs a few integer ops and one vote.
template <typename T, int LD>
__device__ __forceinline__ void mma_skip_zero_weights(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4],
                                                      const uint32_t (&b)[4], const T* tile, int k0, int n0) {
  const bool bad = tc::nonfinite2<T>(b[0]) | tc::nonfinite2<T>(b[1]) | tc::nonfinite2<T>(b[2]) | tc::nonfinite2<T>(b[3]);
  if (!__any_sync(kFullMask, bad)) {
    const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
    tc::mma_16816<T>(c0, a, b0);
    tc::mma_16816<T>(c1, a, b1);
  } else {
    Acc8 c = {{c0[0], c0[1], c0[2], c0[3], c1[0], c1[1], c1[2], c1[3]}};
    c = mma_select_slow<T, LD>(c, a[0], a[1], a[2], a[3], tile, k0, n0);
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      c0[x] = c.v[x];
      c1[x] = c.v[4 + x];
    }
  }
}

// --- the logits of a warp's 16 x nk tile -----------------------------------------------------------

// What the mask and the logit of element (query i, key j) need of query i (RowWindow) and of the
// tile: keys at or past kend are excluded; the bias of (i, j) is bias_t[j - i - dmin] (bias_t
// null: no rel_bias).
struct TileGeometry {
  int kend = 0;
  bool cut = false;
  float scale = 1.f;
  const float* bias_t = nullptr;
  int dmin = 0;
};

__device__ __forceinline__ float logit_of(float dot, int i, int j, const RowWindow& w, const TileGeometry& geo) {
  const float bias = geo.bias_t != nullptr ? geo.bias_t[j - i - geo.dmin] : 0.f;
  return wattn::masked_logit(dot, i, j, w, geo.kend, geo.cut, geo.scale, bias);
}

// s[n][e] = <x_r, y_c> for the warp's rows r = g (+ 8) and columns c = 8n + 2t (+ 1): S = X Y^T
// where X is the warp's 16 rows at shared row xrow of Xs and Y the nk (a multiple of 16, <= NC)
// rows at shared row yrow of Ys. Columns past nk stay 0.
template <typename T, int DT, int NC = BN>
__device__ __forceinline__ void warp_scores(float (&s)[NC / 8][4], const T* Xs, int xrow, const T* Ys, int yrow,
                                            int nk) {
  constexpr int LD = Smem<DT>::LD;
#pragma unroll
  for (int n = 0; n < NC / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < DT / 16; ++kk) {
    uint32_t a[4];
    load_a<LD>(a, Xs, xrow, kk * 16);
#pragma unroll
    for (int np = 0; np < NC / 16; ++np) {
      if (np * 16 >= nk) break;
      uint32_t b[4];
      load_b_rows<LD>(b, Ys, yrow + np * 16, kk * 16);
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      tc::mma_16816<T>(s[2 * np], a, b0);
      tc::mma_16816<T>(s[2 * np + 1], a, b1);
    }
  }
}

// Writes columns col, col + 1 (col even) of a contiguous row of D elements: one 32-bit store when D
// is even (the pair is then 4-byte aligned), else element by element; columns past D are skipped.
template <typename T>
__device__ __forceinline__ void store_pair(T* row, int col, int D, float a, float b) {
  if (D % 2 == 0 && col + 1 < D) {
    *reinterpret_cast<uint32_t*>(row + col) = tc::pack2<T>(a, b);
  } else {
    if (col < D) row[col] = from_f32<T>(a);
    if (col + 1 < D) row[col + 1] = from_f32<T>(b);
  }
}

// --- row state -------------------------------------------------------------------------------------

// Sum / max over the 4 lanes of a quad (the lanes that share a row): bitwise identical in all four.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}

// max over this warp's valid rows (rows i0 .. i0 + 15 below len) of floor(min(cutoff * sigma_i, L)):
// the window half-width of the warp's rows (-1 when none is valid). Same value in every lane.
__device__ __forceinline__ int warp_window(const float* sigma_bh, float cutoff, int i0, int len, int L) {
  const int lane = threadIdx.x % 32;
  int w = -1;
  if (lane < 16 && i0 + lane < len) {
    const float thr = fminf(__fmul_rn(cutoff, sigma_bh[i0 + lane]), static_cast<float>(L));
    w = static_cast<int>(floorf(thr));  // fminf drops a NaN sigma: the window is then L
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) w = max(w, __shfl_xor_sync(kFullMask, w, off));
  return w;
}

// Bias of every diagonal of a tile: dst[x] = rel_bias[h, clamp(dmin + x, -R, R) + R] for
// x < 127, where dmin is the smallest key - query offset of the tile; element (i, j) reads
// dst[j - i - dmin]. (Called by the threads of one slot group; 127 entries per slot.)
__device__ __forceinline__ void stage_bias(float* dst, const float* bias_h, int R, int dmin, int first, int step) {
  for (int x = first; x < 2 * BM - 1; x += step) dst[x] = bias_h[min(max(dmin + x, -R), R) + R];
}

}  // namespace wattn_tc
}  // namespace kdc
