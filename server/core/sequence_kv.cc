#include "server/core/sequence_kv.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "server/index/exact_oracle.h"
#include "server/index/simd.h"

namespace icecache {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

index::ElemType ElemTypeOf(DType d) {
  return d == DType::kFP16 ? index::ElemType::kF16 : index::ElemType::kBF16;
}

}  // namespace

// One KV head of one layer: the index and its page table (index page id -> arena frame).
// Implements the PageReader the tree reads keys through. Guarded by the layer's lock.
struct SequenceKv::Head final : public index::PageReader {
  Arena* arena = nullptr;
  PageLayout layout;
  std::vector<FrameRef> table;      // [page id]
  std::vector<uint32_t> valid;      // [page id]
  std::vector<uint32_t> positions;  // [page id * page_size + slot]: what the frame tags say
  // Geometry::keeps_summaries(): per page id, head_dim values each, the mean key, key variance
  // and mean value of the page's valid slots (selection/tail.h), in the KV's own 16-bit type
  // (saturated to its finite range). Three planes, each [page id][head_dim] contiguous: the
  // tail estimate streams each plane once per select (on the development VM 3.5x faster than
  // rows interleaved per page, which the prefetcher does not follow); 16 bits halve the
  // bytes of that stream against fp32 (docs/model.md "Page summaries in 16 bits").
  std::vector<uint16_t> key_mean, key_var, value_mean;
  std::unique_ptr<index::KvIndex> index;

  const void* PageKeys(uint32_t page) const override { return arena->FrameAddress(table[page]); }

  // Recomputes the summaries of `pages` (any order, repeats allowed) from their frames.
  void Summarize(DType dtype, std::vector<uint32_t>* pages) {
    const uint32_t d = layout.head_dim;
    if (key_mean.size() < table.size() * d) {
      key_mean.resize(table.size() * d, 0);
      key_var.resize(table.size() * d, 0);
      value_mean.resize(table.size() * d, 0);
    }
    std::sort(pages->begin(), pages->end());
    pages->erase(std::unique(pages->begin(), pages->end()), pages->end());
    const bool fp16 = dtype == DType::kFP16;
    std::vector<float> k(d), v(d), km(d), kv(d), vm(d);
    for (uint32_t p : *pages) {
      if (p >= table.size() || !table[p].valid()) continue;
      const uint8_t* frame = static_cast<const uint8_t*>(arena->FrameAddress(table[p]));
      selection::SummaryBuilder b(d);
      for (uint32_t slot = 0; slot < valid[p]; ++slot) {
        const auto* kr = reinterpret_cast<const uint16_t*>(frame + layout.k_offset(slot));
        const auto* vr = reinterpret_cast<const uint16_t*>(frame + layout.v_offset(slot));
        for (uint32_t i = 0; i < d; ++i) {
          k[i] = Storage16ToFloat(kr[i], fp16);
          v[i] = Storage16ToFloat(vr[i], fp16);
        }
        b.Add(k.data(), v.data());
      }
      b.Finish(km.data(), kv.data(), vm.data());
      for (uint32_t i = 0; i < d; ++i) {
        key_mean[uint64_t{p} * d + i] = FloatToStorage16Saturated(km[i], fp16);
        key_var[uint64_t{p} * d + i] = FloatToStorage16Saturated(kv[i], fp16);
        value_mean[uint64_t{p} * d + i] = FloatToStorage16Saturated(vm[i], fp16);
      }
    }
  }
};

struct SequenceKv::Layer {
  mutable absl::Mutex mu;  // readers: selects, samples; writer: prefill completion, appends
  std::atomic<LayerState> state{LayerState::kEmpty};
  uint64_t tokens ABSL_GUARDED_BY(mu) = 0;
  uint64_t epoch ABSL_GUARDED_BY(mu) = 0;  // bumped by every completed append
  std::vector<std::unique_ptr<Head>> heads;
};

