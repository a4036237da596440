// The online selection policy shared by the trace evaluation and the model's attention
// backends: what is attended before and after the index exists, how the window slides, and
// bad calls.
#include "eval/head_selector.h"

#include <algorithm>
#include <numeric>

#include "eval/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache::eval {
namespace {

using ::icecache::testing::StatusIs;

class HeadSelectorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SyntheticOptions o;
    o.num_tokens = 600;
    o.head_dim = 64;
    o.num_kv_heads = 1;
    o.group_size = 2;
    o.num_queries = 4;
    trace_ = GenerateSynthetic(o);
  }
  std::vector<float> Group() {
    std::vector<float> q(2 * 64);
    std::copy(trace_.Query(0, 0, 0), trace_.Query(0, 0, 0) + 64, q.begin());
    std::copy(trace_.Query(0, 1, 0), trace_.Query(0, 1, 0) + 64, q.begin() + 64);
    return q;
  }
  Trace trace_;
  const IndexGeometry geometry_{64, ElemType::kF16, 16};
};

TEST_F(HeadSelectorTest, EverythingWhileTheIndexIsSmallThenSinkWindowAndPages) {
  const std::vector<float> q = Group();
  for (const MethodSpec& spec : DefaultMethods()) {
    HeadSelector sel(spec, selection::PaperSplit(256), geometry_);
    const RowView keys = trace_.Keys(0, 0);
    // A prompt of 78 positions: sink [0, 32), 15 positions indexed (one page), the window
    // keeps 31; position 78 completes the window, whose first page is handed over. With one
    // page in the index every method attends to everything.
    auto early = sel.Select(keys, 78, q.data(), 2, 12);
    ASSERT_TRUE(early.ok()) << early.status();
    std::vector<uint32_t> all(79);
    std::iota(all.begin(), all.end(), 0u);
    EXPECT_EQ(*early, all) << spec.name;
    EXPECT_EQ(sel.indexed_end(), 47u);

    for (uint32_t p = 79; p < 400; p += 7) {
      auto got = sel.Select(keys, p, q.data(), 2, 4);
      ASSERT_TRUE(got.ok()) << got.status();
      const std::vector<uint32_t>& t = *got;
      ASSERT_TRUE(std::is_sorted(t.begin(), t.end()));
      ASSERT_EQ(std::adjacent_find(t.begin(), t.end()), t.end()) << "duplicates";
      ASSERT_LE(t.back(), p);
      const uint32_t end = sel.indexed_end();
      // The window holds (window - page_size, window] positions.
      EXPECT_GT(p + 1 - end, 16u) << spec.name << " p " << p;
      EXPECT_LE(p + 1 - end, 32u) << spec.name << " p " << p;
      for (uint32_t s = 0; s < 32; ++s) ASSERT_TRUE(std::binary_search(t.begin(), t.end(), s));
      for (uint32_t w = end; w <= p; ++w) ASSERT_TRUE(std::binary_search(t.begin(), t.end(), w));
      const size_t extra = t.size() - 32 - (p + 1 - end);
      if (spec.kind == MethodKind::kStreaming) {
        // The same budget as the others, all of it on the most recent positions.
        const uint32_t more = std::min<uint32_t>(4u * 16, end - 32);
        EXPECT_EQ(extra, more) << "p " << p;
        for (uint32_t w = end - more; w < end; ++w) {
          ASSERT_TRUE(std::binary_search(t.begin(), t.end(), w)) << "p " << p << " w " << w;
        }
      } else if (spec.kind == MethodKind::kOracleTokens) {
        EXPECT_EQ(extra, std::min<size_t>(4u * 16, end - 32)) << "p " << p;
      } else {
        EXPECT_GT(extra, 0u) << spec.name;
        EXPECT_LE(extra, std::min<size_t>(4u * 16, end - 32)) << spec.name;
      }
    }
  }
}

TEST_F(HeadSelectorTest, BadCalls) {
  const std::vector<float> q = Group();
  HeadSelector sel(DefaultMethods()[0], selection::PaperSplit(256), geometry_);
  RowView keys = trace_.Keys(0, 0);
  keys.rows = 100;
  EXPECT_THAT(sel.Select(keys, 100, q.data(), 2, 4).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_TRUE(sel.Select(keys, 99, q.data(), 2, 4).ok());
  EXPECT_THAT(sel.Select(keys, 50, q.data(), 2, 4).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

// The hybrid's split: a method's window replaces the split's and the pages' share shrinks to
// keep the budget; a window the budget cannot hold (with one page) is refused, naming it.
TEST(HeadSelectorWindow, WithWindowKeepsTheBudget) {
  MethodSpec m = Method("hybrid", MethodKind::kDci);
  const selection::BudgetSplit paper = selection::PaperSplit(256);
  absl::StatusOr<selection::BudgetSplit> same = WithWindow(m, paper);
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(*same, paper);
  m.window_tokens = 96;
  absl::StatusOr<selection::BudgetSplit> wide = WithWindow(m, paper);
  ASSERT_TRUE(wide.ok()) << wide.status();
  EXPECT_EQ(wide->window_tokens, 96u);
  EXPECT_EQ(wide->sink_tokens, paper.sink_tokens);
  EXPECT_EQ(wide->budget_tokens, 256u);
  EXPECT_EQ(wide->selected_pages(), 8u);  // (256 - 32 - 96) / 16
  EXPECT_THAT(WithWindow(m, selection::PaperSplit(128)).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::HasSubstr("window of 96 tokens in a budget of 128")));
  m.window_tokens = 40;  // not a multiple of the page size
  EXPECT_THAT(WithWindow(m, paper).status(), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace icecache::eval

namespace icecache::eval {
namespace {

// Every DCI option together, a GQA group of 3 (SmolLM2's), head_dim 64: build, many inserts
// and selects, as the model's decode does.
TEST(HeadSelectorOptions, AllOptionsWithAGroupOfThree) {
  SyntheticOptions o;
  o.num_tokens = 2600;
  o.head_dim = 64;
  o.num_kv_heads = 1;
  o.group_size = 3;
  o.num_queries = 64;
  const Trace t = GenerateSynthetic(o);
  MethodSpec all = Method("all", MethodKind::kDci);
  all.dci.scale_query_projection = true;
  all.dci.page_granular_scoring = true;
  all.dci.joint_group_search = true;
  all.dci.page_score = DciOptions::PageScore::kSoftmaxMass;
  all.dci.group_merge = DciOptions::GroupMerge::kSumOfMass;
  for (uint32_t budget : {64u, 128u, 256u, 512u}) {
    const selection::BudgetSplit split = selection::PaperSplit(budget);
    HeadSelector sel(all, split, IndexGeometry{64, ElemType::kF16, 16});
    std::vector<float> q(3 * 64);
    for (uint32_t qi = 0; qi < 64; ++qi) {
      for (uint32_t g = 0; g < 3; ++g) {
        std::copy(t.Query(0, g, qi), t.Query(0, g, qi) + 64, q.begin() + g * 64);
      }
      const uint32_t p = t.query_positions[qi];
      auto got = sel.Select(t.Keys(0, 0), p, q.data(), 3, split.selected_pages());
      ASSERT_TRUE(got.ok()) << got.status();
      ASSERT_LE(got->back(), p);
      ASSERT_GE(got->size(), split.sink_tokens + split.window_tokens - 16u);
    }
  }
}

}  // namespace
}  // namespace icecache::eval
