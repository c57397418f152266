#pragma once
// Hopper (sm_90a) GEMM on warpgroup MMA (wgmma) for prefill: the dense projections and the four
// grouped GEMMs of the MoE, bf16 or W4A16 weights (kernels.md §3, §4). The portable sm_80+ kernels
// are gemm_bf16.cuh and moe_gemm.cuh; the runner picks this one where the device is sm_90a.
//
//   out[row, n] = sum_k A[src(row), k] * W_e[n, k]        fp32 accumulation
//
// One template, the uses of moe_gemm.cuh plus the dense GEMM:
//   !ROUTED, !GATE_UP   dense / shared down: A [T, K], W [N, K]; rows t < T; out [T, N] bf16 (fp32 if
//                       OUT_F32). N need not be a multiple of BN (rows past N read zeros, stores guarded).
//   !ROUTED, GATE_UP    shared gate|up: out[t, i] = silu(A_t . gate_i) * (A_t . up_i), out [T, N / 2]
//   ROUTED, GATE_UP     routed gate|up: block b covers sorted positions b*BM .. of expert
//                       block_expert[b]; A row = sorted_ids[p] / TOPK (padding -1: zeros); out [p, N / 2]
//   ROUTED, !GATE_UP    routed down: A = h [p, K]; out[sorted_ids[p], :] (padding rows not written)
// W is [E, N, K] bf16 (GROUP 0) or W4A16 qweight u32 [E, N, K/8] (natural k order) with bf16 scales
// [E, N, K/GROUP]; GATE_UP rows are gate (N/2) | up (N/2).
//
// Block: WGM x WGN warpgroups (128 threads each); BM = 64 * WGM rows, BN columns, the warpgroup tile
// is 64 x BN/WGN, one wgmma.m64n{BN/WGN}k16 per 16 k. K steps of 64 (128-byte rows) stream through
// a STAGES-deep ring in dynamic shared memory filled by cp.async (A rows gathered per row, so the
// routed rows need no permuted copy), 128-byte swizzled as wgmma's descriptors expect. INT4 weights
// land raw in the ring and each thread dequantizes the chunk it copied (q * scale rounded to bf16
// once, as moe_gemm) into a 3-deep ring of bf16 B tiles. Prefetch distance STAGES - 2: the slot
// refilled at step kt was last read by the wgmma of step kt - 2, which every warpgroup has retired
// (wgmma.wait_group 1) before the barrier of step kt.
// GATE_UP: the block's B rows alternate 8 gate rows and 8 up rows, so accumulator column blocks
// j (gate) and j + 1 (up) of a thread pair up for silu(gate) * up in registers.
// Accumulators (per warpgroup, wgmma m64nN f32): thread (warp w of the group, lane l) holds
// d[j*4 + e], j < N/8: row w*16 + l/4 (+8 for e >= 2), column j*8 + 2*(l%4) + (e & 1).
// Grid: (ceil(N / BN), row blocks); block WGM * WGN * 128 threads; dynamic shared memory
// gemm_wgmma_smem_bytes (host: autotune/tiles_dense.h).
#include "moe_gemm.cuh"
#include "wgmma.cuh"

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

}  // namespace sm90
}  // namespace q35k

template <int GROUP, int N, int K, int TOPK, bool GATE_UP, bool ROUTED, bool OUT_F32, int BM, int BN, int STAGES,
          int WGM, int WGN>
