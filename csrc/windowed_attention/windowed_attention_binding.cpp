// Torch binding of the windowed_attention CUDA kernels: checks the inputs, allocates outputs and
// workspace, launches on the current stream. Registered as the private ops kdc::<name>_kernel that
// the public ops' Python kernels call after their own checks. Schemas (declared in Python, _cuda.py):
//   kdc::cuda_windowed_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? rel_bias, Tensor? sigma,
//       Tensor? lengths, float scale, float? cutoff) -> (Tensor out, Tensor lse)
//   kdc::cuda_windowed_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? rel_bias,
//       Tensor? sigma, Tensor? lengths, Tensor out, Tensor lse, float scale, float? cutoff)
//       -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_rel_bias, Tensor grad_sigma)
#include <cmath>
#include <tuple>

#include "common/binding.h"
#include "windowed_attention/windowed_attention.h"

namespace kdc {
namespace {

struct Inputs {
  WindowAttnFwdParams params;
  // Converted copies the params point into (kept alive for the launch).
  std::optional<at::Tensor> bias, sigma, lengths;
};

Inputs check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& rel_bias, const std::optional<at::Tensor>& sigma,
                    const std::optional<at::Tensor>& lengths, double scale, std::optional<double> cutoff) {
  const char* layout = "[B, H, L, D]";
  check_rank(q, "q", 4, layout);
  TORCH_CHECK(on_kernel_device(q), "q must be a ", device_kind(), " tensor, got a tensor on ", q.device());
  const DType dtype = dtype_of(q, "q");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  check_like(k, "k", q, "q", layout);
  check_like(v, "v", q, "q", layout);
  TORCH_CHECK(D >= 1 && D <= kWindowAttnMaxD, "the CUDA windowed_attention kernels support a head dimension 1 <= D <= ",
              kWindowAttnMaxD, ", got D = ", D);
  check_fits_int(B, "B");
  check_fits_int(H, "H");
  check_fits_int(L, "L");
  check_fits_int(B * H * L, "B * H * L");
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);

  Inputs in;
  WindowAttnFwdParams& p = in.params;
  p.dtype = dtype;
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.L = static_cast<int>(L);
  p.D = static_cast<int>(D);
  p.q = strided<4>(q);
  p.k = strided<4>(k);
  p.v = strided<4>(v);
  p.scale = static_cast<float>(scale);
  p.tensor_cores = !env_flag("KDC_CUDA_NO_TENSOR_CORES");
  if (rel_bias.has_value()) {
    const at::Tensor& t = *rel_bias;
    check_rank(t, "rel_bias", 2, "[H, 2R+1]");
    check_device(t, "rel_bias", q, "q");
    check_floating(t, "rel_bias");
    TORCH_CHECK(t.size(0) == H && t.size(1) % 2 == 1,
                "rel_bias must have shape [H, 2R+1] with H = ", H, " and an odd number of columns, got ", t.sizes());
    check_fits_int(t.size(1), "2R+1");
    in.bias = t.to(at::kFloat).contiguous();
    p.rel_bias = in.bias->data_ptr<float>();
    p.R = static_cast<int>((t.size(1) - 1) / 2);
  }
  if (sigma.has_value()) {
    const at::Tensor& t = *sigma;
    check_rank(t, "sigma", 3, "[B, H, L]");
    check_device(t, "sigma", q, "q");
    check_floating(t, "sigma");
    check_shape(t, "sigma", {B, H, L}, "[B, H, L]");
    in.sigma = t.to(at::kFloat).contiguous();
    p.sigma = in.sigma->data_ptr<float>();
  }
  in.lengths = lengths_int64(lengths, B, "B", q);
  if (in.lengths.has_value()) p.lengths = in.lengths->data_ptr<int64_t>();
  if (cutoff.has_value()) {
    TORCH_CHECK(std::isfinite(*cutoff) && *cutoff > 0, "cutoff must be a finite number > 0, got ", *cutoff);
    TORCH_CHECK(sigma.has_value(), "cutoff needs sigma: the window is |i - j| <= cutoff * sigma[b, h, i]");
    p.cutoff = static_cast<float>(*cutoff);
  }
  return in;
}

