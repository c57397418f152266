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
// 4. attention_decode_fused: 1 and 3 in one launch (what a decode step runs): the split blocks norm
//    and rope their queries and this call's k / v rows themselves (and write the cache rows), the
//    merge items wait for their splits' partials (atomic tickets; sm_90 PDL, L2 prefetch of the
//    cached K/V rows before griddepcontrol.wait).
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

// One head of qk_norm_rope, by one warp (lane l holds dims 8l .. 8l+7, D <= 256): dst = src after
// the zero-centred RMSNorm over D with weights w_norm (1 + w) and NeoX RoPE on the first ROTARY dims
// (cos_s / sin_s [ROTARY / 2] of the position); w_norm == nullptr copies src (v heads). The RoPE
// partner of dim j < ROTARY/2 is j + ROTARY/2, held by lane l + ROTARY/16 (a shuffle). dst: global
// or shared memory.
template <int D, int ROTARY>
__device__ __forceinline__ void norm_rope_head(const bf16* __restrict__ src, const bf16* __restrict__ w_norm,
                                               const float* cos_s, const float* sin_s, float eps, bf16* dst) {
  constexpr int LANES = D / 8;      // lanes holding data
  constexpr int HALF = ROTARY / 2;  // rotated pairs
  constexpr int HALF_LANES = ROTARY / 16;
  const int lane = threadIdx.x % 32;
  const bool has_data = lane < LANES;
  float x[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (has_data) unpack8(ld_global_16(src + lane * 8), x);
  if (w_norm) {
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) ss += x[i] * x[i];
    const float inv_rms = 1.f / sqrtf(warp_sum(ss) / float(D) + eps);
    float w[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (has_data) unpack8(ld_global_16(w_norm + lane * 8), w);
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
  if (has_data) *reinterpret_cast<uint4*>(dst + lane * 8) = pack8(x);
}

// cos(a) and sin(a) of an fp32 angle (|a| < 2^20 * pi/2, i.e. any position below ~1.6M), rounded to
// fp32 from double: Cody-Waite reduction by pi/2 (fdlibm's 33 + 53 bit split of pi/2: k * PIO2_HI is
// exact for |k| < 2^20) and fdlibm's __kernel_sin / __kernel_cos polynomials on [-pi/4, pi/4]. No
// local memory, and within an ulp of the correctly rounded values (the CPU reference's std::cos).
__device__ __forceinline__ void rope_cos_sin(float a, float& c, float& s) {
  const double x = a;
  const double k = rint(x * 6.36619772367581382433e-01);  // 2 / pi
  const double r = (x - k * 1.57079632673412561417e+00) - k * 6.07710050650619224932e-11;
  const double z = r * r;
  const double sr =
      r + r * z *
              (-1.66666666666666324348e-01 +
               z * (8.33333333332248946124e-03 +
                    z * (-1.98412698298579493134e-04 +
                         z * (2.75573137070700676789e-06 + z * (-2.50507602534068634195e-08 + z * 1.58969099521155010221e-10)))));
  const double cr =
      1.0 - 0.5 * z +
      z * z *
          (4.16666666666666019037e-02 +
           z * (-1.38888888888741095749e-03 +
                z * (2.48015872894767294178e-05 +
                     z * (-2.75573143513906633035e-07 + z * (2.08757232129817482790e-09 + z * -1.13596475577881948265e-11)))));
  const int q = int(static_cast<long long>(k) & 3);
  const double cq = q == 0 ? cr : q == 1 ? -sr : q == 2 ? -cr : sr;
  const double sq = q == 0 ? sr : q == 1 ? cr : q == 2 ? -sr : -cr;
  c = float(cq);
  s = float(sq);
}

// RoPE's cos / sin [ROTARY / 2] at position pos: inv_freq_j = 1 / theta^(2j / ROTARY), angle =
// float(pos) * inv_freq_j (fp32, as the CPU reference); entries j = from, from + step, ...
// cos and sin of a are taken in double and rounded (rope_cos_sin): cosf / sinf keep a Payne-Hanek
// path with a stack array for large arguments, which the fused decode kernel must not have.
template <int ROTARY>
__device__ __forceinline__ void rope_table(int pos, float theta, float* cos_s, float* sin_s, int from, int step) {
  for (int j = from; j < ROTARY / 2; j += step) {
    const float inv_freq = 1.0f / powf(theta, float(2 * j) / float(ROTARY));
    const float a = float(pos) * inv_freq;
    rope_cos_sin(a, cos_s[j], sin_s[j]);
  }
}

}  // namespace attn
}  // namespace q35k

