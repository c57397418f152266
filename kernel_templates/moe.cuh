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
// Decode, T <= 8 tokens, 3 launches (router, gate_up, down), chained with programmatic dependent
// launch (PDL, sm_90): each kernel prefetches the weights it knows before griddepcontrol.wait.
//   moe_router          logits [T, E+1] fp32 (row E = shared_expert_gate), then softmax, top-k,
//                       renormalise by the last block to finish -> ids, weights, shared_gate
//   moe_decode_gate_up  h[t, s*I + i] = bf16(silu(gate_e . x_t) * (up_e . x_t)), e = ids[t, s], for
//                       the k routed slots, and h[t, k*I + i] for the shared expert (Is values)
//   moe_decode_down     out[t] = bf16( sum_s w[t,s] * down_e . h[t,s] + shared_gate[t] * down_sh . h[t,k] )
//                       (moe_decode_down_residual: added to the fp32 residual stream instead, and the
//                       next RMSNorm by the last block, decode_fusion.cuh)
// The two decode GEMVs run on tensor cores (mma_rows16_dot): a warp's 16 weight rows are the mma
// A operand straight from the 16-byte loads, x is the B operand, fp32 accumulation.
// Prefill: moe_router, moe_align, 4 x moe_gemm, moe_combine.
#include "common.cuh"
#include "decode_fusion.cuh"
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

// Dot products of 16 rows of a weight matrix W [*, K] (format GROUP, scales S) with x [K] bf16 over
// k in [k0, k0 + KLEN), by one warp on tensor cores. Lane quad g = lane / 4 names rows row_lo (its
// mma row g) and row_hi (mma row g + 8); every lane of the quad returns their sums in lo and hi.
// The reduction order inside an mma is free, so each lane's weight vectors are its A fragments
// as loaded: lane c = lane % 4 supplies k-slots {2c, 2c+1, 2c+8, 2c+9} of every mma from its own
// vectors, and the B operand (x) follows the same k mapping.
//   bf16: a step is 32 k (lane c: 8 k at 8c), 2 mmas; every B column is x, so D column 0 is the sum.
//   W4A16 / FP8: a step is 128 k (lane c: the 32-value run c, in one scale group: 16 bytes of INT4
//         or 32 of FP8 codes, weights.cuh Run32), 8 mmas; B column n holds x only for run n
//         (n < 4), so D[row][n] is run n's unscaled sum, scaled once per step.
// Every weight load of the warp is issued before the first mma (KLEN / 32 runs per lane over both
// rows with K % 128 == 0).
template <int GROUP, int K, int KLEN>
__device__ __forceinline__ void mma_rows16_dot(const void* __restrict__ W, const void* __restrict__ S, int row_lo,
                                               int row_hi, const bf16* __restrict__ x, int k0, float& lo, float& hi) {
  static_assert(KLEN % 32 == 0 && K % KLEN == 0, "mma_rows16_dot: KLEN must be a multiple of 32 dividing K");
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  if constexpr (GROUP == 0) {
    constexpr int STEPS = KLEN / 32;
    const bf16* wl = static_cast<const bf16*>(W) + size_t(row_lo) * K + k0 + 8 * c;
    const bf16* wh = static_cast<const bf16*>(W) + size_t(row_hi) * K + k0 + 8 * c;
    const bf16* xc = x + k0 + 8 * c;
    float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
    for (int st = 0; st < STEPS; ++st) {
      const uint4 a = ld_stream_16(wl + 32 * st), b = ld_stream_16(wh + 32 * st), v = ld_global_16(xc + 32 * st);
      const u32 f0[4] = {a.x, b.x, a.y, b.y}, f1[4] = {a.z, b.z, a.w, b.w};
      mma_bf16_16816(d, f0, v.x, v.y);
      mma_bf16_16816(d, f1, v.z, v.w);
    }
    lo = d[0];
    hi = d[2];
  } else {
    using F = WeightFormat<GROUP>;
    constexpr int STEPS = (KLEN + 127) / 128;
    const unsigned char* wl = static_cast<const unsigned char*>(W) + size_t(row_lo) * F::bytes(K);
    const unsigned char* wh = static_cast<const unsigned char*>(W) + size_t(row_hi) * F::bytes(K);
    Run32<GROUP> ql[STEPS], qh[STEPS];
#pragma unroll
    for (int st = 0; st < STEPS; ++st) {
      const int kc = k0 + st * 128 + 32 * c;  // this lane's run
      ql[st].zero();
      qh[st].zero();
      if (KLEN % 128 == 0 || kc < k0 + KLEN) {
        ql[st].load(wl + F::bytes(kc));
        qh[st].load(wh + F::bytes(kc));
      }
    }
    // D columns of this lane: runs 2c, 2c+1 (zero for c >= 2; their scale index is clamped in range).
    const int n0 = (2 * c) & 3, n1 = (2 * c + 1) & 3;
    const size_t sl = size_t(row_lo) * F::scales_per_row(K), sh = size_t(row_hi) * F::scales_per_row(K);
    float acc_lo = 0.f, acc_hi = 0.f;
#pragma unroll
    for (int st = 0; st < STEPS; ++st) {
      const int kb = k0 + st * 128, kc = kb + 32 * c;
      uint4 xv[4] = {};
      if (g == c && (KLEN % 128 == 0 || kc < k0 + KLEN)) {
#pragma unroll
        for (int w = 0; w < 4; ++w) xv[w] = ld_global_16(x + kc + 8 * w);
      }
      float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        u32 al[4], ah[4];
        ql[st].pairs(w, al);
        qh[st].pairs(w, ah);
        const u32 f0[4] = {al[0], ah[0], al[1], ah[1]}, f1[4] = {al[2], ah[2], al[3], ah[3]};
        mma_bf16_16816(d, f0, xv[w].x, xv[w].y);
        mma_bf16_16816(d, f1, xv[w].z, xv[w].w);
      }
      const int last = k0 + KLEN - 32;
      const int s0 = min(kb + 32 * n0, last) / F::SCALE_K, s1 = min(kb + 32 * n1, last) / F::SCALE_K;
      acc_lo += F::scale(S, sl + s0) * d[0] + F::scale(S, sl + s1) * d[1];
      acc_hi += F::scale(S, sh + s0) * d[2] + F::scale(S, sh + s1) * d[3];
    }
    acc_lo += __shfl_xor_sync(0xffffffffu, acc_lo, 1);
    acc_lo += __shfl_xor_sync(0xffffffffu, acc_lo, 2);
    acc_hi += __shfl_xor_sync(0xffffffffu, acc_hi, 1);
    acc_hi += __shfl_xor_sync(0xffffffffu, acc_hi, 2);
    lo = acc_lo;
    hi = acc_hi;
  }
}

}  // namespace q35k

