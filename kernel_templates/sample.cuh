#pragma once
// Token selection from fp32 logits [V] on the GPU, graph-replayable (no host round trip).
// Semantics of runtime/core/sampler.cpp (the host reference):
//   greedy (temperature <= 0 or top_k == 1): argmax, the lowest id on ties;
//   sampled: candidates sorted by (logit desc, id asc); keep the first top_k (0 = all); softmax at
//   the temperature over them; keep the smallest prefix whose mass reaches top_p; draw one.
// argmax_f32: BLOCKS blocks each reduce a slice to (max, lowest id); the last block to finish (an
//   atomic ticket) reduces the partials, writes the id and re-arms the ticket.
// sample_f32: one block; the top-k and top-p boundaries are found by radix selection on the
//   order-preserving 32-bit key of each logit (4 passes of 8 bits: counts for top-k, probability
//   mass for top-p), ties at a boundary are taken in id order (a block scan over contiguous id
//   ranges), then the draw walks the kept set in id order. Keys treat -0 as +0 (the host compares
//   values, so -0 == +0 and ties go by id). The top-p masses are exp and sums in fp64, as the host
//   computes them (fp32 sums over a large vocabulary drift by many boundary tokens); the draw
//   itself weighs the kept set in fp32. The uniform number comes from a hash
//   of (seed, step) read from device memory; the kernel advances step, so a replayed graph draws
//   a fresh number each time.
#include "common.cuh"

