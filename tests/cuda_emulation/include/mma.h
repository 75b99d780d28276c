// CUDA emulation (tests only): nvcuda::wmma at the API level. Every lane holds the whole 16x16 tile
// (so code that relies on the opaque per-lane element layout is not supported - the kernels never
// do), loads / stores / mma are warp rendezvous points (all 32 lanes must take part), and the
// hardware's alignment rules are checked: 32-byte aligned pointers, a leading dimension that is a
// multiple of 16 bytes. Products are exact and summed in fp32, as on tensor cores (the order of
// the fp32 additions may differ from the hardware's).
#pragma once

#include <cstdint>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation covers the 16x16x16 shape");
  float v[256];  // the logical 16x16 tile, row-major: (row, col) = v[row * 16 + col]
};

namespace detail {
inline float as_float(float x) { return x; }
inline float as_float(__half x) { return __half2float(x); }
inline float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
inline void check(const T* ptr, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) emu::fail(what, "pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0) emu::fail(what, "leading dimension not a multiple of 16 bytes");
}
}  // namespace detail

template <typename T>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, T value) {
  for (float& x : f.v) x = static_cast<float>(value);
}

// A (rows x k), row major: element (r, k) at ptr[r * ldm + k].
template <typename T>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* ptr, unsigned ldm) {
  detail::check(ptr, ldm, "wmma::load_matrix_sync(matrix_a)");
  emu::syncwarp(0xffffffffu);
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) f.v[r * 16 + k] = detail::as_float(ptr[r * ldm + k]);
}

// B (k x cols), column major: element (k, c) at ptr[c * ldm + k].
template <typename T>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* ptr, unsigned ldm) {
  detail::check(ptr, ldm, "wmma::load_matrix_sync(matrix_b)");
  emu::syncwarp(0xffffffffu);
  for (int k = 0; k < 16; ++k)
    for (int c = 0; c < 16; ++c) f.v[k * 16 + c] = detail::as_float(ptr[c * ldm + k]);
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  emu::syncwarp(0xffffffffu);
  float out[256];
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 16; ++n) {
      float acc = c.v[r * 16 + n];
      for (int k = 0; k < 16; ++k) acc += a.v[r * 16 + k] * b.v[k * 16 + n];
      out[r * 16 + n] = acc;
    }
  }
  for (int i = 0; i < 256; ++i) d.v[i] = out[i];
}

inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check(ptr, ldm, "wmma::store_matrix_sync");
  emu::syncwarp(0xffffffffu);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      float& dst = layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r];
      dst = f.v[r * 16 + c];  // every lane writes the same tile
    }
  emu::syncwarp(0xffffffffu);
}

}  // namespace wmma
}  // namespace nvcuda
