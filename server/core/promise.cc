#include "server/core/promise.h"

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "common/half.h"
#include "common/log.h"
#include "server/core/arena.h"
#include "server/index/kv_index.h"

namespace icecache {
namespace {

constexpr uint32_t kCalibrationTokens = 4096;

index::ElemType ElemTypeOf(DType d) {
  return d == DType::kFP16 ? index::ElemType::kF16 : index::ElemType::kBF16;
}

// Keys only, in ordinary memory: enough for an index to build on.
class CalibrationPages final : public index::PageReader, public index::PageWriter {
 public:
  CalibrationPages(uint32_t page_size, uint64_t row_bytes, const uint8_t* batch)
      : page_size_(page_size), row_bytes_(row_bytes), batch_(batch) {}
  const void* PageKeys(uint32_t page) const override {
    return pages_.data() + uint64_t{page} * page_size_ * row_bytes_;
  }
  void Apply(const index::LayoutChange& c) override {
    uint32_t top = 0;
    for (uint32_t p : c.allocated) top = std::max(top, p + 1);
    for (const index::SlotWrite& w : c.writes) top = std::max(top, w.page + 1);
    if (uint64_t{top} * page_size_ * row_bytes_ > pages_.size()) {
      pages_.resize(uint64_t{top} * page_size_ * row_bytes_);
    }
    std::vector<uint8_t> staged(c.writes.size() * row_bytes_);
    for (size_t i = 0; i < c.writes.size(); ++i) {
      const index::SlotSource& src = c.writes[i].src;
      const uint8_t* from =
          src.kind == index::SlotSource::Kind::kBatch
              ? batch_ + uint64_t{src.batch_row} * row_bytes_
              : pages_.data() + (uint64_t{src.page} * page_size_ + src.slot) * row_bytes_;
      std::copy(from, from + row_bytes_, staged.data() + i * row_bytes_);
    }
    for (size_t i = 0; i < c.writes.size(); ++i) {
      const index::SlotWrite& w = c.writes[i];
      std::copy(staged.data() + i * row_bytes_, staged.data() + (i + 1) * row_bytes_,
                pages_.data() + (uint64_t{w.page} * page_size_ + w.slot) * row_bytes_);
    }
  }

