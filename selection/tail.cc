#include "selection/tail.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace icecache::selection {

std::string_view TailModeName(TailMode mode) {
  switch (mode) {
    case TailMode::kNone:
      return "none";
    case TailMode::kMean:
      return "mean";
    case TailMode::kMeanVariance:
      return "mean-var";
  }
  return "unknown";
}

absl::StatusOr<TailMode> ParseTailMode(const std::string& name) {
  if (name == "none") return TailMode::kNone;
  if (name == "mean") return TailMode::kMean;
  if (name == "mean-var") return TailMode::kMeanVariance;
  return absl::InvalidArgumentError(
      absl::StrCat("tail mode must be none, mean or mean-var, got \"", name, "\""));
}

void SoftmaxPartial::Add(float s, const float* v) {
  const size_t d = acc.size();
  if (sum == 0) {
    max = s;
    sum = 1.0;
    for (size_t i = 0; i < d; ++i) acc[i] = v[i];
    return;
  }
  if (s > max) {
    const double r = std::exp(double{max} - s);
    sum = sum * r + 1.0;
    for (size_t i = 0; i < d; ++i) acc[i] = acc[i] * r + v[i];
    max = s;
  } else {
    const double w = std::exp(double{s} - max);
    sum += w;
    for (size_t i = 0; i < d; ++i) acc[i] += w * v[i];
  }
}

void SoftmaxPartial::Merge(const SoftmaxPartial& other) {
  if (other.empty()) return;
  if (empty()) {
    *this = other;
    return;
  }
  const float m = std::max(max, other.max);
  const double a = std::exp(double{max} - m), b = std::exp(double{other.max} - m);
  sum = sum * a + other.sum * b;
  for (size_t i = 0; i < acc.size(); ++i) acc[i] = acc[i] * a + other.acc[i] * b;
  max = m;
}

void SoftmaxPartial::Output(float* out) const {
  for (size_t i = 0; i < acc.size(); ++i) {
    out[i] = sum == 0 ? 0.0f : static_cast<float>(acc[i] / sum);
  }
}

float TailLogit(TailMode mode, const float* q, uint32_t dim, float scale,
                const PageSummaryView& page) {
  double dot = 0;
  for (uint32_t i = 0; i < dim; ++i) dot += double{q[i]} * page.key_mean[i];
  double s = std::log(static_cast<double>(page.count)) + scale * dot;
  if (mode == TailMode::kMeanVariance && page.key_var != nullptr) {
    double v = 0;
    for (uint32_t i = 0; i < dim; ++i) v += double{q[i]} * q[i] * page.key_var[i];
    s += std::min<double>(0.5 * double{scale} * scale * v, kTailVarianceCap);
  }
  return static_cast<float>(s);
}

void AddTail(TailMode mode, const float* q, uint32_t dim, float scale,
             const std::vector<PageSummaryView>& pages, SoftmaxPartial* partial) {
  if (mode == TailMode::kNone) return;
  for (const PageSummaryView& p : pages) {
    if (p.count == 0) continue;
    partial->Add(TailLogit(mode, q, dim, scale, p), p.value_mean);
  }
}

void MergeTail(const float* tail, float fetched_max, float fetched_sum, uint32_t dim, float* out) {
  const float tail_sum = tail[1];
  if (!(tail_sum > 0)) return;
  const float* acc = tail + 2;
  if (!(fetched_sum > 0)) {
    for (uint32_t i = 0; i < dim; ++i) out[i] = acc[i] / tail_sum;
    return;
  }
  const float m = std::max(fetched_max, tail[0]);
  const double a = double{fetched_sum} * std::exp(double{fetched_max} - m);
  const double b = std::exp(double{tail[0]} - m);
  const double denom = a + double{tail_sum} * b;
  for (uint32_t i = 0; i < dim; ++i) {
    out[i] = static_cast<float>((double{out[i]} * a + double{acc[i]} * b) / denom);
  }
}

void SummaryBuilder::Add(const float* key, const float* value) {
  for (uint32_t i = 0; i < dim_; ++i) {
    ks_[i] += key[i];
    kq_[i] += double{key[i]} * key[i];
    vs_[i] += value[i];
  }
  ++count_;
}

void SummaryBuilder::Finish(float* key_mean, float* key_var, float* value_mean) const {
  const double n = count_ == 0 ? 1.0 : count_;
  for (uint32_t i = 0; i < dim_; ++i) {
    const double m = ks_[i] / n;
    key_mean[i] = static_cast<float>(m);
    if (key_var != nullptr) key_var[i] = static_cast<float>(std::max(0.0, kq_[i] / n - m * m));
    value_mean[i] = static_cast<float>(vs_[i] / n);
  }
}

}  // namespace icecache::selection
