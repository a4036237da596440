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

}  // namespace
}  // namespace icecache
