#include "server/core/memory_accountant.h"

#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

TEST(MemoryAccountant, ReservesUpToTheLimitExactly) {
  MemoryAccountant acc(1000);
  EXPECT_OK(acc.Reserve(600, "sequence"));
  EXPECT_OK(acc.Reserve(400, "sequence"));
  EXPECT_EQ(acc.used(), 1000u);
  EXPECT_EQ(acc.rejections(), 0u);
}

TEST(MemoryAccountant, RefusalChangesNothing) {
  MemoryAccountant acc(1000);
  ASSERT_OK(acc.Reserve(600, "sequence"));
  EXPECT_THAT(acc.Reserve(401, "sequence"),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("sequence needs 401 B (401 bytes) but only 400 B")));
  EXPECT_EQ(acc.used(), 600u);
  EXPECT_EQ(acc.rejections(), 1u);
  // A request near 2^64 must not wrap around.
  EXPECT_THAT(acc.Reserve(~uint64_t{0}, "sequence"),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(acc.used(), 600u);
  EXPECT_EQ(acc.rejections(), 2u);
}

TEST(MemoryAccountant, ReleaseReturnsBytes) {
  MemoryAccountant acc(1000);
  ASSERT_OK(acc.Reserve(1000, "sequence"));
  acc.Release(250);
  EXPECT_EQ(acc.used(), 750u);
  EXPECT_OK(acc.Reserve(250, "sequence"));
}

TEST(MemoryAccountantDeathTest, ReleasingMoreThanReservedAborts) {
  MemoryAccountant acc(1000);
  ASSERT_OK(acc.Reserve(10, "sequence"));
  EXPECT_DEATH(acc.Release(11), "releasing 11 bytes with 10 reserved");
}

TEST(MemoryAccountant, ConcurrentReservationsNeverExceedTheLimit) {
  MemoryAccountant acc(10'000);
  std::atomic<int> granted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1000; ++i) {
        if (acc.Reserve(7, "sequence").ok()) granted.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(granted.load(), 10'000 / 7);
  EXPECT_EQ(acc.used(), uint64_t(10'000 / 7) * 7);
  EXPECT_EQ(acc.rejections(), 8000u - 10'000 / 7);
}

// ------------------------------------------------------------------ ClientBudget

TEST(ClientBudget, ChargesPromisesAndHoldsAsOneAmount) {
  MemoryAccountant global(1000);
  {
    ClientBudget b(&global, 0);
    ASSERT_OK(b.ChargeSegment(100, /*fixed=*/true));  // the control segment
    ASSERT_OK(b.Promise(500, 50, "sequence"));
    EXPECT_EQ(global.used(), 650u);
    // Segments within the promise: nothing more.
    ASSERT_OK(b.ChargeSegment(300, false));
    ASSERT_OK(b.ChargeSegment(200, false));
    EXPECT_EQ(global.used(), 650u);
    EXPECT_EQ(b.headroom(), 0u);
    // Beyond it: charged, and refused when the limit is full (nothing changes).
    ASSERT_OK(b.ChargeSegment(300, false));
    EXPECT_EQ(global.used(), 950u);
    EXPECT_THAT(b.ChargeSegment(100, false),
                StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("arena segment")));
    EXPECT_EQ(global.used(), 950u);
    EXPECT_TRUE(b.over_promise());
    // A promise on top reuses what is held beyond the old one.
    ASSERT_OK(b.Promise(300, 0, "sequence"));
    EXPECT_EQ(global.used(), 950u);
    EXPECT_FALSE(b.over_promise());
    b.Unpromise(800, 50);
    EXPECT_EQ(global.used(), 900u);  // what the arena holds stays charged
    b.ReleaseSegment(800, false);
    EXPECT_EQ(global.used(), 100u);
  }
  EXPECT_EQ(global.used(), 0u);
}

TEST(ClientBudget, QuotaBoundsPromisesAndSegments) {
  MemoryAccountant global(1 << 20);
  ClientBudget b(&global, 1000);
  ASSERT_OK(b.ChargeSegment(200, true));
  EXPECT_THAT(b.Promise(801, 0, "sequence"),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("quota")));
  ASSERT_OK(b.Promise(800, 0, "sequence"));
  ASSERT_OK(b.ChargeSegment(800, false));
  EXPECT_THAT(b.ChargeSegment(1, false),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("quota")));
  EXPECT_EQ(global.used(), 1000u);
}

// The staging share of promises and segments is kept apart from the page frames': each use's
// headroom is its own promise less its own segments, while the global charge stays one amount.
TEST(ClientBudget, StagingAndPageFramesHaveTheirOwnShares) {
  MemoryAccountant global(10'000);
  ClientBudget b(&global, 0);
  ASSERT_OK(b.Promise(1000, 0, "sequence", 300));  // 700 for page frames, 300 for staging
  EXPECT_EQ(b.promised(ArenaUse::kPages), 700u);
  EXPECT_EQ(b.promised(ArenaUse::kStaging), 300u);
  EXPECT_EQ(b.headroom(ArenaUse::kStaging), 300u);
  // Staging beyond its share eats nothing of the page frames' headroom...
  ASSERT_OK(b.ChargeSegment(500, false, ArenaUse::kStaging));
  EXPECT_EQ(b.headroom(ArenaUse::kStaging), 0u);
  EXPECT_EQ(b.headroom(ArenaUse::kPages), 700u);
  EXPECT_EQ(b.headroom(), 500u);  // ...though the whole has only 500 left
  ASSERT_OK(b.ChargeSegment(700, false, ArenaUse::kPages));
  EXPECT_EQ(b.headroom(ArenaUse::kPages), 0u);
  EXPECT_EQ(b.held(ArenaUse::kPages), 700u);
  EXPECT_EQ(b.held(ArenaUse::kStaging), 500u);
  EXPECT_EQ(b.arena_held(), 1200u);
  EXPECT_TRUE(b.over_promise());
  EXPECT_EQ(global.used(), 1200u);
  // A staging share larger than the promise it is part of changes nothing.
  EXPECT_THAT(b.Promise(10, 0, "sequence", 11),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("staging share")));
  EXPECT_EQ(b.arena_promised(), 1000u);
  EXPECT_EQ(global.used(), 1200u);
  // Shares go back as they came.
  b.Unpromise(400, 0, 200);
  EXPECT_EQ(b.promised(ArenaUse::kPages), 500u);
  EXPECT_EQ(b.promised(ArenaUse::kStaging), 100u);
  b.ReleaseSegment(500, false, ArenaUse::kStaging);
  EXPECT_EQ(b.held(ArenaUse::kStaging), 0u);
  EXPECT_EQ(b.headroom(ArenaUse::kStaging), 100u);
  EXPECT_EQ(global.used(), 700u);
}

TEST(ClientBudgetDeathTest, ReleasingStagingAsPagesAborts) {
  MemoryAccountant global(10'000);
  ClientBudget b(&global, 0);
  ASSERT_OK(b.ChargeSegment(500, false, ArenaUse::kStaging));
  EXPECT_DEATH(b.ReleaseSegment(500, false, ArenaUse::kPages), "not charged");
}

}  // namespace
}  // namespace icecache
