#pragma once
// Plain fp32 CPU reference of every op of the Qwen3.5-MoE forward pass (shared/spec §2).
//
// This is the oracle the GPU kernels are tested against, so each function is one kernel family,
// named alike (`moe_experts` here is `moe_experts` in kernel_templates/), takes plain spans and
// sizes (never the model), and follows the order of operations of Hugging Face's
// modeling_qwen3_5_moe.py run in fp32. Every buffer is row-major fp32; shapes are in the comments.
// Sizes are checked: a span shorter than its shape implies is an Error naming the op and argument.
//
// Threading: matmul splits its output columns over std::thread when the work is large enough to
// pay for the threads; everything else is single-threaded.
#include <cstdint>
#include <span>
#include <vector>

namespace q35::qwen35::ref {

// out[T, H] = table[tokens[t], :]. A token outside [0, vocab) is an Error naming it.
// table [vocab, H]
void embedding(std::span<const float> table, int64_t vocab, int64_t H,
               std::span<const int32_t> tokens, std::span<float> out);

// Zero-centred RMSNorm (Qwen3_5MoeRMSNorm): y = x * rsqrt(mean(x^2) + eps) * (1 + w).
// x, y [rows, n] (may alias); w [n] holds the stored offsets (initialised to 0).
void rmsnorm(std::span<const float> x, std::span<const float> w, std::span<float> y, int64_t rows,
             int64_t n, float eps);

// The decoder's fused residual form: residual += delta, then y = rmsnorm(residual).
// residual, delta, y [rows, n]; w [n] zero-centred offsets.
void add_rmsnorm(std::span<float> residual, std::span<const float> delta, std::span<const float> w,
                 std::span<float> y, int64_t rows, int64_t n, float eps);

// GDN output norm (Qwen3_5MoeRMSNormGated, norm before gate, plain weight):
// y = w * (x * rsqrt(mean(x^2) + eps)) * silu(z).
// x, z, y [rows, n] (y may alias x); w [n] shared by every row (head).
void gated_rmsnorm(std::span<const float> x, std::span<const float> z, std::span<const float> w,
                   std::span<float> y, int64_t rows, int64_t n, float eps);

// y[M, N] = x[M, K] . W[N, K]^T (nn.Linear without bias), fp32 accumulation.
void matmul(std::span<const float> x, std::span<const float> W, std::span<float> y, int64_t M,
            int64_t N, int64_t K);

// QK-norm + partial NeoX RoPE, in place, for tokens at positions pos0 .. pos0+T-1.
// x [T, heads, head_dim]; w [head_dim] zero-centred offsets.
// Per head: zero-centred RMSNorm over head_dim, then for j < rotary_dim/2 with
// inv_freq_j = theta^(-2j/rotary_dim) and a = p * inv_freq_j:
//   y_j = x_j cos a - x_{j+r/2} sin a,   y_{j+r/2} = x_{j+r/2} cos a + x_j sin a;
// dims rotary_dim .. head_dim-1 pass through.
void qk_norm_rope(std::span<float> x, std::span<const float> w, int64_t T, int64_t heads,
                  int64_t head_dim, int64_t rotary_dim, double theta, int64_t pos0, float eps);

// Causal GQA attention over a KV cache, fp32 softmax, then the sigmoid output gate.
// q [T, Hq, D] (after norm + RoPE) for positions pos0 .. pos0+T-1;
// k_cache, v_cache [>= pos0+T, Hkv, D] (rows 0 .. pos0+T-1 filled; k after norm + RoPE);
// gate [T, Hq*D] or empty (no output gate); out [T, Hq*D] head-major.
// Query head h reads kv head h / (Hq/Hkv). out = softmax(q k^T * scale) v * sigmoid(gate).
void attention(std::span<const float> q, std::span<const float> k_cache,
               std::span<const float> v_cache, std::span<const float> gate, std::span<float> out,
               int64_t T, int64_t pos0, int64_t Hq, int64_t Hkv, int64_t D, float scale);

// Causal depthwise conv1d with SiLU after, continuing from a state.
// x [T, C] pre-conv inputs; w [C, K] (w[c, K-1] multiplies the current token);
// state [C, K-1]: the K-1 pre-conv inputs before x, oldest first (zeros at sequence start),
// replaced on return by the last K-1 inputs of (state ++ x); y [T, C].
// y[t, c] = silu(sum_k w[c, k] * xx[t + k, c]) where xx = (state ++ x) along time.
void conv1d_causal(std::span<const float> x, std::span<float> state, std::span<const float> w,
                   std::span<float> y, int64_t T, int64_t C, int64_t K);

// In place: x = x * rsqrt(sum(x^2) + eps) * scale per row. x [rows, n].
// (HF l2norm with eps 1e-6; the GDN query then gets scale = dk^-0.5, the key scale = 1.)
void l2norm(std::span<float> x, int64_t rows, int64_t n, float eps, float scale);

// GDN gates: beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias) (log decay, <= 0).
// a, b, g, beta [T, Hv]; A_log, dt_bias [Hv]. softplus(x) = x for x > 20 (torch's threshold).
void gdn_gates(std::span<const float> a, std::span<const float> b, std::span<const float> A_log,
               std::span<const float> dt_bias, std::span<float> g, std::span<float> beta, int64_t T,
               int64_t Hv);

// Gated delta rule, token by token (HF torch_recurrent_gated_delta_rule).
// q, k [T, Hk, dk] (L2-normalised; q also scaled by dk^-0.5); v [T, Hv, dv]; g, beta [T, Hv];
// state [Hv, dk, dv] fp32, updated in place; out [T, Hv, dv]. Value head j uses key head
// j / (Hv/Hk). Per token: S *= exp(g); S += k (beta (v - S^T k))^T; o = S^T q (updated S).
void gdn_recurrent(std::span<const float> q, std::span<const float> k, std::span<const float> v,
                   std::span<const float> g, std::span<const float> beta, std::span<float> state,
                   std::span<float> out, int64_t T, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv);

// The same recurrence computed in chunks of 64 (HF torch_chunk_gated_delta_rule, spec §2.5).
// Same arguments and result as gdn_recurrent (up to rounding).
void gdn_chunked(std::span<const float> q, std::span<const float> k, std::span<const float> v,
                 std::span<const float> g, std::span<const float> beta, std::span<float> state,
                 std::span<float> out, int64_t T, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv);
constexpr int64_t kGdnChunk = 64;

// The chunked delta rule as the GPU kernels split it (kernel_templates/gdn_chunked.cuh), one
// function per kernel, with the GPU's intermediate layouts (chunks = ceil(T / 64), rows of a last
// partial chunk padded with zeros; "2" = the hi and lo planes of a split value):
//   gam [chunks, Hv, 64]   inclusive cumsum of g within the chunk (padded rows repeat the last)
//   U   [chunks, Hv, 64, dv], W [chunks, Hv, 2, 64, dk]
//   h   [chunks, Hv, 2, dk, dv]  the state entering each chunk; Vn [chunks, Hv, 2, 64, dv]
// With split_bf16 every operand the kernels feed to the tensor cores is rounded as they round it:
// x = hi + lo (hi = bf16(x), lo = bf16(x - hi)), products of two split operands as hi hi + hi lo +
// lo hi, of a split and an exact bf16 operand (q, k, v, which must then be bf16 values) as hi x +
// lo x, fp32 sums. Without it the lo planes are zero and the hi planes exact fp32 (the algorithm in
// fp32). q, k, v, g, beta, state and out as for gdn_recurrent.
// gdn_chunk_prepare: A = beta_i k_i.k_m exp(gam_i - gam_m) (m < i), Tm = (I + A)^-1 by the blocked
// solve (16 x 16 diagonal blocks by substitution, off-diagonal blocks by distance),
// U = Tm diag(beta) v, W = Tm diag(beta exp(gam)) k.
void gdn_chunk_prepare(std::span<const float> k, std::span<const float> v, std::span<const float> g,
                       std::span<const float> beta, std::span<float> gam, std::span<float> U, std::span<float> W,
                       int64_t T, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv, bool split_bf16);
// gdn_chunk_state: per chunk h = S, Vn = U - W S, S = exp(gam_last) S + k^T (exp(gam_last - gam) Vn).
void gdn_chunk_state(std::span<const float> k, std::span<const float> gam, std::span<const float> U,
                     std::span<const float> W, std::span<float> state, std::span<float> h, std::span<float> Vn,
                     int64_t T, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv, bool split_bf16);
// gdn_chunk_output: out = exp(gam) (q h) + [(q_i . k_m) exp(gam_i - gam_m)]_{m <= i} Vn, [T, Hv, dv]
// (before the gated RMSNorm the kernel fuses: apply gated_rmsnorm to it).
void gdn_chunk_output(std::span<const float> q, std::span<const float> k, std::span<const float> gam,
                      std::span<const float> h, std::span<const float> Vn, std::span<float> out, int64_t T,
                      int64_t Hk, int64_t Hv, int64_t dk, int64_t dv, bool split_bf16);
// The three above in sequence (same arguments and result as gdn_recurrent, up to rounding).
void gdn_chunked_staged(std::span<const float> q, std::span<const float> k, std::span<const float> v,
                        std::span<const float> g, std::span<const float> beta, std::span<float> state,
                        std::span<float> out, int64_t T, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv,
                        bool split_bf16);
// (I + A)^-1 of a strictly lower triangular n x n A (n a multiple of 16), row-major, by the blocked
// solve of gdn_chunk_prepare.
std::vector<float> unit_lower_inverse_blocked(std::span<const float> A, int64_t n);

// Router: p = softmax(logits) in fp32, the top_k largest p (descending; equal values by lower
// expert index), renormalised to sum 1.
// logits [T, E]; weights [T, top_k]; ids [T, top_k].
void moe_router(std::span<const float> logits, std::span<float> weights, std::span<int32_t> ids,
                int64_t T, int64_t E, int64_t top_k);

// Routed experts: out[t] = sum_i weights[t,i] * down[e] . (silu(g) * u), (g | u) = gate_up[e] . x[t],
// e = ids[t,i]; experts are summed in increasing expert index, as HF does.
// x [T, H]; ids, weights [T, top_k]; gate_up [E, 2I, H] rows [gate (I) | up (I)];
// down [E, H, I]; out [T, H] (overwritten).
void moe_experts(std::span<const float> x, std::span<const int32_t> ids,
                 std::span<const float> weights, std::span<const float> gate_up,
                 std::span<const float> down, std::span<float> out, int64_t T, int64_t H, int64_t E,
                 int64_t I, int64_t top_k);

// Shared expert with its scalar sigmoid gate:
// out[t] = sigmoid(x[t] . gate_w) * down . (silu(gate . x[t]) * (up . x[t])).
// x [T, H]; gate, up [Is, H]; down [H, Is]; gate_w [1, H]; out [T, H] (overwritten).
void shared_expert(std::span<const float> x, std::span<const float> gate, std::span<const float> up,
                   std::span<const float> down, std::span<const float> gate_w, std::span<float> out,
                   int64_t T, int64_t H, int64_t Is);

// Final zero-centred norm then the untied LM head: logits[T, V] = rmsnorm(x, norm_w) . W^T.
// x [T, H]; norm_w [H]; W [V, H].
void lm_head(std::span<const float> x, std::span<const float> norm_w, std::span<const float> W,
             std::span<float> logits, int64_t T, int64_t H, int64_t V, float eps);

}  // namespace q35::qwen35::ref
