#pragma once
// Quantized-weight GEMV for few tokens (decode): y[t, n] = sum_g s[n, g] * sum_{k in g} q[n, k] * x[t, k],
// weights in format G (weights.cuh): W4A16 (G = 32, 64, 128: qweight u32 [N, K / 8] and scales bf16
// [N, K / G], runtime/core/int4_format.h) or FP8 (G = kFp8: codes uint8 [N, K] and scales fp32
// [N, ceil(K / 128)], runtime/core/fp8_format.h; the kernels gemv_fp8 / gemv_fp8_residual of
// gemv_fp8.cuh). x [T, K] bf16, y [T, N] bf16 (or fp32 logits if OUT_F32). K % 32 == 0 (FP8: K % 64).
//
// Tensor cores, weights as the A operand of mma.m16n8k16 (kernels.md §1), straight from the
// format (no repacking): a warp owns 16 rows; per 128-k "tile" lane (g = lane / 4, q = lane % 4)
// loads one run of 32 k (16 bytes of INT4, 32 of FP8) of rows g and g + 8, run 4 * tile + q. Since a
// dot product may visit k in any order as long as both operands agree, mma step s (0..7) of a tile
// takes from lane q the k = 32 (4 tile + q) + 4 s + {0, 1} as A columns 2q, 2q + 1 and + {2, 3} as
// columns 2q + 8, 2q + 9: bf16x2 pairs 2 (s % 2) and 2 (s % 2) + 1 of weights 8 (s / 2) .. of the run
// (Run32::pairs, exact: INT4 q by one shift + lop3 + fma.bf16x2 per pair, FP8 codes by fp8.cuh).
// The B operand (k x 8 columns) holds the same k of x.
// Scales: a column is a (token m, group slot j) pair, n = m * GPS + j, GPS = 128 / G groups per
// tile (1 for FP8: one scale per 128-k block); B[k, n] = x[m, k] when k's run lies in group slot j
// of the tile, else 0. So after the 8 steps of a tile, D[row, n] is the exact-product fp32 sum over
// one group, and the lane adds s[row, group] * D to its fp32 accumulator. The token's result is the
// sum over its GPS columns. M_TILE * GPS columns take NT = ceil(M_TILE * GPS / 8) mma column tiles.
// Split-K: the K_WARPS warps of a row set take contiguous runs of TPW tiles (UNROLL tiles of
// weights in flight per lane: 2 * UNROLL runs), reduced in shared memory in a fixed order
// (deterministic); ROW_WARPS row sets of 16 rows sit side by side. The mma chains of the UNROLL
// tiles (and column tiles) run interleaved, so a warp's compute after its loads land is short.
// Weights are streamed (ld.global.nc.L1::no_allocate), activations take the normal cached path.
// PDL: each warp prefetches its weights into L2, then waits for the predecessor (decode_fusion.cuh).
// gemv_w4a16_residual: the same GEMV with the residual add + RMSNorm epilogue (decode_fusion.cuh).
// gemv_w4a16_gated: the same GEMV whose x is the gated RMSNorm of the DeltaNet recurrence output
// (gated_rmsnorm.cuh), computed by every block into shared memory after the first weight loads are
// in flight (GemvInputGatedNorm): the decode step's out_proj without a norm launch or a last-block
// tail in gdn_decode. Bit for bit the product of gated_rmsnorm's y.
// Grid: (ceil(N / (16 * ROW_WARPS)), ceil(T / M_TILE)), block 32 * ROW_WARPS * K_WARPS.
#include "common.cuh"
#include "decode_fusion.cuh"
#include "gated_rmsnorm.cuh"
#include "weights.cuh"

namespace q35k {

// d = a . b + c for one m16n8k16 tile, bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void w4_mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, const float (&c)[4]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

}  // namespace q35k

