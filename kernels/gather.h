// Gather: copy whole KV pages from wherever they live (for the GPU: mapped, pinned host
// memory of the daemon's arena, read directly by the kernel over PCIe) into their slots.
//
// One GatherItem per page: the kernel reads `page_bytes` from `src` and writes them to `dst`.
// Pages of all KV heads (and, optionally, several layers) of a decode step go in one launch,
// never one memcpy per page (CONVENTIONS 9; reference/h200-measurements.md: 51 GB/s for the
// kernel against 1.4-15.6 GB/s for per-page copies).
#pragma once

#include <cstdint>

namespace icecache {

struct GatherItem {
  const void* src;  // page start; 16-byte aligned (device-visible address for the GPU path)
  void* dst;        // destination slot; 16-byte aligned
};

// Constraints shared by the kernel and its CPU reference.
inline constexpr uint32_t kGatherAlignment = 16;

// CPU reference with the kernel's semantics over host pointers: items[i].dst receives
// page_bytes bytes from items[i].src, for i in [0, num_items). Items must not overlap.
// Returns false (copying nothing) when page_bytes is 0 or not a multiple of 16, or any
// pointer is null or not 16-byte aligned.
bool GatherPagesCpu(const GatherItem* items, uint32_t num_items, uint64_t page_bytes);

}  // namespace icecache
