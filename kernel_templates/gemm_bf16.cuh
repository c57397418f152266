#pragma once
// bf16 GEMM for many tokens (prefill): y[M, N] = x[M, K] . W[N, K]^T, fp32 accumulation.
//   x [M, K] bf16 row-major, W [N, K] bf16 (a torch Linear weight; GROUP 0) or FP8 (GROUP kFp8,
//   weights.cuh: codes uint8 [N, K], scales S fp32 [N, ceil(K / 128)]), y [M, N] bf16 or fp32
//   (OUT_F32: logits); K % 8 == 0 (FP8: K % 16), x / W 16-byte aligned. M is read at run time; N, K
//   are baked in.
// Tensor cores through mma.sync.m16n8k16 (sm_80+, also the portable path on sm_90a): both operands
// are K-contiguous ("TN"), so ldmatrix without transpose yields the A fragment from x and the
// .col B fragment from W. Tiles of BM x BK (x) and BN x BK (W) stream through a STAGES-deep cp.async
// ring in dynamic shared memory; rows past M or N and columns past K are zero-filled by cp.async
// (src-size 0), so ragged shapes need no special path, and stores are guarded.
// Shared-memory rows are XOR-swizzled in 16-byte chunks within 128-byte lines, which makes both
// the cp.async writes and the ldmatrix reads bank-conflict free for BK = 32, 64 or 128.
// FP8 (W8A16): the ring holds the raw codes of W (BN x BK bytes per stage, 16-byte chunks of 16
// codes); at step kt each thread turns the chunks it copied itself (so its own cp.async wait
// suffices) into bf16(fp8 * scale) (fp8.cuh: rounded once) in a 2-deep ring of swizzled bf16 B tiles,
// before the step's barrier: the tile written at step kt was last read at step kt - 2, which every
// thread finished before the barrier of step kt - 1. The scales of step kt + 1 are read meanwhile.
// Grid: (ceil(M / BM), ceil(N / BN)); consecutive blocks share one W tile (kept in L2).
// Block: WARPS_M * WARPS_N warps; a warp owns a (BM / WARPS_M) x (BN / WARPS_N) sub-tile.
#include "common.cuh"
#include "fp8.cuh"

namespace q35k {

__device__ __forceinline__ u32 smem_addr(const void* p) { return u32(__cvta_generic_to_shared(p)); }

// 16-byte async copy global -> shared; copies 0 bytes (fills zeros) when !valid.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(PENDING)); }

__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// d += a . b for one m16n8k16 tile, bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][BK] bf16 tile: the chunk index
// within its 128-byte line is XORed with the line number (mod 8).
template <int BK>
__device__ __forceinline__ u32 swizzle(int row, int chunk) {
  const u32 off = u32(row) * (BK * 2) + u32(chunk) * 16;
  const u32 line = off >> 7;
  return (line << 7) | ((((off >> 4) & 7) ^ (line & 7)) << 4);
}

}  // namespace q35k