// ---------------------------------------------------------------------------------------------
// qk_norm_rope: grid (T), block WARPS*32. One warp per head (looping over the HQ + 2*HKV heads:
// q heads, then k heads, then v heads; attn::norm_rope_head); cos/sin computed once per block into
// shared memory (attn::rope_table).
// k/v rows at positions >= max_context are not written (the runner keeps pos0 + T <= max_context).
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
  static_assert(D % 8 == 0 && D <= 256, "qk_norm_rope: head_dim must be a multiple of 8, at most 256");
  static_assert(ROTARY % 16 == 0 && ROTARY <= D, "qk_norm_rope: rotary_dim must be a multiple of 16, <= head_dim");
  constexpr int ROW = HQ * 2 * D + 2 * HKV * D;
  constexpr int HALF = ROTARY / 2;  // rotated pairs
  __shared__ float cos_s[HALF > 0 ? HALF : 1], sin_s[HALF > 0 ? HALF : 1];

  attn::wait_for_predecessor();
  attn::allow_dependents();
  const int t = blockIdx.x;
  const int pos = *pos0_ptr + t;
  const int warp = threadIdx.x / 32;
  attn::rope_table<ROTARY>(pos, theta, cos_s, sin_s, threadIdx.x, WARPS * 32);
  __syncthreads();

  const bf16* row = qkv + size_t(t) * ROW;
  for (int head = warp; head < HQ + 2 * HKV; head += WARPS) {  // warp-uniform
    const bool is_q = head < HQ, is_k = !is_q && head < HQ + HKV;
    const int kv_head = is_q ? 0 : is_k ? head - HQ : head - HQ - HKV;
    if (!is_q && pos >= max_context) continue;
    const bf16* src = is_q ? row + head * 2 * D : row + HQ * 2 * D + (is_k ? 0 : HKV * D) + kv_head * D;
    bf16* dst = is_q ? q_out + (size_t(t) * HQ + head) * D
                     : (is_k ? k_cache : v_cache) + (size_t(pos) * HKV + kv_head) * D;
    attn::norm_rope_head<D, ROTARY>(src, is_q ? q_norm_w : is_k ? k_norm_w : nullptr, cos_s, sin_s, eps, dst);
  }
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

// Splits of `splits` that hold keys of a KV length L (the others write no partial).
template <int WARPS>
__device__ __forceinline__ int decode_active_splits(int L, int splits) {
  const int blocks = (L + 15) / 16;
  const int per_split = decode_blocks_per_split(blocks, splits, WARPS);
  return min(splits, (blocks + per_split - 1) / per_split);
}

