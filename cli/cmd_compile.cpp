// q35jit compile: compile (and cache) every kernel a checkpoint needs, from config.json alone.
// Needs no GPU and no weights.
#include <chrono>
#include <set>
#include <cstdio>
#include <thread>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "autotune/spaces.h"
#include "autotune/tiles_wgmma.h"
#include "models/qwen35/gpu/moe.h"
#include "models/qwen35/kernels.h"
#include "runtime/core/error.h"
#include "runtime/core/weight_format.h"
#include "runtime/cuda/driver.h"
#include "runtime/jit/jit_engine.h"

namespace q35::cli {

namespace {

const std::vector<FlagSpec> kCompileFlags = {
    {"model", "DIR", "model folder (only config.json is read)"},
    {"synthetic", "NAME", "a published model's shapes instead: 35b-a3b, 122b-a10b, 397b-a17b"},
    {"arch", "ARCH", "target, e.g. sm_90a or sm_80 (default: the GPU's, else sm_90a)"},
    {"threads", "N", "parallel NVRTC compiles (default: hardware threads)"},
    {"quant", "bf16|w4a16|fp8", "weight format the kernels are for (default w4a16)"},
    {"group-size", "G", "W4A16 group size (default 128, or the largest dividing every K; a quantized checkpoint's own)"},
    {"cache-dir", "DIR", "kernel cache folder (default $Q35JIT_CACHE_DIR, $XDG_CACHE_HOME/q35jit, ~/.cache/q35jit)"},
    {"moe-tiles", "KIND",
     "also the MoE grouped-GEMM tiles of the tuner's space (what `q35jit tune` compiles), to carry their cubins to a "
     "GPU machine: all, wgmma (the sm_90a ones) or rs (the register-sourced W4A16 ones)"},
    {"verbose", "", "list every kernel"},
};

bool valid_arch(const std::string& a) {
  if (a.size() < 5 || a.rfind("sm_", 0) != 0) return false;
  for (size_t i = 3; i < a.size(); ++i)
    if (!std::isdigit(static_cast<unsigned char>(a[i])) && !(i + 1 == a.size() && a[i] == 'a')) return false;
  return true;
}

}  // namespace

int cmd_compile(int argc, char** argv) {
  Args args("compile", kCompileFlags, argc, argv, 2);
  if (args.help()) {
    std::printf("usage: q35jit compile (--model DIR | --synthetic NAME) [--arch sm_90a] [--threads N] [--moe-tiles KIND]\n\n%s",
                args.usage().c_str());
    return 0;
  }
  const ModelSource src = model_source(args);
  std::string arch;
  if (auto a = args.get("arch")) {
    if (!valid_arch(*a)) fail("q35jit compile: --arch must look like sm_90a or sm_80, got '{}'", *a);
    arch = *a;
  } else {
    try {
      Driver driver;
      arch = driver.device_info(0).arch();
    } catch (const Error& e) {
      arch = "sm_90a";
      std::fprintf(stderr, "[q35jit] %s; compiling for %s (use --arch to choose)\n", e.what(), arch.c_str());
    }
  }
  const int hw = int(std::max(1u, std::thread::hardware_concurrency()));
  const int threads = int(args.get_int("threads", hw, 1, 1024));

  const int group = weight_choice(args, src.config, src.dir()).group;
  std::vector<KernelSpec> specs = qwen35::required_kernels(src.config, group, arch);
  if (auto kind = args.get("moe-tiles")) {
    if (*kind != "all" && *kind != "wgmma" && *kind != "rs")
      fail("q35jit compile: --moe-tiles must be all, wgmma or rs, got '{}'", *kind);
    if (*kind == "rs" && group <= 0)
      fail("q35jit compile: --moe-tiles rs: the register-sourced MoE tiles read W4A16 weights only, not --quant {} (use "
           "--moe-tiles wgmma or all)",
           weight_format_name(group));
    const MoeShape s = qwen35::gpu::moe_shape(src.config, group);
    std::set<std::string> seen;
    for (const KernelSpec& k : specs) seen.insert(k.str());
    auto add = [&](const KernelSpec& k) {
      if (seen.insert(k.str()).second) specs.push_back(k);
    };
    for (const MoeGemmTile& t : tune::moe_gemm_candidates(s, 4096, arch_has_wgmma(arch))) {
      if ((*kind == "wgmma" && !t.wgmma) || (*kind == "rs" && !t.rs)) continue;
      bool ok = true;
      for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
        ok = ok && why_invalid(t, s, g).empty();
      if (!ok) continue;
      add(moe_align_spec(s, t));
      for (MoeGemm g : {MoeGemm::RoutedGateUp, MoeGemm::RoutedDown, MoeGemm::SharedGateUp, MoeGemm::SharedDown})
        add(moe_gemm_spec(s, g, t));
    }
  }
  JitEngine jit(args.get("cache-dir") ? std::filesystem::path(*args.get("cache-dir")) : default_cache_dir());

  auto t0 = std::chrono::steady_clock::now();
  std::vector<CompiledKernel> out = jit.compile_all(specs, arch, threads);
  const double ms = ms_since(t0);
  if (args.flag("verbose"))
    for (size_t i = 0; i < specs.size(); ++i)
      std::printf("  %-70s %8.1f ms%s\n", specs[i].str().c_str(), out[i].compile_ms,
                  out[i].from_cache ? "  (cached)" : "");
  JitStats s = jit.stats();
  std::printf("compiled %zu kernels (%s) for %s in %.0f ms on %d threads: %d cache hits, %d compiled (NVRTC %s, cache %s)\n",
              specs.size(), weight_format_name(group).c_str(), arch.c_str(), ms, threads, s.cache_hits(), s.compiled, JitEngine::nvrtc_version().c_str(),
              jit.cache_dir().c_str());
  return 0;
}

}  // namespace q35::cli
