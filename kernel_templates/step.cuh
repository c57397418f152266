#pragma once
// Per-step bookkeeping kept on the device so a decode step replays as one CUDA graph:
// the sampled id becomes the next step's input token and the position advances.
#include "common.cuh"

// pos[0] += T; if next_id is not null, tokens[0] = next_id[0]. Launch with one thread.
__global__ void step_advance(int* __restrict__ pos, int T, const int* __restrict__ next_id, int* __restrict__ tokens) {
  pos[0] += T;
  if (next_id) tokens[0] = next_id[0];
}

// The batched decode step's bookkeeping: for each row b < B that is not padding (slots[b] >= 0),
// pos[slots[b]] += 1 and tokens[b] = next_id[b] (the next step's input). One block, any size.
__global__ void step_advance_batch(int* __restrict__ pos, const int* __restrict__ slots, int B,
                                   const int* __restrict__ next_id, int* __restrict__ tokens) {
  for (int b = threadIdx.x; b < B; b += blockDim.x) {
    const int slot = slots[b];
    if (slot < 0) continue;
    pos[slot] += 1;
    tokens[b] = next_id[b];
  }
}
