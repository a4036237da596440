#include "client/decode_plan.h"

#include <algorithm>
#include <cstring>

namespace icecache::client_internal {
namespace {

size_t Align16(size_t n) { return (n + 15) / 16 * 16; }

}  // namespace

DecodePlan::DecodePlan(uint32_t heads, uint32_t max_items, uint32_t max_chunks_per_head)
    : heads_(heads),
      max_items_(max_items),
      max_chunks_per_head_(max_chunks_per_head),
      chunks_at_(Align16(size_t{max_items} * sizeof(GatherItem)) +
                 Align16(size_t{heads} * max_chunks_per_head * sizeof(AttentionChunk))) {
  items_.reserve(max_items);
  chunks_.reserve(size_t{heads} * max_chunks_per_head);
  offsets_.reserve(heads + 1);
}

void DecodePlan::Clear() {
  items_.clear();
  chunks_.clear();
  offsets_.clear();
  overflow_ = false;
}

void DecodePlan::BeginHead() {
  if (!offsets_.empty() && chunks_.size() - offsets_.back() > max_chunks_per_head_) {
    overflow_ = true;
  }
  offsets_.push_back(static_cast<uint32_t>(chunks_.size()));
}

void DecodePlan::AddRows(const uint8_t* k, const uint8_t* v, uint64_t row_bytes, uint64_t begin,
                         uint64_t count) {
  while (count > 0) {
    const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(count, kChunkRows));
    chunks_.push_back({k + begin * row_bytes, v + begin * row_bytes, n, 0});
    begin += n;
    count -= n;
  }
}

void DecodePlan::AddPage(const uint8_t* page, uint64_t half_bytes, uint32_t valid) {
  chunks_.push_back({page, page + half_bytes, valid, 0});
}

void DecodePlan::AddGather(const void* src, void* dst) {
  if (items_.size() >= max_items_) {
    overflow_ = true;
    return;
  }
  items_.push_back({src, dst});
}

absl::Status DecodePlan::Finish() {
  BeginHead();  // closes the last head (checks its size) and appends the end offset
  if (overflow_ || offsets_.size() < 2 || offsets_.size() > size_t{heads_} + 1) {
    return absl::InternalError("a decode step's descriptors exceed the plan's capacity");
  }
  return absl::OkStatus();
}

DecodePlan::View DecodePlan::Serialize(uint8_t* host, const uint8_t* device, size_t* used) const {
  const size_t chunks_off = Align16(size_t{max_items_} * sizeof(GatherItem));
  const size_t offsets_off = chunks_at_;
  std::memcpy(host, items_.data(), items_.size() * sizeof(GatherItem));
  std::memcpy(host + chunks_off, chunks_.data(), chunks_.size() * sizeof(AttentionChunk));
  std::memcpy(host + offsets_off, offsets_.data(), offsets_.size() * sizeof(uint32_t));
  *used = offsets_off + offsets_.size() * sizeof(uint32_t);
  View v;
  v.items = reinterpret_cast<const GatherItem*>(device);
  v.chunks = reinterpret_cast<const AttentionChunk*>(device + chunks_off);
  v.chunk_offsets = reinterpret_cast<const uint32_t*>(device + offsets_off);
  return v;
}

uint32_t DecodePlan::max_chunks_in_a_head() const {
  uint32_t m = 0;
  for (size_t h = 0; h + 1 < offsets_.size(); ++h) m = std::max(m, offsets_[h + 1] - offsets_[h]);
  return m;
}

uint64_t DecodePlan::attended_rows() const {
  uint64_t rows = 0;
  for (const AttentionChunk& c : chunks_) rows += c.count;
  return rows;
}

}  // namespace icecache::client_internal
