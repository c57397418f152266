#pragma once
// Chunked gated delta rule for prefill (spec §2.5, FLA's split of the work), chunk L = 64.
// Inputs from gdn_prologue: qkv [T, C] bf16 (q normalised and scaled | k normalised | v),
// g, beta [T, HV] fp32. Per value head j (key head kh = j / (HV / HK)) and chunk n of rows
// t0 = 64 n .. t0 + 63 (rows past T are zero and change nothing), gam = inclusive cumsum of g:
//
// gdn_chunk_prepare, grid (chunks, HV), block 256, fully parallel:
//   A[i,m] = beta_i (k_i . k_m) exp(gam_i - gam_m), m < i   (k k^T by bf16 mma: exact products, fp32 sums)
//   Tm = (I + A)^-1, fp32, blocked: the four 16 x 16 diagonal blocks by substitution, then
//        Tm_ij = -Tm_ii sum_{j <= k < i} A_ik Tm_kj in order of distance i - j
//   U = (Tm diag(beta)) v,  W = (Tm diag(beta exp(gam))) k  (bf16 mma: the fp32 left factor split
//        hi + lo, the exact bf16 v, k as B operands: hi v + lo v)
//   -> gam [chunks, HV, 64] fp32 (padded rows repeat the last real value), u [chunks, HV, 64, DV]
//      fp32, w [chunks, HV, 2, 64, DK] bf16 (hi plane, lo plane; padded rows are zero).
//
// gdn_chunk_state, grid (HV, DV / VS), block 256, serial over chunks, only the recurrence: the
// state's value columns are independent, so a CTA owns VS of them for the whole sequence, S [DK, VS]
// fp32 in mma accumulators (warp w owns state rows 16 w (DK / 128) ..). Per chunk:
//   h  = S (the state entering the chunk)           -> h [chunks, HV, 2, DK, DV] bf16 hi/lo
//   Vn = U - W S                                     -> vn [chunks, HV, 2, 64, DV] bf16 hi/lo
//   S  = exp(gam_last) S + k^T (dcy Vn),  dcy_i = exp(gam_last - gam_i)
// W S as W_hi S_hi + W_hi S_lo + W_lo S_hi, k^T (dcy Vn) as k^T X_hi + k^T X_lo (k exact).
// The next chunk's W, k, U, gam stream in by cp.async while this one computes.
//
// gdn_chunk_output, grid (chunks, HV), block 256, fully parallel, with the gated RMSNorm fused:
//   QK = [(q_i . k_m) exp(gam_i - gam_m)]_{m <= i}  (bf16 mma, split hi/lo)
//   O  = exp(gam) (q S_n) + QK Vn     q S as q S_hi + q S_lo, QK Vn as 3 products
//   y  = bf16(O / sqrt(mean_DV(O^2) + eps) * w * silu(z))  -> y [T, HV DV] (gated_rmsnorm.cuh's math)
//
// gdn_chunk_fused / gdn_chunk_fused_cluster (below, the default after gdn_chunk_prepare) do the
// work of gdn_chunk_state and gdn_chunk_output in one serial pass per (head, column slice), so h and
// vn are never written; gdn_chunk_state -> gdn_chunk_output stay as the unfused form.
//
// Split bf16 ("3xBF16"): x = hi + lo with hi = bf16(x), lo = bf16(x - hi) keeps ~16 mantissa bits;
// a product of two such operands drops only lo lo (2^-16 relative), and the tensor cores sum in
// fp32, so every product is as accurate as fp32 CUDA-core math would be. Only differences of gam
// are exponentiated with a positive sign, so nothing overflows.
// State in/out [HV, DV, DK] fp32 (the layout of gdn_recurrent.cuh).
#include "gdn_common.cuh"

namespace q35k {
constexpr int kGdnChunk = 64;

// ldmatrix wrappers (sm_80+): x4 loads four 8 x 8 bf16 matrices, lane l giving the row address of
// matrix l / 8; .trans delivers the transposed matrices.
__device__ __forceinline__ void gdn_ldsm_x4(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(gdn_smem_u32(p)) : "memory");
}
__device__ __forceinline__ void gdn_ldsm_x4_t(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(gdn_smem_u32(p)) : "memory");
}

// Fragment loads for gdn_mma_bf16 from row-major bf16 tiles in shared memory (stride in elements,
// a multiple of 8; lane = threadIdx.x % 32):
// A (16 x 16 at rows r0, columns k0) from a[r][k].
__device__ __forceinline__ void gdn_frag_a(u32 (&f)[4], const bf16* a, int stride, int r0, int k0, int lane) {
  gdn_ldsm_x4(f, a + (r0 + lane % 16) * stride + k0 + (lane / 16) * 8);
}
// A (16 x 16 at rows r0, columns k0) of the transpose of at[k][r].
__device__ __forceinline__ void gdn_frag_a_t(u32 (&f)[4], const bf16* at, int stride, int r0, int k0, int lane) {
  gdn_ldsm_x4_t(f, at + (k0 + lane % 8 + (lane / 16) * 8) * stride + r0 + ((lane / 8) % 2) * 8);
}
// B of two n-tiles (k0 .. k0 + 15, n0 .. n0 + 15) from b[k][n]: f[0..1] n-tile n0, f[2..3] n0 + 8.
__device__ __forceinline__ void gdn_frag_b2_t(u32 (&f)[4], const bf16* b, int stride, int k0, int n0, int lane) {
  gdn_ldsm_x4_t(f, b + (k0 + lane % 8 + ((lane / 8) % 2) * 8) * stride + n0 + (lane / 16) * 8);
}
// B of two n-tiles from bt[n][k] (the transpose stored).
__device__ __forceinline__ void gdn_frag_b2(u32 (&f)[4], const bf16* bt, int stride, int k0, int n0, int lane) {
  gdn_ldsm_x4(f, bt + (n0 + lane % 8 + (lane / 16) * 8) * stride + k0 + ((lane / 8) % 2) * 8);
}

// (a, b) -> hi = bf16x2(a, b), lo = bf16x2(a - hi, b - hi): the split-bf16 pair.
__device__ __forceinline__ u32 gdn_split(float a, float b, u32& lo) {
  const u32 hi = f32x2_to_bf16x2(a, b);
  lo = f32x2_to_bf16x2(a - bf16x2_lo(hi), b - bf16x2_hi(hi));
  return hi;
}

__device__ __forceinline__ void gdn_mma2(float (&d)[4], const u32 (&a)[4], const u32* b) {
  const u32 bb[2] = {b[0], b[1]};
  gdn_mma_bf16(d, a, bb);
}

// The causal 64 x 64 product acc = X K^T (m <= i) of bf16 rows [64, DK] in shared memory (row
// stride KS): warp = rows 16 r .., columns 32 hc .. as four n-tiles of 8; tiles above the diagonal
// are skipped (left zero). The k k^T of gdn_chunk_prepare and the q k^T of gdn_chunk_output.
template <int DK>
__device__ __forceinline__ void gdn_causal_xkt(float (&acc)[4][4], const bf16* X, const bf16* Kb, int KS, int r, int hc,
                                               int lane) {
#pragma unroll 2
  for (int k0 = 0; k0 < DK; k0 += 16) {
    u32 a[4];
    gdn_frag_a(a, X, KS, 16 * r, k0, lane);
#pragma unroll
    for (int jp = 0; jp < 2; ++jp) {
      const int m0 = 32 * hc + 16 * jp;
      if (m0 > 16 * r) continue;  // warp-uniform
      u32 b[4];
      gdn_frag_b2(b, Kb, KS, k0, m0, lane);
      gdn_mma2(acc[2 * jp], a, b);
      gdn_mma2(acc[2 * jp + 1], a, b + 2);
    }
  }
}
}  // namespace q35k

