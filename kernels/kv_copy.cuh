// Device code of the K/V copies (launchers: kv_copy.cu; CPU references: kv_copy_cpu.cc).
#pragma once

#include <cstdint>

namespace icecache {
namespace kernels {

// Grid mapping: blockIdx.x = KV head; threads move the head's K and V rows in 16-byte words.
__global__ void AppendKvKernel(const uint4* __restrict__ k_new, const uint4* __restrict__ v_new,
                               uint8_t* __restrict__ k_dst, uint8_t* __restrict__ v_dst,
                               uint64_t head_stride, uint32_t slot, uint32_t words) {
  const uint32_t h = blockIdx.x;
  uint4* kd = reinterpret_cast<uint4*>(k_dst + h * head_stride) + uint64_t(slot) * words;
  uint4* vd = reinterpret_cast<uint4*>(v_dst + h * head_stride) + uint64_t(slot) * words;
  for (uint32_t w = threadIdx.x; w < words; w += blockDim.x) {
    kd[w] = k_new[uint64_t(h) * words + w];
    vd[w] = v_new[uint64_t(h) * words + w];
  }
}

// Grid mapping: grid-stride over (head, token) rows; a block moves one row's K and V in
// 16-byte words from the token-major source to the head-major destination (mapped host
// memory of the arena on the prefill path).
__global__ void WriteStagingKernel(const uint4* __restrict__ k_src, const uint4* __restrict__ v_src,
                                   uint4* __restrict__ k_dst, uint4* __restrict__ v_dst,
                                   uint32_t token_begin, uint32_t count, uint32_t kv_heads,
                                   uint32_t words, uint64_t dst_head_words,
                                   uint32_t dst_row_begin) {
  const uint64_t rows = uint64_t(count) * kv_heads;
  for (uint64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const uint32_t h = static_cast<uint32_t>(row / count);
    const uint32_t t = static_cast<uint32_t>(row % count);
    const uint64_t src = (uint64_t(token_begin + t) * kv_heads + h) * words;
    const uint64_t dst = uint64_t(h) * dst_head_words + uint64_t(dst_row_begin + t) * words;
    for (uint32_t w = threadIdx.x; w < words; w += blockDim.x) {
      k_dst[dst + w] = k_src[src + w];
      v_dst[dst + w] = v_src[src + w];
    }
  }
}

}  // namespace kernels
}  // namespace icecache
