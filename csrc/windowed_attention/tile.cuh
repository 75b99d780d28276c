// Device building blocks shared by the windowed_attention forward and backward kernels.
//
// Every kernel runs 256 threads as a 16 x 16 grid: thread (ty, tx) = (tid / 16, tid % 16) owns
// the tile rows ty + 16a and the tile columns tx + 16c. The 16 threads that share a row are 16
// consecutive lanes of one warp, so row reductions are shuffles (bitwise identical in every lane).
// Tiles live in shared memory as fp32 with an odd row stride, so the column-parallel reads of the
// micro-kernels hit 16 distinct banks.
//
// A query block [i0, i0 + BM) only meets keys inside its window: with cutoff, key j is used by
// row i only if |i - j| <= cutoff * sigma_i, so the block's key range is
// [i0 - W, i0 + rows - 1 + W] with W = max_i floor(min(cutoff * sigma_i, L)). Keys outside that
// range are never loaded: the cost is O(L * window), not O(L^2).
#pragma once

#include <math.h>

#include "common/kdc_device.cuh"
#include "windowed_attention/windowed_attention.h"

namespace kdc {
namespace wattn {

constexpr int kThreads = 256;

template <int BM_, int BN_, int DT_>
struct Tile {
  static constexpr int BM = BM_;  // query rows of a block
  static constexpr int BN = BN_;  // key rows of a block
  static constexpr int DT = DT_;  // head dimension, padded with zeros to a multiple of 16
  static constexpr int RM = BM / 16, RN = BN / 16, RD = DT / 16;
  static constexpr int LDD = DT + 1;  // row stride of [rows, DT] tiles
  static constexpr int LDS = BN + 1;  // row stride of [BM, BN] score tiles
  static_assert(BM % 16 == 0 && BN % 16 == 0 && DT % 16 == 0, "tiles are multiples of 16");
};

// Head-dim tile of D (D <= kWindowAttnMaxD) and the block size used with it: 64 x 64 blocks up to
// D = 128, 32 x 32 at D = 256 so the backward's tiles still fit the 163 KB of an A100.
__host__ __device__ constexpr int head_tile(int D) { return D <= 32 ? 32 : D <= 64 ? 64 : D <= 128 ? 128 : 256; }
__host__ __device__ constexpr int block_rows(int DT) { return DT >= 256 ? 32 : 64; }

// Lengths are trusted after validation, but a bad value must never turn into an out-of-bounds
// access: clamp to [0, L].
__device__ __forceinline__ int sequence_length(const int64_t* lengths, int b, int L) {
  if (lengths == nullptr) return L;
  const int64_t n = lengths[b];
  return n < 0 ? 0 : (n > L ? L : static_cast<int>(n));
}

// Which rows of which (b, h) sequence a block owns: blocks are numbered (b * H + h) * nblocks + blk,
// each owning rows [start, start + rows_per_block) of sequence (b, h) (valid below `len`).
struct BlockCoords {
  int64_t bh;
  int b, h, blk, len, start;
};

__device__ __forceinline__ BlockCoords block_coords(const WindowAttnFwdParams& f, int rows_per_block) {
  const int nblocks = ceil_div(f.L, rows_per_block);
  BlockCoords c;
  c.bh = blockIdx.x / nblocks;
  c.blk = static_cast<int>(blockIdx.x % nblocks);
  c.b = static_cast<int>(c.bh / f.H);
  c.h = static_cast<int>(c.bh % f.H);
  c.len = sequence_length(f.lengths, c.b, f.L);
  c.start = c.blk * rows_per_block;
  return c;
}

// The [L, D] slice of sequence (b, h) of a strided [B, H, L, D] tensor.
template <typename T>
__device__ __forceinline__ const T* head_slice(const ConstStrided& t, const BlockCoords& c) {
  return static_cast<const T*>(t.ptr) + c.b * t.stride[0] + c.h * t.stride[1];
}

// Loads rows [row0, row0 + nrows) (columns [0, D)) of a strided [rows, D] slice into
// dst[ROWS][DT + 1] as fp32; the other rows and columns of the tile are zero (rows past a length
// are never read: whatever they hold cannot reach a result). Returns whether this thread loaded a
// NaN or an infinity (see any_nonfinite).
template <typename T, int ROWS, int DT>
__device__ __forceinline__ bool load_tile(float* dst, const T* base, int64_t row_stride, int64_t col_stride,
                                          int row0, int nrows, int D) {
  bool bad = false;
  for (int e = threadIdx.x; e < ROWS * DT; e += kThreads) {
    const int r = e / DT, d = e % DT;
    float x = 0.f;
    if (r < nrows && d < D) x = load_f32(base, static_cast<int64_t>(row0 + r) * row_stride + d * col_stride);
    bad |= !isfinite(x);
    dst[r * (DT + 1) + d] = x;
  }
  return bad;
}

// A product P K or P V over a key tile multiplies the excluded (i, j) pairs by exactly 0, and
// 0 * NaN = NaN: a key row beyond some query's cutoff window may hold NaN / inf (it is valid for
// other rows) and must still not reach that query. The kernels learn once per tile (a block-wide
// OR at the barrier after the loads) whether the tile holds any non-finite value, and only then
// run the product with a select that skips zero weights: no cost for finite data.
__device__ __forceinline__ float fma_nonzero(float w, float x, float acc) { return w != 0.f ? fmaf(w, x, acc) : acc; }

// acc[a][c] = sum_d A[ty + 16a][d] * Bt[tx + 16c][d]: a [16*RA, 16*RB] tile of A Bt^T.
template <int RA, int RB, int DT>
__device__ __forceinline__ void dot_rows(const float* A, const float* Bt, float (&acc)[RA][RB], int ty, int tx) {
#pragma unroll
  for (int a = 0; a < RA; ++a)
#pragma unroll
    for (int c = 0; c < RB; ++c) acc[a][c] = 0.f;
#pragma unroll 4
  for (int d = 0; d < DT; ++d) {
    float av[RA], bv[RB];
#pragma unroll
    for (int a = 0; a < RA; ++a) av[a] = A[(ty + 16 * a) * (DT + 1) + d];
#pragma unroll
    for (int c = 0; c < RB; ++c) bv[c] = Bt[(tx + 16 * c) * (DT + 1) + d];
#pragma unroll
    for (int a = 0; a < RA; ++a)
#pragma unroll
      for (int c = 0; c < RB; ++c) acc[a][c] = fmaf(av[a], bv[c], acc[a][c]);
  }
}

// Per-row terms of a query row: the Gaussian coefficient 1 / (2 sigma^2) and the cutoff
// threshold cutoff * sigma (computed exactly as the reference does, in fp32).
struct RowWindow {
  float gauss = 0.f;
  float thr = 0.f;
  bool valid = false;
};

__device__ __forceinline__ RowWindow row_window(const float* sigma_bh, float cutoff, bool cut, int i, bool valid) {
  RowWindow w;
  w.valid = valid;
  if (sigma_bh != nullptr && valid) {
    const float s = sigma_bh[i];
    w.gauss = 0.5f / (s * s);
    w.thr = cut ? __fmul_rn(cutoff, s) : 0.f;
  }
  return w;
}

// The logit of (i, j), or -inf when key j is excluded (padded query row, key at or past
// `kend`, or outside the hard window).
__device__ __forceinline__ float masked_logit(float dot, int i, int j, const RowWindow& w, int kend, bool cut,
                                              float scale, float bias) {
  if (!w.valid || j >= kend) return -INFINITY;
  const float dist = static_cast<float>(i - j);
  if (cut && !(fabsf(dist) <= w.thr)) return -INFINITY;  // the reference's test, NaN included
  // A tiny sigma makes 1 / (2 sigma^2) overflow to inf: the diagonal term is 0 (not 0 * inf).
  return scale * dot + bias - (i == j ? 0.f : dist * dist * w.gauss);
}

// A valid query row is "poisoned" when a NaN / inf key or value inside its window made its output
// non-finite: then its LSE (a NaN logit) or its delta (a non-finite O, or dP against an inf value)
// is not finite. Such a row passes no gradient anywhere, as in the reference (which replaces the
// row's output by NaN after the softmax, so no gradient flows back through it): the backward
// treats it as not valid (P = dS = 0 on the whole row, its dq and d sigma are 0). One test per row;
// rows with finite LSE and delta are computed exactly as before.
__device__ __forceinline__ bool row_is_live(float lse, float delta) { return isfinite(lse) && isfinite(delta); }

// What the backward needs of query row i of sequence bh: its window (w.valid: a valid row that is
// not poisoned), the forward's log-sum-exp and delta = rowsum(dO * O).
struct BwdRow {
  RowWindow w;
  float lse = 0.f, delta = 0.f;
};

__device__ __forceinline__ BwdRow bwd_row(const WindowAttnBwdParams& p, int64_t bh, int i, bool valid, bool cut) {
  const WindowAttnFwdParams& f = p.fwd;
  BwdRow row;
  row.w = row_window(f.sigma != nullptr ? f.sigma + bh * f.L : nullptr, f.cutoff, cut, i, valid);
  if (valid) {
    row.lse = f.lse[bh * f.L + i];
    row.delta = p.delta[bh * f.L + i];
    row.w.valid = row_is_live(row.lse, row.delta);
  }
  return row;
}

// P = exp(logit - LSE) and dS = P (dP - delta) of tile element (i, j), from the recomputed
// <q_i, k_j> and dP = <dO_i, v_j>; both 0 for excluded keys.
__device__ __forceinline__ void prob_and_grad(float qk, float dp, int i, int j, const BwdRow& row, int kend, bool cut,
                                              float scale, float bias, float& prob, float& ds) {
  const float logit = masked_logit(qk, i, j, row.w, kend, cut, scale, bias);
  prob = logit == -INFINITY ? 0.f : expf(logit - row.lse);
  ds = prob != 0.f ? prob * (dp - row.delta) : 0.f;  // dP of an excluded key may be NaN
}

// d sigma_i = sum_j dS_ij (i - j)^2 / sigma_i^3 from the row sum; a zero sum stays 0 when
// sigma_i^3 underflows (a tiny sigma keeps only the diagonal, where (i - j)^2 = 0).
__device__ __forceinline__ float sigma_grad(float row_sum, float s) { return row_sum != 0.f ? row_sum / (s * s * s) : 0.f; }

// max over the rows [i0, i0 + nrows) of floor(min(cutoff * sigma_i, L)) (>= 0): the window
// half-width of a query block. Called by every thread of the block; `scratch` holds 8 ints.
__device__ __forceinline__ int block_window(const float* sigma_bh, float cutoff, int i0, int nrows, int L,
                                            int* scratch) {
  int w = 0;
  for (int r = threadIdx.x; r < nrows; r += kThreads) {
    const float thr = fminf(__fmul_rn(cutoff, sigma_bh[i0 + r]), static_cast<float>(L));
    w = max(w, static_cast<int>(floorf(thr)));  // fminf drops a NaN sigma: the window is then L
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) w = max(w, __shfl_xor_sync(kFullMask, w, off));
  __syncthreads();  // scratch may still be read by a previous call
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = w;
  __syncthreads();
  int result = 0;
#pragma unroll
  for (int k = 0; k < kThreads / 32; ++k) result = max(result, scratch[k]);
  return result;
}

// dst[t] = rel_bias[h, clamp(diag0 + t - (BM - 1), -R, R) + R] for t < BM + BN - 1: the bias of
// every diagonal of a tile whose top-left element is (i0, j0), diag0 = j0 - i0. Element
// (row r, column c) of the tile reads dst[c - r + BM - 1].
template <int BM, int BN>
__device__ __forceinline__ void load_bias_diagonals(float* dst, const float* bias_h, int R, int diag0) {
  if (bias_h == nullptr) return;
  for (int t = threadIdx.x; t < BM + BN - 1; t += kThreads) {
    const int o = min(max(diag0 + t - (BM - 1), -R), R);
    dst[t] = bias_h[o + R];
  }
}

// Writes zeros into rows [row0, row1) of a contiguous [rows, D] output.
template <typename T>
__device__ __forceinline__ void zero_rows(T* out, int row0, int row1, int D) {
  const int64_t n = static_cast<int64_t>(row1 - row0) * D;
  T* base = out + static_cast<int64_t>(row0) * D;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) base[e] = from_f32<T>(0.f);
}

__device__ __forceinline__ void zero_floats(float* out, int64_t n) {
  for (int64_t e = threadIdx.x; e < n; e += kThreads) out[e] = 0.f;
}

}  // namespace wattn
}  // namespace kdc