// Dynamic shared memory (bytes): see gdn_chunk_prepare_smem_bytes (autotune/tiles_gdn.cpp).
template <int HK, int HV, int DK, int DV>
__global__ void __launch_bounds__(256, 2)
gdn_chunk_prepare(const q35k::bf16* __restrict__ qkv, const float* __restrict__ g, const float* __restrict__ beta,
                  float* __restrict__ gam_out, float* __restrict__ u_out, q35k::bf16* __restrict__ w_out, int T) {
  constexpr int L = q35k::kGdnChunk, C = 2 * HK * DK + HV * DV;
  constexpr int KS = DK + 8, VS = DV + 8, AS = L + 4, PS = L + 8;  // row strides (elements)
  static_assert(HV % HK == 0 && DK % 32 == 0 && DV % 32 == 0, "gdn_chunk_prepare: HV % HK, DK % 32, DV % 32");
  extern __shared__ __align__(16) float smem[];
  float* A = smem;                                           // [L, AS] A, strictly lower
  float* Tm = A + L * AS;                                    // [L, AS] (I + A)^-1
  float* X = Tm + L * AS;                                    // [3, 16, 17] block sums of the solve
  float* gam = X + 3 * 16 * 17;                              // [L]
  float* bet = gam + L;                                      // [L]
  float* eg = bet + L;                                       // [L]
  q35k::bf16* Kb = reinterpret_cast<q35k::bf16*>(eg + L);    // [L, KS] k
  q35k::bf16* Vb = Kb + L * KS;                              // [L, VS] v
  q35k::bf16* P = Vb + L * VS;                               // [4, L, PS] Tm diag(beta) hi, lo; Tm diag(beta eg) hi, lo
  q35k::gdn_pdl_wait();
  q35k::gdn_pdl_launch_dependents();
  const int tid = threadIdx.x, n = blockIdx.x, j = blockIdx.y, kh = j / (HV / HK);
  const int lane = tid % 32, warp = tid / 32, gi = lane / 4, ti = lane % 4;
  const int t0 = n * L, rows = min(L, T - t0);

  for (int idx = tid; idx < L * (DK / 8); idx += 256) {
    const int i = idx / (DK / 8), ch = idx % (DK / 8);
    const bool in = i < rows;
    q35k::gdn_cp_async_16(Kb + i * KS + 8 * ch, qkv + size_t(t0 + (in ? i : 0)) * C + HK * DK + kh * DK + 8 * ch, in);
  }
  for (int idx = tid; idx < L * (DV / 8); idx += 256) {
    const int i = idx / (DV / 8), ch = idx % (DV / 8);
    const bool in = i < rows;
    q35k::gdn_cp_async_16(Vb + i * VS + 8 * ch, qkv + size_t(t0 + (in ? i : 0)) * C + 2 * HK * DK + j * DV + 8 * ch,
                          in);
  }
  q35k::gdn_cp_async_commit();
  if (warp == 0) {  // gam: inclusive scan of g, two rows per lane
    const int i = 2 * lane;
    const float g0 = i < rows ? g[size_t(t0 + i) * HV + j] : 0.f;
    const float g1 = i + 1 < rows ? g[size_t(t0 + i + 1) * HV + j] : 0.f;
    float s = g0 + g1;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const float o = __shfl_up_sync(0xffffffffu, s, off);
      if (lane >= off) s += o;
    }
    const float before = s - (g0 + g1);
    gam[i] = before + g0;
    gam[i + 1] = s;
    float* go = gam_out + (size_t(n) * HV + j) * L;
    *reinterpret_cast<float2*>(go + i) = make_float2(before + g0, s);
  } else if (warp == 1) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = 2 * lane + h;
      bet[i] = i < rows ? beta[size_t(t0 + i) * HV + j] : 0.f;
    }
  }
  q35k::gdn_cp_async_wait<0>();
  __syncthreads();
  if (tid < L) eg[tid] = expf(gam[tid]);

  {  // A = beta_i (k k^T) exp(gam_i - gam_m), m < i: warp = rows 16 r .., columns 32 hc .. (tiles above the diagonal skipped)
    const int r = warp % 4, hc = warp / 4;
    float kk[4][4] = {};
    q35k::gdn_causal_xkt<DK>(kk, Kb, Kb, KS, r, hc, lane);
#pragma unroll
    for (int jn = 0; jn < 4; ++jn) {
      if (32 * hc + 8 * jn > 16 * r + 15) continue;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 16 * r + gi + 8 * (e / 2), m = 32 * hc + 8 * jn + 2 * ti + e % 2;
        A[i * AS + m] = m < i ? bet[i] * kk[jn][e] * expf(gam[i] - gam[m]) : 0.f;
      }
    }
  }
  __syncthreads();

  // Tm = (I + A)^-1. Diagonal blocks: thread (b, c) solves column c of block b by substitution:
  // x_r = [r == c] - sum_{m < r} A_rm x_m (x_m = 0 for m < c).
  if (tid < L) {
    const int b = tid / 16, c = tid % 16;
    const float* Ab = A + 16 * b * AS + 16 * b;
    float x[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      float acc = r == c ? 1.f : 0.f;
#pragma unroll
      for (int m = 0; m < r; ++m) acc -= Ab[r * AS + m] * x[m];
      x[r] = acc;
    }
#pragma unroll
    for (int r = 0; r < 16; ++r) Tm[(16 * b + r) * AS + 16 * b + c] = x[r];
  }
  __syncthreads();
  // Off-diagonal blocks by distance d: X = sum_{j <= k < i} A_ik Tm_kj, then Tm_ij = -Tm_ii X.
  for (int d = 1; d < 4; ++d) {
    const int nb = 4 - d;
    for (int idx = tid; idx < nb * 256; idx += 256) {
      const int jb = idx / 256, rr = (idx % 256) / 16, cc = idx % 16, ib = jb + d;
      const float* Ar = A + (16 * ib + rr) * AS;
      float acc = 0.f;
      for (int m = 16 * jb; m < 16 * ib; ++m) acc += Ar[m] * Tm[m * AS + 16 * jb + cc];
      X[(jb * 16 + rr) * 17 + cc] = acc;
    }
    __syncthreads();
    for (int idx = tid; idx < nb * 256; idx += 256) {
      const int jb = idx / 256, rr = (idx % 256) / 16, cc = idx % 16, ib = jb + d;
      const float* Tr = Tm + (16 * ib + rr) * AS + 16 * ib;
      float acc = 0.f;
#pragma unroll
      for (int m = 0; m < 16; ++m) acc -= (m <= rr ? Tr[m] : 0.f) * X[(jb * 16 + m) * 17 + cc];
      Tm[(16 * ib + rr) * AS + 16 * jb + cc] = acc;
    }
    __syncthreads();
  }

  // Left factors of U and W, split hi + lo (blocks above the diagonal are zero).
  for (int idx = tid; idx < L * L / 2; idx += 256) {
    const int i = idx / (L / 2), m = 2 * (idx % (L / 2));
    const bool lower = m / 16 <= i / 16;
    const float t0v = lower ? Tm[i * AS + m] : 0.f, t1v = lower ? Tm[i * AS + m + 1] : 0.f;
    const float u0 = t0v * bet[m], u1 = t1v * bet[m + 1];
    q35k::u32 lo;
    const q35k::u32 hi = q35k::gdn_split(u0, u1, lo);
    *reinterpret_cast<q35k::u32*>(P + i * PS + m) = hi;
    *reinterpret_cast<q35k::u32*>(P + L * PS + i * PS + m) = lo;
    const q35k::u32 whi = q35k::gdn_split(u0 * eg[m], u1 * eg[m + 1], lo);
    *reinterpret_cast<q35k::u32*>(P + 2 * L * PS + i * PS + m) = whi;
    *reinterpret_cast<q35k::u32*>(P + 3 * L * PS + i * PS + m) = lo;
  }
  __syncthreads();

  // U = P_u v (warps 0-3), W = P_w k (warps 4-7): warp = rows 16 r .., 32 columns at a time;
  // Tm is lower triangular, so k-steps stop at the diagonal block.
  {
    const int r = warp % 4;
    const bool is_u = warp < 4;
    const q35k::bf16* Ph = P + (is_u ? 0 : 2) * L * PS;
    const q35k::bf16* Pl = Ph + L * PS;
    const q35k::bf16* B = is_u ? Vb : Kb;
    const int bs = is_u ? VS : KS, cols = is_u ? DV : DK;
    float* uo = u_out + (size_t(n) * HV + j) * L * DV;
    q35k::bf16* wo = w_out + (size_t(n) * HV + j) * 2 * L * DK;
    for (int c0 = 0; c0 < cols; c0 += 32) {
      float acc[4][4] = {};
      for (int k0 = 0; k0 <= 16 * r; k0 += 16) {
        q35k::u32 ah[4], al[4];
        q35k::gdn_frag_a(ah, Ph, PS, 16 * r, k0, lane);
        q35k::gdn_frag_a(al, Pl, PS, 16 * r, k0, lane);
#pragma unroll
        for (int jp = 0; jp < 2; ++jp) {
          q35k::u32 b[4];
          q35k::gdn_frag_b2_t(b, B, bs, k0, c0 + 16 * jp, lane);
          q35k::gdn_mma2(acc[2 * jp], ah, b);
          q35k::gdn_mma2(acc[2 * jp], al, b);
          q35k::gdn_mma2(acc[2 * jp + 1], ah, b + 2);
          q35k::gdn_mma2(acc[2 * jp + 1], al, b + 2);
        }
      }
#pragma unroll
      for (int jn = 0; jn < 4; ++jn)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int i = 16 * r + gi + 8 * hh, c = c0 + 8 * jn + 2 * ti;
          if (is_u) {
            *reinterpret_cast<float2*>(uo + i * DV + c) = make_float2(acc[jn][2 * hh], acc[jn][2 * hh + 1]);
          } else {
            q35k::u32 lo;
            const q35k::u32 hi = q35k::gdn_split(acc[jn][2 * hh], acc[jn][2 * hh + 1], lo);
            *reinterpret_cast<q35k::u32*>(wo + i * DK + c) = hi;
            *reinterpret_cast<q35k::u32*>(wo + L * DK + i * DK + c) = lo;
          }
        }
    }
  }
}

