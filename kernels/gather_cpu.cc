#include <cstring>

#include "kernels/gather.h"

namespace icecache {
namespace {

bool Aligned(const void* p) {
  return p != nullptr && reinterpret_cast<uintptr_t>(p) % kGatherAlignment == 0;
}

}  // namespace

bool GatherPagesCpu(const GatherItem* items, uint32_t num_items, uint64_t page_bytes) {
  if (page_bytes == 0 || page_bytes % kGatherAlignment != 0) return false;
  if (num_items > 0 && items == nullptr) return false;
  for (uint32_t i = 0; i < num_items; ++i) {
    if (!Aligned(items[i].src) || !Aligned(items[i].dst)) return false;
  }
  for (uint32_t i = 0; i < num_items; ++i) std::memcpy(items[i].dst, items[i].src, page_bytes);
  return true;
}

}  // namespace icecache
