#pragma once
// Chunked gated delta rule for prefill (spec §2.5, FLA's stages), chunk L = 64, fp32 accumulation.
// Inputs from gdn_prologue: qkv [T, C] bf16 (q normalised and scaled | k normalised | v),
// g, beta [T, HV] fp32. Per value head j (key head kh = j / (HV / HK)) and chunk n of rows
// t0 = 64 n .. t0 + 63 (rows past T are zero and change nothing), gam = inclusive cumsum of g:
//
// gdn_chunk_prepare, grid (chunks, HV), block 256, fully parallel:
//   A[i,m]  = beta_i (k_i . k_m) exp(gam_i - gam_m), m < i           (strictly lower)
//   QK[i,m] = (q_i . k_m) exp(gam_i - gam_m), m <= i                 -> qk   [chunks, HV, 64, 64] fp32
//   U = (I + A)^-1 (beta v),  W = (I + A)^-1 (beta k exp(gam))       -> u [T, HV, DV], w [T, HV, DK] fp32
//   gam                                                              -> gam  [T, HV] fp32
//   k k^T and q k^T by bf16 mma.sync (exact products, fp32 sums). The triangular solve is forward
//   substitution in fp32: a thread owns one column of [U | W] in registers (right-looking, so the
//   64 row updates of a step are independent). qk and w are stored rounded to tf32 (they only feed
//   tf32 tensor-core products).
//
// gdn_chunk_state, grid (HV, DV / VS), block 256, serial over chunks: the state's value columns
// are independent, so a CTA owns VS of them (S [DK, VS], fp32 in registers: warp w owns state rows
// 16 w (DK / 128) ..) for the whole sequence, with a tf32 copy in shared memory for the products:
//   Vn = U - W S                                   (tf32 mma: warp = 16 chunk rows x VS / 2 columns)
//   O  = exp(gam) (q S) + QK Vn                    -> out [T, HV, DV] fp32 (QK causal: skipped tiles)
//   S  = exp(gam_last) S + (k exp(gam_last - gam))^T Vn
// Only differences of gam are exponentiated with a positive sign, so nothing overflows.
// The next chunk's inputs stream in by cp.async while this one computes: W, q, U, gam after the
// first product (double-buffered gam), QK and k after the state update.
// State in/out [HV, DV, DK] fp32 (the layout of gdn_recurrent.cuh).
#include "gdn_common.cuh"

namespace q35k {
constexpr int kGdnChunk = 64;
}  // namespace q35k

