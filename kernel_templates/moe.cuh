#pragma once
// Sparse MoE + shared expert (spec §2.6): the router, the decode path (few tokens, weights streamed
// once through CUDA-core GEMVs) and the glue of the prefill path (moe_align, moe_combine; the
// grouped tensor-core GEMMs are in moe_gemm.cuh).
//
// Weights of the experts and the shared expert come in one of the formats of weights.cuh, the
// template parameter GROUP: 0 = bf16 [N, K]; 32 / 64 / 128 = W4A16 (runtime/core/int4_format.h) with
// qweight uint32 [N, K/8] and scales bf16 [N, K/GROUP]; kFp8 = FP8 (runtime/core/fp8_format.h) with
// codes uint8 [N, K] and scales fp32 [N, ceil(K/128)]. A weight matrix is passed as (const void* w,
// const void* s) with s unused for bf16. Experts add a leading [E] to both.
//
// Expert-grouped ("decode") path, T <= 256 tokens (kMoeGroupedMaxTokens: every decode step, short prompt
// chunks), 3 launches (router, gate_up, down), chained with programmatic dependent launch (PDL, sm_90):
// each kernel prefetches the weights it knows before griddepcontrol.wait.
//   moe_router          logits [T, E+1] fp32 (row E = shared_expert_gate), then softmax, top-k,
//                       renormalise by the last block to finish -> ids, weights, shared_gate
//   moe_decode_gate_up  h[t, s*I + i] = bf16(silu(gate_e . x_t) * (up_e . x_t)), e = ids[t, s], for
//                       the k routed slots, and h[t, k*I + i] for the shared expert (Is values)
//   moe_decode_down     out[t] = bf16( sum_s w[t,s] * down_e . h[t,s] + shared_gate[t] * down_sh . h[t,k] )
//                       (moe_decode_down_residual: added to the fp32 residual stream instead, and the
//                       next RMSNorm by the last block, decode_fusion.cuh)
// The two decode GEMVs run on tensor cores (WarpRows16): a warp's 16 weight rows are the mma
// A operand straight from the 16-byte loads, the tokens are the B operand, fp32 accumulation.
// Prefill: moe_router, moe_align, 4 x moe_gemm, moe_combine.
#include "common.cuh"
#include "decode_fusion.cuh"
#include "moe_plan.cuh"
#include "weights.cuh"

namespace q35k {

__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

// d += a . b, m16n8k16, bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Programmatic dependent launch (sm_90; no-ops below, or when launched without PDL): let the next
// kernel of the stream start its prologue / wait until the previous one finished and its writes
// are visible.
__device__ __forceinline__ void moe_pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void moe_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Pulls the `bytes` bytes at p into L2, spread over the warp's lanes (one 128-byte line each).
__device__ __forceinline__ void prefetch_l2_warp(const void* p, int bytes) {
  for (int off = (threadIdx.x % 32) * 128; off < bytes; off += 32 * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const unsigned char*>(p) + off));
}

// Pulls into L2 the bytes [offset, offset + RB) of the 16 rows row_lo .. row_lo + 7 and
// row_hi .. row_hi + 7 of a matrix with `stride` bytes per row, spread over the warp's lanes.
template <int RB>
__device__ __forceinline__ void prefetch_l2_rows16(const void* p, size_t stride, int row_lo, int row_hi, int offset) {
  constexpr int LINES = (RB + 127) / 128;  // 128-byte lines per row
  for (int i = threadIdx.x % 32; i < 16 * LINES; i += 32) {
    const int r = i / LINES, row = r < 8 ? row_lo + r : row_hi + r - 8;
    asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const unsigned char*>(p) + row * stride + offset +
                                                   (i % LINES) * 128));
  }
}

