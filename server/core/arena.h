// One client's shared memory: memfd-backed segments (never named in /dev/shm) holding the
// control segment (header, submission queue, request slots, stats; layout in
// proto/icecache/v1/abi.h), page frames and staging buffers.
//
// Memory: every segment's bytes are charged, when it is created, to the client's quota and
// the daemon-wide physical limit (RESOURCE_EXHAUSTED, nothing created, when either is full)
// and released when the arena dies. Segments are sealed against shrinking, so a client that
// ftruncates its descriptor cannot make the daemon fault on its own mapping.
//
// Page frames: a page segment holds frames of one size (page_bytes); frames are handed out
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
  // `quota_bytes` and to `global` (which must outlive the arena). RESOURCE_EXHAUSTED when the
  // control segment does not fit; INTERNAL when memfd or mmap fail.
  static absl::StatusOr<std::unique_ptr<Arena>> Create(uint64_t client_id,
                                                       const ArenaOptions& options,
                                                       uint64_t quota_bytes,
                                                       MemoryAccountant* global,
                                                       SegmentListener* listener);

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
  void BumpFrameVersion(FrameRef frame);

  // ---- staging buffers
  // A buffer of `bytes` (4 KiB aligned) in a staging segment. RESOURCE_EXHAUSTED when a new
  // staging segment is needed and does not fit; INVALID_ARGUMENT for 0 bytes.
  absl::StatusOr<abi::ArenaRef> AllocStaging(uint64_t bytes);
  // INVALID_ARGUMENT unless `ref` is exactly a live staging allocation of this arena.
  absl::Status FreeStaging(const abi::ArenaRef& ref);
  // The address of a live staging allocation whose size is at least `bytes`; INVALID_ARGUMENT
  // otherwise (a client-supplied reference is checked here before any use).
  absl::StatusOr<uint8_t*> StagingAddress(const abi::ArenaRef& ref, uint64_t bytes) const;

  // ---- introspection
  uint64_t segment_bytes() const;  // all segments, control included
  uint64_t frames_in_use() const;
  uint64_t frame_bytes_in_use() const;
  uint64_t staging_bytes_in_use() const;
  uint32_t num_segments() const;

 private:
  struct Segment {
    int fd = -1;
    void* base = nullptr;
    uint64_t bytes = 0;
    uint32_t kind = abi::kSegmentUnused;
    uint32_t page_bytes = 0;
    uint32_t frames = 0;
    std::unique_ptr<std::atomic<uint32_t>[]> versions;  // page segments: one per frame
    std::map<uint64_t, uint64_t> free_ranges;           // staging segments: offset -> length
    std::map<uint64_t, uint64_t> allocations;           // staging segments: offset -> length
  };

  Arena(uint64_t client_id, const ArenaOptions& options, uint64_t quota_bytes,
        MemoryAccountant* global, SegmentListener* listener)
      : client_id_(client_id),
        options_(options),
        quota_(quota_bytes),
        global_(global),
        listener_(listener) {}

  // Creates, maps, seals and charges a segment; publishes it in the header.
  absl::StatusOr<uint32_t> AddSegment(uint32_t kind, uint64_t bytes, uint32_t page_bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReturnFrames(std::vector<FrameRef>* frames);

  const uint64_t client_id_;
  const ArenaOptions options_;
  MemoryAccountant quota_;
  MemoryAccountant* const global_;
  SegmentListener* listener_ ABSL_GUARDED_BY(mu_);

  mutable absl::Mutex mu_;
  // Fixed capacity (kMaxSegments) so that Segment addresses never move.
  std::vector<Segment> segments_;
  uint32_t used_segments_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<uint32_t, std::vector<FrameRef>> free_frames_ ABSL_GUARDED_BY(mu_);  // by page_bytes
  uint64_t frames_in_use_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t frame_bytes_in_use_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t staging_in_use_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t charged_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace icecache
