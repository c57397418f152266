#pragma once
// The weight formats of the kernels that read projection weights, named by their template parameter
// GROUP:
//   0            bf16   w [N, K]
//   32, 64, 128  W4A16  qweight u32 [N, K / 8] + bf16 scales [N, K / GROUP]       (int4.cuh)
//   kFp8         FP8    codes uint8 e4m3 [N, K] + fp32 scales [N, ceil(K / 128)]  (fp8.cuh)
// A weight matrix is passed as (const void* w, const void* s), s unused for bf16; experts stack
// [E, N, K] matrices (and their scales) one after another.
#include "common.cuh"
#include "fp8.cuh"
#include "int4.cuh"

namespace q35k {

template <bool FP8>
struct ScaleType {
  typedef bf16 type;
};
template <>
struct ScaleType<true> {
  typedef float type;
};

template <int GROUP>
struct WeightFormat {
  static_assert(GROUP == 0 || GROUP == 32 || GROUP == 64 || GROUP == 128 || GROUP == kFp8,
                "GROUP must be 0 (bf16), 32, 64, 128 (W4A16) or kFp8");
  static constexpr bool quantized = GROUP != 0;
  static constexpr int SCALE_K = GROUP == kFp8 ? kFp8BlockK : GROUP;  // k values per scale (quantized)
  // Bytes of `k` weights of one row.
  static constexpr __device__ size_t bytes(size_t k) { return GROUP == 0 ? 2 * k : GROUP == kFp8 ? k : k / 2; }
  // Scales per row of K weights.
  static constexpr __device__ int scales_per_row(int K) { return GROUP == 0 ? 0 : (K + SCALE_K - 1) / SCALE_K; }
  // Matrix `index` of a stack of [ROWS, K] matrices, and its scales.
  template <int ROWS, int K>
  static __device__ __forceinline__ const void* matrix(const void* w, int index) {
    return static_cast<const unsigned char*>(w) + size_t(index) * ROWS * bytes(K);
  }
  template <int ROWS, int K>
  static __device__ __forceinline__ const void* scales(const void* s, int index) {
    return static_cast<const unsigned char*>(s) + size_t(index) * ROWS * scales_per_row(K) * (GROUP == kFp8 ? 4 : 2);
  }
  // A scale as stored: bf16 for W4A16, fp32 for FP8.
  typedef typename ScaleType<GROUP == kFp8>::type Scale;
  // Scale i of a scale array, as stored and as fp32.
  static __device__ __forceinline__ Scale stored_scale(const void* s, size_t i) { return static_cast<const Scale*>(s)[i]; }
  static __device__ __forceinline__ float scale(const void* s, size_t i) {
    if constexpr (GROUP == kFp8) return stored_scale(s, i);
    else return bf16_to_f32(stored_scale(s, i));
  }
  // The scale array of `rows` rows of K weights starting at row `row` of s.
  static __device__ __forceinline__ const void* scale_row(const void* s, size_t row, int K) {
    return static_cast<const Scale*>(s) + row * scales_per_row(K);
  }
};

// 32 consecutive weights of one row in a quantized format, as loaded (16 bytes of INT4 in the W4A16
// word order, or 32 bytes of FP8 codes): pairs(i) gives weights 8i .. 8i + 7 as exact bf16x2 pairs
// (k order, 2j and 2j + 1 in pair j) before scaling, so both formats feed an mma the same way.
template <int GROUP>
struct Run32 {
  static constexpr int BYTES = 16;
  uint4 v;
  __device__ __forceinline__ void load(const void* p) { v = ld_stream_16(p); }
  __device__ __forceinline__ void zero() { v = make_uint4(0u, 0u, 0u, 0u); }
  __device__ __forceinline__ void pairs(int i, u32 (&p)[4]) const {
    int4x8_to_bf16x2(i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w, p);
  }
};
template <>
struct Run32<kFp8> {
  static constexpr int BYTES = 32;
  uint4 lo, hi;
  __device__ __forceinline__ void load(const void* p) {
    lo = ld_stream_16(p);
    hi = ld_stream_16(static_cast<const unsigned char*>(p) + 16);
  }
  __device__ __forceinline__ void zero() { lo = hi = make_uint4(0u, 0u, 0u, 0u); }
  __device__ __forceinline__ void pairs(int i, u32 (&p)[4]) const {
    const uint4& h = i < 2 ? lo : hi;
    u32 a[2], b[2];
    e4m3x4_to_bf16x2(i % 2 == 0 ? h.x : h.z, a);
    e4m3x4_to_bf16x2(i % 2 == 0 ? h.y : h.w, b);
    p[0] = a[0], p[1] = a[1], p[2] = b[0], p[3] = b[1];
  }
};

}  // namespace q35k