// A 4-byte load issued where it stands: a strong (relaxed, GPU-scope) load, which ptxas does not sink
// past a branch that may skip its use (a plain or .nc load it does), served by L2; for data written by
// a previous kernel (after griddepcontrol.wait).
__device__ __forceinline__ int ld_now_s32(const int* p) {
  int v;
  asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Warp-wide max / min of unsigned values (sm_80+), every lane gets the result.
__device__ __forceinline__ u32 warp_max_u32(u32 v) {
  u32 r;
  asm volatile("redux.sync.max.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(v));
  return r;
}
__device__ __forceinline__ u32 warp_min_u32(u32 v) {
  u32 r;
  asm volatile("redux.sync.min.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(v));
  return r;
}

// Dot products of R rows of a bf16 matrix W [*, K] with M bf16 vectors x[m] [K] (the router), by one
// warp; every lane returns all M * R sums in out. A row of C = K / 8 16-byte vectors is read by
// LPR = min(C, 32) lanes, so 32 / LPR rows are in flight per pass and no lane idles on short rows.
// Weights are streamed (read once), activations go through L1.
template <int K, int R, int M>
__device__ __forceinline__ void warp_rows_dot(const bf16* __restrict__ W, const int (&rows)[R],
                                              const bf16* const (&x)[M], float (&out)[M][R]) {
  static_assert(K % 8 == 0, "K must be a multiple of 8");
  constexpr int C = K / 8;
  constexpr int LPR = C < 32 ? C : 32;
  static_assert(32 % LPR == 0 && C % LPR == 0, "K / 8 must divide 32 or be a multiple of 32");
  constexpr int RP = 32 / LPR;             // rows per pass
  constexpr int P = (R + RP - 1) / RP;     // passes
  // Few tokens: unroll fully (loads in flight); many: keep the x vectors' registers bounded.
  constexpr int UNROLL = M <= 2 ? C / LPR : 1;
  const int lane = threadIdx.x % 32, sub = lane / LPR, li = lane % LPR;

  float acc[M][P];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int p = 0; p < P; ++p) acc[m][p] = 0.f;

#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int rr = min(p * RP + sub, R - 1);  // rows past R (last pass) repeat row R-1, unused
    int row = rows[0];
#pragma unroll
    for (int r = 1; r < R; ++r)
      if (r == rr) row = rows[r];
#pragma unroll UNROLL
    for (int j = 0; j < C / LPR; ++j) {
      const int c = li + j * LPR;
      float wf[8];
      unpack8(ld_stream_16(W + size_t(row) * K + c * 8), wf);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xf[8];
        unpack8(ld_global_16(x[m] + c * 8), xf);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[m][p] += wf[i] * xf[i];
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
      for (int off = LPR / 2; off > 0; off >>= 1) acc[m][p] += __shfl_xor_sync(0xffffffffu, acc[m][p], off);
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) out[m][r] = __shfl_sync(0xffffffffu, acc[m][r / RP], (r % RP) * LPR);
}

// Bytes of KLEN weights of one row in format GROUP (scales not counted).
template <int GROUP, int KLEN>
__device__ constexpr int row_bytes() { return int(WeightFormat<GROUP>::bytes(KLEN)); }

// 16 rows of a weight matrix W [*, K] (format GROUP) over k in [k0, k0 + KLEN), held in one warp's
// registers and multiplied on tensor cores with any number of token vectors, TOKENS at a time (one mma
// column tile). Lane quad g = lane / 4 names rows row_lo (mma row g) and row_hi (mma row g + 8).
// The reduction order inside an mma is free, so each lane's 16-byte weight vector is its A fragment
// as loaded: lane c = lane % 4 supplies k-slots {2c, 2c+1, 2c+8, 2c+9} of every mma from its own
// vector, and the B operand (the tokens) follows the same k mapping; B column n is supplied by lane
// quad n. One token's sums depend only on its own B column (an mma computes each D column from its
// own B column), so they are the same whichever tokens share the tile and whatever column it takes:
// a token's result does not depend on the other tokens of the call.
//   bf16: a step is 32 k (lane c: 8 k at 8c), 2 mmas; column n = token n (TOKENS = 8).
//   INT4: a step is 128 k (lane c: the 32-value chunk c), 8 mmas; GPS = 128 / GROUP group slots per
//         step, column n = (token n / GPS, slot n % GPS) holds the token's x only in the chunks of its
//         slot, so D[row][n] is one scale group's exact-product sum, scaled once per step (TOKENS =
//         8 / GPS).
//   FP8:  as INT4 with one 128-k scale block per step (GPS = 1, TOKENS = 8): lane c's chunk c is 32
//         e4m3 codes (two 16-byte vectors, weights.cuh Run32), turned into exact bf16 operands; the
//         step's fp32 block scale is applied once to each D column.
// A column's chunks must lie in one scale group (W4A16) or block (FP8): KLEN a multiple of the group
// (so k0 = warp * KLEN starts on one) or a divisor of it (the part lies inside one); tiles_moe.cpp
// why_misaligned_part refuses other tiles.
// load() issues every weight load of the warp (KLEN / 32 16-byte vectors per lane over both rows for
// INT4, twice that for FP8) before any mma; dot() then streams the token vectors through L1.
template <int GROUP>
struct WarpRowsVec {  // a lane's weights of one step and row: 8 bf16 or a 32-value INT4 chunk
  typedef uint4 type;
};
template <>
struct WarpRowsVec<kFp8> {  // a 32-value chunk of FP8 codes
  typedef Run32<kFp8> type;
};

template <int GROUP, int K, int KLEN>
struct WarpRows16 {
  static_assert(KLEN % 32 == 0 && K % KLEN == 0, "WarpRows16: KLEN must be a multiple of 32 dividing K");
  using F = WeightFormat<GROUP>;
  static_assert(!F::quantized || KLEN % F::SCALE_K == 0 || F::SCALE_K % KLEN == 0,
                "WarpRows16: a warp's part of K must start on a scale group (KLEN a multiple or a divisor of the "
                "W4A16 group or of FP8's 128-k block; autotune/tiles_moe.cpp why_misaligned_part)");
  static constexpr int GPS = GROUP == 0 ? 1 : 128 / F::SCALE_K;  // mma columns per token
  static constexpr int TOKENS = 8 / GPS;                         // tokens per mma column tile
  static constexpr int STEPS = GROUP == 0 ? KLEN / 32 : (KLEN + 127) / 128;
  static constexpr int PART = KLEN;  // K values per warp (one part of K)
  typedef typename WarpRowsVec<GROUP>::type Vec;
  typedef typename F::Scale Scale;  // bf16 (W4A16), fp32 (FP8)
  Vec lo[STEPS], hi[STEPS];
  const Scale* s_lo;
  const Scale* s_hi;
  int k0;

  // Pairs 4w .. 4w + 3 of a quantized chunk as exact bf16x2 mma operands (before scaling).
  static __device__ __forceinline__ void pairs(const uint4& v, int w, u32 (&p)[4]) {
    int4x8_to_bf16x2(w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w, p);
  }
  static __device__ __forceinline__ void pairs(const Run32<kFp8>& v, int w, u32 (&p)[4]) { v.pairs(w, p); }

  __device__ __forceinline__ void load(const void* __restrict__ W, const void* __restrict__ S, int row_lo, int row_hi,
                                       int k_begin) {
    const int c = threadIdx.x % 4;
    k0 = k_begin;
    if constexpr (GROUP == 0) {
      const bf16* wl = static_cast<const bf16*>(W) + size_t(row_lo) * K + k0 + 8 * c;
      const bf16* wh = static_cast<const bf16*>(W) + size_t(row_hi) * K + k0 + 8 * c;
#pragma unroll
      for (int st = 0; st < STEPS; ++st) lo[st] = ld_stream_16(wl + 32 * st), hi[st] = ld_stream_16(wh + 32 * st);
    } else if constexpr (GROUP == kFp8) {
      const unsigned char* wl = static_cast<const unsigned char*>(W) + size_t(row_lo) * K;
      const unsigned char* wh = static_cast<const unsigned char*>(W) + size_t(row_hi) * K;
#pragma unroll
      for (int st = 0; st < STEPS; ++st) {
        const int kc = k0 + st * 128 + 32 * c;  // this lane's chunk
        lo[st].zero();
        hi[st].zero();
        if (KLEN % 128 == 0 || kc < k0 + KLEN) lo[st].load(wl + kc), hi[st].load(wh + kc);
      }
      s_lo = static_cast<const Scale*>(S) + size_t(row_lo) * F::scales_per_row(K);
      s_hi = static_cast<const Scale*>(S) + size_t(row_hi) * F::scales_per_row(K);
    } else {
      const u32* wl = static_cast<const u32*>(W) + size_t(row_lo) * (K / 8);
      const u32* wh = static_cast<const u32*>(W) + size_t(row_hi) * (K / 8);
#pragma unroll
      for (int st = 0; st < STEPS; ++st) {
        const int kc = k0 + st * 128 + 32 * c;  // this lane's chunk
        lo[st] = hi[st] = uint4{0u, 0u, 0u, 0u};
        if (KLEN % 128 == 0 || kc < k0 + KLEN) lo[st] = ld_stream_16(wl + kc / 8), hi[st] = ld_stream_16(wh + kc / 8);
      }
      s_lo = static_cast<const Scale*>(S) + size_t(row_lo) * (K / GROUP);
      s_hi = static_cast<const Scale*>(S) + size_t(row_hi) * (K / GROUP);
    }
  }

  // One column tile: this lane supplies column g = lane / 4 from xg (its token's vector [K]; nullptr:
  // a zero column). store(token, row, v) gets each (token < TOKENS, row < 16) sum once, from one lane.
  template <typename Store>
  __device__ __forceinline__ void dot(const bf16* __restrict__ xg, Store&& store) const {
    const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    if constexpr (GROUP == 0) {
      float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int st = 0; st < STEPS; ++st) {
        const uint4 v = xg ? ld_global_16(xg + k0 + 32 * st + 8 * c) : uint4{0u, 0u, 0u, 0u};
        const u32 f0[4] = {lo[st].x, hi[st].x, lo[st].y, hi[st].y}, f1[4] = {lo[st].z, hi[st].z, lo[st].w, hi[st].w};
        mma_bf16_16816(d, f0, v.x, v.y);
        mma_bf16_16816(d, f1, v.z, v.w);
      }
      store(2 * c, g, d[0]);
      store(2 * c + 1, g, d[1]);
      store(2 * c, g + 8, d[2]);
      store(2 * c + 1, g + 8, d[3]);
    } else {
      // Column g carries x only in the chunks of its group slot g % GPS.
      const bool on = xg != nullptr && c / (4 / GPS) == g % GPS;
      // This lane's D columns 2c, 2c + 1: group slots j0, j1.
      const int j0 = (2 * c) % GPS, j1 = (2 * c + 1) % GPS;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int st = 0; st < STEPS; ++st) {
        const int kb = k0 + st * 128, kc = kb + 32 * c;
        uint4 xv[4] = {};
        if (on && (KLEN % 128 == 0 || kc < k0 + KLEN)) {
#pragma unroll
          for (int w = 0; w < 4; ++w) xv[w] = ld_global_16(xg + kc + 8 * w);
        }
        float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          u32 al[4], ah[4];
          pairs(lo[st], w, al);
          pairs(hi[st], w, ah);
          const u32 f0[4] = {al[0], ah[0], al[1], ah[1]}, f1[4] = {al[2], ah[2], al[3], ah[3]};
          mma_bf16_16816(d, f0, xv[w].x, xv[w].y);
          mma_bf16_16816(d, f1, xv[w].z, xv[w].w);
        }
        // Scale indices clamped in range (a partial last step's missing chunks have zero sums). Whole
        // steps (KLEN % 128 == 0) never clamp: k0 / SCALE_K + the step's and the slot's offsets, so the
        // loads are one base pointer plus immediates (k0 = warp * KLEN is then a multiple of 128: FP8's
        // step st is scale block k0 / 128 + st).
        constexpr int SK = F::SCALE_K;
        int s0, s1;
        if constexpr (KLEN % 128 == 0) {
          s0 = k0 / SK + st * GPS + j0;
          s1 = k0 / SK + st * GPS + j1;
        } else {
          const int last = k0 + KLEN - 32;
          s0 = min(kb + SK * j0, last) / SK, s1 = min(kb + SK * j1, last) / SK;
        }
        acc[0] += F::scale(s_lo, s0) * d[0];
        acc[1] += F::scale(s_lo, s1) * d[1];
        acc[2] += F::scale(s_hi, s0) * d[2];
        acc[3] += F::scale(s_hi, s1) * d[3];
      }
      if constexpr (GPS == 1) {
        store(2 * c, g, acc[0]);
        store(2 * c + 1, g, acc[1]);
        store(2 * c, g + 8, acc[2]);
        store(2 * c + 1, g + 8, acc[3]);
      } else {
        float vlo = acc[0] + acc[1], vhi = acc[2] + acc[3];  // columns 2c, 2c + 1: one token
        if constexpr (GPS == 4) {  // the token's other two columns sit in lane c ^ 1
          vlo += __shfl_xor_sync(0xffffffffu, vlo, 1);
          vhi += __shfl_xor_sync(0xffffffffu, vhi, 1);
        }
        if (GPS == 2 || c % 2 == 0) {
          store(2 * c / GPS, g, vlo);
          store(2 * c / GPS, g + 8, vhi);
        }
      }
    }
  }
};

}  // namespace q35k

