#include "models/qwen35/config.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <string_view>

#include <nlohmann/json.hpp>

#include "runtime/core/error.h"
#include "runtime/io/json_file.h"

namespace q35::qwen35 {

namespace {

using nlohmann::json;

// Typed access to one JSON object of a config file; every error names the file, the key and the
// object it was looked up in. A key whose value is null counts as absent (HF writes nulls).
struct Keys {
  const json& obj;
  std::string file;
  std::string where;  // "text_config", "the top level", "rope_parameters", ...

  const json* find(const std::string& key) const {
    auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  [[noreturn]] void wrong(const std::string& key, const char* expected, const json& v) const {
    fail("{}: key \"{}\" in {}: expected {}, found {} {}", file, key, where, expected, v.type_name(),
         v.dump());
  }
  const json& require(const std::string& key) const {
    const json* v = find(key);
    if (!v) fail("{}: missing key \"{}\" in {}", file, key, where);
    return *v;
  }
  std::optional<int64_t> integer_opt(const std::string& key) const {
    const json* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_number_integer()) wrong(key, "an integer", *v);
    return v->get<int64_t>();
  }
  std::optional<double> number_opt(const std::string& key) const {
    const json* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_number()) wrong(key, "a number", *v);
    return v->get<double>();
  }
  std::optional<bool> boolean_opt(const std::string& key) const {
    const json* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) wrong(key, "true or false", *v);
    return v->get<bool>();
  }
  std::optional<std::string> string_opt(const std::string& key) const {
    const json* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_string()) wrong(key, "a string", *v);
    return v->get<std::string>();
  }
  int64_t positive(const std::string& key) const {
    require(key);
    int64_t v = *integer_opt(key);
    if (v <= 0) fail("{}: key \"{}\" in {}: expected a positive integer, found {}", file, key, where, v);
    return v;
  }
};

// A rope key may sit flat in the LM config or nested in rope_parameters; both present must agree.
std::optional<double> rope_key(const Keys& lm, const std::optional<Keys>& rope, const std::string& key) {
  std::optional<double> flat = lm.number_opt(key);
  std::optional<double> nested = rope ? rope->number_opt(key) : std::nullopt;
  if (flat && nested && *flat != *nested)
    fail("{}: \"{}\" is {} in {} but {} in rope_parameters", lm.file, key, *flat, lm.where, *nested);
  return nested ? nested : flat;
}

// Keys of the LM config that change nothing this runtime computes: bookkeeping, training-only
// settings, token ids (generation_config.json decides stopping), the MTP draft head (not used) and
// generation defaults that old transformers versions wrote into config.json.
constexpr std::string_view kInertKeys[] = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "use_bfloat16", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "use_cache", "output_router_logits", "router_aux_loss_coef", "attention_dropout",
    "chunk_size_feed_forward", "id2label", "label2id", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "output_attentions", "output_hidden_states", "return_dict", "problem_type",
    "tokenizer_class", "torchscript", "pruned_heads", "tf_legacy_loss", "finetuning_task", "prefix",
    "task_specific_params", "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings", "quantization_config",
    "q35jit_quantization",
    "text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
    "vision_end_token_id", "base_config_key", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "auto_map",
    // M-RoPE sections: with text-only positions every stream is the same, plain 1-D RoPE (spec §2.3).
    "mrope_section", "mrope_interleaved",
};
// Keys this runtime reads (Config::from_file).
constexpr std::string_view kReadKeys[] = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "attn_output_gate", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
    "linear_value_head_dim", "linear_conv_kernel_dim", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "rope_parameters", "rope_theta", "partial_rotary_factor", "layer_types",
    "full_attention_interval",
};