// Dynamic shared memory (bytes): see gdn_chunk_state_smem_bytes (autotune/tiles_gdn.cpp).
template <int HK, int HV, int DK, int DV, int VS>
__global__ void __launch_bounds__(256)
gdn_chunk_state(const q35k::bf16* __restrict__ qkv, const float* __restrict__ gam_in, const float* __restrict__ u_in,
                const q35k::bf16* __restrict__ w_in, float* __restrict__ state, q35k::bf16* __restrict__ h_out,
                q35k::bf16* __restrict__ vn_out, int T) {
  constexpr int L = q35k::kGdnChunk, C = 2 * HK * DK + HV * DV;
  constexpr int KS = DK + 8, US = VS + 4, SS = VS + 8;  // row strides (elements)
  constexpr int NT = VS / 16;                           // n-tiles of 8 per warp in W S (a column half)
  constexpr int NS = VS / 8;                            // n-tiles of the state
  constexpr int MT = DK / 128;                          // 16-row state tiles per warp
  static_assert((VS == 16 || VS == 32) && DV % VS == 0 && DK % 128 == 0 && HV % HK == 0,
                "gdn_chunk_state: VS must be 16 or 32 and divide DV; DK a multiple of 128");
  constexpr int STAGE = 3 * L * KS * 2 + L * US * 4 + L * 4;  // bytes: W hi, lo, k; U; gam
  extern __shared__ __align__(16) float smem[];
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  q35k::bf16* Ss = reinterpret_cast<q35k::bf16*>(base + 2 * STAGE);  // [2, DK, SS] S hi, lo
  q35k::bf16* Xs = Ss + 2 * DK * SS;                                  // [2, L, SS] dcy Vn hi, lo
  auto Wst = [&](int st) { return reinterpret_cast<q35k::bf16*>(base + st * STAGE); };  // [2, L, KS]
  auto Kst = [&](int st) { return Wst(st) + 2 * L * KS; };                             // [L, KS]
  auto Ust = [&](int st) { return reinterpret_cast<float*>(Kst(st) + L * KS); };       // [L, US]
  auto Gst = [&](int st) { return Ust(st) + L * US; };                                 // [L]
  q35k::gdn_pdl_wait();
  q35k::gdn_pdl_launch_dependents();
  const int tid = threadIdx.x, j = blockIdx.x, kh = j / (HV / HK), c0 = blockIdx.y * VS;
  const int lane = tid % 32, warp = tid / 32, gi = lane / 4, ti = lane % 4;
  const int r = warp % 4, hc = warp / 4;  // W S: rows 16 r .., columns hc VS / 2 ..
  float* st = state + (size_t(j) * DV + c0) * DK;  // [VS, DK] rows of this CTA
  const int chunks = (T + L - 1) / L;

  auto load = [&](int n, int s) {
    const int t0 = n * L, rows = min(L, T - t0);
    const q35k::bf16* w = w_in + (size_t(n) * HV + j) * 2 * L * DK;
    q35k::bf16* W = Wst(s);
    for (int idx = tid; idx < 2 * L * (DK / 8); idx += 256) {
      const int i = idx / (DK / 8), ch = idx % (DK / 8);
      q35k::gdn_cp_async_16(W + i * KS + 8 * ch, w + i * DK + 8 * ch, true);
    }
    q35k::bf16* K = Kst(s);
    for (int idx = tid; idx < L * (DK / 8); idx += 256) {
      const int i = idx / (DK / 8), ch = idx % (DK / 8);
      const bool in = i < rows;
      q35k::gdn_cp_async_16(K + i * KS + 8 * ch, qkv + size_t(t0 + (in ? i : 0)) * C + HK * DK + kh * DK + 8 * ch, in);
    }
    const float* u = u_in + (size_t(n) * HV + j) * L * DV + c0;
    float* U = Ust(s);
    for (int idx = tid; idx < L * (VS / 4); idx += 256) {
      const int i = idx / (VS / 4), ch = idx % (VS / 4);
      q35k::gdn_cp_async_16(U + i * US + 4 * ch, u + i * DV + 4 * ch, true);
    }
    if (tid < L / 4) q35k::gdn_cp_async_16(Gst(s) + 4 * tid, gam_in + (size_t(n) * HV + j) * L + 4 * tid, true);
    q35k::gdn_cp_async_commit();
  };
  load(0, 0);

  // The state tile of this warp: element e of s[mt][ns] is row 16 (MT warp + mt) + gi + 8 (e / 2),
  // column 8 ns + 2 ti + e % 2.
  float s[MT][NS][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int ns = 0; ns < NS; ++ns)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[mt][ns][e] = st[size_t(8 * ns + 2 * ti + e % 2) * DK + 16 * (MT * warp + mt) + gi + 8 * (e / 2)];

  for (int n = 0; n < chunks; ++n) {
    const int cur = n % 2, rows = min(L, T - n * L);
    // S (hi, lo) into shared memory: Ss[p][a][c]. The previous chunk's readers passed the barrier
    // at the end of its Vn step.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int ns = 0; ns < NS; ++ns)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int a = 16 * (MT * warp + mt) + gi + 8 * hh, c = 8 * ns + 2 * ti;
          q35k::u32 lo;
          const q35k::u32 hi = q35k::gdn_split(s[mt][ns][2 * hh], s[mt][ns][2 * hh + 1], lo);
          *reinterpret_cast<q35k::u32*>(Ss + a * SS + c) = hi;
          *reinterpret_cast<q35k::u32*>(Ss + DK * SS + a * SS + c) = lo;
        }
    q35k::gdn_cp_async_wait<0>();
    __syncthreads();  // this chunk's inputs and Ss visible; the other stage is free
    if (n + 1 < chunks) load(n + 1, 1 - cur);

    {  // h = S: [2, DK, DV] at columns c0 .. c0 + VS, 16-byte stores
      q35k::bf16* h = h_out + (size_t(n) * HV + j) * 2 * DK * DV + c0;
      for (int idx = tid; idx < 2 * DK * (VS / 8); idx += 256) {
        const int a = idx / (VS / 8), ch = idx % (VS / 8);
        *reinterpret_cast<uint4*>(h + a * DV + 8 * ch) = *reinterpret_cast<const uint4*>(Ss + a * SS + 8 * ch);
      }
    }

    const q35k::bf16* W = Wst(cur);
    const q35k::bf16* K = Kst(cur);
    const float* U = Ust(cur);
    const float* gam = Gst(cur);
    const float gam_last = gam[L - 1];  // padded rows repeat the last real value

    // P = W S for rows 16 r .., columns hc VS / 2 + 8 jn .. (three accumulators, hi hi, hi lo and
    // lo hi, so the dependent mma chains are a third as long; summed small terms first).
    float p[NT][4] = {}, p1[NT][4] = {}, p2[NT][4] = {};
#pragma unroll
    for (int k0 = 0; k0 < DK; k0 += 16) {
      q35k::u32 ah[4], al[4];
      q35k::gdn_frag_a(ah, W, KS, 16 * r, k0, lane);
      q35k::gdn_frag_a(al, W + L * KS, KS, 16 * r, k0, lane);
#pragma unroll
      for (int jp = 0; jp < (NT + 1) / 2; ++jp) {
        const int nb = hc * (VS / 2) + 16 * jp;
        q35k::u32 bh[4], bl[4];
        q35k::gdn_frag_b2_t(bh, Ss, SS, k0, nb, lane);
        q35k::gdn_frag_b2_t(bl, Ss + DK * SS, SS, k0, nb, lane);
#pragma unroll
        for (int h2 = 0; h2 < 2 && 2 * jp + h2 < NT; ++h2) {
          q35k::gdn_mma2(p[2 * jp + h2], ah, bh + 2 * h2);
          q35k::gdn_mma2(p1[2 * jp + h2], ah, bl + 2 * h2);
          q35k::gdn_mma2(p2[2 * jp + h2], al, bh + 2 * h2);
        }
      }
    }
#pragma unroll
    for (int jn = 0; jn < NT; ++jn)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[jn][e] += p1[jn][e] + p2[jn][e];
    // Vn = U - P -> vn (hi, lo); X = dcy Vn (hi, lo) -> Xs. Padded rows: U = W = 0, so Vn = 0.
    {
      q35k::bf16* vo = vn_out + (size_t(n) * HV + j) * 2 * L * DV + c0;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int i = 16 * r + gi + 8 * hh;
        const float dcy = expf(gam_last - gam[i]);
#pragma unroll
        for (int jn = 0; jn < NT; ++jn) {
          const int c = hc * (VS / 2) + 8 * jn + 2 * ti;
          const float v0 = U[i * US + c] - p[jn][2 * hh], v1 = U[i * US + c + 1] - p[jn][2 * hh + 1];
          q35k::u32 lo;
          q35k::u32 hi = q35k::gdn_split(v0, v1, lo);
          *reinterpret_cast<q35k::u32*>(vo + i * DV + c) = hi;
          *reinterpret_cast<q35k::u32*>(vo + L * DV + i * DV + c) = lo;
          hi = q35k::gdn_split(dcy * v0, dcy * v1, lo);
          *reinterpret_cast<q35k::u32*>(Xs + i * SS + c) = hi;
          *reinterpret_cast<q35k::u32*>(Xs + L * SS + i * SS + c) = lo;
        }
      }
    }
    __syncthreads();  // Xs visible; Ss, W, U reads done

    // S = exp(gam_last) S + k^T X over the chunk's rows (k exact: k^T X_hi + k^T X_lo).
    const float e_last = expf(gam_last);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int ns = 0; ns < NS; ++ns)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][ns][e] *= e_last;
    float sl[MT][NS][4] = {};  // k^T X_lo, a separate chain, added at the end
