// max_similarity_topk: the k best videos of every query, without an [Nq, Nv] buffer.
//
// Order: higher score first, ties -> lower video index (a total order once NaN scores are ranked
// as -inf, so every selection below is exact and reproducible).
//
// 1. partial: one block per (64 queries, split of kSplit = 128 videos) scores its split into
//    shared memory (the max_similarity scoring loop: tensor cores with cp.async double buffering
//    and the query tile kept on chip for bf16 / fp16, see tc_score.cuh), then each warp sorts one
//    query's row with a bitonic network and writes the best min(k, split) (score, video) pairs.
// 2. merge: one warp per query merges the running top-k list and up to 31 split lists (one list
//    head per lane; a shuffle argmax picks the next best) into a new top-k list.
// Rounds of `splits_per_round` splits repeat 1 and 2; query chunks bound the workspace
// (kTopkWorkspaceBytes, 256 MB) whatever Nq, Nv and k.
#include <climits>

#include "max_similarity/tc_score.cuh"

namespace kdc {
namespace msim {

constexpr int kSplit = 128;  // videos per split (a power of two: the sort size)

// NaN ranks as -inf, so that the comparison is a total order.
__device__ __forceinline__ float rank_key(float s) { return isnan(s) ? -INFINITY : s; }

__device__ __forceinline__ bool better(float sa, int ia, float sb, int ib) {
  sa = rank_key(sa);
  sb = rank_key(sb);
  return sa > sb || (sa == sb && ia < ib);
}

// Sorts s[0, N), id[0, N) best-first (N a power of two), one warp.
__device__ __forceinline__ void warp_bitonic_sort(float* s, int* id, int N) {
  const int lane = threadIdx.x % 32;
  for (int size = 2; size <= N; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = lane; i < N; i += 32) {
        const int j = i ^ stride;
        if (j <= i) continue;
        const bool best_first = (i & size) == 0;
        const float si = s[i], sj = s[j];
        const int ii = id[i], ij = id[j];
        if (best_first ? better(sj, ij, si, ii) : better(si, ii, sj, ij)) {
          s[i] = sj;
          s[j] = si;
          id[i] = ij;
          id[j] = ii;
        }
      }
      __syncwarp();
    }
  }
}

struct TopkRound {
  int64_t k = 0;
  int64_t kcap = 0;          // capacity of a split list: min(k, kSplit)
  int64_t q_begin = 0;       // first query of this chunk
  int64_t q_count = 0;       // queries in this chunk
  int64_t split_begin = 0;   // first split of this round
  int nsplits = 0;           // splits in this round
  float* part_s = nullptr;   // [nsplits][q_count][kcap]
  int32_t* part_v = nullptr;
  const float* run_s = nullptr;  // [q_count][k] running list (nullptr in the first round)
  const int64_t* run_v = nullptr;
  int64_t run_count = 0;     // entries in each running list
  float* out_s = nullptr;    // [q_count][k]
  int64_t* out_v = nullptr;
  int64_t out_count = 0;     // entries written per query: min(k, videos seen so far)
};

__host__ __device__ inline int64_t split_size(int64_t split, int64_t Nv) {
  const int64_t rest = Nv - split * kSplit;
  return rest < kSplit ? rest : kSplit;
}

template <typename T, int BC>
__host__ __device__ constexpr int partial_smem_bytes() {
  // staging tiles, the [BQ][kSplit] score slab, one [kSplit] index row per warp
  return staging_bytes<T, BC>() + static_cast<int>(sizeof(float)) * BQ * kSplit +
         static_cast<int>(sizeof(int)) * (kThreads / 32) * kSplit;
}

