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

// Debug build (Q35_SPIN_TRAP defined, JitOptions::spin_trap / $Q35JIT_SPIN_TRAP=1): every mbarrier
// wait gives up after kSpinTrapPolls (2^26) polls; each warp leaves a breadcrumb in shared memory while
// it waits in an mbarrier, a named barrier or setmaxnreg.inc (the last two cannot time out: the
// hardware blocks in them). The report names the block, the warp that gave up, and every warp's
// breadcrumb (barrier, stage, expected parity), then traps, so a hang fails in seconds.
//   mbar_wait<true> (default) prints the report itself. printf is a function call, and a call in a
//     warpgroup with wgmma in flight makes ptxas serialize its wgmma: consumers use mbar_wait<false>,
//     which marks its breadcrumb as timed out and keeps waiting, and the kernel runs
//     spin_trap_watchdog on a thread with nothing else to do (a producer after its last load): it
//     prints the report when a consumer timed out, or when the consumers have not finished (all
//     blocked in named barriers or setmaxnreg) after ~2^32 ns.
// Without Q35_SPIN_TRAP these compile to the plain instructions (the names are unused).
#if defined(Q35_SPIN_TRAP)
constexpr unsigned kSpinTrapPolls = 1u << 26;
enum SpinTrapKind : u32 { kCrumbNone = 0, kCrumbMbar = 1, kCrumbNamedBar = 2, kCrumbRegsInc = 3, kCrumbDone = 4 };
// Per block: warps 0 .. 31 x {kind | id << 8 | parity << 24, name}, then the finished-warp count.
struct SpinTrapCrumbs {
  u32 what[32];
  const char* name[32];
  u32 done;      // warps past their last barrier (spin_trap_warp_done)
  u32 timeouts;  // mbar_wait<false> calls that gave up
};
__device__ __forceinline__ SpinTrapCrumbs& spin_trap_crumbs() {
  __shared__ SpinTrapCrumbs crumbs;
  return crumbs;
}
__device__ unsigned q35_spin_trap_reports;  // reports printed by the grid (at most 4; the rest trap silently)

__device__ __forceinline__ void spin_trap_crumb(u32 kind, int id, u32 parity, const char* name) {
  if ((threadIdx.x & 31) == 0) {
    SpinTrapCrumbs& c = spin_trap_crumbs();
    c.name[threadIdx.x / 32] = name;
    *(volatile u32*)&c.what[threadIdx.x / 32] = kind | (u32(id & 0xffff) << 8) | (parity << 24);
  }
}
__device__ __forceinline__ void spin_trap_report(const char* why) {
  if (atomicAdd(&q35_spin_trap_reports, 1u) < 4u) {
    const SpinTrapCrumbs& c = spin_trap_crumbs();
    printf("q35 spin trap: block (%d, %d, %d) warp %d thread %d: %s\n", blockIdx.x, blockIdx.y, blockIdx.z,
           threadIdx.x / 32, threadIdx.x, why);
    const int warps = min(32, int((blockDim.x * blockDim.y * blockDim.z + 31) / 32));
    for (int w = 0; w < warps; ++w) {
      const u32 v = *(const volatile u32*)&c.what[w];
      const u32 kind = v & 0xff, id = (v >> 8) & 0xffff, parity = v >> 24;
      if (kind == kCrumbMbar || kind == (kCrumbMbar | 0x80))
        printf("q35 spin trap:   block (%d, %d) warp %d waits on mbarrier %s stage %d parity %u%s\n", blockIdx.x,
               blockIdx.y, w, c.name[w], int(short(id)), parity, kind & 0x80 ? " (timed out: 2^26 polls)" : "");
      else if (kind == kCrumbNamedBar)
        printf("q35 spin trap:   block (%d, %d) warp %d is in bar.sync %u (%u threads) [%s]\n", blockIdx.x, blockIdx.y, w,
               id, parity * 32, c.name[w]);
      else if (kind == kCrumbRegsInc)
        printf("q35 spin trap:   block (%d, %d) warp %d is in setmaxnreg.inc %u (register pool exhausted?)\n",
               blockIdx.x, blockIdx.y, w, id);
      else if (kind == kCrumbDone)
        printf("q35 spin trap:   block (%d, %d) warp %d finished\n", blockIdx.x, blockIdx.y, w);
      else
        printf("q35 spin trap:   block (%d, %d) warp %d running (or exited)\n", blockIdx.x, blockIdx.y, w);
    }
  }
  __trap();
}
#endif

// Clears the breadcrumbs (Q35_SPIN_TRAP); one thread, before the block barrier after mbar_init.
__device__ __forceinline__ void spin_trap_init() {
#if defined(Q35_SPIN_TRAP)
  SpinTrapCrumbs& c = spin_trap_crumbs();
  for (int w = 0; w < 32; ++w) c.what[w] = kCrumbNone, c.name[w] = "";
  c.done = 0, c.timeouts = 0;
#endif
}
// A warp that has passed its last barrier (Q35_SPIN_TRAP: counted for spin_trap_watchdog).
__device__ __forceinline__ void spin_trap_warp_done() {
#if defined(Q35_SPIN_TRAP)
  __syncwarp();
  spin_trap_crumb(kCrumbDone, 0, 0, "");
  if ((threadIdx.x & 31) == 0) atomicAdd(&spin_trap_crumbs().done, 1u);
#endif
}
// Q35_SPIN_TRAP: waits until `warps` warps have called spin_trap_warp_done; traps with the report
// after ~2^32 ns (4.3 s) without that. No-op otherwise.
__device__ __forceinline__ void spin_trap_watchdog(int warps) {
#if defined(Q35_SPIN_TRAP)
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  while (*(volatile u32*)&spin_trap_crumbs().done < u32(warps)) {
    __nanosleep(1000);
    if (*(volatile u32*)&spin_trap_crumbs().timeouts != 0) spin_trap_report("watchdog: a consumer's mbarrier wait timed out");
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (t - t0 > (1ull << 32)) spin_trap_report("watchdog: the consumer warps have not finished after 4.3 s");
  }
#endif
}

