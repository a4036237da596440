// Element types and strided row views the index reads keys through.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/half.h"

namespace icecache::index {

enum class ElemType : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr uint32_t ElemBytes(ElemType t) { return t == ElemType::kF32 ? 4 : 2; }
const char* ElemTypeName(ElemType t);

// `rows` rows of `dim` elements of `type`; row i starts at data + i * stride_bytes
// (stride_bytes 0 means dense: dim * ElemBytes(type)). Borrowed, never owned.
struct RowView {
  const void* data = nullptr;
  ElemType type = ElemType::kF32;
  uint32_t dim = 0;
  uint32_t rows = 0;
  uint64_t stride_bytes = 0;

  uint64_t stride() const {
    return stride_bytes != 0 ? stride_bytes : uint64_t{dim} * ElemBytes(type);
  }
  const void* row(uint32_t i) const { return static_cast<const uint8_t*>(data) + i * stride(); }
};

// IEEE half / bfloat16 <-> float (common/half.h).
using ::icecache::Bf16ToFloat;
using ::icecache::FloatToBf16;
using ::icecache::FloatToHalf;
using ::icecache::HalfToFloat;

}  // namespace icecache::index
