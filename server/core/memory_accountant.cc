#include "server/core/memory_accountant.h"

#include "absl/strings/str_cat.h"
#include "common/bytes.h"
#include "common/log.h"

namespace icecache {

absl::Status MemoryAccountant::Reserve(uint64_t bytes, const char* what) {
  absl::MutexLock lock(&mu_);
  // used_ <= limit_ always, so limit_ - used_ cannot underflow.
  if (bytes > limit_ - used_) {
    ++rejections_;
    return absl::ResourceExhaustedError(
        absl::StrCat(what, " needs ", FormatBytes(bytes), " (", bytes, " bytes) but only ",
                     FormatBytes(limit_ - used_), " of the ", FormatBytes(limit_),
                     " memory limit are free (", FormatBytes(used_), " in use)"));
  }
  used_ += bytes;
  return absl::OkStatus();
}

void MemoryAccountant::Release(uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  ICECACHE_CHECK(bytes <= used_) << "releasing " << bytes << " bytes with " << used_ << " reserved";
  used_ -= bytes;
}

uint64_t MemoryAccountant::used() const {
  absl::MutexLock lock(&mu_);
  return used_;
}

void MemoryAccountant::RecordRejection() {
  absl::MutexLock lock(&mu_);
  ++rejections_;
}

uint64_t MemoryAccountant::rejections() const {
  absl::MutexLock lock(&mu_);
  return rejections_;
}

absl::Status ReserveNested(MemoryAccountant* inner, MemoryAccountant* outer, uint64_t bytes,
                           const char* what) {
  absl::Status s = inner->Reserve(bytes, what);
  if (!s.ok()) return s;
  s = outer->Reserve(bytes, what);
  if (!s.ok()) inner->Release(bytes);
  return s;
}

void ReleaseNested(MemoryAccountant* inner, MemoryAccountant* outer, uint64_t bytes) {
  outer->Release(bytes);
  inner->Release(bytes);
}

}  // namespace icecache
