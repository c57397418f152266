#pragma once
// Hopper (sm_90a) W4A16 grouped GEMM with the weights as wgmma's register operand (the Machete
// idea, kernels.md §4): the INT4 weights go from global memory to shared memory raw, each consumer
// thread converts the ones its wgmma A fragment needs straight into bf16 registers (q * scale,
// rounded once, as moe_gemm's dequant32), and wgmma reads them from there; the activations (the
// tokens) are wgmma's B operand in shared memory. No bf16 weight tile is written to or read from
// shared memory, and no block barrier separates the dequantization from the multiply.
//
//   out[row, n] = sum_k A[src(row), k] * W_e[n, k]        fp32 accumulation
//
// The uses of gemm_wgmma's swapped form (SWAP, wgmma_gemm.cuh): routed gate|up (gathered token
// rows, silu(gate) * up), routed down, shared gate|up / down; W [E, N, K] as W4A16 qweight u32
// [E, N, K/8] (natural k order, runtime/core/int4_format.h) with bf16 scales [E, N, K/GROUP].
//
// Block: WGN consumer warpgroups of 64 weight rows each (BN = 64 WGN; GATE_UP rows alternate 8 gate,
// 8 up as moe_w_row) and one producer warpgroup. A tile holds up to BM token rows (the MoE align's
// block; padding rows at the end of an expert's last block); the block computes the first NV of
// them, NV = rs_tile_rows(real rows) in {8, 16, 32, 64, 96, ..., BM} (one wgmma N per variant), so
// an expert's padding costs at most 31 rows of work instead of BM - rows.
// Per 64-k step (stage of the STAGES-deep ring; mbarriers full / empty as gemm_wgmma's WS form):
//   producer   cp.async of the NV token rows (128-byte swizzled, wgmma's B layout) and of the BN raw
//              weight rows (32 bytes each), then cp.async.mbarrier.arrive on full[slot];
//   consumer   waits on full[slot], reads its two weight rows' 32 raw bytes each (thread of warp w,
//              lane l: block rows 64 wg + 16 w + l/4 and + 8, the wgmma A fragment's rows), makes the
//              4 k16 fragments (word j of a row holds k 8j .. 8j + 7 with the pair (2c, 2c + 1) in
//              nibble slots c and c + 4, c = l % 4: one shift, one lop3, two bf16x2 fma per pair),
//              issues 4 wgmma m64nNVk16 (A from registers), commits, waits for the previous step's
//              group (its fragments, in the other of two register sets, are then free) and frees
//              that step's slot (empty).
// Accumulators and epilogue: those of the swapped form (wg_epilogue_swap with BT = NV).
// Grid: (N / BN, row blocks), or PERSIST: (about one block per SM) looping over the tiles; block
// (WGN + 1) x 128 threads; dynamic shared memory wgmma_rs_smem_bytes (autotune/tiles_wgmma.h):
// 1 KiB alignment, STAGES x (BM x 128 + BN x 32), STAGES x BN x 4 (each weight row's scale pair of
// the step, copied by the producer), 2 mbarriers per stage, BM ints (the producer's table of token
// rows).
#include "wgmma_gemm.cuh"

namespace q35k {
namespace sm90 {

// Token rows a tile with `rows` real rows computes: 8, 16, 32, then multiples of 32.
__device__ __forceinline__ int rs_tile_rows(int rows) {
  return rows <= 8 ? 8 : rows <= 16 ? 16 : rows <= 32 ? 32 : (rows + 31) / 32 * 32;
}

// The bf16 pair (k 8j + 2c, 8j + 2c + 1) of INT4 word j (shift = 4c) times the scale pair s2:
// (128 + u) from the nibbles, - 136 exactly, then one rounding of q * s (as dequant32).
__device__ __forceinline__ u32 int4_pair_scaled(u32 word, u32 shift, u32 s2) {
  const u32 t = ((word >> shift) & 0x000f000fu) | 0x43004300u;
  u32 q, r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(q) : "r"(t), "r"(0x3f803f80u), "r"(0xc308c308u));
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(q), "r"(s2), "r"(0x80008000u));
  return r;
}

