#pragma once
// Grouped tensor-core GEMM of the MoE prefill path (spec §2.6; kernels.md §3), mma.sync m16n8k16
// bf16 -> fp32 (sm_80+). One template, four uses:
//   GATE_UP, ROUTED:  h[p, :]  = silu(x[tok(p)] . gate_e^T) * (x[tok(p)] . up_e^T)   p = sorted position
//   GATE_UP, !ROUTED: hs[t, :] = the same with the shared expert, t < T
//   !GATE_UP, ROUTED: y[sorted_ids[p], :] = h[p] . down_e^T        (rows of padding are not written)
//   !GATE_UP, !ROUTED: ys[t, :] = hs[t] . shared_down^T
// ROUTED: block row b covers sorted positions b*BM .. +BM-1 of expert block_expert[b] (moe_align),
// tok(p) = sorted_ids[p] / TOPK, padding (-1) rows read zeros; blocks b >= num_blocks[0] exit.
// !ROUTED: one weight matrix, rows t < T.
//   A     [rows, K] bf16 (x [T, H] for GATE_UP, h / hs for down)
//   W     [E, N, K] (one [N, K] if !ROUTED), bf16, W4A16 or FP8 (GROUP, weights.cuh); GATE_UP: N = 2 * I
//         rows gate | up, output width N / 2
//   out   GATE_UP: [num_blocks * BM (or T), N / 2] bf16; down: [T*TOPK (or T), N] bf16
// Tiles: block BM x BN x BK, WM x WN warps, each warp (BM/WM) x (BN/WN) as 16 x 8 mma tiles. Two
// shared-memory stages: A (and bf16 B) by cp.async, INT4 / FP8 B through registers (16-byte vectors
// of 32 INT4 or 16 FP8 weights), dequantized to bf16 (q * scale rounded once) as it is stored. Rows of the smem tiles are padded by 16 bytes so
// ldmatrix is conflict-free. GATE_UP: the block's B rows alternate 8 gate rows, 8 up rows, so each
// thread holds matching gate and up accumulators and applies silu(gate) * up in registers.
// Grid: (N / BN, row blocks); block WM * WN * 32.
#include "moe.cuh"

namespace q35k {

__device__ __forceinline__ u32 smem_addr(const void* p) { return u32(__cvta_generic_to_shared(p)); }

// 16-byte cp.async, zero-filled when !valid (src must still be a mapped address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// 32 INT4 values (4 words, natural k order) times a bf16 scale -> 32 bf16 in k order (4 uint4).
__device__ __forceinline__ void dequant32(const uint4& q, bf16 scale, uint4 (&out)[4]) {
  const u32 s2 = u32(scale) | (u32(scale) << 16), neg0 = 0x80008000u;
  const u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    u32 p[4];
    int4x8_to_bf16x2(words[w], p);
#pragma unroll
    for (int i = 0; i < 4; ++i) asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(p[i]) : "r"(p[i]), "r"(s2), "r"(neg0));
    out[w].x = p[0], out[w].y = p[1], out[w].z = p[2], out[w].w = p[3];
  }
}

// One raw 16-byte chunk of quantized weights times its scale -> bf16 in k order, rounded once: 32
// INT4 weights (4 vectors, dequant32) or 16 FP8 codes (2 vectors, fp8.cuh).
template <int GROUP>
__device__ __forceinline__ void dequant_chunk(const uint4& q, typename WeightFormat<GROUP>::Scale scale,
                                              uint4 (&out)[GROUP == kFp8 ? 2 : 4]) {
  if constexpr (GROUP == kFp8) e4m3x16_dequant(q, scale, out);
  else dequant32(q, scale, out);
}

// Row of A that block row p reads (sets ok = false for rows that read zeros): routed gate|up
// gathers token sorted_ids[p] / TOPK (padding -1), routed down reads h row p (its padding rows are
// zeros), the shared expert and dense GEMMs read row p < T.
template <int TOPK, bool GATE_UP, bool ROUTED>
__device__ __forceinline__ long long moe_a_row(const int* sorted_ids, long long p, int T, bool& ok) {
  if constexpr (ROUTED && GATE_UP) {
    const int pair = sorted_ids[p];
    ok = pair >= 0;
    return ok ? pair / TOPK : 0;
  } else if constexpr (ROUTED) {
    ok = true;  // h rows of padding are zeros (written by the gate|up GEMM)
    return p;
  } else {
    ok = p < T;
    return ok ? p : 0;
  }
}

