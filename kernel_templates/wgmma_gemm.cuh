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
// W is [E, N, K] bf16 (GROUP 0), W4A16 qweight u32 [E, N, K/8] (natural k order) with bf16 scales
// [E, N, K/GROUP], or FP8 (GROUP kFp8) codes uint8 [E, N, K] with fp32 scales [E, N, ceil(K/128)]
// (weights.cuh); GATE_UP rows are gate (N/2) | up (N/2).
//
// Block: WGM x WGN warpgroups (128 threads each); BM = 64 * WGM rows, BN columns, the warpgroup tile
// is 64 x BN/WGN, one wgmma.m64n{BN/WGN}k16 per 16 k. K steps of 64 (128-byte rows) stream through
// a STAGES-deep ring in dynamic shared memory filled by cp.async (A rows gathered per row, so the
// routed rows need no permuted copy), 128-byte swizzled as wgmma's descriptors expect. INT4 and FP8
// weights land raw in the ring (a 64-k step of a row: 2 chunks of 16 bytes INT4, 4 FP8) and each
// thread dequantizes the chunks it copied (q * scale rounded to bf16 once, as moe_gemm) into a
// 3-deep ring of bf16 B tiles. Prefetch distance STAGES - 2: the slot
// refilled at step kt was last read by the wgmma of step kt - 2, which every warpgroup has retired
// (wgmma.wait_group 1) before the barrier of step kt.
// GATE_UP: the block's B rows alternate 8 gate rows and 8 up rows, so accumulator column blocks
// j (gate) and j + 1 (up) of a thread pair up for silu(gate) * up in registers.
// Accumulators (per warpgroup, wgmma m64nN f32): thread (warp w of the group, lane l) holds
// d[j*4 + e], j < N/8: row w*16 + l/4 (+8 for e >= 2), column j*8 + 2*(l%4) + (e & 1).
// Grid: (ceil(N / BN), row blocks); block (WGM * WGN + WS) * 128 threads; dynamic shared memory
// wgmma_smem_bytes (host: autotune/tiles_wgmma.h).
//
// WS (warp-specialised): one more warpgroup, the producer, does every load and dequantization; the
// WGM x WGN consumer warpgroups only wait and issue wgmma. Stage s of the STAGES-deep ring holds the
// A tile and the bf16 B tile or (W4A16, FP8) the raw B tile; full[s] / empty[s] mbarriers replace
// the block barrier, so the producer runs STAGES - 2 steps ahead and dequantizes step kt while the
// consumers multiply step kt - 1.
// SWAP (WS only; few rows, e.g. the MoE's tokens per expert at short prompts): the weights are
// wgmma's M side (64 B rows per consumer warpgroup, BN = 64 * WGN, WGM = 1) and the BM = 8..64 A rows
// its N side, so a block streams 64-row weight panels at wgmma m64n{BM} instead of padding the few
// rows of an expert to 64.
#include "moe_gemm.cuh"
#include "sm90_pipeline.cuh"
#include "wgmma.cuh"

