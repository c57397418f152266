#pragma once
// Sparse MoE + shared expert (spec §2.6): the router, the decode path (few tokens, weights streamed
// once through CUDA-core GEMVs) and the glue of the prefill path (moe_align, moe_combine; the
// grouped tensor-core GEMMs are in moe_gemm.cuh).
//
// Weights of the experts and the shared expert come in one of two formats, the template parameter
// GROUP: 0 = bf16 [N, K]; 32 / 64 / 128 = W4A16 (runtime/core/int4_format.h) with qweight uint32
// [N, K/8] and scales bf16 [N, K/GROUP]. A weight matrix is passed as (const void* w, const bf16* s)
// with s unused for bf16. Experts add a leading [E] to both.
//
// Decode, T <= 8 tokens, 3 launches (router, gate_up, down):
//   moe_router          logits [T, E+1] fp32 (row E = shared_expert_gate), then softmax, top-k,
//                       renormalise by the last block to finish -> ids, weights, shared_gate
//   moe_decode_gate_up  h[t, s*I + i] = bf16(silu(gate_e . x_t) * (up_e . x_t)), e = ids[t, s], for
//                       the k routed slots, and h[t, k*I + i] for the shared expert (Is values)
//   moe_decode_down     out[t] = bf16( sum_s w[t,s] * down_e . h[t,s] + shared_gate[t] * down_sh . h[t,k] )
// Prefill: moe_router, moe_align, 4 x moe_gemm, moe_combine.
#include "common.cuh"
#include "int4.cuh"

namespace q35k {

// Values per 16-byte weight vector: 8 bf16, or 32 INT4 (one uint4 of words; a 32-value chunk lies in
// one scale group since GROUP is a multiple of 32).
template <int GROUP>
struct WeightFormat {
  static_assert(GROUP == 0 || GROUP == 32 || GROUP == 64 || GROUP == 128, "GROUP must be 0 (bf16), 32, 64 or 128");
  static constexpr int VALS = GROUP == 0 ? 8 : 32;
  // Matrix `index` of a stack of [ROWS, K] matrices.
  template <int ROWS, int K>
  static __device__ __forceinline__ const void* matrix(const void* w, int index) {
    return static_cast<const unsigned char*>(w) + size_t(index) * ROWS * K * (GROUP == 0 ? 2 : 1) / (GROUP == 0 ? 1 : 2);
  }
  template <int ROWS, int K>
  static __device__ __forceinline__ const bf16* scales(const bf16* s, int index) {
    return GROUP == 0 ? s : s + size_t(index) * ROWS * (K / (GROUP == 0 ? 1 : GROUP));
  }
};

__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

// Dot products of R rows of a weight matrix W [*, K] (format GROUP) with M bf16 vectors x[m] [K],
// by one warp; every lane returns all M * R sums in out. A row of C = K / VALS 16-byte vectors is
// read by LPR = min(C, 32) lanes, so 32 / LPR rows are in flight per pass and no lane idles on short
// rows. Weights are streamed (read once), activations go through L1.
template <int GROUP, int K, int R, int M>
__device__ __forceinline__ void warp_rows_dot(const void* __restrict__ W, const bf16* __restrict__ S,
                                              const int (&rows)[R], const bf16* const (&x)[M],
                                              float (&out)[M][R]) {
  constexpr int VALS = WeightFormat<GROUP>::VALS;
  static_assert(K % VALS == 0, "K must be a multiple of 8 (bf16) or 32 (INT4)");
  constexpr int C = K / VALS;
  constexpr int LPR = C < 32 ? C : 32;
  static_assert(32 % LPR == 0 && C % LPR == 0, "K / VALS must divide 32 or be a multiple of 32");
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
      if constexpr (GROUP == 0) {
        float wf[8];
        unpack8(ld_stream_16(static_cast<const bf16*>(W) + size_t(row) * K + c * 8), wf);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float xf[8];
          unpack8(ld_global_16(x[m] + c * 8), xf);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[m][p] += wf[i] * xf[i];
        }
      } else {
        const uint4 q = ld_stream_16(static_cast<const u32*>(W) + size_t(row) * (K / 8) + c * 4);
        const float s = bf16_to_f32(S[size_t(row) * (K / GROUP) + c * 32 / GROUP]);
        const u32 words[4] = {q.x, q.y, q.z, q.w};
        float wf[4][8];
#pragma unroll
        for (int w = 0; w < 4; ++w) int4x8_to_f32(words[w], wf[w]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float d = 0.f;
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            float xf[8];
            unpack8(ld_global_16(x[m] + c * 32 + w * 8), xf);
#pragma unroll
            for (int i = 0; i < 8; ++i) d += wf[w][i] * xf[i];
          }
          acc[m][p] += s * d;
        }
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
  constexpr int EPL = (E + 31) / 32;  // probabilities per lane in the top-k
  const float neg_inf = __int_as_float(0xff800000);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = blockIdx.x * WARPS + warp;
  const int t0 = blockIdx.y * M_TILE;