// Each of the NWARPS warps sorts rows of the [BQ][kSplit] score slab (videos v0 .. v0 + count) best
// first and writes the best min(k, count) of each as the block's split list.
template <int NWARPS>
__device__ __forceinline__ void sort_rows(float* slab, int* ids, const TopkRound& r, int64_t q_local0, int64_t v0,
                                          int count) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int N = 1;
  while (N < count) N <<= 1;
  const int kk = static_cast<int>(r.kcap < count ? r.kcap : count);
  int* id = ids + warp * kSplit;
  for (int row = warp; row < BQ; row += NWARPS) {
    const int64_t q_local = q_local0 + row;
    if (q_local >= r.q_count) break;  // the same in the whole warp
    float* s = slab + row * kSplit;
    for (int t = lane; t < N; t += 32) {
      if (t < count) {
        id[t] = static_cast<int>(v0 + t);
      } else {  // padding sorts last
        s[t] = -INFINITY;
        id[t] = INT_MAX;
      }
    }
    __syncwarp();
    warp_bitonic_sort(s, id, N);
    const int64_t base = (static_cast<int64_t>(blockIdx.x) * r.q_count + q_local) * r.kcap;
    for (int t = lane; t < kk; t += 32) {
      r.part_s[base + t] = s[t];
      r.part_v[base + t] = id[t];
    }
    __syncwarp();  // `id` is rewritten for the next row
  }
}

template <typename T, int BC>
__global__ void __launch_bounds__(kThreads, 1) topk_partial_kernel(const MaxSimParams p, const TopkRound r) {
  char* smem = reinterpret_cast<char*>(dynamic_smem());
  float* slab = reinterpret_cast<float*>(smem + staging_bytes<T, BC>());
  int* ids = reinterpret_cast<int*>(slab + BQ * kSplit);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t split = r.split_begin + blockIdx.x;
  const int64_t v0 = split * kSplit;
  const int count = static_cast<int>(split_size(split, p.Nv));
  const int64_t q_local0 = static_cast<int64_t>(blockIdx.y) * BQ;  // within the chunk
  const int64_t q0 = r.q_begin + q_local0;

  float qscale[RM];
  query_scales(p, q0, ty, qscale);
  for (int vi = 0; vi < count; ++vi) {
    float best[RM];
    int arg[RM];
    score_video<T, BC>(p, smem, q0, v0 + vi, video_length(p.lengths, v0 + vi, p.L), qscale, best, arg);
    if (tx == 0) {
#pragma unroll
      for (int a = 0; a < RM; ++a) slab[(ty + 16 * a) * kSplit + vi] = best[a];
    }
  }
  __syncthreads();
  sort_rows<kThreads / 32>(slab, ids, r, q_local0, v0, count);
}

// The tensor-core partial kernel (bf16 / fp16): the same, scored by tc_score.cuh's loop.
template <typename T, int BC>
__global__ void __launch_bounds__(msim_tc::kThreads) topk_partial_tc_kernel(const MaxSimParams p, const TopkRound r,
                                                                           bool vec) {
  char* smem = reinterpret_cast<char*>(dynamic_smem());
  float* slab = reinterpret_cast<float*>(smem + msim_tc::scoring_smem_bytes<T>(BC, p.D));
  int* ids = reinterpret_cast<int*>(slab + BQ * kSplit);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t split = r.split_begin + blockIdx.x;
  const int64_t v0 = split * kSplit;
  const int count = static_cast<int>(split_size(split, p.Nv));
  const int64_t q_local0 = static_cast<int64_t>(blockIdx.y) * BQ;
  msim_tc::score_videos<T, BC>(p, smem, r.q_begin + q_local0, v0, v0 + count, vec,
                               [&](int64_t v, const float* best, const int*) {
                                 if (t != 0) return;
                                 slab[(warp * 16 + g) * kSplit + (v - v0)] = best[0];
                                 slab[(warp * 16 + g + 8) * kSplit + (v - v0)] = best[1];
                               });
  __syncthreads();
  sort_rows<msim_tc::kWarps>(slab, ids, r, q_local0, v0, count);
}

template <typename T>
__host__ __device__ inline size_t partial_tc_smem_bytes(int BC, int D) {
  return msim_tc::scoring_smem_bytes<T>(BC, D) + sizeof(float) * BQ * kSplit + sizeof(int) * msim_tc::kWarps * kSplit;
}

