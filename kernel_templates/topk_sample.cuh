#pragma once
// Top-k sampling from fp32 logits [VOCAB] in two launches, for 1 < top_k <= K_MAX (the common
// case: Qwen's generation_config has top_k 20). Semantics of runtime/core/sampler.cpp: candidates
// sorted by (logit desc, id asc), the first top_k kept, softmax at the temperature over them, the
// smallest prefix whose mass reaches top_p kept, one drawn.
//   topk_partial: BLOCKS blocks; each extracts its slice's top_k in order (top_k rounds of a block
//                 argmax over the slice in shared memory; a taken entry becomes NaN, which never wins).
//   topk_final:   one block; extracts the global top_k from the BLOCKS * top_k candidates the same
//                 way, then thread 0 applies temperature, top-p and the draw. The uniform number is a
//                 hash of rng = {seed, step} in device memory; step advances, so a replayed CUDA
//                 graph draws afresh.
#include "common.cuh"

namespace q35k {

__device__ __forceinline__ bool topk_beats(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

// Block-wide best (value desc, id asc); every thread gets it. sv / si hold THREADS / 32 entries.
template <int THREADS>
__device__ __forceinline__ void topk_block_best(float& v, int& i, float* sv, int* si) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (topk_beats(ov, oi, v, i)) v = ov, i = oi;
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) sv[threadIdx.x / 32] = v, si[threadIdx.x / 32] = i;
  __syncthreads();
  v = sv[0], i = si[0];
  for (int w = 1; w < THREADS / 32; ++w)
    if (topk_beats(sv[w], si[w], v, i)) v = sv[w], i = si[w];
}

// Extracts the best `k` of vals[0, n) (ids = id_of(j)) in order into out_v / out_i (k entries;
// missing ones are (-inf, INT_MAX)). Marks taken entries NaN.
template <int THREADS, typename IdOf>
__device__ __forceinline__ void topk_extract(float* vals, int n, IdOf id_of, int k, float* out_v, int* out_i,
                                             float* sv, int* si, int* taken) {
  for (int r = 0; r < k; ++r) {
    float bv = -__int_as_float(0x7f800000);
    int bi = 0x7fffffff, bj = -1;
    for (int j = threadIdx.x; j < n; j += THREADS) {
      const float x = vals[j];
      const int id = id_of(j);
      if (topk_beats(x, id, bv, bi)) bv = x, bi = id, bj = j;
    }
    const int my_bi = bi;
    topk_block_best<THREADS>(bv, bi, sv, si);
    if (bi == my_bi && bj >= 0 && bi != 0x7fffffff) *taken = bj;  // the owner of the winner
    __syncthreads();
    if (threadIdx.x == 0) {
      out_v[r] = bv;
      out_i[r] = bi;
      if (bi != 0x7fffffff) vals[*taken] = __int_as_float(0x7fc00000);  // NaN: never selected again
    }
    __syncthreads();
  }
}

