#include "autotune/tiles_dense.h"

#include <fmt/format.h>

#include <algorithm>

#include "autotune/tiles_wgmma.h"
#include "runtime/core/error.h"
#include "runtime/core/weight_format.h"

namespace q35 {

namespace {

// Dynamic shared memory a block may opt into: sm_80 has 163 KiB, sm_90 227 KiB; stay under both.
constexpr int kMaxDynamicSmem = 160 * 1024;
// Static shared memory of a block (no opt-in).
constexpr int64_t kMaxStaticSmem = 48 * 1024;
// W4A16 decode GEMV warps wanted (each with 4 to 8 x 16 B loads in flight per lane): ~16 per SM
// on a 132-SM H100, so the whole weight matrix of a small projection is requested at once.
constexpr int64_t kW4TargetWarps = 2048;

std::string str(int64_t v) { return std::to_string(v); }

// The GEMV's scale groups per 128-k tile: 128 / G for W4A16, 1 for FP8 (a scale per 128-k block).
int64_t group_slots(int64_t group) { return group == kFp8Group ? 1 : 128 / group; }

// gemv_w4a16's / gemv_fp8's mma column tiles of 8: one column per (token, group of a 128-k tile).
int w4_column_tiles(int m_tile, int64_t group) { return int((m_tile * group_slots(group) + 7) / 8); }

}  // namespace

namespace {
WgmmaGemm wgmma_of(const GemmTile& t, int64_t n, int64_t k, bool out_f32, int group) {
  WgmmaGemm g;
  g.group = group, g.n = n, g.k = k, g.out_f32 = out_f32;
  g.bm = t.bm, g.bn = t.bn, g.stages = t.stages, g.wgm = t.warps_m, g.wgn = t.warps_n, g.ws = t.ws, g.swap = t.swap, g.ksub = t.ksub;
  return g;
}
}  // namespace

int GemmTile::smem_bytes(int group) const {
  if (wgmma) return wgmma_smem_bytes(group, bm, bn, stages, ws, ksub);
  // FP8: the ring holds the raw codes (1 byte per weight), plus two bf16 B tiles.
  return group == kFp8Group ? stages * (bm * 2 + bn) * bk + 2 * bn * bk * 2 : stages * (bm + bn) * bk * 2;
}

std::string why_invalid(const GemmTile& t, int64_t n, int64_t k, int group) {
  if (t.wgmma) {
    if (t.bk != kWgmmaBlockK) return fmt::format("wgmma: bk = {} is not {}", t.bk, kWgmmaBlockK);
    return why_invalid(wgmma_of(t, n, k, false, group));
  }
  if (t.ws || t.swap || t.ksub != 1) return "warp specialisation needs a wgmma tile";
  if (group != 0 && group != kFp8Group)
    return fmt::format("W4A16 g{} weights need a wgmma tile (the mma.sync GEMM reads bf16 or FP8)", group);
  if (n <= 0) return fmt::format("N = {} is not positive", n);
  if (k <= 0 || k % 8 != 0) return fmt::format("K = {} is not a positive multiple of 8 (16-byte rows)", k);
  if (group == kFp8Group && k % 16 != 0) return fmt::format("FP8: K = {} is not a multiple of 16 (16-byte rows)", k);
  if (t.bk != 32 && t.bk != 64 && t.bk != 128) return fmt::format("bk = {} is not 32, 64 or 128", t.bk);
  if (t.warps_m < 1 || t.warps_n < 1 || t.threads() > 1024)
    return fmt::format("warps {} x {} is not a block of 1..32 warps", t.warps_m, t.warps_n);
  if (t.bm <= 0 || t.bm % (16 * t.warps_m) != 0)
    return fmt::format("bm = {} is not a multiple of 16 * warps_m = {}", t.bm, 16 * t.warps_m);
  if (t.bn <= 0 || t.bn % (16 * t.warps_n) != 0)
    return fmt::format("bn = {} is not a multiple of 16 * warps_n = {}", t.bn, 16 * t.warps_n);
  if ((t.bm * t.bk / 8) % t.threads() != 0 || (group == 0 && (t.bn * t.bk / 8) % t.threads() != 0))
    return fmt::format("{} threads do not split the {} x {} and {} x {} tiles into whole 16-byte chunks",
                       t.threads(), t.bm, t.bk, t.bn, t.bk);
  // Accumulators per thread: (bm / warps_m) * (bn / warps_n) / 32 fp32.
  const int acc = t.bm / t.warps_m * t.bn / t.warps_n / 32;
  if (acc > 128) return fmt::format("{} accumulators per thread exceeds 128 (registers)", acc);
  if (group == kFp8Group) {
    // Each thread also holds its 16-code chunks of the stage being dequantized and their scales
    // (the bigger tiles spilled on sm_80, whose conversion takes more registers than sm_89+'s cvt).
    const int raw = (t.bn * t.bk / 16 + t.threads() - 1) / t.threads();
    if (raw > 2 || acc + 16 * raw > 144)
      return fmt::format("FP8: {} accumulators and {} code chunks per thread exceed the registers (at most 2 chunks, "
                         "accumulators + 16 x chunks <= 144)",
                         acc, raw);
  }
  if (t.stages < 2 || t.stages > 8) return fmt::format("stages = {} is not in [2, 8]", t.stages);
  if (t.smem_bytes(group) > kMaxDynamicSmem)
    return fmt::format("{} B of shared memory exceeds {} B", t.smem_bytes(group), kMaxDynamicSmem);
  return {};
}

std::string why_invalid(const W4GemvTile& t, int64_t n, int64_t k, int64_t group) {
  if (n <= 0) return fmt::format("N = {} is not positive", n);
  if (group == kFp8Group) {
    if (k <= 0 || k % 64 != 0) return fmt::format("FP8: K = {} is not a positive multiple of 64", k);
  } else {
    if (group != 32 && group != 64 && group != 128) return fmt::format("group size {} is not 32, 64 or 128", group);
    if (k <= 0 || k % group != 0) return fmt::format("K = {} is not a positive multiple of the group size {}", k, group);
  }
  if (t.m_tile < 1 || t.m_tile > 16) return fmt::format("m_tile = {} is not in [1, 16]", t.m_tile);
  if (t.row_warps < 1 || t.k_warps < 1 || t.row_warps * t.k_warps > 32)
    return fmt::format("row_warps * k_warps = {} * {} is not a block of 1..32 warps", t.row_warps, t.k_warps);
  const int64_t tiles = (k + 127) / 128;
  if (t.k_warps > tiles) return fmt::format("k_warps = {} exceeds the {} 128-k tiles of K = {}", t.k_warps, tiles, k);
  if (const int most = t.m_tile > 8 ? 8 : 16; group == kFp8Group && t.row_warps * t.k_warps > most)
    return fmt::format("FP8: {} warps per block at m_tile {} (at most {}: the registers of a thread hold its 32-byte "
                       "weight runs)",
                       t.row_warps * t.k_warps, t.m_tile, most);
  if (t.unroll < 1 || t.unroll > 8) return fmt::format("unroll = {} is not in [1, 8]", t.unroll);
  if (t.unroll * w4_column_tiles(t.m_tile, group) > 8)
    return fmt::format("unroll * mma column tiles = {} * {} exceeds 8 (accumulator registers)", t.unroll,
                       w4_column_tiles(t.m_tile, group));
  // (The reduction buffer, float [k_warps][m_tile][16 * row_warps], is then at most 32 KiB.)
  return {};
}

std::string why_invalid_gated(const W4GemvTile& t, int64_t n, int64_t k, int64_t group, int64_t dv) {
  if (group != 32 && group != 64 && group != 128)
    return fmt::format("weight format {} is not W4A16 (group 32, 64 or 128): the gated-norm GEMV is W4A16 only", group);
  if (std::string why = why_invalid(t, n, k, group); !why.empty()) return why;
  if (t.m_tile != 1)
    return fmt::format("m_tile = {} is not 1 (the gated-norm input is one token's row per block)", t.m_tile);
  if (dv <= 0 || dv % 128 != 0) return fmt::format("value head dim {} is not a positive multiple of 128", dv);
  if (k % dv != 0) return fmt::format("K = {} is not a whole number of value heads of {}", k, dv);
  const int64_t smem = k * 2 + int64_t(t.k_warps) * t.m_tile * 16 * t.row_warps * 4;
  if (smem > kMaxStaticSmem)
    return fmt::format("the x row of K = {} bf16 and the reduction buffer take {} B of shared memory, over {} B", k,
                       smem, kMaxStaticSmem);
  return {};
}

std::string why_invalid(const QuantizeTile& t, int64_t k, int64_t group) {
  if (group == kFp8Group) {
    if (k <= 0 || k % 16 != 0) return fmt::format("FP8: K = {} is not a positive multiple of 16", k);
    if (t.threads < 32 || t.threads > 1024 || t.threads % 32 != 0)
      return fmt::format("threads = {} is not a multiple of 32 in [32, 1024]", t.threads);
    return {};
  }
  if (group <= 0 || group % 8 != 0 || 32 % (group / 8) != 0)
    return fmt::format("group size {} is not 8, 16, 32, 64, 128 or 256", group);
  if (k <= 0 || k % group != 0) return fmt::format("K = {} is not a positive multiple of the group size {}", k, group);
  if (t.threads < 32 || t.threads > 1024 || t.threads % 32 != 0)
    return fmt::format("threads = {} is not a multiple of 32 in [32, 1024]", t.threads);
  return {};
}

std::string why_invalid(const SampleTile& t, int64_t vocab) {
  if (vocab <= 0 || vocab >= (int64_t(1) << 24))
    return fmt::format("vocab = {} is not in [1, 2^24) (fp32 counts stay exact)", vocab);
  if (t.threads < 32 || t.threads > 1024 || t.threads % 32 != 0)
    return fmt::format("threads = {} is not a multiple of 32 in [32, 1024]", t.threads);
  if (t.blocks < 1 || t.blocks > 1024) return fmt::format("blocks = {} is not in [1, 1024]", t.blocks);
  return {};
}

GemmTile default_gemm_tile(int64_t n, int64_t k, int64_t m, bool wgmma) {
  if (m < 1) fail("gemm_bf16: rows per call m = {} is not positive", m);
  if (wgmma) {
    // Two warpgroups of 64 x bn (bn 256 for wide N: fewer re-reads of x), 64-k steps, 4 stages.
    GemmTile t{128, n >= 4096 ? 256 : 128, kWgmmaBlockK, 2, 1, 4, true};
    if (m <= 64) t.bm = 64, t.warps_m = 1, t.warps_n = t.bn == 256 ? 2 : 1;
    if (n <= 64) t.bn = 64, t.warps_n = 1;
    if (m <= kGemmSwapMaxM) {
      // Few rows: the weights stream through the swapped warp-specialised kernel in 64-row panels
      // (weights x rows, wgmma m64n{bm}), 4 stages (H200, W4A16 g128, M = 128: in_proj 25.8 us
      // against 38.2 for the plain tile, o_proj 25.3 against 47.4).
      GemmTile s{16, 64, kWgmmaBlockK, 1, 1, 4, true, true, true};
      while (s.bm < 64 && s.bm < m) s.bm *= 2;
      if (why_invalid(s, n, k).empty()) t = s;
    }
    if (std::string why = why_invalid(t, n, k); !why.empty())
      fail("gemm_wgmma [N = {}, K = {}]: unsupported shape: {}", n, k, why);
    return t;
  }
  // 128 x 128 x 32, 8 warps (64 x 32 warp tiles), 4 stages (64 KiB): on the H100 at M = 4096 it ran
  // 370-385 TFLOP/s against 288-300 for 128x128x64 and 322-340 for 128x256x64 / 256x128x64 (3 stages).
  // Small M or N: 64-row tiles so more blocks run.
  GemmTile t;
  if (m <= 64) t.bm = 64;
  if (n <= 64) t.bn = 64, t.warps_n = 2;
  if (std::string why = why_invalid(t, n, k); !why.empty())
    fail("gemm_bf16 [N = {}, K = {}]: unsupported shape: {}", n, k, why);
  return t;
}

W4GemvTile default_w4_gemv_tile(int64_t n, int64_t k, int64_t group, int m) {
  const char* kernel = group == kFp8Group ? "gemv_fp8" : "gemv_w4a16";
  if (m < 1 || m > 16) fail("{}: tokens per call m = {} is not in [1, 16]", kernel, m);
  W4GemvTile t;
  t.m_tile = 1;
  while (t.m_tile < m) t.m_tile *= 2;
  // K splits into runs of 4 tiles; more warps per row set (runs of 2) while the whole grid has
  // fewer than kW4TargetWarps warps, i.e. too few bytes in flight (o_proj [2048 x 4096]: 16 runs
  // of 2 ran 3.8 us, 8 runs of 4 4.3 us, 4 runs of 8 6.0 us).
  const int64_t tiles = (k + 127) / 128, row_sets = (n + 15) / 16;
  // At most 8 warps (256 threads, 255 registers each) with 4+ mma column tiles (M = 16 at G32).
  // FP8 at m_tile 16: at most 8 warps too (its 32-byte weight runs take twice the registers).
  const int max_k_warps = w4_column_tiles(t.m_tile, group) >= 4 || (group == kFp8Group && t.m_tile > 8) ? 8 : 16;
  t.k_warps = 1;
  while (t.k_warps < max_k_warps && tiles % (2 * t.k_warps) == 0 && tiles / (2 * t.k_warps) >= 4) t.k_warps *= 2;
  if (row_sets * t.k_warps < kW4TargetWarps && t.k_warps < max_k_warps && tiles % (2 * t.k_warps) == 0)
    t.k_warps *= 2;
  // Tiles loaded at once: 2 (4 x 16 B in flight per lane); 4 only where the grid is many waves
  // long. H100, G128, M = 1: in_proj [12352 x 2048] k_warps 4 ran 6.84 us at unroll 2, 8.51 at 4;
  // q|k|v [9216 x 2048] 5.89 vs 7.06; lm_head [248320 x 2048] 92.5 vs 90.5.
  const int64_t per_warp = (tiles + t.k_warps - 1) / t.k_warps;
  const int64_t max_unroll = row_sets * t.k_warps >= 16 * kW4TargetWarps ? 4 : 2;
  t.unroll = int(std::min<int64_t>({per_warp, max_unroll, 8 / w4_column_tiles(t.m_tile, group)}));
  while (per_warp % t.unroll != 0) --t.unroll;
  // 4 warps per block where the K split leaves room and the rows give enough blocks.
  t.row_warps = 1;
  while (t.threads() < 128 && row_sets / (2 * t.row_warps) >= 512) t.row_warps *= 2;
  if (std::string why = why_invalid(t, n, k, group); !why.empty())
    fail("{} [N = {}, K = {}, {}]: unsupported shape: {}", kernel, n, k, weight_format_name(int(group)), why);
  return t;
}

QuantizeTile default_quantize_tile(int64_t k, int64_t group) {
  QuantizeTile t;
  if (std::string why = why_invalid(t, k, group); !why.empty())
    fail("{} [K = {}, {}]: unsupported shape: {}", group == kFp8Group ? "quantize_fp8" : "quantize_w4", k,
         weight_format_name(int(group)), why);
  return t;
}

SampleTile default_sample_tile(int64_t vocab) {
  SampleTile t;
  // argmax: ~2K logits per block (2 per thread at 1024 threads); sampling: one block.
  t.blocks = int(std::clamp<int64_t>((vocab + 2047) / 2048, 1, 1024));
  t.threads = vocab >= 1024 * 8 ? 1024 : 256;
  if (std::string why = why_invalid(t, vocab); !why.empty()) fail("sample [V = {}]: unsupported shape: {}", vocab, why);
  return t;
}

KernelSpec gemm_bf16_spec(int64_t n, int64_t k, const GemmTile& t, bool out_f32, int group) {
  if (t.wgmma) return wgmma_gemm_spec(wgmma_of(t, n, k, out_f32, group));
  if (std::string why = why_invalid(t, n, k, group); !why.empty())
    fail("gemm_bf16 [N = {}, K = {}, {}]: invalid tile: {}", n, k, weight_format_name(group), why);
  return {"gemm_bf16",
          "gemm_bf16",
          {{"GROUP", str(group)},
           {"N", str(n)},
           {"K", str(k)},
           {"BM", str(t.bm)},
           {"BN", str(t.bn)},
           {"BK", str(t.bk)},
           {"WARPS_M", str(t.warps_m)},
           {"WARPS_N", str(t.warps_n)},
           {"STAGES", str(t.stages)},
           {"OUT_F32", out_f32 ? "true" : "false"}}};
}

KernelSpec gemv_w4a16_spec(int64_t n, int64_t k, int64_t group, const W4GemvTile& t, bool out_f32) {
  if (group == kFp8Group) fail("gemv_w4a16 [N = {}, K = {}]: FP8 weights take gemv_fp8", n, k);
  if (std::string why = why_invalid(t, n, k, group); !why.empty())
    fail("gemv_w4a16 [N = {}, K = {}, G = {}]: invalid tile: {}", n, k, group, why);
  return {"gemv_w4a16",
          "gemv_w4a16",
          {{"N", str(n)},
           {"K", str(k)},
           {"G", str(group)},
           {"M_TILE", str(t.m_tile)},
           {"ROW_WARPS", str(t.row_warps)},
           {"K_WARPS", str(t.k_warps)},
           {"UNROLL", str(t.unroll)},
           {"OUT_F32", out_f32 ? "true" : "false"}}};
}

KernelSpec gemv_w4a16_residual_spec(int64_t n, int64_t k, int64_t group, const W4GemvTile& t) {
  KernelSpec spec = gemv_w4a16_spec(n, k, group, t);
  if (n % 4 != 0) fail("gemv_w4a16_residual [N = {}, K = {}, G = {}]: N must be a multiple of 4", n, k, group);
  spec.kernel = "gemv_w4a16_residual";
  spec.args.pop_back();  // OUT_F32: the output is the fp32 residual stream
  return spec;
}

KernelSpec gemv_fp8_spec(int64_t n, int64_t k, const W4GemvTile& t, bool out_f32) {
  if (std::string why = why_invalid(t, n, k, kFp8Group); !why.empty())
    fail("gemv_fp8 [N = {}, K = {}]: invalid tile: {}", n, k, why);
  return {"gemv_fp8",
          "gemv_fp8",
          {{"N", str(n)},
           {"K", str(k)},
           {"M_TILE", str(t.m_tile)},
           {"ROW_WARPS", str(t.row_warps)},
           {"K_WARPS", str(t.k_warps)},
           {"UNROLL", str(t.unroll)},
           {"OUT_F32", out_f32 ? "true" : "false"}}};
}

KernelSpec gemv_fp8_residual_spec(int64_t n, int64_t k, const W4GemvTile& t) {
  KernelSpec spec = gemv_fp8_spec(n, k, t);
  if (n % 4 != 0) fail("gemv_fp8_residual [N = {}, K = {}]: N must be a multiple of 4", n, k);
  spec.kernel = "gemv_fp8_residual";
  spec.args.pop_back();  // OUT_F32: the output is the fp32 residual stream
  return spec;
}

KernelSpec gemv_w4a16_gated_spec(int64_t n, int64_t k, int64_t group, const W4GemvTile& t, int64_t dv) {
  if (std::string why = why_invalid_gated(t, n, k, group, dv); !why.empty())
    fail("gemv_w4a16_gated [N = {}, K = {}, G = {}, dv = {}]: invalid tile: {}", n, k, group, dv, why);
  KernelSpec spec = gemv_w4a16_spec(n, k, group, t);
  spec.kernel = "gemv_w4a16_gated";
  spec.args.back() = {"DV", str(dv)};  // in place of OUT_F32: the output is bf16
  return spec;
}

KernelSpec gemv_bf16_f32_spec(int64_t n, int64_t k, int m_tile, int rows_per_warp, int warps) {
  if (n <= 0 || k <= 0 || k % 8 != 0 || m_tile < 1 || m_tile > 16 || rows_per_warp < 1 ||
      m_tile * rows_per_warp > 64 || warps < 1 || warps > 32)
    fail("gemv_bf16 (fp32 out) [N = {}, K = {}]: invalid shape or tile m_tile {} rows_per_warp {} warps {}", n, k,
         m_tile, rows_per_warp, warps);
  return {"gemv_bf16",
          "gemv_bf16_f32",
          {{"N", str(n)},
           {"K", str(k)},
           {"M_TILE", str(m_tile)},
           {"ROWS_PER_WARP", str(rows_per_warp)},
           {"WARPS", str(warps)}}};
}

static KernelSpec quantize_family_spec(const char* kernel, int64_t k, int64_t group, const QuantizeTile& t) {
  if (std::string why = why_invalid(t, k, group); !why.empty())
    fail("{} [K = {}, G = {}]: invalid tile: {}", kernel, k, group, why);
  return {"quantize_w4", kernel, {{"K", str(k)}, {"G", str(group)}, {"THREADS", str(t.threads)}}};
}

KernelSpec quantize_w4_spec(int64_t k, int64_t group, const QuantizeTile& t) {
  return quantize_family_spec("quantize_w4", k, group, t);
}

KernelSpec dequantize_w4_spec(int64_t k, int64_t group, const QuantizeTile& t) {
  return quantize_family_spec("dequantize_w4", k, group, t);
}

KernelSpec quantize_fp8_spec(int64_t k, const QuantizeTile& t) {
  if (std::string why = why_invalid(t, k, kFp8Group); !why.empty())
    fail("quantize_fp8 [K = {}]: invalid tile: {}", k, why);
  return {"quantize_fp8", "quantize_fp8", {{"K", str(k)}, {"WARPS", str(t.threads / 32)}}};
}

KernelSpec dequantize_fp8_spec(int64_t k, const QuantizeTile& t) {
  if (std::string why = why_invalid(t, k, kFp8Group); !why.empty())
    fail("dequantize_fp8 [K = {}]: invalid tile: {}", k, why);
  return {"quantize_fp8", "dequantize_fp8", {{"K", str(k)}, {"THREADS", str(t.threads)}}};
}

KernelSpec argmax_spec(int64_t vocab, const SampleTile& t) {
  if (std::string why = why_invalid(t, vocab); !why.empty()) fail("argmax [V = {}]: invalid tile: {}", vocab, why);
  return {"sample", "argmax_f32", {{"V", str(vocab)}, {"THREADS", str(t.threads)}, {"BLOCKS", str(t.blocks)}}};
}

KernelSpec sample_spec(int64_t vocab, const SampleTile& t) {
  if (std::string why = why_invalid(t, vocab); !why.empty()) fail("sample [V = {}]: invalid tile: {}", vocab, why);
  return {"sample", "sample_f32", {{"V", str(vocab)}, {"THREADS", str(t.threads)}}};
}

}  // namespace q35
