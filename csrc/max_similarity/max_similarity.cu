// max_similarity forward (score + lowest argmax per (query, video)) and backward.
//
// Forward: one block per (64 queries, group of videos); the [Nq, Nv, L] similarities are never
// written. bf16 / fp16 with D <= 512 run on tensor cores with cp.async double buffering (see
// tc_score.cuh); fp32 keeps the exact SIMT loop (score_tile.cuh), as do fp16 / bf16 with larger D
// (WMMA) or KDC_CUDA_NO_TENSOR_CORES=1. Backward, with g = d score and l* = index[n, v]:
//   d q^_n       = sum_v g[n, v] c^_{v, l*}          (one warp per query, videos in order)
//   d c^_{v, l}  = sum_{n : l* = l} g[n, v] q^_n     (one warp per (video, clip), queries in order:
//                                                   a ballot over the transposed index finds them)
// then the normalisation Jacobian d x = (d x^ - x^ <d x^, x^>) / |x| (|x| >= eps; d x^ / eps
// otherwise). Every sum has a fixed order and there are no atomics: bitwise reproducible.
#include "max_similarity/tc_score.cuh"

namespace kdc {
namespace msim {

constexpr int kVideosPerBlock = 4;

template <typename T, int BC>
__global__ void __launch_bounds__(kThreads, 1) max_sim_fwd_kernel(const MaxSimParams p, float* score, int64_t* index) {
  char* smem = reinterpret_cast<char*>(dynamic_smem());
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * BQ;
  const int64_t v_begin = static_cast<int64_t>(blockIdx.x) * kVideosPerBlock;
  const int64_t v_end = v_begin + kVideosPerBlock < p.Nv ? v_begin + kVideosPerBlock : p.Nv;
  float qscale[RM];
  query_scales(p, q0, ty, qscale);
  for (int64_t v = v_begin; v < v_end; ++v) {
    float best[RM];
    int arg[RM];
    score_video<T, BC>(p, smem, q0, v, video_length(p.lengths, v, p.L), qscale, best, arg);
    if (tx == 0) {
#pragma unroll
      for (int a = 0; a < RM; ++a) {
        const int64_t n = q0 + ty + 16 * a;
        if (n < p.Nq) {
          score[n * p.Nv + v] = best[a];
          index[n * p.Nv + v] = arg[a];
        }
      }
    }
  }
}

template <typename T, int BC>
cudaError_t launch_fwd(const MaxSimParams& p, float* score, int64_t* index, cudaStream_t stream) {
  cudaError_t err = launch_norms<T>(p, stream);
  if (err != cudaSuccess) return err;
  const int64_t gx = ceil_div<int64_t>(p.Nv, kVideosPerBlock), gy = ceil_div<int64_t>(p.Nq, BQ);
  if (gx > 0x7fffffff || gy > 65535) return cudaErrorInvalidConfiguration;
  constexpr size_t smem = staging_bytes<T, BC>();
  max_sim_fwd_kernel<T, BC><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, smem, stream>>>(
      p, score, index);
  return cudaGetLastError();
}

// The tensor-core forward (bf16 / fp16): one block per (64 queries, `vpb` consecutive videos); the
// query tile stays in shared memory across the block's videos (tc_score.cuh).
template <typename T, int BC>
__global__ void __launch_bounds__(msim_tc::kThreads) max_sim_tc_fwd_kernel(const MaxSimParams p, float* score,
                                                                          int64_t* index, int vpb, bool vec) {
  char* smem = reinterpret_cast<char*>(dynamic_smem());
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * msim_tc::BQ;
  const int64_t v_begin = static_cast<int64_t>(blockIdx.x) * vpb;
  const int64_t v_end = v_begin + vpb < p.Nv ? v_begin + vpb : p.Nv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  msim_tc::score_videos<T, BC>(p, smem, q0, v_begin, v_end, vec, [&](int64_t v, const float* best, const int* arg) {
    if (t != 0) return;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = q0 + warp * 16 + g + 8 * h;
      if (n < p.Nq) {
        score[n * p.Nv + v] = best[h];
        index[n * p.Nv + v] = arg[h];
      }
    }
  });
}

// Videos per block of the tensor-core forward: enough blocks to fill the GPU, else more videos per
// block (each block stages its query tile once).
inline int videos_per_block(int64_t Nq, int64_t Nv) {
  const int64_t qtiles = ceil_div<int64_t>(Nq, msim_tc::BQ);
  const int64_t vpb = ceil_div<int64_t>(qtiles * Nv, 1024);
  return static_cast<int>(vpb < 1 ? 1 : (vpb > 16 ? 16 : vpb));
}

// Launches the tensor-core forward; cudaErrorNotSupported when its shared memory exceeds what the
// device offers (the caller then runs the WMMA kernel).
template <typename T>
cudaError_t launch_tc_fwd(const MaxSimParams& p, float* score, int64_t* index, cudaStream_t stream) {
  cudaError_t err = launch_norms<T>(p, stream);
  if (err != cudaSuccess) return err;
  const int BC = msim_tc::clip_tile(p.L, p.D);
  const size_t smem = msim_tc::scoring_smem_bytes<T>(BC, p.D);
  const int vpb = videos_per_block(p.Nq, p.Nv);
  const int64_t gx = ceil_div<int64_t>(p.Nv, vpb), gy = ceil_div<int64_t>(p.Nq, msim_tc::BQ);
  if (gx > 0x7fffffff || gy > 65535) return cudaErrorInvalidConfiguration;
  const bool vec = msim_tc::vec16_ok(p);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  if (BC == 32) {
    auto kernel = max_sim_tc_fwd_kernel<T, 32>;
    if (prepare_smem(kernel, smem) != cudaSuccess) return cudaErrorNotSupported;
    kernel<<<grid, msim_tc::kThreads, smem, stream>>>(p, score, index, vpb, vec);
  } else {
    auto kernel = max_sim_tc_fwd_kernel<T, 64>;
    if (prepare_smem(kernel, smem) != cudaSuccess) return cudaErrorNotSupported;
    kernel<<<grid, msim_tc::kThreads, smem, stream>>>(p, score, index, vpb, vec);
  }
  return cudaGetLastError();
}

// Finishes one gradient row held in `acc` (this warp's shared-memory row of D floats): applies the
// normalisation Jacobian of row x (strided, `norm` its L2 norm) and writes it to `out`.
template <typename T>
__device__ __forceinline__ void finish_row(const float* acc, const T* x, int64_t x_stride, float norm, bool normalize,
                                           int D, T* out) {
  const int lane = threadIdx.x % 32;
  float coef = 0.f, scale = 1.f;
  if (normalize) {
    scale = inv_norm(norm);
    float dot = 0.f;
    for (int d = lane; d < D; d += 32) dot = fmaf(acc[d], load_f32(x, d * x_stride) * scale, dot);
    dot = group_sum<32>(dot);
    coef = norm >= kNormEps ? dot : 0.f;  // below eps the norm is clamped: a constant denominator
  }
  for (int d = lane; d < D; d += 32) {
    const float g = normalize ? (acc[d] - coef * load_f32(x, d * x_stride) * scale) * scale : acc[d];
    out[d] = from_f32<T>(g);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) max_sim_bwd_queries_kernel(const MaxSimBwdParams bp) {
  const MaxSimParams& p = bp.in;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + warp;
  if (n >= p.Nq) return;  // whole warps leave; no block barrier below
  float* acc = dynamic_smem() + warp * p.D;
  for (int d = lane; d < p.D; d += 32) acc[d] = 0.f;
  const T* cp = static_cast<const T*>(p.clips.ptr);
  for (int64_t v = 0; v < p.Nv; ++v) {
    if (video_length(p.lengths, v, p.L) == 0) continue;  // score -inf, no gradient (its index 0 is padding)
    int64_t l = bp.index[n * p.Nv + v];
    l = l < 0 ? 0 : (l >= p.L ? p.L - 1 : l);  // only a NaN forward could leave it out of range
    float w = bp.grad[n * bp.grad_stride[0] + v * bp.grad_stride[1]];
    if (p.normalize) w *= inv_norm(p.clip_norms[v * p.L + l]);
    const T* c = cp + v * p.clips.stride[0] + l * p.clips.stride[1];
    for (int d = lane; d < p.D; d += 32) acc[d] = fmaf(w, load_f32(c, d * p.clips.stride[2]), acc[d]);
  }
  const T* q = static_cast<const T*>(p.queries.ptr) + n * p.queries.stride[0];
  finish_row<T>(acc, q, p.queries.stride[1], p.normalize ? p.query_norms[n] : 1.f, p.normalize, p.D,
                static_cast<T*>(bp.grad_queries) + n * p.D);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) max_sim_bwd_clips_kernel(const MaxSimBwdParams bp) {
  const MaxSimParams& p = bp.in;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + warp;  // v * L + l
  if (row >= p.Nv * p.L) return;  // whole warps leave; no block barrier below
  const int64_t v = row / p.L;
  const int l = static_cast<int>(row % p.L);
  T* out = static_cast<T*>(bp.grad_clips) + row * p.D;
  if (l >= video_length(p.lengths, v, p.L)) {  // padded clip: never an argmax
    for (int d = lane; d < p.D; d += 32) out[d] = from_f32<T>(0.f);
    return;
  }
  float* acc = dynamic_smem() + warp * p.D;
  for (int d = lane; d < p.D; d += 32) acc[d] = 0.f;
  const T* qp = static_cast<const T*>(p.queries.ptr);
  const int32_t* idx = bp.index_t + v * p.Nq;
  for (int64_t n0 = 0; n0 < p.Nq; n0 += 32) {
    const int64_t n = n0 + lane;
    unsigned hits = __ballot_sync(kFullMask, n < p.Nq && idx[n < p.Nq ? n : 0] == l);
    while (hits != 0u) {  // the same mask in every lane: queries in increasing order
      const int src = __ffs(hits) - 1;
      hits &= hits - 1u;
      const int64_t m = n0 + src;
      float w = bp.grad[m * bp.grad_stride[0] + v * bp.grad_stride[1]];
      if (p.normalize) w *= inv_norm(p.query_norms[m]);
      const T* q = qp + m * p.queries.stride[0];
      for (int d = lane; d < p.D; d += 32) acc[d] = fmaf(w, load_f32(q, d * p.queries.stride[1]), acc[d]);
    }
  }
  const T* c = static_cast<const T*>(p.clips.ptr) + v * p.clips.stride[0] + l * p.clips.stride[1];
  finish_row<T>(acc, c, p.clips.stride[2], p.normalize ? p.clip_norms[row] : 1.f, p.normalize, p.D, out);
}

template <typename T>
cudaError_t launch_bwd(const MaxSimBwdParams& bp, cudaStream_t stream) {
  const MaxSimParams& p = bp.in;
  const size_t smem = sizeof(float) * (kThreads / 32) * p.D;
  const int per_block = kThreads / 32;
  const int64_t qblocks = ceil_div<int64_t>(p.Nq, per_block), cblocks = ceil_div<int64_t>(p.Nv * p.L, per_block);
  if (qblocks > 0x7fffffff || cblocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto qkernel = max_sim_bwd_queries_kernel<T>;
  auto ckernel = max_sim_bwd_clips_kernel<T>;
  cudaError_t err = prepare_smem(qkernel, smem);
  if (err != cudaSuccess) return err;
  if ((err = prepare_smem(ckernel, smem)) != cudaSuccess) return err;
  qkernel<<<static_cast<unsigned>(qblocks), kThreads, smem, stream>>>(bp);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  ckernel<<<static_cast<unsigned>(cblocks), kThreads, smem, stream>>>(bp);
  return cudaGetLastError();
}

}  // namespace msim

cudaError_t max_sim_fwd(const MaxSimParams& p, float* score, int64_t* index, cudaStream_t stream) {
  if (p.Nq < 1 || p.Nv < 1 || p.L < 1 || p.D < 1 || score == nullptr || index == nullptr) return cudaErrorInvalidValue;
  KDC_DISPATCH_DTYPE(p.dtype, {
    if constexpr (!std::is_same<scalar_t, float>::value) {
      if (p.tensor_cores && p.D <= msim_tc::kMaxD) {
        const cudaError_t err = msim::launch_tc_fwd<scalar_t>(p, score, index, stream);
        if (err != cudaErrorNotSupported) return err;
      }
    }
    if (p.L <= 32) return msim::launch_fwd<scalar_t, 32>(p, score, index, stream);
    return msim::launch_fwd<scalar_t, 64>(p, score, index, stream);
  });
  return cudaErrorInvalidValue;
}

cudaError_t max_sim_bwd(const MaxSimBwdParams& p, cudaStream_t stream) {
  const MaxSimParams& in = p.in;
  if (in.Nq < 1 || in.Nv < 1 || in.L < 1 || in.D < 1 || in.D > kMaxSimBwdMaxD) return cudaErrorInvalidValue;
  if (p.grad == nullptr || p.index == nullptr || p.index_t == nullptr) return cudaErrorInvalidValue;
  if (in.normalize && (in.query_norms == nullptr || in.clip_norms == nullptr)) return cudaErrorInvalidValue;
  KDC_DISPATCH_DTYPE(in.dtype, { return msim::launch_bwd<scalar_t>(p, stream); });
  return cudaErrorInvalidValue;
}

}  // namespace kdc