#pragma unroll
    for (int k0 = 0; k0 < L; k0 += 16) {
      if (k0 >= rows) break;  // uniform
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        q35k::u32 a[4];
        q35k::gdn_frag_a_t(a, K, KS, 16 * (MT * warp + mt), k0, lane);
#pragma unroll
        for (int jp = 0; jp < NS / 2; ++jp) {
          q35k::u32 bh[4], bl[4];
          q35k::gdn_frag_b2_t(bh, Xs, SS, k0, 16 * jp, lane);
          q35k::gdn_frag_b2_t(bl, Xs + L * SS, SS, k0, 16 * jp, lane);
          q35k::gdn_mma2(s[mt][2 * jp], a, bh);
          q35k::gdn_mma2(sl[mt][2 * jp], a, bl);
          q35k::gdn_mma2(s[mt][2 * jp + 1], a, bh + 2);
          q35k::gdn_mma2(sl[mt][2 * jp + 1], a, bl + 2);
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int ns = 0; ns < NS; ++ns)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][ns][e] += sl[mt][ns][e];
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int ns = 0; ns < NS; ++ns)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        st[size_t(8 * ns + 2 * ti + e % 2) * DK + 16 * (MT * warp + mt) + gi + 8 * (e / 2)] = s[mt][ns][e];
}

