#pragma once
// Chunked gated delta rule for prefill (spec §2.5, FLA's stages), chunk L = 64, fp32 math.
// Inputs from gdn_prologue: qkv [T, C] bf16 (q normalised and scaled | k normalised | v),
// g, beta [T, HV] fp32. Per value head j (key head kh = j / (HV / HK)) and chunk n of rows
// t0 = 64 n .. t0 + 63 (rows past T are zero and change nothing), gam = inclusive cumsum of g:
//
// gdn_chunk_prepare, grid (chunks, HV), block 256, fully parallel:
//   A[i,m]  = beta_i (k_i . k_m) exp(gam_i - gam_m), m < i           (strictly lower)
//   QK[i,m] = (q_i . k_m) exp(gam_i - gam_m), m <= i                 -> qk   [chunks, HV, 64, 64] fp32
//   U = (I + A)^-1 (beta v),  W = (I + A)^-1 (beta k exp(gam))       -> u [T, HV, DV], w [T, HV, DK] fp32
//   gam                                                              -> gam  [T, HV] fp32
//   The triangular solve is forward substitution in fp32: a thread owns one column of [U | W].
//
// gdn_chunk_state, grid (HV, DV / VS), block 256, serial over chunks: the state's value columns
// are independent, so a CTA owns VS of them (S [DK, VS] in shared memory) for the whole sequence:
//   Vn = U - W S
//   O  = (q exp(gam)) S + QK Vn                                      -> out [T, HV, DV] fp32
//   S  = exp(gam_last) S + (k exp(gam_last - gam))^T Vn
// Only differences of gam are exponentiated with a positive sign, so nothing overflows.
// State in/out [HV, DV, DK] fp32 (the layout of gdn_recurrent.cuh).
#include "gdn_common.cuh"

namespace q35k {
constexpr int kGdnChunk = 64;
}  // namespace q35k

// Dynamic shared memory: (64 * (DK + 1) + 64 * 65 + 2 * 64 + 64 * max(DK + 1, DV + DK)) floats.
template <int HK, int HV, int DK, int DV>
__global__ void __launch_bounds__(256)
gdn_chunk_prepare(const q35k::bf16* __restrict__ qkv, const float* __restrict__ g, const float* __restrict__ beta,
                  float* __restrict__ gam_out, float* __restrict__ u_out, float* __restrict__ w_out,
                  float* __restrict__ qk_out, int T) {
  constexpr int L = q35k::kGdnChunk, C = 2 * HK * DK + HV * DV, KS = DK + 1;
  static_assert(HV % HK == 0, "gdn_chunk_prepare: HV must be a multiple of HK");
  extern __shared__ float smem[];
  float* Ks = smem;               // [L, KS]
  float* As = Ks + L * KS;        // [L, L + 1]
  float* gam = As + L * (L + 1);  // [L]
  float* bet = gam + L;           // [L]
  float* Qs = bet + L;            // [L, KS], then X [L, DV + DK] (the solve's columns)
  float* X = Qs;
  q35k::gdn_pdl_wait();
  q35k::gdn_pdl_launch_dependents();
  const int tid = threadIdx.x, n = blockIdx.x, j = blockIdx.y, kh = j / (HV / HK);
  const int t0 = n * L, rows = min(L, T - t0);

#pragma unroll 8  // independent global loads in flight
  for (int idx = tid; idx < L * DK; idx += 256) {
    const int i = idx / DK, a = idx % DK;
    const q35k::bf16* x = qkv + size_t(t0 + i) * C + kh * DK + a;
    Qs[i * KS + a] = i < rows ? q35k::bf16_to_f32(x[0]) : 0.f;
    Ks[i * KS + a] = i < rows ? q35k::bf16_to_f32(x[HK * DK]) : 0.f;
  }
  if (tid < L) {
    gam[tid] = tid < rows ? g[size_t(t0 + tid) * HV + j] : 0.f;
    bet[tid] = tid < rows ? beta[size_t(t0 + tid) * HV + j] : 0.f;
  }
  __syncthreads();
  if (tid == 0)
    for (int i = 1; i < L; ++i) gam[i] += gam[i - 1];
  __syncthreads();
  if (tid < rows) gam_out[size_t(t0 + tid) * HV + j] = gam[tid];

  {  // A and QK: a thread owns rows ti + 16 r and columns tm + 16 s
    const int ti = tid / 16, tm = tid % 16;
    float kk[4][4] = {}, qk[4][4] = {};
    for (int a = 0; a < DK; ++a) {
      float ki[4], qi[4], km[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        ki[r] = Ks[(ti + 16 * r) * KS + a];
        qi[r] = Qs[(ti + 16 * r) * KS + a];
        km[r] = Ks[(tm + 16 * r) * KS + a];
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          kk[r][s] += ki[r] * km[s];
          qk[r][s] += qi[r] * km[s];
        }
    }
    float* qk_blk = qk_out + (size_t(n) * HV + j) * L * L;
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int i = ti + 16 * r, m = tm + 16 * s;
        const float decay = m <= i ? expf(gam[i] - gam[m]) : 0.f;
        As[i * (L + 1) + m] = m < i ? bet[i] * kk[r][s] * decay : 0.f;
        qk_blk[i * L + m] = qk[r][s] * decay;
      }
  }
  __syncthreads();

  // Forward substitution, one column c of X = [U (DV) | W (DK)] per thread (no barrier: a thread
  // touches only its column).
  for (int c = tid; c < DV + DK; c += 256) {
    const bool is_u = c < DV;
#pragma unroll 8  // independent global loads in flight
    for (int i = 0; i < rows; ++i)
      X[i * (DV + DK) + c] = is_u ? bet[i] * q35k::bf16_to_f32(qkv[size_t(t0 + i) * C + 2 * HK * DK + j * DV + c])
                                  : bet[i] * Ks[i * KS + c - DV] * expf(gam[i]);
    for (int i = 1; i < rows; ++i) {
      float acc = X[i * (DV + DK) + c];
#pragma unroll 8
      for (int m = 0; m < i; ++m) acc -= As[i * (L + 1) + m] * X[m * (DV + DK) + c];
      X[i * (DV + DK) + c] = acc;
    }
#pragma unroll 8
    for (int i = 0; i < rows; ++i) {
      if (is_u) u_out[(size_t(t0 + i) * HV + j) * DV + c] = X[i * (DV + DK) + c];
      else w_out[(size_t(t0 + i) * HV + j) * DK + c - DV] = X[i * (DV + DK) + c];
    }
  }
}

