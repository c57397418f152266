#pragma once
// Element types as they appear in safetensors headers ("BF16", "F32", ...).
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace q35 {

// F8_E4M3: OCP fp8 e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities,
// 0x7f / 0xff are NaN), as FP8 checkpoints store weights.
enum class DType : uint8_t { F64, F32, F16, BF16, I64, I32, U32, I16, I8, U8, BOOL, F8_E4M3 };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: case DType::U32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::I8: case DType::U8: case DType::BOOL: case DType::F8_E4M3: return 1;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::U32: return "U32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
    case DType::F8_E4M3: return "F8_E4M3";
  }
  return "?";
}

constexpr std::optional<DType> dtype_from_name(std::string_view s) {
  for (DType t : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32,
                  DType::U32, DType::I16, DType::I8, DType::U8, DType::BOOL, DType::F8_E4M3})
    if (dtype_name(t) == s) return t;
  return std::nullopt;
}

}  // namespace q35