namespace {

// Applies one head's layout changes: frames from a reservation, rows from the staged batch
// (this head's K and V rows) or from the head's existing frames, and each changed frame's tag
// (abi::FrameTag). Crash consistency: a page that held tokens before the change is rewritten
// into a fresh frame (copy on write) and its old frame is freed only after every changed
// frame is tagged, so a token the daemon acknowledged is in a tagged frame at every instant.
// When no frame is free for the copies, the change is applied in place (the tags of the
// pages rewritten are cleared first) and counted: a crash during that change can lose
// tokens of those pages, which a restore then reports as DATA_LOSS.
class HeadWriter final : public index::PageWriter {
 public:
  struct Tagging {
    uint64_t owner = 0;
    uint32_t layer = 0;
    uint32_t kv_head = 0;
    const uint32_t* batch_positions = nullptr;  // [batch rows]
    std::atomic<uint64_t>* in_place = nullptr;  // changes applied without copy on write
    std::vector<uint32_t>* touched = nullptr;   // appended: every page whose rows changed
  };
  HeadWriter(Arena* arena, std::vector<FrameRef>* table, std::vector<uint32_t>* valid,
             std::vector<uint32_t>* positions, const PageLayout& layout, const uint8_t* k_rows,
             const uint8_t* v_rows, Arena::FrameReservation* reservation,
             std::atomic<uint64_t>* pages, const Tagging& tagging)
      : arena_(arena),
        table_(table),
        valid_(valid),
        positions_(positions),
        layout_(layout),
        k_rows_(k_rows),
        v_rows_(v_rows),
        reservation_(reservation),
        pages_(pages),
        tagging_(tagging) {}

  bool failed() const { return failed_; }

  void Apply(const index::LayoutChange& c) override {
    const uint64_t need = c.allocated.size();
    const uint32_t page_bytes = static_cast<uint32_t>(layout_.page_bytes());
    const uint32_t ps = layout_.page_size;
    if (reservation_->remaining() < need) {
      // More pages than the bound reserved: take what is still free, or give the layer up.
      absl::Status more = arena_->ReserveFrames(
          page_bytes, static_cast<uint32_t>(need - reservation_->remaining()), reservation_);
      if (!more.ok()) {
        failed_ = true;
        return;
      }
    }
    // Pages that held tokens before and change now: rewritten into fresh frames.
    std::vector<uint32_t> rewritten;
    for (const index::PageFill& f : c.changed) {
      if (!std::binary_search(c.allocated.begin(), c.allocated.end(), f.page)) {
        rewritten.push_back(f.page);
      }
    }
    Arena::FrameReservation copies;
    const bool copy_on_write =
        rewritten.empty() ||
        arena_->ReserveFrames(page_bytes, static_cast<uint32_t>(rewritten.size()), &copies).ok();
    if (!copy_on_write && tagging_.in_place != nullptr) {
      tagging_.in_place->fetch_add(1, std::memory_order_relaxed);
    }
    const uint64_t row = layout_.row_bytes();
    // Parallel assignment: every existing source (row and position) is read before any
    // write; rows of the batch (outside the arena) are copied straight from it.
    std::vector<uint64_t> staged_at(c.writes.size(), ~uint64_t{0});
    uint64_t n_staged = 0;
    for (size_t i = 0; i < c.writes.size(); ++i) {
      if (c.writes[i].src.kind == index::SlotSource::Kind::kExisting) staged_at[i] = n_staged++;
    }
    std::vector<uint8_t> staged(n_staged * row * 2);
    std::vector<uint32_t> staged_positions(c.writes.size());
    for (size_t i = 0; i < c.writes.size(); ++i) {
      const index::SlotWrite& w = c.writes[i];
      if (w.src.kind == index::SlotSource::Kind::kExisting) {
        uint8_t* k = staged.data() + 2 * staged_at[i] * row;
        const uint8_t* frame = arena_->FrameAddress((*table_)[w.src.page]);
        std::memcpy(k, frame + layout_.k_offset(w.src.slot), row);
        std::memcpy(k + row, frame + layout_.v_offset(w.src.slot), row);
        staged_positions[i] = (*positions_)[uint64_t{w.src.page} * ps + w.src.slot];
      } else {
        staged_positions[i] = tagging_.batch_positions[w.src.batch_row];
      }
    }
    for (uint32_t p : c.allocated) {
      if (table_->size() <= p) {
        table_->resize(p + 1);
        valid_->resize(p + 1, 0);
        positions_->resize(uint64_t{p + 1} * ps, 0);
      }
      (*table_)[p] = reservation_->Take();
    }
    pages_->fetch_add(c.allocated.size(), std::memory_order_relaxed);
    // Where each changed page's content goes: its new frame, a copy of its old one, or (no
    // frames for copies) the old one with its tag cleared first.
    absl::flat_hash_map<uint32_t, FrameRef> target;
    for (uint32_t p : c.allocated) target[p] = (*table_)[p];
    for (uint32_t p : rewritten) {
      const FrameRef old = (*table_)[p];
      if (copy_on_write) {
        const FrameRef fresh = copies.Take();
        std::memcpy(arena_->FrameAddress(fresh), arena_->FrameAddress(old), page_bytes);
        target[p] = fresh;
      } else {
        arena_->ClearTag(old);
        target[p] = old;
      }
    }
    for (size_t i = 0; i < c.writes.size(); ++i) {
      const index::SlotWrite& w = c.writes[i];
      uint8_t* frame = arena_->FrameAddress(target.at(w.page));
      const bool existing = w.src.kind == index::SlotSource::Kind::kExisting;
      const uint8_t* k = existing ? staged.data() + 2 * staged_at[i] * row
                                  : k_rows_ + uint64_t{w.src.batch_row} * row;
      const uint8_t* v = existing ? k + row : v_rows_ + uint64_t{w.src.batch_row} * row;
      std::memcpy(frame + layout_.k_offset(w.slot), k, row);
      std::memcpy(frame + layout_.v_offset(w.slot), v, row);
      (*positions_)[uint64_t{w.page} * ps + w.slot] = staged_positions[i];
    }
    for (const index::PageFill& f : c.changed) {
      if (tagging_.touched != nullptr) tagging_.touched->push_back(f.page);
      (*valid_)[f.page] = f.valid;
      arena_->WriteTag(target.at(f.page), tagging_.owner, tagging_.layer, tagging_.kv_head,
                       positions_->data() + uint64_t{f.page} * ps, f.valid);
    }
    // Every changed frame is tagged: the old copies can go.
    for (uint32_t p : rewritten) {
      if (copy_on_write) {
        arena_->FreeFrame((*table_)[p]);
        (*table_)[p] = target.at(p);
      } else {
        arena_->BumpFrameVersion((*table_)[p]);
      }
    }
    for (uint32_t p : c.allocated) arena_->BumpFrameVersion((*table_)[p]);
    for (uint32_t p : c.freed) {
      arena_->FreeFrame((*table_)[p]);
      (*table_)[p] = FrameRef{};
      (*valid_)[p] = 0;
    }
    pages_->fetch_sub(c.freed.size(), std::memory_order_relaxed);
  }

