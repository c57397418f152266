#pragma once
// Hopper (sm_90a) causal flash attention for prefill, in the FlashAttention-3 manner (kernels.md §5):
// the same computation and buffers as attention_prefill (attention.cuh), which stays the portable
// sm_80+ kernel; the runner picks this one for a tile with `wgmma` (autotune/tiles_attention.h).
//
//   out[t, h*D + d] = sigmoid(gate[t, h, d]) * sum_{p <= pos0 + t} softmax_p(scale q_t . k_p) v_p[d]
//
// Block: one q head h (kv head h / (HQ / HKV)), 128 query rows m0 .. m0 + 127 (the heaviest, last,
// row blocks first); 3 warpgroups (384 threads):
//   warpgroups 0, 1 (consumers): 64 query rows each, 64 x D fp32 accumulator O in registers
//     (D / 2 per thread: 128 at D = 256);
//   warpgroup 2 (producer): cp.async of Q once and of the K and V tiles of BLOCK_N keys, into a
//     STAGES-deep ring of shared memory, mbarriers full / empty per stage, K and V apart so that
//     S = Q K^T may start while V is still landing.
// setmaxnreg: the producer gives registers back (24), the consumers take 240 (no spills): 128 x 24 +
// 256 x 240 = 64,512 = the block's pool (168 registers x 384 threads at launch; a larger sum never
// leaves setmaxnreg.inc). Nothing
// computed before the split stays live across it (ptxas would spill it): each side reads pos0 itself.
//
// Per key tile j (0, 1, ..., the tile holding the block's last key) and consumer warpgroup:
//   S  [64 x BLOCK_N] = Q K_j^T  wgmma m64n{BLOCK_N}k16, A = Q and B = K_j both K-major (head dims
//                                contiguous) in shared memory, D / 16 instructions
//   causal mask (key > query position: -inf), only on tiles reaching past the warpgroup's first query
//   online softmax in fp32: running max m and sum l per row (the 4 threads of a row combine their
//     maxima by shuffles), p = exp2(s * scale log2(e) - m * scale log2(e)), O *= exp2(m_old - m)
//   O  [64 x D] += P V_j        wgmma m64n{D}k16 with P as the register A operand: the S accumulator
//                                of 16 keys, rounded to bf16 pairs, is the A fragment of one k16 step
//                                (the accumulator layout per 16 columns is mma.m16n8k16's A layout);
//                                V_j is B [keys x head dims] with the head dims contiguous, i.e.
//                                MN-major: the wgmma's transpose bit (imm-trans-b, bf16 allows it) reads
//                                the tile as the cache stores it (desc_mn_sw128), no transposed copy
// Intra-warpgroup overlap: the loop issues S_j = Q K_j^T, then O += P_{j-1} V_{j-1}, waits for S_j only,
// runs the softmax of S_j while the P V wgmma still runs, then waits for it, rescales O and turns S_j
// into P_j (sm90::pin_before_wait / pin_frag keep ptxas from hoisting the second wait above the
// softmax; tests/test_kernels_attention.cpp checks the SASS order). PINGPONG: the two consumer
// warpgroups also take turns issuing their wgmma (named barriers), so one's softmax runs under the
// other's matrix products.
// Both consumer warpgroups run every key tile of the block (warpgroup 0's rows may see none of the
// last one: masked to -inf, p = 0), so their barrier counts match.
// Epilogue: out = O / l * sigmoid(gate) for rows t < T, bf16, the layout attention_prefill writes.
// Keys past pos0 + T (rows of the last tile) are zero-filled, never read from the cache; tile 0 holds
// key 0, visible to every row, so every running max is finite from the first tile on.
//
// Grid (HQ, ceil(T / 128)); block 384; dynamic shared memory 1 KiB alignment + Smem::BYTES
// (AttentionPrefillTile::smem_bytes, autotune/tiles_attention.h).
#include "attention.cuh"
#include "sm90_pipeline.cuh"
#include "wgmma.cuh"

