#pragma once
// Per-step bookkeeping kept on the device so a decode step replays as one CUDA graph:
// the sampled id becomes the next step's input token and the position advances.
#include "common.cuh"

// pos[0] += T; if next_id is not null, tokens[0] = next_id[0]. Launch with one thread.
__global__ void step_advance(int* __restrict__ pos, int T, const int* __restrict__ next_id, int* __restrict__ tokens) {
  pos[0] += T;
  if (next_id) tokens[0] = next_id[0];
}