// Dynamic shared memory: 2 * 64 * (DK + 8) bf16 + 64 * 68 + 2 * 64 floats.
template <int HK, int HV, int DK, int DV>
__global__ void __launch_bounds__(256, 2)
gdn_chunk_prepare(const q35k::bf16* __restrict__ qkv, const float* __restrict__ g, const float* __restrict__ beta,
                  float* __restrict__ gam_out, float* __restrict__ u_out, float* __restrict__ w_out,
                  float* __restrict__ qk_out, int T) {
  constexpr int L = q35k::kGdnChunk, C = 2 * HK * DK + HV * DV, HS = DK + 8, AS = L + 4;
  static_assert(HV % HK == 0 && DK % 16 == 0, "gdn_chunk_prepare: HV must be a multiple of HK, DK of 16");
  extern __shared__ __align__(16) float smem[];
  q35k::bf16* Qb = reinterpret_cast<q35k::bf16*>(smem);  // [L, HS] q
  q35k::bf16* Kb = Qb + L * HS;                           // [L, HS] k
  float* At = reinterpret_cast<float*>(Kb + L * HS);      // [L, AS]: At[m][i] = A[i][m]
  float* gam = At + L * AS;                               // [L]
  float* bet = gam + L;                                   // [L]
  q35k::gdn_pdl_wait();
  q35k::gdn_pdl_launch_dependents();
  const int tid = threadIdx.x, n = blockIdx.x, j = blockIdx.y, kh = j / (HV / HK);
  const int lane = tid % 32, warp = tid / 32, gi = lane / 4, ti = lane % 4;
  const int t0 = n * L, rows = min(L, T - t0);

  for (int idx = tid; idx < L * (DK / 8); idx += 256) {
    const int i = idx / (DK / 8), ch = idx % (DK / 8);
    const bool in = i < rows;
    const q35k::bf16* x = qkv + size_t(t0 + (in ? i : 0)) * C + kh * DK + 8 * ch;
    q35k::gdn_cp_async_16(Qb + i * HS + 8 * ch, x, in);
    q35k::gdn_cp_async_16(Kb + i * HS + 8 * ch, x + HK * DK, in);
  }
  q35k::gdn_cp_async_commit();
  if (tid < L) {
    gam[tid] = tid < rows ? g[size_t(t0 + tid) * HV + j] : 0.f;
    bet[tid] = tid < rows ? beta[size_t(t0 + tid) * HV + j] : 0.f;
  }
  __syncthreads();
  if (tid == 0)
    for (int i = 1; i < L; ++i) gam[i] += gam[i - 1];
  q35k::gdn_cp_async_wait<0>();
  __syncthreads();
  if (tid < rows) gam_out[size_t(t0 + tid) * HV + j] = gam[tid];

  {  // k k^T and q k^T: warp = chunk rows 16 r .. and columns 32 hc .. (4 n-tiles of 8)
    const int r = warp % 4, hc = warp / 4;
    float kk[4][4] = {}, qk[4][4] = {};
    auto ld = [](const q35k::bf16* p) { return *reinterpret_cast<const q35k::u32*>(p); };
#pragma unroll 2
    for (int k0 = 0; k0 < DK; k0 += 16) {
      const int c = k0 + 2 * ti;
      const q35k::u32 ak[4] = {ld(Kb + (16 * r + gi) * HS + c), ld(Kb + (16 * r + gi + 8) * HS + c),
                               ld(Kb + (16 * r + gi) * HS + c + 8), ld(Kb + (16 * r + gi + 8) * HS + c + 8)};
      const q35k::u32 aq[4] = {ld(Qb + (16 * r + gi) * HS + c), ld(Qb + (16 * r + gi + 8) * HS + c),
                               ld(Qb + (16 * r + gi) * HS + c + 8), ld(Qb + (16 * r + gi + 8) * HS + c + 8)};
#pragma unroll
      for (int jn = 0; jn < 4; ++jn) {
        const int m0 = 32 * hc + 8 * jn;
        const q35k::u32 b[2] = {ld(Kb + (m0 + gi) * HS + c), ld(Kb + (m0 + gi) * HS + c + 8)};
        q35k::gdn_mma_bf16(kk[jn], ak, b);
        q35k::gdn_mma_bf16(qk[jn], aq, b);
      }
    }
    float* qk_blk = qk_out + (size_t(n) * HV + j) * L * L;
#pragma unroll
    for (int jn = 0; jn < 4; ++jn)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int i = 16 * r + gi + 8 * hh, m = 32 * hc + 8 * jn + 2 * ti;
        float qv[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float decay = m + e <= i ? expf(gam[i] - gam[m + e]) : 0.f;
          At[(m + e) * AS + i] = m + e < i ? bet[i] * kk[jn][2 * hh + e] * decay : 0.f;
          qv[e] = q35k::gdn_tf32(qk[jn][2 * hh + e] * decay);
        }
        *reinterpret_cast<float2*>(qk_blk + i * L + m) = make_float2(qv[0], qv[1]);
      }
  }
  __syncthreads();

  // Forward substitution, one column c of X = [U (DV) | W (DK)] per thread, in registers:
  // after x[m] is final, x[i] -= A[i][m] x[m] for every i (A[i][m] = 0 for i <= m).
  for (int c = tid; c < DV + DK; c += 256) {
    const bool is_u = c < DV;
    float x[L];
#pragma unroll
    for (int i = 0; i < L; ++i)
      x[i] = i >= rows ? 0.f
             : is_u    ? bet[i] * q35k::bf16_to_f32(qkv[size_t(t0 + i) * C + 2 * HK * DK + j * DV + c])
                       : bet[i] * q35k::bf16_to_f32(Kb[i * HS + c - DV]) * expf(gam[i]);
#pragma unroll
    for (int m = 0; m < L - 1; ++m)
#pragma unroll
      for (int i4 = m / 4; i4 < L / 4; ++i4) {
        const float4 a = *reinterpret_cast<const float4*>(At + m * AS + 4 * i4);
        x[4 * i4 + 0] -= a.x * x[m];
        x[4 * i4 + 1] -= a.y * x[m];
        x[4 * i4 + 2] -= a.z * x[m];
        x[4 * i4 + 3] -= a.w * x[m];
      }
#pragma unroll
    for (int i = 0; i < L; ++i) {
      if (i < rows) {
        if (is_u) u_out[(size_t(t0 + i) * HV + j) * DV + c] = x[i];
        else w_out[(size_t(t0 + i) * HV + j) * DK + c - DV] = q35k::gdn_tf32(x[i]);
      }
    }
  }
}

