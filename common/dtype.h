// Element types of stored K and V rows, shared by the daemon, the client library and the
// kernels' dispatch.
#pragma once

#include <cstdint>

namespace icecache {

enum class DType : uint8_t { kBF16 = 1, kFP16 = 2 };

// Bytes per element (2 for both supported types).
constexpr uint32_t DTypeBytes(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
    case DType::kFP16:
      return 2;
  }
  return 0;
}

// "bf16" / "fp16".
constexpr const char* DTypeName(DType dtype) {
  return dtype == DType::kBF16 ? "bf16" : dtype == DType::kFP16 ? "fp16" : "unknown";
}

}  // namespace icecache
