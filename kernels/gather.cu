#include <algorithm>

#include "kernels/gather.cuh"
#include "kernels/gather_cuda.h"

namespace icecache {

cudaError_t LaunchGatherPages(const GatherItem* items, uint32_t num_items, uint64_t page_bytes,
                              cudaStream_t stream) {
  if (page_bytes == 0 || page_bytes % kGatherAlignment != 0) return cudaErrorInvalidValue;
  if (num_items == 0) return cudaSuccess;
  if (items == nullptr) return cudaErrorInvalidValue;
  // 256 threads move 4 KiB per pass; enough blocks to cover every SM several times, one
  // block per page up to that (measured: 132..2112 blocks all reach the same bandwidth).
  constexpr uint32_t kThreads = 256;
  constexpr uint32_t kMaxBlocks = 2048;
  const uint32_t blocks = std::min(num_items, kMaxBlocks);
  kernels::GatherPagesKernel<<<blocks, kThreads, 0, stream>>>(items, num_items,
                                                              page_bytes / kGatherAlignment);
  return cudaGetLastError();
}

}  // namespace icecache