namespace q35k {

// Where a block's x comes from (the B operand): row(t) points at x[t, 0 .. K) bf16, 16-byte aligned,
// in global or shared memory; prepare(t0) runs once in every thread of the block, after the PDL wait
// and the first weight loads, before the first read of x (it may synchronise the block).
template <int K>
struct GemvInputRows {  // x [T, K] bf16 as the predecessor wrote it
  const bf16* __restrict__ x;
  __device__ __forceinline__ void prepare(int) const {}
  __device__ __forceinline__ const bf16* row(int t) const { return x + size_t(t) * K; }
};

// x = the gated RMSNorm of one token (M_TILE = 1: t0 is the block's token) into xs [K] bf16 shared:
// per value head h (K / DV of them, dealt over the block's warps) xs[h DV ..] = bf16(o[t0, h] *
// inv_rms * w * silu(z[t0, h])), the arithmetic of gated_rmsnorm_head. A warp loads up to HB heads
// at once before their math (the 35B's 32 heads over 16 warps: one pass of 2). o [T, K] fp32 (the
// recurrence output), z [T, z_stride] bf16 (head h at columns h DV ..), w [DV] bf16.
template <int K, int DV, int THREADS>
struct GemvInputGatedNorm {
  static_assert(K % DV == 0, "gemv_w4a16_gated: K must be a whole number of value heads of DV");
  static constexpr int HEADS = K / DV, WARPS = THREADS / 32, HPW = (HEADS + WARPS - 1) / WARPS;
  static constexpr int HB = HPW < 4 ? HPW : 4;  // heads in flight per warp (registers: 6 M per head)
  const float* o;
  const bf16* __restrict__ z;
  int z_stride;
  const bf16* __restrict__ w;
  float eps;
  bf16* xs;
  __device__ __forceinline__ void prepare(int t0) const {
    const int warp = threadIdx.x / 32;
    GatedRmsnormWeights<DV> wl;
    wl.load(w);
#pragma unroll 1
    for (int i0 = 0; i0 < HPW; i0 += HB) {
      GatedRmsnormHead<DV> head[HB];
#pragma unroll
      for (int i = 0; i < HB; ++i) {
        const int h = warp + (i0 + i) * WARPS;
        if (h < HEADS) head[i].load(o + size_t(t0) * K + h * DV, z + size_t(t0) * z_stride + h * DV);
      }
#pragma unroll
      for (int i = 0; i < HB; ++i) {
        const int h = warp + (i0 + i) * WARPS;
        if (h < HEADS) head[i].store(wl, xs + h * DV, eps);
      }
    }
    __syncthreads();
  }
  __device__ __forceinline__ const bf16* row(int) const { return xs; }
};

// The GEMV of one block; store(t, n, v) receives every output once (fp32 sum); in gives x (above).
// Weights are prefetched into L2 before the programmatic-dependent-launch wait (they do not depend
// on the predecessor).
template <int N, int K, int G, int M_TILE, int ROW_WARPS, int K_WARPS, int UNROLL, typename Input, typename Store>
__device__ __forceinline__ void gemv_quant_block(const void* __restrict__ w, const void* __restrict__ scales,
                                                 const Input& in, int T, Store&& store) {
  using F = WeightFormat<G>;
  static_assert(G == 32 || G == 64 || G == 128 || G == kFp8, "gemv: weights must be W4A16 (G 32, 64, 128) or FP8");
  static_assert(K % F::SCALE_K == 0 || (G == kFp8 && K % 64 == 0),
                "gemv: K must be a multiple of the group size (FP8: of 64) and of 32");
  static_assert(K % 32 == 0, "gemv: K must be a multiple of 32");
  static_assert(M_TILE >= 1 && M_TILE <= 16, "gemv: M_TILE must be in [1, 16]");
  static_assert(UNROLL >= 1 && UNROLL <= 8, "gemv: UNROLL must be in [1, 8]");
  constexpr int RUNS = K / 32;                          // runs of 32 k per row
  constexpr int TILES = (K + 127) / 128;               // 128-k tiles per row (the last may be partial)
  constexpr int TPW = (TILES + K_WARPS - 1) / K_WARPS;  // tiles per warp
  constexpr int GPS = 128 / F::SCALE_K;                 // group slots per tile
  constexpr int GROUPS = F::scales_per_row(K);
  constexpr int COLS = M_TILE * GPS;
  constexpr int NT = (COLS + 7) / 8;  // mma column tiles
  constexpr size_t ROW_BYTES = F::bytes(K), RUN_BYTES = Run32<G>::BYTES;
  // Accumulator chains per (tile, column tile): two (even / odd steps) when there are few (FP8: only
  // for a single tile and column tile; its weight runs need the registers).
  constexpr int CH = (G == kFp8 ? UNROLL * NT <= 1 : UNROLL * NT <= 2) ? 2 : 1;
  static_assert(UNROLL * NT <= 8, "gemv: UNROLL * column tiles must be at most 8 (registers)");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row_warp = warp / K_WARPS, k_warp = warp % K_WARPS;
  const int g = lane / 4, q = lane % 4;
  const int n_base = (blockIdx.x * ROW_WARPS + row_warp) * 16;
  const int t0 = blockIdx.y * M_TILE;

  // Rows past the end are clamped for loading (no branch in the loop) and not stored.
  const int r0 = min(n_base + g, N - 1), r1 = min(n_base + g + 8, N - 1);
  const unsigned char* w0 = static_cast<const unsigned char*>(w) + size_t(r0) * ROW_BYTES;
  const unsigned char* w1 = static_cast<const unsigned char*>(w) + size_t(r1) * ROW_BYTES;
  const size_t s0 = size_t(r0) * GROUPS, s1 = size_t(r1) * GROUPS;
  {
    const int tb = k_warp * TPW;  // this warp's weight bytes: tiles [tb, tb + TPW) of rows r0 .. r0 + 7, r1 ..
    constexpr int TILE_BYTES = 4 * RUN_BYTES;
    const int from = min(tb * TILE_BYTES, int(ROW_BYTES)), to = min((tb + TPW) * TILE_BYTES, int(ROW_BYTES));
    if (to > from) decode_prefetch_rows16(w, ROW_BYTES, n_base, n_base + 8, N - 1, from, to - from);
  }
  decode_pdl_wait();
  decode_pdl_launch_dependents();
  // The scale slots of this lane's accumulator columns 2q, 2q + 1 (of every column tile).
  const int j0 = (2 * q) % GPS, j1 = (2 * q + 1) % GPS;
  // B operand: this lane supplies column g of each column tile from run 4 * tile + q.
  bool b_on[NT];
  const bf16* x_at[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = nt * 8 + g, m = col / GPS;
    b_on[nt] = col < COLS && t0 + m < T && col % GPS == q / (4 / GPS);
    x_at[nt] = in.row(min(t0 + m, T - 1)) + q * 32;
  }

  float acc[NT][4] = {};
  const int tile_begin = k_warp * TPW;
#pragma unroll 1
  for (int i0 = 0; i0 < TPW; i0 += UNROLL) {
    Run32<G> wa[UNROLL], wb[UNROLL];
    float sa[UNROLL][2], sb[UNROLL][2];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int tile = tile_begin + i0 + u;
      const int run = min(tile * 4 + q, RUNS - 1);  // clamped; zero B masks it
      wa[u].load(w0 + run * RUN_BYTES);
      wb[u].load(w1 + run * RUN_BYTES);
      const int ga = min(tile * GPS + j0, GROUPS - 1), gb = min(tile * GPS + j1, GROUPS - 1);
      sa[u][0] = F::scale(scales, s0 + ga);
      sb[u][0] = F::scale(scales, s1 + ga);
      if constexpr (GPS > 1) {
        sa[u][1] = F::scale(scales, s0 + gb);
        sb[u][1] = F::scale(scales, s1 + gb);
      } else {
        sa[u][1] = sa[u][0];
        sb[u][1] = sb[u][0];
      }
    }
    if (i0 == 0) in.prepare(t0);  // x, with the first weights in flight
    // The UNROLL x NT (x CH) mma chains are independent: word i of every tile is consumed before
    // word i + 1, so the chains interleave instead of running one after another.
    float d[UNROLL][NT][CH][4];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < CH; ++c) d[u][nt][c][0] = d[u][nt][c][1] = d[u][nt][c][2] = d[u][nt][c][3] = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // weights 8i .. 8i + 7 of the runs: steps 2i, 2i + 1
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int tile = tile_begin + i0 + u;
        // Runs past K and tiles past this warp's run (TPW % UNROLL != 0) get a zero B. (x_at may
        // point into shared memory: ld_global_16 is a plain 16-byte dereference.)
        const bool chunk_ok = tile * 4 + q < RUNS && (TPW % UNROLL == 0 || i0 + u < TPW);
        u32 pa[4], pb[4];
        wa[u].pairs(i, pa);
        wb[u].pairs(i, pb);
        // A fragments {row g k 0-1, row g+8 k 0-1, row g k 2-3, row g+8 k 2-3} of steps 2i, 2i + 1.
        const u32 a_even[4] = {pa[0], pb[0], pa[1], pb[1]};
        const u32 a_odd[4] = {pa[2], pb[2], pa[3], pb[3]};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint4 xb =
              b_on[nt] && chunk_ok ? ld_global_16(x_at[nt] + tile * 128 + i * 8) : make_uint4(0u, 0u, 0u, 0u);
          w4_mma_16816(d[u][nt][0], a_even, xb.x, xb.y, d[u][nt][0]);
          w4_mma_16816(d[u][nt][CH - 1], a_odd, xb.z, xb.w, d[u][nt][CH - 1]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float t[4] = {d[u][nt][0][0], d[u][nt][0][1], d[u][nt][0][2], d[u][nt][0][3]};
        if constexpr (CH == 2)
          t[0] += d[u][nt][1][0], t[1] += d[u][nt][1][1], t[2] += d[u][nt][1][2], t[3] += d[u][nt][1][3];
        acc[nt][0] += sa[u][0] * t[0];
        acc[nt][1] += sa[u][1] * t[1];
        acc[nt][2] += sb[u][0] * t[2];
        acc[nt][3] += sb[u][1] * t[3];
      }
  }

  // Per token: the sum over its GPS columns. Lane (g, q) holds rows g, g + 8 at columns
  // nt * 8 + 2q, + 1; with GPS = 4 the token's other two columns sit in lane q ^ 1.
  constexpr int ROWS = 16 * ROW_WARPS;
  __shared__ float partial[K_WARPS][M_TILE][ROWS];  // per warp of a row set: [token][row]
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    float v[2][2];  // [row g / g + 8][column 2q / 2q + 1]
    v[0][0] = acc[nt][0], v[0][1] = acc[nt][1], v[1][0] = acc[nt][2], v[1][1] = acc[nt][3];
    const int rl = row_warp * 16 + g;
    if constexpr (GPS == 1) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = nt * 8 + 2 * q + h;
        if (m < M_TILE) partial[k_warp][m][rl] = v[0][h], partial[k_warp][m][rl + 8] = v[1][h];
      }
    } else {
      float t[2] = {v[0][0] + v[0][1], v[1][0] + v[1][1]};  // columns 2q, 2q + 1: one token
      if constexpr (GPS == 4) {
        t[0] += __shfl_xor_sync(0xffffffffu, t[0], 1);
        t[1] += __shfl_xor_sync(0xffffffffu, t[1], 1);
      }
      const int m = (nt * 8 + 2 * q) / GPS;
      if (m < M_TILE && (GPS == 2 || q % 2 == 0)) partial[k_warp][m][rl] = t[0], partial[k_warp][m][rl + 8] = t[1];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < M_TILE * ROWS; i += blockDim.x) {
    const int m = i / ROWS, rl = i % ROWS;
    const int n = blockIdx.x * ROWS + rl;
    if (t0 + m >= T || n >= N) continue;
    float v = 0.f;
#pragma unroll
    for (int kw = 0; kw < K_WARPS; ++kw) v += partial[kw][m][rl];
    store(t0 + m, n, v);
  }
}