__device__ __forceinline__ u32 bf16_pair(bf16 s) { return u32(s) | (u32(s) << 16); }
__device__ __forceinline__ u32 ld_shared_u32(u32 addr) {
  u32 v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
// 4 bytes global -> shared (cp.async, L1-allocating form; 4-byte aligned both sides).
__device__ __forceinline__ void cp_async_4(u32 dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
}

// One consumer warpgroup's tile of NV token rows: 64 weight rows (block rows 64 wg ..) x NV.
// g: the block's global step count before this tile (the ring's position).
template <int GROUP, int N, int K, bool GATE_UP, bool ROUTED, bool OUT_F32, int BM, int BN, int STAGES, int NV>
__device__ __forceinline__ void rs_consume(u32 base, u32 full, u32 empty, int g, int nb,
                                           int wg, int warp, int lane, void* out, const int* sorted_ids,
                                           long long row0, int T) {
  constexpr int KT = K / 64;
  constexpr u32 A_BYTES = BM * 128, STAGE_BYTES = A_BYTES + BN * 32, SC_BYTES = BN * 4;
  constexpr int GPS = GROUP < 64 ? 64 / GROUP : 1;  // scale groups per 64-k step
  const u32 scales = base + STAGES * STAGE_BYTES;   // ring of the steps' scale pairs (rs_scale_pair)
  float acc[NV / 2];
#pragma unroll
  for (int i = 0; i < NV / 2; ++i) acc[i] = 0.f;
  const int n0 = 64 * wg + 16 * warp + lane / 4;  // this thread's block rows n0 and n0 + 8
  const u32 shift = 4u * u32(lane % 4);
  u32 fa[4][4], fb[4][4];
  auto step = [&](int kt, u32(&f)[4][4], u32(&prev)[4][4]) {
    const int G = g + kt;
    const u32 t = base + u32(G % STAGES) * STAGE_BYTES;
    mbar_wait(full + 8 * (G % STAGES), u32((G / STAGES) & 1));
    const u32 raw = t + A_BYTES + u32(n0) * 32;
    const uint4 a0 = lds_16(raw), b0 = lds_16(raw + 16);
    const uint4 a1 = lds_16(raw + 8 * 32), b1 = lds_16(raw + 8 * 32 + 16);
    const u32 r0[8] = {a0.x, a0.y, a0.z, a0.w, b0.x, b0.y, b0.z, b0.w};
    const u32 r1[8] = {a1.x, a1.y, a1.z, a1.w, b1.x, b1.y, b1.z, b1.w};
    // The step's scales: rows n0 and n0 + 8 each hold the pair of groups (g & ~1, g | 1) of the step's
    // first group g; group g + h is the half (g + h) & 1.
    const u32 sp = scales + u32(G % STAGES) * SC_BYTES + u32(n0) * 4;
    const u32 w0 = ld_shared_u32(sp), w1 = ld_shared_u32(sp + 8 * 4);
    u32 sc0[GPS], sc1[GPS];
#pragma unroll
    for (int h = 0; h < GPS; ++h) {
      const u32 half = u32((kt * 64 / GROUP + h) & 1) * 16u;
      sc0[h] = bf16_pair(bf16((w0 >> half) & 0xffffu));
      sc1[h] = bf16_pair(bf16((w1 >> half) & 0xffffu));
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      // word j = 2 kk (+ 1) holds k 16 kk .. (+ 8 ..); its scale group within the step: 8 j / GROUP
      const int h0 = GPS == 1 ? 0 : (16 * kk) / GROUP, h1 = GPS == 1 ? 0 : (16 * kk + 8) / GROUP;
      f[kk][0] = int4_pair_scaled(r0[2 * kk], shift, sc0[h0]);
      f[kk][1] = int4_pair_scaled(r1[2 * kk], shift, sc1[h0]);
      f[kk][2] = int4_pair_scaled(r0[2 * kk + 1], shift, sc0[h1]);
      f[kk][3] = int4_pair_scaled(r1[2 * kk + 1], shift, sc1[h1]);
    }
    fence_proxy_async();  // the producer's cp.async token rows (generic proxy) -> wgmma (async proxy)
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_bf16_rs<NV>(acc, f[kk], desc_k128_sw128(t + kk * 32), 1);
    wgmma_commit();
    wgmma_wait<1>();  // the previous step's group has retired: its fragments and its slot are free
    fence_regs(acc);
    fence_frag(prev);
    if (kt > 0) mbar_arrive(empty + 8 * ((G - 1) % STAGES));
  };
#pragma unroll 1
  for (int kt = 0; kt < KT; kt += 2) {
    step(kt, fa, fb);
    step(kt + 1, fb, fa);
  }
  wgmma_wait<0>();
  fence_regs(acc);
  fence_frag(fb);
  mbar_arrive(empty + 8 * ((g + KT - 1) % STAGES));  // the tile's last step has retired
  wg_epilogue_swap<N, GATE_UP, ROUTED, OUT_F32, BN, NV>(acc, out, sorted_ids, row0, nb, wg, warp, lane, T);
}

// rs_consume for the variant nv (one of rs_tile_rows' values, <= BM).
template <int GROUP, int N, int K, bool GATE_UP, bool ROUTED, bool OUT_F32, int BM, int BN, int STAGES>
__device__ __forceinline__ void rs_consume_nv(int nv, u32 base, u32 full, u32 empty, int g,
                                              int nb, int wg, int warp, int lane, void* out, const int* sorted_ids,
                                              long long row0, int T) {
#define Q35_RS_CASE(V)                                                                                              \
  if constexpr (V <= BM) {                                                                                          \
    if (nv == V) {                                                                                                  \
      rs_consume<GROUP, N, K, GATE_UP, ROUTED, OUT_F32, BM, BN, STAGES, V>(base, full, empty, g, nb, wg,  \
                                                                           warp, lane, out, sorted_ids, row0, T);   \
      return;                                                                                                       \
    }                                                                                                               \
  }
  Q35_RS_CASE(8)
  Q35_RS_CASE(16)
  Q35_RS_CASE(32)
  Q35_RS_CASE(64)
  Q35_RS_CASE(96)
  Q35_RS_CASE(128)
  Q35_RS_CASE(160)
  Q35_RS_CASE(192)
  Q35_RS_CASE(224)
  Q35_RS_CASE(256)
#undef Q35_RS_CASE
}

// Real token rows of the tile at row0 (every warp computes it alone): routed, the non-padding
// entries of sorted_ids[row0 .. row0 + BM) (padding sits at the end of an expert's last block);
// dense / shared, the rows before T.
template <bool ROUTED, int BM>
__device__ __forceinline__ int rs_real_rows(const int* sorted_ids, long long row0, int T, int lane) {
  if constexpr (ROUTED) {
    int c = 0;
#pragma unroll
    for (int i = lane; i < BM; i += 32) c += sorted_ids[row0 + i] >= 0 ? 1 : 0;
    return __reduce_add_sync(0xffffffffu, c);
  } else {
    return int(min((long long)BM, (long long)T - row0));
  }
}

}  // namespace sm90
}  // namespace q35k

