#include "server/core/memory_accountant.h"

#include <algorithm>
#include <utility>

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

// ------------------------------------------------------------------ ClientBudget
ClientBudget::ClientBudget(MemoryAccountant* global, uint64_t quota_bytes,
                           std::shared_ptr<std::atomic<uint64_t>> segments_total)
    : global_(global), quota_(quota_bytes), segments_total_(std::move(segments_total)) {}

ClientBudget::~ClientBudget() {
  absl::MutexLock lock(&mu_);
  const uint64_t charged = Charged();
  if (charged > 0) global_->Release(charged);
  if (segments_total_ != nullptr) segments_total_->fetch_sub(fixed_ + held_);
}

absl::Status ClientBudget::Settle(uint64_t before, const char* what) {
  const uint64_t after = Charged();
  if (after > before) return global_->Reserve(after - before, what);
  if (after < before) global_->Release(before - after);
  return absl::OkStatus();
}

absl::Status ClientBudget::Promise(uint64_t arena_bytes, uint64_t heap_bytes, const char* what,
                                   uint64_t staging_bytes) {
  if (staging_bytes > arena_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": a staging share of ", staging_bytes,
                                                   " bytes exceeds the ", arena_bytes,
                                                   " arena bytes it is part of"));
  }
  absl::MutexLock lock(&mu_);
  if (quota_ != 0 && (arena_bytes > quota_ || promised_ + arena_bytes > quota_ - fixed_)) {
    global_->RecordRejection();
    return absl::ResourceExhaustedError(
        absl::StrCat(what, " needs ", FormatBytes(arena_bytes),
                     " of shared memory; the client's quota of ", FormatBytes(quota_), " has ",
                     FormatBytes(quota_ - std::min(quota_, fixed_ + promised_)), " left"));
  }
  const uint64_t before = Charged();
  promised_ += arena_bytes;
  heap_ += heap_bytes;
  absl::Status s = Settle(before, what);
  if (!s.ok()) {
    promised_ -= arena_bytes;
    heap_ -= heap_bytes;
  } else {
    promised_staging_ += staging_bytes;
  }
  return s;
}

void ClientBudget::Unpromise(uint64_t arena_bytes, uint64_t heap_bytes, uint64_t staging_bytes) {
  absl::MutexLock lock(&mu_);
  ICECACHE_CHECK(heap_bytes <= heap_ && staging_bytes <= arena_bytes &&
                 staging_bytes <= PromisedOf(ArenaUse::kStaging) &&
                 arena_bytes - staging_bytes <= PromisedOf(ArenaUse::kPages))
      << "unpromising more than was promised";
  const uint64_t before = Charged();
  promised_ -= arena_bytes;
  promised_staging_ -= staging_bytes;
  heap_ -= heap_bytes;
  (void)Settle(before, "release");  // never grows
}

absl::Status ClientBudget::ChargeSegment(uint64_t bytes, bool fixed, ArenaUse use) {
  absl::MutexLock lock(&mu_);
  const uint64_t arena_after =
      fixed ? std::max(promised_, held_) : std::max(promised_, held_ + bytes);
  const uint64_t fixed_after = fixed_ + (fixed ? bytes : 0);
  if (quota_ != 0 && (bytes > quota_ || arena_after > quota_ - std::min(quota_, fixed_after) ||
                      fixed_after > quota_)) {
    global_->RecordRejection();
    return absl::ResourceExhaustedError(
        absl::StrCat("arena segment needs ", FormatBytes(bytes), " but the client's quota of ",
                     FormatBytes(quota_), " has ",
                     FormatBytes(quota_ - std::min(quota_, fixed_ + std::max(promised_, held_))),
                     " left (memory limit per client)"));
  }
  const uint64_t before = Charged();
  (fixed ? fixed_ : held_) += bytes;
  absl::Status s = Settle(before, "arena segment");
  if (!s.ok()) {
    (fixed ? fixed_ : held_) -= bytes;
    return s;
  }
  if (!fixed && use == ArenaUse::kStaging) held_staging_ += bytes;
  if (segments_total_ != nullptr) segments_total_->fetch_add(bytes);
  return s;
}

void ClientBudget::ReleaseSegment(uint64_t bytes, bool fixed, ArenaUse use) {
  absl::MutexLock lock(&mu_);
  uint64_t& from = fixed ? fixed_ : held_;
  const bool staging = !fixed && use == ArenaUse::kStaging;
  ICECACHE_CHECK(bytes <= (fixed ? fixed_ : HeldOf(use)))
      << "releasing a segment that was not charged";
  const uint64_t before = Charged();
  from -= bytes;
  if (staging) held_staging_ -= bytes;
  (void)Settle(before, "release");
  if (segments_total_ != nullptr) segments_total_->fetch_sub(bytes);
}

uint64_t ClientBudget::headroom() const {
  absl::MutexLock lock(&mu_);
  return promised_ > held_ ? promised_ - held_ : 0;
}

uint64_t ClientBudget::headroom(ArenaUse use) const {
  absl::MutexLock lock(&mu_);
  return PromisedOf(use) > HeldOf(use) ? PromisedOf(use) - HeldOf(use) : 0;
}

uint64_t ClientBudget::held(ArenaUse use) const {
  absl::MutexLock lock(&mu_);
  return HeldOf(use);
}

uint64_t ClientBudget::promised(ArenaUse use) const {
  absl::MutexLock lock(&mu_);
  return PromisedOf(use);
}

bool ClientBudget::over_promise() const {
  absl::MutexLock lock(&mu_);
  return held_ > promised_;
}

uint64_t ClientBudget::charged() const {
  absl::MutexLock lock(&mu_);
  return Charged();
}

uint64_t ClientBudget::arena_held() const {
  absl::MutexLock lock(&mu_);
  return held_;
}

uint64_t ClientBudget::arena_promised() const {
  absl::MutexLock lock(&mu_);
  return promised_;
}

}  // namespace icecache