namespace q35k {
namespace attn90 {

constexpr int kRows = 128;                   // query rows per block (two consumer warpgroups of 64)
constexpr int kProducerRegs = 24, kConsumerRegs = 240;  // 128 x 24 + 256 x 240 = 64,512 = 168 x 384
static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= sm90::kRegisterPool<384>,
              "attention_prefill_wgmma: the warpgroups' setmaxnreg budgets exceed the block's register pool");

template <bool B>
struct Masked {
  static constexpr bool value = B;
};

// 2^x, flushing results below 2^-126 to zero (softmax weights that small do not count); one MUFU.EX2
// where exp2f adds a denormal range fix-up.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Shared memory (byte offsets from the 1024-aligned base). Every tile is D / 64 chunks of 64 head
// dims, rows of 128 bytes, 128-byte swizzled (sm90::sw128), each chunk 1024-aligned:
//   Q       [128 query rows] x D       chunk c at c * Q_CHUNK
//   K ring  stage s: [BLOCK_N keys] x D  chunk c at K + s * KV_BYTES + c * KV_CHUNK
//   V ring  likewise from V
//   mbarriers (8 bytes each): q_full, then per stage k_full, k_empty, v_full, v_empty
template <int D, int BLOCK_N, int STAGES>
struct Smem {
  static constexpr u32 Q_CHUNK = kRows * 128, KV_CHUNK = BLOCK_N * 128;
  static constexpr u32 KV_BYTES = (D / 64) * KV_CHUNK;
  static constexpr u32 K = (D / 64) * Q_CHUNK, V = K + STAGES * KV_BYTES, BARS = V + STAGES * KV_BYTES;
  static constexpr u32 BYTES = BARS + 8 * (1 + 4 * STAGES);
};

// cp.async of R rows of D bf16 (row r from src + (first + r) * stride elements, zeros where
// first + r >= limit) into the D / 64 swizzled chunks of `tile` (R * 128 bytes apart), by the 128
// producer threads: thread p copies 16-byte chunk p % (D / 8) of rows p / (D / 8), + 128 / (D / 8), ...
// Not unrolled: the producer runs in 24 registers.
template <int D, int R>
__device__ __forceinline__ void load_rows(u32 tile, const bf16* src, size_t stride, int first, int limit, int p) {
  constexpr int CPR = D / 8, RPP = 128 / CPR;  // 16-byte chunks per row, rows per pass
  static_assert(128 % CPR == 0 && R % RPP == 0, "attention_prefill_wgmma: rows must split over 128 threads");
  const int c = p % CPR;
  const u32 dst = tile + u32(c / 8) * (R * 128);
  const bf16* col = src + c * 8;
#pragma unroll 1
  for (int r = p / CPR; r < R; r += RPP) {
    const int row = first + r;
    const bool ok = row < limit;
    sm90::cp_async_16_s(dst + sm90::sw128(r, c % 8), col + size_t(ok ? row : 0) * stride, ok);
  }
}

}  // namespace attn90
}  // namespace q35k