namespace q35k {

// Larger float -> larger key (negative values bit-flipped). -0 gets the key of +0: they compare
// equal, so they must tie (and be ordered by id), not sort -0 below +0.
__device__ __forceinline__ u32 order_key(float f) {
  u32 u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
// The float of a key (inverse of order_key; -0 comes back as +0).
__device__ __forceinline__ float key_value(u32 key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// (value, id) pair order for argmax: larger value, then lower id.
__device__ __forceinline__ bool beats(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (beats(ov, oi, v, i)) v = ov, i = oi;
  }
}

// Block-wide (max, lowest id); every thread gets it. scratch_v / scratch_i hold THREADS / 32 entries.
template <int THREADS>
__device__ __forceinline__ void block_argmax(float& v, int& i, float* scratch_v, int* scratch_i) {
  warp_argmax(v, i);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch_v[threadIdx.x / 32] = v, scratch_i[threadIdx.x / 32] = i;
  __syncthreads();
  v = scratch_v[0], i = scratch_i[0];
  for (int w = 1; w < THREADS / 32; ++w)
    if (beats(scratch_v[w], scratch_i[w], v, i)) v = scratch_v[w], i = scratch_i[w];
}

// Exclusive prefix sum over the block in thread order; `total` gets the block's sum.
// scratch holds THREADS / 32 floats.
template <int THREADS>
__device__ __forceinline__ float block_exclusive_scan(float v, float* scratch, float& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float incl = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float o = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += o;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  float before = 0.f;
  total = 0.f;
  for (int w = 0; w < THREADS / 32; ++w) {
    if (w < warp) before += scratch[w];
    total += scratch[w];
  }
  return before + incl - v;
}

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace q35k

template <int V, int THREADS, int BLOCKS>
__global__ void __launch_bounds__(THREADS)
argmax_f32(const float* __restrict__ logits,  // [V]
           int* __restrict__ out_id,          // [1]
           float* partial_v,                  // [BLOCKS] workspace
           int* partial_i,                    // [BLOCKS] workspace
           unsigned* ticket) {                // [1] workspace, 0 between launches
  using namespace q35k;
  constexpr int SLICE = (V + BLOCKS - 1) / BLOCKS;
  __shared__ float sv[THREADS / 32];
  __shared__ int si[THREADS / 32];
  __shared__ bool last;
  const int begin = blockIdx.x * SLICE, end = min(V, begin + SLICE);
  float v = __int_as_float(0xff800000);
  int i = 0x7fffffff;
  for (int j = begin + threadIdx.x; j < end; j += THREADS) {
    const float l = logits[j];
    if (beats(l, j, v, i)) v = l, i = j;
  }
  block_argmax<THREADS>(v, i, sv, si);
  if (threadIdx.x == 0) {
    partial_v[blockIdx.x] = v;
    partial_i[blockIdx.x] = i;
    __threadfence();
    last = atomicAdd(ticket, 1u) == BLOCKS - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  v = __int_as_float(0xff800000), i = 0x7fffffff;
  for (int b = threadIdx.x; b < BLOCKS; b += THREADS) {
    const float pv = static_cast<volatile float*>(partial_v)[b];
    const int pi = static_cast<volatile int*>(partial_i)[b];
    if (beats(pv, pi, v, i)) v = pv, i = pi;
  }
  block_argmax<THREADS>(v, i, sv, si);
  if (threadIdx.x == 0) {
    *out_id = i;
    *ticket = 0;
  }
}

namespace q35k {
// The body of sample_f32 for one row of logits; greedy_steps: whether a greedy draw advances the
// step too (sample_f32 does; the batched kernel's greedy rows leave rng alone, like argmax_f32).
template <int V, int THREADS>
__device__ __forceinline__ void sample_row(const float* __restrict__ logits, int* __restrict__ out_id,
                                           unsigned long long* rng, float temperature, int top_k, float top_p,
                                           bool greedy_steps) {
  constexpr int PER = (V + THREADS - 1) / THREADS;  // contiguous ids per thread (id order = thread order)
  __shared__ float sv[THREADS / 32], scan[THREADS / 32];
  __shared__ int si[THREADS / 32];
  __shared__ double hist[256];
  __shared__ u32 sel_prefix;
  __shared__ double sel_left;
  __shared__ int chosen;
  const int begin = min(V, int(threadIdx.x) * PER), end = min(V, begin + PER);

  // Greedy, and the max logit for a stable softmax.
  float m = __int_as_float(0xff800000);
  int best = 0x7fffffff;
  for (int j = begin; j < end; ++j)
    if (beats(logits[j], j, m, best)) m = logits[j], best = j;
  block_argmax<THREADS>(m, best, sv, si);
  if (temperature <= 0.f || top_k == 1) {
    if (threadIdx.x == 0) {
      *out_id = best;
      if (greedy_steps) rng[1] += 1;
    }
    return;
  }
  const float inv_t = 1.f / temperature;
  const double inv_t64 = 1.0 / double(temperature);  // as runtime/core/sampler.cpp

  // Radix selection over keys passing `in`: the boundary key b such that the weight (count, or
  // mass) of keys > b is below `target` and adding the keys == b reaches it. Returns b and sets
  // `left` = target minus the weight above b (what the ties at b must supply, in id order).
  // With `of_total`, target is `goal` times the total weight (the first pass's histogram sum).
  auto select = [&](auto in, auto weight, double goal, bool of_total, double& left) -> u32 {
    u32 prefix = 0, mask = 0;
    double target = goal;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = threadIdx.x; b < 256; b += THREADS) hist[b] = 0.0;
      __syncthreads();
      for (int j = begin; j < end; ++j) {
        const u32 key = order_key(logits[j]);
        if ((key & mask) == prefix && in(j, key)) atomicAdd(&hist[(key >> shift) & 255u], weight(j));
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        if (shift == 24 && of_total) {
          double total = 0.0;
          for (int b = 0; b < 256; ++b) total += hist[b];
          target = goal * total;
        }
        int lowest = 0;  // lowest non-empty bucket: taken when rounding leaves the target unreached
        while (lowest < 255 && hist[lowest] == 0.0) ++lowest;
        int b = 255;
        for (; b > lowest; --b) {
          if (hist[b] >= target) break;
          target -= hist[b];
        }
        sel_prefix = prefix | (u32(b) << shift);
        sel_left = target;
      }
      __syncthreads();
      prefix = sel_prefix, target = sel_left;
      mask |= 255u << shift;
      __syncthreads();
    }
    left = target;
    return prefix;
  };
  // The last id of this thread's slice that is among the first `take` ids (in id order, over the
  // whole vocabulary) with key == b passing `in`; -1 if none.
  auto tie_cutoff = [&](auto in, u32 b, double take) -> int {
    float n = 0.f, total;
    for (int j = begin; j < end; ++j) n += order_key(logits[j]) == b && in(j, b);
    float seen = block_exclusive_scan<THREADS>(n, scan, total);
    int cut = -1;
    for (int j = begin; j < end && seen < take; ++j)
      if (order_key(logits[j]) == b && in(j, b)) cut = j, seen += 1.f;
    return cut;
  };
  auto prob = [&](int j) { return expf((logits[j] - m) * inv_t); };  // the draw's weights
  auto prob64 = [&](int j) { return exp((double(logits[j]) - double(m)) * inv_t64); };  // top-p's

  // Top-k: keys above kth, and ids up to k_cut among the keys equal to it.
  u32 kth = 0;
  int k_cut = V;
  if (top_k > 0 && top_k < V) {
    auto all = [](int, u32) { return true; };
    double take;
    kth = select(all, [](int) { return 1.0; }, double(top_k), false, take);
    k_cut = tie_cutoff(all, kth, take);
  }
  auto kept = [&](int j, u32 key) { return key > kth || (key == kth && j <= k_cut); };

  // Top-p: the smallest (value desc, id asc) prefix of the kept set whose mass reaches top_p times
  // the kept set's mass (the softmax normaliser, summed by select's first pass). fp64 throughout.
  u32 pth = 0;
  int p_cut = V;
  if (top_p < 1.f) {
    double left;
    pth = select(kept, prob64, double(top_p), true, left);
    const double p_eq = exp((double(key_value(pth)) - double(m)) * inv_t64);
    p_cut = tie_cutoff(kept, pth, fmax(1.0, ceil(left / p_eq)));
  }
  auto in_final = [&](int j, u32 key) {
    return kept(j, key) && (key > pth || (key == pth && j <= p_cut));
  };

  // Draw: u in [0, mass of the final set), found by a scan in id order.
  float mass = 0.f, total;
  int last_in = -1;
  for (int j = begin; j < end; ++j)
    if (in_final(j, order_key(logits[j]))) mass += prob(j), last_in = j;
  const float before = block_exclusive_scan<THREADS>(mass, scan, total);
  const unsigned long long h = splitmix64(splitmix64(rng[0]) ^ rng[1]);
  const float u = float(double(h >> 11) * 0x1p-53) * total;
  if (threadIdx.x == 0) chosen = 0x7fffffff;
  __syncthreads();
  // The owner of u walks its ids; rounding past the end falls back to the last id of the set.
  if (last_in >= 0 && before <= u && (u < before + mass || before + mass >= total)) {
    float c = before;
    int pick = last_in;
    for (int j = begin; j < end; ++j)
      if (in_final(j, order_key(logits[j]))) {
        c += prob(j);
        if (c > u) {
          pick = j;
          break;
        }
      }
    atomicMin(&chosen, pick);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    *out_id = chosen != 0x7fffffff ? chosen : best;
    rng[1] += 1;
  }
}

// Which kernel draws a row with these parameters (as the host picks for one sequence:
// models/qwen35/gpu/sampling.h): 0 greedy, 1 top-k (topk_sample.cuh, 1 < top_k <= k_max), 2 the rest.
__device__ __forceinline__ int sample_mode(float temperature, int top_k, int k_max) {
  if (temperature <= 0.f || top_k == 1) return 0;
  return top_k > 1 && top_k <= k_max ? 1 : 2;
}
}  // namespace q35k

template <int V, int THREADS>
__global__ void __launch_bounds__(THREADS)
sample_f32(const float* __restrict__ logits,  // [V]
           int* __restrict__ out_id,          // [1]
           unsigned long long* rng,           // [2]: seed, step (step is incremented)
           float temperature, int top_k, float top_p) {
  q35k::sample_row<V, THREADS>(logits, out_id, rng, temperature, top_k, top_p, true);
}

// sample_batch_f32: one row of logits per sequence of a batched decode step, grid (B), each row
// with its own parameters (temperature [B], top_k [B], top_p [B]) and its slot's rng {seed, step}
// (rng + 2 * slots[b]). Draws the greedy rows (argmax, rng untouched) and the rows top-k sampling
// does not serve (mode 2); the top-k rows (mode 1, 1 < top_k <= K_MAX) are left to
// topk_partial_batch / topk_final_batch; padding rows (slots[b] < 0) are skipped.
template <int V, int THREADS, int K_MAX>
__global__ void __launch_bounds__(THREADS, 1)  // min 1 block: ptxas otherwise caps sm_80 at 32 registers and spills
sample_batch_f32(const float* __restrict__ logits,      // [B, V]
                 int* __restrict__ out_id,              // [B]
                 unsigned long long* rng,               // [slots, 2]
                 const int* __restrict__ slots,         // [B]
                 const float* __restrict__ temperature,  // [B]
                 const int* __restrict__ top_k,         // [B]
                 const float* __restrict__ top_p) {     // [B]
  const int b = blockIdx.x, slot = slots[b];
  if (slot < 0) return;
  const float t = temperature[b];
  const int k = top_k[b];
  if (q35k::sample_mode(t, k, K_MAX) == 1) return;
  q35k::sample_row<V, THREADS>(logits + size_t(b) * V, out_id + b, rng + 2 * size_t(slot), t, k, top_p[b], false);
}
