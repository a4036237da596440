#include "eval/synthetic.h"

#include <cmath>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace icecache::eval {
namespace {

void Store(float v, ElemType type, uint8_t* dst) {
  switch (type) {
    case ElemType::kF32:
      std::memcpy(dst, &v, 4);
      break;
    case ElemType::kF16: {
      const uint16_t h = FloatToHalf(v);
      std::memcpy(dst, &h, 2);
      break;
    }
    case ElemType::kBF16: {
      const uint16_t b = FloatToBf16(v);
      std::memcpy(dst, &b, 2);
      break;
    }
  }
}

}  // namespace

void ApplyRope(float* x, uint32_t dim, uint32_t position, float base) {
  for (uint32_t i = 0; i < dim / 2; ++i) {
    const double theta = position * std::pow(double(base), -2.0 * i / dim);
    const double c = std::cos(theta), s = std::sin(theta);
    const double a = x[2 * i], b = x[2 * i + 1];
    x[2 * i] = static_cast<float>(a * c - b * s);
    x[2 * i + 1] = static_cast<float>(a * s + b * c);
  }
}

Trace GenerateSynthetic(const SyntheticOptions& o) {
  Trace t;
  t.description = absl::StrFormat(
      "synthetic: %u tokens, dim %u, %u clusters (mean run %u, spread %.2f), %u outlier "
      "channels, %u clusters per query, sharpness %.1f, RoPE base %.0f, seed %u",
      o.num_tokens, o.head_dim, o.num_clusters, o.mean_run, o.cluster_spread, o.outlier_channels,
      o.query_clusters, o.query_sharpness, o.rope_base, static_cast<unsigned>(o.seed));
  if (o.query_drift < 1.0f) {
    t.description += absl::StrFormat(", query drift %.2f per step", o.query_drift);
  }
  t.num_layers = o.num_layers;
  t.num_kv_heads = o.num_kv_heads;
  t.num_q_heads = o.num_kv_heads * o.group_size;
  t.head_dim = o.head_dim;
  t.num_tokens = o.num_tokens;
  t.kv_type = o.kv_type;
  t.has_values = true;
  for (uint32_t i = 0; i < o.num_queries; ++i) {
    t.query_positions.push_back(o.num_tokens - o.num_queries + i);
  }
  t.Allocate();

  const uint32_t d = o.head_dim;
  const uint32_t eb = ElemBytes(o.kv_type);
  std::mt19937_64 rng(o.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uniform(0.f, 1.f);

  for (uint32_t layer = 0; layer < o.num_layers; ++layer) {
    for (uint32_t kvh = 0; kvh < o.num_kv_heads; ++kvh) {
      // Cluster centres: energy grows toward the low-frequency (high-index) pairs.
      std::vector<float> centres(uint64_t{o.num_clusters} * d), vcentres(centres.size());
      for (uint32_t c = 0; c < o.num_clusters; ++c) {
        for (uint32_t i = 0; i < d; ++i) {
          const float weight = 0.25f + 1.75f * static_cast<float>(i / 2) / (d / 2);
          centres[uint64_t{c} * d + i] = normal(rng) * weight;
          vcentres[uint64_t{c} * d + i] = normal(rng);
        }
      }
      // Popularity: a few clusters recur often (Zipf-like).
      std::vector<double> popularity(o.num_clusters);
      for (uint32_t c = 0; c < o.num_clusters; ++c) popularity[c] = 1.0 / (1.0 + c * 0.15);
      std::discrete_distribution<uint32_t> pick(popularity.begin(), popularity.end());
      std::vector<uint32_t> cluster_of(o.num_tokens);
      for (uint32_t pos = 0; pos < o.num_tokens;) {
        const uint32_t c = pick(rng);
        const uint32_t run =
            1 + static_cast<uint32_t>(-std::log(1.0f - uniform(rng)) * (o.mean_run - 1));
        for (uint32_t r = 0; r < run && pos < o.num_tokens; ++r) cluster_of[pos++] = c;
      }
      const float typical = std::sqrt(static_cast<float>(d));  // |centre| ~ sqrt(d)
      std::vector<float> k(d), v(d);
      uint8_t* kdst = t.keys.data() + (uint64_t{layer} * o.num_kv_heads + kvh) * t.HeadBytes();
      uint8_t* vdst = t.values.data() + (uint64_t{layer} * o.num_kv_heads + kvh) * t.HeadBytes();
      for (uint32_t pos = 0; pos < o.num_tokens; ++pos) {
        const float* c = centres.data() + uint64_t{cluster_of[pos]} * d;
        const float* vc = vcentres.data() + uint64_t{cluster_of[pos]} * d;
        for (uint32_t i = 0; i < d; ++i) {
          k[i] = c[i] + normal(rng) * o.cluster_spread * typical / std::sqrt(float(d)) * 1.0f;
          v[i] = vc[i] + 0.3f * normal(rng);
        }
        for (uint32_t j = 0; j < o.outlier_channels && j < d; ++j) {
          k[d - 1 - 2 * j] += o.outlier_offset;  // low-frequency channels: stable under RoPE
        }
        ApplyRope(k.data(), d, pos, o.rope_base);
        for (uint32_t i = 0; i < d; ++i) {
          Store(k[i], o.kv_type, kdst + (uint64_t{pos} * d + i) * eb);
          Store(v[i], o.kv_type, vdst + (uint64_t{pos} * d + i) * eb);
        }
      }
      // Queries of the group: each attends to a few clusters seen in the sequence.
      for (uint32_t qh = 0; qh < o.group_size; ++qh) {
        const uint32_t q_head = kvh * o.group_size + qh;
        std::vector<uint32_t> targets(o.query_clusters, 0);
        for (uint32_t qi = 0; qi < t.query_positions.size(); ++qi) {
          const uint32_t pos = t.query_positions[qi];
          std::vector<float> q(d, 0.f);
          for (uint32_t j = 0; j < o.query_clusters; ++j) {
            // (No extra draw when every query is independent: older traces stay identical.)
            if (qi == 0 || o.query_drift >= 1.0f || uniform(rng) < o.query_drift) {
              targets[j] = cluster_of[static_cast<uint32_t>(uniform(rng) * (pos - 1))];
            }
            const uint32_t target = targets[j];
            const float* c = centres.data() + uint64_t{target} * d;
            for (uint32_t i = 0; i < d; ++i) q[i] += c[i];
          }
          double norm = 0;
          for (uint32_t i = 0; i < d; ++i) {
            q[i] += 0.3f * normal(rng);
            norm += double(q[i]) * q[i];
          }
          const float scale = o.query_sharpness / static_cast<float>(std::sqrt(norm));
          for (uint32_t i = 0; i < d; ++i) q[i] *= scale * std::sqrt(float(d)) / 4.0f;
          ApplyRope(q.data(), d, pos, o.rope_base);
          std::copy(q.begin(), q.end(), t.MutableQuery(layer, q_head, qi));
        }
      }
    }
  }
  return t;
}

}  // namespace icecache::eval