// Dynamic shared memory: 64 * (DK + 4) + 64 * 68 + 2 * 64 * (VS + 8) + DK * (VS + 8) + 4 * 64 floats
// + 2 * 64 * (DK + 8) bf16.
template <int HK, int HV, int DK, int DV, int VS>
__global__ void __launch_bounds__(256)
gdn_chunk_state(const q35k::bf16* __restrict__ qkv, const float* __restrict__ gam_in,
                const float* __restrict__ u_in, const float* __restrict__ w_in, const float* __restrict__ qk_in,
                float* __restrict__ state, float* __restrict__ out, int T) {
  constexpr int L = q35k::kGdnChunk, C = 2 * HK * DK + HV * DV;
  constexpr int WS = DK + 4, HS = DK + 8, QS = L + 4, VSS = VS + 8;  // row strides (conflict-free fragments)
  constexpr int NT = VS / 16;   // n-tiles of 8 per warp in the chunk-row products
  constexpr int NS = VS / 8;    // n-tiles of the state
  constexpr int MT = DK / 128;  // 16-row state tiles per warp
  static_assert(VS % 16 == 0 && VS <= 64 && DV % VS == 0 && DK % 128 == 0 && HV % HK == 0,
                "gdn_chunk_state: VS must be 16, 32 or 64 and divide DV; DK a multiple of 128");
  extern __shared__ __align__(16) float smem[];
  float* Ws = smem;                                                  // [L, WS]  W
  q35k::bf16* Qb = reinterpret_cast<q35k::bf16*>(Ws + L * WS);      // [L, HS]  q
  q35k::bf16* Kb = Qb + L * HS;                                      // [L, HS]  k
  float* QKs = reinterpret_cast<float*>(Kb + L * HS);                // [L, QS]  QK
  float* Us = QKs + L * QS;                                          // [L, VSS] U
  float* Vn = Us + L * VSS;                                          // [L, VSS] Vn (tf32)
  float* Ss = Vn + L * VSS;                                          // [DK, VSS] S (tf32)
  float* gam2 = Ss + DK * VSS;                                       // [2, L] gam, double-buffered
  float* eg = gam2 + 2 * L;                                          // [L] exp(gam)
  float* dcy = eg + L;                                               // [L] exp(gam_last - gam)
  q35k::gdn_pdl_wait();
  q35k::gdn_pdl_launch_dependents();
  const int tid = threadIdx.x, j = blockIdx.x, kh = j / (HV / HK), c0 = blockIdx.y * VS;
  const int lane = tid % 32, warp = tid / 32, gi = lane / 4, ti = lane % 4;
  const int r = warp % 4, hc = warp / 4;  // chunk-row products: rows 16 r .., columns hc VS / 2 ..
  float* st = state + (size_t(j) * DV + c0) * DK;  // [VS, DK] rows of this CTA
  const int chunks = (T + L - 1) / L;

  auto load_wqu = [&](int t0, float* gam) {  // W, q, U, gam of the chunk at t0
    const int rows = min(L, T - t0);
    for (int idx = tid; idx < L * (DK / 4); idx += 256) {
      const int i = idx / (DK / 4), ch = idx % (DK / 4);
      const bool in = i < rows;
      q35k::gdn_cp_async_16(Ws + i * WS + 4 * ch, w_in + (size_t(t0 + (in ? i : 0)) * HV + j) * DK + 4 * ch, in);
    }
    for (int idx = tid; idx < L * (DK / 8); idx += 256) {
      const int i = idx / (DK / 8), ch = idx % (DK / 8);
      const bool in = i < rows;
      q35k::gdn_cp_async_16(Qb + i * HS + 8 * ch, qkv + size_t(t0 + (in ? i : 0)) * C + kh * DK + 8 * ch, in);
    }
    for (int idx = tid; idx < L * (VS / 4); idx += 256) {
      const int i = idx / (VS / 4), ch = idx % (VS / 4);
      const bool in = i < rows;
      q35k::gdn_cp_async_16(Us + i * VSS + 4 * ch, u_in + (size_t(t0 + (in ? i : 0)) * HV + j) * DV + c0 + 4 * ch, in);
    }
    if (tid < L) q35k::gdn_cp_async_4(gam + tid, gam_in + size_t(t0 + (tid < rows ? tid : 0)) * HV + j, tid < rows);
  };
  auto load_qkk = [&](int t0) {  // QK and k of the chunk at t0
    const int rows = min(L, T - t0);
    const float* qk_blk = qk_in + (size_t(t0 / L) * HV + j) * L * L;
    for (int idx = tid; idx < L * (L / 4); idx += 256) {
      const int i = idx / (L / 4), ch = idx % (L / 4);
      q35k::gdn_cp_async_16(QKs + i * QS + 4 * ch, qk_blk + i * L + 4 * ch, true);
    }
    for (int idx = tid; idx < L * (DK / 8); idx += 256) {
      const int i = idx / (DK / 8), ch = idx % (DK / 8);
      const bool in = i < rows;
      q35k::gdn_cp_async_16(Kb + i * HS + 8 * ch,
                            qkv + size_t(t0 + (in ? i : 0)) * C + HK * DK + kh * DK + 8 * ch, in);
    }
  };

  load_wqu(0, gam2);
  q35k::gdn_cp_async_commit();
  load_qkk(0);
  q35k::gdn_cp_async_commit();

  // The state tile of this warp: element e of s[mt][ns] is row 16 (MT warp + mt) + gi + 8 (e / 2),
  // column 8 ns + 2 ti + e % 2.
  float s[MT][NS][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int ns = 0; ns < NS; ++ns)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int a = 16 * (MT * warp + mt) + gi + 8 * (e / 2), c = 8 * ns + 2 * ti + e % 2;
        s[mt][ns][e] = st[size_t(c) * DK + a];
        Ss[a * VSS + c] = q35k::gdn_tf32(s[mt][ns][e]);
      }

  for (int n = 0; n < chunks; ++n) {
    const int t0 = n * L, rows = min(L, T - t0);
    const float* gam = gam2 + (n % 2) * L;
    q35k::gdn_cp_async_wait<1>();  // W, q, U, gam of this chunk (QK, k may be in flight)
    __syncthreads();
    const float gam_last = gam[rows - 1];
    if (tid < L) {
      eg[tid] = expf(gam[tid]);
      dcy[tid] = expf(gam_last - gam[tid]);
    }

    // P = W S and R = q S for rows 16 r + .., columns hc VS / 2 + 8 jn + ..
    float p[NT][4] = {}, q[NT][4] = {};
#pragma unroll 4
    for (int k0 = 0; k0 < DK; k0 += 8) {
      const int ra = (16 * r + gi), ca = k0 + ti;
      const float aw[4] = {Ws[ra * WS + ca], Ws[(ra + 8) * WS + ca], Ws[ra * WS + ca + 4], Ws[(ra + 8) * WS + ca + 4]};
      const float aq[4] = {q35k::bf16_to_f32(Qb[ra * HS + ca]), q35k::bf16_to_f32(Qb[(ra + 8) * HS + ca]),
                           q35k::bf16_to_f32(Qb[ra * HS + ca + 4]), q35k::bf16_to_f32(Qb[(ra + 8) * HS + ca + 4])};
#pragma unroll
      for (int jn = 0; jn < NT; ++jn) {
        const int nb = hc * (VS / 2) + 8 * jn + gi;
        const float b[2] = {Ss[(k0 + ti) * VSS + nb], Ss[(k0 + ti + 4) * VSS + nb]};
        q35k::gdn_mma_tf32(p[jn], aw, b);
        q35k::gdn_mma_tf32(q[jn], aq, b);
      }
    }
#pragma unroll
    for (int jn = 0; jn < NT; ++jn)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 16 * r + gi + 8 * (e / 2), c = hc * (VS / 2) + 8 * jn + 2 * ti + e % 2;
        Vn[i * VSS + c] = q35k::gdn_tf32(Us[i * VSS + c] - p[jn][e]);
      }
    q35k::gdn_cp_async_wait<0>();  // QK, k of this chunk
    __syncthreads();               // Vn, eg, dcy, QK, k visible; W, q, U, Ss free
    if (n + 1 < chunks) load_wqu(t0 + L, gam2 + ((n + 1) % 2) * L);
    q35k::gdn_cp_async_commit();

    // O = exp(gam) R + QK Vn (QK tiles above the diagonal are zero: k-steps < 16 (r + 1)).
    float o[NT][4];
