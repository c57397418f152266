#include "models/qwen35/kernels.h"

#include <algorithm>

#include "autotune/tile_config.h"

namespace q35::qwen35 {

std::vector<q35::KernelSpec> required_kernels(const Config& cfg, int tokens_per_call) {
  std::vector<q35::KernelSpec> specs;
  auto add = [&](q35::KernelSpec s) {
    if (std::find(specs.begin(), specs.end(), s) == specs.end()) specs.push_back(std::move(s));
  };
  // y [T, n] = x [T, k] . W[n, k]^T
  auto gemv = [&](int64_t n, int64_t k) {
    add(gemv_bf16_spec(n, k, default_gemv_tile(n, k, tokens_per_call)));
  };
  const int64_t H = cfg.hidden_size;
  const bool has_full = std::count(cfg.layer_types.begin(), cfg.layer_types.end(), LayerType::FullAttention) > 0;
  const bool has_linear =
      std::count(cfg.layer_types.begin(), cfg.layer_types.end(), LayerType::LinearAttention) > 0;

  add(embedding_spec(H, default_embedding_tile(H)));
  // Layer 0's input norm has no residual to add; every later norm (and the final norm) adds the
  // previous sub-layer's output into the residual stream first.
  add(rmsnorm_spec(H, false, default_rmsnorm_tile(H)));
  add(rmsnorm_spec(H, true, default_rmsnorm_tile(H)));

  if (has_full) {
    gemv(cfg.q_proj_rows(), H);                                               // q_proj  [heads*hd*2, H]
    gemv(cfg.kv_dim(), H);                                                    // k_proj, v_proj
    add(rmsnorm_spec(cfg.head_dim, false, default_rmsnorm_tile(cfg.head_dim)));  // q_norm, k_norm per head
    gemv(H, cfg.attn_out_dim());                                              // o_proj  [H, heads*hd]
  }
  if (has_linear) {
    gemv(cfg.linear_conv_dim(), H);                 // in_proj_qkv  [2*Hk*dk + Hv*dv, H]
    gemv(cfg.linear_value_dim(), H);                // in_proj_z    [Hv*dv, H]
    gemv(cfg.linear_num_value_heads, H);            // in_proj_b, in_proj_a  [Hv, H]
    gemv(H, cfg.linear_value_dim());                // out_proj     [H, Hv*dv]
  }
  gemv(cfg.num_experts, H);                          // router       [E, H]
  gemv(2 * cfg.moe_intermediate_size, H);            // experts gate_up, per expert  [2I, H]
  gemv(H, cfg.moe_intermediate_size);                // experts down, per expert     [H, I]
  if (cfg.shared_expert_intermediate_size > 0) {
    gemv(cfg.shared_expert_intermediate_size, H);    // shared gate_proj, up_proj  [Is, H]
    gemv(H, cfg.shared_expert_intermediate_size);    // shared down_proj           [H, Is]
    gemv(1, H);                                      // shared_expert_gate         [1, H]
  }
  gemv(cfg.vocab_size, H);                           // lm_head      [vocab, H]
  return specs;
}

}  // namespace q35::qwen35
