#include "server/core/arena.h"

#include <fcntl.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/bytes.h"
#include "common/log.h"

namespace icecache {
namespace {

constexpr uint64_t kStagingAlign = 4096;

uint64_t RoundUp(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

ArenaUse UseOf(uint32_t kind) {
  return kind == abi::kSegmentStaging ? ArenaUse::kStaging : ArenaUse::kPages;
}

}  // namespace

// ------------------------------------------------------------------ FrameReservation
Arena::FrameReservation::~FrameReservation() {
  if (arena_ != nullptr && !frames_.empty()) arena_->ReturnFrames(&frames_);
}

FrameRef Arena::FrameReservation::Take() {
  ICECACHE_CHECK(!frames_.empty()) << "took more frames than were reserved";
  FrameRef f = frames_.back();
  frames_.pop_back();
  return f;
}

// ------------------------------------------------------------------ Arena
absl::StatusOr<std::unique_ptr<Arena>> Arena::Create(uint64_t client_id,
                                                     const ArenaOptions& options,
                                                     uint64_t quota_bytes, MemoryAccountant* global,
                                                     SegmentListener* listener) {
  // Nothing promised: every segment is charged to the quota and the global limit as created.
  return Create(client_id, options, std::make_unique<ClientBudget>(global, quota_bytes), listener);
}

absl::StatusOr<std::unique_ptr<Arena>> Arena::Create(uint64_t client_id,
                                                     const ArenaOptions& options,
                                                     std::unique_ptr<ClientBudget> budget,
                                                     SegmentListener* listener) {
  if (options.slots == 0 || (options.slots & (options.slots - 1)) != 0 || options.slots > 4096) {
    return absl::InvalidArgumentError("arena slots must be a power of two in 1..4096");
  }
  if (options.slot_payload < 4096 || options.slot_payload > (16u << 20) ||
      options.slot_payload % 64 != 0) {
    return absl::InvalidArgumentError("slot payload must be a multiple of 64 in 4 KiB..16 MiB");
  }
  std::unique_ptr<Arena> a(new Arena(client_id, options, std::move(budget), listener));
  a->segments_.resize(abi::kMaxSegments);
  absl::MutexLock lock(&a->mu_);
  absl::StatusOr<uint32_t> control =
      a->AddSegment(abi::kSegmentUnused, abi::ControlBytes(options.slots, options.slot_payload), 0);
  if (!control.ok()) return control.status();
  auto* h = new (a->segments_[0].base) abi::ArenaHeader();
  h->magic = abi::kArenaMagic;
  h->abi_version = abi::kAbiVersion;
  h->header_bytes = sizeof(abi::ArenaHeader);
  h->client_id = client_id;
  h->num_slots = options.slots;
  h->slot_bytes = sizeof(abi::SlotHeader) + options.slot_payload;
  h->sq_offset = RoundUp(sizeof(abi::ArenaHeader), 64);
  h->slots_offset = h->sq_offset + RoundUp(uint64_t{options.slots} * 4, 64);
  h->control_bytes = a->segments_[0].bytes;
  h->num_segments.store(1, std::memory_order_release);
  for (uint32_t i = 0; i < options.slots; ++i) new (abi::SlotAt(h, i)) abi::SlotHeader();
  return a;
}

Arena::~Arena() {
  absl::MutexLock lock(&mu_);
  for (uint32_t i = 0; i < used_segments_; ++i) {
    Segment& s = segments_[i];
    if (s.base != nullptr) ::munmap(s.base, s.bytes);
    if (s.fd >= 0) ::close(s.fd);
    if (!s.dormant) budget_->ReleaseSegment(s.bytes, /*fixed=*/i == 0, UseOf(s.kind));
  }
}

uint64_t Arena::NewSegmentBytes(uint64_t configured, uint64_t need, uint64_t unit,
                                uint32_t kind) const {
  const uint64_t bytes = std::max(configured, need);
  // An arena nothing was promised to (the legacy Create's) takes configured segments.
  if (budget_->arena_promised() == 0) return bytes;
  // At least an eighth of what this use holds already, so that a large arena takes a few
  // dozen segments, not one per configured size: a client has kMaxArenaSegments (250), which at
  // the default 64 MiB would hold 16 GiB, less than the 34.6 GiB of frames promised to one
  // 128k-token sequence of an 8B model (32 layers, 8 KV heads of 128, pages of 8). Up to
  // kMaxGrowth configured sizes: a CUDA client pins a segment whole when it first uses it,
  // and a decode step waits for that (2 GiB at most by default; 250 segments then hold
  // about 440 GiB).
  const ArenaUse use = UseOf(kind);
  const uint64_t eighth = std::min(budget_->held(use) / 8, kMaxGrowth * configured) / unit * unit;
  // Within this use's share of the promises, no more than that share: what the arena holds
  // then stays within what was promised, and staging (sized for a prompt) never takes the
  // room promised to page frames.
  const uint64_t headroom = budget_->headroom(use) / unit * unit;
  if (headroom >= need) return std::min(std::max(bytes, eighth), headroom);
  // Beyond it (promises estimated short, or segments stranded by dropped sequences): the
  // configured size, or the eighth where that is less (never below the need), so that an
  // arena outgrowing its promise adds a few segments, not one per request until it has used
  // all kMaxArenaSegments. AddSizedSegment falls back to `need` where that does not fit.
  return std::max(need, std::min(bytes, eighth));
}

bool Arena::BeyondPromise(uint64_t bytes) const {
  return budget_->arena_promised() > 0 && budget_->headroom() < bytes;
}

absl::StatusOr<uint32_t> Arena::AddSizedSegment(uint32_t kind, uint64_t configured, uint64_t need,
                                                uint64_t unit, uint32_t page_bytes) {
  const uint64_t bytes = NewSegmentBytes(configured, need, unit, kind);
  absl::StatusOr<uint32_t> seg = AddSegment(kind, bytes, page_bytes);
  if (seg.ok() || bytes == need || seg.status().code() != absl::StatusCode::kResourceExhausted) {
    return seg;
  }
  return AddSegment(kind, need, page_bytes);
}

absl::StatusOr<uint32_t> Arena::AddSegment(uint32_t kind, uint64_t bytes, uint32_t page_bytes) {
  // A dormant segment large enough is reused first (the smallest such, to keep large ones).
  int best = -1;
  for (uint32_t i = 1; i < used_segments_; ++i) {
    const Segment& s = segments_[i];
    if (!s.dormant || s.bytes < bytes) continue;
    if (best < 0 || s.bytes < segments_[best].bytes) best = static_cast<int>(i);
  }
  if (best >= 0) {
    Segment& s = segments_[best];
    const bool beyond = BeyondPromise(s.bytes);
    absl::Status charged = budget_->ChargeSegment(s.bytes, /*fixed=*/false, UseOf(kind));
    if (!charged.ok()) return charged;
    beyond_promise_segments_ += beyond ? 1 : 0;
    s.dormant = false;
    TypeSegment(static_cast<uint32_t>(best), kind, page_bytes);
    return static_cast<uint32_t>(best);
  }
  if (used_segments_ >= abi::kMaxArenaSegments) {
    return absl::ResourceExhaustedError(
        absl::StrCat("client ", client_id_, " has used all ", abi::kMaxArenaSegments, " segments"));
  }
  const bool control = used_segments_ == 0;
  const bool beyond = !control && BeyondPromise(bytes);
  absl::Status charged = budget_->ChargeSegment(bytes, control, UseOf(kind));
  if (!charged.ok()) return charged;
  const std::string name = absl::StrCat("icecache-c", client_id_, "-s", used_segments_);
  const int fd = ::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  auto fail = [&](const char* what) {
    const int err = errno;
    if (fd >= 0) ::close(fd);
    budget_->ReleaseSegment(bytes, control, UseOf(kind));
    return absl::InternalError(
        absl::StrCat(what, " for a ", FormatBytes(bytes), " segment: ", std::strerror(err)));
  };
  if (fd < 0) return fail("memfd_create");
  if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) return fail("ftruncate");
  // The client holds this descriptor: it must not be able to shrink the file under our map.
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return fail("sealing");
  }
  void* base = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) return fail("mmap");
  const uint32_t index = used_segments_++;
  beyond_promise_segments_ += beyond ? 1 : 0;
  Segment& s = segments_[index];
  s.fd = fd;
  s.base = base;
  s.bytes = bytes;
  if (index > 0) {
    TypeSegment(index, kind, page_bytes);
    if (listener_ != nullptr) listener_->OnSegmentAdded(index, fd, bytes);
  }
  return index;
}

