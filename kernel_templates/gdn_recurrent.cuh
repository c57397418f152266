#pragma once
// Gated delta rule, token by token (spec §2.4 step 8), fp32 state:
//   S = exp(g) S;  u = S^T k;  delta = beta (v - u);  S += k delta^T;  o = S^T q  (updated S)
// State layout [HV, DV, DK] fp32 (k contiguous): one state row S[j, r, :] is a row over k, so
// the decay, S.k, the update and S.q are row-local. A warp owns ROWS / WARPS rows; a lane holds
// DK / 32 k-elements of each (float4 at k = 128 m + 4 lane), reductions are warp shuffles.
// Grid: (HV, DV / ROWS): value head j, rows [y ROWS, (y+1) ROWS); value head j reads key head
// j / (HV / HK). The state stays in registers across the tokens of a call.
//
// Two entry points:
//   gdn_recurrent  any T, inputs from gdn_prologue (q, k normalised, bf16 [T, C]; g, beta fp32).
//   gdn_decode     one token, with the prologue fused: conv + SiLU + L2 norm + gates computed from
//                  the projection row and the ring conv state (each CTA recomputes the 2 DK q/k
//                  channels of its key head, split over its warps and shared through shared
//                  memory, and its own v rows; one CTA per key head writes the q/k ring slot,
//                  every CTA the slots of its v rows); writes the recurrence output
//                  o, whose gated RMSNorm the out_proj GEMV applies to its input (gemv_w4a16_gated).
//   gdn_decode_norm, gdn_decode_batch   the same with the gated RMSNorm run by the last CTA of each
//                  value head (GatedRmsnormHead) -> y bf16.
#include "gated_rmsnorm.cuh"
#include "gdn_common.cuh"

namespace q35k {

template <int DK>
struct GdnKeyVec {  // one lane's share of a DK vector: k = 128 m + 4 lane + e
  static_assert(DK % 128 == 0, "gdn: DK must be a multiple of 128 (float4 per lane)");
  static constexpr int M = DK / 128;
  float x[M][4];
  __device__ __forceinline__ static int index(int m, int lane, int e) { return 128 * m + 4 * lane + e; }
};

// One token's update of a warp's RPW rows; s [RPW] row shares, q and k the lane's shares, v [RPW].
template <int DK, int RPW>
__device__ __forceinline__ void gdn_step(GdnKeyVec<DK> (&s)[RPW], const GdnKeyVec<DK>& q, const GdnKeyVec<DK>& k,
                                         const float (&v)[RPW], float g, float beta, float (&o)[RPW]) {
  const float decay = expf(g);
  float u[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    float acc = 0.f;
#pragma unroll
    for (int m = 0; m < GdnKeyVec<DK>::M; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[r].x[m][e] *= decay;
        acc += s[r].x[m][e] * k.x[m][e];
      }
    u[r] = acc;
  }
#pragma unroll
  for (int r = 0; r < RPW; ++r) u[r] = warp_sum(u[r]);
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const float delta = beta * (v[r] - u[r]);
    float acc = 0.f;
#pragma unroll
    for (int m = 0; m < GdnKeyVec<DK>::M; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[r].x[m][e] += k.x[m][e] * delta;
        acc += s[r].x[m][e] * q.x[m][e];
      }
    o[r] = acc;
  }
#pragma unroll
  for (int r = 0; r < RPW; ++r) o[r] = warp_sum(o[r]);
}

template <int DK, int RPW>
__device__ __forceinline__ void gdn_load_state(GdnKeyVec<DK> (&s)[RPW], const float* rows, int lane) {
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int m = 0; m < GdnKeyVec<DK>::M; ++m) {
      const float4 f = *reinterpret_cast<const float4*>(rows + r * DK + GdnKeyVec<DK>::index(m, lane, 0));
      s[r].x[m][0] = f.x; s[r].x[m][1] = f.y; s[r].x[m][2] = f.z; s[r].x[m][3] = f.w;
    }
}

template <int DK, int RPW>
__device__ __forceinline__ void gdn_store_state(const GdnKeyVec<DK> (&s)[RPW], float* rows, int lane) {
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int m = 0; m < GdnKeyVec<DK>::M; ++m)
      *reinterpret_cast<float4*>(rows + r * DK + GdnKeyVec<DK>::index(m, lane, 0)) =
          make_float4(s[r].x[m][0], s[r].x[m][1], s[r].x[m][2], s[r].x[m][3]);
}

