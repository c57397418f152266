// The fp32 CPU forward pass; see cpu_model.h. One layer reads top to bottom in forward();
// the mixers and the MoE block are below it, each a straight sequence of reference ops.
#include "models/qwen35/cpu_model.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "models/qwen35/reference_ops.h"
#include "runtime/core/error.h"

namespace q35::qwen35 {
namespace {

// A HostTensor must have exactly `shape` and matching data.
void expect_shape(const HostTensor& t, std::vector<int64_t> shape, const std::string& name) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  if (t.shape != shape || int64_t(t.data.size()) != numel)
    fail("CpuModel: weight {}: expected shape [{}], found [{}] with {} values", name,
         fmt::join(shape, ", "), fmt::join(t.shape, ", "), t.data.size());
}

}  // namespace

CpuModel::CpuModel(Config config, HostWeights weights)
    : config_(std::move(config)), weights_(std::move(weights)) {
  const Config& c = config_;
  const HostWeights& w = weights_;
  int64_t H = c.hidden_size;
  if (int64_t(c.layer_types.size()) != c.num_layers || int64_t(w.layers.size()) != c.num_layers)
    fail("CpuModel: expected {} layers, found {} layer types and {} weight layers", c.num_layers,
         c.layer_types.size(), w.layers.size());
  expect_shape(w.embed_tokens, {c.vocab_size, H}, "embed_tokens");
  expect_shape(w.final_norm, {H}, "norm");
  expect_shape(w.lm_head, {c.vocab_size, H}, "lm_head");
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const LayerWeights& l = w.layers[i];
    std::string p = fmt::format("layers.{}.", i);
    if (l.type != c.layer_types[i]) fail("CpuModel: layer {} weights are of the other mixer type than config.json says", i);
    expect_shape(l.input_layernorm, {H}, p + "input_layernorm");
    expect_shape(l.post_attention_layernorm, {H}, p + "post_attention_layernorm");
    if (l.type == LayerType::FullAttention) {
      expect_shape(l.attn.q_proj, {c.q_proj_rows(), H}, p + "self_attn.q_proj");
      expect_shape(l.attn.k_proj, {c.kv_dim(), H}, p + "self_attn.k_proj");
      expect_shape(l.attn.v_proj, {c.kv_dim(), H}, p + "self_attn.v_proj");
      expect_shape(l.attn.o_proj, {H, c.attn_out_dim()}, p + "self_attn.o_proj");
      expect_shape(l.attn.q_norm, {c.head_dim}, p + "self_attn.q_norm");
      expect_shape(l.attn.k_norm, {c.head_dim}, p + "self_attn.k_norm");
    } else {
      int64_t Hv = c.linear_num_value_heads;
      expect_shape(l.linear.in_proj_qkv, {c.linear_conv_dim(), H}, p + "linear_attn.in_proj_qkv");
      expect_shape(l.linear.in_proj_z, {c.linear_value_dim(), H}, p + "linear_attn.in_proj_z");
      expect_shape(l.linear.in_proj_b, {Hv, H}, p + "linear_attn.in_proj_b");
      expect_shape(l.linear.in_proj_a, {Hv, H}, p + "linear_attn.in_proj_a");
      expect_shape(l.linear.conv1d, {c.linear_conv_dim(), 1, c.linear_conv_kernel_dim}, p + "linear_attn.conv1d");
      expect_shape(l.linear.dt_bias, {Hv}, p + "linear_attn.dt_bias");
      expect_shape(l.linear.A_log, {Hv}, p + "linear_attn.A_log");
      expect_shape(l.linear.norm, {c.linear_value_head_dim}, p + "linear_attn.norm");
      expect_shape(l.linear.out_proj, {H, c.linear_value_dim()}, p + "linear_attn.out_proj");
    }
    int64_t E = c.num_experts, I = c.moe_intermediate_size, Is = c.shared_expert_intermediate_size;
    expect_shape(l.moe.router, {E, H}, p + "mlp.gate");
    expect_shape(l.moe.experts_gate_up, {E, 2 * I, H}, p + "mlp.experts.gate_up_proj");
    expect_shape(l.moe.experts_down, {E, H, I}, p + "mlp.experts.down_proj");
    expect_shape(l.moe.shared_gate, {Is, H}, p + "mlp.shared_expert.gate_proj");
    expect_shape(l.moe.shared_up, {Is, H}, p + "mlp.shared_expert.up_proj");
    expect_shape(l.moe.shared_down, {H, Is}, p + "mlp.shared_expert.down_proj");
    expect_shape(l.moe.shared_expert_gate, {1, H}, p + "mlp.shared_expert_gate");
  }
}

