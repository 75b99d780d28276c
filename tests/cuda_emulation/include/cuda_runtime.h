// CUDA emulation (tests only): the device-side language subset the kdc kernels use, run on the
// CPU. Each block runs its threads as fibers in one OS thread; __syncthreads, __syncwarp and warp
// shuffles/ballots are real rendezvous points (a warp operation needs all 32 lanes, a barrier all
// live threads, or the launch fails naming the problem). Threads run in a forward or reverse order
// between rendezvous points and dynamic shared memory starts filled with NaN bytes, so a missing
// barrier or an unwritten shared value shows up as a wrong result.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

namespace emu {
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;
const uint3& thread_idx();
void syncthreads();
int syncthreads_or(int pred);
void syncwarp(unsigned mask);
uint64_t shfl_xor(unsigned mask, uint64_t bits, int lane_mask);
uint64_t shfl_idx(unsigned mask, uint64_t bits, int src_lane);
unsigned ballot(unsigned mask, bool pred);
// Every lane passes `bytes` bytes; every lane receives all 32 lanes' bytes in lane order (the
// building block of the tensor-core and ldmatrix emulation, see kdc_emu_ptx.h).
void warp_exchange(const void* in, size_t bytes, void* out);
bool in_shared(const void* p, size_t bytes);
void cp_async(void* dst, const void* src, size_t bytes, bool zero_fill);
void cp_async_commit();
void cp_async_wait(int pending);
void* dynamic_smem();
[[noreturn]] void fail(const char* what, const char* why);  // a kernel bug: fails the launch

struct KernelBody {
  virtual void run() = 0;
  virtual ~KernelBody() = default;
};
cudaError_t run_grid(const void* fn, dim3 grid, dim3 block, size_t smem, KernelBody& body);
void set_last_error(cudaError_t err);

template <typename... P>
struct Launcher {
  void (*fn)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) const {
    struct Body final : KernelBody {
      void (*fn)(P...);
      std::tuple<std::decay_t<P>...> params;  // copied at launch, like kernel parameters
      Body(void (*f)(P...), A&&... a) : fn(f), params(std::forward<A>(a)...) {}
      void run() override { std::apply(fn, params); }
    } body(fn, std::forward<A>(args)...);
    set_last_error(run_grid(reinterpret_cast<const void*>(fn), grid, block, smem, body));
  }
};

template <typename... P>
Launcher<P...> launcher(void (*fn)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launcher<P...>{fn, grid, block, smem};
}
}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::g_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)

inline void __syncthreads() { emu::syncthreads(); }
inline int __syncthreads_or(int pred) { return emu::syncthreads_or(pred); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::syncwarp(mask); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a register value");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = emu::shfl_xor(mask, bits, lane_mask);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
template <typename T>
inline T __shfl_sync(unsigned mask, T value, int src_lane) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a register value");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = emu::shfl_idx(mask, bits, src_lane);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return emu::ballot(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return emu::ballot(mask, pred != 0) != 0u; }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned x;
  std::memcpy(&x, &f, 4);
  return x;
}
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