namespace q35k {
namespace sm90 {

// The loads of one block's tiles, spread over LT threads (ltid = 0 .. LT-1): per stage of KSUB K
// steps of 64, the A rows (gathered: routed gate|up reads A row sorted_ids[p] / TOPK) and the B rows
// (bf16, or raw INT4 / FP8 dequantized by the thread that copied them when KSUB = 1). A stage holds
// KSUB A tiles [BM x 64] (128-byte swizzled rows), then KSUB bf16 B tiles [BN x 64] or the raw rows
// (row n: B_RCH 16-byte chunks of RAW_VALS weights, 32 KSUB bytes INT4 or 64 KSUB FP8, chunk c of
// row n at 16 (B_RCH n + c)). Used by every thread of gemm_wgmma, and by the producer warpgroup of
// its warp-specialised form.
template <int GROUP, int N, int K, int TOPK, bool GATE_UP, bool ROUTED, int BM, int BN, int LT, int KSUB = 1>
struct WgTileLoader {
  using F = WeightFormat<GROUP>;
  static constexpr int BK = 64 * KSUB;  // K per stage
  static constexpr u32 A_BYTES = BM * 128;  // one A tile (64 k)
  static constexpr int A_CH = BM * 8 * KSUB;  // 16-byte chunks of the stage's A tiles
  static constexpr int A_CPT = (A_CH + LT - 1) / LT;
  static constexpr int RAW_VALS = GROUP == kFp8 ? 16 : 32;  // weights per raw 16-byte chunk (INT4 / FP8)
  static constexpr int B_RCH = GROUP == 0 ? 8 * KSUB : BK / RAW_VALS;  // 16-byte chunks per B row
  static constexpr int B_CH = BN * B_RCH;
  static constexpr int B_CPT = (B_CH + LT - 1) / LT;
  static_assert((A_CH % LT == 0 || A_CH < LT) && (GROUP != 0 || B_CH % LT == 0),
                "gemm_wgmma: tiles must split into 16-byte chunks evenly over the loading threads");
  const bf16* a_src[A_CPT];
  bool a_ok[A_CPT];
  u32 a_off[A_CPT];
  int a_k[A_CPT];
  const unsigned char* b_src[B_CPT];
  const void* b_scale[B_CPT];
  bool b_ok[B_CPT];
  u32 b_off[B_CPT];
  int b_row[B_CPT], b_k[B_CPT];
  typename F::Scale scale_next[GROUP == 0 ? 1 : B_CPT];
  int ltid;

  __device__ __forceinline__ void init(int ltid_, const bf16* A, const void* W, const void* S, const int* sorted_ids,
                                       int expert, long long row0, int nb, int T) {
    ltid = ltid_;
#pragma unroll
    for (int i = 0; i < A_CPT; ++i) {
      const int c = min(ltid + i * LT, A_CH - 1), r = c / (8 * KSUB), ch = c % (8 * KSUB);  // past A_CH: no copy
      const long long src = moe_a_row<TOPK, GATE_UP, ROUTED>(sorted_ids, row0 + r, T, a_ok[i]);
      a_k[i] = ch * 8;
      a_src[i] = A + src * K + ch * 8;
      a_off[i] = u32(ch / 8) * A_BYTES + sw128(r, ch % 8);
    }
    const size_t expert_rows = size_t(expert) * N;
#pragma unroll
    for (int i = 0; i < B_CPT; ++i) {
      const int c = ltid + i * LT;
      const int n = c / B_RCH, ch = c % B_RCH;
      const int wrow = moe_w_row<N, BN, GATE_UP>(nb, n);
      b_ok[i] = c < B_CH && wrow < N;
      const size_t r = expert_rows + (b_ok[i] ? wrow : 0);
      b_row[i] = n;
      if constexpr (GROUP == 0) {
        b_k[i] = ch * 8;
        b_src[i] = static_cast<const unsigned char*>(W) + (r * K + ch * 8) * 2;
        b_scale[i] = nullptr;
        b_off[i] = u32(ch / 8) * (BN * 128) + sw128(n, ch % 8);
      } else {
        b_k[i] = ch * RAW_VALS;
        b_src[i] = static_cast<const unsigned char*>(W) + F::bytes(r * K + ch * RAW_VALS);
        b_scale[i] = F::scale_row(S, r, K);
        b_off[i] = u32(c) * 16;
      }
    }
  }

