// At most one log line per period for events a peer can cause at will (connections refused,
// dropped or shed): a local user reconnecting in a loop would otherwise write a line per
// connection, megabytes of log a second. Each Note counts events and says when a line is due
// and how many events it reports.
//
// Thread safety: all methods are thread-safe.
#pragma once

#include <cstdint>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace icecache {

class LogThrottle {
 public:
  explicit LogThrottle(absl::Duration period = absl::Seconds(10)) : period_(period) {}

  // Counts `events` at `now`. When a line is due (the first call, or `period` after the last
  // line) returns the events since the last line, these included (0 when there were none);
  // otherwise nullopt.
  std::optional<uint64_t> Note(absl::Time now, uint64_t events = 1) {
    absl::MutexLock lock(&mu_);
    unreported_ += events;
    if (now - last_line_ < period_) return std::nullopt;
    last_line_ = now;
    const uint64_t n = unreported_;
    unreported_ = 0;
    return n;
  }

 private:
  const absl::Duration period_;
  absl::Mutex mu_;
  absl::Time last_line_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  uint64_t unreported_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace icecache