// The GEMV's store: y [T, N] bf16, or fp32 if OUT_F32.
template <int N, bool OUT_F32>
__device__ __forceinline__ void gemv_store(void* y, int t, int n, float v) {
  const size_t at = size_t(t) * N + n;
  if constexpr (OUT_F32)
    static_cast<float*>(y)[at] = v;
  else
    static_cast<bf16*>(y)[at] = f32_to_bf16(v);
}

}  // namespace q35k

template <int N, int K, int G, int M_TILE, int ROW_WARPS, int K_WARPS, int UNROLL, bool OUT_F32>
__global__ void __launch_bounds__(ROW_WARPS * K_WARPS * 32)
gemv_w4a16(const q35k::u32* __restrict__ qweight,  // [N, K / 8]
           const q35k::bf16* __restrict__ scales,  // [N, K / G]
           const q35k::bf16* __restrict__ x,       // [T, K]
           void* __restrict__ y,                   // [T, N] bf16, or fp32 if OUT_F32
           int T) {
  const q35k::GemvInputRows<K> in{x};
  q35k::gemv_quant_block<N, K, G, M_TILE, ROW_WARPS, K_WARPS, UNROLL>(
      qweight, scales, in, T, [&](int t, int n, float v) { q35k::gemv_store<N, OUT_F32>(y, t, n, v); });
}

