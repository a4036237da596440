// Moving K/V rows between the engine's layout and IceCache's:
//   - AppendKv: the new token's K and V of every KV head into slot `slot` of per-head row
//     buffers (the window ring, or a full-KV layer's cache);
//   - WriteStaging: a layer's prompt rows, token-major as engines produce them
//     ([tokens][kv_heads][head_dim]), into a staging buffer head-major
//     ([kv_heads][tokens][head_dim], the layout of abi::StageResponse), for a range of tokens.
// CPU references here; device code in kv_copy.cuh, launchers in kv_copy_cuda.h / kv_copy.cu.
#pragma once

#include <cstdint>

namespace icecache {

// k_new, v_new: [kv_heads][row_bytes]. Destination of head h: dst + h * head_stride + slot *
// row_bytes (K and V buffers alike). row_bytes a multiple of 16, pointers 16-byte aligned.
struct AppendKvParams {
  const void* k_new;
  const void* v_new;
  void* k_dst;
  void* v_dst;
  uint64_t head_stride;  // bytes between heads in the destination
  uint32_t slot;
  uint32_t kv_heads;
  uint32_t row_bytes;
};
bool AppendKvCpu(const AppendKvParams& p);

// Rows [token_begin, token_begin + count) of src (token-major) to head-major rows of dst:
// token t of head h lands at dst + h * dst_head_stride + (dst_row_begin + t) * row_bytes
// (dst_head_stride 0 means count * row_bytes: the staging layout).
struct WriteStagingParams {
  const void* k_src;  // [tokens][kv_heads][row_bytes]
  const void* v_src;
  void* k_dst;  // [kv_heads][...][row_bytes]
  void* v_dst;
  uint32_t token_begin;
  uint32_t count;
  uint32_t kv_heads;
  uint32_t row_bytes;
  uint64_t dst_head_stride = 0;
  uint32_t dst_row_begin = 0;
};
bool WriteStagingCpu(const WriteStagingParams& p);

}  // namespace icecache