void Arena::TypeSegment(uint32_t index, uint32_t kind, uint32_t page_bytes) {
  Segment& s = segments_[index];
  s.kind = kind;
  s.page_bytes = page_bytes;
  s.in_use = 0;
  s.free_ranges.clear();
  s.allocations.clear();
  if (kind == abi::kSegmentPages) {
    s.frames = abi::FramesInPageSegment(s.bytes, page_bytes);
    // Reused segments may hold tags of an earlier use: nothing in them is committed now.
    for (uint32_t f = 0; f < s.frames; ++f) TagOf(s, f)->owner.store(0, std::memory_order_relaxed);
    // Every frame starts above any version a frame of this segment had before, so that a
    // client's copy of a page from an earlier use can never look current.
    s.versions = std::make_unique<std::atomic<uint32_t>[]>(s.frames);
    for (uint32_t f = 0; f < s.frames; ++f) {
      s.versions[f].store(s.next_version, std::memory_order_relaxed);
    }
  } else {
    s.frames = 0;
    s.versions.reset();
    if (kind == abi::kSegmentStaging) s.free_ranges[0] = s.bytes;
  }
  abi::ArenaHeader* h = header();
  h->segments[index].bytes = s.bytes;
  h->segments[index].kind = kind;
  h->segments[index].page_bytes = page_bytes;
  h->num_segments.store(used_segments_, std::memory_order_release);
}

