// The descriptors of one decode step of one layer (internal to libicecache_client): a gather
// item for every missed page, and per KV head the chunk list that attention reads (sink,
// window, then the selected pages' cached copies). Built on the host, laid out in one buffer
//   [ items (16-aligned) | chunks (16-aligned) | chunk offsets ]
// that is copied to working memory in one copy, so a step costs one descriptor copy, one
// gather launch and one attention launch. Pointers inside are the addresses the kernels use.
//
// Thread safety: none (one owner).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/attention.h"
#include "kernels/gather.h"

namespace icecache::client_internal {

class DecodePlan {
 public:
  // Long runs (full-KV layers, long windows) are cut into chunks of at most this many rows,
  // so that the attention kernel's splits have work to share.
  static constexpr uint32_t kChunkRows = 128;

  // Capacity: up to `heads` KV heads, at most `max_items` gather items and
  // `max_chunks_per_head` chunks in any head.
  DecodePlan(uint32_t heads, uint32_t max_items, uint32_t max_chunks_per_head);

  // Bytes of the descriptor buffer at capacity (allocate this much on both sides).
  size_t buffer_bytes() const { return chunks_at_ + offsets_bytes(); }

  void Clear();
  // A point to come back to: Rewind(mark) drops everything added after Mark() (a sequence of
  // a batch that failed half-way through its heads).
  struct Mark {
    size_t items = 0, chunks = 0, offsets = 0;
  };
  Mark Marker() const { return Mark{items_.size(), chunks_.size(), offsets_.size()}; }
  void Rewind(const Mark& m) {
    items_.resize(m.items);
    chunks_.resize(m.chunks);
    offsets_.resize(m.offsets);
  }
  // Starts the next KV head's chunk list (heads in order).
  void BeginHead();
  // Rows [begin, begin + count) of one head's K and V buffers (rows row_bytes apart).
  void AddRows(const uint8_t* k, const uint8_t* v, uint64_t row_bytes, uint64_t begin,
               uint64_t count);
  // One cached page: K at `page`, V at page + half_bytes, `valid` rows.
  void AddPage(const uint8_t* page, uint64_t half_bytes, uint32_t valid);
  // A page to gather: page_bytes from src to dst.
  void AddGather(const void* src, void* dst);
  // Closes the plan after the last head. INTERNAL when a capacity was exceeded or there is no
  // head.
  absl::Status Finish();

  struct View {
    const GatherItem* items = nullptr;
    const AttentionChunk* chunks = nullptr;
    const uint32_t* chunk_offsets = nullptr;
  };
  // Writes the finished plan to `host` (buffer_bytes()) and returns where each part will be
  // once the buffer's bytes are at `device`. `used` receives the bytes to copy.
  View Serialize(uint8_t* host, const uint8_t* device, size_t* used) const;

  uint32_t num_items() const { return static_cast<uint32_t>(items_.size()); }
  uint32_t max_chunks_in_a_head() const;
  // Rows attended over every head.
  uint64_t attended_rows() const;
  const std::vector<AttentionChunk>& chunks() const { return chunks_; }
  const std::vector<uint32_t>& offsets() const { return offsets_; }

 private:
  size_t offsets_bytes() const { return (size_t{heads_} + 1) * sizeof(uint32_t); }

  const uint32_t heads_, max_items_, max_chunks_per_head_;
  const size_t chunks_at_;  // offset of the chunks; offsets follow at buffer_bytes() - ...
  std::vector<GatherItem> items_;
  std::vector<AttentionChunk> chunks_;
  std::vector<uint32_t> offsets_;  // [heads + 1] once finished
  bool overflow_ = false;
};

}  // namespace icecache::client_internal
