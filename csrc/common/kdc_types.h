// Host-side types shared by the torch-free kernels (.cu) and the torch bindings (.cpp).
// Nothing here includes torch: the .cu files compile with plain nvcc.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace kdc {

// Element type of the floating-point inputs; accumulation is always fp32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A read-only tensor of rank <= 4 described by its data pointer and element strides
// (any strides, including 0 for expanded dimensions).
struct ConstStrided {
  const void* ptr = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
};

}  // namespace kdc