 private:
  Arena* arena_;
  std::vector<FrameRef>* table_;
  std::vector<uint32_t>* valid_;
  std::vector<uint32_t>* positions_;
  PageLayout layout_;
  const uint8_t* k_rows_;
  const uint8_t* v_rows_;
  Arena::FrameReservation* reservation_;
  std::atomic<uint64_t>* pages_;
  Tagging tagging_;
  bool failed_ = false;
};

HeadWriter::Tagging MakeTagging(uint64_t owner, std::atomic<uint64_t>* in_place, uint32_t layer,
                                uint32_t kv_head, const uint32_t* batch_positions) {
  HeadWriter::Tagging t;
  t.owner = owner;
  t.layer = layer;
  t.kv_head = kv_head;
  t.batch_positions = batch_positions;
  t.in_place = in_place;
  return t;
}

// The tail partials of `group` queries ([group][dim]) over a head's page summaries (planes
// key_mean, key_var, value_mean, [pages][dim] of `type` each) with token counts counts[pages]
// (0: left out, e.g. a selected page), into out [group][2 + dim] (abi.h "Tail estimate"). The
// logit of a page is selection::TailLogit's; the dot products and the value sums run through
// the index's SIMD kernels (each summary row read once for the whole group).
void TailPartials(selection::TailMode mode, const float* queries, uint32_t group, uint32_t dim,
                  float scale, index::ElemType type, const uint16_t* key_mean,
                  const uint16_t* key_var, const uint16_t* value_mean, const uint32_t* counts,
                  uint32_t pages, float* out) {
  std::fill(out, out + uint64_t{group} * (2 + dim), 0.0f);
  if (mode == selection::TailMode::kNone || pages == 0) return;
  const uint64_t stride = uint64_t{dim} * sizeof(uint16_t);
  std::vector<float> dots(uint64_t{group} * pages), vars;
  index::DotStridedMulti(queries, group, key_mean, stride, pages, type, dim, dots.data(), pages);
  if (mode == selection::TailMode::kMeanVariance) {
    std::vector<float> q2(uint64_t{group} * dim);
    for (uint64_t i = 0; i < q2.size(); ++i) q2[i] = queries[i] * queries[i];
    vars.resize(dots.size());
    index::DotStridedMulti(q2.data(), group, key_var, stride, pages, type, dim, vars.data(), pages);
  }
  // log(count) per page, -inf for a page left out (its logit is then -inf: weight 0); counts
  // are at most a page's slots, so a table of the small ones spares a log() per page.
  static const std::array<float, 65> kSmallLogs = [] {
    std::array<float, 65> t{};
    t[0] = -std::numeric_limits<float>::infinity();
    for (uint32_t c = 1; c < t.size(); ++c) t[c] = std::log(static_cast<float>(c));
    return t;
  }();
  std::vector<float> logs(pages);
  for (uint32_t p = 0; p < pages; ++p) {
    logs[p] = counts[p] < kSmallLogs.size() ? kSmallLogs[counts[p]]
                                            : std::log(static_cast<float>(counts[p]));
  }
  // Per query: logits (a left-out page's -inf stays -inf), then weights exp(logit - max) in
  // place.
  for (uint32_t j = 0; j < group; ++j) {
    float* logit = &dots[uint64_t{j} * pages];
    const float mx =
        index::TailLogits(logs.data(), logit, vars.empty() ? nullptr : &vars[uint64_t{j} * pages],
                          scale, 0.5f * scale * scale, selection::kTailVarianceCap, pages, logit);
    float* o = out + uint64_t{j} * (2 + dim);
    if (mx == -std::numeric_limits<float>::infinity()) {
      std::fill(logit, logit + pages, 0.0f);
      continue;
    }
    for (uint32_t p = 0; p < pages; ++p) logit[p] -= mx;  // -inf stays -inf: weight 0
    index::ExpInPlace(logit, pages);
    double sum = 0;
    for (uint32_t p = 0; p < pages; ++p) sum += logit[p];
    o[0] = mx;
    o[1] = static_cast<float>(sum);
  }
  // Every query's weighted sum of the mean values, each summary row read once for the group
  // (a query with nothing left out has weights 0 and keeps its zeros).
  std::vector<float> acc(uint64_t{group} * dim, 0.0f);
  index::WeightedSumStridedMulti(dots.data(), group, pages, value_mean, stride, pages, type, dim,
                                 acc.data());
  for (uint32_t j = 0; j < group; ++j) {
    std::copy_n(acc.data() + uint64_t{j} * dim, dim, out + uint64_t{j} * (2 + dim) + 2);
  }
}

}  // namespace