// The same GEMV with the residual epilogue of decode_fusion.cuh (a sub-layer's output projection in a
// decode step, N = hidden size): residual fp32 [T, N] += bf16(y), then the last block writes
// normed [T, N] bf16 = RMSNorm(residual) with norm_w [N] bf16; counter int32 [1], zero between launches.
template <int N, int K, int G, int M_TILE, int ROW_WARPS, int K_WARPS, int UNROLL>
__global__ void __launch_bounds__(ROW_WARPS * K_WARPS * 32)
gemv_w4a16_residual(const q35k::u32* __restrict__ qweight, const q35k::bf16* __restrict__ scales,
                    const q35k::bf16* __restrict__ x, float* residual, const q35k::bf16* __restrict__ norm_w,
                    q35k::bf16* __restrict__ normed, int* counter, float eps, int T) {
  const q35k::GemvInputRows<K> in{x};
  q35k::gemv_quant_block<N, K, G, M_TILE, ROW_WARPS, K_WARPS, UNROLL>(
      qweight, scales, in, T, [&](int t, int n, float v) { q35k::residual_add_bf16(residual, size_t(t) * N + n, v); });
  q35k::residual_rmsnorm_last_block<N, ROW_WARPS * K_WARPS * 32>(residual, norm_w, normed, counter, eps, T);
}

