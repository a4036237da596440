#include "selection/window_policy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <vector>

#include "tests/support/status_matchers.h"

namespace icecache::selection {
namespace {

using ::icecache::testing::StatusIs;

// Appends one token; returns the handed-over page's first position or -1.
int64_t Step(WindowPolicy* w) {
  absl::StatusOr<std::optional<uint64_t>> got = w->Append();
  EXPECT_TRUE(got.ok()) << got.status();
  return got.ok() && got->has_value() ? static_cast<int64_t>(**got) : -1;
}

TEST(WindowPolicy, LongPromptKeepsWindowMinusOne) {
  WindowPolicy w(PaperSplit(256));  // sink 32, window 32, pages of 16
  absl::StatusOr<WindowPolicy::PromptPlan> plan = w.Prefill(1000);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->sink_tokens, 32u);
  EXPECT_EQ(plan->index_begin, 32u);
  EXPECT_EQ(plan->index_tokens, 1000u - 32 - 31);
  EXPECT_EQ(plan->window_begin, 969u);
  EXPECT_EQ(w.tokens(), 1000u);
  EXPECT_TRUE(w.index_started());
  EXPECT_EQ(w.indexed_tokens(), 937u);
  // The first decoded token completes the window: its oldest page is handed over, but stays
  // attended until retired.
  EXPECT_FALSE(w.NextInSink());
  EXPECT_EQ(Step(&w), 969);
  EXPECT_EQ(w.window_begin(), 969u);
  EXPECT_EQ(w.handed_end(), 985u);
  EXPECT_EQ(w.pending_pages(), 1u);
  ASSERT_TRUE(w.Retire().ok());
  EXPECT_EQ(w.window_begin(), 985u);
  EXPECT_EQ(w.pending_pages(), 0u);
  // From now on, one page every 16 tokens; the attended window stays in [17, 32].
  std::vector<int64_t> handed;
  for (int i = 0; i < 64; ++i) {
    const int64_t h = Step(&w);
    const uint64_t window = w.tokens() - w.window_begin();
    EXPECT_GE(window, 17u);
    EXPECT_LE(window, 32u);
    if (h >= 0) {
      handed.push_back(h);
      ASSERT_TRUE(w.Retire().ok());
    }
  }
  EXPECT_EQ(handed, (std::vector<int64_t>{985, 1001, 1017, 1033}));
}

TEST(WindowPolicy, ShortPromptFillsSinkThenWindowThenBuildsFromTheFirstPage) {
  WindowPolicy w(PaperSplit(256));
  absl::StatusOr<WindowPolicy::PromptPlan> plan = w.Prefill(10);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->sink_tokens, 10u);
  EXPECT_EQ(plan->index_tokens, 0u);
  EXPECT_EQ(plan->window_begin, 32u);
  EXPECT_FALSE(w.index_started());
  for (uint64_t p = 10; p < 32; ++p) {
    EXPECT_TRUE(w.NextInSink()) << p;
    EXPECT_EQ(Step(&w), -1);
  }
  int64_t first = -1;
  uint64_t at = 0;
  for (uint64_t p = 32; first < 0 && p < 200; ++p) {
    EXPECT_FALSE(w.NextInSink());
    EXPECT_EQ(w.RingRow(p), (p - 32) % w.ring_capacity());
    first = Step(&w);
    at = p;
  }
  EXPECT_EQ(first, 32);
  EXPECT_EQ(at, 63u);  // 32 window tokens past the sink
  EXPECT_TRUE(w.index_started());
}