namespace q35k {

// One warp routes token t from its E router logits lt[0..E-1] (read with __ldcg: written by other
// blocks of this grid or the previous kernel) and its shared-gate logit: softmax, top-k (ties: the
// lower expert), renormalised weights -> ids, weights [t, :], shared_gate[t]. Returns the token's
// k-th expert in lane k < TOPK (-1 in the other lanes).
template <int E, int TOPK>
__device__ __forceinline__ int route_token(const float* lt, float sg_logit, int t, int* __restrict__ ids,
                                            float* __restrict__ weights, float* __restrict__ shared_gate) {
  constexpr int EPL = (E + 31) / 32;  // probabilities per lane in the top-k
  const float neg_inf = __int_as_float(0xff800000);
  const int lane = threadIdx.x % 32;
  float p[EPL];
  float mx = neg_inf;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = lane + 32 * i;
    p[i] = e < E ? __ldcg(lt + e) : neg_inf;
    mx = fmaxf(mx, p[i]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    p[i] = lane + 32 * i < E ? expf(p[i] - mx) : 0.f;
    sum += p[i];
  }
  sum = q35k::warp_sum(sum);
  // Keys: p >= 0 orders as its bits, + 1 so that 0 marks "not selectable" (past E, or taken).
  q35k::u32 key[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) key[i] = lane + 32 * i < E ? __float_as_uint(p[i] / sum) + 1u : 0u;

  float sel_p[TOPK];
  int sel_e[TOPK];
  float top_sum = 0.f;
#pragma unroll
  for (int k = 0; k < TOPK; ++k) {
    // The largest key of the warp, then the lowest expert holding it.
    q35k::u32 best = key[0];
#pragma unroll
    for (int i = 1; i < EPL; ++i) best = max(best, key[i]);
    best = q35k::warp_max_u32(best);
    q35k::u32 cand = 0xffffffffu;
#pragma unroll
    for (int i = EPL - 1; i >= 0; --i)
      if (key[i] == best) cand = lane + 32 * i;
    const int be = int(q35k::warp_min_u32(cand));
    const float bp = __uint_as_float(best - 1u);
    sel_p[k] = bp;
    sel_e[k] = be;
    top_sum += bp;
#pragma unroll
    for (int i = 0; i < EPL; ++i)
      if (lane + 32 * i == be) key[i] = 0u;
  }
#pragma unroll
  for (int k = 0; k < TOPK; ++k)
    if (lane == k) {
      ids[size_t(t) * TOPK + k] = sel_e[k];
      weights[size_t(t) * TOPK + k] = sel_p[k] / top_sum;
    }
  if (lane == 0) shared_gate[t] = 1.f / (1.f + expf(-sg_logit));
  int mine = -1;
#pragma unroll
  for (int k = 0; k < TOPK; ++k)
    if (lane == k) mine = sel_e[k];
  return mine;
}

}  // namespace q35k

namespace q35k {

// The decode path's work list, grouped by expert (built by moe_router, read by the decode GEMVs):
//   plan[0]                 U, the routed experts the T tokens chose (distinct)
//   plan[1 + u]             expert of u, u < U, in increasing expert order
//   plan[1 + E + u]         start of u's pairs in the pair list (u <= U; plan[1 + E + U] = T * TOPK)
//   plan[2 + 2E + i]        pair list: pair index t * TOPK + s, grouped by expert, each expert's by
//                           increasing token
// Built by one block of THREADS threads from ids [T, TOPK] (written by this grid: read through L2), in
// general; moe_router's fast path (T * TOPK <= 32, one routing block) builds the same plan in one
// warp's registers (moe_plan.cuh moe_build_plan_warp).
template <int E, int TOPK, int THREADS>
__device__ __forceinline__ void moe_build_plan(const int* ids, int T, int* __restrict__ plan) {
  static_assert(TOPK >= 1 && TOPK <= 32, "moe_build_plan: TOPK must be in [1, 32]");
  constexpr int EPL = (E + 31) / 32;  // experts per lane in the scan
  __shared__ int count[E];            // pairs per expert, then each expert's next free position
  const int tid = threadIdx.x, lane = tid % 32;
  int* const expert = plan + 1;
  int* const start = plan + 1 + E;
  int* const pairs = plan + 2 + 2 * E;
  for (int e = tid; e < E; e += THREADS) count[e] = 0;
  __syncthreads();
  const int P = T * TOPK;
  for (int i = tid; i < P; i += THREADS) atomicAdd(&count[__ldcg(ids + i)], 1);
  __syncthreads();
  if (tid < 32) {  // one warp: each lane a run of EPL experts, then exclusive scans over the lanes
    int own_u = 0, own_p = 0;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane * EPL + i;
      if (e < E) own_u += count[e] > 0, own_p += count[e];
    }
    int inc_u = own_u, inc_p = own_p;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int vu = __shfl_up_sync(0xffffffffu, inc_u, off), vp = __shfl_up_sync(0xffffffffu, inc_p, off);
      if (lane >= off) inc_u += vu, inc_p += vp;
    }
    int u = inc_u - own_u, p = inc_p - own_p;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane * EPL + i;
      if (e < E && count[e] > 0) {
        expert[u] = e;
        start[u] = p;
        p += count[e];
        count[e] = p - count[e];
        ++u;
      }
    }
    if (lane == 31) {
      plan[0] = inc_u;
      start[inc_u] = inc_p;
    }
    __syncwarp();
    // Scatter in token order: a pass takes 32 / TOPK whole tokens (a token's experts are distinct);
    // lanes of one pass with the same expert take consecutive places in lane order.
    constexpr int PER = 32 / TOPK;
    for (int t0 = 0; t0 < T; t0 += PER) {
      const int t = t0 + lane / TOPK, s = lane % TOPK;
      const bool on = lane < PER * TOPK && t < T;
      const int e = on ? __ldcg(ids + t * TOPK + s) : -1 - lane;
      const unsigned same = __match_any_sync(0xffffffffu, e);
      const int rank = __popc(same & ((1u << lane) - 1u));
      const int at = on ? count[e] + rank : 0;
      __syncwarp();
      if (on) {
        pairs[at] = t * TOPK + s;
        if (rank == __popc(same) - 1) count[e] = at + 1;
      }
      __syncwarp();
    }
  }
}

}  // namespace q35k