// x * rsqrt(sum x^2 + 1e-6) * scale over the warp's DK vector.
template <int DK>
__device__ __forceinline__ void gdn_l2norm(GdnKeyVec<DK>& x, float scale) {
  float ss = 0.f;
#pragma unroll
  for (int m = 0; m < GdnKeyVec<DK>::M; ++m)
#pragma unroll
    for (int e = 0; e < 4; ++e) ss += x.x[m][e] * x.x[m][e];
  const float inv = 1.f / sqrtf(warp_sum(ss) + 1e-6f) * scale;
#pragma unroll
  for (int m = 0; m < GdnKeyVec<DK>::M; ++m)
#pragma unroll
    for (int e = 0; e < 4; ++e) x.x[m][e] *= inv;
}

}  // namespace q35k

// Any T. qkv [T, C] bf16 from gdn_prologue (C = 2*HK*DK + HV*DV); g, beta [T, HV] fp32;
// state [HV, DV, DK] fp32 in/out; out [T, HV, DV] fp32.
template <int HK, int HV, int DK, int DV, int ROWS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
gdn_recurrent(const q35k::bf16* __restrict__ qkv, const float* __restrict__ g, const float* __restrict__ beta,
              float* __restrict__ state, float* __restrict__ out, int T) {
  constexpr int C = 2 * HK * DK + HV * DV, RPW = ROWS / WARPS;
  static_assert(ROWS % WARPS == 0 && DV % ROWS == 0 && HV % HK == 0, "gdn_recurrent: bad tiling");
  q35k::gdn_pdl_wait();
  q35k::gdn_pdl_launch_dependents();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int j = blockIdx.x, kh = j / (HV / HK);
  const int r0 = blockIdx.y * ROWS + warp * RPW;  // the warp's first row
  float* rows = state + (size_t(j) * DV + r0) * DK;

  q35k::GdnKeyVec<DK> s[RPW];
  q35k::gdn_load_state<DK, RPW>(s, rows, lane);
  for (int t = 0; t < T; ++t) {
    const q35k::bf16* x = qkv + size_t(t) * C;
    q35k::GdnKeyVec<DK> q, k;
#pragma unroll
    for (int m = 0; m < q35k::GdnKeyVec<DK>::M; ++m) {
      const int i = kh * DK + q35k::GdnKeyVec<DK>::index(m, lane, 0);
      const uint2 qw = *reinterpret_cast<const uint2*>(x + i);
      const uint2 kw = *reinterpret_cast<const uint2*>(x + HK * DK + i);
      q.x[m][0] = q35k::bf16x2_lo(qw.x); q.x[m][1] = q35k::bf16x2_hi(qw.x);
      q.x[m][2] = q35k::bf16x2_lo(qw.y); q.x[m][3] = q35k::bf16x2_hi(qw.y);
      k.x[m][0] = q35k::bf16x2_lo(kw.x); k.x[m][1] = q35k::bf16x2_hi(kw.x);
      k.x[m][2] = q35k::bf16x2_lo(kw.y); k.x[m][3] = q35k::bf16x2_hi(kw.y);
    }
    float v[RPW], o[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) v[r] = q35k::bf16_to_f32(x[2 * HK * DK + j * DV + r0 + r]);
    q35k::gdn_step<DK, RPW>(s, q, k, v, g[size_t(t) * HV + j], beta[size_t(t) * HV + j], o);
#pragma unroll
    for (int r = 0; r < RPW; ++r)
      if (lane == r % 32) out[(size_t(t) * HV + j) * DV + r0 + r] = o[r];
  }
  q35k::gdn_store_state<DK, RPW>(s, rows, lane);
}

