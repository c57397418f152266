#pragma once
// Gated full attention (spec §2.3): the kernels after the fused q|gate|k|v projection.
//
//   qkv [T, ROW] bf16, ROW = HQ*2D + 2*HKV*D, per row
//     [ head 0: q (D) | gate (D) | head 1: q | gate | ... | k: HKV x D | v: HKV x D ]
//   K cache, V cache [max_context, HKV, D] bf16 each (one pair per full-attention layer); row p
//     holds the token at position p, k after QK-norm + RoPE, v as projected.
//   pos0 (int32 in device memory): position of the first of the T tokens of this call, so a
//     decode step can be captured in a CUDA graph once and replayed.
//
// 1. qk_norm_rope: q and k heads get the zero-centred RMSNorm over D ((1 + w) weights) then NeoX
//    RoPE on their first ROTARY dims; q goes to a [T, HQ, D] buffer, k and v to the caches at rows
//    pos0 .. pos0+T-1. One launch for q, k and v.
// 2. attention_prefill: causal flash attention (FA2 style, mma.sync m16n8k16 bf16, fp32 online
//    softmax) of the T queries over cache rows 0 .. pos0+T-1, then out = o * sigmoid(gate).
// 3. attention_decode + attention_decode_merge: FlashDecoding for up to 8 query rows per block of a kv
//    head (decode: T = 1): the KV length is split over CTAs, each writes a partial (m, l, o) in
//    fp32, the merge combines them and applies the sigmoid gate.
// Query head h reads kv head h / (HQ / HKV) (GQA). Scores are kept in raw units; the softmax uses
// exp2 with scale * log2(e) folded in.
#include "common.cuh"

