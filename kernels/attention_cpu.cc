#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/half.h"
#include "common/thread_pool.h"
#include "kernels/attention.h"

namespace icecache {
namespace {

inline float Load(const void* base, uint64_t i, DType t) {
  const uint16_t v = static_cast<const uint16_t*>(base)[i];
  return t == DType::kBF16 ? Bf16ToFloat(v) : HalfToFloat(v);
}

inline void Store(void* base, uint64_t i, float f, DType t) {
  static_cast<uint16_t*>(base)[i] = t == DType::kBF16 ? FloatToBf16(f) : FloatToHalf(f);
}

// One query head: online softmax over every row of its KV head's chunks.
void AttendOne(const DecodeAttentionParams& p, uint32_t qh) {
  const uint32_t d = p.head_dim;
  const uint32_t kvh = qh / (p.num_q_heads / p.num_kv_heads);
  std::vector<float> q(d), acc(d, 0.f);
  for (uint32_t i = 0; i < d; ++i) q[i] = Load(p.q, uint64_t{qh} * d + i, p.dtype);
  float m = -std::numeric_limits<float>::infinity(), l = 0.f;
  for (uint32_t c = p.chunk_offsets[kvh]; c < p.chunk_offsets[kvh + 1]; ++c) {
    const AttentionChunk& ch = p.chunks[c];
    for (uint32_t r = 0; r < ch.count; ++r) {
      float s = 0.f;
      for (uint32_t i = 0; i < d; ++i) s += q[i] * Load(ch.k, uint64_t{r} * d + i, p.dtype);
      s *= p.scale;
      const float m_new = std::max(m, s);
      const float correction = std::exp(m - m_new);  // 0 when m was -inf
      const float w = std::exp(s - m_new);
      l = l * correction + w;
      for (uint32_t i = 0; i < d; ++i) {
        acc[i] = acc[i] * correction + w * Load(ch.v, uint64_t{r} * d + i, p.dtype);
      }
      m = m_new;
    }
  }
  if (p.tail != nullptr) {
    // The estimated tail's partial (max, sum, acc[d]) joins like one more block of the online
    // softmax; an empty one (sum 0) changes nothing.
    const float* t = p.tail + uint64_t{qh} * (2 + d);
    if (t[1] > 0.f) {
      const float m_new = std::max(m, t[0]);
      const float a = std::exp(m - m_new);  // 0 when nothing was attended (m = -inf)
      const float b = std::exp(t[0] - m_new);
      l = l * a + t[1] * b;
      for (uint32_t i = 0; i < d; ++i) acc[i] = acc[i] * a + t[2 + i] * b;
      m = m_new;
    }
  }
  for (uint32_t i = 0; i < d; ++i)
    Store(p.out, uint64_t{qh} * d + i, l > 0 ? acc[i] / l : 0.f, p.dtype);
}

}  // namespace

const char* ValidateDecodeAttention(const DecodeAttentionParams& p) {
  if (p.q == nullptr || p.out == nullptr || p.chunk_offsets == nullptr) return "null pointer";
  if (!IsSupportedHeadDim(p.head_dim)) return "head_dim must be 64, 128 or 256";
  if (p.num_kv_heads == 0 || p.num_q_heads == 0 || p.num_q_heads % p.num_kv_heads != 0) {
    return "num_q_heads must be a positive multiple of num_kv_heads";
  }
  if (p.dtype != DType::kBF16 && p.dtype != DType::kFP16) return "dtype must be bf16 or fp16";
  for (uint32_t h = 0; h < p.num_kv_heads; ++h) {
    if (p.chunk_offsets[h + 1] < p.chunk_offsets[h]) return "chunk offsets must not decrease";
  }
  if (p.chunk_offsets[p.num_kv_heads] > 0 && p.chunks == nullptr) return "null chunks";
  return nullptr;
}

bool DecodeAttentionCpu(const DecodeAttentionParams& p, ThreadPool* pool) {
  if (ValidateDecodeAttention(p) != nullptr) return false;
  if (pool != nullptr) {
    pool->ParallelFor(p.num_q_heads, [&](size_t qh) { AttendOne(p, static_cast<uint32_t>(qh)); });
  } else {
    for (uint32_t qh = 0; qh < p.num_q_heads; ++qh) AttendOne(p, qh);
  }
  return true;
}

}  // namespace icecache