std::tuple<at::Tensor, at::Tensor> windowed_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v,
                                                          const std::optional<at::Tensor>& rel_bias,
                                                          const std::optional<at::Tensor>& sigma,
                                                          const std::optional<at::Tensor>& lengths, double scale,
                                                          std::optional<double> cutoff) {
  const DeviceGuard guard(q.device());
  Inputs in = check_inputs(q, k, v, rel_bias, sigma, lengths, scale, cutoff);
  WindowAttnFwdParams& p = in.params;
  at::Tensor out = new_output({p.B, p.H, p.L, p.D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = new_output({p.B, p.H, p.L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};  // B, H or L is 0: nothing to compute
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  check_launch(window_attn_fwd(p, current_stream(q)), "windowed_attention forward kernel");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> windowed_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& rel_bias, const std::optional<at::Tensor>& sigma,
    const std::optional<at::Tensor>& lengths, const at::Tensor& out, const at::Tensor& lse, double scale,
    std::optional<double> cutoff) {
  const DeviceGuard guard(q.device());
  Inputs in = check_inputs(q, k, v, rel_bias, sigma, lengths, scale, cutoff);
  WindowAttnBwdParams p;
  p.fwd = in.params;
  const WindowAttnFwdParams& f = p.fwd;
  const char* layout = "[B, H, L, D]";
  check_like(grad_out, "grad_out", q, "q", layout);
  check_like(out, "out", q, "q", layout);
  TORCH_CHECK(out.is_contiguous(), "out must be the forward's (contiguous) output");
  check_device(lse, "lse", q, "q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), "lse must be the forward's float32 output");
  check_shape(lse, "lse", {f.B, f.H, f.L}, "[B, H, L]");
  p.fwd.out = out.data_ptr();
  p.fwd.lse = lse.data_ptr<float>();
  p.grad_out = strided<4>(grad_out);

  const auto options = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_q = new_output(q.sizes(), options);
  at::Tensor grad_k = new_output(q.sizes(), options);
  at::Tensor grad_v = new_output(q.sizes(), options);
  const auto f32 = q.options().dtype(at::kFloat);
  // (Pointers of empty tensors are null: whether rel_bias / sigma were given is read from the arguments.)
  at::Tensor grad_bias = rel_bias.has_value() ? new_output({f.H, 2 * f.R + 1}, f32) : at::empty({0}, f32);
  at::Tensor grad_sigma = sigma.has_value() ? new_output({f.B, f.H, f.L}, f32) : at::empty({0}, f32);
  if (grad_q.numel() == 0) {  // B, H or L is 0: empty gradients, and a zero bias-table gradient
    if (rel_bias.has_value()) grad_bias.zero_();
    return {grad_q, grad_k, grad_v, grad_bias, grad_sigma};
  }
  p.grad_q = grad_q.data_ptr();
  p.grad_k = grad_k.data_ptr();
  p.grad_v = grad_v.data_ptr();
  p.grad_rel_bias = f.rel_bias != nullptr ? grad_bias.data_ptr<float>() : nullptr;
  p.grad_sigma = f.sigma != nullptr ? grad_sigma.data_ptr<float>() : nullptr;

  const WindowAttnWorkspace ws = window_attn_bwd_workspace(f.B, f.H, f.L, f.D, f.R, f.rel_bias != nullptr);
  at::Tensor delta = at::empty({ws.delta}, f32);
  at::Tensor block_window = at::empty({ws.block_window}, q.options().dtype(at::kInt));
  at::Tensor bias_partial = at::empty({ws.bias_partial}, f32);
  p.delta = delta.data_ptr<float>();
  p.block_window = block_window.data_ptr<int>();
  p.bias_partial = ws.bias_partial > 0 ? bias_partial.data_ptr<float>() : nullptr;
  check_launch(window_attn_bwd(p, current_stream(q)), "windowed_attention backward kernels");
  return {grad_q, grad_k, grad_v, grad_bias, grad_sigma};
}

}  // namespace
}  // namespace kdc

TORCH_LIBRARY_IMPL(kdc, KDC_BACKEND, m) {
  m.impl("cuda_windowed_attention_fwd_kernel", &kdc::windowed_attention_fwd);
  m.impl("cuda_windowed_attention_bwd_kernel", &kdc::windowed_attention_bwd);
}