// ---- router: logits, softmax, top-k, renormalise; plus the shared expert's sigmoid gate ----
// x [T, H] bf16; w_router [E, H] bf16; w_sg [1, H] bf16 (shared_expert_gate);
// logits [T, E+1] fp32 scratch; counters [ceil(T / M_TILE)] int32, zero before the first launch and
// left zero by every launch (graph-safe); ids [T, TOPK] int32 and weights [T, TOPK] fp32, by
// decreasing probability (equal probabilities: lower expert first), weights renormalised to sum 1;
// shared_gate [T] fp32 = sigmoid(x . w_sg); plan int32 [moe_plan_ints(E, T, TOPK)], the decode
// path's expert-grouped work list (moe_build_plan); plan_ticket int32 [1], zero between launches.
// Grid: (ceil((E / ROWS + 1) / WARPS), ceil(T / M_TILE)); block WARPS * 32. Warp g < E / ROWS computes
// router rows g*ROWS .. +ROWS-1, warp E / ROWS the shared gate, for M_TILE tokens. The last block of a
// token tile to finish (atomic ticket) runs softmax + top-k, one warp per token; the last of those
// (a second ticket when there are several token tiles) builds the plan.
// Fast path, T * TOPK <= 32 and one token tile (gridDim.y == 1, M_TILE >= T; T <= 4 at k = 8): the
// routing warps leave their tokens' experts in shared memory and warp 0 builds the plan in registers
// (moe_build_plan_warp: same layout and contents as moe_build_plan) after a warp barrier (T = 1: warp
// 0 routed the only token) or one block barrier; no fence, no second ticket, no shared-memory atomics
// or 256-expert scan. The general path (moe_build_plan) serves the rest.
template <int H, int E, int TOPK, int M_TILE, int ROWS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
moe_router(const q35k::bf16* __restrict__ x, const q35k::bf16* __restrict__ w_router,
           const q35k::bf16* __restrict__ w_sg, float* __restrict__ logits, int* __restrict__ counters,
           int* __restrict__ ids, float* __restrict__ weights, float* __restrict__ shared_gate,
           int* __restrict__ plan, int* plan_ticket, int T) {
  static_assert(E % ROWS == 0, "moe_router: E must be a multiple of ROWS");
  static_assert(TOPK >= 1 && TOPK <= E && TOPK <= 32, "moe_router: TOPK must be in [1, min(E, 32)]");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = blockIdx.x * WARPS + warp;
  const int t0 = blockIdx.y * M_TILE;

  // The router weights do not depend on the previous kernel: start reading them before waiting.
  if (g <= E / ROWS)
    q35k::prefetch_l2_warp(g == E / ROWS ? w_sg : w_router + size_t(g) * ROWS * H, (g == E / ROWS ? 1 : ROWS) * H * 2);
  q35k::moe_pdl_wait();
  q35k::moe_pdl_launch_dependents();

  if (g <= E / ROWS) {
    const bool is_sg = g == E / ROWS;
    int rows[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) rows[r] = is_sg ? 0 : g * ROWS + r;
    const q35k::bf16* xm[M_TILE];
#pragma unroll
    for (int m = 0; m < M_TILE; ++m) xm[m] = x + size_t(min(t0 + m, T - 1)) * H;
    float out[M_TILE][ROWS];
    q35k::warp_rows_dot<H, ROWS, M_TILE>(is_sg ? w_sg : w_router, rows, xm, out);
#pragma unroll
    for (int m = 0; m < M_TILE; ++m)
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (lane == (m * ROWS + r) % 32 && t0 + m < T && (r == 0 || !is_sg))
          logits[size_t(t0 + m) * (E + 1) + (is_sg ? E : g * ROWS + r)] = out[m][r];
  }

  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&counters[blockIdx.y], 1) == int(gridDim.x) - 1;
  __syncthreads();
  if (!is_last) return;
  if (threadIdx.x == 0) counters[blockIdx.y] = 0;
  __threadfence();

  const bool warp_plan = gridDim.y == 1 && T * TOPK <= 32;  // uniform
  __shared__ int routed[32];                                 // warp_plan: ids [T, TOPK]
  for (int m = warp; m < M_TILE; m += WARPS) {
    const int t = t0 + m;
    if (t >= T) break;
    const float* lt = logits + size_t(t) * (E + 1);
    const int e = q35k::route_token<E, TOPK>(lt, __ldcg(lt + E), t, ids, weights, shared_gate);
    if (warp_plan && lane < TOPK) routed[m * TOPK + lane] = e;  // t0 = 0, m < T: m * TOPK + lane < 32
  }
  if (warp_plan) {
    // Token m was routed by warp m % WARPS: all by warp 0 when T == 1 (or one warp per block).
    if (T == 1 || WARPS == 1) __syncwarp();
    else __syncthreads();
    if (warp == 0) q35k::moe_build_plan_warp<E>(lane < T * TOPK ? routed[lane] : 0, T * TOPK, lane, plan);
    return;
  }

  // Every token routed (this tile's by this block; the others' before their ticket) -> the plan.
  __threadfence();
  __syncthreads();
  if (gridDim.y > 1) {
    if (threadIdx.x == 0) is_last = atomicAdd(plan_ticket, 1) == int(gridDim.y) - 1;
    __syncthreads();
    if (!is_last) return;
    if (threadIdx.x == 0) *plan_ticket = 0;
    __threadfence();
  }
  q35k::moe_build_plan<E, TOPK, WARPS * 32>(ids, T, plan);
}

// Test-only (tests/gpu/test_gpu_moe.cpp): both plan builders on the same ids [T, TOPK], T * TOPK <= 32
// (any values in [0, E), a token's distinct): plan_block by moe_build_plan, plan_warp by
// moe_build_plan_warp. Grid (1); block 64.
template <int E, int TOPK>
__global__ void __launch_bounds__(64)
moe_plan_check(const int* __restrict__ ids, int T, int* __restrict__ plan_block, int* __restrict__ plan_warp) {
  q35k::moe_build_plan<E, TOPK, 64>(ids, T, plan_block);
  const int P = T * TOPK, lane = threadIdx.x % 32;
  if (threadIdx.x < 32) q35k::moe_build_plan_warp<E>(lane < P ? ids[lane] : 0, P, lane, plan_warp);
}

// ---- router top-k after a GEMM (prefill): logits [T, E] fp32 from gemm_bf16 / gemm_wgmma (x . w_router^T) ----
// One warp per token: the shared gate's logit x_t . w_sg (16-byte loads over H), then route_token.
// Grid ceil(T / WARPS); block WARPS * 32.
template <int H, int E, int TOPK, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
moe_router_topk(const q35k::bf16* __restrict__ x, const q35k::bf16* __restrict__ w_sg, const float* __restrict__ logits,
                int* __restrict__ ids, float* __restrict__ weights, float* __restrict__ shared_gate, int T) {
  static_assert(H % 8 == 0, "moe_router_topk: H must be a multiple of 8");
  static_assert(TOPK >= 1 && TOPK <= E && TOPK <= 32, "moe_router_topk: TOPK must be in [1, min(E, 32)]");
  const int lane = threadIdx.x % 32, t = blockIdx.x * WARPS + threadIdx.x / 32;
  if (t >= T) return;
  float sg = 0.f;
  for (int c = lane; c < H / 8; c += 32) {
    float a[8], b[8];
    q35k::unpack8(q35k::ld_global_16(x + size_t(t) * H + c * 8), a);
    q35k::unpack8(q35k::ld_global_16(w_sg + c * 8), b);
#pragma unroll
    for (int i = 0; i < 8; ++i) sg += a[i] * b[i];
  }
  sg = q35k::warp_sum(sg);
  q35k::route_token<E, TOPK>(logits + size_t(t) * E, sg, t, ids, weights, shared_gate);
}

// ---- decode: gate|up, each touched expert once for all its tokens ----
// x [T, H] bf16; plan (moe_build_plan); gate_up [E, 2I, H] (rows gate 0..I-1, up I..2I-1);
// shared_gate_up [2IS, H] (rows gate | up); h [T, TOPK*I + IS] bf16 (slot s at s*I, shared at TOPK*I):
//   h[t, s*I + i] = bf16(silu(gate_e . x_t) * (up_e . x_t)), e = ids[t, s]; the shared expert likewise.
// Grid: (max(I, IS) / 8, 1 + min(E, T * TOPK)); block KSPLIT * 32; dynamic shared memory
// KSPLIT * T * 16 * 4 bytes. Block (j, u) owns h values 8j .. 8j + 7 of expert u (u = 0: the shared
// expert, which every token uses; u >= 1: the plan's routed expert u - 1; blocks past the plan's
// count exit): the 16 weight rows gate 8j.. | up 8j.. as one mma tile, read once, times the expert's
// tokens in column tiles of TOKENS. Warp w takes k in [w, w + 1) * H / KSPLIT; the block sums the
// KSPLIT parts in warp order. A token's h values do not depend on which other tokens the call has.
// Latency at T = 1 (576 blocks of 128 threads at the 35B shapes, one wave at any register count up to
// 6 blocks per SM): the plan's count and the block's entries are read in one round trip (ld_now_s32),
// and at T = 1 the token is 0 without the pair list, so the x loads wait on griddepcontrol.wait only.
// Registers (ptxas, sm_90a, 35B W4A16 g128 ksplit 4): 75; 32 of them hold the warp's 16 rows x KLEN
// (every weight load in flight before the first mma: the old per-token kernel's 46 came from ptxas
// issuing them one 128-k step at a time).
template <int GROUP, int H, int I, int IS, int E, int TOPK, int KSPLIT>
__global__ void __launch_bounds__(KSPLIT * 32)
moe_decode_gate_up(const q35k::bf16* __restrict__ x, const int* __restrict__ plan,
                   const void* __restrict__ gate_up_w, const void* __restrict__ gate_up_s,
                   const void* __restrict__ shared_w, const void* __restrict__ shared_s,
                   q35k::bf16* __restrict__ h, int T) {
  static_assert(I % 8 == 0 && IS % 8 == 0, "moe_decode_gate_up: I and IS must be multiples of 8");
  static_assert(H % (32 * KSPLIT) == 0, "moe_decode_gate_up: H must be a multiple of 32 * KSPLIT");
  using F = q35k::WeightFormat<GROUP>;
  using Rows = q35k::WarpRows16<GROUP, H, H / KSPLIT>;
  constexpr int HW = TOPK * I + IS;  // h values per token
  constexpr int KLEN = H / KSPLIT;
  extern __shared__ float part[];  // [KSPLIT][tokens][16]: each warp's sums, gate rows 0..7, up 8..15
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
  const int j0 = blockIdx.x * 8;
  const bool shared = blockIdx.y == 0;
  const int n_inter = shared ? IS : I;
  if (j0 >= n_inter) return;
  if (shared) {  // its weights are known before the router finished
    constexpr int RB = q35k::row_bytes<GROUP, KLEN>();
    q35k::prefetch_l2_rows16<RB>(shared_w, q35k::row_bytes<GROUP, H>(), j0, IS + j0, warp * RB);
  }
  q35k::moe_pdl_wait();
  q35k::moe_pdl_launch_dependents();

  const int* const pairs = plan + 2 + 2 * E;
  const void* W = shared_w;
  const void* S = shared_s;
  int begin = 0, n = T;  // the expert's pairs [begin, begin + n) (shared: every token)
  if (!shared) {
    // The expert's entries are read together with the count (one round trip, not two: entries past
    // the count are stale, in bounds, and unused: u < min(E, T * TOPK)).
    const int u = int(blockIdx.y) - 1;
    const int U = q35k::ld_now_s32(plan), e = q35k::ld_now_s32(plan + 1 + u);
    begin = q35k::ld_now_s32(plan + 1 + E + u);
    const int end = q35k::ld_now_s32(plan + 2 + E + u);
    if (u >= U) return;
    n = end - begin;
    W = F::template matrix<2 * I, H>(gate_up_w, e);
    S = F::template scales<2 * I, H>(gate_up_s, e);
  }
  float* const mine = part + size_t(warp) * n * 16;
  for (int c0 = 0; c0 < n; c0 += Rows::TOKENS) {
    // The weights are loaded per column tile (from L2 after the first), so that their registers free
    // up as the steps consume them: the usual one tile (at most TOKENS tokens) reads them once.
    Rows rows;
    rows.load(W, S, j0 + g, n_inter + j0 + g, warp * KLEN);
    const int i = c0 + g / Rows::GPS;  // this lane's column's token (position in the expert's list)
    // (T == 1: token 0, without waiting for the pair list.)
    const int t = i < n ? (shared || T == 1 ? i : pairs[begin + i] / TOPK) : 0;
    rows.dot(i < n ? x + size_t(t) * H : nullptr, [&](int tok, int r, float v) {
      if (c0 + tok < n) mine[(c0 + tok) * 16 + r] = v;
    });
  }
  __syncthreads();
  for (int o = threadIdx.x; o < n * 8; o += KSPLIT * 32) {
    const int i = o / 8, r = o % 8;
    float gs = 0.f, us = 0.f;
#pragma unroll
    for (int w = 0; w < KSPLIT; ++w) gs += part[(size_t(w) * n + i) * 16 + r], us += part[(size_t(w) * n + i) * 16 + 8 + r];
    const int pair = shared ? 0 : pairs[begin + i];
    const int t = shared ? i : pair / TOPK, col = shared ? TOPK * I : pair % TOPK * I;
    h[size_t(t) * HW + col + j0 + r] = q35k::f32_to_bf16(q35k::silu(gs) * us);
  }
}

