#pragma once
// Tile configurations of the JIT kernels (their template parameters beyond the shapes), the rule
// that says whether a config is valid for a shape, a heuristic default per (family, shape, M), and
// the KernelSpec that names the instantiation. One struct per kernel family, named like its
// kernel_templates/<family>.cuh file.
#include <cstdint>
#include <string>

#include "runtime/jit/kernel_spec.h"

namespace q35 {

// kernel_templates/embedding.cuh: embedding_gather<H, THREADS>; grid (T), block THREADS.
struct EmbeddingTile {
  int threads = 128;
};
// kernel_templates/rmsnorm.cuh: rmsnorm<H, THREADS, ADD_RESIDUAL[, F32_RESIDUAL]>; grid (rows), block THREADS.
struct RmsnormTile {
  int threads = 256;
  int smem_bytes() const { return threads / 32 * 4; }  // block_sum scratch
};
// kernel_templates/gemv_bf16.cuh: gemv_bf16<N, K, M_TILE, ROWS_PER_WARP, WARPS>;
// grid (ceil(N / rows_per_block), ceil(T / m_tile)), block 32 * warps.
struct GemvTile {
  int m_tile = 1;         // tokens per block (1..16)
  int rows_per_warp = 2;  // W rows per warp
  int warps = 4;          // warps per block
  int rows_per_block() const { return rows_per_warp * warps; }
  int threads() const { return 32 * warps; }
};

// Empty when valid, else why not ("H = 2056 is not a multiple of 8 * threads = 2048").
std::string why_invalid(const EmbeddingTile& tile, int64_t hidden);
std::string why_invalid(const RmsnormTile& tile, int64_t hidden);
std::string why_invalid(const GemvTile& tile, int64_t n, int64_t k);

// Heuristic defaults (always valid for the shape; Error if the shape itself is unsupported).
EmbeddingTile default_embedding_tile(int64_t hidden);
RmsnormTile default_rmsnorm_tile(int64_t hidden);
// m = tokens per call (1..16).
GemvTile default_gemv_tile(int64_t n, int64_t k, int m);

// The instantiations; Error naming the family, shape and reason if the tile is invalid.
KernelSpec embedding_spec(int64_t hidden, const EmbeddingTile& tile);
// f32_residual (with add_residual): the residual stream is fp32 (no rounding between layers).
KernelSpec rmsnorm_spec(int64_t hidden, bool add_residual, const RmsnormTile& tile, bool f32_residual = false);
KernelSpec gemv_bf16_spec(int64_t n, int64_t k, const GemvTile& tile);

}  // namespace q35
