// One client's shared memory: memfd-backed segments (never named in /dev/shm) holding the
// control segment (header, submission queue, request slots, stats; layout in
// proto/icecache/v1/abi.h), page frames and staging buffers.
//
// Memory: every segment's bytes are charged, when it is created, to the client's
// ClientBudget (memory_accountant.h: within what the client's sequences were promised, or
// beyond it against the daemon-wide limit; RESOURCE_EXHAUSTED, nothing created, when that is
// full) and released when the arena dies. A new segment is sized to the headroom of its
// kind's share of the promises (page frames or staging) when that is below the segment's
// size, so the arena holds no more than was promised and staging never takes the page
// frames' room. A segment is the configured size or an eighth of what its kind holds (up to
// 32 configured sizes), whichever is larger: a large arena fits its client's
// kMaxArenaSegments (250 of 64 MiB would hold 16 GiB; growing, about 440 GiB). Beyond the promises
// a new segment is the smaller of the two (at least the need), so an arena that outgrows a promise
// adds a few segments, not one per request. While the arena holds more than was promised (sequences
// dropped), segments that empty are given back: their memory is freed (the file keeps its size;
// pages read as zeros), their charge released, and they are reused, possibly for another page size
// or kind, when a segment is needed again (versions of reused frames continue above every earlier
// one); never for a client that pins its segments with a device (ArenaOptions::keep_segments).
// Segments are sealed against shrinking, so a client that ftruncates its descriptor cannot
// make the daemon fault on its own mapping.
//
// Page frames: a page segment holds frames of one size (page_bytes), then one abi::FrameTag
// per frame (what a restarted daemon rebuilds the sequences from); frames are handed out
// through FrameReservations (reserve first, when failure is still allowed; take later, when it
// is not). Each frame carries a version, bumped whenever its content changes or it is freed.
//
// Thread safety: all methods are thread-safe (one internal mutex). Addresses returned stay
// valid for the arena's lifetime.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "proto/icecache/v1/abi.h"
#include "server/core/memory_accountant.h"

namespace icecache {

struct ArenaOptions {
  uint32_t slots = abi::kDefaultSlots;                  // request slots, a power of two
  uint32_t slot_payload = abi::kDefaultSlotPayload;     // bytes of payload per slot
  uint64_t page_segment_bytes = uint64_t{64} << 20;     // size of a page segment
  uint64_t staging_segment_bytes = uint64_t{64} << 20;  // minimum size of a staging segment
  // Never give a segment back (the client pins them with a device: abi::kAttachPinsSegments).
  bool keep_segments = false;
};

struct FrameRef {
  uint32_t segment = abi::kNoSegment;
  uint32_t frame = 0;
  bool valid() const { return segment != abi::kNoSegment; }
  friend bool operator==(const FrameRef&, const FrameRef&) = default;
};

// Told about every data segment the arena adds (the data plane forwards its descriptor to the
// client). Called with the arena's lock held: must not call back into the arena.
class SegmentListener {
 public:
  virtual ~SegmentListener() = default;
  virtual void OnSegmentAdded(uint32_t segment, int fd, uint64_t bytes) = 0;
  // A staging buffer was freed (someone may be waiting for staging room).
  virtual void OnStagingFreed() {}
};

class Arena {
 public:
  // Frames set aside for one operation; whatever is not taken returns to the free list when
  // the reservation is destroyed.
  class FrameReservation {
   public:
    FrameReservation() = default;
    FrameReservation(const FrameReservation&) = delete;
    FrameReservation& operator=(const FrameReservation&) = delete;
    ~FrameReservation();
    // A reserved frame. Taking more than was reserved is a broken invariant (aborts).
    FrameRef Take();
    size_t remaining() const { return frames_.size(); }

   private:
    friend class Arena;
    Arena* arena_ = nullptr;
    std::vector<FrameRef> frames_;
  };

  // Creates the control segment. Every segment is charged to the arena's own quota of
  // `quota_bytes` and to `global` (which must outlive the arena), with nothing promised
  // beforehand. RESOURCE_EXHAUSTED when the control segment does not fit; INTERNAL when memfd
  // or mmap fail.
  static absl::StatusOr<std::unique_ptr<Arena>> Create(uint64_t client_id,
                                                       const ArenaOptions& options,
                                                       uint64_t quota_bytes,
                                                       MemoryAccountant* global,
                                                       SegmentListener* listener);
  // The same, charging a client's budget (which the arena keeps: the client's sequences
  // promise through budget()).
  static absl::StatusOr<std::unique_ptr<Arena>> Create(uint64_t client_id,
                                                       const ArenaOptions& options,
                                                       std::unique_ptr<ClientBudget> budget,
                                                       SegmentListener* listener);
  ClientBudget* budget() const { return budget_.get(); }