template <int GROUP, int N, int K, int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES, bool OUT_F32>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32)
gemm_bf16(const q35k::bf16* __restrict__ x,  // [M, K]
          const void* __restrict__ W,        // [N, K] bf16, or FP8 codes
          const void* __restrict__ S,        // FP8: scales fp32 [N, ceil(K / 128)] (else unused)
          void* __restrict__ y,              // [M, N] bf16, or fp32 if OUT_F32
          int M) {
  using namespace q35k;
  constexpr bool FP8 = GROUP == kFp8;
  constexpr int THREADS = WARPS_M * WARPS_N * 32;
  constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
  constexpr int MI = WTM / 16, NI = WTN / 8;              // mma tiles per warp
  constexpr int CHUNKS = BK / 8;                          // 16-byte chunks per tile row
  constexpr int KT = (K + BK - 1) / BK;                   // K steps
  constexpr u32 A_BYTES = BM * BK * 2, B_BYTES = BN * BK * (FP8 ? 1 : 2), STAGE_BYTES = A_BYTES + B_BYTES;
  constexpr u32 BS_BYTES = BN * BK * 2;                   // FP8: one bf16 B tile of the 2-deep ring
  constexpr int RAW_CHUNKS = BN * BK / 16;                // FP8: 16-code chunks of a stage's B tile
  constexpr int RAW_CPT = FP8 ? (RAW_CHUNKS + THREADS - 1) / THREADS : 1;
  constexpr int SPR = (K + kFp8BlockK - 1) / kFp8BlockK;  // FP8 scales per row
  static_assert(GROUP == 0 || GROUP == kFp8, "gemm_bf16: weights must be bf16 (GROUP 0) or FP8 (kFp8)");
  static_assert(K % (FP8 ? 16 : 8) == 0, "gemm_bf16: K must be a multiple of 8 (16-byte rows; FP8: 16)");
  static_assert(BK == 32 || BK == 64 || BK == 128, "gemm_bf16: BK must be 32, 64 or 128");
  static_assert(BM % (16 * WARPS_M) == 0 && BN % (16 * WARPS_N) == 0,
                "gemm_bf16: warp tiles must be multiples of 16 x 16");
  static_assert((BM * CHUNKS) % THREADS == 0 && (FP8 || (BN * CHUNKS) % THREADS == 0),
                "gemm_bf16: tile chunks must divide evenly over the threads");
  static_assert(STAGES >= 2, "gemm_bf16: at least 2 pipeline stages");

  extern __shared__ __align__(128) unsigned char smem[];
  const u32 smem_base = smem_addr(smem);
  const u32 bs_base = smem_base + STAGES * STAGE_BYTES;  // FP8: the bf16 B tiles
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const bf16* Wb = static_cast<const bf16*>(W);
  const unsigned char* Wq = static_cast<const unsigned char*>(W);

  // One K step of x and W into ring slot `slot`; rows past M / N and chunks past K read nothing.
  auto load_stage = [&](int slot, int kt) {
    const u32 a_base = smem_base + slot * STAGE_BYTES, b_base = a_base + A_BYTES;
    const int k0 = kt * BK;
#pragma unroll
    for (int i = 0; i < BM * CHUNKS / THREADS; ++i) {
      const int c = tid + i * THREADS, row = c / CHUNKS, ch = c % CHUNKS;
      const bool ok = m0 + row < M && (K % BK == 0 || k0 + ch * 8 < K);
      cp_async_16(a_base + swizzle<BK>(row, ch), ok ? x + size_t(m0 + row) * K + k0 + ch * 8 : x, ok);
    }
    if constexpr (FP8) {
#pragma unroll
      for (int i = 0; i < RAW_CPT; ++i) {
        const int c = tid + i * THREADS, row = c / (BK / 16), ch = c % (BK / 16);
        if (RAW_CHUNKS % THREADS != 0 && c >= RAW_CHUNKS) continue;
        const bool ok = n0 + row < N && (K % BK == 0 || k0 + ch * 16 < K);
        cp_async_16(b_base + c * 16, ok ? Wq + size_t(n0 + row) * K + k0 + ch * 16 : Wq, ok);
      }
    } else {
#pragma unroll
      for (int i = 0; i < BN * CHUNKS / THREADS; ++i) {
        const int c = tid + i * THREADS, row = c / CHUNKS, ch = c % CHUNKS;
        const bool ok = n0 + row < N && (K % BK == 0 || k0 + ch * 8 < K);
        cp_async_16(b_base + swizzle<BK>(row, ch), ok ? Wb + size_t(n0 + row) * K + k0 + ch * 8 : Wb, ok);
      }
    }
  };
  // FP8: the scales of this thread's chunks at step kt (rows and blocks clamped: their codes are zeros).
  float scale[RAW_CPT];
  auto load_scales = [&](int kt) {
    if constexpr (FP8) {
#pragma unroll
      for (int i = 0; i < RAW_CPT; ++i) {
        const int c = tid + i * THREADS, row = min(n0 + c / (BK / 16), N - 1);
        const int blk = min((kt * BK + (c % (BK / 16)) * 16) / kFp8BlockK, SPR - 1);
        scale[i] = static_cast<const float*>(S)[size_t(row) * SPR + blk];
      }
    }
  };
  // FP8: this thread's raw chunks of slot `slot` -> bf16 B tile `tile` (16 codes -> 2 swizzled chunks).
  auto dequant_stage = [&](int slot, int tile) {
    if constexpr (FP8) {
      const u32 raw = smem_base + slot * STAGE_BYTES + A_BYTES, bs = bs_base + tile * BS_BYTES;
#pragma unroll
      for (int i = 0; i < RAW_CPT; ++i) {
        const int c = tid + i * THREADS, row = c / (BK / 16), ch = c % (BK / 16);
        if (RAW_CHUNKS % THREADS != 0 && c >= RAW_CHUNKS) continue;
        uint4 v[2];
        e4m3x16_dequant(lds_16(raw + c * 16), scale[i], v);
        sts_16(bs + swizzle<BK>(row, 2 * ch), v[0]);
        sts_16(bs + swizzle<BK>(row, 2 * ch + 1), v[1]);
      }
    }
  };

  float acc[MI][NI][4] = {};

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  load_scales(0);

  // ldmatrix row / chunk of this lane: A x4 = rows 0-15 at k-chunks 0,1; B x4 = two n8 tiles.
  const int a_row = warp_m * WTM + lane % 16, a_chunk = lane / 16;
  const int b_row = warp_n * WTN + (lane & 7) + ((lane >> 4) << 3), b_chunk = (lane >> 3) & 1;

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    if constexpr (FP8) {
      dequant_stage(kt % STAGES, kt % 2);  // the chunks this thread copied: its own wait suffices
      if (kt + 1 < KT) load_scales(kt + 1);
    }
    __syncthreads();  // stage kt is visible; the slot refilled below was consumed by everyone
    if (kt + STAGES - 1 < KT) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
    cp_async_commit();

    const u32 a_base = smem_base + (kt % STAGES) * STAGE_BYTES;
    const u32 b_base = FP8 ? bs_base + (kt % 2) * BS_BYTES : a_base + A_BYTES;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      u32 a[MI][4], b[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(a_base + swizzle<BK>(a_row + mi * 16, kk * 2 + a_chunk), a[mi][0], a[mi][1], a[mi][2], a[mi][3]);
#pragma unroll
      for (int ni = 0; ni < NI; ni += 2)
        ldmatrix_x4(b_base + swizzle<BK>(b_row + ni * 8, kk * 2 + b_chunk), b[ni][0], b[ni][1], b[ni + 1][0],
                    b[ni + 1][1]);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_bf16_16816(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
  }
  cp_async_wait<0>();

  // Accumulator (mi, ni): c0, c1 at (row g, cols 2t, 2t+1), c2, c3 at row g + 8.
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_m * WTM + mi * 16 + g + half * 8;
      if (row >= M) continue;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int col = n0 + warp_n * WTN + ni * 8 + 2 * t;
        const float v0 = acc[mi][ni][2 * half], v1 = acc[mi][ni][2 * half + 1];
        const size_t at = size_t(row) * N + col;
        if constexpr (OUT_F32) {
          float* out = static_cast<float*>(y);
          if constexpr (N % 2 == 0) {
            if (col < N) *reinterpret_cast<float2*>(out + at) = make_float2(v0, v1);
          } else {
            if (col < N) out[at] = v0;
            if (col + 1 < N) out[at + 1] = v1;
          }
        } else {
          bf16* out = static_cast<bf16*>(y);
          if constexpr (N % 2 == 0) {
            if (col < N) *reinterpret_cast<u32*>(out + at) = f32x2_to_bf16x2(v0, v1);
          } else {
            if (col < N) out[at] = f32_to_bf16(v0);
            if (col + 1 < N) out[at + 1] = f32_to_bf16(v1);
          }
        }
      }
    }
}