namespace q35k {
namespace attn {

// ---- PTX wrappers (sm_80+) ----

__device__ __forceinline__ u32 smem_u32(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// 16 bytes global -> shared, bypassing L1; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a . b, m16n8k16, bf16 inputs, fp32 accumulators. Fragments (g = lane / 4, c = lane % 4):
//   a0 = A[g][2c, 2c+1], a1 = A[g+8][2c, 2c+1], a2 = A[g][2c+8, 2c+9], a3 = A[g+8][2c+8, 2c+9]
//   b0 = B[2c, 2c+1][g], b1 = B[2c+8, 2c+9][g]
//   d0 = D[g][2c], d1 = D[g][2c+1], d2 = D[g+8][2c], d3 = D[g+8][2c+1]
__device__ __forceinline__ void mma_bf16(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// Programmatic dependent launch: wait for the previous kernel's writes (no-op without PDL).
__device__ __forceinline__ void wait_for_predecessor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// The decode kernels then let the next kernel of the stream start its prologue (its CTAs wait in
// griddepcontrol.wait until this grid finished).
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float inf() { return __int_as_float(0x7f800000); }

// Decode split-K: the KV length L is cut into blocks of 16 keys; each of `splits` CTAs per kv head
// takes `per_split` consecutive blocks (at least one per warp), the last ones may have none.
__device__ __forceinline__ int decode_blocks_per_split(int blocks, int splits, int warps) {
  return max(warps, (blocks + splits - 1) / splits);
}

}  // namespace attn
}  // namespace q35k

// ---------------------------------------------------------------------------------------------
// qk_norm_rope: grid (T), block WARPS*32. One warp per head (looping over the HQ + 2*HKV heads:
// q heads, then k heads, then v heads); lane l holds dims 8l .. 8l+7 (D <= 256). The RoPE partner
// of dim j < ROTARY/2 is j + ROTARY/2, held by lane l + ROTARY/16 (a shuffle).
//   inv_freq_j = 1 / theta^(2j / ROTARY), angle = float(pos) * inv_freq_j (fp32, as the CPU
//   reference), cos/sin computed once per block into shared memory.
// k/v rows at positions >= max_context are not written (the runner keeps pos0 + T <= max_context).
namespace q35k {
namespace attn {
// One token's q, k and v heads (the body of qk_norm_rope and qk_norm_rope_batch): row = the token's
// qkv row, q_out = its [HQ, D] q row, k/v rows written at position pos of k_cache / v_cache (skipped
// when !write_kv).
template <int HQ, int HKV, int D, int ROTARY, int WARPS>
__device__ __forceinline__ void qk_norm_rope_token(const bf16* __restrict__ row, const bf16* __restrict__ q_norm_w,
                                                   const bf16* __restrict__ k_norm_w, bf16* __restrict__ q_out,
                                                   bf16* __restrict__ k_cache, bf16* __restrict__ v_cache, int pos,
                                                   bool write_kv, float theta, float eps) {
  static_assert(D % 8 == 0 && D <= 256, "qk_norm_rope: head_dim must be a multiple of 8, at most 256");
  static_assert(ROTARY % 16 == 0 && ROTARY <= D, "qk_norm_rope: rotary_dim must be a multiple of 16, <= head_dim");
  constexpr int LANES = D / 8;           // lanes holding data
  constexpr int HALF = ROTARY / 2;       // rotated pairs
  constexpr int HALF_LANES = ROTARY / 16;
  __shared__ float cos_s[HALF > 0 ? HALF : 1], sin_s[HALF > 0 ? HALF : 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int j = threadIdx.x; j < HALF; j += WARPS * 32) {
    const float inv_freq = 1.0f / powf(theta, float(2 * j) / float(ROTARY));
    const float a = float(pos) * inv_freq;
    // sin / cos of the fp32 angle: reduced to [-pi, pi] in double (k 2 pi exact to ~1e-11 for any
    // position), then the fast intrinsics (absolute error < 5e-7 there). sinf / cosf of the raw
    // angle would carry their large-argument path (a local-memory stack frame in every kernel).
    const double k = rint(double(a) * 0.15915494309189535);
    const float r = float(fma(-k, 6.283185307179586, double(a)));
    __sincosf(r, &sin_s[j], &cos_s[j]);
  }
  __syncthreads();

  const bool has_data = lane < LANES;
  for (int head = warp; head < HQ + 2 * HKV; head += WARPS) {  // warp-uniform
    const bool is_q = head < HQ, is_k = !is_q && head < HQ + HKV;
    const int kv_head = is_q ? 0 : is_k ? head - HQ : head - HQ - HKV;
    if (!is_q && !write_kv) continue;
    const bf16* src = is_q ? row + head * 2 * D : row + HQ * 2 * D + (is_k ? 0 : HKV * D) + kv_head * D;
    bf16* dst = is_q ? q_out + size_t(head) * D : (is_k ? k_cache : v_cache) + (size_t(pos) * HKV + kv_head) * D;
    float x[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (has_data) unpack8(ld_global_16(src + lane * 8), x);
    if (is_q || is_k) {
      float ss = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) ss += x[i] * x[i];
      const float inv_rms = 1.f / sqrtf(warp_sum(ss) / float(D) + eps);
      float w[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (has_data) unpack8(ld_global_16((is_q ? q_norm_w : k_norm_w) + lane * 8), w);
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = (x[i] * inv_rms) * (1.f + w[i]);
      if constexpr (HALF_LANES > 0) {
        // y_j = x_j cos - x_{j+h} sin (first half), y_{j+h} = x_{j+h} cos + x_j sin (second half).
        const bool first = lane < HALF_LANES, rotated = lane < 2 * HALF_LANES;
        const int partner = rotated ? (first ? lane + HALF_LANES : lane - HALF_LANES) : lane;
        float other[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) other[i] = __shfl_sync(0xffffffffu, x[i], partner);
        if (rotated) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int j = (lane * 8 + i) % HALF;
            x[i] = first ? x[i] * cos_s[j] - other[i] * sin_s[j] : x[i] * cos_s[j] + other[i] * sin_s[j];
          }
        }
      }
    }
    if (has_data) st_global_16(dst + lane * 8, pack8(x));
  }
}
}  // namespace attn
}  // namespace q35k

template <int HQ, int HKV, int D, int ROTARY, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
qk_norm_rope(const q35k::bf16* __restrict__ qkv,       // [T, HQ*2D + 2*HKV*D]
             const q35k::bf16* __restrict__ q_norm_w,  // [D]
             const q35k::bf16* __restrict__ k_norm_w,  // [D]
             q35k::bf16* __restrict__ q_out,           // [T, HQ, D]
             q35k::bf16* __restrict__ k_cache,         // [max_context, HKV, D]
             q35k::bf16* __restrict__ v_cache,         // [max_context, HKV, D]
             const int* __restrict__ pos0_ptr,         // [1]
             int max_context, float theta, float eps) {
  using namespace q35k;
  constexpr int ROW = HQ * 2 * D + 2 * HKV * D;
  attn::wait_for_predecessor();
  attn::allow_dependents();
  const int t = blockIdx.x;
  const int pos = *pos0_ptr + t;
  attn::qk_norm_rope_token<HQ, HKV, D, ROTARY, WARPS>(qkv + size_t(t) * ROW, q_norm_w, k_norm_w,
                                                      q_out + size_t(t) * HQ * D, k_cache, v_cache, pos,
                                                      pos < max_context, theta, eps);
}

// qk_norm_rope_batch: one token of each of B sequences (a batched decode step), grid (B). Row b is
// the token of sequence slot slots[b] at position pos[slots[b]]: its k / v rows go to that slot's
// caches, k_cache + slot * slot_stride (slot_stride = max_context * HKV * D elements). A row with
// slots[b] < 0 (padding of a graph bucket) writes nothing.
template <int HQ, int HKV, int D, int ROTARY, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
qk_norm_rope_batch(const q35k::bf16* __restrict__ qkv,       // [B, HQ*2D + 2*HKV*D]
                   const q35k::bf16* __restrict__ q_norm_w,  // [D]
                   const q35k::bf16* __restrict__ k_norm_w,  // [D]
                   q35k::bf16* __restrict__ q_out,           // [B, HQ, D]
                   q35k::bf16* __restrict__ k_cache,         // [slots, max_context, HKV, D]
                   q35k::bf16* __restrict__ v_cache,         // [slots, max_context, HKV, D]
                   const int* __restrict__ slots,            // [B]
                   const int* __restrict__ pos,              // [slots] tokens each slot holds
                   long long slot_stride, int max_context, float theta, float eps) {
  using namespace q35k;
  constexpr int ROW = HQ * 2 * D + 2 * HKV * D;
  attn::wait_for_predecessor();
  attn::allow_dependents();
  const int b = blockIdx.x, slot = slots[b];
  if (slot < 0) return;
  const int p = pos[slot];
  attn::qk_norm_rope_token<HQ, HKV, D, ROTARY, WARPS>(qkv + size_t(b) * ROW, q_norm_w, k_norm_w,
                                                      q_out + size_t(b) * HQ * D, k_cache + size_t(slot) * slot_stride,
                                                      v_cache + size_t(slot) * slot_stride, p, p < max_context, theta,
                                                      eps);
}

// ---------------------------------------------------------------------------------------------
// attention_prefill: grid (HQ, ceil(T / BLOCK_M)), block WARPS*32, dynamic shared memory
//   Q [BLOCK_M][D] + 2 stages x (K [BLOCK_N][D] + V [BLOCK_N][D]) bf16
// = 2 * D * (BLOCK_M + 4 * BLOCK_N) bytes. BLOCK_M = 16 * WARPS: each warp owns 16 query rows and
// their full O accumulator (16 x D fp32 = D/2 registers per thread). Rows of 16-byte chunks are
// XOR-swizzled (chunk c of row r lives at c ^ (r % 8)) so ldmatrix is bank-conflict free.
// Per KV tile: S = Q K^T (Q and K fragments by ldmatrix), causal mask on tiles crossing the
// diagonal, online softmax in fp32, P re-packed from the S accumulators as the A operand, O += P V
// (V fragments by ldmatrix.trans). K/V tiles are double-buffered with cp.async. The heaviest
// (last) query tiles are scheduled first. Epilogue: out = O / l * sigmoid(gate), gate read from
// qkv. Keys past pos0 + T are zero-filled (never read from the cache).
template <int HQ, int HKV, int D, int BLOCK_N, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 1)
attention_prefill(const q35k::bf16* __restrict__ q,        // [T, HQ, D] normed + roped
                  const q35k::bf16* __restrict__ k_cache,  // [>= pos0+T, HKV, D]
                  const q35k::bf16* __restrict__ v_cache,  // [>= pos0+T, HKV, D]
                  const q35k::bf16* __restrict__ qkv,      // [T, HQ*2D + 2*HKV*D] (gate)
                  q35k::bf16* __restrict__ out,            // [T, HQ*D]
                  const int* __restrict__ pos0_ptr,        // [1]
                  int T, float scale) {
  using namespace q35k;
  using namespace q35k::attn;
  static_assert(HQ % HKV == 0, "attention_prefill: HQ must be a multiple of HKV");
  static_assert(D % 64 == 0, "attention_prefill: head_dim must be a multiple of 64 (swizzle)");
  static_assert(BLOCK_N % 16 == 0, "attention_prefill: BLOCK_N must be a multiple of 16");
  constexpr int BLOCK_M = 16 * WARPS, THREADS = 32 * WARPS, CH = D / 8;  // CH: 16-byte chunks per row
  constexpr int ROW = HQ * 2 * D + 2 * HKV * D, GROUP = HQ / HKV, NT = BLOCK_N / 8;
  extern __shared__ uint4 smem_raw[];
  bf16* const sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* const sKV = sQ + BLOCK_M * D;  // stage s: K at sKV + s*2*BLOCK_N*D, V after it

  wait_for_predecessor();
  const int h = blockIdx.x, kvh = h / GROUP;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BLOCK_M;
  const int pos0 = *pos0_ptr;
  const int L = pos0 + T;                                    // valid cache rows
  const int kv_end = pos0 + min(m0 + BLOCK_M, T);            // keys this tile needs
  const int n_tiles = (kv_end + BLOCK_N - 1) / BLOCK_N;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, c = lane % 4;
  auto swz = [](int r, int ch) { return r * D + ((ch ^ (r & 7)) << 3); };  // element offset

  for (int i = tid; i < BLOCK_M * CH; i += THREADS) {
    const int r = i / CH, ch = i % CH, t = m0 + r;
    const bool valid = t < T;
    cp_async_16(smem_u32(sQ + swz(r, ch)), q + (size_t(valid ? t : 0) * HQ + h) * D + ch * 8, valid);
  }
  auto load_kv = [&](int tile, int stage) {
    bf16* sK = sKV + stage * 2 * BLOCK_N * D;
    bf16* sV = sK + BLOCK_N * D;
    for (int i = tid; i < BLOCK_N * CH; i += THREADS) {
      const int r = i / CH, ch = i % CH, key = tile * BLOCK_N + r;
      const bool valid = key < L;
      const size_t off = (size_t(valid ? key : 0) * HKV + kvh) * D + ch * 8;
      cp_async_16(smem_u32(sK + swz(r, ch)), k_cache + off, valid);
      cp_async_16(smem_u32(sV + swz(r, ch)), v_cache + off, valid);
    }
  };
  load_kv(0, 0);
  cp_async_commit();

  float o[D / 8][4];  // O [16 rows, D] of this warp: n-tile n covers dims 8n .. 8n+7
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_run[2] = {-attn::inf(), -attn::inf()}, l_run[2] = {0.f, 0.f};  // rows g, g+8 (raw score units)
  const float sl = scale * kLog2e;
  const int row0 = m0 + warp * 16;          // first query row (token index) of this warp
  const int qpos[2] = {pos0 + row0 + g, pos0 + row0 + g + 8};

  // ldmatrix row addresses (bytes). Rows of a fragment are 8 consecutive rows, so the swizzle key
  // is lane % 8; k-steps 4u + k3 differ from k3 by u whole 128-byte swizzle groups:
  // chunk(2*kstep + half) = 8u + ((2*k3 + half) ^ (lane % 8)).
  u32 q_addr[4], k_off[4], v_off[4];
#pragma unroll
  for (int k3 = 0; k3 < 4; ++k3) {
    const int x = lane & 7;
    q_addr[k3] = smem_u32(sQ) + ((warp * 16 + x + 8 * ((lane >> 3) & 1)) * D + (((2 * k3 + (lane >> 4)) ^ x) << 3)) * 2;
    k_off[k3] = ((x + 8 * (lane >> 4)) * D + (((2 * k3 + ((lane >> 3) & 1)) ^ x) << 3)) * 2;
    v_off[k3] = ((x + 8 * ((lane >> 3) & 1)) * D + (((2 * k3 + (lane >> 4)) ^ x) << 3)) * 2;
  }

  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) {
      load_kv(j + 1, (j + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* sK = sKV + (j & 1) * 2 * BLOCK_N * D;
    const bf16* sV = sK + BLOCK_N * D;

    // S [16, BLOCK_N] = Q K^T
    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    const u32 k_stage = smem_u32(sK);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 a[4];
      ldmatrix_x4(a, q_addr[kk & 3] + (kk >> 2) * 128);
#pragma unroll
      for (int n2 = 0; n2 < NT / 2; ++n2) {
        u32 b[4];
        ldmatrix_x4(b, k_stage + k_off[kk & 3] + (kk >> 2) * 128 + n2 * 16 * D * 2);
        mma_bf16(s[2 * n2], a[0], a[1], a[2], a[3], b[0], b[1]);
        mma_bf16(s[2 * n2 + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
      }
    }

    const int n0 = j * BLOCK_N;
    if (n0 + BLOCK_N - 1 > pos0 + row0) {  // the tile crosses this warp's diagonal
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (n0 + n * 8 + 2 * c + (e & 1) > qpos[e >> 1]) s[n][e] = -attn::inf();
    }

    // Online softmax. Every row sees key 0 in tile 0, so the running max is finite from then on.
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_run[r];
#pragma unroll
      for (int n = 0; n < NT; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      alpha[r] = exp2f((m_run[r] - mx) * sl);
      m_run[r] = mx;
      const float base = mx * sl;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        s[n][2 * r] = exp2f(fmaf(s[n][2 * r], sl, -base));
        s[n][2 * r + 1] = exp2f(fmaf(s[n][2 * r + 1], sl, -base));
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha[r] + sum;
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }

    // O [16, D] += P [16, BLOCK_N] V [BLOCK_N, D]
    const u32 v_stage = smem_u32(sV);
#pragma unroll
    for (int ks = 0; ks < BLOCK_N / 16; ++ks) {
      const u32 a0 = f32x2_to_bf16x2(s[2 * ks][0], s[2 * ks][1]);
      const u32 a1 = f32x2_to_bf16x2(s[2 * ks][2], s[2 * ks][3]);
      const u32 a2 = f32x2_to_bf16x2(s[2 * ks + 1][0], s[2 * ks + 1][1]);
      const u32 a3 = f32x2_to_bf16x2(s[2 * ks + 1][2], s[2 * ks + 1][3]);
#pragma unroll
      for (int n2 = 0; n2 < D / 16; ++n2) {
        u32 b[4];
        ldmatrix_x4_trans(b, v_stage + v_off[n2 & 3] + (n2 >> 2) * 128 + ks * 16 * D * 2);
        mma_bf16(o[2 * n2], a0, a1, a2, a3, b[0], b[1]);
        mma_bf16(o[2 * n2 + 1], a0, a1, a2, a3, b[2], b[3]);
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

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
    for (int n = 0; n < D / 8; ++n) {
      const int d = n * 8 + 2 * c;
      const u32 gw = *reinterpret_cast<const u32*>(gate + d);
      *reinterpret_cast<u32*>(dst + d) = f32x2_to_bf16x2(o[n][2 * r] * inv_l * sigmoid(bf16x2_lo(gw)),
                                                         o[n][2 * r + 1] * inv_l * sigmoid(bf16x2_hi(gw)));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// attention_decode: grid (HKV * QG, splits), block WARPS*32. A kv head's GROUP = HQ / HKV query heads
// are QG = max(1, GROUP / 8) blocks of QPB = GROUP / QG heads (GROUP > 8 must be a multiple of 8).
// Block x = kvh * QG + qg takes the R = QPB*T <= 8 query rows (row r = token r / QPB, q head
// kvh*GROUP + qg*QPB + r % QPB) together, so each K/V row is read once per block (QG times per kv
// head when GROUP > 8). Keys are cut into blocks of 16; a split owns decode_blocks_per_split blocks
// and its warps take them round-robin. Per block, straight from global memory into registers
// (no shared memory):
//   S [16 rows (8 used), 16 keys] = Q K^T: a lane's 16-byte K load (8 dims of one key) is its B
//     fragment for two k-steps; Q's A fragments use the same permutation of the head dims
//     (logical k {2c, 2c+1 | 2c+8, 2c+9} of k-step 2s+u = dims 32s + 8c + 4u + {0, 1 | 2, 3}).
//   O^T [D, 8 rows] += V^T [D, 16 keys] P^T [16 keys, 8 rows]: P^T's B fragment is S's accumulator
//     layout as is; V^T's A fragments are built with prmt from 16-byte V loads (lane (g, c) loads
//     keys {2c, 2c+1, 2c+8, 2c+9}, dims 64q + 8g .. +8), so m-tile 4q + j row g is dim
//     64q + 8g + 2j and row g+8 is that dim + 1.
// The warps' (m, l, O) are combined in shared memory and written as this split's partial:
//   part_o  [HKV * QG, splits, 8, D] fp32, unnormalised O relative to m
//   part_ml [HKV * QG, splits, 8, 2] fp32, (m in raw score units, l)
// Splits past the end of the KV length write nothing (the merge derives the same count).
namespace q35k {
namespace attn {
// The body of attention_decode (block vb = kvh * QG + qg, split `split` of `splits`) over the cache
// rows 0 .. pos0+T-1 of one sequence; attention_decode_batch runs it per sequence.
// LATE_V: load a key block's V rows after its scores (fewer registers live at once: sm_80 would
// otherwise spill), instead of with its K rows.
template <int HQ, int HKV, int D, int WARPS, bool LATE_V = false>
__device__ __forceinline__ void attention_decode_block(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                                                       const bf16* __restrict__ v_cache, float* __restrict__ part_o,
                                                       float* __restrict__ part_ml, int pos0, int T, float scale,
                                                       int vb, int split, int splits) {
  static_assert(HQ % HKV == 0 && (HQ / HKV <= 8 || HQ / HKV % 8 == 0),
                "attention_decode: q heads per kv head must be at most 8 or a multiple of 8");
  static_assert(D % 64 == 0, "attention_decode: head_dim must be a multiple of 64");
  constexpr int GROUP = HQ / HKV, QG = GROUP > 8 ? GROUP / 8 : 1, QPB = GROUP / QG;
  constexpr int THREADS = WARPS * 32, SLABS = D / 32, QUADS = D / 64;
  __shared__ float sm_o[WARPS][8][D];
  __shared__ float sm_m[WARPS][8], sm_l[WARPS][8];

  const int kvh = vb / QG, qg = vb % QG;
  const int L = pos0 + T;
  const int blocks = (L + 15) / 16;
  const int per_split = decode_blocks_per_split(blocks, splits, WARPS);
  const int b_begin = split * per_split, b_end = min(b_begin + per_split, blocks);
  if (b_begin >= blocks) return;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, c = lane % 4;
  const int R = QPB * T;

  // Q A-fragments of row g (rows g+8 are zero): qa[s] = dims 32s + 8c .. +8.
  uint4 qa[SLABS];
  const int limit = g < R ? pos0 + g / QPB + 1 : L;  // keys visible to row g
  if (g < R) {
    const bf16* qrow = q + (size_t(g / QPB) * HQ + kvh * GROUP + qg * QPB + g % QPB) * D + 8 * c;
#pragma unroll
    for (int s = 0; s < SLABS; ++s) qa[s] = ld_global_16(qrow + 32 * s);
  } else {
#pragma unroll
    for (int s = 0; s < SLABS; ++s) qa[s] = make_uint4(0, 0, 0, 0);
  }

  float o[D / 16][4];  // O^T m-tiles: o[4q+j] = {O[2c][d], O[2c+1][d], O[2c][d+1], O[2c+1][d+1]}, d = 64q+8g+2j
#pragma unroll
  for (int i = 0; i < D / 16; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run = -attn::inf(), l_run = 0.f;  // row g
  const float sl = scale * kLog2e;
  const size_t kv_stride = size_t(HKV) * D;
  const bf16* k_head = k_cache + size_t(kvh) * D;
  const bf16* v_head = v_cache + size_t(kvh) * D;

  // A block's K and V are loaded together up front (16 KiB per warp in flight); prefetching the
  // next block's as well would need more than 255 registers.
  uint4 kr[2][SLABS];  // keys k0 + 8nt + g, dims 32s + 8c .. +8
  uint4 vr[4][QUADS];  // keys k0 + {2c, 2c+1, 2c+8, 2c+9}, dims 64q + 8g .. +8
  auto load_k = [&](int blk) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const bf16* p = k_head + size_t(min(blk * 16 + 8 * nt + g, L - 1)) * kv_stride + 8 * c;
#pragma unroll
      for (int sb = 0; sb < SLABS; ++sb) kr[nt][sb] = ld_stream_16(p + 32 * sb);
    }
  };
  auto load_v = [&](int blk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bf16* p = v_head + size_t(min(blk * 16 + 2 * c + (i & 1) + 8 * (i >> 1), L - 1)) * kv_stride + 8 * g;
#pragma unroll
      for (int qd = 0; qd < QUADS; ++qd) vr[i][qd] = ld_stream_16(p + 64 * qd);
    }
  };
  for (int b = b_begin + warp; b < b_end; b += WARPS) {
    const int k0 = b * 16;
    load_k(b);
    if constexpr (!LATE_V) load_v(b);
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int sb = 0; sb < SLABS; ++sb) {
        mma_bf16(s[nt], qa[sb].x, 0u, qa[sb].y, 0u, kr[nt][sb].x, kr[nt][sb].y);
        mma_bf16(s[nt], qa[sb].z, 0u, qa[sb].w, 0u, kr[nt][sb].z, kr[nt][sb].w);
      }
    }
    // Row g: keys k0 + 8nt + 2c + e, e = 0, 1 (s[nt][2..3] belong to the unused rows g+8).
    float mx = m_run;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (k0 + 8 * nt + 2 * c + e >= limit) s[nt][e] = -attn::inf();
        mx = fmaxf(mx, s[nt][e]);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float base = mx == -attn::inf() ? 0.f : mx * sl;  // a row with no visible key yet stays empty
    const float alpha = exp2f(m_run * sl - base);
    m_run = mx;
    float p[2][2], sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        p[nt][e] = exp2f(fmaf(s[nt][e], sl, -base));
        sum += p[nt][e];
      }
    l_run = l_run * alpha + sum;
    const float alpha_lo = __shfl_sync(0xffffffffu, alpha, 8 * c), alpha_hi = __shfl_sync(0xffffffffu, alpha, 8 * c + 4);
    const u32 pb0 = f32x2_to_bf16x2(p[0][0], p[0][1]), pb1 = f32x2_to_bf16x2(p[1][0], p[1][1]);
    if constexpr (LATE_V) load_v(b);
#pragma unroll
    for (int qd = 0; qd < QUADS; ++qd) {
      const u32 w0[4] = {vr[0][qd].x, vr[0][qd].y, vr[0][qd].z, vr[0][qd].w};
      const u32 w1[4] = {vr[1][qd].x, vr[1][qd].y, vr[1][qd].z, vr[1][qd].w};
      const u32 w2[4] = {vr[2][qd].x, vr[2][qd].y, vr[2][qd].z, vr[2][qd].w};
      const u32 w3[4] = {vr[3][qd].x, vr[3][qd].y, vr[3][qd].z, vr[3][qd].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float (&acc)[4] = o[4 * qd + j];
        acc[0] *= alpha_lo;
        acc[1] *= alpha_hi;
        acc[2] *= alpha_lo;
        acc[3] *= alpha_hi;
        mma_bf16(acc, prmt(w0[j], w1[j], 0x5410u), prmt(w0[j], w1[j], 0x7632u), prmt(w2[j], w3[j], 0x5410u),
                 prmt(w2[j], w3[j], 0x7632u), pb0, pb1);
      }
    }
  }

  // Combine the warps: M = max over warps, O = sum exp(m_w - M) O_w, l likewise.
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
  if (c == 0) {
    sm_m[warp][g] = m_run;
    sm_l[warp][g] = l_run;
  }
#pragma unroll
  for (int i = 0; i < D / 16; ++i) {
    const int d = 64 * (i / 4) + 8 * g + 2 * (i % 4);
    sm_o[warp][2 * c][d] = o[i][0];
    sm_o[warp][2 * c + 1][d] = o[i][1];
    sm_o[warp][2 * c][d + 1] = o[i][2];
    sm_o[warp][2 * c + 1][d + 1] = o[i][3];
  }
  __syncthreads();
  const size_t part = (size_t(vb) * splits + split) * 8;
  for (int i = tid; i < R * D; i += THREADS) {
    const int r = i / D, d = i % D;
    float M = -attn::inf();
#pragma unroll
    for (int w = 0; w < WARPS; ++w) M = fmaxf(M, sm_m[w][r]);
    const float base = M == -attn::inf() ? 0.f : M * sl;
    float acc = 0.f, l = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float f = exp2f(sm_m[w][r] * sl - base);
      acc += f * sm_o[w][r][d];
      l += f * sm_l[w][r];
    }
    part_o[(part + r) * D + d] = acc;
    if (d == 0) {
      part_ml[(part + r) * 2] = M;
      part_ml[(part + r) * 2 + 1] = l;
    }
  }
}
}  // namespace attn
}  // namespace q35k

template <int HQ, int HKV, int D, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
attention_decode(const q35k::bf16* __restrict__ q,        // [T, HQ, D] normed + roped
                 const q35k::bf16* __restrict__ k_cache,  // [>= pos0+T, HKV, D]
                 const q35k::bf16* __restrict__ v_cache,  // [>= pos0+T, HKV, D]
                 float* __restrict__ part_o,              // [HKV * QG, splits, 8, D]
                 float* __restrict__ part_ml,             // [HKV * QG, splits, 8, 2]
                 const int* __restrict__ pos0_ptr,        // [1]
                 int T, float scale) {
  q35k::attn::wait_for_predecessor();
  q35k::attn::allow_dependents();
  q35k::attn::attention_decode_block<HQ, HKV, D, WARPS>(q, k_cache, v_cache, part_o, part_ml, *pos0_ptr, T, scale,
                                                        blockIdx.x, blockIdx.y, gridDim.y);
}

// attention_decode_batch: one query token of each of B sequences (a batched decode step), grid
// (HKV * QG, splits, B). Sequence b (blockIdx.z) is slot slots[b] with L = pos[slot] + 1 keys in its
// own cache rows (k_cache + slot * slot_stride, slot_stride = max_context * HKV * D elements); q row
// b; partials at part_o + b * HKV*QG*splits*8*D, part_ml + b * HKV*QG*splits*8*2. Rows with
// slots[b] < 0 (bucket padding) write nothing. The split count is per launch (per graph bucket);
// each sequence cuts its own length into those splits.
template <int HQ, int HKV, int D, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
attention_decode_batch(const q35k::bf16* __restrict__ q,        // [B, HQ, D] normed + roped
                       const q35k::bf16* __restrict__ k_cache,  // [slots, max_context, HKV, D]
                       const q35k::bf16* __restrict__ v_cache,  // [slots, max_context, HKV, D]
                       float* __restrict__ part_o,              // [B, HKV * QG, splits, 8, D]
                       float* __restrict__ part_ml,             // [B, HKV * QG, splits, 8, 2]
                       const int* __restrict__ slots,           // [B]
                       const int* __restrict__ pos,             // [slots]
                       long long slot_stride, float scale) {
  constexpr int GROUP = HQ / HKV, QG = GROUP > 8 ? GROUP / 8 : 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  constexpr bool late_v = true;  // 255 registers on sm_80 otherwise: spills
#else
  constexpr bool late_v = false;
#endif
  q35k::attn::wait_for_predecessor();
  q35k::attn::allow_dependents();
  const int b = blockIdx.z, slot = slots[b];
  if (slot < 0) return;
  const size_t parts = size_t(HKV * QG) * gridDim.y * 8;
  q35k::attn::attention_decode_block<HQ, HKV, D, WARPS, late_v>(
      q + size_t(b) * HQ * D, k_cache + size_t(slot) * slot_stride, v_cache + size_t(slot) * slot_stride,
      part_o + size_t(b) * parts * D, part_ml + size_t(b) * parts * 2, pos[slot], 1, scale, blockIdx.x, blockIdx.y,
      gridDim.y);
}

// attention_decode_merge: grid (T * HQ, D / 64), block 256 (8 warps). Combines the partials of
// the splits that attention_decode (with the same WARPS) wrote for output row (t, h), dims
// 64y .. 64y+63, then applies the gate:
//   out [T, HQ*D] bf16, out[t, h*D + d] = (sum_s e^(m_s - M) o_s[d]) / (sum_s e^(m_s - M) l_s)
//                                         * sigmoid(gate[t, h, d])
// Warp w takes splits w, w+8, ...; lane l dims 2l, 2l+1 of the slice; the warps' sums are combined
// in shared memory.
namespace q35k {
namespace attn {
// The body of attention_decode_merge for output row (t, h), dims 64 dy .. +63, of one sequence.
template <int HQ, int HKV, int D, int WARPS>
__device__ __forceinline__ void attention_decode_merge_row(const float* __restrict__ part_o,
                                                           const float* __restrict__ part_ml,
                                                           const bf16* __restrict__ qkv, bf16* __restrict__ out,
                                                           int pos0, int T, int splits, float scale, int t, int h,
                                                           int dy) {
  static_assert(D % 64 == 0, "attention_decode_merge: head_dim must be a multiple of 64");
  constexpr int GROUP = HQ / HKV, QG = GROUP > 8 ? GROUP / 8 : 1, QPB = GROUP / QG;  // as attention_decode
  constexpr int ROW = HQ * 2 * D + 2 * HKV * D, MW = 8;
  __shared__ float sm_max[MW], sm_l[MW];
  __shared__ float2 sm_acc[MW][32];
  const int vb = h / QPB, r = t * QPB + h % QPB;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, d = dy * 64 + 2 * lane;
  const int L = pos0 + T;
  const int blocks = (L + 15) / 16;
  const int per_split = decode_blocks_per_split(blocks, splits, WARPS);
  const int active = min(splits, (blocks + per_split - 1) / per_split);
  const float sl = scale * kLog2e;
  const float* ml = part_ml + (size_t(vb) * splits * 8 + r) * 2;  // split s at ml[s * 16]
  const float* po = part_o + (size_t(vb) * splits * 8 + r) * D + d;  // split s at po[s * 8 * D]

  // Online merge per warp (no separate max pass). A split may hold no visible key of this row
  // (m = -inf, when T > 1); every row sees key 0 in split 0, so the final max is finite.
  float m_w = -attn::inf(), l = 0.f;
  float2 acc = make_float2(0.f, 0.f);
#pragma unroll 4
  for (int s = warp; s < active; s += MW) {
    const float m_s = ml[size_t(s) * 16], l_s = ml[size_t(s) * 16 + 1];
    const float2 v = *reinterpret_cast<const float2*>(po + size_t(s) * 8 * D);
    const float m_new = fmaxf(m_w, m_s);
    const float base = m_new == -attn::inf() ? 0.f : m_new * sl;
    const float a = exp2f(m_w * sl - base), f = exp2f(m_s * sl - base);
    l = l * a + f * l_s;
    acc.x = acc.x * a + f * v.x;
    acc.y = acc.y * a + f * v.y;
    m_w = m_new;
  }
  sm_acc[warp][lane] = acc;
  if (lane == 0) {
    sm_max[warp] = m_w;
    sm_l[warp] = l;
  }
  __syncthreads();
  if (warp != 0) return;
  float M = -attn::inf();
#pragma unroll
  for (int w = 0; w < MW; ++w) M = fmaxf(M, sm_max[w]);
  float lt = 0.f;
  acc = make_float2(0.f, 0.f);
#pragma unroll
  for (int w = 0; w < MW; ++w) {
    const float f = exp2f((sm_max[w] - M) * sl);  // warps without splits: exp2(-inf) = 0
    lt += f * sm_l[w];
    acc.x += f * sm_acc[w][lane].x;
    acc.y += f * sm_acc[w][lane].y;
  }
  const u32 gw = *reinterpret_cast<const u32*>(qkv + size_t(t) * ROW + h * 2 * D + D + d);
  *reinterpret_cast<u32*>(out + size_t(t) * HQ * D + h * D + d) =
      f32x2_to_bf16x2(acc.x / lt * sigmoid(bf16x2_lo(gw)), acc.y / lt * sigmoid(bf16x2_hi(gw)));
}
}  // namespace attn
}  // namespace q35k

template <int HQ, int HKV, int D, int WARPS>
__global__ void __launch_bounds__(256)
attention_decode_merge(const float* __restrict__ part_o,     // [HKV * QG, splits, 8, D]
                       const float* __restrict__ part_ml,    // [HKV * QG, splits, 8, 2]
                       const q35k::bf16* __restrict__ qkv,   // [T, HQ*2D + 2*HKV*D] (gate)
                       q35k::bf16* __restrict__ out,         // [T, HQ*D]
                       const int* __restrict__ pos0_ptr,     // [1]
                       int T, int splits, float scale) {
  q35k::attn::wait_for_predecessor();
  q35k::attn::allow_dependents();
  q35k::attn::attention_decode_merge_row<HQ, HKV, D, WARPS>(part_o, part_ml, qkv, out, *pos0_ptr, T, splits, scale,
                                                            blockIdx.x / HQ, blockIdx.x % HQ, blockIdx.y);
}

// attention_decode_merge_batch: grid (B * HQ, D / 64), block 256; combines attention_decode_batch's
// partials of sequence b = blockIdx.x / HQ (slot slots[b], L = pos[slot] + 1) into out row b with
// the gate of qkv row b. Padding rows (slots[b] < 0) write zeros.
template <int HQ, int HKV, int D, int WARPS>
__global__ void __launch_bounds__(256)
attention_decode_merge_batch(const float* __restrict__ part_o,     // [B, HKV * QG, splits, 8, D]
                             const float* __restrict__ part_ml,    // [B, HKV * QG, splits, 8, 2]
                             const q35k::bf16* __restrict__ qkv,   // [B, HQ*2D + 2*HKV*D] (gate)
                             q35k::bf16* __restrict__ out,         // [B, HQ*D]
                             const int* __restrict__ slots,        // [B]
                             const int* __restrict__ pos,          // [slots]
                             int splits, float scale) {
  constexpr int GROUP = HQ / HKV, QG = GROUP > 8 ? GROUP / 8 : 1, ROW = HQ * 2 * D + 2 * HKV * D;
  q35k::attn::wait_for_predecessor();
  q35k::attn::allow_dependents();
  const int b = blockIdx.x / HQ, h = blockIdx.x % HQ, slot = slots[b];
  q35k::bf16* row = out + size_t(b) * HQ * D;
  if (slot < 0) {
    if (threadIdx.x < 32) *reinterpret_cast<q35k::u32*>(row + h * D + blockIdx.y * 64 + 2 * threadIdx.x) = 0u;
    return;
  }
  const size_t parts = size_t(HKV * QG) * splits * 8;
  q35k::attn::attention_decode_merge_row<HQ, HKV, D, WARPS>(part_o + size_t(b) * parts * D,
                                                            part_ml + size_t(b) * parts * 2, qkv + size_t(b) * ROW, row,
                                                            pos[slot], 1, splits, scale, 0, h, blockIdx.y);
}
