#include "selection/tail.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace icecache::selection {
namespace {

// Softmax attention of q over every row, in float64: the reference.
std::vector<double> Reference(const std::vector<float>& q, const std::vector<float>& k,
                              const std::vector<float>& v, uint32_t n, uint32_t d, double scale) {
  std::vector<double> s(n);
  double mx = -1e300;
  for (uint32_t t = 0; t < n; ++t) {
    double dot = 0;
    for (uint32_t i = 0; i < d; ++i) dot += double{q[i]} * k[t * d + i];
    s[t] = dot * scale;
    mx = std::max(mx, s[t]);
  }
  double sum = 0;
  std::vector<double> out(d, 0.0);
  for (uint32_t t = 0; t < n; ++t) {
    const double e = std::exp(s[t] - mx);
    sum += e;
    for (uint32_t i = 0; i < d; ++i) out[i] += e * v[t * d + i];
  }
  for (double& x : out) x /= sum;
  return out;
}

struct Data {
  uint32_t n, d;
  std::vector<float> q, k, v;
};

Data Random(uint32_t n, uint32_t d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  Data x{n, d, std::vector<float>(d), std::vector<float>(n * d), std::vector<float>(n * d)};
  for (float& f : x.q) f = 2.0f * g(rng);
  for (float& f : x.k) f = g(rng);
  for (float& f : x.v) f = g(rng);
  return x;
}

// Pages of `page` consecutive rows; rows [0, exact) attended exactly, the rest summarised.
std::vector<double> WithTail(const Data& x, uint32_t exact, uint32_t page, TailMode mode,
                             float scale) {
  SoftmaxPartial part(x.d);
  for (uint32_t t = 0; t < exact; ++t) {
    double dot = 0;
    for (uint32_t i = 0; i < x.d; ++i) dot += double{x.q[i]} * x.k[t * x.d + i];
    part.Add(static_cast<float>(dot * scale), &x.v[t * x.d]);
  }
  std::vector<float> store;
  store.reserve(x.n * 3 * x.d);  // never reallocates: views stay valid
  std::vector<PageSummaryView> pages;
  for (uint32_t b = exact; b < x.n; b += page) {
    SummaryBuilder sb(x.d);
    for (uint32_t t = b; t < std::min(x.n, b + page); ++t) sb.Add(&x.k[t * x.d], &x.v[t * x.d]);
    const size_t at = store.size();
    store.resize(at + 3 * x.d);
    sb.Finish(&store[at], &store[at + x.d], &store[at + 2 * x.d]);
    pages.push_back({sb.count(), &store[at], &store[at + x.d], &store[at + 2 * x.d]});
  }
  AddTail(mode, x.q.data(), x.d, scale, pages, &part);
  std::vector<float> out(x.d);
  part.Output(out.data());
  return std::vector<double>(out.begin(), out.end());
}

double MaxAbsDiff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

TEST(Tail, OneTokenPagesAreExactInEveryMode) {
  const Data x = Random(300, 64, 1);
  const float scale = 0.125f;
  const std::vector<double> ref = Reference(x.q, x.k, x.v, x.n, x.d, scale);
  for (TailMode mode : {TailMode::kMean, TailMode::kMeanVariance}) {
    EXPECT_LT(MaxAbsDiff(WithTail(x, 40, 1, mode, scale), ref), 1e-5) << TailModeName(mode);
  }
}

TEST(Tail, PagesOfEqualKeysAreExact) {
  // Every page's keys equal (values differ): count * exp(q.mean) is the page's exact mass and
  // the mean value its exact output; the variance is 0, so both modes agree with the reference.
  Data x = Random(256, 32, 2);
  for (uint32_t t = 0; t < x.n; ++t) {
    const uint32_t first = t / 16 * 16;
    for (uint32_t i = 0; i < x.d; ++i) x.k[t * x.d + i] = x.k[first * x.d + i];
  }
  const std::vector<double> ref = Reference(x.q, x.k, x.v, x.n, x.d, 0.2f);
  EXPECT_LT(MaxAbsDiff(WithTail(x, 32, 16, TailMode::kMean, 0.2f), ref), 1e-5);
  EXPECT_LT(MaxAbsDiff(WithTail(x, 32, 16, TailMode::kMeanVariance, 0.2f), ref), 1e-5);
}

TEST(Tail, NoneDropsTheTailAndEstimatesBeatDropping) {
  // Keys of a page are a shared centre plus small noise (clustered, as the index's pages are):
  // the estimate is close, dropping the tail is far.
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0f, 1.0f);
  Data x = Random(512, 64, 4);
  for (uint32_t t = 0; t < x.n; ++t) {
    const uint32_t first = t / 16 * 16;
    for (uint32_t i = 0; i < x.d; ++i) {
      x.k[t * x.d + i] = x.k[first * x.d + i] + 0.1f * g(rng);
    }
  }
  const float scale = 0.125f;
  const std::vector<double> ref = Reference(x.q, x.k, x.v, x.n, x.d, scale);
  const double dropped = MaxAbsDiff(WithTail(x, 64, 16, TailMode::kNone, scale), ref);
  const double mean = MaxAbsDiff(WithTail(x, 64, 16, TailMode::kMean, scale), ref);
  const double var = MaxAbsDiff(WithTail(x, 64, 16, TailMode::kMeanVariance, scale), ref);
  EXPECT_GT(dropped, 0.05);
  EXPECT_LT(mean, 0.25 * dropped) << dropped;
  EXPECT_LT(var, mean);  // Gaussian noise: the log-normal correction is the right one
}