// ---- decode: down, each touched expert once for all its tokens; weighted sum, one write ----
// h [T, TOPK*I + IS] bf16; plan; weights [T, TOPK] fp32; shared_gate [T] fp32; down [E, H, I];
// shared_down [H, IS]; out [T, H] bf16:
//   out[t] = bf16( shared_gate[t] * down_sh . h[t, sh] + sum_s weights[t, s] * down_{ids[t,s]} . h[t, s] )
// summed in that order (the shared expert, then the slots in order) over fp32 per-(token, slot) sums.
// Grid: (H / 16); block (TOPK + 1) * KSPLIT * 32; dynamic shared memory moe_down_smem_bytes. A block
// owns 16 output rows (one mma tile) for every token: warp group q = w / KSPLIT takes experts
// u = q, q + TOPK + 1, ... (u = 0: the shared expert, u >= 1: the plan's routed expert u - 1), its
// KSPLIT warps one part of I each, with that expert's tokens in column tiles; per tile the group sums
// its KSPLIT parts in warp order (named barrier 1 + q) into the block's per-(token, slot) sums. The
// next expert's rows are pulled into L2 while a group computes. The block then combines each token.
// The plan's count and each group's first expert's entries are read in one round trip (ld_now_s32).
// Registers (ptxas, sm_90a, 35B W4A16 g128 ksplit 2): 91 (85 without that early read); one block of
// 288 threads per SM either way (H / 16 = 128 blocks).
namespace q35k {

// Dynamic shared memory of moe_decode_down for T tokens: the per-(token, slot) sums [T][TOPK + 1][16]
// and the groups' parts [TOPK + 1][KSPLIT][8][16], fp32.
__host__ __device__ constexpr int moe_down_smem_bytes(int T, int TOPK, int KSPLIT) {
  return (T * (TOPK + 1) * 16 + (TOPK + 1) * KSPLIT * 8 * 16) * 4;
}

__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// The block's 16 outputs of every token; store(t, n, v) receives each (fp32 sum).
template <int GROUP, int H, int I, int IS, int E, int TOPK, int KSPLIT, typename Store>
__device__ __forceinline__ void moe_decode_down_block(const bf16* __restrict__ h, const int* __restrict__ plan,
                                                      const float* __restrict__ weights,
                                                      const float* __restrict__ shared_gate,
                                                      const void* __restrict__ down_w, const void* __restrict__ down_s,
                                                      const void* __restrict__ shared_w,
                                                      const void* __restrict__ shared_s, int T, Store&& store) {
  static_assert(H % 16 == 0, "moe_decode_down: H must be a multiple of 16");
  static_assert(I % (32 * KSPLIT) == 0 && IS % (32 * KSPLIT) == 0,
                "moe_decode_down: I and IS must be multiples of 32 * KSPLIT");
  static_assert(KSPLIT == 1 || TOPK + 1 <= 15, "moe_decode_down: one named barrier per expert group (at most 15)");
  using F = q35k::WeightFormat<GROUP>;
  using Routed = q35k::WarpRows16<GROUP, I, I / KSPLIT>;
  using Shared = q35k::WarpRows16<GROUP, IS, IS / KSPLIT>;
  static_assert(Routed::TOKENS == Shared::TOKENS, "one column tile size");
  constexpr int TOKENS = Routed::TOKENS, GPS = Routed::GPS;
  constexpr int HW = TOPK * I + IS;
  constexpr int GROUPS = TOPK + 1;
  extern __shared__ float smem[];
  float* const sums = smem;                               // [T][TOPK + 1][16]
  float* const parts = smem + size_t(T) * GROUPS * 16;  // [GROUPS][KSPLIT][8][16]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
  const int q = warp / KSPLIT, kp = warp % KSPLIT;
  const int n0 = blockIdx.x * 16;
  const int* const pairs = plan + 2 + 2 * E;

  if (q == 0) {  // the shared expert's weights are known before gate_up finished
    constexpr int RB = q35k::row_bytes<GROUP, IS / KSPLIT>();
    q35k::prefetch_l2_rows16<RB>(shared_w, q35k::row_bytes<GROUP, IS>(), n0, n0 + 8, kp * RB);
  }
  q35k::moe_pdl_wait();
  q35k::moe_pdl_launch_dependents();

  // The count and the group's first expert's entries in one round trip (q <= TOPK: in bounds; unused
  // when q is past the count, or for the shared expert).
  const int experts = 1 + q35k::ld_now_s32(plan);
  const int first_e = q35k::ld_now_s32(plan + q), first_begin = q35k::ld_now_s32(plan + E + q),
            first_end = q35k::ld_now_s32(plan + E + q + 1);
  float* const mine = parts + (size_t(q) * KSPLIT + kp) * 8 * 16;
  for (int u = q; u < experts; u += GROUPS) {
    const bool sh = u == 0, first = u == q;
    const int begin = sh ? 0 : first ? first_begin : plan[E + u];
    const int n = sh ? T : (first ? first_end : plan[E + u + 1]) - begin;
    // The sum of token (list position) i goes to sums[t][slot] (the shared expert: slot TOPK).
    auto sum_at = [&](int i) {
      const int pair = sh ? 0 : pairs[begin + i];
      return sh ? size_t(i) * GROUPS + TOPK : size_t(pair / TOPK) * GROUPS + pair % TOPK;
    };
    auto h_at = [&](int i) {
      const int pair = sh ? 0 : pairs[begin + i];
      return sh ? h + size_t(i) * HW + TOPK * I : h + size_t(pair / TOPK) * HW + size_t(pair % TOPK) * I;
    };
    if (u + GROUPS < experts) {  // the group's next expert into L2
      constexpr int RB = q35k::row_bytes<GROUP, I / KSPLIT>();
      const void* next = F::template matrix<H, I>(down_w, plan[u + GROUPS]);
      q35k::prefetch_l2_rows16<RB>(next, q35k::row_bytes<GROUP, I>(), n0, n0 + 8, kp * RB);
    }
    // Per column tile: the weights (from L2 after the first tile, so their registers free up as the
    // steps consume them), then the tokens.
    auto tiles = [&](auto rows, const void* W, const void* S, int k0) {
      for (int c0 = 0; c0 < n; c0 += TOKENS) {
        rows.load(W, S, n0 + g, n0 + 8 + g, k0);
        const int i = c0 + g / GPS;
        if constexpr (KSPLIT == 1) {
          rows.dot(i < n ? h_at(i) : nullptr, [&](int tok, int r, float v) {
            if (c0 + tok < n) sums[sum_at(c0 + tok) * 16 + r] = v;
          });
        } else {
          rows.dot(i < n ? h_at(i) : nullptr, [&](int tok, int r, float v) { mine[tok * 16 + r] = v; });
          q35k::named_barrier(1 + q, KSPLIT * 32);
          for (int o = kp * 32 + lane; o < TOKENS * 16; o += KSPLIT * 32) {
            const int tok = o / 16, r = o % 16;
            if (c0 + tok >= n) continue;
            float v = 0.f;
#pragma unroll
            for (int k = 0; k < KSPLIT; ++k) v += parts[((size_t(q) * KSPLIT + k) * 8 + tok) * 16 + r];
            sums[sum_at(c0 + tok) * 16 + r] = v;
          }
          q35k::named_barrier(1 + q, KSPLIT * 32);
        }
      }
    };
    if constexpr (I == IS) {  // one row shape: one inlined copy of the tiles, the pointers selected
      const int e = sh ? 0 : first ? first_e : plan[u];
      tiles(Routed{}, sh ? shared_w : F::template matrix<H, I>(down_w, e),
            sh ? shared_s : F::template scales<H, I>(down_s, e), kp * (I / KSPLIT));
    } else if (sh) {
      tiles(Shared{}, shared_w, shared_s, kp * (IS / KSPLIT));
    } else {
      const int e = first ? first_e : plan[u];
      tiles(Routed{}, F::template matrix<H, I>(down_w, e), F::template scales<H, I>(down_s, e), kp * (I / KSPLIT));
    }
  }
  __syncthreads();
  for (int o = threadIdx.x; o < T * 16; o += GROUPS * KSPLIT * 32) {
    const int t = o / 16, r = o % 16;
    const float* st = sums + size_t(t) * GROUPS * 16 + r;
    float acc = shared_gate[t] * st[TOPK * 16];
#pragma unroll
    for (int s = 0; s < TOPK; ++s) acc += weights[size_t(t) * TOPK + s] * st[s * 16];
    store(t, n0 + r, acc);
  }
}

}  // namespace q35k