  // cp.async of stage kt: A into a_tile, B into b_tile (bf16, swizzled) or raw (16 B per chunk).
  __device__ __forceinline__ void load(u32 a_tile, u32 b_tile, int kt, const bf16* A, const void* W) const {
    const int k0 = kt * BK;
#pragma unroll
    for (int i = 0; i < A_CPT; ++i) {
      if (A_CH % LT != 0 && ltid + i * LT >= A_CH) continue;
      const bool ok = a_ok[i] && (K % BK == 0 || k0 + a_k[i] < K);
      cp_async_16_s(a_tile + a_off[i], ok ? a_src[i] + k0 : A, ok);
    }
#pragma unroll
    for (int i = 0; i < B_CPT; ++i) {
      const int c = ltid + i * LT;
      if (B_CH % LT != 0 && c >= B_CH) continue;
      if constexpr (GROUP == 0) {
        const bool ok = b_ok[i] && (K % BK == 0 || k0 + b_k[i] < K);
        cp_async_16_s(b_tile + b_off[i], ok ? b_src[i] + size_t(k0) * 2 : W, ok);
      } else {
        cp_async_16_s(b_tile + b_off[i], b_ok[i] ? b_src[i] + F::bytes(k0) : W, b_ok[i]);
      }
    }
  }
  __device__ __forceinline__ void load_scales(int kt) {
    if constexpr (GROUP != 0) {
#pragma unroll
      for (int i = 0; i < B_CPT; ++i)
        scale_next[i] =
            b_ok[i] ? F::stored_scale(b_scale[i], (kt * BK + b_k[i]) / F::SCALE_K) : typename F::Scale(0);
    }
  }
  // INT4 / FP8, KSUB = 1: the raw chunks this thread copied -> bf16 B tile bs (zeros for rows past N).
  __device__ __forceinline__ void dequant(u32 raw, u32 bs) const {
    static_assert(KSUB == 1, "gemm_wgmma: the copying thread dequantizes only single-step stages");
    if constexpr (GROUP != 0) {
      constexpr int OUT = RAW_VALS / 8;  // bf16 16-byte chunks per raw chunk
#pragma unroll
      for (int i = 0; i < B_CPT; ++i) {
        const int c = ltid + i * LT;
        if (B_CH % LT != 0 && c >= B_CH) continue;
        uint4 v[OUT];
        dequant_chunk<GROUP>(lds_16(raw + u32(c) * 16), scale_next[i], v);
#pragma unroll
        for (int j = 0; j < OUT; ++j) sts_16(bs + sw128(b_row[i], (c % B_RCH) * OUT + j), v[j]);
      }
    }
  }
};

// Swapped form, W4A16 / FP8: a consumer warpgroup dequantizes its own 64 B rows (64 wg ..) of raw
// weights into a bf16 B tile, thread t of the warpgroup half a row's 64-k step (32 k-values) per
// step: row n = 64 wg + t / 2, half t % 2; of 64-k step u of the stage, raw chunks
// B_RCH n + (64 / RAW_VALS) u + PER_HALF half + i, i < PER_HALF (one INT4 chunk, two FP8 ones).
template <int GROUP, int N, int K, bool GATE_UP, int BN, int KSUB>
struct WgRowDequant {
  using F = WeightFormat<GROUP>;
  static constexpr int RAW_VALS = GROUP == kFp8 ? 16 : 32, PER_HALF = 32 / RAW_VALS, OUT = RAW_VALS / 8;
  static constexpr int B_RCH = 64 * KSUB / RAW_VALS;
  int n, half;
  bool ok;
  const void* scale;
  typename F::Scale next;
  __device__ __forceinline__ void init(int t, int wg, int expert, int nb, const void* S) {
    n = 64 * wg + t / 2, half = t % 2;
    const int wrow = moe_w_row<N, BN, GATE_UP>(nb, n);
    ok = wrow < N;
    scale = F::scale_row(S, size_t(expert) * N + (ok ? wrow : 0), K);
  }
  // q: the 64-k step (stage * KSUB + u)
  __device__ __forceinline__ void load_scale(int q) {
    next = ok ? F::stored_scale(scale, (q * 64 + half * 32) / F::SCALE_K) : typename F::Scale(0);
  }
  __device__ __forceinline__ void run(u32 raw, int u, u32 bs) const {
#pragma unroll
    for (int i = 0; i < PER_HALF; ++i) {
      uint4 v[OUT];
      dequant_chunk<GROUP>(lds_16(raw + u32(B_RCH * n + (64 / RAW_VALS) * u + PER_HALF * half + i) * 16), next, v);
#pragma unroll
      for (int j = 0; j < OUT; ++j) sts_16(bs + sw128(n, half * 4 + i * OUT + j), v[j]);
    }
  }
};

// The epilogue of one warpgroup's 64 x WTN accumulator tile (layout in the header comment).
template <int N, bool GATE_UP, bool ROUTED, bool OUT_F32, int BN, int WTN>
__device__ __forceinline__ void wg_epilogue(const float (&acc)[WTN / 2], void* out, const int* sorted_ids,
                                            long long row0, int nb, int wg_m, int wg_n, int warp_in_wg, int lane,
                                            int T) {
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
}

// The epilogue of the swapped form (SWAP): a warpgroup's accumulator is 64 weight rows (the block's
// B rows 64 wg ..) x BT token rows; thread (warp w, lane l) holds d[j*4 + e]: weight row
// 16 w + l/4 + 8 (e / 2), token column j*8 + 2 (l % 4) + (e & 1). GATE_UP: rows 16 w + l/4 are gate
// rows and + 8 the matching up rows (B rows alternate 8 gate, 8 up), so silu(gate) * up pairs in
// registers for intermediate column i = nb BN/2 + (4 wg + w) 8 + l/4.
template <int N, bool GATE_UP, bool ROUTED, bool OUT_F32, int BN, int BT>
__device__ __forceinline__ void wg_epilogue_swap(const float (&acc)[BT / 2], void* out, const int* sorted_ids,
                                                 long long row0, int nb, int wg, int warp_in_wg, int lane, int T) {
#pragma unroll
  for (int j = 0; j < BT / 8; ++j)
#pragma unroll
    for (int e1 = 0; e1 < 2; ++e1) {
      const long long p = row0 + j * 8 + 2 * (lane % 4) + e1;  // token row of the block's tile
      if constexpr (GATE_UP) {
        if (!ROUTED && p >= T) continue;
        const int i = nb * (BN / 2) + (4 * wg + warp_in_wg) * 8 + lane / 4;
        static_cast<bf16*>(out)[size_t(p) * (N / 2) + i] = f32_to_bf16(silu(acc[j * 4 + e1]) * acc[j * 4 + 2 + e1]);
      } else {
        long long dst;
        if constexpr (ROUTED) dst = sorted_ids[p];
        else dst = p < T ? p : -1;
        if (dst < 0) continue;
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          const int n = nb * BN + 64 * wg + 16 * warp_in_wg + lane / 4 + 8 * e2;
          if (N % BN != 0 && n >= N) continue;
          const float v = acc[j * 4 + 2 * e2 + e1];
          if constexpr (OUT_F32) static_cast<float*>(out)[size_t(dst) * N + n] = v;
          else static_cast<bf16*>(out)[size_t(dst) * N + n] = f32_to_bf16(v);
        }
      }
    }
}

// Whether warpgroup row half wg_m (rows row0 + 64 wg_m ..) of a block holds any real row. Routed:
// moe_align pads each expert's rows at the end of its last block, so a half whose first row is
// padding is padding throughout; its wgmma and epilogue are skipped (its h rows are never read: the
// down GEMM of the same tile skips the same half). Dense / shared: rows past T.
template <bool ROUTED, int WGM>
__device__ __forceinline__ bool wg_rows_active(const int* sorted_ids, long long row0, int wg_m, int T) {
  if constexpr (WGM == 1) return true;
  else if constexpr (ROUTED) return wg_m == 0 || sorted_ids[row0 + 64 * wg_m] >= 0;
  else return row0 + 64 * wg_m < T;
}

}  // namespace sm90
}  // namespace q35k