// The partial of split `split` of block vb (see above), by the whole block. Row r's query (bf16,
// normed + roped) is at q0 + ((r / QPB) * q_tok + r % QPB) * D, in global or shared memory.
// FRESH: the keys of this call (pos0 .. pos0+T-1) are not read from the caches: the blocks of 16 keys
// stop at pos0, and the split whose blocks include key pos0 adds them as one more step (by the warp
// that has that block) from k_new / v_new [T][D] in shared memory. sm_o: WARPS * 8 * D floats of
// shared memory; it may alias q0, k_new and v_new (the block synchronises before writing it).
// Returns at once for a split with no keys.
template <int HQ, int HKV, int D, int WARPS, bool FRESH>
__device__ __forceinline__ void decode_partial(const bf16* q0, int q_tok, const bf16* __restrict__ k_cache,
                                               const bf16* __restrict__ v_cache, const bf16* k_new,
                                               const bf16* v_new, float* sm_o, float (&sm_m)[WARPS][8],
                                               float (&sm_l)[WARPS][8], float* __restrict__ part_o,
                                               float* __restrict__ part_ml, int vb, int split, int splits, int pos0,
                                               int T, float scale) {
  static_assert(HQ % HKV == 0 && (HQ / HKV <= 8 || HQ / HKV % 8 == 0),
                "attention_decode: q heads per kv head must be at most 8 or a multiple of 8");
  static_assert(D % 64 == 0, "attention_decode: head_dim must be a multiple of 64");
  constexpr int GROUP = HQ / HKV, QG = GROUP > 8 ? GROUP / 8 : 1, QPB = GROUP / QG;
  constexpr int THREADS = WARPS * 32, SLABS = D / 32, QUADS = D / 64;
  const int kvh = vb / QG;
  const int L = pos0 + T;
  const int blocks = (L + 15) / 16;
  const int per_split = decode_blocks_per_split(blocks, splits, WARPS);
  const int b_begin = split * per_split, b_end = min(b_begin + per_split, blocks);
  if (b_begin >= blocks) return;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, c = lane % 4;
  const int R = QPB * T;
  // Keys read from the caches: below Lc (FRESH: this call's keys come last, from shared memory).
  const int Lc = FRESH ? pos0 : L;
  const int b_end_c = FRESH ? min(b_end, (Lc + 15) / 16) : b_end;
  const bool tail = FRESH && pos0 / 16 >= b_begin && pos0 / 16 < b_end && warp == (pos0 / 16 - b_begin) % WARPS;

  // Q A-fragments of row g (rows g+8 are zero): qa[s] = dims 32s + 8c .. +8.
  uint4 qa[SLABS];
  const int limit = g < R ? pos0 + g / QPB + 1 : L;  // keys visible to row g
  const int limit_c = min(limit, Lc);               // ... of those from the caches
  if (g < R) {
    const bf16* qrow = q0 + (size_t(g / QPB) * q_tok + g % QPB) * D + 8 * c;
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
      const bf16* p = k_head + size_t(min(blk * 16 + 8 * nt + g, Lc - 1)) * kv_stride + 8 * c;
#pragma unroll
      for (int sb = 0; sb < SLABS; ++sb) kr[nt][sb] = ld_stream_16(p + 32 * sb);
    }
  };
  auto load_v = [&](int blk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bf16* p = v_head + size_t(min(blk * 16 + 2 * c + (i & 1) + 8 * (i >> 1), Lc - 1)) * kv_stride + 8 * g;
#pragma unroll
      for (int qd = 0; qd < QUADS; ++qd) vr[i][qd] = ld_stream_16(p + 64 * qd);
    }
  };
  // One step: keys k0 .. k0+15 in kr (vr loaded, or loaded by late() once the scores are taken),
  // those at or past lim (row g's) masked.
  auto step = [&](int k0, int lim, auto&& late) {
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
        if (k0 + 8 * nt + 2 * c + e >= lim) s[nt][e] = -attn::inf();
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
    late();
    const float alpha_lo = __shfl_sync(0xffffffffu, alpha, 8 * c), alpha_hi = __shfl_sync(0xffffffffu, alpha, 8 * c + 4);
    const u32 pb0 = f32x2_to_bf16x2(p[0][0], p[0][1]), pb1 = f32x2_to_bf16x2(p[1][0], p[1][1]);
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
  };
  for (int b = b_begin + warp; b < b_end_c; b += WARPS) {
    load_k(b);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    load_v(b);
    step(b * 16, limit_c, [] {});
#else
    // sm_80's ptxas needs K's registers free before V's loads (255 registers and spills otherwise).
    step(b * 16, limit_c, [&] { load_v(b); });
#endif
  }
  if (tail) {  // this call's keys pos0 .. pos0+T-1 (T <= 8; the rest of the step masked)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const bf16* p = k_new + size_t(min(8 * nt + g, T - 1)) * D + 8 * c;
#pragma unroll
      for (int sb = 0; sb < SLABS; ++sb) kr[nt][sb] = *reinterpret_cast<const uint4*>(p + 32 * sb);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bf16* p = v_new + size_t(min(2 * c + (i & 1) + 8 * (i >> 1), T - 1)) * D + 8 * g;
#pragma unroll
      for (int qd = 0; qd < QUADS; ++qd) vr[i][qd] = *reinterpret_cast<const uint4*>(p + 64 * qd);
    }
    step(pos0, limit, [] {});
  }

  // Combine the warps: M = max over warps, O = sum exp(m_w - M) O_w, l likewise.
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
  if (FRESH) __syncthreads();  // sm_o may alias the queries / new rows other warps still read
  if (c == 0) {
    sm_m[warp][g] = m_run;
    sm_l[warp][g] = l_run;
  }