template <int GROUP, int H, int I, int IS, int E, int TOPK, int KSPLIT>
__global__ void __launch_bounds__((TOPK + 1) * KSPLIT * 32, 1)
moe_decode_down(const q35k::bf16* __restrict__ h, const int* __restrict__ plan, const float* __restrict__ weights,
                const float* __restrict__ shared_gate, const void* __restrict__ down_w,
                const void* __restrict__ down_s, const void* __restrict__ shared_w,
                const void* __restrict__ shared_s, q35k::bf16* __restrict__ out, int T) {
  q35k::moe_decode_down_block<GROUP, H, I, IS, E, TOPK, KSPLIT>(
      h, plan, weights, shared_gate, down_w, down_s, shared_w, shared_s, T,
      [&](int t, int n, float v) { out[size_t(t) * H + n] = q35k::f32_to_bf16(v); });
}

// moe_decode_down with the residual epilogue of decode_fusion.cuh: residual fp32 [T, H] += bf16(out),
// then the last block writes normed [T, H] bf16 = RMSNorm(residual) with norm_w [H] bf16 (the next
// layer's input norm, or the final norm); counter int32 [1], zero between launches.
template <int GROUP, int H, int I, int IS, int E, int TOPK, int KSPLIT>
__global__ void __launch_bounds__((TOPK + 1) * KSPLIT * 32, 1)
moe_decode_down_residual(const q35k::bf16* __restrict__ h, const int* __restrict__ plan,
                         const float* __restrict__ weights, const float* __restrict__ shared_gate,
                         const void* __restrict__ down_w, const void* __restrict__ down_s,
                         const void* __restrict__ shared_w, const void* __restrict__ shared_s, float* residual,
                         const q35k::bf16* __restrict__ norm_w, q35k::bf16* __restrict__ normed, int* counter,
                         float eps, int T) {
  q35k::moe_decode_down_block<GROUP, H, I, IS, E, TOPK, KSPLIT>(
      h, plan, weights, shared_gate, down_w, down_s, shared_w, shared_s, T,
      [&](int t, int n, float v) { q35k::residual_add_bf16(residual, size_t(t) * H + n, v); });
  q35k::residual_rmsnorm_last_block<H, (TOPK + 1) * KSPLIT * 32>(residual, norm_w, normed, counter, eps, T);
}

// ---- grouped path, streaming form: the decode GEMVs' arithmetic on persistent warps ----
// moe_decode_gate_up / moe_decode_down give each 16-row weight tile to a block of KSPLIT warps (one per
// part of K) that reads its tile once and exits: at tens of tokens most of a block's life is spent
// waiting on the plan, the token rows and the cross-warp sum, not streaming weights. The streaming
// kernels compute the same sums bit for bit with one warp per tile: the warp runs the tile's KSPLIT
// parts in order (each the WarpRows16 the decode kernel's warp kp would hold, KLEN = K / KSPLIT) and
// adds them as the decode kernel's block does (0 + p0 + p1 + ...), while the next part's weights, or
// the first part of the warp's next unit of work, are already in flight (two register buffers). A
// unit is (tile, column tile of TOKENS tokens); warp w of the grid takes tiles w, w + the grid's
// warps, ... over every touched expert (numbered expert by expert, so a block's warps share the
// expert's token rows in L1); a tile with more tokens than one column tile runs one unit per column
// tile (its weights again, from L2). Any grid size works (the runner fills the SMs once); no shared
// memory, so the number of tokens is bounded only by the plan.
namespace q35k {

// This lane's share of a WarpRows16 column tile's sums, in the order dot() stores them: slot si of
// value (tok, r) is si + 2 (r >= 8) with si = tok & 1 when GPS = 1 (tokens 2c, 2c + 1, rows g, g + 8)
// and si = 0 otherwise (GPS 2: token c; GPS 4: token c / 2 in the even lanes): a lane's slots are
// fixed, so the sums stay in registers. lane_token(si, c, tok): slot si's token, if this lane has one.
// Registers a WarpRows16 holds its 16 rows' part of K in (lo and hi).
template <typename Rows>
__host__ __device__ constexpr int rows_registers() {
  return int(2 * Rows::STEPS * sizeof(typename Rows::Vec) / 4);
}

template <int GPS>
__device__ __forceinline__ bool lane_token(int si, int c, int& tok) {
  if constexpr (GPS == 1) {
    tok = 2 * c + si;
    return true;
  } else if constexpr (GPS == 2) {
    tok = c;
    return si == 0;
  } else {
    tok = c / 2;
    return si == 0 && c % 2 == 0;
  }
}

template <int GPS>
__device__ __forceinline__ void add_slot(float (&acc)[4], int tok, int r, float v) {
  if (GPS == 1 && (tok & 1)) {
    if (r >= 8) acc[3] += v;
    else acc[1] += v;
  } else {
    if (r >= 8) acc[2] += v;
    else acc[0] += v;
  }
}

// The part loop of a streaming kernel's warp: a unit (16-row tile x one column tile) is its KSPLIT
// parts in order, each the WarpRows16 of the decode kernel's warp kp, its dot over the unit's column
// (xg) added into acc (add_slot: 0 + p0 + p1 + ..., the decode kernels' order). PIPE (a part's rows
// take at most 32 registers: INT4 parts of 512; FP8's take 64, bf16's 128): two buffers, part p + 1
// (after the last part, with `more`, the next unit's part 0) in flight during part p's mmas; else
// each part is loaded before its mmas, one part's registers live at a time. load(rows, next, part)
// loads part `part` of the current unit (next false) or of the next one (next true).
template <typename Rows, int KSPLIT, int GPS>
struct StreamParts {
  static constexpr bool PIPE = rows_registers<Rows>() <= 32;
  Rows buf[PIPE ? 2 : 1];

  // The warp's first unit's part 0 (PIPE: loaded ahead; else unit() loads it).
  template <typename Load>
  __device__ __forceinline__ void first(Load&& load) {
    if constexpr (PIPE) load(buf[0], false, 0);
  }
  template <typename Load>
  __device__ __forceinline__ void unit(const bf16* xg, bool more, Load&& load, float (&acc)[4]) {
    if constexpr (PIPE) {
#pragma unroll
      for (int p = 0; p < KSPLIT; ++p) {
        if (p + 1 < KSPLIT)
          load(buf[(p + 1) % 2], false, p + 1);
        else if (more)
          load(buf[(p + 1) % 2], true, 0);
        buf[p % 2].dot(xg, [&](int t, int r, float v) { add_slot<GPS>(acc, t, r, v); });
      }
      if constexpr (KSPLIT % 2 == 1)  // the next unit's part 0 landed in buf[1]
        if (more) buf[0] = buf[1];
    } else {
#pragma unroll 1
      for (int p = 0; p < KSPLIT; ++p) {
        load(buf[0], false, p);
        buf[0].dot(xg, [&](int t, int r, float v) { add_slot<GPS>(acc, t, r, v); });
      }
    }
  }
};

}  // namespace q35k

