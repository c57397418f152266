#pragma once
// Host model of the decode MoE's expert-grouped plan (kernel_templates/moe.cuh moe_build_plan, and
// moe_plan.cuh moe_build_plan_warp, which must write the same): from ids [T, k] (a token's k experts
// distinct), the ints plan[0 .. 2 + 2E + T*k):
//   plan[0] = U distinct experts; plan[1 + u] = the u-th in increasing order; plan[1 + E + u] = its first
//   place in the pair list, plan[1 + E + U] = T*k; plan[2 + 2E + i] = pair index t*k + s, grouped by
//   expert, each expert's pairs by increasing token.
// Entries moe_build_plan does not write (plan[1 + U .. E], plan[1 + E + U + 1 .. 2E + 1]) stay `fill`.
#include <cstdint>
#include <vector>

namespace q35::test {

inline std::vector<int32_t> moe_plan_ref(const std::vector<int32_t>& ids, int T, int k, int E, int32_t fill = -7) {
  std::vector<int32_t> plan(size_t(2 + 2 * E + T * k), fill);
  std::vector<int> count(size_t(E), 0);
  for (int i = 0; i < T * k; ++i) ++count[size_t(ids[size_t(i)])];
  std::vector<int> cursor(size_t(E), 0);
  int u = 0, p = 0;
  for (int e = 0; e < E; ++e) {
    if (count[size_t(e)] == 0) continue;
    plan[size_t(1 + u)] = e;
    plan[size_t(1 + E + u)] = p;
    cursor[size_t(e)] = p;
    p += count[size_t(e)];
    ++u;
  }
  plan[0] = u;
  plan[size_t(1 + E + u)] = p;
  for (int i = 0; i < T * k; ++i) plan[size_t(2 + 2 * E + cursor[size_t(ids[size_t(i)])]++)] = i;
  return plan;
}

}  // namespace q35::test
