// Device building blocks shared by max_similarity and max_similarity_topk: the clip norms and the
// (query tile x one video) scoring loop, a small GEMM with a segmented max + argmax epilogue.
//
// A block of 256 threads (16 x 16) scores BQ = 64 queries against the clips of one video, BC clips
// at a time (BC = 32 or 64), looping over D in chunks of BK = 32 staged in shared memory
// (k-major, odd row stride: conflict-free reads). Thread (ty, tx) owns queries ty + 16a and clips
// tx + 16c. Scores are scaled by precomputed inverse norms in the epilogue (exact cosine without
// writing normalised copies); each thread keeps a running (max, argmax) per query over its clips
// in increasing clip order (strict > keeps the lowest index), and the 16 threads of a query then
// combine theirs with the same tie rule.
#pragma once

#include <math.h>

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

// Shared-memory floats of the staging tiles for clip tile BC.
template <int BC>
__host__ __device__ constexpr int staging_floats() {
  return BK * (BQ + 1) + BK * (BC + 1);
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

// best[a], arg[a]: max over the clips l < len_v of video v of the (scaled) score of query
// q0 + ty + 16a, and its lowest argmax; identical in the 16 threads of the row on return.
// Called by every thread of the block (it synchronises); `smem` holds staging_floats<BC>().
template <typename T, int BC>
__device__ __forceinline__ void score_video(const MaxSimParams& p, float* smem, int64_t q0, int64_t v, int len_v,
                                            const float (&qscale)[RM], float (&best)[RM], int (&arg)[RM]) {
  constexpr int RN = BC / 16;
  float* Qs = smem;                  // [BK][BQ + 1]
  float* Cs = smem + BK * (BQ + 1);  // [BK][BC + 1]
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const T* qp = static_cast<const T*>(p.queries.ptr);
  const T* cp = static_cast<const T*>(p.clips.ptr) + v * p.clips.stride[0];
#pragma unroll
  for (int a = 0; a < RM; ++a) {
    best[a] = -INFINITY;
    arg[a] = 0;
  }
  for (int c0 = 0; c0 < len_v; c0 += BC) {
    float acc[RM][RN];
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
    // Columns in increasing clip order: a strict > keeps the lowest clip on ties.
#pragma unroll
    for (int c = 0; c < RN; ++c) {
      const int l = c0 + tx + 16 * c;
      if (l >= len_v) continue;
      const float cscale = p.normalize ? inv_norm(p.clip_norms[v * p.L + l]) : 1.f;
#pragma unroll
      for (int a = 0; a < RM; ++a) {
        const float sim = acc[a][c] * qscale[a] * cscale;
        if (sim > best[a]) {
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
