// Torch-free launchers of the max_similarity / max_similarity_topk kernels.
//
//   q^ = q / max(|q|, 1e-12), c^ = c / max(|c|, 1e-12)        (normalize; otherwise q^ = q, c^ = c)
//   score[n, v] = max over l < lengths[v] of <q^_n, c^_{v,l}>   (fp32)
//   index[n, v] = the lowest l attaining it
//   topk: per query the k best videos, descending score, ties -> lower video index
#pragma once

#include <cstdint>

#include "common/kdc_types.h"

namespace kdc {

struct MaxSimParams {
  DType dtype = DType::kFloat32;
  int64_t Nq = 0, Nv = 0;
  int L = 0, D = 0;
  ConstStrided queries;              // [Nq, D], dtype, any strides
  ConstStrided clips;                // [Nv, L, D], dtype, any strides
  const int64_t* lengths = nullptr;  // [Nv] in [0, L] (clamped), or nullptr (all L); 0: score -inf, index 0
  bool normalize = true;
  // With normalize: the L2 norms, fp32 [Nq] and [Nv * L]. Written by max_sim_fwd and
  // max_sim_topk, read by max_sim_bwd (pass the forward's).
  float* query_norms = nullptr;
  float* clip_norms = nullptr;
  // bf16 / fp16 scoring on the mma.sync tensor-core path (tc_score.cuh) unless false (then the
  // WMMA path of score_tile.cuh).
  bool tensor_cores = true;
};

// score: fp32 [Nq, Nv] contiguous; index: int64 [Nq, Nv] contiguous.
cudaError_t max_sim_fwd(const MaxSimParams& p, float* score, int64_t* index, cudaStream_t stream);

struct MaxSimBwdParams {
  MaxSimParams in;                // the forward's inputs and norms
  const float* grad = nullptr;    // d score, fp32 [Nq, Nv], any strides
  int64_t grad_stride[2] = {0, 0};
  const int32_t* index_t = nullptr;  // the forward's index, transposed: int32 [Nv, Nq] contiguous
  const int64_t* index = nullptr;    // the forward's index: int64 [Nq, Nv] contiguous
  void* grad_queries = nullptr;      // [Nq, D] contiguous, dtype
  void* grad_clips = nullptr;        // [Nv, L, D] contiguous, dtype
};

// Largest embedding size the backward supports (its per-warp accumulators live in shared memory).
constexpr int kMaxSimBwdMaxD = 2048;

cudaError_t max_sim_bwd(const MaxSimBwdParams& p, cudaStream_t stream);

// max_similarity_topk: videos are scored in splits of `split_videos`; each split keeps the best
// min(k, split) videos of every query (sorted in shared memory), and a merge pass combines up to
// `splits_per_round` split lists with the running top-k. Queries are processed in chunks of
// `query_chunk` so the workspace stays bounded: never an [Nq, Nv] buffer.
struct TopkPlan {
  int split_videos = 0;
  int64_t splits = 0;
  int splits_per_round = 0;
  int64_t query_chunk = 0;
  int64_t partial_entries = 0;  // workspace: fp32 scores + int32 videos, each this many
  int64_t running_entries = 0;  // workspace: fp32 scores + int64 videos, each this many (may be 0)
};
constexpr int kTopkMaxSplitsPerRound = 31;                  // one merge list per lane, plus the running list
constexpr int64_t kTopkWorkspaceBytes = int64_t(256) << 20;  // bound of the split lists + running list
TopkPlan max_sim_topk_plan(int64_t Nq, int64_t Nv, int64_t k, int max_splits_per_round = kTopkMaxSplitsPerRound,
                           int64_t workspace_bytes = kTopkWorkspaceBytes);

struct TopkWorkspace {
  float* partial_scores = nullptr;
  int32_t* partial_videos = nullptr;
  float* running_scores = nullptr;
  int64_t* running_videos = nullptr;
};

// scores: fp32 [Nq, k] contiguous; videos: int64 [Nq, k] contiguous.
cudaError_t max_sim_topk(const MaxSimParams& p, int64_t k, const TopkPlan& plan, const TopkWorkspace& ws,
                         float* scores, int64_t* videos, cudaStream_t stream);

}  // namespace kdc