void Arena::MaybeReclaim(uint32_t index) {
  Segment& s = segments_[index];
  if (index == 0 || s.dormant || s.in_use != 0 || options_.keep_segments ||
      !budget_->over_promise()) {
    return;
  }
  // A stopping daemon leaves the memory to the client, which recovers from it.
  if (keep_tags_.load(std::memory_order_acquire)) return;
  if (s.kind == abi::kSegmentPages) {
    std::vector<FrameRef>& free = free_frames_[s.page_bytes];
    free.erase(std::remove_if(free.begin(), free.end(),
                              [&](const FrameRef& f) { return f.segment == index; }),
               free.end());
    uint32_t top = s.next_version;
    for (uint32_t f = 0; f < s.frames; ++f) {
      top = std::max(top, s.versions[f].load(std::memory_order_relaxed) + 1);
    }
    s.next_version = top;
  }
  // The memory goes back to the system; the client's mapping stays valid (reads zeros).
  if (::fallocate(s.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                  static_cast<off_t>(s.bytes)) != 0) {
    ICECACHE_LOG(WARNING) << "client " << client_id_ << ": cannot free segment " << index << ": "
                          << std::strerror(errno);
    return;  // still holds its memory: stays charged
  }
  s.dormant = true;
  s.free_ranges.clear();
  budget_->ReleaseSegment(s.bytes, /*fixed=*/false, UseOf(s.kind));
}

void Arena::GiveBackEmptySegments() {
  absl::MutexLock lock(&mu_);
  for (uint32_t i = 1; i < used_segments_; ++i) MaybeReclaim(i);
}

absl::Status Arena::ReserveFrames(uint32_t page_bytes, uint32_t count, FrameReservation* out) {
  if (page_bytes == 0 || page_bytes % 16 != 0) {
    return absl::InvalidArgumentError("page size must be a positive multiple of 16 bytes");
  }
  absl::MutexLock lock(&mu_);
  std::vector<FrameRef>& free = free_frames_[page_bytes];
  while (free.size() < count) {
    // A frame takes its page and its tag (abi::FrameTag) in the segment.
    const uint64_t footprint = abi::FrameFootprint(page_bytes);
    const uint64_t need = uint64_t{count - free.size()} * footprint;
    const uint64_t configured = std::max<uint64_t>(options_.page_segment_bytes, footprint);
    // Frames come in segments of the configured size (more of them for a larger need).
    absl::StatusOr<uint32_t> seg = AddSizedSegment(
        abi::kSegmentPages, configured, std::min(need, configured), footprint, page_bytes);
    if (!seg.ok()) return seg.status();
    const Segment& s = segments_[*seg];
    for (uint32_t f = s.frames; f-- > 0;) free.push_back({*seg, f});
  }
  out->arena_ = this;
  for (uint32_t i = 0; i < count; ++i) {
    const FrameRef f = free.back();
    // A frame freed while the daemon stops keeps its tag (KeepTagsOnRelease): it goes before
    // new rows come in, or a successor could take those rows for the old tag's positions
    // (the new content's tag is written after its rows).
    TagOf(segments_[f.segment], f.frame)->owner.store(0, std::memory_order_release);
    out->frames_.push_back(f);
    ++segments_[f.segment].in_use;
    free.pop_back();
  }
  frames_in_use_ += count;
  frame_bytes_in_use_ += uint64_t{count} * page_bytes;
  return absl::OkStatus();
}