namespace q35k {

// One warp routes token t from its E router logits lt[0..E-1] (read with __ldcg: written by other
// blocks of this grid or the previous kernel) and its shared-gate logit: softmax, top-k (ties: the
// lower expert), renormalised weights -> ids, weights [t, :], shared_gate[t].
template <int E, int TOPK>
__device__ __forceinline__ void route_token(const float* lt, float sg_logit, int t, int* __restrict__ ids,
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
}

}  // namespace q35k

// ---- router: logits, softmax, top-k, renormalise; plus the shared expert's sigmoid gate ----
// x [T, H] bf16; w_router [E, H] bf16; w_sg [1, H] bf16 (shared_expert_gate);
// logits [T, E+1] fp32 scratch; counters [ceil(T / M_TILE)] int32, zero before the first launch and
// left zero by every launch (graph-safe); ids [T, TOPK] int32 and weights [T, TOPK] fp32, by
// decreasing probability (equal probabilities: lower expert first), weights renormalised to sum 1;
// shared_gate [T] fp32 = sigmoid(x . w_sg).
// Grid: (ceil((E / ROWS + 1) / WARPS), ceil(T / M_TILE)); block WARPS * 32. Warp g < E / ROWS computes
// router rows g*ROWS .. +ROWS-1, warp E / ROWS the shared gate, for M_TILE tokens. The last block of a
// token tile to finish (atomic ticket) runs softmax + top-k, one warp per token.
template <int H, int E, int TOPK, int M_TILE, int ROWS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
moe_router(const q35k::bf16* __restrict__ x, const q35k::bf16* __restrict__ w_router,
           const q35k::bf16* __restrict__ w_sg, float* __restrict__ logits, int* __restrict__ counters,
           int* __restrict__ ids, float* __restrict__ weights, float* __restrict__ shared_gate, int T) {
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

  for (int m = warp; m < M_TILE; m += WARPS) {
    const int t = t0 + m;
    if (t >= T) break;
    const float* lt = logits + size_t(t) * (E + 1);
    q35k::route_token<E, TOPK>(lt, __ldcg(lt + E), t, ids, weights, shared_gate);
  }
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

// ---- decode: gate|up for the k routed experts and the shared expert ----
// x [T, H] bf16; ids [T, TOPK]; gate_up [E, 2I, H] (rows gate 0..I-1, up I..2I-1);
// shared_gate_up [2IS, H] (rows gate | up); h [T, TOPK*I + IS] bf16 (slot s at s*I, shared at TOPK*I).
// Grid: ((TOPK*I + IS) / 8, T); block KSPLIT * 32. A block owns 8 consecutive h values of one token
// (never straddling two slots): the 16 weight rows gate j..j+7 | up j..j+7 as one mma tile. Warp w
// takes k in [w, w + 1) * H / KSPLIT; the block sums the KSPLIT partial sums in shared memory.
template <int GROUP, int H, int I, int IS, int TOPK, int KSPLIT>
__global__ void __launch_bounds__(KSPLIT * 32)
moe_decode_gate_up(const q35k::bf16* __restrict__ x, const int* __restrict__ ids,
                   const void* __restrict__ gate_up_w, const void* __restrict__ gate_up_s,
                   const void* __restrict__ shared_w, const void* __restrict__ shared_s,
                   q35k::bf16* __restrict__ h, int T) {
  static_assert(I % 8 == 0 && IS % 8 == 0, "moe_decode_gate_up: I and IS must be multiples of 8");
  static_assert(H % (32 * KSPLIT) == 0, "moe_decode_gate_up: H must be a multiple of 32 * KSPLIT");
  using F = q35k::WeightFormat<GROUP>;
  constexpr int HW = TOPK * I + IS;  // h values per token
  constexpr int KLEN = H / KSPLIT;
  __shared__ float part[KSPLIT][16];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
  const int j0 = blockIdx.x * 8;
  const int t = blockIdx.y;
  const int k0 = warp * KLEN;

  const bool shared = j0 >= TOPK * I;
  const int slot = shared ? TOPK : j0 / I;
  const int n_inter = shared ? IS : I;
  const int jj = shared ? j0 - TOPK * I : j0 - slot * I;  // row within the expert's gate block
  constexpr int RB = q35k::row_bytes<GROUP, KLEN>();
  if (shared)  // its weights are known before the router finished
    q35k::prefetch_l2_rows16<RB>(shared_w, q35k::row_bytes<GROUP, H>(), jj, IS + jj, warp * RB);
  q35k::moe_pdl_wait();
  q35k::moe_pdl_launch_dependents();

  const void* W;
  const void* S;
  if (shared) {
    W = shared_w;
    S = shared_s;
  } else {
    const int e = ids[size_t(t) * TOPK + slot];
    W = F::template matrix<2 * I, H>(gate_up_w, e);
    S = F::template scales<2 * I, H>(gate_up_s, e);
  }
  float gate, up;
  q35k::mma_rows16_dot<GROUP, H, KLEN>(W, S, jj + g, n_inter + jj + g, x + size_t(t) * H, k0, gate, up);
  if (lane % 4 == 0) {
    part[warp][g] = gate;
    part[warp][8 + g] = up;
  }
  __syncthreads();
  if (threadIdx.x < 8) {
    const int r = threadIdx.x;
    float gs = 0.f, us = 0.f;
#pragma unroll
    for (int w = 0; w < KSPLIT; ++w) gs += part[w][r], us += part[w][8 + r];
    h[size_t(t) * HW + j0 + r] = q35k::f32_to_bf16(q35k::silu(gs) * us);
  }
}

// ---- decode: down for the k routed experts and the shared expert, weighted sum, one write ----
// h [T, TOPK*I + IS] bf16; ids [T, TOPK]; weights [T, TOPK] fp32; shared_gate [T] fp32;
// down [E, H, I]; shared_down [H, IS]; out [T, H] bf16.
// Grid: (H / 16, T); block (TOPK + 1) * KSPLIT * 32. A block owns 16 output rows of one token (one
// mma tile); warp w takes expert slot w / KSPLIT (slot TOPK = shared) over the k part w % KSPLIT, so
// every weight load of the block is independent. The block then sums the parts in slot order
// (deterministic, no atomics) and writes each output once.
namespace q35k {

// The block's 16 outputs of one token; store(t, n, v) receives each (fp32 sum).
template <int GROUP, int H, int I, int IS, int TOPK, int KSPLIT, typename Store>
__device__ __forceinline__ void moe_decode_down_block(const bf16* __restrict__ h, const int* __restrict__ ids,
                                                      const float* __restrict__ weights,
                                                      const float* __restrict__ shared_gate,
                                                      const void* __restrict__ down_w, const void* __restrict__ down_s,
                                                      const void* __restrict__ shared_w,
                                                      const void* __restrict__ shared_s, Store&& store) {
  static_assert(H % 16 == 0, "moe_decode_down: H must be a multiple of 16");
  static_assert(I % (32 * KSPLIT) == 0 && IS % (32 * KSPLIT) == 0,
                "moe_decode_down: I and IS must be multiples of 32 * KSPLIT");
  using F = q35k::WeightFormat<GROUP>;
  constexpr int HW = TOPK * I + IS;
  __shared__ float part[TOPK + 1][KSPLIT][16];  // per-expert rows, before the routing weight
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
  const int s = warp / KSPLIT, kp = warp % KSPLIT;
  const int n0 = blockIdx.x * 16;
  const int t = blockIdx.y;

  if (s == TOPK) {  // the shared expert's weights are known before gate_up finished
    constexpr int RB = q35k::row_bytes<GROUP, IS / KSPLIT>();
    q35k::prefetch_l2_rows16<RB>(shared_w, q35k::row_bytes<GROUP, IS>(), n0, n0 + 8, kp * RB);
  }
  q35k::moe_pdl_wait();
  q35k::moe_pdl_launch_dependents();

  float lo, hi;
  const q35k::bf16* hs = h + size_t(t) * HW + s * I;
  if (s == TOPK) {
    q35k::mma_rows16_dot<GROUP, IS, IS / KSPLIT>(shared_w, shared_s, n0 + g, n0 + 8 + g, hs, kp * (IS / KSPLIT), lo, hi);
  } else {
    const int e = ids[size_t(t) * TOPK + s];
    q35k::mma_rows16_dot<GROUP, I, I / KSPLIT>(F::template matrix<H, I>(down_w, e), F::template scales<H, I>(down_s, e),
                                               n0 + g, n0 + 8 + g, hs, kp * (I / KSPLIT), lo, hi);
  }
  if (lane % 4 == 0) {
    part[s][kp][g] = lo;
    part[s][kp][8 + g] = hi;
  }
  __syncthreads();
  if (threadIdx.x < 16) {
    const int r = threadIdx.x;
    float sh = 0.f;
#pragma unroll
    for (int k = 0; k < KSPLIT; ++k) sh += part[TOPK][k][r];
    float acc = shared_gate[t] * sh;
#pragma unroll
    for (int e = 0; e < TOPK; ++e) {
      float v = 0.f;
#pragma unroll
      for (int k = 0; k < KSPLIT; ++k) v += part[e][k][r];
      acc += weights[size_t(t) * TOPK + e] * v;
    }
    store(t, n0 + r, acc);
  }
}

}  // namespace q35k

template <int GROUP, int H, int I, int IS, int TOPK, int KSPLIT>
__global__ void __launch_bounds__((TOPK + 1) * KSPLIT * 32)
moe_decode_down(const q35k::bf16* __restrict__ h, const int* __restrict__ ids, const float* __restrict__ weights,
                const float* __restrict__ shared_gate, const void* __restrict__ down_w,
                const void* __restrict__ down_s, const void* __restrict__ shared_w,
                const void* __restrict__ shared_s, q35k::bf16* __restrict__ out, int T) {
  q35k::moe_decode_down_block<GROUP, H, I, IS, TOPK, KSPLIT>(
      h, ids, weights, shared_gate, down_w, down_s, shared_w, shared_s,
      [&](int t, int n, float v) { out[size_t(t) * H + n] = q35k::f32_to_bf16(v); });
}

// moe_decode_down with the residual epilogue of decode_fusion.cuh: residual fp32 [T, H] += bf16(out),
// then the last block writes normed [T, H] bf16 = RMSNorm(residual) with norm_w [H] bf16 (the next
// layer's input norm, or the final norm); counter int32 [1], zero between launches.
template <int GROUP, int H, int I, int IS, int TOPK, int KSPLIT>
__global__ void __launch_bounds__((TOPK + 1) * KSPLIT * 32)
moe_decode_down_residual(const q35k::bf16* __restrict__ h, const int* __restrict__ ids,
                         const float* __restrict__ weights, const float* __restrict__ shared_gate,
                         const void* __restrict__ down_w, const void* __restrict__ down_s,
                         const void* __restrict__ shared_w, const void* __restrict__ shared_s, float* residual,
                         const q35k::bf16* __restrict__ norm_w, q35k::bf16* __restrict__ normed, int* counter,
                         float eps, int T) {
  q35k::moe_decode_down_block<GROUP, H, I, IS, TOPK, KSPLIT>(
      h, ids, weights, shared_gate, down_w, down_s, shared_w, shared_s,
      [&](int t, int n, float v) { q35k::residual_add_bf16(residual, size_t(t) * H + n, v); });
  q35k::residual_rmsnorm_last_block<H, (TOPK + 1) * KSPLIT * 32>(residual, norm_w, normed, counter, eps, T);
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
