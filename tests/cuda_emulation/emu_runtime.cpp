// CUDA emulation (tests only): runs a kernel grid on the CPU, block after block; the threads of a
// block are fibers (ucontext) scheduled cooperatively between rendezvous points.
//
// Checks that make a kernel bug fail loudly instead of passing by luck:
//   * a warp shuffle / ballot / __syncwarp needs all 32 lanes of the warp at the same operation
//     (full mask), and a __syncthreads all live threads of the block: otherwise the launch fails
//     (divergent barrier, deadlock);
//   * threads run in increasing order in even blocks and decreasing order in odd blocks between
//     rendezvous points, so reading shared memory another thread writes without a barrier in
//     between returns stale data;
//   * dynamic shared memory starts filled with 0xff bytes (NaN floats, -1 ints) in every block and
//     is exactly the requested size (heap-allocated: AddressSanitizer catches overruns);
//   * launch limits of the real hardware: <= 1024 threads, grid.y / grid.z <= 65535, more than
//     48 KB of dynamic shared memory only after cudaFuncSetAttribute, and never more than the
//     device's opt-in limit (KDC_EMU_SMEM_OPTIN, default 166912 bytes: an A100, the smaller of the
//     A100 / H100 limits);
//   * cp.async copies are queued per thread and land in shared memory only at the
//     cp.async.wait_group covering their commit group (reading a tile before waiting for it, or
//     staging into the buffer in use, gives wrong data), must be aligned to their size and stay
//     inside the block's dynamic shared memory; __syncthreads_or returns the OR of every live
//     thread's predicate, and mixing it with __syncthreads at one barrier fails the launch;
//   * warp exchanges (the mma / ldmatrix emulation of kdc_emu_ptx.h) and __shfl_sync by source lane
//     are rendezvous points like the shuffles.
// kdc_emu_launches(threads) (extern "C") counts the launches per block size: the tests use it to
// check which kernels ran.
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "cuda_runtime.h"

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kWarp = 32;

enum class State { Runnable, AtBarrier, AtWarpOp, Done };
enum class WarpOp { None, Shfl, ShflIdx, Ballot, Sync, Exchange };
enum class Barrier { Plain, Or };  // __syncthreads, __syncthreads_or

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  uint3 tid{0, 0, 0};
  State state = State::Done;
  WarpOp op = WarpOp::None;
  unsigned mask = 0;
  int lane_mask = 0;
  uint64_t in = 0, out = 0;
  bool pred = false;
  Barrier barrier = Barrier::Plain;
  // Exchange: every lane's `xin` bytes are gathered, in lane order, into every lane's `xout`.
  const void* xin = nullptr;
  void* xout = nullptr;
  size_t xbytes = 0;
  // cp.async copies of this thread: they land in shared memory only at a cp.async.wait_group that
  // covers their commit group (a kernel that reads the destination earlier reads stale data).
  struct AsyncCopy {
    void* dst;
    const void* src;
    size_t bytes;
    bool zero_fill;
    int64_t group;  // -1: not committed yet
  };
  std::vector<AsyncCopy> copies;
  int64_t committed = 0;
};

ucontext_t g_scheduler;
std::vector<Fiber> g_fibers;
Fiber* g_current = nullptr;
KernelBody* g_body = nullptr;
struct AlignedFree {
  void operator()(char* p) const { ::operator delete[](p, std::align_val_t(128)); }
};
std::unique_ptr<char[], AlignedFree> g_smem;  // 128-byte aligned, like the kernels' declaration
size_t g_smem_bytes = 0;
std::string g_failure;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;
std::map<const void*, int> g_max_dynamic_smem;

int smem_optin_limit() {
  const char* raw = std::getenv("KDC_EMU_SMEM_OPTIN");
  return raw != nullptr ? std::atoi(raw) : 166912;
}

void fiber_main() {
  g_body->run();
  g_current->state = State::Done;
  // returns to g_scheduler through uc_link
}

void yield() { swapcontext(&g_current->ctx, &g_scheduler); }

// A failure inside a fiber: recorded, and the fiber never runs again.
[[noreturn]] void fail_in_fiber(const std::string& what) {
  if (g_failure.empty()) g_failure = what;
  g_current->state = State::Done;
  yield();
  std::abort();  // never resumed
}

