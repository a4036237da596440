#include "server/index/exact_oracle.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "server/index/simd.h"

namespace icecache::index {

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
    return absl::InvalidArgumentError(
        absl::StrCat("k must be in 1..", pages_.size(), " (the pages of this index), got ", k));
  }
  const uint64_t row_bytes = uint64_t{g.dim} * ElemBytes(g.elem_type);
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.dim));
  // One pass over the keys: each row is read once and scored for every query of the group.
  std::vector<float> scores(uint64_t{group} * g.page_size);
  std::vector<std::vector<SelectedPage>> best(group, std::vector<SelectedPage>(pages_.size()));
  std::vector<std::vector<float>> logits(group);  // kSoftmaxMass: every scaled logit
  for (size_t i = 0; i < pages_.size(); ++i) {
    const uint32_t n = static_cast<uint32_t>(pages_[i].positions.size());
    DotStridedMulti(queries, group, reader_->PageKeys(pages_[i].page), row_bytes, n, g.elem_type,
                    g.dim, scores.data(), g.page_size);
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
    for (uint32_t h = 0; h < group; ++h) lists[h] = TopPages(std::move(best[h]), k);
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
  *out = TopPages(std::move(mass), k);
  return absl::OkStatus();
}

absl::Status ExactOracle::MassShares(const float* queries, uint32_t group,
                                     absl::Span<const uint32_t> pages,
                                     std::vector<double>* shares) const {
  const IndexGeometry& g = layout_->geometry();
  absl::Status valid_q = ValidateQueries(g, queries, group);
  if (!valid_q.ok()) return valid_q;
  if (shares == nullptr) return absl::InvalidArgumentError("null output");
  absl::ReaderMutexLock lock(&mu_);
  if (pages_.empty()) return absl::FailedPreconditionError("the layout holds no page yet");
  const uint64_t row_bytes = uint64_t{g.dim} * ElemBytes(g.elem_type);
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.dim));
  std::vector<char> picked(pages_.size(), 0);
  for (size_t i = 0; i < pages_.size(); ++i) {
    picked[i] = std::find(pages.begin(), pages.end(), pages_[i].page) != pages.end();
  }
  // Every scaled logit once (one read of each row for the whole group), then per query the
  // mass in total and on the picked pages, relative to the query's maximum.
  std::vector<float> scores(uint64_t{group} * g.page_size);
  std::vector<std::vector<float>> logits(group);
  for (size_t i = 0; i < pages_.size(); ++i) {
    const uint32_t n = static_cast<uint32_t>(pages_[i].positions.size());
    DotStridedMulti(queries, group, reader_->PageKeys(pages_[i].page), row_bytes, n, g.elem_type,
                    g.dim, scores.data(), g.page_size);
    for (uint32_t h = 0; h < group; ++h) {
      for (uint32_t s = 0; s < n; ++s)
        logits[h].push_back(scores[uint64_t{h} * g.page_size + s] * scale);
    }
  }
  shares->assign(group, 0.0);
  for (uint32_t h = 0; h < group; ++h) {
    const std::vector<float>& all = logits[h];
    const float mx = *std::max_element(all.begin(), all.end());
    double total = 0, on_picked = 0;
    size_t at = 0;
    for (size_t i = 0; i < pages_.size(); ++i) {
      double m = 0;
      for (size_t s = 0; s < pages_[i].positions.size(); ++s) m += std::exp(double(all[at++]) - mx);
      total += m;
      if (picked[i]) on_picked += m;
    }
    (*shares)[h] = total > 0 ? on_picked / total : 0.0;
  }
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
    for (size_t i = 0; i < logits.size(); ++i)
      mass[i].first += std::exp(double(logits[i]) - mx) / z;
  }
  const size_t c = std::min<size_t>(count, mass.size());
  std::partial_sort(mass.begin(), mass.begin() + c, mass.end(),
                    [](const auto& a, const auto& b) { return a.first > b.first; });
  positions->resize(c);
  for (size_t i = 0; i < c; ++i) (*positions)[i] = mass[i].second;
  return absl::OkStatus();
}

}  // namespace icecache::index
