#include "eval/baselines.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "server/index/simd.h"

namespace icecache::eval {

// ================================================================= PositionalIndex
PositionalIndex::PositionalIndex(const IndexGeometry& geometry, const PageReader* reader)
    : geometry_(geometry), reader_(reader) {}

absl::Status PositionalIndex::Build(const KeyBatch& batch, PageWriter* writer) {
  absl::Status valid = ValidateBatch(geometry_, batch);
  if (!valid.ok()) return valid;
  if (writer == nullptr) return absl::InvalidArgumentError("null page writer");
  absl::MutexLock lock(&mu_);
  if (built_) return absl::FailedPreconditionError("index is already built");
  built_ = true;
  return Append(batch, writer);
}

absl::Status PositionalIndex::Insert(const KeyBatch& batch, PageWriter* writer) {
  absl::Status valid = ValidateBatch(geometry_, batch);
  if (!valid.ok()) return valid;
  if (writer == nullptr) return absl::InvalidArgumentError("null page writer");
  absl::MutexLock lock(&mu_);
  if (!built_) return absl::FailedPreconditionError("insert before build");
  return Append(batch, writer);
}

absl::Status PositionalIndex::Append(const KeyBatch& batch, PageWriter* writer) {
  const uint32_t ps = geometry_.page_size;
  const uint32_t n0 = static_cast<uint32_t>(positions_.size());
  const uint32_t m = batch.keys.rows;
  LayoutChange change;
  uint32_t first_page = n0 / ps;
  for (uint32_t p = (n0 + ps - 1) / ps; p < (n0 + m + ps - 1) / ps; ++p) {
    change.allocated.push_back(p);
  }
  for (uint32_t i = 0; i < m; ++i) {
    const uint32_t t = n0 + i;
    SlotWrite w;
    w.page = t / ps;
    w.slot = t % ps;
    w.src.kind = SlotSource::Kind::kBatch;
    w.src.batch_row = i;
    change.writes.push_back(w);
  }
  for (uint32_t p = first_page; p <= (n0 + m - 1) / ps; ++p) {
    change.changed.push_back({p, std::min(ps, n0 + m - p * ps)});
  }
  writer->Apply(change);
  positions_.insert(positions_.end(), batch.positions, batch.positions + m);
  for (uint32_t p = first_page; p <= (n0 + m - 1) / ps; ++p) {
    const uint32_t begin = std::max(n0, p * ps);
    OnAppended(p, begin - p * ps, std::min((p + 1) * ps, n0 + m) - begin);
  }
  return absl::OkStatus();
}

uint32_t PositionalIndex::num_tokens() const {
  absl::ReaderMutexLock lock(&mu_);
  return static_cast<uint32_t>(positions_.size());
}

uint32_t PositionalIndex::num_pages() const {
  absl::ReaderMutexLock lock(&mu_);
  return static_cast<uint32_t>((positions_.size() + geometry_.page_size - 1) / geometry_.page_size);
}

uint32_t PositionalIndex::valid(uint32_t page) const {
  const uint64_t begin = uint64_t{page} * geometry_.page_size;
  return static_cast<uint32_t>(std::min<uint64_t>(geometry_.page_size, positions_.size() - begin));
}

std::vector<PageInfo> PositionalIndex::Layout() const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<PageInfo> out;
  const uint32_t ps = geometry_.page_size;
  for (uint32_t p = 0; uint64_t{p} * ps < positions_.size(); ++p) {
    PageInfo info;
    info.page = p;
    info.positions.assign(positions_.begin() + p * ps, positions_.begin() + p * ps + valid(p));
    out.push_back(std::move(info));
  }
  return out;
}

uint64_t PositionalIndex::MemoryBytes() const {
  absl::ReaderMutexLock lock(&mu_);
  return positions_.capacity() * sizeof(uint32_t);
}

absl::Status PositionalIndex::CheckSearch(const float* queries, uint32_t group, uint32_t k,
                                          std::vector<SelectedPage>* out) const {
  absl::Status valid_q = ValidateQueries(geometry_, queries, group);
  if (!valid_q.ok()) return valid_q;
  if (out == nullptr) return absl::InvalidArgumentError("null output");
  if (!built_) return absl::FailedPreconditionError("search before build");
  const uint32_t pages =
      static_cast<uint32_t>((positions_.size() + geometry_.page_size - 1) / geometry_.page_size);
  if (k == 0 || k > pages) {
    return absl::InvalidArgumentError(
        absl::StrCat("k must be in 1..", pages, " (the pages of this index), got ", k));
  }
  return absl::OkStatus();
}

// ================================================================= Quest
void QuestIndex::OnAppended(uint32_t page, uint32_t slot, uint32_t count) {
  const uint32_t d = geometry_.dim;
  if (min_.size() < uint64_t{page + 1} * d) {
    min_.resize(uint64_t{page + 1} * d, std::numeric_limits<float>::infinity());
    max_.resize(uint64_t{page + 1} * d, -std::numeric_limits<float>::infinity());
  }
  const uint64_t row_bytes = uint64_t{d} * ElemBytes(geometry_.elem_type);
  std::vector<float> row(d);
  float* lo = min_.data() + uint64_t{page} * d;
  float* hi = max_.data() + uint64_t{page} * d;
  for (uint32_t s = slot; s < slot + count; ++s) {
    ToFloat(static_cast<const uint8_t*>(reader_->PageKeys(page)) + s * row_bytes,
            geometry_.elem_type, d, row.data());
    for (uint32_t c = 0; c < d; ++c) {
      lo[c] = std::min(lo[c], row[c]);
      hi[c] = std::max(hi[c], row[c]);
    }
  }
}

absl::Status QuestIndex::Search(const float* queries, uint32_t group, uint32_t k,
                                std::vector<SelectedPage>* out) const {
  absl::ReaderMutexLock lock(&mu_);
  absl::Status s = CheckSearch(queries, group, k, out);
  if (!s.ok()) return s;
  const uint32_t d = geometry_.dim;
  const uint32_t pages =
      static_cast<uint32_t>((positions_.size() + geometry_.page_size - 1) / geometry_.page_size);
  std::vector<std::vector<SelectedPage>> lists(group);
  for (uint32_t h = 0; h < group; ++h) {
    const float* q = queries + uint64_t{h} * d;
    std::vector<SelectedPage> all(pages);
    for (uint32_t p = 0; p < pages; ++p) {
      const float* lo = min_.data() + uint64_t{p} * d;
      const float* hi = max_.data() + uint64_t{p} * d;
      float bound = 0;
      for (uint32_t c = 0; c < d; ++c) bound += std::max(q[c] * lo[c], q[c] * hi[c]);
      all[p] = {p, valid(p), bound};
    }
    lists[h] = TopPages(std::move(all), k);
  }
  *out = group == 1 ? std::move(lists[0]) : MergeRankInterleaved(lists, k);
  return absl::OkStatus();
}

uint64_t QuestIndex::MemoryBytes() const {
  const uint64_t base = PositionalIndex::MemoryBytes();
  absl::ReaderMutexLock lock(&mu_);
  return base + (min_.capacity() + max_.capacity()) * sizeof(float);
}

// ================================================================= StreamingLLM
absl::Status StreamingIndex::Search(const float* queries, uint32_t group, uint32_t k,
                                    std::vector<SelectedPage>* out) const {
  absl::ReaderMutexLock lock(&mu_);
  absl::Status s = CheckSearch(queries, group, k, out);
  if (!s.ok()) return s;
  out->clear();
  return absl::OkStatus();
}

}  // namespace icecache::eval