TEST(WindowPolicy, RingNeverOverwritesAPendingPage) {
  WindowPolicy w(PaperSplit(256));  // ring of 48 rows: the window plus one pending page
  ASSERT_TRUE(w.Prefill(500).ok());
  EXPECT_EQ(w.ring_capacity(), 48u);
  EXPECT_EQ(Step(&w), 469);  // hand-over, not retired
  for (int i = 0; i < 16; ++i) {
    ASSERT_TRUE(w.CanAppend()) << i;
    EXPECT_EQ(Step(&w), -1) << "at most one page in hand-over";
  }
  EXPECT_FALSE(w.CanAppend());
  EXPECT_THAT(w.Append().status(), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(w.tokens(), 517u);  // the refused append changed nothing
  ASSERT_TRUE(w.Retire().ok());
  // The delayed hand-over comes with the next token.
  EXPECT_EQ(Step(&w), 485);
  // Rows of positions still attended are distinct.
  std::vector<uint64_t> rows;
  for (uint64_t p = w.window_begin(); p < w.tokens(); ++p) rows.push_back(w.RingRow(p));
  std::sort(rows.begin(), rows.end());
  EXPECT_EQ(std::adjacent_find(rows.begin(), rows.end()), rows.end());
}

TEST(WindowPolicy, TwoPendingPagesWithABiggerRing) {
  WindowPolicy w(PaperSplit(256), /*max_pending_pages=*/2);
  EXPECT_EQ(w.ring_capacity(), 64u);
  ASSERT_TRUE(w.Prefill(500).ok());
  EXPECT_EQ(Step(&w), 469);
  for (int i = 0; i < 15; ++i) EXPECT_EQ(Step(&w), -1);
  EXPECT_EQ(Step(&w), 485);
  EXPECT_EQ(w.pending_pages(), 2u);
  ASSERT_TRUE(w.Retire().ok());
  ASSERT_TRUE(w.Retire().ok());
  EXPECT_EQ(w.window_begin(), 501u);
}

// A failed decode step takes its Append back: the same token appended again hands the same
// page over; an older page retired meanwhile stays retired.
TEST(WindowPolicy, RewindTakesAnAppendBackWithItsHandOver) {
  WindowPolicy w(PaperSplit(256), /*max_pending_pages=*/2);  // sink 32, window 32, pages of 16
  ASSERT_TRUE(w.Prefill(500).ok());
  EXPECT_EQ(Step(&w), 469);  // pending: [469, 485)
  for (int i = 0; i < 15; ++i) EXPECT_EQ(Step(&w), -1);
  const WindowPolicy::Mark before = w.Snapshot();
  EXPECT_EQ(Step(&w), 485);      // pending: [469, 501)
  ASSERT_TRUE(w.Retire().ok());  // the older page [469, 485) leaves during the failed step
  ASSERT_TRUE(w.Rewind(before).ok());
  EXPECT_EQ(w.tokens(), 516u);
  EXPECT_EQ(w.handed_end(), 485u);
  EXPECT_EQ(w.window_begin(), 485u);
  EXPECT_EQ(w.pending_pages(), 0u);
  EXPECT_EQ(Step(&w), 485);  // the retry hands the same page over
  EXPECT_EQ(w.tokens(), 517u);
  // Not once the page handed over since the mark has left the window too; nor a mark ahead.
  const WindowPolicy::Mark ahead = w.Snapshot();
  ASSERT_TRUE(w.Retire().ok());
  EXPECT_THAT(w.Rewind(before), StatusIs(absl::StatusCode::kFailedPrecondition,
                                         ::testing::HasSubstr("left the window")));
  EXPECT_EQ(w.tokens(), 517u);
  EXPECT_OK(w.Rewind(ahead));  // nothing since: a no-op
  WindowPolicy fresh(PaperSplit(256));
  EXPECT_THAT(fresh.Rewind(ahead), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST(WindowPolicy, BadCalls) {
  WindowPolicy w(PaperSplit(256));
  EXPECT_THAT(w.Prefill(0).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(w.Retire(), StatusIs(absl::StatusCode::kFailedPrecondition));
  ASSERT_TRUE(w.Prefill(100).ok());
  EXPECT_THAT(w.Prefill(100).status(), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(w.tokens(), 100u);
}

}  // namespace
}  // namespace icecache::selection
