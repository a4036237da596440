#include "server/index/exact_oracle.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "eval/in_memory_pages.h"
#include "eval/synthetic.h"
#include "server/index/dci_tree.h"
#include "tests/support/status_matchers.h"

namespace icecache::index {
namespace {

using ::icecache::testing::StatusIs;

// MassShares against a float64 softmax over every key, on a DCI layout (semantic pages, so
// pages hold scattered positions).
TEST(ExactOracle, MassSharesMatchFloat64) {
  eval::SyntheticOptions o;
  o.num_tokens = 700;
  o.head_dim = 64;
  o.num_kv_heads = 1;
  o.group_size = 3;
  o.num_queries = 2;
  const eval::Trace t = eval::GenerateSynthetic(o);
  const IndexGeometry g{64, t.kv_type, 16};
  eval::InMemoryPages pages(g, false);
  DciTree tree(g, DciOptions{}, &pages);
  std::vector<uint32_t> positions(o.num_tokens);
  std::iota(positions.begin(), positions.end(), 0u);
  eval::InMemoryPages::Writer w(&pages, t.Keys(0, 0), nullptr);
  ASSERT_TRUE(tree.Build({t.Keys(0, 0), positions.data()}, &w).ok());
  const ExactOracle oracle(&tree, &pages, ExactOracle::Rank::kSoftmaxMass);
  const std::vector<PageInfo> layout = tree.Layout();
  ASSERT_GT(layout.size(), 10u);
  // Picked: every third page, plus an id no page has (carries nothing).
  std::vector<uint32_t> picked;
  for (size_t i = 0; i < layout.size(); i += 3) picked.push_back(layout[i].page);
  picked.push_back(tree.page_id_limit() + 7);
  std::vector<float> q(3 * 64);
  for (uint32_t h = 0; h < 3; ++h) std::copy_n(t.Query(0, h, 1), 64, q.begin() + h * 64);
  std::vector<double> shares;
  ASSERT_TRUE(oracle.MassShares(q.data(), 3, picked, &shares).ok());
  ASSERT_EQ(shares.size(), 3u);
  const RowView keys = t.Keys(0, 0);
  for (uint32_t h = 0; h < 3; ++h) {
    std::vector<double> logit(o.num_tokens);
    double mx = -1e300;
    for (uint32_t i = 0; i < o.num_tokens; ++i) {
      double dot = 0;
      for (uint32_t c = 0; c < 64; ++c) {
        const double k = t.kv_type == ElemType::kBF16
                             ? Bf16ToFloat(static_cast<const uint16_t*>(keys.row(i))[c])
                             : HalfToFloat(static_cast<const uint16_t*>(keys.row(i))[c]);
        dot += double(q[h * 64 + c]) * k;
      }
      logit[i] = dot / 8.0;
      mx = std::max(mx, logit[i]);
    }
    double total = 0, on = 0;
    for (size_t i = 0; i < layout.size(); ++i) {
      const bool is_picked = i % 3 == 0;
      for (uint32_t pos : layout[i].positions) {
        const double m = std::exp(logit[pos] - mx);
        total += m;
        if (is_picked) on += m;
      }
    }
    EXPECT_NEAR(shares[h], on / total, 1e-5) << "query " << h;
    EXPECT_GT(shares[h], 0.0);
    EXPECT_LT(shares[h], 1.0);
  }
  // Every page picked: everything.
  std::vector<uint32_t> all;
  for (const PageInfo& p : layout) all.push_back(p.page);
  ASSERT_TRUE(oracle.MassShares(q.data(), 3, all, &shares).ok());
  for (double s : shares) EXPECT_NEAR(s, 1.0, 1e-12);
  // Nothing picked: nothing.
  ASSERT_TRUE(oracle.MassShares(q.data(), 3, {}, &shares).ok());
  for (double s : shares) EXPECT_EQ(s, 0.0);
}

TEST(ExactOracle, MassSharesBadInput) {
  const IndexGeometry g{64, ElemType::kBF16, 16};
  eval::InMemoryPages pages(g, false);
  DciTree tree(g, DciOptions{}, &pages);
  const ExactOracle oracle(&tree, &pages, ExactOracle::Rank::kSoftmaxMass);
  std::vector<float> q(64, 0.5f);
  std::vector<double> shares;
  EXPECT_THAT(oracle.MassShares(q.data(), 1, {}, &shares),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  q[3] = std::nanf("");
  EXPECT_THAT(oracle.MassShares(q.data(), 1, {}, &shares),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(oracle.MassShares(q.data(), 0, {}, &shares),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace icecache::index