void warp_op(WarpOp op, unsigned mask) {
  if (mask != 0xffffffffu) fail_in_fiber("warp operation with a partial mask (the kernels always use all 32 lanes)");
  g_current->op = op;
  g_current->mask = mask;
  g_current->state = State::AtWarpOp;
  yield();
}

std::string where(size_t f) {
  const Fiber& fb = g_fibers[f];
  return "block (" + std::to_string(g_block_idx.x) + ", " + std::to_string(g_block_idx.y) + ") thread (" +
         std::to_string(fb.tid.x) + ", " + std::to_string(fb.tid.y) + ")";
}

// Completes the warp operations whose lanes have all arrived; returns an error message if a warp
// is inconsistent (lanes at different operations, or missing lanes).
std::string resolve_warps(size_t nthreads, bool& released) {
  for (size_t w0 = 0; w0 < nthreads; w0 += kWarp) {
    const size_t w1 = std::min(nthreads, w0 + kWarp);
    size_t at_op = 0, done = 0;
    for (size_t f = w0; f < w1; ++f) {
      at_op += g_fibers[f].state == State::AtWarpOp;
      done += g_fibers[f].state == State::Done;
    }
    if (at_op == 0) continue;
    if (at_op + done != w1 - w0) continue;  // some lanes still at a block barrier: checked below
    if (done != 0 || w1 - w0 != kWarp) {
      return "warp operation in " + where(w0) + "'s warp with " + std::to_string(at_op) + " of 32 lanes alive";
    }
    const WarpOp op = g_fibers[w0].op;
    for (size_t f = w0; f < w1; ++f) {
      if (g_fibers[f].op != op || (op == WarpOp::Shfl && g_fibers[f].lane_mask != g_fibers[w0].lane_mask) ||
          (op == WarpOp::Exchange && g_fibers[f].xbytes != g_fibers[w0].xbytes)) {
        return "divergent warp operations in " + where(f) + "'s warp";
      }
    }
    unsigned votes = 0;
    for (size_t f = w0; f < w1; ++f) votes |= (g_fibers[f].pred ? 1u : 0u) << (f - w0);
    for (size_t f = w0; f < w1; ++f) {
      Fiber& fb = g_fibers[f];
      if (op == WarpOp::Shfl) fb.out = g_fibers[w0 + ((f - w0) ^ static_cast<size_t>(fb.lane_mask))].in;
      if (op == WarpOp::ShflIdx) fb.out = g_fibers[w0 + static_cast<size_t>(fb.lane_mask)].in;
      if (op == WarpOp::Ballot) fb.out = votes;
      if (op == WarpOp::Exchange) {
        for (size_t src = w0; src < w1; ++src) {
          std::memcpy(static_cast<char*>(fb.xout) + (src - w0) * fb.xbytes, g_fibers[src].xin, fb.xbytes);
        }
      }
      fb.op = WarpOp::None;
      fb.state = State::Runnable;
    }
    released = true;
  }
  return "";
}

