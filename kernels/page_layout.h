// The single source of truth for KV page addressing (CONVENTIONS 7), shared by the daemon's
// page store, the client's GPU page cache, the CUDA kernels and their CPU references. Plain
// C++ without nvcc; __host__ __device__ under nvcc.
//
// A page holds the K and V rows of up to `page_size` tokens of one (sequence, layer, KV head):
//
//   [ K: page_size rows x head_dim elements | V: page_size rows x head_dim elements ]
//
// rows are dense, slot s of a page is token row s in both halves, and a page's valid count
// says how many leading slots hold tokens. Every offset is in bytes from the page start.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define ICECACHE_HOST_DEVICE __host__ __device__
#else
#define ICECACHE_HOST_DEVICE
#endif

namespace icecache {

struct PageLayout {
  uint32_t page_size = 0;   // token slots per page
  uint32_t head_dim = 0;    // elements per row
  uint32_t elem_bytes = 0;  // bytes per element (2 for bf16/fp16)

  ICECACHE_HOST_DEVICE constexpr uint64_t row_bytes() const {
    return uint64_t{head_dim} * elem_bytes;
  }
  // Bytes of the K half (and of the V half).
  ICECACHE_HOST_DEVICE constexpr uint64_t half_bytes() const { return page_size * row_bytes(); }
  ICECACHE_HOST_DEVICE constexpr uint64_t page_bytes() const { return 2 * half_bytes(); }
  ICECACHE_HOST_DEVICE constexpr uint64_t k_offset(uint32_t slot) const {
    return slot * row_bytes();
  }
  ICECACHE_HOST_DEVICE constexpr uint64_t v_offset(uint32_t slot) const {
    return half_bytes() + slot * row_bytes();
  }
};

}  // namespace icecache
