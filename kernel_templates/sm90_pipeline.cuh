#pragma once
// The sm_90 pipeline pieces the warp-specialised Hopper kernels share (wgmma_gemm.cuh, wgmma_rs.cuh,
// attention_wgmma.cuh): cp.async into 128-byte-swizzled tiles, mbarriers between a producer and its
// consumers, register fences around asynchronous wgmma, named barriers and setmaxnreg.
#include "common.cuh"

namespace q35k {
namespace sm90 {

__device__ __forceinline__ void cp_async_16_s(u32 dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ uint4 ld_shared_16(u32 addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ void st_shared_16(u32 addr, const uint4& v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}
// Byte offset of 16-byte chunk c of row r in a 128-byte-row, 128-byte-swizzled tile.
__device__ __forceinline__ u32 sw128(int r, int c) { return u32(r) * 128u + (u32(c ^ (r & 7)) << 4); }

// Keeps the compiler from moving accumulator reads or writes across the wgmma fences / waits.
template <int R>
__device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Keeps the compiler from reusing fragment registers that a wgmma in flight still reads (A from
// registers): call after the wait that retires it.
template <int R, int C>
__device__ __forceinline__ void fence_frag(u32 (&f)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < C; ++j) asm volatile("" : "+r"(f[i][j])::"memory");
}

// Scheduling pins around asynchronous wgmma: shared-memory stores predicated on `never` (a runtime
// false ptxas cannot fold, e.g. T < 0: they never execute). ptxas keeps such stores and the
// wgmma.wait_group in program order (observed with ptxas 13.0; tests check the SASS):
//   pin_before_wait(a, b) before a wait keeps the work producing a and b ahead of it (else ptxas may
//     hoist the wait above independent work, e.g. a softmax meant to run under the wgmma in flight);
//   pin_frag(f, ...) after the wait that retires a register-A wgmma keeps the fragment registers
//     allocated up to there (their last use is otherwise the wgmma itself, and ptxas reuses them for
//     temporaries by waiting early).
// `addr`: any shared address.
__device__ __forceinline__ void pin_before_wait(float a, float b, int never, u32 addr) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p st.shared.v2.f32 [%3], {%0, %1};\n}" ::"f"(a), "f"(b),
               "r"(never), "r"(addr)
               : "memory");
}
template <int R>
__device__ __forceinline__ void pin_frag(const u32 (&f)[R][4], int never, u32 addr) {
#pragma unroll
  for (int i = 0; i < R; ++i)
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %4, 0;\n @p st.shared.v4.b32 [%5], {%0, %1, %2, %3};\n}" ::"r"(
                     f[i][0]),
                 "r"(f[i][1]), "r"(f[i][2]), "r"(f[i][3]), "r"(never), "r"(addr)
                 : "memory");
}

// mbarriers in shared memory (the warp-specialised pipeline): init by one thread before a block
// barrier; arrive has release semantics, the parity wait acquire (CTA scope).
__device__ __forceinline__ void mbar_init(u32 bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n .reg .pred p;\n"
      "WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}" ::"r"(bar), "r"(parity) : "memory");
}
// Arrives on the mbarrier once every prior cp.async of this thread has landed (the barrier's count
// includes this arrival: .noinc). The thread itself does not wait.
__device__ __forceinline__ void cp_async_mbar_arrive(u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}
// Barrier of the 128 threads of warpgroup wg (0 or 1; named barriers 1 and 2, 0 is __syncthreads).
__device__ __forceinline__ void warpgroup_sync(int wg) {
  if (wg == 0) asm volatile("bar.sync 1, 128;" ::: "memory");
  else asm volatile("bar.sync 2, 128;" ::: "memory");
}
// Named barrier `id` (1 .. 15) of `threads` threads (a multiple of 32): sync waits until `threads`
// have arrived or synced, arrive only counts (the ping-pong between two consumer warpgroups).
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// Warpgroup register budgets of the warp-specialised kernel (setmaxnreg: multiples of 8).
template <int R>
__device__ __forceinline__ void regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R)); }
template <int R>
__device__ __forceinline__ void regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R)); }

}  // namespace sm90
}  // namespace q35k