// Every other key may change the math: the ones whose meaning is known must hold the value this
// runtime implements, and an unknown one is an error rather than silently ignored.
void check_keys(const Keys& lm) {
  const std::string& file = lm.file;
  auto require_value = [&](const std::string& key, const json& accepted, const std::string& meaning) {
    const json* v = lm.find(key);
    if (!v) return;
    for (const json& a : accepted)
      if (*v == a) return;
    fail("{}: key \"{}\" in {}: {} is not implemented (supported: {}; {})", file, key, lm.where, v->dump(),
         accepted.dump(), meaning);
  };
  require_value("attention_bias", json::array({false}), "the attention projections have no biases");
  require_value("hidden_act", json::array({"silu"}), "experts and shared expert use SiLU-gated MLPs");
  require_value("mlp_only_layers", json::array({json::array()}), "every layer is MoE");
  // Qwen3.5 / 3.6 configs write "swish" for the DeltaNet output gate, norm(o) * silu(z) (the
  // attention output gate is sigmoid in transformers whatever this says).
  require_value("output_gate_type", json::array({"swish", "silu"}),
                "the DeltaNet output gate is silu(z) and the attention output gate sigmoid");
  require_value("mamba_ssm_dtype", json::array({"float32"}), "the DeltaNet recurrent state is kept in fp32");
  require_value("norm_topk_prob", json::array({true}), "the top-k routing weights are renormalised");
  require_value("decoder_sparse_step", json::array({1}), "every layer is MoE");
  require_value("use_sliding_window", json::array({false}), "attention is over the whole context");
  // Legacy rope_scaling: only the unscaled kinds (text positions make mrope plain 1-D RoPE).
  if (const json* rs = lm.find("rope_scaling")) {
    const json type = rs->is_object() ? rs->value("rope_type", rs->value("type", json("default"))) : json();
    if (type != "default" && type != "mrope")
      fail("{}: key \"rope_scaling\" in {}: {} is not implemented (supported: rope_type \"default\" or \"mrope\"; "
           "RoPE is unscaled)",
           file, lm.where, rs->dump());
  }
  for (const auto& [key, value] : lm.obj.items()) {
    if (value.is_null()) continue;
    auto is = [&](std::string_view k) { return k == key; };
    if (std::any_of(std::begin(kInertKeys), std::end(kInertKeys), is) ||
        std::any_of(std::begin(kReadKeys), std::end(kReadKeys), is))
      continue;
    static constexpr std::string_view kChecked[] = {"attention_bias",  "hidden_act",        "mlp_only_layers",
                                                    "output_gate_type", "mamba_ssm_dtype",   "norm_topk_prob",
                                                    "decoder_sparse_step", "use_sliding_window", "rope_scaling",
                                                    "sliding_window",  "max_window_layers"};
    if (std::any_of(std::begin(kChecked), std::end(kChecked), is)) continue;
    fail("{}: key \"{}\" in {} (= {}) is unknown to q35jit: it may change the model's math, so it is refused rather "
         "than ignored",
         file, key, lm.where, value.dump().substr(0, 80));
  }
}

}  // namespace

int Config::num_layers_of(LayerType t) const {
  return int(std::count(layer_types.begin(), layer_types.end(), t));
}

