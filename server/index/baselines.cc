#include "server/index/baselines.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "server/index/simd.h"

namespace icecache::index {
namespace {

bool ByScore(const SelectedPage& a, const SelectedPage& b) {
  return a.score > b.score || (a.score == b.score && a.page < b.page);
}

// Keeps the k best of `all` (by score), best first.
std::vector<SelectedPage> TopK(std::vector<SelectedPage> all, uint32_t k) {
  const size_t kk = std::min<size_t>(k, all.size());
  std::partial_sort(all.begin(), all.begin() + kk, all.end(), ByScore);
  all.resize(kk);
  return all;
}

}  // namespace

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
  return static_cast<uint32_t>((positions_.size() + geometry_.page_size - 1) /
                               geometry_.page_size);
}

uint32_t PositionalIndex::valid(uint32_t page) const {
  const uint64_t begin = uint64_t{page} * geometry_.page_size;
  return static_cast<uint32_t>(
      std::min<uint64_t>(geometry_.page_size, positions_.size() - begin));
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
    lists[h] = TopK(std::move(all), k);
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

// ================================================================= ExactOracle
ExactOracle::ExactOracle(const KvIndex* layout, const PageReader* reader, Rank rank)
    : layout_(layout), reader_(reader), rank_(rank) {
  Refresh();
}

void ExactOracle::Refresh() {
  std::vector<PageInfo> pages = layout_->Layout();
  uint32_t tokens = 0;
  for (const PageInfo& p : pages) tokens += static_cast<uint32_t>(p.positions.size());
  absl::MutexLock lock(&mu_);
  pages_ = std::move(pages);
  tokens_ = tokens;
}

absl::Status ExactOracle::Build(const KeyBatch&, PageWriter*) {
  return absl::FailedPreconditionError(
      "the oracle lays out nothing: build the index it wraps, then Refresh()");
}

absl::Status ExactOracle::Insert(const KeyBatch&, PageWriter*) {
  return absl::FailedPreconditionError(
      "the oracle lays out nothing: insert into the index it wraps, then Refresh()");
}

uint32_t ExactOracle::num_tokens() const {
  absl::ReaderMutexLock lock(&mu_);
  return tokens_;
}

uint32_t ExactOracle::num_pages() const {
  absl::ReaderMutexLock lock(&mu_);
  return static_cast<uint32_t>(pages_.size());
}

uint64_t ExactOracle::MemoryBytes() const {
  absl::ReaderMutexLock lock(&mu_);
  uint64_t bytes = pages_.capacity() * sizeof(PageInfo);
  for (const PageInfo& p : pages_) bytes += p.positions.capacity() * sizeof(uint32_t);
  return bytes;
}

absl::Status ExactOracle::Search(const float* queries, uint32_t group, uint32_t k,
                                 std::vector<SelectedPage>* out) const {
  const IndexGeometry& g = layout_->geometry();
  absl::Status valid_q = ValidateQueries(g, queries, group);
  if (!valid_q.ok()) return valid_q;
  if (out == nullptr) return absl::InvalidArgumentError("null output");
  absl::ReaderMutexLock lock(&mu_);
  if (pages_.empty()) return absl::FailedPreconditionError("search before build");
  if (k == 0 || k > pages_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "k must be in 1..", pages_.size(), " (the pages of this index), got ", k));
  }
  const uint64_t row_bytes = uint64_t{g.dim} * ElemBytes(g.elem_type);
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.dim));
  // One pass over the keys: each row is read once and scored for every query of the group.
  std::vector<float> scores(uint64_t{group} * g.page_size);
  std::vector<std::vector<SelectedPage>> best(group, std::vector<SelectedPage>(pages_.size()));
  std::vector<std::vector<float>> logits(group);  // kSoftmaxMass: every scaled logit
  for (size_t i = 0; i < pages_.size(); ++i) {
    const uint32_t n = static_cast<uint32_t>(pages_[i].positions.size());
    DotStridedMulti(queries, group, reader_->PageKeys(pages_[i].page), row_bytes, n,
                    g.elem_type, g.dim, scores.data(), g.page_size);
    for (uint32_t h = 0; h < group; ++h) {
      const float* sc = scores.data() + uint64_t{h} * g.page_size;
      float b = -std::numeric_limits<float>::infinity();
      for (uint32_t s = 0; s < n; ++s) b = std::max(b, sc[s]);
      best[h][i] = {pages_[i].page, n, b};
      if (rank_ == Rank::kSoftmaxMass) {
        for (uint32_t s = 0; s < n; ++s) logits[h].push_back(sc[s] * scale);
      }
    }
  }
  if (rank_ == Rank::kBestToken) {
    std::vector<std::vector<SelectedPage>> lists(group);
    for (uint32_t h = 0; h < group; ++h) lists[h] = TopK(std::move(best[h]), k);
    *out = group == 1 ? std::move(lists[0]) : MergeRankInterleaved(lists, k);
    return absl::OkStatus();
  }
  std::vector<SelectedPage> mass(pages_.size());
  for (size_t i = 0; i < pages_.size(); ++i) {
    mass[i] = {pages_[i].page, static_cast<uint32_t>(pages_[i].positions.size()), 0.f};
  }
  for (uint32_t h = 0; h < group; ++h) {
    const std::vector<float>& all = logits[h];
    const float mx = *std::max_element(all.begin(), all.end());
    double z = 0;
    for (float v : all) z += std::exp(double(v) - mx);
    size_t at = 0;
    for (size_t i = 0; i < pages_.size(); ++i) {
      double m = 0;
      for (size_t s = 0; s < pages_[i].positions.size(); ++s) m += std::exp(double(all[at++]) - mx);
      mass[i].score += static_cast<float>(m / z);
    }
  }
  *out = TopK(std::move(mass), k);
  return absl::OkStatus();
}

