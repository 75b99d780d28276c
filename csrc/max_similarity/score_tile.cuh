// Device building blocks shared by max_similarity and max_similarity_topk: the clip norms and the
// (query tile x one video) scoring loop, a small GEMM with a segmented max + argmax epilogue.
//
// A block of 256 threads (16 x 16) scores BQ = 64 queries against the clips of one video, BC clips
// at a time (BC = 32 or 64), looping over D in chunks of BK = 32 staged in shared memory. The dot
// products run on tensor cores for fp16 / bf16 inputs (WMMA 16x16x16, fp32 accumulation: 8 warps
// own the 16x16 tiles of the BQ x BC block) and as an fp32 SIMT micro-kernel for fp32 inputs
// (k-major staging with an odd row stride: conflict-free reads). Either way thread (ty, tx) ends
// with the scores of queries ty + 16a and clips tx + 16c. Scores are scaled by precomputed inverse
// norms in the epilogue (exact cosine without writing normalised copies); each thread keeps a
// running (max, argmax) per query over its clips in increasing clip order (strict > keeps the
// lowest index; a NaN similarity propagates as in torch.max), and the 16 threads of a query then
// combine theirs with the same rule. A video of length 0 scores -inf with index 0.
#pragma once

#include <math.h>
#include <mma.h>

#include <type_traits>

#include "common/kdc_device.cuh"
#include "max_similarity/max_similarity.h"