  if (g <= E / ROWS) {
    const bool is_sg = g == E / ROWS;
    int rows[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) rows[r] = is_sg ? 0 : g * ROWS + r;
    const q35k::bf16* xm[M_TILE];
#pragma unroll
    for (int m = 0; m < M_TILE; ++m) xm[m] = x + size_t(min(t0 + m, T - 1)) * H;
    float out[M_TILE][ROWS];
    q35k::warp_rows_dot<0, H, ROWS, M_TILE>(is_sg ? w_sg : w_router, nullptr, rows, xm, out);
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
#pragma unroll
    for (int i = 0; i < EPL; ++i) p[i] = lane + 32 * i < E ? p[i] / sum : -1.f;  // -1: never selected

    float sel_p[TOPK];
    int sel_e[TOPK];
    float top_sum = 0.f;
#pragma unroll
    for (int k = 0; k < TOPK; ++k) {
      // This lane's best (largest p, then lowest expert), then the warp's.
      float bp = p[0];
      int be = lane;
#pragma unroll
      for (int i = 1; i < EPL; ++i)
        if (p[i] > bp) bp = p[i], be = lane + 32 * i;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const float op = __shfl_xor_sync(0xffffffffu, bp, off);
        const int oe = __shfl_xor_sync(0xffffffffu, be, off);
        if (op > bp || (op == bp && oe < be)) bp = op, be = oe;
      }
      sel_p[k] = bp;
      sel_e[k] = be;
      top_sum += bp;
#pragma unroll
      for (int i = 0; i < EPL; ++i)
        if (lane + 32 * i == be) p[i] = -1.f;
    }
#pragma unroll
    for (int k = 0; k < TOPK; ++k)
      if (lane == k) {
        ids[size_t(t) * TOPK + k] = sel_e[k];
        weights[size_t(t) * TOPK + k] = sel_p[k] / top_sum;
      }
    if (lane == 0) shared_gate[t] = 1.f / (1.f + expf(-__ldcg(lt + E)));
  }
}