// gate|up, streaming: the h of moe_decode_gate_up<GROUP, H, I, IS, E, TOPK, KSPLIT> (same arguments;
// T any number of tokens the plan holds). Tiles: the shared expert's IS / 8 per column tile of its T
// tokens, then per routed expert of the plan I / 8 (tile j: gate rows 8j.. | up rows 8j..). Grid: any; block WARPS * 32; registers
// as ptxas likes them (__launch_bounds__ min 1 block: ~230 at the 35B g128 shapes, the loads of two
// parts and their token rows hoisted; a cap of 128 or 168 spills).
template <int GROUP, int H, int I, int IS, int E, int TOPK, int KSPLIT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 1)
moe_stream_gate_up(const q35k::bf16* __restrict__ x, const int* __restrict__ plan,
                   const void* __restrict__ gate_up_w, const void* __restrict__ gate_up_s,
                   const void* __restrict__ shared_w, const void* __restrict__ shared_s,
                   q35k::bf16* __restrict__ h, int T) {
  static_assert(I % 8 == 0 && IS % 8 == 0, "moe_stream_gate_up: I and IS must be multiples of 8");
  static_assert(H % (32 * KSPLIT) == 0, "moe_stream_gate_up: H must be a multiple of 32 * KSPLIT");
  using F = q35k::WeightFormat<GROUP>;
  constexpr int KLEN = H / KSPLIT;
  using Rows = q35k::WarpRows16<GROUP, H, KLEN>;
  constexpr int TOKENS = Rows::TOKENS, GPS = Rows::GPS;
  constexpr int HW = TOPK * I + IS, JS = IS / 8, JR = I / 8;
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  q35k::moe_pdl_wait();
  q35k::moe_pdl_launch_dependents();
  const int* const pairs = plan + 2 + 2 * E;
  // The shared expert's tiles, one per (column tile c, row tile j) (every token uses it: its column
  // tiles run in parallel, c-major so that a block's warps share the token rows), then the routed
  // experts' (u, j), each with its few tokens.
  const int CTS = (T + TOKENS - 1) / TOKENS, shared_tiles = JS * CTS;
  const int tiles = shared_tiles + q35k::ld_now_s32(plan) * JR;
  const int stride = int(gridDim.x) * WARPS;
  int tk = int(blockIdx.x) * WARPS + int(threadIdx.x / 32);
  if (tk >= tiles) return;

  struct Tile {
    const void* W;
    const void* S;
    int j0, n_inter, begin, n, c_begin, c_end;  // units: column tiles c_begin, c_begin + TOKENS, .. < c_end
    bool sh;
  };
  auto tile_at = [&](int k) {
    if (k < shared_tiles) {
      const int c0 = k / JS * TOKENS;
      return Tile{shared_w, shared_s, 8 * (k % JS), IS, 0, T, c0, min(T, c0 + TOKENS), true};
    }
    const int u = (k - shared_tiles) / JR, e = plan[1 + u], begin = plan[1 + E + u], n = plan[2 + E + u] - begin;
    return Tile{F::template matrix<2 * I, H>(gate_up_w, e), F::template scales<2 * I, H>(gate_up_s, e),
                8 * ((k - shared_tiles) % JR), I, begin, n, 0, n, false};
  };
  // The token of this lane's column in unit (tile t, column tile c0) (-1 past the tile's tokens).
  auto token_of = [&](const Tile& t, int c0) {
    const int i = c0 + g / GPS;
    return i < t.n ? (t.sh || T == 1 ? i : pairs[t.begin + i] / TOPK) : -1;
  };
  Tile cur = tile_at(tk);
  int c0 = cur.c_begin, tok = token_of(cur, c0);
  q35k::StreamParts<Rows, KSPLIT, GPS> parts;
  parts.first([&](Rows& r, bool, int) { r.load(cur.W, cur.S, cur.j0 + g, cur.n_inter + cur.j0 + g, 0); });
  while (true) {
    // The next unit: the tile's next column tile, or the warp's next tile.
    int nk = tk, nc0 = c0 + TOKENS;
    Tile nxt = cur;
    if (nc0 >= cur.c_end) {
      nk = tk + stride;
      if (nk < tiles) nxt = tile_at(nk), nc0 = nxt.c_begin;
    }
    const bool more = nk < tiles;
    const int ntok = more ? token_of(nxt, nc0) : -1;
    float sum[4] = {0.f, 0.f, 0.f, 0.f};  // gate (tok & 1), up 2 + (tok & 1)
    const q35k::bf16* xg = tok >= 0 ? x + size_t(tok) * H : nullptr;
    parts.unit(xg, more, [&](Rows& r, bool next, int p) {
      const Tile& t = next ? nxt : cur;
      r.load(t.W, t.S, t.j0 + g, t.n_inter + t.j0 + g, p * KLEN);
    }, sum);
#pragma unroll
    for (int si = 0; si < 2; ++si) {
      int t;
      if (!q35k::lane_token<GPS>(si, c, t) || c0 + t >= cur.n) continue;
      const int i = c0 + t;
      const bool sh = cur.sh;
      const int pair = sh ? 0 : pairs[cur.begin + i];
      const int row = sh ? i : pair / TOPK, col = sh ? TOPK * I : pair % TOPK * I;
      h[size_t(row) * HW + col + cur.j0 + g] = q35k::f32_to_bf16(q35k::silu(sum[si]) * sum[2 + si]);
    }
    if (!more) break;
    tk = nk, c0 = nc0, cur = nxt, tok = ntok;
  }
}

