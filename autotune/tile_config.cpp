#include "autotune/tile_config.h"

#include <fmt/format.h>

#include <algorithm>

#include "runtime/core/error.h"

namespace q35 {

namespace {

constexpr int kStaticSmemLimit = 48 * 1024;  // bytes of static shared memory per block
// Blocks wanted for a decode GEMV: ~2 per SM on a 132-SM H100 keeps every SM streaming.
constexpr int64_t kGemvTargetBlocks = 256;

bool is_block_size(int threads) { return threads >= 32 && threads <= 1024 && threads % 32 == 0; }

}  // namespace

std::string why_invalid(const EmbeddingTile& tile, int64_t hidden) {
  if (hidden <= 0 || hidden % 8 != 0) return fmt::format("H = {} is not a positive multiple of 8", hidden);
  if (!is_block_size(tile.threads)) return fmt::format("threads = {} is not a multiple of 32 in [32, 1024]", tile.threads);
  return {};
}

std::string why_invalid(const RmsnormTile& tile, int64_t hidden) {
  if (!is_block_size(tile.threads)) return fmt::format("threads = {} is not a multiple of 32 in [32, 1024]", tile.threads);
  if (hidden <= 0 || hidden % 8 != 0) return fmt::format("H = {} is not a positive multiple of 8", hidden);
  // Each thread keeps ceil(H / (8 * threads)) 16-byte vectors as fp32 in registers.
  const int64_t per_thread = (hidden + 8 * tile.threads - 1) / (8 * tile.threads) * 8;
  if (per_thread > 64) return fmt::format("{} values per thread exceeds 64 (registers)", per_thread);
  if (8 * int64_t(tile.threads) > hidden + 8 * 31)
    return fmt::format("threads = {} leaves whole warps idle for H = {}", tile.threads, hidden);
  if (tile.smem_bytes() > kStaticSmemLimit)
    return fmt::format("{} B of shared memory exceeds {} B", tile.smem_bytes(), kStaticSmemLimit);
  return {};
}

std::string why_invalid(const GemvTile& tile, int64_t n, int64_t k) {
  if (n <= 0) return fmt::format("N = {} is not positive", n);
  if (k <= 0 || k % 8 != 0) return fmt::format("K = {} is not a positive multiple of 8 (16-byte rows)", k);
  if (tile.m_tile < 1 || tile.m_tile > 16) return fmt::format("m_tile = {} is not in [1, 16]", tile.m_tile);
  if (tile.rows_per_warp < 1 || tile.rows_per_warp > 8)
    return fmt::format("rows_per_warp = {} is not in [1, 8]", tile.rows_per_warp);
  if (tile.warps < 1 || tile.warps > 32) return fmt::format("warps = {} is not in [1, 32]", tile.warps);
  if (tile.m_tile * tile.rows_per_warp > 64)
    return fmt::format("m_tile * rows_per_warp = {} accumulators per lane exceeds 64 (registers)",
                       tile.m_tile * tile.rows_per_warp);
  return {};
}

EmbeddingTile default_embedding_tile(int64_t hidden) {
  EmbeddingTile tile;
  // One 16-byte vector per thread when the row is short, else 128 threads looping.
  tile.threads = int(std::min<int64_t>(128, std::max<int64_t>(32, (hidden / 8 + 31) / 32 * 32)));
  if (std::string why = why_invalid(tile, hidden); !why.empty()) fail("embedding: unsupported shape: {}", why);
  return tile;
}

RmsnormTile default_rmsnorm_tile(int64_t hidden) {
  // One 16-byte vector per thread, in whole warps, at most 1024 threads; unguarded when 8 * threads
  // divides H (e.g. H = 2048 -> 256 threads).
  RmsnormTile tile{int(std::clamp<int64_t>((hidden / 8 + 31) / 32 * 32, 32, 1024))};
  if (std::string why = why_invalid(tile, hidden); !why.empty())
    fail("rmsnorm: unsupported hidden size H = {}: {}", hidden, why);
  return tile;
}

GemvTile default_gemv_tile(int64_t n, int64_t k, int m) {
  if (m < 1 || m > 16) fail("gemv_bf16: tokens per call m = {} is not in [1, 16]", m);
  GemvTile tile;
  tile.m_tile = 1;
  while (tile.m_tile < m) tile.m_tile *= 2;
  tile.warps = 4;
  // More rows per warp put more 16-byte weight loads in flight per lane; keep enough blocks for
  // every SM and the accumulators (m_tile * rows_per_warp) within budget.
  tile.rows_per_warp = 1;
  for (int rows : {4, 2}) {
    if (tile.m_tile * rows > 32) continue;
    if ((n + int64_t(rows) * tile.warps - 1) / (int64_t(rows) * tile.warps) >= kGemvTargetBlocks) {
      tile.rows_per_warp = rows;
      break;
    }
  }
  if (std::string why = why_invalid(tile, n, k); !why.empty())
    fail("gemv_bf16 [N = {}, K = {}]: unsupported shape: {}", n, k, why);
  return tile;
}

KernelSpec embedding_spec(int64_t hidden, const EmbeddingTile& tile) {
  if (std::string why = why_invalid(tile, hidden); !why.empty()) fail("embedding [H = {}]: invalid tile: {}", hidden, why);
  return {"embedding", "embedding_gather", {{"H", std::to_string(hidden)}, {"THREADS", std::to_string(tile.threads)}}};
}

KernelSpec rmsnorm_spec(int64_t hidden, bool add_residual, const RmsnormTile& tile, bool f32_residual) {
  if (std::string why = why_invalid(tile, hidden); !why.empty()) fail("rmsnorm [H = {}]: invalid tile: {}", hidden, why);
  if (f32_residual && !add_residual) fail("rmsnorm [H = {}]: an fp32 residual stream needs the residual add", hidden);
  KernelSpec s{"rmsnorm",
               "rmsnorm",
               {{"H", std::to_string(hidden)},
                {"THREADS", std::to_string(tile.threads)},
                {"ADD_RESIDUAL", add_residual ? "true" : "false"}}};
  if (f32_residual) s.args.emplace_back("F32_RESIDUAL", "true");
  return s;
}

KernelSpec gemv_bf16_spec(int64_t n, int64_t k, const GemvTile& tile) {
  if (std::string why = why_invalid(tile, n, k); !why.empty())
    fail("gemv_bf16 [N = {}, K = {}]: invalid tile: {}", n, k, why);
  return {"gemv_bf16",
          "gemv_bf16",
          {{"N", std::to_string(n)},
           {"K", std::to_string(k)},
           {"M_TILE", std::to_string(tile.m_tile)},
           {"ROWS_PER_WARP", std::to_string(tile.rows_per_warp)},
           {"WARPS", std::to_string(tile.warps)}}};
}

}  // namespace q35