SequenceKv::SequenceKv(const Geometry& geometry, const selection::IndexSpec& index_spec,
                       std::shared_ptr<Arena> arena, ThreadPool* pool, KvObserver* observer)
    : geometry_(geometry),
      index_spec_(index_spec),
      arena_(std::move(arena)),
      pool_(pool),
      observer_(observer),
      index_geometry_{geometry.head_dim, ElemTypeOf(geometry.dtype), geometry.page_size} {
  layers_.resize(geometry.num_layers);
  for (uint32_t l = geometry.full_kv_layers; l < geometry.num_layers; ++l) {
    auto layer = std::make_unique<Layer>();
    for (uint32_t h = 0; h < geometry.num_kv_heads; ++h) {
      auto head = std::make_unique<Head>();
      head->arena = arena_.get();
      head->layout = geometry.page_layout();
      head->index = selection::CreateIndex(index_spec_, index_geometry_, head.get());
      layer->heads.push_back(std::move(head));
    }
    layers_[l] = std::move(layer);
  }
}

void SequenceKv::WaitForSamples() {
  absl::MutexLock lock(&samples_mu_);
  samples_mu_.Await(absl::Condition(
      +[](int* n) { return *n == 0; }, &samples_in_flight_));
}

SequenceKv::~SequenceKv() {
  WaitForSamples();
  for (auto& layer : layers_) {
    if (layer == nullptr) continue;
    absl::MutexLock lock(&layer->mu);
    for (auto& head : layer->heads) {
      for (FrameRef f : head->table) {
        if (f.valid()) arena_->FreeFrame(f);
      }
      head->table.clear();
    }
  }
}

uint64_t SequenceKv::StagingBytesPerToken() const {
  return 2ull * geometry_.num_kv_heads * geometry_.head_dim * DTypeBytes(geometry_.dtype);
}

