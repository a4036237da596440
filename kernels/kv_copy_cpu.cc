#include <cstring>

#include "kernels/kv_copy.h"

namespace icecache {

bool AppendKvCpu(const AppendKvParams& p) {
  if (p.k_new == nullptr || p.v_new == nullptr || p.k_dst == nullptr || p.v_dst == nullptr ||
      p.row_bytes == 0 || p.row_bytes % 16 != 0) {
    return false;
  }
  for (uint32_t h = 0; h < p.kv_heads; ++h) {
    const uint64_t off = h * p.head_stride + uint64_t{p.slot} * p.row_bytes;
    std::memcpy(static_cast<char*>(p.k_dst) + off,
                static_cast<const char*>(p.k_new) + uint64_t{h} * p.row_bytes, p.row_bytes);
    std::memcpy(static_cast<char*>(p.v_dst) + off,
                static_cast<const char*>(p.v_new) + uint64_t{h} * p.row_bytes, p.row_bytes);
  }
  return true;
}

bool WriteStagingCpu(const WriteStagingParams& p) {
  if (p.k_src == nullptr || p.v_src == nullptr || p.k_dst == nullptr || p.v_dst == nullptr ||
      p.row_bytes == 0 || p.row_bytes % 16 != 0) {
    return false;
  }
  const uint64_t stride =
      p.dst_head_stride != 0 ? p.dst_head_stride : uint64_t{p.count} * p.row_bytes;
  for (uint32_t h = 0; h < p.kv_heads; ++h) {
    for (uint32_t t = 0; t < p.count; ++t) {
      const uint64_t src = (uint64_t{p.token_begin + t} * p.kv_heads + h) * p.row_bytes;
      const uint64_t dst = h * stride + uint64_t{p.dst_row_begin + t} * p.row_bytes;
      std::memcpy(static_cast<char*>(p.k_dst) + dst, static_cast<const char*>(p.k_src) + src,
                  p.row_bytes);
      std::memcpy(static_cast<char*>(p.v_dst) + dst, static_cast<const char*>(p.v_src) + src,
                  p.row_bytes);
    }
  }
  return true;
}

}  // namespace icecache
