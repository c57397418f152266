#include "autotune/tiles_wgmma.h"

#include <fmt/format.h>

#include <algorithm>

#include "runtime/core/error.h"
#include "runtime/core/weight_format.h"

namespace q35 {

int wgmma_ws_bf16_tiles(int stages) { return stages <= 4 ? stages : stages == 5 ? 3 : 2; }

int wgmma_smem_bytes(int group, int bm, int bn, int stages, bool ws, int ksub) {
  const int a = bm * 128, raw = group == 0 ? 0 : group == kFp8Group ? bn * 64 : bn * 32;
  if (ws)
    return 1024 + stages * ksub * (a + (group == 0 ? bn * 128 : raw)) +
           (group == 0 ? 0 : wgmma_ws_bf16_tiles(stages) * bn * 128) + stages * 16;
  return 1024 + stages * (a + (group == 0 ? bn * 128 : raw)) + (group == 0 ? 0 : 3 * bn * 128);
}

int wgmma_rs_smem_bytes(int bm, int bn, int stages) {
  return 1024 + stages * (bm * 128 + bn * 32) + stages * bn * 4 + stages * 16 + bm * 4;
}

namespace {
std::string why_invalid_rs(const WgmmaGemm& g) {
  if (g.group <= 0)
    return fmt::format("register-sourced weights (rs) are W4A16 only, not {} (the shared-memory tiles read bf16 and FP8)",
                       weight_format_name(g.group));
  if (!g.ws || !g.swap || g.ksub != 1 || g.wgm != 1)
    return "register-sourced weights (rs): warp-specialised and swapped, wgm 1, ksub 1";
  if (g.wgn != 1 && g.wgn != 2) return fmt::format("rs: wgn = {} consumer warpgroups is not 1 or 2", g.wgn);
  if (g.bn != 64 * g.wgn) return fmt::format("rs: bn = {} must be 64 x wgn = {}", g.bn, 64 * g.wgn);
  if (g.bm != 8 && g.bm != 16 && !(g.bm % 32 == 0 && g.bm >= 32 && g.bm <= 256))
    return fmt::format("rs: bm = {} token rows is not 8, 16 or a multiple of 32 up to 256", g.bm);
  if (g.k % 128 != 0) return fmt::format("rs: K = {} is not a multiple of 128 (two 64-k steps per loop)", g.k);
  if ((g.k / g.group) % 2 != 0)
    return fmt::format("rs: K = {} is not a multiple of two groups of {} (4-byte scale pairs)", g.k, g.group);
  if (g.n % g.bn != 0) return fmt::format("rs: N = {} is not a multiple of bn = {}", g.n, g.bn);
  if (g.gate_up && g.out_f32) return "gate|up writes bf16";
  if (g.stages < 2 || g.stages > 8) return fmt::format("rs: stages = {} is not in [2, 8]", g.stages);
  if (const int smem = wgmma_rs_smem_bytes(g.bm, g.bn, g.stages); smem > kWgmmaMaxSmem)
    return fmt::format("{} B of shared memory exceeds {} B", smem, kWgmmaMaxSmem);
  return {};
}
}  // namespace

std::string why_invalid(const WgmmaGemm& g) {
  if (g.group != 0 && g.group != 32 && g.group != 64 && g.group != 128 && g.group != kFp8Group)
    return fmt::format("weight group {} is not 0 (bf16), 32, 64, 128 or kFp8Group", g.group);
  if (g.n <= 0 || g.n % 8 != 0) return fmt::format("N = {} is not a positive multiple of 8", g.n);
  if (g.k <= 0 || g.k % 8 != 0) return fmt::format("K = {} is not a positive multiple of 8", g.k);
  if (g.group == kFp8Group && g.k % kWgmmaBlockK != 0)
    return fmt::format("FP8: K = {} is not a multiple of 64", g.k);
  if (g.group > 0 && (g.k % kWgmmaBlockK != 0 || g.k % g.group != 0))
    return fmt::format("W4A16: K = {} is not a multiple of 64 and of the group {}", g.k, g.group);
  if (g.topk < 1) return fmt::format("topk = {} is not positive", g.topk);
  if (g.rs) return why_invalid_rs(g);
  if (g.wgm != 1 && g.wgm != 2) return fmt::format("wgm = {} warpgroups along M is not 1 or 2", g.wgm);
  if (g.wgn != 1 && g.wgn != 2) return fmt::format("wgn = {} warpgroups along N is not 1 or 2", g.wgn);
  if (g.swap) {
    if (!g.ws) return "the swapped form (weights x rows) is warp-specialised only";
    if (g.wgm != 1 || g.bn != 64 * g.wgn)
      return fmt::format("swapped: bn = {} must be 64 x wgn = {} weight rows and wgm = {} must be 1", g.bn, 64 * g.wgn,
                         g.wgm);
    if (g.bm != 8 && g.bm != 16 && g.bm != 32 && g.bm != 64)
      return fmt::format("swapped: bm = {} rows is not 8, 16, 32 or 64 (the wgmma N)", g.bm);
    if (g.ksub != 1 && g.ksub != 2 && g.ksub != 4) return fmt::format("swapped: ksub = {} is not 1, 2 or 4", g.ksub);
    if (g.k % (64 * g.ksub) != 0)
      return fmt::format("swapped: K = {} is not a multiple of 64 x ksub = {}", g.k, 64 * g.ksub);
  } else if (g.ksub != 1) {
    return fmt::format("ksub = {}: several 64-k steps per stage are the swapped form's", g.ksub);
  } else if (g.bm != 64 * g.wgm) {
    return fmt::format("bm = {} is not 64 * wgm = {}", g.bm, 64 * g.wgm);
  }
  if (g.persist && (!g.ws || g.swap || g.group <= 0))
    return "persistent: the warp-specialised, not swapped, W4A16 form only (the bf16 and FP8 producers' per-chunk "
           "state leaves no registers for the tile loop)";
  const int wtn = g.bn % g.wgn == 0 ? g.bn / g.wgn : 0;
  if (wtn != 32 && wtn != 64 && wtn != 128 && wtn != 256)
    return fmt::format("bn / wgn = {} / {} is not 32, 64, 128 or 256 (the wgmma N)", g.bn, g.wgn);
  const int max_stages = g.ws ? 16 : 8;
  if (g.stages < 3 || g.stages > max_stages)
    return fmt::format("stages = {} is not in [3, {}]", g.stages, max_stages);
  if ((g.gate_up || g.routed) && g.n % g.bn != 0)
    return fmt::format("N = {} is not a multiple of bn = {} (MoE GEMMs)", g.n, g.bn);
  if (g.gate_up && (wtn % 16 != 0 || g.out_f32)) return "gate|up needs bn / wgn a multiple of 16 and bf16 output";
  const int loaders = g.ws ? 128 : g.threads();
  if (g.group == 0 && (g.bn * 8) % loaders != 0)
    return fmt::format("bn = {} does not split into 16-byte chunks over {} threads", g.bn, loaders);
  if (g.ws && g.wgm * g.wgn > 2) return "warp-specialised: at most 2 consumer warpgroups";
  if (const int smem = wgmma_smem_bytes(g); smem > kWgmmaMaxSmem)
    return fmt::format("{} B of shared memory exceeds {} B", smem, kWgmmaMaxSmem);
  return {};
}

KernelSpec wgmma_gemm_spec(const WgmmaGemm& g) {
  if (std::string why = why_invalid(g); !why.empty())
    fail("gemm_wgmma [N = {}, K = {}, {}]: invalid config: {}", g.n, g.k,
         g.group == 0 ? std::string("bf16") : g.group == kFp8Group ? std::string("FP8") : fmt::format("W4A16 g{}", g.group),
         why);
  auto b = [](bool v) { return std::string(v ? "true" : "false"); };
  auto s = [](int64_t v) { return std::to_string(v); };
  // The arguments both kernels take, then each one's own.
  std::vector<std::pair<std::string, std::string>> args = {
      {"GROUP", s(g.group)}, {"N", s(g.n)},         {"K", s(g.k)},    {"TOPK", s(g.topk)},
      {"GATE_UP", b(g.gate_up)}, {"ROUTED", b(g.routed)}, {"OUT_F32", b(g.out_f32)}, {"BM", s(g.bm)}};
  if (g.rs) {
    args.insert(args.end(), {{"WGN", s(g.wgn)}, {"STAGES", s(g.stages)}, {"PERSIST", b(g.persist)}});
    return {"wgmma_rs", "gemm_wgmma_rs", std::move(args)};
  }
  args.insert(args.end(), {{"BN", s(g.bn)},
                           {"STAGES", s(g.stages)},
                           {"WGM", s(g.wgm)},
                           {"WGN", s(g.wgn)},
                           {"WS", b(g.ws)},
                           {"SWAP", b(g.swap)},
                           {"KSUB", s(g.ksub)},
                           {"PERSIST", b(g.persist)}});
  return {"wgmma_gemm", "gemm_wgmma", std::move(args)};
}

bool arch_has_wgmma(const std::string& arch) { return arch == "sm_90a"; }

}  // namespace q35
