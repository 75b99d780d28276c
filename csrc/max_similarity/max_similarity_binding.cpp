// Torch binding of the max_similarity / max_similarity_topk CUDA kernels, registered as the
// private ops kdc::<name>_kernel that the public ops' Python kernels call after their own checks.
// Schemas (declared in Python, _cuda.py):
//   kdc::cuda_max_similarity_fwd(Tensor queries, Tensor clips, Tensor? lengths, bool normalize)
//       -> (Tensor score, Tensor index, Tensor query_norms, Tensor clip_norms)
//   kdc::cuda_max_similarity_bwd(Tensor grad_score, Tensor queries, Tensor clips, Tensor? lengths,
//       Tensor index, Tensor query_norms, Tensor clip_norms, bool normalize)
//       -> (Tensor grad_queries, Tensor grad_clips)
//   kdc::cuda_max_similarity_topk(Tensor queries, Tensor clips, Tensor? lengths, int k,
//       bool normalize) -> (Tensor scores, Tensor videos)
// The norms are fp32 [Nq] and [Nv, L] with normalize, empty [0] tensors without.
#include <cstdlib>
#include <tuple>

#include "common/binding.h"
#include "max_similarity/max_similarity.h"

namespace kdc {
namespace {

struct Inputs {
  MaxSimParams params;
  std::optional<at::Tensor> lengths;  // int64 copy the params point into
};

Inputs check_inputs(const at::Tensor& queries, const at::Tensor& clips, const std::optional<at::Tensor>& lengths,
                    bool normalize) {
  check_rank(queries, "queries", 2, "[Nq, D]");
  TORCH_CHECK(on_kernel_device(queries), "queries must be a ", device_kind(), " tensor, got a tensor on ",
              queries.device());
  check_rank(clips, "clips", 3, "[Nv, L, D]");
  check_device(clips, "clips", queries, "queries");
  check_same_dtype(clips, "clips", queries, "queries");
  TORCH_CHECK(clips.size(2) == queries.size(1), "clips must have the embedding size D of queries (",
              queries.size(1), ") in [Nv, L, D], got clips of shape ", clips.sizes());
  check_fits_int(clips.size(1), "L");
  check_fits_int(clips.size(2), "D");
  check_fits_int(clips.size(0), "Nv");
  TORCH_CHECK(clips.size(1) >= 1 && clips.size(2) >= 1, "the CUDA max_similarity kernels need L >= 1 and D >= 1, "
              "got clips of shape ", clips.sizes());
  Inputs in;
  MaxSimParams& p = in.params;
  p.dtype = dtype_of(queries, "queries");
  p.Nq = queries.size(0);
  p.Nv = clips.size(0);
  p.L = static_cast<int>(clips.size(1));
  p.D = static_cast<int>(clips.size(2));
  p.queries = strided<2>(queries);
  p.clips = strided<3>(clips);
  p.normalize = normalize;
  p.tensor_cores = !env_flag("KDC_CUDA_NO_TENSOR_CORES");
  in.lengths = lengths_int64(lengths, p.Nv, "Nv", queries);
  if (in.lengths.has_value()) p.lengths = in.lengths->data_ptr<int64_t>();
  return in;
}

// Norm buffers of the forward: fp32 [Nq] and [Nv, L] with normalize, empty without.
std::pair<at::Tensor, at::Tensor> new_norms(MaxSimParams& p, const at::Tensor& queries) {
  const auto f32 = queries.options().dtype(at::kFloat);
  if (!p.normalize) return {at::empty({0}, f32), at::empty({0}, f32)};
  at::Tensor qn = new_output({p.Nq}, f32), cn = new_output({p.Nv, p.L}, f32);
  p.query_norms = qn.data_ptr<float>();
  p.clip_norms = cn.data_ptr<float>();
  return {qn, cn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> max_similarity_fwd(
    const at::Tensor& queries, const at::Tensor& clips, const std::optional<at::Tensor>& lengths, bool normalize) {
  const DeviceGuard guard(queries.device());
  Inputs in = check_inputs(queries, clips, lengths, normalize);
  MaxSimParams& p = in.params;
  TORCH_CHECK((p.Nq + 63) / 64 <= 65535, "the CUDA max_similarity kernels support Nq <= ", 65535 * 64,
              ", got Nq = ", p.Nq);
  auto [qn, cn] = new_norms(p, queries);
  at::Tensor score = new_output({p.Nq, p.Nv}, queries.options().dtype(at::kFloat));
  at::Tensor index = new_output({p.Nq, p.Nv}, queries.options().dtype(at::kLong));
  if (score.numel() == 0) return {score, index, qn, cn};  // Nq or Nv is 0
  check_launch(max_sim_fwd(p, score.data_ptr<float>(), index.data_ptr<int64_t>(), current_stream(queries)),
               "max_similarity forward kernel");
  return {score, index, qn, cn};
}

std::tuple<at::Tensor, at::Tensor> max_similarity_bwd(const at::Tensor& grad_score, const at::Tensor& queries,
                                                      const at::Tensor& clips,
                                                      const std::optional<at::Tensor>& lengths,
                                                      const at::Tensor& index, const at::Tensor& query_norms,
                                                      const at::Tensor& clip_norms, bool normalize) {
  const DeviceGuard guard(queries.device());
  Inputs in = check_inputs(queries, clips, lengths, normalize);
  MaxSimBwdParams p;
  p.in = in.params;
  const MaxSimParams& f = p.in;
  TORCH_CHECK(f.D <= kMaxSimBwdMaxD, "the CUDA max_similarity backward supports D <= ", kMaxSimBwdMaxD,
              ", got D = ", f.D);
  check_rank(grad_score, "grad_score", 2, "[Nq, Nv]");
  check_device(grad_score, "grad_score", queries, "queries");
  check_shape(grad_score, "grad_score", {f.Nq, f.Nv}, "[Nq, Nv]");
  const at::Tensor grad = grad_score.to(at::kFloat);
  check_device(index, "index", queries, "queries");
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be the forward's int64 index, got ", index.scalar_type());
  check_shape(index, "index", {f.Nq, f.Nv}, "[Nq, Nv]");
  const at::Tensor index_c = index.contiguous();
  const at::Tensor index_t = index.t().to(at::kInt).contiguous();  // [Nv, Nq]: per video, queries in order
  if (normalize) {
    for (const auto& [t, name] : {std::pair<at::Tensor, const char*>{query_norms, "query_norms"},
                                  {clip_norms, "clip_norms"}}) {
      check_device(t, name, queries, "queries");
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), name, " must be the forward's float32 norms");
    }
    TORCH_CHECK(query_norms.numel() == f.Nq && clip_norms.numel() == f.Nv * f.L,
                "query_norms / clip_norms must hold Nq and Nv * L norms, got ", query_norms.sizes(), " and ",
                clip_norms.sizes());
    p.in.query_norms = query_norms.data_ptr<float>();
    p.in.clip_norms = clip_norms.data_ptr<float>();
  }
  p.grad = grad.data_ptr<float>();
  p.grad_stride[0] = grad.stride(0);
  p.grad_stride[1] = grad.stride(1);
  p.index = index_c.data_ptr<int64_t>();
  p.index_t = index_t.data_ptr<int32_t>();
  const auto options = queries.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_queries = new_output(queries.sizes(), options);
  at::Tensor grad_clips = new_output(clips.sizes(), options);
  if (f.Nq == 0 || f.Nv == 0) {  // no score: zero gradients
    grad_queries.zero_();
    grad_clips.zero_();
    return {grad_queries, grad_clips};
  }
  p.grad_queries = grad_queries.data_ptr();
  p.grad_clips = grad_clips.data_ptr();
  check_launch(max_sim_bwd(p, current_stream(queries)), "max_similarity backward kernels");
  return {grad_queries, grad_clips};
}

std::tuple<at::Tensor, at::Tensor> max_similarity_topk(const at::Tensor& queries, const at::Tensor& clips,
                                                       const std::optional<at::Tensor>& lengths, int64_t k,
                                                       bool normalize) {
  const DeviceGuard guard(queries.device());
  Inputs in = check_inputs(queries, clips, lengths, normalize);
  MaxSimParams& p = in.params;
  TORCH_CHECK(k >= 1 && k <= p.Nv, "k must lie in [1, Nv] = [1, ", p.Nv, "], got ", k);
  if (p.Nq == 0) {
    return {new_output({0, k}, queries.options().dtype(at::kFloat)), new_output({0, k}, queries.options().dtype(at::kLong))};
  }
  auto norms = new_norms(p, queries);  // scratch: only the kernels read them
  // Test hooks: force several merge rounds and query chunks on small problems.
  const char* round_splits = std::getenv("KDC_TOPK_ROUND_SPLITS");
  const char* workspace = std::getenv("KDC_TOPK_WORKSPACE_BYTES");
  const TopkPlan plan = max_sim_topk_plan(p.Nq, p.Nv, k,
                                          round_splits != nullptr ? std::atoi(round_splits) : kTopkMaxSplitsPerRound,
                                          workspace != nullptr ? std::atoll(workspace) : kTopkWorkspaceBytes);
  const auto f32 = queries.options().dtype(at::kFloat);
  at::Tensor part_s = at::empty({plan.partial_entries}, f32);
  at::Tensor part_v = at::empty({plan.partial_entries}, queries.options().dtype(at::kInt));
  at::Tensor run_s = at::empty({plan.running_entries}, f32);
  at::Tensor run_v = at::empty({plan.running_entries}, queries.options().dtype(at::kLong));
  TopkWorkspace ws;
  ws.partial_scores = part_s.data_ptr<float>();
  ws.partial_videos = part_v.data_ptr<int32_t>();
  if (plan.running_entries > 0) {
    ws.running_scores = run_s.data_ptr<float>();
    ws.running_videos = run_v.data_ptr<int64_t>();
  }
  at::Tensor scores = new_output({p.Nq, k}, f32);
  at::Tensor videos = new_output({p.Nq, k}, queries.options().dtype(at::kLong));
  check_launch(max_sim_topk(p, k, plan, ws, scores.data_ptr<float>(), videos.data_ptr<int64_t>(),
                            current_stream(queries)),
               "max_similarity_topk kernels");
  (void)norms;
  return {scores, videos};
}

}  // namespace
}  // namespace kdc

TORCH_LIBRARY_IMPL(kdc, KDC_BACKEND, m) {
  m.impl("cuda_max_similarity_fwd_kernel", &kdc::max_similarity_fwd);
  m.impl("cuda_max_similarity_bwd_kernel", &kdc::max_similarity_bwd);
  m.impl("cuda_max_similarity_topk_kernel", &kdc::max_similarity_topk);
}