// One warp per query: lane 0 holds the running list, lanes 1..nsplits the split lists.
__global__ void __launch_bounds__(kThreads) topk_merge_kernel(const TopkRound r, int64_t Nv) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + warp;
  if (q >= r.q_count) return;  // whole warps leave

  // This lane's list: base pointer(s), length, read position.
  int64_t length = 0, pos = 0;
  const float* ls = nullptr;
  const int32_t* lv32 = nullptr;
  const int64_t* lv64 = nullptr;
  if (lane == 0) {
    if (r.run_s != nullptr) {
      length = r.run_count;
      ls = r.run_s + q * r.k;
      lv64 = r.run_v + q * r.k;
    }
  } else if (lane <= r.nsplits) {
    const int split_in_round = lane - 1;
    const int64_t cnt = split_size(r.split_begin + split_in_round, Nv);
    length = r.kcap < cnt ? r.kcap : cnt;
    const int64_t base = (static_cast<int64_t>(split_in_round) * r.q_count + q) * r.kcap;
    ls = r.part_s + base;
    lv32 = r.part_v + base;
  }
  auto head = [&](float& s, int& v) {
    if (pos < length) {
      s = ls[pos];
      v = lv64 != nullptr ? static_cast<int>(lv64[pos]) : lv32[pos];
    } else {  // exhausted: below every real entry
      s = -INFINITY;
      v = INT_MAX;
    }
  };
  float hs;
  int hv;
  head(hs, hv);
  float* out_s = r.out_s + q * r.k;
  int64_t* out_v = r.out_v + q * r.k;
  for (int64_t t = 0; t < r.out_count; ++t) {
    float bs = rank_key(hs);
    int bv = hv;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float os = __shfl_xor_sync(kFullMask, bs, off);
      const int ov = __shfl_xor_sync(kFullMask, bv, off);
      if (better(os, ov, bs, bv)) {
        bs = os;
        bv = ov;
      }
    }
    // Video indices are unique across the lists, so exactly one lane holds the winner.
    if (hv == bv && pos < length) {
      out_s[t] = hs;  // the stored score (a NaN stays NaN)
      out_v[t] = hv;
      ++pos;
      head(hs, hv);
    }
  }
}

