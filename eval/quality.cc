#include "eval/quality.h"

#include <algorithm>
#include <cmath>

#include "server/index/simd.h"

namespace icecache::eval {

void ComputeFullAttention(const float* q, const RowView& keys, const RowView* values, uint32_t n,
                          FullAttention* out) {
  const uint32_t d = keys.dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  out->logits.resize(n);
  out->probs.resize(n);
  std::vector<float> dots(n);
  DotStrided(q, keys.data, keys.stride(), n, keys.type, d, dots.data());
  double mx = -1e300;
  for (uint32_t i = 0; i < n; ++i) {
    out->logits[i] = dots[i] * scale;
    mx = std::max(mx, out->logits[i]);
  }
  double z = 0;
  for (uint32_t i = 0; i < n; ++i) {
    out->probs[i] = std::exp(out->logits[i] - mx);
    z += out->probs[i];
  }
  for (double& p : out->probs) p /= z;
  out->max_logit = mx;
  out->z = z;
  out->out.clear();
  if (values != nullptr && values->data != nullptr) {
    out->out.assign(d, 0.0);
    std::vector<float> v(d);
    for (uint32_t i = 0; i < n; ++i) {
      if (out->probs[i] < 1e-12) continue;
      ToFloat(values->row(i), values->type, d, v.data());
      for (uint32_t c = 0; c < d; ++c) out->out[c] += out->probs[i] * v[c];
    }
  }
}

double AttentionRecall(const FullAttention& full, const std::vector<uint32_t>& tokens) {
  double r = 0;
  for (uint32_t t : tokens) r += full.probs[t];
  return std::min(r, 1.0);
}

double OutputError(const FullAttention& full, const RowView& values,
                   const std::vector<uint32_t>& tokens) {
  const uint32_t d = values.dim;
  std::vector<double> o(d, 0.0);
  std::vector<float> v(d);
  double mass = 0;
  for (uint32_t t : tokens) mass += full.probs[t];
  if (mass <= 0) return 1.0;
  for (uint32_t t : tokens) {
    const double w = full.probs[t] / mass;
    if (w < 1e-12) continue;
    ToFloat(values.row(t), values.type, d, v.data());
    for (uint32_t c = 0; c < d; ++c) o[c] += w * v[c];
  }
  double num = 0, den = 0;
  for (uint32_t c = 0; c < d; ++c) {
    num += (o[c] - full.out[c]) * (o[c] - full.out[c]);
    den += full.out[c] * full.out[c];
  }
  return den > 0 ? std::sqrt(num / den) : 0.0;
}

}  // namespace icecache::eval