// The decode step's DeltaNet out_proj with the gated RMSNorm as its input (GemvInputGatedNorm):
// y [T, N] bf16 = x . dequant(W)^T, x [T, K = HV DV] = bf16(gated_rmsnorm(o, z, norm_w)) per value
// head of DV; o [T, K] fp32 (gdn_decode's output), z [T, z_stride] bf16 (the projection's z columns),
// norm_w [DV] bf16. One token per block (M_TILE = 1; x of the block's token in shared memory).
template <int N, int K, int G, int M_TILE, int ROW_WARPS, int K_WARPS, int UNROLL, int DV>
__global__ void __launch_bounds__(ROW_WARPS * K_WARPS * 32)
gemv_w4a16_gated(const q35k::u32* __restrict__ qweight, const q35k::bf16* __restrict__ scales, const float* o,
                 const q35k::bf16* __restrict__ z, int z_stride, const q35k::bf16* __restrict__ norm_w, float eps,
                 q35k::bf16* __restrict__ y, int T) {
  static_assert(M_TILE == 1, "gemv_w4a16_gated: one token per block (its x row in shared memory)");
  __shared__ __align__(16) q35k::bf16 xs[K];
  const q35k::GemvInputGatedNorm<K, DV, ROW_WARPS * K_WARPS * 32> in{o, z, z_stride, norm_w, eps, xs};
  q35k::gemv_quant_block<N, K, G, M_TILE, ROW_WARPS, K_WARPS, UNROLL>(
      qweight, scales, in, T, [&](int t, int n, float v) { y[size_t(t) * N + n] = q35k::f32_to_bf16(v); });
}