#pragma unroll
  for (int i = 0; i < D / 16; ++i) {
    const int d = 64 * (i / 4) + 8 * g + 2 * (i % 4);
    sm_o[(warp * 8 + 2 * c) * D + d] = o[i][0];
    sm_o[(warp * 8 + 2 * c + 1) * D + d] = o[i][1];
    sm_o[(warp * 8 + 2 * c) * D + d + 1] = o[i][2];
    sm_o[(warp * 8 + 2 * c + 1) * D + d + 1] = o[i][3];
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
      acc += f * sm_o[(w * 8 + r) * D + d];
      l += f * sm_l[w][r];
    }
    part_o[(part + r) * D + d] = acc;
    if (d == 0) {
      part_ml[(part + r) * 2] = M;
      part_ml[(part + r) * 2 + 1] = l;
    }
  }
}

// Warps of attention_decode_merge (virtual: a block of fewer warps runs several in turn, in the same
// order, so the sums are the same).
constexpr int kMergeWarps = 8;

// attention_decode_merge's output row (t, h), dims 64 * slice .. +63, by the whole block (THREADS
// threads, at least 32): the partials of the active splits (read through L2: the fused kernel's other
// blocks wrote them), then the gate from qkv.
template <int HQ, int HKV, int D, int WARPS, int THREADS>
__device__ __forceinline__ void decode_merge_slice(const float* part_o, const float* part_ml,
                                                   const bf16* __restrict__ qkv, bf16* __restrict__ out, int t, int h,
                                                   int slice, int L, int splits, float scale) {
  constexpr int GROUP = HQ / HKV, QG = GROUP > 8 ? GROUP / 8 : 1, QPB = GROUP / QG;  // as attention_decode
  constexpr int ROW = HQ * 2 * D + 2 * HKV * D, MW = kMergeWarps;
  __shared__ float sm_max[MW], sm_l[MW];
  __shared__ float2 sm_acc[MW][32];
  const int vb = h / QPB, r = t * QPB + h % QPB;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, d = slice * 64 + 2 * lane;
  const int active = decode_active_splits<WARPS>(L, splits);
  const float sl = scale * kLog2e;
  const float* ml = part_ml + (size_t(vb) * splits * 8 + r) * 2;  // split s at ml[s * 16]
  const float* po = part_o + (size_t(vb) * splits * 8 + r) * D + d;  // split s at po[s * 8 * D]

  // Online merge per (virtual) warp (no separate max pass). A split may hold no visible key of this
  // row (m = -inf, when T > 1); every row sees key 0 in split 0, so the final max is finite.
  for (int vw = warp; vw < MW; vw += THREADS / 32) {
    float m_w = -attn::inf(), l = 0.f;
    float2 acc = make_float2(0.f, 0.f);
#pragma unroll 4
    for (int s = vw; s < active; s += MW) {
      const float m_s = __ldcg(ml + size_t(s) * 16), l_s = __ldcg(ml + size_t(s) * 16 + 1);
      const float2 v = __ldcg(reinterpret_cast<const float2*>(po + size_t(s) * 8 * D));
      const float m_new = fmaxf(m_w, m_s);
      const float base = m_new == -attn::inf() ? 0.f : m_new * sl;
      const float a = exp2f(m_w * sl - base), f = exp2f(m_s * sl - base);
      l = l * a + f * l_s;
      acc.x = acc.x * a + f * v.x;
      acc.y = acc.y * a + f * v.y;
      m_w = m_new;
    }
    sm_acc[vw][lane] = acc;
    if (lane == 0) {
      sm_max[vw] = m_w;
      sm_l[vw] = l;
    }
  }
  __syncthreads();
  if (warp != 0) return;
  float M = -attn::inf();
#pragma unroll
  for (int w = 0; w < MW; ++w) M = fmaxf(M, sm_max[w]);
  float lt = 0.f;
  float2 acc = make_float2(0.f, 0.f);
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

__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
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
  using namespace q35k;
  constexpr int GROUP = HQ / HKV, QG = GROUP > 8 ? GROUP / 8 : 1, QPB = GROUP / QG;
  __shared__ float sm_o[WARPS * 8 * D];
  __shared__ float sm_m[WARPS][8], sm_l[WARPS][8];

  attn::wait_for_predecessor();
  attn::allow_dependents();
  const int vb = blockIdx.x, kvh = vb / QG, qg = vb % QG;
  attn::decode_partial<HQ, HKV, D, WARPS, false>(q + size_t(kvh * GROUP + qg * QPB) * D, HQ, k_cache, v_cache, nullptr,
                                                 nullptr, sm_o, sm_m, sm_l, part_o, part_ml, vb, blockIdx.y, gridDim.y,
                                                 *pos0_ptr, T, scale);
}

