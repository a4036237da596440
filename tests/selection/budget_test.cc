#include "selection/budget.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "tests/support/status_matchers.h"

namespace icecache::selection {
namespace {

using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

TEST(BudgetSplit, DefaultsArePagesOfFourWithASinkOfEightAndAWindowOfSixteen) {
  const BudgetSplit s;
  EXPECT_EQ(s.budget_tokens, 256u);
  EXPECT_EQ(s.sink_tokens, 8u);
  EXPECT_EQ(s.window_tokens, 16u);
  EXPECT_EQ(s.page_size, 4u);
  EXPECT_EQ(s.selected_pages(), 58u);  // 2 sink + 58 selected + 4 window pages of 4
  EXPECT_TRUE(ValidateSplit(s).ok());
  EXPECT_EQ(DefaultSplit(256), s);
  // The unset sink and window of other page sizes: 2 pages each, the window at least 16.
  EXPECT_EQ(BudgetDefaults::SinkFor(4), 8u);
  EXPECT_EQ(BudgetDefaults::WindowFor(4), 16u);
  EXPECT_EQ(BudgetDefaults::SinkFor(8), 16u);
  EXPECT_EQ(BudgetDefaults::WindowFor(8), 16u);
  EXPECT_EQ(BudgetDefaults::SinkFor(32), 64u);
  EXPECT_EQ(BudgetDefaults::WindowFor(32), 64u);
}

TEST(BudgetSplit, DefaultSplitAcrossBudgets) {
  EXPECT_EQ(DefaultSplit(64), (BudgetSplit{64, 8, 16, 4}));
  EXPECT_EQ(DefaultSplit(64).selected_pages(), 10u);
  EXPECT_EQ(DefaultSplit(128), (BudgetSplit{128, 8, 16, 4}));
  EXPECT_EQ(DefaultSplit(128).selected_pages(), 26u);
  EXPECT_EQ(DefaultSplit(512).selected_pages(), 122u);
  for (uint32_t b : {28u, 64u, 128u, 256u, 512u, 2048u})
    EXPECT_TRUE(ValidateSplit(DefaultSplit(b)).ok());
  // Below sink + window + one page the default split holds no page and is refused.
  EXPECT_THAT(ValidateSplit(DefaultSplit(24)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("at least sink_tokens + window_tokens + page_size (28)")));
}

TEST(BudgetSplit, PaperSplitAcrossBudgets) {
  EXPECT_EQ(PaperSplit(64), (BudgetSplit{64, 16, 16, 16}));
  EXPECT_EQ(PaperSplit(64).selected_pages(), 2u);
  EXPECT_EQ(PaperSplit(128), (BudgetSplit{128, 32, 32, 16}));
  EXPECT_EQ(PaperSplit(128).selected_pages(), 4u);
  EXPECT_EQ(PaperSplit(512).selected_pages(), 28u);
  EXPECT_EQ(PaperSplit(256, 8), (BudgetSplit{256, 16, 16, 8}));
  EXPECT_EQ(PaperSplit(256, 8).selected_pages(), 28u);
  // Pages of 32 tokens round the pages' share down.
  EXPECT_EQ(PaperSplit(256, 32).selected_pages(), 4u);
}

TEST(BudgetSplit, ValidateNamesTheField) {
  EXPECT_THAT(ValidateSplit({256, 20, 32, 16}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "geometry.sink_tokens must be a multiple of page_size (16), got 20"));
  EXPECT_THAT(ValidateSplit({256, 32, 0, 16}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("geometry.window_tokens must be a positive multiple")));
  EXPECT_THAT(ValidateSplit({250, 32, 32, 16}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("geometry.budget_tokens must be a multiple of page_size (16)")));
  EXPECT_THAT(ValidateSplit({kMaxBudgetTokens + 16, 32, 32, 16}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("at most 65536")));
  EXPECT_THAT(ValidateSplit({64, 32, 32, 16}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("at least sink_tokens + window_tokens + page_size (80)")));
  EXPECT_THAT(ValidateSplit({256, 32, 32, 0}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("geometry.page_size")));
  // No overflow with huge sink and window.
  EXPECT_THAT(ValidateSplit({256, 0xfffffff0u, 0xfffffff0u, 16}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("at least")));
  // The smallest valid split selects one page.
  ASSERT_TRUE(ValidateSplit({48, 16, 16, 16}).ok());
  EXPECT_EQ((BudgetSplit{48, 16, 16, 16}).selected_pages(), 1u);
  EXPECT_TRUE(ValidateSplit({48, 0, 16, 16}).ok());
}

using ::testing::ElementsAre;

TEST(SplitPagesAcrossHeads, ProportionalWithLargestRemainders) {
  // 36 pages, 3 heads, weights 1:2:3 above a floor of 3 each: 27 shared 4.5 / 9 / 13.5 ->
  // 4 / 9 / 13 and the one left to the largest remainder (head 0 and 2 tie at 0.5: head 0).
  EXPECT_THAT(*SplitPagesAcrossHeads(36, {1, 2, 3}, 3, 24), ElementsAre(8, 12, 16));
  // Equal weights give the fixed split.
  EXPECT_THAT(*SplitPagesAcrossHeads(36, {0.4, 0.4, 0.4}, 3, 24), ElementsAre(12, 12, 12));
  // All zero: even, the remainder to the lowest heads.
  EXPECT_THAT(*SplitPagesAcrossHeads(10, {0, 0, 0}, 1, 10), ElementsAre(4, 3, 3));
  // One head holds all the weight: it is capped and the rest goes evenly to the others.
  EXPECT_THAT(*SplitPagesAcrossHeads(36, {0, 1, 0}, 3, 24), ElementsAre(6, 24, 6));
  // The cap passes the excess on in proportion: 30 shared 1:1:8 -> head 2 capped at 20, the
  // remaining 10 split 1:1 over the floors.
  EXPECT_THAT(*SplitPagesAcrossHeads(36, {1, 1, 8}, 2, 20), ElementsAre(8, 8, 20));
  // Exact at the bounds.
  EXPECT_THAT(*SplitPagesAcrossHeads(6, {5, 1}, 3, 3), ElementsAre(3, 3));
  EXPECT_THAT(*SplitPagesAcrossHeads(0, {1, 2}, 0, 5), ElementsAre(0, 0));
}

TEST(SplitPagesAcrossHeads, SumsToTheTotalOnRandomWeights) {
  uint32_t state = 12345;
  auto next = [&] {
    state = state * 1664525u + 1013904223u;
    return state >> 8;
  };
  for (int trial = 0; trial < 2000; ++trial) {
    const uint32_t heads = 1 + next() % 8, lo = next() % 4, hi = lo + next() % 30;
    const uint32_t total = heads * lo + next() % (heads * (hi - lo) + 1);
    std::vector<double> w(heads);
    for (double& x : w) x = (next() % 4 == 0) ? 0.0 : (next() % 1000) / 997.0;
    absl::StatusOr<std::vector<uint32_t>> s = SplitPagesAcrossHeads(total, w, lo, hi);
    ASSERT_TRUE(s.ok()) << s.status();
    uint64_t sum = 0;
    for (uint32_t p : *s) {
      EXPECT_GE(p, lo);
      EXPECT_LE(p, hi);
      sum += p;
    }
    EXPECT_EQ(sum, total) << "trial " << trial;
  }
}

TEST(SplitPagesAcrossHeads, RefusesBadInput) {
  EXPECT_THAT(SplitPagesAcrossHeads(12, {}, 1, 12),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no heads")));
  EXPECT_THAT(SplitPagesAcrossHeads(12, {1, -0.5}, 1, 12),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("weight of head 1 must be finite and >= 0")));
  EXPECT_THAT(SplitPagesAcrossHeads(12, {1, std::nan("")}, 1, 12),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("weight of head 1")));
  EXPECT_THAT(SplitPagesAcrossHeads(12, {1, 1}, 5, 4),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("min_pages (5) exceeds max_pages (4)")));
  EXPECT_THAT(SplitPagesAcrossHeads(7, {1, 1}, 4, 8),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("7 pages for 2 heads of 4 to 8 pages each")));
  EXPECT_THAT(SplitPagesAcrossHeads(17, {1, 1}, 4, 8),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("17 pages for 2 heads")));
}

}  // namespace
}  // namespace icecache::selection