__global__ void __launch_bounds__(WGM * WGN * 128, 1)
gemm_wgmma(const q35k::bf16* __restrict__ A, const void* __restrict__ W, const q35k::bf16* __restrict__ S,
           void* __restrict__ out, const int* __restrict__ sorted_ids, const int* __restrict__ block_expert,
           const int* __restrict__ num_blocks, int T) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace q35k;
  using namespace q35k::sm90;
  constexpr int BK = 64;                       // one 128-byte swizzle row of bf16
  constexpr int THREADS = WGM * WGN * 128;
  constexpr int WTN = BN / WGN;                // warpgroup tile: 64 x WTN
  constexpr int KT = (K + BK - 1) / BK;
  constexpr int D = STAGES - 2;                // prefetch distance
  constexpr u32 A_BYTES = BM * 128, BS_BYTES = BN * 128, RAW_BYTES = BN * 32;
  constexpr u32 STAGE_BYTES = A_BYTES + (GROUP == 0 ? BS_BYTES : RAW_BYTES);
  static_assert(BM == 64 * WGM, "gemm_wgmma: BM must be 64 * WGM");
  static_assert(WTN == 32 || WTN == 64 || WTN == 128 || WTN == 256, "gemm_wgmma: BN / WGN must be 32, 64, 128 or 256");
  static_assert(STAGES >= 3, "gemm_wgmma: at least 3 stages (prefetch distance STAGES - 2)");
  static_assert(K % 8 == 0 && N % 8 == 0, "gemm_wgmma: N and K must be multiples of 8");
  static_assert(GROUP == 0 || (K % BK == 0 && K % GROUP == 0 && (GROUP == 32 || GROUP == 64 || GROUP == 128)),
                "gemm_wgmma: W4A16 needs K a multiple of 64 and of the group (32, 64, 128)");
  static_assert(!(GATE_UP || ROUTED) || N % BN == 0, "gemm_wgmma: MoE GEMMs need N % BN == 0");
  static_assert(!GATE_UP || (WTN % 16 == 0 && !OUT_F32), "gemm_wgmma: gate|up pairs 8-column blocks, bf16 out");
  static_assert((BM * 8) % THREADS == 0 && (GROUP != 0 || (BN * 8) % THREADS == 0),
                "gemm_wgmma: tiles must split into 16-byte chunks evenly over the threads");
  static_assert(STAGE_BYTES % 1024 == 0 && BS_BYTES % 1024 == 0, "gemm_wgmma: 1024-byte aligned tiles");

  extern __shared__ unsigned char smem_raw[];
  const u32 base = (u32(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const u32 bs_base = base + STAGES * STAGE_BYTES;  // INT4: 3 bf16 B tiles

  const int tid = threadIdx.x, lane = tid % 32, wg = tid / 128, warp_in_wg = (tid / 32) % 4;
  const int wg_m = wg / WGN, wg_n = wg % WGN;
  const int nb = blockIdx.x, mb = blockIdx.y;
  int expert = 0;
  if constexpr (ROUTED) {
    if (mb >= *num_blocks) return;
    expert = block_expert[mb];
  }
  const long long row0 = (long long)mb * BM;

  // ---- A: this thread's 16-byte chunks (row, k chunk) of the BM x 64 tile ----
  constexpr int A_CPT = BM * 8 / THREADS;
  const bf16* a_src[A_CPT];
  bool a_ok[A_CPT];
  u32 a_off[A_CPT];
  int a_k[A_CPT];
#pragma unroll
  for (int i = 0; i < A_CPT; ++i) {
    const int c = tid + i * THREADS, r = c / 8, ch = c % 8;
    const long long p = row0 + r;
    long long src;
    if constexpr (ROUTED && GATE_UP) {
      const int pair = sorted_ids[p];
      a_ok[i] = pair >= 0;
      src = a_ok[i] ? pair / TOPK : 0;
    } else if constexpr (ROUTED) {
      a_ok[i] = true;  // h rows of padding are zeros (written by the gate|up GEMM)
      src = p;
    } else {
      a_ok[i] = p < T;
      src = a_ok[i] ? p : 0;
    }
    a_k[i] = ch * 8;
    a_src[i] = A + src * K + ch * 8;
    a_off[i] = sw128(r, ch);
  }

  // ---- B: weight rows of this thread's chunks ----
  // bf16: BN x 8 chunks of 8 values; INT4: BN x 2 chunks of 32 values (raw, 32 bytes per row).
  constexpr int B_CH = GROUP == 0 ? BN * 8 : BN * 2;
  constexpr int B_CPT = (B_CH + THREADS - 1) / THREADS;
  const unsigned char* b_src[B_CPT];
  const bf16* b_scale[B_CPT];
  bool b_ok[B_CPT];
  int b_row[B_CPT], b_k[B_CPT];
  {
    const size_t expert_rows = size_t(expert) * N;
#pragma unroll
    for (int i = 0; i < B_CPT; ++i) {
      const int c = tid + i * THREADS;
      const int n = GROUP == 0 ? c / 8 : c / 2, ch = GROUP == 0 ? c % 8 : c % 2;
      int wrow;
      if constexpr (GATE_UP) {
        const int t8 = n / 8;  // even: gate rows, odd: up rows
        wrow = nb * (BN / 2) + (t8 / 2) * 8 + n % 8 + (t8 % 2) * (N / 2);
      } else {
        wrow = nb * BN + n;
      }
      b_ok[i] = c < B_CH && wrow < N;
      const size_t r = expert_rows + (b_ok[i] ? wrow : 0);
      b_row[i] = n;
      if constexpr (GROUP == 0) {
        b_k[i] = ch * 8;
        b_src[i] = static_cast<const unsigned char*>(W) + (r * K + ch * 8) * 2;
        b_scale[i] = nullptr;
      } else {
        b_k[i] = ch * 32;
        b_src[i] = static_cast<const unsigned char*>(W) + (r * K + ch * 32) / 2;
        b_scale[i] = S + r * (K / (GROUP == 0 ? 1 : GROUP));
      }
    }
  }

  auto load_stage = [&](int kt) {
    const u32 a_tile = base + (kt % STAGES) * STAGE_BYTES, b_tile = a_tile + A_BYTES;
    const int k0 = kt * BK;
#pragma unroll
    for (int i = 0; i < A_CPT; ++i) {
      const bool ok = a_ok[i] && (K % BK == 0 || k0 + a_k[i] < K);
      cp_async_16_s(a_tile + a_off[i], ok ? a_src[i] + k0 : A, ok);
    }
#pragma unroll
    for (int i = 0; i < B_CPT; ++i) {
      const int c = tid + i * THREADS;
      if (B_CH % THREADS != 0 && c >= B_CH) continue;
      if constexpr (GROUP == 0) {
        const bool ok = b_ok[i] && (K % BK == 0 || k0 + b_k[i] < K);
        cp_async_16_s(b_tile + sw128(b_row[i], c % 8), ok ? b_src[i] + size_t(k0) * 2 : W, ok);
      } else {
        cp_async_16_s(b_tile + u32(c) * 16, b_ok[i] ? b_src[i] + k0 / 2 : W, b_ok[i]);
      }
    }
  };

  // INT4: the chunks this thread copied for step kt -> bf16 B tile kt % 3 (zeros for rows past N).
  bf16 scale_next[GROUP == 0 ? 1 : B_CPT];
  auto load_scales = [&](int kt) {
    if constexpr (GROUP != 0) {
#pragma unroll
      for (int i = 0; i < B_CPT; ++i)
        scale_next[i] = b_ok[i] ? b_scale[i][(kt * BK + b_k[i]) / GROUP] : bf16(0);
    }
  };
  auto dequant_stage = [&](int kt) {
    if constexpr (GROUP != 0) {
      const u32 raw = base + (kt % STAGES) * STAGE_BYTES + A_BYTES, bs = bs_base + (kt % 3) * BS_BYTES;
#pragma unroll
      for (int i = 0; i < B_CPT; ++i) {
        const int c = tid + i * THREADS;
        if (B_CH % THREADS != 0 && c >= B_CH) continue;
        uint4 v[4];
        dequant32(ld_shared_16(raw + u32(c) * 16), scale_next[i], v);
#pragma unroll
        for (int j = 0; j < 4; ++j) st_shared_16(bs + sw128(b_row[i], (c % 2) * 4 + j), v[j]);
      }
    }
  };

  float acc[WTN / 2];
#pragma unroll
  for (int i = 0; i < WTN / 2; ++i) acc[i] = 0.f;

#pragma unroll
  for (int s = 0; s < D; ++s) {
    if (s < KT) load_stage(s);
    cp_async_commit();
  }
  load_scales(0);

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<D - 1>();  // this thread's copies of step kt have landed
    if constexpr (GROUP != 0) {
      dequant_stage(kt);  // tile kt % 3 was last read by the wgmma of step kt - 3: retired everywhere
      if (kt + 1 < KT) load_scales(kt + 1);
    }
    fence_proxy_async();  // generic-proxy smem writes (cp.async, st.shared) -> visible to wgmma
    __syncthreads();
    if (kt + D < KT) load_stage(kt + D);  // slot of step kt - 2: retired by every warpgroup
    cp_async_commit();

    const u32 a_tile = base + (kt % STAGES) * STAGE_BYTES + u32(wg_m) * 64 * 128;
    const u32 b_tile = (GROUP == 0 ? base + (kt % STAGES) * STAGE_BYTES + A_BYTES : bs_base + (kt % 3) * BS_BYTES) +
                       u32(wg_n) * WTN * 128;
    fence_regs(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
      wgmma_bf16<WTN>(acc, desc_k128_sw128(a_tile + kk * 32), desc_k128_sw128(b_tile + kk * 32), 1);
    wgmma_commit();
    wgmma_wait<1>();
    fence_regs(acc);
  }
  wgmma_wait<0>();
  fence_regs(acc);
  cp_async_wait<0>();

  // ---- epilogue ----
  const int g = lane / 4, c2 = (lane % 4) * 2;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const long long p = row0 + wg_m * 64 + warp_in_wg * 16 + g + half * 8;  // row of the block's tile
    if constexpr (GATE_UP) {
      if (!ROUTED && p >= T) continue;
      bf16* o = static_cast<bf16*>(out);
#pragma unroll
      for (int j = 0; j < WTN / 8; j += 2) {
        const int col = nb * (BN / 2) + ((wg_n * WTN) / 16 + j / 2) * 8 + c2;
        const float h0 = silu(acc[j * 4 + half * 2]) * acc[(j + 1) * 4 + half * 2];
        const float h1 = silu(acc[j * 4 + half * 2 + 1]) * acc[(j + 1) * 4 + half * 2 + 1];
        *reinterpret_cast<u32*>(o + size_t(p) * (N / 2) + col) = f32x2_to_bf16x2(h0, h1);
      }
    } else {
      long long dst;
      if constexpr (ROUTED) dst = sorted_ids[p];
      else dst = p < T ? p : -1;
      if (dst < 0) continue;
#pragma unroll
      for (int j = 0; j < WTN / 8; ++j) {
        const int col = nb * BN + wg_n * WTN + j * 8 + c2;
        if (N % BN != 0 && col >= N) continue;
        const float v0 = acc[j * 4 + half * 2], v1 = acc[j * 4 + half * 2 + 1];
        if constexpr (OUT_F32)
          *reinterpret_cast<float2*>(static_cast<float*>(out) + size_t(dst) * N + col) = make_float2(v0, v1);
        else
          *reinterpret_cast<u32*>(static_cast<bf16*>(out) + size_t(dst) * N + col) = f32x2_to_bf16x2(v0, v1);
      }
    }
  }
#else
  __trap();  // sm_90a only: the host picks this kernel only for sm_90a targets
#endif
}