// Weight row of row n of column block nb (BN rows): GATE_UP blocks alternate 8 gate rows (of the
// first N / 2) and the matching 8 up rows, so silu(gate) * up pairs in registers.
template <int N, int BN, bool GATE_UP>
__device__ __forceinline__ int moe_w_row(int nb, int n) {
  if constexpr (GATE_UP) {
    const int t8 = n / 8;  // even: gate rows, odd: up rows
    return nb * (BN / 2) + (t8 / 2) * 8 + n % 8 + (t8 % 2) * (N / 2);
  } else {
    return nb * BN + n;
  }
}

}  // namespace q35k

template <int GROUP, int N, int K, int TOPK, bool GATE_UP, bool ROUTED, int BM, int BN, int BK, int WM, int WN>
__global__ void __launch_bounds__(WM * WN * 32)
moe_gemm(const q35k::bf16* __restrict__ A, const void* __restrict__ W, const void* __restrict__ S,
         q35k::bf16* __restrict__ out, const int* __restrict__ sorted_ids, const int* __restrict__ block_expert,
         const int* __restrict__ num_blocks, int T) {
  using q35k::bf16;
  using q35k::u32;
  constexpr int THREADS = WM * WN * 32;
  constexpr int WTM = BM / WM, WTN = BN / WN;  // warp tile
  constexpr int MT = WTM / 16, NT = WTN / 8;   // mma tiles per warp
  constexpr int LDS = BK + 8;                  // smem row stride (bf16): 16 bytes of padding
  constexpr int KT = K / BK;
  using F = q35k::WeightFormat<GROUP>;
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "moe_gemm: warp tile must be a multiple of 16 x 16");
  static_assert(N % BN == 0 && K % BK == 0 && BK % 16 == 0, "moe_gemm: N % BN, K % BK, BK % 16 must be 0");
  static_assert(GROUP <= 0 || BK % 32 == 0, "moe_gemm: INT4 needs BK % 32 == 0");
  constexpr int A_CHUNKS = BM * BK / 8 / THREADS;                          // 16-byte A vectors per thread
  constexpr int B_VALS = GROUP == 0 ? 8 : GROUP == q35k::kFp8 ? 16 : 32;   // values per 16-byte B vector
  constexpr int B_CHUNKS = BN * BK / B_VALS / THREADS;                     // B vectors per thread
  static_assert(A_CHUNKS * THREADS * 8 == BM * BK && B_CHUNKS * THREADS * B_VALS == BN * BK,
                "moe_gemm: the tiles must split evenly over the threads");

  __shared__ __align__(16) bf16 sA[2][BM * LDS];
  __shared__ __align__(16) bf16 sB[2][BN * LDS];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / WN, warp_n = warp % WN;
  const int mb = blockIdx.y, nb = blockIdx.x;
  int expert = 0;
  if constexpr (ROUTED) {
    if (mb >= *num_blocks) return;
    expert = block_expert[mb];
  }
  const size_t row0 = size_t(mb) * BM;

  // ---- A rows of this thread's vectors (fixed over k) ----
  const bf16* a_src[A_CHUNKS];
  bool a_ok[A_CHUNKS];
  int a_dst[A_CHUNKS];
