#include "server/service/rate_limiter.h"

#include <algorithm>

namespace icecache {

bool RateLimiter::Allow(const std::string& key) {
  if (rate_ <= 0) return true;
  const auto now = std::chrono::steady_clock::now();
  absl::MutexLock lock(&mu_);
  if (buckets_.size() >= kMaxKeys && buckets_.find(key) == buckets_.end()) {
    // Forget callers whose buckets have refilled: they are indistinguishable from new ones.
    for (auto it = buckets_.begin(); it != buckets_.end();) {
      const double age = std::chrono::duration<double>(now - it->second.last).count();
      if (it->second.tokens + age * rate_ >= burst_) {
        buckets_.erase(it++);
      } else {
        ++it;
      }
    }
  }
  auto [it, inserted] = buckets_.try_emplace(key, Bucket{burst_, now});
  Bucket& b = it->second;
  if (!inserted) {
    const double elapsed = std::chrono::duration<double>(now - b.last).count();
    b.tokens = std::min(burst_, b.tokens + elapsed * rate_);
    b.last = now;
  }
  if (b.tokens < 1) return false;
  b.tokens -= 1;
  return true;
}

}  // namespace icecache
