// Host launcher of the gather kernel. Available only in CUDA builds (ICECACHE_HAVE_CUDA).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/gather.h"

namespace icecache {

// Enqueues the copy of num_items pages of page_bytes each on `stream`. `items` is a
// device-visible array (device memory or mapped host memory) of num_items entries whose
// pointers are device-visible. Never allocates, never synchronizes.
// Returns cudaErrorInvalidValue, launching nothing, when page_bytes is 0 or not a multiple of
// 16, or items is null with num_items > 0; num_items == 0 launches nothing and succeeds.
cudaError_t LaunchGatherPages(const GatherItem* items, uint32_t num_items, uint64_t page_bytes,
                              cudaStream_t stream);

}  // namespace icecache