// Dynamic shared memory: (DK * (VS + 1) + 3 * 64 * (DK + 1) + 64 * (VS + 1) + 64 * 65 + 64) floats.
template <int HK, int HV, int DK, int DV, int VS>
__global__ void __launch_bounds__(256)
gdn_chunk_state(const q35k::bf16* __restrict__ qkv, const float* __restrict__ gam_in,
                const float* __restrict__ u_in, const float* __restrict__ w_in, const float* __restrict__ qk_in,
                float* __restrict__ state, float* __restrict__ out, int T) {
  constexpr int L = q35k::kGdnChunk, C = 2 * HK * DK + HV * DV, KS = DK + 1, SS = VS + 1;
  constexpr int CG = VS / 4;          // column groups: a thread owns columns cg + CG e, e < 4
  constexpr int RG = 256 / CG;        // row groups
  constexpr int RPT = L / RG;         // chunk rows per thread: rg + RG r
  constexpr int APT = DK / RG;        // state rows per thread: rg + RG r
  static_assert(VS % 4 == 0 && DV % VS == 0 && 256 % CG == 0 && L % RG == 0 && DK % RG == 0 && RPT >= 1,
                "gdn_chunk_state: VS must be 16, 32 or 64 and divide DV");
  extern __shared__ float smem[];
  float* S = smem;                 // [DK, SS]
  float* Ws = S + DK * SS;         // [L, KS]  W
  float* Qs = Ws + L * KS;         // [L, KS]  q exp(gam)
  float* Kd = Qs + L * KS;         // [L, KS]  k exp(gam_last - gam)
  float* Vs = Kd + L * KS;         // [L, SS]  U, then Vn
  float* QKs = Vs + L * SS;        // [L, L + 1]
  float* gam = QKs + L * (L + 1);  // [L]
  q35k::gdn_pdl_wait();
  q35k::gdn_pdl_launch_dependents();
  const int tid = threadIdx.x, j = blockIdx.x, kh = j / (HV / HK), c0 = blockIdx.y * VS;
  const int cg = tid % CG, rg = tid / CG;
  float* st = state + (size_t(j) * DV + c0) * DK;  // [VS, DK] rows of this CTA

  for (int idx = tid; idx < VS * DK; idx += 256) S[(idx % DK) * SS + idx / DK] = st[idx];

  for (int t0 = 0; t0 < T; t0 += L) {
    const int rows = min(L, T - t0);
    if (tid < L) gam[tid] = tid < rows ? gam_in[size_t(t0 + tid) * HV + j] : 0.f;
    __syncthreads();
    const float gam_last = gam[rows - 1];
#pragma unroll 8  // independent global loads in flight
    for (int idx = tid; idx < L * DK; idx += 256) {
      const int i = idx / DK, a = idx % DK;
      const bool in = i < rows;
      const q35k::bf16* x = qkv + size_t(t0 + i) * C + kh * DK + a;
      Ws[i * KS + a] = in ? w_in[(size_t(t0 + i) * HV + j) * DK + a] : 0.f;
      Qs[i * KS + a] = in ? q35k::bf16_to_f32(x[0]) * expf(gam[i]) : 0.f;
      Kd[i * KS + a] = in ? q35k::bf16_to_f32(x[HK * DK]) * expf(gam_last - gam[i]) : 0.f;
    }
#pragma unroll 8  // independent global loads in flight
    for (int idx = tid; idx < L * VS; idx += 256) {
      const int i = idx / VS, c = idx % VS;
      Vs[i * SS + c] = i < rows ? u_in[(size_t(t0 + i) * HV + j) * DV + c0 + c] : 0.f;
    }
    const float* qk_blk = qk_in + (size_t(t0 / L) * HV + j) * L * L;
#pragma unroll 8  // independent global loads in flight
    for (int idx = tid; idx < L * L; idx += 256) QKs[(idx / L) * (L + 1) + idx % L] = qk_blk[idx];
    __syncthreads();

    // Vn = U - W S and O = (q exp(gam)) S for rows rg + RG r, columns cg + CG e.
    float vn[RPT][4] = {}, o[RPT][4] = {};
    for (int a = 0; a < DK; ++a) {
      float sv[4], wv[RPT], qv[RPT];
#pragma unroll
      for (int e = 0; e < 4; ++e) sv[e] = S[a * SS + cg + CG * e];
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        wv[r] = Ws[(rg + RG * r) * KS + a];
        qv[r] = Qs[(rg + RG * r) * KS + a];
      }
#pragma unroll
      for (int r = 0; r < RPT; ++r)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          vn[r][e] += wv[r] * sv[e];
          o[r][e] += qv[r] * sv[e];
        }
    }