std::string run_block(size_t nthreads, size_t smem_bytes, bool reverse) {
  if (smem_bytes > 0) {
    g_smem.reset(static_cast<char*>(::operator new[](smem_bytes, std::align_val_t(128))));
    std::memset(g_smem.get(), 0xff, smem_bytes);
  } else {
    g_smem.reset();
  }
  g_smem_bytes = smem_bytes;
  if (g_fibers.size() < nthreads) g_fibers.resize(nthreads);
  for (size_t f = 0; f < nthreads; ++f) {
    Fiber& fb = g_fibers[f];
    if (!fb.stack) fb.stack.reset(new char[kStackBytes]);
    getcontext(&fb.ctx);
    fb.ctx.uc_stack.ss_sp = fb.stack.get();
    fb.ctx.uc_stack.ss_size = kStackBytes;
    fb.ctx.uc_link = &g_scheduler;
    makecontext(&fb.ctx, fiber_main, 0);
    fb.tid = uint3{static_cast<unsigned>(f % g_block_dim.x), static_cast<unsigned>((f / g_block_dim.x) % g_block_dim.y),
                   static_cast<unsigned>(f / (g_block_dim.x * g_block_dim.y))};
    fb.state = State::Runnable;
    fb.op = WarpOp::None;
    fb.copies.clear();
    fb.committed = 0;
  }
  for (;;) {
    for (size_t n = 0; n < nthreads; ++n) {
      const size_t f = reverse ? nthreads - 1 - n : n;
      if (g_fibers[f].state != State::Runnable) continue;
      g_current = &g_fibers[f];
      swapcontext(&g_scheduler, &g_current->ctx);
      g_current = nullptr;
      if (!g_failure.empty()) return g_failure + " (" + where(f) + ")";
    }
    bool released = false;
    std::string err = resolve_warps(nthreads, released);
    if (!err.empty()) return err;
    if (released) continue;
    size_t at_barrier = 0, done = 0, at_op = 0;
    for (size_t f = 0; f < nthreads; ++f) {
      at_barrier += g_fibers[f].state == State::AtBarrier;
      done += g_fibers[f].state == State::Done;
      at_op += g_fibers[f].state == State::AtWarpOp;
    }
    if (done == nthreads) return "";
    if (at_op != 0) return "deadlock: a warp operation waits for lanes that are at a block barrier";
    if (at_barrier + done == nthreads) {
      // Every live thread is at the barrier: they must all be at the same kind of barrier, and
      // __syncthreads_or returns the OR of their predicates to each of them.
      bool any = false, kinds_differ = false;
      Barrier kind = Barrier::Plain;
      bool first = true;
      for (size_t f = 0; f < nthreads; ++f) {
        const Fiber& fb = g_fibers[f];
        if (fb.state != State::AtBarrier) continue;
        if (!first && fb.barrier != kind) kinds_differ = true;
        kind = fb.barrier;
        first = false;
        any |= fb.pred;
      }
      if (kinds_differ) return "divergent barriers: __syncthreads and __syncthreads_or meet in one block";
      for (size_t f = 0; f < nthreads; ++f) {
        if (g_fibers[f].state == State::AtBarrier) {
          g_fibers[f].state = State::Runnable;
          g_fibers[f].out = any ? 1 : 0;
        }
      }
      continue;
    }
    return "scheduler stuck";
  }
}

}  // namespace

uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;

const uint3& thread_idx() { return g_current->tid; }

void syncthreads() {
  g_current->state = State::AtBarrier;
  g_current->barrier = Barrier::Plain;
  g_current->pred = false;
  yield();
}

int syncthreads_or(int pred) {
  g_current->state = State::AtBarrier;
  g_current->barrier = Barrier::Or;
  g_current->pred = pred != 0;
  yield();
  return static_cast<int>(g_current->out);
}

void syncwarp(unsigned mask) { warp_op(WarpOp::Sync, mask); }

uint64_t shfl_xor(unsigned mask, uint64_t bits, int lane_mask) {
  if (lane_mask < 0 || lane_mask >= kWarp) fail_in_fiber("shuffle lane mask out of range");
  g_current->in = bits;
  g_current->lane_mask = lane_mask;
  warp_op(WarpOp::Shfl, mask);
  return g_current->out;
}

uint64_t shfl_idx(unsigned mask, uint64_t bits, int src_lane) {
  if (src_lane < 0 || src_lane >= kWarp) fail_in_fiber("shuffle source lane out of range");
  g_current->in = bits;
  g_current->lane_mask = src_lane;
  warp_op(WarpOp::ShflIdx, mask);
  return g_current->out;
}

void warp_exchange(const void* in, size_t bytes, void* out) {
  g_current->xin = in;
  g_current->xout = out;
  g_current->xbytes = bytes;
  warp_op(WarpOp::Exchange, 0xffffffffu);
}

bool in_shared(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  return g_smem && c >= g_smem.get() && c + bytes <= g_smem.get() + g_smem_bytes;
}

void cp_async(void* dst, const void* src, size_t bytes, bool zero_fill) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || (!zero_fill && reinterpret_cast<uintptr_t>(src) % bytes != 0)) {
    fail_in_fiber("cp.async: address not aligned to the copy size");
  }
  if (!in_shared(dst, bytes)) fail_in_fiber("cp.async: destination outside the block's dynamic shared memory");
  g_current->copies.push_back({dst, src, bytes, zero_fill, -1});
}