absl::Status SequenceKv::CheckLayer(uint32_t layer) const {
  if (layer >= geometry_.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " is out of range (", geometry_.num_layers, " layers)"));
  }
  if (layers_[layer] == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " is a full-KV layer (the first ", geometry_.full_kv_layers,
                     " layers keep their KV on the accelerator)"));
  }
  return absl::OkStatus();
}

absl::Status SequenceKv::KeyBatches(const uint8_t* k_rows, uint32_t tokens, uint32_t first_position,
                                    const std::atomic<bool>* cancel,
                                    std::vector<uint32_t>* positions,
                                    std::vector<index::KeyBatch>* batches) const {
  const uint64_t row = uint64_t{geometry_.head_dim} * DTypeBytes(geometry_.dtype);
  positions->resize(tokens);
  std::iota(positions->begin(), positions->end(), first_position);
  batches->assign(geometry_.num_kv_heads, index::KeyBatch{});
  for (uint32_t h = 0; h < geometry_.num_kv_heads; ++h) {
    index::KeyBatch& b = (*batches)[h];
    b.keys = index::RowView{k_rows + uint64_t{h} * tokens * row, index_geometry_.elem_type,
                            geometry_.head_dim, tokens, 0};
    b.positions = positions->data();
    b.cancel = cancel;
    absl::Status v = index::ValidateBatch(index_geometry_, b);
    if (!v.ok()) return absl::InvalidArgumentError(absl::StrCat("KV head ", h, ": ", v.message()));
  }
  return absl::OkStatus();
}

absl::Status SequenceKv::Prefill(uint32_t layer, const uint8_t* k_rows, const uint8_t* v_rows,
                                 uint32_t tokens, uint32_t first_position,
                                 const std::atomic<bool>* cancel) {
  absl::Status ok = CheckLayer(layer);
  if (!ok.ok()) return ok;
  if (tokens == 0 || tokens > geometry_.max_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prefill of ", tokens, " tokens: must be in 1..max_tokens (", geometry_.max_tokens, ")"));
  }
  Layer& L = *layers_[layer];
  const uint64_t row = uint64_t{geometry_.head_dim} * DTypeBytes(geometry_.dtype);
  std::vector<uint32_t> positions;
  std::vector<index::KeyBatch> batches;
  absl::Status valid = KeyBatches(k_rows, tokens, first_position, cancel, &positions, &batches);
  if (!valid.ok()) return valid;
  {
    absl::MutexLock lock(&L.mu);
    if (L.state.load() != LayerState::kEmpty) {
      return absl::FailedPreconditionError(
          absl::StrCat("layer ", layer, " is already ",
                       L.state.load() == LayerState::kReady ? "built" : "being built or failed"));
    }
    L.state.store(LayerState::kBuilding);
  }
  // Frames first, while failing is still clean.
  const uint32_t page_bytes = static_cast<uint32_t>(geometry_.page_bytes());
  std::vector<Arena::FrameReservation> reservations(geometry_.num_kv_heads);
  for (uint32_t h = 0; h < geometry_.num_kv_heads; ++h) {
    const uint64_t bound = L.heads[h]->index->MaxBuildPages(tokens);
    absl::Status r =
        arena_->ReserveFrames(page_bytes, static_cast<uint32_t>(bound), &reservations[h]);
    if (!r.ok()) {
      L.state.store(LayerState::kEmpty);
      return r;
    }
  }
  const auto start = Clock::now();
  std::vector<absl::Status> status(geometry_.num_kv_heads);
  std::vector<char> failed(geometry_.num_kv_heads, 0);
  pool_->ParallelFor(geometry_.num_kv_heads, [&](size_t h) {
    Head& head = *L.heads[h];
    std::vector<uint32_t> touched;
    HeadWriter::Tagging tagging =
        MakeTagging(durable_id_.load(std::memory_order_acquire), &in_place_changes_, layer,
                    static_cast<uint32_t>(h), positions.data());
    if (geometry_.keeps_summaries()) tagging.touched = &touched;
    HeadWriter writer(arena_.get(), &head.table, &head.valid, &head.positions, head.layout,
                      k_rows + h * tokens * row, v_rows + h * tokens * row, &reservations[h],
                      &pages_, tagging);
    status[h] = head.index->Build(batches[h], &writer);
    failed[h] = writer.failed();
    if (geometry_.keeps_summaries() && status[h].ok() && !failed[h]) {
      head.Summarize(geometry_.dtype, &touched);
    }
  });
  absl::MutexLock lock(&L.mu);
  for (uint32_t h = 0; h < geometry_.num_kv_heads; ++h) {
    if (!status[h].ok() || failed[h]) {
      L.state.store(LayerState::kFailed);
      return status[h].ok() ? absl::ResourceExhaustedError(absl::StrCat(
                                  "layer ", layer, " ran out of page frames while building"))
                            : status[h];
    }
  }
  L.tokens = tokens;
  L.state.store(LayerState::kReady);
  if (observer_ != nullptr)
    observer_->OnBuild(Since(start), uint64_t{tokens} * geometry_.num_kv_heads);
  return absl::OkStatus();
}