CpuState CpuModel::new_state(int64_t max_context) const {
  const Config& c = config_;
  if (max_context <= 0) fail("CpuModel: max_context must be positive, found {}", max_context);
  CpuState s;
  s.max_context = max_context;
  s.k_cache.resize(c.num_layers);
  s.v_cache.resize(c.num_layers);
  s.conv_state.resize(c.num_layers);
  s.gdn_state.resize(c.num_layers);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    if (c.layer_types[i] == LayerType::FullAttention) {
      s.k_cache[i].assign(max_context * c.kv_dim(), 0.0f);
      s.v_cache[i].assign(max_context * c.kv_dim(), 0.0f);
    } else {
      s.conv_state[i].assign(c.linear_conv_dim() * (c.linear_conv_kernel_dim - 1), 0.0f);
      s.gdn_state[i].assign(c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim, 0.0f);
    }
  }
  return s;
}

std::vector<float> CpuModel::forward(CpuState& state, std::span<const int32_t> tokens, bool all_logits,
                                     GdnMode gdn_mode) const {
  const Config& c = config_;
  int64_t T = int64_t(tokens.size()), H = c.hidden_size, V = c.vocab_size;
  if (T == 0) fail("CpuModel::forward: no tokens given");
  if (state.pos + T > state.max_context)
    fail("context overflow: {} tokens at position {} exceed max_context {}", T, state.pos, state.max_context);
  const Seq seq{&state, 0, T};
  std::vector<float> x = run_layers(std::span<const Seq>(&seq, 1), tokens, gdn_mode);  // [T, H]

  int64_t rows = all_logits ? T : 1;
  std::vector<float> logits(rows * V);  // [rows, V]
  ref::lm_head(std::span<const float>(x).subspan((T - rows) * H), weights_.final_norm.data,
               weights_.lm_head.data, logits, rows, H, V, float(c.rms_norm_eps));
  return logits;
}

std::vector<float> CpuModel::forward_batch(std::span<CpuState* const> states, std::span<const int32_t> tokens) const {
  const Config& c = config_;
  const int64_t B = int64_t(states.size()), H = c.hidden_size, V = c.vocab_size;
  if (B == 0) fail("CpuModel::forward_batch: no sequences given");
  if (int64_t(tokens.size()) != B)
    fail("CpuModel::forward_batch: {} tokens for {} sequences (one each)", tokens.size(), B);
  std::vector<Seq> seqs;
  for (int64_t b = 0; b < B; ++b) {
    CpuState* s = states[b];
    if (!s) fail("CpuModel::forward_batch: sequence {} has no state", b);
    for (int64_t a = 0; a < b; ++a)
      if (states[a] == s) fail("CpuModel::forward_batch: sequences {} and {} share one state", a, b);
    if (s->pos + 1 > s->max_context)
      fail("context overflow: sequence {} at position {} is full (max_context {})", b, s->pos, s->max_context);
    seqs.push_back({s, b, 1});
  }
  std::vector<float> x = run_layers(seqs, tokens, GdnMode::Recurrent);  // [B, H]
  std::vector<float> logits(B * V);                                      // [B, V]
  ref::lm_head(x, weights_.final_norm.data, weights_.lm_head.data, logits, B, H, V, float(c.rms_norm_eps));
  return logits;
}