void cp_async_commit() {
  for (auto& c : g_current->copies) {
    if (c.group < 0) c.group = g_current->committed;
  }
  ++g_current->committed;
}

void cp_async_wait(int pending) {
  // Groups older than the `pending` most recent committed ones land now, in issue order.
  const int64_t limit = g_current->committed - pending;
  std::vector<Fiber::AsyncCopy> rest;
  for (const auto& c : g_current->copies) {
    if (c.group >= 0 && c.group < limit) {
      if (c.zero_fill) {
        std::memset(c.dst, 0, c.bytes);
      } else {
        std::memcpy(c.dst, c.src, c.bytes);
      }
    } else {
      rest.push_back(c);
    }
  }
  g_current->copies.swap(rest);
}

unsigned ballot(unsigned mask, bool pred) {
  g_current->pred = pred;
  warp_op(WarpOp::Ballot, mask);
  return static_cast<unsigned>(g_current->out);
}

void* dynamic_smem() { return g_smem.get(); }

void fail(const char* what, const char* why) { fail_in_fiber(std::string(what) + ": " + why); }

void set_last_error(cudaError_t err) {
  if (err != cudaSuccess) g_last_error = err;
}

cudaError_t set_func_attribute(const void* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > smem_optin_limit()) {
    g_last_message = "cudaFuncSetAttribute: " + std::to_string(value) + " bytes of dynamic shared memory exceed the "
                     "device limit of " + std::to_string(smem_optin_limit());
    return cudaErrorInvalidValue;
  }
  g_max_dynamic_smem[fn] = value;
  return cudaSuccess;
}

std::map<size_t, uint64_t> g_launches_by_threads;  // test hook: kdc_emu_launches(threads)

cudaError_t run_grid(const void* fn, dim3 grid, dim3 block, size_t smem, KernelBody& body) {
  const size_t nthreads = static_cast<size_t>(block.x) * block.y * block.z;
  ++g_launches_by_threads[nthreads];
  if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    g_last_message = "invalid launch configuration (grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) +
                     "x" + std::to_string(grid.z) + ", " + std::to_string(nthreads) + " threads)";
    return cudaErrorInvalidConfiguration;
  }
  const auto allowed = g_max_dynamic_smem.find(fn);
  const size_t limit = allowed != g_max_dynamic_smem.end() ? static_cast<size_t>(allowed->second) : 48 * 1024;
  if (smem > std::max<size_t>(limit, 48 * 1024)) {
    g_last_message = "launch with " + std::to_string(smem) + " bytes of dynamic shared memory, only " +
                     std::to_string(limit) + " allowed for this kernel";
    return cudaErrorInvalidConfiguration;
  }
  g_grid_dim = grid;
  g_block_dim = block;
  g_body = &body;
  g_failure.clear();
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = uint3{x, y, z};
        const std::string err = run_block(nthreads, smem, (x + y + z) % 2 == 1);
        if (!err.empty()) {
          g_last_message = "emulated kernel failed: " + err;
          g_fibers.clear();  // fibers stopped mid-kernel are abandoned
          return cudaErrorLaunchFailure;
        }
      }
    }
  }
  return cudaSuccess;
}

}  // namespace emu

const char* cudaGetErrorString(cudaError_t err) {
  static std::string text;
  const char* name = err == cudaSuccess                     ? "no error"
                     : err == cudaErrorInvalidValue         ? "invalid argument"
                     : err == cudaErrorInvalidConfiguration ? "invalid configuration argument"
                     : err == cudaErrorLaunchFailure        ? "unspecified launch failure"
                                                            : "unknown error";
  text = std::string(name) + (emu::g_last_message.empty() ? "" : " [" + emu::g_last_message + "]");
  return text.c_str();
}

cudaError_t cudaGetLastError() {
  const cudaError_t err = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  if (err == cudaSuccess) emu::g_last_message.clear();
  return err;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = emu::smem_optin_limit();
  return cudaSuccess;
}

// Test hook (ctypes): how many kernels with `threads` threads per block were launched so far. The
// tensor-core kernels are the only ones with 128-thread blocks, so a test can tell which ran.
extern "C" uint64_t kdc_emu_launches(unsigned threads) {
  const auto it = emu::g_launches_by_threads.find(threads);
  return it == emu::g_launches_by_threads.end() ? 0 : it->second;
}
