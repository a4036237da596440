#include "server/core/recovery.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"

namespace icecache {

DonatedArena::~DonatedArena() {
  for (Segment& s : segments_) {
    if (s.base != nullptr) ::munmap(const_cast<uint8_t*>(s.base), s.bytes);
    if (s.fd >= 0) ::close(s.fd);
  }
}

absl::StatusOr<std::unique_ptr<DonatedArena>> DonatedArena::Map(std::vector<int> fds,
                                                                uint64_t max_bytes) {
  std::unique_ptr<DonatedArena> a(new DonatedArena());
  // Owned from here on: closed with the object whatever happens.
  for (int fd : fds) a->segments_.push_back(Segment{fd});
  if (fds.empty() || fds.size() > abi::kMaxDonatedSegments) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a recovery hands back 1..", abi::kMaxDonatedSegments, " segments, not ", fds.size()));
  }
  uint64_t total = 0;
  for (size_t i = 0; i < a->segments_.size(); ++i) {
    Segment& s = a->segments_[i];
    struct stat st {};
    if (s.fd < 0 || ::fstat(s.fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      return absl::InvalidArgumentError(absl::StrCat("segment ", i, " is not a memory file"));
    }
    const int seals = ::fcntl(s.fd, F_GET_SEALS);
    if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW)) {
      return absl::InvalidArgumentError(
          absl::StrCat("segment ", i, " is not a sealed arena segment"));
    }
    s.bytes = static_cast<uint64_t>(st.st_size);
    total += s.bytes;
    if (total > max_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the segments handed back hold more than ", max_bytes,
                       " bytes, more than any arena of this daemon"));
    }
    if (s.bytes == 0) continue;  // a segment given back (reads as nothing)
    void* base = ::mmap(nullptr, s.bytes, PROT_READ, MAP_SHARED, s.fd, 0);
    if (base == MAP_FAILED) {
      return absl::InvalidArgumentError(
          absl::StrCat("segment ", i, " cannot be mapped: ", std::strerror(errno)));
    }
    s.base = static_cast<const uint8_t*>(base);
  }
  // The old segment table, copied once.
  const Segment& control = a->segments_[0];
  if (control.bytes < sizeof(abi::ArenaHeader)) {
    return absl::InvalidArgumentError("the first segment is not an arena's control segment");
  }
  abi::ArenaHeader header;
  std::memcpy(static_cast<void*>(&header), control.base, sizeof(header));
  if (header.magic != abi::kArenaMagic) {
    return absl::InvalidArgumentError("the first segment is not an arena's control segment");
  }
  for (size_t i = 1; i < a->segments_.size(); ++i) {
    Segment& s = a->segments_[i];
    const abi::SegmentInfo& info = header.segments[i];
    if (info.kind != abi::kSegmentPages || s.base == nullptr) continue;
    // A page size some geometry has: K and V of 8..32 tokens of 64..256 two-byte elements.
    if (info.page_bytes < 2 * 8 * 64 * 2 || info.page_bytes > 2 * 32 * 256 * 2 ||
        info.page_bytes % 64 != 0) {
      continue;
    }
    s.kind = abi::kSegmentPages;
    s.page_bytes = info.page_bytes;
    const uint32_t frames = abi::FramesInPageSegment(s.bytes, s.page_bytes);
    for (uint32_t f = 0; f < frames; ++f) {
      const auto* tag =
          reinterpret_cast<const abi::FrameTag*>(s.base + abi::TagOffset(s.bytes, s.page_bytes, f));
      const uint64_t owner = tag->owner.load(std::memory_order_acquire);
      if (owner == 0) continue;
      Frame fr;
      fr.segment = static_cast<uint32_t>(i);
      fr.frame = f;
      fr.kv_head = tag->kv_head;
      fr.count = tag->count;
      const uint32_t layer = tag->layer;
      std::memcpy(fr.positions, tag->positions, sizeof(fr.positions));
      // The owner again after the copy: a tag that changed meanwhile is not taken.
      if (tag->owner.load(std::memory_order_acquire) != owner) continue;
      if (fr.count == 0 || fr.count > abi::kMaxTagSlots) continue;
      a->frames_[owner][layer].push_back(fr);
    }
  }
  return a;
}

uint64_t DonatedArena::FramesOf(uint64_t owner) const {
  auto it = frames_.find(owner);
  if (it == frames_.end()) return 0;
  uint64_t n = 0;
  for (const auto& [layer, frames] : it->second) n += frames.size();
  return n;
}

uint64_t DonatedArena::bytes() const {
  uint64_t n = 0;
  for (const Segment& s : segments_) n += s.bytes;
  return n;
}

class DonatedArena::Rows final : public SequenceKv::RowSource {
 public:
  Rows(const DonatedArena* arena, uint64_t owner, const Geometry& g)
      : arena_(arena), owner_(owner), g_(g) {}

  absl::Status Gather(uint32_t layer, const std::vector<uint32_t>& positions, uint8_t* k_out,
                      uint8_t* v_out) const override {
    const PageLayout layout = g_.page_layout();
    const uint64_t row = layout.row_bytes();
    const uint64_t n = positions.size();
    if (n == 0) return absl::OkStatus();
    const uint32_t first = positions.front();
    // Positions asked for are consecutive (a prefill or an append).
    for (uint64_t i = 0; i < n; ++i) {
      if (positions[i] != first + i) {
        return absl::InvalidArgumentError("restore positions must be consecutive");
      }
    }
    std::vector<char> found(g_.num_kv_heads * n, 0);
    auto owner = arena_->frames_.find(owner_);
    if (owner != arena_->frames_.end()) {
      auto frames = owner->second.find(layer);
      if (frames != owner->second.end()) {
        for (const Frame& f : frames->second) {
          const Segment& s = arena_->segments_[f.segment];
          if (f.kv_head >= g_.num_kv_heads || s.page_bytes != layout.page_bytes() ||
              f.count > g_.page_size) {
            continue;  // not a frame of this geometry
          }
          const uint8_t* base = s.base + uint64_t{f.frame} * s.page_bytes;
          for (uint32_t slot = 0; slot < f.count; ++slot) {
            const uint32_t p = f.positions[slot];
            if (p < first || p - first >= n) continue;
            const uint64_t at = uint64_t{f.kv_head} * n + (p - first);
            if (found[at]) continue;  // a copy of a row already taken (copy on write)
            found[at] = 1;
            std::memcpy(k_out + at * row, base + layout.k_offset(slot), row);
            std::memcpy(v_out + at * row, base + layout.v_offset(slot), row);
          }
        }
      }
    }
    for (uint32_t h = 0; h < g_.num_kv_heads; ++h) {
      for (uint64_t i = 0; i < n; ++i) {
        if (!found[uint64_t{h} * n + i]) {
          return absl::DataLossError(absl::StrCat("layer ", layer, " KV head ", h,
                                                  ": the token at position ", first + i,
                                                  " is in no frame of the previous arena"));
        }
      }
    }
    return absl::OkStatus();
  }

 private:
  const DonatedArena* arena_;
  uint64_t owner_;
  Geometry g_;
};

std::unique_ptr<SequenceKv::RowSource> DonatedArena::RowsOf(uint64_t owner,
                                                            const Geometry& g) const {
  return std::make_unique<Rows>(this, owner, g);
}

}  // namespace icecache