#pragma unroll
    for (int r = 0; r < RPT; ++r)
#pragma unroll
      for (int e = 0; e < 4; ++e) Vs[(rg + RG * r) * SS + cg + CG * e] -= vn[r][e];
    __syncthreads();

    // O += QK Vn (QK is zero above the diagonal and on padded rows).
    for (int m = 0; m < L; ++m) {
      float vv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) vv[e] = Vs[m * SS + cg + CG * e];
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const float p = QKs[(rg + RG * r) * (L + 1) + m];
#pragma unroll
        for (int e = 0; e < 4; ++e) o[r][e] += p * vv[e];
      }
    }
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int i = rg + RG * r;
      if (i < rows)
#pragma unroll
        for (int e = 0; e < 4; ++e) out[(size_t(t0 + i) * HV + j) * DV + c0 + cg + CG * e] = o[r][e];
    }

    // S = exp(gam_last) S + Kd^T Vn for state rows rg + RG r.
    const float e_last = expf(gam_last);
    float sn[APT][4];
#pragma unroll
    for (int r = 0; r < APT; ++r)
#pragma unroll
      for (int e = 0; e < 4; ++e) sn[r][e] = S[(rg + RG * r) * SS + cg + CG * e] * e_last;
    for (int i = 0; i < rows; ++i) {
      float vv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) vv[e] = Vs[i * SS + cg + CG * e];
#pragma unroll
      for (int r = 0; r < APT; ++r) {
        const float kv = Kd[i * KS + rg + RG * r];
#pragma unroll
        for (int e = 0; e < 4; ++e) sn[r][e] += kv * vv[e];
      }
    }
#pragma unroll
    for (int r = 0; r < APT; ++r)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[(rg + RG * r) * SS + cg + CG * e] = sn[r][e];
    __syncthreads();
  }

  for (int idx = tid; idx < VS * DK; idx += 256) st[idx] = S[(idx % DK) * SS + idx / DK];
}
