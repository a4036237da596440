// Token buckets by key (a uid, a TCP peer host): `rate` calls per second in bursts of up to
// `burst`. Used to bound how fast one caller can make the daemon work through the control API.
//
// Thread safety: all methods are thread-safe.
#pragma once

#include <chrono>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"

namespace icecache {

class RateLimiter {
 public:
  // rate <= 0: no limit.
  RateLimiter(double rate, double burst) : rate_(rate), burst_(burst < 1 ? 1 : burst) {}

  // Takes one token of `key`'s bucket; false (nothing taken) when it is empty.
  bool Allow(const std::string& key);
  double rate() const { return rate_; }

 private:
  struct Bucket {
    double tokens = 0;
    std::chrono::steady_clock::time_point last;
  };
  static constexpr size_t kMaxKeys = 4096;

  const double rate_;
  const double burst_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, Bucket> buckets_ ABSL_GUARDED_BY(mu_);
};

}  // namespace icecache