// Dynamic shared memory (bytes): see gdn_chunk_output_smem_bytes (autotune/tiles_gdn.cpp).
// z [T, z_stride] bf16 (head j at columns j DV ..), norm_w [DV] bf16, y [T, HV DV] bf16.
template <int HK, int HV, int DK, int DV>
__global__ void __launch_bounds__(256)
gdn_chunk_output(const q35k::bf16* __restrict__ qkv, const float* __restrict__ gam_in,
                 const q35k::bf16* __restrict__ h_in, const q35k::bf16* __restrict__ vn_in,
                 const q35k::bf16* __restrict__ z, int z_stride, const q35k::bf16* __restrict__ norm_w,
                 q35k::bf16* __restrict__ y, float eps, int T) {
  constexpr int L = q35k::kGdnChunk, C = 2 * HK * DK + HV * DV;
  constexpr int KS = DK + 8, VS = DV + 8, PS = L + 8;  // row strides (elements)
  constexpr int NO = DV / 16;                           // n-tiles of 8 per warp (a column half of O)
  static_assert(HV % HK == 0 && DK % 16 == 0 && DV % 32 == 0, "gdn_chunk_output: HV % HK, DK % 16, DV % 32");
  extern __shared__ __align__(16) float smem[];
  float* gam = smem;                                        // [L]
  float* ssq = gam + L;                                     // [2, L] row sums of squares per column half
  q35k::bf16* Qb = reinterpret_cast<q35k::bf16*>(ssq + 2 * L);  // [L, KS] q
  q35k::bf16* Kb = Qb + L * KS;                             // [L, KS] k
  q35k::bf16* QK = Kb + L * KS;                             // [2, L, PS] QK hi, lo
  q35k::bf16* Hs = QK + 2 * L * PS;                         // [2, DK, VS] S_n hi, lo
  q35k::bf16* Vs = Hs + 2 * DK * VS;                        // [2, L, VS] Vn hi, lo
  q35k::gdn_pdl_wait();
  q35k::gdn_pdl_launch_dependents();
  const int tid = threadIdx.x, n = blockIdx.x, j = blockIdx.y, kh = j / (HV / HK);
  const int lane = tid % 32, warp = tid / 32, gi = lane / 4, ti = lane % 4;
  const int r = warp % 4, hc = warp / 4;
  const int t0 = n * L, rows = min(L, T - t0);

  for (int idx = tid; idx < L * (DK / 8); idx += 256) {  // group 0: q, k, gam
    const int i = idx / (DK / 8), ch = idx % (DK / 8);
    const bool in = i < rows;
    const q35k::bf16* x = qkv + size_t(t0 + (in ? i : 0)) * C + kh * DK + 8 * ch;
    q35k::gdn_cp_async_16(Qb + i * KS + 8 * ch, x, in);
    q35k::gdn_cp_async_16(Kb + i * KS + 8 * ch, x + HK * DK, in);
  }
  if (tid < L / 4) q35k::gdn_cp_async_16(gam + 4 * tid, gam_in + (size_t(n) * HV + j) * L + 4 * tid, true);
  q35k::gdn_cp_async_commit();
  {  // group 1: S_n
    const q35k::bf16* h = h_in + (size_t(n) * HV + j) * 2 * DK * DV;
    for (int idx = tid; idx < 2 * DK * (DV / 8); idx += 256) {
      const int a = idx / (DV / 8), ch = idx % (DV / 8);
      q35k::gdn_cp_async_16(Hs + a * VS + 8 * ch, h + a * DV + 8 * ch, true);
    }
    q35k::gdn_cp_async_commit();
  }
  {  // group 2: Vn
    const q35k::bf16* v = vn_in + (size_t(n) * HV + j) * 2 * L * DV;
    for (int idx = tid; idx < 2 * L * (DV / 8); idx += 256) {
      const int i = idx / (DV / 8), ch = idx % (DV / 8);
      q35k::gdn_cp_async_16(Vs + i * VS + 8 * ch, v + i * DV + 8 * ch, true);
    }
    q35k::gdn_cp_async_commit();
  }
  q35k::gdn_cp_async_wait<2>();
  __syncthreads();

  {  // QK = (q k^T) exp(gam_i - gam_m), m <= i: warp = rows 16 r .., columns 32 hc ..
    float qk[4][4] = {};
    q35k::gdn_causal_xkt<DK>(qk, Qb, Kb, KS, r, hc, lane);
#pragma unroll
    for (int jn = 0; jn < 4; ++jn)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int i = 16 * r + gi + 8 * hh, m = 32 * hc + 8 * jn + 2 * ti;
        float v[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) v[e] = m + e <= i ? qk[jn][2 * hh + e] * expf(gam[i] - gam[m + e]) : 0.f;
        q35k::u32 lo;
        const q35k::u32 hi = q35k::gdn_split(v[0], v[1], lo);
        *reinterpret_cast<q35k::u32*>(QK + i * PS + m) = hi;
        *reinterpret_cast<q35k::u32*>(QK + L * PS + i * PS + m) = lo;
      }
  }

  // O = exp(gam) (q S_n) + QK Vn for rows 16 r .., columns hc DV / 2 + 8 jn ..
  float o[NO][4] = {};
  q35k::gdn_cp_async_wait<1>();
  __syncthreads();  // S_n and QK visible
#pragma unroll 2
  for (int k0 = 0; k0 < DK; k0 += 16) {
    q35k::u32 a[4];
    q35k::gdn_frag_a(a, Qb, KS, 16 * r, k0, lane);
#pragma unroll
    for (int jp = 0; jp < NO / 2; ++jp) {
      const int nb = hc * (DV / 2) + 16 * jp;
      q35k::u32 bh[4], bl[4];
      q35k::gdn_frag_b2_t(bh, Hs, VS, k0, nb, lane);
      q35k::gdn_frag_b2_t(bl, Hs + DK * VS, VS, k0, nb, lane);
      q35k::gdn_mma2(o[2 * jp], a, bh);
      q35k::gdn_mma2(o[2 * jp], a, bl);
      q35k::gdn_mma2(o[2 * jp + 1], a, bh + 2);
      q35k::gdn_mma2(o[2 * jp + 1], a, bl + 2);
    }
  }
  {
    const float e0 = expf(gam[16 * r + gi]), e1 = expf(gam[16 * r + gi + 8]);
#pragma unroll
    for (int jn = 0; jn < NO; ++jn) {
      o[jn][0] *= e0, o[jn][1] *= e0;
      o[jn][2] *= e1, o[jn][3] *= e1;
    }
  }
  q35k::gdn_cp_async_wait<0>();
  __syncthreads();  // Vn visible
  for (int k0 = 0; k0 <= 16 * r; k0 += 16) {
    q35k::u32 ah[4], al[4];
    q35k::gdn_frag_a(ah, QK, PS, 16 * r, k0, lane);
    q35k::gdn_frag_a(al, QK + L * PS, PS, 16 * r, k0, lane);
#pragma unroll
    for (int jp = 0; jp < NO / 2; ++jp) {
      const int nb = hc * (DV / 2) + 16 * jp;
      q35k::u32 bh[4], bl[4];
      q35k::gdn_frag_b2_t(bh, Vs, VS, k0, nb, lane);
      q35k::gdn_frag_b2_t(bl, Vs + L * VS, VS, k0, nb, lane);
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        q35k::gdn_mma2(o[2 * jp + h2], ah, bh + 2 * h2);
        q35k::gdn_mma2(o[2 * jp + h2], ah, bl + 2 * h2);
        q35k::gdn_mma2(o[2 * jp + h2], al, bh + 2 * h2);
      }
    }
  }

  // Gated RMSNorm over the head's DV columns (two warps per row block: sums meet in shared memory).
  float sq[2] = {0.f, 0.f};
#pragma unroll
  for (int jn = 0; jn < NO; ++jn) {
    sq[0] += o[jn][0] * o[jn][0] + o[jn][1] * o[jn][1];
    sq[1] += o[jn][2] * o[jn][2] + o[jn][3] * o[jn][3];
  }
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    sq[hh] += __shfl_xor_sync(0xffffffffu, sq[hh], 1);
    sq[hh] += __shfl_xor_sync(0xffffffffu, sq[hh], 2);
  }
  if (ti == 0) {
    ssq[hc * L + 16 * r + gi] = sq[0];
    ssq[hc * L + 16 * r + gi + 8] = sq[1];
  }
  __syncthreads();
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int i = 16 * r + gi + 8 * hh;
    if (i >= rows) continue;
    const float inv = 1.f / sqrtf((ssq[i] + ssq[L + i]) / float(DV) + eps);
    const size_t t = size_t(t0 + i);