// attention_decode_merge: grid (T * HQ, D / 64), block 256 (8 warps). Combines the partials of
// the splits that attention_decode (with the same WARPS) wrote for output row (t, h), dims
// 64y .. 64y+63, then applies the gate:
//   out [T, HQ*D] bf16, out[t, h*D + d] = (sum_s e^(m_s - M) o_s[d]) / (sum_s e^(m_s - M) l_s)
//                                         * sigmoid(gate[t, h, d])
// Warp w takes splits w, w+8, ...; lane l dims 2l, 2l+1 of the slice; the warps' sums are combined
// in shared memory.
template <int HQ, int HKV, int D, int WARPS>
__global__ void __launch_bounds__(256)
attention_decode_merge(const float* __restrict__ part_o,     // [HKV * QG, splits, 8, D]
                       const float* __restrict__ part_ml,    // [HKV * QG, splits, 8, 2]
                       const q35k::bf16* __restrict__ qkv,   // [T, HQ*2D + 2*HKV*D] (gate)
                       q35k::bf16* __restrict__ out,         // [T, HQ*D]
                       const int* __restrict__ pos0_ptr,     // [1]
                       int T, int splits, float scale) {
  using namespace q35k;
  static_assert(D % 64 == 0, "attention_decode_merge: head_dim must be a multiple of 64");
  attn::wait_for_predecessor();
  attn::allow_dependents();
  attn::decode_merge_slice<HQ, HKV, D, WARPS, 256>(part_o, part_ml, qkv, out, blockIdx.x / HQ, blockIdx.x % HQ,
                                                   blockIdx.y, *pos0_ptr + T, splits, scale);
}