  // No more segment notifications (the client is gone). Thread-safe.
  void DetachListener();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena();  // unmaps and closes every segment, releases their bytes

  int control_fd() const { return segments_[0].fd; }
  uint64_t control_bytes() const { return segments_[0].bytes; }
  abi::ArenaHeader* header() const { return static_cast<abi::ArenaHeader*>(segments_[0].base); }
  void* control() const { return segments_[0].base; }
  const ArenaOptions& options() const { return options_; }
  // Request slot i and the submission queue, located with the daemon's own layout (never the
  // offsets in the shared header, which the client can overwrite). i < options().slots.
  abi::SlotHeader* Slot(uint32_t i) const;
  std::atomic<uint32_t>* SubmissionQueue() const;

  // ---- page frames
  // Sets aside `count` frames of `page_bytes`, adding page segments as needed.
  // RESOURCE_EXHAUSTED (and nothing set aside) when the segments do not fit.
  absl::Status ReserveFrames(uint32_t page_bytes, uint32_t count, FrameReservation* out);
  void FreeFrame(FrameRef frame);
  uint8_t* FrameAddress(FrameRef frame) const;
  uint32_t FrameVersion(FrameRef frame) const;
  // The frame's tag (abi::FrameTag): written after the frame's rows, owner last; cleared
  // (owner 0) before the frame is rewritten in place, and by FreeFrame.
  void WriteTag(FrameRef frame, uint64_t owner, uint32_t layer, uint32_t kv_head,
                const uint32_t* positions, uint32_t count);
  void ClearTag(FrameRef frame);
  // From now on FreeFrame leaves tags as they are and no segment is given back (punched):
  // the daemon is stopping and the client, which keeps the memory, will hand it to the
  // successor (docs/data_plane.md, Recovery).
  void KeepTagsOnRelease() { keep_tags_.store(true, std::memory_order_release); }
  // A copy of the tag of every frame of every page segment (introspection and tests).
  struct TagCopy {
    FrameRef frame;
    uint64_t owner = 0;
    uint32_t layer = 0, kv_head = 0, count = 0;
    uint32_t positions[abi::kMaxTagSlots] = {};
  };
  std::vector<TagCopy> Tags() const;
  void BumpFrameVersion(FrameRef frame);

  // Gives back every empty segment while the arena holds more than was promised (as a free
  // that empties a segment does): for a promise that shrank after its segments emptied.
  void GiveBackEmptySegments();

  // ---- staging buffers
  // A buffer of `bytes` (4 KiB aligned) in a staging segment. RESOURCE_EXHAUSTED when a new
  // staging segment is needed and does not fit; INVALID_ARGUMENT for 0 bytes. `tag` (any
  // value, e.g. the sequence's) groups buffers for StagingBytes.
  absl::StatusOr<abi::ArenaRef> AllocStaging(uint64_t bytes, uint64_t tag = 0);
  // Bytes (4 KiB aligned) of the live staging buffers allocated with `tag`.
  uint64_t StagingBytes(uint64_t tag) const;
  // Bytes one buffer of `bytes` takes (4 KiB aligned).
  static uint64_t StagingFootprint(uint64_t bytes);
  // INVALID_ARGUMENT unless `ref` is exactly a live staging allocation of this arena;
  // FAILED_PRECONDITION (nothing freed) while a request in flight uses it (PinStaging).
  absl::Status FreeStaging(const abi::ArenaRef& ref);
  // The address of a live staging allocation whose size is at least `bytes`; INVALID_ARGUMENT
  // otherwise (a client-supplied reference is checked here before any use), and also unless
  // the allocation was made with `tag` when one is given (`wrong_tag`: that error's message).
  absl::StatusOr<uint8_t*> StagingAddress(const abi::ArenaRef& ref, uint64_t bytes,
                                          std::optional<uint64_t> tag = std::nullopt,
                                          std::string_view wrong_tag = kWrongTag) const;
  // As StagingAddress, and marks the buffer in use by one request in flight, which reads or
  // writes it after the call: until UnpinStaging, FreeStaging refuses it (a client cannot
  // release it and have its range reused, or its segment given back, under the request), and
  // a second pin is refused (FAILED_PRECONDITION: one request per buffer at a time).
  absl::StatusOr<uint8_t*> PinStaging(const abi::ArenaRef& ref, uint64_t bytes,
                                      std::optional<uint64_t> tag = std::nullopt,
                                      std::string_view wrong_tag = kWrongTag);
  // Ends the use PinStaging began; `consumed`: the buffer is freed too. INVALID_ARGUMENT
  // unless `ref` is a pinned live staging allocation (nothing changes then).
  absl::Status UnpinStaging(const abi::ArenaRef& ref, bool consumed);
  static constexpr std::string_view kWrongTag = "the buffer was allocated for another use";

