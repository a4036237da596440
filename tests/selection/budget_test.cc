#include "selection/budget.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/support/status_matchers.h"

namespace icecache::selection {
namespace {

using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

TEST(BudgetSplit, DefaultsAreThePapersSplit) {
  const BudgetSplit s;
  EXPECT_EQ(s.budget_tokens, 256u);
  EXPECT_EQ(s.sink_tokens, 32u);
  EXPECT_EQ(s.window_tokens, 32u);
  EXPECT_EQ(s.page_size, 16u);
  EXPECT_EQ(s.selected_pages(), 12u);  // 2 sink + 12 selected + 2 window pages
  EXPECT_TRUE(ValidateSplit(s).ok());
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

}  // namespace
}  // namespace icecache::selection