// ---------------------------------------------------------------------------------------------
// attention_decode_fused: qk_norm_rope + attention_decode + attention_decode_merge in one launch
// (decode, T <= 8 / QPB tokens at positions pos0 .. pos0+T-1), same results bit for bit.
// Grid (HKV * QG * splits + T * HQ * D / 64), block WARPS*32. Blocks take their item by an atomic
// ticket in the order they start: first the split items (split s of block vb = item % (HKV*QG)),
// then the merge items (row (t, h), dims 64 * slice ..: those of attention_decode_merge), which wait
// (spin) until every active split of their vb has written its partial. A merge item only ever waits
// for items that are already running, so there is no deadlock whatever the residency.
// A split item: its old K/V rows pulled into L2 before griddepcontrol.wait (the cache rows before
// pos0 do not depend on the previous kernel); then its R query rows normed + roped from qkv into
// shared memory, and, if its keys include this call's positions, their k (normed + roped) and v rows
// into shared memory and (qg = 0) into the caches; then attention_decode's partial, reading this
// call's keys from shared memory.
// sync int32 [2 + HKV * QG], zero before the first launch and left zero by every launch: [0] item
// ticket, [1] blocks done (the last one re-arms all), [2 + vb] splits of vb done.
template <int HQ, int HKV, int D, int ROTARY, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 1)
attention_decode_fused(const q35k::bf16* __restrict__ qkv,       // [T, HQ*2D + 2*HKV*D]
                       const q35k::bf16* __restrict__ q_norm_w,  // [D]
                       const q35k::bf16* __restrict__ k_norm_w,  // [D]
                       q35k::bf16* k_cache,                      // [max_context, HKV, D]
                       q35k::bf16* v_cache,                      // [max_context, HKV, D]
                       float* part_o,                            // [HKV * QG, splits, 8, D]
                       float* part_ml,                           // [HKV * QG, splits, 8, 2]
                       int* sync,                                // [2 + HKV * QG]
                       q35k::bf16* __restrict__ out,             // [T, HQ*D]
                       const int* __restrict__ pos0_ptr,         // [1]
                       int T, int splits, int max_context, float theta, float eps, float scale) {
  using namespace q35k;
  static_assert(D % 64 == 0 && D <= 256, "attention_decode_fused: head_dim must be a multiple of 64, at most 256");
  static_assert(ROTARY % 16 == 0 && ROTARY <= D, "attention_decode_fused: rotary_dim must be a multiple of 16, <= head_dim");
  constexpr int GROUP = HQ / HKV, QG = GROUP > 8 ? GROUP / 8 : 1, QPB = GROUP / QG, NVB = HKV * QG;
  constexpr int ROW = HQ * 2 * D + 2 * HKV * D, HALF = ROTARY / 2 > 0 ? ROTARY / 2 : 1;
  constexpr int THREADS = WARPS * 32, LINES = D * 2 / 128;  // 128-byte lines per cache row
  // sm_o (WARPS x 8 x D fp32) after the key loop; before it, the same memory holds the queries and
  // this call's k and v rows, 8 x D bf16 each.
  __shared__ __align__(16) float sm_o[(WARPS >= 2 ? WARPS : 2) * 8 * D];
  __shared__ float sm_m[WARPS][8], sm_l[WARPS][8];
  __shared__ float cos_s[8][HALF], sin_s[8][HALF];
  __shared__ int item_s;
  bf16* q_s = reinterpret_cast<bf16*>(sm_o);
  bf16* kn_s = q_s + 8 * D;
  bf16* vn_s = kn_s + 8 * D;

  if (threadIdx.x == 0) item_s = atomicAdd(&sync[0], 1);
  __syncthreads();
  const int item = item_s;
  const int pos0 = *pos0_ptr;  // written by the previous step, not by the previous kernel
  const int L = pos0 + T;
  const int warp = threadIdx.x / 32;

  if (item < NVB * splits) {
    const int vb = item % NVB, split = item / NVB, kvh = vb / QG, qg = vb % QG;
    const int blocks = (L + 15) / 16;
    const int per_split = attn::decode_blocks_per_split(blocks, splits, WARPS);
    const int key_begin = split * per_split * 16, key_end = min((split * per_split + per_split) * 16, L);
    if (key_begin < L) {
      // Cached rows [key_begin, min(key_end, pos0)) of kv head kvh into L2.
      const int cached = max(0, min(key_end, pos0) - key_begin);
      for (int i = threadIdx.x; i < cached * LINES * 2; i += THREADS) {
        const int key = key_begin + i / (2 * LINES), line = i % (2 * LINES);
        const bf16* base = line < LINES ? k_cache : v_cache;
        asm volatile("prefetch.global.L2 [%0];" ::"l"(base + (size_t(key) * HKV + kvh) * D + (line % LINES) * 64));
      }
      attn::wait_for_predecessor();
      attn::allow_dependents();
      // This call's rows: R queries, then the k and v rows of the new positions in [key_begin, key_end).
      const int R = QPB * T, new_begin = max(key_begin, pos0), n_new = max(0, key_end - new_begin);
      for (int t = 0; t < T; ++t) attn::rope_table<ROTARY>(pos0 + t, theta, cos_s[t], sin_s[t], threadIdx.x, THREADS);
      __syncthreads();
      for (int i = warp; i < R + 2 * n_new; i += WARPS) {  // warp-uniform
        if (i < R) {
          const int t = i / QPB, head = kvh * GROUP + qg * QPB + i % QPB;
          attn::norm_rope_head<D, ROTARY>(qkv + size_t(t) * ROW + head * 2 * D, q_norm_w, cos_s[t], sin_s[t], eps,
                                          q_s + i * D);
        } else {
          const int j = (i - R) / 2, t = new_begin + j - pos0;
          const bool is_k = (i - R) % 2 == 0;
          attn::norm_rope_head<D, ROTARY>(qkv + size_t(t) * ROW + HQ * 2 * D + (is_k ? 0 : HKV * D) + kvh * D,
                                          is_k ? k_norm_w : nullptr, cos_s[t], sin_s[t], eps,
                                          (is_k ? kn_s : vn_s) + t * D);
        }
      }
      __syncthreads();
      if (qg == 0)  // the caches get this call's rows once per kv head
        for (int i = threadIdx.x; i < n_new * 2 * (D / 8); i += THREADS) {
          const int j = i / (2 * (D / 8)), half = i % (2 * (D / 8)), pos = new_begin + j, t = pos - pos0;
          const bool is_k = half < D / 8;
          const int c8 = (half % (D / 8)) * 8;
          if (pos < max_context)
            *reinterpret_cast<uint4*>((is_k ? k_cache : v_cache) + (size_t(pos) * HKV + kvh) * D + c8) =
                *reinterpret_cast<const uint4*>((is_k ? kn_s : vn_s) + t * D + c8);
        }
      attn::decode_partial<HQ, HKV, D, WARPS, true>(q_s, QPB, k_cache, v_cache, kn_s, vn_s, sm_o, sm_m, sm_l, part_o,
                                                    part_ml, vb, split, splits, pos0, T, scale);
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) atomicAdd(&sync[2 + vb], 1);
    } else {
      attn::wait_for_predecessor();
      attn::allow_dependents();
    }
  } else {
    const int m = item - NVB * splits, x = m % (T * HQ), slice = m / (T * HQ), t = x / HQ, h = x % HQ;
    attn::wait_for_predecessor();
    attn::allow_dependents();
    const int active = attn::decode_active_splits<WARPS>(L, splits);
    if (threadIdx.x == 0)
      while (attn::ld_acquire_gpu(&sync[2 + h / QPB]) < active) __nanosleep(32);
    __syncthreads();
    attn::decode_merge_slice<HQ, HKV, D, WARPS, THREADS>(part_o, part_ml, qkv, out, t, h, slice, L, splits, scale);
  }

  // Re-arm: the last block to finish (every block is past its wait) zeroes sync.
  __shared__ int is_final;
  __syncthreads();
  if (threadIdx.x == 0) is_final = atomicAdd(&sync[1], 1) == int(gridDim.x) - 1;
  __syncthreads();
  if (is_final)
    for (int i = threadIdx.x; i < 2 + NVB; i += THREADS) sync[i] = 0;
}

