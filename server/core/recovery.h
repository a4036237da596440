// What a restarted daemon rebuilds a client's sequences from: the client's previous arena,
// handed back on a recovery attach (abi::kAttachRecover). The pages of a sequence survive a
// daemon crash in the shared memory the client still holds; the frame tags (abi::FrameTag)
// say which sequence, layer, KV head and positions each frame holds. Everything in those
// segments is the client's to write, so nothing in them is trusted: the segment table of the
// old control segment, every tag and every row are checked and copied before use, and a
// client that lies only loses its own sequences (DATA_LOSS on restore).
//
// Thread safety: const methods are thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/core/geometry.h"
#include "server/core/memory_accountant.h"
#include "server/core/sequence_kv.h"

namespace icecache {

class DonatedArena {
 public:
  // `fds`: the previous arena's segments in order, control segment first (the object takes
  // them: each is closed when it is destroyed, also on error). Each must be a sealed memfd
  // (F_SEAL_SHRINK and F_SEAL_GROW, so that nobody can shrink it under the daemon's mapping).
  // INVALID_ARGUMENT when they are not, or the control segment is not an arena's.
  // RESOURCE_EXHAUSTED when the segments hold more than `max_bytes` together (an arena is
  // never larger than the memory limit: more is not an arena, and scanning it would only
  // burn the daemon's time).
  // The index of tagged frames built here is daemon memory the client's request makes: it is
  // charged to `memory` (when not null) for the object's life, its bound (kFrameIndexBytes per
  // frame the segments could hold, at most 1.2% of their bytes) before the tags are read, what
  // it takes after; RESOURCE_EXHAUSTED when the bound does not fit.
  static absl::StatusOr<std::unique_ptr<DonatedArena>> Map(std::vector<int> fds, uint64_t max_bytes,
                                                           MemoryAccountant* memory = nullptr);
  ~DonatedArena();
  DonatedArena(const DonatedArena&) = delete;
  DonatedArena& operator=(const DonatedArena&) = delete;

  // Frames found tagged with `owner` (durable id), over every layer and head.
  uint64_t FramesOf(uint64_t owner) const;
  uint64_t bytes() const;                              // of every mapped segment
  uint64_t charged_bytes() const { return charged_; }  // to the accountant, for the index
  uint32_t segments() const { return static_cast<uint32_t>(segments_.size()); }

  // The rows of one sequence (durable id `owner`, geometry `g`) as a restore reads them.
  std::unique_ptr<SequenceKv::RowSource> RowsOf(uint64_t owner, const Geometry& g) const;

 private:
  struct Segment {
    int fd = -1;
    const uint8_t* base = nullptr;
    uint64_t bytes = 0;
    uint32_t kind = 0;
    uint32_t page_bytes = 0;
  };
  // A tagged frame as indexed at Map (its positions are read from its tag again at Gather,
  // where the tag must still say the same owner, layer, head and count).
  struct Frame {
    uint64_t owner = 0;
    uint32_t layer = 0;
    uint32_t segment = 0;
    uint32_t frame = 0;
    uint16_t kv_head = 0;
    uint16_t count = 0;
  };
  class Rows;
  DonatedArena() = default;

 public:
  static constexpr uint64_t kFrameIndexBytes = sizeof(Frame);

 private:
  std::vector<Segment> segments_;
  // Every tagged frame, by (owner, layer), and in segment and frame order within one (the first
  // copy of a row found is the one taken). One flat array: its bytes are what is charged.
  std::vector<Frame> frames_;
  MemoryAccountant* memory_ = nullptr;
  uint64_t charged_ = 0;
};

}  // namespace icecache
