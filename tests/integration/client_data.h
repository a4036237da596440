// Test data for the client flow: K/V and queries of every layer from the synthetic
// clustered generator, laid out as an engine holds them, and float64 attention over them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <vector>

#include "common/dtype.h"
#include "common/half.h"
#include "eval/synthetic.h"

namespace icecache::testing {

// K/V of every token of every layer (token-major, as an engine holds them) and per-step
// queries, from the synthetic clustered generator.
struct Data {
  uint32_t layers = 0, kv = 0, group = 0, d = 0, tokens = 0;
  DType dtype = DType::kBF16;
  eval::Trace trace;
  std::vector<std::vector<uint16_t>> k, v;  // [layer] -> [token][kv][d]

  uint32_t q_heads() const { return kv * group; }
  float ToFloat(uint16_t x) const {
    return dtype == DType::kBF16 ? Bf16ToFloat(x) : HalfToFloat(x);
  }
  uint16_t FromFloat(float f) const {
    return dtype == DType::kBF16 ? FloatToBf16(f) : FloatToHalf(f);
  }
  const uint16_t* K(uint32_t l, uint32_t t) const { return &k[l][size_t{t} * kv * d]; }
  const uint16_t* V(uint32_t l, uint32_t t) const { return &v[l][size_t{t} * kv * d]; }
  // The query of decode step `step` of layer l: [q_heads][d] in the dtype.
  std::vector<uint16_t> Query(uint32_t l, uint32_t step) const {
    std::vector<uint16_t> q(size_t{q_heads()} * d);
    const uint32_t nq = static_cast<uint32_t>(trace.query_positions.size());
    for (uint32_t h = 0; h < q_heads(); ++h) {
      const float* src = trace.Query(l, h, step % nq);
      for (uint32_t i = 0; i < d; ++i) q[size_t{h} * d + i] = FromFloat(src[i]);
    }
    return q;
  }
};

inline Data MakeData(uint32_t layers, uint32_t kv, uint32_t group, uint32_t d, uint32_t tokens,
                     DType dtype, uint64_t seed = 7) {
  eval::SyntheticOptions o;
  o.num_tokens = tokens;
  o.head_dim = d;
  o.num_layers = layers;
  o.num_kv_heads = kv;
  o.group_size = group;
  o.num_queries = 8;
  o.kv_type = dtype == DType::kBF16 ? index::ElemType::kBF16 : index::ElemType::kF16;
  o.seed = seed;
  Data data;
  data.layers = layers;
  data.kv = kv;
  data.group = group;
  data.d = d;
  data.tokens = tokens;
  data.dtype = dtype;
  data.trace = eval::GenerateSynthetic(o);
  data.k.resize(layers);
  data.v.resize(layers);
  for (uint32_t l = 0; l < layers; ++l) {
    data.k[l].resize(size_t{tokens} * kv * d);
    data.v[l].resize(size_t{tokens} * kv * d);
    for (uint32_t h = 0; h < kv; ++h) {
      const index::RowView kr = data.trace.Keys(l, h), vr = data.trace.Values(l, h);
      for (uint32_t t = 0; t < tokens; ++t) {
        std::memcpy(&data.k[l][(size_t{t} * kv + h) * d], kr.row(t), d * 2);
        std::memcpy(&data.v[l][(size_t{t} * kv + h) * d], vr.row(t), d * 2);
      }
    }
  }
  return data;
}

// float64 softmax attention of query head qh over `positions` of its KV head.
inline std::vector<double> Attend(const Data& data, uint32_t l, const std::vector<uint16_t>& q,
                                  uint32_t qh, const std::vector<uint32_t>& positions) {
  const uint32_t d = data.d, h = qh / data.group;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> s(positions.size());
  double mx = -std::numeric_limits<double>::infinity();
  for (size_t j = 0; j < positions.size(); ++j) {
    const uint16_t* kr = data.K(l, positions[j]) + size_t{h} * d;
    double dot = 0;
    for (uint32_t i = 0; i < d; ++i) {
      dot += double{data.ToFloat(q[size_t{qh} * d + i])} * data.ToFloat(kr[i]);
    }
    s[j] = dot * scale;
    mx = std::max(mx, s[j]);
  }
  double sum = 0;
  for (double& x : s) sum += (x = std::exp(x - mx));
  std::vector<double> out(d, 0.0);
  for (size_t j = 0; j < positions.size(); ++j) {
    const uint16_t* vr = data.V(l, positions[j]) + size_t{h} * d;
    for (uint32_t i = 0; i < d; ++i) out[i] += s[j] / sum * data.ToFloat(vr[i]);
  }
  return out;
}

// Softmax mass of `subset` within `all` (both position lists) for query head qh.
inline double Mass(const Data& data, uint32_t l, const std::vector<uint16_t>& q, uint32_t qh,
                   const std::vector<uint32_t>& all, const std::set<uint32_t>& subset) {
  const uint32_t d = data.d, h = qh / data.group;
  std::vector<double> s(all.size());
  double mx = -std::numeric_limits<double>::infinity();
  for (size_t j = 0; j < all.size(); ++j) {
    const uint16_t* kr = data.K(l, all[j]) + size_t{h} * d;
    double dot = 0;
    for (uint32_t i = 0; i < d; ++i) {
      dot += double{data.ToFloat(q[size_t{qh} * d + i])} * data.ToFloat(kr[i]);
    }
    s[j] = dot / std::sqrt(static_cast<double>(d));
    mx = std::max(mx, s[j]);
  }
  double sum = 0, in = 0;
  for (size_t j = 0; j < all.size(); ++j) {
    const double e = std::exp(s[j] - mx);
    sum += e;
    if (subset.count(all[j]) != 0) in += e;
  }
  return in / sum;
}

inline std::vector<uint32_t> Iota(uint32_t n) {
  std::vector<uint32_t> p(n);
  for (uint32_t i = 0; i < n; ++i) p[i] = i;
  return p;
}

// Output tolerance: the kernels accumulate in fp32 and round the output to the dtype.
inline double Tolerance(DType dtype, double ref) {
  return (dtype == DType::kBF16 ? 8e-3 : 1.5e-3) * std::max(1.0, std::fabs(ref));
}

}  // namespace icecache::testing