// One token with the prologue fused (see the top comment). proj [1, row_stride] bf16 laid out as in
// gdn_prologue.cuh (z at column C); conv_w [C, KC] bf16; A_log, dt_bias [HV] fp32; ring [KC, C] bf16
// in/out; pos0 [1] int32 (the token's position); state [HV, DV, DK] fp32 in/out; out [1, HV, DV] fp32
// the recurrence output. NORM (gdn_decode_norm, gdn_decode_batch): also y [1, HV*DV] bf16, the gated
// RMSNorm of out (gated_rmsnorm.cuh) with norm_w [DV] bf16, written by the last of a head's DV / ROWS
// blocks to finish (atomic ticket counters[j], int32 [HV], zero before the first launch and after
// every one). Without NORM (gdn_decode) the kernel ends with the state: the out_proj GEMV applies the
// norm to its input (gemv_w4a16_gated), so no block waits for the others.
//
// Everything no predecessor kernel writes is loaded before the PDL wait: the state rows, the conv
// ring (all KC slots of the block's channels: the position that picks KC - 1 of them is read after
// the wait), the conv weights, A_log, dt_bias, norm_w. Only this kernel writes the state and the ring,
// and the launch that wrote them last (the previous decode step) finished before the predecessor's
// wait returned. After the wait: the position and the projection row, loaded together.
namespace q35k {
// The body of gdn_decode for one token of one sequence (block (blockIdx.x, blockIdx.y) = value head
// j, rows y ROWS ..): proj its projection row, ring / state its conv ring and recurrent state, pos0
// its position, out / y / counters its rows. gdn_decode_batch runs it per sequence.
template <int HK, int HV, int DK, int DV, int KC, int ROWS, int WARPS, bool NORM>
__device__ __forceinline__ void gdn_decode_token(const bf16* __restrict__ proj, const bf16* __restrict__ conv_w,
                                                 const float* __restrict__ A_log, const float* __restrict__ dt_bias,
                                                 bf16* ring, const int* __restrict__ pos0_ptr,
                                                 float* __restrict__ state, float* out,
                                                 const bf16* __restrict__ norm_w, bf16* __restrict__ y,
                                                 int* counters, float eps) {
  constexpr int C = 2 * HK * DK + HV * DV, RPW = ROWS / WARPS, M = GdnKeyVec<DK>::M;
  // The key head's 2 DK q | k channels are convolved once per block, QKN adjacent ones per lane
  // (all q or all k), and shared through shared memory.
  constexpr int QKN = 2 * DK / (32 * WARPS);
  static_assert(ROWS % WARPS == 0 && DV % ROWS == 0 && HV % HK == 0 && RPW <= 32, "gdn_decode: bad tiling");
  static_assert(QKN >= 1 && QKN * 32 * WARPS == 2 * DK, "gdn_decode: WARPS must divide 2 DK / 32");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int j = blockIdx.x, kh = j / (HV / HK);
  const int r0 = blockIdx.y * ROWS + warp * RPW;
  float* rows = state + (size_t(j) * DV + r0) * DK;
  const int qk0 = threadIdx.x * QKN;                              // the lane's first q | k channel in the
  const int cqk = (qk0 < DK ? 0 : HK * DK - DK) + kh * DK + qk0;  // key head, and its channel in proj
  const int cv = 2 * HK * DK + j * DV + r0;  // channel of the warp's first v row
  const int cl = cv + min(lane, RPW - 1);    // the v channel this lane convolves (lanes >= RPW: a copy)

  // Before the wait.
  GdnKeyVec<DK> s[RPW];
  gdn_load_state<DK, RPW>(s, rows, lane);
  GdnConv<C, KC, QKN> qkc;
  GdnConv<C, KC, 1> vc;
  qkc.load_weights_ring(conv_w, ring, cqk);
  vc.load_weights_ring(conv_w, ring, cl);
  const float a_log = A_log[j], dtb = dt_bias[j];
  GatedRmsnormWeights<DV> nw;
  if constexpr (NORM) nw.load(norm_w);

  gdn_pdl_wait();
  gdn_pdl_launch_dependents();
  const int pos0 = *pos0_ptr;
  qkc.load_input(proj, cqk);
  vc.load_input(proj, cl);
  const bf16* gates = proj + C + HV * DV;  // b [HV] | a [HV]
  const bf16 gb = gates[j], ga = gates[HV + j];

  const int p = gdn_ring_slot<KC>(pos0);
  __shared__ __align__(16) float qk_s[2 * DK];  // q | k after the conv
#pragma unroll
  for (int e = 0; e < QKN; ++e) qk_s[qk0 + e] = qkc.silu(e, p);
  const float v_lane = vc.silu(0, p);
  float v[RPW], o[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) v[r] = __shfl_sync(0xffffffffu, v_lane, r);
  const float g = gdn_log_decay(bf16_to_f32(ga), a_log, dtb);
  const float beta = gdn_sigmoid(bf16_to_f32(gb));
  __syncthreads();
  GdnKeyVec<DK> q, k;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const int i = GdnKeyVec<DK>::index(m, lane, 0);
    const float4 qf = *reinterpret_cast<const float4*>(qk_s + i), kf = *reinterpret_cast<const float4*>(qk_s + DK + i);
    q.x[m][0] = qf.x; q.x[m][1] = qf.y; q.x[m][2] = qf.z; q.x[m][3] = qf.w;
    k.x[m][0] = kf.x; k.x[m][1] = kf.y; k.x[m][2] = kf.z; k.x[m][3] = kf.w;
  }
  gdn_l2norm<DK>(q, rsqrtf(float(DK)));
  gdn_l2norm<DK>(k, 1.f);

  // This token's inputs into its ring slot (the math above used the other KC-1 slots): the v rows by
  // their lanes, q and k by the first block of each key head.
  bf16* slot = ring + size_t(p) * C;
  if (lane < RPW) slot[cl] = bf16(vc.x[0]);
  if (j % (HV / HK) == 0 && blockIdx.y == 0) gdn_store_bf16s<QKN>(slot + cqk, qkc.x);