// ---------------------------------------------------------------------------------------------
// The batched decode step: one query token of each of B sequences, each in its own slot. Row b is
// sequence slot slots[b] (int32 [B]; < 0: a padding row of a graph bucket, which writes no cache row
// and gets a zero output) at position pos[slot] (int32 [slots], the tokens the slot holds); the
// slots' caches are one buffer each, slot s at k_cache + s * slot_stride (slot_stride = max_context
// * HKV * D elements). The same per-row work as qk_norm_rope / attention_decode / _merge at T = 1
// (the same device functions).

// qk_norm_rope_batch: grid (B), block WARPS*32; q_out row b, k / v rows at pos[slot] of that slot.
template <int HQ, int HKV, int D, int ROTARY, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
qk_norm_rope_batch(const q35k::bf16* __restrict__ qkv,       // [B, HQ*2D + 2*HKV*D]
                   const q35k::bf16* __restrict__ q_norm_w,  // [D]
                   const q35k::bf16* __restrict__ k_norm_w,  // [D]
                   q35k::bf16* __restrict__ q_out,           // [B, HQ, D]
                   q35k::bf16* __restrict__ k_cache,         // [slots, max_context, HKV, D]
                   q35k::bf16* __restrict__ v_cache,         // [slots, max_context, HKV, D]
                   const int* __restrict__ slots,            // [B]
                   const int* __restrict__ pos,              // [slots]
                   long long slot_stride, int max_context, float theta, float eps) {
  using namespace q35k;
  static_assert(D % 8 == 0 && D <= 256, "qk_norm_rope: head_dim must be a multiple of 8, at most 256");
  static_assert(ROTARY % 16 == 0 && ROTARY <= D, "qk_norm_rope: rotary_dim must be a multiple of 16, <= head_dim");
  constexpr int ROW = HQ * 2 * D + 2 * HKV * D;
  constexpr int HALF = ROTARY / 2;
  __shared__ float cos_s[HALF > 0 ? HALF : 1], sin_s[HALF > 0 ? HALF : 1];

  attn::wait_for_predecessor();
  attn::allow_dependents();
  const int b = blockIdx.x, slot = slots[b];
  if (slot < 0) return;
  const int p = pos[slot];
  const int warp = threadIdx.x / 32;
  attn::rope_table<ROTARY>(p, theta, cos_s, sin_s, threadIdx.x, WARPS * 32);
  __syncthreads();

  const bf16* row = qkv + size_t(b) * ROW;
  bf16* const kc = k_cache + size_t(slot) * size_t(slot_stride);
  bf16* const vc = v_cache + size_t(slot) * size_t(slot_stride);
  for (int head = warp; head < HQ + 2 * HKV; head += WARPS) {  // warp-uniform
    const bool is_q = head < HQ, is_k = !is_q && head < HQ + HKV;
    const int kv_head = is_q ? 0 : is_k ? head - HQ : head - HQ - HKV;
    if (!is_q && p >= max_context) continue;
    const bf16* src = is_q ? row + head * 2 * D : row + HQ * 2 * D + (is_k ? 0 : HKV * D) + kv_head * D;
    bf16* dst = is_q ? q_out + (size_t(b) * HQ + head) * D : (is_k ? kc : vc) + (size_t(p) * HKV + kv_head) * D;
    attn::norm_rope_head<D, ROTARY>(src, is_q ? q_norm_w : is_k ? k_norm_w : nullptr, cos_s, sin_s, eps, dst);
  }
}

