#include <algorithm>

#include "kernels/kv_copy.cuh"
#include "kernels/kv_copy_cuda.h"

namespace icecache {
namespace {

bool Aligned(const void* p) { return p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t LaunchAppendKv(const AppendKvParams& p, cudaStream_t stream) {
  if (!Aligned(p.k_new) || !Aligned(p.v_new) || !Aligned(p.k_dst) || !Aligned(p.v_dst) ||
      p.row_bytes == 0 || p.row_bytes % 16 != 0 || p.head_stride % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.kv_heads == 0) return cudaSuccess;
  kernels::AppendKvKernel<<<p.kv_heads, 64, 0, stream>>>(
      static_cast<const uint4*>(p.k_new), static_cast<const uint4*>(p.v_new),
      static_cast<uint8_t*>(p.k_dst), static_cast<uint8_t*>(p.v_dst), p.head_stride, p.slot,
      p.row_bytes / 16);
  return cudaGetLastError();
}

cudaError_t LaunchWriteStaging(const WriteStagingParams& p, cudaStream_t stream) {
  if (!Aligned(p.k_src) || !Aligned(p.v_src) || !Aligned(p.k_dst) || !Aligned(p.v_dst) ||
      p.row_bytes == 0 || p.row_bytes % 16 != 0 || p.dst_head_stride % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  const uint64_t stride =
      p.dst_head_stride != 0 ? p.dst_head_stride : uint64_t{p.count} * p.row_bytes;
  const uint64_t rows = uint64_t{p.count} * p.kv_heads;
  if (rows == 0) return cudaSuccess;
  const uint32_t blocks = static_cast<uint32_t>(std::min<uint64_t>(rows, 4096));
  kernels::WriteStagingKernel<<<blocks, 64, 0, stream>>>(
      static_cast<const uint4*>(p.k_src), static_cast<const uint4*>(p.v_src),
      static_cast<uint4*>(p.k_dst), static_cast<uint4*>(p.v_dst), p.token_begin, p.count,
      p.kv_heads, p.row_bytes / 16, stride / 16, p.dst_row_begin);
  return cudaGetLastError();
}

}  // namespace icecache
