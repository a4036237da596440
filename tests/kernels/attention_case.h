// A randomly built decode step for the attention tests (CPU reference and GPU kernel alike):
// per KV head a sink chunk, a window chunk and pages with ragged valid counts; and a naive
// float64 attention over the same decoded inputs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "kernels/attention.h"
#include "kernels/page_layout.h"

namespace icecache::testing {

inline uint16_t Encode(float f, DType t) {
  return t == DType::kBF16 ? FloatToBf16(f) : FloatToHalf(f);
}
inline float Decode(uint16_t v, DType t) {
  return t == DType::kBF16 ? Bf16ToFloat(v) : HalfToFloat(v);
}

// A randomly built decode step: per KV head a sink chunk, a window chunk and pages (K then V
// rows in page_size-row frames) with random valid counts.
struct Case {
  DType dtype;
  uint32_t d, kv_heads, group, page_size;
  std::vector<uint16_t> q, out;
  std::vector<std::vector<uint16_t>> buffers;  // owned row storage
  std::vector<AttentionChunk> chunks;
  std::vector<uint32_t> offsets;
  DecodeAttentionParams params;
  // Tail estimation (AddVirtualTail): per query head, virtual tokens of explicit scaled logits
  // and fp32 values that the chunks do not hold, and their softmax partial
  // [q heads][2 + d] (max, sum, acc) that params.tail points to.
  std::vector<std::vector<double>> virtual_logits;
  std::vector<std::vector<std::vector<float>>> virtual_values;
  std::vector<float> tail;
};

inline Case MakeCase(DType dtype, uint32_t d, uint32_t kv_heads, uint32_t group, uint32_t pages,
                     uint32_t seed) {
  Case c{dtype, d, kv_heads, group, 16, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<uint32_t> fill(1, 16);
  const uint32_t qh = kv_heads * group;
  c.q.resize(uint64_t{qh} * d);
  for (auto& v : c.q) v = Encode(normal(rng) * 2.f, dtype);
  c.out.assign(uint64_t{qh} * d, 0xFFFF);  // poisoned
  auto rows = [&](uint32_t n) {
    std::vector<uint16_t> b(uint64_t{n} * d);
    for (auto& v : b) v = Encode(normal(rng), dtype);
    return b;
  };
  c.buffers.reserve(kv_heads * (4 + pages));
  c.offsets.push_back(0);
  for (uint32_t h = 0; h < kv_heads; ++h) {
    // Sink (16 rows) and window (7 rows): separate K and V buffers.
    for (uint32_t n : {16u, 7u}) {
      c.buffers.push_back(rows(n));
      c.buffers.push_back(rows(n));
      c.chunks.push_back({c.buffers[c.buffers.size() - 2].data(), c.buffers.back().data(), n, 0});
    }
    // Pages: one frame each, K rows then V rows, ragged valid counts.
    const PageLayout layout{16, d, 2};
    for (uint32_t p = 0; p < pages; ++p) {
      c.buffers.push_back(rows(32));
      const uint8_t* base = reinterpret_cast<const uint8_t*>(c.buffers.back().data());
      c.chunks.push_back({base, base + layout.half_bytes(), fill(rng), 0});
    }
    c.offsets.push_back(static_cast<uint32_t>(c.chunks.size()));
  }
  c.params.q = c.q.data();
  c.params.out = c.out.data();
  c.params.chunks = c.chunks.data();
  c.params.chunk_offsets = c.offsets.data();
  c.params.num_q_heads = qh;
  c.params.num_kv_heads = kv_heads;
  c.params.head_dim = d;
  c.params.dtype = dtype;
  c.params.scale = 1.0f / std::sqrt(static_cast<float>(d));
  return c;
}

// Gives every query head `per_head` virtual tokens (query head qh gets none when
// empty_every != 0 and qh % empty_every == 0: its partial has sum 0, and garbage max and acc
// that must not be read) and points params.tail at their partials, built in fp32 as the
// daemon builds them (selection::TailPartials): max, sum exp(s - max), sum exp(s - max) v.
// `shift` moves the virtual logits against the real ones (about N(0, 2) here).
inline void AddVirtualTail(Case& c, uint32_t per_head, uint32_t seed, double shift = 0.0,
                           uint32_t empty_every = 0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const uint32_t d = c.d, qh_count = c.kv_heads * c.group;
  c.virtual_logits.assign(qh_count, {});
  c.virtual_values.assign(qh_count, {});
  c.tail.assign(uint64_t{qh_count} * (2 + d), 0.f);
  for (uint32_t qh = 0; qh < qh_count; ++qh) {
    float* t = c.tail.data() + uint64_t{qh} * (2 + d);
    if (empty_every != 0 && qh % empty_every == 0) {
      t[0] = 1e4f;  // garbage besides sum 0: an empty partial is never read
      for (uint32_t i = 0; i < d; ++i) t[2 + i] = 1e3f;
      continue;
    }
    for (uint32_t j = 0; j < per_head; ++j) {
      c.virtual_logits[qh].push_back(2.0 * normal(rng) + shift);
      std::vector<float> v(d);
      for (float& x : v) x = static_cast<float>(normal(rng));
      c.virtual_values[qh].push_back(std::move(v));
    }
    float mx = -std::numeric_limits<float>::infinity();
    for (double s : c.virtual_logits[qh]) mx = std::max(mx, static_cast<float>(s));
    float sum = 0.f;
    for (uint32_t j = 0; j < per_head; ++j) {
      const float w = std::exp(static_cast<float>(c.virtual_logits[qh][j]) - mx);
      sum += w;
      for (uint32_t i = 0; i < d; ++i) t[2 + i] += w * c.virtual_values[qh][j][i];
    }
    t[0] = per_head > 0 ? mx : 0.f;
    t[1] = sum;
  }
  c.params.tail = c.tail.data();
}

// Naive attention in float64 over the decoded inputs (and the virtual tokens, when the case
// has them: the softmax over real and virtual tokens together).
inline std::vector<double> Naive(const Case& c) {
  const uint32_t d = c.d, qh_count = c.kv_heads * c.group;
  std::vector<double> out(uint64_t{qh_count} * d, 0.0);
  for (uint32_t qh = 0; qh < qh_count; ++qh) {
    const uint32_t h = qh / c.group;
    std::vector<double> logits;
    std::vector<const uint16_t*> vrows;
    for (uint32_t ci = c.offsets[h]; ci < c.offsets[h + 1]; ++ci) {
      const AttentionChunk& ch = c.chunks[ci];
      for (uint32_t r = 0; r < ch.count; ++r) {
        const uint16_t* k = static_cast<const uint16_t*>(ch.k) + uint64_t{r} * d;
        double s = 0;
        for (uint32_t i = 0; i < d; ++i)
          s += double(Decode(c.q[uint64_t{qh} * d + i], c.dtype)) * Decode(k[i], c.dtype);
        logits.push_back(s / std::sqrt(double(d)));
        vrows.push_back(static_cast<const uint16_t*>(ch.v) + uint64_t{r} * d);
      }
    }
    const size_t real = logits.size();
    if (qh < c.virtual_logits.size()) {
      for (double s : c.virtual_logits[qh]) logits.push_back(s);
    }
    double mx = -1e300, z = 0;
    for (double l : logits) mx = std::max(mx, l);
    for (double l : logits) z += std::exp(l - mx);
    for (size_t j = 0; j < logits.size(); ++j) {
      const double w = std::exp(logits[j] - mx) / z;
      for (uint32_t i = 0; i < d; ++i) {
        out[uint64_t{qh} * d + i] += w * (j < real ? double{Decode(vrows[j][i], c.dtype)}
                                                   : double{c.virtual_values[qh][j - real][i]});
      }
    }
  }
  return out;
}

}  // namespace icecache::testing