absl::Status SequenceKv::Append(uint32_t layer, const uint8_t* k_rows, const uint8_t* v_rows,
                                uint32_t tokens, uint32_t first_position) {
  absl::Status ok = CheckLayer(layer);
  if (!ok.ok()) return ok;
  if (tokens == 0 || tokens > geometry_.page_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "append of ", tokens, " tokens: must be in 1..page_size (", geometry_.page_size, ")"));
  }
  Layer& L = *layers_[layer];
  const uint64_t row = uint64_t{geometry_.head_dim} * DTypeBytes(geometry_.dtype);
  std::vector<uint32_t> positions;
  std::vector<index::KeyBatch> batches;
  absl::Status valid = KeyBatches(k_rows, tokens, first_position, nullptr, &positions, &batches);
  if (!valid.ok()) return valid;
  absl::MutexLock lock(&L.mu);
  if (L.state.load() != LayerState::kReady) {
    return absl::FailedPreconditionError(
        absl::StrCat("layer ", layer, " is not built: prefill it (and wait) before appending"));
  }
  if (L.tokens + tokens > geometry_.max_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "layer ", layer, " holds ", L.tokens, " tokens; max_tokens is ", geometry_.max_tokens));
  }
  const uint32_t page_bytes = static_cast<uint32_t>(geometry_.page_bytes());
  std::vector<Arena::FrameReservation> reservations(geometry_.num_kv_heads);
  for (uint32_t h = 0; h < geometry_.num_kv_heads; ++h) {
    const uint64_t bound = L.heads[h]->index->MaxInsertPages(tokens);
    absl::Status r =
        arena_->ReserveFrames(page_bytes, static_cast<uint32_t>(bound), &reservations[h]);
    if (!r.ok()) return r;
  }
  const auto start = Clock::now();
  std::vector<absl::Status> status(geometry_.num_kv_heads);
  std::vector<char> failed(geometry_.num_kv_heads, 0);
  pool_->ParallelFor(geometry_.num_kv_heads, [&](size_t h) {
    Head& head = *L.heads[h];
    std::vector<uint32_t> touched;
    HeadWriter::Tagging tagging =
        MakeTagging(durable_id_.load(std::memory_order_acquire), &in_place_changes_, layer,
                    static_cast<uint32_t>(h), positions.data());
    if (geometry_.keeps_summaries()) tagging.touched = &touched;
    HeadWriter writer(arena_.get(), &head.table, &head.valid, &head.positions, head.layout,
                      k_rows + h * tokens * row, v_rows + h * tokens * row, &reservations[h],
                      &pages_, tagging);
    status[h] = head.index->Insert(batches[h], &writer);
    failed[h] = writer.failed();
    if (geometry_.keeps_summaries() && status[h].ok() && !failed[h]) {
      head.Summarize(geometry_.dtype, &touched);
    }
  });
  for (uint32_t h = 0; h < geometry_.num_kv_heads; ++h) {
    if (!status[h].ok() || failed[h]) {
      L.state.store(LayerState::kFailed);
      return status[h].ok() ? absl::ResourceExhaustedError(absl::StrCat(
                                  "layer ", layer, " ran out of page frames during an append"))
                            : status[h];
    }
  }
  L.tokens += tokens;
  ++L.epoch;
  if (observer_ != nullptr)
    observer_->OnInsert(Since(start), uint64_t{tokens} * geometry_.num_kv_heads);
  return absl::OkStatus();
}