void Arena::ReturnFrames(std::vector<FrameRef>* frames) {
  absl::MutexLock lock(&mu_);
  for (FrameRef f : *frames) {
    Segment& s = segments_[f.segment];
    free_frames_[s.page_bytes].push_back(f);
    --s.in_use;
    --frames_in_use_;
    frame_bytes_in_use_ -= s.page_bytes;
  }
  for (FrameRef f : *frames) MaybeReclaim(f.segment);
  frames->clear();
}

void Arena::FreeFrame(FrameRef frame) {
  ICECACHE_CHECK(frame.segment < abi::kMaxSegments &&
                 segments_[frame.segment].kind == abi::kSegmentPages &&
                 frame.frame < segments_[frame.segment].frames)
      << "freeing a frame that is not one";
  // Not this frame's content any more: a restarted daemon must not take it for a page
  // (unless this daemon is stopping: then the frame is freed only with the daemon).
  if (!keep_tags_.load(std::memory_order_acquire)) {
    TagOf(segments_[frame.segment], frame.frame)->owner.store(0, std::memory_order_release);
  }
  BumpFrameVersion(frame);
  std::vector<FrameRef> one = {frame};
  ReturnFrames(&one);
}

uint8_t* Arena::FrameAddress(FrameRef frame) const {
  const Segment& s = segments_[frame.segment];
  return static_cast<uint8_t*>(s.base) + uint64_t{frame.frame} * s.page_bytes;
}

abi::FrameTag* Arena::TagOf(const Segment& s, uint32_t frame) {
  return reinterpret_cast<abi::FrameTag*>(static_cast<uint8_t*>(s.base) +
                                          abi::TagOffset(s.bytes, s.page_bytes, frame));
}

std::vector<Arena::TagCopy> Arena::Tags() const {
  absl::MutexLock lock(&mu_);
  std::vector<TagCopy> out;
  for (uint32_t i = 1; i < used_segments_; ++i) {
    const Segment& s = segments_[i];
    if (s.kind != abi::kSegmentPages || s.dormant) continue;
    for (uint32_t f = 0; f < s.frames; ++f) {
      const abi::FrameTag* t = TagOf(s, f);
      TagCopy c;
      c.frame = FrameRef{i, f};
      c.owner = t->owner.load(std::memory_order_acquire);
      c.layer = t->layer;
      c.kv_head = t->kv_head;
      c.count = t->count;
      std::memcpy(c.positions, t->positions, sizeof(c.positions));
      out.push_back(c);
    }
  }
  return out;
}