TEST(Tail, LogitIsTheDocumentedFormulaWithTheVarianceCapped) {
  const float q[2] = {1.0f, -2.0f};
  const float mean[2] = {0.5f, 0.25f};
  const float var[2] = {0.1f, 0.2f};
  const float value[2] = {0, 0};
  PageSummaryView p{4, mean, var, value};
  // log 4 + 0.5 * (0.5 - 0.5) = log 4; variance term 0.5 * 0.25 * (0.1 + 0.8) = 0.1125.
  EXPECT_NEAR(TailLogit(TailMode::kMean, q, 2, 0.5f, p), std::log(4.0), 1e-6);
  EXPECT_NEAR(TailLogit(TailMode::kMeanVariance, q, 2, 0.5f, p), std::log(4.0) + 0.1125, 1e-6);
  const float wide[2] = {100.0f, 100.0f};
  p.key_var = wide;
  EXPECT_NEAR(TailLogit(TailMode::kMeanVariance, q, 2, 0.5f, p), std::log(4.0) + kTailVarianceCap,
              1e-6);
  p.key_var = nullptr;  // no variances stored: the mean alone
  EXPECT_NEAR(TailLogit(TailMode::kMeanVariance, q, 2, 0.5f, p), std::log(4.0), 1e-6);
}

TEST(Tail, PartialsMergeInAnyOrder) {
  const Data x = Random(100, 8, 5);
  SoftmaxPartial all(8), a(8), b(8);
  for (uint32_t t = 0; t < x.n; ++t) {
    const float s = 0.3f * static_cast<float>(t % 17) - 2.0f;
    all.Add(s, &x.v[t * 8]);
    (t < 37 ? a : b).Add(s, &x.v[t * 8]);
  }
  SoftmaxPartial ab = a, ba = b;
  ab.Merge(b);
  ba.Merge(a);
  std::vector<float> o1(8), o2(8), o3(8);
  all.Output(o1.data());
  ab.Output(o2.data());
  ba.Output(o3.data());
  for (int i = 0; i < 8; ++i) {
    EXPECT_NEAR(o1[i], o2[i], 1e-6);
    EXPECT_NEAR(o1[i], o3[i], 1e-6);
  }
  SoftmaxPartial empty(8);
  empty.Output(o1.data());
  EXPECT_EQ(o1, std::vector<float>(8, 0.0f));
}

TEST(Tail, ParseNamesEveryModeAndRejectsOthers) {
  EXPECT_EQ(*ParseTailMode("none"), TailMode::kNone);
  EXPECT_EQ(*ParseTailMode("mean"), TailMode::kMean);
  EXPECT_EQ(*ParseTailMode("mean-var"), TailMode::kMeanVariance);
  for (TailMode m : {TailMode::kNone, TailMode::kMean, TailMode::kMeanVariance}) {
    EXPECT_EQ(*ParseTailMode(std::string(TailModeName(m))), m);
  }
  const absl::StatusOr<TailMode> bad = ParseTailMode("median");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("median"), std::string::npos);
}

}  // namespace
}  // namespace icecache::selection