#pragma unroll
    for (int jn = 0; jn < NO; ++jn) {
      const int c = hc * (DV / 2) + 8 * jn + 2 * ti;
      const q35k::u32 zw = *reinterpret_cast<const q35k::u32*>(z + t * z_stride + j * DV + c);
      const q35k::u32 ww = *reinterpret_cast<const q35k::u32*>(norm_w + c);
      const float z0 = q35k::bf16x2_lo(zw), z1 = q35k::bf16x2_hi(zw);
      const float r0 = o[jn][2 * hh] * inv * q35k::bf16x2_lo(ww) * (z0 / (1.f + expf(-z0)));
      const float r1 = o[jn][2 * hh + 1] * inv * q35k::bf16x2_hi(ww) * (z1 / (1.f + expf(-z1)));
      *reinterpret_cast<q35k::u32*>(y + t * (HV * DV) + j * DV + c) = q35k::f32x2_to_bf16x2(r0, r1);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// gdn_chunk_fused / gdn_chunk_fused_cluster: gdn_chunk_state and gdn_chunk_output in one pass, so
// h and vn never leave the SM. Grid (HV, DV / VS), block 256, serial over chunks; a CTA owns VS
// value columns c0 .. of head j: S [DK, VS] fp32 in mma accumulators (as gdn_chunk_state), and per
// chunk (warp (r, hc) = rows 16 r .., columns hc VS / 2 .. of P, Vn and O):
//   QK = [(q_i . k_m) exp(gam_i - gam_m)]_{m <= i}  bf16 mma (q, k exact), split hi/lo -> shared
//   P  = W S (W_hi S_hi + W_hi S_lo + W_lo S_hi),  O = q S (q S_hi + q S_lo): one pass over the
//        S fragments feeds both
//   Vn = U - P -> shared (hi, lo);  X = dcy Vn -> shared (hi, lo);  O = exp(gam) O
//   S  = exp(gam_last) S + k^T X_hi + k^T X_lo;  O += QK_hi Vn_hi + QK_hi Vn_lo + QK_lo Vn_hi
// QK is recomputed by each of the DV / VS slice CTAs of a head (64 x 64 x DK, ~14% of a chunk's
// mma work) rather than stored by gdn_chunk_prepare and read back DV / VS times.
// The gated RMSNorm needs all DV columns of a row:
//   gdn_chunk_fused_cluster (sm_90+): the DV / VS CTAs of a head form a thread-block cluster; each
//     pushes its per-row partial sums of squares (one per column half) into every peer's shared
//     memory (st.shared::cluster), then barrier.cluster.arrive.release; the wait, and the norm of
//     chunk n (O and z kept in registers) come in chunk n + 1 after its first mma phase, so the
//     exchange stays off the recurrence's path. y [T, HV DV] bf16 written directly.
//   gdn_chunk_fused (any sm_80+): writes O fp32 [T, HV, DV] (ws.o) for gated_rmsnorm.
// Buffers: k, U, gam double-buffered; W (hi, lo) and q double-buffered in the cluster form (227 KiB
// of shared memory), single in the portable one (163 KiB: the next chunk's W, q are issued after
// the first mma phase, behind one more barrier). Dynamic shared memory: gdn_chunk_fused_smem_bytes.
namespace q35k {

__device__ __forceinline__ u32 gdn_cluster_ctarank() {
  u32 r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
#endif
  return r;
}
// Store v at the shared address of `local` in the CTA of cluster rank `rank`.
__device__ __forceinline__ void gdn_st_cluster_f32(const float* local, u32 rank, float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  u32 remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(gdn_smem_u32(local)), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(remote), "f"(v) : "memory");
#endif
}
__device__ __forceinline__ void gdn_cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void gdn_cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

template <int HK, int HV, int DK, int DV, int VS, bool CLUSTER>
__device__ __forceinline__ void gdn_chunk_fused_body(const bf16* __restrict__ qkv, const float* __restrict__ gam_in,
                                                     const float* __restrict__ u_in, const bf16* __restrict__ w_in,
                                                     float* __restrict__ state, const bf16* __restrict__ z,
                                                     int z_stride, const bf16* __restrict__ norm_w,
                                                     bf16* __restrict__ y, float* __restrict__ o_out, float eps,
                                                     int T) {
  constexpr int L = kGdnChunk, C = 2 * HK * DK + HV * DV;
  constexpr int KS = DK + 8, US = VS + 4, SS = VS + 8, PS = L + 8;  // row strides (elements)
  constexpr int NT = VS / 16;                                       // n-tiles of 8 per warp (a column half)
  constexpr int NS = VS / 8;                                        // n-tiles of the state
  constexpr int MT = DK / 128;                                      // 16-row state tiles per warp
  constexpr int NC = DV / VS;                                       // slice CTAs of a head (the cluster)
  constexpr int WQ_STAGES = CLUSTER ? 2 : 1;
  static_assert((VS == 16 || VS == 32) && DV % VS == 0 && DK % 128 == 0 && HV % HK == 0,
                "gdn_chunk_fused: VS must be 16 or 32 and divide DV; DK a multiple of 128");
  static_assert(!CLUSTER || NC <= 8, "gdn_chunk_fused_cluster: at most 8 CTAs per cluster (DV / VS)");
  constexpr int KUG = L * KS * 2 + L * US * 4 + L * 4;  // bytes of a k, U, gam stage
  constexpr int WQ = 3 * L * KS * 2;                     // bytes of a W hi, lo, q stage
  extern __shared__ __align__(16) float smem[];
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  auto Kst = [&](int st) { return reinterpret_cast<bf16*>(base + st * KUG); };                    // [L, KS]
  auto Ust = [&](int st) { return reinterpret_cast<float*>(base + st * KUG + L * KS * 2); };      // [L, US]
  auto Gst = [&](int st) { return Ust(st) + L * US; };                                            // [L]
  auto Wst = [&](int st) { return reinterpret_cast<bf16*>(base + 2 * KUG + st * WQ); };           // [2, L, KS]
  auto Qst = [&](int st) { return Wst(st) + 2 * L * KS; };                                        // [L, KS]
  bf16* Ss = reinterpret_cast<bf16*>(base + 2 * KUG + WQ_STAGES * WQ);  // [2, DK, SS] S hi, lo
  bf16* Vs = Ss + 2 * DK * SS;                                          // [2, L, SS] Vn hi, lo
  bf16* Xs = Vs + 2 * L * SS;                                           // [2, L, SS] dcy Vn hi, lo
  bf16* QK = Xs + 2 * L * SS;                                           // [2, L, PS] QK hi, lo
  float* ssq = reinterpret_cast<float*>(QK + 2 * L * PS);               // cluster: [2, 2 NC, L] row partials
  gdn_pdl_wait();
  gdn_pdl_launch_dependents();
  const int tid = threadIdx.x, j = blockIdx.x, kh = j / (HV / HK), c0 = blockIdx.y * VS;
  const int lane = tid % 32, warp = tid / 32, gi = lane / 4, ti = lane % 4;
  const int r = warp % 4, hc = warp / 4;  // P, Vn, O: rows 16 r .., columns hc VS / 2 ..
  float* st = state + (size_t(j) * DV + c0) * DK;  // [VS, DK] rows of this CTA
  const int chunks = (T + L - 1) / L;

  auto load_kug = [&](int n, int s) {
    const int t0 = n * L, rows = min(L, T - t0);
    bf16* K = Kst(s);
    for (int idx = tid; idx < L * (DK / 8); idx += 256) {
      const int i = idx / (DK / 8), ch = idx % (DK / 8);
      const bool in = i < rows;
      gdn_cp_async_16(K + i * KS + 8 * ch, qkv + size_t(t0 + (in ? i : 0)) * C + HK * DK + kh * DK + 8 * ch, in);
    }
    const float* u = u_in + (size_t(n) * HV + j) * L * DV + c0;
    float* U = Ust(s);
    for (int idx = tid; idx < L * (VS / 4); idx += 256) {
      const int i = idx / (VS / 4), ch = idx % (VS / 4);
      gdn_cp_async_16(U + i * US + 4 * ch, u + i * DV + 4 * ch, true);
    }
    if (tid < L / 4) gdn_cp_async_16(Gst(s) + 4 * tid, gam_in + (size_t(n) * HV + j) * L + 4 * tid, true);
  };
  auto load_wq = [&](int n, int s) {
    const int t0 = n * L, rows = min(L, T - t0);
    const bf16* w = w_in + (size_t(n) * HV + j) * 2 * L * DK;
    bf16* W = Wst(s);
    for (int idx = tid; idx < 2 * L * (DK / 8); idx += 256) {
      const int i = idx / (DK / 8), ch = idx % (DK / 8);
      gdn_cp_async_16(W + i * KS + 8 * ch, w + i * DK + 8 * ch, true);
    }
    bf16* Q = Qst(s);
    for (int idx = tid; idx < L * (DK / 8); idx += 256) {
      const int i = idx / (DK / 8), ch = idx % (DK / 8);
      const bool in = i < rows;
      gdn_cp_async_16(Q + i * KS + 8 * ch, qkv + size_t(t0 + (in ? i : 0)) * C + kh * DK + 8 * ch, in);
    }
  };
  load_kug(0, 0);
  load_wq(0, 0);
  gdn_cp_async_commit();

  // The state tile of this warp: element e of s[mt][ns] is row 16 (MT warp + mt) + gi + 8 (e / 2),
  // column 8 ns + 2 ti + e % 2.
  float s[MT][NS][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int ns = 0; ns < NS; ++ns)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[mt][ns][e] = st[size_t(8 * ns + 2 * ti + e % 2) * DK + 16 * (MT * warp + mt) + gi + 8 * (e / 2)];

  // Cluster form: this thread's norm weights, and the previous chunk's O and z awaiting its norm.
  u32 nw[NT] = {}, zp[2][NT] = {};
  float op[NT][4] = {};
  int t_prev = 0;  // first row of the chunk awaiting its norm
  const u32 rank = CLUSTER ? gdn_cluster_ctarank() : 0u;
  if constexpr (CLUSTER) {
#pragma unroll
    for (int jn = 0; jn < NT; ++jn)
      nw[jn] = *reinterpret_cast<const u32*>(norm_w + c0 + hc * (VS / 2) + 8 * jn + 2 * ti);
    gdn_cluster_arrive();  // every CTA of the cluster runs before any shared::cluster store
    gdn_cluster_wait();
  }
  // The pending chunk's norm: row sums of squares from every slice of the head -> y.
  auto finish_norm = [&](int n_prev) {
    gdn_cluster_wait();
    const float* sq = ssq + (n_prev % 2) * 2 * NC * L;
    const int rows_prev = min(L, T - t_prev);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int i = 16 * r + gi + 8 * hh;
      if (i >= rows_prev) continue;
      float sum = 0.f;
#pragma unroll
      for (int p = 0; p < 2 * NC; ++p) sum += sq[p * L + i];
      const float inv = 1.f / sqrtf(sum / float(DV) + eps);
      const size_t t = size_t(t_prev + i);
#pragma unroll
      for (int jn = 0; jn < NT; ++jn) {
        const int c = c0 + hc * (VS / 2) + 8 * jn + 2 * ti;
        const float z0 = bf16x2_lo(zp[hh][jn]), z1 = bf16x2_hi(zp[hh][jn]);
        const float r0 = op[jn][2 * hh] * inv * bf16x2_lo(nw[jn]) * (z0 / (1.f + expf(-z0)));
        const float r1 = op[jn][2 * hh + 1] * inv * bf16x2_hi(nw[jn]) * (z1 / (1.f + expf(-z1)));
        *reinterpret_cast<u32*>(y + t * (HV * DV) + j * DV + c) = f32x2_to_bf16x2(r0, r1);
      }
    }
  };

  for (int n = 0; n < chunks; ++n) {
    const int cur = n % 2, wq = CLUSTER ? cur : 0, t0 = n * L, rows = min(L, T - t0);
    // S (hi, lo) into shared memory. The previous chunk's readers passed its Vn barrier.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int ns = 0; ns < NS; ++ns)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int a = 16 * (MT * warp + mt) + gi + 8 * hh, c = 8 * ns + 2 * ti;
          u32 lo;
          const u32 hi = gdn_split(s[mt][ns][2 * hh], s[mt][ns][2 * hh + 1], lo);
          *reinterpret_cast<u32*>(Ss + a * SS + c) = hi;
          *reinterpret_cast<u32*>(Ss + DK * SS + a * SS + c) = lo;
        }
    gdn_cp_async_wait<0>();
    __syncthreads();  // this chunk's inputs and Ss visible; the other stage is free
    if (n + 1 < chunks) {
      load_kug(n + 1, 1 - cur);
      if constexpr (CLUSTER) load_wq(n + 1, 1 - cur);
      gdn_cp_async_commit();
    }
    u32 zc[2][NT] = {};  // this chunk's z (cluster form), in flight during the chunk
    if constexpr (CLUSTER) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int i = 16 * r + gi + 8 * hh;
        if (i >= rows) continue;
#pragma unroll
        for (int jn = 0; jn < NT; ++jn)
          zc[hh][jn] = *reinterpret_cast<const u32*>(z + size_t(t0 + i) * z_stride + j * DV + c0 + hc * (VS / 2) +
                                                     8 * jn + 2 * ti);
      }
    }

    const bf16* W = Wst(wq);
    const bf16* Q = Qst(wq);
    const bf16* K = Kst(cur);
    const float* U = Ust(cur);
    const float* gam = Gst(cur);
    const float gam_last = gam[L - 1];  // padded rows repeat the last real value

    // QK (warp = rows 16 r .., columns 32 hc ..), scaled and split into shared memory.
    {
      float qk[4][4] = {};
      gdn_causal_xkt<DK>(qk, Q, K, KS, r, hc, lane);
#pragma unroll
      for (int jn = 0; jn < 4; ++jn)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int i = 16 * r + gi + 8 * hh, m = 32 * hc + 8 * jn + 2 * ti;
          float v[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) v[e] = m + e <= i ? qk[jn][2 * hh + e] * expf(gam[i] - gam[m + e]) : 0.f;
          u32 lo;
          const u32 hi = gdn_split(v[0], v[1], lo);
          *reinterpret_cast<u32*>(QK + i * PS + m) = hi;
          *reinterpret_cast<u32*>(QK + L * PS + i * PS + m) = lo;
        }
    }

    // P = W S and O = q S over the same S fragments (separate accumulators per product, so the
    // dependent mma chains are shorter; small terms summed first).
    float p[NT][4] = {}, p1[NT][4] = {}, p2[NT][4] = {}, o[NT][4] = {}, o1[NT][4] = {};
