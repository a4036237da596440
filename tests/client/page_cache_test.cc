#include "client/page_cache.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/support/status_matchers.h"

namespace icecache::client_internal {
namespace {

using ::icecache::testing::StatusIs;

abi::SelectedPageRef Ref(uint32_t segment, uint32_t frame, uint32_t version = 1) {
  return abi::SelectedPageRef{segment, frame, 16, version};
}

TEST(PageCache, HitsMissesAndVersions) {
  PageCache cache(2, 3);
  auto a = cache.Place(0, Ref(1, 10), 1);
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(a->fetch);
  // The same page at the same version: a hit in the same slot.
  auto again = cache.Place(0, Ref(1, 10), 2);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->fetch);
  EXPECT_EQ(again->slot, a->slot);
  // A new version of a resident page: refetched in place.
  auto moved = cache.Place(0, Ref(1, 10, 2), 3);
  ASSERT_TRUE(moved.ok());
  EXPECT_TRUE(moved->fetch);
  EXPECT_EQ(moved->slot, a->slot);
  // Heads are independent: the same frame in head 1 is a miss.
  auto other = cache.Place(1, Ref(1, 10, 2), 3);
  ASSERT_TRUE(other.ok());
  EXPECT_TRUE(other->fetch);
  EXPECT_EQ(cache.resident(0), 1u);
  EXPECT_EQ(cache.resident(1), 1u);
}

TEST(PageCache, EvictsTheLeastRecentlyUsed) {
  PageCache cache(1, 3);
  ASSERT_TRUE(cache.Place(0, Ref(1, 1), 1).ok());
  ASSERT_TRUE(cache.Place(0, Ref(1, 2), 2).ok());
  ASSERT_TRUE(cache.Place(0, Ref(1, 3), 3).ok());
  ASSERT_FALSE(cache.Place(0, Ref(1, 1), 4)->fetch);  // frame 1 used again at step 4
  // Frame 2 (step 2) is the oldest: frame 4 takes its slot.
  const uint32_t slot2 = cache.Place(0, Ref(1, 2), 5)->slot;  // touch 2 at 5: now 3 is oldest
  auto four = cache.Place(0, Ref(1, 4), 6);
  ASSERT_TRUE(four.ok());
  EXPECT_TRUE(four->fetch);
  EXPECT_NE(four->slot, slot2);
  EXPECT_TRUE(cache.Place(0, Ref(1, 3), 7)->fetch) << "frame 3 was evicted";
  EXPECT_EQ(cache.resident(0), 3u);
}

TEST(PageCache, ASelectionLargerThanTheCacheIsAnError) {
  PageCache cache(1, 2);
  ASSERT_TRUE(cache.Place(0, Ref(1, 1), 1).ok());
  ASSERT_TRUE(cache.Place(0, Ref(1, 2), 1).ok());
  EXPECT_THAT(cache.Place(0, Ref(1, 3), 1).status(), StatusIs(absl::StatusCode::kInternal));
  // The refusal changed nothing: both pages are still hits.
  EXPECT_FALSE(cache.Place(0, Ref(1, 1), 2)->fetch);
  EXPECT_FALSE(cache.Place(0, Ref(1, 2), 2)->fetch);
}

TEST(PageCache, BadInput) {
  PageCache cache(2, 2);
  EXPECT_THAT(cache.Place(2, Ref(1, 1), 1).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(cache.Place(0, Ref(abi::kNoSegment, 1), 1).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  cache.Clear();
  EXPECT_EQ(cache.resident(0), 0u);
}

}  // namespace
}  // namespace icecache::client_internal