#pragma unroll
    for (int jn = 0; jn < NT; ++jn)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[jn][e] = q[jn][e] * eg[16 * r + gi + 8 * (e / 2)];
    for (int k0 = 0; k0 < 16 * (r + 1); k0 += 8) {
      const int ra = 16 * r + gi, ca = k0 + ti;
      const float a[4] = {QKs[ra * QS + ca], QKs[(ra + 8) * QS + ca], QKs[ra * QS + ca + 4],
                          QKs[(ra + 8) * QS + ca + 4]};
#pragma unroll
      for (int jn = 0; jn < NT; ++jn) {
        const int nb = hc * (VS / 2) + 8 * jn + gi;
        const float b[2] = {Vn[(k0 + ti) * VSS + nb], Vn[(k0 + ti + 4) * VSS + nb]};
        q35k::gdn_mma_tf32(o[jn], a, b);
      }
    }
#pragma unroll
    for (int jn = 0; jn < NT; ++jn)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int i = 16 * r + gi + 8 * hh, c = hc * (VS / 2) + 8 * jn + 2 * ti;
        if (i < rows)
          *reinterpret_cast<float2*>(out + (size_t(t0 + i) * HV + j) * DV + c0 + c) =
              make_float2(o[jn][2 * hh], o[jn][2 * hh + 1]);
      }

    // S = exp(gam_last) S + (k dcy)^T Vn over the chunk's rows (padded rows have Vn = 0).
    const float e_last = expf(gam_last);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int ns = 0; ns < NS; ++ns)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][ns][e] *= e_last;
    for (int k0 = 0; k0 < rows; k0 += 8) {
      const float d0 = dcy[k0 + ti], d1 = dcy[k0 + ti + 4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int ra = 16 * (MT * warp + mt) + gi;
        const float a[4] = {q35k::gdn_tf32(q35k::bf16_to_f32(Kb[(k0 + ti) * HS + ra]) * d0),
                            q35k::gdn_tf32(q35k::bf16_to_f32(Kb[(k0 + ti) * HS + ra + 8]) * d0),
                            q35k::gdn_tf32(q35k::bf16_to_f32(Kb[(k0 + ti + 4) * HS + ra]) * d1),
                            q35k::gdn_tf32(q35k::bf16_to_f32(Kb[(k0 + ti + 4) * HS + ra + 8]) * d1)};
#pragma unroll
        for (int ns = 0; ns < NS; ++ns) {
          const float b[2] = {Vn[(k0 + ti) * VSS + 8 * ns + gi], Vn[(k0 + ti + 4) * VSS + 8 * ns + gi]};
          q35k::gdn_mma_tf32(s[mt][ns], a, b);
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int ns = 0; ns < NS; ++ns)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int a = 16 * (MT * warp + mt) + gi + 8 * hh, c = 8 * ns + 2 * ti;
          *reinterpret_cast<float2*>(Ss + a * VSS + c) =
              make_float2(q35k::gdn_tf32(s[mt][ns][2 * hh]), q35k::gdn_tf32(s[mt][ns][2 * hh + 1]));
        }
    __syncthreads();  // QK, k, Vn, eg, dcy free; Ss complete
    if (n + 1 < chunks) load_qkk(t0 + L);
    q35k::gdn_cp_async_commit();
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int ns = 0; ns < NS; ++ns)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        st[size_t(8 * ns + 2 * ti + e % 2) * DK + 16 * (MT * warp + mt) + gi + 8 * (e / 2)] = s[mt][ns][e];
}