absl::StatusOr<uint32_t> SequenceKv::Select(uint32_t layer, const float* queries, uint32_t k,
                                            std::vector<abi::SelectedPageRef>* out,
                                            bool sample_recall, const uint8_t* head_mask,
                                            std::vector<float>* tail) {
  absl::Status ok = CheckLayer(layer);
  if (!ok.ok()) return ok;
  k = SelectK(k);
  if (k > 4096) return absl::InvalidArgumentError(absl::StrCat("k=", k, " is above 4096"));
  Layer& L = *layers_[layer];
  const uint32_t group = geometry_.group_size();
  const uint32_t d = geometry_.head_dim;
  const auto start = Clock::now();
  absl::ReaderMutexLock lock(&L.mu);
  if (L.state.load() != LayerState::kReady) {
    return absl::FailedPreconditionError(absl::StrCat(
        "layer ", layer, " is not built: prefill it (and wait for it) before selecting"));
  }
  out->assign(uint64_t{geometry_.num_kv_heads} * k, abi::SelectedPageRef{abi::kNoSegment, 0, 0, 0});
  const bool with_tail = tail != nullptr && geometry_.keeps_summaries();
  if (tail != nullptr) {
    tail->assign(with_tail ? uint64_t{geometry_.num_q_heads} * (2 + d) : 0, 0.0f);
  }
  std::vector<absl::Status> status(geometry_.num_kv_heads);
  std::vector<std::vector<uint32_t>> picked_pages(geometry_.num_kv_heads);
  pool_->ParallelFor(geometry_.num_kv_heads, [&](size_t h) {
    if (head_mask != nullptr && head_mask[h] == 0) return;
    Head& head = *L.heads[h];
    const uint32_t kk = std::min(k, head.index->num_pages());
    std::vector<index::SelectedPage> picked;
    status[h] = head.index->Search(queries + uint64_t{h} * group * d, group, kk, &picked);
    if (!status[h].ok()) return;
    for (size_t i = 0; i < picked.size(); ++i) {
      const FrameRef f = head.table[picked[i].page];
      (*out)[h * k + i] = {f.segment, f.frame, head.valid[picked[i].page], arena_->FrameVersion(f)};
      if (sample_recall) picked_pages[h].push_back(picked[i].page);
    }
    if (with_tail) {
      // Every page of the head not returned: valid counts with the picked pages zeroed.
      std::vector<uint32_t> counts(head.valid);
      for (const index::SelectedPage& p : picked) {
        if (p.page < counts.size()) counts[p.page] = 0;
      }
      const uint32_t pages =
          static_cast<uint32_t>(std::min<uint64_t>(counts.size(), head.key_mean.size() / d));
      TailPartials(geometry_.tail, queries + uint64_t{h} * group * d, group, d,
                   geometry_.softmax_scale, index_geometry_.elem_type, head.key_mean.data(),
                   head.key_var.data(), head.value_mean.data(), counts.data(), pages,
                   tail->data() + uint64_t{h} * group * (2 + d));
    }
  });
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  if (observer_ != nullptr) observer_->OnSelect(Since(start));
  if (sample_recall && observer_ != nullptr) {
    {
      absl::MutexLock samples(&samples_mu_);
      ++samples_in_flight_;
    }
    std::vector<float> q(queries, queries + uint64_t{geometry_.num_q_heads} * d);
    const uint64_t epoch = L.epoch;
    // The sample holds the sequence (when a shared_ptr owns it): a select's last reference
    // can be dropped on a pool worker (a select queued behind an append whose sequence was
    // dropped meanwhile), and a destructor there waiting for this sample, queued on the same
    // pool, would wait for good when every worker is so taken (one worker: at once).
    pool_->Schedule([this, self = weak_from_this().lock(), layer, q = std::move(q),
                     picked = std::move(picked_pages), epoch]() mutable {
      SampleRecall(layer, std::move(q), std::move(picked), epoch);
      {
        absl::MutexLock samples(&samples_mu_);
        --samples_in_flight_;
      }
      self.reset();  // may run the destructor, which then has no sample to wait for
    });
  }
  return k;
}

// The exact oracle scores every key of the layer and reports, per query head, the share of
// the softmax mass (over the offloaded tokens) on the returned pages. Skipped when an append
// changed the layer since the select.
void SequenceKv::SampleRecall(uint32_t layer, std::vector<float> queries,
                              std::vector<std::vector<uint32_t>> picked, uint64_t epoch) {
  Layer& L = *layers_[layer];
  absl::ReaderMutexLock lock(&L.mu);
  if (L.epoch != epoch || L.state.load() != LayerState::kReady) return;
  const uint32_t group = geometry_.group_size(), d = geometry_.head_dim;
  std::vector<double> shares;
  for (uint32_t h = 0; h < geometry_.num_kv_heads; ++h) {
    const Head& head = *L.heads[h];
    const index::ExactOracle oracle(head.index.get(), &head,
                                    index::ExactOracle::Rank::kSoftmaxMass);
    if (!oracle.MassShares(queries.data() + uint64_t{h} * group * d, group, picked[h], &shares)
             .ok()) {
      continue;
    }
    for (double share : shares) observer_->OnRecallSample(share);
  }
}

