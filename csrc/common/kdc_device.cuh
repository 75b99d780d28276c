// Device helpers shared by the kernels: dtype conversion, warp reductions, launch plumbing.
// CUDA headers only (no torch), so every .cu file compiles with `nvcc -c -std=c++17`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/kdc_types.h"

namespace kdc {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Loads element `offset` of a tensor of element type T, converted to fp32 (read-only cache path).
template <typename T>
__device__ __forceinline__ float load_f32(const T* base, int64_t offset) {
  return to_f32<T>(__ldg(base + offset));
}

// Butterfly reductions over groups of WIDTH consecutive lanes (WIDTH a power of two <= 32).
// Every lane of the group ends with the same, bitwise identical result (each step combines
// the same two values in both lanes, and + / max are commutative).
template <int WIDTH>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

template <int WIDTH>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, off));
  return x;
}

// Whether (a, ia) comes before (b, ib) in torch.max's order: NaN above everything (a NaN
// propagates, as torch.max does), then larger values, ties to the lower index. A total order,
// so a reduction with it is exact and the same in every lane.
__device__ __forceinline__ bool argmax_before(float a, int ia, float b, int ib) {
  const bool na = isnan(a), nb = isnan(b);
  if (na != nb) return na;
  return a > b || ((a == b || na) && ia < ib);
}

// (value, index) maximum in argmax_before's order over groups of WIDTH lanes: every lane of the
// group ends with the same winner.
template <int WIDTH>
__device__ __forceinline__ void group_argmax(float& value, int& index) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) {
    const float v = __shfl_xor_sync(kFullMask, value, off);
    const int i = __shfl_xor_sync(kFullMask, index, off);
    if (argmax_before(v, i, value, index)) {
      value = v;
      index = i;
    }
  }
}

// Dynamic shared memory of every kernel, as floats (128-byte aligned: WMMA tiles need 32).
__device__ __forceinline__ float* dynamic_smem() {
  extern __shared__ __align__(128) float kdc_dynamic_smem[];
  return kdc_dynamic_smem;
}

// Opts a kernel into more than 48 KB of dynamic shared memory when it needs it, and fails
// cleanly (instead of a launch error) when the device cannot provide it.
template <typename Kernel>
inline cudaError_t prepare_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int max_optin = 0;
  err = cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (bytes > static_cast<size_t>(max_optin)) return cudaErrorInvalidConfiguration;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

}  // namespace kdc

// Instantiates the body (the variadic argument) with `scalar_t` bound to the storage type of `dtype` (float, __half,
// __nv_bfloat16); unknown dtypes return cudaErrorInvalidValue from the enclosing function.
#define KDC_DISPATCH_DTYPE(dtype, ...)                   \
  switch (dtype) {                                       \
    case ::kdc::DType::kFloat32: {                       \
      using scalar_t = float;                            \
      __VA_ARGS__;                                       \
    } break;                                             \
    case ::kdc::DType::kFloat16: {                       \
      using scalar_t = __half;                           \
      __VA_ARGS__;                                       \
    } break;                                             \
    case ::kdc::DType::kBFloat16: {                      \
      using scalar_t = __nv_bfloat16;                    \
      __VA_ARGS__;                                       \
    } break;                                             \
    default:                                             \
      return cudaErrorInvalidValue;                      \
  }