 private:
  const uint32_t page_size_;
  const uint64_t row_bytes_;
  const uint8_t* batch_;
  std::vector<uint8_t> pages_;
};

}  // namespace

PromiseCalculator::PromiseCalculator(const selection::IndexSpec& spec, uint32_t workers)
    : spec_(spec), workers_(std::max<uint32_t>(1, workers)) {}

uint64_t PromiseCalculator::PagesPerHead(const Geometry& g) const {
  const index::IndexGeometry ig{g.head_dim, ElemTypeOf(g.dtype), g.page_size};
  const std::unique_ptr<index::KvIndex> probe = selection::CreateIndex(spec_, ig, nullptr);
  const uint64_t dense = (g.max_tokens + g.page_size - 1) / g.page_size;
  const uint64_t build = probe->MaxBuildPages(g.max_tokens);
  // Beyond the build bound: appended tokens split full pages (two pages of at least half a
  // page each), and one insert reserves its worst case before it runs.
  return build + dense + probe->MaxInsertPages(g.page_size);
}

uint64_t PromiseCalculator::InsertPagesPerHead(const Geometry& g, uint64_t tokens) const {
  if (tokens == 0) return 0;
  const index::IndexGeometry ig{g.head_dim, ElemTypeOf(g.dtype), g.page_size};
  const std::unique_ptr<index::KvIndex> probe = selection::CreateIndex(spec_, ig, nullptr);
  const uint64_t dense = (tokens + g.page_size - 1) / g.page_size;
  // A split page keeps at least half a page of tokens (two pages per page of new tokens);
  // promoted tokens open cells (the build bound's share beyond the dense pages); one insert
  // reserves its worst case before it runs.
  return 2 * dense + (probe->MaxBuildPages(tokens) - dense) + probe->MaxInsertPages(g.page_size);
}

SequencePromise PromiseCalculator::AfterPrefill(const Geometry& g, const SequencePromise& before,
                                                uint64_t pages_held, uint64_t tokens) const {
  SequencePromise after = before;
  const uint64_t heads = uint64_t{g.offloaded_layers()} * g.num_kv_heads;
  const uint64_t remaining = g.max_tokens > tokens ? g.max_tokens - tokens : 0;
  const uint64_t pages = pages_held + heads * InsertPagesPerHead(g, remaining);
  after.pages = std::min(before.pages, pages * abi::FrameFootprint(g.page_bytes()));
  const uint64_t row = uint64_t{g.head_dim} * DTypeBytes(g.dtype);
  const uint64_t window = uint64_t{g.offloaded_layers()} *
                          Arena::StagingFootprint(uint64_t{g.page_size} * 2 * g.num_kv_heads * row);
  after.staging = std::min(before.staging, window);
  after.prefill_depth = 0;
  return after;
}

uint32_t PromiseCalculator::PrefillDepth(const Geometry& g) const {
  const uint32_t offloaded = g.offloaded_layers();
  const uint32_t keep_busy = 1 + (workers_ + g.num_kv_heads - 1) / g.num_kv_heads;
  return std::min(offloaded, std::max<uint32_t>(2, keep_busy));
}

uint64_t PromiseCalculator::MetadataBytesPerToken(const Geometry& g) {
  const auto key = std::make_tuple(g.head_dim, static_cast<int>(g.dtype), g.page_size);
  {
    absl::MutexLock lock(&mu_);
    auto it = per_token_.find(key);
    if (it != per_token_.end()) return it->second;
  }
  // One calibration build of the daemon's index on random keys (fixed seed).
  const uint64_t row = uint64_t{g.head_dim} * DTypeBytes(g.dtype);
  std::vector<uint8_t> keys(kCalibrationTokens * row);
  std::mt19937 rng(12345);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (uint64_t i = 0; i < uint64_t{kCalibrationTokens} * g.head_dim; ++i) {
    const float x = normal(rng);
    const uint16_t bits = g.dtype == DType::kFP16 ? FloatToHalf(x) : FloatToBf16(x);
    std::copy(reinterpret_cast<const uint8_t*>(&bits), reinterpret_cast<const uint8_t*>(&bits) + 2,
              keys.data() + i * 2);
  }
  std::vector<uint32_t> positions(kCalibrationTokens);
  std::iota(positions.begin(), positions.end(), 0u);
  CalibrationPages pages(g.page_size, row, keys.data());
  const index::IndexGeometry ig{g.head_dim, ElemTypeOf(g.dtype), g.page_size};
  std::unique_ptr<index::KvIndex> idx = selection::CreateIndex(spec_, ig, &pages);
  index::KeyBatch batch;
  batch.keys = index::RowView{keys.data(), ig.elem_type, g.head_dim, kCalibrationTokens, 0};
  batch.positions = positions.data();
  const absl::Status built = idx->Build(batch, &pages);
  ICECACHE_CHECK(built.ok()) << "calibration build of the index failed: " << built;
  // Twice the measured bytes per token: the index's vectors grow by doubling.
  const uint64_t per_token =
      2 * ((idx->MemoryBytes() + kCalibrationTokens - 1) / kCalibrationTokens);
  absl::MutexLock lock(&mu_);
  per_token_[key] = per_token;
  return per_token;
}

SequencePromise PromiseCalculator::For(const Geometry& g) {
  SequencePromise p;
  const uint64_t heads = uint64_t{g.offloaded_layers()} * g.num_kv_heads;
  p.heap = kSequenceOverhead;
  if (heads == 0) return p;
  const uint64_t row = uint64_t{g.head_dim} * DTypeBytes(g.dtype);
  const uint64_t staged_token = 2 * uint64_t{g.num_kv_heads} * row;  // K and V, every KV head
  p.pages = heads * PagesPerHead(g) * abi::FrameFootprint(g.page_bytes());
  p.prefill_depth = PrefillDepth(g);
  p.staging = uint64_t{p.prefill_depth} * Arena::StagingFootprint(g.max_tokens * staged_token) +
              uint64_t{g.offloaded_layers()} * Arena::StagingFootprint(g.page_size * staged_token);
  p.heap += heads * (kHeadOverhead + MetadataBytesPerToken(g) * g.max_tokens);
  // Tail estimate: a summary per page (selection/tail.h), in the KV's 16-bit type.
  if (g.keeps_summaries()) {
    p.heap += heads * PagesPerHead(g) * selection::kSummaryVectors * row;
  }
  return p;
}

}  // namespace icecache