  gdn_step<DK, RPW>(s, q, k, v, g, beta, o);
#pragma unroll
  for (int r = 0; r < RPW; ++r)
    if (lane == r % 32) out[size_t(j) * DV + r0 + r] = o[r];
  gdn_store_state<DK, RPW>(s, rows, lane);

  if constexpr (NORM) {  // the head's last block to finish applies the gated RMSNorm over its DV outputs
    __shared__ int is_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(&counters[j], 1) == int(gridDim.y) - 1;
    __syncthreads();
    if (!is_last) return;
    if (threadIdx.x == 0) counters[j] = 0;
    __threadfence();
    if (warp == 0) {
      GatedRmsnormHead<DV> head;
      head.load(out + size_t(j) * DV, proj + C + size_t(j) * DV);
      head.store(nw, y + size_t(j) * DV, eps);
    }
  }
}
}  // namespace q35k

// gdn_decode: the recurrence output only (o -> out; gemv_w4a16_gated applies the gated RMSNorm).
template <int HK, int HV, int DK, int DV, int KC, int ROWS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
gdn_decode(const q35k::bf16* __restrict__ proj, const q35k::bf16* __restrict__ conv_w,
           const float* __restrict__ A_log, const float* __restrict__ dt_bias, q35k::bf16* ring,
           const int* __restrict__ pos0_ptr, float* __restrict__ state, float* out) {
  q35k::gdn_decode_token<HK, HV, DK, DV, KC, ROWS, WARPS, false>(proj, conv_w, A_log, dt_bias, ring, pos0_ptr, state,
                                                                 out, nullptr, nullptr, nullptr, 0.f);
}

// gdn_decode_norm: the same with the gated RMSNorm by each head's last block -> y (where the out_proj
// GEMV reads a bf16 input: bf16 weights, the residual-epilogue GEMV).
template <int HK, int HV, int DK, int DV, int KC, int ROWS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
gdn_decode_norm(const q35k::bf16* __restrict__ proj, const q35k::bf16* __restrict__ conv_w,
                const float* __restrict__ A_log, const float* __restrict__ dt_bias, q35k::bf16* ring,
                const int* __restrict__ pos0_ptr, float* __restrict__ state, float* out,
                const q35k::bf16* __restrict__ norm_w, q35k::bf16* __restrict__ y, int* counters, float eps) {
  q35k::gdn_decode_token<HK, HV, DK, DV, KC, ROWS, WARPS, true>(proj, conv_w, A_log, dt_bias, ring, pos0_ptr, state,
                                                                out, norm_w, y, counters, eps);
}

// gdn_decode_batch: one token of each of B sequences (a batched decode step), grid (HV, DV / ROWS,
// B), with the gated RMSNorm (as gdn_decode_norm). Sequence b (blockIdx.z) is slot slots[b]: projection
// row proj + b * row_stride, its conv ring ring + slot * KC*C, its state state + slot * HV*DV*DK, its
// position pos[slot]; out, y rows b and counters + b * HV (int32 [B, HV], zero between launches).
// Padding rows (slots[b] < 0) write zeros into their y rows and touch no state.
template <int HK, int HV, int DK, int DV, int KC, int ROWS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
gdn_decode_batch(const q35k::bf16* __restrict__ proj, int row_stride, const q35k::bf16* __restrict__ conv_w,
                 const float* __restrict__ A_log, const float* __restrict__ dt_bias, q35k::bf16* ring,
                 const int* __restrict__ slots, const int* __restrict__ pos, float* __restrict__ state, float* out,
                 const q35k::bf16* __restrict__ norm_w, q35k::bf16* __restrict__ y, int* counters, float eps) {
  constexpr int C = 2 * HK * DK + HV * DV;
  const int b = blockIdx.z, slot = slots[b];
  if (slot < 0) {  // after the wait: earlier kernels of the step may still read y
    q35k::gdn_pdl_wait();
    for (int i = threadIdx.x; i < ROWS; i += WARPS * 32)
      y[size_t(b) * HV * DV + size_t(blockIdx.x) * DV + blockIdx.y * ROWS + i] = q35k::f32_to_bf16(0.f);
    return;
  }
  q35k::gdn_decode_token<HK, HV, DK, DV, KC, ROWS, WARPS, true>(
      proj + size_t(b) * row_stride, conv_w, A_log, dt_bias, ring + size_t(slot) * KC * C, pos + slot,
      state + size_t(slot) * HV * DV * DK, out + size_t(b) * HV * DV, norm_w, y + size_t(b) * HV * DV,
      counters + size_t(b) * HV, eps);
}