absl::Status ExactOracle::TopTokens(const float* queries, uint32_t group, uint32_t count,
                                    std::vector<uint32_t>* positions) const {
  const IndexGeometry& g = layout_->geometry();
  absl::Status valid_q = ValidateQueries(g, queries, group);
  if (!valid_q.ok()) return valid_q;
  absl::ReaderMutexLock lock(&mu_);
  const uint64_t row_bytes = uint64_t{g.dim} * ElemBytes(g.elem_type);
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.dim));
  std::vector<std::pair<double, uint32_t>> mass;
  mass.reserve(tokens_);
  for (const PageInfo& p : pages_) {
    for (uint32_t pos : p.positions) mass.push_back({0.0, pos});
  }
  std::vector<float> logits(mass.size());
  for (uint32_t h = 0; h < group; ++h) {
    const float* q = queries + uint64_t{h} * g.dim;
    size_t at = 0;
    for (const PageInfo& p : pages_) {
      const uint32_t n = static_cast<uint32_t>(p.positions.size());
      DotStrided(q, reader_->PageKeys(p.page), row_bytes, n, g.elem_type, g.dim,
                 logits.data() + at);
      at += n;
    }
    float mx = -std::numeric_limits<float>::infinity();
    for (float& v : logits) {
      v *= scale;
      mx = std::max(mx, v);
    }
    double z = 0;
    for (float v : logits) z += std::exp(double(v) - mx);
    for (size_t i = 0; i < logits.size(); ++i) mass[i].first += std::exp(double(logits[i]) - mx) / z;
  }
  const size_t c = std::min<size_t>(count, mass.size());
  std::partial_sort(mass.begin(), mass.begin() + c, mass.end(),
                    [](const auto& a, const auto& b) { return a.first > b.first; });
  positions->resize(c);
  for (size_t i = 0; i < c; ++i) (*positions)[i] = mass[i].second;
  return absl::OkStatus();
}

}  // namespace icecache::index
