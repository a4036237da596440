#include "client/page_cache.h"

#include "absl/strings/str_cat.h"

namespace icecache::client_internal {

PageCache::PageCache(uint32_t num_heads, uint32_t slots)
    : num_heads_(num_heads),
      slots_(slots),
      entries_(size_t{num_heads} * slots),
      where_(num_heads) {}

absl::StatusOr<PageCache::Placement> PageCache::Place(uint32_t head,
                                                      const abi::SelectedPageRef& ref,
                                                      uint64_t step) {
  if (head >= num_heads_) {
    return absl::InvalidArgumentError(absl::StrCat("head ", head, " of ", num_heads_));
  }
  if (ref.segment == abi::kNoSegment) return absl::InvalidArgumentError("a page with no segment");
  Entry* entries = &entries_[size_t{head} * slots_];
  auto& where = where_[head];
  const uint64_t key = Key(ref.segment, ref.frame);
  Placement p;
  auto it = where.find(key);
  if (it != where.end()) {
    p.slot = it->second;
    p.fetch = entries[p.slot].version != ref.version;  // resident at an old version: refetch
  } else {
    p.slot = 0;
    for (uint32_t c = 1; c < slots_; ++c) {
      if (entries[c].last_used < entries[p.slot].last_used) p.slot = c;
    }
    if (entries[p.slot].last_used == step) {
      return absl::InternalError("the page cache is smaller than one step's selection");
    }
    if (entries[p.slot].segment != abi::kNoSegment) {
      where.erase(Key(entries[p.slot].segment, entries[p.slot].frame));
    }
    where[key] = p.slot;
    p.fetch = true;
  }
  Entry& e = entries[p.slot];
  e.segment = ref.segment;
  e.frame = ref.frame;
  e.version = ref.version;
  e.last_used = step;
  return p;
}

uint32_t PageCache::resident(uint32_t head) const {
  return head < num_heads_ ? static_cast<uint32_t>(where_[head].size()) : 0;
}

void PageCache::Clear() {
  std::fill(entries_.begin(), entries_.end(), Entry{});
  for (auto& w : where_) w.clear();
}

}  // namespace icecache::client_internal
