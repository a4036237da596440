#include "tests/support/fake_daemon.h"

#include "absl/strings/str_cat.h"
#include "icecache/attachment.h"

namespace icecache::testing {
namespace {

TailEstimate ToTailEstimate(selection::TailMode mode) {
  switch (mode) {
    case selection::TailMode::kNone:
      return TailEstimate::kNone;
    case selection::TailMode::kMean:
      return TailEstimate::kMean;
    case selection::TailMode::kMeanVariance:
      return TailEstimate::kMeanVariance;
  }
  return TailEstimate::kNone;
}

}  // namespace

FakeDaemon::FakeDaemon(const Options& options)
    : options_(options), memory_(options.memory), pool_(2) {
  ArenaOptions ao;
  ao.page_segment_bytes = uint64_t{4} << 20;
  ao.staging_segment_bytes = uint64_t{4} << 20;
  arena_ = std::move(*Arena::Create(1, ao, options.memory, &memory_, nullptr));
  index_ = *selection::Preset(options.preset);
}

FakeDaemon::~FakeDaemon() {
  for (auto& [handle, kv] : kv_) kv->WaitForSamples();
  kv_.clear();
}

absl::StatusOr<client_internal::SequenceContext> FakeDaemon::CreateSequence(
    const GeometrySpec& spec, client_internal::Backend* backend) {
  absl::StatusOr<Geometry> g = ResolveGeometry(spec);
  if (!g.ok()) return g.status();
  const std::string handle = absl::StrCat("fake-", next_handle_++);
  kv_[handle] = std::make_unique<SequenceKv>(*g, index_, arena_, &pool_, nullptr);
  if (decoder_ == nullptr) decoder_ = std::make_unique<client_internal::Decoder>(backend, this);
  client_internal::SequenceContext c;
  c.backend = backend;
  c.transport = this;
  c.decoder = decoder_.get();
  c.handle = handle;
  c.geometry = ResolvedGeometry{.num_layers = g->num_layers,
                                .num_q_heads = g->num_q_heads,
                                .num_kv_heads = g->num_kv_heads,
                                .head_dim = g->head_dim,
                                .dtype = g->dtype,
                                .max_tokens = g->max_tokens,
                                .page_size = g->page_size,
                                .budget_tokens = g->budget_tokens,
                                .sink_tokens = g->sink_tokens,
                                .window_tokens = g->window_tokens,
                                .full_kv_layers = g->full_kv_layers,
                                .tail_estimate = ToTailEstimate(g->tail),
                                .softmax_scale = g->softmax_scale};
  return c;
}

absl::StatusOr<SequenceKv*> FakeDaemon::Find(const std::string& handle) {
  auto it = kv_.find(handle);
  if (it == kv_.end()) return absl::NotFoundError(absl::StrCat("no sequence ", handle));
  return it->second.get();
}

uint64_t FakeDaemon::requests(uint32_t op) const {
  auto it = requests_.find(op);
  return it == requests_.end() ? 0 : it->second;
}

absl::StatusOr<abi::StageResponse> FakeDaemon::Stage(const std::string& handle, uint32_t tokens) {
  ++requests_[abi::kOpStage];
  if (tickets_.size() >= options_.slots) return SlotsExhaustedError();
  auto failed = fail_.find(abi::kOpStage);
  if (failed != fail_.end()) {
    absl::Status st = std::move(failed->second);
    fail_.erase(failed);
    return st;
  }
  absl::StatusOr<SequenceKv*> kv = Find(handle);
  if (!kv.ok()) return kv.status();
  const uint64_t bytes = (*kv)->StagingBytesPerToken() * tokens;
  absl::StatusOr<abi::ArenaRef> ref = arena_->AllocStaging(bytes);
  if (!ref.ok()) return ref.status();
  return abi::StageResponse{*ref, bytes, bytes / 2};
}

absl::Status FakeDaemon::ReleaseStaging(const std::string&, const abi::ArenaRef& staging) {
  ++requests_[abi::kOpRelease];
  return arena_->FreeStaging(staging);
}

absl::StatusOr<client_internal::Ticket> FakeDaemon::Enqueue(uint32_t op, Pending p) {
  ++requests_[op];
  if (tickets_.size() >= options_.slots) return SlotsExhaustedError();
  auto failed = fail_.find(op);
  if (failed != fail_.end()) {
    p.status = failed->second;
    fail_.erase(failed);
  }
  const client_internal::Ticket t = next_ticket_++;
  auto& entry = tickets_[t] = std::move(p);
  if (!deferred_ && !entry.status) Answer(t);
  return t;
}

void FakeDaemon::Answer(client_internal::Ticket ticket) {
  auto it = tickets_.find(ticket);
  if (it == tickets_.end() || it->second.status) return;
  if (it->second.select) {
    for (auto& [t, p] : tickets_) {
      if (t >= ticket || p.select || p.status) continue;
      for (const std::string& key : it->second.keys) {
        if (p.keys.front() == key) {
          p.status = p.run();
          break;
        }
      }
    }
  }
  it->second.status = it->second.run();
}

absl::StatusOr<client_internal::Ticket> FakeDaemon::SubmitStaged(
    uint32_t op, const std::string& handle, uint32_t layer, const abi::ArenaRef& staging,
    uint32_t tokens, uint32_t first_position) {
  absl::StatusOr<SequenceKv*> kv = Find(handle);
  if (!kv.ok()) return kv.status();
  if (op == abi::kOpAppend) append_positions_.push_back(first_position);
  Pending p;
  p.keys = {absl::StrCat(handle, "/", layer)};
  p.run = [this, kv = *kv, op, layer, staging, tokens, first_position]() -> absl::Status {
    const uint64_t bytes = kv->StagingBytesPerToken() * tokens;
    absl::StatusOr<uint8_t*> data = arena_->StagingAddress(staging, bytes);
    if (!data.ok()) return data.status();
    absl::Status s = op == abi::kOpPrefill
                         ? kv->Prefill(layer, *data, *data + bytes / 2, tokens, first_position)
                         : kv->Append(layer, *data, *data + bytes / 2, tokens, first_position);
    if (s.ok()) (void)arena_->FreeStaging(staging);
    return s;
  };
  return Enqueue(op, std::move(p));
}

absl::Status FakeDaemon::Finish(client_internal::Ticket ticket) {
  Answer(ticket);
  auto it = tickets_.find(ticket);
  if (it == tickets_.end()) return absl::InternalError("unknown ticket");
  absl::Status s = *it->second.status;
  tickets_.erase(it);
  return s;
}

absl::StatusOr<client_internal::Ticket> FakeDaemon::SubmitSelectBatch(
    uint32_t layer, absl::Span<const client_internal::SelectRequest> requests) {
  largest_batch_ = std::max<uint64_t>(largest_batch_, requests.size());
  struct One {
    SequenceKv* kv = nullptr;
    std::string handle;
    absl::Status found;
    std::vector<float> queries;
    std::vector<uint8_t> mask;
    uint32_t k = 0;
    bool tail = false;  // the geometry keeps summaries: the answer carries tail partials
  };
  std::vector<One> ones(requests.size());
  Pending p;
  p.select = true;
  for (size_t i = 0; i < requests.size(); ++i) {
    const client_internal::SelectRequest& q = requests[i];
    absl::StatusOr<SequenceKv*> kv = Find(q.handle);
    ones[i].found = kv.status();
    ones[i].handle = q.handle;
    if (kv.ok()) ones[i].kv = *kv;
    ones[i].queries.assign(q.queries, q.queries + q.query_floats);
    if (q.head_mask != nullptr) {
      ones[i].mask.assign(q.head_mask, q.head_mask + q.num_kv_heads);
      ++masked_selects_;
      for (uint8_t m : ones[i].mask) masked_heads_ += m != 0;
    }
    ones[i].k = q.k;
    ones[i].tail = kv.ok() && (*kv)->geometry().keeps_summaries();
    p.keys.push_back(absl::StrCat(q.handle, "/", layer));
  }
  // run() computes the answers into `answers`, kept until FinishSelectBatch.
  auto answers = std::make_shared<std::vector<client_internal::SelectAnswer>>(requests.size());
  p.run = [this, ones = std::move(ones), layer, answers]() mutable -> absl::Status {
    for (size_t i = 0; i < ones.size(); ++i) {
      client_internal::SelectAnswer& a = (*answers)[i];
      if (!ones[i].found.ok()) {
        a.status = ones[i].found;
        continue;
      }
      a.status = ones[i]
                     .kv
                     ->Select(layer, ones[i].queries.data(), ones[i].k, &a.pages, false,
                              ones[i].mask.empty() ? nullptr : ones[i].mask.data(),
                              ones[i].tail ? &a.tail : nullptr)
                     .status();
      last_answers_[ones[i].handle] = a;
    }
    return absl::OkStatus();
  };
  absl::StatusOr<client_internal::Ticket> t = Enqueue(abi::kOpSelectBatch, std::move(p));
  if (t.ok()) batch_answers_[*t] = answers;
  return t;
}

absl::StatusOr<std::vector<client_internal::SelectAnswer>> FakeDaemon::FinishSelectBatch(
    client_internal::Ticket ticket) {
  Answer(ticket);
  auto it = tickets_.find(ticket);
  if (it == tickets_.end()) return absl::InternalError("unknown ticket");
  const absl::Status s = *it->second.status;
  tickets_.erase(it);
  auto answers = batch_answers_.find(ticket);
  std::vector<client_internal::SelectAnswer> out = std::move(*answers->second);
  batch_answers_.erase(answers);
  if (!s.ok()) return s;
  if (std::exchange(spoil_next_select_, false) && !out.empty()) {
    std::vector<abi::SelectedPageRef>& pages = out[0].pages;
    for (size_t i = pages.size(); i-- > 0;) {  // the last real page: good ones come before it
      if (pages[i].segment != abi::kNoSegment && pages[i].valid != 0) {
        pages[i].valid = 0xffff;
        break;
      }
    }
  }
  return out;
}

bool FakeDaemon::Done(client_internal::Ticket ticket) const {
  auto it = tickets_.find(ticket);
  return it != tickets_.end() && it->second.status.has_value();
}

absl::StatusOr<client_internal::ArenaSpan> FakeDaemon::Map(const abi::ArenaRef& ref,
                                                           uint64_t bytes) {
  const uint64_t page_bytes = PageBytes(ref.segment);
  uint8_t* at = nullptr;
  if (page_bytes != 0) {
    if (ref.offset % page_bytes != 0 || bytes > page_bytes) {
      return absl::InternalError("not a whole page frame");
    }
    at =
        arena_->FrameAddress(FrameRef{ref.segment, static_cast<uint32_t>(ref.offset / page_bytes)});
  } else {
    absl::StatusOr<uint8_t*> staging = arena_->StagingAddress(ref, bytes);
    if (!staging.ok()) return absl::InternalError(staging.status().message());
    at = *staging;
  }
  return client_internal::ArenaSpan{at, at};
}

uint64_t FakeDaemon::PageBytes(uint32_t segment) const {
  if (segment == 0 || segment >= abi::kMaxSegments) return 0;
  return arena_->header()->segments[segment].page_bytes;
}

absl::Status FakeDaemon::DropSequence(const std::string& handle) {
  auto it = kv_.find(handle);
  if (it == kv_.end()) return absl::NotFoundError(absl::StrCat("no sequence ", handle));
  it->second->WaitForSamples();
  kv_.erase(it);
  return absl::OkStatus();
}

abi::ClientStats& FakeDaemon::stats() { return arena_->header()->stats; }

}  // namespace icecache::testing