// ---- decode: gate|up for the k routed experts and the shared expert ----
// x [T, H] bf16; ids [T, TOPK]; gate_up [E, 2I, H] (rows gate 0..I-1, up I..2I-1);
// shared_gate_up [2IS, H] (rows gate | up); h [T, TOPK*I + IS] bf16 (slot s at s*I, shared at TOPK*I).
// Grid: (ceil((TOPK*I + IS) / (ROWS * WARPS)), T); block WARPS * 32. A warp owns ROWS consecutive h
// values of one token (never straddling two slots) and reads their 2 * ROWS weight rows once.
template <int GROUP, int H, int I, int IS, int TOPK, int ROWS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
moe_decode_gate_up(const q35k::bf16* __restrict__ x, const int* __restrict__ ids,
                   const void* __restrict__ gate_up_w, const q35k::bf16* __restrict__ gate_up_s,
                   const void* __restrict__ shared_w, const q35k::bf16* __restrict__ shared_s,
                   q35k::bf16* __restrict__ h, int T) {
  static_assert(I % ROWS == 0 && IS % ROWS == 0, "moe_decode_gate_up: I and IS must be multiples of ROWS");
  using F = q35k::WeightFormat<GROUP>;
  constexpr int HW = TOPK * I + IS;  // h values per token
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int j0 = (blockIdx.x * WARPS + warp) * ROWS;
  const int t = blockIdx.y;
  if (j0 >= HW) return;

  const bool shared = j0 >= TOPK * I;
  const int slot = shared ? TOPK : j0 / I;
  const int n_inter = shared ? IS : I;
  const int jj = shared ? j0 - TOPK * I : j0 - slot * I;  // row within the expert's gate block
  const void* W;
  const q35k::bf16* S;
  if (shared) {
    W = shared_w;
    S = shared_s;
  } else {
    const int e = ids[size_t(t) * TOPK + slot];
    W = F::template matrix<2 * I, H>(gate_up_w, e);
    S = F::template scales<2 * I, H>(gate_up_s, e);
  }
  int rows[2 * ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    rows[r] = jj + r;
    rows[ROWS + r] = n_inter + jj + r;
  }
  const q35k::bf16* xm[1] = {x + size_t(t) * H};
  float out[1][2 * ROWS];
  q35k::warp_rows_dot<GROUP, H, 2 * ROWS, 1>(W, S, rows, xm, out);
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
    if (lane == r % 32) h[size_t(t) * HW + j0 + r] = q35k::f32_to_bf16(q35k::silu(out[0][r]) * out[0][ROWS + r]);
}

// ---- decode: down for the k routed experts and the shared expert, weighted sum, one write ----
// h [T, TOPK*I + IS] bf16; ids [T, TOPK]; weights [T, TOPK] fp32; shared_gate [T] fp32;
// down [E, H, I]; shared_down [H, IS]; out [T, H] bf16.
// Grid: (H / ROWS, T); block WARPS * 32. A block owns ROWS output rows of one token; its warps take
// the k + 1 experts round-robin (slot k = shared), each computing all ROWS rows of its expert, so
// every weight load of the block is independent. The block then sums the experts' rows in slot order
// (deterministic, no atomics) and writes each output once.
template <int GROUP, int H, int I, int IS, int TOPK, int ROWS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
moe_decode_down(const q35k::bf16* __restrict__ h, const int* __restrict__ ids, const float* __restrict__ weights,
                const float* __restrict__ shared_gate, const void* __restrict__ down_w,
                const q35k::bf16* __restrict__ down_s, const void* __restrict__ shared_w,
                const q35k::bf16* __restrict__ shared_s, q35k::bf16* __restrict__ out, int T) {
  static_assert(H % ROWS == 0 && ROWS <= 32, "moe_decode_down: H must be a multiple of ROWS <= 32");
  using F = q35k::WeightFormat<GROUP>;
  constexpr int HW = TOPK * I + IS;
  __shared__ float part[TOPK + 1][ROWS];  // per-expert rows, before the routing weight
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int n0 = blockIdx.x * ROWS;
  const int t = blockIdx.y;

  int rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) rows[r] = n0 + r;
  for (int s = warp; s <= TOPK; s += WARPS) {
    float o[1][ROWS];
    const q35k::bf16* xm[1] = {h + size_t(t) * HW + s * I};
    if (s == TOPK) {
      q35k::warp_rows_dot<GROUP, IS, ROWS, 1>(shared_w, shared_s, rows, xm, o);
    } else {
      const int e = ids[size_t(t) * TOPK + s];
      q35k::warp_rows_dot<GROUP, I, ROWS, 1>(F::template matrix<H, I>(down_w, e), F::template scales<H, I>(down_s, e),
                                             rows, xm, o);
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      if (lane == r) part[s][r] = o[0][r];
  }
  __syncthreads();
  if (threadIdx.x < ROWS) {
    const int r = threadIdx.x;
    float acc = shared_gate[t] * part[TOPK][r];
#pragma unroll
    for (int s = 0; s < TOPK; ++s) acc += weights[size_t(t) * TOPK + s] * part[s][r];
    out[size_t(t) * H + n0 + r] = q35k::f32_to_bf16(acc);
  }
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