Config Config::from_file(const std::filesystem::path& path) {
  const std::string file = path.string();
  const json root = read_json_file(path);
  if (!root.is_object()) fail("{}: expected a JSON object, found {}", file, root.type_name());
  const Keys top{root, file, "the top level"};
  const json* text = top.find("text_config");
  if (text && !text->is_object()) top.wrong("text_config", "an object", *text);
  const Keys lm{text ? *text : root, file, text ? "text_config" : "the top level"};

  Config c;
  c.vocab_size = lm.positive("vocab_size");
  c.hidden_size = lm.positive("hidden_size");
  c.num_layers = lm.positive("num_hidden_layers");
  c.num_heads = lm.positive("num_attention_heads");
  c.num_kv_heads = lm.positive("num_key_value_heads");
  c.head_dim = lm.positive("head_dim");
  c.attn_output_gate = lm.boolean_opt("attn_output_gate").value_or(true);
  c.linear_num_key_heads = lm.positive("linear_num_key_heads");
  c.linear_num_value_heads = lm.positive("linear_num_value_heads");
  c.linear_key_head_dim = lm.positive("linear_key_head_dim");
  c.linear_value_head_dim = lm.positive("linear_value_head_dim");
  c.linear_conv_kernel_dim = lm.positive("linear_conv_kernel_dim");
  c.num_experts = lm.positive("num_experts");
  c.num_experts_per_tok = lm.positive("num_experts_per_tok");
  c.moe_intermediate_size = lm.positive("moe_intermediate_size");
  c.shared_expert_intermediate_size = lm.positive("shared_expert_intermediate_size");
  c.rms_norm_eps = lm.number_opt("rms_norm_eps").value_or(1e-6);
  c.max_position_embeddings = lm.integer_opt("max_position_embeddings").value_or(32768);
  // The outer (multimodal) model decides tying, as in transformers; a text-only config has one level.
  c.tie_word_embeddings =
      top.boolean_opt("tie_word_embeddings").value_or(lm.boolean_opt("tie_word_embeddings").value_or(false));

  // RoPE: flat keys or rope_parameters {rope_type, rope_theta, partial_rotary_factor, mrope_*}.
  std::optional<Keys> rope;
  if (const json* rp = lm.find("rope_parameters")) {
    if (!rp->is_object()) lm.wrong("rope_parameters", "an object", *rp);
    rope.emplace(Keys{*rp, file, "rope_parameters"});
    // mrope with equal text positions is plain 1-D rope; scaled variants (yarn, linear) are not.
    std::string type = rope->string_opt("rope_type").value_or("default");
    if (type != "default" && type != "mrope")
      fail("{}: key \"rope_type\" in rope_parameters: expected \"default\" or \"mrope\", found \"{}\"", file,
           type);
  }
  std::optional<double> theta = rope_key(lm, rope, "rope_theta");
  if (!theta) fail("{}: missing key \"rope_theta\" in {} (flat or in rope_parameters)", file, lm.where);
  if (*theta <= 0) fail("{}: rope_theta must be positive, found {}", file, *theta);
  c.rope_theta = *theta;
  const double partial = rope_key(lm, rope, "partial_rotary_factor").value_or(0.25);  // HF default
  const double rotary = double(c.head_dim) * partial;
  if (partial <= 0 || partial > 1 || rotary != std::floor(rotary) || int64_t(rotary) % 2 != 0)
    fail("{}: head_dim {} * partial_rotary_factor {} = {}: expected an even whole number of rotary dims",
         file, c.head_dim, partial, rotary);
  c.rotary_dim = int64_t(rotary);

  // Layer types: an explicit list, else every interval-th layer is full attention.
  if (const json* lt = lm.find("layer_types")) {
    if (!lt->is_array()) lm.wrong("layer_types", "a list of strings", *lt);
    if (int64_t(lt->size()) != c.num_layers)
      fail("{}: layer_types has {} entries, expected num_hidden_layers = {}", file, lt->size(), c.num_layers);
    for (size_t i = 0; i < lt->size(); ++i) {
      const json& v = (*lt)[i];
      if (v == "linear_attention") c.layer_types.push_back(LayerType::LinearAttention);
      else if (v == "full_attention") c.layer_types.push_back(LayerType::FullAttention);
      else
        fail("{}: layer_types[{}]: expected \"linear_attention\" or \"full_attention\", found {}", file, i,
             v.dump());
    }
  } else if (lm.find("full_attention_interval")) {
    const int64_t interval = lm.positive("full_attention_interval");
    for (int64_t i = 0; i < c.num_layers; ++i)
      c.layer_types.push_back((i + 1) % interval == 0 ? LayerType::FullAttention : LayerType::LinearAttention);
  } else {
    fail("{}: missing key \"layer_types\" (or \"full_attention_interval\") in {}", file, lm.where);
  }

  check_keys(lm);

  if (c.num_heads % c.num_kv_heads != 0)
    fail("{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", file, c.num_heads,
         c.num_kv_heads);
  if (c.linear_num_value_heads % c.linear_num_key_heads != 0)
    fail("{}: linear_num_value_heads {} is not a multiple of linear_num_key_heads {}", file,
         c.linear_num_value_heads, c.linear_num_key_heads);
  if (c.num_experts_per_tok > c.num_experts)
    fail("{}: num_experts_per_tok {} exceeds num_experts {}", file, c.num_experts_per_tok, c.num_experts);
  if (c.rms_norm_eps <= 0) fail("{}: rms_norm_eps must be positive, found {}", file, c.rms_norm_eps);
  if (c.max_position_embeddings <= 0)
    fail("{}: max_position_embeddings must be positive, found {}", file, c.max_position_embeddings);
  return c;
}

