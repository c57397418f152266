#pragma once
// Embedding gather: out[t, :] = table[ids[t], :].
//   table [vocab, H] bf16, ids [T] int32 (each in [0, vocab), checked by the caller: ids come from
//   the tokenizer or the on-device argmax), out [T, H] bf16.
// Grid: (T), block: THREADS. Each thread copies 16-byte vectors (8 values); H % 8 == 0.
#include "common.cuh"

template <int H, int THREADS>
__global__ void __launch_bounds__(THREADS)
embedding_gather(const q35k::bf16* __restrict__ table,  // [vocab, H]
                 const int* __restrict__ ids,           // [T]
                 q35k::bf16* __restrict__ out) {        // [T, H]
  static_assert(H % 8 == 0, "embedding_gather: H must be a multiple of 8 (16-byte rows)");
  constexpr int VECS = H / 8;  // 16-byte vectors per row
  const int t = blockIdx.x;
  const q35k::bf16* src = table + size_t(ids[t]) * H;
  q35k::bf16* dst = out + size_t(t) * H;
  for (int v = threadIdx.x; v < VECS; v += THREADS) q35k::st_global_16(dst + v * 8, q35k::ld_stream_16(src + v * 8));
}