  // ---- introspection
  uint64_t segment_bytes() const;  // all segments, control included
  uint64_t frames_in_use() const;
  uint64_t frame_bytes_in_use() const;
  uint64_t staging_bytes_in_use() const;
  uint32_t num_segments() const;
  // Segments given back (memory freed, charge released) and not reused yet.
  uint32_t dormant_segments() const;
  // Segments created or reused while the arena held more than its sequences were promised
  // (a promise estimated short; 0 while every promise holds). Arenas nothing was promised
  // to never count.
  uint32_t beyond_promise_segments() const;

 private:
  struct Segment {
    int fd = -1;
    void* base = nullptr;
    uint64_t bytes = 0;
    uint32_t kind = abi::kSegmentUnused;
    uint32_t page_bytes = 0;
    uint32_t frames = 0;
    std::unique_ptr<std::atomic<uint32_t>[]> versions;  // page segments: one per frame
    uint32_t next_version = 0;  // page segments: above every version a frame here ever had
    std::map<uint64_t, uint64_t> free_ranges;  // staging segments: offset -> length
    struct Allocation {
      uint64_t length = 0;
      uint64_t tag = 0;
      bool pinned = false;  // in use by a request in flight (PinStaging)
    };
    std::map<uint64_t, Allocation> allocations;  // staging segments: offset -> allocation
    uint64_t in_use = 0;   // frames reserved or taken (pages), live buffers (staging)
    bool dormant = false;  // given back: memory freed, charge released, reusable
  };

  Arena(uint64_t client_id, const ArenaOptions& options, std::unique_ptr<ClientBudget> budget,
        SegmentListener* listener)
      : client_id_(client_id), options_(options), budget_(std::move(budget)), listener_(listener) {}

  // A segment of `kind` with at least `bytes` (exactly `bytes` when new): a dormant one
  // reused, or one created, mapped, sealed and charged; published in the header.
  absl::StatusOr<uint32_t> AddSegment(uint32_t kind, uint64_t bytes, uint32_t page_bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sets segment `index` up as `kind` (frames, versions, free ranges) and publishes it.
  void TypeSegment(uint32_t index, uint32_t kind, uint32_t page_bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Gives segment `index` back when it is empty and the arena holds more than was promised.
  void MaybeReclaim(uint32_t index) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Size of a new segment of `kind` for a need of `need` bytes, in multiples of `unit`: the
  // configured size or an eighth of what the kind holds (at most kMaxGrowth configured
  // sizes), whichever is larger, but no more than the headroom of the kind's share of the
  // promises (never below `need`); beyond that share, the smaller of the configured size and
  // the eighth (at least `need`).
  static constexpr uint64_t kMaxGrowth = 32;
  uint64_t NewSegmentBytes(uint64_t configured, uint64_t need, uint64_t unit, uint32_t kind) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether a new segment of `bytes` takes the arena beyond what its sequences were promised
  // (never for an arena nothing was promised to).
  bool BeyondPromise(uint64_t bytes) const;
  // AddSegment of NewSegmentBytes; where a segment beyond the promises larger than `need` does
  // not fit (RESOURCE_EXHAUSTED), one of exactly `need`.
  absl::StatusOr<uint32_t> AddSizedSegment(uint32_t kind, uint64_t configured, uint64_t need,
                                           uint64_t unit, uint32_t page_bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReturnFrames(std::vector<FrameRef>* frames);
  // The live staging allocation `ref` names (at least `bytes`, with `tag` when one is
  // given), or INVALID_ARGUMENT.
  absl::StatusOr<const Segment::Allocation*> FindStaging(const abi::ArenaRef& ref, uint64_t bytes,
                                                         std::optional<uint64_t> tag,
                                                         std::string_view wrong_tag) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees the live staging allocation at `ref` (found by FindStaging).
  void FreeStagingAt(const abi::ArenaRef& ref) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static abi::FrameTag* TagOf(const Segment& s, uint32_t frame);

  const uint64_t client_id_;
  const ArenaOptions options_;
  std::atomic<bool> keep_tags_{false};
  // Destroyed after the segments are released (declared before them).
  const std::unique_ptr<ClientBudget> budget_;
  SegmentListener* listener_ ABSL_GUARDED_BY(mu_);

  mutable absl::Mutex mu_;
  // Fixed capacity (kMaxSegments) so that Segment addresses never move.
  std::vector<Segment> segments_;
  uint32_t used_segments_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<uint32_t, std::vector<FrameRef>> free_frames_ ABSL_GUARDED_BY(mu_);  // by page_bytes
  uint64_t frames_in_use_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t frame_bytes_in_use_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t staging_in_use_ ABSL_GUARDED_BY(mu_) = 0;
  uint32_t beyond_promise_segments_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace icecache