void Arena::ClearTag(FrameRef frame) {
  TagOf(segments_[frame.segment], frame.frame)->owner.store(0, std::memory_order_release);
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

void Arena::WriteTag(FrameRef frame, uint64_t owner, uint32_t layer, uint32_t kv_head,
                     const uint32_t* positions, uint32_t count) {
  abi::FrameTag* t = TagOf(segments_[frame.segment], frame.frame);
  t->owner.store(0, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  t->layer = layer;
  t->kv_head = kv_head;
  t->count = count;
  t->reserved = 0;
  std::memcpy(t->positions, positions, sizeof(uint32_t) * std::min(count, abi::kMaxTagSlots));
  // The rows and the fields above are in place before the owner names them.
  t->owner.store(owner, std::memory_order_release);
}

uint32_t Arena::FrameVersion(FrameRef frame) const {
  return segments_[frame.segment].versions[frame.frame].load(std::memory_order_acquire);
}

void Arena::BumpFrameVersion(FrameRef frame) {
  segments_[frame.segment].versions[frame.frame].fetch_add(1, std::memory_order_acq_rel);
}

uint64_t Arena::StagingFootprint(uint64_t bytes) { return RoundUp(bytes, kStagingAlign); }

absl::StatusOr<abi::ArenaRef> Arena::AllocStaging(uint64_t bytes, uint64_t tag) {
  if (bytes == 0) return absl::InvalidArgumentError("staging buffer of 0 bytes");
  if (bytes > (uint64_t{1} << 48)) {
    return absl::InvalidArgumentError(absl::StrCat("staging buffer of ", bytes, " bytes"));
  }
  const uint64_t need = RoundUp(bytes, kStagingAlign);
  absl::MutexLock lock(&mu_);
  for (uint32_t i = 1; i < used_segments_; ++i) {
    Segment& s = segments_[i];
    if (s.kind != abi::kSegmentStaging || s.dormant) continue;
    for (auto it = s.free_ranges.begin(); it != s.free_ranges.end(); ++it) {
      if (it->second < need) continue;
      const uint64_t off = it->first, len = it->second;
      s.free_ranges.erase(it);
      if (len > need) s.free_ranges[off + need] = len - need;
      s.allocations[off] = {need, tag};
      ++s.in_use;
      staging_in_use_ += need;
      return abi::ArenaRef{i, 0, off};
    }
  }
  absl::StatusOr<uint32_t> seg =
      AddSizedSegment(abi::kSegmentStaging, RoundUp(options_.staging_segment_bytes, kStagingAlign),
                      need, kStagingAlign, 0);
  if (!seg.ok()) return seg.status();
  Segment& s = segments_[*seg];
  s.free_ranges.clear();
  if (s.bytes > need) s.free_ranges[need] = s.bytes - need;
  s.allocations[0] = {need, tag};
  ++s.in_use;
  staging_in_use_ += need;
  return abi::ArenaRef{*seg, 0, 0};
}

uint64_t Arena::StagingBytes(uint64_t tag) const {
  absl::MutexLock lock(&mu_);
  uint64_t total = 0;
  for (uint32_t i = 1; i < used_segments_; ++i) {
    for (const auto& [off, a] : segments_[i].allocations) total += a.tag == tag ? a.length : 0;
  }
  return total;
}

absl::StatusOr<const Arena::Segment::Allocation*> Arena::FindStaging(
    const abi::ArenaRef& ref, uint64_t bytes, std::optional<uint64_t> tag,
    std::string_view wrong_tag) const {
  if (ref.segment == 0 || ref.segment >= used_segments_ ||
      segments_[ref.segment].kind != abi::kSegmentStaging || segments_[ref.segment].dormant) {
    return absl::InvalidArgumentError(
        absl::StrCat("segment ", ref.segment, " is not a staging segment of this client"));
  }
  const Segment& s = segments_[ref.segment];
  auto it = s.allocations.find(ref.offset);
  if (it == s.allocations.end()) {
    return absl::InvalidArgumentError("staging reference is not a live staging buffer");
  }
  if (it->second.length < bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("staging buffer holds ", it->second.length, " bytes, ", bytes, " needed"));
  }
  if (tag.has_value() && it->second.tag != *tag) {
    return absl::InvalidArgumentError(std::string(wrong_tag));
  }
  return &it->second;
}

void Arena::FreeStagingAt(const abi::ArenaRef& ref) {
  Segment& s = segments_[ref.segment];
  auto it = s.allocations.find(ref.offset);
  uint64_t off = it->first, len = it->second.length;
  s.allocations.erase(it);
  --s.in_use;
  staging_in_use_ -= len;
  // Coalesce with the free neighbours.
  auto next = s.free_ranges.lower_bound(off);
  if (next != s.free_ranges.end() && next->first == off + len) {
    len += next->second;
    next = s.free_ranges.erase(next);
  }
  if (next != s.free_ranges.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) {
      off = prev->first;
      len += prev->second;
      s.free_ranges.erase(prev);
    }
  }
  s.free_ranges[off] = len;
  MaybeReclaim(ref.segment);
  if (listener_ != nullptr) listener_->OnStagingFreed();
}

