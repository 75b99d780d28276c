// Helpers shared by the torch bindings (<op>_binding.cpp of each op): input checks with clear
// messages, tensor -> launcher descriptors, output allocation, stream and error handling.
//
// The schemas of the ops are declared in Python (kdc_kernels/ops/*/_cuda.py, with their fake
// implementations and autograd). The public ops kdc::cuda_* have Python kernels that check every
// argument and then call the private ops kdc::cuda_*_kernel registered here; the checks below are
// repeated so that a direct call of a private op is still refused cleanly.
//
// KDC_CUDA_EMULATION (tests only, see tests/cuda_emulation/) builds the same bindings for CPU
// tensors on top of an emulated CUDA runtime, registering them under the CPU dispatch key.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#ifndef KDC_CUDA_EMULATION
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define KDC_BACKEND CUDA
#else
#define KDC_BACKEND CPU
#endif

#include "common/kdc_types.h"

namespace kdc {

inline const char* device_kind() {
#ifndef KDC_CUDA_EMULATION
  return "CUDA";
#else
  return "CPU (CUDA emulation)";
#endif
}

inline bool on_kernel_device(const at::Tensor& t) {
#ifndef KDC_CUDA_EMULATION
  return t.is_cuda();
#else
  return t.is_cpu();
#endif
}

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(on_kernel_device(t), name, " must be a ", device_kind(), " tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

// Rank only: zero-size dimensions are allowed (empty inputs give empty outputs, as in torch);
// the bindings return before launching anything for them.
inline void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK(t.defined(), name, " must be a tensor ", layout, ", got an undefined tensor");
  TORCH_CHECK(t.dim() == rank, name, " must be a ", rank, "-D tensor ", layout, ", got shape ", t.sizes());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* layout) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", layout, " = ", expected, ", got ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              name, " must have dtype float32, float16 or bfloat16, got ", t.scalar_type());
}

inline DType dtype_of(const at::Tensor& t, const char* name) {
  check_floating(t, name);
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

// x has the rank, device, dtype and shape of ref.
inline void check_like(const at::Tensor& x, const char* name, const at::Tensor& ref, const char* ref_name,
                       const char* layout) {
  check_rank(x, name, ref.dim(), layout);
  check_device(x, name, ref, ref_name);
  check_same_dtype(x, name, ref, ref_name);
  check_shape(x, name, ref.sizes(), layout);
}

inline void check_fits_int(int64_t value, const char* what) {
  TORCH_CHECK(value <= std::numeric_limits<int>::max(), what, " must be below 2^31, got ", value);
}

// Optional [n] integer tensor of valid lengths -> int64 contiguous (values are checked by the
// Python API; the kernels clamp them to [0, L] so a bad value cannot fault).
inline std::optional<at::Tensor> lengths_int64(const std::optional<at::Tensor>& lengths, int64_t n, const char* dim,
                                               const at::Tensor& ref) {
  if (!lengths.has_value()) return std::nullopt;
  const at::Tensor& t = *lengths;
  TORCH_CHECK(t.defined(), "lengths must be a tensor [", dim, "] or None, got an undefined tensor");
  TORCH_CHECK(t.dim() == 1, "lengths must be a 1-D tensor [", dim, "], got shape ", t.sizes());
  TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()) &&
                  t.scalar_type() != at::kBool,
              "lengths must have an integer dtype, got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == n, "lengths must have shape [", dim, "] = (", n, ",), got ", t.sizes());
  check_device(t, "lengths", ref, "the inputs");
  return t.to(at::kLong).contiguous();
}

template <int N>
inline ConstStrided strided(const at::Tensor& t) {
  static_assert(N >= 1 && N <= 4, "rank 1..4");
  ConstStrided s;
  s.ptr = t.data_ptr();
  for (int i = 0; i < N; ++i) s.stride[i] = t.stride(i);
  return s;
}

// Test hook: with KDC_POISON_OUTPUTS=1 every output is filled with NaN (integers with -1) before
// the kernels run, so an element a kernel forgets to write fails the comparison with the reference.
inline bool env_flag(const char* name) {
  const char* raw = std::getenv(name);
  return raw != nullptr && (std::strcmp(raw, "1") == 0 || std::strcmp(raw, "true") == 0);
}

inline bool poison_outputs() { return env_flag("KDC_POISON_OUTPUTS"); }

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (poison_outputs() && t.numel() > 0) {
    if (at::isFloatingType(t.scalar_type())) {
      t.fill_(std::numeric_limits<float>::quiet_NaN());
    } else {
      t.fill_(-1);
    }
  }
  return t;
}

#ifndef KDC_CUDA_EMULATION
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }
#else
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline cudaStream_t current_stream(const at::Tensor&) { return nullptr; }
#endif

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidConfiguration
                  ? " (the shapes exceed a launch limit or the device lacks the shared memory these kernels need)"
                  : "");
}

}  // namespace kdc