template <int HQ, int HKV, int D, int BLOCK_N, int STAGES, bool PINGPONG>
__global__ void __launch_bounds__(384, 1)
attention_prefill_wgmma(const q35k::bf16* __restrict__ q,        // [T, HQ, D] normed + roped
                        const q35k::bf16* __restrict__ k_cache,  // [>= pos0+T, HKV, D]
                        const q35k::bf16* __restrict__ v_cache,  // [>= pos0+T, HKV, D]
                        const q35k::bf16* __restrict__ qkv,      // [T, HQ*2D + 2*HKV*D] (gate)
                        q35k::bf16* __restrict__ out,            // [T, HQ*D]
                        const int* __restrict__ pos0_ptr,        // [1]
                        int T, float scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace q35k;
  using namespace q35k::sm90;
  using namespace q35k::attn90;
  using L = Smem<D, BLOCK_N, STAGES>;
  static_assert(HQ % HKV == 0, "attention_prefill_wgmma: HQ must be a multiple of HKV");
  static_assert(D == 64 || D == 128 || D == 256, "attention_prefill_wgmma: head_dim 64, 128 or 256");
  static_assert(BLOCK_N % 16 == 0 && BLOCK_N >= 16 && BLOCK_N <= 128,
                "attention_prefill_wgmma: BLOCK_N a multiple of 16 (the P V k-steps), at most 128");
  static_assert(STAGES >= 2 && STAGES <= 4, "attention_prefill_wgmma: 2 to 4 stages");
  constexpr int ROW = HQ * 2 * D + 2 * HKV * D, GROUP = HQ / HKV;
  constexpr int KS = D / 16, PS = BLOCK_N / 16;  // k16 steps of S = Q K^T and of O += P V

  extern __shared__ unsigned char smem_raw[];
  const u32 base = (u32(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const u32 q_full = base + L::BARS;
  auto k_full = [&](int s) { return q_full + 8 * (1 + 4 * s); };
  auto k_empty = [&](int s) { return q_full + 8 * (2 + 4 * s); };
  auto v_full = [&](int s) { return q_full + 8 * (3 + 4 * s); };
  auto v_empty = [&](int s) { return q_full + 8 * (4 + 4 * s); };

  attn::wait_for_predecessor();
  // The warpgroup index from lane 0: uniform to ptxas, so the addresses and wgmma descriptors derived
  // from it live in uniform registers.
  const int tid = threadIdx.x, wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int h = blockIdx.x, kvh = h / GROUP;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kRows;
  // Key tiles of the block: up to its last query's position.
  auto tiles_of = [&](int pos0) { return (pos0 + min(m0 + kRows, T) + BLOCK_N - 1) / BLOCK_N; };
  if (tid == 0) {
    mbar_init(q_full, 128);
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(k_full(s), 128);
      mbar_init(k_empty(s), 256);
      mbar_init(v_full(s), 128);
      mbar_init(v_empty(s), 256);
    }
    spin_trap_init();
  }
  __syncthreads();

  if (wg == 2) {
    // ---- producer: Q once, then K_j and V_j into stage j % STAGES once the consumers freed it ----
    regs_dec<kProducerRegs>();
    const int pos0 = *pos0_ptr, kv_len = pos0 + T, n_tiles = tiles_of(pos0);  // kv_len: valid cache rows
    const int p = tid - 256;
    load_rows<D, kRows>(base, q + size_t(h) * D, size_t(HQ) * D, m0, T, p);
    cp_async_mbar_arrive(q_full);
    const bf16* k_head = k_cache + size_t(kvh) * D;
    const bf16* v_head = v_cache + size_t(kvh) * D;
#pragma unroll 1
    for (int j = 0; j < n_tiles; ++j) {
      const int s = j % STAGES;
      const u32 phase = u32((j / STAGES - 1) & 1);  // of the consumers' release of tile j - STAGES
      if (j >= STAGES) mbar_wait(k_empty(s), phase, "k_empty", s);
      load_rows<D, BLOCK_N>(base + L::K + s * L::KV_BYTES, k_head, size_t(HKV) * D, j * BLOCK_N, kv_len, p);
      cp_async_mbar_arrive(k_full(s));
      if (j >= STAGES) mbar_wait(v_empty(s), phase, "v_empty", s);
      load_rows<D, BLOCK_N>(base + L::V + s * L::KV_BYTES, v_head, size_t(HKV) * D, j * BLOCK_N, kv_len, p);
      cp_async_mbar_arrive(v_full(s));
    }
    attn::cp_async_wait<0>();
    if (p == 0) spin_trap_watchdog(8);  // Q35_SPIN_TRAP only: the 8 consumer warps finish
  } else {
    // ---- consumers: warpgroup wg owns query rows m0 + 64 wg .. + 63 ----
    regs_inc<kConsumerRegs>();
    const int pos0 = *pos0_ptr, n_tiles = tiles_of(pos0);
    const int never = T < 0;  // false, but not to ptxas (pin_*)
    const int warp = (tid / 32) % 4, lane = tid % 32, g = lane / 4, c = lane % 4;
    const int row0 = m0 + 64 * wg + 16 * warp;          // this warp's first query row (token index)
    const int qpos[2] = {pos0 + row0 + g, pos0 + row0 + g + 8};  // positions of rows g, g + 8
    const float sl = scale * attn::kLog2e;
    const u32 q_tile = base + u32(wg) * 64 * 128;       // this warpgroup's 64 rows of every Q chunk
    // Accumulators (wgmma m64nN layout): thread (warp w, lane l) holds x[jb * 4 + e], column block
    // jb (8 columns): row 16 w + l/4 (+ 8 for e >= 2), column 8 jb + 2 (l % 4) + (e & 1).
    float o[D / 2];        // O: columns = head dims
    float s[BLOCK_N / 2];  // S, then P in fp32: columns = the tile's keys
    u32 pf[PS][4];         // P as bf16 A fragments, one per 16 keys (read by the P V wgmma in flight)
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
#pragma unroll
    for (int i = 0; i < BLOCK_N / 2; ++i) s[i] = 0.f;
    float m_run[2] = {-attn::inf(), -attn::inf()}, l_run[2] = {0.f, 0.f};  // rows g, g + 8 (raw score units)
    mbar_wait<false>(q_full, 0, "q_full");

    // Ping-pong: warpgroup 0 issues first; each issue point waits for the other warpgroup's previous
    // one (named barriers 1 + wg, 256 threads: 128 arrive, 128 sync). Both run n_tiles + 1 issue
    // points, so the arrivals and syncs pair up exactly.
    int turn = 0;
    auto issue_begin = [&]() {
      if (PINGPONG && (wg == 1 || turn > 0)) named_bar_sync(1 + wg, 256, "ping-pong issue turn");
    };
    auto issue_end = [&]() {
      if (PINGPONG && (wg == 0 || turn < n_tiles)) named_bar_arrive(2 - wg, 256);
      ++turn;
    };
    auto issue_s = [&](int j) {  // S = Q K_j^T
      const int st = j % STAGES;
      mbar_wait<false>(k_full(st), u32((j / STAGES) & 1), "k_full", st);
      fence_proxy_async();  // the producer's cp.async writes (generic proxy) -> wgmma (async proxy)
      const u32 k_tile = base + L::K + st * L::KV_BYTES;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < KS; ++kk)
        wgmma_bf16<BLOCK_N>(s, desc_k128_sw128(q_tile + (kk / 4) * L::Q_CHUNK + (kk % 4) * 32),
                            desc_k128_sw128(k_tile + (kk / 4) * L::KV_CHUNK + (kk % 4) * 32), kk > 0);
      wgmma_commit();
    };
    auto issue_pv = [&](int j) {  // O += P V_j
      const int st = j % STAGES;
      mbar_wait<false>(v_full(st), u32((j / STAGES) & 1), "v_full", st);
      fence_proxy_async();
      const u32 v_tile = base + L::V + st * L::KV_BYTES;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < PS; ++ks)  // keys 16 ks .. 16 ks + 15: two 8-row groups of every chunk
        wgmma_bf16_rs_tb<D>(o, pf[ks], desc_mn_sw128(v_tile + ks * 16 * 128, L::KV_CHUNK), 1);
      wgmma_commit();
    };
    // Causal mask (MASKED: tiles reaching past the warpgroup's first query) and online softmax of
    // tile j's S, in place (P in fp32); alpha = the rows' rescale of O.
    auto softmax = [&](int j, float (&alpha)[2], auto masked) {
      const int n0 = j * BLOCK_N;
      if constexpr (decltype(masked)::value) {
#pragma unroll
        for (int jb = 0; jb < BLOCK_N / 8; ++jb)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (n0 + jb * 8 + 2 * c + (e & 1) > qpos[e >> 1]) s[jb * 4 + e] = -attn::inf();
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = m_run[r];
#pragma unroll
        for (int jb = 0; jb < BLOCK_N / 8; ++jb) mx = fmaxf(mx, fmaxf(s[jb * 4 + 2 * r], s[jb * 4 + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        alpha[r] = exp2_ftz((m_run[r] - mx) * sl);  // 0 on the first tile (m_run = -inf)
        m_run[r] = mx;
        const float b = mx * sl;
        float sum = 0.f;
#pragma unroll
        for (int jb = 0; jb < BLOCK_N / 8; ++jb) {
          s[jb * 4 + 2 * r] = exp2_ftz(fmaf(s[jb * 4 + 2 * r], sl, -b));
          s[jb * 4 + 2 * r + 1] = exp2_ftz(fmaf(s[jb * 4 + 2 * r + 1], sl, -b));
          sum += s[jb * 4 + 2 * r] + s[jb * 4 + 2 * r + 1];
        }
        l_run[r] = l_run[r] * alpha[r] + sum;
      }
    };
    // P (fp32, accumulator layout) -> bf16 A fragments: k16 step ks = column blocks 2 ks, 2 ks + 1.
    auto to_fragments = [&]() {
#pragma unroll
      for (int ks = 0; ks < PS; ++ks) {
        pf[ks][0] = f32x2_to_bf16x2(s[8 * ks + 0], s[8 * ks + 1]);  // row g,     keys 2c, 2c+1
        pf[ks][1] = f32x2_to_bf16x2(s[8 * ks + 2], s[8 * ks + 3]);  // row g + 8, keys 2c, 2c+1
        pf[ks][2] = f32x2_to_bf16x2(s[8 * ks + 4], s[8 * ks + 5]);  // row g,     keys 8 + 2c, +1
        pf[ks][3] = f32x2_to_bf16x2(s[8 * ks + 6], s[8 * ks + 7]);  // row g + 8, keys 8 + 2c, +1
      }
    };

    // Tiles from mask_from on reach past the warpgroup's first query (j BLOCK_N + BLOCK_N - 1 >
    // its position): they take the causal mask, the others run without it.
    const int mask_from = (pos0 + m0 + 64 * wg + 1) / BLOCK_N;
    float alpha[2];
    issue_begin();
    issue_s(0);
    issue_end();
    wgmma_wait<0>();
    fence_regs(s);
    mbar_arrive(k_empty(0));
    if (mask_from == 0) softmax(0, alpha, Masked<true>());  // O is still zero: no rescale
    else softmax(0, alpha, Masked<false>());
    to_fragments();
    auto step = [&](int j, auto masked) {
      issue_begin();
      issue_s(j);
      issue_pv(j - 1);
      issue_end();
      wgmma_wait<1>();  // S_j has landed; P_{j-1} V_{j-1} may still run
      fence_regs(s);
      mbar_arrive(k_empty(j % STAGES));
      softmax(j, alpha, masked);
      pin_before_wait(l_run[0], l_run[1], never, base);  // the softmax stays under P V in ptxas's schedule
      wgmma_wait<0>();
      fence_regs(o);
      pin_frag(pf, never, base);  // P's registers stay P's until P V has retired
      mbar_arrive(v_empty((j - 1) % STAGES));
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
      to_fragments();
    };
#pragma unroll 1
    for (int j = 1; j < min(mask_from, n_tiles); ++j) step(j, Masked<false>());
#pragma unroll 1
    for (int j = max(mask_from, 1); j < n_tiles; ++j) step(j, Masked<true>());
    issue_begin();
    issue_pv(n_tiles - 1);
    issue_end();
    wgmma_wait<0>();
    fence_regs(o);
    pin_frag(pf, never, base);
    mbar_arrive(v_empty((n_tiles - 1) % STAGES));
    spin_trap_warp_done();

    // Epilogue: the 4 threads of a row hold disjoint columns of its sum.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int t = row0 + g + 8 * r;
      if (t >= T) continue;
      const float inv_l = 1.f / l;
      const bf16* gate = qkv + size_t(t) * ROW + h * 2 * D + D;
      bf16* dst = out + size_t(t) * HQ * D + h * D;
#pragma unroll
      for (int jb = 0; jb < D / 8; ++jb) {
        const int d = jb * 8 + 2 * c;
        const u32 gw = *reinterpret_cast<const u32*>(gate + d);
        *reinterpret_cast<u32*>(dst + d) =
            f32x2_to_bf16x2(o[jb * 4 + 2 * r] * inv_l * attn::sigmoid(bf16x2_lo(gw)),
                            o[jb * 4 + 2 * r + 1] * inv_l * attn::sigmoid(bf16x2_hi(gw)));
      }
    }
  }
#else
  __trap();  // sm_90a only: the host picks this kernel only for sm_90a targets
#endif
}