std::vector<float> CpuModel::run_layers(std::span<const Seq> seqs, std::span<const int32_t> tokens,
                                        GdnMode gdn_mode) const {
  const Config& c = config_;
  const float eps = float(c.rms_norm_eps);
  int64_t T = int64_t(tokens.size()), H = c.hidden_size, V = c.vocab_size;
  for (const Seq& s : seqs)
    if (int64_t(s.state->k_cache.size()) != c.num_layers)
      fail("CpuModel::forward: state has {} layers, the model {}", s.state->k_cache.size(), c.num_layers);

  std::vector<float> x(T * H), h(T * H);  // [T, H] residual stream, normalised input
  ref::embedding(weights_.embed_tokens.data, V, H, tokens, x);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const LayerWeights& l = weights_.layers[i];
    ref::rmsnorm(x, l.input_layernorm.data, h, T, H, eps);
    std::vector<float> mixed = l.type == LayerType::FullAttention
        ? full_attention(l.attn, i, seqs, h, T)
        : linear_attention(l.linear, i, seqs, h, T, gdn_mode);
    ref::add_rmsnorm(x, mixed, l.post_attention_layernorm.data, h, T, H, eps);
    std::vector<float> ffn = moe(l.moe, h, T);
    for (int64_t j = 0; j < T * H; ++j) x[j] += ffn[j];
  }
  for (const Seq& s : seqs) s.state->pos += s.T;
  return x;
}

// Gated full attention (spec §2.3). h [T, H] -> [T, H]; each sequence attends to its own cache.
std::vector<float> CpuModel::full_attention(const FullAttentionWeights& w, int64_t layer, std::span<const Seq> seqs,
                                            std::span<const float> h, int64_t T) const {
  const Config& c = config_;
  int64_t H = c.hidden_size, Hq = c.num_heads, Hkv = c.num_kv_heads, D = c.head_dim;
  int64_t q_cols = c.q_proj_rows(), kv = c.kv_dim(), per_head = q_cols / Hq;
  std::vector<float> qg(T * q_cols);                           // [T, Hq, D | D gate]
  std::vector<float> q(T * Hq * D), gate;                      // [T, Hq, D], [T, Hq*D] or empty
  std::vector<float> k(T * kv), v(T * kv);                     // [T, Hkv, D]
  ref::matmul(h, w.q_proj.data, qg, T, q_cols, H);
  ref::matmul(h, w.k_proj.data, k, T, kv, H);
  ref::matmul(h, w.v_proj.data, v, T, kv, H);
  if (c.attn_output_gate) gate.resize(T * Hq * D);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t hd = 0; hd < Hq; ++hd) {
      const float* src = qg.data() + t * q_cols + hd * per_head;
      std::copy_n(src, D, q.data() + (t * Hq + hd) * D);
      if (c.attn_output_gate) std::copy_n(src + D, D, gate.data() + (t * Hq + hd) * D);
    }
  const float eps = float(c.rms_norm_eps), scale = 1.0f / std::sqrt(float(D));
  std::vector<float> o(T * Hq * D), out(T * H);  // [T, Hq*D], [T, H]
  for (const Seq& s : seqs) {
    const int64_t pos0 = s.state->pos, qd = Hq * D;
    std::vector<float>& k_cache = s.state->k_cache[layer];  // [max_context, Hkv, D]
    std::vector<float>& v_cache = s.state->v_cache[layer];  // [max_context, Hkv, D]
    std::span<float> q_s(q.data() + s.row0 * qd, s.T * qd);
    // The sequence's new k, v go into its cache rows pos0 .. pos0+T-1.
    std::span<float> k_new(k_cache.data() + pos0 * kv, s.T * kv), v_new(v_cache.data() + pos0 * kv, s.T * kv);
    std::copy_n(k.data() + s.row0 * kv, s.T * kv, k_new.data());
    std::copy_n(v.data() + s.row0 * kv, s.T * kv, v_new.data());
    ref::qk_norm_rope(q_s, w.q_norm.data, s.T, Hq, D, c.rotary_dim, c.rope_theta, pos0, eps);
    ref::qk_norm_rope(k_new, w.k_norm.data, s.T, Hkv, D, c.rotary_dim, c.rope_theta, pos0, eps);
    std::span<const float> gate_s = gate.empty() ? std::span<const float>() : std::span<const float>(gate).subspan(s.row0 * qd, s.T * qd);
    ref::attention(q_s, k_cache, v_cache, gate_s, std::span<float>(o).subspan(s.row0 * qd, s.T * qd), s.T, pos0,
                   Hq, Hkv, D, scale);
  }
  ref::matmul(o, w.o_proj.data, out, T, H, Hq * D);
  return out;
}