absl::Status Arena::FreeStaging(const abi::ArenaRef& ref) {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<const Segment::Allocation*> a = FindStaging(ref, 0, std::nullopt, {});
  if (!a.ok()) return a.status();
  if ((*a)->pinned) {
    return absl::FailedPreconditionError(
        "the buffer is in use by a request in flight: release it after that request's answer");
  }
  FreeStagingAt(ref);
  return absl::OkStatus();
}

absl::StatusOr<uint8_t*> Arena::StagingAddress(const abi::ArenaRef& ref, uint64_t bytes,
                                               std::optional<uint64_t> tag,
                                               std::string_view wrong_tag) const {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<const Segment::Allocation*> a = FindStaging(ref, bytes, tag, wrong_tag);
  if (!a.ok()) return a.status();
  return static_cast<uint8_t*>(segments_[ref.segment].base) + ref.offset;
}

absl::StatusOr<uint8_t*> Arena::PinStaging(const abi::ArenaRef& ref, uint64_t bytes,
                                           std::optional<uint64_t> tag,
                                           std::string_view wrong_tag) {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<const Segment::Allocation*> a = FindStaging(ref, bytes, tag, wrong_tag);
  if (!a.ok()) return a.status();
  if ((*a)->pinned) {
    return absl::FailedPreconditionError(
        "the buffer is in use by another request in flight (one request per buffer at a time)");
  }
  segments_[ref.segment].allocations.at(ref.offset).pinned = true;
  return static_cast<uint8_t*>(segments_[ref.segment].base) + ref.offset;
}

absl::Status Arena::UnpinStaging(const abi::ArenaRef& ref, bool consumed) {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<const Segment::Allocation*> a = FindStaging(ref, 0, std::nullopt, {});
  if (!a.ok()) return a.status();
  if (!(*a)->pinned) return absl::InvalidArgumentError("the staging buffer is not pinned");
  segments_[ref.segment].allocations.at(ref.offset).pinned = false;
  if (consumed) FreeStagingAt(ref);
  return absl::OkStatus();
}

uint64_t Arena::segment_bytes() const {
  absl::MutexLock lock(&mu_);
  uint64_t total = 0;
  for (uint32_t i = 0; i < used_segments_; ++i)
    total += segments_[i].dormant ? 0 : segments_[i].bytes;
  return total;
}

uint32_t Arena::beyond_promise_segments() const {
  absl::MutexLock lock(&mu_);
  return beyond_promise_segments_;
}

uint32_t Arena::dormant_segments() const {
  absl::MutexLock lock(&mu_);
  uint32_t n = 0;
  for (uint32_t i = 0; i < used_segments_; ++i) n += segments_[i].dormant ? 1 : 0;
  return n;
}

uint64_t Arena::frames_in_use() const {
  absl::MutexLock lock(&mu_);
  return frames_in_use_;
}

uint64_t Arena::frame_bytes_in_use() const {
  absl::MutexLock lock(&mu_);
  return frame_bytes_in_use_;
}

uint64_t Arena::staging_bytes_in_use() const {
  absl::MutexLock lock(&mu_);
  return staging_in_use_;
}

abi::SlotHeader* Arena::Slot(uint32_t i) const {
  const uint64_t sq = RoundUp(sizeof(abi::ArenaHeader), 64);
  const uint64_t slots = sq + RoundUp(uint64_t{options_.slots} * 4, 64);
  return reinterpret_cast<abi::SlotHeader*>(static_cast<uint8_t*>(control()) + slots +
                                            uint64_t{i} *
                                                (sizeof(abi::SlotHeader) + options_.slot_payload));
}

std::atomic<uint32_t>* Arena::SubmissionQueue() const {
  return reinterpret_cast<std::atomic<uint32_t>*>(static_cast<uint8_t*>(control()) +
                                                  RoundUp(sizeof(abi::ArenaHeader), 64));
}

void Arena::DetachListener() {
  absl::MutexLock lock(&mu_);
  listener_ = nullptr;
}

uint32_t Arena::num_segments() const {
  absl::MutexLock lock(&mu_);
  return used_segments_;
}

}  // namespace icecache