SequenceKv::LayerState SequenceKv::layer_state(uint32_t layer) const {
  if (layer >= layers_.size() || layers_[layer] == nullptr) return LayerState::kEmpty;
  return layers_[layer]->state.load();
}

uint64_t SequenceKv::tokens(uint32_t layer) const {
  if (layer >= layers_.size() || layers_[layer] == nullptr) return 0;
  absl::ReaderMutexLock lock(&layers_[layer]->mu);
  return layers_[layer]->tokens;
}

uint64_t SequenceKv::pages() const { return pages_.load(std::memory_order_relaxed); }

absl::Status SequenceKv::CheckJournal(const LayerJournal& journal) const {
  ICECACHE_RETURN_IF_ERROR(CheckLayer(journal.layer));
  const auto refuse = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", journal.layer, "'s history: ", what,
                                                   " (max_tokens ", geometry_.max_tokens,
                                                   ", page_size ", geometry_.page_size, ")"));
  };
  if (journal.prefill_tokens == 0 || journal.prefill_tokens > geometry_.max_tokens ||
      uint64_t{journal.prefill_first} + journal.prefill_tokens > UINT32_MAX) {
    return refuse(absl::StrCat("a prefill of ", journal.prefill_tokens, " tokens at ",
                               journal.prefill_first));
  }
  uint64_t total = journal.prefill_tokens;
  for (const AppendRun& r : journal.appends) {
    if (r.tokens == 0 || r.tokens > geometry_.page_size || r.count == 0 ||
        uint64_t{r.first_position} + uint64_t{r.count} * r.tokens > UINT32_MAX) {
      return refuse(absl::StrCat("a run of ", r.count, " appends of ", r.tokens, " tokens at ",
                                 r.first_position));
    }
    total += uint64_t{r.count} * r.tokens;
    if (total > geometry_.max_tokens) {
      return refuse(absl::StrCat("more than max_tokens tokens (", total, " so far)"));
    }
  }
  return absl::OkStatus();
}

absl::Status SequenceKv::Restore(const LayerJournal& journal, const RowSource& source,
                                 const std::atomic<bool>* cancel) {
  // The whole journal is checked first: the rows of a prefill are gathered (and allocated)
  // before Prefill would refuse their count, so every count from the client is bounded here.
  ICECACHE_RETURN_IF_ERROR(CheckJournal(journal));
  const uint64_t row = uint64_t{geometry_.head_dim} * DTypeBytes(geometry_.dtype);
  const uint64_t heads = geometry_.num_kv_heads;
  std::vector<uint32_t> want;
  std::vector<uint8_t> k, v;
  auto gather = [&](uint32_t first, uint32_t tokens) -> absl::Status {
    want.resize(tokens);
    std::iota(want.begin(), want.end(), first);
    k.assign(heads * tokens * row, 0);
    v.assign(heads * tokens * row, 0);
    return source.Gather(journal.layer, want, k.data(), v.data());
  };
  auto cancelled = [cancel] {
    return cancel != nullptr && cancel->load(std::memory_order_relaxed);
  };
  if (cancelled()) return absl::CancelledError("the restore was cancelled");
  ICECACHE_RETURN_IF_ERROR(gather(journal.prefill_first, journal.prefill_tokens));
  ICECACHE_RETURN_IF_ERROR(Prefill(journal.layer, k.data(), v.data(), journal.prefill_tokens,
                                   journal.prefill_first, cancel));
  for (const AppendRun& r : journal.appends) {
    for (uint32_t i = 0; i < r.count; ++i) {
      if (cancelled()) return absl::CancelledError("the restore was cancelled");
      const uint32_t first = r.first_position + i * r.tokens;  // within uint32: checked above
      ICECACHE_RETURN_IF_ERROR(gather(first, r.tokens));
      ICECACHE_RETURN_IF_ERROR(Append(journal.layer, k.data(), v.data(), r.tokens, first));
    }
  }
  return absl::OkStatus();
}

}  // namespace icecache