template <int GROUP, int N, int K, int TOPK, bool GATE_UP, bool ROUTED, bool OUT_F32, int BM, int WGN, int STAGES,
          bool PERSIST>
__global__ void __launch_bounds__((WGN + 1) * 128, 1)
gemm_wgmma_rs(const q35k::bf16* __restrict__ A, const void* __restrict__ W, const q35k::bf16* __restrict__ S,
              void* __restrict__ out, const int* __restrict__ sorted_ids, const int* __restrict__ block_expert,
              const int* __restrict__ num_blocks, int T) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace q35k;
  using namespace q35k::sm90;
  constexpr int BN = 64 * WGN, KT = K / 64, CONSUMERS = WGN * 128, NB = N / BN;
  constexpr u32 A_BYTES = BM * 128, STAGE_BYTES = A_BYTES + BN * 32;
  static_assert(GROUP == 32 || GROUP == 64 || GROUP == 128, "gemm_wgmma_rs: W4A16 groups 32, 64, 128");
  static_assert(K % 128 == 0 && K % GROUP == 0 && (K / GROUP) % 2 == 0,
                "gemm_wgmma_rs: K must be a multiple of 128 and of two groups (4-byte scale pairs)");
  static_assert(N % BN == 0, "gemm_wgmma_rs: N must be a multiple of 64 WGN");
  static_assert(WGN == 1 || WGN == 2, "gemm_wgmma_rs: 1 or 2 consumer warpgroups");
  static_assert(BM == 8 || BM == 16 || (BM % 32 == 0 && BM >= 32 && BM <= 256), "gemm_wgmma_rs: BM 8, 16, 32 .. 256");
  static_assert(STAGES >= 2 && STAGES <= 8, "gemm_wgmma_rs: 2 to 8 stages");
  static_assert(!GATE_UP || !OUT_F32, "gemm_wgmma_rs: gate|up writes bf16");

  extern __shared__ unsigned char smem_raw[];
  const u32 base = (u32(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const int tid = threadIdx.x, lane = tid % 32, wg = tid / 128, warp = (tid / 32) % 4;
  // Tiles: (row block mb, column block nb). Persistent: a block runs tiles blockIdx.x, + gridDim.x, ..
  // (nb fastest: the column blocks of a row block run side by side and share its token rows), one
  // ring and one step count across them, so the producer fills the next tile's stages while the
  // consumers finish the last steps and the epilogue of the current one. Else one tile per block.
  long long n_tiles = 1;
  if constexpr (PERSIST) n_tiles = (ROUTED ? (long long)*num_blocks : ((long long)T + BM - 1) / BM) * NB;
  else if (ROUTED && (int)blockIdx.y >= *num_blocks) return;
  const long long first_tile = PERSIST ? (long long)blockIdx.x : 0, tile_step = PERSIST ? (long long)gridDim.x : 1;
  auto tile_coords = [&](long long tile, int& nb, long long& row0, int& expert) {
    const long long mb = PERSIST ? tile / NB : (long long)blockIdx.y;
    nb = PERSIST ? int(tile % NB) : (int)blockIdx.x;
    row0 = mb * BM;
    expert = ROUTED ? block_expert[mb] : 0;
  };
  // Stage s at base + s STAGE_BYTES: the token tile (BM x 128 B; STAGE_BYTES is a multiple of 1024 for
  // BM a multiple of 8 and BN = 64 WGN), then the BN raw rows of 32 bytes. Then the mbarriers and the
  // producer's table of the tile's token rows (the A row each computed row reads; -1: zeros).
  const u32 scales = base + STAGES * STAGE_BYTES;  // STAGES x BN scale pairs (4 bytes per weight row)
  const u32 full = scales + STAGES * BN * 4, empty = full + 8 * STAGES;
  int* const row_src = reinterpret_cast<int*>(smem_raw + (empty + 8 * STAGES - u32(__cvta_generic_to_shared(smem_raw))));
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, 128);
      mbar_init(empty + 8 * s, CONSUMERS);
    }
    spin_trap_init();  // Q35_SPIN_TRAP only
  }
  __syncthreads();
  if (wg == WGN) {
    // ---- producer: only copies ----
    if constexpr (WGN == 2) regs_dec<56>();
    const int ltid = tid - CONSUMERS, ch = ltid % 8;  // token chunks: rows ltid / 8 + 16 i, chunk ch
    int g = 0;  // steps of the block's earlier tiles
#pragma unroll 1
    for (long long tile = first_tile; tile < n_tiles; tile += tile_step, g += KT) {
      int nb, expert;
      long long row0;
      tile_coords(tile, nb, row0, expert);
      const int nv = rs_tile_rows(rs_real_rows<ROUTED, BM>(sorted_ids, row0, T, lane));
      asm volatile("bar.sync 3, 128;" ::: "memory");  // the previous tile's table reads are done
      for (int r = ltid; r < nv; r += 128) {
        bool ok = false;
        const long long src = moe_a_row<TOPK, GATE_UP, ROUTED>(sorted_ids, row0 + r, T, ok);
        row_src[r] = ok ? int(src) : -1;
      }
      asm volatile("bar.sync 3, 128;" ::: "memory");
      constexpr int BCH = BN * 2 / 128;  // raw chunks per thread: chunk c = ltid + 128 i: row c / 2, half c % 2
      const unsigned char* b_src[BCH];
#pragma unroll
      for (int i = 0; i < BCH; ++i) {
        const int c = ltid + 128 * i;
        const size_t wrow = size_t(expert) * N + moe_w_row<N, BN, GATE_UP>(nb, c / 2);
        b_src[i] = static_cast<const unsigned char*>(W) + (wrow * K + (c % 2) * 32) / 2;
      }
      // Scales: weight row n = ltid (< BN) copies the 4-byte pair of groups (g & ~1, g | 1) of each step.
      const bf16* s_row = ltid < BN ? S + (size_t(expert) * N + moe_w_row<N, BN, GATE_UP>(nb, ltid)) * (K / GROUP) : S;
#pragma unroll 1
      for (int kt = 0; kt < KT; ++kt) {
        const int G = g + kt;
        if (G >= STAGES) mbar_wait(empty + 8 * (G % STAGES), u32((G / STAGES - 1) & 1));
        const u32 t = base + u32(G % STAGES) * STAGE_BYTES;
#pragma unroll 4
        for (int r = ltid / 8; r < nv; r += 16) {
          const int src = row_src[r];
          cp_async_16_s(t + sw128(r, ch), src >= 0 ? A + size_t(src) * K + kt * 64 + ch * 8 : A, src >= 0);
        }
#pragma unroll
        for (int i = 0; i < BCH; ++i) cp_async_16_s(t + A_BYTES + u32(ltid + 128 * i) * 16, b_src[i] + kt * 32, true);
        if (ltid < BN) cp_async_4(scales + u32(G % STAGES) * (BN * 4) + u32(ltid) * 4, s_row + ((kt * 64 / GROUP) & ~1));
        cp_async_mbar_arrive(full + 8 * (G % STAGES));
      }
    }
    cp_async_wait<0>();
  } else {
    if constexpr (WGN == 2) regs_inc<224>();
    int g = 0;
#pragma unroll 1
    for (long long tile = first_tile; tile < n_tiles; tile += tile_step, g += KT) {
      int nb, expert;
      long long row0;
      tile_coords(tile, nb, row0, expert);
      const int nv = rs_tile_rows(rs_real_rows<ROUTED, BM>(sorted_ids, row0, T, lane));
      rs_consume_nv<GROUP, N, K, GATE_UP, ROUTED, OUT_F32, BM, BN, STAGES>(nv, base, full, empty, g, nb, wg,
                                                                           warp, lane, out, sorted_ids, row0, T);
    }
  }
#else
  __trap();  // sm_90a only: the host picks this kernel only for sm_90a targets
#endif
}