namespace kdc {
namespace msim {

constexpr int kThreads = 256;
constexpr int BQ = 64, BK = 32;
constexpr int RM = BQ / 16;
constexpr float kNormEps = 1e-12f;

__device__ __forceinline__ float inv_norm(float norm) { return 1.f / fmaxf(norm, kNormEps); }

__device__ __forceinline__ int video_length(const int64_t* lengths, int64_t v, int L) {
  if (lengths == nullptr) return L;
  const int64_t n = lengths[v];
  return n < 0 ? 0 : (n > L ? L : static_cast<int>(n));
}

constexpr int kLdH = BK + 8;  // row stride of the 16-bit staging tiles: WMMA needs a multiple of 8
                              // elements, and 16-row steps (1280 bytes) stay 32-byte aligned

// Bytes of shared memory score_video<T, BC> stages its tiles in (a multiple of 32).
template <typename T, int BC>
__host__ __device__ constexpr int staging_bytes() {
  return std::is_same<T, float>::value ? static_cast<int>(sizeof(float)) * BK * (BQ + 1 + BC + 1)
                                       : static_cast<int>(sizeof(T)) * (BQ + BC) * kLdH +
                                             static_cast<int>(sizeof(float)) * BQ * (BC + 4);
}

// L2 norm of every row of a strided [outer, inner, D] tensor (inner = 1 for queries), one warp
// per row, fp32 accumulation.
template <typename T>
__global__ void __launch_bounds__(kThreads) row_norms_kernel(const T* x, int64_t rows, int inner, int64_t s_outer,
                                                             int64_t s_inner, int64_t s_d, int D, float* norms) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together
  const T* base = x + (row / inner) * s_outer + (row % inner) * s_inner;
  float ss = 0.f;
  for (int d = lane; d < D; d += 32) {
    const float v = load_f32(base, d * s_d);
    ss = fmaf(v, v, ss);
  }
  ss = group_sum<32>(ss);
  if (lane == 0) norms[row] = sqrtf(ss);
}

template <typename T>
cudaError_t launch_norms(const MaxSimParams& p, cudaStream_t stream) {
  if (!p.normalize) return cudaSuccess;
  if (p.query_norms == nullptr || p.clip_norms == nullptr) return cudaErrorInvalidValue;
  const int per_block = kThreads / 32;
  const int64_t qblocks = ceil_div<int64_t>(p.Nq, per_block);
  const int64_t crows = p.Nv * p.L;
  const int64_t cblocks = ceil_div<int64_t>(crows, per_block);
  if (qblocks > 0x7fffffff || cblocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  row_norms_kernel<T><<<static_cast<unsigned>(qblocks), kThreads, 0, stream>>>(
      static_cast<const T*>(p.queries.ptr), p.Nq, 1, p.queries.stride[0], 0, p.queries.stride[1], p.D, p.query_norms);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  row_norms_kernel<T><<<static_cast<unsigned>(cblocks), kThreads, 0, stream>>>(
      static_cast<const T*>(p.clips.ptr), crows, p.L, p.clips.stride[0], p.clips.stride[1], p.clips.stride[2], p.D,
      p.clip_norms);
  return cudaGetLastError();
}

// Inverse norms of this thread's query rows q0 + ty + 16a (1 without normalize or past Nq).
__device__ __forceinline__ void query_scales(const MaxSimParams& p, int64_t q0, int ty, float (&qscale)[RM]) {
#pragma unroll
  for (int a = 0; a < RM; ++a) {
    const int64_t n = q0 + ty + 16 * a;
    qscale[a] = (p.normalize && n < p.Nq) ? inv_norm(p.query_norms[n]) : 1.f;
  }
}

// acc[a][c] = <q_{q0+ty+16a}, c_{c0+tx+16c}> of a video's clips (`cp`), fp32 SIMT.
template <int BC>
__device__ __forceinline__ void tile_dot_simt(const MaxSimParams& p, char* smem, int64_t q0, const float* cp, int c0,
                                              int len_v, float (&acc)[RM][BC / 16]) {
  constexpr int RN = BC / 16;
  float* Qs = reinterpret_cast<float*>(smem);  // [BK][BQ + 1]
  float* Cs = Qs + BK * (BQ + 1);               // [BK][BC + 1]
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const float* qp = static_cast<const float*>(p.queries.ptr);
#pragma unroll
  for (int a = 0; a < RM; ++a)
#pragma unroll
    for (int c = 0; c < RN; ++c) acc[a][c] = 0.f;
  for (int k0 = 0; k0 < p.D; k0 += BK) {
    __syncthreads();  // the previous chunk is no longer read
    for (int e = tid; e < BQ * BK; e += kThreads) {
      const int row = e / BK, kk = e % BK;
      const int64_t n = q0 + row;
      const int d = k0 + kk;
      Qs[kk * (BQ + 1) + row] =
          (n < p.Nq && d < p.D) ? load_f32(qp, n * p.queries.stride[0] + d * p.queries.stride[1]) : 0.f;
    }
    for (int e = tid; e < BC * BK; e += kThreads) {
      const int col = e / BK, kk = e % BK;
      const int l = c0 + col;
      const int d = k0 + kk;
      Cs[kk * (BC + 1) + col] =
          (l < len_v && d < p.D) ? load_f32(cp, l * p.clips.stride[1] + d * p.clips.stride[2]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < BK; ++kk) {
      float av[RM], bv[RN];
#pragma unroll
      for (int a = 0; a < RM; ++a) av[a] = Qs[kk * (BQ + 1) + ty + 16 * a];
#pragma unroll
      for (int c = 0; c < RN; ++c) bv[c] = Cs[kk * (BC + 1) + tx + 16 * c];
#pragma unroll
      for (int a = 0; a < RM; ++a)
#pragma unroll
        for (int c = 0; c < RN; ++c) acc[a][c] = fmaf(av[a], bv[c], acc[a][c]);
    }
  }
}

// The same tile on tensor cores for fp16 / bf16 (fp32 accumulation). Warp w owns the 16x16
// accumulator tiles w * FRAGS + f of the (BQ / 16) x (BC / 16) grid; the tile goes through shared
// memory once at the end to reach the (ty, tx) layout of the epilogue.
template <typename T, int BC>
__device__ __forceinline__ void tile_dot_mma(const MaxSimParams& p, char* smem, int64_t q0, const T* cp, int c0,
                                             int len_v, float (&acc)[RM][BC / 16]) {
  namespace wmma = nvcuda::wmma;
  constexpr int RN = BC / 16, COLS = BC / 16;
  constexpr int FRAGS = (BQ / 16) * COLS / (kThreads / 32);
  constexpr int LDS = BC + 4;                  // fp32 row stride: a multiple of 4 (16 bytes)
  static_assert(FRAGS >= 1 && (BQ / 16) * COLS == FRAGS * (kThreads / 32), "tiles split evenly over the warps");
  T* Qh = reinterpret_cast<T*>(smem);          // [BQ][kLdH], row major
  T* Ch = Qh + BQ * kLdH;                      // [BC][kLdH]: the B operand (d x clip) in column-major order
  float* S = reinterpret_cast<float*>(Ch + BC * kLdH);  // [BQ][LDS]
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16, warp = tid / 32;
  const T* qp = static_cast<const T*>(p.queries.ptr);
  const T zero = from_f32<T>(0.f);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_c[FRAGS];
#pragma unroll
  for (int f = 0; f < FRAGS; ++f) wmma::fill_fragment(frag_c[f], 0.f);
  for (int k0 = 0; k0 < p.D; k0 += BK) {
    __syncthreads();  // the previous chunk (and the previous tile's S) is no longer read
    for (int e = tid; e < BQ * BK; e += kThreads) {
      const int row = e / BK, kk = e % BK;
      const int64_t n = q0 + row;
      const int d = k0 + kk;
      Qh[row * kLdH + kk] = (n < p.Nq && d < p.D) ? __ldg(qp + n * p.queries.stride[0] + d * p.queries.stride[1]) : zero;
    }
    for (int e = tid; e < BC * BK; e += kThreads) {
      const int col = e / BK, kk = e % BK;
      const int l = c0 + col;
      const int d = k0 + kk;
      Ch[col * kLdH + kk] = (l < len_v && d < p.D) ? __ldg(cp + l * p.clips.stride[1] + d * p.clips.stride[2]) : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
#pragma unroll
      for (int f = 0; f < FRAGS; ++f) {
        const int tile = warp * FRAGS + f, rb = tile / COLS, cb = tile % COLS;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> frag_a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> frag_b;
        wmma::load_matrix_sync(frag_a, Qh + rb * 16 * kLdH + kk, kLdH);
        wmma::load_matrix_sync(frag_b, Ch + cb * 16 * kLdH + kk, kLdH);
        wmma::mma_sync(frag_c[f], frag_a, frag_b, frag_c[f]);
      }
    }
  }
#pragma unroll
  for (int f = 0; f < FRAGS; ++f) {
    const int tile = warp * FRAGS + f, rb = tile / COLS, cb = tile % COLS;
    wmma::store_matrix_sync(S + rb * 16 * LDS + cb * 16, frag_c[f], LDS, wmma::mem_row_major);
  }
  __syncthreads();
#pragma unroll
  for (int a = 0; a < RM; ++a)
#pragma unroll
    for (int c = 0; c < RN; ++c) acc[a][c] = S[(ty + 16 * a) * LDS + tx + 16 * c];
}

// best[a], arg[a]: max over the clips l < len_v of video v of the (scaled) score of query
// q0 + ty + 16a, and its lowest argmax; identical in the 16 threads of the row on return.
// Called by every thread of the block (it synchronises); `smem` holds staging_bytes<T, BC>().
template <typename T, int BC>
__device__ __forceinline__ void score_video(const MaxSimParams& p, char* smem, int64_t q0, int64_t v, int len_v,
                                            const float (&qscale)[RM], float (&best)[RM], int (&arg)[RM]) {
  constexpr int RN = BC / 16;
  const int tx = threadIdx.x % 16;
  const T* cp = static_cast<const T*>(p.clips.ptr) + v * p.clips.stride[0];
#pragma unroll
  for (int a = 0; a < RM; ++a) {
    best[a] = -INFINITY;
    arg[a] = 0;
  }
  for (int c0 = 0; c0 < len_v; c0 += BC) {
    float acc[RM][RN];
    if constexpr (std::is_same<T, float>::value) {
      tile_dot_simt<BC>(p, smem, q0, cp, c0, len_v, acc);
    } else {
      tile_dot_mma<T, BC>(p, smem, q0, cp, c0, len_v, acc);
    }
#pragma unroll
    for (int c = 0; c < RN; ++c) {
      const int l = c0 + tx + 16 * c;
      if (l >= len_v) continue;
      const float cscale = p.normalize ? inv_norm(p.clip_norms[v * p.L + l]) : 1.f;
#pragma unroll
      for (int a = 0; a < RM; ++a) {
        const float sim = acc[a][c] * qscale[a] * cscale;
        // Increasing clip order: strictly better keeps the lowest clip on ties; a NaN (a NaN in a
        // valid clip or query) wins and stays, as in torch.max.
        if (sim > best[a] || (isnan(sim) && !isnan(best[a]))) {
          best[a] = sim;
          arg[a] = l;
        }
      }
    }
  }
#pragma unroll
  for (int a = 0; a < RM; ++a) group_argmax<16>(best[a], arg[a]);
}

}  // namespace msim
}  // namespace kdc
