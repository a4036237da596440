#include "server/core/sequence_registry.h"

#include <cstdio>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/core/sequence_kv.h"

namespace icecache {
namespace {

constexpr absl::string_view kHandlePrefix = "seq_";
constexpr size_t kHandleHexDigits = 32;

absl::Status MalformedHandle(absl::string_view what, absl::string_view handle) {
  std::string shown(handle.substr(0, 64));
  for (char& c : shown) {
    if (c < 0x20 || c > 0x7e) c = '?';
  }
  return absl::InvalidArgumentError(absl::StrCat(what, " '", shown, handle.size() > 64 ? "..." : "",
                                                 "' is not a sequence handle (seq_ followed by ",
                                                 kHandleHexDigits, " lowercase hex digits)"));
}

}  // namespace

SequenceRegistry::SequenceRegistry(MemoryAccountant* accountant, const Clock* clock)
    : accountant_(accountant), clock_(clock) {}

SequenceRegistry::~SequenceRegistry() {
  absl::MutexLock lock(&mu_);
  for (const auto& [handle, info] : sequences_) Release(info);
  sequences_.clear();
}

bool SequenceRegistry::IsWellFormedHandle(absl::string_view handle) {
  if (handle.size() != kHandlePrefix.size() + kHandleHexDigits) return false;
  if (!absl::StartsWith(handle, kHandlePrefix)) return false;
  for (char c : handle.substr(kHandlePrefix.size())) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

uint64_t SequenceRegistry::DurableIdOf(absl::string_view handle) {
  uint64_t id = 0;
  const absl::string_view hex = handle.substr(kHandlePrefix.size(), 16);
  for (char c : hex) id = id * 16 + static_cast<uint64_t>(c <= '9' ? c - '0' : c - 'a' + 10);
  return id == 0 ? 1 : id;
}

std::string SequenceRegistry::NewHandle() {
  // 128 random bits from a BitGen seeded from the OS: unguessable by other clients.
  std::string handle;
  do {
    const uint64_t hi = absl::Uniform<uint64_t>(rng_);
    const uint64_t lo = absl::Uniform<uint64_t>(rng_);
    char hex[kHandleHexDigits + 1];
    std::snprintf(hex, sizeof(hex), "%016llx%016llx", static_cast<unsigned long long>(hi),
                  static_cast<unsigned long long>(lo));
    handle = absl::StrCat(kHandlePrefix, hex);
  } while (sequences_.count(handle) != 0);
  return handle;
}

absl::StatusOr<SequenceInfo> SequenceRegistry::Create(const GeometrySpec& spec,
                                                      const std::string& label,
                                                      const CreateOptions& options) {
  ICECACHE_ASSIGN_OR_RETURN(Geometry geometry, ResolveGeometry(spec));
  ICECACHE_RETURN_IF_ERROR(ValidateLabel(label));
  if (options.max_owned != 0) {
    absl::MutexLock lock(&mu_);
    uint64_t owned = 0;
    for (const auto& [h, info] : sequences_) owned += info.owner == options.owner ? 1 : 0;
    if (owned >= options.max_owned) {
      return absl::ResourceExhaustedError(absl::StrCat("this client already holds its maximum of ",
                                                       options.max_owned,
                                                       " sequences; drop one first"));
    }
  }
  Charge charge;
  if (options.charge) {
    ICECACHE_ASSIGN_OR_RETURN(charge, options.charge(geometry));
  } else {
    charge.bytes = geometry.host_kv_bytes();
  }
  const uint64_t bytes = charge.bytes;
  if (options.quota_bytes != 0 && bytes > options.quota_bytes) {
    accountant_->RecordRejection();
    return absl::ResourceExhaustedError(absl::StrCat("sequence needs ", bytes,
                                                     " bytes of KV, above the per-client quota of ",
                                                     options.quota_bytes));
  }
  if (charge.reserve) {
    ICECACHE_RETURN_IF_ERROR(charge.reserve());
  } else {
    ICECACHE_RETURN_IF_ERROR(accountant_->Reserve(bytes, "sequence"));
  }
  auto give_back = [&] {
    if (charge.release) {
      charge.release();
    } else {
      accountant_->Release(bytes);
    }
  };
  std::shared_ptr<SequenceKv> kv;
  if (options.make_kv) {
    absl::StatusOr<std::shared_ptr<SequenceKv>> made = options.make_kv(geometry);
    if (!made.ok()) {
      give_back();
      return made.status();
    }
    kv = std::move(*made);
  }

  SequenceInfo info;
  {
    absl::MutexLock lock(&mu_);
    // Counted again under the lock that inserts: concurrent creations cannot pass together.
    uint64_t owned = 0;
    for (const auto& [h, other] : sequences_) owned += other.owner == options.owner ? 1 : 0;
    if (options.max_owned == 0 || owned < options.max_owned) {
      info.handle = NewHandle();
      info.geometry = geometry;
      info.label = label;
      info.kv_bytes = bytes;
      info.create_time = clock_->Now();
      info.owner = options.owner;
      info.kv = std::move(kv);
      info.release = charge.release;
      sequences_.emplace(info.handle, info);
      ++created_total_;
      return info;
    }
  }
  give_back();  // outside the lock (it may free memory)
  return absl::ResourceExhaustedError(absl::StrCat("this client already holds its maximum of ",
                                                   options.max_owned,
                                                   " sequences; drop one first"));
}

void SequenceRegistry::Release(const SequenceInfo& info) {
  if (info.release) {
    info.release();
  } else {
    accountant_->Release(info.kv_bytes);
  }
}

absl::StatusOr<SequenceInfo> SequenceRegistry::Get(absl::string_view handle,
                                                   const Caller& caller) const {
  if (!IsWellFormedHandle(handle)) return MalformedHandle("handle", handle);
  SequenceInfo out;
  {
    absl::MutexLock lock(&mu_);
    auto it = sequences_.find(handle);
    if (it == sequences_.end() || !Visible(it->second, caller)) {
      return absl::NotFoundError(absl::StrCat("no sequence ", handle));
    }
    out = it->second;
  }
  CountTokens(&out);
  return out;
}

// Outside mu_: the count waits for an append in progress on the layer (its lock), and every
// client's requests find their sequence through mu_.
void SequenceRegistry::CountTokens(SequenceInfo* info) {
  if (info->kv != nullptr) info->num_tokens = info->kv->tokens(info->geometry.full_kv_layers);
}

uint64_t SequenceRegistry::DropOwnedBy(uint64_t owner) {
  std::vector<SequenceInfo> dropped;  // destroyed outside the lock (frees frames)
  {
    absl::MutexLock lock(&mu_);
    for (auto it = sequences_.begin(); it != sequences_.end();) {
      if (it->second.owner == owner) {
        Release(it->second);
        ++dropped_total_;
        dropped.push_back(std::move(it->second));
        it = sequences_.erase(it);
      } else {
        ++it;
      }
    }
  }
  return dropped.size();
}

absl::StatusOr<SequencePage> SequenceRegistry::List(uint32_t page_size,
                                                    absl::string_view page_token,
                                                    const Caller& caller) const {
  if (page_size > kMaxListPageSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size must be at most ", kMaxListPageSize, ", got ", page_size));
  }
  if (!page_token.empty() && !IsWellFormedHandle(page_token)) {
    return MalformedHandle("page_token", page_token);
  }
  const uint32_t limit = page_size == 0 ? kDefaultListPageSize : page_size;
  SequencePage page;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [h, info] : sequences_) page.total_size += Visible(info, caller) ? 1 : 0;
    auto it = page_token.empty() ? sequences_.begin() : sequences_.upper_bound(page_token);
    for (; it != sequences_.end() && page.sequences.size() < limit; ++it) {
      if (Visible(it->second, caller)) page.sequences.push_back(it->second);
    }
    while (it != sequences_.end() && !Visible(it->second, caller)) ++it;
    if (it != sequences_.end()) page.next_page_token = page.sequences.back().handle;
  }
  for (SequenceInfo& info : page.sequences) CountTokens(&info);
  return page;
}

absl::StatusOr<uint64_t> SequenceRegistry::Drop(absl::string_view handle, const Caller& caller) {
  if (!IsWellFormedHandle(handle)) return MalformedHandle("handle", handle);
  SequenceInfo dropped;  // destroyed outside the lock (frees the KV's frames)
  {
    absl::MutexLock lock(&mu_);
    auto it = sequences_.find(handle);
    if (it == sequences_.end() || !Visible(it->second, caller)) {
      return absl::NotFoundError(absl::StrCat("no sequence ", handle));
    }
    dropped = std::move(it->second);
    sequences_.erase(it);
    Release(dropped);
    ++dropped_total_;
  }
  return dropped.kv_bytes;
}

uint64_t SequenceRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return sequences_.size();
}

uint64_t SequenceRegistry::created_total() const {
  absl::MutexLock lock(&mu_);
  return created_total_;
}

uint64_t SequenceRegistry::dropped_total() const {
  absl::MutexLock lock(&mu_);
  return dropped_total_;
}

}  // namespace icecache
