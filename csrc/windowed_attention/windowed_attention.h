// Torch-free launchers of the windowed_attention kernels (see windowed_attention.cu).
//
// For batch b, head h, query i, key j (0-based):
//   logit[i, j] = scale * <q_i, k_j> + rel_bias[h, clamp(j - i, -R, R) + R]
//                 - (i - j)^2 / (2 * sigma[b, h, i]^2)
//   key j is excluded when j >= lengths[b] or |i - j| > cutoff * sigma[b, h, i]
//   out[i] = softmax_j(logit[i, :]) @ v  for i < lengths[b], 0 otherwise
#pragma once

#include <cstdint>

#include "common/kdc_types.h"

namespace kdc {

struct WindowAttnFwdParams {
  DType dtype = DType::kFloat32;
  int B = 0, H = 0, L = 0, D = 0;
  ConstStrided q, k, v;             // [B, H, L, D], dtype, any strides
  const float* rel_bias = nullptr;  // [H, 2R+1] contiguous fp32, or nullptr
  int R = 0;
  const float* sigma = nullptr;     // [B, H, L] contiguous fp32 (> 0), or nullptr
  const int64_t* lengths = nullptr; // [B] in [0, L] (clamped), or nullptr (all L); 0: zero output
  float scale = 1.f;
  float cutoff = 0.f;               // > 0: hard window |i - j| <= cutoff * sigma_i (needs sigma)
  void* out = nullptr;              // [B, H, L, D] contiguous, dtype
  float* lse = nullptr;             // [B, H, L] contiguous fp32: log-sum-exp of each valid row
  // bf16 / fp16 with D <= 128 run on tensor cores unless this is false (then, like fp32 and
  // D > 128, on the fp32 SIMT kernels).
  bool tensor_cores = true;
};

struct WindowAttnBwdParams {
  WindowAttnFwdParams fwd;          // the forward's inputs; fwd.out / fwd.lse are read here
  ConstStrided grad_out;            // [B, H, L, D], dtype, any strides
  void* grad_q = nullptr;           // [B, H, L, D] contiguous, dtype
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  float* grad_rel_bias = nullptr;   // [H, 2R+1] contiguous fp32 (when rel_bias is given)
  float* grad_sigma = nullptr;      // [B, H, L] contiguous fp32 (when sigma is given)
  // Workspace (see window_attn_bwd_workspace): fp32 [B*H*L] row terms rowsum(dO * O),
  // int32 [B*H*nqb] window half-width of each query block, fp32 partial bias tables.
  float* delta = nullptr;
  int* block_window = nullptr;
  float* bias_partial = nullptr;
};

// Largest head dimension the kernels support.
constexpr int kWindowAttnMaxD = 256;

// Sizes (in elements) of the backward workspace buffers for these shapes.
struct WindowAttnWorkspace {
  int64_t delta = 0;         // fp32
  int64_t block_window = 0;  // int32
  int64_t bias_partial = 0;  // fp32 (0 without rel_bias)
};
WindowAttnWorkspace window_attn_bwd_workspace(int B, int H, int L, int D, int R, bool has_bias);

cudaError_t window_attn_fwd(const WindowAttnFwdParams& p, cudaStream_t stream);

// The tensor-core kernels (windowed_attention_tc_*.cu): whether they take this case, and their
// launchers (window_attn_fwd / window_attn_bwd call them when they do).
bool window_attn_tc_supported(const WindowAttnFwdParams& p);
cudaError_t window_attn_tc_fwd(const WindowAttnFwdParams& p, cudaStream_t stream);
cudaError_t window_attn_tc_bwd(const WindowAttnBwdParams& p, cudaStream_t stream);
cudaError_t window_attn_bwd(const WindowAttnBwdParams& p, cudaStream_t stream);

}  // namespace kdc
