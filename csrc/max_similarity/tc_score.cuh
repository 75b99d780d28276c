// Tensor-core scoring loop of max_similarity and max_similarity_topk (bf16 / fp16; fp32 inputs keep
// the exact SIMT loop of score_tile.cuh): a small GEMM with a fused segmented max / argmax.
//
// A block is 4 warps and a tile of 64 queries, staged once in shared memory and kept there while
// the block walks its videos; each warp owns 16 queries. The clips of a video go through shared
// memory in tiles of BC (32 or 64) clips x D, double-buffered with 16-byte cp.async (tile t + 1
// loads while tile t is multiplied), element by element when the tensors do not allow 16-byte
// copies. Per tile a warp forms S = Q C^T with mma m16n8k16 (fp32 accumulation), scales it by
// the precomputed inverse norms (exact cosine without normalised copies), and folds it into a
// running (max, argmax) per query: each lane sees its clips in increasing order (strictly better
// keeps the lowest clip on ties, a NaN wins as in torch.max), and after the video's last tile the
// 4 lanes of a query combine theirs in the same order. Clips past a video's length are
// zero-filled and never read; a video of length 0 scores -inf with index 0.
#pragma once

#include "common/tensor_core.cuh"
#include "max_similarity/score_tile.cuh"

namespace kdc {
namespace msim_tc {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int BQ = 64;

// Largest embedding size of the tensor-core path (the query tile and two clip tiles must fit in
// shared memory next to each other); larger D uses the SIMT / WMMA kernels.
constexpr int kMaxD = 512;

// Padded embedding size (a multiple of 16) and shared row stride (+8: 16-byte aligned rows,
// conflict-free ldmatrix).
__host__ __device__ inline int padded_dim(int D) { return (D + 15) / 16 * 16; }
__host__ __device__ inline int row_stride(int D) { return padded_dim(D) + 8; }

// Clips per tile: 32 for short videos or large D (shared memory), else 64.
__host__ __device__ inline int clip_tile(int L, int D) { return (L <= 32 || D > 256) ? 32 : 64; }

// Shared bytes of score_videos<T, BC>: the query tile, two clip tiles, two rows of clip scales.
template <typename T>
__host__ __device__ inline size_t scoring_smem_bytes(int BC, int D) {
  return sizeof(T) * static_cast<size_t>(BQ + 2 * BC) * row_stride(D) + sizeof(float) * 2 * BC;
}

// Whether queries [Nq, D] and clips [Nv, L, D] can be staged with 16-byte cp.async.
__host__ inline bool vec16_ok(const MaxSimParams& p) {
  const auto qa = reinterpret_cast<uintptr_t>(p.queries.ptr), ca = reinterpret_cast<uintptr_t>(p.clips.ptr);
  return p.D % 8 == 0 && p.queries.stride[1] == 1 && p.queries.stride[0] % 8 == 0 && p.clips.stride[2] == 1 &&
         p.clips.stride[1] % 8 == 0 && p.clips.stride[0] % 8 == 0 && qa % 16 == 0 && ca % 16 == 0;
}

// Stages `rows` rows of a strided [rows, D] matrix (rows at or past nvalid, and columns past D up
// to the padded size, zero) into dst (row stride ld), by 16-byte cp.async (vec) or plain copies.
template <typename T>
__device__ __forceinline__ void stage_matrix(T* dst, int ld, const T* src, int64_t row_stride_g, int64_t col_stride,
                                             int rows, int64_t nvalid, int D, bool vec) {
  const int chunks = padded_dim(D) / 8;
  for (int e = threadIdx.x; e < rows * chunks; e += kThreads) {
    const int r = e / chunks, c = e % chunks;
    const bool ok = r < nvalid && c * 8 < D;
    T* d = dst + r * ld + c * 8;
    const T* s = ok ? src + r * row_stride_g + static_cast<int64_t>(c) * 8 * col_stride : src;
    if (vec) {
      tc::cp_async_16(d, s, ok);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) d[k] = (ok && c * 8 + k < D) ? s[k * col_stride] : from_f32<T>(0.f);
    }
  }
}

// Scores the block's queries q0 .. q0 + 63 against the videos [v_begin, v_end), calling
// emit(v, best, arg) once per video, in order, from every lane (best[h], arg[h]: the score and
// lowest argmax of query q0 + 16 warp + g + 8h, identical in the 4 lanes of a quad). Every thread
// of the block must call it (it synchronises). `smem` holds scoring_smem_bytes<T>(BC, D).
template <typename T, int BC, typename Emit>
__device__ __forceinline__ void score_videos(const MaxSimParams& p, char* smem, int64_t q0, int64_t v_begin,
                                             int64_t v_end, bool vec, Emit&& emit) {
  const int ld = row_stride(p.D);
  T* Qs = reinterpret_cast<T*>(smem);
  T* Cs = Qs + BQ * ld;  // two buffers of BC rows
  float* cscale_s = reinterpret_cast<float*>(Cs + 2 * BC * ld);  // two rows of BC
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int ksteps = padded_dim(p.D) / 16;
  const T* cbase = static_cast<const T*>(p.clips.ptr);

  stage_matrix<T>(Qs, ld, static_cast<const T*>(p.queries.ptr) + q0 * p.queries.stride[0], p.queries.stride[0],
                  p.queries.stride[1], BQ, p.Nq - q0, p.D, vec);
  float qscale[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = q0 + warp * 16 + g + 8 * h;
    qscale[h] = (p.normalize && n < p.Nq) ? msim::inv_norm(p.query_norms[n]) : 1.f;
  }

  // The work items are the (video, clip tile) pairs of the block's videos, in order; videos of
  // length 0 have none (they are emitted when the walk passes them).
  int64_t v = v_begin;
  int c0 = 0;
  auto skip_empty = [&](int64_t& vv, int& cc) {
    while (vv < v_end && cc >= msim::video_length(p.lengths, vv, p.L)) {
      ++vv;
      cc = 0;
    }
  };
  auto stage_item = [&](int64_t vv, int cc, int buf) {
    const int len_v = msim::video_length(p.lengths, vv, p.L);
    stage_matrix<T>(Cs + buf * BC * ld, ld, cbase + vv * p.clips.stride[0] + static_cast<int64_t>(cc) * p.clips.stride[1],
                    p.clips.stride[1], p.clips.stride[2], BC, len_v - cc, p.D, vec);
    for (int c = threadIdx.x; c < BC; c += kThreads) {
      const int l = cc + c;
      cscale_s[buf * BC + c] = l < len_v ? (p.normalize ? msim::inv_norm(p.clip_norms[vv * p.L + l]) : 1.f) : 0.f;
    }
  };
  skip_empty(v, c0);
  if (v < v_end) stage_item(v, c0, 0);
  tc::cp_async_commit();

  float best[2] = {-INFINITY, -INFINITY};
  int arg[2] = {0, 0};
  int64_t emitted = v_begin;  // videos before this one have been emitted
  for (int buf = 0; v < v_end; buf ^= 1) {
    // Emit the empty videos the walk skipped to reach v.
    for (; emitted < v; ++emitted) {
      const float nb[2] = {-INFINITY, -INFINITY};
      const int na[2] = {0, 0};
      emit(emitted, nb, na);
    }
    int64_t nv = v;
    int nc = c0 + BC;
    skip_empty(nv, nc);
    __syncthreads();  // every warp is done with buffer 1 - buf
    if (nv < v_end) stage_item(nv, nc, 1 - buf);
    tc::cp_async_commit();
    tc::cp_async_wait<1>();
    __syncthreads();

    float acc[BC / 8][4];
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const T* Ct = Cs + buf * BC * ld;
#pragma unroll 2
    for (int kk = 0; kk < ksteps; ++kk) {
      uint32_t a[4];
      tc::load_a(a, Qs, ld, warp * 16, kk * 16);
#pragma unroll
      for (int np = 0; np < BC / 16; ++np) {
        uint32_t b[4];
        tc::load_b_rows(b, Ct, ld, np * 16, kk * 16);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        tc::mma_16816<T>(acc[2 * np], a, b0);
        tc::mma_16816<T>(acc[2 * np + 1], a, b1);
      }
    }
    const int len_v = msim::video_length(p.lengths, v, p.L);
    const float* cs = cscale_s + buf * BC;
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = n * 8 + 2 * t + (e % 2), h = e / 2;
        if (c0 + c >= len_v) continue;
        const float sim = acc[n][e] * qscale[h] * cs[c];
        if (sim > best[h] || (isnan(sim) && !isnan(best[h]))) {
          best[h] = sim;
          arg[h] = c0 + c;
        }
      }
    }
    if (nv != v) {  // the video's last tile: combine the quad and emit
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
          const float ob = __shfl_xor_sync(kFullMask, best[h], off);
          const int oa = __shfl_xor_sync(kFullMask, arg[h], off);
          if (argmax_before(ob, oa, best[h], arg[h])) {
            best[h] = ob;
            arg[h] = oa;
          }
        }
      }
      emit(v, best, arg);
      emitted = v + 1;
      best[0] = best[1] = -INFINITY;
      arg[0] = arg[1] = 0;
    }
    v = nv;
    c0 = nc;
  }
  tc::cp_async_wait<0>();
  for (; emitted < v_end; ++emitted) {  // trailing empty videos
    const float nb[2] = {-INFINITY, -INFINITY};
    const int na[2] = {0, 0};
    emit(emitted, nb, na);
  }
}

}  // namespace msim_tc
}  // namespace kdc
