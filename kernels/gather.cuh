// Device code of the gather kernel (launcher: gather.cu; CPU reference: gather_cpu.cc).
#pragma once

#include <cstdint>

#include "kernels/gather.h"

namespace icecache {
namespace kernels {

// Grid mapping: block b copies items b, b + gridDim.x, ... (grid-stride over pages); within
// a page, thread t moves 16-byte words t, t + blockDim.x, ... . Loads are 16-byte vector
// loads straight from the source (mapped host memory on the fetch path), stores 16-byte.
__global__ void GatherPagesKernel(const GatherItem* __restrict__ items, uint32_t num_items,
                                  uint64_t words_per_page) {
  for (uint32_t i = blockIdx.x; i < num_items; i += gridDim.x) {
    const uint4* __restrict__ src = static_cast<const uint4*>(items[i].src);
    uint4* __restrict__ dst = static_cast<uint4*>(items[i].dst);
    for (uint64_t w = threadIdx.x; w < words_per_page; w += blockDim.x) dst[w] = src[w];
  }
}

}  // namespace kernels
}  // namespace icecache
