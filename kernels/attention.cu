#include "kernels/attention.cuh"
#include "kernels/attention_cuda.h"

namespace icecache {
namespace {

template <typename T, int D>
cudaError_t Launch(const DecodeAttentionParams& p, float* scratch, uint32_t splits,
                   cudaStream_t stream) {
  const uint32_t group = p.num_q_heads / p.num_kv_heads;
  float* part_max = scratch;
  float* part_sum = part_max + size_t{p.num_q_heads} * splits;
  float* part_acc = part_sum + size_t{p.num_q_heads} * splits;
  const uint32_t warps = group < 4 ? group : 4;
  kernels::DecodeAttentionPartialKernel<T, D>
      <<<dim3(p.num_kv_heads, splits), warps * 32, 0, stream>>>(
          static_cast<const T*>(p.q), p.chunks, p.chunk_offsets, group, splits, p.scale, part_max,
          part_sum, part_acc);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  constexpr uint32_t kCombineThreads = D < 128 ? D : 128;
  kernels::DecodeAttentionCombineKernel<T, D><<<p.num_q_heads, kCombineThreads, 0, stream>>>(
      part_max, part_sum, part_acc, splits, p.tail, static_cast<T*>(p.out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t DispatchDim(const DecodeAttentionParams& p, float* scratch, uint32_t splits,
                        cudaStream_t stream) {
  return DispatchHeadDim(p.head_dim, cudaErrorInvalidValue, [&](auto dim) {
    return Launch<T, decltype(dim)::value>(p, scratch, splits, stream);
  });
}

}  // namespace

cudaError_t LaunchDecodeAttention(const DecodeAttentionParams& p, float* scratch,
                                  uint32_t num_splits, cudaStream_t stream) {
  if (ValidateDecodeAttention(p) != nullptr || scratch == nullptr || num_splits == 0 ||
      num_splits > 64) {
    return cudaErrorInvalidValue;
  }
  return p.dtype == DType::kBF16 ? DispatchDim<__nv_bfloat16>(p, scratch, num_splits, stream)
                                 : DispatchDim<__half>(p, scratch, num_splits, stream);
}

}  // namespace icecache
