#include "client/decoder.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/cleanup/cleanup.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "icecache/attachment.h"

namespace icecache::client_internal {
namespace {

constexpr uint32_t kMaxSplits = 64;

double MicrosSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t).count();
}

// A sequence's error, named.
absl::Status Named(const Sequence::Impl& s, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat("sequence ", s.handle(), ": ", status.message()));
}

}  // namespace

Decoder::~Decoder() {
  absl::MutexLock lock(&mu_);
  for (auto& ws : workspaces_) {
    if (ws != nullptr && ws->done_recorded) (void)be_->WaitMarker(ws->done.get());
  }
}

absl::StatusOr<Decoder::Workspace*> Decoder::WorkspaceFor(uint32_t layer) {
  absl::MutexLock lock(&mu_);
  if (workspaces_.size() <= layer) workspaces_.resize(layer + 1);
  if (workspaces_[layer] == nullptr) {
    auto ws = std::make_unique<Workspace>();
    for (std::unique_ptr<Marker>* m : {&ws->done, &ws->fetch_begin, &ws->fetch_end}) {
      ICECACHE_ASSIGN_OR_RETURN(*m, be_->CreateMarker());
    }
    workspaces_[layer] = std::move(ws);
  }
  return workspaces_[layer].get();
}

absl::Status Decoder::Reserve(Workspace& ws, uint32_t heads, uint32_t items,
                              uint32_t chunks_per_head, uint32_t num_q_heads, uint32_t head_dim,
                              size_t q_bytes) {
  if (ws.plan == nullptr || heads > ws.heads || items > ws.items ||
      chunks_per_head > ws.chunks_per_head) {
    ws.heads = std::max(heads, ws.heads);
    ws.items = std::max(items, ws.items);
    ws.chunks_per_head = std::max(chunks_per_head, ws.chunks_per_head);
    ws.plan = std::make_unique<DecodePlan>(ws.heads, ws.items, ws.chunks_per_head);
    ICECACHE_RETURN_IF_ERROR(ws.desc_host.Allocate(be_, ws.plan->buffer_bytes(), /*on_host=*/true));
    ICECACHE_RETURN_IF_ERROR(ws.desc_dev.Allocate(be_, ws.plan->buffer_bytes()));
  }
  DecodeAttentionParams probe;
  probe.num_q_heads = num_q_heads;
  probe.num_kv_heads = heads;
  probe.head_dim = head_dim;
  const size_t scratch = be_->AttentionScratchBytes(probe, kMaxSplits);
  if (scratch > ws.scratch_bytes) {
    ICECACHE_RETURN_IF_ERROR(ws.scratch.Allocate(be_, scratch));
    ws.scratch_bytes = scratch;
  }
  if (q_bytes > ws.q_host.size()) {
    ICECACHE_RETURN_IF_ERROR(ws.q_host.Allocate(be_, q_bytes, /*on_host=*/true));
  }
  return absl::OkStatus();
}

