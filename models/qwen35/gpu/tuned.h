#pragma once
// The tile each kernel of a Qwen3.5 forward call of M tokens runs with: the tuned config from the
// tune caches (autotune/tune_cache.h: nearest measured bucket) when there is one and it is valid
// for the shape, else the heuristic default (autotune/tiles_*.cpp). The first miss of a model is
// one notice saying how to tune; an entry that is malformed or invalid for the shape is a notice
// and falls back to the default (never an error).
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "autotune/spaces.h"
#include "autotune/tune_cache.h"
#include "models/qwen35/config.h"
#include "models/qwen35/gpu/gdn.h"
#include "models/qwen35/gpu/moe.h"

namespace q35::qwen35::gpu {

class TunedTiles {
 public:
  // `table` may be null (defaults everywhere, no notices). `arch`: the target ("sm_90a", "sm_80"):
  // shared memory per block (attention prefill tiles) and whether the Hopper GEMMs (wgmma) run.
  // `log`: one-line notices.
  TunedTiles(const Config& cfg, int group, const std::string& arch, std::shared_ptr<const TuneTable> table,
             std::function<void(const std::string&)> log);

  W4GemvTile w4_gemv(int64_t n, int64_t k, bool out_f32, int64_t m) const;
  GemvTile gemv_bf16(int64_t n, int64_t k, bool out_f32, int64_t m) const;
  GemmTile gemm(int64_t n, int64_t k, bool out_f32, int64_t m) const;
  // Router tile for m tokens in all three router slots; the grouped path's GEMVs (the M = 1 tiles at
  // every m); the prefill GEMM tile (tuned for m > kDecodeStepMaxRows).
  MoeTiles moe(int64_t m) const;
  // Whether a call of m tokens takes the MoE's grouped path (moe_grouped_for with the tune cache's
  // moe_path entry at m's bucket, within what the target's shared memory holds).
  bool moe_grouped(int64_t m) const;
  // The most tokens the grouped path takes on the target with the M = 1 tiles.
  int64_t moe_grouped_max() const;
  AttentionPrefillTile attention_prefill(int64_t m) const;
  AttentionDecodeTile attention_decode(int64_t m) const;
  GdnTiles gdn(int64_t m) const;

  const MoeShape& moe_shape() const { return moe_; }
  bool wgmma() const { return wgmma_; }  // prefill GEMMs on gemm_wgmma (sm_90a)
  bool tuned() const { return table_ && !table_->empty(); }

 private:
  // The tuned config of (family, signature) at m parsed by `parse` and checked by `why_invalid`,
  // else `fallback`.
  template <typename T, typename Parse, typename Invalid>
  T pick(const char* family, const std::string& signature, int64_t m, const T& fallback, Parse parse,
         Invalid why_invalid) const;

  Config cfg_;
  int group_;
  int64_t smem_limit_;
  int64_t smem_optin_;  // shared memory per block a kernel may opt in to (smem_optin_bytes)
  bool wgmma_;
  MoeShape moe_;
  std::shared_ptr<const TuneTable> table_;
  std::function<void(const std::string&)> log_;
  mutable bool miss_noticed_ = false;
  mutable std::set<std::string> bad_noticed_;
};

struct AttentionPlan;

// The kernels the tuned tiles of a call of m tokens use, in format `group` (0 bf16, W4A16 group, kFp8Group):
// preloaded at start so that no tuned kernel compiles mid-run. `attn`: the model's attention plan.
std::vector<KernelSpec> tuned_kernels(const Config& c, const TunedTiles& tt, const AttentionPlan& attn, int group,
                                      int64_t m);

}  // namespace q35::qwen35::gpu