__device__ __forceinline__ unsigned long long topk_mix(unsigned long long x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace q35k

namespace q35k {
// The body of topk_partial for slice blockIdx.x of one row of logits.
template <int VOCAB, int BLOCKS, int K_MAX, int THREADS>
__device__ __forceinline__ void topk_partial_slice(const float* __restrict__ logits, float* __restrict__ cand_v,
                                                   int* __restrict__ cand_i, int top_k) {
  constexpr int CHUNK = (VOCAB + BLOCKS - 1) / BLOCKS;
  __shared__ float vals[CHUNK];
  __shared__ float sv[THREADS / 32];
  __shared__ int si[THREADS / 32];
  __shared__ int taken;
  const int base = blockIdx.x * CHUNK;
  const int n = VOCAB - base < CHUNK ? (VOCAB - base > 0 ? VOCAB - base : 0) : CHUNK;
  for (int j = threadIdx.x; j < n; j += THREADS) vals[j] = logits[base + j];
  __syncthreads();
  topk_extract<THREADS>(vals, n, [&](int j) { return base + j; }, top_k, cand_v + blockIdx.x * K_MAX,
                        cand_i + blockIdx.x * K_MAX, sv, si, &taken);
}

// The body of topk_final for one row: the global top_k of its candidates, then the draw.
template <int BLOCKS, int K_MAX, int THREADS>
__device__ __forceinline__ void topk_final_row(const float* __restrict__ cand_v, const int* __restrict__ cand_i,
                                               int* __restrict__ out_id, unsigned long long* __restrict__ rng,
                                               float temperature, int top_k, float top_p) {
  __shared__ float vals[BLOCKS * K_MAX];
  __shared__ int ids[BLOCKS * K_MAX];
  __shared__ float best_v[K_MAX];
  __shared__ int best_i[K_MAX];
  __shared__ float sv[THREADS / 32];
  __shared__ int si[THREADS / 32];
  __shared__ int taken;
  const int n = BLOCKS * top_k;  // block b's candidates sit at [b * K_MAX, b * K_MAX + top_k)
  for (int j = threadIdx.x; j < n; j += THREADS) {
    const int b = j / top_k, r = j % top_k;
    vals[j] = cand_v[b * K_MAX + r];
    ids[j] = cand_i[b * K_MAX + r];
  }
  __syncthreads();
  topk_extract<THREADS>(vals, n, [&](int j) { return ids[j]; }, top_k, best_v, best_i, sv, si, &taken);
  if (threadIdx.x != 0) return;
  // Softmax at the temperature over the kept candidates (sorted), in double like the host.
  int kept = 0;
  while (kept < top_k && best_i[kept] != 0x7fffffff) ++kept;
  double total = 0;
  for (int r = 0; r < kept; ++r) total += exp((double(best_v[r]) - double(best_v[0])) / double(temperature));
  // Nucleus: the smallest prefix whose mass reaches top_p.
  int nucleus = kept;
  if (top_p < 1.f) {
    double mass = 0;
    for (int r = 0; r < kept; ++r) {
      mass += exp((double(best_v[r]) - double(best_v[0])) / double(temperature)) / total;
      if (mass >= double(top_p)) {
        nucleus = r + 1;
        break;
      }
    }
  }
  double kept_mass = 0;
  for (int r = 0; r < nucleus; ++r) kept_mass += exp((double(best_v[r]) - double(best_v[0])) / double(temperature));
  const unsigned long long step = rng[1];
  rng[1] = step + 1;
  const double u = double(topk_mix(rng[0] ^ topk_mix(step)) >> 11) * (1.0 / 9007199254740992.0);
  double acc = 0;
  int pick = nucleus - 1;
  for (int r = 0; r < nucleus; ++r) {
    acc += exp((double(best_v[r]) - double(best_v[0])) / double(temperature)) / kept_mass;
    if (u < acc) {
      pick = r;
      break;
    }
  }
  out_id[0] = best_i[pick];
}

// A row of a batched step is drawn here when temperature > 0 and 1 < top_k <= K_MAX (as
// models/qwen35/gpu/sampling.cpp topk_sample_serves) and it is not padding.
__device__ __forceinline__ bool topk_row(const int* slots, const float* temperature, const int* top_k, int b,
                                         int k_max) {
  return slots[b] >= 0 && temperature[b] > 0.f && top_k[b] > 1 && top_k[b] <= k_max;
}
}  // namespace q35k

// logits [VOCAB] fp32 -> cand_v / cand_i [BLOCKS, K_MAX]: each block's top_k, in order.
template <int VOCAB, int BLOCKS, int K_MAX, int THREADS>
__global__ void __launch_bounds__(THREADS)
topk_partial(const float* __restrict__ logits, float* __restrict__ cand_v, int* __restrict__ cand_i, int top_k) {
  q35k::topk_partial_slice<VOCAB, BLOCKS, K_MAX, THREADS>(logits, cand_v, cand_i, top_k);
}

// cand_v / cand_i [BLOCKS, K_MAX] -> out_id [1]; rng u64 [2] = {seed, step}, step += 1.
template <int BLOCKS, int K_MAX, int THREADS>
__global__ void __launch_bounds__(THREADS)
topk_final(const float* __restrict__ cand_v, const int* __restrict__ cand_i, int* __restrict__ out_id,
           unsigned long long* __restrict__ rng, float temperature, int top_k, float top_p) {
  q35k::topk_final_row<BLOCKS, K_MAX, THREADS>(cand_v, cand_i, out_id, rng, temperature, top_k, top_p);
}

// Batched forms (one row per sequence of a batched decode step, each with its own parameters and
// its slot's rng = rng + 2 * slots[b]); rows that are padding or not top-k rows exit at once.
// topk_partial_batch: grid (BLOCKS, B), logits [B, VOCAB] -> cand_v / cand_i [B, BLOCKS, K_MAX].
template <int VOCAB, int BLOCKS, int K_MAX, int THREADS>
__global__ void __launch_bounds__(THREADS)
topk_partial_batch(const float* __restrict__ logits, float* __restrict__ cand_v, int* __restrict__ cand_i,
                   const int* __restrict__ slots, const float* __restrict__ temperature,
                   const int* __restrict__ top_k) {
  const int b = blockIdx.y;
  if (!q35k::topk_row(slots, temperature, top_k, b, K_MAX)) return;
  q35k::topk_partial_slice<VOCAB, BLOCKS, K_MAX, THREADS>(logits + size_t(b) * VOCAB, cand_v + size_t(b) * BLOCKS * K_MAX,
                                                          cand_i + size_t(b) * BLOCKS * K_MAX, top_k[b]);
}

// topk_final_batch: grid (B), -> out_id [B]; rng [slots, 2], step += 1 per drawn row.
template <int BLOCKS, int K_MAX, int THREADS>
__global__ void __launch_bounds__(THREADS)
topk_final_batch(const float* __restrict__ cand_v, const int* __restrict__ cand_i, int* __restrict__ out_id,
                 unsigned long long* __restrict__ rng, const int* __restrict__ slots,
                 const float* __restrict__ temperature, const int* __restrict__ top_k,
                 const float* __restrict__ top_p) {
  const int b = blockIdx.x;
  if (!q35k::topk_row(slots, temperature, top_k, b, K_MAX)) return;
  q35k::topk_final_row<BLOCKS, K_MAX, THREADS>(cand_v + size_t(b) * BLOCKS * K_MAX, cand_i + size_t(b) * BLOCKS * K_MAX,
                                               out_id + b, rng + 2 * size_t(slots[b]), temperature[b], top_k[b],
                                               top_p[b]);
}