// down, streaming: the per-(token, slot) sums of moe_decode_down<GROUP, H, I, IS, E, TOPK, KSPLIT>
// into sums [T, TOPK + 1, H] fp32 (slot TOPK: the shared expert; each entry written once), combined
// by moe_stream_combine. Tiles: the shared expert's H / 16 output row tiles per column tile of its T
// tokens, then per routed expert of the plan H / 16 row tiles. Grid: any; block WARPS * 32.
template <int GROUP, int H, int I, int IS, int E, int TOPK, int KSPLIT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 1)
moe_stream_down(const q35k::bf16* __restrict__ h, const int* __restrict__ plan, const void* __restrict__ down_w,
                const void* __restrict__ down_s, const void* __restrict__ shared_w,
                const void* __restrict__ shared_s, float* __restrict__ sums, int T) {
  static_assert(H % 16 == 0, "moe_stream_down: H must be a multiple of 16");
  static_assert(I % (32 * KSPLIT) == 0 && IS % (32 * KSPLIT) == 0,
                "moe_stream_down: I and IS must be multiples of 32 * KSPLIT");
  using F = q35k::WeightFormat<GROUP>;
  using Routed = q35k::WarpRows16<GROUP, I, I / KSPLIT>;
  using Shared = q35k::WarpRows16<GROUP, IS, IS / KSPLIT>;
  static_assert(Routed::TOKENS == Shared::TOKENS, "one column tile size");
  constexpr int TOKENS = Routed::TOKENS, GPS = Routed::GPS;
  constexpr int HW = TOPK * I + IS, NT = H / 16, GROUPS = TOPK + 1;
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  q35k::moe_pdl_wait();
  q35k::moe_pdl_launch_dependents();
  const int* const pairs = plan + 2 + 2 * E;
  // The shared expert's tiles, one per (column tile, row tile) (c-major: a block's warps share the
  // token rows), then per routed expert its NT row tiles with all its tokens.
  const int CTS = (T + TOKENS - 1) / TOKENS, shared_tiles = NT * CTS;
  const int tiles = shared_tiles + q35k::ld_now_s32(plan) * NT;
  const int stride = int(gridDim.x) * WARPS;
  int tk = int(blockIdx.x) * WARPS + int(threadIdx.x / 32);
  if (tk >= tiles) return;

  struct Tile {
    const void* W;
    const void* S;
    int n0, begin, n, c_begin, c_end;  // units: column tiles c_begin, c_begin + TOKENS, .. < c_end
    bool sh;
  };
  auto tile_at = [&](int k) {
    if (k < shared_tiles) {
      const int c0 = k / NT * TOKENS;
      return Tile{shared_w, shared_s, 16 * (k % NT), 0, T, c0, min(T, c0 + TOKENS), true};
    }
    const int u = 1 + (k - shared_tiles) / NT, e = plan[u], begin = plan[E + u], n = plan[E + u + 1] - begin;
    return Tile{F::template matrix<H, I>(down_w, e), F::template scales<H, I>(down_s, e),
                16 * ((k - shared_tiles) % NT), begin, n, 0, n, false};
  };
  // Column (token, slot) of list position i of a tile as t * (TOPK + 1) + slot (the shared expert:
  // slot TOPK), the index of its row of sums.
  auto column_of = [&](const Tile& t, int i) {
    if (t.sh) return i * GROUPS + TOPK;
    const int pair = pairs[t.begin + i];
    return pair / TOPK * GROUPS + pair % TOPK;
  };
  // This lane's column in unit (tile, c0), -1 past the tile's tokens.
  auto column_at = [&](const Tile& t, int c0) {
    const int i = c0 + g / GPS;
    return i < t.n ? column_of(t, i) : -1;
  };
  auto h_row = [&](int ts) {  // the h values column ts's expert reads
    const int t = ts / GROUPS, slot = ts % GROUPS;
    return h + size_t(t) * HW + size_t(slot) * I;  // slot TOPK: the shared expert's values at TOPK * I
  };
  // Units of one row shape (Rows: Routed or Shared): the tile's column tiles, then, while the next
  // tile has the same shape, the next tile's (its first part loaded during the current unit's last).
  Tile cur = tile_at(tk);
  int c0 = cur.c_begin, col = column_at(cur, c0);
  auto run = [&](auto rows_type) {
    using Rows = decltype(rows_type);
    constexpr int KLEN = Rows::PART;
    q35k::StreamParts<Rows, KSPLIT, GPS> parts;
    parts.first([&](Rows& r, bool, int) { r.load(cur.W, cur.S, cur.n0 + g, cur.n0 + 8 + g, 0); });
    while (true) {
      int nk = tk, nc0 = c0 + TOKENS;
      Tile nxt = cur;
      if (nc0 >= cur.c_end) {
        nk = tk + stride;
        if (nk < tiles) nxt = tile_at(nk), nc0 = nxt.c_begin;
      }
      // Continue in this loop while the next unit has this row shape (always when I == IS).
      const bool more = nk < tiles && (I == IS || nxt.sh == cur.sh);
      const int ncol = nk < tiles ? column_at(nxt, nc0) : -1;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};  // (tok & 1) + 2 (r >= 8)
      const q35k::bf16* hg = col >= 0 ? h_row(col) : nullptr;
      parts.unit(hg, more, [&](Rows& r, bool next, int p) {
        const Tile& t = next ? nxt : cur;
        r.load(t.W, t.S, t.n0 + g, t.n0 + 8 + g, p * KLEN);
      }, acc);
#pragma unroll
      for (int si = 0; si < 2; ++si) {
        int t;
        if (!q35k::lane_token<GPS>(si, c, t) || c0 + t >= cur.n) continue;
        float* const dst = sums + size_t(column_of(cur, c0 + t)) * H + cur.n0;
        dst[g] = acc[si];
        dst[g + 8] = acc[2 + si];
      }
      const bool next_exists = nk < tiles;
      tk = nk, c0 = nc0, cur = nxt, col = ncol;
      if (!more) return next_exists;
    }
  };
  while (true) {
    const bool go_on = cur.sh ? run(Shared{}) : run(Routed{});
    if (!go_on) break;
  }
}

// sums [T, TOPK + 1, H] fp32 (moe_stream_down), weights [T, TOPK] fp32, shared_gate [T] fp32 -> out [T, H]
// bf16: out[t, n] = bf16(shared_gate[t] * sums[t, TOPK, n] + sum_s weights[t, s] * sums[t, s, n]), in
// moe_decode_down's order (its block's combination, bit for bit). Grid (T, ceil(H / THREADS)); block
// THREADS.
template <int H, int TOPK, int THREADS>
__global__ void __launch_bounds__(THREADS)
moe_stream_combine(const float* __restrict__ sums, const float* __restrict__ weights,
                   const float* __restrict__ shared_gate, q35k::bf16* __restrict__ out) {
  q35k::moe_pdl_wait();
  q35k::moe_pdl_launch_dependents();
  const int t = blockIdx.x, n = blockIdx.y * THREADS + threadIdx.x;
  if (n >= H) return;
  const float* st = sums + size_t(t) * (TOPK + 1) * H + n;
  float acc = shared_gate[t] * st[size_t(TOPK) * H];
#pragma unroll
  for (int s = 0; s < TOPK; ++s) acc += weights[size_t(t) * TOPK + s] * st[size_t(s) * H];
  out[size_t(t) * H + n] = q35k::f32_to_bf16(acc);
}

// ---- prefill: sort the (token, slot) pairs by expert into BLOCK_M-row blocks ----
// ids [T, TOPK] int32 (values in [0, E)). Writes, for num_blocks[0] = sum_e ceil(count_e / BLOCK_M):
//   sorted_ids [num_blocks * BLOCK_M] int32: pair index t*TOPK + s, grouped by expert in increasing
//              expert order (order within an expert unspecified), -1 in each expert's padding;
//   block_expert [num_blocks] int32: the expert of each block.
// Entries past num_blocks are left as they were; the GEMMs read num_blocks from device memory.
// Grid: (1); block THREADS. Counts with shared-memory atomics, a one-warp scan, then the scatter.
template <int E, int TOPK, int BLOCK_M, int THREADS>
__global__ void __launch_bounds__(THREADS)
moe_align(const int* __restrict__ ids, int* __restrict__ sorted_ids, int* __restrict__ block_expert,
          int* __restrict__ num_blocks, int T) {
  constexpr int EPL = (E + 31) / 32;  // experts per lane in the scan
  __shared__ int count[E], cursor[E];
  __shared__ int total;
  const int tid = threadIdx.x;
  for (int e = tid; e < E; e += THREADS) count[e] = 0;
  __syncthreads();
  const int pairs = T * TOPK;
  for (int i = tid; i < pairs; i += THREADS) atomicAdd(&count[ids[i]], 1);
  __syncthreads();
  if (tid < 32) {
    int own = 0;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = tid * EPL + i;
      if (e < E) own += (count[e] + BLOCK_M - 1) / BLOCK_M * BLOCK_M;
    }
    int incl = own;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, off);
      if (tid >= off) incl += v;
    }
    int offset = incl - own;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = tid * EPL + i;
      if (e < E) {
        const int padded = (count[e] + BLOCK_M - 1) / BLOCK_M * BLOCK_M;
        cursor[e] = offset;
        for (int b = offset / BLOCK_M; b < (offset + padded) / BLOCK_M; ++b) block_expert[b] = e;
        offset += padded;
      }
    }
    if (tid == 31) {
      total = incl;
      *num_blocks = incl / BLOCK_M;
    }
  }
  __syncthreads();
  for (int i = tid; i < total; i += THREADS) sorted_ids[i] = -1;
  __syncthreads();
  for (int i = tid; i < pairs; i += THREADS) sorted_ids[atomicAdd(&cursor[ids[i]], 1)] = i;
}

// ---- prefill: out[t] = bf16( sum_s weights[t,s] * y[t*TOPK + s] + shared_gate[t] * ys[t] ) ----
// y [T*TOPK, H] bf16 (per (token, slot) down outputs); weights [T, TOPK] fp32; ys [T, H] bf16 (shared
// expert before its gate); shared_gate [T] fp32; out [T, H] bf16. Grid: (T); block THREADS.
template <int H, int TOPK, int THREADS>
__global__ void __launch_bounds__(THREADS)
moe_combine(const q35k::bf16* __restrict__ y, const float* __restrict__ weights, const q35k::bf16* __restrict__ ys,
            const float* __restrict__ shared_gate, q35k::bf16* __restrict__ out) {
  static_assert(H % 8 == 0, "moe_combine: H must be a multiple of 8");
  const size_t t = blockIdx.x;
  float w[TOPK];
#pragma unroll
  for (int s = 0; s < TOPK; ++s) w[s] = weights[t * TOPK + s];
  const float sg = shared_gate[t];
  for (int c = threadIdx.x * 8; c < H; c += THREADS * 8) {
    float acc[8], v[8];
    q35k::unpack8(q35k::ld_global_16(ys + t * H + c), v);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = sg * v[i];
#pragma unroll
    for (int s = 0; s < TOPK; ++s) {
      q35k::unpack8(q35k::ld_global_16(y + (t * TOPK + s) * H + c), v);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += w[s] * v[i];
    }
    q35k::st_global_16(out + t * H + c, q35k::pack8(acc));
  }
}