template <typename T, int BC>
cudaError_t launch_topk(const MaxSimParams& p, int64_t k, const TopkPlan& plan, const TopkWorkspace& ws, float* scores,
                        int64_t* videos, cudaStream_t stream) {
  cudaError_t err = launch_norms<T>(p, stream);
  if (err != cudaSuccess) return err;
  constexpr size_t smem = partial_smem_bytes<T, BC>();
  auto partial = topk_partial_kernel<T, BC>;
  // bf16 / fp16: the tensor-core partial kernel when its shared memory fits the device.
  bool use_tc = false;
  int tc_bc = 0;
  size_t tc_smem = 0;
  const bool vec = msim_tc::vec16_ok(p);
  if constexpr (!std::is_same<T, float>::value) {
    if (p.tensor_cores && p.D <= msim_tc::kMaxD) {
      tc_bc = msim_tc::clip_tile(p.L, p.D);
      tc_smem = partial_tc_smem_bytes<T>(tc_bc, p.D);
      use_tc = tc_bc == 32 ? prepare_smem(topk_partial_tc_kernel<T, 32>, tc_smem) == cudaSuccess
                           : prepare_smem(topk_partial_tc_kernel<T, 64>, tc_smem) == cudaSuccess;
    }
  }
  if (!use_tc && (err = prepare_smem(partial, smem)) != cudaSuccess) return err;

  const int64_t rounds = ceil_div<int64_t>(plan.splits, plan.splits_per_round);
  for (int64_t q_begin = 0; q_begin < p.Nq; q_begin += plan.query_chunk) {
    TopkRound r;
    r.k = k;
    r.kcap = k < kSplit ? k : kSplit;
    r.q_begin = q_begin;
    r.q_count = p.Nq - q_begin < plan.query_chunk ? p.Nq - q_begin : plan.query_chunk;
    r.part_s = ws.partial_scores;
    r.part_v = ws.partial_videos;
    const int64_t qtiles = ceil_div<int64_t>(r.q_count, BQ);
    const int64_t mblocks = ceil_div<int64_t>(r.q_count, kThreads / 32);
    if (qtiles > 65535 || mblocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    int64_t seen = 0;
    for (int64_t round = 0; round < rounds; ++round) {
      r.split_begin = round * plan.splits_per_round;
      const int64_t left = plan.splits - r.split_begin;
      r.nsplits = static_cast<int>(left < plan.splits_per_round ? left : plan.splits_per_round);
      // Ping-pong so that the last round writes the outputs.
      const bool to_output = (rounds - 1 - round) % 2 == 0;
      r.run_s = round == 0 ? nullptr : (to_output ? ws.running_scores : scores + q_begin * k);
      r.run_v = round == 0 ? nullptr : (to_output ? ws.running_videos : videos + q_begin * k);
      r.run_count = seen < k ? seen : k;
      r.out_s = to_output ? scores + q_begin * k : ws.running_scores;
      r.out_v = to_output ? videos + q_begin * k : ws.running_videos;
      for (int s = 0; s < r.nsplits; ++s) seen += split_size(r.split_begin + s, p.Nv);
      r.out_count = seen < k ? seen : k;

      const dim3 grid(r.nsplits, static_cast<unsigned>(qtiles));
      if constexpr (!std::is_same<T, float>::value) {
        if (use_tc && tc_bc == 32) {
          topk_partial_tc_kernel<T, 32><<<grid, msim_tc::kThreads, tc_smem, stream>>>(p, r, vec);
        } else if (use_tc) {
          topk_partial_tc_kernel<T, 64><<<grid, msim_tc::kThreads, tc_smem, stream>>>(p, r, vec);
        }
      }
      if (!use_tc) partial<<<grid, kThreads, smem, stream>>>(p, r);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      topk_merge_kernel<<<static_cast<unsigned>(mblocks), kThreads, 0, stream>>>(r, p.Nv);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

}  // namespace msim

TopkPlan max_sim_topk_plan(int64_t Nq, int64_t Nv, int64_t k, int max_splits_per_round, int64_t workspace_bytes) {
  TopkPlan plan;
  max_splits_per_round = max_splits_per_round < 1 ? 1 : (max_splits_per_round > 31 ? 31 : max_splits_per_round);
  plan.split_videos = msim::kSplit;
  plan.splits = ceil_div<int64_t>(Nv, msim::kSplit);
  plan.splits_per_round = static_cast<int>(plan.splits < max_splits_per_round ? plan.splits : max_splits_per_round);
  const int64_t kcap = k < msim::kSplit ? k : msim::kSplit;
  const int64_t rounds = ceil_div<int64_t>(plan.splits, plan.splits_per_round);
  // Bytes per query: split lists (fp32 + int32) and, with several rounds, a running list (fp32 + int64).
  const int64_t per_query = plan.splits_per_round * kcap * 8 + (rounds > 1 ? k * 12 : 0);
  int64_t chunk = workspace_bytes / (per_query > 0 ? per_query : 1);
  chunk = chunk / msim::BQ * msim::BQ;
  if (chunk < msim::BQ) chunk = msim::BQ;
  if (chunk > int64_t(65535) * msim::BQ) chunk = int64_t(65535) * msim::BQ;  // grid.y limit
  if (chunk > Nq) chunk = Nq;
  plan.query_chunk = chunk;
  plan.partial_entries = plan.splits_per_round * chunk * kcap;
  plan.running_entries = rounds > 1 ? chunk * k : 0;
  return plan;
}

cudaError_t max_sim_topk(const MaxSimParams& p, int64_t k, const TopkPlan& plan, const TopkWorkspace& ws,
                         float* scores, int64_t* videos, cudaStream_t stream) {
  if (p.Nq < 1 || p.Nv < 1 || p.L < 1 || p.D < 1 || k < 1 || k > p.Nv) return cudaErrorInvalidValue;
  if (p.Nv >= INT_MAX || plan.query_chunk < 1 || plan.splits_per_round < 1) return cudaErrorInvalidValue;
  if (ws.partial_scores == nullptr || ws.partial_videos == nullptr) return cudaErrorInvalidValue;
  if (plan.running_entries > 0 && (ws.running_scores == nullptr || ws.running_videos == nullptr)) {
    return cudaErrorInvalidValue;
  }
  KDC_DISPATCH_DTYPE(p.dtype, {
    if (p.L <= 32) return msim::launch_topk<scalar_t, 32>(p, k, plan, ws, scores, videos, stream);
    return msim::launch_topk<scalar_t, 64>(p, k, plan, ws, scores, videos, stream);
  });
  return cudaErrorInvalidValue;
}

}  // namespace kdc