absl::Status Decoder::DecodeBatch(uint32_t layer, absl::Span<Sequence::Impl* const> batch,
                                  const void* q, const void* k_new, const void* v_new, void* out,
                                  void* stream, std::vector<absl::Status>* statuses) {
  const auto t0 = std::chrono::steady_clock::now();
  // ---- the batch itself: checked before anything changes
  if (batch.empty()) return absl::InvalidArgumentError("an empty batch");
  if (q == nullptr || k_new == nullptr || v_new == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("q, k_new, v_new and out must not be null");
  }
  const ResolvedGeometry& g0 = batch[0]->geometry();
  const float scale0 = batch[0]->context().scale;
  absl::flat_hash_set<const Sequence::Impl*> seen;
  for (Sequence::Impl* s : batch) {
    if (s == nullptr) return absl::InvalidArgumentError("a null sequence in the batch");
    if (!seen.insert(s).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", s->handle(), " is in the batch twice"));
    }
    if (s->context().decoder != this) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", s->handle(), " belongs to another client"));
    }
    const ResolvedGeometry& g = s->geometry();
    if (g.num_q_heads != g0.num_q_heads || g.num_kv_heads != g0.num_kv_heads ||
        g.head_dim != g0.head_dim || g.dtype != g0.dtype || g.page_size != g0.page_size ||
        s->context().scale != scale0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", s->handle(), " does not match the batch's first (", batch[0]->handle(),
          "): a batch shares num_q_heads, num_kv_heads, head_dim, dtype, page_size "
          "and scale"));
    }
  }
  const uint32_t n = static_cast<uint32_t>(batch.size());
  const uint32_t kv = g0.num_kv_heads;
  const uint64_t q_row = uint64_t{g0.num_q_heads} * g0.head_dim * DTypeBytes(g0.dtype);
  const uint64_t kv_row = uint64_t{kv} * g0.head_dim * DTypeBytes(g0.dtype);
  ICECACHE_ASSIGN_OR_RETURN(Workspace * ws, WorkspaceFor(layer));
  absl::MutexLock ws_lock(&ws->mu);
  // The previous step of this layer is done with the workspace's descriptors.
  if (ws->done_recorded) ICECACHE_RETURN_IF_ERROR(be_->WaitMarker(ws->done.get()));
  if (ws->fetch_pending_timing) {
    absl::StatusOr<double> us = be_->ElapsedUs(ws->fetch_begin.get(), ws->fetch_end.get());
    if (us.ok()) tr_->stats().fetch_nanoseconds.fetch_add(static_cast<uint64_t>(*us * 1000.0));
    ws->fetch_pending_timing = false;
  }
  uint32_t items = 0, chunks = 0;
  for (Sequence::Impl* s : batch) {
    items += s->gather_items();
    chunks = std::max(chunks, s->chunks_per_head());
  }
  ICECACHE_RETURN_IF_ERROR(
      Reserve(*ws, n * kv, items, chunks, n * g0.num_q_heads, g0.head_dim, n * q_row));

  // ---- 1. each sequence's token, and what it still needs selected
  std::vector<absl::Status> status(n);
  std::vector<StepState> steps(n);
  // Every step begun and not finished (its sequence failed, or the batch returns early) is
  // taken back, so that the engine may decode the token again.
  absl::Cleanup abort_unfinished = [&] {
    for (uint32_t i = 0; i < n; ++i) batch[i]->AbortStep(&steps[i]);
  };
  const auto* k_bytes = static_cast<const uint8_t*>(k_new);
  const auto* v_bytes = static_cast<const uint8_t*>(v_new);
  bool any_query = false;
  for (uint32_t i = 0; i < n; ++i) {
    status[i] =
        batch[i]->BeginStep(layer, k_bytes + i * kv_row, v_bytes + i * kv_row, stream, &steps[i]);
    steps[i].head_base = i * kv;
    any_query |= status[i].ok() && steps[i].needs_pages;
  }

  // ---- 2. the queries on the host (one copy), prefetched pages, drift
  if (any_query) {
    ICECACHE_RETURN_IF_ERROR(be_->Copy(ws->q_host.ptr(), q, n * q_row, stream));
    ICECACHE_RETURN_IF_ERROR(be_->Synchronize(stream));
  }
  std::vector<SelectRequest> requests;
  std::vector<uint32_t> requester;
  for (uint32_t i = 0; i < n; ++i) {
    if (!status[i].ok() || !steps[i].needs_pages) continue;
    status[i] = batch[i]->TakeQuery(
        reinterpret_cast<const uint16_t*>(ws->q_host.bytes() + i * q_row), &steps[i]);
    if (!status[i].ok()) continue;
    if (std::any_of(steps[i].search.begin(), steps[i].search.end(),
                    [](uint8_t x) { return x != 0; })) {
      requests.push_back(batch[i]->SearchRequest(steps[i]));
      requester.push_back(i);
    }
  }

  // ---- 3. one batch select for every head still to search
  auto select = [&](const std::vector<SelectRequest>& reqs, const std::vector<uint32_t>& who) {
    std::vector<SelectAnswer> answers;
    if (!reqs.empty()) {
      const auto ts = std::chrono::steady_clock::now();
      absl::StatusOr<Ticket> ticket;
      while (true) {
        ticket = tr_->SubmitSelectBatch(layer, reqs);
        if (ticket.ok() || !IsSlotsExhausted(ticket.status())) break;
        // Every slot is held by pending operations: finish one and try again.
        bool finished = false;
        for (Sequence::Impl* s : batch) {
          if (s->FinishOldestPending()) {
            finished = true;
            break;
          }
        }
        if (!finished) break;
      }
      absl::StatusOr<std::vector<SelectAnswer>> got =
          ticket.ok() ? tr_->FinishSelectBatch(*ticket) : ticket.status();
      const double us = MicrosSince(ts);
      for (uint32_t i : who) {
        steps[i].b.select_us += us;
        steps[i].b.select_wait_us += us;
      }
      if (!got.ok()) {
        for (uint32_t i : who) status[i] = got.status();
      } else {
        answers = std::move(*got);
      }
    }
    for (uint32_t i = 0, r = 0; i < n; ++i) {
      if (!status[i].ok() || !steps[i].needs_pages) continue;
      const SelectAnswer* a = nullptr;
      if (r < who.size() && who[r] == i) {
        a = r < answers.size() ? &answers[r] : nullptr;
        ++r;
        if (a == nullptr) continue;  // the whole select failed: status set above
      } else if (&who != &requester) {
        continue;  // not part of this round
      }
      status[i] = batch[i]->AfterSelect(a, &steps[i]);
    }
  };
  select(requests, requester);
  // Pages selected one step ahead by a daemon that was replaced during this select mean
  // nothing now: those sequences search every head again, once (Sequence::AfterSelect).
  std::vector<SelectRequest> again;
  std::vector<uint32_t> again_who;
  const uint64_t generation = tr_->generation();
  for (uint32_t i = 0; i < n; ++i) {
    StepState& st = steps[i];
    const bool aborted = status[i].code() == absl::StatusCode::kAborted && st.refs.empty();
    const bool stale = status[i].ok() && st.needs_pages && !st.refs.empty() &&
                       st.generation != generation;  // prefetched only, replaced meanwhile
    if (!aborted && !stale) continue;
    status[i] = absl::OkStatus();
    st.refs.clear();
    st.tail.clear();
    st.search.assign(st.search.size(), 1);
    again.push_back(batch[i]->SearchRequest(st));
    again_who.push_back(i);
  }
  if (!again.empty()) select(again, again_who);

  // ---- 4. the plan: every sequence's heads (empty for one that failed: zeros out)
  DecodePlan& plan = *ws->plan;
  plan.Clear();
  for (uint32_t i = 0; i < n; ++i) {
    const DecodePlan::Mark mark = plan.Marker();
    if (status[i].ok()) status[i] = batch[i]->Plan(&steps[i], &plan);
    if (!status[i].ok()) {
      plan.Rewind(mark);
      for (uint32_t h = 0; h < kv; ++h) plan.BeginHead();
    }
  }
  ICECACHE_RETURN_IF_ERROR(plan.Finish());

  // ---- 5. one descriptor copy (and one of the tail partials), one gather, one attention
  size_t used = 0;
  const DecodePlan::View view = plan.Serialize(ws->desc_host.bytes(), ws->desc_dev.bytes(), &used);
  ICECACHE_RETURN_IF_ERROR(be_->Copy(ws->desc_dev.ptr(), ws->desc_host.ptr(), used, stream));
  // The tail partials of every sequence whose step has them, at its query heads; the others'
  // rows are empty partials (sum 0: their attention is unchanged).
  const float* tail = nullptr;
  const size_t tail_row = 2 + size_t{g0.head_dim};
  const size_t seq_tail = size_t{g0.num_q_heads} * tail_row;
  bool any_tail = false;
  for (uint32_t i = 0; i < n; ++i) {
    any_tail |= status[i].ok() && steps[i].tail.size() == seq_tail;
  }
  if (any_tail) {
    const size_t bytes = n * seq_tail * sizeof(float);
    if (bytes > ws->tail_host.size()) {
      ICECACHE_RETURN_IF_ERROR(ws->tail_host.Allocate(be_, bytes, /*on_host=*/true));
      ICECACHE_RETURN_IF_ERROR(ws->tail_dev.Allocate(be_, bytes));
    }
    auto* host = reinterpret_cast<float*>(ws->tail_host.bytes());
    for (uint32_t i = 0; i < n; ++i) {
      float* at = host + i * seq_tail;
      if (status[i].ok() && steps[i].tail.size() == seq_tail) {
        std::memcpy(at, steps[i].tail.data(), seq_tail * sizeof(float));
      } else {
        std::fill(at, at + seq_tail, 0.0f);
      }
    }
    ICECACHE_RETURN_IF_ERROR(be_->Copy(ws->tail_dev.ptr(), ws->tail_host.ptr(), bytes, stream));
    tail = reinterpret_cast<const float*>(ws->tail_dev.bytes());
  }
  const bool profile = batch[0]->context().profile;
  const auto tf = std::chrono::steady_clock::now();
  abi::ClientStats& stats = tr_->stats();
  if (plan.num_items() > 0) {
    ICECACHE_RETURN_IF_ERROR(be_->Record(ws->fetch_begin.get(), stream));
    ICECACHE_RETURN_IF_ERROR(
        be_->Gather(view.items, plan.num_items(), batch[0]->page_bytes(), stream));
    ICECACHE_RETURN_IF_ERROR(be_->Record(ws->fetch_end.get(), stream));
    ws->fetch_pending_timing = true;
    stats.fetched_bytes.fetch_add(uint64_t{plan.num_items()} * batch[0]->page_bytes());
    if (profile) {
      ICECACHE_ASSIGN_OR_RETURN(const double us,
                                be_->ElapsedUs(ws->fetch_begin.get(), ws->fetch_end.get()));
      stats.fetch_nanoseconds.fetch_add(static_cast<uint64_t>(us * 1000.0));
      ws->fetch_pending_timing = false;
    }
  }
  const double fetch_us = MicrosSince(tf);
  const auto ta = std::chrono::steady_clock::now();
  const DecodeAttentionParams p{.q = q,
                                .out = out,
                                .chunks = view.chunks,
                                .chunk_offsets = view.chunk_offsets,
                                .num_q_heads = n * g0.num_q_heads,
                                .num_kv_heads = n * kv,
                                .head_dim = g0.head_dim,
                                .dtype = g0.dtype,
                                .scale = scale0,
                                .tail = tail};
  const uint32_t splits = std::clamp<uint32_t>(plan.max_chunks_in_a_head(), 1, kMaxSplits);
  ICECACHE_RETURN_IF_ERROR(be_->Attention(p, splits, ws->scratch.ptr(), stream));
  if (profile) {
    ICECACHE_RETURN_IF_ERROR(be_->Record(ws->done.get(), stream));
    ICECACHE_RETURN_IF_ERROR(be_->WaitMarker(ws->done.get()));
  }
  const double attention_us = MicrosSince(ta);

  // ---- 6. each sequence's end of step; kAsync: one callback submits the hand-overs, then
  // one select sent ahead for the next step
  std::vector<Sequence::Impl::EndOfStep> ends(n);
  std::vector<SelectRequest> ahead;
  std::vector<Mailbox*> ahead_boxes;
  struct Append {
    Mailbox* box;
    std::string handle;
    uint32_t op;
    uint32_t tokens;
    StagedHandOver staged;
  };
  std::vector<Append> appends;
  for (uint32_t i = 0; i < n; ++i) {
    if (!status[i].ok()) continue;
    status[i] = batch[i]->FinishStep(&steps[i], stream);
    if (!status[i].ok() || steps[i].full_kv ||
        batch[i]->context().selection != SelectionMode::kAsync) {
      continue;
    }
    ends[i] = batch[i]->EndOfStepWork(layer);
    if (ends[i].staged) {
      appends.push_back({ends[i].mailbox, batch[i]->handle(), ends[i].op,
                         batch[i]->geometry().page_size, *ends[i].staged});
    }
    if (ends[i].send_select) {
      ahead.push_back(batch[i]->PrefetchRequest(layer));
      ahead_boxes.push_back(ends[i].mailbox);
    }
  }
  if (!appends.empty() || !ahead.empty()) {
    if (!ahead.empty() && !tr_->PrepareSelectBatch(ahead).ok()) {
      // No scratch for the selects sent ahead (e.g. the memory quota): every step is done
      // already and must not fail now; the next steps search synchronously instead.
      ahead.clear();
      ahead_boxes.clear();
    }
    Transport* tr = tr_;
    ICECACHE_RETURN_IF_ERROR(be_->HostCallback(
        stream, [tr, layer, appends = std::move(appends), ahead = std::move(ahead),
                 ahead_boxes = std::move(ahead_boxes)]() {
          // The hand-overs first: the selects sent after them see their pages.
          bool all_submitted = true;
          for (const Append& a : appends) {
            absl::StatusOr<Ticket> t =
                tr->SubmitStaged(a.op, a.handle, layer, a.staged.staged.buffer, a.tokens,
                                 static_cast<uint32_t>(a.staged.first));
            absl::MutexLock lock(&a.box->mu);
            if (t.ok()) {
              a.box->append = *t;
            } else {
              a.box->append_error = t.status();
              all_submitted = false;
            }
          }
          // No select may run ahead of a hand-over that is not submitted: then the next step
          // searches synchronously.
          if (!all_submitted || ahead.empty()) return;
          absl::StatusOr<Ticket> t = tr->SubmitSelectBatch(layer, ahead);
          if (!t.ok()) return;
          auto shared = std::make_shared<PrefetchBatch>(tr, *t);
          for (size_t i = 0; i < ahead_boxes.size(); ++i) {
            absl::MutexLock lock(&ahead_boxes[i]->mu);
            ahead_boxes[i]->select = shared;
            ahead_boxes[i]->select_index = i;
          }
        }));
  }
  // The workspace and each sequence's layer are free again once the stream gets here.
  ICECACHE_RETURN_IF_ERROR(be_->Record(ws->done.get(), stream));
  ws->done_recorded = true;
  for (uint32_t i = 0; i < n; ++i) {
    (void)batch[i]->MarkDone(layer, stream);
    if (!status[i].ok()) continue;
    batch[i]->KeepAttended(layer, plan, steps[i].head_base);
    uint64_t rows = 0;
    for (uint32_t c = plan.offsets()[steps[i].head_base];
         c < plan.offsets()[steps[i].head_base + kv]; ++c) {
      rows += plan.chunks()[c].count;
    }
    steps[i].b.attended_tokens = static_cast<uint32_t>(rows);
    steps[i].b.fetch_us = fetch_us;
    steps[i].b.attention_us = attention_us;
    steps[i].b.total_us = MicrosSince(t0);
    batch[i]->set_last(steps[i].b);
  }
  absl::Status first;
  for (uint32_t i = 0; i < n; ++i) {
    if (!status[i].ok() && first.ok()) first = Named(*batch[i], status[i]);
  }
  if (statuses != nullptr) *statuses = std::move(status);
  return first;
}

}  // namespace icecache::client_internal
