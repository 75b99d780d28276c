// CUDA emulation (tests only): the PTX instructions behind csrc/common/tensor_core.cuh.
//
// * mma.m16n8k16 with fp32 accumulation: the 32 lanes' fragment registers are gathered (a warp
//   rendezvous: every lane must take part) and the 16x8 product is formed from the documented
//   fragment layouts, exact products summed in fp32 in k order onto the accumulator (tensor cores
//   add in another order: results agree to fp32 rounding, not bitwise). A kernel that fills a
//   fragment with the wrong elements computes a wrong product here as on the hardware.
// * ldmatrix (.x4 / .x2, .trans): the lanes' row addresses are gathered; each must lie in the
//   block's dynamic shared memory and be 16-byte aligned, or the launch fails.
// * cp.async (emu_runtime.cpp): queued per thread, delivered at the cp.async.wait_group covering
//   its commit group; misaligned or out-of-shared-memory copies fail the launch.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace emu_ptx {

inline float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

// Element (row, col) of the A fragment set (16x16) held by the 32 lanes' registers a[lane][4].
inline float frag_a(const uint32_t (*a)[4], int row, int col, bool bf16) {
  const int g = row % 8, t = (col % 8) / 2;
  const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
  const uint32_t r = a[g * 4 + t][reg];
  return half_bits_to_float(static_cast<uint16_t>(col % 2 == 0 ? r & 0xffffu : r >> 16), bf16);
}

// Element (k, n) of the B fragment set (16x8) held in b[lane][2].
inline float frag_b(const uint32_t (*b)[2], int k, int n, bool bf16) {
  const int t = (k % 8) / 2;
  const uint32_t r = b[n * 4 + t][k >= 8 ? 1 : 0];
  return half_bits_to_float(static_cast<uint16_t>(k % 2 == 0 ? r & 0xffffu : r >> 16), bf16);
}

inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  struct Regs {
    uint32_t a[4], b[2];
    float c[4];
  } mine, all[32];
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  std::memcpy(mine.c, d, sizeof mine.c);
  ::emu::warp_exchange(&mine, sizeof mine, all);
  uint32_t A[32][4], B[32][2];
  for (int l = 0; l < 32; ++l) {
    std::memcpy(A[l], all[l].a, sizeof A[l]);
    std::memcpy(B[l], all[l].b, sizeof B[l]);
  }
  const int lane = static_cast<int>(::emu::thread_idx().x + ::emu::g_block_dim.x *
                                        (::emu::thread_idx().y + ::emu::g_block_dim.y * ::emu::thread_idx().z)) % 32;
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e % 2);
    float acc = mine.c[e];
    for (int k = 0; k < 16; ++k) acc += frag_a(A, row, k, bf16) * frag_b(B, k, col, bf16);
    d[e] = acc;
  }
}

// ldmatrix .x{count} (.trans): r[m] of this lane from the 8x8 matrix m whose row addresses lanes
// 8m .. 8m + 7 give.
inline void ldmatrix(uint32_t* r, int count, const void* row, bool trans) {
  const void* rows[32];
  ::emu::warp_exchange(&row, sizeof row, rows);
  const int lane = static_cast<int>(::emu::thread_idx().x + ::emu::g_block_dim.x *
                                        (::emu::thread_idx().y + ::emu::g_block_dim.y * ::emu::thread_idx().z)) % 32;
  for (int m = 0; m < count; ++m) {
    for (int i = 0; i < 8; ++i) {
      const void* p = rows[8 * m + i];
      if (reinterpret_cast<uintptr_t>(p) % 16 != 0) ::emu::fail("ldmatrix", "row address not 16-byte aligned");
      if (!::emu::in_shared(p, 16)) ::emu::fail("ldmatrix", "row address outside the block's dynamic shared memory");
    }
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      const int rr = trans ? 2 * (lane % 4) + h : lane / 4;  // stored row
      const int cc = trans ? lane / 4 : 2 * (lane % 4) + h;  // stored column
      std::memcpy(&e[h], static_cast<const char*>(rows[8 * m + rr]) + 2 * cc, 2);
    }
    r[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
}

}  // namespace emu_ptx
