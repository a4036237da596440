#include "common/log_throttle.h"

#include <optional>

#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace icecache {
namespace {

// The first event gets its line; the next line is due a period after it and reports every
// event since (the one that makes it due included); events in between get none.
TEST(LogThrottleTest, OneLinePerPeriodReportsEveryEventSinceTheLast) {
  LogThrottle t(absl::Seconds(10));
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  EXPECT_EQ(t.Note(t0), std::optional<uint64_t>(1));
  EXPECT_EQ(t.Note(t0 + absl::Seconds(1)), std::nullopt);
  EXPECT_EQ(t.Note(t0 + absl::Seconds(2), 5), std::nullopt);
  EXPECT_EQ(t.Note(t0 + absl::Seconds(9.999)), std::nullopt);
  EXPECT_EQ(t.Note(t0 + absl::Seconds(10)), std::optional<uint64_t>(8));
  // A quiet period, then a line at once for the next event.
  EXPECT_EQ(t.Note(t0 + absl::Seconds(100)), std::optional<uint64_t>(1));
  // A due line with nothing counted reports 0 (the caller decides whether that is a line).
  EXPECT_EQ(t.Note(t0 + absl::Seconds(200), 0), std::optional<uint64_t>(0));
  EXPECT_EQ(t.Note(t0 + absl::Seconds(201), 3), std::nullopt);
  EXPECT_EQ(t.Note(t0 + absl::Seconds(210), 0), std::optional<uint64_t>(3));
}

}  // namespace
}  // namespace icecache
