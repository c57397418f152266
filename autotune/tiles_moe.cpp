#include "autotune/tiles_moe.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>

#include "autotune/tiles_wgmma.h"
#include "runtime/core/error.h"
#include "runtime/core/weight_format.h"

namespace q35 {

namespace {

constexpr int kStaticSmemLimit = 48 * 1024;  // bytes of static shared memory per block

// warp_rows_dot (moe.cuh) spreads a row of K values over min(C, 32) lanes, C = 16-byte vectors per row
// (bf16); the quantized rows are read in runs of 32 values (WarpRows16).
std::string why_bad_row(int64_t k, int group, const char* what) {
  const int vals = group == 0 ? 8 : 32;
  if (k <= 0 || k % vals != 0) return fmt::format("{} = {} is not a positive multiple of {}", what, k, vals);
  const int64_t c = k / vals;
  if (c % 32 != 0 && 32 % c != 0)
    return fmt::format("{} = {} is {} vectors of {} values: neither a divisor nor a multiple of 32", what, k, c, vals);
  return {};
}

// The grouped decode GEMVs (WarpRows16, moe.cuh): warp w of a block takes k in [w * part, (w + 1) *
// part) in 128-k steps from its start; in a step, each mma column sums one scale group's chunks (W4A16:
// the group, 128 / group columns per token; FP8: the 128-k block, one) and is scaled by that group's
// scale, so a part must start on a group: a multiple of the group (every warp's start is then on one),
// or a divisor of it (each part lies inside one group). W4A16 g32 and bf16 take any part (a multiple of
// 32); W4A16 g64 / g128 and FP8 are checked. `tile` names the tile ("ksplit = 4").
std::string why_misaligned_part(const MoeShape& s, int64_t part, const char* what, const std::string& tile) {
  const int64_t scale_k = s.group == kFp8Group ? 128 : s.group;
  if (scale_k <= 32 || part % scale_k == 0 || scale_k % part == 0) return {};
  return fmt::format("{}: {} = {} is neither a multiple nor a divisor of the {} ({}: a warp's part of K must start "
                     "on a scale {})",
                     s.group == kFp8Group ? std::string("FP8") : fmt::format("W4A16 g{}", s.group), what, part,
                     s.group == kFp8Group ? std::string("128-k scale block") : fmt::format("scale group of {} k", scale_k),
                     tile, s.group == kFp8Group ? "block" : "group");
}

std::string describe(const MoeShape& s) {
  return fmt::format("H = {}, E = {}, k = {}, I = {}, Is = {}, {}", s.hidden, s.experts, s.top_k, s.inter,
                     s.shared_inter,
                     s.group == 0           ? std::string("bf16")
                     : s.group == kFp8Group ? std::string("FP8")
                                            : fmt::format("W4A16 g{}", s.group));
}

void require_valid(const std::string& why, const char* kernel, const MoeShape& s) {
  if (!why.empty()) fail("{} [{}]: {}", kernel, describe(s), why);
}

std::string str(int64_t v) { return std::to_string(v); }

}  // namespace

const char* name(MoeGemm g) {
  switch (g) {
    case MoeGemm::RoutedGateUp: return "routed gate_up";
    case MoeGemm::RoutedDown: return "routed down";
    case MoeGemm::SharedGateUp: return "shared gate_up";
    case MoeGemm::SharedDown: return "shared down";
  }
  return "?";
}

std::string why_invalid(const MoeShape& s) {
  if (s.group != 0 && s.group != 32 && s.group != 64 && s.group != 128 && s.group != kFp8Group)
    return fmt::format("weight group {} is not 0 (bf16), 32, 64, 128 or kFp8Group", s.group);
  if (s.experts < 1 || s.experts > 1024) return fmt::format("E = {} is not in [1, 1024]", s.experts);
  if (s.top_k < 1 || s.top_k > std::min<int64_t>(s.experts, 32))
    return fmt::format("k = {} is not in [1, min(E, 32)]", s.top_k);
  if (s.inter <= 0 || s.shared_inter <= 0) return fmt::format("I = {} and Is = {} must be positive", s.inter, s.shared_inter);
  for (auto [k, what] : {std::pair{s.hidden, "H"}, {s.inter, "I"}, {s.shared_inter, "Is"}}) {
    if (s.group > 0 && k % s.group != 0) return fmt::format("{} = {} is not a multiple of the group {}", what, k, s.group);
    if (s.group == kFp8Group && k % 64 != 0) return fmt::format("FP8: {} = {} is not a multiple of 64", what, k);
    if (std::string why = why_bad_row(k, s.group, what); !why.empty()) return why;
  }
  if (std::string why = why_bad_row(s.hidden, 0, "H (router)"); !why.empty()) return why;
  return {};
}

std::string why_invalid(const MoeRouterTile& t, const MoeShape& s) {
  if (std::string why = why_invalid(s); !why.empty()) return why;
  if (t.m_tile < 1 || t.m_tile > 16) return fmt::format("m_tile = {} is not in [1, 16]", t.m_tile);
  if (t.rows_per_warp < 1 || t.rows_per_warp > 8) return fmt::format("rows_per_warp = {} is not in [1, 8]", t.rows_per_warp);
  if (s.experts % t.rows_per_warp != 0)
    return fmt::format("E = {} is not a multiple of rows_per_warp = {}", s.experts, t.rows_per_warp);
  if (t.warps < 1 || t.warps > 32) return fmt::format("warps = {} is not in [1, 32]", t.warps);
  if (t.m_tile * t.rows_per_warp > 64)
    return fmt::format("m_tile * rows_per_warp = {} accumulators per lane exceeds 64", t.m_tile * t.rows_per_warp);
  return {};
}

std::string why_invalid_gate_up(const MoeGemvTile& t, const MoeShape& s) {
  // A valid shape has I and Is multiples of 8 = kMoeGateUpRows (whole 16-byte vectors).
  if (std::string why = why_invalid(s); !why.empty()) return why;
  if (t.ksplit < 1 || t.ksplit > 32) return fmt::format("ksplit = {} is not in [1, 32]", t.ksplit);
  if (s.hidden % (32 * t.ksplit) != 0)
    return fmt::format("H = {} is not a multiple of 32 * ksplit = {}", s.hidden, 32 * t.ksplit);
  if (s.hidden / t.ksplit > kMoeDecodeMaxKPart)
    return fmt::format("H / ksplit = {} exceeds {} (a warp's weights stay in registers)", s.hidden / t.ksplit,
                       kMoeDecodeMaxKPart);
  if (std::string why = why_misaligned_part(s, s.hidden / t.ksplit, "H / ksplit", fmt::format("ksplit = {}", t.ksplit));
      !why.empty())
    return why;
  return {};
}

std::string why_invalid(const MoeDownTile& t, const MoeShape& s) {
  if (std::string why = why_invalid(s); !why.empty()) return why;
  if (s.hidden % kMoeDownRows != 0) return fmt::format("H = {} is not a multiple of {} (rows per block)", s.hidden, kMoeDownRows);
  if (t.ksplit < 1 || t.warps(s.top_k) > 32)
    return fmt::format("ksplit = {} gives (k + 1) * ksplit = {} warps, not in [1, 32]", t.ksplit, t.warps(s.top_k));
  if (s.inter % (32 * t.ksplit) != 0 || s.shared_inter % (32 * t.ksplit) != 0)
    return fmt::format("I = {} and Is = {} must be multiples of 32 * ksplit = {}", s.inter, s.shared_inter, 32 * t.ksplit);
  if (std::max(s.inter, s.shared_inter) / t.ksplit > kMoeDecodeMaxKPart)
    return fmt::format("max(I, Is) / ksplit = {} exceeds {} (a warp's weights stay in registers)",
                       std::max(s.inter, s.shared_inter) / t.ksplit, kMoeDecodeMaxKPart);
  for (auto [k, what] : {std::pair{s.inter, "I / ksplit"}, {s.shared_inter, "Is / ksplit"}})
    if (std::string why = why_misaligned_part(s, k / t.ksplit, what, fmt::format("ksplit = {}", t.ksplit)); !why.empty())
      return why;
  if (s.group == kFp8Group && std::max(s.inter, s.shared_inter) / t.ksplit > kMoeDecodeFp8MaxDownPart)
    return fmt::format("FP8: max(I, Is) / ksplit = {} exceeds {} (moe_decode_down's 32-byte FP8 runs and their "
                       "conversion spill beyond it)",
                       std::max(s.inter, s.shared_inter) / t.ksplit, kMoeDecodeFp8MaxDownPart);
  if (t.ksplit > 1 && s.top_k + 1 > 15)
    return fmt::format("ksplit = {} needs a named barrier per expert group: k + 1 = {} groups exceed 15", t.ksplit,
                       s.top_k + 1);
  return {};
}

int64_t moe_gemm_n(const MoeShape& s, MoeGemm g) {
  switch (g) {
    case MoeGemm::RoutedGateUp: return 2 * s.inter;
    case MoeGemm::SharedGateUp: return 2 * s.shared_inter;
    case MoeGemm::RoutedDown:
    case MoeGemm::SharedDown: return s.hidden;
  }
  return 0;
}

int64_t moe_gemm_k(const MoeShape& s, MoeGemm g) {
  switch (g) {
    case MoeGemm::RoutedGateUp:
    case MoeGemm::SharedGateUp: return s.hidden;
    case MoeGemm::RoutedDown: return s.inter;
    case MoeGemm::SharedDown: return s.shared_inter;
  }
  return 0;
}

namespace {
WgmmaGemm wgmma_of(const MoeGemmTile& t, const MoeShape& s, MoeGemm g) {
  WgmmaGemm w;
  w.group = s.group, w.n = moe_gemm_n(s, g), w.k = moe_gemm_k(s, g), w.topk = s.top_k;
  w.gate_up = g == MoeGemm::RoutedGateUp || g == MoeGemm::SharedGateUp;
  w.routed = g == MoeGemm::RoutedGateUp || g == MoeGemm::RoutedDown;
  w.bm = t.block_m, w.bn = t.block_n, w.stages = t.stages, w.wgm = t.warps_m, w.wgn = t.warps_n, w.ws = t.ws, w.swap = t.swap, w.ksub = t.ksub;
  w.persist = t.persist;
  w.rs = t.rs;
  return w;
}
}  // namespace

int MoeGemmTile::smem_bytes(int group) const {
  if (wgmma && rs) return wgmma_rs_smem_bytes(block_m, block_n, stages);
  return wgmma ? wgmma_smem_bytes(group, block_m, block_n, stages, ws, ksub)
               : 2 * (block_m + block_n) * (block_k + 8) * 2;
}

std::string why_invalid(const MoeGemmTile& t, const MoeShape& s, MoeGemm g) {
  if (std::string why = why_invalid(s); !why.empty()) return why;
  if (t.wgmma) {
    if (t.block_k != kWgmmaBlockK) return fmt::format("wgmma: block_k = {} is not {}", t.block_k, kWgmmaBlockK);
    return why_invalid(wgmma_of(t, s, g));
  }
  if (t.ws || t.swap || t.ksub != 1 || t.persist || t.rs) return "warp specialisation needs a wgmma tile";
  if (t.stages != 2) return fmt::format("stages = {}: the mma.sync kernel has 2", t.stages);
  const int64_t n = moe_gemm_n(s, g), k = moe_gemm_k(s, g);
  if (t.warps_m < 1 || t.warps_n < 1 || t.threads() > 1024)
    return fmt::format("warps {} x {} is not a block of 1..32 warps", t.warps_m, t.warps_n);
  if (t.block_m % (16 * t.warps_m) != 0 || t.block_n % (16 * t.warps_n) != 0)
    return fmt::format("block {} x {} does not split into {} x {} warp tiles of multiples of 16 x 16", t.block_m,
                       t.block_n, t.warps_m, t.warps_n);
  const int step = s.group > 0 ? 32 : 16;  // INT4: whole 32-value vectors
  if (t.block_k < 16 || t.block_k % step != 0)
    return fmt::format("block_k = {} is not a positive multiple of {}", t.block_k, step);
  if (n % t.block_n != 0) return fmt::format("{}: N = {} is not a multiple of block_n = {}", name(g), n, t.block_n);
  if (k % t.block_k != 0) return fmt::format("{}: K = {} is not a multiple of block_k = {}", name(g), k, t.block_k);
  const int vals = s.group == 0 ? 8 : s.group == kFp8Group ? 16 : 32;  // weights per 16-byte B vector
  if (t.block_m * t.block_k / 8 % t.threads() != 0 || t.block_n * t.block_k / vals % t.threads() != 0)
    return fmt::format("tiles {} x {} and {} x {} do not split into 16-byte vectors over {} threads", t.block_m,
                       t.block_k, t.block_n, t.block_k, t.threads());
  const int acc = t.block_m / t.warps_m * t.block_n / t.warps_n / 32;
  if (acc > 128) return fmt::format("{} fp32 accumulators per thread exceeds 128 (registers)", acc);
  if (const int b = t.block_n * t.block_k / vals / t.threads(); s.group == kFp8Group && b > 4)
    return fmt::format("FP8: {} B vectors in flight per thread exceeds 4 (registers)", b);
  if (t.smem_bytes(s.group) > kStaticSmemLimit)
    return fmt::format("{} B of shared memory exceeds {} B", t.smem_bytes(s.group), kStaticSmemLimit);
  return {};
}

MoeRouterTile default_moe_router_tile(const MoeShape& s, int64_t tokens) {
  if (tokens < 1) fail("moe_router: tokens = {} must be positive", tokens);
  MoeRouterTile t;
  t.m_tile = tokens <= 1 ? 1 : tokens <= kMoeRouterSmallTokens ? 8 : 16;
  if (t.m_tile == 1) {
    // One row per warp, 2 warps per block: E + 1 = 257 warps in 129 blocks spread the 1 MB of
    // router weights over every SM, each lane with its 8 loads of the row in flight.
    t.rows_per_warp = 1;
    t.warps = 2;
  } else {
    t.rows_per_warp = s.experts % 2 == 0 ? 2 : 1;
    t.warps = 4;
  }
  require_valid(why_invalid(t, s), "moe_router", s);
  return t;
}

MoeGemvTile default_moe_gate_up_tile(const MoeShape& s) {
  // 4 warps split H = 2048 into 512-value parts: 8 INT4 16-byte loads per lane, all in flight (bf16:
  // 32, 16 at a time); (8 * 512 + 512) / 8 = 576 blocks of 128 threads fill the H100 in one wave.
  // (Larger H: the fewest warps from 4 up whose part of H is at most kMoeDecodeMaxKPart.)
  MoeGemvTile t{1};
  for (int ksplit : {4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 2, 1})
    if (why_invalid_gate_up(MoeGemvTile{ksplit}, s).empty()) {
      t.ksplit = ksplit;
      break;
    }
  require_valid(why_invalid_gate_up(t, s), "moe_decode_gate_up", s);
  return t;
}

MoeDownTile default_moe_down_tile(const MoeShape& s) {
  // I = 512 in 2 parts: (k + 1) * 2 = 18 warps per block of 16 rows, 4 INT4 loads per lane in flight.
  MoeDownTile t{2};
  for (int ksplit : {2, 1, 3, 4})
    if (why_invalid(MoeDownTile{ksplit}, s).empty()) {
      t.ksplit = ksplit;
      break;
    }
  require_valid(why_invalid(t, s), "moe_decode_down", s);
  return t;
}

MoeGemmTile default_moe_gemm_tile(const MoeShape& s, bool hopper, int64_t tokens) {
  // One tile for all four GEMMs (the align kernel's BLOCK_M must match the routed ones).
  auto valid = [&](const MoeGemmTile& t) {
    for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
      if (!why_invalid(t, s, g).empty()) return false;
    return true;
  };
  if (hopper && tokens >= kMoeWgmmaMinTokens) {
    // From 3072 tokens: two warpgroups along M of 64 x 256 each (the tuner's choice on the H200 at
    // 3072 and 4096, g128 and g32: 987 vs 1182 us per layer at 4096). Below: 64 rows per block (few
    // tokens per expert pad less), two warpgroups over 128 columns. 4 stages: two blocks per SM (6
    // stages and one block per SM ran 823 us instead of 625 for W4A16 g128 routed gate|up at 4096).
    // W4A16: the warp-specialised form of that tile (H200, g128, T = 4096: 1067 us per layer against
    // 1213 for the plain one); bf16 weights need no dequantization and keep the plain one (962 vs 994).
    // Persistent (one block per SM over the tiles): 1028 us per layer against 1067 (H200, g128, T = 4096).
    // The register-sourced tiles (weights as wgmma's A operand, rs) are in the tuner's space, not the
    // default: H200 g128 T = 4096, rs 256x128 st6 persistent 1013-1036 us per layer against
    // 1028-1047 for this tile in the same runs (1-1.5%), but ptxas takes ~10 s per rs GEMM, which
    // made a cold start 17 s instead of 7 (2026-12-03).
    // FP8 (not measured yet): the warp-specialised tile like W4A16, not persistent (its producer
    // spills there), 3 stages (4 rings of 64-byte raw rows do not fit beside the bf16 tiles).
    if (MoeGemmTile t{128, 256, 64, 2, 1, 4, true, true, false, 1, true}; tokens >= 3072 && s.group > 0 && valid(t))
      return t;
    if (MoeGemmTile t{128, 256, 64, 2, 1, 3, true, true}; tokens >= 3072 && s.group == kFp8Group && valid(t))
      return t;
    if (tokens >= 3072 && valid(MoeGemmTile{128, 256, 64, 2, 1, 4, true})) return MoeGemmTile{128, 256, 64, 2, 1, 4, true};
    for (MoeGemmTile t : {MoeGemmTile{64, 128, 64, 1, 2, 4, true}, MoeGemmTile{64, 64, 64, 1, 2, 4, true},
                          MoeGemmTile{64, 64, 64, 1, 1, 4, true}})
      if (valid(t)) return t;
  }
  // sm_90a below kMoeWgmmaMinTokens: few tokens per expert, so the GEMMs stream weights. Up to 8
  // tokens per expert (about 256 tokens for the 35B) the swapped warp-specialised wgmma (weights x
  // tokens: 64 weight rows, the expert's 8 tokens as wgmma's N; H200 g128 T = 128: 340 us per layer
  // against 357 for mma.sync); above, 32-row mma.sync blocks, 4 warps over 128 columns, 64-k steps
  // (the H200 tuner's choice at 16-512 tokens for g32 and at 256-512 for g128: 376 vs 574 us at 512).
  if (hopper) {
    const int64_t per_expert = (tokens * s.top_k + s.experts - 1) / s.experts;
    if (MoeGemmTile t{8, 64, 64, 1, 1, 4, true, true, true}; per_expert <= 8 && valid(t)) return t;
    if (valid(MoeGemmTile{32, 128, 64, 1, 4})) return MoeGemmTile{32, 128, 64, 1, 4};
  }
  for (MoeGemmTile t : {MoeGemmTile{64, 128, 32, 2, 2}, MoeGemmTile{64, 64, 32, 2, 2}, MoeGemmTile{32, 32, 32, 2, 2}}) {
    bool ok = true;
    for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
      ok = ok && why_invalid(t, s, g).empty();
    if (ok) return t;
  }
  const MoeGemmTile t{32, 32, 32, 2, 2};
  for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
    require_valid(why_invalid(t, s, g), "moe_gemm", s);
  return t;
}

KernelSpec moe_router_spec(const MoeShape& s, const MoeRouterTile& t) {
  require_valid(why_invalid(t, s), "moe_router", s);
  return {"moe",
          "moe_router",
          {{"H", str(s.hidden)},
           {"E", str(s.experts)},
           {"TOPK", str(s.top_k)},
           {"M_TILE", str(t.m_tile)},
           {"ROWS", str(t.rows_per_warp)},
           {"WARPS", str(t.warps)}}};
}

namespace {
KernelSpec decode_spec(const char* kernel, const MoeShape& s, int ksplit) {
  return {"moe",
          kernel,
          {{"GROUP", str(s.group)},
           {"H", str(s.hidden)},
           {"I", str(s.inter)},
           {"IS", str(s.shared_inter)},
           {"E", str(s.experts)},
           {"TOPK", str(s.top_k)},
           {"KSPLIT", str(ksplit)}}};
}
}  // namespace

KernelSpec moe_decode_gate_up_spec(const MoeShape& s, const MoeGemvTile& t) {
  require_valid(why_invalid_gate_up(t, s), "moe_decode_gate_up", s);
  return decode_spec("moe_decode_gate_up", s, t.ksplit);
}

KernelSpec moe_decode_down_spec(const MoeShape& s, const MoeDownTile& t) {
  require_valid(why_invalid(t, s), "moe_decode_down", s);
  return decode_spec("moe_decode_down", s, t.ksplit);
}

std::string why_invalid(const MoeStreamTile& t) {
  if (t.warps < 1 || t.warps > 32) return fmt::format("stream warps = {} is not in [1, 32]", t.warps);
  if (t.min_tokens < 0) return fmt::format("stream min_tokens = {} is negative", t.min_tokens);
  return {};
}

namespace {
// A streaming kernel: the decode spec with the decode kernel's ksplit, plus WARPS.
KernelSpec stream_spec(const char* kernel, const MoeShape& s, int ksplit, const MoeStreamTile& t) {
  require_valid(why_invalid(t), kernel, s);
  KernelSpec spec = decode_spec(kernel, s, ksplit);
  spec.args.emplace_back("WARPS", str(t.warps));
  return spec;
}
}  // namespace

KernelSpec moe_stream_gate_up_spec(const MoeShape& s, const MoeGemvTile& gate_up, const MoeStreamTile& t) {
  require_valid(why_invalid_gate_up(gate_up, s), "moe_stream_gate_up", s);
  return stream_spec("moe_stream_gate_up", s, gate_up.ksplit, t);
}

KernelSpec moe_stream_down_spec(const MoeShape& s, const MoeDownTile& down, const MoeStreamTile& t) {
  require_valid(why_invalid(down, s), "moe_stream_down", s);
  return stream_spec("moe_stream_down", s, down.ksplit, t);
}

KernelSpec moe_stream_combine_spec(const MoeShape& s) {
  require_valid(why_invalid(s), "moe_stream_combine", s);
  return {"moe",
          "moe_stream_combine",
          {{"H", str(s.hidden)}, {"TOPK", str(s.top_k)}, {"THREADS", str(kMoeStreamCombineThreads)}}};
}

KernelSpec moe_decode_down_residual_spec(const MoeShape& s, const MoeDownTile& t) {
  require_valid(why_invalid(t, s), "moe_decode_down_residual", s);
  if (s.hidden % 4 != 0) fail("moe_decode_down_residual: hidden size {} must be a multiple of 4", s.hidden);
  return decode_spec("moe_decode_down_residual", s, t.ksplit);
}

KernelSpec moe_align_spec(const MoeShape& s, const MoeGemmTile& t) {
  require_valid(why_invalid(t, s, MoeGemm::RoutedGateUp), "moe_align", s);
  return {"moe",
          "moe_align",
          {{"E", str(s.experts)},
           {"TOPK", str(s.top_k)},
           {"BLOCK_M", str(t.block_m)},
           {"THREADS", str(kMoeAlignThreads)}}};
}

KernelSpec moe_gemm_spec(const MoeShape& s, MoeGemm g, const MoeGemmTile& t) {
  require_valid(why_invalid(t, s, g), "moe_gemm", s);
  if (t.wgmma) return wgmma_gemm_spec(wgmma_of(t, s, g));
  const bool gate_up = g == MoeGemm::RoutedGateUp || g == MoeGemm::SharedGateUp;
  const bool routed = g == MoeGemm::RoutedGateUp || g == MoeGemm::RoutedDown;
  return {"moe_gemm",
          "moe_gemm",
          {{"GROUP", str(s.group)},
           {"N", str(moe_gemm_n(s, g))},
           {"K", str(moe_gemm_k(s, g))},
           {"TOPK", str(s.top_k)},
           {"GATE_UP", gate_up ? "true" : "false"},
           {"ROUTED", routed ? "true" : "false"},
           {"BM", str(t.block_m)},
           {"BN", str(t.block_n)},
           {"BK", str(t.block_k)},
           {"WM", str(t.warps_m)},
           {"WN", str(t.warps_n)}}};
}

KernelSpec moe_combine_spec(const MoeShape& s) {
  require_valid(why_invalid(s), "moe_combine", s);
  return {"moe",
          "moe_combine",
          {{"H", str(s.hidden)}, {"TOPK", str(s.top_k)}, {"THREADS", str(kMoeCombineThreads)}}};
}

KernelSpec moe_router_topk_spec(const MoeShape& s) {
  require_valid(why_invalid(s), "moe_router_topk", s);
  return {"moe",
          "moe_router_topk",
          {{"H", str(s.hidden)}, {"E", str(s.experts)}, {"TOPK", str(s.top_k)}, {"WARPS", str(kMoeRouterTopkWarps)}}};
}

int64_t moe_gate_up_smem_bytes(const MoeGemvTile& tile, int64_t tokens) {
  return int64_t(tile.ksplit) * tokens * 16 * 4;
}

int64_t moe_down_smem_bytes(const MoeShape& s, const MoeDownTile& tile, int64_t tokens) {
  return (tokens * (s.top_k + 1) * 16 + (s.top_k + 1) * tile.ksplit * 8 * 16) * 4;
}

int64_t smem_optin_bytes(const std::string& arch) {
  const int sm = arch.rfind("sm_", 0) == 0 ? std::atoi(arch.c_str() + 3) : 0;
  switch (sm) {
    case 80: case 87: return 163 * 1024;
    case 90: case 100: return 227 * 1024;
    default: return 99 * 1024;  // sm_86, sm_89, sm_120, and whatever is not known
  }
}

int64_t moe_grouped_max_tokens(const MoeShape& s, const MoeGemvTile& gate_up, const MoeDownTile& down,
                               int64_t smem_limit) {
  const int64_t room = smem_limit - kMoeGroupedStaticSmemReserve;
  const int64_t fixed = moe_down_smem_bytes(s, down, 0);  // the parts
  const int64_t per_down = moe_down_smem_bytes(s, down, 1) - fixed;
  if (room < fixed) return 0;
  int64_t most = std::min(kMoeGroupedMaxTokens, (room - fixed) / per_down);
  if (moe_gate_up_smem_bytes(gate_up, most) > room) most = room / moe_gate_up_smem_bytes(gate_up, 1);
  return most;
}

bool moe_grouped_for(int64_t T, int64_t grouped_max, std::optional<bool> tuned) {
  if (T <= kDecodeStepMaxRows) return true;
  if (T > grouped_max) return false;
  return tuned.value_or(T <= kMoeGroupedDefaultMaxTokens);
}

}  // namespace q35
