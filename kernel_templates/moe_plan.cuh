#pragma once
// The decode MoE's expert-grouped work list (the plan, moe.cuh moe_build_plan) built by one warp in
// registers, for T * TOPK <= 32 (token, slot) pairs: moe_router's fast path at T <= 32 / TOPK (T <= 4
// at k = 8) when one block routed every token.
//
// Self-contained on purpose: only warp intrinsics (__match_any_sync, __ballot_sync, __shfl_sync,
// __popc), no CUDA headers, so that tests/test_kernels_moe.cpp compiles this very function on the host
// and runs it on an emulated warp (32 threads, the intrinsics as barrier-synchronised exchanges),
// against a host model of moe_build_plan.
namespace q35k {

// Lane l < P = T * TOPK holds e = ids[l], the expert of pair l = t * TOPK + s (every lane calls, with
// the same P; lanes >= P pass anything). Writes the layout of moe_build_plan with the same contents:
//   plan[0] = U, plan[1 + u] = the u-th distinct expert in increasing order, plan[1 + E + u] = its first
//   place in the pair list (plan[1 + E + U] = P), plan[2 + 2E + i] = the pairs, each expert's in lane
//   order, i.e. increasing pair index = increasing token (a token's TOPK experts are distinct).
// A lane's expert group (__match_any_sync) gives its rank in the group (the group's lanes below it);
// one pass of P shuffles counts the pairs with a smaller expert (the group's start) and the groups'
// first lanes with a smaller expert (u). No shared memory, atomics or block barrier.
template <int E>
__device__ __forceinline__ void moe_build_plan_warp(int e, int P, int lane, int* __restrict__ plan) {
  const bool on = lane < P;
  const int key = on ? e : E + lane;  // lanes past P: distinct keys above every expert
  const unsigned same = __match_any_sync(0xffffffffu, key);
  const unsigned below = (1u << lane) - 1u;
  const int rank = __popc(same & below);
  const unsigned firsts = __ballot_sync(0xffffffffu, on && rank == 0);  // one lane per distinct expert
  int start = 0, u = 0;
  for (int j = 0; j < P; ++j) {
    const int kj = __shfl_sync(0xffffffffu, key, j);
    start += kj < key;
    u += kj < key && (firsts >> j & 1u);
  }
  if (on) {
    plan[2 + 2 * E + start + rank] = lane;
    if (rank == 0) {
      plan[1 + u] = key;
      plan[1 + E + u] = start;
    }
  }
  if (lane == 0) {
    const int U = __popc(firsts);
    plan[0] = U;
    plan[1 + E + U] = P;
  }
}

}  // namespace q35k