// mbarriers in shared memory (the warp-specialised pipeline): init by one thread before a block
// barrier; arrive has release semantics, the parity wait acquire (CTA scope).
__device__ __forceinline__ void mbar_init(u32 bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Waits for the completion of the barrier's phase of this parity. REPORT, name, stage: the spin-trap
// build only (above).
template <bool REPORT = true>
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity, const char* name = "mbarrier", int stage = -1) {
#if defined(Q35_SPIN_TRAP)
  spin_trap_crumb(kCrumbMbar, stage, parity, name);
  for (unsigned polls = 0;; ++polls) {
    u32 ok;
    asm volatile(
        "{\n .reg .pred p;\n"
        " mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}"
        : "=r"(ok)
        : "r"(bar), "r"(parity)
        : "memory");
    if (ok) break;
    if (polls == kSpinTrapPolls) {
      if constexpr (!REPORT) {
        spin_trap_crumb(kCrumbMbar | 0x80, stage, parity, name);
        if ((threadIdx.x & 31) == 0) atomicAdd(&spin_trap_crumbs().timeouts, 1u);
        continue;  // the watchdog reports
      }
      printf("q35 spin trap: block (%d, %d, %d) warp %d thread %d: mbarrier %s (shared 0x%x) stage %d, parity %u: "
             "no completion after 2^26 polls\n",
             blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x / 32, threadIdx.x, name, bar, stage, parity);
      spin_trap_report("mbarrier wait timed out");
    }
  }
  spin_trap_crumb(kCrumbNone, 0, 0, "");
#else
  asm volatile(
      "{\n .reg .pred p;\n"
      "WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}" ::"r"(bar), "r"(parity) : "memory");
#endif
}
// Arrives on the mbarrier once every prior cp.async of this thread has landed (the barrier's count
// includes this arrival: .noinc). The thread itself does not wait.
__device__ __forceinline__ void cp_async_mbar_arrive(u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}
// Barrier of the 128 threads of warpgroup wg (0 or 1; named barriers 1 and 2, 0 is __syncthreads).
__device__ __forceinline__ void warpgroup_sync(int wg) {
#if defined(Q35_SPIN_TRAP)
  spin_trap_crumb(kCrumbNamedBar, 1 + wg, 128 / 32, "warpgroup_sync");
#endif
  if (wg == 0) asm volatile("bar.sync 1, 128;" ::: "memory");
  else asm volatile("bar.sync 2, 128;" ::: "memory");
#if defined(Q35_SPIN_TRAP)
  spin_trap_crumb(kCrumbNone, 0, 0, "");
#endif
}
// Named barrier `id` (1 .. 15) of `threads` threads (a multiple of 32): sync waits until `threads`
// have arrived or synced, arrive only counts (the ping-pong between two consumer warpgroups).
// name: for the spin-trap report only.
__device__ __forceinline__ void named_bar_sync(int id, int threads, const char* name = "named barrier") {
#if defined(Q35_SPIN_TRAP)
  spin_trap_crumb(kCrumbNamedBar, id, u32(threads / 32), name);
#endif
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
#if defined(Q35_SPIN_TRAP)
  spin_trap_crumb(kCrumbNone, 0, 0, "");
#endif
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// Warpgroup register budgets of the warp-specialised kernel (setmaxnreg: multiples of 8 in [24, 256]).
// The registers come from the block's pool, (registers per thread at launch) x (threads of the block):
// for 384 threads and __launch_bounds__(384, 1) that is 168 x 384 = 64,512, so e.g. 24 (producer) +
// 2 x 240 (consumers) or 56 + 2 x 224 warpgroup budgets, x 128 threads. An .inc the pool cannot serve
// blocks forever (the warpgroup spins in USETMAXREG.TRY_ALLOC).
template <int R>
__device__ __forceinline__ void regs_dec() {
  static_assert(R % 8 == 0 && R >= 24 && R <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void regs_inc() {
  static_assert(R % 8 == 0 && R >= 24 && R <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
#if defined(Q35_SPIN_TRAP)
  spin_trap_crumb(kCrumbRegsInc, R, 0, "setmaxnreg.inc");
#endif
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
#if defined(Q35_SPIN_TRAP)
  spin_trap_crumb(kCrumbNone, 0, 0, "");
#endif
}
// The pool of a block of THREADS threads under __launch_bounds__(THREADS, 1): 64 Ki registers per
// SM, per-thread count rounded down to a multiple of 8.
template <int THREADS>
constexpr int kRegisterPool = (65536 / THREADS) / 8 * 8 * THREADS;

}  // namespace sm90
}  // namespace q35k