#pragma unroll
    for (int k0 = 0; k0 < DK; k0 += 16) {
      u32 ah[4], al[4], aq[4];
      gdn_frag_a(ah, W, KS, 16 * r, k0, lane);
      gdn_frag_a(al, W + L * KS, KS, 16 * r, k0, lane);
      gdn_frag_a(aq, Q, KS, 16 * r, k0, lane);
#pragma unroll
      for (int jp = 0; jp < (NT + 1) / 2; ++jp) {
        const int nb = hc * (VS / 2) + 16 * jp;
        u32 bh[4], bl[4];
        gdn_frag_b2_t(bh, Ss, SS, k0, nb, lane);
        gdn_frag_b2_t(bl, Ss + DK * SS, SS, k0, nb, lane);
#pragma unroll
        for (int h2 = 0; h2 < 2 && 2 * jp + h2 < NT; ++h2) {
          gdn_mma2(p[2 * jp + h2], ah, bh + 2 * h2);
          gdn_mma2(p1[2 * jp + h2], ah, bl + 2 * h2);
          gdn_mma2(p2[2 * jp + h2], al, bh + 2 * h2);
          gdn_mma2(o[2 * jp + h2], aq, bh + 2 * h2);
          gdn_mma2(o1[2 * jp + h2], aq, bl + 2 * h2);
        }
      }
    }
    if constexpr (!CLUSTER) {
      __syncthreads();  // W, q reads done: the single W / q buffer takes the next chunk's
      if (n + 1 < chunks) {
        load_wq(n + 1, 0);
        gdn_cp_async_commit();
      }
    } else if (n > 0) {
      finish_norm(n - 1);  // the previous chunk's row sums arrived long ago
    }

    // Vn = U - P -> Vs (hi, lo); X = dcy Vn -> Xs (hi, lo); O = exp(gam) q S. Padded rows: U = W = 0.
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int i = 16 * r + gi + 8 * hh;
      const float dcy = expf(gam_last - gam[i]), eg = expf(gam[i]);