// Gated DeltaNet (spec §2.4). h [T, H] -> [T, H]; each sequence continues its own conv and
// recurrent state.
std::vector<float> CpuModel::linear_attention(const LinearAttentionWeights& w, int64_t layer,
                                              std::span<const Seq> seqs, std::span<const float> h, int64_t T,
                                              GdnMode gdn_mode) const {
  const Config& c = config_;
  int64_t H = c.hidden_size, Hk = c.linear_num_key_heads, Hv = c.linear_num_value_heads;
  int64_t dk = c.linear_key_head_dim, dv = c.linear_value_head_dim;
  int64_t kd = c.linear_key_dim(), vd = c.linear_value_dim(), C = c.linear_conv_dim();
  std::vector<float> mixed(T * C), conv(T * C);   // [T, q | k | v] before / after conv
  std::vector<float> z(T * vd), a(T * Hv), b(T * Hv);  // [T, Hv, dv], [T, Hv], [T, Hv]
  ref::matmul(h, w.in_proj_qkv.data, mixed, T, C, H);
  ref::matmul(h, w.in_proj_z.data, z, T, vd, H);
  ref::matmul(h, w.in_proj_b.data, b, T, Hv, H);
  ref::matmul(h, w.in_proj_a.data, a, T, Hv, H);
  for (const Seq& s : seqs)
    ref::conv1d_causal(std::span<const float>(mixed).subspan(s.row0 * C, s.T * C), s.state->conv_state[layer],
                       w.conv1d.data, std::span<float>(conv).subspan(s.row0 * C, s.T * C), s.T, C,
                       c.linear_conv_kernel_dim);

  std::vector<float> q(T * kd), k(T * kd), v(T * vd);  // [T, Hk, dk], [T, Hk, dk], [T, Hv, dv]
  for (int64_t t = 0; t < T; ++t) {
    const float* row = conv.data() + t * C;
    std::copy_n(row, kd, q.data() + t * kd);
    std::copy_n(row + kd, kd, k.data() + t * kd);
    std::copy_n(row + 2 * kd, vd, v.data() + t * vd);
  }
  ref::l2norm(q, T * Hk, dk, 1e-6f, 1.0f / std::sqrt(float(dk)));
  ref::l2norm(k, T * Hk, dk, 1e-6f, 1.0f);
  std::vector<float> g(T * Hv), beta(T * Hv);  // [T, Hv]
  ref::gdn_gates(a, b, w.A_log.data, w.dt_bias.data, g, beta, T, Hv);

  std::vector<float> o(T * vd), out(T * H);  // [T, Hv, dv], [T, H]
  for (const Seq& s : seqs) {
    auto rows = [&](std::vector<float>& x, int64_t n) { return std::span<float>(x).subspan(s.row0 * n, s.T * n); };
    auto gdn = gdn_mode == GdnMode::Chunked && s.T > 1 ? ref::gdn_chunked : ref::gdn_recurrent;
    gdn(rows(q, kd), rows(k, kd), rows(v, vd), rows(g, Hv), rows(beta, Hv), s.state->gdn_state[layer], rows(o, vd),
        s.T, Hk, Hv, dk, dv);
  }
  ref::gated_rmsnorm(o, z, w.norm.data, o, T * Hv, dv, float(c.rms_norm_eps));
  ref::matmul(o, w.out_proj.data, out, T, H, vd);
  return out;
}

// Sparse MoE + gated shared expert (spec §2.6). h [T, H] -> [T, H].
std::vector<float> CpuModel::moe(const MoeWeights& w, std::span<const float> h, int64_t T) const {
  const Config& c = config_;
  int64_t H = c.hidden_size, E = c.num_experts, K = c.num_experts_per_tok;
  std::vector<float> router_logits(T * E), weights(T * K);  // [T, E], [T, K]
  std::vector<int32_t> ids(T * K);                          // [T, K]
  ref::matmul(h, w.router.data, router_logits, T, E, H);
  ref::moe_router(router_logits, weights, ids, T, E, K);
  std::vector<float> routed(T * H), shared(T * H);  // [T, H]
  ref::moe_experts(h, ids, weights, w.experts_gate_up.data, w.experts_down.data, routed, T, H, E,
                   c.moe_intermediate_size, K);
  ref::shared_expert(h, w.shared_gate.data, w.shared_up.data, w.shared_down.data,
                     w.shared_expert_gate.data, shared, T, H, c.shared_expert_intermediate_size);
  for (int64_t j = 0; j < T * H; ++j) routed[j] += shared[j];
  return routed;
}

}  // namespace q35::qwen35
