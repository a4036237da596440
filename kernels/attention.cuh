// Device code of the sparse paged decode attention (launcher: attention.cu; CPU reference:
// attention_cpu.cc; descriptors: attention.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/attention.h"

namespace icecache {
namespace kernels {

__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T FromFloat(float f);
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float f) {
  return __float2bfloat16(f);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float f) {
  return __float2half(f);
}

// Grid mapping: blockIdx.x = KV head, blockIdx.y = split. A split takes an even share of its
// KV head's chunks. Warp w of the block handles the head's query heads w, w + warps, ...; each
// lane holds D/32 consecutive dims of the query and of the output accumulator, the warp
// reduces each row's dot product with shuffles, and an online softmax keeps (max, sum, acc).
// The split's partial (max, sum, acc) goes to scratch for the combine kernel.
template <typename T, int D>
__global__ void DecodeAttentionPartialKernel(
    const T* __restrict__ q, const AttentionChunk* __restrict__ chunks,
    const uint32_t* __restrict__ chunk_offsets, uint32_t group, uint32_t num_splits, float scale,
    float* __restrict__ part_max, float* __restrict__ part_sum, float* __restrict__ part_acc) {
  constexpr int kPer = D / 32;
  const uint32_t kvh = blockIdx.x, split = blockIdx.y;
  const uint32_t warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t c0 = chunk_offsets[kvh], c1 = chunk_offsets[kvh + 1];
  const uint32_t n = c1 - c0;
  const uint32_t per = (n + num_splits - 1) / num_splits;
  const uint32_t cb = c0 + min(n, split * per), ce = c0 + min(n, (split + 1) * per);
  for (uint32_t g = warp; g < group; g += warps) {
    const uint32_t qh = kvh * group + g;
    float qv[kPer], acc[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      qv[i] = ToFloat(q[uint64_t(qh) * D + lane * kPer + i]);
      acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (uint32_t c = cb; c < ce; ++c) {
      const AttentionChunk ch = chunks[c];
      const T* __restrict__ k = static_cast<const T*>(ch.k);
      const T* __restrict__ v = static_cast<const T*>(ch.v);
      for (uint32_t r = 0; r < ch.count; ++r) {
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < kPer; ++i) s += qv[i] * ToFloat(k[uint64_t(r) * D + lane * kPer + i]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        s *= scale;
        const float m_new = fmaxf(m, s);
        const float correction = __expf(m - m_new);
        const float w = __expf(s - m_new);
        l = l * correction + w;
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          acc[i] = acc[i] * correction + w * ToFloat(v[uint64_t(r) * D + lane * kPer + i]);
        }
        m = m_new;
      }
    }
    const uint64_t slot = uint64_t(qh) * num_splits + split;
    if (lane == 0) {
      part_max[slot] = m;
      part_sum[slot] = l;
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) part_acc[slot * D + lane * kPer + i] = acc[i];
  }
}

// Grid mapping: blockIdx.x = query head; threads stride over the D output dims and merge the
// head's splits (rescaling each by exp(max_split - max)), then the head's tail partial
// (max, sum, acc[D] at tail + qh * (2 + D)) when `tail` is set and its sum is above 0.
template <typename T, int D>
__global__ void DecodeAttentionCombineKernel(const float* __restrict__ part_max,
                                             const float* __restrict__ part_sum,
                                             const float* __restrict__ part_acc,
                                             uint32_t num_splits, const float* __restrict__ tail,
                                             T* __restrict__ out) {
  const uint32_t qh = blockIdx.x;
  const uint64_t base = uint64_t(qh) * num_splits;
  const float* t = tail != nullptr ? tail + uint64_t(qh) * (2 + D) : nullptr;
  const bool with_tail = t != nullptr && t[1] > 0.f;
  float mx = -INFINITY;
  for (uint32_t s = 0; s < num_splits; ++s) {
    if (part_sum[base + s] > 0.f) mx = fmaxf(mx, part_max[base + s]);
  }
  if (with_tail) mx = fmaxf(mx, t[0]);
  float total = 0.f;
  for (uint32_t s = 0; s < num_splits; ++s) {
    if (part_sum[base + s] > 0.f) total += part_sum[base + s] * __expf(part_max[base + s] - mx);
  }
  const float tail_w = with_tail ? __expf(t[0] - mx) : 0.f;
  if (with_tail) total += t[1] * tail_w;
  for (uint32_t d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.f;
    for (uint32_t s = 0; s < num_splits; ++s) {
      if (part_sum[base + s] > 0.f) {
        a += part_acc[(base + s) * D + d] * __expf(part_max[base + s] - mx);
      }
    }
    if (with_tail) a += t[2 + d] * tail_w;
    out[uint64_t(qh) * D + d] = FromFloat<T>(total > 0.f ? a / total : 0.f);
  }
}

}  // namespace kernels
}  // namespace icecache
