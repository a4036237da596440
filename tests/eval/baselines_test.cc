#include "eval/baselines.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>

#include "eval/in_memory_pages.h"
#include "eval/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/index/dci_tree.h"
#include "server/index/simd.h"
#include "tests/support/status_matchers.h"

namespace icecache::eval {
namespace {

using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

class BaselinesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SyntheticOptions o;
    o.num_tokens = 1000;
    o.num_kv_heads = 1;
    o.num_queries = 4;
    trace_ = GenerateSynthetic(o);
    positions_.resize(1000);
    std::iota(positions_.begin(), positions_.end(), 0u);
    geometry_ = {64, trace_.kv_type, 16};
  }
  RowView Rows(uint32_t begin, uint32_t count) const {
    RowView v = trace_.Keys(0, 0);
    v.data = v.row(begin);
    v.rows = count;
    return v;
  }
  float Score(const float* q, uint32_t pos) const {
    return Dot(q, Rows(pos, 1).data, geometry_.elem_type, geometry_.dim);
  }

  Trace trace_;
  std::vector<uint32_t> positions_;
  IndexGeometry geometry_;
};

TEST_F(BaselinesTest, PositionalLayoutIsConsecutiveRunsAndAppends) {
  InMemoryPages pages(geometry_, false);
  StreamingIndex idx(geometry_, &pages);
  InMemoryPages::Writer w(&pages, Rows(0, 40), nullptr);
  ASSERT_OK(idx.Build({Rows(0, 40), positions_.data()}, &w));
  EXPECT_EQ(idx.num_pages(), 3u);  // 16 + 16 + 8
  InMemoryPages::Writer w2(&pages, Rows(40, 16), nullptr);
  ASSERT_OK(idx.Insert({Rows(40, 16), positions_.data() + 40}, &w2));
  const std::vector<PageInfo> layout = idx.Layout();
  ASSERT_EQ(layout.size(), 4u);  // the 8-slot page filled up, then a new page of 8
  EXPECT_THAT(layout[2].positions.size(), 16u);
  EXPECT_EQ(layout[2].positions.front(), 32u);
  EXPECT_EQ(layout[3].positions, (std::vector<uint32_t>{48, 49, 50, 51, 52, 53, 54, 55}));
  EXPECT_EQ(pages.valid(2), 16u);
  EXPECT_EQ(pages.valid(3), 8u);
}

TEST_F(BaselinesTest, StreamingSelectsNothingButValidates) {
  InMemoryPages pages(geometry_, false);
  StreamingIndex idx(geometry_, &pages);
  InMemoryPages::Writer w(&pages, Rows(0, 100), nullptr);
  ASSERT_OK(idx.Build({Rows(0, 100), positions_.data()}, &w));
  std::vector<SelectedPage> out(3);
  ASSERT_OK(idx.Search(trace_.Query(0, 0, 0), 1, 4, &out));
  EXPECT_TRUE(out.empty());
  EXPECT_THAT(idx.Search(trace_.Query(0, 0, 0), 1, 100, &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

// The Quest score is an upper bound of every key's score in the page, and the page holding
// the single best key is among the top pages when that key dominates.
TEST_F(BaselinesTest, QuestBoundsEveryKeyOfItsPage) {
  InMemoryPages pages(geometry_, false);
  QuestIndex idx(geometry_, &pages);
  InMemoryPages::Writer w(&pages, Rows(0, 1000), nullptr);
  ASSERT_OK(idx.Build({Rows(0, 1000), positions_.data()}, &w));
  const float* q = trace_.Query(0, 0, 0);
  const uint32_t n = idx.num_pages();
  std::vector<SelectedPage> all;
  ASSERT_OK(idx.Search(q, 1, n, &all));
  ASSERT_EQ(all.size(), n);
  for (const SelectedPage& p : all) {
    for (uint32_t s = 0; s < p.valid; ++s) {
      EXPECT_LE(Score(q, p.page * 16 + s), p.score + 1e-3f) << "page " << p.page;
    }
  }
  std::vector<float> strong(64);
  ToFloat(Rows(777, 1).data, geometry_.elem_type, 64, strong.data());
  for (float& x : strong) x *= 50;
  std::vector<SelectedPage> top;
  ASSERT_OK(idx.Search(strong.data(), 1, 3, &top));
  bool found = false;
  for (const SelectedPage& p : top) found |= p.page == 777 / 16;
  EXPECT_TRUE(found);
}

TEST_F(BaselinesTest, ExactScanRanksPagesByTheirBestKey) {
  InMemoryPages pages(geometry_, false);
  DciTree tree(geometry_, DciOptions{}, &pages);
  InMemoryPages::Writer w(&pages, Rows(0, 1000), nullptr);
  ASSERT_OK(tree.Build({Rows(0, 1000), positions_.data()}, &w));
  ExactOracle scan(&tree, &pages, ExactOracle::Rank::kBestToken);
  const float* q = trace_.Query(0, 1, 2);
  std::vector<SelectedPage> got;
  ASSERT_OK(scan.Search(q, 1, 5, &got));
  // Brute force over the layout.
  std::vector<std::pair<float, uint32_t>> best;
  for (const PageInfo& p : tree.Layout()) {
    float b = -1e30f;
    for (uint32_t pos : p.positions) b = std::max(b, Score(q, pos));
    best.push_back({b, p.page});
  }
  std::sort(best.begin(), best.end(), [](auto a, auto b) { return a.first > b.first; });
  ASSERT_EQ(got.size(), 5u);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(got[i].page, best[i].second);
    EXPECT_NEAR(got[i].score, best[i].first, 1e-3f);
  }
  EXPECT_THAT(scan.Build({Rows(0, 1), positions_.data()}, &w),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST_F(BaselinesTest, OracleTopTokensAreTheHighestMassTokens) {
  InMemoryPages pages(geometry_, false);
  StreamingIndex layout(geometry_, &pages);
  InMemoryPages::Writer w(&pages, Rows(0, 1000), nullptr);
  ASSERT_OK(layout.Build({Rows(0, 1000), positions_.data()}, &w));
  ExactOracle oracle(&layout, &pages, ExactOracle::Rank::kSoftmaxMass);
  const float* q = trace_.Query(0, 2, 1);
  std::vector<uint32_t> top;
  ASSERT_OK(oracle.TopTokens(q, 1, 20, &top));
  std::vector<std::pair<float, uint32_t>> all;
  for (uint32_t t = 0; t < 1000; ++t) all.push_back({Score(q, t), t});
  std::sort(all.begin(), all.end(), [](auto a, auto b) { return a.first > b.first; });
  std::set<uint32_t> expected, got(top.begin(), top.end());
  for (int i = 0; i < 20; ++i) expected.insert(all[i].second);
  EXPECT_EQ(got, expected);
  // Mass ranking of pages: the first page holds the best token.
  std::vector<SelectedPage> pages_out;
  ASSERT_OK(oracle.Search(q, 1, 1, &pages_out));
  EXPECT_GT(pages_out[0].score, 0.f);
  EXPECT_LE(pages_out[0].score, 1.0f + 1e-6f);
}

}  // namespace
}  // namespace icecache::eval