#pragma unroll
      for (int jn = 0; jn < NT; ++jn) {
        const int c = hc * (VS / 2) + 8 * jn + 2 * ti;
        const float v0 = U[i * US + c] - (p[jn][2 * hh] + (p1[jn][2 * hh] + p2[jn][2 * hh]));
        const float v1 = U[i * US + c + 1] - (p[jn][2 * hh + 1] + (p1[jn][2 * hh + 1] + p2[jn][2 * hh + 1]));
        u32 lo;
        u32 hi = gdn_split(v0, v1, lo);
        *reinterpret_cast<u32*>(Vs + i * SS + c) = hi;
        *reinterpret_cast<u32*>(Vs + L * SS + i * SS + c) = lo;
        hi = gdn_split(dcy * v0, dcy * v1, lo);
        *reinterpret_cast<u32*>(Xs + i * SS + c) = hi;
        *reinterpret_cast<u32*>(Xs + L * SS + i * SS + c) = lo;
        o[jn][2 * hh] = eg * (o[jn][2 * hh] + o1[jn][2 * hh]);
        o[jn][2 * hh + 1] = eg * (o[jn][2 * hh + 1] + o1[jn][2 * hh + 1]);
      }
    }
    __syncthreads();  // Vs, Xs, QK visible; Ss reads done

    // S = exp(gam_last) S + k^T X over the chunk's rows (k exact: k^T X_hi + k^T X_lo).
    const float e_last = expf(gam_last);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int ns = 0; ns < NS; ++ns)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][ns][e] *= e_last;
    {
      float sl[MT][NS][4] = {};  // k^T X_lo, a separate chain, added at the end
#pragma unroll
      for (int k0 = 0; k0 < L; k0 += 16) {
        if (k0 >= rows) break;  // uniform
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          u32 a[4];
          gdn_frag_a_t(a, K, KS, 16 * (MT * warp + mt), k0, lane);
#pragma unroll
          for (int jp = 0; jp < NS / 2; ++jp) {
            u32 bh[4], bl[4];
            gdn_frag_b2_t(bh, Xs, SS, k0, 16 * jp, lane);
            gdn_frag_b2_t(bl, Xs + L * SS, SS, k0, 16 * jp, lane);
            gdn_mma2(s[mt][2 * jp], a, bh);
            gdn_mma2(sl[mt][2 * jp], a, bl);
            gdn_mma2(s[mt][2 * jp + 1], a, bh + 2);
            gdn_mma2(sl[mt][2 * jp + 1], a, bl + 2);
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int ns = 0; ns < NS; ++ns)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][ns][e] += sl[mt][ns][e];
    }

    // O += QK Vn (QK lower triangular: k-steps up to the diagonal block).
    {
      float o2[NT][4] = {};  // the lo terms, a separate chain
      for (int k0 = 0; k0 <= 16 * r; k0 += 16) {
        u32 ah[4], al[4];
        gdn_frag_a(ah, QK, PS, 16 * r, k0, lane);
        gdn_frag_a(al, QK + L * PS, PS, 16 * r, k0, lane);
#pragma unroll
        for (int jp = 0; jp < (NT + 1) / 2; ++jp) {
          const int nb = hc * (VS / 2) + 16 * jp;
          u32 bh[4], bl[4];
          gdn_frag_b2_t(bh, Vs, SS, k0, nb, lane);
          gdn_frag_b2_t(bl, Vs + L * SS, SS, k0, nb, lane);
#pragma unroll
          for (int h2 = 0; h2 < 2 && 2 * jp + h2 < NT; ++h2) {
            gdn_mma2(o[2 * jp + h2], ah, bh + 2 * h2);
            gdn_mma2(o2[2 * jp + h2], ah, bl + 2 * h2);
            gdn_mma2(o2[2 * jp + h2], al, bh + 2 * h2);
          }
        }
      }
#pragma unroll
      for (int jn = 0; jn < NT; ++jn)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[jn][e] += o2[jn][e];
    }

    if constexpr (CLUSTER) {
      // Row partial sums of squares of this warp's columns -> every CTA of the cluster, slot
      // (rank, hc) of buffer n % 2; the norm itself waits for chunk n + 1 (or the end).
      float sq[2] = {0.f, 0.f};
#pragma unroll
      for (int jn = 0; jn < NT; ++jn) {
        sq[0] += o[jn][0] * o[jn][0] + o[jn][1] * o[jn][1];
        sq[1] += o[jn][2] * o[jn][2] + o[jn][3] * o[jn][3];
      }
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        sq[hh] += __shfl_xor_sync(0xffffffffu, sq[hh], 1);
        sq[hh] += __shfl_xor_sync(0xffffffffu, sq[hh], 2);
      }
      float* slot = ssq + ((n % 2) * 2 * NC + 2 * int(rank) + hc) * L + 16 * r + gi;
      // lanes ti spread the NC peers: lane ti stores to peers ti, ti + 4 (both rows).
#pragma unroll
      for (int q0 = 0; q0 < NC; q0 += 4) {
        const int peer = q0 + ti;
        if (peer < NC) {
          gdn_st_cluster_f32(slot, u32(peer), sq[0]);
          gdn_st_cluster_f32(slot + 8, u32(peer), sq[1]);
        }
      }
      gdn_cluster_arrive();
#pragma unroll
      for (int jn = 0; jn < NT; ++jn)
#pragma unroll
        for (int e = 0; e < 4; ++e) op[jn][e] = o[jn][e];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int jn = 0; jn < NT; ++jn) zp[hh][jn] = zc[hh][jn];
      t_prev = t0;
    } else {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int i = 16 * r + gi + 8 * hh;
        if (i >= rows) continue;
#pragma unroll
        for (int jn = 0; jn < NT; ++jn) {
          const int c = c0 + hc * (VS / 2) + 8 * jn + 2 * ti;
          *reinterpret_cast<float2*>(o_out + (size_t(t0 + i) * HV + j) * DV + c) =
              make_float2(o[jn][2 * hh], o[jn][2 * hh + 1]);
        }
      }
    }
  }
  if constexpr (CLUSTER) finish_norm(chunks - 1);  // also: no peer stores into this CTA after it

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int ns = 0; ns < NS; ++ns)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        st[size_t(8 * ns + 2 * ti + e % 2) * DK + 16 * (MT * warp + mt) + gi + 8 * (e / 2)] = s[mt][ns][e];
}
}  // namespace q35k

// Portable form (sm_80+): O fp32 [T, HV, DV] -> o_out (gated_rmsnorm follows). z, norm_w, y, eps unused.
template <int HK, int HV, int DK, int DV, int VS>
__global__ void __launch_bounds__(256)
gdn_chunk_fused(const q35k::bf16* __restrict__ qkv, const float* __restrict__ gam_in, const float* __restrict__ u_in,
                const q35k::bf16* __restrict__ w_in, float* __restrict__ state, float* __restrict__ o_out, int T) {
  q35k::gdn_chunk_fused_body<HK, HV, DK, DV, VS, false>(qkv, gam_in, u_in, w_in, state, nullptr, 0, nullptr, nullptr,
                                                        o_out, 0.f, T);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Cluster form (sm_90+): the DV / VS slice CTAs of a head are one cluster (grid (HV, DV / VS)); the
// gated RMSNorm is fused: z [T, z_stride] bf16 (head j at columns j DV ..), norm_w [DV], y [T, HV DV].
template <int HK, int HV, int DK, int DV, int VS>
__global__ void __cluster_dims__(1, DV / VS, 1) __launch_bounds__(256)
gdn_chunk_fused_cluster(const q35k::bf16* __restrict__ qkv, const float* __restrict__ gam_in,
                        const float* __restrict__ u_in, const q35k::bf16* __restrict__ w_in, float* __restrict__ state,
                        const q35k::bf16* __restrict__ z, int z_stride, const q35k::bf16* __restrict__ norm_w,
                        q35k::bf16* __restrict__ y, float eps, int T) {
  q35k::gdn_chunk_fused_body<HK, HV, DK, DV, VS, true>(qkv, gam_in, u_in, w_in, state, z, z_stride, norm_w, y, nullptr,
                                                       eps, T);
}
#endif