GenerationConfig GenerationConfig::from_file(const std::filesystem::path& path) {
  GenerationConfig g;
  if (!std::filesystem::exists(path)) return g;
  const std::string file = path.string();
  const json root = read_json_file(path);
  if (!root.is_object()) fail("{}: expected a JSON object, found {}", file, root.type_name());
  const Keys k{root, file, "the top level"};

  auto token_id = [&](const std::string& key, const json& v) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX)
      k.wrong(key, "a non-negative token id", v);
    return int32_t(v.get<int64_t>());
  };
  if (const json* eos = k.find("eos_token_id")) {
    if (eos->is_array())
      for (const json& v : *eos) g.eos_token_ids.push_back(token_id("eos_token_id", v));
    else
      g.eos_token_ids.push_back(token_id("eos_token_id", *eos));
  }
  if (const json* v = k.find("bos_token_id")) g.bos_token_id = token_id("bos_token_id", *v);
  if (const json* v = k.find("pad_token_id")) g.pad_token_id = token_id("pad_token_id", *v);
  g.do_sample = k.boolean_opt("do_sample").value_or(g.do_sample);
  g.temperature = float(k.number_opt("temperature").value_or(g.temperature));
  g.top_k = int(k.integer_opt("top_k").value_or(g.top_k));
  g.top_p = float(k.number_opt("top_p").value_or(g.top_p));
  if (g.temperature < 0) fail("{}: temperature must be >= 0, found {}", file, g.temperature);
  if (g.top_k < 0) fail("{}: top_k must be >= 0, found {}", file, g.top_k);
  if (!(g.top_p > 0 && g.top_p <= 1)) fail("{}: top_p must be in (0, 1], found {}", file, g.top_p);
  return g;
}

Config Config::preset(const std::string& name) {
  // shared/spec §1 and the public config.json copies of Qwen3.5-{35B-A3B, 122B-A10B, 397B-A17B}.
  struct Shape {
    const char* name;
    int64_t hidden, layers, heads, value_heads, experts, top_k, expert_size;
  };
  static constexpr Shape kShapes[] = {
      {"35b-a3b", 2048, 40, 16, 32, 256, 8, 512},
      {"122b-a10b", 3072, 48, 32, 64, 256, 8, 1024},
      {"397b-a17b", 4096, 60, 32, 64, 512, 10, 1024},
  };
  const Shape* s = nullptr;
  for (const Shape& k : kShapes)
    if (name == k.name) s = &k;
  if (!s) fail("unknown synthetic model '{}': known: 35b-a3b, 122b-a10b, 397b-a17b", name);
  Config c;
  c.vocab_size = 248320;
  c.hidden_size = s->hidden;
  c.num_layers = s->layers;
  for (int64_t i = 0; i < s->layers; ++i)
    c.layer_types.push_back((i + 1) % 4 == 0 ? LayerType::FullAttention : LayerType::LinearAttention);
  c.num_heads = s->heads;
  c.num_kv_heads = 2;
  c.head_dim = 256;
  c.rotary_dim = 64;
  c.rope_theta = 1e7;
  c.attn_output_gate = true;
  c.linear_num_key_heads = 16;
  c.linear_num_value_heads = s->value_heads;
  c.linear_key_head_dim = 128;
  c.linear_value_head_dim = 128;
  c.linear_conv_kernel_dim = 4;
  c.num_experts = s->experts;
  c.num_experts_per_tok = s->top_k;
  c.moe_intermediate_size = s->expert_size;
  c.shared_expert_intermediate_size = s->expert_size;
  c.rms_norm_eps = 1e-6;
  c.tie_word_embeddings = false;
  c.max_position_embeddings = 262144;
  return c;
}

}  // namespace q35::qwen35