// attention_decode_batch: grid (HKV * QG, splits, B), block WARPS*32: attention_decode's partial of
// split blockIdx.y of block blockIdx.x for sequence b = blockIdx.z over its L = pos[slot] + 1 keys;
// partials at part_o + b * HKV*QG*splits*8*D, part_ml + b * HKV*QG*splits*8*2.
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
  using namespace q35k;
  constexpr int GROUP = HQ / HKV, QG = GROUP > 8 ? GROUP / 8 : 1, QPB = GROUP / QG;
  __shared__ float sm_o[WARPS * 8 * D];
  __shared__ float sm_m[WARPS][8], sm_l[WARPS][8];

  attn::wait_for_predecessor();
  attn::allow_dependents();
  const int b = blockIdx.z, slot = slots[b];
  if (slot < 0) return;
  const int vb = blockIdx.x, kvh = vb / QG, qg = vb % QG;
  const size_t parts = size_t(HKV * QG) * gridDim.y * 8;  // partial rows per sequence
  attn::decode_partial<HQ, HKV, D, WARPS, false>(
      q + (size_t(b) * HQ + kvh * GROUP + qg * QPB) * D, HQ, k_cache + size_t(slot) * size_t(slot_stride),
      v_cache + size_t(slot) * size_t(slot_stride), nullptr, nullptr, sm_o, sm_m, sm_l, part_o + size_t(b) * parts * D,
      part_ml + size_t(b) * parts * 2, vb, blockIdx.y, gridDim.y, pos[slot], 1, scale);
}

// attention_decode_merge_batch: grid (B * HQ, D / 64), block 256: attention_decode_merge's row
// (b, h) from sequence b's partials, with the gate of qkv row b, into out row b (zeros for padding).
template <int HQ, int HKV, int D, int WARPS>
__global__ void __launch_bounds__(256)
attention_decode_merge_batch(const float* __restrict__ part_o,     // [B, HKV * QG, splits, 8, D]
                             const float* __restrict__ part_ml,    // [B, HKV * QG, splits, 8, 2]
                             const q35k::bf16* __restrict__ qkv,   // [B, HQ*2D + 2*HKV*D] (gate)
                             q35k::bf16* __restrict__ out,         // [B, HQ*D]
                             const int* __restrict__ slots,        // [B]
                             const int* __restrict__ pos,          // [slots]
                             int splits, float scale) {
  using namespace q35k;
  static_assert(D % 64 == 0, "attention_decode_merge: head_dim must be a multiple of 64");
  constexpr int GROUP = HQ / HKV, QG = GROUP > 8 ? GROUP / 8 : 1, ROW = HQ * 2 * D + 2 * HKV * D;
  attn::wait_for_predecessor();
  attn::allow_dependents();
  const int b = blockIdx.x / HQ, h = blockIdx.x % HQ, slot = slots[b];
  bf16* const row = out + size_t(b) * HQ * D;
  if (slot < 0) {
    if (threadIdx.x < 32) *reinterpret_cast<u32*>(row + h * D + blockIdx.y * 64 + 2 * threadIdx.x) = 0u;
    return;
  }
  const size_t parts = size_t(HKV * QG) * splits * 8;
  attn::decode_merge_slice<HQ, HKV, D, WARPS, 256>(part_o + size_t(b) * parts * D, part_ml + size_t(b) * parts * 2,
                                                   qkv + size_t(b) * ROW, row, 0, h, blockIdx.y, pos[slot] + 1, splits,
                                                   scale);
}