template <int GROUP, int N, int K, int TOPK, bool GATE_UP, bool ROUTED, bool OUT_F32, int BM, int BN, int STAGES,
          int WGM, int WGN, bool WS, bool SWAP, int KSUB, bool PERSIST = false>
__global__ void __launch_bounds__((WGM * WGN + (WS ? 1 : 0)) * 128, 1)
gemm_wgmma(const q35k::bf16* __restrict__ A, const void* __restrict__ W, const void* __restrict__ S,
           void* __restrict__ out, const int* __restrict__ sorted_ids, const int* __restrict__ block_expert,
           const int* __restrict__ num_blocks, int T) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace q35k;
  using namespace q35k::sm90;
  constexpr int BK = 64;                       // one 128-byte swizzle row of bf16
  constexpr int CONSUMERS = WGM * WGN * 128;   // threads issuing wgmma
  constexpr int WTN = BN / WGN;                // warpgroup tile: 64 x WTN (SWAP: 64 weight rows x BM tokens)
  constexpr int ACC = SWAP ? BM / 2 : WTN / 2;  // accumulator registers per thread
  constexpr int KT = (K + BK * KSUB - 1) / (BK * KSUB);  // stages of KSUB 64-k steps
  constexpr u32 A_BYTES = BM * 128, BS_BYTES = BN * 128, RAW_BYTES = BN * (GROUP == kFp8 ? 64 : 32);
  static_assert(SWAP || BM == 64 * WGM, "gemm_wgmma: BM must be 64 * WGM");
  static_assert(SWAP || WTN == 32 || WTN == 64 || WTN == 128 || WTN == 256,
                "gemm_wgmma: BN / WGN must be 32, 64, 128 or 256");
  static_assert(!SWAP || (WS && WGM == 1 && WTN == 64 && (BM == 8 || BM == 16 || BM == 32 || BM == 64)),
                "gemm_wgmma: the swapped form is warp-specialised, 64 weight rows per warpgroup, BM 8..64 tokens");
  static_assert(STAGES >= 3, "gemm_wgmma: at least 3 stages");
  static_assert(KSUB == 1 || (SWAP && (KSUB == 2 || KSUB == 4) && K % (64 * KSUB) == 0),
                "gemm_wgmma: stages of several 64-k steps (longer runs of each weight row per copy) are the "
                "swapped form's, with K a multiple of 64 KSUB");
  static_assert(K % 8 == 0 && N % 8 == 0, "gemm_wgmma: N and K must be multiples of 8");
  static_assert(GROUP == 0 || (K % BK == 0 && (GROUP == kFp8 || (K % GROUP == 0 && (GROUP == 32 || GROUP == 64 || GROUP == 128)))),
                "gemm_wgmma: W4A16 needs K a multiple of 64 and of the group (32, 64, 128); FP8 K a multiple of 64");
  static_assert(!(GATE_UP || ROUTED) || N % BN == 0, "gemm_wgmma: MoE GEMMs need N % BN == 0");
  static_assert(!GATE_UP || (WTN % 16 == 0 && !OUT_F32), "gemm_wgmma: gate|up pairs 8-column blocks, bf16 out");
  static_assert(!PERSIST || (WS && !SWAP), "gemm_wgmma: the persistent form is the warp-specialised (not swapped) one");

  extern __shared__ unsigned char smem_raw[];
  const u32 base = (u32(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;

  const int tid = threadIdx.x, lane = tid % 32, wg = tid / 128, warp_in_wg = (tid / 32) % 4;
  const int nb = blockIdx.x, mb = blockIdx.y;
  int expert = 0;
  if constexpr (ROUTED) {
    if (mb >= *num_blocks) return;
    expert = block_expert[mb];
  }
  const long long row0 = (long long)mb * BM;
  float acc[ACC];

  if constexpr (!WS) {
    // ---- every thread loads (cp.async ring, prefetch distance STAGES - 2) and issues wgmma ----
    constexpr int D = STAGES - 2;
    constexpr u32 STAGE_BYTES = A_BYTES + (GROUP == 0 ? BS_BYTES : RAW_BYTES);
    static_assert(STAGE_BYTES % 1024 == 0 && BS_BYTES % 1024 == 0, "gemm_wgmma: 1024-byte aligned tiles");
    const u32 bs_base = base + STAGES * STAGE_BYTES;  // INT4: 3 bf16 B tiles
    const int wg_m = wg / WGN, wg_n = wg % WGN;
    const bool active = wg_rows_active<ROUTED, WGM>(sorted_ids, row0, wg_m, T);
    WgTileLoader<GROUP, N, K, TOPK, GATE_UP, ROUTED, BM, BN, CONSUMERS> ld;
    ld.init(tid, A, W, S, sorted_ids, expert, row0, nb, T);
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.f;
#pragma unroll
    for (int s = 0; s < D; ++s) {
      if (s < KT) ld.load(base + s * STAGE_BYTES, base + s * STAGE_BYTES + A_BYTES, s, A, W);
      cp_async_commit();
    }
    ld.load_scales(0);
    for (int kt = 0; kt < KT; ++kt) {
      cp_async_wait<D - 1>();  // this thread's copies of step kt have landed
      if constexpr (GROUP != 0) {
        // tile kt % 3 was last read by the wgmma of step kt - 3: retired everywhere
        ld.dequant(base + (kt % STAGES) * STAGE_BYTES + A_BYTES, bs_base + (kt % 3) * BS_BYTES);
        if (kt + 1 < KT) ld.load_scales(kt + 1);
      }
      fence_proxy_async();  // generic-proxy smem writes (cp.async, st.shared) -> visible to wgmma
      __syncthreads();
      if (kt + D < KT) {  // slot of step kt - 2: retired by every warpgroup
        const u32 t = base + ((kt + D) % STAGES) * STAGE_BYTES;
        ld.load(t, t + A_BYTES, kt + D, A, W);
      }
      cp_async_commit();

      const u32 a_tile = base + (kt % STAGES) * STAGE_BYTES + u32(wg_m) * 64 * 128;
      const u32 b_tile = (GROUP == 0 ? base + (kt % STAGES) * STAGE_BYTES + A_BYTES : bs_base + (kt % 3) * BS_BYTES) +
                         u32(wg_n) * WTN * 128;
      if (active) {
        fence_regs(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk)
          wgmma_bf16<WTN>(acc, desc_k128_sw128(a_tile + kk * 32), desc_k128_sw128(b_tile + kk * 32), 1);
        wgmma_commit();
      }
      wgmma_wait<1>();
      fence_regs(acc);
    }
    wgmma_wait<0>();
    fence_regs(acc);
    cp_async_wait<0>();
    if (active)
      wg_epilogue<N, GATE_UP, ROUTED, OUT_F32, BN, WTN>(acc, out, sorted_ids, row0, nb, wg_m, wg_n, warp_in_wg, lane, T);
  } else {
    // ---- warp-specialised: the last warpgroup produces, the others only issue wgmma ----
    // Stage s: A tile | B tile (bf16 weights, swizzled) or raw INT4 B (W4A16, dequantized into a
    // ring of BR bf16 B tiles, so a deep ring of raw weights stays cheap). The producer
    // copies step j into slot j % STAGES (lookahead STAGES - 2 steps), waits for its own copies of
    // step kt, dequantizes them into bf16 slot kt % BR once the wgmma of step kt - BR has retired
    // (its empty barrier), fences (generic -> async proxy) and arrives on
    // full[kt % STAGES] (128 arrivals); consumers wait on it, issue the step's wgmma, and once the
    // wgmma of step kt - 1 has retired arrive on empty[(kt - 1) % STAGES] (one arrival per consumer
    // thread), which the producer waits for before refilling that slot.
    // Lookahead STAGES - 2: the refill at step kt waits for the retirement of step kt - 2, which the
    // consumers signal a whole step earlier (with STAGES - 1 the producer would wait on every step
    // for the consumers' wgmma of the step it had just released).
    constexpr int D = STAGES - 2;
    // W4A16: bf16 B tiles, a ring of its own: as deep as the stages up to 4; deeper rings of raw
    // weights keep 3 (5 stages) or 2 bf16 tiles (the producer dequantizes one step ahead of the
    // wgmma), so the copies can run further ahead in the same shared memory (wgmma_ws_bf16_tiles).
    constexpr int BR = GROUP == 0 ? 1 : (STAGES <= 4 ? STAGES : (STAGES == 5 ? 3 : 2));
    constexpr u32 STAGE_BYTES = KSUB * (A_BYTES + (GROUP == 0 ? BS_BYTES : RAW_BYTES));
    static_assert(STAGE_BYTES % 1024 == 0 && BS_BYTES % 1024 == 0, "gemm_wgmma: 1024-byte aligned tiles");
    const u32 bs_ring = base + STAGES * STAGE_BYTES;
    const u32 full = bs_ring + (GROUP == 0 ? 0 : BR * BS_BYTES), empty = full + 8 * STAGES;
    // The bf16 B tile of 64-k step q (stage q / KSUB): in its stage (bf16 weights), or ring slot
    // q % BR (W4A16).
    auto b_of = [&](int q) -> u32 {
      return GROUP == 0 ? base + (q / KSUB % STAGES) * STAGE_BYTES + KSUB * A_BYTES + (q % KSUB) * BS_BYTES
                        : bs_ring + (q % BR) * BS_BYTES;
    };
    if (tid == 0) {
      for (int s = 0; s < STAGES; ++s) {
        mbar_init(full + 8 * s, 128);
        mbar_init(empty + 8 * s, CONSUMERS);
      }
      spin_trap_init();  // Q35_SPIN_TRAP only
    }
    __syncthreads();
    // PERSIST: a block runs tiles blockIdx.x, + gridDim.x, ... (row block mb = tile / NB, column block
    // nb = tile % NB: the column blocks of one row block run side by side and share its A rows) with
    // one ring and one step count G across its tiles, so the producer fills the next tile's stages
    // while the consumers finish the last steps and the epilogue of the current one.
    constexpr int NB = (N + BN - 1) / BN;
    long long n_tiles = 1;
    if constexpr (PERSIST) n_tiles = (ROUTED ? (long long)*num_blocks : (T + BM - 1) / BM) * NB;
    const long long first_tile = PERSIST ? (long long)blockIdx.x : 0, tile_step = PERSIST ? (long long)gridDim.x : 1;
    auto tile_coords = [&](long long tile, int& t_nb, long long& t_row0, int& t_expert) {
      if constexpr (PERSIST) {
        const long long t_mb = tile / NB;
        t_nb = int(tile % NB);
        t_row0 = t_mb * BM;
        t_expert = ROUTED ? block_expert[t_mb] : 0;
      } else {
        t_nb = nb, t_row0 = row0, t_expert = expert;
      }
    };
    if (wg == WGM * WGN) {
      WgTileLoader<GROUP, N, K, TOPK, GATE_UP, ROUTED, BM, BN, 128, KSUB> ld;
      auto slot = [&](int G) { return base + (G % STAGES) * STAGE_BYTES; };
      // step j of the current tile, global step G: into slot G % STAGES once step G - STAGES retired
      auto load = [&](int G, int j) {
        if (G >= STAGES) mbar_wait(empty + 8 * (G % STAGES), u32((G / STAGES - 1) & 1));
        ld.load(slot(G), slot(G) + KSUB * A_BYTES, j, A, W);
      };
      if constexpr (SWAP) {
        ld.init(tid - CONSUMERS, A, W, S, sorted_ids, expert, row0, nb, T);
        // Only copies: step j into slot j % STAGES once the step that used it has retired; the
        // full barrier fires when the copies have landed (the consumers dequantize and fence).
#pragma unroll 1
        for (int j = 0; j < KT; ++j) {
          load(j, j);
          cp_async_mbar_arrive(full + 8 * (j % STAGES));
        }
        cp_async_wait<0>();
      } else {
        int g = 0;  // stages of the block's earlier tiles
#pragma unroll 1
        for (long long tile = first_tile; tile < n_tiles; tile += tile_step, g += KT) {
          int t_nb, t_expert;
          long long t_row0;
          tile_coords(tile, t_nb, t_row0, t_expert);
          ld.init(tid - CONSUMERS, A, W, S, sorted_ids, t_expert, t_row0, t_nb, T);
#pragma unroll 1
          for (int j = 0; j < D; ++j) {  // the tile's first D steps
            if (j < KT) load(g + j, j);
            cp_async_commit();
          }
          ld.load_scales(0);
#pragma unroll 1
          for (int kt = 0; kt < KT; ++kt) {
            const int G = g + kt;
            cp_async_wait<D - 1>();  // this thread's copies of step kt have landed
            if constexpr (GROUP != 0) {
              // bf16 slot G % BR was last read by the wgmma of step G - BR: wait for its retirement
              if (G >= BR) mbar_wait(empty + 8 * ((G - BR) % STAGES), u32(((G - BR) / STAGES) & 1));
              ld.dequant(slot(G) + A_BYTES, b_of(G));
              if (kt + 1 < KT) ld.load_scales(kt + 1);
            }
            fence_proxy_async();
            mbar_arrive(full + 8 * (G % STAGES));
            if (kt + D < KT) load(G + D, kt + D);  // refill the slot of step G + D - STAGES = G - 2
            cp_async_commit();
          }
        }
        cp_async_wait<0>();
      }
    } else {
      const int wg_m = wg / WGN, wg_n = wg % WGN;
      WgRowDequant<GROUP == 0 ? 128 : GROUP, N, K, GATE_UP, BN, KSUB> dq;  // SWAP, W4A16: this warpgroup's B rows
      if constexpr (SWAP && GROUP != 0) {
        dq.init(tid % 128, wg, expert, nb, S);
        dq.load_scale(0);
      }
      int g = 0;  // stages of the block's earlier tiles (the producer's count)
#pragma unroll 1
      for (long long tile = first_tile; tile < n_tiles; tile += tile_step, g += KT) {
        int t_nb, t_expert;
        long long t_row0;
        tile_coords(tile, t_nb, t_row0, t_expert);
        const bool active = SWAP || wg_rows_active<ROUTED, WGM>(sorted_ids, t_row0, wg_m, T);
#pragma unroll
        for (int i = 0; i < ACC; ++i) acc[i] = 0.f;
#pragma unroll 1
        for (int kt = 0; kt < KT; ++kt) {
          const int G = g + kt;  // stage
          const u32 t = base + (G % STAGES) * STAGE_BYTES;
          mbar_wait(full + 8 * (G % STAGES), u32((G / STAGES) & 1));
#pragma unroll
          for (int u = 0; u < KSUB; ++u) {
            const int q = G * KSUB + u;  // 64-k step (global)
            const u32 a_tile = t + u * A_BYTES + u32(wg_m) * 64 * 128, b_tile = b_of(q) + u32(wg_n) * WTN * 128;
            if constexpr (SWAP) {
              // bf16 slot q % BR: the wgmma in flight reads slot (q - 1) % BR only
              if constexpr (GROUP != 0) {
                dq.run(t + KSUB * A_BYTES, u, b_of(q));
                if (q + 1 < KT * KSUB) dq.load_scale(q + 1);
              }
              fence_proxy_async();  // the producer's cp.async data and these st.shared -> wgmma
              warpgroup_sync(wg);
            }
            if (active) {
              fence_regs(acc);
              wgmma_fence();
#pragma unroll
              for (int kk = 0; kk < BK / 16; ++kk) {
                if constexpr (SWAP)  // weights (64 rows of this warpgroup) x tokens (BM rows)
                  wgmma_bf16<BM>(acc, desc_k128_sw128(b_tile + kk * 32), desc_k128_sw128(t + u * A_BYTES + kk * 32), 1);
                else
                  wgmma_bf16<WTN>(acc, desc_k128_sw128(a_tile + kk * 32), desc_k128_sw128(b_tile + kk * 32), 1);
              }
              wgmma_commit();
            }
            wgmma_wait<1>();
            fence_regs(acc);
            // 64-k step q - 1 has retired: the last of its stage frees the stage (the previous
            // tile's last stage was freed after its final wait)
            if (q > g * KSUB && (q - 1) % KSUB == KSUB - 1) mbar_arrive(empty + 8 * ((q - 1) / KSUB % STAGES));
          }
        }
        wgmma_wait<0>();
        fence_regs(acc);
        mbar_arrive(empty + 8 * ((g + KT - 1) % STAGES));  // the tile's last stage has retired
        if constexpr (SWAP)
          wg_epilogue_swap<N, GATE_UP, ROUTED, OUT_F32, BN, BM>(acc, out, sorted_ids, row0, nb, wg, warp_in_wg, lane, T);
        else if (active)
          wg_epilogue<N, GATE_UP, ROUTED, OUT_F32, BN, WTN>(acc, out, sorted_ids, t_row0, t_nb, wg_m, wg_n, warp_in_wg,
                                                            lane, T);
      }
    }
  }
#else
  __trap();  // sm_90a only: the host picks this kernel only for sm_90a targets
#endif
}
