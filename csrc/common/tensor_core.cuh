// Warp-level tensor-core and asynchronous-copy primitives of the bf16 / fp16 kernels, as thin
// wrappers over single PTX instructions (sm_80+):
//
//   mma_16816     mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32  (D = A B + D)
//   ldmatrix_*    ldmatrix.sync.aligned.m8n8.{x4,x2}[.trans].shared.b16
//   cp_async_16   cp.async.cg.shared.global (16 bytes, zero-filled when the source is out of range)
//
// Fragment layouts of m16n8k16 (PTX ISA "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4; each 32-bit register holds two 16-bit elements, the lower
// column (or row, for B) in the low half:
//   A 16x16 (row major):  a0 = A[g][2t..2t+1]      a1 = A[g+8][2t..2t+1]
//                         a2 = A[g][2t+8..2t+9]    a3 = A[g+8][2t+8..2t+9]
//   B 16x8  (col major):  b0 = B[2t..2t+1][g]      b1 = B[2t+8..2t+9][g]
//   C 16x8  (fp32):       c0, c1 = C[g][2t..2t+1]  c2, c3 = C[g+8][2t..2t+1]
// So the fp32 accumulator of one mma (two n-tiles side by side) is, packed to 16 bits, the A
// fragment of the next one: the FlashAttention register reuse of P.
//
// ldmatrix: lane l gives the shared-memory address of row (l % 8) of matrix l / 8 (x4; x2 reads
// lanes 0..15); register m of lane l receives row l / 4, columns 2 (l % 4) .. +1 of matrix m
// (.trans: rows 2 (l % 4) .. +1 of column l / 4). Row addresses must be 16-byte aligned.
//
// KDC_CUDA_EMULATION (tests only) replaces the instructions by the CPU emulation in
// tests/cuda_emulation/include/kdc_emu_ptx.h, which implements exactly these layouts (a wrong
// fragment index in a kernel gives wrong results there too) and delivers cp.async copies only at
// the cp.async.wait_group that covers them.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/kdc_device.cuh"

#ifdef KDC_CUDA_EMULATION
#include "kdc_emu_ptx.h"
#endif

namespace kdc {
namespace tc {

// Two fp32 values rounded to the 16-bit type T (bf16 or fp16), packed as one fragment register
// (lo first).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(sizeof(T) == 2, "a fragment register holds two 16-bit elements");
  const T a = from_f32<T>(lo), b = from_f32<T>(hi);
  uint16_t ua, ub;
  memcpy(&ua, &a, 2);
  memcpy(&ub, &b, 2);
  return static_cast<uint32_t>(ua) | (static_cast<uint32_t>(ub) << 16);
}

// The two 16-bit elements of a fragment register, as fp32.
template <typename T>
__device__ __forceinline__ float unpack_lo(uint32_t r);
template <typename T>
__device__ __forceinline__ float unpack_hi(uint32_t r);
template <>
__device__ __forceinline__ float unpack_lo<__nv_bfloat16>(uint32_t r) { return __uint_as_float(r << 16); }
template <>
__device__ __forceinline__ float unpack_hi<__nv_bfloat16>(uint32_t r) { return __uint_as_float(r & 0xffff0000u); }
template <>
__device__ __forceinline__ float unpack_lo<__half>(uint32_t r) {
  const uint16_t u = static_cast<uint16_t>(r & 0xffffu);
  __half h;
  memcpy(&h, &u, 2);
  return __half2float(h);
}
template <>
__device__ __forceinline__ float unpack_hi<__half>(uint32_t r) {
  const uint16_t u = static_cast<uint16_t>(r >> 16);
  __half h;
  memcpy(&h, &u, 2);
  return __half2float(h);
}

// Whether either 16-bit element of a fragment register is a NaN or an infinity (exponent all
// ones): bf16 exponent bits 0x7f80, fp16 0x7c00.
template <typename T>
__device__ __forceinline__ bool nonfinite2(uint32_t r) {
  constexpr uint32_t e = std::is_same<T, __nv_bfloat16>::value ? 0x7f80u : 0x7c00u;
  return (r & e) == e || ((r >> 16) & e) == e;
}

#ifndef KDC_CUDA_EMULATION

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row)));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row)));
}

// 16 bytes global -> shared, bypassing L1; with `valid` false the destination is zero-filled and
// nothing is read (`src` must still be a mapped address: pass the tensor's base).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#else  // KDC_CUDA_EMULATION

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::emu_ptx::mma_16816(d, a, b, std::is_same<T, __nv_bfloat16>::value);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) { ::emu_ptx::ldmatrix(r, 4, row, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  ::emu_ptx::ldmatrix(r, 4, row, true);
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) { ::emu_ptx::ldmatrix(r, 2, row, false); }
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  ::emu_ptx::ldmatrix(r, 2, row, true);
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  ::emu::cp_async(dst, src, 16, !valid);
}
__device__ __forceinline__ void cp_async_commit() { ::emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ::emu::cp_async_wait(N);
}

#endif  // KDC_CUDA_EMULATION

// --- fragments of tiles in shared memory (16-bit elements, row stride ld) ---------------------------

// A fragment (16 rows x 16 columns, row major) at row r0, column c0.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int ld, int r0, int c0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, tile + (r0 + (lane % 8) + ((lane / 8) % 2) * 8) * ld + c0 + (lane / 16) * 8);
}

// A fragment of the transpose of a stored tile: A[r][c] = tile[c0 + c][r0 + r].
template <typename T>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const T* tile, int ld, int r0, int c0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4_trans(a, tile + (c0 + (lane % 8) + (lane / 16) * 8) * ld + r0 + ((lane / 8) % 2) * 8);
}

// B fragments of two n-tiles for a product X Y^T, Y stored as rows (the n index) x k: rows
// n0 .. n0 + 15, columns (k) c0 .. c0 + 15. b[0..1]: n-tile n0 / 8, b[2..3]: n-tile n0 / 8 + 1.
template <typename T>
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[4], const T* tile, int ld, int n0, int c0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(b, tile + (n0 + (lane % 8) + (lane / 16) * 8) * ld + c0 + ((lane / 8) % 2) * 8);
}

// B fragments of two n-tiles for a product X Y, Y stored as rows (the k index) x n: rows
// k0 .. k0 + 15, columns (n) n0 .. n0 + 15. b[0..1]: n-tile n0 / 8, b[2..3]: n-tile n0 / 8 + 1.
template <typename T>
__device__ __forceinline__ void load_b_trans(uint32_t (&b)[4], const T* tile, int ld, int k0, int n0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4_trans(b, tile + (k0 + (lane % 8) + ((lane / 8) % 2) * 8) * ld + n0 + (lane / 16) * 8);
}

}  // namespace tc
}  // namespace kdc
