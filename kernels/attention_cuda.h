// Launcher of the sparse paged decode attention. Available only in CUDA builds.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/attention.h"

namespace icecache {

// Floats of scratch LaunchDecodeAttention needs for `num_splits` splits.
inline size_t DecodeAttentionScratchFloats(const DecodeAttentionParams& p, uint32_t num_splits) {
  return size_t{p.num_q_heads} * num_splits * (p.head_dim + 2);
}

// Enqueues the attention of `p` on `stream`: every pointer in p (q, out, chunks, offsets, and
// the rows the chunks point to) must be device-visible; `scratch` holds
// DecodeAttentionScratchFloats(p, num_splits) floats of device memory. 1 <= num_splits <= 64.
// Never allocates, never synchronizes. cudaErrorInvalidValue (nothing launched) when
// ValidateDecodeAttention(p) fails or the splits or scratch are wrong.
cudaError_t LaunchDecodeAttention(const DecodeAttentionParams& p, float* scratch,
                                  uint32_t num_splits, cudaStream_t stream);

}  // namespace icecache