#pragma unroll
  for (int i = 0; i < A_CHUNKS; ++i) {
    const int idx = tid + i * THREADS, r = idx / (BK / 8), kc = idx % (BK / 8);
    const long long src_row = q35k::moe_a_row<TOPK, GATE_UP, ROUTED>(sorted_ids, (long long)(row0 + r), T, a_ok[i]);
    a_src[i] = A + size_t(src_row) * K + kc * 8;
    a_dst[i] = r * LDS + kc * 8;
  }

  // ---- B rows of this thread's vectors ----
  constexpr int BCPR = BK / B_VALS;  // B vectors per row per k-tile
  const unsigned char* b_src[B_CHUNKS];
  const void* const scales = F::template scales<N, K>(S, expert);  // INT4 / FP8: the expert's scales
  int b_srow[B_CHUNKS];  // the row's first scale in `scales`
  int b_k[B_CHUNKS], b_dst[B_CHUNKS];
  {
    const unsigned char* Wm = static_cast<const unsigned char*>(F::template matrix<N, K>(W, expert));
#pragma unroll
    for (int i = 0; i < B_CHUNKS; ++i) {
      const int idx = tid + i * THREADS, n = idx / BCPR, kc = idx % BCPR;
      const int wrow = q35k::moe_w_row<N, BN, GATE_UP>(nb, n);
      b_src[i] = Wm + F::bytes(size_t(wrow) * K + kc * B_VALS);
      b_srow[i] = wrow * F::scales_per_row(K);
      b_k[i] = kc * B_VALS;
      b_dst[i] = n * LDS + kc * B_VALS;
    }
  }

  uint4 bq[GROUP == 0 ? 1 : B_CHUNKS];  // INT4 / FP8 B vectors in flight
  typename F::Scale bs[GROUP == 0 ? 1 : B_CHUNKS];  // and their scales
  auto load_tile = [&](int kt, int stage) {
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i) q35k::cp_async_16(&sA[stage][a_dst[i]], a_src[i] + kt * BK, a_ok[i]);
    if constexpr (GROUP == 0) {
#pragma unroll
      for (int i = 0; i < B_CHUNKS; ++i) q35k::cp_async_16(&sB[stage][b_dst[i]], b_src[i] + size_t(kt) * BK * 2, true);
    } else {
#pragma unroll
      for (int i = 0; i < B_CHUNKS; ++i) {
        bq[i] = q35k::ld_stream_16(b_src[i] + F::bytes(size_t(kt) * BK));
        bs[i] = F::stored_scale(scales, size_t(b_srow[i] + (kt * BK + b_k[i]) / F::SCALE_K));
      }
    }
    q35k::cp_async_commit();
  };
  auto store_b = [&](int stage) {
    if constexpr (GROUP != 0) {
      constexpr int OUT = B_VALS / 8;  // bf16 vectors per B vector
#pragma unroll
      for (int i = 0; i < B_CHUNKS; ++i) {
        uint4 v[OUT];
        q35k::dequant_chunk<GROUP>(bq[i], bs[i], v);
#pragma unroll
        for (int j = 0; j < OUT; ++j) *reinterpret_cast<uint4*>(&sB[stage][b_dst[i] + j * 8]) = v[j];
      }
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

  load_tile(0, 0);
  store_b(0);
  for (int kt = 0; kt < KT; ++kt) {
    const int cur = kt & 1;
    if (kt + 1 < KT) load_tile(kt + 1, cur ^ 1);
    else q35k::cp_async_commit();
    q35k::cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      u32 af[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)
        q35k::ldmatrix_x4(af[i], &sA[cur][(warp_m * WTM + i * 16 + lane % 16) * LDS + kk + (lane / 16) * 8]);
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        u32 bf[4];
        q35k::ldmatrix_x4(bf, &sB[cur][(warp_n * WTN + j * 8 + lane % 8 + (lane / 16) * 8) * LDS + kk + ((lane / 8) % 2) * 8]);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          q35k::mma_bf16_16816(acc[i][j], af[i], bf[0], bf[1]);
          q35k::mma_bf16_16816(acc[i][j + 1], af[i], bf[2], bf[3]);
        }
      }
    }
    if (kt + 1 < KT) store_b(cur ^ 1);
    __syncthreads();
  }

  // ---- epilogue ----
  const int g = lane / 4, c2 = (lane % 4) * 2;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const size_t p = row0 + warp_m * WTM + i * 16 + g + half * 8;  // row of this block's tile
      if constexpr (GATE_UP) {
        if (!ROUTED && p >= size_t(T)) continue;
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
          const int col = nb * (BN / 2) + ((warp_n * WTN) / 16 + j / 2) * 8 + c2;
          const float h0 = q35k::silu(acc[i][j][half * 2]) * acc[i][j + 1][half * 2];
          const float h1 = q35k::silu(acc[i][j][half * 2 + 1]) * acc[i][j + 1][half * 2 + 1];
          *reinterpret_cast<u32*>(out + p * (N / 2) + col) = q35k::f32x2_to_bf16x2(h0, h1);
        }
      } else {
        long long dst;
        if constexpr (ROUTED) dst = sorted_ids[p];
        else dst = p < size_t(T) ? (long long)p : -1;
        if (dst < 0) continue;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int col = nb * BN + warp_n * WTN + j * 8 + c2;
          *reinterpret_cast<u32*>(out + size_t(dst) * N + col) =
              q35k::f32x2_to_bf16x2(acc[i][j][half * 2], acc[i][j][half * 2 + 1]);
        }
      }
    }
}
