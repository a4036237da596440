#include "server/core/recovery.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status_macros.h"

namespace icecache {

DonatedArena::~DonatedArena() {
  for (Segment& s : segments_) {
    if (s.base != nullptr) ::munmap(const_cast<uint8_t*>(s.base), s.bytes);
    if (s.fd >= 0) ::close(s.fd);
  }
  std::vector<Frame>().swap(frames_);
  if (memory_ != nullptr && charged_ > 0) memory_->Release(charged_);
}

absl::StatusOr<std::unique_ptr<DonatedArena>> DonatedArena::Map(std::vector<int> fds,
                                                                uint64_t max_bytes,
                                                                MemoryAccountant* memory) {
  std::unique_ptr<DonatedArena> a(new DonatedArena());
  a->memory_ = memory;
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
  // The page segments, and how many frames they can hold: the bound of the index, charged
  // before a tag is read.
  uint64_t max_frames = 0;
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
    max_frames += abi::FramesInPageSegment(s.bytes, s.page_bytes);
  }
  if (memory != nullptr && max_frames > 0) {
    const uint64_t bound = max_frames * sizeof(Frame);
    ICECACHE_RETURN_IF_ERROR(memory->Reserve(bound, "the index of a recovered arena"));
    a->charged_ = bound;
  }
  a->frames_.reserve(max_frames);
  for (size_t i = 1; i < a->segments_.size(); ++i) {
    const Segment& s = a->segments_[i];
    if (s.kind != abi::kSegmentPages) continue;
    const uint32_t frames = abi::FramesInPageSegment(s.bytes, s.page_bytes);
    for (uint32_t f = 0; f < frames; ++f) {
      const auto* tag =
          reinterpret_cast<const abi::FrameTag*>(s.base + abi::TagOffset(s.bytes, s.page_bytes, f));
      const uint64_t owner = tag->owner.load(std::memory_order_acquire);
      if (owner == 0) continue;
      const uint32_t layer = tag->layer, kv_head = tag->kv_head, count = tag->count;
      if (count == 0 || count > abi::kMaxTagSlots || kv_head > UINT16_MAX) continue;
      a->frames_.push_back(Frame{owner, layer, static_cast<uint32_t>(i), f,
                                 static_cast<uint16_t>(kv_head), static_cast<uint16_t>(count)});
    }
  }
  // By (owner, layer); a stable sort keeps segment and frame order within each.
  std::stable_sort(a->frames_.begin(), a->frames_.end(), [](const Frame& x, const Frame& y) {
    return x.owner != y.owner ? x.owner < y.owner : x.layer < y.layer;
  });
  a->frames_.shrink_to_fit();
  if (memory != nullptr) {
    const uint64_t used = a->frames_.capacity() * sizeof(Frame);
    if (used < a->charged_) {
      memory->Release(a->charged_ - used);
      a->charged_ = used;
    }
  }
  return a;
}

uint64_t DonatedArena::FramesOf(uint64_t owner) const {
  auto [begin, end] =
      std::equal_range(frames_.begin(), frames_.end(), Frame{owner},
                       [](const Frame& x, const Frame& y) { return x.owner < y.owner; });
  return static_cast<uint64_t>(end - begin);
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
    Frame key;
    key.owner = owner_;
    key.layer = layer;
    auto [begin, end] = std::equal_range(
        arena_->frames_.begin(), arena_->frames_.end(), key, [](const Frame& x, const Frame& y) {
          return x.owner != y.owner ? x.owner < y.owner : x.layer < y.layer;
        });
    for (auto it = begin; it != end; ++it) {
      const Frame& f = *it;
      const Segment& s = arena_->segments_[f.segment];
      if (f.kv_head >= g_.num_kv_heads || s.page_bytes != layout.page_bytes() ||
          f.count > g_.page_size) {
        continue;  // not a frame of this geometry
      }
      // The positions, from the tag as it is now: taken only while it still says what was
      // indexed (the client can write these segments; it can only spoil its own rows).
      const auto* tag = reinterpret_cast<const abi::FrameTag*>(
          s.base + abi::TagOffset(s.bytes, s.page_bytes, f.frame));
      uint32_t tag_positions[abi::kMaxTagSlots];
      std::memcpy(tag_positions, tag->positions, sizeof(uint32_t) * f.count);
      if (tag->owner.load(std::memory_order_acquire) != f.owner || tag->layer != f.layer ||
          tag->kv_head != f.kv_head || tag->count != f.count) {
        continue;
      }
      const uint8_t* base = s.base + uint64_t{f.frame} * s.page_bytes;
      for (uint32_t slot = 0; slot < f.count; ++slot) {
        const uint32_t p = tag_positions[slot];
        if (p < first || p - first >= n) continue;
        const uint64_t at = uint64_t{f.kv_head} * n + (p - first);
        if (found[at]) continue;  // a copy of a row already taken (copy on write)
        found[at] = 1;
        std::memcpy(k_out + at * row, base + layout.k_offset(slot), row);
        std::memcpy(v_out + at * row, base + layout.v_offset(slot), row);
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
